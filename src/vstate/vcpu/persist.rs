//! [`Persist`] for a KVM vCPU: its registers, CPUID, LAPIC, MSRs, events and TSC frequency
//! ([`VcpuState`], `crate::arch::x86_64::vcpu_state`). Saving runs on the vCPU's own thread
//! while it is paused ([`VcpuHandle::with_vcpu`](super::VcpuHandle::with_vcpu)); restoring
//! creates the vCPU in the VM and gives it the saved state before its thread starts.

use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

use super::KvmVcpu;
use crate::arch::x86_64::msrs::{self, MsrError};
use crate::arch::x86_64::vcpu_state::{self, VcpuState, VcpuStateError};
use crate::formats::Persist;

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuPersistError {
    /// The list of MSRs to save could not be read.
    #[error("reading the list of MSRs to save")]
    Msrs(#[source] MsrError),
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU failed")]
    Create(#[source] kvm_ioctls::Error),
    /// Reading or setting the vCPU's state failed.
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// What rebuilding a vCPU needs besides its state.
pub struct VcpuRestoreArgs {
    /// The VM the vCPU is created in.
    pub vm: Arc<VmFd>,
    /// The system KVM handle.
    pub kvm: Arc<Kvm>,
    /// The vCPU's index.
    pub id: u8,
}

impl Persist for KvmVcpu {
    type State = VcpuState;
    type Args = VcpuRestoreArgs;
    type Error = VcpuPersistError;

    /// Saves every MSR KVM lists as saveable that this vCPU can read.
    fn save(&self) -> Result<VcpuState, VcpuPersistError> {
        let list = msrs::msrs_to_save(&self.kvm).map_err(VcpuPersistError::Msrs)?;
        let list = msrs::readable_msrs(&self.fd, &list).unwrap_or(list);
        Ok(vcpu_state::save_vcpu(&self.fd, &self.kvm, &list)?)
    }

    fn restore(args: VcpuRestoreArgs, state: &VcpuState) -> Result<Self, VcpuPersistError> {
        let fd = args
            .vm
            .create_vcpu(u64::from(args.id))
            .map_err(VcpuPersistError::Create)?;
        vcpu_state::restore_vcpu(&fd, &args.kvm, state)?;
        Ok(KvmVcpu {
            id: args.id,
            fd,
            kvm: args.kvm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::test_support::kvm_or_skip;
    use crate::vstate::vm::Vm;

    #[test]
    fn save_restore_save_keeps_the_registers() {
        if kvm_or_skip().is_none() {
            return;
        }
        let vm = Vm::new().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        fd.set_regs(&regs).unwrap();
        let v = KvmVcpu {
            id: 0,
            fd,
            kvm: vm.kvm().clone(),
        };
        let s = v.save().unwrap();
        let s: VcpuState = bincode::deserialize(&bincode::serialize(&s).unwrap()).unwrap();
        let vm2 = Vm::new().unwrap();
        let args = VcpuRestoreArgs {
            vm: vm2.shared_fd(),
            kvm: vm2.kvm().clone(),
            id: 0,
        };
        let r = KvmVcpu::restore(args, &s).unwrap();
        let again = r.save().unwrap();
        assert_eq!(again.regs, s.regs);
        assert_eq!(again.sregs, s.sregs);
        assert_eq!(again.cpuid, s.cpuid);
        assert_eq!(again.regs.rax, 0x1234_5678);
    }
}
