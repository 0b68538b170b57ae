//! ACPI tables: RSDP -> XSDT -> FADT (hardware-reduced, pointing at the DSDT) and MADT.
//!
//! The RSDP sits at [`RSDP_START`] in the BIOS area, where Linux scans for it (and the PVH
//! start info points at it); the other tables follow from [`ACPI_TABLES_START`] and must end
//! below [`BIOS_AREA_END`]. The platform is hardware-reduced ACPI: no SCI, no PM blocks, no
//! FACS. The DSDT describes the legacy devices at their fixed ports (COM1, the i8042 keyboard
//! controller, the CMOS RTC) so the guest finds them through ACPI PnP. The MADT lists one
//! local APIC per vCPU and the IOAPIC; legacy IRQs are identity-mapped to IOAPIC pins (no
//! interrupt source overrides), the same routing the MP table and KVM's default GSI routing use.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    ACPI_TABLES_START, APIC_START, BIOS_AREA_END, CMOS_PORT, COM1_IRQ, COM1_PORT, I8042_KBD_IRQ,
    I8042_PORT, IOAPIC_START, MAX_VCPUS, RSDP_START,
};
use crate::mptable::ioapic_id;

/// Errors while building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// No vCPUs.
    #[error("acpi tables need at least one vcpu")]
    NoCpus,
    /// More vCPUs than APIC IDs available.
    #[error("{0} vcpus exceed the acpi maximum of {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The tables would run past the BIOS area.
    #[error("acpi tables end at {0:#x}, past the bios area")]
    TooLarge(u64),
    /// A virtio-mmio window is not where 32-bit ACPI resources can describe it.
    #[error("virtio-mmio window at {0:#x} cannot be described in acpi")]
    VirtioWindow(u64),
    /// Writing a table to guest memory failed.
    #[error("cannot write the acpi {table} table to guest memory")]
    Write {
        /// Table signature.
        table: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"ANVIL ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity" (ACPI 6.x, 5.2.9).
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"ANVILVMM";
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// MADT revision (ACPI 6.x).
const MADT_REVISION: u8 = 5;
/// Size of the common SDT header (ACPI 6.x, 5.2.6).
const SDT_HEADER_SIZE: u32 = 36;
/// Tables start on 16-byte boundaries.
const TABLE_ALIGN: u64 = 16;

/// IA-PC boot architecture flags (ACPI 6.x, table 5.10): an 8042 is present, VGA is not.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flags (ACPI 6.x, table 5.20): PCAT_COMPAT, dual 8259s are present (KVM's irqchip).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT Local APIC NMI structure (ACPI 6.x, 5.2.12.7).
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// "All processors" as an ACPI processor UID in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// Builds the DSDT: a definition block describing the legacy devices.
/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Base of its register window.
    pub addr: u64,
    /// Size of the window.
    pub len: u64,
    /// Its interrupt (GSI).
    pub gsi: u32,
}

/// Describes `virtio_devices` as ACPI devices (Linux binds "LNRO0005" to virtio-mmio), so
/// that a guest that uses ACPI for interrupt routing can map their GSIs: the kernel
/// command line's `virtio_mmio.device=` only names IRQ numbers, which a hardware-reduced
/// ACPI guest does not map to GSIs 1:1.
fn virtio_aml(
    device: &VirtioMmioDevice,
    index: usize,
    body: &mut Vec<u8>,
) -> Result<(), AcpiError> {
    let base = u32::try_from(device.addr).map_err(|_| AcpiError::VirtioWindow(device.addr))?;
    let len = u32::try_from(device.len).map_err(|_| AcpiError::VirtioWindow(device.addr))?;
    let uid = u16::try_from(index).map_err(|_| AcpiError::VirtioWindow(device.addr))?;
    let mem = Memory32Fixed::new(true, base, len);
    // Consumer, edge triggered, active high, exclusive.
    let irq = Interrupt::new(true, true, false, false, device.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let path = format!("_SB_.V{index:03}");
    Device::new(
        Path::new(&path),
        vec![
            &Name::new(Path::new("_HID"), &"LNRO0005"),
            &Name::new(Path::new("_UID"), &uid),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(body);
    Ok(())
}

fn build_dsdt(virtio_devices: &[VirtioMmioDevice]) -> Result<Sdt, AcpiError> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_SIZE,
        DSDT_REVISION,
        OEM_ID,
        *b"ANVLDSDT",
        OEM_REVISION,
    );
    let mut body = Vec::new();

    // Consumer, edge triggered, active high, exclusive.
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    Device::new(
        Path::new("_SB_.COM1"),
        vec![
            &Name::new(Path::new("_HID"), &com1_hid),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    let command_port = I8042_PORT + 4;
    let kbd_data = IO::new(I8042_PORT, I8042_PORT, 1, 1);
    let kbd_command = IO::new(command_port, command_port, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_command, &kbd_irq]);
    let kbd_hid = EISAName::new("PNP0303");
    Device::new(
        Path::new("_SB_.PS2K"),
        vec![
            &Name::new(Path::new("_HID"), &kbd_hid),
            &Name::new(Path::new("_CRS"), &kbd_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    let rtc_io = IO::new(CMOS_PORT, CMOS_PORT, 1, 2);
    let rtc_crs = ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid = EISAName::new("PNP0B00");
    Device::new(
        Path::new("_SB_.RTC_"),
        vec![
            &Name::new(Path::new("_HID"), &rtc_hid),
            &Name::new(Path::new("_CRS"), &rtc_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    for (index, device) in virtio_devices.iter().enumerate() {
        virtio_aml(device, index, &mut body)?;
    }

    dsdt.append_slice(&body);
    Ok(dsdt)
}

/// Builds the hardware-reduced FADT pointing at the DSDT at `dsdt_addr`.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"ANVLFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // Power and sleep buttons, if any, are control-method devices, not fixed features.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// Builds the MADT for `num_cpus` vCPUs.
fn build_madt(num_cpus: u8) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        SDT_HEADER_SIZE + 8,
        MADT_REVISION,
        OEM_ID,
        *b"ANVLMADT",
        OEM_REVISION,
    );
    let apic_start = u32::try_from(APIC_START).expect("the local APIC is below 4 GiB");
    madt.write_u32(36, apic_start);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut body = Vec::new();
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    let ioapic_start = u32::try_from(IOAPIC_START).expect("the IOAPIC is below 4 GiB");
    IoApic::new(ioapic_id(num_cpus), ioapic_start, 0).to_aml_bytes(&mut body);
    // NMIs arrive on LINT1 of every processor; flags 0: conforms to the bus.
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.append_slice(&body);
    madt
}

fn align_up(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

fn write_table<M: GuestMemoryBackend>(
    mem: &M,
    table: &'static str,
    bytes: &[u8],
    addr: u64,
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| AcpiError::Write { table, source })
}

/// Writes the RSDP (revision 2) at [`RSDP_START`] and the XSDT, FADT, DSDT and MADT from
/// [`ACPI_TABLES_START`] for `num_cpus` vCPUs. Returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    num_cpus: u8,
    virtio_devices: &[VirtioMmioDevice],
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let dsdt = build_dsdt(virtio_devices)?;
    let dsdt_addr = ACPI_TABLES_START;
    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let fadt = build_fadt(dsdt_addr);
    let madt_addr = align_up(fadt_addr + fadt.len() as u64);
    let madt = build_madt(num_cpus);
    let xsdt_addr = align_up(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"ANVLXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > BIOS_AREA_END {
        return Err(AcpiError::TooLarge(end));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    debug_assert!(RSDP_START + rsdp.len() as u64 <= ACPI_TABLES_START);

    write_table(mem, "DSDT", dsdt.as_slice(), dsdt_addr)?;
    write_table(mem, "FACP", &fadt, fadt_addr)?;
    write_table(mem, "APIC", madt.as_slice(), madt_addr)?;
    write_table(mem, "XSDT", &xsdt_bytes, xsdt_addr)?;
    write_table(mem, "RSDP", &rsdp, RSDP_START)?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::test_utils::guest_mem;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Reads a whole SDT at `addr`, checking its signature and checksum.
    fn read_sdt(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], signature);
        let table = read(mem, addr, u32_at(&header, 4) as usize);
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    struct Tables {
        fadt: Vec<u8>,
        dsdt: Vec<u8>,
        madt: Vec<u8>,
    }

    fn walk(num_cpus: u8) -> Tables {
        let mem = guest_mem(32 << 20);
        let rsdp_addr = create_acpi_tables(&mem, num_cpus, &[]).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(RSDP_START));
        let rsdp = read(&mem, RSDP_START, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_sdt(&mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = read_sdt(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_sdt(&mem, u64_at(&xsdt, 44), b"APIC");
        let dsdt = read_sdt(&mem, u64_at(&fadt, 140), b"DSDT");
        assert!(xsdt_addr + xsdt.len() as u64 <= BIOS_AREA_END);
        Tables { fadt, dsdt, madt }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_vendor_and_boot_flags() {
        let t = walk(1);
        assert_eq!(u32_at(&t.fadt, 40), 0, "no 32-bit DSDT pointer");
        let flags = u32_at(&t.fadt, 112);
        assert!(flags & (1 << 20) != 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([t.fadt[109], t.fadt[110]]);
        assert!(boot_arch & IAPC_BOOT_ARCH_8042 != 0);
        assert_eq!(&t.fadt[268..276], b"ANVILVMM");
    }

    #[test]
    fn dsdt_is_a_definition_block_with_the_legacy_devices() {
        let t = walk(1);
        assert_eq!(t.dsdt[8], DSDT_REVISION);
        assert!(t.dsdt.len() > 36);
        // DeviceOp (ExtOpPrefix 0x5b, 0x82) opens the first object after the header.
        assert_eq!(&t.dsdt[36..38], &[0x5b, 0x82]);
        let body = &t.dsdt[36..];
        for name in [b"COM1", b"PS2K", b"RTC_"] {
            assert!(body.windows(4).any(|w| w == name), "missing device");
        }
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_cpu_and_the_ioapic() {
        for n in [1u8, 2, 4, 254] {
            let t = walk(n);
            assert_eq!(u32_at(&t.madt, 36), 0xfee0_0000);
            let mut off = 44;
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            while off < t.madt.len() {
                let (kind, len) = (t.madt[off], usize::from(t.madt[off + 1]));
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(u32_at(&t.madt, off + 4) & 1, 1, "enabled");
                        lapics.push(t.madt[off + 3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((t.madt[off + 2], u32_at(&t.madt, off + 4)));
                    }
                    2 => panic!("no interrupt source overrides expected"),
                    _ => {}
                }
                off += len;
            }
            assert_eq!(off, t.madt.len());
            assert_eq!(lapics, (0..n).collect::<Vec<u8>>());
            assert_eq!(ioapics, vec![(n, 0xfec0_0000)]);
        }
    }

    #[test]
    fn bad_cpu_counts_are_rejected() {
        let mem = guest_mem(32 << 20);
        assert!(matches!(
            create_acpi_tables(&mem, 0, &[]),
            Err(AcpiError::NoCpus)
        ));
        assert!(matches!(
            create_acpi_tables(&mem, 255, &[]),
            Err(AcpiError::TooManyCpus(255))
        ));
    }

    #[test]
    fn virtio_devices_are_described_in_the_dsdt() {
        let mem = guest_mem(32 << 20);
        let devices = [
            VirtioMmioDevice {
                addr: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            VirtioMmioDevice {
                addr: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        create_acpi_tables(&mem, 1, &devices).unwrap();
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(ACPI_TABLES_START))
            .unwrap();
        assert_eq!(&header[..4], b"DSDT");
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut dsdt = vec![0u8; len];
        mem.read_slice(&mut dsdt, GuestAddress(ACPI_TABLES_START))
            .unwrap();
        assert_eq!(
            dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        let count = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(dsdt.windows(4).any(|w| w == b"V001"));
        let too_high = [VirtioMmioDevice {
            addr: 1 << 32,
            len: 0x1000,
            gsi: 5,
        }];
        assert!(matches!(
            create_acpi_tables(&mem, 1, &too_high),
            Err(AcpiError::VirtioWindow(_))
        ));
    }
}
