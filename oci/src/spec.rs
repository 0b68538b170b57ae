//! The parts of the OCI image spec (and Docker's v2 schema 2, which has the same shape) that
//! anvil reads: descriptors, manifests, indexes and the image configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest media type.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media types a manifest request accepts, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest, index or configuration document read into memory.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (the OCI layout's tag lives in `org.opencontainers.image.ref.name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest: a configuration and layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's own media type (optional in OCI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image configuration.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// An image index (or Docker manifest list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The index's own media type (optional in OCI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests, each with its platform.
    pub manifests: Vec<Descriptor>,
}

/// A manifest or index document, told apart by media type or, failing that, by shape.
#[derive(Debug, Clone)]
pub enum ManifestDoc {
    /// A single-platform image manifest.
    Manifest(Manifest),
    /// An index of per-platform manifests.
    Index(Index),
}

impl ManifestDoc {
    /// Parses a manifest or index; `media_type` is the Content-Type or descriptor media type.
    pub fn parse(bytes: &[u8], media_type: &str) -> Result<Self, serde_json::Error> {
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        if media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST {
            return serde_json::from_slice(bytes).map(Self::Index);
        }
        if media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST {
            return serde_json::from_slice(bytes).map(Self::Manifest);
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)?;
        if value.get("manifests").is_some() {
            serde_json::from_value(value).map(Self::Index)
        } else {
            serde_json::from_value(value).map(Self::Manifest)
        }
    }
}

impl Index {
    /// The linux/amd64 entry, if any.
    pub fn linux_amd64(&self) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
    }
}

/// The image configuration blob.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture the image is built for.
    #[serde(default)]
    pub architecture: String,
    /// Operating system the image is built for.
    #[serde(default)]
    pub os: String,
    /// How to run it.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// The uncompressed layer digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The `config` part of an image configuration: how to run a container of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `uid`, `uid:gid`, `name` or `name:group`.
    #[serde(default)]
    pub user: Option<String>,
    /// `KEY=VALUE` pairs.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The executable and its first arguments.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or the command, without an entrypoint).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// The `rootfs` part of an image configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digests of the uncompressed layer tars, base first.
    pub diff_ids: Vec<Digest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_picks_linux_amd64() {
        let d = Digest::of(b"x");
        let doc = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{MEDIA_OCI_MANIFEST}","digest":"{d}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{MEDIA_OCI_MANIFEST}","digest":"{d}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let ManifestDoc::Index(index) = ManifestDoc::parse(doc.as_bytes(), "").unwrap() else {
            panic!("not an index");
        };
        assert_eq!(index.linux_amd64().unwrap().size, 2);
    }

    #[test]
    fn docker_config_parses() {
        let doc = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Cmd":["sh"],"WorkingDir":"/w"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config: ImageConfig = serde_json::from_slice(doc).unwrap();
        let run = config.config.unwrap();
        assert_eq!(run.env.unwrap(), vec!["A=1".to_string()]);
        assert_eq!(run.working_dir.as_deref(), Some("/w"));
    }
}
