// The derive's output must not rely on the prelude or on names in scope.
#![no_implicit_prelude]
#![deny(warnings)]
#![allow(dead_code)] // the structs exist to be derived

#[repr(C)]
#[derive(::rpal::ShmSafe)]
struct Inner {
    a: u32,
    b: u32,
}

#[repr(C)]
#[derive(::rpal::ShmSafe)]
struct Outer {
    inner: Inner,
    items: ::rpal::ShmVec<Inner>,
    name: ::rpal::ShmString,
    boxed: ::rpal::ShmBox<u64>,
    raw: [u8; 16],
}

#[repr(C)]
#[derive(::rpal::ShmSafe)]
struct Tuple(u64, ::rpal::ShmSlice<u16>);

// Names that shadow what careless generated code might use.
#[allow(dead_code)]
struct Result;
#[allow(dead_code)]
struct Ok;

fn main() {
    let _ = <Outer as ::rpal::ShmSafe>::HAS_POINTERS;
    let _ = <Tuple as ::rpal::ShmSafe>::HAS_POINTERS;
    ::std::assert!(!<Inner as ::rpal::ShmSafe>::HAS_POINTERS);
}
