//! OCI and Docker images for anvil: image references, registry pulls, OCI layouts and
//! `docker save` archives, a content-addressed cache, safe layer unpacking and ext4 root disks.
#![warn(missing_docs)]

pub mod digest;
pub mod reference;
pub mod spec;
pub mod unpack;
