//! Fuzz target: `portcullis::fuzzing::route` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::route(data));
