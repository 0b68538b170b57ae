//! Where images come from: the [`Source`] trait, manifest resolution to linux/amd64, and
//! verified reads of documents.

use std::io::Read;

use crate::digest::{Digest, HashingWriter};
use crate::error::{ImageError, Result};
use crate::spec::{Descriptor, ImageConfig, Manifest, ManifestDoc, MAX_DOCUMENT_BYTES};

/// Index nesting followed before giving up (an index of indexes of ...).
const MAX_INDEX_DEPTH: usize = 4;

/// A registry, OCI layout or archive that serves one image's documents and blobs.
pub trait Source {
    /// A name for messages.
    fn name(&self) -> String;
    /// The reference's top-level manifest or index: its bytes, its media type, and the digest
    /// the reference pins (checked by the caller), if any.
    fn root_document(&mut self) -> Result<(Vec<u8>, String, Option<Digest>)>;
    /// Opens the content `desc` names: a manifest (`manifest` set) or a blob. The caller
    /// verifies digest and size.
    fn open(&mut self, desc: &Descriptor, manifest: bool) -> Result<Box<dyn Read + '_>>;
}

/// Copies `reader` into `out`, failing unless exactly `desc.size` bytes with `desc.digest` came.
pub fn copy_verified<W: std::io::Write>(
    reader: &mut dyn Read,
    out: W,
    desc: &Descriptor,
    what: &str,
) -> Result<W> {
    let mut writer = HashingWriter::new(out, desc.size);
    let copied = std::io::copy(reader, &mut writer);
    let (actual, actual_size, out) = writer.finish();
    let mismatch = |actual: Digest, actual_size| ImageError::DigestMismatch {
        what: what.to_string(),
        expected: desc.digest.clone(),
        expected_size: desc.size,
        actual,
        actual_size,
    };
    match copied {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            return Err(mismatch(actual, actual_size.saturating_add(1)))
        }
        Err(e) => {
            return Err(ImageError::Registry {
                url: what.to_string(),
                why: e.to_string(),
            })
        }
    }
    if actual != desc.digest || actual_size != desc.size {
        return Err(mismatch(actual, actual_size));
    }
    Ok(out)
}

/// Reads a small verified document.
pub fn read_document(
    source: &mut dyn Source,
    desc: &Descriptor,
    manifest: bool,
) -> Result<Vec<u8>> {
    if desc.size > MAX_DOCUMENT_BYTES {
        return Err(ImageError::Malformed {
            what: desc.digest.to_string(),
            why: format!("document of {} bytes is too large", desc.size),
        });
    }
    let what = format!("{} {}", source.name(), desc.digest);
    let mut reader = source.open(desc, manifest)?;
    copy_verified(&mut reader, Vec::new(), desc, &what)
}

/// Resolves the source's reference to a linux/amd64 image manifest and its digest.
pub fn resolve_manifest(source: &mut dyn Source) -> Result<(Manifest, Digest)> {
    let (bytes, media_type, pinned) = source.root_document()?;
    let mut digest = Digest::of(&bytes);
    if let Some(pinned) = pinned {
        if pinned != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {}", source.name()),
                expected: pinned,
                expected_size: bytes.len() as u64,
                actual: digest,
                actual_size: bytes.len() as u64,
            });
        }
    }
    let malformed = |why: serde_json::Error| ImageError::Malformed {
        what: "manifest".to_string(),
        why: why.to_string(),
    };
    let mut doc = ManifestDoc::parse(&bytes, &media_type).map_err(malformed)?;
    for _ in 0..MAX_INDEX_DEPTH {
        match doc {
            ManifestDoc::Manifest(m) => return Ok((m, digest)),
            ManifestDoc::Index(index) => {
                let Some(desc) = index.linux_amd64().cloned() else {
                    let found: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(ImageError::NoPlatform {
                        image: source.name(),
                        found: if found.is_empty() {
                            "none".to_string()
                        } else {
                            found.join(", ")
                        },
                    });
                };
                let bytes = read_document(source, &desc, true)?;
                digest = desc.digest.clone();
                doc = ManifestDoc::parse(&bytes, &desc.media_type).map_err(malformed)?;
            }
        }
    }
    Err(ImageError::Malformed {
        what: "index".to_string(),
        why: "nested too deeply".to_string(),
    })
}

/// Parses an image configuration and checks it is for linux/amd64.
pub fn parse_config(bytes: &[u8], image: &str) -> Result<ImageConfig> {
    let config: ImageConfig = serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed {
        what: "image configuration".to_string(),
        why: e.to_string(),
    })?;
    if config.os != "linux" || config.architecture != "amd64" {
        return Err(ImageError::NoPlatform {
            image: image.to_string(),
            found: format!("{}/{}", config.os, config.architecture),
        });
    }
    Ok(config)
}
