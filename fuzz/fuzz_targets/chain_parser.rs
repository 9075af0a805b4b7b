#![no_main]
//! cargo-fuzz target `chain_parser`: see `vblkd::fuzzing::chain_parser`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vblkd::fuzzing::chain_parser(data);
});
