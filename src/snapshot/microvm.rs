//! The whole-VM snapshot: what `vmm` writes into a snapshot directory and reads back.
//!
//! A snapshot directory holds `state` (a [`MicrovmState`] in the checksummed state-file
//! format) and `memory` (the memory manifest); chunks live in a chunk store, by default the
//! snapshot directory itself (`chunks/` inside it), or a shared store named at creation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpu_template::CpuRecord;
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::arch::x86_64::vm_state::VmState;
use crate::config::VmConfig;
use crate::devices::legacy::SerialDeviceState;
use crate::devices::virtio::block::BlockDeviceState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::disk::overlay_capture::OverlayManifest;
use crate::formats::OLDEST_STATE_VERSION;
use crate::formats::file::{self, FileKind, StateFileError};

/// File name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// File name of the memory manifest inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// One virtio-block disk's saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Transport registers and queues.
    pub transport: MmioTransportState,
    /// Device state, including the backend's identity.
    pub device: BlockDeviceState,
    /// The content of the disk's copy-on-write overlay, if it has one.
    pub overlay: Option<OverlayManifest>,
}

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
}

impl MicrovmState {
    /// Checks and decodes a state file's bytes, of any version this build reads.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateFileError> {
        let (version, payload) = file::decode_frame(&FileKind::STATE, bytes, OLDEST_STATE_VERSION)?;
        match version {
            2 => Ok(file::decode_payload::<super::legacy::StateV2>(payload)?.into()),
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
