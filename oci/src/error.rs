//! Errors of pulling, converting and caching images.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::unpack::UnpackError;

/// Why an image could not be pulled, converted or found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The registry, layout or archive has no such image or tag.
    #[error("image not found: {0}")]
    NotFound(String),
    /// The registry refused our credentials (or wants some we do not have).
    #[error("authentication refused by {registry}: {why}")]
    AuthRefused {
        /// The registry.
        registry: String,
        /// What it said.
        why: String,
    },
    /// Content does not match its digest or size.
    #[error("digest mismatch for {what}: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// The expected digest.
        expected: Digest,
        /// The expected size.
        expected_size: u64,
        /// The digest of what came.
        actual: Digest,
        /// The size of what came.
        actual_size: u64,
    },
    /// The image (or index) has no linux/amd64 variant.
    #[error("{image} has no linux/amd64 variant (found: {found})")]
    NoPlatform {
        /// The image.
        image: String,
        /// The platforms it has.
        found: String,
    },
    /// A layer could not be applied (hostile, too big, disk full, ...).
    #[error("cannot unpack layer {digest}")]
    Unpack {
        /// The layer.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A document (manifest, index, configuration, archive metadata) is malformed.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which document.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The registry answered with something unexpected.
    #[error("registry request {url} failed: {why}")]
    Registry {
        /// The URL.
        url: String,
        /// Status or transport error.
        why: String,
    },
    /// mkfs.ext4 failed or is missing.
    #[error("cannot build the ext4 root disk {}: {why}", .path.display())]
    Mkfs {
        /// The disk being built.
        path: PathBuf,
        /// mkfs.ext4's complaint.
        why: String,
    },
    /// The host file system is full.
    #[error("disk full while writing {}", .0.display())]
    DiskFull(PathBuf),
    /// The image is in use by a running VM.
    #[error("image {0} is in use by a running VM")]
    InUse(String),
    /// A file in the cache, layout or archive could not be read or written.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `Result` with [`ImageError`].
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Maps an I/O error on `path`, turning ENOSPC into [`ImageError::DiskFull`].
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            ImageError::DiskFull(path)
        } else {
            ImageError::Io { path, source }
        }
    }
}
