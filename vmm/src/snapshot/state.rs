//! The saved state of a microVM: per vCPU the registers and everything KVM keeps for it, per
//! VM the irqchip, PIT and clock, the devices' own state structs, and the machine they ran on.
//! The same types serve snapshots and live migration.

use devices::legacy::{CmosState, I8042State, SerialSnapshot};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors of saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("KVM cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A FAM structure (CPUID, MSRs) cannot be built.
    #[error("cannot build the {0} list")]
    Fam(&'static str),
    /// KVM took fewer MSRs than given.
    #[error("KVM restored {set} of {total} MSRs")]
    Msrs {
        /// How many KVM set.
        set: usize,
        /// How many there were.
        total: usize,
    },
}

/// IA32_TSC_DEADLINE (Intel SDM Vol. 4, 2.1).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM saves and could read (TSC and kvmclock MSRs included).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads the state of the (stopped) vCPU `fd`; `msr_list` is what KVM saves.
    ///
    /// Two reads change what the others return, so they come first (as in QEMU):
    /// `KVM_GET_VCPU_EVENTS` delivers a pending exception's payload (CR2 of a page fault,
    /// DR6 of a debug exception) into the registers, since this VMM does not enable
    /// `KVM_CAP_EXCEPTION_PAYLOAD`; and `KVM_GET_MP_STATE` accepts a pending INIT or SIPI,
    /// which can reset the vCPU's registers and LAPIC. Read after them, the registers agree
    /// with the events; read before, a page fault in flight would be restored with the CR2
    /// of an earlier one.
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, StateError> {
        let kvm = |what| move |e| StateError::Kvm(what, e);
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("read vCPU events"))?;
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        let regs = fd.get_regs().map_err(kvm("read registers"))?;
        let xsave = fd.get_xsave().map_err(kvm("read XSAVE state"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("read XCRs"))?;
        let sregs = fd.get_sregs().map_err(kvm("read special registers"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read CPUID"))?
            .as_slice()
            .to_vec();
        // Read one at a time: KVM stops at the first MSR it cannot read.
        let mut msrs = Vec::with_capacity(msr_list.len());
        for &index in msr_list {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|_| StateError::Fam("MSR"))?;
            if fd.get_msrs(&mut one).map_err(kvm("read MSRs"))? == 1 {
                msrs.push(one.as_slice()[0]);
            }
        }
        Ok(Self {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            lapic: fd.get_lapic().map_err(kvm("read the LAPIC"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("read debug registers"))?,
            mp_state,
            vcpu_events,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Writes the state into a new vCPU, in the order KVM needs (CPUID before MSRs, LAPIC
    /// before the MP state and events).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let kvm = |what| move |e| StateError::Kvm(what, e);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::Fam("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // Best effort: hosts without TSC scaling keep their own frequency.
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::warn!("cannot set the guest TSC to {khz} kHz: {e}");
                }
            }
        }
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::Fam("MSR"))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if set != self.msrs.len() {
            return Err(StateError::Msrs {
                set,
                total: self.msrs.len(),
            });
        }
        fd.set_regs(&self.regs).map_err(kvm("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set special registers"))?;
        // SAFETY: the buffer is a kvm_xsave read from KVM with the same layout; KVM validates it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set the LAPIC"))?;
        // KVM ignores IA32_TSC_DEADLINE unless the LAPIC timer is in TSC-deadline mode, which
        // the LAPIC state just set: write it again now.
        let deadline: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|m| m.index == MSR_IA32_TSC_DEADLINE)
            .copied()
            .collect();
        if !deadline.is_empty() {
            let msrs = Msrs::from_entries(&deadline).map_err(|_| StateError::Fam("MSR"))?;
            fd.set_msrs(&msrs).map_err(kvm("set the TSC deadline"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }
}

/// What KVM keeps for the whole VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The primary 8259.
    pub pic_master: kvm_irqchip,
    /// The secondary 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the VM's irqchip, PIT and clock.
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let chip = |id| -> Result<kvm_irqchip, StateError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(|e| StateError::Kvm("read the irqchip", e))?;
            Ok(c)
        };
        let mut clock = vm
            .get_clock()
            .map_err(|e| StateError::Kvm("read the clock", e))?;
        // Only the clock value is restored, not the host-side flags.
        clock.flags = 0;
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .get_pit2()
                .map_err(|e| StateError::Kvm("read the PIT", e))?,
            clock,
        })
    }

    /// Writes the state into a new VM (its irqchip and PIT created).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(|e| StateError::Kvm("set the irqchip", e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| StateError::Kvm("set the PIT", e))?;
        vm.set_clock(&self.clock)
            .map_err(|e| StateError::Kvm("set the clock", e))?;
        Ok(())
    }
}

/// The legacy devices' state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042.
    pub i8042: I8042State,
    /// The CMOS.
    pub cmos: CmosState,
}

/// One guest memory region and where it is in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// The host CPU a snapshot was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// CPUID vendor string.
    pub vendor: String,
    /// CPUID brand string.
    pub brand: String,
}

/// A whole microVM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// anvil's version when it was saved.
    pub vmm_version: String,
    /// The host CPU.
    pub cpu_model: CpuModel,
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// The memory file's layout.
    pub memory: Vec<MemoryRegionState>,
    /// The VM.
    pub vm: VmState,
    /// The vCPUs, by index.
    pub vcpus: Vec<VcpuState>,
    /// The legacy devices.
    pub legacy: LegacyState,
    /// The virtio-mmio transports and their queues, in bus order.
    pub virtio: Vec<devices::virtio::mmio::MmioTransportState>,
    /// The resources the VM was configured with (Firecracker's format), for `GET /vm/config`
    /// and to reopen disks and taps.
    pub config_json: String,
}

/// The host's CPU vendor and brand strings.
pub fn host_cpu_model() -> CpuModel {
    let leaf = |l: u32| core::arch::x86_64::__cpuid_count(l, 0);
    let words = |r: [u32; 4]| -> String {
        r.iter()
            .flat_map(|w| w.to_le_bytes())
            .map(char::from)
            .collect()
    };
    let v = leaf(0);
    let vendor = words([v.ebx, v.edx, v.ecx, 0])
        .trim_end_matches('\0')
        .to_string();
    let mut brand = String::new();
    if leaf(0x8000_0000).eax >= 0x8000_0004 {
        for l in 0x8000_0002..=0x8000_0004 {
            let r = leaf(l);
            brand.push_str(&words([r.eax, r.ebx, r.ecx, r.edx]));
        }
    }
    CpuModel {
        vendor,
        brand: brand.trim_matches(['\0', ' ']).to_string(),
    }
}

/// The feature leaves compared when a snapshot is loaded: (leaf, subleaf, register name).
const FEATURE_REGISTERS: [(u32, u32, &str); 7] = [
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

fn register(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Checks that this host offers every feature bit the guest was given; names the first
/// missing one. A bit counts as offered when KVM reports it as supported or the host CPU has
/// it: KVM also offers features it emulates (x2APIC, TSC deadline), and some KVM
/// implementations (PVM) give guests the host's own CPUID whatever they report as supported.
pub fn check_cpu_features(kvm: &Kvm, vcpu: &VcpuState) -> Result<(), String> {
    let host = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM cannot report its CPUID: {e}"))?;
    for (leaf, sub, reg) in FEATURE_REGISTERS {
        let find = |entries: &[kvm_cpuid_entry2]| {
            entries
                .iter()
                // Only leaf 7 is indexed among these; KVM leaves `index` of the others as is.
                .find(|e| e.function == leaf && (leaf != 7 || e.index == sub))
                .map(|e| register(e, reg))
        };
        let Some(guest) = find(&vcpu.cpuid) else {
            continue;
        };
        let native = core::arch::x86_64::__cpuid_count(leaf, sub);
        let native = register(
            &kvm_cpuid_entry2 {
                eax: native.eax,
                ebx: native.ebx,
                ecx: native.ecx,
                edx: native.edx,
                ..Default::default()
            },
            reg,
        );
        let have = find(host.as_slice()).unwrap_or(0) | native;
        // Bits KVM itself manages per vCPU (OSXSAVE, APIC ID-related, hypervisor) vary.
        let ignore = if (leaf, reg) == (1, "ecx") {
            (1 << 27) | (1 << 31) | (1 << 24)
        } else if (leaf, reg) == (1, "edx") {
            1 << 9
        } else {
            0
        };
        let missing = guest & !have & !ignore;
        if missing != 0 {
            return Err(format!(
                "this host lacks CPU features the guest was given: CPUID leaf {leaf:#x} \
                 subleaf {sub} {reg} bits {missing:#x}"
            ));
        }
    }
    Ok(())
}

/// What KVM saves for vCPUs: its MSR index list.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(|e| StateError::Kvm("list the MSRs to save", e))?
        .as_slice()
        .to_vec())
}
