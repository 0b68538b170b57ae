//! OCI and Docker images for anvil: image references, registry pulls (OCI distribution API),
//! OCI layouts and `docker save` archives, a content-addressed cache with file locks, safe
//! layer unpacking and ext4 root disks built with `mkfs.ext4 -d`. See docs/oci.md.
#![warn(missing_docs)]

pub mod archive;
pub mod digest;
pub mod error;
pub mod ext4;
pub mod layout;
pub mod lock;
pub mod reference;
pub mod registry;
pub mod source;
pub mod spec;
pub mod store;
pub mod unpack;
pub mod writer;

pub use digest::Digest;
pub use error::ImageError;
pub use reference::ImageRef;
pub use registry::RegistryOptions;
pub use store::{Image, ImageRecord, Store};
