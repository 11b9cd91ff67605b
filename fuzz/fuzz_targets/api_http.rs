//! Fuzz target `api_http`: see `vmm::fuzzing::api_http` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::api_http(data));
