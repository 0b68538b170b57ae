//! The cache end to end on local sources: OCI layouts and docker archives written by
//! `oci::writer`, pulled into a temporary data directory (mkfs.ext4 builds the disks).
// Test helpers outside #[test] functions: a failed step should stop the test.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use oci::spec::RunConfig;
use oci::writer::ImageBuilder;
use oci::{ImageError, ImageRef, RegistryOptions, Store};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("anvil-oci-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The modification time of every layer entry (0x000f4240 seconds since the epoch).
const LAYER_MTIME: u64 = 1_000_000;

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(LAYER_MTIME);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn image() -> ImageBuilder {
    ImageBuilder::new(RunConfig {
        env: Some(vec!["A=1".into()]),
        cmd: Some(vec!["/bin/true".into()]),
        working_dir: Some("/w".into()),
        ..Default::default()
    })
    .layer(tar_of(&[("bin/true", b"x"), ("etc/old", b"o")]))
    .unwrap()
    .layer(tar_of(&[("etc/.wh.old", b""), ("w/file", b"f")]))
    .unwrap()
}

fn debugfs_ls(disk: &Path, dir: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("ls -l {dir}")])
        .arg(disk)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn layout_and_archive_give_the_same_cached_disk() {
    let t = TempDir::new("same");
    let img = image();
    img.write_layout(&t.0.join("layout"), "v1").unwrap();
    img.write_docker_archive(&t.0.join("img.tar"), "test/img:v1")
        .unwrap();
    let store = Store::open(&t.0.join("data")).unwrap();
    let opts = RegistryOptions::default();

    let layout_ref = ImageRef::parse(&format!("oci:{}:v1", t.0.join("layout").display())).unwrap();
    let a = store.pull(&layout_ref, &opts).unwrap();
    assert_eq!(a.record.config_digest, img.config_digest().unwrap());
    let etc = debugfs_ls(&a.disk, "/etc");
    assert!(!etc.contains("old"), "whiteout not applied: {etc}");
    assert!(debugfs_ls(&a.disk, "/w").contains("file"));
    let stat = std::process::Command::new("debugfs")
        .args(["-R", "stat /bin/true"])
        .arg(&a.disk)
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(
        stat.contains(&format!("mtime: {LAYER_MTIME:#010x}:")),
        "the layer's mtime was not kept: {stat}"
    );

    let archive_ref =
        ImageRef::parse(&format!("docker-archive:{}", t.0.join("img.tar").display())).unwrap();
    let b = store.pull(&archive_ref, &opts).unwrap();
    assert_eq!(a.disk, b.disk);
    assert_eq!(b.record.refs.len(), 2);

    // The cache answers without the sources.
    fs::remove_dir_all(t.0.join("layout")).unwrap();
    fs::remove_file(t.0.join("img.tar")).unwrap();
    let c = store.get_or_pull(&layout_ref, &opts).unwrap();
    assert_eq!(c.disk, a.disk);
    assert_eq!(store.list().unwrap().len(), 1);

    // rm drops one name, then the image; prune then frees its blobs.
    store.remove(&layout_ref.to_string()).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    let removed = store.remove(&archive_ref.to_string()).unwrap();
    assert!(removed.refs.is_empty());
    assert!(!a.disk.exists());
    let report = store.prune().unwrap();
    assert_eq!(report.blobs, 3, "{report:?}");
}

#[test]
fn a_disk_in_use_cannot_be_removed() {
    let t = TempDir::new("inuse");
    image().write_layout(&t.0.join("layout"), "v1").unwrap();
    let store = Store::open(&t.0.join("data")).unwrap();
    let r = ImageRef::parse(&format!("oci:{}:v1", t.0.join("layout").display())).unwrap();
    let img = store.pull(&r, &RegistryOptions::default()).unwrap();
    let run = store.begin_run(&img).unwrap();
    assert!(matches!(
        store.remove(&r.to_string()),
        Err(ImageError::InUse(_))
    ));
    // prune keeps the live run's directory.
    store.prune().unwrap();
    assert!(run.path.exists());
    drop(run);
    store.remove(&r.to_string()).unwrap();
}

#[test]
fn corrupted_blob_is_a_digest_mismatch() {
    let t = TempDir::new("corrupt");
    let img = image();
    let layout = t.0.join("layout");
    img.write_layout(&layout, "v1").unwrap();
    // Flip a byte in the biggest blob (a layer).
    let blobs = layout.join("blobs/sha256");
    let biggest = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = fs::read(&biggest).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&biggest, data).unwrap();
    let store = Store::open(&t.0.join("data")).unwrap();
    let r = ImageRef::parse(&format!("oci:{}:v1", layout.display())).unwrap();
    let err = store.pull(&r, &RegistryOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
}

#[test]
fn unknown_tag_is_not_found_and_arm64_has_no_platform() {
    let t = TempDir::new("plat");
    let store = Store::open(&t.0.join("data")).unwrap();
    image().write_layout(&t.0.join("layout"), "v1").unwrap();
    let r = ImageRef::parse(&format!("oci:{}:nope", t.0.join("layout").display())).unwrap();
    assert!(matches!(
        store.pull(&r, &RegistryOptions::default()),
        Err(ImageError::NotFound(_))
    ));
    // An arm64 configuration.
    let layout = t.0.join("arm");
    image().write_layout(&layout, "v1").unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&manifest_hex)).unwrap())
            .unwrap();
    let config_hex = manifest["config"]["digest"].as_str().unwrap()[7..].to_string();
    let config_path = layout.join("blobs/sha256").join(&config_hex);
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    config["architecture"] = "arm64".into();
    let new_config = serde_json::to_vec(&config).unwrap();
    let new_digest = oci::Digest::of(&new_config);
    fs::write(
        layout.join("blobs/sha256").join(new_digest.hex()),
        &new_config,
    )
    .unwrap();
    let mut manifest = manifest;
    manifest["config"]["digest"] = new_digest.to_string().into();
    manifest["config"]["size"] = new_config.len().into();
    let new_manifest = serde_json::to_vec(&manifest).unwrap();
    let md = oci::Digest::of(&new_manifest);
    fs::write(layout.join("blobs/sha256").join(md.hex()), &new_manifest).unwrap();
    let mut index = index;
    index["manifests"][0]["digest"] = md.to_string().into();
    index["manifests"][0]["size"] = new_manifest.len().into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let r = ImageRef::parse(&format!("oci:{}:v1", layout.display())).unwrap();
    let err = store.pull(&r, &RegistryOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
}

#[test]
fn hostile_layer_is_refused_with_a_clear_error() {
    let t = TempDir::new("hostile");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let img = ImageBuilder::new(RunConfig::default())
        .layer(b.into_inner().unwrap())
        .unwrap();
    img.write_layout(&t.0.join("layout"), "v1").unwrap();
    let store = Store::open(&t.0.join("data")).unwrap();
    let r = ImageRef::parse(&format!("oci:{}:v1", t.0.join("layout").display())).unwrap();
    let err = store.pull(&r, &RegistryOptions::default()).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("hostile layer"), "{text}");
    assert!(!t.0.join("escape").exists() && !t.0.join("data/escape").exists());
}

/// Runs' writable layers are sparse copies of one empty file system made per size: each copy
/// is a clean ext4 file system (e2fsck), and the template is made once.
#[test]
fn scratch_disks_are_clean_sparse_copies_of_one_template() {
    use std::os::unix::fs::MetadataExt;
    let t = TempDir::new("scratch");
    let store = Store::open(&t.0.join("data")).unwrap();
    let template = t.0.join("data/disks/empty-256M.ext4");
    for name in ["a.ext4", "b.ext4"] {
        let disk = t.0.join(name);
        store.scratch_disk(&disk, 256).unwrap();
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 <= fs::metadata(&template).unwrap().blocks() * 512,
            "the copy is not sparse"
        );
        let fsck = std::process::Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert!(debugfs_ls(&disk, "/").contains("lost+found"));
    }
    let modified = fs::metadata(&template).unwrap().modified().unwrap();
    store.scratch_disk(&t.0.join("c.ext4"), 256).unwrap();
    assert_eq!(
        fs::metadata(&template).unwrap().modified().unwrap(),
        modified
    );
}
