//! The x86_64 guest physical memory map and fixed resources of an anvil microVM.
//!
//! This is the board contract shared by the VMM, the guest kernel's boot path and the test
//! guest. Low memory follows the PC conventions Linux expects; the 32-bit MMIO hole sits below
//! 4 GiB and guest RAM above it continues at 4 GiB.

/// Start of the GDT the VMM builds for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of GDT entries the boot GDT holds (null, code64, data, tss).
pub const BOOT_GDT_MAX: usize = 4;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries, after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, PD (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line, terminating NUL included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional low RAM; the EBDA starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table lives in the EBDA, where Linux scans for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the EBDA and of conventional memory: the legacy video hole starts here.
pub const EBDA_END: u64 = 0xa0000;
/// Start of the BIOS read-only area (reserved in E820); the ACPI RSDP is placed here, where
/// Linux scans for it (0xe0000..0x100000).
pub const BIOS_AREA_START: u64 = 0xe0000;
/// ACPI RSDP.
pub const RSDP_START: u64 = BIOS_AREA_START;
/// The other ACPI tables (XSDT, FADT, DSDT, MADT) follow the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe0040;
/// First byte past the BIOS area.
pub const BIOS_AREA_END: u64 = 0x100000;
/// Start of high memory, where bzImage kernels are loaded.
pub const HIMEM_START: u64 = 0x100000;

/// First byte of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO32_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO32_START;
/// First address above 4 GiB; RAM that did not fit below the hole continues here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Window for virtio-mmio devices (one 4 KiB slot each), inside the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// End of the virtio-mmio window.
pub const VIRTIO_MMIO_END: u64 = 0xfe00_0000;
/// KVM's identity-map page (needed on Intel VMX), inside the hole.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeffc000;
/// KVM's three-page TSS area (needed on Intel VMX), right after the identity-map page.
pub const KVM_TSS_START: u64 = 0xfeffd000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy COM1 port base and its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller data port (0x60) and command/status port (0x64) are at
/// `I8042_PORT` and `I8042_PORT + 4`.
pub const I8042_PORT: u16 = 0x60;
/// IRQ line of the i8042 keyboard.
pub const I8042_KBD_IRQ: u32 = 1;
/// CMOS/RTC index (0x70) and data (0x71) ports.
pub const CMOS_PORT: u16 = 0x70;
/// Boot-complete signal port: the guest writes [`BOOT_TIMER_MAGIC`] here (Firecracker's
/// convention).
pub const BOOT_TIMER_PORT: u16 = 0x3f0;
/// The value written to [`BOOT_TIMER_PORT`] when the guest has booted.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// First IRQ line handed to virtio devices; lines up to [`IRQ_MAX`] follow.
pub const IRQ_BASE: u32 = 5;
/// Last IRQ line usable by devices (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;

/// Largest number of vCPUs the MP/ACPI tables and APIC IDs support here.
pub const MAX_VCPUS: u8 = 254;
