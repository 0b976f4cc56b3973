//! Fuzz target `open_read`: the body is `qcow2rs::fuzzing::open_read`, shared with the regression test
//! (tests/tests/fuzz_regressions.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2rs::fuzzing::open_read(data));
