//! KVM state: the VM, its vCPUs, guest memory, and the port-I/O and MMIO buses the vCPUs' exits
//! are dispatched on (devices sit on them, one layer up).

pub mod bus;
pub mod dirty;
pub mod exit;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vm;
