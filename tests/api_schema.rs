//! Our OpenAPI document against the server and against Firecracker's: every documented
//! operation is served and accepts every documented field; nothing undocumented is served;
//! and every Firecracker path, method or body field we do not accept is listed, with its
//! reason, in docs/api.md. Needs no KVM: the API answers before the VM starts.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::client::Client;
use common::{anvil_vmm, repo_root, TempDir};
use serde_json::Value;

const METHODS: [&str; 4] = ["get", "put", "patch", "delete"];

fn our_doc() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap())
        .unwrap()
}

/// The server process, its socket and the directory that holds it (kept until the end).
struct Server(Child, PathBuf, #[allow(dead_code)] TempDir);

impl Server {
    fn start() -> Self {
        let dir = TempDir::new("schema");
        let sock = dir.path("api.sock");
        let child = Command::new(anvil_vmm())
            .args(["--api-sock", sock.to_str().unwrap(), "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self(child, sock, dir)
    }

    fn client(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Client::connect(&self.1) {
                return c;
            }
            assert!(Instant::now() < deadline, "the API socket never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A concrete path for a templated one.
fn concrete(path: &str) -> String {
    path.replace("{drive_id}", "d1")
        .replace("{iface_id}", "eth9")
        .replace("{id}", "p1")
}

/// True when the server does not know the method and path at all.
fn unknown(c: &mut Client, method: &str, path: &str) -> bool {
    let r = c
        .request(&method.to_uppercase(), &concrete(path), Some("{}"))
        .unwrap();
    r.json()["fault_message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Invalid request method and/or path"))
}

/// Resolves a `$ref` (OpenAPI 3 or Swagger 2) in `doc`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let mut node = doc;
            for part in r.trim_start_matches("#/").split('/') {
                node = &node[part];
            }
            node
        }
        None => schema,
    }
}

fn properties(doc: &Value, schema: &Value) -> BTreeSet<String> {
    resolve(doc, schema)["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The request body schema of an operation in our (OpenAPI 3) document.
fn our_body<'a>(doc: &'a Value, op: &'a Value) -> Option<&'a Value> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    (!schema.is_null()).then(|| resolve(doc, schema))
}

#[test]
fn every_documented_operation_is_served_and_accepts_its_fields() {
    let doc = our_doc();
    let server = Server::start();
    let mut c = server.client();
    let mut problems = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            if unknown(&mut c, method, path) {
                problems.push(format!("{method} {path}: documented but not served"));
                continue;
            }
            let Some(schema) = our_body(&doc, op) else {
                continue;
            };
            for field in properties(&doc, schema) {
                // A value of the wrong type for every field: the server must complain about
                // the value, not about an unknown field.
                let body = serde_json::json!({ field.clone(): [[]] }).to_string();
                let r = c
                    .request(&method.to_uppercase(), &concrete(path), Some(&body))
                    .unwrap();
                let message = r.json()["fault_message"].as_str().unwrap_or("").to_string();
                if r.status != 400 || message.contains("unknown field") {
                    problems.push(format!(
                        "{method} {path}: documented field {field} not accepted: {} {message}",
                        r.status
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn nothing_undocumented_is_served() {
    let doc = our_doc();
    let server = Server::start();
    let mut c = server.client();
    let mut candidates: BTreeSet<String> =
        doc["paths"].as_object().unwrap().keys().cloned().collect();
    if let Some(fc) = firecracker_doc() {
        candidates.extend(fc["paths"].as_object().unwrap().keys().cloned());
    }
    candidates.extend(["/snapshot/create", "/migration", "/metrics/json"].map(String::from));
    let mut problems = Vec::new();
    for path in &candidates {
        for method in METHODS {
            let documented = doc["paths"][path].get(method).is_some();
            if !documented && !unknown(&mut c, method, path) {
                problems.push(format!("{method} {path}: served but not documented"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

fn firecracker_doc() -> Option<Value> {
    let path = repo_root().join("../shared/peers/firecracker-swagger.yaml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_yaml::from_str(&text).unwrap()),
        Err(_) => {
            eprintln!(
                "SKIPPED the Firecracker comparison: {} is not here",
                path.display()
            );
            None
        }
    }
}

/// The gaps docs/api.md explains, between its schema-gaps markers: lines "- `GAP`: why".
fn documented_gaps() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/api.md")).unwrap();
    let start = text.find("<!-- schema-gaps:start -->").unwrap();
    let end = text.find("<!-- schema-gaps:end -->").unwrap();
    text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split_once("`:"))
        .map(|(gap, why)| {
            assert!(
                !why.trim().is_empty(),
                "{gap}: no reason given in docs/api.md"
            );
            gap.to_string()
        })
        .collect()
}

#[test]
fn firecracker_paths_and_fields_we_lack_are_explained() {
    let Some(fc) = firecracker_doc() else { return };
    let ours = our_doc();
    let mut gaps = BTreeSet::new();
    for (path, item) in fc["paths"].as_object().unwrap() {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let Some(our_op) = ours["paths"][path].get(method) else {
                gaps.insert(format!("{} {path}", method.to_uppercase()));
                continue;
            };
            let fc_body = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["in"] == "body");
            let Some(fc_body) = fc_body else { continue };
            let fc_fields = properties(&fc, &fc_body["schema"]);
            let our_fields = our_body(&ours, our_op)
                .map(|s| properties(&ours, s))
                .unwrap_or_default();
            for field in fc_fields.difference(&our_fields) {
                gaps.insert(format!("{} {path} {field}", method.to_uppercase()));
            }
        }
    }
    // The configuration file's sections.
    let fc_full = properties(&fc, &fc["definitions"]["FullVmConfiguration"]);
    let our_full = properties(&ours, &ours["components"]["schemas"]["FullVmConfiguration"]);
    for field in fc_full.difference(&our_full) {
        gaps.insert(format!("config-file {field}"));
    }
    let explained = documented_gaps();
    let unexplained: Vec<_> = gaps.difference(&explained).collect();
    let stale: Vec<_> = explained.difference(&gaps).collect();
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "Firecracker gaps not explained in docs/api.md: {unexplained:#?}\n\
         explained in docs/api.md but no longer gaps: {stale:#?}"
    );
}
