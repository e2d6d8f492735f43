//! Spin slots: never more spinning poller threads than cores.
//!
//! A poller may spin only while it holds a slot; without one it parks at
//! once. There are `cores - 1` slots (at least one), leaving a core for the
//! callers, who spin on their side of each call.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

static SPINNING: AtomicUsize = AtomicUsize::new(0);
static SLOTS: OnceLock<usize> = OnceLock::new();

/// How many pollers of this process may spin at once.
pub fn slots() -> usize {
    *SLOTS.get_or_init(|| rpal_core::sys::cpus_online().saturating_sub(1).max(1))
}

/// A held slot; released on drop.
pub(crate) struct SpinSlot;

/// Takes a slot if one is free.
pub(crate) fn acquire() -> Option<SpinSlot> {
    let max = slots();
    let mut cur = SPINNING.load(Ordering::Relaxed);
    loop {
        if cur >= max {
            return None;
        }
        // Relaxed: the count guards no data, only how many threads spin.
        match SPINNING.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(SpinSlot),
            Err(now) => cur = now,
        }
    }
}

impl Drop for SpinSlot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::Relaxed);
    }
}
