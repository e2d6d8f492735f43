//! `#[derive(ShmSafe)]` refuses types that cannot be shared, with messages
//! that name the field and the replacement; and its output compiles under
//! `#![no_implicit_prelude]`.

#[test]
fn shm_safe_derive_messages() {
    if std::env::var_os("RPAL_SKIP_TRYBUILD").is_some() {
        eprintln!("skipped: RPAL_SKIP_TRYBUILD is set");
        return;
    }
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/shm_safe/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
