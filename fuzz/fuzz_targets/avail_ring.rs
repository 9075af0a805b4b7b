#![no_main]
//! cargo-fuzz target `avail_ring`: see `vblkd::fuzzing::avail_ring`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::avail_ring(data);
});
