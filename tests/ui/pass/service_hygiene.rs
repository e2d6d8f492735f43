//! The service macro's output must not rely on the prelude or on names in
//! scope, and every item it generates must have a doc comment.
#![no_implicit_prelude]
#![deny(missing_docs)]
// A warning in the generated code fails this test.
#![deny(warnings)]

/// Two numbers (public: the service trait that carries it is).
#[repr(C)]
#[derive(::rpal::ShmSafe, Clone, Copy)]
pub struct Pair {
    /// One.
    pub a: u64,
    /// The other.
    pub b: u64,
}

/// A service using every kind of argument and result.
#[::rpal::service]
pub trait Everything {
    /// Values.
    fn add(&self, a: u64, b: u32) -> u64;
    /// A struct by value, nothing back.
    fn put(&self, p: Pair);
    /// Pointer types in, pointer type out.
    fn join(&self, xs: ::rpal::ShmSlice<u64>, v: ::rpal::ShmVec<u8>, s: ::rpal::ShmString, b: ::rpal::ShmBox<Pair>) -> ::rpal::ShmString;
    /// An array by value.
    fn first(&self, raw: [u8; 16]) -> u8;
    /// An async handler reading a slice in place and lending a result.
    async fn later(&self, xs: ::rpal::ShmSlice<u64>, s: ::rpal::ShmString) -> ::rpal::ShmBox<Pair>;
    /// An async handler with nothing back.
    async fn tick(&self);
    /// Method names whose id constants are `NAME` and `METHOD_HASH`.
    fn name(&self, id: u64) -> ::rpal::ShmString;
    /// See `name`.
    fn method_hash(&self) -> u64;
}

// Names that shadow what careless generated code might use.
#[allow(dead_code)]
struct Result;
#[allow(dead_code)]
struct Ok;
#[allow(dead_code)]
struct Err;
#[allow(dead_code)]
struct Option;
#[allow(dead_code)]
struct Some;
#[allow(dead_code)]
struct Arc;
#[allow(dead_code)]
struct Duration;

struct Impl;

impl Everything for Impl {
    fn add(&self, a: u64, b: u32) -> u64 {
        a + b as u64
    }
    fn put(&self, _p: Pair) {}
    fn join(&self, _xs: &[u64], _v: &[u8], s: &str, _b: &Pair) -> ::rpal::ShmString {
        ::rpal::ShmString::copy_from(s).unwrap()
    }
    fn first(&self, raw: [u8; 16]) -> u8 {
        raw[0]
    }
    async fn later(&self, xs: &[u64], s: &str) -> ::rpal::ShmBox<Pair> {
        let a = xs.len() as u64;
        ::rpal::ShmBox::new(Pair { a, b: s.len() as u64 }).unwrap()
    }
    async fn tick(&self) {}
    fn name(&self, id: u64) -> ::rpal::ShmString {
        ::rpal::ShmString::copy_from(if id == 0 { "zero" } else { "many" }).unwrap()
    }
    fn method_hash(&self) -> u64 {
        0
    }
}

fn main() {
    let _server = ServeEverything::new(Impl);
    let _ids = [EverythingService::ADD, EverythingService::PUT, EverythingService::JOIN, EverythingService::NAME];
    let _name: &str = <EverythingService as ::rpal::ServiceId>::NAME;
    let _f: fn(&EverythingClient, u64, u32) -> ::rpal::Result<u64> = EverythingClient::add;
}
