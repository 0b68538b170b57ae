//! Register state of the boot vCPU: general purpose registers, segments and control
//! registers (with the boot GDT, IDT and identity page tables they point at) and the FPU.
//!
//! Only the boot vCPU is set up this way. Application processors keep their reset state and
//! are started by the guest through INIT/SIPI, which KVM's in-kernel local APIC handles.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot::BootProtocol;
use crate::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// KVM_SET_REGS failed.
    #[error("cannot set the general purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("cannot get the special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("cannot set the special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("cannot set the fpu registers")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the boot {what} to guest memory")]
    WriteMemory {
        /// GDT, IDT or page tables.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// RFLAGS with only the always-one bit 1 set (interrupts disabled).
const RFLAGS_RESERVED: u64 = 0x2;

// Control register bits (Intel SDM vol. 3A, 2.5).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
// EFER bits (Intel SDM vol. 3A, 2.2.1).
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page table entry bits (Intel SDM vol. 3A, 4.5).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Size of the pages the boot page directory maps.
const HUGE_PAGE_SIZE: u64 = 2 << 20;
const ENTRIES_PER_TABLE: u64 = 512;

/// GDT access/flags words (flags nibble in bits 15:12, access byte in bits 7:0).
/// 64-bit code: G, L, present, code execute/read, accessed.
const GDT_CODE64: u16 = 0xa09b;
/// 32-bit code: G, D, present, code execute/read, accessed.
const GDT_CODE32: u16 = 0xc09b;
/// Flat data: G, B, present, data read/write, accessed.
const GDT_DATA: u16 = 0xc093;
/// 64-bit boot TSS: G, present, busy 64-bit TSS.
const GDT_TSS64: u16 = 0x808b;
/// 32-bit boot TSS: present, busy 32-bit TSS (byte granular, see [`TSS32_LIMIT`]).
const GDT_TSS32: u16 = 0x008b;
/// Limit of a minimal 32-bit TSS (104 bytes).
const TSS32_LIMIT: u32 = 0x67;
/// Limit of the boot GDT: [`BOOT_GDT_MAX`] 8-byte descriptors.
#[allow(clippy::cast_possible_truncation)] // 4 * 8 - 1
const GDT_LIMIT: u16 = (BOOT_GDT_MAX * 8 - 1) as u16;
/// Limit of the boot IDT: one 8-byte zero descriptor.
const IDT_LIMIT: u16 = 7;
/// A flat 4 GiB limit in 4 KiB units.
const FLAT_LIMIT: u32 = 0xfffff;

/// Encodes a GDT descriptor from its flags/access word, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn bits(entry: u64, shift: u32, mask: u64) -> u8 {
    // Callers pass masks of at most 8 bits.
    u8::try_from((entry >> shift) & mask).expect("mask is at most 8 bits")
}

/// Decodes GDT descriptor `entry`, at GDT index `index`, into the KVM segment register
/// state a selector loading it would produce.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = bits(entry, 55, 1);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        limit: u32::try_from(limit).expect("a 20-bit limit scaled by 4 KiB fits in 32 bits"),
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 0xf),
        present,
        dpl: bits(entry, 45, 0x3),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g,
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT for `protocol`: null, code, data, TSS.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_MAX] {
    match protocol {
        BootProtocol::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(GDT_CODE64, 0, FLAT_LIMIT),
            gdt_entry(GDT_DATA, 0, FLAT_LIMIT),
            gdt_entry(GDT_TSS64, 0, FLAT_LIMIT),
        ],
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(GDT_CODE32, 0, FLAT_LIMIT),
            gdt_entry(GDT_DATA, 0, FLAT_LIMIT),
            gdt_entry(GDT_TSS32, 0, TSS32_LIMIT),
        ],
    }
}

fn write_u64<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    value: u64,
    addr: u64,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, source })
}

/// Writes identity page tables mapping the first 1 GiB with 2 MiB pages: one PML4 entry, one
/// PDPT entry and a full page directory.
pub fn setup_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    let what = "page tables";
    let table_flags = PTE_PRESENT | PTE_WRITABLE;
    write_u64(mem, what, PDPTE_START | table_flags, PML4_START)?;
    write_u64(mem, what, PDE_START | table_flags, PDPTE_START)?;
    for i in 0..ENTRIES_PER_TABLE {
        let entry = (i * HUGE_PAGE_SIZE) | table_flags | PTE_PAGE_SIZE;
        write_u64(mem, what, entry, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Writes the boot GDT and the empty IDT and fills `sregs` for `protocol`: segments, control
/// registers and EFER. Used by [`setup_sregs`]; separate so it can be tested without KVM.
pub fn configure_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    for (i, entry) in (0u64..).zip(gdt.iter()) {
        write_u64(mem, "gdt", *entry, BOOT_GDT_START + i * 8)?;
    }
    // One zero descriptor: any exception before the kernel installs its IDT shuts down.
    write_u64(mem, "idt", 0, BOOT_IDT_START)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = IDT_LIMIT;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Leave the reset state's caching disabled/not-write-through bits behind: firmware would.
    sregs.cr0 &= !(X86_CR0_CD | X86_CR0_NW);
    match protocol {
        BootProtocol::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            // PVH ABI: 32-bit protected mode, paging off, CR4 clear.
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
    }
    Ok(())
}

/// Sets up the segment and control registers of the boot vCPU for `protocol`, writing the
/// boot GDT at [`BOOT_GDT_START`], an empty IDT at [`BOOT_IDT_START`] and, for
/// [`BootProtocol::Linux64`], identity page tables for the first 1 GiB at [`PML4_START`].
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_sregs(mem, &mut sregs, protocol)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// The general purpose registers of the boot vCPU for `protocol`, entering at `entry`.
pub fn boot_regs(entry: GuestAddress, protocol: BootProtocol) -> kvm_regs {
    match protocol {
        BootProtocol::Linux64 => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Sets the general purpose registers of the boot vCPU. Linux64: rip = entry,
/// rsp = rbp = [`BOOT_STACK_POINTER`], rsi = [`ZERO_PAGE_START`]. Pvh: rip = entry,
/// rbx = [`PVH_INFO_START`]. Both: rflags = 0x2.
pub fn setup_regs(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry, protocol))
        .map_err(RegsError::SetRegs)
}

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// The initialized FPU state: fcw 0x37f, mxcsr 0x1f80, everything else zero.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// Sets the FPU state of a vCPU to its initialized values ([`boot_fpu`]).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::test_utils::{guest_mem, kvm_or_skip};

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn gdt_entries_encode_like_linux_gdt_entry_init() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0xc09b, 0x1234_5678, 0xabcde),
            0x12ca_9b34_5678_bcde
        );
    }

    #[test]
    fn gdt_entries_decode_to_kvm_segments() {
        let code = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.type_, code.base), (0x8, 0xb, 0));
        assert_eq!((code.l, code.db, code.g, code.s), (1, 0, 1, 1));
        assert_eq!((code.present, code.dpl, code.unusable), (1, 0, 0));
        assert_eq!(code.limit, 0xffff_ffff);

        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.type_, data.l, data.db),
            (0x10, 0x3, 0, 1)
        );

        let tss = kvm_segment_from_gdt(gdt_entry(0x008b, 0x1000, 0x67), 3);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 0));
        assert_eq!((tss.base, tss.limit), (0x1000, 0x67));

        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = guest_mem(32 << 20);
        setup_page_tables(&mem).unwrap();
        assert_eq!(read_u64(&mem, PML4_START), PDPTE_START | 0x3);
        assert_eq!(read_u64(&mem, PDPTE_START), PDE_START | 0x3);
        assert_eq!(read_u64(&mem, PDPTE_START + 8), 0);
        for i in 0..512u64 {
            assert_eq!(read_u64(&mem, PDE_START + i * 8), (i << 21) | 0x83);
        }
    }

    #[test]
    fn linux64_sregs_enter_long_mode() {
        let mem = guest_mem(32 << 20);
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_sregs(&mem, &mut sregs, BootProtocol::Linux64).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        assert_eq!((sregs.ss.selector, sregs.ds.selector), (0x10, 0x10));
        assert_eq!(sregs.tr.selector, 0x18);
        for (i, want) in boot_gdt(BootProtocol::Linux64).iter().enumerate() {
            assert_eq!(read_u64(&mem, BOOT_GDT_START + 8 * i as u64), *want);
        }
        assert_eq!(read_u64(&mem, BOOT_GDT_START + 8), 0x00af_9b00_0000_ffff);
        assert_eq!(read_u64(&mem, BOOT_IDT_START), 0);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let mem = guest_mem(32 << 20);
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            efer: EFER_LME | EFER_LMA,
            cr4: X86_CR4_PAE,
            ..Default::default()
        };
        configure_sregs(&mem, &mut sregs, BootProtocol::Pvh).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!((sregs.ds.type_, sregs.ds.db), (0x3, 1));
        assert_eq!((sregs.tr.type_, sregs.tr.limit), (0xb, 0x67));
        assert_eq!(read_u64(&mem, BOOT_GDT_START + 8), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn boot_regs_per_protocol() {
        let linux = boot_regs(GuestAddress(0x100_0000), BootProtocol::Linux64);
        assert_eq!((linux.rip, linux.rflags), (0x100_0000, 2));
        assert_eq!((linux.rsp, linux.rbp, linux.rsi), (0x8ff0, 0x8ff0, 0x7000));
        let pvh = boot_regs(GuestAddress(0x100_0200), BootProtocol::Pvh);
        assert_eq!(
            (pvh.rip, pvh.rbx, pvh.rflags, pvh.rsi),
            (0x100_0200, 0x6000, 2, 0)
        );
    }

    #[test]
    fn boot_fpu_values() {
        let fpu = boot_fpu();
        assert_eq!(
            (fpu.fcw, fpu.mxcsr, fpu.fsw, fpu.ftwx),
            (0x37f, 0x1f80, 0, 0)
        );
    }

    #[test]
    fn kvm_vcpu_accepts_and_returns_boot_state() {
        let Some(kvm) = kvm_or_skip("kvm_vcpu_accepts_and_returns_boot_state") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = guest_mem(32 << 20);
        for protocol in [BootProtocol::Linux64, BootProtocol::Pvh] {
            setup_regs(&vcpu, GuestAddress(0x100_0000), protocol).unwrap();
            setup_sregs(&mem, &vcpu, protocol).unwrap();
            setup_fpu(&vcpu).unwrap();

            let regs = vcpu.get_regs().unwrap();
            assert_eq!(regs.rip, 0x100_0000);
            assert_eq!(regs.rflags, 2);
            let sregs = vcpu.get_sregs().unwrap();
            assert_eq!(sregs.gdt.base, BOOT_GDT_START);
            assert_eq!(sregs.cs.selector, 0x8);
            match protocol {
                BootProtocol::Linux64 => {
                    assert_eq!((regs.rsi, regs.rsp), (ZERO_PAGE_START, BOOT_STACK_POINTER));
                    assert_eq!(sregs.cr3, PML4_START);
                    assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
                    assert_eq!(sregs.efer & EFER_LMA, EFER_LMA);
                    assert_eq!(sregs.cs.l, 1);
                }
                BootProtocol::Pvh => {
                    assert_eq!(regs.rbx, PVH_INFO_START);
                    assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
                    assert_eq!(sregs.efer & EFER_LMA, 0);
                    assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
                }
            }
            // Only fcw is compared: this host's KVM_GET_FPU (PVM) reports mxcsr 0 even for a
            // freshly created vCPU; boot_fpu_values checks the mxcsr we pass.
            assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
        }
    }
}
