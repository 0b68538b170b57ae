//! The Intel MultiProcessor Specification 1.4 tables (floating pointer and configuration
//! table) describing the vCPUs, the ISA bus, the IOAPIC and how legacy IRQs reach it.
//!
//! Interrupt routing matches KVM's default GSI routing (`kvm_setup_default_irq_routing`):
//! ISA IRQ `n` arrives at IOAPIC pin `n` for all 24 pins, so IRQ 0 (the PIT) is an ordinary
//! interrupt on pin 0 and there is no IRQ0 -> pin 2 override. The ACPI MADT says the same.
//!
//! The floating pointer sits at [`MPTABLE_START`], the first byte of the last KiB of base
//! memory, where Linux scans for it; the configuration table follows it. A table for many
//! vCPUs (20 bytes each) does not fit in that KiB, so the table may run on into the legacy
//! video hole above [`EBDA_END`] (backed by guest memory, not RAM in the E820 map) up to
//! [`BIOS_AREA_START`], where the ACPI tables begin.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    APIC_START, BIOS_AREA_START, EBDA_END, IOAPIC_START, IRQ_MAX, MAX_VCPUS, MPTABLE_START,
};

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// No vCPUs.
    #[error("mp table needs at least one vcpu")]
    NoCpus,
    /// More vCPUs than APIC IDs available.
    #[error("{0} vcpus exceed the mp table maximum of {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The table would run into the BIOS area.
    #[error("mp table of {0} bytes does not fit below the bios area")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write the mp table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// "_MP_", the floating pointer signature.
const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
/// "PCMP", the configuration table signature.
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// MP spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
const MPC_OEM: [u8; 8] = *b"ANVIL   ";
const MPC_PRODUCT_ID: [u8; 12] = *b"MICROVM     ";
/// Size of the floating pointer structure (MP spec table 4-1).
const MPF_SIZE: usize = 16;
/// Size of the configuration table header (MP spec table 4-2).
const MPC_HEADER_SIZE: usize = 44;
/// Size of a processor entry; every other entry type is 8 bytes.
const MPC_CPU_SIZE: usize = 20;
const MPC_ENTRY_SIZE: usize = 8;

// Entry types (MP spec table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types (MP spec table 4-10).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (edge, active high on ISA).
const MP_IRQ_FLAGS_DEFAULT: u16 = 0;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const IOAPIC_USABLE: u8 = 1;
/// Local APIC version of an integrated xAPIC, as KVM reports it.
const APIC_VERSION: u8 = 0x14;
/// CPU signature family 6 in the processor entries; Linux ignores it.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags in processor entries: FPU and on-chip APIC.
const CPU_FEATURES: u32 = 0x201;
const BUS_ID_ISA: u8 = 0;
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";
/// "All local APICs" as a destination.
const ALL_APICS: u8 = 0xff;

/// Bytes the floating pointer plus configuration table take for `num_cpus` vCPUs.
pub fn mptable_size(num_cpus: u8) -> usize {
    let irqs = IRQ_MAX as usize + 1;
    MPF_SIZE
        + MPC_HEADER_SIZE
        + MPC_CPU_SIZE * usize::from(num_cpus)
        + MPC_ENTRY_SIZE * (1 /* bus */ + 1 /* ioapic */ + irqs + 2/* lint0, lint1 */)
}

/// The APIC ID the IOAPIC gets: the first one after the vCPUs'.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

fn push_intsrc(t: &mut Vec<u8>, kind: u8, irq_type: u8, bus_irq: u8, apic: u8, pin: u8) {
    t.extend_from_slice(&[kind, irq_type]);
    t.extend_from_slice(&MP_IRQ_FLAGS_DEFAULT.to_le_bytes());
    t.extend_from_slice(&[BUS_ID_ISA, bus_irq, apic, pin]);
}

/// Builds the configuration table (header and entries), checksum included.
fn build_config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..num_cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(&BUS_TYPE_ISA);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, APIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&u32_addr(IOAPIC_START).to_le_bytes());
    count += 2;
    let max_irq = u8::try_from(IRQ_MAX).expect("the IOAPIC has 24 pins");
    for irq in 0..=max_irq {
        push_intsrc(&mut entries, MP_INTSRC, MP_INT, irq, ioapic, irq);
        count += 1;
    }
    // The 8259 output reaches LINT0 of the BSP; NMIs go to LINT1 of every CPU.
    push_intsrc(&mut entries, MP_LINTSRC, MP_EXTINT, 0, 0, 0);
    push_intsrc(&mut entries, MP_LINTSRC, MP_NMI, 0, ALL_APICS, 1);
    count += 2;

    let length = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(length);
    table.extend_from_slice(&MPC_SIGNATURE);
    let length = u16::try_from(length).expect("bounded by mptable_size(MAX_VCPUS) < 64 KiB");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0 /* checksum */]);
    table.extend_from_slice(&MPC_OEM);
    table.extend_from_slice(&MPC_PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&u32_addr(APIC_START).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length and checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Builds the 16-byte floating pointer for a configuration table at `table_addr`.
fn build_floating_pointer(table_addr: u32) -> Vec<u8> {
    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(&MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, spec revision, checksum, feature bytes 1-5 (0: a configuration
    // table is present, no default configuration).
    mpf.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf
}

/// Addresses in this module are fixed layout constants below 4 GiB.
fn u32_addr(addr: u64) -> u32 {
    u32::try_from(addr).expect("mp table addresses are layout constants below 4 GiB")
}

/// Writes the MP floating pointer and configuration table at [`MPTABLE_START`] for
/// `num_cpus` processors (APIC IDs 0..num_cpus, the BSP is 0), one ISA bus, the IOAPIC at
/// [`IOAPIC_START`] with APIC ID `num_cpus`, IRQs 0..=23 routed to the same IOAPIC pins, LINT0
/// as ExtINT and LINT1 as NMI.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let size = mptable_size(num_cpus);
    if MPTABLE_START + size as u64 > BIOS_AREA_START {
        return Err(MptableError::TooLarge(size));
    }
    let table_addr = GuestAddress(MPTABLE_START).unchecked_add(MPF_SIZE as u64);
    let mpf = build_floating_pointer(u32_addr(table_addr.raw_value()));
    let table = build_config_table(num_cpus);
    debug_assert_eq!(mpf.len() + table.len(), size);
    if MPTABLE_START + size as u64 > EBDA_END {
        tracing::debug!(size, "mp table extends past the EBDA into the video hole");
    }
    mem.write_slice(&mpf, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)?;
    mem.write_slice(&table, table_addr)
        .map_err(MptableError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::guest_mem;

    fn read(mem: &vm_memory::GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the table Linux-style and returns (processor entries, entry types in order).
    fn check_table(num_cpus: u8) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mem = guest_mem(32 << 20);
        setup_mptable(&mem, num_cpus).unwrap();
        let mpf = read(&mem, MPTABLE_START, MPF_SIZE);
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        assert_eq!(mpf[8], 1);
        assert_eq!(mpf[9], 4);
        let physptr = u64::from(u32::from_le_bytes(mpf[4..8].try_into().unwrap()));
        let header = read(&mem, physptr, MPC_HEADER_SIZE);
        assert_eq!(&header[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        let table = read(&mem, physptr, len);
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let count = usize::from(u16::from_le_bytes([table[34], table[35]]));
        let mut cpus = Vec::new();
        let mut types = Vec::new();
        let mut off = MPC_HEADER_SIZE;
        for _ in 0..count {
            let kind = table[off];
            let size = if kind == MP_PROCESSOR { 20 } else { 8 };
            if kind == MP_PROCESSOR {
                cpus.push(table[off..off + size].to_vec());
            }
            types.push(kind);
            off += size;
        }
        assert_eq!(off, len, "entry count matches the table length");
        assert_eq!(
            physptr + len as u64,
            MPTABLE_START + mptable_size(num_cpus) as u64
        );
        (cpus, types)
    }

    #[test]
    fn processor_entries_and_checksums_for_various_cpu_counts() {
        for n in [1u8, 2, 4, 254] {
            let (cpus, types) = check_table(n);
            assert_eq!(cpus.len(), usize::from(n));
            for (i, cpu) in cpus.iter().enumerate() {
                assert_eq!(usize::from(cpu[1]), i, "apic id");
                let bsp = cpu[3] & CPU_BOOTPROCESSOR != 0;
                assert_eq!(bsp, i == 0);
                assert!(cpu[3] & CPU_ENABLED != 0);
            }
            assert_eq!(types.iter().filter(|t| **t == MP_INTSRC).count(), 24);
            assert_eq!(types.iter().filter(|t| **t == MP_LINTSRC).count(), 2);
            assert_eq!(types.iter().filter(|t| **t == MP_IOAPIC).count(), 1);
            assert_eq!(types.iter().filter(|t| **t == MP_BUS).count(), 1);
        }
    }

    #[test]
    fn ioapic_entry_follows_the_cpus() {
        let table = build_config_table(4);
        let off = MPC_HEADER_SIZE + 4 * MPC_CPU_SIZE + MPC_ENTRY_SIZE;
        assert_eq!(table[off], MP_IOAPIC);
        assert_eq!(table[off + 1], 4);
        assert_eq!(
            u32::from_le_bytes(table[off + 4..off + 8].try_into().unwrap()),
            0xfec0_0000
        );
        // IRQ n -> pin n on that IOAPIC.
        let irq5 = off + MPC_ENTRY_SIZE * 6;
        assert_eq!(
            &table[irq5..irq5 + 8],
            &[MP_INTSRC, MP_INT, 0, 0, 0, 5, 4, 5]
        );
    }

    #[test]
    fn bad_cpu_counts_are_rejected() {
        let mem = guest_mem(32 << 20);
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
    }
}
