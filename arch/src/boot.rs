//! What the guest finds in memory at boot: the Linux zero page or the PVH start info, plus
//! the MP and ACPI tables.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::acpi::{create_acpi_tables, AcpiError, VirtioMmioDevice};
use crate::layout::{
    CMDLINE_MAX_SIZE, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, RSDP_START,
    ZERO_PAGE_START,
};
use crate::memory::{e820_map, E820Entry};
use crate::mptable::{setup_mptable, MptableError};

/// `boot_flag` of a valid setup header (Linux boot protocol, "boot_flag").
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` of a valid setup header: "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default `kernel_alignment` when the kernel brings no setup header.
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `hvm_start_info.magic` (Xen `XEN_HVM_START_MAGIC_VALUE`).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// The `hvm_start_info` version we write (version 1 has the memory map fields).
const PVH_START_INFO_VERSION: u32 = 1;
/// Room for PVH memory map entries between [`PVH_MEMMAP_START`] and the zero page.
#[allow(clippy::cast_possible_truncation)] // 0xf80 / 24: a small constant
const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START)
    / std::mem::size_of::<hvm_memmap_table_entry>() as u64)
    as usize;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// The Linux 64-bit boot protocol: long mode, `rsi` points at the zero page.
    Linux64,
    /// The Xen PVH boot protocol: 32-bit protected mode, `rbx` points at `hvm_start_info`.
    Pvh,
}

/// Where the initrd was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdConfig {
    /// Guest physical address of the initrd.
    pub address: GuestAddress,
    /// Size of the initrd in bytes.
    pub size: usize,
}

/// Errors while writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// No vCPUs.
    #[error("at least one vcpu is needed")]
    NoCpus,
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line of {0} bytes exceeds the maximum of {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// A value does not fit the 32-bit field the boot protocol has for it.
    #[error("{field} value {value:#x} does not fit in 32 bits")]
    FieldOverflow {
        /// The boot_params field.
        field: &'static str,
        /// The value that does not fit.
        value: u64,
    },
    /// More E820 entries than the boot structure has room for.
    #[error("{entries} e820 entries exceed the {max} the boot structure holds")]
    TooManyE820Entries {
        /// Entries in the map.
        entries: usize,
        /// Room in the boot structure.
        max: usize,
    },
    /// Writing the zero page or the PVH start info failed.
    #[error("cannot write the {0:?} boot parameters")]
    WriteBootParams(BootProtocol, #[source] linux_loader::configurator::Error),
    /// Writing the MP table failed.
    #[error("cannot set up the mp table")]
    Mptable(#[source] MptableError),
    /// Writing the ACPI tables failed.
    #[error("cannot set up the acpi tables")]
    Acpi(#[source] AcpiError),
}

fn to_u32(field: &'static str, value: u64) -> Result<u32, BootError> {
    u32::try_from(value).map_err(|_| BootError::FieldOverflow { field, value })
}

/// Builds the zero page (`boot_params`).
fn build_boot_params(
    e820: &[E820Entry],
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<&InitrdConfig>,
    setup_header: Option<setup_header>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = to_u32("cmd_line_ptr", cmdline_addr.raw_value())?;
    params.hdr.cmdline_size = to_u32("cmdline_size", cmdline_size as u64)?;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = to_u32("ramdisk_image", initrd.address.raw_value())?;
        params.hdr.ramdisk_size = to_u32("ramdisk_size", initrd.size as u64)?;
    }
    let too_many = || BootError::TooManyE820Entries {
        entries: e820.len(),
        max: E820_MAX_ENTRIES_ZEROPAGE,
    };
    let entries = u8::try_from(e820.len()).map_err(|_| too_many())?;
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(too_many());
    }
    let mut table = params.e820_table;
    for (slot, entry) in table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_table = table;
    params.e820_entries = entries;
    Ok(params)
}

/// Builds the PVH start info, its memory map and module list.
fn build_pvh_info(
    e820: &[E820Entry],
    cmdline_addr: GuestAddress,
    initrd: Option<&InitrdConfig>,
) -> Result<
    (
        hvm_start_info,
        Vec<hvm_memmap_table_entry>,
        Vec<hvm_modlist_entry>,
    ),
    BootError,
> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries {
            entries: e820.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    // E820 type numbers and XEN_HVM_MEMMAP_TYPE_* agree (RAM 1, reserved 2).
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.address.raw_value(),
            size: i.size as u64,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        flags: 0,
        nr_modules: to_u32("nr_modules", modules.len() as u64)?,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: cmdline_addr.raw_value(),
        rsdp_paddr: RSDP_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: to_u32("memmap_entries", memmap.len() as u64)?,
        reserved: 0,
    };
    Ok((start_info, memmap, modules))
}

/// Writes everything the guest finds in memory at boot.
///
/// For [`BootProtocol::Linux64`], the zero page at [`ZERO_PAGE_START`]: starting from the
/// kernel's `setup_header` (bzImage) or a fresh header (ELF vmlinux), with the loader type,
/// command line, initrd and E820 map filled in. For [`BootProtocol::Pvh`], the
/// `hvm_start_info` at [`PVH_INFO_START`] with the command line, RSDP, the initrd as the one
/// module and the memory map. For both, the MP table and the ACPI tables for `num_cpus`
/// vCPUs. The command line itself must already be at `cmdline_addr` (`cmdline_size` bytes
/// including the terminating NUL).
// Each argument is a distinct piece of the boot contract; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn configure_system<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<&InitrdConfig>,
    num_cpus: u8,
    protocol: BootProtocol,
    setup_header: Option<setup_header>,
    virtio_devices: &[VirtioMmioDevice],
) -> Result<(), BootError> {
    if num_cpus == 0 {
        return Err(BootError::NoCpus);
    }
    if cmdline_size > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline_size));
    }
    let e820 = e820_map(mem);
    match protocol {
        BootProtocol::Linux64 => {
            let params =
                build_boot_params(&e820, cmdline_addr, cmdline_size, initrd, setup_header)?;
            let boot_params = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&boot_params, mem)
                .map_err(|e| BootError::WriteBootParams(protocol, e))?;
        }
        BootProtocol::Pvh => {
            let (start_info, memmap, modules) = build_pvh_info(&e820, cmdline_addr, initrd)?;
            let mut boot_params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            boot_params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                boot_params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&boot_params, mem)
                .map_err(|e| BootError::WriteBootParams(protocol, e))?;
        }
    }
    setup_mptable(mem, num_cpus).map_err(BootError::Mptable)?;
    create_acpi_tables(mem, num_cpus, virtio_devices).map_err(BootError::Acpi)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;
    use crate::layout::{CMDLINE_START, HIMEM_START, MPTABLE_START};
    use crate::memory::E820Kind;
    use crate::test_utils::guest_mem;

    const MEM_SIZE: u64 = 128 << 20;

    fn initrd() -> InitrdConfig {
        InitrdConfig {
            address: GuestAddress(0x400_0000),
            size: 0x12345,
        }
    }

    fn configure(
        mem: &GuestMemoryMmap,
        protocol: BootProtocol,
        hdr: Option<setup_header>,
        initrd: Option<&InitrdConfig>,
    ) {
        configure_system(
            mem,
            GuestAddress(CMDLINE_START),
            42,
            initrd,
            2,
            protocol,
            hdr,
            &[],
        )
        .unwrap();
    }

    #[test]
    fn zero_page_round_trip_without_setup_header() {
        let mem = guest_mem(MEM_SIZE);
        configure(&mem, BootProtocol::Linux64, None, Some(&initrd()));
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x400_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        let e820 = e820_map(&mem);
        assert_eq!(usize::from(params.e820_entries), e820.len());
        let table = params.e820_table;
        for (raw, entry) in table.iter().zip(&e820) {
            assert_eq!(({ raw.addr }, { raw.size }), (entry.addr, entry.size));
            assert_eq!({ raw.r#type }, entry.kind as u32);
        }
        let last = table[e820.len() - 1];
        assert_eq!({ last.addr }, HIMEM_START);
        assert_eq!({ last.r#type }, E820Kind::Ram as u32);
    }

    #[test]
    fn zero_page_keeps_the_bzimage_setup_header() {
        let mem = guest_mem(MEM_SIZE);
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 0x01,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            type_of_loader: 0,
            ..Default::default()
        };
        configure(&mem, BootProtocol::Linux64, Some(hdr), None);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let got = params.hdr;
        assert_eq!({ got.version }, 0x020f);
        assert_eq!({ got.loadflags }, 0x01);
        assert_eq!({ got.kernel_alignment }, 0x20_0000);
        assert_eq!({ got.type_of_loader }, 0xff);
        assert_eq!({ got.ramdisk_image }, 0);
        assert_eq!({ got.ramdisk_size }, 0);
    }

    #[test]
    fn pvh_start_info_round_trip() {
        let mem = guest_mem(MEM_SIZE);
        configure(&mem, BootProtocol::Pvh, None, Some(&initrd()));
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, RSDP_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x400_0000, 0x12345));
        let e820 = e820_map(&mem);
        assert_eq!(info.memmap_entries as usize, e820.len());
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        for (i, entry) in e820.iter().enumerate() {
            let addr =
                PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
            let raw: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
            assert_eq!(
                (raw.addr, raw.size, raw.type_),
                (entry.addr, entry.size, entry.kind as u32)
            );
        }
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let mem = guest_mem(MEM_SIZE);
        configure(&mem, BootProtocol::Pvh, None, None);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn mp_and_acpi_tables_are_written_for_both_protocols() {
        for protocol in [BootProtocol::Linux64, BootProtocol::Pvh] {
            let mem = guest_mem(MEM_SIZE);
            configure(&mem, protocol, None, None);
            let mut sig = [0u8; 8];
            mem.read_slice(&mut sig[..4], GuestAddress(MPTABLE_START))
                .unwrap();
            assert_eq!(&sig[..4], b"_MP_");
            mem.read_slice(&mut sig, GuestAddress(RSDP_START)).unwrap();
            assert_eq!(&sig, b"RSD PTR ");
        }
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let mem = guest_mem(MEM_SIZE);
        let cmdline = GuestAddress(CMDLINE_START);
        let err = configure_system(&mem, cmdline, 1, None, 0, BootProtocol::Linux64, None, &[]);
        assert!(matches!(err, Err(BootError::NoCpus)));
        let err = configure_system(&mem, cmdline, 4096, None, 1, BootProtocol::Pvh, None, &[]);
        assert!(matches!(err, Err(BootError::CmdlineTooLong(4096))));
        let high = InitrdConfig {
            address: GuestAddress(1 << 32),
            size: 1,
        };
        let err = configure_system(
            &mem,
            cmdline,
            1,
            Some(&high),
            1,
            BootProtocol::Linux64,
            None,
            &[],
        );
        assert!(matches!(
            err,
            Err(BootError::FieldOverflow {
                field: "ramdisk_image",
                ..
            })
        ));
    }
}
