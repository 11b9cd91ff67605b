//! Fuzz target `repo_catalogue`: see `vmm::fuzzing::repo_catalogue` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::repo_catalogue(data));
