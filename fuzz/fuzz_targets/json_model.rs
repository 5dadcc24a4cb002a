//! Fuzz target: `portcullis::fuzzing::json_model` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::json_model(data));
