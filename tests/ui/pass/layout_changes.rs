// Layout fingerprints, checked at compile time: the same struct written
// twice agrees; an added field, a swapped pair and a same-size type change
// each differ, also seen through a pointer.
#![deny(warnings)]
#![allow(dead_code)] // the structs exist to be fingerprinted

use rpal::{ShmBox, ShmSafe};

mod v1 {
    #[derive(rpal::ShmSafe, Clone, Copy)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub hits: u64,
        pub misses: u64,
    }
}

mod same {
    #[derive(rpal::ShmSafe, Clone, Copy)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub hits: u64,
        pub misses: u64,
    }
}

mod added {
    #[derive(rpal::ShmSafe, Clone, Copy)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub hits: u64,
        pub misses: u64,
        pub evictions: u64,
    }
}

mod swapped {
    #[derive(rpal::ShmSafe, Clone, Copy)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub misses: u64,
        pub hits: u64,
    }
}

mod retyped {
    #[derive(rpal::ShmSafe, Clone, Copy)]
    #[repr(C)]
    pub struct Stats {
        pub entries: f64,
        pub hits: u64,
        pub misses: u64,
    }
}

/// A struct that points to itself still has a fingerprint.
#[derive(rpal::ShmSafe)]
#[repr(C)]
struct Tree {
    value: u64,
    kids: rpal::ShmVec<Tree>,
}

const V1: u64 = <v1::Stats as ShmSafe>::LAYOUT;
const _: () = assert!(V1 == <same::Stats as ShmSafe>::LAYOUT);
const _: () = assert!(V1 != <added::Stats as ShmSafe>::LAYOUT);
const _: () = assert!(V1 != <swapped::Stats as ShmSafe>::LAYOUT);
const _: () = assert!(V1 != <retyped::Stats as ShmSafe>::LAYOUT);
const BOXED: u64 = <ShmBox<v1::Stats> as ShmSafe>::LAYOUT;
const _: () = assert!(BOXED == <ShmBox<same::Stats> as ShmSafe>::LAYOUT);
const _: () = assert!(BOXED != <ShmBox<swapped::Stats> as ShmSafe>::LAYOUT);
const _: () = assert!(BOXED != <ShmBox<retyped::Stats> as ShmSafe>::LAYOUT);
const _: () = assert!(<Tree as ShmSafe>::LAYOUT != 0);

fn main() {}
