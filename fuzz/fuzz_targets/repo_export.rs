//! Fuzz target `repo_export`: see `vmm::fuzzing::repo_export` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::repo_export(data));
