use std::fs;
use std::io::Write;
use std::path::Path;

use super::*;

/// A test tar entry; names are written raw, so hostile paths can be built.
enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Fifo(&'a str),
}

fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let bytes = target.as_bytes();
    h.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::File(name, data) => {
                let mut h = header(name, tar::EntryType::Regular, data.len() as u64, 0o644);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            E::Dir(name) => {
                let mut h = header(name, tar::EntryType::Directory, 0, 0o755);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Symlink(name, target) | E::Hardlink(name, target) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(name, kind, 0, 0o777);
                set_link(&mut h, target);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(name) => {
                let mut h = header(name, tar::EntryType::Fifo, 0, 0o600);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "anvil-unpack-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn root(&self) -> PathBuf {
        self.0.join("root")
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<()> {
    let mut u = Unpacker::new(root, UnpackLimits::default())?;
    for layer in layers {
        u.apply_layer(&layer[..], None)?;
    }
    u.finish()
}

fn is_hostile(r: Result<()>) -> bool {
    matches!(r, Err(UnpackError::Hostile { .. }))
}

#[test]
fn files_dirs_symlinks_and_hard_links_unpack() {
    let s = Scratch::new("basic");
    let layer = tar_of(&[
        E::Dir("bin/"),
        E::File("bin/busybox", b"ELF"),
        E::Symlink("bin/sh", "busybox"),
        E::Hardlink("bin/ash", "bin/busybox"),
        E::Fifo("run.fifo"),
    ]);
    apply(&s.root(), &[layer]).unwrap();
    let root = s.root();
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), b"ELF");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(root.join("bin/ash")).unwrap().ino(),
        fs::metadata(root.join("bin/busybox")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(root.join("bin/busybox")).unwrap().mode() & 0o7777,
        0o644
    );
    assert!(fs::symlink_metadata(root.join("run.fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn whiteout_removes_a_lower_file_and_directory() {
    let s = Scratch::new("wh");
    let lower = tar_of(&[
        E::File("etc/gone", b"x"),
        E::File("etc/kept", b"y"),
        E::File("var/cache/a/b", b"z"),
    ]);
    let upper = tar_of(&[E::File("etc/.wh.gone", b""), E::File("var/.wh.cache", b"")]);
    apply(&s.root(), &[lower, upper]).unwrap();
    let root = s.root();
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    assert!(root.join("etc/kept").exists());
    assert!(!root.join("var/cache").exists());
}

#[test]
fn opaque_directory_hides_lower_contents_but_keeps_its_own() {
    let s = Scratch::new("opq");
    let lower = tar_of(&[E::File("data/old1", b"1"), E::File("data/sub/old2", b"2")]);
    // The new file comes before the marker: it still survives.
    let upper = tar_of(&[E::File("data/new", b"n"), E::File("data/.wh..wh..opq", b"")]);
    apply(&s.root(), &[lower, upper]).unwrap();
    let root = s.root();
    let mut names: Vec<_> = fs::read_dir(root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["new".to_string()]);
}

#[test]
fn dot_dot_is_hostile() {
    let s = Scratch::new("dotdot");
    let layer = tar_of(&[E::File("a/../../escape", b"x")]);
    assert!(is_hostile(apply(&s.root(), &[layer])));
    assert!(!s.0.join("escape").exists());
}

#[test]
fn absolute_path_is_hostile() {
    let s = Scratch::new("abs");
    let target = s.0.join("abs-escape");
    let layer = tar_of(&[E::File(target.to_str().unwrap(), b"x")]);
    assert!(is_hostile(apply(&s.root(), &[layer])));
    assert!(!target.exists());
}

#[test]
fn symlinked_parent_stays_inside_the_root() {
    let s = Scratch::new("symparent");
    let outside = s.0.join("outside");
    fs::create_dir_all(&outside).unwrap();
    // An absolute symlink to a host directory, and a relative one climbing out: both are
    // resolved inside the root, so the writes land in root/<outside path> and root/x.
    let layer = tar_of(&[
        E::Symlink("abs", outside.to_str().unwrap()),
        E::File("abs/pwned", b"x"),
        E::Symlink("rel", "../../../../../.."),
        E::File("rel/pwned2", b"y"),
    ]);
    apply(&s.root(), &[layer]).unwrap();
    assert!(!outside.join("pwned").exists());
    assert!(s
        .root()
        .join(outside.strip_prefix("/").unwrap())
        .join("pwned")
        .exists());
    assert!(s.root().join("pwned2").exists());
    assert!(!s.0.join("pwned2").exists());
}

#[test]
fn symlink_from_lower_layer_cannot_redirect_a_later_write() {
    let s = Scratch::new("symfile");
    let outside = s.0.join("victim");
    fs::write(&outside, b"safe").unwrap();
    let lower = tar_of(&[E::Symlink("etc/passwd", outside.to_str().unwrap())]);
    let upper = tar_of(&[E::File("etc/passwd", b"root::0:0")]);
    apply(&s.root(), &[lower, upper]).unwrap();
    assert_eq!(fs::read(&outside).unwrap(), b"safe");
    assert_eq!(fs::read(s.root().join("etc/passwd")).unwrap(), b"root::0:0");
}

#[test]
fn hard_link_out_of_the_root_is_hostile() {
    let s = Scratch::new("hardlink");
    let secret = s.0.join("secret");
    fs::write(&secret, b"s").unwrap();
    let layer = tar_of(&[E::Hardlink("copy", "../secret")]);
    assert!(is_hostile(apply(&s.root(), &[layer])));
    let layer = tar_of(&[E::Hardlink("copy", secret.to_str().unwrap())]);
    assert!(is_hostile(apply(&s.root(), &[layer])));
    assert!(!s.root().join("copy").exists());
}

#[test]
fn symlink_loop_is_hostile() {
    let s = Scratch::new("loop");
    let layer = tar_of(&[
        E::Symlink("a", "b"),
        E::Symlink("b", "a"),
        E::File("a/x", b""),
    ]);
    assert!(is_hostile(apply(&s.root(), &[layer])));
}

#[test]
fn huge_declared_size_is_refused_before_writing() {
    let s = Scratch::new("huge");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header("big", tar::EntryType::Regular, 1 << 40, 0o644);
    h.set_cksum();
    b.append(&h, std::io::repeat(0).take(0)).ok();
    let data = b.into_inner().unwrap();
    let mut u = Unpacker::new(&s.root(), UnpackLimits::default()).unwrap();
    let r = u.apply_layer(&data[..], None);
    assert!(matches!(r, Err(UnpackError::TooBig { .. })), "{r:?}");
}

#[test]
fn decompression_bomb_hits_the_byte_limit() {
    let s = Scratch::new("bomb");
    let layer = tar_of(&[E::File("zeros", &[0u8; 64 << 10])]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let limits = UnpackLimits {
        max_bytes: 16 << 10,
        max_entries: 100,
    };
    let mut u = Unpacker::new(&s.root(), limits).unwrap();
    let r = u.apply_layer(&gz[..], None);
    assert!(matches!(r, Err(UnpackError::TooBig { .. })), "{r:?}");
}

#[test]
fn entry_count_is_capped() {
    let s = Scratch::new("count");
    let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let entries: Vec<E<'_>> = names.iter().map(|n| E::File(n, b"")).collect();
    let limits = UnpackLimits {
        max_bytes: 1 << 30,
        max_entries: 5,
    };
    let mut u = Unpacker::new(&s.root(), limits).unwrap();
    let r = u.apply_layer(&tar_of(&entries)[..], None);
    assert!(matches!(r, Err(UnpackError::TooBig { .. })), "{r:?}");
}

#[test]
fn gzip_and_zstd_layers_unpack_and_diff_id_is_checked() {
    let s = Scratch::new("compress");
    let layer = tar_of(&[E::File("hello", b"hi")]);
    let diff_id = Digest::of(&layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let mut u = Unpacker::new(&s.root(), UnpackLimits::default()).unwrap();
    u.apply_layer(&gz[..], Some(&diff_id)).unwrap();
    assert_eq!(fs::read(s.root().join("hello")).unwrap(), b"hi");

    let zst =
        ruzstd::encoding::compress_to_vec(&layer[..], ruzstd::encoding::CompressionLevel::Fastest);
    u.apply_layer(&zst[..], Some(&diff_id)).unwrap();

    let wrong = Digest::of(b"other");
    let r = u.apply_layer(&layer[..], Some(&wrong));
    assert!(
        matches!(r, Err(UnpackError::DiffIdMismatch { .. })),
        "{r:?}"
    );
}

/// A layer whose entries carry modification times: (name, kind, mtime); files are empty,
/// symlinks point at "f".
fn timed_tar(entries: &[(&str, tar::EntryType, u64)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mtime) in entries {
        let mut h = header(name, *kind, 0, if kind.is_dir() { 0o755 } else { 0o644 });
        if kind.is_symlink() {
            set_link(&mut h, "f");
        }
        h.set_mtime(*mtime);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn modification_times_are_kept_for_files_symlinks_and_directories() {
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType::{Directory, Regular, Symlink};
    let s = Scratch::new("mtime");
    let lower = timed_tar(&[
        ("d/", Directory, 1_000_000),
        ("d/f", Regular, 2_000_000),
        ("d/l", Symlink, 3_000_000),
        ("gone/", Directory, 5_000_000),
    ]);
    // Adding to d and removing gone change d's and the root's times on the host; the layers'
    // times must still win.
    let upper = timed_tar(&[("d/g", Regular, 4_000_000), (".wh.gone", Regular, 0)]);
    apply(&s.root(), &[lower, upper]).unwrap();
    let mtime = |p: &str| fs::symlink_metadata(s.root().join(p)).unwrap().mtime();
    assert_eq!(mtime("d"), 1_000_000);
    assert_eq!(mtime("d/f"), 2_000_000);
    assert_eq!(mtime("d/l"), 3_000_000);
    assert_eq!(mtime("d/g"), 4_000_000);
    assert!(!s.root().join("gone").exists());
}

#[test]
fn directory_times_are_set_inside_the_root_after_a_parent_became_a_symlink() {
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType::{Directory, Symlink};
    let s = Scratch::new("mtime-escape");
    let outside = s.0.join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    let before = fs::metadata(outside.join("sub")).unwrap().mtime();
    // Layer 1 lists a/sub with a time; layer 2 replaces a by a symlink to the host path of
    // `outside`. The time must not be applied through it.
    let lower = timed_tar(&[("a/", Directory, 7), ("a/sub/", Directory, 7)]);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header("a", Symlink, 0, 0o777);
    set_link(&mut h, outside.to_str().unwrap());
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let upper = b.into_inner().unwrap();
    apply(&s.root(), &[lower, upper]).unwrap();
    assert_eq!(fs::metadata(outside.join("sub")).unwrap().mtime(), before);
}
