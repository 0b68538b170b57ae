//! Image references: `host[:port]/name[:tag|@digest]`, `oci:DIR[:tag]` and
//! `docker-archive:FILE`.

use std::fmt;
use std::path::PathBuf;

use crate::digest::Digest;

/// Docker Hub's registry host, used when a reference names no registry.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry.
    Registry(RegistryRef),
    /// An OCI image layout directory, with the tag to pick (`org.opencontainers.image.ref.name`).
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag; without it the layout must hold exactly one image.
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive {
        /// The tar file.
        path: PathBuf,
    },
}

/// A registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path (`library/busybox`).
    pub repository: String,
    /// The tag (`latest` unless a digest is given).
    pub tag: Option<String>,
    /// A pinned manifest digest.
    pub digest: Option<Digest>,
}

/// A reference that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {text:?}: {why}")]
pub struct ReferenceError {
    text: String,
    why: &'static str,
}

impl RegistryRef {
    /// The tag or digest part used in a manifest URL.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The registry host without its port.
    pub fn host(&self) -> &str {
        // A bracketed IPv6 literal keeps its colons.
        if let Some(end) = self.registry.find(']') {
            return &self.registry[..=end];
        }
        self.registry.split(':').next().unwrap_or(&self.registry)
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry(r) => r.fmt(f),
            Self::OciLayout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Self::OciLayout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Self::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ImageRef {
    /// Parses a reference as the command line gives it.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let bad = |why| ReferenceError {
            text: text.to_string(),
            why,
        };
        if let Some(rest) = text.strip_prefix("oci:") {
            // The tag is after the last ':' when what follows is a valid tag and not a path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if valid_tag(tag) && !dir.is_empty() => (dir, Some(tag)),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("oci: needs a directory"));
            }
            return Ok(Self::OciLayout {
                dir: PathBuf::from(dir),
                tag: tag.map(str::to_string),
            });
        }
        if let Some(path) = text.strip_prefix("docker-archive:") {
            if path.is_empty() {
                return Err(bad("docker-archive: needs a file"));
            }
            return Ok(Self::DockerArchive {
                path: PathBuf::from(path),
            });
        }
        let (name, digest) = match text.split_once('@') {
            Some((name, d)) => (
                name,
                Some(Digest::parse(d).map_err(|_| bad("the digest is not sha256:<64 hex>"))?),
            ),
            None => (text, None),
        };
        // The tag is after a ':' that follows the last '/' (a ':' before it is a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].find(':') {
            Some(i) => (
                &name[..last_slash + i],
                Some(name[last_slash + i + 1..].to_string()),
            ),
            None => (name, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if name.contains('/') => (DOCKER_HUB.to_string(), name.to_string()),
            _ => (DOCKER_HUB.to_string(), format!("library/{name}")),
        };
        if registry.is_empty() || !repository.split('/').all(valid_component) {
            return Err(bad(
                "the repository name must be lowercase components separated by '/'",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Self::Registry(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(text: &str) -> RegistryRef {
        match ImageRef::parse(text).unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_with_port_and_tag() {
        let r = reg("127.0.0.1:5000/test/busy:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/busy");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.host(), "127.0.0.1");
        assert_eq!(r.to_string(), "127.0.0.1:5000/test/busy:v1");
    }

    #[test]
    fn short_names_go_to_docker_hub_library() {
        let r = reg("busybox");
        assert_eq!(r.registry, DOCKER_HUB);
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.manifest_ref(), "latest");
    }

    #[test]
    fn digest_pins_the_manifest() {
        let d = Digest::of(b"m");
        let r = reg(&format!("localhost:5000/a@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), d.to_string());
    }

    #[test]
    fn layout_and_archive() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/lay:v2").unwrap(),
            ImageRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/tmp/lay").unwrap(),
            ImageRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:/x/img.tar").unwrap(),
            ImageRef::DockerArchive {
                path: "/x/img.tar".into()
            }
        );
    }

    #[test]
    fn bad_references_are_refused() {
        for text in [
            "Upper/Case",
            "host:5000/a:b:c",
            "a@sha256:12",
            "oci:",
            "x/../y",
        ] {
            assert!(ImageRef::parse(text).is_err(), "{text}");
        }
    }
}
