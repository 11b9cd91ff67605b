//! Fuzz target `memory_manifest`: see `vmm::fuzzing::memory_manifest` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::memory_manifest(data));
