//! Reading a `docker save` archive: a tar of `manifest.json`, the configuration and
//! uncompressed (or gzip) layer tars. Its members are extracted (each at most once, with
//! bounded sizes) into a scratch directory named by content digest, then served like blobs.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{Digest, HashingWriter};
use crate::error::{io_err, ImageError, Result};
use crate::source::Source;
use crate::spec::{Descriptor, Manifest, MAX_DOCUMENT_BYTES, MEDIA_OCI_MANIFEST};

/// Largest member extracted from an archive.
const MAX_MEMBER_BYTES: u64 = 16 << 30;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A `docker save` archive as a [`Source`]: the first image in it.
#[derive(Debug)]
pub struct ArchiveSource {
    path: PathBuf,
    scratch: PathBuf,
    /// Extracted members: digest → file in `scratch`.
    blobs: HashMap<Digest, PathBuf>,
}

fn malformed(path: &Path, why: impl ToString) -> ImageError {
    ImageError::Malformed {
        what: format!("docker archive {}", path.display()),
        why: why.to_string(),
    }
}

impl ArchiveSource {
    /// Opens `path`, extracting into `scratch` (created; the caller removes it).
    pub fn new(path: &Path, scratch: &Path) -> Result<Self> {
        fs::create_dir_all(scratch).map_err(io_err(scratch))?;
        Ok(Self {
            path: path.to_path_buf(),
            scratch: scratch.to_path_buf(),
            blobs: HashMap::new(),
        })
    }

    fn open_archive(&self) -> Result<tar::Archive<File>> {
        let file = File::open(&self.path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::NotFound(format!("docker-archive:{}", self.path.display()))
            } else {
                io_err(&self.path)(e)
            }
        })?;
        Ok(tar::Archive::new(file))
    }

    /// Extracts the named members (one pass); returns name → (digest, size).
    fn extract(&mut self, wanted: &[String]) -> Result<HashMap<String, (Digest, u64)>> {
        let mut found = HashMap::new();
        let mut archive = self.open_archive()?;
        let path = self.path.clone();
        for (i, entry) in archive.entries().map_err(io_err(&path))?.enumerate() {
            let mut entry = entry.map_err(io_err(&path))?;
            let name = entry
                .path()
                .map_err(io_err(&path))?
                .to_string_lossy()
                .into_owned();
            let name = name.trim_start_matches("./").to_string();
            if !wanted.contains(&name) || found.contains_key(&name) {
                continue;
            }
            let tmp = self.scratch.join(format!("member-{i}"));
            let file = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut writer = HashingWriter::new(file, MAX_MEMBER_BYTES);
            io::copy(&mut entry, &mut writer).map_err(io_err(&tmp))?;
            let (digest, size, _) = writer.finish();
            let dest = self.scratch.join(digest.hex());
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            self.blobs.insert(digest.clone(), dest);
            found.insert(name, (digest, size));
        }
        Ok(found)
    }
}

impl Source for ArchiveSource {
    fn name(&self) -> String {
        format!("docker-archive:{}", self.path.display())
    }

    fn root_document(&mut self) -> Result<(Vec<u8>, String, Option<Digest>)> {
        let path = self.path.clone();
        // Pass 1: manifest.json (docker save writes it last).
        let mut manifest_json = None;
        let mut archive = self.open_archive()?;
        for entry in archive.entries().map_err(io_err(&path))? {
            let entry = entry.map_err(io_err(&path))?;
            let name = entry
                .path()
                .map_err(io_err(&path))?
                .to_string_lossy()
                .into_owned();
            if name.trim_start_matches("./") == "manifest.json" {
                let mut bytes = Vec::new();
                entry
                    .take(MAX_DOCUMENT_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(io_err(&path))?;
                manifest_json = Some(bytes);
                break;
            }
        }
        let bytes = manifest_json.ok_or_else(|| malformed(&path, "no manifest.json"))?;
        let entries: Vec<ArchiveEntry> =
            serde_json::from_slice(&bytes).map_err(|e| malformed(&path, e))?;
        let entry = entries
            .into_iter()
            .next()
            .ok_or_else(|| malformed(&path, "manifest.json lists no image"))?;
        tracing::debug!(tags = ?entry.repo_tags, "docker archive image");
        // Pass 2: the configuration and layers.
        let mut wanted = vec![entry.config.clone()];
        wanted.extend(entry.layers.iter().cloned());
        let found = self.extract(&wanted)?;
        let desc = |name: &String, media_type: &str| -> Result<Descriptor> {
            let (digest, size) = found
                .get(name)
                .ok_or_else(|| malformed(&path, format!("member {name} is missing")))?;
            Ok(Descriptor {
                media_type: media_type.to_string(),
                digest: digest.clone(),
                size: *size,
                platform: None,
                annotations: Default::default(),
            })
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.to_string()),
            config: desc(&entry.config, "application/vnd.oci.image.config.v1+json")?,
            layers: entry
                .layers
                .iter()
                .map(|l| desc(l, "application/vnd.oci.image.layer.v1.tar"))
                .collect::<Result<_>>()?,
        };
        let doc = serde_json::to_vec(&manifest).map_err(|e| malformed(&path, e))?;
        Ok((doc, MEDIA_OCI_MANIFEST.to_string(), None))
    }

    fn open(&mut self, desc: &Descriptor, _manifest: bool) -> Result<Box<dyn Read + '_>> {
        let path = self.blobs.get(&desc.digest).ok_or_else(|| {
            ImageError::NotFound(format!("{} member {}", self.name(), desc.digest))
        })?;
        Ok(Box::new(File::open(path).map_err(io_err(path))?))
    }
}
