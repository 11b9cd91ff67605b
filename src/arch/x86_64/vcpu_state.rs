//! The complete architectural state of an x86_64 vCPU, saved and restored through KVM's
//! state ioctls, as a plain serde struct ([`VcpuState`]).
//!
//! Save order: MP_STATE, REGS, SREGS, XSAVE (or FPU), XCRS, DEBUGREGS, LAPIC, CPUID, MSRs,
//! TSC frequency, VCPU_EVENTS (last, so that it sees the events the other reads left pending).
//!
//! Restore order: TSC frequency (if it must and can be changed), CPUID, MP_STATE, REGS, SREGS,
//! XSAVE (or FPU), XCRS, DEBUGREGS, LAPIC, MSRs (all but `MSR_IA32_TSC_DEADLINE`, then the
//! deadline alone, after the TSC and the LAPIC it is relative to), VCPU_EVENTS.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, Xsave, kvm_cpuid_entry2,
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::msrs::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};

/// TSC frequencies closer than this many parts per million are treated as equal (QEMU and
/// Firecracker use the same tolerance: NTP copes with it, a guest TSC rescale is not worth it).
pub const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Size of the legacy (pre-KVM_CAP_XSAVE2) `struct kvm_xsave`, in 32-bit words.
const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;

/// Errors while saving or restoring a vCPU; each names the ioctl (or step) that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// KVM_GET_MP_STATE failed.
    #[error("KVM_GET_MP_STATE failed")]
    GetMpState(#[source] kvm_ioctls::Error),
    /// KVM_SET_MP_STATE failed.
    #[error("KVM_SET_MP_STATE failed")]
    SetMpState(#[source] kvm_ioctls::Error),
    /// KVM_GET_REGS failed.
    #[error("KVM_GET_REGS failed")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_GET_XSAVE failed.
    #[error("KVM_GET_XSAVE failed")]
    GetXsave(#[source] kvm_ioctls::Error),
    /// KVM_GET_XSAVE2 failed.
    #[error("KVM_GET_XSAVE2 failed")]
    GetXsave2(#[source] kvm_ioctls::Error),
    /// KVM_SET_XSAVE failed.
    #[error("KVM_SET_XSAVE failed")]
    SetXsave(#[source] kvm_ioctls::Error),
    /// The XSAVE buffer for KVM_GET_XSAVE2 / KVM_SET_XSAVE could not be allocated.
    #[error("cannot allocate the KVM_GET_XSAVE2/KVM_SET_XSAVE buffer")]
    XsaveBuffer(#[source] vmm_sys_util::fam::Error),
    /// KVM_GET_FPU failed.
    #[error("KVM_GET_FPU failed")]
    GetFpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_XCRS failed.
    #[error("KVM_GET_XCRS failed")]
    GetXcrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_XCRS failed.
    #[error("KVM_SET_XCRS failed")]
    SetXcrs(#[source] kvm_ioctls::Error),
    /// KVM_GET_DEBUGREGS failed.
    #[error("KVM_GET_DEBUGREGS failed")]
    GetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_DEBUGREGS failed.
    #[error("KVM_SET_DEBUGREGS failed")]
    SetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_LAPIC failed.
    #[error("KVM_GET_LAPIC failed")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("KVM_SET_LAPIC failed")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// KVM_GET_CPUID2 failed.
    #[error("KVM_GET_CPUID2 failed")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// The saved CPUID entries do not fit a KVM_SET_CPUID2 buffer.
    #[error("cannot build the KVM_SET_CPUID2 buffer from {entries} saved entries")]
    CpuidBuffer {
        /// Number of saved CPUID entries.
        entries: usize,
        /// Why the buffer could not be built.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2 failed")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// The MSR buffer for KVM_GET_MSRS / KVM_SET_MSRS could not be built.
    #[error("cannot build the KVM_GET_MSRS/KVM_SET_MSRS buffer")]
    MsrBuffer(#[source] vmm_sys_util::fam::Error),
    /// KVM_GET_MSRS failed.
    #[error("KVM_GET_MSRS failed")]
    GetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSRS read fewer MSRs than asked for.
    #[error("KVM_GET_MSRS read {read} of {wanted} MSRs (first unreadable: {first_failed:#x})")]
    GetMsrsIncomplete {
        /// MSRs read before the failing one (over all batches).
        read: usize,
        /// MSRs asked for (over all batches).
        wanted: usize,
        /// Index of the first MSR KVM could not read.
        first_failed: u32,
    },
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS wrote fewer MSRs than asked for.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs (first refused: {first_failed:#x})")]
    SetMsrsIncomplete {
        /// MSRs set before the refused one (over all batches).
        set: usize,
        /// MSRs asked for (over all batches).
        wanted: usize,
        /// Index of the first MSR KVM refused.
        first_failed: u32,
    },
    /// KVM_GET_TSC_KHZ failed.
    #[error("KVM_GET_TSC_KHZ failed")]
    GetTscKhz(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSC_KHZ failed.
    #[error("KVM_SET_TSC_KHZ to {khz} kHz failed")]
    SetTscKhz {
        /// The frequency asked for.
        khz: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_VCPU_EVENTS failed.
    #[error("KVM_GET_VCPU_EVENTS failed")]
    GetVcpuEvents(#[source] kvm_ioctls::Error),
    /// KVM_SET_VCPU_EVENTS failed.
    #[error("KVM_SET_VCPU_EVENTS failed")]
    SetVcpuEvents(#[source] kvm_ioctls::Error),
    /// KVM_KVMCLOCK_CTRL failed (other than with EINVAL, see [`kvmclock_ctrl`]).
    #[error("KVM_KVMCLOCK_CTRL failed")]
    KvmclockCtrl(#[source] kvm_ioctls::Error),
}

/// Result of this module's functions.
pub type Result<T> = std::result::Result<T, VcpuStateError>;

/// The x87/SSE state of KVM_GET_FPU (`struct kvm_fpu`, which kvm-bindings does not serialize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuRegs {
    /// ST0–ST7 / MM0–MM7, 80 bits each in 16-byte slots.
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Opcode of the last x87 instruction.
    pub last_opcode: u16,
    /// Instruction pointer of the last x87 instruction.
    pub last_ip: u64,
    /// Data pointer of the last x87 instruction.
    pub last_dp: u64,
    /// XMM0–XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control/status register.
    pub mxcsr: u32,
}

impl From<kvm_fpu> for FpuRegs {
    fn from(f: kvm_fpu) -> Self {
        FpuRegs {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<FpuRegs> for kvm_fpu {
    fn from(f: FpuRegs) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The vCPU's floating-point / vector state, in whichever form the host supports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area of KVM_GET_XSAVE (1024 words) or KVM_GET_XSAVE2 (more, when
    /// KVM_CAP_XSAVE2 reports a size above 4096 bytes), as 32-bit words.
    Xsave(Vec<u32>),
    /// The legacy x87/SSE state of KVM_GET_FPU, on hosts without KVM_CAP_XSAVE. Lossy: KVM's
    /// KVM_GET_FPU/KVM_SET_FPU ignore MXCSR (it reads back as 0 and is never written).
    Fpu(Box<FpuRegs>),
}

/// Everything KVM holds about one x86_64 vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set with KVM_SET_CPUID2 (the entries of `struct kvm_cpuid2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for INIT/SIPI …).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX… state.
    pub fpu: FpuState,
    /// Extended control registers; `None` without KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The in-kernel local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// MSR values (the entries of `struct kvm_msrs`), in the order they were saved.
    pub msrs: Vec<kvm_msr_entry>,
    /// Guest TSC frequency in kHz; `None` without KVM_CAP_GET_TSC_KHZ.
    pub tsc_khz: Option<u32>,
    /// Pending exceptions, interrupts, NMIs, SMM state and interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

/// The XSAVE area size KVM uses for this process's vCPUs, in bytes (at least 4096).
fn host_xsave_size(kvm: &Kvm) -> usize {
    usize::try_from(kvm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(std::mem::size_of::<kvm_xsave>())
}

fn save_fpu(vcpu: &VcpuFd, kvm: &Kvm) -> Result<FpuState> {
    if !kvm.check_extension(Cap::Xsave) {
        let fpu = vcpu.get_fpu().map_err(VcpuStateError::GetFpu)?;
        return Ok(FpuState::Fpu(Box::new(fpu.into())));
    }
    let size = host_xsave_size(kvm);
    if size <= std::mem::size_of::<kvm_xsave>() {
        let xsave = vcpu.get_xsave().map_err(VcpuStateError::GetXsave)?;
        return Ok(FpuState::Xsave(xsave.region.to_vec()));
    }
    let extra_words = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    let mut xsave = Xsave::new(extra_words).map_err(VcpuStateError::XsaveBuffer)?;
    // SAFETY: `xsave` holds 4096 + 4 * extra_words >= `size` bytes, and `size` is what
    // KVM_CAP_XSAVE2 reports, i.e. the most KVM_GET_XSAVE2 writes for this process's vCPUs.
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(VcpuStateError::GetXsave2)?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(FpuState::Xsave(words))
}

fn restore_fpu(vcpu: &VcpuFd, kvm: &Kvm, fpu: &FpuState) -> Result<()> {
    let words = match fpu {
        FpuState::Fpu(regs) => {
            return vcpu
                .set_fpu(&(**regs).into())
                .map_err(VcpuStateError::SetFpu);
        }
        FpuState::Xsave(words) => words,
    };
    // KVM_SET_XSAVE reads as many bytes as this host's XSAVE area has, whatever the saved
    // area's size: the buffer must be at least that large. A saved area larger than the host's
    // is passed whole; KVM rejects it if it uses features this host does not have.
    let host_words = host_xsave_size(kvm).div_ceil(4);
    let total = words.len().max(host_words).max(XSAVE_LEGACY_WORDS);
    let (head, tail) = words.split_at(words.len().min(XSAVE_LEGACY_WORDS));
    if total == XSAVE_LEGACY_WORDS {
        let mut xsave = kvm_xsave::default();
        xsave.region[..head.len()].copy_from_slice(head);
        // SAFETY: this host's XSAVE area is at most 4096 bytes (`host_words` <= 1024), which is
        // exactly the size of `xsave`, so KVM_SET_XSAVE reads only inside it.
        return unsafe { vcpu.set_xsave(&xsave) }.map_err(VcpuStateError::SetXsave);
    }
    let mut xsave = Xsave::new(total - XSAVE_LEGACY_WORDS).map_err(VcpuStateError::XsaveBuffer)?;
    // SAFETY: only the register area is written through this reference, not the FAM length.
    unsafe { xsave.as_mut_fam_struct() }.xsave.region[..head.len()].copy_from_slice(head);
    xsave.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: the buffer holds `total` >= `host_words` words, i.e. at least as many bytes as
    // KVM_CAP_XSAVE2 says KVM_SET_XSAVE reads for this process's vCPUs.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(VcpuStateError::SetXsave)
}

fn msr_entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Reads the MSRs in `indices` with KVM_GET_MSRS, in batches; every one of them must be read.
fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk.iter().map(|&i| msr_entry(i, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::MsrBuffer)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(VcpuStateError::GetMsrs)?;
        if read != chunk.len() {
            return Err(VcpuStateError::GetMsrsIncomplete {
                read: out.len() + read,
                wanted: indices.len(),
                first_failed: chunk.get(read).copied().unwrap_or(0),
            });
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Writes `entries` with KVM_SET_MSRS, in batches; every one of them must be accepted.
/// `done` and `wanted` place this call in a larger restore, for the error message.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry], done: usize, wanted: usize) -> Result<()> {
    let mut set_so_far = done;
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(VcpuStateError::MsrBuffer)?;
        let set = vcpu.set_msrs(&msrs).map_err(VcpuStateError::SetMsrs)?;
        if set != chunk.len() {
            return Err(VcpuStateError::SetMsrsIncomplete {
                set: set_so_far + set,
                wanted,
                first_failed: chunk.get(set).map_or(0, |e| e.index),
            });
        }
        set_so_far += set;
    }
    Ok(())
}

/// Saves the complete state of a paused `vcpu` (it must not be in KVM_RUN).
///
/// `msr_list` names the MSRs to save, typically [`super::msrs::readable_msrs`] of
/// [`super::msrs::msrs_to_save`] computed once per VM; an MSR KVM cannot read is an error
/// naming it ([`VcpuStateError::GetMsrsIncomplete`]), never silently dropped.
pub fn save_vcpu(vcpu: &VcpuFd, kvm: &Kvm, msr_list: &[u32]) -> Result<VcpuState> {
    let mp_state = vcpu.get_mp_state().map_err(VcpuStateError::GetMpState)?;
    let regs = vcpu.get_regs().map_err(VcpuStateError::GetRegs)?;
    let sregs = vcpu.get_sregs().map_err(VcpuStateError::GetSregs)?;
    let fpu = save_fpu(vcpu, kvm)?;
    let xcrs = if kvm.check_extension(Cap::Xcrs) {
        Some(vcpu.get_xcrs().map_err(VcpuStateError::GetXcrs)?)
    } else {
        None
    };
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(VcpuStateError::GetDebugRegs)?;
    let lapic = vcpu.get_lapic().map_err(VcpuStateError::GetLapic)?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuStateError::GetCpuid)?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(vcpu, msr_list)?;
    let tsc_khz = if kvm.check_extension(Cap::GetTscKhz) {
        Some(vcpu.get_tsc_khz().map_err(VcpuStateError::GetTscKhz)?)
    } else {
        None
    };
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(VcpuStateError::GetVcpuEvents)?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        tsc_khz,
        vcpu_events,
    })
}

/// Whether two TSC frequencies differ by more than [`TSC_KHZ_TOLERANCE_PPM`].
pub fn tsc_khz_differs(saved: u32, host: u32) -> bool {
    u64::from(saved.abs_diff(host)) * 1_000_000 > TSC_KHZ_TOLERANCE_PPM * u64::from(host)
}

/// Gives the vCPU the saved TSC frequency if it differs from the current one and KVM can scale
/// the TSC; otherwise the guest runs with this host's frequency and a warning is logged.
fn restore_tsc_khz(vcpu: &VcpuFd, kvm: &Kvm, saved: Option<u32>) -> Result<()> {
    let Some(saved) = saved else {
        return Ok(());
    };
    let current = if kvm.check_extension(Cap::GetTscKhz) {
        match vcpu.get_tsc_khz() {
            Ok(khz) => Some(khz),
            Err(e) => {
                log::warn!("KVM_GET_TSC_KHZ failed ({e}); assuming the TSC frequency differs");
                None
            }
        }
    } else {
        None
    };
    if current.is_some_and(|khz| !tsc_khz_differs(saved, khz)) {
        return Ok(());
    }
    if kvm.check_extension(Cap::TscControl) {
        vcpu.set_tsc_khz(saved)
            .map_err(|source| VcpuStateError::SetTscKhz { khz: saved, source })
    } else {
        let current = current.map_or_else(|| "unknown".to_string(), |k| format!("{k} kHz"));
        log::warn!(
            "snapshot TSC frequency {saved} kHz differs from this vCPU's ({current}) and KVM \
             cannot scale the TSC (no KVM_CAP_TSC_CONTROL): guest time may drift"
        );
        Ok(())
    }
}

/// Restores `state` into a freshly created `vcpu` (same VM layout, in-kernel irqchip created,
/// never run), in the order given in the module documentation.
///
/// `kvm` is needed to learn this host's XSAVE area size (KVM_CAP_XSAVE2: KVM_SET_XSAVE reads
/// that many bytes whatever the snapshot holds) and whether the TSC can be scaled.
pub fn restore_vcpu(vcpu: &VcpuFd, kvm: &Kvm, state: &VcpuState) -> Result<()> {
    restore_tsc_khz(vcpu, kvm, state.tsc_khz)?;
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|source| VcpuStateError::CpuidBuffer {
            entries: state.cpuid.len(),
            source,
        })?;
    vcpu.set_cpuid2(&cpuid).map_err(VcpuStateError::SetCpuid)?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(VcpuStateError::SetMpState)?;
    vcpu.set_regs(&state.regs)
        .map_err(VcpuStateError::SetRegs)?;
    vcpu.set_sregs(&state.sregs)
        .map_err(VcpuStateError::SetSregs)?;
    restore_fpu(vcpu, kvm, &state.fpu)?;
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(VcpuStateError::SetXcrs)?;
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(VcpuStateError::SetDebugRegs)?;
    vcpu.set_lapic(&state.lapic)
        .map_err(VcpuStateError::SetLapic)?;
    let (deadline, rest): (Vec<_>, Vec<_>) = state
        .msrs
        .iter()
        .partition(|e| e.index == MSR_IA32_TSC_DEADLINE);
    set_msrs(vcpu, &rest, 0, state.msrs.len())?;
    set_msrs(vcpu, &deadline, rest.len(), state.msrs.len())?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(VcpuStateError::SetVcpuEvents)
}

/// After [`restore_vcpu`]: how far the vCPU's TSC is from the saved one, in seconds, when
/// that is more than a second (`None` when KVM set it as asked, or when the state has no TSC).
///
/// KVM by the book makes the guest TSC continue from the written value. PVM-style hosts
/// ignore KVM_SET_MSRS(IA32_TSC), the KVM_VCPU_TSC_OFFSET attribute and IA32_TSC_ADJUST
/// alike: the guest reads the host's TSC, so a restored guest's TSC is off by the time the
/// snapshot was kept (docs/PVM_HOSTS.md).
pub fn tsc_restore_error(vcpu: &VcpuFd, state: &VcpuState) -> Result<Option<f64>> {
    let Some(saved) = state.msrs.iter().find(|e| e.index == MSR_IA32_TSC) else {
        return Ok(None);
    };
    let khz = match state.tsc_khz {
        Some(k) if k > 0 => k,
        _ => match vcpu.get_tsc_khz() {
            Ok(k) if k > 0 => k,
            _ => return Ok(None),
        },
    };
    let now = get_msrs(vcpu, &[MSR_IA32_TSC])?[0].data;
    let off = now.wrapping_sub(saved.data) as i64 as f64 / (f64::from(khz) * 1000.0);
    Ok((off.abs() > 1.0).then_some(off))
}

/// Tells KVM the vCPU was paused by the host (KVM_KVMCLOCK_CTRL), so that the guest's soft-lockup
/// watchdog does not fire on resume. Call it on each paused vCPU before snapshotting or resuming.
///
/// KVM returns EINVAL while the guest has not enabled kvmclock (early boot, tiny test guests,
/// `no-kvmclock`); that is logged at debug level and is not an error.
pub fn kvmclock_ctrl(vcpu: &VcpuFd) -> Result<()> {
    match vcpu.kvmclock_ctrl() {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == libc::EINVAL => {
            log::debug!("KVM_KVMCLOCK_CTRL: EINVAL, the guest has not enabled kvmclock");
            Ok(())
        }
        Err(e) => Err(VcpuStateError::KvmclockCtrl(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::MSR_IA32_TSC;
    use super::*;
    use crate::arch::x86_64::msrs::{MSR_LSTAR, msrs_to_save, readable_msrs};
    use crate::arch::x86_64::test_support::{kvm_or_skip, test_vm};

    #[test]
    fn bad_state_is_an_error() {
        let Some(kvm) = kvm_or_skip() else { return };
        let src = test_vm(&kvm, true);
        let list = readable_msrs(&src.vcpu, &msrs_to_save(&kvm).unwrap()).unwrap();
        let good = save_vcpu(&src.vcpu, &kvm, &list).unwrap();
        let dst = test_vm(&kvm, false);
        restore_vcpu(&dst.vcpu, &kvm, &good).unwrap();
        const BOGUS_MSR: u32 = 0xdead_beef;

        // An MSR list with an index KVM cannot read.
        let err = save_vcpu(&src.vcpu, &kvm, &[MSR_IA32_TSC, BOGUS_MSR, MSR_LSTAR]).unwrap_err();
        assert!(
            matches!(
                err,
                VcpuStateError::GetMsrsIncomplete {
                    read: 1,
                    wanted: 3,
                    first_failed: BOGUS_MSR
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("0xdeadbeef"), "{err}");

        // A saved MSR KVM refuses to set.
        let mut bad = good.clone();
        bad.msrs.insert(2, msr_entry(BOGUS_MSR, 1));
        let err = restore_vcpu(&dst.vcpu, &kvm, &bad).unwrap_err();
        assert!(
            matches!(
                err,
                VcpuStateError::SetMsrsIncomplete {
                    set: 2,
                    first_failed: BOGUS_MSR,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("0xdeadbeef"), "{err}");

        // An MSR list truncated to the TSC deadline alone still restores.
        let mut only_deadline = good.clone();
        only_deadline
            .msrs
            .retain(|e| e.index == MSR_IA32_TSC_DEADLINE);
        restore_vcpu(&dst.vcpu, &kvm, &only_deadline).unwrap();

        let mut bad = good.clone();
        bad.mp_state.mp_state = 99;
        let err = restore_vcpu(&dst.vcpu, &kvm, &bad).unwrap_err();
        assert!(matches!(err, VcpuStateError::SetMpState(_)), "{err:?}");

        let mut bad = good.clone();
        bad.cpuid = vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1];
        let err = restore_vcpu(&dst.vcpu, &kvm, &bad).unwrap_err();
        assert!(matches!(err, VcpuStateError::CpuidBuffer { .. }), "{err:?}");

        if let FpuState::Xsave(words) = &good.fpu {
            let mut bad = good.clone();
            bad.fpu = FpuState::Xsave(vec![u32::MAX; words.len()]);
            let err = restore_vcpu(&dst.vcpu, &kvm, &bad).unwrap_err();
            assert!(matches!(err, VcpuStateError::SetXsave(_)), "{err:?}");
            // A short area is zero-padded to this host's size (an empty XSTATE_BV: init state).
            bad.fpu = FpuState::Xsave(words[..200].to_vec());
            restore_vcpu(&dst.vcpu, &kvm, &bad).unwrap();
        }

        let blob = bincode::serialize(&good).unwrap();
        for cut in [0, 1, blob.len() / 3, blob.len() - 1] {
            assert!(bincode::deserialize::<VcpuState>(&blob[..cut]).is_err());
        }
        restore_vcpu(&dst.vcpu, &kvm, &good).unwrap();
    }

    #[test]
    fn fpu_regs_and_tsc_tolerance() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        let regs = FpuRegs::from(fpu);
        assert_eq!(kvm_fpu::from(regs), fpu);
        let back: FpuRegs = bincode::deserialize(&bincode::serialize(&regs).unwrap()).unwrap();
        assert_eq!(back, regs);

        assert!(!tsc_khz_differs(2_596_128, 2_596_128));
        assert!(!tsc_khz_differs(2_596_128 + 600, 2_596_128)); // 231 ppm
        assert!(tsc_khz_differs(2_596_128 + 700, 2_596_128)); // 270 ppm
        assert!(tsc_khz_differs(2_000_000, 2_596_128));
        assert!(!tsc_khz_differs(u32::MAX, u32::MAX));
    }

    #[test]
    fn tsc_deadline_survives_restore() {
        let Some(kvm) = kvm_or_skip() else { return };
        let src = test_vm(&kvm, true);
        let list = readable_msrs(&src.vcpu, &msrs_to_save(&kvm).unwrap()).unwrap();
        if !list.contains(&MSR_IA32_TSC_DEADLINE) {
            eprintln!("SKIP: MSR_IA32_TSC_DEADLINE is not saveable on this host");
            return;
        }
        // SVR: APIC software-enabled; LVT timer: TSC-deadline mode, masked, vector 0x30.
        let mut lapic = src.vcpu.get_lapic().unwrap();
        for (off, val) in [(0xf0, 0x1ffu32), (0x320, 0x5_0030)] {
            for (i, b) in val.to_le_bytes().into_iter().enumerate() {
                lapic.regs[off + i] = b as _;
            }
        }
        src.vcpu.set_lapic(&lapic).unwrap();
        let tsc = get_msrs(&src.vcpu, &[MSR_IA32_TSC]).unwrap()[0].data;
        let deadline = tsc + (1 << 50);
        set_msrs(
            &src.vcpu,
            &[msr_entry(MSR_IA32_TSC_DEADLINE, deadline)],
            0,
            1,
        )
        .unwrap();

        let deadline_of = |s: &VcpuState| {
            s.msrs
                .iter()
                .find(|e| e.index == MSR_IA32_TSC_DEADLINE)
                .map(|e| e.data)
        };
        let saved = save_vcpu(&src.vcpu, &kvm, &list).unwrap();
        assert_eq!(deadline_of(&saved), Some(deadline));
        let dst = test_vm(&kvm, false);
        restore_vcpu(&dst.vcpu, &kvm, &saved).unwrap();
        let again = save_vcpu(&dst.vcpu, &kvm, &list).unwrap();
        assert_eq!(deadline_of(&again), Some(deadline));
    }

    #[test]
    fn fpu_fallback_restores() {
        let Some(kvm) = kvm_or_skip() else { return };
        let t = test_vm(&kvm, true);
        let mut regs = FpuRegs::from(t.vcpu.get_fpu().unwrap());
        regs.xmm[3] = [0xab; 16];
        regs.mxcsr = 0x1fa0;
        restore_fpu(&t.vcpu, &kvm, &FpuState::Fpu(Box::new(regs))).unwrap();
        let back = FpuRegs::from(t.vcpu.get_fpu().unwrap());
        assert_eq!(back.xmm[3], [0xab; 16]);
        // KVM_GET_FPU/KVM_SET_FPU never carry MXCSR (a long-standing KVM quirk): reads give 0.
        assert_eq!(back.mxcsr, 0);
    }

    #[test]
    fn kvmclock_ctrl_without_kvmclock_is_ok() {
        let Some(kvm) = kvm_or_skip() else { return };
        let t = test_vm(&kvm, true);
        kvmclock_ctrl(&t.vcpu).unwrap();
    }

    /// The minimal proof of what a host does with a written guest TSC: KVM by the book makes
    /// the vCPU's TSC continue from the value written; the PVM hosts ignore the write.
    #[test]
    fn tsc_write_is_honoured_or_reported() {
        let Some(kvm) = kvm_or_skip() else { return };
        let src = test_vm(&kvm, true);
        let list = readable_msrs(&src.vcpu, &msrs_to_save(&kvm).unwrap()).unwrap();
        let mut saved = save_vcpu(&src.vcpu, &kvm, &list).unwrap();
        let khz = u64::from(saved.tsc_khz.unwrap_or(0));
        if khz == 0 {
            eprintln!("SKIP: no KVM_GET_TSC_KHZ");
            return;
        }
        let tsc = saved
            .msrs
            .iter_mut()
            .find(|e| e.index == MSR_IA32_TSC)
            .unwrap();
        // As if the snapshot had been kept for 100 s.
        tsc.data -= 100 * khz * 1000;
        let dst = test_vm(&kvm, false);
        restore_vcpu(&dst.vcpu, &kvm, &saved).unwrap();
        let off = tsc_restore_error(&dst.vcpu, &saved).unwrap();
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            let off = off.expect("a PVM host that honours TSC writes: update docs/PVM_HOSTS.md");
            eprintln!("PVM host: the written TSC was ignored, the vCPU's is {off:+.1} s off");
            assert!((99.0..200.0).contains(&off), "{off}");
        } else {
            assert_eq!(off, None, "KVM did not set the guest TSC as written");
        }
        assert_eq!(
            tsc_restore_error(&src.vcpu, &save_vcpu(&src.vcpu, &kvm, &list).unwrap()).unwrap(),
            None
        );
    }
}
