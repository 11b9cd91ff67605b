//! KVM state: the VM, its vCPUs and guest memory.

pub mod dirty;
pub mod exit;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vm;
