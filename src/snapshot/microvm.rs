//! The whole-VM snapshot: what `vmm` writes into a snapshot directory and reads back.
//!
//! A snapshot directory holds `state` (a [`MicrovmState`] in the checksummed state-file
//! format) and `memory` (the memory manifest); chunks live in a chunk store, by default the
//! snapshot directory itself (`chunks/` inside it), or a shared store named at creation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::legacy::{StateV2, StateV3, V2_HOST};
use super::{BlockSnapshot, NetSnapshot};
use crate::arch::x86_64::cpu_features::CpuFeatures;
use crate::arch::x86_64::cpu_template::{CpuRecord, CpuTemplate};
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::arch::x86_64::vm_state::VmState;
use crate::config::VmConfig;
use crate::devices::legacy::SerialDeviceState;
use crate::formats::OLDEST_STATE_VERSION;
use crate::formats::file::{self, FileKind, StateFileError};

/// File name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// File name of the memory manifest inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Everything but guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// The command line the guest booted with.
    pub cmdline: String,
    /// Guest memory regions (guest physical address, size).
    pub memory_regions: Vec<(u64, u64)>,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// irqchip, PIT and clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialDeviceState,
    /// virtio-block disks in attach order.
    pub blocks: Vec<BlockSnapshot>,
    /// Chunk store holding the memory chunks: `None` = the snapshot directory itself;
    /// a relative path is relative to the snapshot directory.
    pub store: Option<PathBuf>,
    /// Creation time (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The CPU features the guest was given, and where (state version 3).
    pub cpu: CpuRecord,
    /// virtio-net interfaces in attach order (state version 4).
    pub nets: Vec<NetSnapshot>,
}

impl MicrovmState {
    /// Checks and decodes a state file's bytes, of any version this build reads.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateFileError> {
        let (version, payload) = file::decode_frame(&FileKind::STATE, bytes, OLDEST_STATE_VERSION)?;
        match version {
            2 => Ok(file::decode_payload::<StateV2>(payload)?.into()),
            3 => Ok(file::decode_payload::<StateV3>(payload)?.into()),
            _ => file::decode_payload(payload),
        }
    }

    /// Reads the state file at `path`, of any version this build reads.
    pub fn read(path: &Path) -> Result<Self, StateFileError> {
        let bytes = file::read_bytes(path, &FileKind::STATE)?;
        Self::decode(&bytes).map_err(|e| file::invalid(path, e))
    }

    /// Writes the state file at `path` (current version), atomically and durably.
    pub fn write(&self, path: &Path) -> Result<(), StateFileError> {
        file::write_state_file(path, self)
    }

    /// The chunk store directory for a state file found in `snapshot_dir`.
    pub fn store_dir(&self, snapshot_dir: &Path) -> PathBuf {
        match &self.store {
            None => snapshot_dir.to_path_buf(),
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => snapshot_dir.join(p),
        }
    }
}

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
                nets: Vec::new(),
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
            nets: Vec::new(),
        }
    }
}

impl From<StateV3> for MicrovmState {
    fn from(s: StateV3) -> Self {
        let c = s.config;
        MicrovmState {
            config: VmConfig {
                kernel: c.kernel,
                initrd: c.initrd,
                mem_mib: c.mem_mib,
                vcpus: c.vcpus,
                blocks: c.blocks,
                host_quirks: c.host_quirks,
                cpu_template: c.cpu_template,
                nets: Vec::new(),
            },
            cmdline: s.cmdline,
            memory_regions: s.memory_regions,
            vcpus: s.vcpus,
            vm: s.vm,
            serial: s.serial,
            blocks: s.blocks,
            store: s.store,
            created_unix: s.created_unix,
            cpu: s.cpu,
            nets: Vec::new(),
        }
    }
}
