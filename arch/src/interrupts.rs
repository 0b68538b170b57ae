//! Local APIC setup of a vCPU.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Errors while configuring the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// KVM_GET_LAPIC failed (is the in-kernel irqchip created?).
    #[error("cannot get the local apic state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("cannot set the local apic state")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Offset of the LVT LINT0 register in the local APIC page (Intel SDM vol. 3A, table 11-1).
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode field of an LVT entry, bits 10:8.
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
/// Delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Reads the 32-bit local APIC register at `offset`.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&klapic.regs[offset..offset + 4]) {
        *b = r.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit local APIC register at `offset`.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (r, b) in klapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *r = std::os::raw::c_char::from_ne_bytes([b]);
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !APIC_DELIVERY_MODE_MASK) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `klapic`, as the MP table and MADT describe.
pub fn configure_lint(klapic: &mut kvm_lapic_state) {
    let lvt0 = get_klapic_reg(klapic, APIC_LVT0);
    set_klapic_reg(klapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_klapic_reg(klapic, APIC_LVT1);
    set_klapic_reg(klapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Sets the vCPU's LAPIC LVT LINT0 to ExtINT and LINT1 to NMI. Needs the in-kernel irqchip
/// (KVM_CREATE_IRQCHIP) to exist already.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptError> {
    let mut klapic = vcpu.get_lapic().map_err(InterruptError::GetLapic)?;
    configure_lint(&mut klapic);
    vcpu.set_lapic(&klapic).map_err(InterruptError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::kvm_or_skip;

    #[test]
    fn lapic_register_round_trip() {
        let mut klapic = kvm_lapic_state::default();
        set_klapic_reg(&mut klapic, APIC_LVT0, 0xdead_beef);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT0), 0xdead_beef);
        assert_eq!(klapic.regs[APIC_LVT0] as u8, 0xef);
    }

    #[test]
    fn lint_delivery_modes_keep_the_other_bits() {
        let mut klapic = kvm_lapic_state::default();
        // Reset state: masked (bit 16), fixed delivery.
        set_klapic_reg(&mut klapic, APIC_LVT0, 0x1_0000);
        set_klapic_reg(&mut klapic, APIC_LVT1, 0x1_0000);
        configure_lint(&mut klapic);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT0), 0x1_0700);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT1), 0x1_0400);
    }

    #[test]
    fn kvm_lapic_gets_lint_modes() {
        let Some(kvm) = kvm_or_skip("kvm_lapic_gets_lint_modes") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        set_lint(&vcpu).unwrap();
        let klapic = vcpu.get_lapic().unwrap();
        assert_eq!(
            (get_klapic_reg(&klapic, APIC_LVT0) >> 8) & 0x7,
            APIC_MODE_EXTINT
        );
        assert_eq!(
            (get_klapic_reg(&klapic, APIC_LVT1) >> 8) & 0x7,
            APIC_MODE_NMI
        );
    }
}
