//! Fuzz target `mutate`: the body is `qcow2rs::fuzzing::mutate`, shared with the regression test
//! (tests/tests/fuzz_regressions.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2rs::fuzzing::mutate(data));
