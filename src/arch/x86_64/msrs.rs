//! Model-specific registers: the values a vCPU boots with, and which MSRs a snapshot saves.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MCG_CTL: only readable when MCG_CAP.CTL_P is set, which needs KVM_X86_SETUP_MCE.
pub const MSR_IA32_MCG_CTL: u32 = 0x17b;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRR_DEF_TYPE: MTRRs enabled (bit 11).
const MTRR_ENABLE: u64 = 1 << 11;
/// MTRR memory type write-back.
const MTRR_MEM_TYPE_WB: u64 = 0x6;
/// IA32_TSC_DEADLINE: restore it after the TSC and the LAPIC (its value is relative to both).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_EFER (set through KVM_SET_SREGS at boot).
pub const MSR_EFER: u32 = 0xc000_0080;
/// IA32_STAR: SYSCALL segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR: 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR: compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK: RFLAGS mask applied on SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE: the GS base SWAPGS exchanges.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR index ranges left out of [`msrs_to_save`], as `(first, count, why)`.
///
/// KVM_GET_MSR_INDEX_LIST lists every MSR KVM knows; some of them cannot be read back with
/// KVM_GET_MSRS on a vCPU configured like ours, or restoring them is meaningless:
const UNSAVEABLE_MSR_RANGES: &[(u32, u32, &str)] = &[
    // Machine-check control needs MCG_CAP.CTL_P, i.e. KVM_X86_SETUP_MCE, which we do not use.
    (MSR_IA32_MCG_CTL, 1, "MCG_CTL needs KVM_X86_SETUP_MCE"),
    // Nested-VMX capability MSRs: read-only feature reports, and only valid with nested VMX.
    (
        0x480,
        0x12,
        "VMX capability MSRs (nested virtualisation only)",
    ),
    // Hyper-V synthetic MSRs: only backed when Hyper-V enlightenments are enabled in CPUID.
    (
        0x4000_0000,
        0x100,
        "Hyper-V synthetic MSRs (no Hyper-V CPUID)",
    ),
];

/// Errors while programming or listing MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS set only some of the MSRs.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs (first refused: {first_refused:#x})")]
    SetMsrsIncomplete {
        /// MSRs that were set.
        set: usize,
        /// MSRs that were asked for.
        wanted: usize,
        /// Index of the first MSR KVM refused.
        first_refused: u32,
    },
    /// KVM_GET_MSRS failed.
    #[error("KVM_GET_MSRS failed")]
    GetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
}

type Result<T> = std::result::Result<T, MsrError>;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR values a vCPU boots Linux with: SYSENTER/SYSCALL MSRs cleared, TSC 0,
/// fast strings on, MTRRs enabled with write-back as the default memory type.
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

/// Writes [`boot_msr_entries`] to the vCPU; fails unless KVM accepted all of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::SetMsrs)?;
    if set != entries.len() {
        return Err(MsrError::SetMsrsIncomplete {
            set,
            wanted: entries.len(),
            first_refused: entries.get(set).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

/// Whether MSR `index` belongs in a vCPU snapshot (see [`UNSAVEABLE_MSR_RANGES`]).
pub fn msr_is_saveable(index: u32) -> bool {
    !UNSAVEABLE_MSR_RANGES
        .iter()
        .any(|&(first, count, _)| index >= first && index - first < count)
}

/// Filters an MSR index list down to the saveable MSRs, keeping KVM's order.
pub fn filter_saveable(indices: &[u32]) -> Vec<u32> {
    indices
        .iter()
        .copied()
        .filter(|&i| msr_is_saveable(i))
        .collect()
}

/// The MSRs a snapshot should save with KVM_GET_MSRS and restore with KVM_SET_MSRS:
/// KVM_GET_MSR_INDEX_LIST minus [`UNSAVEABLE_MSR_RANGES`].
///
/// The caller must still check the count KVM_GET_MSRS returns (a short count names the first
/// MSR it could not read) and, on restore, set [`MSR_IA32_TSC_DEADLINE`] after `MSR_IA32_TSC`
/// and after KVM_SET_LAPIC.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(MsrError::GetMsrIndexList)?;
    Ok(filter_saveable(list.as_slice()))
}

/// The subset of `indices` that KVM_GET_MSRS can read on `vcpu`, in order.
///
/// KVM lists some MSRs whose readability depends on the vCPU's CPUID (PMU counters, for one)
/// or on the host kernel; KVM_GET_MSRS stops at the first unreadable one, which is dropped
/// before retrying with the rest. Call it once on a configured vCPU to fix a snapshot's list.
pub fn readable_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<u32>> {
    let mut readable = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let end = indices.len().min(pos + kvm_bindings::KVM_MAX_MSR_ENTRIES);
        let chunk = &indices[pos..end];
        let entries: Vec<_> = chunk.iter().map(|&i| entry(i, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(MsrError::GetMsrs)?
            .min(chunk.len());
        readable.extend_from_slice(&chunk[..n]);
        // KVM stops at the first MSR it cannot read: drop that one and go on after it.
        pos += if n < chunk.len() { n + 1 } else { n };
    }
    Ok(readable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_values() {
        let e = boot_msr_entries();
        let get = |i: u32| e.iter().find(|x| x.index == i).map(|x| x.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_LSTAR), Some(0));
        assert_eq!(get(MSR_IA32_TSC), Some(0));
        assert_eq!(e.len(), 11);
    }

    #[test]
    fn saveable_filter() {
        assert!(msr_is_saveable(MSR_IA32_TSC));
        assert!(msr_is_saveable(MSR_IA32_TSC_DEADLINE));
        assert!(msr_is_saveable(MSR_LSTAR));
        assert!(msr_is_saveable(0x4b56_4d01)); // kvmclock system time
        assert!(!msr_is_saveable(MSR_IA32_MCG_CTL));
        assert!(!msr_is_saveable(0x480));
        assert!(!msr_is_saveable(0x491));
        assert!(msr_is_saveable(0x492));
        assert!(!msr_is_saveable(0x4000_0001));
        assert_eq!(
            filter_saveable(&[0x10, 0x17b, 0x1a0, 0x485, 0xc000_0082]),
            vec![0x10, 0x1a0, 0xc000_0082]
        );
    }

    #[test]
    fn kvm_msrs() {
        let Some(kvm) = crate::arch::x86_64::test_support::kvm_or_skip() else {
            return;
        };
        let save = msrs_to_save(&kvm).unwrap();
        assert!(save.contains(&MSR_IA32_TSC));
        assert!(save.iter().all(|&i| msr_is_saveable(i)));

        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_msrs(&vcpu).unwrap();
        let mut msrs =
            Msrs::from_entries(&[entry(MSR_IA32_MISC_ENABLE, 0), entry(MSR_MTRR_DEF_TYPE, 0)])
                .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 2);
        let got = msrs.as_slice();
        assert_ne!(got[0].data & MSR_IA32_MISC_ENABLE_FAST_STRING, 0);
        assert_eq!(got[1].data, 0x806);

        // Which saveable MSRs this host's KVM cannot read back on a fresh vCPU.
        let readable = readable_msrs(&vcpu, &save).unwrap();
        assert!(readable.contains(&MSR_IA32_TSC) && readable.contains(&MSR_LSTAR));
        let dropped: Vec<String> = save
            .iter()
            .filter(|i| !readable.contains(i))
            .map(|i| format!("{i:#x}"))
            .collect();
        eprintln!(
            "{} MSRs to save, {} readable, unreadable: {dropped:?}",
            save.len(),
            readable.len()
        );
    }
}
