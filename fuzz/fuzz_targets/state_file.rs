//! Fuzz target `state_file`: see `vmm::fuzzing::state_file` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::state_file(data));
