//! `#[derive(ShmSafe)]` and `#[rpal::service]` refuse what cannot be shared
//! or called across processes, with messages that point at the offending
//! field, argument or item and name the replacement; and their output
//! compiles under `#![no_implicit_prelude]`.

#[test]
fn macro_messages_and_hygiene() {
    if std::env::var_os("RPAL_SKIP_TRYBUILD").is_some() {
        // Straight to stderr, past the harness's capture (as tests/common's `skip`).
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: macro_messages_and_hygiene: RPAL_SKIP_TRYBUILD is set"
        );
        return;
    }
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/shm_safe/*.rs");
    t.compile_fail("tests/ui/service/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
