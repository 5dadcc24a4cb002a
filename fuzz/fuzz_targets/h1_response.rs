//! Fuzz target: `portcullis::fuzzing::h1_response` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::h1_response(data));
