//! The one test-support module of the integration tests (`tests/*.rs`) and the benches
//! (`benches/*`): a test includes it with `mod support;`, a bench with
//! `#[path = "../tests/support/mod.rs"] mod support;` (docs/TESTING.md, "Test support").
//!
//! | Module | What |
//! |---|---|
//! | [`env`] | KVM and the guest artifacts (skip or fail), the `vmm` binary, scratch and temp dirs |
//! | [`lock`] | machine-wide slot locks; the Linux guest lock |
//! | [`process`] | [`process::Running`]: a `vmm` process with its console and timestamped lines |
//! | [`linux`] | Linux-guest helpers: timeouts, command line, ticks, the counter guest, snapshots |
//! | [`nginx`] | a real nginx serving a directory on a free loopback port |
//! | [`rng`] | the deterministic xorshift64* generator and random bytes |
//! | [`seaweed`] | a real SeaweedFS cluster (master, three volume servers, filer + S3 gateway) on loopback |
//! | [`files`] | file helpers: md5, tree hashes, test images, directory copy and size |
//! | [`mapping`] | an anonymous memory mapping |
//! | [`tiny`] | the tiny freestanding guest (`tiny/guest.s`) run in-process |
//! | [`faults`] | fault injection (tmpfs, FUSE, HTTP proxy, kill points) |
//! | [`bench`] | bench-only output: the `--bench` guard, CSV files, host and load figures |
//!
//! Every binary that includes it uses a part, so unused items are expected.
#![allow(dead_code)]

pub mod bench;
pub mod env;
pub mod faults;
pub mod files;
pub mod linux;
pub mod lock;
pub mod mapping;
pub mod nginx;
pub mod process;
pub mod rng;
pub mod seaweed;
pub mod tiny;
