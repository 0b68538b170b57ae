//! Writes images: an OCI layout, a `docker save` archive, and a push of a layout's image to a
//! registry. The tests build their images with it (no skopeo or Docker needed).

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::digest::Digest;
use crate::error::{io_err, ImageError, Result};
use crate::layout::REF_NAME;
use crate::spec::{Descriptor, ImageConfig, Index, Manifest, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};

/// gzip-compressed OCI layer media type.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI image configuration media type.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// An image in memory: configuration, layers (uncompressed tars) and their gzip blobs.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    config: ImageConfig,
    /// (uncompressed tar, gzip blob).
    layers: Vec<(Vec<u8>, Vec<u8>)>,
}

fn descriptor(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: Digest::of(data),
        size: data.len() as u64,
        platform: None,
        annotations: Default::default(),
    }
}

fn json_error(e: serde_json::Error) -> ImageError {
    ImageError::Malformed {
        what: "image being written".into(),
        why: e.to_string(),
    }
}

impl ImageBuilder {
    /// An image with this run configuration (linux/amd64).
    pub fn new(run: crate::spec::RunConfig) -> Self {
        Self {
            config: ImageConfig {
                architecture: "amd64".into(),
                os: "linux".into(),
                config: Some(run),
                rootfs: Some(crate::spec::RootFs {
                    kind: "layers".into(),
                    diff_ids: Vec::new(),
                }),
            },
            layers: Vec::new(),
        }
    }

    /// Adds a layer given as an uncompressed tar.
    pub fn layer(mut self, tar: Vec<u8>) -> Result<Self> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let gz = gz
            .write_all(&tar)
            .and_then(|()| gz.finish())
            .map_err(io_err("<gzip>"))?;
        if let Some(rootfs) = self.config.rootfs.as_mut() {
            rootfs.diff_ids.push(Digest::of(&tar));
        }
        self.layers.push((tar, gz));
        Ok(self)
    }

    fn config_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.config).map_err(json_error)
    }

    /// The configuration digest (the image's identity in the cache).
    pub fn config_digest(&self) -> Result<Digest> {
        Ok(Digest::of(&self.config_bytes()?))
    }

    fn manifest(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let config = self.config_bytes()?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.into()),
            config: descriptor(MEDIA_CONFIG, &config),
            layers: self
                .layers
                .iter()
                .map(|(_, gz)| descriptor(MEDIA_LAYER_GZIP, gz))
                .collect(),
        };
        Ok((config, serde_json::to_vec(&manifest).map_err(json_error)?))
    }

    /// Writes an OCI layout in `dir` whose index tags the image `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let put = |data: &[u8]| -> Result<()> {
            let path = blobs.join(Digest::of(data).hex());
            fs::write(&path, data).map_err(io_err(&path))
        };
        let (config, manifest) = self.manifest()?;
        put(&config)?;
        put(&manifest)?;
        for (_, gz) in &self.layers {
            put(gz)?;
        }
        let mut entry = descriptor(MEDIA_OCI_MANIFEST, &manifest);
        entry.annotations.insert(REF_NAME.into(), tag.into());
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_INDEX.into()),
            manifests: vec![entry],
        };
        let write = |name: &str, data: &[u8]| -> Result<()> {
            let path = dir.join(name);
            fs::write(&path, data).map_err(io_err(&path))
        };
        write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        write(
            "index.json",
            &serde_json::to_vec(&index).map_err(json_error)?,
        )
    }

    /// Writes a `docker save` archive (uncompressed layers) naming the image `repo_tag`.
    pub fn write_docker_archive(&self, path: &Path, repo_tag: &str) -> Result<()> {
        let file = fs::File::create(path).map_err(io_err(path))?;
        let mut tar = tar::Builder::new(file);
        let mut add = |name: &str, data: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data)
                .map_err(io_err(path))
        };
        let config = self.config_bytes()?;
        let config_name = format!("{}.json", Digest::of(&config).hex());
        add(&config_name, &config)?;
        let mut layer_names = Vec::new();
        for (tar_bytes, _) in &self.layers {
            let name = format!("{}/layer.tar", Digest::of(tar_bytes).hex());
            add(&name, tar_bytes)?;
            layer_names.push(name);
        }
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": [repo_tag],
            "Layers": layer_names,
        }]);
        add("manifest.json", manifest.to_string().as_bytes())?;
        tar.into_inner()
            .and_then(|mut f| f.flush())
            .map_err(io_err(path))
    }

    /// Pushes the image to `registry` (`http://host:port`) as `repository:tag`, anonymously.
    pub fn push(&self, registry: &str, repository: &str, tag: &str) -> Result<()> {
        let agent = ureq::AgentBuilder::new().redirects(0).build();
        let fail = |url: &str, e: ureq::Error| ImageError::Registry {
            url: url.to_string(),
            why: e.to_string(),
        };
        let (config, manifest) = self.manifest()?;
        let mut blobs: Vec<&[u8]> = vec![&config];
        blobs.extend(self.layers.iter().map(|(_, gz)| gz.as_slice()));
        for blob in blobs {
            // Monolithic upload: POST for a session, PUT the bytes with the digest.
            let url = format!("{registry}/v2/{repository}/blobs/uploads/");
            let response = agent.post(&url).call().map_err(|e| fail(&url, e))?;
            let location = response.header("location").unwrap_or("").to_string();
            let upload = url::Url::parse(&url)
                .and_then(|u| u.join(&location))
                .map_err(|e| ImageError::Registry {
                    url: url.clone(),
                    why: e.to_string(),
                })?;
            let put_url = upload.to_string();
            agent
                .request_url("PUT", &upload)
                .query("digest", &Digest::of(blob).to_string())
                .set("Content-Type", "application/octet-stream")
                .send_bytes(blob)
                .map_err(|e| fail(&put_url, e))?;
        }
        let url = format!("{registry}/v2/{repository}/manifests/{tag}");
        agent
            .put(&url)
            .set("Content-Type", MEDIA_OCI_MANIFEST)
            .send_bytes(&manifest)
            .map_err(|e| fail(&url, e))?;
        Ok(())
    }
}
