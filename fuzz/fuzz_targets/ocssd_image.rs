#![no_main]
//! cargo-fuzz target `ocssd_image`: see `vblkd::fuzzing::ocssd_image`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::ocssd_image(data);
});
