//! Older state-file versions. Each `StateVN` is the exact payload shape of version N
//! (bincode decodes fields in order, so a type must match field for field); the reader in
//! `microvm` converts it into the current `MicrovmState`. A format change copies the
//! structs it changes here, frozen, and adds the conversion there
//! (docs/KEEPING_SNAPSHOTS.md, "Versions").

use std::path::PathBuf;

use serde::Deserialize;

use super::BlockSnapshot;
use crate::arch::x86_64::cpu_template::{CpuRecord, CpuTemplate};
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::arch::x86_64::vm_state::VmState;
use crate::config::{BlockConfig, KernelConfig};
use crate::devices::legacy::SerialDeviceState;

/// `VmConfig` of state version 2: no CPU template.
#[derive(Deserialize)]
pub(super) struct VmConfigV2 {
    pub(super) kernel: KernelConfig,
    pub(super) initrd: Option<PathBuf>,
    pub(super) mem_mib: u64,
    pub(super) vcpus: u8,
    pub(super) blocks: Vec<BlockConfig>,
    pub(super) host_quirks: bool,
}

/// The payload of state version 2 (before CPU records and templates).
#[derive(Deserialize)]
pub(super) struct StateV2 {
    pub(super) config: VmConfigV2,
    pub(super) cmdline: String,
    pub(super) memory_regions: Vec<(u64, u64)>,
    pub(super) vcpus: Vec<VcpuState>,
    pub(super) vm: VmState,
    pub(super) serial: SerialDeviceState,
    pub(super) blocks: Vec<BlockSnapshot>,
    pub(super) store: Option<PathBuf>,
    pub(super) created_unix: u64,
}

/// Where a version 2 snapshot's guest was booted: not recorded.
pub(super) const V2_HOST: &str = "an unrecorded host (state format 2)";

/// `VmConfig` of state version 3: no network interfaces.
#[derive(Deserialize)]
pub(super) struct VmConfigV3 {
    pub(super) kernel: KernelConfig,
    pub(super) initrd: Option<PathBuf>,
    pub(super) mem_mib: u64,
    pub(super) vcpus: u8,
    pub(super) blocks: Vec<BlockConfig>,
    pub(super) host_quirks: bool,
    pub(super) cpu_template: CpuTemplate,
}

/// The payload of state version 3 (before virtio-net).
#[derive(Deserialize)]
pub(super) struct StateV3 {
    pub(super) config: VmConfigV3,
    pub(super) cmdline: String,
    pub(super) memory_regions: Vec<(u64, u64)>,
    pub(super) vcpus: Vec<VcpuState>,
    pub(super) vm: VmState,
    pub(super) serial: SerialDeviceState,
    pub(super) blocks: Vec<BlockSnapshot>,
    pub(super) store: Option<PathBuf>,
    pub(super) created_unix: u64,
    pub(super) cpu: CpuRecord,
}
