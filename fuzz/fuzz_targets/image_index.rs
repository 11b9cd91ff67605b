//! Fuzz target `image_index`: see `vmm::fuzzing::image_index` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::image_index(data));
