//! `vmm`: a KVM virtual machine monitor built on the rust-vmm crates, made to pause a VM,
//! keep it forever as deduplicated content-addressed chunks, and bring it back in milliseconds.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod arch;
pub mod archive;
pub mod builder;
pub mod config;
pub mod devices;
pub mod disk;
pub mod formats;
pub mod fuzzing;
pub mod image;
pub mod repo;
pub mod snapshot;
pub mod store;
pub mod util;
pub mod vmm;
pub mod vstate;
