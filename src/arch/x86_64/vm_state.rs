//! The VM-wide x86_64 device state KVM emulates in the kernel — the two 8259 PICs, the IOAPIC,
//! the PIT and the kvmclock base — saved and restored as a plain serde struct ([`VmState`]).
//!
//! Restore order: PIT, clock, then the irqchip (PIC master, PIC slave, IOAPIC).
//!
//! The clock is kvmclock's base (KVM_SET_CLOCK). By default a restored guest's kvmclock
//! continues from the saved value, so its monotonic time does not include the time the
//! snapshot was kept ([`ClockMode::Continue`]); [`ClockMode::Realtime`] advances it by the
//! real time that passed instead (docs/KEEPING_SNAPSHOTS.md, "Time").

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring the VM-wide state; each names the ioctl (or check) that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// KVM_GET_PIT2 failed.
    #[error("KVM_GET_PIT2 failed")]
    GetPit2(#[source] kvm_ioctls::Error),
    /// KVM_SET_PIT2 failed.
    #[error("KVM_SET_PIT2 failed")]
    SetPit2(#[source] kvm_ioctls::Error),
    /// KVM_GET_CLOCK failed.
    #[error("KVM_GET_CLOCK failed")]
    GetClock(#[source] kvm_ioctls::Error),
    /// KVM_SET_CLOCK failed.
    #[error("KVM_SET_CLOCK failed")]
    SetClock(#[source] kvm_ioctls::Error),
    /// KVM_GET_IRQCHIP failed.
    #[error("KVM_GET_IRQCHIP ({chip}) failed")]
    GetIrqchip {
        /// Which chip: "PIC master", "PIC slave" or "IOAPIC".
        chip: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_IRQCHIP failed.
    #[error("KVM_SET_IRQCHIP ({chip}) failed")]
    SetIrqchip {
        /// Which chip: "PIC master", "PIC slave" or "IOAPIC".
        chip: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// [`ClockMode::Realtime`] was asked for, but the snapshot's KVM did not report the host's
    /// real time with the clock (no KVM_CLOCK_REALTIME in the saved flags, Linux < 5.16).
    #[error(
        "the snapshot does not record the host's real time with its clock (saved KVM_GET_CLOCK \
         flags {0:#x} lack KVM_CLOCK_REALTIME), so the clock cannot be advanced by the time \
         since the snapshot"
    )]
    NoSavedRealtime(u32),
    /// A saved irqchip's `chip_id` is not the chip it is stored as (a corrupt state), so
    /// KVM_SET_IRQCHIP is not attempted.
    #[error("KVM_SET_IRQCHIP ({chip}): saved state has chip_id {found}, expected {expected}")]
    IrqchipIdMismatch {
        /// Which chip the state is stored as.
        chip: &'static str,
        /// The chip id that chip has.
        expected: u32,
        /// The chip id found in the saved state.
        found: u32,
    },
}

/// Result of this module's functions.
pub type Result<T> = std::result::Result<T, VmStateError>;

/// The in-kernel devices of an x86_64 VM (KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2) and its clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC (KVM_IRQCHIP_PIC_MASTER).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC (KVM_IRQCHIP_PIC_SLAVE).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (KVM_IRQCHIP_IOAPIC).
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT's three channels and flags.
    pub pit2: kvm_pit_state2,
    /// The kvmclock base (KVM_GET_CLOCK), flags as KVM reported them.
    pub clock: kvm_clock_data,
}

/// How a restored VM's kvmclock continues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockMode {
    /// From the value saved in the snapshot: the guest's monotonic time does not see the time
    /// the snapshot was kept, however long (the default).
    #[default]
    Continue,
    /// Advanced by the real time that passed since the snapshot (KVM_CLOCK_REALTIME, as
    /// Firecracker's `clock_realtime`): the guest's monotonic *and* wall clocks jump by the
    /// gap, and a periodic-tick guest then catches up on every tick it missed.
    Realtime,
}

/// The irqchips in restore order, with the names used in errors.
const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

fn get_irqchip(vm: &VmFd, chip_id: u32, chip: &'static str) -> Result<kvm_irqchip> {
    let mut irqchip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut irqchip)
        .map_err(|source| VmStateError::GetIrqchip { chip, source })?;
    Ok(irqchip)
}

/// Saves the VM-wide state of `vm`, whose vCPUs are paused.
pub fn save_vm(vm: &VmFd) -> Result<VmState> {
    let pit2 = vm.get_pit2().map_err(VmStateError::GetPit2)?;
    let clock = vm.get_clock().map_err(VmStateError::GetClock)?;
    let [master, slave, ioapic] = CHIPS;
    Ok(VmState {
        pic_master: get_irqchip(vm, master.0, master.1)?,
        pic_slave: get_irqchip(vm, slave.0, slave.1)?,
        ioapic: get_irqchip(vm, ioapic.0, ioapic.1)?,
        pit2,
        clock,
    })
}

/// The KVM_SET_CLOCK argument that restores `saved` in `mode`.
///
/// `host_flags` are the KVM_CLOCK_* flags this host's KVM_SET_CLOCK accepts
/// (KVM_CAP_ADJUST_CLOCK) and `now_real_ns` the host's real time now, used only when
/// [`ClockMode::Realtime`] must be emulated because KVM cannot do it. KVM_CLOCK_TSC_STABLE
/// and KVM_CLOCK_HOST_TSC, which KVM only reports, are never passed back.
pub fn clock_to_set(
    saved: &kvm_clock_data,
    mode: ClockMode,
    host_flags: u32,
    now_real_ns: u64,
) -> Result<kvm_clock_data> {
    let mut clock = kvm_clock_data {
        clock: saved.clock,
        ..Default::default()
    };
    if mode == ClockMode::Continue {
        return Ok(clock);
    }
    if saved.flags & KVM_CLOCK_REALTIME == 0 {
        return Err(VmStateError::NoSavedRealtime(saved.flags));
    }
    if host_flags & KVM_CLOCK_REALTIME != 0 {
        // KVM adds the real time elapsed since `realtime`, at the moment it sets the clock.
        clock.flags = KVM_CLOCK_REALTIME;
        clock.realtime = saved.realtime;
    } else {
        clock.clock = saved
            .clock
            .saturating_add(now_real_ns.saturating_sub(saved.realtime));
    }
    Ok(clock)
}

/// Restores `state` into a freshly created `vm` that has its in-kernel irqchip and PIT2 and no
/// running vCPU: PIT, clock (as `clock_mode` says, see [`clock_to_set`]), PIC master, PIC
/// slave, IOAPIC. `kvm` tells which KVM_SET_CLOCK flags the host has.
pub fn restore_vm(vm: &VmFd, kvm: &Kvm, state: &VmState, clock_mode: ClockMode) -> Result<()> {
    vm.set_pit2(&state.pit2).map_err(VmStateError::SetPit2)?;
    let host_flags =
        u32::try_from(kvm.check_extension_raw(kvm_bindings::KVM_CAP_ADJUST_CLOCK.into()))
            .unwrap_or(0);
    let now_real_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let clock = clock_to_set(&state.clock, clock_mode, host_flags, now_real_ns)?;
    vm.set_clock(&clock).map_err(VmStateError::SetClock)?;
    for (irqchip, (expected, chip)) in [&state.pic_master, &state.pic_slave, &state.ioapic]
        .into_iter()
        .zip(CHIPS)
    {
        if irqchip.chip_id != expected {
            return Err(VmStateError::IrqchipIdMismatch {
                chip,
                expected,
                found: irqchip.chip_id,
            });
        }
        vm.set_irqchip(irqchip)
            .map_err(|source| VmStateError::SetIrqchip { chip, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::msrs::{
        MSR_IA32_SYSENTER_CS, MSR_IA32_TSC, MSR_KERNEL_GS_BASE, MSR_LSTAR, msrs_to_save,
        readable_msrs,
    };
    use crate::arch::x86_64::test_support::{self, kvm_or_skip, test_vm};
    use crate::arch::x86_64::vcpu_state::{
        FpuState, VcpuState, kvmclock_ctrl, restore_vcpu, save_vcpu,
    };
    use kvm_bindings::{Msrs, kvm_lapic_state, kvm_msr_entry};

    const LAPIC_TPR: usize = 0x80;
    const LAPIC_SVR: usize = 0xf0;
    const LAPIC_LVT_TIMER: usize = 0x320;
    const LAPIC_LVT_LINT0: usize = 0x350;
    const LAPIC_TIMER_INITIAL: usize = 0x380;
    const LAPIC_TIMER_CURRENT: usize = 0x390;
    const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
    const IOAPIC_ENTRY: u64 = (1 << 56) | (1 << 16) | 0x35;
    /// XSAVE legacy area: MXCSR at byte 24, XMM0 at byte 160, XSTATE_BV at byte 512.
    const XSAVE_MXCSR_WORD: usize = 6;
    const XSAVE_XMM0_WORD: usize = 40;
    const XSAVE_XSTATE_BV_WORD: usize = 128;

    fn lapic_get(l: &kvm_lapic_state, off: usize) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8))
    }

    fn lapic_set(l: &mut kvm_lapic_state, off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            l.regs[off + i] = b as _;
        }
    }

    fn msr(state: &VcpuState, index: u32) -> u64 {
        state
            .msrs
            .iter()
            .find(|e| e.index == index)
            .unwrap_or_else(|| panic!("MSR {index:#x} not saved"))
            .data
    }

    /// Puts recognisable values into every part of the source VM's state.
    fn set_distinctive_state(t: &test_support::TestVm) {
        let vcpu = &t.vcpu;
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1111_2222_3333_4444;
        regs.rbx = 0x5555_6666_7777_8888;
        regs.r15 = 0xfeed_face_cafe_beef;
        regs.rsp = 0x8000;
        regs.rip = 0x1000;
        regs.rflags = 0x2 | 0x40; // reserved bit 1, ZF
        vcpu.set_regs(&regs).unwrap();

        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr2 = 0xdead_b000;
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 0x1f;
        vcpu.set_sregs(&sregs).unwrap();

        let mut dregs = vcpu.get_debug_regs().unwrap();
        dregs.db[0] = 0x1234_5000;
        vcpu.set_debug_regs(&dregs).unwrap();

        if let Ok(mut xsave) = vcpu.get_xsave() {
            xsave.region[XSAVE_MXCSR_WORD] = 0x1fa0; // default 0x1f80 + precision flag
            xsave.region[XSAVE_XMM0_WORD] = 0xdead_beef;
            xsave.region[XSAVE_XSTATE_BV_WORD] |= 0x3; // x87 and SSE state present
            // SAFETY: KVM_CAP_XSAVE2 is at most 4096 on the hosts where KVM_GET_XSAVE works
            // (it fails otherwise), so KVM reads only inside `xsave`.
            unsafe { vcpu.set_xsave(&xsave) }.unwrap();
        }

        let mut lapic = vcpu.get_lapic().unwrap();
        lapic_set(&mut lapic, LAPIC_SVR, 0x1ff);
        lapic_set(&mut lapic, LAPIC_TPR, 0x30);
        lapic_set(&mut lapic, LAPIC_LVT_LINT0, 0x700);
        lapic_set(&mut lapic, LAPIC_TIMER_DIVIDE, 0xb);
        lapic_set(&mut lapic, LAPIC_LVT_TIMER, 0x1_0030); // masked one-shot, vector 0x30
        lapic_set(&mut lapic, LAPIC_TIMER_INITIAL, 0x4000_0000);
        vcpu.set_lapic(&lapic).unwrap();

        let entries = [
            msr_entry(MSR_IA32_SYSENTER_CS, 0x10),
            msr_entry(MSR_KERNEL_GS_BASE, 0xffff_8880_1234_5000),
            msr_entry(MSR_LSTAR, 0xffff_ffff_8100_0000),
            msr_entry(MSR_IA32_TSC, 1 << 40),
        ];
        let msrs = Msrs::from_entries(&entries).unwrap();
        assert_eq!(vcpu.set_msrs(&msrs).unwrap(), entries.len());

        let mut pit = t.vm.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        t.vm.set_pit2(&pit).unwrap();
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        t.vm.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip_id is KVM_IRQCHIP_IOAPIC, so `ioapic` is the member KVM filled in; it is
        // plain data, valid for any bit pattern.
        unsafe { ioapic.chip.ioapic.redirtbl[5].bits = IOAPIC_ENTRY };
        t.vm.set_irqchip(&ioapic).unwrap();
        t.vm.set_clock(&kvm_clock_data {
            clock: 123_456_789_000,
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn vcpu_and_vm_round_trip() {
        let Some(kvm) = kvm_or_skip() else { return };
        let src = test_vm(&kvm, true);
        set_distinctive_state(&src);
        let list = readable_msrs(&src.vcpu, &msrs_to_save(&kvm).unwrap()).unwrap();

        kvmclock_ctrl(&src.vcpu).unwrap();
        let vcpu_saved = save_vcpu(&src.vcpu, &kvm, &list).unwrap();
        let vm_saved = save_vm(&src.vm).unwrap();
        assert_eq!(vcpu_saved.msrs.len(), list.len());
        assert_eq!(vcpu_saved.regs.r15, 0xfeed_face_cafe_beef);
        assert_eq!(msr(&vcpu_saved, MSR_KERNEL_GS_BASE), 0xffff_8880_1234_5000);
        assert!(msr(&vcpu_saved, MSR_IA32_TSC) >= 1 << 40);
        assert_eq!(lapic_get(&vcpu_saved.lapic, LAPIC_TPR), 0x30);
        let blob = bincode::serialize(&(&vcpu_saved, &vm_saved)).unwrap();
        let (vcpu_state, vm_state): (VcpuState, VmState) = bincode::deserialize(&blob).unwrap();
        assert_eq!(vcpu_state, vcpu_saved);
        eprintln!(
            "state: {} bytes, {} MSRs, {} CPUID entries, fpu {}, xcrs {}, tsc_khz {:?}",
            blob.len(),
            vcpu_state.msrs.len(),
            vcpu_state.cpuid.len(),
            match &vcpu_state.fpu {
                FpuState::Xsave(w) => format!("XSAVE {} bytes", w.len() * 4),
                FpuState::Fpu(_) => "FPU".into(),
            },
            vcpu_state.xcrs.is_some(),
            vcpu_state.tsc_khz
        );

        let dst = test_vm(&kvm, false);
        restore_vm(&dst.vm, &kvm, &vm_state, ClockMode::Continue).unwrap();
        restore_vcpu(&dst.vcpu, &kvm, &vcpu_state).unwrap();
        let vcpu_again = save_vcpu(&dst.vcpu, &kvm, &list).unwrap();
        let vm_again = save_vm(&dst.vm).unwrap();

        assert_eq!(vcpu_again.cpuid, vcpu_saved.cpuid);
        assert_eq!(vcpu_again.mp_state, vcpu_saved.mp_state);
        assert_eq!(vcpu_again.regs, vcpu_saved.regs);
        assert_eq!(vcpu_again.sregs, vcpu_saved.sregs);
        assert_eq!(vcpu_again.fpu, vcpu_saved.fpu);
        if let FpuState::Xsave(w) = &vcpu_again.fpu {
            assert_eq!(w[XSAVE_XMM0_WORD], 0xdead_beef);
            assert_eq!(w[XSAVE_MXCSR_WORD], 0x1fa0);
        }
        assert_eq!(vcpu_again.xcrs, vcpu_saved.xcrs);
        assert_eq!(vcpu_again.debugregs, vcpu_saved.debugregs);
        assert_eq!(vcpu_again.tsc_khz, vcpu_saved.tsc_khz);
        assert_eq!(vcpu_again.vcpu_events, vcpu_saved.vcpu_events);

        let (mut l1, mut l2) = (vcpu_saved.lapic, vcpu_again.lapic);
        assert!(lapic_get(&l2, LAPIC_TIMER_CURRENT) <= 0x4000_0000);
        lapic_set(&mut l1, LAPIC_TIMER_CURRENT, 0);
        lapic_set(&mut l2, LAPIC_TIMER_CURRENT, 0);
        assert_eq!(l1.regs, l2.regs);
        assert_eq!(lapic_get(&l2, LAPIC_LVT_LINT0), 0x700);

        let (tsc1, tsc2) = (
            msr(&vcpu_saved, MSR_IA32_TSC),
            msr(&vcpu_again, MSR_IA32_TSC),
        );
        let khz = u64::from(vcpu_saved.tsc_khz.unwrap_or(4_000_000));
        assert!(
            tsc2 >= tsc1 && tsc2 - tsc1 < khz * 10_000,
            "TSC {tsc1:#x} -> {tsc2:#x}"
        );
        for (a, b) in vcpu_saved.msrs.iter().zip(&vcpu_again.msrs) {
            assert_eq!(a.index, b.index);
            if a.index != MSR_IA32_TSC {
                assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
            }
        }

        let bytes = |t: &kvm_irqchip| bincode::serialize(t).unwrap();
        assert_eq!(bytes(&vm_again.ioapic), bytes(&vm_saved.ioapic));
        assert_eq!(bytes(&vm_again.pic_master), bytes(&vm_saved.pic_master));
        assert_eq!(bytes(&vm_again.pic_slave), bytes(&vm_saved.pic_slave));
        // SAFETY: chip_id is KVM_IRQCHIP_IOAPIC, plain data valid for any bit pattern.
        let entry = unsafe { vm_again.ioapic.chip.ioapic.redirtbl[5].bits };
        assert_eq!(entry, IOAPIC_ENTRY);
        for (a, b) in vm_saved.pit2.channels.iter().zip(&vm_again.pit2.channels) {
            // KVM_SET_PIT2 reloads the counters now: only the load timestamp differs.
            let (mut a, mut b) = (*a, *b);
            a.count_load_time = 0;
            b.count_load_time = 0;
            assert_eq!(a, b);
        }
        assert_eq!(vm_again.pit2.channels[0].count, 0x1234);
        assert!(vm_saved.clock.clock >= 123_456_789_000);
        assert!(
            vm_again.clock.clock >= vm_saved.clock.clock
                && vm_again.clock.clock - vm_saved.clock.clock < 10_000_000_000,
            "clock {} -> {}",
            vm_saved.clock.clock,
            vm_again.clock.clock
        );
    }

    fn msr_entry(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn restore_vm_rejects_corrupt_state() {
        let Some(kvm) = kvm_or_skip() else { return };
        let t = test_vm(&kvm, false);
        let good = save_vm(&t.vm).unwrap();

        let mut swapped = good.clone();
        std::mem::swap(&mut swapped.pic_slave, &mut swapped.ioapic);
        let err = restore_vm(
            &test_vm(&kvm, false).vm,
            &kvm,
            &swapped,
            ClockMode::Continue,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                VmStateError::IrqchipIdMismatch {
                    expected: KVM_IRQCHIP_PIC_SLAVE,
                    found: KVM_IRQCHIP_IOAPIC,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("KVM_SET_IRQCHIP (PIC slave)"));

        // A VM without the in-kernel devices: the first ioctl, KVM_SET_PIT2, fails.
        let bare = kvm.create_vm().unwrap();
        let err = restore_vm(&bare, &kvm, &good, ClockMode::Continue).unwrap_err();
        assert!(matches!(err, VmStateError::SetPit2(_)), "{err:?}");
        assert!(matches!(save_vm(&bare), Err(VmStateError::GetPit2(_))));

        // A truncated serialized state is a decode error, not a panic.
        let blob = bincode::serialize(&good).unwrap();
        assert!(bincode::deserialize::<VmState>(&blob[..blob.len() / 2]).is_err());
    }

    #[test]
    fn clock_to_set_modes() {
        use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_TSC_STABLE};
        let all = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
        let saved = kvm_clock_data {
            clock: 5_000_000_000,
            flags: all,
            realtime: 1_000_000_000_000,
            host_tsc: 77,
            ..Default::default()
        };
        // Continue: only the clock, no flags, whatever the host has.
        let c = clock_to_set(&saved, ClockMode::Continue, all, 2_000_000_000_000).unwrap();
        assert_eq!((c.clock, c.flags, c.realtime), (saved.clock, 0, 0));
        // Realtime on a host with KVM_CLOCK_REALTIME: KVM adds the elapsed time itself.
        let c = clock_to_set(&saved, ClockMode::Realtime, all, 2_000_000_000_000).unwrap();
        assert_eq!(
            (c.clock, c.flags, c.realtime),
            (saved.clock, KVM_CLOCK_REALTIME, saved.realtime)
        );
        // Without it, the VMM adds it (never a negative amount).
        let c = clock_to_set(
            &saved,
            ClockMode::Realtime,
            KVM_CLOCK_TSC_STABLE,
            1_000_300_000_000,
        )
        .unwrap();
        assert_eq!((c.clock, c.flags), (5_300_000_000, 0));
        let c = clock_to_set(&saved, ClockMode::Realtime, 0, 1).unwrap();
        assert_eq!(c.clock, saved.clock);
        // A snapshot whose KVM did not record the real time cannot be advanced.
        let old = kvm_clock_data {
            flags: KVM_CLOCK_TSC_STABLE,
            ..saved
        };
        let err = clock_to_set(&old, ClockMode::Realtime, all, 1).unwrap_err();
        assert!(matches!(err, VmStateError::NoSavedRealtime(f) if f == KVM_CLOCK_TSC_STABLE));
        assert!(err.to_string().contains("KVM_CLOCK_REALTIME"), "{err}");
    }

    #[test]
    fn clock_restore_continue_and_realtime() {
        let Some(kvm) = kvm_or_skip() else { return };
        let src = test_vm(&kvm, true);
        let mut saved = save_vm(&src.vm).unwrap();
        if saved.clock.flags & KVM_CLOCK_REALTIME == 0 {
            eprintln!("SKIP: this KVM does not report KVM_CLOCK_REALTIME");
            return;
        }
        // As if the snapshot had been taken 100 s ago.
        const GAP_NS: u64 = 100_000_000_000;
        saved.clock.realtime -= GAP_NS;
        let cont = test_vm(&kvm, false);
        restore_vm(&cont.vm, &kvm, &saved, ClockMode::Continue).unwrap();
        let got = cont.vm.get_clock().unwrap().clock;
        assert!(
            got >= saved.clock.clock && got - saved.clock.clock < GAP_NS / 10,
            "continue: {} -> {got}",
            saved.clock.clock
        );
        let real = test_vm(&kvm, false);
        restore_vm(&real.vm, &kvm, &saved, ClockMode::Realtime).unwrap();
        let got = real.vm.get_clock().unwrap().clock;
        let advanced = got - saved.clock.clock;
        assert!(
            (GAP_NS..GAP_NS + GAP_NS / 10).contains(&advanced),
            "realtime: advanced {advanced} ns, expected about {GAP_NS}"
        );
    }
}
