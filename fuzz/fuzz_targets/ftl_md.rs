#![no_main]
//! cargo-fuzz target `ftl_md`: see `vblkd::fuzzing::ftl_md`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::ftl_md(data);
});
