//! `#[derive(ShmSafe)]`: parse, check (collecting every error with its
//! span), then emit the impl and a compile-time padding check.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Type};

/// Collects spanned errors so that one compile shows all of them.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, span: proc_macro2::Span, msg: impl std::fmt::Display) {
        let e = syn::Error::new(span, msg);
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    /// Adds an error made elsewhere (for example with `syn::Error::new_spanned`,
    /// which covers every token of a type, not just the first).
    pub(crate) fn add(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

pub fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    check_repr(input, &mut errors);
    if !input.generics.params.is_empty() {
        errors.push(
            input.generics.span(),
            "#[derive(ShmSafe)] does not support generic structs yet: the padding check needs concrete field types",
        );
    }
    let fields = match &input.data {
        Data::Struct(s) => &s.fields,
        Data::Enum(e) => {
            errors.push(
                e.enum_token.span,
                "#[derive(ShmSafe)] cannot be used on an enum: a peer could write a tag that is no variant; use a #[repr(C)] struct with an integer tag",
            );
            errors.finish()?;
            unreachable!()
        }
        Data::Union(u) => {
            errors.push(u.union_token.span, "#[derive(ShmSafe)] cannot be used on a union");
            errors.finish()?;
            unreachable!()
        }
    };
    for field in fields.iter() {
        if let Some(problem) = problem_with(&field.ty) {
            let name = field
                .ident
                .as_ref()
                .map_or_else(|| "this field".to_string(), |i| format!("field `{i}`"));
            errors.push(field.ty.span(), format!("{name} {problem}"));
        }
    }
    errors.finish()?;
    Ok(emit(input, fields))
}

fn check_repr(input: &DeriveInput, errors: &mut Errors) {
    let mut has_c = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("repr")) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("C") {
                has_c = true;
            } else if meta.path.is_ident("packed") {
                errors.push(
                    meta.path.span(),
                    "#[repr(packed)] is not allowed: fields of a packed struct cannot be borrowed",
                );
            } else if meta.path.is_ident("align") {
                // An alignment may add trailing padding; the padding check catches that.
                let _ = meta.input.parse::<TokenStream>();
            }
            Ok(())
        });
    }
    if !has_c {
        errors.push(
            input.ident.span(),
            format!(
                "`{}` needs #[repr(C)] to derive ShmSafe: both processes must agree on its layout",
                input.ident
            ),
        );
    }
}

/// Why a field type cannot be shared, for the types we can recognise by
/// name. Anything else must implement ShmSafe, which the emitted code checks.
fn problem_with(ty: &Type) -> Option<String> {
    match ty {
        Type::Reference(_) => Some(
            "is a reference: it points into this process's private memory, which a peer cannot read; \
             put the data in shared memory with ShmBox<T>, ShmSlice<T> or ShmString"
                .into(),
        ),
        Type::Ptr(_) => Some(
            "is a raw pointer: a peer's pointer must be checked before use; \
             use ShmBox<T> or ShmSlice<T>, whose get(mem) validates it"
                .into(),
        ),
        Type::Tuple(t) if !t.elems.is_empty() => {
            Some("is a tuple, which has no fixed layout; use a #[repr(C)] struct".into())
        }
        Type::Array(a) => problem_with(&a.elem),
        Type::Paren(p) => problem_with(&p.elem),
        Type::Group(g) => problem_with(&g.elem),
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?.ident.to_string();
            let replacement = match last.as_str() {
                "Box" => "is a `Box`, which owns private heap memory; use ShmBox<T>",
                "Vec" => "is a `Vec`, which owns private heap memory; use ShmVec<T>",
                "String" => "is a `String`, which owns private heap memory; use ShmString",
                "Rc" | "Arc" => "is a reference-counted pointer into private memory; use ShmBox<T>",
                "bool" => "is a `bool`: a peer could write a byte that is neither 0 nor 1; use u8",
                "char" => "is a `char`: a peer could write an invalid code point; use u32",
                "Option" => "is an `Option`: a peer could write an invalid tag; use an explicit flag field",
                "NonZeroU8" | "NonZeroU16" | "NonZeroU32" | "NonZeroU64" | "NonZeroUsize" | "NonNull" => {
                    "has a forbidden zero value that a peer could write; use the plain integer"
                }
                _ => return None,
            };
            Some(replacement.into())
        }
        _ => None,
    }
}

fn emit(input: &DeriveInput, fields: &Fields) -> TokenStream {
    let name = &input.ident;
    let tys: Vec<&Type> = fields.iter().map(|f| &f.ty).collect();
    let accessors: Vec<TokenStream> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| match &f.ident {
            Some(id) => quote!(#id),
            None => {
                let idx = syn::Index::from(i);
                quote!(#idx)
            }
        })
        .collect();
    // Spanned at each field's type, so a field that is not ShmSafe is
    // reported there.
    let has_pointers = tys
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> <#ty as ::rpal::ShmSafe>::HAS_POINTERS));
    let validations = tys
        .iter()
        .zip(&accessors)
        .map(|(ty, acc)| quote_spanned!(ty.span()=> ::rpal::ShmSafe::validate(&self.#acc, walk)?;));
    // The fingerprint: each field's name, offset and own fingerprint, so an
    // added field, a swapped pair or a same-size type change all show.
    let layout_fields = |which: TokenStream| {
        let folds = fields.iter().zip(&tys).zip(&accessors).map(move |((f, ty), acc)| {
            let fname = f
                .ident
                .as_ref()
                .map_or_else(|| format!("{}", quote!(#acc)), ToString::to_string);
            quote_spanned!(ty.span()=>
                let h = ::rpal::__private::fingerprint::field(
                    h,
                    #fname,
                    ::core::mem::offset_of!(#name, #acc),
                    <#ty as ::rpal::ShmSafe>::#which,
                );
            )
        });
        quote! {
            {
                let h = ::rpal::__private::fingerprint::start(
                    "struct",
                    ::core::mem::size_of::<#name>(),
                    ::core::mem::align_of::<#name>(),
                );
                #( #folds )*
                h
            }
        }
    };
    let layout = layout_fields(quote!(LAYOUT));
    let shallow = layout_fields(quote!(SHALLOW));
    let padding_msg = format!(
        "#[derive(ShmSafe)]: `{name}` has padding bytes; reorder its fields or add explicit `_pad: [u8; N]` fields, \
         so that no uninitialised byte is shared with a peer"
    );
    quote! {
        // SAFETY: the derive checked #[repr(C)], that every field is ShmSafe,
        // and (below, at compile time) that there is no padding; `validate`
        // checks every field.
        unsafe impl ::rpal::ShmSafe for #name {
            const HAS_POINTERS: bool = false #(|| #has_pointers)*;
            const LAYOUT: u64 = #layout;
            const SHALLOW: u64 = #shallow;

            fn validate(&self, walk: &mut ::rpal::Walk<'_>) -> ::core::result::Result<(), ::rpal::Error> {
                #( #validations )*
                let _ = walk;
                ::core::result::Result::Ok(())
            }
        }

        #[doc(hidden)]
        const _: () = {
            if ::core::mem::size_of::<#name>() != 0 #( + ::core::mem::size_of::<#tys>() )* {
                ::core::panic!(#padding_msg);
            }
        };
    }
}
