//! rpal's procedural macros.
//!
//! - `#[derive(ShmSafe)]`: checks that a struct may live in shared memory and
//!   be read by a peer, and implements `rpal::ShmSafe` for it.
//!
//! Generated code names everything by its full path (`::rpal::...`,
//! `::core::...`), so it works under `#![no_implicit_prelude]`.

mod shm_safe;

use proc_macro::TokenStream;

/// Derives `rpal::ShmSafe` for a `#[repr(C)]` struct without padding whose
/// fields are all `ShmSafe` (integers, floats, arrays, rpal's shm types and
/// other derived structs). References, raw pointers, `Box`, `Vec`,
/// `String`, `bool`, `char`, `Option` and tuples are refused with a message
/// that names the shared-memory replacement.
#[proc_macro_derive(ShmSafe)]
pub fn derive_shm_safe(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    shm_safe::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
