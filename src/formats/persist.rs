//! The [`Persist`] trait: how a component is saved into a snapshot's state file and rebuilt
//! from it. It stands in this bottom layer so that every component (devices, vCPUs, the VM's
//! in-kernel devices) can implement it while `snapshot/` above them assembles the saved
//! states.
//!
//! Each implementation stands in a `persist.rs` beside its component; the state types are
//! plain serde structs, and those the state file holds must keep their encoding
//! (docs/SNAPSHOT_FORMAT.md).

/// A component whose state can be saved into a serializable value and rebuilt from it
/// (the shape of Firecracker's `Persist`, with a fallible `save`: reading KVM state can fail).
pub trait Persist: Sized {
    /// The serializable saved state.
    type State;
    /// What `restore` needs besides the state (file descriptors, guest memory, ...).
    type Args;
    /// Error returned by `save` and `restore`.
    type Error;

    /// Captures the component's state.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds a component from saved state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
