//! libFuzzer entry for `hpcvm_tests::fuzz::agent_frames` (see tests/src/fuzz.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hpcvm_tests::fuzz::agent_frames(data));
