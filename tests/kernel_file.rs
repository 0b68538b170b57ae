//! The guest does not depend on its kernel and initrd files once it runs: their pages are
//! mapped from the files at load time (see `vmm/src/file_pages.rs`), then swapped for
//! anonymous copies. Overwriting and truncating both files afterwards leaves the guest
//! running with its memory intact.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::api_vmm::{ok, ApiVmm};
use common::{kvm_available, testguest, TempDir};

const DETACHED: &str = "guest memory no longer maps the kernel and initrd files";

/// The file ranges `(offset, guest address, size)` of the ELF's read-only allocated
/// sections (code and constants: what the guest never writes).
fn read_only_sections(elf: &[u8]) -> Vec<(usize, u64, usize)> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (shoff, shentsize, shnum) = (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c));
    (0..shnum)
        .map(|i| shoff + i * shentsize)
        .filter(|&sh| u32_at(sh + 4) == 1) // SHT_PROGBITS
        .filter(|&sh| u64_at(sh + 8) & 0x3 == 0x2) // SHF_ALLOC, not SHF_WRITE
        .map(|sh| {
            (
                u64_at(sh + 24) as usize,
                u64_at(sh + 16),
                u64_at(sh + 32) as usize,
            )
        })
        .filter(|&(_, _, size)| size > 0)
        .collect()
}

/// Overwrites `path` in place with other bytes, then truncates it to nothing.
fn overwrite_and_truncate(path: &std::path::Path) {
    use std::io::Write;
    let len = std::fs::metadata(path).unwrap().len() as usize;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&vec![0x55; len]).unwrap();
    f.sync_all().unwrap();
    f.set_len(0).unwrap();
}

#[test]
fn the_guest_survives_its_kernel_and_initrd_files_being_overwritten_and_truncated() {
    if !kvm_available(
        "the_guest_survives_its_kernel_and_initrd_files_being_overwritten_and_truncated",
    ) {
        return;
    }
    let dir = TempDir::new("kernel-file");
    let original = std::fs::read(testguest()).unwrap();
    let kernel = dir.path("kernel");
    std::fs::write(&kernel, &original).unwrap();
    // An initrd the test guest ignores, large enough to be mapped: distinct page contents.
    let initrd_bytes: Vec<u8> = (0..100 * 4096 + 77)
        .map(|i: usize| (i % 253) as u8 ^ (i / 4096) as u8)
        .collect();
    let initrd = dir.path("initrd");
    std::fs::write(&initrd, &initrd_bytes).unwrap();

    let sock = dir.path("api.sock");
    let mut vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    ok(
        &mut c,
        "PUT",
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "console=ttyS0 tg.run=counter tg.period_ms=10",
        }),
    );
    ok(
        &mut c,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    vmm.wait_for("the copy of the file pages", |out| out.contains(DETACHED));
    let line = vmm
        .output()
        .lines()
        .find(|l| l.contains(DETACHED))
        .unwrap()
        .to_string();
    let bytes: usize = line
        .split("bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    // The test guest's image (~200 KiB) and the initrd's 100 whole pages were mapped.
    assert!(bytes >= 100 * 4096 + 16 * 4096, "{line}");

    overwrite_and_truncate(&kernel);
    overwrite_and_truncate(&initrd);
    let before = vmm.count();
    vmm.wait_for_within("the counter to go on", Duration::from_secs(20), |_| {
        vmm.count() >= before + 20
    });
    assert!(
        vmm.child.try_wait().unwrap().is_none(),
        "anvil-vmm exited:\n{}",
        vmm.output()
    );

    // The guest's memory still holds the original code, constants and initrd.
    let (state, mem) = (dir.path("state"), dir.path("mem"));
    ok(
        &mut c,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    );
    ok(
        &mut c,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
    );
    let memory = std::fs::read(&mem).unwrap();
    let sections = read_only_sections(&original);
    assert!(!sections.is_empty(), "no read-only sections found");
    for (offset, addr, size) in sections {
        // 64 MiB is one region at guest address 0: file offset = guest address.
        let at = addr as usize;
        assert!(
            memory[at..at + size] == original[offset..offset + size],
            "guest memory at {addr:#x} (+{size:#x}) differs from the kernel file"
        );
    }
    let found = (0..memory.len() - initrd_bytes.len())
        .step_by(4096)
        .any(|at| memory[at..at + initrd_bytes.len()] == initrd_bytes[..]);
    assert!(found, "the initrd's bytes are not in guest memory");
}
