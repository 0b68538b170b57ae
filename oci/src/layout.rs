//! Reading an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::{io_err, ImageError, Result};
use crate::source::Source;
use crate::spec::{Descriptor, Index, MAX_DOCUMENT_BYTES};

/// The annotation holding a layout entry's tag.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI layout as a [`Source`] of one image.
#[derive(Debug)]
pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

impl LayoutSource {
    /// The image tagged `tag` in `dir` (the only one when `tag` is `None`).
    pub fn new(dir: &Path, tag: Option<&str>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            tag: tag.map(str::to_string),
        }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }
}

impl Source for LayoutSource {
    fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    fn root_document(&mut self) -> Result<(Vec<u8>, String, Option<Digest>)> {
        let index_path = self.dir.join("index.json");
        let mut bytes = Vec::new();
        File::open(&index_path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ImageError::NotFound(format!("{} (no index.json)", self.name()))
                } else {
                    io_err(&index_path)(e)
                }
            })?
            .take(MAX_DOCUMENT_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_err(&index_path))?;
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| ImageError::Malformed {
            what: index_path.display().to_string(),
            why: e.to_string(),
        })?;
        let chosen: Vec<&Descriptor> = match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .filter(|d| {
                    d.annotations.get(REF_NAME).is_some_and(|name| {
                        name == tag || name.rsplit_once(':').is_some_and(|(_, t)| t == tag)
                    })
                })
                .collect(),
            None => index.manifests.iter().collect(),
        };
        let desc = match chosen.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(ImageError::NotFound(self.name())),
            _ => {
                // Several entries: an index listing platforms directly. Hand the whole
                // index on; resolution picks linux/amd64.
                return Ok((bytes, String::new(), None));
            }
        };
        let bytes = crate::source::read_document(self, &desc, true)?;
        Ok((bytes, desc.media_type.clone(), Some(desc.digest)))
    }

    fn open(&mut self, desc: &Descriptor, _manifest: bool) -> Result<Box<dyn Read + '_>> {
        let path = self.blob_path(&desc.digest);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ImageError::NotFound(format!("{} blob {}", self.name(), desc.digest))
            } else {
                io_err(&path)(e)
            }
        })?;
        Ok(Box::new(file))
    }
}
