//! The live-migration destination on arbitrary bytes from a hostile source: frames are
//! decoded with their limits, pages written into a small guest memory (two regions with a
//! hole between them, as the arch layout has), states decoded and checked. It must refuse
//! garbage with an error and never panic, hang, allocate beyond a frame's limit or write
//! outside guest memory.
#![no_main]

use std::sync::OnceLock;

use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(2 << 20), 1 << 20),
        ])
        .expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = vmm::migration::receive::fuzz_frames(memory(), data);
});
