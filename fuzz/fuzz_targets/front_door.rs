#![no_main]
//! cargo-fuzz target `front_door`: see `vblkd::fuzzing::front_door`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::front_door(data);
});
