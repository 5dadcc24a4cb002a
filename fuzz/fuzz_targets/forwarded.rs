//! Fuzz target: `portcullis::fuzzing::forwarded` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::forwarded(data));
