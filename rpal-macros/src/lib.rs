//! rpal's procedural macros.
//!
//! - `#[rpal::service]`: turns a trait into a handler trait, a method table,
//!   a dispatcher and a client (blocking and async), for shared memory and TCP.
//! - `#[derive(ShmSafe)]`: checks that a struct may live in shared memory and
//!   be read by a peer, and implements `rpal::ShmSafe` for it.
//!
//! Generated code names everything by its full path (`::rpal::...`,
//! `::core::...`), so it works under `#![no_implicit_prelude]`.

mod service;
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

/// Turns a trait into an rpal service. For `trait Calc` it generates:
///
/// - `trait Calc` (the handler; `ShmBox<T>`, `ShmSlice<T>`/`ShmVec<T>` and
///   `ShmString` arguments arrive as `&T`, `&[T]` and `&str`);
/// - `CalcService`: the name, the method ids (FNV-1a of each method's name
///   and signature) and their hash, checked at the handshake;
/// - `ServeCalc<H>`: the dispatcher, served with `.host()`;
/// - `CalcClient`: one blocking and one `_async` method per method, over
///   shared memory (`connect`), TCP (`connect_tcp`) or a Unix stream.
///
/// Arguments and results are `ShmSafe + Copy` values (copied) or rpal's shm
/// types (passed by pointer in shared memory, copied over TCP).
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new_spanned(attr, "#[rpal::service] takes no arguments")
            .into_compile_error()
            .into();
    }
    let item = syn::parse_macro_input!(item as syn::ItemTrait);
    service::expand(&item)
        .unwrap_or_else(|e| {
            // The trait as written, in a scope of its own: the user's imports
            // are used (no spurious `unused import` beside the real error),
            // and nothing else is defined.
            let errors = e.into_compile_error();
            quote::quote! {
                #errors
                const _: () = {
                    #[allow(dead_code)]
                    #item
                };
            }
        })
        .into()
}
