#![no_main]
//! cargo-fuzz target `cache_md`: see `vblkd::fuzzing::cache_md`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::cache_md(data);
});
