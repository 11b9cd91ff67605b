//! The [`Persist`] trait: how a component is saved into a snapshot's state file and rebuilt
//! from it. It stands in this bottom layer so that every component (devices, vCPUs, disks)
//! can implement it while `snapshot/` above them assembles the saved states.

/// A component whose state can be saved into a serializable value and rebuilt
/// from it (same shape as Firecracker's `Persist`).
pub trait Persist: Sized {
    /// The serializable saved state.
    type State;
    /// What `restore` needs besides the state (file descriptors, guest memory, ...).
    type Args;
    /// Error returned by `restore`.
    type Error;

    /// Captures the component's state.
    fn save(&self) -> Self::State;

    /// Rebuilds a component from saved state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
