//! [`Persist`] for the virtio-net device: its id, tap name, MAC, configuration space, the
//! features offered and acknowledged, and the guest address learnt for announcements. Its
//! queues and interrupt status are saved by the transport. Restoring builds the device on
//! a tap the caller opened (the recorded one, or another given for this interface) and
//! re-applies the offloads the driver had negotiated.

use serde::{Deserialize, Serialize};

use super::{NetDevice, NetError, Tap};
use crate::formats::Persist;
use crate::util::lock;

/// Serializable state of a [`NetDevice`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceState {
    /// Interface id (`net0`, …).
    pub id: String,
    /// The tap it was attached to.
    pub tap: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// Configuration space the guest saw (MAC, status).
    pub config: Vec<u8>,
    /// Features offered.
    pub features: u64,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The IPv4 address the guest last sent from, if any.
    pub guest_ipv4: Option<[u8; 4]>,
}

/// What rebuilding a net device needs besides its state.
pub struct NetRestoreArgs {
    /// The tap to attach to, already opened.
    pub tap: Tap,
}

impl Persist for NetDevice {
    type State = NetDeviceState;
    type Args = NetRestoreArgs;
    type Error = NetError;

    fn save(&self) -> Result<NetDeviceState, NetError> {
        Ok(NetDeviceState {
            id: self.id.clone(),
            tap: self.tap_name().to_string(),
            mac: self.shared.mac,
            config: self.config.to_vec(),
            features: self.features,
            acked_features: self.acked,
            guest_ipv4: *lock(&self.shared.guest_ipv4),
        })
    }

    fn restore(args: NetRestoreArgs, state: &NetDeviceState) -> Result<Self, NetError> {
        let mut dev = NetDevice::new(&state.id, args.tap, state.mac)?;
        if state.features != dev.features {
            return Err(NetError::StateMismatch("features"));
        }
        if state.config.len() != dev.config.len() {
            return Err(NetError::StateMismatch("configuration space"));
        }
        dev.config.copy_from_slice(&state.config);
        dev.acked = state.acked_features & dev.features;
        *lock(&dev.shared.guest_ipv4) = state.guest_ipv4;
        dev.shared
            .tap
            .set_offload(NetDevice::tap_offload(dev.acked))?;
        Ok(dev)
    }
}
