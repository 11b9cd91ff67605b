//! Fuzz target `working_set`: see `vmm::fuzzing::working_set` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::working_set(data));
