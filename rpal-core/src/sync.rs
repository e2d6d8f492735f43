//! Atomics shim: std's, or loom's when model-checking (`--cfg rpal_loom`).
//!
//! Only the protocol functions that loom models exercise go through here;
//! they are generic over [`Word32`] so the same code runs on shared memory
//! and inside a model.

use std::sync::atomic::Ordering;

#[cfg(rpal_loom)]
pub(crate) use loom::sync::atomic::fence;
#[cfg(not(rpal_loom))]
pub(crate) use std::sync::atomic::fence;

/// A 32-bit atomic word: std's, or loom's in models.
pub trait Word32: Sync {
    /// Atomic load.
    fn load(&self, order: Ordering) -> u32;
    /// Atomic store.
    fn store(&self, value: u32, order: Ordering);
    /// Atomic add; returns the previous value.
    fn fetch_add(&self, value: u32, order: Ordering) -> u32;
    /// Atomic subtract; returns the previous value.
    fn fetch_sub(&self, value: u32, order: Ordering) -> u32;
}

macro_rules! impl_word32 {
    ($t:ty) => {
        impl Word32 for $t {
            fn load(&self, order: Ordering) -> u32 {
                <$t>::load(self, order)
            }
            fn store(&self, value: u32, order: Ordering) {
                <$t>::store(self, value, order)
            }
            fn fetch_add(&self, value: u32, order: Ordering) -> u32 {
                <$t>::fetch_add(self, value, order)
            }
            fn fetch_sub(&self, value: u32, order: Ordering) -> u32 {
                <$t>::fetch_sub(self, value, order)
            }
        }
    };
}
impl_word32!(std::sync::atomic::AtomicU32);
#[cfg(rpal_loom)]
impl_word32!(loom::sync::atomic::AtomicU32);

/// A 64-bit atomic word: std's, or loom's in models.
pub trait Word64: Sync {
    /// Atomic load.
    fn load(&self, order: Ordering) -> u64;
    /// Atomic store.
    fn store(&self, value: u64, order: Ordering);
    /// Weak compare-and-exchange.
    fn cas(&self, current: u64, new: u64, success: Ordering, failure: Ordering) -> Result<u64, u64>;
}

macro_rules! impl_word64 {
    ($t:ty) => {
        impl Word64 for $t {
            fn load(&self, order: Ordering) -> u64 {
                <$t>::load(self, order)
            }
            fn store(&self, value: u64, order: Ordering) {
                <$t>::store(self, value, order)
            }
            fn cas(&self, current: u64, new: u64, success: Ordering, failure: Ordering) -> Result<u64, u64> {
                <$t>::compare_exchange_weak(self, current, new, success, failure)
            }
        }
    };
}
impl_word64!(std::sync::atomic::AtomicU64);
#[cfg(rpal_loom)]
impl_word64!(loom::sync::atomic::AtomicU64);
