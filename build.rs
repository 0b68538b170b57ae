//! Build script of the `anvil` package: links `anvil-vmm` with its hot functions grouped.
//!
//! `resources/link/anvil-vmm.order` lists the functions that run when a VMM starts, serves its
//! API and runs a guest (recorded by `scripts/gen-symbol-order.sh`). The linker places them
//! first in `.text`, next to each other, so that the kernel's fault-around (64 KiB around each
//! page fault on the binary) maps hot code instead of the code that never runs in a VMM
//! process (image pulls, TLS, the CLI's other verbs): the process's resident memory and the
//! page faults of its start-up shrink (docs/benchmarks.md).
//!
//! The ordering only moves code: a symbol missing from the file (renamed since it was
//! recorded) is placed as usual. It needs LLD, rustc's default linker for
//! x86_64-unknown-linux-gnu since Rust 1.90; elsewhere, or with `ANVIL_NO_SYMBOL_ORDER` set,
//! the binary is linked as usual.

use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "resources/link/anvil-vmm.order";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=ANVIL_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");

    if std::env::var_os("ANVIL_NO_SYMBOL_ORDER").is_some() {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || !rustc_links_with_lld() || custom_linker() {
        return;
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = Path::new(&manifest_dir).join(ORDER_FILE);
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=anvil-vmm=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Symbols renamed since the file was recorded are placed as usual, without a warning each.
    println!("cargo:rustc-link-arg-bin=anvil-vmm=-Wl,--no-warn-symbol-ordering");
    // Relative relocations as a bitmap (DT_RELR, glibc 2.36+): ~9,500 of them would otherwise
    // take 24 bytes each in `.rela.dyn`, all read by the loader at every start.
    println!("cargo:rustc-link-arg-bin=anvil-vmm=-Wl,-z,pack-relative-relocs");
    // Identical functions (monomorphisations that compile to the same code) kept once.
    println!("cargo:rustc-link-arg-bin=anvil-vmm=-Wl,--icf=all");
}

/// Whether rustc is 1.90 or later, whose x86_64-unknown-linux-gnu target links with its own LLD.
fn rustc_links_with_lld() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 1 || (major == 1 && minor >= 90)
}

/// Whether the build chose its own linker or linker flavour (then it may not be LLD).
fn custom_linker() -> bool {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    flags.contains("linker") || flags.contains("fuse-ld")
}
