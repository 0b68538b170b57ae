//! CPUID the vCPUs see: KVM's supported CPUID adjusted for this vCPU's identity and the VM's
//! topology.
//!
//! The topology is one package with `cpu_count` cores of one thread each; the APIC ID of a
//! vCPU is its index. Leaves the VMM does not emulate (thermal and power management, the
//! PMU) are hidden. KVM's paravirtual leaves (0x4000_0000 and up) are left exactly as KVM
//! reports them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors while filtering CPUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// No vCPUs.
    #[error("cpu count is zero")]
    NoCpus,
    /// The vCPU index is not below the vCPU count.
    #[error("vcpu id {vcpu_id} is not below the cpu count {cpu_count}")]
    VcpuIdOutOfRange {
        /// The vCPU index.
        vcpu_id: u8,
        /// The vCPU count.
        cpu_count: u8,
    },
    /// Leaf 0 (vendor and highest leaf) is missing.
    #[error("cpuid leaf 0x0 (vendor) is missing")]
    MissingVendorLeaf,
    /// The CPUID would not fit KVM's entry limit.
    #[error("cpuid has too many entries for kvm")]
    TooManyEntries,
}

/// CPU vendor as leaf 0 names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" or Hygon's AMD-compatible "HygonGenuine".
    Amd,
    /// Anything else: only vendor-neutral leaves are adjusted.
    Other,
}

const VENDOR_INTEL: &[u8; 12] = b"GenuineIntel";
const VENDOR_AMD: &[u8; 12] = b"AuthenticAMD";
const VENDOR_HYGON: &[u8; 12] = b"HygonGenuine";

// Leaves (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E).
const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_FIRST: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_LAST: u32 = 0x4fff_ffff;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_PROPERTIES: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

// Leaf 0x1.
const EBX_CLFLUSH_SIZE_SHIFT: u32 = 8;
/// CLFLUSH line size in 8-byte units: 64 bytes.
const CLFLUSH_LINE_SIZE: u32 = 8;
const EBX_CPU_COUNT_SHIFT: u32 = 16;
const EBX_APIC_ID_SHIFT: u32 = 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

// Leaves 0x4 and 0x8000_001D.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff << CACHE_SHARING_SHIFT;
const CACHE_CORES_SHIFT: u32 = 26;
const CACHE_CORES_MASK: u32 = 0x3f << CACHE_CORES_SHIFT;

// Leaf 0x6: the only bit kept, "APIC timer always running" (EAX bit 2).
const EAX_ARAT: u32 = 1 << 2;

// Leaves 0xB and 0x1F: level types in ECX[15:8].
const LEVEL_TYPE_SHIFT: u32 = 8;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

// Leaf 0x8000_0008 on AMD: ECX[7:0] cores - 1, ECX[15:12] APIC ID bits for the core.
const AMD_ECX_NC_MASK: u32 = 0xff;
const AMD_ECX_APIC_ID_SIZE_SHIFT: u32 = 12;
const AMD_ECX_APIC_ID_SIZE_MASK: u32 = 0xf << AMD_ECX_APIC_ID_SIZE_SHIFT;

/// The vendor leaf 0 of `cpuid` names.
pub fn cpu_vendor(cpuid: &CpuId) -> Result<CpuVendor, CpuidError> {
    let leaf0 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .ok_or(CpuidError::MissingVendorLeaf)?;
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    Ok(match &vendor {
        VENDOR_INTEL => CpuVendor::Intel,
        VENDOR_AMD | VENDOR_HYGON => CpuVendor::Amd,
        _ => CpuVendor::Other,
    })
}

/// Bits needed to hold APIC IDs 0..cpu_count (ceil(log2(cpu_count))).
fn apic_id_bits(cpu_count: u8) -> u32 {
    u8::BITS - (cpu_count.max(1) - 1).leading_zeros()
}

/// Topology of one vCPU in a package of `cpu_count` single-threaded cores.
#[derive(Clone, Copy)]
struct Topology {
    vcpu_id: u32,
    cpu_count: u32,
    vendor: CpuVendor,
}

impl Topology {
    fn leaf_features(&self, e: &mut kvm_cpuid_entry2) {
        e.ebx = (e.ebx & 0xff)
            | (CLFLUSH_LINE_SIZE << EBX_CLFLUSH_SIZE_SHIFT)
            | (self.cpu_count << EBX_CPU_COUNT_SHIFT)
            | (self.vcpu_id << EBX_APIC_ID_SHIFT);
        e.ecx |= ECX_HYPERVISOR;
        if self.cpu_count > 1 {
            e.edx |= EDX_HTT;
        } else {
            e.edx &= !EDX_HTT;
        }
    }

    /// Threads sharing a cache of `level` (one per core, everyone at L3) minus one.
    fn cache_sharing(&self, e: &kvm_cpuid_entry2) -> u32 {
        let level = (e.eax >> CACHE_LEVEL_SHIFT) & 0x7;
        if level >= 3 {
            self.cpu_count - 1
        } else {
            0
        }
    }

    fn leaf_cache_params(&self, e: &mut kvm_cpuid_entry2) {
        if e.eax & CACHE_TYPE_MASK == 0 {
            return;
        }
        let sharing = self.cache_sharing(e);
        let cores = (self.cpu_count - 1).min(0x3f);
        e.eax = (e.eax & !(CACHE_SHARING_MASK | CACHE_CORES_MASK))
            | (sharing << CACHE_SHARING_SHIFT)
            | (cores << CACHE_CORES_SHIFT);
    }

    fn leaf_amd_cache_properties(&self, e: &mut kvm_cpuid_entry2) {
        if e.eax & CACHE_TYPE_MASK == 0 {
            return;
        }
        let sharing = self.cache_sharing(e);
        e.eax = (e.eax & !CACHE_SHARING_MASK) | (sharing << CACHE_SHARING_SHIFT);
    }

    /// Subleaves 0 (SMT), 1 (core) and 2 (invalid, ends the enumeration) of leaf 0xB/0x1F.
    fn topology_entries(&self, leaf: u32, cpu_count: u8) -> [kvm_cpuid_entry2; 3] {
        let entry = |index: u32, shift: u32, count: u32, level_type: u32| kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (level_type << LEVEL_TYPE_SHIFT) | index,
            edx: self.vcpu_id,
            ..Default::default()
        };
        [
            entry(0, 0, 1, LEVEL_TYPE_SMT),
            entry(1, apic_id_bits(cpu_count), self.cpu_count, LEVEL_TYPE_CORE),
            entry(2, 0, 0, 0),
        ]
    }

    fn leaf_ext_address_sizes(&self, e: &mut kvm_cpuid_entry2, cpu_count: u8) {
        if self.vendor != CpuVendor::Amd {
            return;
        }
        e.ecx = (e.ecx & !(AMD_ECX_NC_MASK | AMD_ECX_APIC_ID_SIZE_MASK))
            | (apic_id_bits(cpu_count) << AMD_ECX_APIC_ID_SIZE_SHIFT)
            | (self.cpu_count - 1);
    }

    fn leaf_amd_ext_apic_id(&self, e: &mut kvm_cpuid_entry2) {
        // Extended APIC ID; core (compute unit) ID with one thread per core; node 0 of one.
        e.eax = self.vcpu_id;
        e.ebx = self.vcpu_id & 0xff;
        e.ecx = 0;
        e.edx = 0;
    }
}

/// Replaces all subleaves of topology leaf `leaf`, if KVM reported it, with ours.
fn replace_topology_leaf(
    cpuid: &mut CpuId,
    leaf: u32,
    topo: &Topology,
    cpu_count: u8,
) -> Result<(), CpuidError> {
    if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
        return Ok(());
    }
    cpuid.retain(|e| e.function != leaf);
    for entry in topo.topology_entries(leaf, cpu_count) {
        cpuid.push(entry).map_err(|_| CpuidError::TooManyEntries)?;
    }
    Ok(())
}

/// Adjusts the CPUID KVM_GET_SUPPORTED_CPUID returned for vCPU `vcpu_id` of `cpu_count`:
///
/// - 0x1: initial APIC ID (`EBX[31:24]`) = `vcpu_id`, logical processor count (`EBX[23:16]`) =
///   `cpu_count`, CLFLUSH line size 64 bytes, HTT when `cpu_count` > 1, hypervisor bit set;
///   everything else (TSC-deadline included) as KVM reports it;
/// - 0x4 (Intel): cores per package and threads sharing each cache (L1/L2 per core, L3 by
///   all);
/// - 0x6: only ARAT kept; 0xA: zeroed (no PMU);
/// - 0xB and 0x1F (when reported): SMT level of 1 thread, core level of `cpu_count`, x2APIC
///   ID = `vcpu_id`;
/// - 0x8000_0008 (AMD): core count and APIC ID size; 0x8000_001D/0x8000_001E (AMD): cache
///   sharing and extended APIC/core IDs;
/// - 0x4000_0000..=0x4FFF_FFFF (KVM paravirtual leaves): untouched.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, cpu_count: u8) -> Result<(), CpuidError> {
    if cpu_count == 0 {
        return Err(CpuidError::NoCpus);
    }
    if vcpu_id >= cpu_count {
        return Err(CpuidError::VcpuIdOutOfRange { vcpu_id, cpu_count });
    }
    let topo = Topology {
        vcpu_id: u32::from(vcpu_id),
        cpu_count: u32::from(cpu_count),
        vendor: cpu_vendor(cpuid)?,
    };
    for e in cpuid.as_mut_slice() {
        match (e.function, topo.vendor) {
            (LEAF_HYPERVISOR_FIRST..=LEAF_HYPERVISOR_LAST, _) => {}
            (LEAF_FEATURES, _) => topo.leaf_features(e),
            (LEAF_CACHE_PARAMS, CpuVendor::Intel) => topo.leaf_cache_params(e),
            (LEAF_THERMAL_POWER, _) => {
                e.eax &= EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (LEAF_PMU, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (LEAF_EXT_ADDRESS_SIZES, _) => topo.leaf_ext_address_sizes(e, cpu_count),
            (LEAF_AMD_CACHE_PROPERTIES, CpuVendor::Amd) => topo.leaf_amd_cache_properties(e),
            (LEAF_AMD_EXT_APIC_ID, CpuVendor::Amd) => topo.leaf_amd_ext_apic_id(e),
            _ => {}
        }
    }
    replace_topology_leaf(cpuid, LEAF_EXT_TOPOLOGY, &topo, cpu_count)?;
    replace_topology_leaf(cpuid, LEAF_V2_EXT_TOPOLOGY, &topo, cpu_count)?;
    Ok(())
}

/// CPUID.01H:ECX[24]: the LAPIC timer supports TSC-deadline mode (Intel SDM Vol. 2A, CPUID).
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Advertises the LAPIC's TSC-deadline timer mode in leaf 0x1. KVM emulates it when it reports
/// `KVM_CAP_TSC_DEADLINE_TIMER`, but `KVM_GET_SUPPORTED_CPUID` leaves the bit to the VMM;
/// without it Linux calibrates the LAPIC timer against the PIT for a tenth of a second.
pub fn set_tsc_deadline(cpuid: &mut CpuId, supported: bool) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            if supported {
                e.ecx |= ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !ECX_TSC_DEADLINE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::kvm_or_skip;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_regs(max: u32, vendor: &[u8; 12]) -> [u32; 4] {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        [max, word(0), word(8), word(4)]
    }

    /// Something like KVM_GET_SUPPORTED_CPUID on an 8-thread host.
    fn host_cpuid(vendor: &[u8; 12]) -> CpuId {
        CpuId::from_entries(&[
            leaf(0x0, 0, vendor_regs(0x1f, vendor)),
            leaf(0x1, 0, [0x806c1, 0x0510_0800, 0x7ffa_fbff, 0xbfeb_fbff]),
            // L1d, L1i, L2, L3 with host sharing/core counts.
            leaf(0x4, 0, [0x1c00_4121, 0x02c0_003f, 0x3f, 0]),
            leaf(0x4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            leaf(0x4, 2, [0x1c00_4143, 0x0100_003f, 0x3ff, 0]),
            leaf(0x4, 3, [0x1c03_c163, 0x02c0_003f, 0x3fff, 6]),
            leaf(0x4, 4, [0, 0, 0, 0]),
            leaf(0x6, 0, [0x77, 0x2, 0x9, 0]),
            leaf(0xa, 0, [0x0830_0805, 0, 0, 0x8603]),
            leaf(0xb, 0, [1, 2, 0x100, 6]),
            leaf(0xb, 1, [4, 8, 0x201, 6]),
            leaf(0x1f, 0, [1, 2, 0x100, 6]),
            leaf(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
            leaf(0x8000_0000, 0, [0x8000_001f, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            leaf(0x8000_0008, 0, [0x3027, 0, 0x7007, 0]),
            leaf(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            leaf(0x8000_001d, 3, [0x0001_c163, 0x03c0_003f, 0x7fff, 1]),
            leaf(0x8000_001e, 0, [0x0c, 0x0106, 0, 0]),
        ])
        .unwrap()
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("missing leaf {function:#x}.{index}"))
    }

    #[test]
    fn vendor_is_read_from_leaf_zero() {
        assert_eq!(cpu_vendor(&host_cpuid(VENDOR_INTEL)), Ok(CpuVendor::Intel));
        assert_eq!(cpu_vendor(&host_cpuid(VENDOR_AMD)), Ok(CpuVendor::Amd));
        assert_eq!(
            cpu_vendor(&host_cpuid(b"VIA VIA VIA ")),
            Ok(CpuVendor::Other)
        );
        let empty = CpuId::new(0).unwrap();
        assert_eq!(cpu_vendor(&empty), Err(CpuidError::MissingVendorLeaf));
    }

    #[test]
    fn leaf1_carries_apic_id_counts_and_hypervisor_bit() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut cpuid, 3, 4).unwrap();
        let e = get(&cpuid, 0x1, 0);
        assert_eq!(e.ebx >> 24, 3, "initial APIC id");
        assert_eq!((e.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!((e.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        // TSC-deadline (ECX bit 24) stays as KVM reported it.
        assert_eq!(e.ecx & (1 << 24), 0x7ffa_fbff & (1 << 24));

        let mut single = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut single, 0, 1).unwrap();
        let e = get(&single, 0x1, 0);
        assert_eq!(e.edx & EDX_HTT, 0);
        assert_eq!(e.ebx >> 16, 1);
    }

    #[test]
    fn intel_cache_leaf_reports_cores_and_sharing() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut cpuid, 1, 4).unwrap();
        for index in 0..3 {
            let e = get(&cpuid, 0x4, index);
            assert_eq!(e.eax >> 26, 3, "cores per package - 1");
            assert_eq!((e.eax >> 14) & 0xfff, 0, "L1/L2 private");
        }
        let l3 = get(&cpuid, 0x4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by all");
        assert_eq!(l3.eax & 0x3fff, 0x163, "type and level kept");
        assert_eq!(get(&cpuid, 0x4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn extended_topology_is_one_thread_per_core() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut cpuid, 5, 6).unwrap();
        for function in [0xb, 0x1f] {
            let smt = get(&cpuid, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            let core = get(&cpuid, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = get(&cpuid, function, 2);
            assert_eq!((end.eax, end.ebx, end.ecx >> 8, end.edx), (0, 0, 0, 5));
            let n = cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == function)
                .count();
            assert_eq!(n, 3);
        }
    }

    #[test]
    fn topology_leaf_is_not_invented() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(0x0, 0, vendor_regs(0xd, VENDOR_INTEL)),
            leaf(0x1, 0, [0, 0, 0, 0]),
        ])
        .unwrap();
        filter_cpuid(&mut cpuid, 0, 2).unwrap();
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0xb));
    }

    #[test]
    fn power_management_and_pmu_are_hidden() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut cpuid, 0, 2).unwrap();
        let pm = get(&cpuid, 0x6, 0);
        assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (EAX_ARAT, 0, 0, 0));
        let pmu = get(&cpuid, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }

    #[test]
    fn kvm_paravirt_leaves_are_untouched() {
        for vendor in [VENDOR_INTEL, VENDOR_AMD] {
            let before = host_cpuid(vendor);
            let mut after = before.clone();
            filter_cpuid(&mut after, 1, 2).unwrap();
            for function in [0x4000_0000, 0x4000_0001] {
                assert_eq!(get(&before, function, 0), get(&after, function, 0));
            }
        }
    }

    #[test]
    fn intel_extended_leaves_keep_address_sizes() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        filter_cpuid(&mut cpuid, 0, 4).unwrap();
        assert_eq!(get(&cpuid, 0x8000_0008, 0).ecx, 0x7007);
        assert_eq!(get(&cpuid, 0x8000_0008, 0).eax, 0x3027);
        // AMD-only leaves are left alone on Intel.
        assert_eq!(get(&cpuid, 0x8000_001e, 0).eax, 0x0c);
    }

    #[test]
    fn amd_leaves_describe_the_topology() {
        let mut cpuid = host_cpuid(VENDOR_AMD);
        filter_cpuid(&mut cpuid, 2, 3).unwrap();
        let sizes = get(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 2, "cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 2, "APIC id bits for 3 cores");
        assert_eq!(sizes.eax, 0x3027);
        let ext = get(&cpuid, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (2, 2, 0, 0));
        let l1 = get(&cpuid, 0x8000_001d, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        let l3 = get(&cpuid, 0x8000_001d, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        // Leaf 4 is Intel-only and stays as reported.
        assert_eq!(get(&cpuid, 0x4, 0).eax, 0x1c00_4121);
        let e = get(&cpuid, 0x1, 0);
        assert_eq!((e.ebx >> 24, (e.ebx >> 16) & 0xff), (2, 3));
    }

    #[test]
    fn bad_ids_are_rejected() {
        let mut cpuid = host_cpuid(VENDOR_INTEL);
        assert_eq!(filter_cpuid(&mut cpuid, 0, 0), Err(CpuidError::NoCpus));
        assert_eq!(
            filter_cpuid(&mut cpuid, 2, 2),
            Err(CpuidError::VcpuIdOutOfRange {
                vcpu_id: 2,
                cpu_count: 2
            })
        );
    }

    #[test]
    fn apic_id_bits_round_up() {
        let cases = [
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (128, 7),
            (129, 8),
            (254, 8),
        ];
        for (count, bits) in cases {
            assert_eq!(apic_id_bits(count), bits, "{count} cpus");
        }
    }

    #[test]
    fn kvm_accepts_the_filtered_cpuid() {
        let Some(kvm) = kvm_or_skip("kvm_accepts_the_filtered_cpuid") else {
            return;
        };
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let vm = kvm.create_vm().unwrap();
        for vcpu_id in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(vcpu_id)).unwrap();
            let mut cpuid = supported.clone();
            filter_cpuid(&mut cpuid, vcpu_id, 2).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            let back = vcpu
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            let leaf1 = get(&back, 0x1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(vcpu_id));
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        }
    }

    #[test]
    fn tsc_deadline_follows_kvm() {
        let mut cpuid = CpuId::from_entries(&[leaf(0x1, 0, [0, 0, 0, 0])]).unwrap();
        set_tsc_deadline(&mut cpuid, true);
        assert_eq!(cpuid.as_slice()[0].ecx, ECX_TSC_DEADLINE);
        set_tsc_deadline(&mut cpuid, false);
        assert_eq!(cpuid.as_slice()[0].ecx, 0);
    }
}
