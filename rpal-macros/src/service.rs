//! `#[rpal::service]`: parse the trait into a [`Service`] (collecting every
//! spanned error), then emit each item with its own function: the handler
//! trait, the method table, the dispatcher and the client.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, Ident, ItemTrait, Pat, PathArguments, ReturnType, TraitItem, Type};

use crate::shm_safe::Errors;

/// How a type crosses the call.
enum Kind {
    /// `ShmSafe + Copy`: copied.
    Value,
    /// `ShmBox<T>`: the handler sees `&T`.
    Boxed(Type),
    /// `ShmSlice<T>` or `ShmVec<T>`: the handler sees `&[T]`.
    Slice(Type),
    /// `ShmString`: the handler sees `&str`.
    Str,
}

struct Arg {
    name: Ident,
    ty: Type,
    kind: Kind,
}

struct Method {
    name: Ident,
    docs: Vec<syn::Attribute>,
    args: Vec<Arg>,
    /// `None`: returns `()`. For a fallible method, the success type.
    ret: Option<(Type, Kind)>,
    /// The return type as written (`Result<T, E>` for a fallible method).
    written_ret: Option<Type>,
    /// A fallible method's error type (`rpal::Error` for `rpal::Result<T>`).
    error: Option<Type>,
    /// `name(types)->ret`, hashed into the method id.
    sig: String,
    /// Declared `async fn`: the handler returns a future, run on tokio.
    /// (Not part of the id: how a server runs a method is its own affair.)
    is_async: bool,
}

struct Service {
    vis: syn::Visibility,
    name: Ident,
    docs: Vec<syn::Attribute>,
    methods: Vec<Method>,
}

pub fn expand(item: &ItemTrait) -> syn::Result<TokenStream> {
    let service = parse(item)?;
    let items = [
        handler_trait(&service),
        method_table(&service),
        dispatcher(&service),
        client(&service),
    ];
    Ok(quote!(#(#items)*))
}

fn doc_attrs(attrs: &[syn::Attribute]) -> Vec<syn::Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("doc")).cloned().collect()
}

/// The type's text without spaces: the part of a signature that is hashed.
fn type_text(ty: &Type) -> String {
    quote!(#ty).to_string().chars().filter(|c| !c.is_whitespace()).collect()
}

fn parse(item: &ItemTrait) -> syn::Result<Service> {
    let mut errors = Errors::default();
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push(
            item.generics.span(),
            "a service trait cannot be generic: both processes must agree on every type",
        );
    }
    if !item.supertraits.is_empty() {
        errors.push(
            item.supertraits.span(),
            "a service trait cannot have supertraits; #[rpal::service] adds `Send + Sync + 'static`",
        );
    }
    if item.unsafety.is_some() {
        errors.push(item.unsafety.span(), "a service trait cannot be unsafe");
    }
    let mut methods = Vec::new();
    for ti in &item.items {
        match ti {
            TraitItem::Fn(f) => {
                if let Some(m) = parse_method(f, &mut errors) {
                    methods.push(m);
                }
            }
            other => errors.push(other.span(), "a service trait may only contain methods"),
        }
    }
    for (i, a) in methods.iter().enumerate() {
        for b in &methods[..i] {
            if a.name == b.name {
                errors.push(a.name.span(), "two methods with the same name");
            }
        }
    }
    errors.finish()?;
    Ok(Service {
        vis: item.vis.clone(),
        name: item.ident.clone(),
        docs: doc_attrs(&item.attrs),
        methods,
    })
}

fn parse_method(f: &syn::TraitItemFn, errors: &mut Errors) -> Option<Method> {
    let sig = &f.sig;
    let mut errs: Vec<syn::Error> = Vec::new();
    let mut bad = |span: Span, msg: &str| errs.push(syn::Error::new(span, msg));
    if let Some(u) = &sig.unsafety {
        bad(u.span(), "service methods cannot be unsafe");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        bad(
            sig.generics.span(),
            "service methods cannot be generic: the method id must name concrete types",
        );
    }
    if let Some(v) = &sig.variadic {
        bad(v.span(), "service methods cannot be variadic");
    }
    if let Some(b) = &f.default {
        bad(
            b.span(),
            "service methods have no default body; implement them in the handler",
        );
    }
    match sig.inputs.first() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none() => {}
        Some(FnArg::Receiver(r)) => bad(
            r.span(),
            "service methods take `&self` (handlers are shared between poller threads)",
        ),
        _ => bad(sig.ident.span(), "service methods take `&self` as their first argument"),
    }
    let mut args = Vec::new();
    let mut bad_type: Vec<syn::Error> = Vec::new();
    for input in sig.inputs.iter().skip(1) {
        let FnArg::Typed(pt) = input else { continue };
        let name = match &*pt.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
            other => {
                bad(other.span(), "arguments of service methods must be plain names");
                continue;
            }
        };
        match classify(&pt.ty) {
            Ok(kind) => args.push(Arg {
                name,
                ty: (*pt.ty).clone(),
                kind,
            }),
            Err(e) => bad_type.push(e),
        }
    }
    let written_ret = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some((**ty).clone()),
    };
    // `Result<T, E>` or `rpal::Result<T>`: a fallible method returning T.
    let (success, error) = match written_ret.as_ref().map(fallible) {
        Some(Some((t, e))) => (Some(t), Some(e)),
        _ => (written_ret.clone(), None),
    };
    let ret = match success {
        None => None,
        Some(Type::Tuple(t)) if t.elems.is_empty() => None,
        Some(ty) => match classify(&ty) {
            Ok(kind) => Some((ty, kind)),
            Err(e) => {
                bad_type.push(e);
                None
            }
        },
    };
    let ok = errs.is_empty() && bad_type.is_empty();
    for e in errs.into_iter().chain(bad_type) {
        errors.add(e);
    }
    if !ok {
        return None;
    }
    let arg_text: Vec<String> = args.iter().map(|a| type_text(&a.ty)).collect();
    let ret_text = ret.as_ref().map_or_else(|| "()".to_owned(), |(t, _)| type_text(t));
    let text = format!("{}({})->{}", sig.ident, arg_text.join(","), ret_text);
    Some(Method {
        name: sig.ident.clone(),
        docs: doc_attrs(&f.attrs),
        sig: text,
        args,
        ret,
        written_ret,
        error,
        is_async: sig.asyncness.is_some(),
    })
}

/// The success and error types of a `Result<T, E>` (or of a one-argument
/// `Result<T>`, taken to be `rpal::Result<T>`).
fn fallible(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(a) = &seg.arguments else {
        return None;
    };
    let mut types = a.args.iter().filter_map(|g| match g {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let ok = types.next()?;
    let err = types.next().unwrap_or_else(|| syn::parse_quote!(::rpal::Error));
    types.next().is_none().then_some((ok, err))
}

/// The one generic argument of `ShmBox<T>`-like paths.
fn single_arg(seg: &syn::PathSegment) -> Option<Type> {
    match &seg.arguments {
        PathArguments::AngleBracketed(a) if a.args.len() == 1 => match a.args.first() {
            Some(GenericArgument::Type(t)) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Sorts a type into value or pointer kinds, refusing what cannot cross.
fn classify(ty: &Type) -> syn::Result<Kind> {
    let refuse = |msg: &str| Err(syn::Error::new_spanned(ty, msg));
    match ty {
        Type::Reference(_) => refuse(
            "references cannot cross processes: pass a value, or shared data as ShmBox<T>, ShmSlice<T>, ShmVec<T> or ShmString (the handler receives a reference)",
        ),
        Type::Ptr(_) => refuse("raw pointers cannot cross processes: use ShmBox<T> or ShmSlice<T>"),
        Type::Tuple(_) => refuse("tuples have no stable layout: use a #[derive(ShmSafe)] struct"),
        Type::ImplTrait(_) | Type::TraitObject(_) => {
            refuse("trait objects and `impl Trait` cannot cross processes: use a concrete ShmSafe type")
        }
        Type::Slice(_) => refuse("unsized slices cannot be passed by value: use ShmSlice<T>"),
        Type::Infer(_) | Type::Never(_) | Type::Macro(_) | Type::Verbatim(_) | Type::BareFn(_) => {
            refuse("this type cannot be a service argument or result")
        }
        Type::Path(p) => {
            let Some(seg) = p.path.segments.last() else {
                return refuse("empty type path");
            };
            let name = seg.ident.to_string();
            match name.as_str() {
                "ShmBox" => single_arg(seg)
                    .map(Kind::Boxed)
                    .ok_or_else(|| syn::Error::new_spanned(ty, "ShmBox takes one type argument")),
                "ShmSlice" | "ShmVec" => single_arg(seg)
                    .map(Kind::Slice)
                    .ok_or_else(|| syn::Error::new_spanned(ty, format!("{name} takes one type argument"))),
                "ShmString" => Ok(Kind::Str),
                "String" | "str" => refuse("String lives in private memory: use ShmString (the handler receives &str)"),
                "Vec" => {
                    refuse("Vec lives in private memory: use ShmVec<T> or ShmSlice<T> (the handler receives &[T])")
                }
                "Box" => refuse("Box lives in private memory: use ShmBox<T> (the handler receives &T)"),
                "Rc" | "Arc" => refuse("reference-counted pointers cannot cross processes: use ShmBox<T>"),
                "Option" | "Result" => refuse(
                    "Option and Result have no stable layout to share: use a #[derive(ShmSafe)] struct with an explicit flag or code",
                ),
                "bool" | "char" => {
                    refuse("bool and char are not valid for every bit pattern a peer may send: use u8 or u32")
                }
                _ => Ok(Kind::Value),
            }
        }
        Type::Paren(p) => classify(&p.elem),
        Type::Group(g) => classify(&g.elem),
        Type::Array(_) => Ok(Kind::Value),
        _ => refuse("this type cannot be a service argument or result"),
    }
}

/// What the handler sees for an argument.
fn handler_arg_type(a: &Arg) -> TokenStream {
    match &a.kind {
        Kind::Value => {
            let ty = &a.ty;
            quote!(#ty)
        }
        Kind::Boxed(t) => quote!(&#t),
        Kind::Slice(t) => quote!(&[#t]),
        Kind::Str => quote!(&::core::primitive::str),
    }
}

fn service_ident(s: &Service) -> Ident {
    format_ident!("{}Service", s.name)
}

fn const_ident(m: &Method) -> Ident {
    format_ident!("{}", m.name.to_string().to_uppercase())
}

fn handler_trait(s: &Service) -> TokenStream {
    let Service { vis, name, docs, .. } = s;
    let client = format_ident!("{}Client", name);
    let server = format_ident!("Serve{}", name);
    let methods = s.methods.iter().map(|m| {
        let Method { name, docs, .. } = m;
        let args = m.args.iter().map(|a| {
            let n = &a.name;
            let t = handler_arg_type(a);
            quote!(#n: #t)
        });
        let ret = if m.is_async {
            // Implement it with `async fn`; the future must be `Send` to run on tokio.
            let out = m.written_ret.as_ref().map_or_else(|| quote!(()), |t| quote!(#t));
            quote!(-> impl ::core::future::Future<Output = #out> + ::core::marker::Send)
        } else {
            m.written_ret.as_ref().map(|t| quote!(-> #t)).unwrap_or_default()
        };
        let how = if m.is_async {
            " Async: runs on the host's tokio runtime, so it may wait without holding up other calls; implement it with `async fn`."
        } else {
            " Sync: runs inline on the thread that read the request (a poller, for shared-memory peers); keep it short."
        };
        quote! {
            #(#docs)*
            #[doc = ""]
            #[doc = #how]
            fn #name(&self, #(#args),*) #ret;
        }
    });
    let note = format!(
        " The handler side of the `{name}` service: implement it, wrap it in [`{server}`], and serve it. Callers use [`{client}`]."
    );
    quote! {
        #(#docs)*
        #[doc = ""]
        #[doc = #note]
        #vis trait #name: ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#methods)*
        }
    }
}

fn method_table(s: &Service) -> TokenStream {
    let Service { vis, name, .. } = s;
    let svc = service_ident(s);
    let name_str = name.to_string();
    let sigs: Vec<&str> = s.methods.iter().map(|m| m.sig.as_str()).collect();
    // Ids and the table hash are computed by the runtime's `const fn`s (one
    // implementation of the hash); the macro only sorts the methods by
    // signature, so the table hash does not depend on their order.
    let mut sorted: Vec<&Method> = s.methods.iter().collect();
    sorted.sort_unstable_by(|a, b| a.sig.cmp(&b.sig));
    let sorted_ids = sorted.iter().map(|m| const_ident(m));
    let consts = s.methods.iter().map(|m| {
        let c = const_ident(m);
        let sig = &m.sig;
        // Every type's layout fingerprint is folded into the id.
        let layouts = m
            .args
            .iter()
            .map(|a| (&a.ty, &a.kind))
            .chain(m.ret.as_ref().map(|(t, k)| (t, k)))
            .map(|(ty, kind)| match kind {
                Kind::Value => quote_spanned!(ty.span()=> <#ty as ::rpal::__private::ServiceValue>::LAYOUT),
                _ => quote_spanned!(ty.span()=> <#ty as ::rpal::ShmSafe>::LAYOUT),
            });
        let doc = format!(
            " Method id of `{}`: FNV-1a of `{}` and of its types' layout fingerprints.",
            m.name, m.sig
        );
        quote! {
            #[doc = #doc]
            pub const #c: u32 = ::rpal::__private::method_id_typed(#sig, &[#(#layouts),*]);
        }
    });
    let infos = s.methods.iter().map(|m| {
        let c = const_ident(m);
        let n = m.name.to_string();
        quote!(::rpal::__private::MethodInfo { name: #n, id: #svc::#c })
    });
    let doc = format!(" Names and ids of the `{name}` service, shared by its client and server.");
    let sig_doc = format!(" Every method's signature, as hashed: {}.", sigs.join(", "));
    // Two methods whose ids collide would be one method on the wire: a
    // compile-time error (the ids are computed in const context).
    let svc_ref = &svc;
    let clashes = s.methods.iter().enumerate().flat_map(|(i, a)| {
        s.methods[..i].iter().map(move |b| {
            let svc = svc_ref;
            let (ca, cb) = (const_ident(a), const_ident(b));
            let msg = format!(
                "methods `{}` and `{}` have the same method id: rename one",
                b.name, a.name
            );
            quote! { ::core::assert!(#svc::#ca != #svc::#cb, #msg); }
        })
    });
    quote! {
        #[doc = #doc]
        #[derive(Debug, Clone, Copy)]
        #vis struct #svc;

        impl #svc {
            #(#consts)*
        }

        const _: () = {
            #(#clashes)*
        };

        // A trait impl, so a method named `name` or `method_hash` (whose id
        // constant is `NAME` or `METHOD_HASH`) cannot collide with these.
        impl ::rpal::__private::ServiceId for #svc {
            /// The service name both sides announce at the handshake.
            const NAME: &'static ::core::primitive::str = #name_str;
            /// Hash of the method table; a peer built from another trait is refused.
            #[doc = #sig_doc]
            const METHOD_HASH: u64 = ::rpal::__private::service_hash_ids(#name_str, &[#(#svc::#sorted_ids),*]);
            /// Every method's name and id.
            const METHODS: &'static [::rpal::__private::MethodInfo] = &[#(#infos),*];
        }
    }
}

fn dispatcher(s: &Service) -> TokenStream {
    let Service { vis, name, .. } = s;
    let svc = service_ident(s);
    let server = format_ident!("Serve{}", name);
    let arms = s.methods.iter().map(|m| {
        let c = const_ident(m);
        let mname = &m.name;
        let reads = m.args.iter().map(|a| {
            let n = &a.name;
            let ty = &a.ty;
            let read = match &a.kind {
                Kind::Value => quote_spanned!(ty.span()=> <#ty as ::rpal::__private::ServiceValue>::read(args)),
                _ => quote_spanned!(ty.span()=> args.view::<#ty>()),
            };
            quote! {
                let #n = #read.map_err(|_| ::rpal::RemoteStatus::BadRequest)?;
            }
        });
        let names = m.args.iter().map(|a| &a.name);
        let write = match &m.ret {
            None => quote!(let () = out;),
            Some((ty, Kind::Value)) => {
                quote_spanned!(ty.span()=> <#ty as ::rpal::__private::ServiceValue>::write(&out, reply);)
            }
            Some((ty, _)) => quote_spanned!(ty.span()=>
                reply.lent::<#ty>(out, peer).map_err(::rpal::__private::lend_status)?;
            ),
        };
        let unwrap_async = m.error.as_ref().map(|e| {
            quote_spanned!(e.span()=>
                #[allow(clippy::let_unit_value)] // a method returning `Result<(), E>`
                let out = match out {
                    ::core::result::Result::Ok(v) => v,
                    ::core::result::Result::Err(e) => {
                        return ::core::result::Result::Ok(::rpal::__private::Reply::failed::<#e>(&e));
                    }
                };
            )
        });
        if m.is_async {
            // The request record is reused once we return: the future owns
            // a copy of the arguments (pointer arguments still point into
            // the client's region, which the copy keeps mapped).
            quote! {
                #svc::#c => {
                    let this = <::std::sync::Arc<Self> as ::core::clone::Clone>::clone(this);
                    ::rpal::__private::async_dispatch(args, move |owned| async move {
                        let mut args = owned.reader();
                        let args = &mut args;
                        #(#reads)*
                        ::rpal::__private::args_done(args)?;
                        let out = #name::#mname(&this.handler, #(#names),*).await;
                        #unwrap_async
                        ::core::result::Result::Ok(::rpal::__private::Reply::new(move |reply, peer| {
                            let _ = (&reply, peer);
                            #write
                            ::core::result::Result::Ok(())
                        }))
                    })
                }
            }
        } else {
            let unwrap = m.error.as_ref().map(|e| {
                quote_spanned!(e.span()=>
                    #[allow(clippy::let_unit_value)] // a method returning `Result<(), E>`
                    let out = match out {
                        ::core::result::Result::Ok(v) => v,
                        ::core::result::Result::Err(e) => {
                            return ::core::result::Result::Err(::rpal::__private::failed::<#e>(&e));
                        }
                    };
                )
            });
            quote! {
                #svc::#c => {
                    #(#reads)*
                    ::rpal::__private::args_done(args)?;
                    let out = #name::#mname(&this.handler, #(#names),*);
                    #unwrap
                    #write
                    ::core::result::Result::Ok(::rpal::__private::Dispatched::Done)
                }
            }
        }
    });
    let has_async = s.methods.iter().any(|m| m.is_async);
    let doc = format!(
        " Serves a [`{name}`] handler: decodes each call, runs the handler, encodes the result. Serve it with [`{server}::host`]."
    );
    quote! {
        #[doc = #doc]
        #vis struct #server<H> {
            handler: H,
        }

        impl<H: #name> #server<H> {
            /// Wraps `handler`.
            pub fn new(handler: H) -> Self {
                Self { handler }
            }

            /// The handler.
            pub fn handler(&self) -> &H {
                &self.handler
            }

            /// Starts configuring where to serve: shared memory, TCP, Unix stream.
            pub fn host(self) -> ::rpal::HostBuilder<Self> {
                ::rpal::HostBuilder::new(self)
            }
        }

        impl<H: #name> ::rpal::__private::Dispatch for #server<H> {
            const SERVICE: &'static ::core::primitive::str = <#svc as ::rpal::__private::ServiceId>::NAME;
            const METHOD_HASH: u64 = <#svc as ::rpal::__private::ServiceId>::METHOD_HASH;
            const METHODS: &'static [::rpal::__private::MethodInfo] = <#svc as ::rpal::__private::ServiceId>::METHODS;
            const HAS_ASYNC: bool = #has_async;

            fn dispatch(
                this: &::std::sync::Arc<Self>,
                method: u32,
                args: &mut ::rpal::__private::Reader<'_>,
                reply: &mut ::rpal::__private::Writer<'_>,
                peer: ::rpal::__private::PeerId,
            ) -> ::core::result::Result<::rpal::__private::Dispatched, ::rpal::RemoteStatus> {
                let _ = (&reply, peer);
                match method {
                    #(#arms)*
                    _ => ::core::result::Result::Err(::rpal::RemoteStatus::UnknownMethod),
                }
            }
        }
    }
}

fn client(s: &Service) -> TokenStream {
    let Service { vis, name, .. } = s;
    let svc = service_ident(s);
    let client = format_ident!("{}Client", name);
    let methods = s.methods.iter().map(|m| {
        let c = const_ident(m);
        let Method { name: mname, docs, .. } = m;
        let mname_async = format_ident!("{}_async", mname);
        let mname_str = mname.to_string();
        let params: Vec<TokenStream> = m
            .args
            .iter()
            .map(|a| {
                let (n, ty) = (&a.name, &a.ty);
                match a.kind {
                    Kind::Value => quote!(#n: #ty),
                    _ => quote!(#n: &#ty),
                }
            })
            .collect();
        let writes: Vec<TokenStream> = m
            .args
            .iter()
            .map(|a| {
                let (n, ty) = (&a.name, &a.ty);
                match a.kind {
                    Kind::Value => quote_spanned!(ty.span()=> <#ty as ::rpal::__private::ServiceValue>::write(&#n, w);),
                    _ => quote_spanned!(ty.span()=> w.borrowed::<#ty>(#n);),
                }
            })
            .collect();
        let (ret_ty, read) = match &m.ret {
            None => (quote!(()), quote!(())),
            Some((ty, Kind::Value)) => (
                quote!(#ty),
                quote_spanned!(ty.span()=> <#ty as ::rpal::__private::ServiceValue>::read(r)?),
            ),
            Some((ty, _)) => (
                quote!(::rpal::__private::Returned<#ty>),
                quote!(ctx.returned::<#ty>(r)?),
            ),
        };
        let call = quote! {
            #svc::#c,
            self.timeout,
            |w: &mut ::rpal::__private::Writer<'_>| {
                let _ = &w;
                #(#writes)*
                ::core::result::Result::Ok(())
            },
            |r: &mut ::rpal::__private::Reader<'_>, ctx: &::rpal::__private::ReplyCtx<'_>| {
                let _ = ctx;
                let out = #read;
                r.finish()?;
                ::core::result::Result::Ok(out)
            },
        };
        let async_doc = format!(" The async form of [`{client}::{mname}`]: dropping the future cancels the call.");
        quote! {
            #(#docs)*
            pub fn #mname(&self, #(#params),*) -> ::rpal::Result<#ret_ty> {
                self.channel.call(#call).map_err(::rpal::__private::named(#mname_str))
            }

            #[doc = #async_doc]
            pub async fn #mname_async(&self, #(#params),*) -> ::rpal::Result<#ret_ty> {
                self.channel.call_async(#call).await.map_err(::rpal::__private::named(#mname_str))
            }
        }
    });
    let doc = format!(
        " A client of the `{name}` service. Clones share one connection, which carries calls from any number of threads and tasks at once."
    );
    quote! {
        #[doc = #doc]
        #[derive(Debug, Clone)]
        #vis struct #client {
            channel: ::rpal::__private::Channel,
            timeout: ::core::option::Option<::core::time::Duration>,
        }

        impl #client {
            /// Connects over shared memory to the server at `path` (same host).
            pub fn connect(path: impl ::core::convert::AsRef<::std::path::Path>) -> ::rpal::Result<Self> {
                Self::connect_with(path, ::rpal::ClientOptions::new(<#svc as ::rpal::__private::ServiceId>::NAME))
            }

            /// As [`Self::connect`], with explicit options (wait policy, default
            /// deadline); the service name and method hash are filled in.
            pub fn connect_with(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                mut opts: ::rpal::ClientOptions,
            ) -> ::rpal::Result<Self> {
                opts.service = <::std::string::String as ::core::convert::From<&::core::primitive::str>>::from(<#svc as ::rpal::__private::ServiceId>::NAME);
                opts.method_hash = <#svc as ::rpal::__private::ServiceId>::METHOD_HASH;
                opts.methods = <#svc as ::rpal::__private::ServiceId>::METHODS;
                let timeout = opts.call_timeout;
                let client = ::rpal::__private::Client::connect(path, opts)?;
                let channel = ::rpal::__private::Channel::Shm(::rpal::__private::ShmChannel::new(client)?);
                ::core::result::Result::Ok(Self { channel, timeout })
            }

            /// Connects over TCP (any host): arguments are copied into frames.
            pub fn connect_tcp(addr: impl ::std::net::ToSocketAddrs) -> ::rpal::Result<Self> {
                let c = ::rpal::__private::StreamChannel::connect_tcp(addr, Self::table())?;
                ::core::result::Result::Ok(Self::from_channel(::rpal::__private::Channel::Stream(c)))
            }

            /// Connects to a server's Unix stream socket: like TCP, without the network stack.
            pub fn connect_unix_stream(path: impl ::core::convert::AsRef<::std::path::Path>) -> ::rpal::Result<Self> {
                let c = ::rpal::__private::StreamChannel::connect_unix(path, Self::table())?;
                ::core::result::Result::Ok(Self::from_channel(::rpal::__private::Channel::Stream(c)))
            }

            fn table() -> ::rpal::__private::ServiceTable {
                (
                    <#svc as ::rpal::__private::ServiceId>::NAME,
                    <#svc as ::rpal::__private::ServiceId>::METHOD_HASH,
                    <#svc as ::rpal::__private::ServiceId>::METHODS,
                )
            }

            /// As [`Self::connect`], waiting up to `wait` for a server that
            /// is starting (no socket yet, or nobody accepting).
            pub fn connect_waiting(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                wait: ::core::time::Duration,
            ) -> ::rpal::Result<Self> {
                ::rpal::__private::wait_for(wait, || Self::connect(path.as_ref()))
            }

            /// As [`Self::connect_tcp`], waiting up to `wait` for a server.
            pub fn connect_tcp_waiting(
                addr: impl ::std::net::ToSocketAddrs + ::core::clone::Clone,
                wait: ::core::time::Duration,
            ) -> ::rpal::Result<Self> {
                ::rpal::__private::wait_for(wait, || Self::connect_tcp(::core::clone::Clone::clone(&addr)))
            }

            /// A client over shared memory that connects again after the
            /// server dies or hangs up: the calls in flight then fail, and
            /// the next call reconnects, waiting up to `wait` for a server
            /// (as does this first connect).
            pub fn reconnecting(
                path: impl ::core::convert::Into<::std::path::PathBuf>,
                opts: ::rpal::ClientOptions,
                wait: ::core::time::Duration,
            ) -> ::rpal::Result<Self> {
                let path: ::std::path::PathBuf = path.into();
                let timeout = opts.call_timeout;
                let re = ::rpal::__private::Reconnecting::new(wait, move || {
                    ::core::result::Result::Ok(Self::connect_with(&path, ::core::clone::Clone::clone(&opts))?.channel)
                })?;
                ::core::result::Result::Ok(Self { channel: ::rpal::__private::Channel::Reconnecting(re), timeout })
            }

            /// As [`Self::reconnecting`], over TCP.
            pub fn reconnecting_tcp(
                addr: impl ::std::net::ToSocketAddrs + ::core::clone::Clone + ::core::marker::Send + ::core::marker::Sync + 'static,
                wait: ::core::time::Duration,
            ) -> ::rpal::Result<Self> {
                let re = ::rpal::__private::Reconnecting::new(wait, move || {
                    ::core::result::Result::Ok(Self::connect_tcp(::core::clone::Clone::clone(&addr))?.channel)
                })?;
                ::core::result::Result::Ok(Self::from_channel(::rpal::__private::Channel::Reconnecting(re)))
            }

            /// A client over an existing channel (no deadline).
            pub fn from_channel(channel: ::rpal::__private::Channel) -> Self {
                Self { channel, timeout: ::core::option::Option::None }
            }

            /// A handle on the same connection whose calls fail with
            /// `Timeout` after `timeout`.
            pub fn with_timeout(&self, timeout: ::core::time::Duration) -> Self {
                Self { channel: ::core::clone::Clone::clone(&self.channel), timeout: ::core::option::Option::Some(timeout) }
            }

            /// The connection.
            pub fn channel(&self) -> &::rpal::__private::Channel {
                &self.channel
            }

            #(#methods)*
        }
    }
}
