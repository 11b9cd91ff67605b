//! Fuzz target `virtio_blk`: see `vmm::fuzzing::virtio_blk` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::virtio_blk(data));
