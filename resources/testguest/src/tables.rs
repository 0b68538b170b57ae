//! MP table (Intel MultiProcessor Specification 1.4) and ACPI (RSDP, XSDT, MADT) checks.

use crate::phys;

/// Sums `len` bytes at `addr` modulo 256 (a valid table sums to 0).
pub fn checksum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |acc, i| acc.wrapping_add(phys::read_u8(addr + i)))
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &b)| phys::read_u8(addr + i as u64) == b)
}

/// Largest table we are willing to checksum.
const MAX_TABLE_LEN: u64 = 1 << 20;

/// Processors listed in the MP configuration table.
#[derive(Debug, Clone, Copy)]
pub struct MpInfo {
    /// Enabled processor entries.
    pub cpus: u32,
}

// MP floating pointer structure ("_MP_", MP spec 4.1) and configuration table ("PCMP", 4.2).
const MPF_PHYSPTR: u64 = 4;
const MPF_LENGTH: u64 = 8;
const MPC_BASE_LEN: u64 = 4;
const MPC_ENTRY_COUNT: u64 = 0x22;
const MPC_HEADER_LEN: u64 = 0x2c;
const MP_ENTRY_PROCESSOR: u8 = 0;
const MP_PROCESSOR_LEN: u64 = 20;
const MP_OTHER_LEN: u64 = 8;
const MP_CPU_ENABLED: u8 = 1;
const MP_CPU_BSP: u8 = 2;

/// Finds the MP floating pointer: first KiB of the EBDA, last KiB of base memory, BIOS ROM.
fn find_mp_floating() -> Option<u64> {
    let ebda = u64::from(phys::read_u16(0x40e)) << 4;
    let areas = [(ebda, 1024), (0x9fc00, 1024), (0xf0000, 0x10000)];
    areas
        .iter()
        .filter(|(start, _)| *start != 0)
        .find_map(|&(start, len)| {
            (start..start + len)
                .step_by(16)
                .find(|&a| sig_at(a, b"_MP_") && checksum(a, 16) == 0)
        })
}

/// Validates the MP floating pointer and configuration table and counts processors.
pub fn check_mp() -> Result<MpInfo, &'static str> {
    let mpf = find_mp_floating().ok_or("no MP floating pointer")?;
    let len = u64::from(phys::read_u8(mpf + MPF_LENGTH)) * 16;
    if len == 0 || checksum(mpf, len) != 0 {
        return Err("MP floating pointer checksum");
    }
    let mpc = u64::from(phys::read_u32(mpf + MPF_PHYSPTR));
    if mpc == 0 || !sig_at(mpc, b"PCMP") {
        return Err("MP config table signature");
    }
    let base_len = u64::from(phys::read_u16(mpc + MPC_BASE_LEN));
    if base_len < MPC_HEADER_LEN || checksum(mpc, base_len) != 0 {
        return Err("MP config table checksum");
    }
    let count = phys::read_u16(mpc + MPC_ENTRY_COUNT);
    let end = mpc + base_len;
    let mut at = mpc + MPC_HEADER_LEN;
    let (mut cpus, mut bsps) = (0u32, 0u32);
    for _ in 0..count {
        if at >= end {
            return Err("MP config entries overrun the table");
        }
        let kind = phys::read_u8(at);
        if kind == MP_ENTRY_PROCESSOR {
            let flags = phys::read_u8(at + 3);
            if flags & MP_CPU_ENABLED != 0 {
                cpus += 1;
            }
            if flags & MP_CPU_BSP != 0 {
                bsps += 1;
            }
            at += MP_PROCESSOR_LEN;
        } else if kind <= 4 {
            at += MP_OTHER_LEN;
        } else {
            return Err("MP config entry of unknown type");
        }
    }
    if cpus == 0 {
        return Err("MP table lists no processor");
    }
    if bsps != 1 {
        return Err("MP table does not have exactly one BSP");
    }
    Ok(MpInfo { cpus })
}

/// What the ACPI tables told us.
#[derive(Debug, Clone, Copy)]
pub struct AcpiInfo {
    /// Enabled local APIC (and x2APIC) entries in the MADT.
    pub lapics: u32,
}

// RSDP (ACPI 6.5 5.2.5) and the common table header (5.2.6).
const RSDP_V1_LEN: u64 = 20;
const RSDP_REVISION: u64 = 15;
const RSDP_LENGTH: u64 = 20;
const RSDP_XSDT: u64 = 24;
const SDT_LENGTH: u64 = 4;
const SDT_HEADER_LEN: u64 = 36;
const MADT_ENTRIES: u64 = 44;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;

fn find_rsdp() -> Option<u64> {
    let ebda = u64::from(phys::read_u16(0x40e)) << 4;
    let areas = [(ebda, 1024), (0xe0000, 0x20000)];
    areas
        .iter()
        .filter(|(start, _)| *start != 0)
        .find_map(|&(start, len)| {
            (start..start + len)
                .step_by(16)
                .find(|&a| sig_at(a, b"RSD PTR "))
        })
}

fn table_len(addr: u64) -> Result<u64, &'static str> {
    if addr == 0 || addr >= phys::STATIC_MAP_END - SDT_HEADER_LEN {
        return Err("ACPI table address out of range");
    }
    let len = u64::from(phys::read_u32(addr + SDT_LENGTH));
    if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err("ACPI table length");
    }
    Ok(len)
}

/// Validates RSDP, XSDT, every table it points at, and counts MADT local APICs.
pub fn check_acpi(hint: Option<u64>) -> Result<AcpiInfo, &'static str> {
    let rsdp = hint.or_else(find_rsdp).ok_or("no ACPI RSDP")?;
    if rsdp >= phys::STATIC_MAP_END - 36 || !sig_at(rsdp, b"RSD PTR ") {
        return Err("ACPI RSDP signature");
    }
    if checksum(rsdp, RSDP_V1_LEN) != 0 {
        return Err("ACPI RSDP checksum");
    }
    if phys::read_u8(rsdp + RSDP_REVISION) < 2 {
        return Err("ACPI RSDP revision below 2 (no XSDT)");
    }
    let rsdp_len = u64::from(phys::read_u32(rsdp + RSDP_LENGTH));
    if !(36..=4096).contains(&rsdp_len) || checksum(rsdp, rsdp_len) != 0 {
        return Err("ACPI RSDP extended checksum");
    }
    let xsdt = phys::read_u64(rsdp + RSDP_XSDT);
    let xsdt_len = table_len(xsdt)?;
    if !sig_at(xsdt, b"XSDT") {
        return Err("ACPI XSDT signature");
    }
    if checksum(xsdt, xsdt_len) != 0 {
        return Err("ACPI XSDT checksum");
    }
    let mut lapics = None;
    for i in 0..(xsdt_len - SDT_HEADER_LEN) / 8 {
        let table = phys::read_u64(xsdt + SDT_HEADER_LEN + i * 8);
        let len = table_len(table)?;
        if checksum(table, len) != 0 {
            return Err("ACPI table checksum");
        }
        if sig_at(table, b"APIC") {
            lapics = Some(count_madt_lapics(table, len)?);
        }
    }
    let lapics = lapics.ok_or("ACPI has no MADT")?;
    Ok(AcpiInfo { lapics })
}

fn count_madt_lapics(madt: u64, len: u64) -> Result<u32, &'static str> {
    let mut at = madt + MADT_ENTRIES;
    let end = madt + len;
    let mut n = 0;
    while at + 2 <= end {
        let kind = phys::read_u8(at);
        let elen = u64::from(phys::read_u8(at + 1));
        if elen < 2 || at + elen > end {
            return Err("MADT entry length");
        }
        let enabled = match kind {
            MADT_LOCAL_APIC if elen >= 8 => phys::read_u32(at + 4) & 1 != 0,
            MADT_LOCAL_X2APIC if elen >= 16 => phys::read_u32(at + 8) & 1 != 0,
            _ => false,
        };
        if enabled {
            n += 1;
        }
        at += elen;
    }
    Ok(n)
}

/// Where an ISA IRQ arrives, according to the firmware tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqRoute {
    /// The IOAPIC's APIC ID.
    pub ioapic_id: u8,
    /// The IOAPIC's MMIO base.
    pub ioapic_addr: u64,
    /// The IOAPIC input pin.
    pub pin: u32,
}

// MADT entries (ACPI 6.5 5.2.12): IO APIC (type 1) and interrupt source override (type 2).
const MADT_IOAPIC: u8 = 1;
const MADT_ISO: u8 = 2;
// MP table entries (MP spec 4.3): IO APIC (type 2) and I/O interrupt assignment (type 3).
const MP_ENTRY_IOAPIC: u8 = 2;
const MP_ENTRY_INTSRC: u8 = 3;
const MP_INT_VECTORED: u8 = 0;

/// The MADT and its length, through the RSDP and XSDT (checked by [`check_acpi`]).
fn find_madt(hint: Option<u64>) -> Option<(u64, u64)> {
    let rsdp = hint.or_else(find_rsdp)?;
    if rsdp >= phys::STATIC_MAP_END - 36 || !sig_at(rsdp, b"RSD PTR ") {
        return None;
    }
    let xsdt = phys::read_u64(rsdp + RSDP_XSDT);
    let xsdt_len = table_len(xsdt).ok()?;
    (0..(xsdt_len - SDT_HEADER_LEN) / 8).find_map(|i| {
        let table = phys::read_u64(xsdt + SDT_HEADER_LEN + i * 8);
        let len = table_len(table).ok()?;
        sig_at(table, b"APIC").then_some((table, len))
    })
}

/// The route of ISA `irq` from the MADT: its GSI (after any source override) and the IOAPIC
/// whose GSI range holds it.
pub fn madt_route(hint: Option<u64>, irq: u8) -> Result<IrqRoute, &'static str> {
    let (madt, len) = find_madt(hint).ok_or("no MADT")?;
    let end = madt + len;
    let mut gsi = u32::from(irq);
    let mut at = madt + MADT_ENTRIES;
    while at + 2 <= end {
        let (kind, elen) = (phys::read_u8(at), u64::from(phys::read_u8(at + 1)));
        if elen < 2 || at + elen > end {
            return Err("MADT entry length");
        }
        if kind == MADT_ISO && elen >= 10 && phys::read_u8(at + 3) == irq {
            gsi = phys::read_u32(at + 4);
        }
        at += elen;
    }
    // The IOAPIC with the highest GSI base not above `gsi`.
    let mut best: Option<(u32, IrqRoute)> = None;
    at = madt + MADT_ENTRIES;
    while at + 2 <= end {
        let (kind, elen) = (phys::read_u8(at), u64::from(phys::read_u8(at + 1)));
        if kind == MADT_IOAPIC && elen >= 12 {
            let base = phys::read_u32(at + 8);
            if base <= gsi && !matches!(best, Some((b, _)) if b >= base) {
                let route = IrqRoute {
                    ioapic_id: phys::read_u8(at + 2),
                    ioapic_addr: u64::from(phys::read_u32(at + 4)),
                    pin: gsi - base,
                };
                best = Some((base, route));
            }
        }
        at += elen;
    }
    best.map(|(_, r)| r).ok_or("MADT has no IOAPIC for the IRQ")
}

/// The route of ISA `irq` from the MP table's I/O interrupt assignment entries.
pub fn mp_route(irq: u8) -> Result<IrqRoute, &'static str> {
    let mpf = find_mp_floating().ok_or("no MP floating pointer")?;
    let mpc = u64::from(phys::read_u32(mpf + MPF_PHYSPTR));
    if mpc == 0 || !sig_at(mpc, b"PCMP") {
        return Err("MP config table signature");
    }
    let end = mpc + u64::from(phys::read_u16(mpc + MPC_BASE_LEN));
    let count = phys::read_u16(mpc + MPC_ENTRY_COUNT);
    let mut at = mpc + MPC_HEADER_LEN;
    let mut ioapics = [(0u8, 0u64); 8];
    let mut n_ioapics = 0;
    let mut assignment = None;
    for _ in 0..count {
        if at >= end {
            return Err("MP config entries overrun the table");
        }
        match phys::read_u8(at) {
            MP_ENTRY_PROCESSOR => at += MP_PROCESSOR_LEN,
            MP_ENTRY_IOAPIC => {
                if let Some(slot) = ioapics.get_mut(n_ioapics) {
                    *slot = (phys::read_u8(at + 1), u64::from(phys::read_u32(at + 4)));
                    n_ioapics += 1;
                }
                at += MP_OTHER_LEN;
            }
            MP_ENTRY_INTSRC => {
                let vectored = phys::read_u8(at + 1) == MP_INT_VECTORED;
                if vectored && phys::read_u8(at + 5) == irq && assignment.is_none() {
                    assignment = Some((phys::read_u8(at + 6), u32::from(phys::read_u8(at + 7))));
                }
                at += MP_OTHER_LEN;
            }
            1 | 4 => at += MP_OTHER_LEN,
            _ => return Err("MP config entry of unknown type"),
        }
    }
    let (id, pin) = assignment.ok_or("MP table does not assign the IRQ")?;
    let (_, addr) = ioapics[..n_ioapics]
        .iter()
        .find(|(i, _)| *i == id)
        .ok_or("MP table assigns the IRQ to an unknown IOAPIC")?;
    Ok(IrqRoute {
        ioapic_id: id,
        ioapic_addr: *addr,
        pin,
    })
}
