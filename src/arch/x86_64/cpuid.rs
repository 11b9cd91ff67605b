//! Per-vCPU CPUID: KVM_GET_SUPPORTED_CPUID adjusted so that each vCPU sees its own APIC id and a
//! consistent topology of `vcpu_count` single-threaded cores in one socket.
//!
//! On the nested PVM host the guest's CPUID instruction is not intercepted, so these values only
//! matter on ordinary hardware KVM (and to KVM itself, e.g. for the LAPIC and x2APIC ids).

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Leaf 1 EBX: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_SIZE_QWORDS: u32 = 8;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6 ECX bit 3: energy-performance bias MSR (not emulated by KVM).
const LEAF6_ECX_EPB: u32 = 1 << 3;
/// Extended-topology level type: SMT.
const LEVEL_TYPE_SMT: u32 = 1;
/// Extended-topology level type: core.
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors while normalizing CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// `vcpu_count` is zero.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// `vcpu_id` is not below `vcpu_count`.
    #[error("vCPU id {id} is out of range for {count} vCPUs")]
    VcpuIdOutOfRange {
        /// The vCPU id.
        id: u8,
        /// The vCPU count.
        count: u8,
    },
    /// An entry could not be added to the CPUID list.
    #[error("cannot add CPUID leaf {0:#x} to the list")]
    Push(u32, #[source] vmm_sys_util::fam::Error),
}

type Result<T> = std::result::Result<T, CpuidError>;

/// The CPU vendor as reported by leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else.
    Other,
}

/// Returns the vendor named by leaf 0 of `cpuid`.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(e) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Number of APIC-id bits that `count` cores need (0 for one core).
fn id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

/// Fills one subleaf of leaf 0xb / 0x1f for single-threaded cores.
fn set_topology_subleaf(e: &mut kvm_cpuid_entry2, vcpu_id: u8, vcpu_count: u8) {
    let index = e.index;
    let (eax, ebx, ecx) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT << 8),
        1 => (
            id_bits(vcpu_count),
            u32::from(vcpu_count),
            (LEVEL_TYPE_CORE << 8) | 1,
        ),
        _ => (0, 0, index & 0xff),
    };
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = ecx;
    e.edx = u32::from(vcpu_id);
    e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
}

/// Adds any missing subleaf 0..=2 of the topology leaves KVM reports, so the guest always finds
/// the SMT level, the core level and the terminating invalid level.
fn ensure_topology_subleaves(cpuid: &mut CpuId) -> Result<()> {
    for function in [0xb, 0x1f] {
        if !cpuid.as_slice().iter().any(|e| e.function == function) {
            continue;
        }
        for index in 0..=2 {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == function && e.index == index);
            if !present {
                cpuid
                    .push(kvm_cpuid_entry2 {
                        function,
                        index,
                        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                        ..Default::default()
                    })
                    .map_err(|e| CpuidError::Push(function, e))?;
            }
        }
    }
    Ok(())
}

/// Adjusts the output of `KVM_GET_SUPPORTED_CPUID` for vCPU `vcpu_id` of `vcpu_count`:
///
/// * leaf 1: initial APIC id = `vcpu_id`, logical processor count, CLFLUSH size, hypervisor
///   bit, HTT iff more than one vCPU;
/// * leaf 4 (Intel caches): cores per package; L1/L2 private, L3 shared by all vCPUs;
/// * leaf 6: EPB cleared;
/// * leaves 0xb and 0x1f: one thread per core, `vcpu_count` cores, x2APIC id = `vcpu_id`;
/// * AMD leaves 0x8000_0008 (core count) and 0x8000_001e (APIC/core id).
///
/// The KVM signature leaves (0x4000_0000..) are left as KVM reports them.
pub fn normalize_cpuid(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8) -> Result<()> {
    if vcpu_count == 0 {
        return Err(CpuidError::NoVcpus);
    }
    if vcpu_id >= vcpu_count {
        return Err(CpuidError::VcpuIdOutOfRange {
            id: vcpu_id,
            count: vcpu_count,
        });
    }
    let vendor = vendor(cpuid);
    ensure_topology_subleaves(cpuid)?;
    let (id, count) = (u32::from(vcpu_id), u32::from(vcpu_count));

    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xff) | (id << 24) | (count << 16) | (CLFLUSH_SIZE_QWORDS << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if vendor != Vendor::Amd => {
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                let cores = count.min(64) - 1;
                e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
            }
            6 => e.ecx &= !LEAF6_ECX_EPB,
            0xb | 0x1f => set_topology_subleaf(e, vcpu_id, vcpu_count),
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(vcpu_count) << 12) | (count - 1);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = id;
                // Core id = vCPU id, one thread per core.
                e.ebx = (e.ebx & !0xffff) | (id & 0xff);
                // Node 0, one node per processor.
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |o: usize| u32::from_le_bytes(name[o..o + 4].try_into().unwrap());
        leaf(0, 0, [0x1f, w(0), w(8), w(4)])
    }

    fn synthetic(vendor: &[u8; 12]) -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(vendor),
            leaf(1, 0, [0x906ea, 0x0010_0800, 0x0120_2000, 0x0789_fbff]),
            leaf(4, 0, [0x1c00_4121, 0, 0, 0]),
            leaf(4, 1, [0x1c00_4122, 0, 0, 0]),
            leaf(4, 2, [0x1c00_4143, 0, 0, 0]),
            leaf(4, 3, [0x1c03_c163, 0, 0, 0]),
            leaf(4, 4, [0, 0, 0, 0]),
            leaf(6, 0, [0x4, 0, 0x9, 0]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0x1f, 0, [1, 2, 0x100, 7]),
            leaf(0x1f, 1, [4, 8, 0x201, 7]),
            leaf(0x1f, 2, [0, 0, 2, 7]),
            leaf(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x8000_0008, 0, [0x3027, 0, 0x7007, 0]),
            leaf(0x8000_001e, 0, [9, 0x0105, 0x0301, 0]),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn vendors() {
        assert_eq!(vendor(&synthetic(b"GenuineIntel")), Vendor::Intel);
        assert_eq!(vendor(&synthetic(b"AuthenticAMD")), Vendor::Amd);
        assert_eq!(vendor(&synthetic(b"SomethingOdd")), Vendor::Other);
    }

    #[test]
    fn leaf1_and_leaf6() {
        let mut c = synthetic(b"GenuineIntel");
        normalize_cpuid(&mut c, 2, 4).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx, 0x0204_0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(get(&c, 6, 0).ecx, 0x1);

        let mut one = synthetic(b"GenuineIntel");
        normalize_cpuid(&mut one, 0, 1).unwrap();
        let l1 = get(&one, 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn cache_leaf_topology() {
        let mut c = synthetic(b"GenuineIntel");
        normalize_cpuid(&mut c, 1, 2).unwrap();
        for i in 0..3 {
            let e = get(&c, 4, i);
            assert_eq!(e.eax >> 26, 1, "cores per package, subleaf {i}");
            assert_eq!((e.eax >> 14) & 0xfff, 0, "L1/L2 are per core");
            assert_eq!(
                e.eax & 0x3fff,
                get(&synthetic(b"GenuineIntel"), 4, i).eax & 0x3fff
            );
        }
        assert_eq!((get(&c, 4, 3).eax >> 14) & 0xfff, 1, "L3 shared by both");
        assert_eq!(get(&c, 4, 4).eax, 0);
    }

    #[test]
    fn extended_topology() {
        let mut c = synthetic(b"GenuineIntel");
        normalize_cpuid(&mut c, 2, 3).unwrap();
        for function in [0xb, 0x1f] {
            let smt = get(&c, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = get(&c, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            let end = get(&c, function, 2);
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 2));
            assert_ne!(core.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        }
    }

    #[test]
    fn kvm_signature_untouched() {
        let mut c = synthetic(b"GenuineIntel");
        normalize_cpuid(&mut c, 0, 2).unwrap();
        assert_eq!(
            get(&c, 0x4000_0000, 0),
            get(&synthetic(b"GenuineIntel"), 0x4000_0000, 0)
        );
    }

    #[test]
    fn amd_leaves() {
        let mut c = synthetic(b"AuthenticAMD");
        normalize_cpuid(&mut c, 3, 4).unwrap();
        assert_eq!(get(&c, 0x8000_0008, 0).ecx, 0x2003);
        let t = get(&c, 0x8000_001e, 0);
        assert_eq!((t.eax, t.ebx, t.ecx), (3, 3, 0));
        // Leaf 4 is reserved on AMD and left alone.
        assert_eq!(get(&c, 4, 0), get(&synthetic(b"AuthenticAMD"), 4, 0));
    }

    #[test]
    fn bad_ids() {
        let mut c = synthetic(b"GenuineIntel");
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 0),
            Err(CpuidError::NoVcpus)
        ));
        assert!(matches!(
            normalize_cpuid(&mut c, 2, 2),
            Err(CpuidError::VcpuIdOutOfRange { id: 2, count: 2 })
        ));
    }

    #[test]
    fn kvm_accepts_normalized_cpuid() {
        let Some(kvm) = crate::arch::x86_64::test_support::kvm_or_skip() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        for id in 0..2u8 {
            let mut c = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            normalize_cpuid(&mut c, id, 2).unwrap();
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            vcpu.set_cpuid2(&c).unwrap();
            let back = vcpu
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            let l1 = get(&back, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
        }
    }
}
