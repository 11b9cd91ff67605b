//! Fuzz target `virtio_mmio`: see `vmm::fuzzing::virtio_mmio` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::virtio_mmio(data));
