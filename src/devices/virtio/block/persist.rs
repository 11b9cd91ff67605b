//! [`Persist`] for the virtio-blk device: the disk's identity and the guest-visible
//! properties (configuration space, features, GET_ID answer). Its queues are saved by the
//! transport. Restoring builds the device over the disk the caller opened and refuses
//! (unless forced) a disk or properties other than the saved ones.

use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};

use super::{BlockConfig, BlockConfigSpace, BlockDevice, BlockError, DISK_ID_LEN};
use crate::disk::{BackendIdentity, BlockBackend};
use crate::formats::Persist;

/// Serializable state of a [`BlockDevice`] (its queues are saved by the transport).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceState {
    /// The disk the device was attached to.
    pub identity: BackendIdentity,
    /// Configuration space the guest saw.
    pub config_space: BlockConfigSpace,
    /// Features offered.
    pub features: u64,
    /// GET_ID answer.
    pub disk_id: [u8; DISK_ID_LEN],
}

/// What rebuilding a block device needs besides its state.
pub struct BlockRestoreArgs {
    /// The disk to serve (it must be the saved one unless `force`).
    pub backend: Arc<dyn BlockBackend>,
    /// Device options (the serial number, which the saved `disk_id` must match).
    pub config: BlockConfig,
    /// Accept a different disk or different guest-visible properties, with a warning.
    pub force: bool,
}

impl BlockDevice {
    /// Checks saved state against this device: refuses a different disk or different
    /// guest-visible properties; with `force`, accepts them with a warning.
    fn check_saved(&self, state: &BlockDeviceState, force: bool) -> Result<(), BlockError> {
        if let Err(e) = state
            .identity
            .check_matches(&self.engine.backend.identity())
        {
            if !force {
                return Err(BlockError::Identity(e));
            }
            warn!("virtio-blk: {e}; continuing because of --force");
        }
        if state.config_space != self.config_space {
            if !force {
                return Err(BlockError::StateMismatch("configuration space (disk size)"));
            }
            warn!(
                "virtio-blk: disk size differs from the snapshot's; continuing because of --force"
            );
        }
        if state.features != self.features {
            if !force {
                return Err(BlockError::StateMismatch("feature set"));
            }
            warn!(
                "virtio-blk: feature set differs from the snapshot's; continuing because of --force"
            );
        }
        if state.disk_id != self.disk_id {
            if !force {
                return Err(BlockError::StateMismatch("disk id"));
            }
            warn!("virtio-blk: disk id differs from the snapshot's; continuing because of --force");
        }
        Ok(())
    }
}

impl Persist for BlockDevice {
    type State = BlockDeviceState;
    type Args = BlockRestoreArgs;
    type Error = BlockError;

    fn save(&self) -> Result<BlockDeviceState, BlockError> {
        Ok(BlockDeviceState {
            identity: self.engine.backend.identity(),
            config_space: self.config_space,
            features: self.features,
            disk_id: self.disk_id,
        })
    }

    /// Builds the device over `args.backend` and checks it against the saved state. (The
    /// worker is not started and the queues are restored by the transport.)
    fn restore(args: BlockRestoreArgs, state: &BlockDeviceState) -> Result<Self, BlockError> {
        let dev = BlockDevice::new(args.backend, args.config)?;
        dev.check_saved(state, args.force)?;
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemBackend;

    fn args(backend: MemBackend, id: &str) -> BlockRestoreArgs {
        BlockRestoreArgs {
            backend: Arc::new(backend),
            config: BlockConfig {
                id: Some(id.to_string()),
            },
            force: false,
        }
    }

    #[test]
    fn save_restore_save_is_equal() {
        let a = args(MemBackend::new(4096).with_name("d"), "id");
        let dev = BlockDevice::new(a.backend, a.config).unwrap();
        let s = dev.save().unwrap();
        let bytes = bincode::serialize(&s).unwrap();
        let s2: BlockDeviceState = bincode::deserialize(&bytes).unwrap();
        let r =
            BlockDevice::restore(args(MemBackend::new(4096).with_name("d"), "id"), &s2).unwrap();
        assert_eq!(r.save().unwrap(), s);
    }
}
