//! A small blocking client for the OCI distribution API (pulls only), over ureq: anonymous,
//! bearer-token and basic auth (credentials from `~/.docker/config.json`), redirects followed
//! by hand so credentials never go to another host.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::reference::{RegistryRef, DOCKER_HUB};
use crate::source::Source;
use crate::spec::{Descriptor, MANIFEST_ACCEPT, MAX_DOCUMENT_BYTES};

/// Redirects followed for one request.
const MAX_REDIRECTS: u32 = 5;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]` or `host`) spoken to over plain HTTP. Loopback always is.
    pub insecure: Vec<String>,
    /// The Docker client configuration with `auths` (default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
}

/// A registry image as a [`Source`].
#[derive(Debug)]
pub struct RegistrySource {
    reference: RegistryRef,
    agent: ureq::Agent,
    base: String,
    basic: Option<String>,
    authorization: Option<String>,
}

/// Whether two URLs have the same scheme, host and port.
fn same_origin(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// Whether `host` is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The `auth` entry for `registry` in a Docker config file, as `Basic <base64>`.
fn docker_credentials(config: &Path, registry: &str) -> Option<String> {
    let bytes = std::fs::read(config).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let auths = value.get("auths")?.as_object()?;
    let mut keys = vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ];
    if registry == DOCKER_HUB {
        keys.push("https://index.docker.io/v1/".to_string());
        keys.push("docker.io".to_string());
    }
    let auth = keys
        .iter()
        .find_map(|k| auths.get(k)?.get("auth")?.as_str())?;
    // Checked to be base64 of user:password.
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .ok()?;
    String::from_utf8(decoded)
        .ok()?
        .contains(':')
        .then(|| format!("Basic {auth}"))
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Parses a `WWW-Authenticate` challenge: the scheme and its `key="value"` parameters.
pub fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    (scheme.to_ascii_lowercase(), params)
}

impl RegistrySource {
    /// A client for `reference`.
    pub fn new(reference: &RegistryRef, options: &RegistryOptions) -> Self {
        let insecure = is_loopback(reference.host())
            || options
                .insecure
                .iter()
                .any(|i| i == &reference.registry || i == reference.host());
        let scheme = if insecure { "http" } else { "https" };
        let config = options.docker_config.clone().or_else(default_docker_config);
        let basic = config.and_then(|c| docker_credentials(&c, &reference.registry));
        Self {
            base: format!(
                "{scheme}://{}/v2/{}",
                reference.registry, reference.repository
            ),
            reference: reference.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(15))
                .timeout_read(Duration::from_secs(120))
                .redirects(0)
                .build(),
            basic,
            authorization: None,
        }
    }

    fn registry_error(url: &str, why: impl ToString) -> ImageError {
        ImageError::Registry {
            url: url.to_string(),
            why: why.to_string(),
        }
    }

    /// GET with auth and redirects; 404 is [`ImageError::NotFound`].
    fn get(&mut self, url: &str, accept: &str) -> Result<ureq::Response> {
        let mut url = url.to_string();
        let mut authenticated = false;
        let mut redirects = 0;
        loop {
            let mut request = self.agent.get(&url).set("Accept", accept);
            // Credentials go only to the registry itself, never to a redirect target.
            if same_origin(&url, &self.base) {
                if let Some(auth) = &self.authorization {
                    request = request.set("Authorization", auth);
                }
            }
            match request.call() {
                Ok(response) if (300..400).contains(&response.status()) => {
                    redirects += 1;
                    let location = response
                        .header("location")
                        .ok_or_else(|| Self::registry_error(&url, "redirect without a location"))?;
                    if redirects > MAX_REDIRECTS {
                        return Err(Self::registry_error(&url, "too many redirects"));
                    }
                    let next = url::Url::parse(response.get_url())
                        .and_then(|base| base.join(location))
                        .map_err(|e| Self::registry_error(&url, e))?;
                    url = next.to_string();
                }
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if !authenticated => {
                    authenticated = true;
                    let challenge = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.authenticate(&challenge)?;
                }
                Err(ureq::Error::Status(code @ (401 | 403), response)) => {
                    return Err(ImageError::AuthRefused {
                        registry: self.reference.registry.clone(),
                        why: format!(
                            "{code} {}",
                            response.into_string().unwrap_or_default().trim()
                        ),
                    })
                }
                Err(ureq::Error::Status(404, _)) => {
                    return Err(ImageError::NotFound(self.reference.to_string()))
                }
                Err(ureq::Error::Status(code, response)) => {
                    return Err(Self::registry_error(
                        &url,
                        format!("{code} {}", response.status_text()),
                    ))
                }
                Err(e) => return Err(Self::registry_error(&url, e)),
            }
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    fn authenticate(&mut self, challenge: &str) -> Result<()> {
        let refused = |why: &str| ImageError::AuthRefused {
            registry: self.reference.registry.clone(),
            why: why.to_string(),
        };
        let (scheme, params) = parse_challenge(challenge);
        let param = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match scheme.as_str() {
            "basic" => {
                let basic = self
                    .basic
                    .clone()
                    .ok_or_else(|| refused("needs credentials (none in the Docker config)"))?;
                self.authorization = Some(basic);
                Ok(())
            }
            "bearer" => {
                let realm =
                    param("realm").ok_or_else(|| refused("bearer challenge without a realm"))?;
                let scope = param("scope")
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let mut request = self.agent.get(&realm).query("scope", &scope);
                if let Some(service) = param("service") {
                    request = request.query("service", &service);
                }
                if let Some(basic) = &self.basic {
                    request = request.set("Authorization", basic);
                }
                let response = match request.call() {
                    Ok(r) => r,
                    Err(ureq::Error::Status(code, r)) => {
                        return Err(refused(&format!(
                            "token request: {code} {}",
                            r.into_string().unwrap_or_default().trim()
                        )))
                    }
                    Err(e) => return Err(Self::registry_error(&realm, e)),
                };
                let mut body = Vec::new();
                response
                    .into_reader()
                    .take(MAX_DOCUMENT_BYTES)
                    .read_to_end(&mut body)
                    .map_err(|e| Self::registry_error(&realm, e))?;
                let value: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|e| Self::registry_error(&realm, e))?;
                let token = value
                    .get("token")
                    .or_else(|| value.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| refused("the token response has no token"))?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(refused(&format!("unsupported challenge {challenge:?}"))),
        }
    }
}

impl Source for RegistrySource {
    fn name(&self) -> String {
        self.reference.to_string()
    }

    fn root_document(&mut self) -> Result<(Vec<u8>, String, Option<Digest>)> {
        let url = format!("{}/manifests/{}", self.base, self.reference.manifest_ref());
        let response = self.get(&url, MANIFEST_ACCEPT)?;
        let media_type = response.content_type().to_string();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Self::registry_error(&url, e))?;
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(Self::registry_error(&url, "manifest too large"));
        }
        Ok((bytes, media_type, self.reference.digest.clone()))
    }

    fn open(&mut self, desc: &Descriptor, manifest: bool) -> Result<Box<dyn Read + '_>> {
        let (kind, accept) = if manifest {
            ("manifests", MANIFEST_ACCEPT)
        } else {
            ("blobs", "*/*")
        };
        let url = format!("{}/{kind}/{}", self.base, desc.digest);
        Ok(self.get(&url, accept)?.into_reader())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_with_quoted_commas_parses() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "reg".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
    }

    #[test]
    fn loopback_is_recognised() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("registry.example"));
    }

    #[test]
    fn docker_config_credentials_are_found() {
        let dir = std::env::temp_dir().join(format!("anvil-dockercfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pw");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        assert_eq!(
            docker_credentials(&path, "reg.example:5000"),
            Some(format!("Basic {auth}"))
        );
        assert_eq!(docker_credentials(&path, "other"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
