//! The KVM VM: in-kernel irqchip + PIT, memory slots, vCPU creation.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::vstate::memory::GuestMemory;

mod persist;

pub use persist::{InKernelDevices, InKernelRestoreArgs};

/// Errors of the VM module.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("KVM lacks capability {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs requested than KVM allows.
    #[error("{requested} vCPUs requested but KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: u32,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// TSS address used by Intel VMX (three pages just below the BIOS area), as other VMMs use.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM with an in-kernel irqchip and PIT.
pub struct Vm {
    kvm: std::sync::Arc<Kvm>,
    fd: std::sync::Arc<VmFd>,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Self {
            kvm: std::sync::Arc::new(kvm),
            fd: std::sync::Arc::new(fd),
        })
    }

    /// The system KVM handle.
    pub fn kvm(&self) -> &std::sync::Arc<Kvm> {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd, shared (what the saved components keep to reach the VM).
    pub fn shared_fd(&self) -> std::sync::Arc<VmFd> {
        self.fd.clone()
    }

    /// The VM's in-kernel irqchip, PIT and kvmclock, as a saved component.
    pub fn in_kernel_devices(&self) -> InKernelDevices {
        InKernelDevices {
            vm: self.fd.clone(),
        }
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    /// Checks a vCPU count against KVM's limit.
    pub fn check_vcpu_count(&self, n: u32) -> Result<(), VmError> {
        let max = self.max_vcpus();
        if n > max {
            return Err(VmError::TooManyVcpus { requested: n, max });
        }
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot (slot = region index).
    pub fn register_memory(&self, mem: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping stays alive as long as `mem`, and the caller
            // keeps `mem` alive (it is owned by the Vmm next to this Vm) for the VM's lifetime.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))
    }
}
