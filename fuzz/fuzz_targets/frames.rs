//! The stream frame decoder (`rpal::__private::fuzz_frames`): any byte
//! stream ends in frames within the limit, then a clean stop.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = rpal::__private::fuzz_frames(data);
});
