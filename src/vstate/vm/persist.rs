//! [`Persist`] for the VM-wide state KVM emulates in the kernel: the two 8259 PICs, the
//! IOAPIC, the PIT and the kvmclock base ([`VmState`], `crate::arch::x86_64::vm_state`).
//!
//! KVM creates these devices with the VM (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2); what a
//! restore builds is their state, set after the vCPUs' (the clock is set last of all the
//! KVM state, just before the devices re-raise their interrupts and the vCPUs start).

use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::vm_state::{self, ClockMode, VmState, VmStateError};
use crate::formats::Persist;

/// The in-kernel devices and clock of a VM (see [`super::Vm::in_kernel_devices`]).
pub struct InKernelDevices {
    /// The VM.
    pub(super) vm: Arc<VmFd>,
}

/// What restoring the in-kernel devices needs besides their state.
pub struct InKernelRestoreArgs {
    /// The VM, created with its irqchip and PIT, whose vCPUs do not run yet.
    pub vm: Arc<VmFd>,
    /// The system KVM handle.
    pub kvm: Arc<Kvm>,
    /// How the guest's kvmclock continues.
    pub clock: ClockMode,
}

impl Persist for InKernelDevices {
    type State = VmState;
    type Args = InKernelRestoreArgs;
    type Error = VmStateError;

    fn save(&self) -> Result<VmState, VmStateError> {
        vm_state::save_vm(&self.vm)
    }

    /// Sets the PIT, the clock and the irqchips (in that order) from `state`.
    fn restore(args: InKernelRestoreArgs, state: &VmState) -> Result<Self, VmStateError> {
        vm_state::restore_vm(&args.vm, &args.kvm, state, args.clock)?;
        Ok(Self { vm: args.vm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::test_support::kvm_or_skip;
    use crate::vstate::vm::Vm;

    #[test]
    fn save_restore_save_keeps_the_irqchips_and_pit() {
        if kvm_or_skip().is_none() {
            return;
        }
        let vm = Vm::new().unwrap();
        let s = vm.in_kernel_devices().save().unwrap();
        let s: VmState = bincode::deserialize(&bincode::serialize(&s).unwrap()).unwrap();
        let vm2 = Vm::new().unwrap();
        let args = InKernelRestoreArgs {
            vm: vm2.shared_fd(),
            kvm: vm2.kvm().clone(),
            clock: ClockMode::Continue,
        };
        let r = InKernelDevices::restore(args, &s).unwrap();
        let again = r.save().unwrap();
        assert_eq!(again.pic_master.chip_id, s.pic_master.chip_id);
        // SAFETY: KVM filled the `pic`/`ioapic` member of each saved chip's union, as its
        // chip_id says; both are plain data.
        unsafe {
            assert_eq!(again.pic_master.chip.pic, s.pic_master.chip.pic);
            assert_eq!(again.pic_slave.chip.pic, s.pic_slave.chip.pic);
            let (a, b) = (again.ioapic.chip.ioapic, s.ioapic.chip.ioapic);
            assert_eq!(a.id, b.id);
            for (x, y) in a.redirtbl.iter().zip(&b.redirtbl) {
                assert_eq!(x.bits, y.bits);
            }
        }
        assert_eq!(again.pit2.flags, s.pit2.flags);
    }
}
