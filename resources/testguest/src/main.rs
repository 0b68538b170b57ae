//! anvil-testguest: a `no_std` test guest for anvil-vmm.
//!
//! It boots through the 64-bit Linux boot protocol or PVH, sets up its own GDT, TSS, IDT and page
//! tables in a few dozen hand-written CPL0 instructions (`entry.rs`), then drops to ring 3 and
//! runs the workload named by `tg.run=` on the command line there, printing `TG <key>=<value>`
//! lines on COM1 and ending with `TG result=pass|fail` and a reset.
#![no_std]
#![no_main]
// The guest is x86_64-only; byte and field extraction truncates on purpose throughout.
#![allow(clippy::cast_possible_truncation)]

mod apic;
mod bootinfo;
mod cmdline;
mod console;
mod dma;
mod entry;
mod exit;
mod io;
mod mem;
mod paging;
mod phys;
mod tables;
mod time;
mod virtio;
mod workloads;

use bootinfo::BootInfo;
use cmdline::Params;

/// Ring-3 main, called by `tg_user_entry` on the workload stack.
#[no_mangle]
extern "C" fn tg_main() -> ! {
    let info = BootInfo::read();
    paging::map_high_ram(&info);
    let params = Params::new(info.cmdline());
    match params.get("run") {
        Some("hello") => workloads::hello::run(&info, &params),
        Some("counter") => workloads::counter::run(&params),
        Some("memtest") => workloads::memtest::run(&info, &params),
        Some("irq") => workloads::irq::run(&info, &params),
        Some("hostile") => workloads::hostile::run(&params),
        Some("hostile_virtio") => workloads::hostile_virtio::run(&info, &params),
        Some("rng") => workloads::rng::run(&info, &params),
        Some("blk") => workloads::blk::run(&info, &params),
        Some("net") => workloads::net::run(&info, &params),
        Some("vsock") => workloads::vsock::run(&info, &params),
        Some(other) => exit::fail(format_args!("unknown workload {other}")),
        None => exit::fail(format_args!("unknown workload ")),
    }
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo<'_>) -> ! {
    exit::fail(format_args!("panic {}", panic.message()))
}

/// The precompiled `core` of an unwinding target refers to this symbol; with panics aborting
/// nothing ever calls it. Unoptimised builds keep the reference, so give it a body.
#[cfg(debug_assertions)]
#[no_mangle]
extern "C" fn rust_eh_personality() {}
