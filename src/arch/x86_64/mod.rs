//! x86_64 support for booting Linux with the 64-bit boot protocol on KVM.
//!
//! Booting a VM, in order:
//! 1. guest memory from [`layout::arch_memory_regions`];
//! 2. [`boot::load_kernel`] (ELF vmlinux or bzImage), then optionally [`boot::load_initrd`];
//! 3. [`mptable::setup_mptable`] and [`boot::configure_system`] (command line + zero page);
//! 4. per vCPU (after KVM_CREATE_IRQCHIP): [`cpuid::normalize_cpuid`] + KVM_SET_CPUID2,
//!    [`msrs::setup_msrs`], [`regs::setup_regs`], [`regs::setup_fpu`], [`regs::setup_sregs`]
//!    and [`interrupts::set_lint`].
//!
//! Each module has its own error type; [`Error`] wraps them all.

pub mod boot;
pub mod cpu_features;
pub mod cpu_template;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vcpu_state;
pub mod vm_state;

pub use boot::{BootError, KernelFormat, KernelLoad, configure_system, load_initrd, load_kernel};
pub use cpuid::{CpuidError, normalize_cpuid};
pub use interrupts::{InterruptError, set_lint};
pub use layout::arch_memory_regions;
pub use mptable::{MptableError, setup_mptable};
pub use msrs::{MsrError, msrs_to_save, setup_msrs};
pub use regs::{RegsError, setup_fpu, setup_regs, setup_sregs};
pub use vcpu_state::{
    FpuRegs, FpuState, VcpuState, VcpuStateError, kvmclock_ctrl, restore_vcpu, save_vcpu,
};
pub use vm_state::{ClockMode, VmState, VmStateError, clock_to_set, restore_vm, save_vm};

/// Any error of the x86_64 boot support.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kernel, initrd, command line or zero page.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPUID normalization.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// CPU templates and CPU compatibility.
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::CpuTemplateError),
    /// Local APIC setup.
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// MSRs.
    #[error(transparent)]
    Msrs(#[from] MsrError),
    /// Registers, segments and page tables.
    #[error(transparent)]
    Regs(#[from] RegsError),
}
