#![no_main]
//! cargo-fuzz target `wire`: see `vblkd::fuzzing::wire`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::wire(data);
});
