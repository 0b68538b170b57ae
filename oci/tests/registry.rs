//! The registry client against a scripted registry on 127.0.0.1: a bearer challenge answered
//! with basic credentials from a Docker config file, an image index resolved to linux/amd64,
//! blobs redirected to another origin (which must not see the token), and the failures: wrong
//! password, unknown tag, no linux/amd64 variant, a blob that does not match its digest.

// Test helpers outside #[test] functions: a failed step should stop the test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use oci::spec::RunConfig;
use oci::writer::ImageBuilder;
use oci::{Digest, ImageError, ImageRef, RegistryOptions, Store};

const TOKEN: &str = "good-token";

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("anvil-oci-reg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake registry saw.
#[derive(Default)]
struct Seen {
    /// Authorization headers sent to the other-origin blob storage.
    storage_auth: Vec<String>,
    token_requests: u32,
}

struct Fake {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

struct Content {
    /// Tag → (body, media type).
    tags: HashMap<String, (Vec<u8>, String)>,
    /// Digest hex → bytes (manifests and blobs).
    blobs: HashMap<String, Vec<u8>>,
    /// Blobs served with a flipped last byte.
    corrupt: Vec<String>,
    user_pass: String,
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, port: u16, content: &Content, seen: &Mutex<Seen>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    let path = target.split('?').next().unwrap_or("");
    if path == "/token" {
        seen.lock().unwrap().token_requests += 1;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(&content.user_pass)
        );
        if auth == expected && target.contains("scope=repository%3Ateam%2Fapp%3Apull") {
            respond(
                &mut stream,
                "200 OK",
                &[],
                format!(r#"{{"token":"{TOKEN}"}}"#).as_bytes(),
            );
        } else {
            respond(&mut stream, "401 Unauthorized", &[], b"bad credentials");
        }
        return;
    }
    if let Some(hex) = path.strip_prefix("/storage/") {
        seen.lock().unwrap().storage_auth.push(auth);
        let mut data = content.blobs.get(hex).cloned().unwrap_or_default();
        if content.corrupt.iter().any(|c| c == hex) {
            if let Some(last) = data.last_mut() {
                *last ^= 0xff;
            }
        }
        respond(&mut stream, "200 OK", &[], &data);
        return;
    }
    if auth != format!("Bearer {TOKEN}") {
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:team/app:pull""#
        );
        respond(
            &mut stream,
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            b"",
        );
        return;
    }
    let Some(rest) = path.strip_prefix("/v2/team/app/") else {
        respond(&mut stream, "404 Not Found", &[], b"");
        return;
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        if let Some(hex) = reference.strip_prefix("sha256:") {
            match content.blobs.get(hex) {
                Some(body) => respond(&mut stream, "200 OK", &[], body),
                None => respond(&mut stream, "404 Not Found", &[], b""),
            }
        } else {
            match content.tags.get(reference) {
                Some((body, media)) => respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type", media.clone())],
                    body,
                ),
                None => respond(&mut stream, "404 Not Found", &[], br#"{"errors":[]}"#),
            }
        }
    } else if let Some(digest) = rest.strip_prefix("blobs/sha256:") {
        // Blobs live elsewhere: another origin (localhost, not 127.0.0.1).
        respond(
            &mut stream,
            "307 Temporary Redirect",
            &[(
                "Location",
                format!("http://localhost:{port}/storage/{digest}"),
            )],
            b"",
        );
    } else {
        respond(&mut stream, "404 Not Found", &[], b"");
    }
}

fn start(content: Content) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = Arc::clone(&seen);
    let content = Arc::new(content);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            serve(stream, port, &content, &seen2);
        }
    });
    Fake { port, seen }
}

fn index(entries: &[(&str, &Digest, usize)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(arch, digest, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest.to_string(), "size": size,
                "platform": {"architecture": arch, "os": "linux"}
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests})).unwrap()
}

/// Serves a small image as tag v1 (index: arm64 + amd64), armonly (index: arm64) and bad
/// (its layers corrupted in transit).
fn fake_registry(dir: &Path, user_pass: &str, corrupt: bool) -> (Fake, Digest) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "hello", &b"hi"[..]).unwrap();
    let image = ImageBuilder::new(RunConfig::default())
        .layer(b.into_inner().unwrap())
        .unwrap();
    let layout = dir.join("layout");
    image.write_layout(&layout, "v1").unwrap();
    let mut blobs = HashMap::new();
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        blobs.insert(
            e.file_name().into_string().unwrap(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    let layout_index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = Digest::parse(layout_index["manifests"][0]["digest"].as_str().unwrap()).unwrap();
    let size = blobs[manifest.hex()].len();
    let index_type = "application/vnd.oci.image.index.v1+json".to_string();
    let mut tags = HashMap::new();
    tags.insert(
        "v1".to_string(),
        (
            index(&[("arm64", &manifest, size), ("amd64", &manifest, size)]),
            index_type.clone(),
        ),
    );
    tags.insert(
        "armonly".to_string(),
        (index(&[("arm64", &manifest, size)]), index_type),
    );
    let corrupt = if corrupt {
        blobs
            .keys()
            .filter(|k| *k != manifest.hex())
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let fake = start(Content {
        tags,
        blobs,
        corrupt,
        user_pass: user_pass.to_string(),
    });
    (fake, image.config_digest().unwrap())
}

fn docker_config(dir: &Path, port: u16, user_pass: &str) -> PathBuf {
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    path
}

fn pull(dir: &Path, port: u16, tag: &str, config: PathBuf) -> Result<oci::Image, ImageError> {
    let store = Store::open(&dir.join("data")).unwrap();
    let reference = ImageRef::parse(&format!("127.0.0.1:{port}/team/app:{tag}")).unwrap();
    store.pull(
        &reference,
        &RegistryOptions {
            insecure: Vec::new(),
            docker_config: Some(config),
        },
    )
}

#[test]
fn bearer_auth_index_and_redirected_blobs() {
    let t = TempDir::new("ok");
    let (fake, config_digest) = fake_registry(&t.0, "alice:secret", false);
    let config = docker_config(&t.0, fake.port, "alice:secret");
    let image = pull(&t.0, fake.port, "v1", config).unwrap();
    assert_eq!(image.record.config_digest, config_digest);
    assert!(image.disk.exists());
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.token_requests, 1);
    // Two blobs (config, layer) came from the other origin, without the token.
    assert_eq!(seen.storage_auth.len(), 2);
    assert!(
        seen.storage_auth.iter().all(String::is_empty),
        "{:?}",
        seen.storage_auth
    );
}

#[test]
fn wrong_password_is_auth_refused() {
    let t = TempDir::new("refused");
    let (fake, _) = fake_registry(&t.0, "alice:secret", false);
    let config = docker_config(&t.0, fake.port, "alice:wrong");
    let err = pull(&t.0, fake.port, "v1", config).unwrap_err();
    assert!(matches!(err, ImageError::AuthRefused { .. }), "{err}");
}

#[test]
fn unknown_tag_is_not_found_and_arm_only_has_no_platform() {
    let t = TempDir::new("notfound");
    let (fake, _) = fake_registry(&t.0, "alice:secret", false);
    let config = docker_config(&t.0, fake.port, "alice:secret");
    let err = pull(&t.0, fake.port, "nope", config.clone()).unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err}");
    let err = pull(&t.0, fake.port, "armonly", config).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
}

#[test]
fn blob_that_does_not_match_its_digest_is_refused() {
    let t = TempDir::new("corrupt");
    let (fake, _) = fake_registry(&t.0, "alice:secret", true);
    let config = docker_config(&t.0, fake.port, "alice:secret");
    let err = pull(&t.0, fake.port, "v1", config).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    // Nothing unverified entered the cache.
    let blobs = std::fs::read_dir(t.0.join("data/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
}
