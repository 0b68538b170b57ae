//! `hello`: boot facts and a structural check of the boot contract.
//!
//! Prints `boot=ok`, `protocol=`, `cpus=`, `mem_mib=`, `mem_bytes=`, `cmdline=`, then
//! `bootinfo=valid` or `bootinfo=invalid reason=<first violation>`, then the result.

use crate::bootinfo::{self, BootInfo};
use crate::cmdline::{self, Params};
use crate::entry::Protocol;
use crate::{console, exit, io, phys, tables};

/// Port that tells the VMM the guest has booted (Firecracker-style boot timer).
const BOOT_COMPLETE_PORT: u16 = 0x3f0;
const BOOT_COMPLETE_VALUE: u8 = 123;

// virtio-mmio registers (virtio 1.2, 4.2.2).
const VIRTIO_MMIO_MAGIC: u64 = 0x0;
const VIRTIO_MMIO_VERSION: u64 = 0x4;
const VIRTIO_MMIO_DEVICE_ID: u64 = 0x8;
const VIRTIO_MAGIC: u32 = 0x7472_6976; // "virt"
const VIRTIO_VERSION_MODERN: u32 = 2;

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    io::outb(BOOT_COMPLETE_PORT, BOOT_COMPLETE_VALUE);
    crate::tg!("boot=ok");
    let protocol = match info.protocol {
        Protocol::Linux64 => "linux64",
        Protocol::Pvh => "pvh",
    };
    crate::tg!("protocol={protocol}");

    let mp = tables::check_mp();
    let acpi = tables::check_acpi(info.rsdp);
    let cpus = match (&mp, &acpi) {
        (Ok(mp), _) => mp.cpus,
        (Err(_), Ok(acpi)) => acpi.lapics,
        (Err(_), Err(_)) => 0,
    };
    crate::tg!("cpus={cpus}");
    let bytes = info.ram_bytes();
    crate::tg!("mem_mib={}", (bytes + (1 << 19)) >> 20);
    crate::tg!("mem_bytes={bytes}");
    console::write_bytes(b"TG cmdline=");
    console::write_bytes(info.cmdline());
    console::write_bytes(b"\n");

    match validate(info, params, mp, acpi) {
        Ok(()) => {
            crate::tg!("bootinfo=valid");
            exit::pass()
        }
        Err(why) => {
            for e in info.memmap() {
                crate::tg!("memmap={:#x}-{:#x} type={}", e.addr, e.end(), e.kind);
            }
            crate::tg!("bootinfo=invalid reason={why}");
            exit::fail(format_args!("bootinfo invalid: {why}"))
        }
    }
}

fn validate(
    info: &BootInfo,
    params: &Params<'_>,
    mp: Result<tables::MpInfo, &'static str>,
    acpi: Result<tables::AcpiInfo, &'static str>,
) -> Result<(), &'static str> {
    if let Some(why) = info.header_error {
        return Err(why);
    }
    bootinfo::check_memmap(info.memmap())?;
    let mp = mp?;
    let acpi = acpi?;
    if acpi.lapics != mp.cpus {
        return Err("MADT local APIC count differs from MP processor count");
    }
    check_virtio(params)
}

fn check_virtio(params: &Params<'_>) -> Result<(), &'static str> {
    let mut n = 0u64;
    for value in params.values("virtio_mmio.device") {
        let dev = cmdline::parse_virtio_mmio(value).ok_or("malformed virtio_mmio.device")?;
        if dev.addr % 4 != 0
            || dev.size < 0x100
            || dev.addr.saturating_add(dev.size) > phys::STATIC_MAP_END
        {
            return Err("virtio_mmio.device window out of range");
        }
        if phys::mmio_read_u32(dev.addr + VIRTIO_MMIO_MAGIC) != VIRTIO_MAGIC {
            return Err("virtio-mmio magic");
        }
        if phys::mmio_read_u32(dev.addr + VIRTIO_MMIO_VERSION) != VIRTIO_VERSION_MODERN {
            return Err("virtio-mmio version is not 2");
        }
        if phys::mmio_read_u32(dev.addr + VIRTIO_MMIO_DEVICE_ID) == 0 {
            return Err("virtio-mmio device id is 0");
        }
        n += 1;
    }
    match params.u64_opt("expect_devices") {
        Err(_) => Err("bad parameter tg.expect_devices"),
        Ok(Some(want)) if want != n => {
            Err("virtio-mmio device count differs from tg.expect_devices")
        }
        Ok(_) => Ok(()),
    }
}
