//! Fuzz target `chunk_codec`: see `vmm::fuzzing::chunk_codec` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::chunk_codec(data));
