//! Model-specific registers set on every vCPU at boot.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Errors while setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The list does not fit in one KVM_SET_MSRS call.
    #[error("cannot build a list of {0} msrs")]
    TooMany(usize),
    /// KVM_SET_MSRS failed.
    #[error("cannot set the msrs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it refused.
    #[error("kvm set only {set} of {total} msrs, refusing msr {index:#x}")]
    Partial {
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        total: usize,
        /// The first MSR KVM refused.
        index: u32,
    },
}

// MSR indices (Intel SDM vol. 4, table 2-2).
/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR: SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR: compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK: SYSCALL RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-strings enable.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
const MTRR_MEM_TYPE_WB: u64 = 0x6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs to set on every vCPU at boot: the SYSENTER and SYSCALL MSRs, KERNEL_GS_BASE and
/// the TSC cleared, IA32_MISC_ENABLE with fast strings, and MTRRs enabled with write-back as
/// the default memory type.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The boot MSRs with `extra` merged in: an `extra` entry replaces the boot entry with the
/// same index, others are appended in order.
pub fn merged_msr_entries(extra: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let mut entries = boot_msr_entries();
    for e in extra {
        match entries.iter_mut().find(|b| b.index == e.index) {
            Some(existing) => existing.data = e.data,
            None => entries.push(*e),
        }
    }
    entries
}

/// Sets the boot MSRs ([`boot_msr_entries`]) plus `extra` (which wins on the same index) on
/// `vcpu`. Errors if KVM sets fewer MSRs than asked, naming the first one it refused.
pub fn setup_msrs(vcpu: &VcpuFd, extra: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let entries = merged_msr_entries(extra);
    let msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::TooMany(entries.len()))?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::SetMsrs)?;
    if set < entries.len() {
        return Err(MsrError::Partial {
            set,
            total: entries.len(),
            index: entries[set].index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::kvm_or_skip;

    #[test]
    fn boot_msrs_have_fast_strings_and_write_back_mtrr() {
        let entries = boot_msr_entries();
        let get = |i| entries.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE) & 1, 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_IA32_TSC), 0);
        assert_eq!(get(MSR_LSTAR), 0);
        assert_eq!(entries.len(), 11);
    }

    #[test]
    fn extra_msrs_override_and_append() {
        let extra = [entry(MSR_IA32_TSC, 5), entry(0x10a, 7)];
        let merged = merged_msr_entries(&extra);
        assert_eq!(merged.len(), 12);
        assert_eq!(
            merged
                .iter()
                .find(|e| e.index == MSR_IA32_TSC)
                .unwrap()
                .data,
            5
        );
        assert_eq!(merged.last().unwrap().index, 0x10a);
    }

    #[test]
    fn kvm_accepts_the_boot_msrs() {
        let Some(kvm) = kvm_or_skip("kvm_accepts_the_boot_msrs") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_msrs(&vcpu, &[]).unwrap();
        let mut msrs =
            Msrs::from_entries(&[entry(MSR_IA32_MISC_ENABLE, 0), entry(MSR_MTRR_DEF_TYPE, 0)])
                .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 2);
        let got = msrs.as_slice();
        assert_eq!(got[0].data & MSR_IA32_MISC_ENABLE_FAST_STRING, 1);
        assert_eq!(got[1].data, MTRR_ENABLE | MTRR_MEM_TYPE_WB);
    }

    #[test]
    fn kvm_refusal_names_the_msr() {
        let Some(kvm) = kvm_or_skip("kvm_refusal_names_the_msr") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // 0x12345678 is not an MSR anywhere.
        let err = setup_msrs(&vcpu, &[entry(0x1234_5678, 1)]).unwrap_err();
        assert!(
            matches!(
                err,
                MsrError::Partial {
                    index: 0x1234_5678,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
