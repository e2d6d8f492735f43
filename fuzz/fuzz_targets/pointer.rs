//! The pointer entry point of `rpal_core::fuzz`: any input ends in Ok or a typed error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = rpal_core::fuzz::pointer(data);
});
