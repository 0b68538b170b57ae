//! The content-addressed image cache under a data directory:
//!
//! ```text
//! DATA/lock                      flock: held exclusively by whoever changes the cache
//! DATA/blobs/sha256/HEX          verified blobs (configurations and layers)
//! DATA/images/HEX.json           one record per image, by configuration digest: its references
//! DATA/disks/HEX.ext4            the image's root disk, built once, opened read-only
//! DATA/disks/HEX.lock            flock: shared while a VM uses the disk
//! DATA/runs/ID/                  per-run scratch (writable layer), flock'd by its VM
//! DATA/tmp/                      work in progress (unpacked trees, downloads)
//! ```
//!
//! Two processes pulling at once serialize on `DATA/lock`; the second finds the work done.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::archive::ArchiveSource;
use crate::digest::Digest;
use crate::error::{io_err, ImageError, Result};
use crate::layout::LayoutSource;
use crate::lock::{FileLock, LockMode};
use crate::reference::ImageRef;
use crate::registry::{RegistryOptions, RegistrySource};
use crate::source::{copy_verified, parse_config, read_document, resolve_manifest, Source};
use crate::spec::{Descriptor, ImageConfig};
use crate::unpack::{UnpackLimits, Unpacker};

/// What the cache knows about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the image configuration (the image's identity).
    pub config_digest: Digest,
    /// Digest of the manifest it was last pulled through.
    pub manifest_digest: Digest,
    /// References that name it (`host/name:tag`, `oci:DIR:tag`, ...).
    pub refs: Vec<String>,
    /// The layers, base first.
    pub layers: Vec<Digest>,
    /// The image configuration.
    pub config: ImageConfig,
    /// Size of the root disk file.
    pub disk_bytes: u64,
}

/// A cached image with its root disk.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its record.
    pub record: ImageRecord,
    /// The ext4 root disk.
    pub disk: PathBuf,
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    /// Unreferenced blobs.
    pub blobs: u64,
    /// Stale run and scratch directories.
    pub dirs: u64,
    /// Bytes freed (blobs only).
    pub bytes: u64,
}

/// A run's scratch directory; holds the image disk's shared lock while alive.
#[derive(Debug)]
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
    _run: FileLock,
    _disk: FileLock,
}

/// The cache.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    limits: UnpackLimits,
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove scratch directory");
        }
    }
}

fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{nanos:09}", std::process::id())
}

/// The name a reference is recorded under: paths made absolute so any working directory
/// finds it again.
pub fn canonical_ref(reference: &ImageRef) -> String {
    match reference {
        ImageRef::Registry(r) => r.to_string(),
        ImageRef::OciLayout { dir, tag } => ImageRef::OciLayout {
            dir: fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
            tag: tag.clone(),
        }
        .to_string(),
        ImageRef::DockerArchive { path } => ImageRef::DockerArchive {
            path: fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
        }
        .to_string(),
    }
}

impl Store {
    /// The default data directory: `$XDG_DATA_HOME/anvil`, else `~/.local/share/anvil`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("anvil");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/share/anvil"),
            None => PathBuf::from("/var/lib/anvil"),
        }
    }

    /// Opens (creating) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["blobs/sha256", "images", "disks", "runs", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            limits: UnpackLimits::default(),
        })
    }

    /// Sets the unpack limits.
    pub fn with_limits(mut self, limits: UnpackLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<FileLock> {
        let lock = FileLock::acquire(&self.dir.join("lock"), LockMode::Exclusive, true)?;
        lock.ok_or_else(|| io_err(self.dir.join("lock"))(std::io::ErrorKind::WouldBlock.into()))
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn record_path(&self, config: &Digest) -> PathBuf {
        self.dir
            .join("images")
            .join(format!("{}.json", config.hex()))
    }

    /// The root disk path of the image with configuration digest `config`.
    pub fn disk_path(&self, config: &Digest) -> PathBuf {
        self.dir
            .join("disks")
            .join(format!("{}.ext4", config.hex()))
    }

    fn records(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.dir.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                match serde_json::from_slice(&bytes) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring a bad image record")
                    }
                }
            }
        }
        out.sort_by(|a: &ImageRecord, b| a.refs.cmp(&b.refs));
        Ok(out)
    }

    fn save_record(&self, record: &ImageRecord) -> Result<()> {
        let path = self.record_path(&record.config_digest);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Malformed {
            what: "image record".into(),
            why: e.to_string(),
        })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn image(&self, record: ImageRecord) -> Option<Image> {
        let disk = self.disk_path(&record.config_digest);
        disk.exists().then_some(Image { record, disk })
    }

    /// The cached image `reference` names, without contacting any registry.
    pub fn lookup(&self, reference: &ImageRef) -> Result<Option<Image>> {
        let name = canonical_ref(reference);
        let pinned = match reference {
            ImageRef::Registry(r) => r.digest.clone(),
            _ => None,
        };
        Ok(self
            .records()?
            .into_iter()
            .find(|r| r.refs.contains(&name) || pinned.as_ref() == Some(&r.manifest_digest))
            .and_then(|r| self.image(r)))
    }

    /// Returns the cached image, pulling it first if the cache does not have it.
    pub fn get_or_pull(&self, reference: &ImageRef, options: &RegistryOptions) -> Result<Image> {
        if let Some(image) = self.lookup(reference)? {
            tracing::debug!(image = %reference, "served from the cache");
            return Ok(image);
        }
        self.pull(reference, options)
    }

    /// Fetches `reference` (always asking its source for the current manifest), stores the
    /// blobs it lacks, builds the root disk if it is new, and records the reference.
    pub fn pull(&self, reference: &ImageRef, options: &RegistryOptions) -> Result<Image> {
        let _lock = self.lock()?;
        let scratch = Scratch(self.dir.join("tmp").join(unique_name("pull")));
        fs::create_dir_all(&scratch.0).map_err(io_err(&scratch.0))?;
        let mut source: Box<dyn Source> = match reference {
            ImageRef::Registry(r) => Box::new(RegistrySource::new(r, options)),
            ImageRef::OciLayout { dir, tag } => Box::new(LayoutSource::new(dir, tag.as_deref())),
            ImageRef::DockerArchive { path } => {
                Box::new(ArchiveSource::new(path, &scratch.0.join("archive"))?)
            }
        };
        let (manifest, manifest_digest) = resolve_manifest(source.as_mut())?;
        let config_bytes = read_document(source.as_mut(), &manifest.config, false)?;
        let config = parse_config(&config_bytes, &source.name())?;
        let config_digest = manifest.config.digest.clone();
        let config_blob = self.blob_path(&config_digest);
        if !config_blob.exists() {
            fs::write(&config_blob, &config_bytes).map_err(io_err(&config_blob))?;
        }
        let disk = self.disk_path(&config_digest);
        let disk_bytes = if disk.exists() {
            tracing::info!(image = %reference, "root disk already built");
            fs::metadata(&disk).map_err(io_err(&disk))?.len()
        } else {
            for layer in &manifest.layers {
                self.fetch_blob(source.as_mut(), layer)?;
            }
            self.build_disk(&manifest.layers, &config, &scratch.0, &disk)?
        };
        let mut record = match fs::read(self.record_path(&config_digest)) {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(_) => None,
        }
        .unwrap_or(ImageRecord {
            config_digest: config_digest.clone(),
            manifest_digest: manifest_digest.clone(),
            refs: Vec::new(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: config.clone(),
            disk_bytes,
        });
        let name = canonical_ref(reference);
        // A tag names one image: take it from any other image that had it.
        for mut other in self.records()? {
            if other.config_digest != config_digest && other.refs.contains(&name) {
                other.refs.retain(|r| r != &name);
                self.save_record(&other)?;
            }
        }
        if !record.refs.contains(&name) {
            record.refs.push(name);
        }
        record.manifest_digest = manifest_digest;
        record.disk_bytes = disk_bytes;
        self.save_record(&record)?;
        Ok(Image { record, disk })
    }

    /// Stores one blob, verified, unless the cache has it.
    fn fetch_blob(&self, source: &mut dyn Source, desc: &Descriptor) -> Result<()> {
        let path = self.blob_path(&desc.digest);
        if fs::metadata(&path).is_ok_and(|m| m.len() == desc.size) {
            return Ok(());
        }
        tracing::info!(digest = %desc.digest, bytes = desc.size, "fetching layer");
        let tmp = self.dir.join("tmp").join(unique_name("blob"));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let what = format!("{} layer {}", source.name(), desc.digest);
        let result = source
            .open(desc, false)
            .and_then(|mut reader| copy_verified(&mut reader, file, desc, &what));
        match result {
            Ok(file) => {
                file.sync_all().map_err(io_err(&tmp))?;
                fs::rename(&tmp, &path).map_err(io_err(&path))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn build_disk(
        &self,
        layers: &[Descriptor],
        config: &ImageConfig,
        scratch: &Path,
        disk: &Path,
    ) -> Result<u64> {
        let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.as_slice());
        if let Some(ids) = diff_ids {
            if ids.len() != layers.len() {
                return Err(ImageError::Malformed {
                    what: "image configuration".into(),
                    why: format!("{} diff_ids for {} layers", ids.len(), layers.len()),
                });
            }
        }
        let root = scratch.join("rootfs");
        let mut unpacker =
            Unpacker::new(&root, self.limits).map_err(|source| ImageError::Unpack {
                digest: Digest::of(b""),
                source,
            })?;
        for (i, layer) in layers.iter().enumerate() {
            let path = self.blob_path(&layer.digest);
            let file = File::open(&path).map_err(io_err(&path))?;
            let diff_id = diff_ids.and_then(|ids| ids.get(i));
            unpacker
                .apply_layer(file, diff_id)
                .map_err(|source| ImageError::Unpack {
                    digest: layer.digest.clone(),
                    source,
                })?;
        }
        unpacker.finish().map_err(|source| ImageError::Unpack {
            digest: Digest::of(b""),
            source,
        })?;
        let tmp_disk = scratch.join("disk.ext4");
        let size = crate::ext4::build(&root, &tmp_disk)?;
        fs::rename(&tmp_disk, disk).map_err(io_err(disk))?;
        tracing::info!(disk = %disk.display(), bytes = size, "built root disk");
        Ok(size)
    }

    /// The cached images.
    pub fn list(&self) -> Result<Vec<Image>> {
        Ok(self
            .records()?
            .into_iter()
            .filter_map(|r| self.image(r))
            .collect())
    }

    /// Total bytes of an image's blobs in the cache.
    pub fn blob_bytes(&self, record: &ImageRecord) -> u64 {
        std::iter::once(&record.config_digest)
            .chain(&record.layers)
            .filter_map(|d| fs::metadata(self.blob_path(d)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Removes a reference (a name as given to pull, or a configuration digest prefix of at
    /// least 12 hex digits). The image itself goes when no reference is left; its blobs go
    /// with the next prune.
    pub fn remove(&self, what: &str) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        let name = ImageRef::parse(what)
            .map(|r| canonical_ref(&r))
            .unwrap_or_else(|_| what.to_string());
        let hex = what.trim_start_matches("sha256:");
        let records = self.records()?;
        let by_digest = hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        let found = records.into_iter().find(|r| {
            r.refs.contains(&name) || (by_digest && r.config_digest.hex().starts_with(hex))
        });
        let mut record = found.ok_or_else(|| ImageError::NotFound(what.to_string()))?;
        if record.refs.contains(&name) && record.refs.len() > 1 {
            record.refs.retain(|r| r != &name);
            self.save_record(&record)?;
            return Ok(record);
        }
        let lock_path = self.disk_path(&record.config_digest).with_extension("lock");
        let Some(_disk_lock) = FileLock::acquire(&lock_path, LockMode::Exclusive, false)? else {
            return Err(ImageError::InUse(what.to_string()));
        };
        let disk = self.disk_path(&record.config_digest);
        fs::remove_file(&disk)
            .or_else(ignore_missing)
            .map_err(io_err(&disk))?;
        let path = self.record_path(&record.config_digest);
        fs::remove_file(&path)
            .or_else(ignore_missing)
            .map_err(io_err(&path))?;
        fs::remove_file(&lock_path)
            .or_else(ignore_missing)
            .map_err(io_err(&lock_path))?;
        record.refs.clear();
        Ok(record)
    }

    /// Removes blobs no image uses, stale scratch and finished runs' directories.
    pub fn prune(&self) -> Result<PruneReport> {
        let _lock = self.lock()?;
        let mut report = PruneReport::default();
        let mut used = std::collections::HashSet::new();
        for r in self.records()? {
            used.insert(r.config_digest.hex().to_string());
            used.extend(r.layers.iter().map(|d| d.hex().to_string()));
        }
        let blobs = self.dir.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let entry = entry.map_err(io_err(&blobs))?;
            if !used.contains(entry.file_name().to_string_lossy().as_ref()) {
                report.bytes += entry.metadata().map_or(0, |m| m.len());
                fs::remove_file(entry.path()).map_err(io_err(entry.path()))?;
                report.blobs += 1;
            }
        }
        // Scratch: nobody else holds the cache lock, so everything in tmp is stale.
        let tmp = self.dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            remove_path(&path)?;
            report.dirs += 1;
        }
        let runs = self.dir.join("runs");
        for entry in fs::read_dir(&runs).map_err(io_err(&runs))? {
            let path = entry.map_err(io_err(&runs))?.path();
            if FileLock::acquire(&path.join("lock"), LockMode::Exclusive, false)?.is_some() {
                remove_path(&path)?;
                report.dirs += 1;
            }
        }
        Ok(report)
    }

    /// Makes a run's writable layer at `path`: an empty ext4 file system of `size_mib` MiB,
    /// copied sparsely from a template made once per size (`DATA/disks/empty-SIZEM.ext4`),
    /// which costs far less than running mkfs.ext4 for every run. Falls back to mkfs.ext4
    /// where the copy fails or the file system does not report holes.
    pub fn scratch_disk(&self, path: &Path, size_mib: u64) -> Result<()> {
        let template = self
            .dir
            .join("disks")
            .join(format!("empty-{size_mib}M.ext4"));
        if !template.exists() {
            let _lock = self.lock()?;
            if !template.exists() {
                let tmp = self.dir.join("tmp").join(unique_name("empty"));
                crate::ext4::build_empty(&tmp, size_mib)?;
                fs::rename(&tmp, &template).map_err(io_err(&template))?;
            }
        }
        match crate::ext4::copy_sparse(&template, path) {
            Ok(true) => return Ok(()),
            Ok(false) => tracing::debug!("no sparse copy here; running mkfs.ext4"),
            Err(e) => tracing::debug!(error = %e, "sparse copy failed; running mkfs.ext4"),
        }
        crate::ext4::build_empty(path, size_mib)
    }

    /// Makes a scratch directory for one run of `image`, holding the disk in use.
    pub fn begin_run(&self, image: &Image) -> Result<RunDir> {
        let lock_path = image.disk.with_extension("lock");
        let disk_lock = FileLock::acquire(&lock_path, LockMode::Shared, true)?
            .ok_or_else(|| ImageError::InUse(image.disk.display().to_string()))?;
        // `images rm` may have removed the image between the lookup and this lock.
        if !image.disk.exists() {
            return Err(ImageError::NotFound(image.disk.display().to_string()));
        }
        let path = self.dir.join("runs").join(unique_name("run"));
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        let run_lock = FileLock::acquire(&path.join("lock"), LockMode::Exclusive, true)?
            .ok_or_else(|| ImageError::InUse(path.display().to_string()))?;
        Ok(RunDir {
            path,
            _run: run_lock,
            _disk: disk_lock,
        })
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    result.or_else(ignore_missing).map_err(io_err(path))
}
