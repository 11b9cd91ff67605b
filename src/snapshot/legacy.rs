//! Readers of older state-file versions. Each `StateVN` is the exact payload shape of
//! version N (bincode decodes fields in order, so a type must match field for field), and
//! converts into the current [`MicrovmState`]. A format change copies the structs it
//! changes here, frozen, and adds the conversion (docs/KEEPING_SNAPSHOTS.md, "Versions").

use std::path::PathBuf;

use serde::Deserialize;

use super::microvm::{BlockSnapshot, MicrovmState};
use crate::arch::x86_64::cpu_features::CpuFeatures;
use crate::arch::x86_64::cpu_template::{CpuRecord, CpuTemplate};
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::arch::x86_64::vm_state::VmState;
use crate::config::{BlockConfig, KernelConfig, VmConfig};
use crate::devices::legacy::SerialDeviceState;

/// `VmConfig` of state version 2: no CPU template.
#[derive(Deserialize)]
struct VmConfigV2 {
    kernel: KernelConfig,
    initrd: Option<PathBuf>,
    mem_mib: u64,
    vcpus: u8,
    blocks: Vec<BlockConfig>,
    host_quirks: bool,
}

/// The payload of state version 2 (before CPU records and templates).
#[derive(Deserialize)]
pub(super) struct StateV2 {
    config: VmConfigV2,
    cmdline: String,
    memory_regions: Vec<(u64, u64)>,
    vcpus: Vec<VcpuState>,
    vm: VmState,
    serial: SerialDeviceState,
    blocks: Vec<BlockSnapshot>,
    store: Option<PathBuf>,
    created_unix: u64,
}

/// Where a version 2 snapshot's guest was booted: not recorded.
pub(super) const V2_HOST: &str = "an unrecorded host (state format 2)";

impl From<StateV2> for MicrovmState {
    fn from(s: StateV2) -> Self {
        // Version 2 did not record the features given; they were those each vCPU's CPUID
        // was set up with (host passthrough: there were no templates).
        let features = s
            .vcpus
            .iter()
            .map(|v| CpuFeatures::from_cpuid(&v.cpuid))
            .fold(CpuFeatures::default(), |a, b| a.union(&b))
            .without_managed();
        let c = s.config;
        MicrovmState {
            config: VmConfig {
                kernel: c.kernel,
                initrd: c.initrd,
                mem_mib: c.mem_mib,
                vcpus: c.vcpus,
                blocks: c.blocks,
                host_quirks: c.host_quirks,
                cpu_template: CpuTemplate::None,
            },
            cmdline: s.cmdline,
            memory_regions: s.memory_regions,
            vcpus: s.vcpus,
            vm: s.vm,
            serial: s.serial,
            blocks: s.blocks,
            store: s.store,
            created_unix: s.created_unix,
            cpu: CpuRecord {
                features,
                host: V2_HOST.into(),
            },
        }
    }
}
