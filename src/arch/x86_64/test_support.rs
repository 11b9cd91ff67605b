//! Test helpers of the arch unit tests: `/dev/kvm` or a skip, and the test VMs shared by
//! `vm_state`'s and `vcpu_state`'s tests.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10_0000;

/// A VM with irqchip, PIT, 1 MiB of memory and one vCPU with KVM's supported CPUID.
/// Fields drop in order: vCPU, VM, then the memory the VM's slot points at.
pub(crate) struct TestVm {
    pub(crate) vcpu: VcpuFd,
    pub(crate) vm: VmFd,
    _mem: GuestMemoryMmap,
}

/// Opens `/dev/kvm` for a test, or prints why the test is skipped.
pub(crate) fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("SKIP: cannot open /dev/kvm: {e}");
            None
        }
    }
}

/// A [`TestVm`], its vCPU given KVM's supported CPUID when `set_cpuid`.
pub(crate) fn test_vm(kvm: &Kvm, set_cpuid: bool) -> TestVm {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is a live MEM_SIZE-byte mapping owned by `mem`, which the returned
    // TestVm keeps until after the VM is closed.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    if set_cpuid {
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
    }
    TestVm {
        vcpu,
        vm,
        _mem: mem,
    }
}
