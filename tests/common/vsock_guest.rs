//! A guest-side vsock client for the Linux lane, compiled by the test and appended to the
//! shared initramfs.

use std::path::PathBuf;
use std::process::Command;

use super::{linux_guest_dir, TempDir};

/// A static helper for the guest: connects to the host over AF_VSOCK (CID 2, the port in
/// argv[1]), sends argv[2], prints what comes back.
const VSOCK_CLIENT_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm addr = {0};
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = 2;
    addr.svm_port = (unsigned)atoi(argv[1]);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("vsock connect"); return 1; }
    size_t len = strlen(argv[2]);
    if (write(fd, argv[2], len) != (ssize_t)len) { perror("vsock write"); return 1; }
    shutdown(fd, SHUT_WR);
    char buf[4096];
    ssize_t n, total = 0;
    printf("vsock-reply=");
    while ((n = read(fd, buf, sizeof buf)) > 0) { fwrite(buf, 1, n, stdout); total += n; }
    printf("\nvsock-bytes=%zd\n", total);
    return 0;
}
"#;

/// One file in a newc cpio archive.
pub fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let name_z = format!("{name}\0");
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        1,
        mode,
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name_z.len(),
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name_z.as_bytes());
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The shared initramfs with `/bin/vsock-client` appended (Linux unpacks concatenated cpio
/// archives in order), built in `tmp`: `vsock-client PORT TEXT` connects to host port PORT,
/// sends TEXT, shuts down its side and prints `vsock-reply=<what came back>` and
/// `vsock-bytes=<n>`.
pub fn initramfs_with_vsock_client(tmp: &TempDir) -> PathBuf {
    let src = tmp.path("vsock-client.c");
    std::fs::write(&src, VSOCK_CLIENT_C).unwrap();
    let bin = tmp.path("vsock-client");
    let status = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "cannot build the guest's vsock helper");
    let mut extra = Vec::new();
    cpio_entry(
        &mut extra,
        "bin/vsock-client",
        0o100755,
        &std::fs::read(&bin).unwrap(),
    );
    cpio_entry(&mut extra, "TRAILER!!!", 0, &[]);
    let mut initrd = std::fs::read(linux_guest_dir().join("initramfs.cpio.gz")).unwrap();
    while !initrd.len().is_multiple_of(4) {
        initrd.push(0);
    }
    initrd.extend_from_slice(&extra);
    let initrd_path = tmp.path("initramfs.cpio");
    std::fs::write(&initrd_path, &initrd).unwrap();
    initrd_path
}
