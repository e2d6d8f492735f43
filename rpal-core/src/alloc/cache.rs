//! Per-thread caches of free blocks and per-thread in-use counters.
//!
//! A thread frees into and allocates from its own small stack per class, so
//! an alloc/free pair costs no atomic read-modify-write. Overflow goes back
//! to the shared lists in one chain; a thread that exits returns everything.
//! In-use bytes are counted per thread (a plain load and store on a counter
//! only that thread writes) and summed on demand.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Slab, class};

/// Counters of live threads.
static COUNTERS: Mutex<Vec<Arc<AtomicI64>>> = Mutex::new(Vec::new());
/// Sum of the counters of exited threads, and of uncached frees.
static RETIRED: AtomicI64 = AtomicI64::new(0);

struct ThreadCache {
    slab: Option<&'static Slab>,
    stacks: Vec<Vec<u32>>,
    counter: Arc<AtomicI64>,
}

impl ThreadCache {
    fn new() -> Self {
        let counter = Arc::new(AtomicI64::new(0));
        COUNTERS.lock().unwrap_or_else(|p| p.into_inner()).push(counter.clone());
        Self {
            slab: None,
            stacks: (0..class::COUNT).map(|_| Vec::new()).collect(),
            counter,
        }
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        if let Some(slab) = self.slab {
            for (class, stack) in self.stacks.iter().enumerate() {
                slab.give_shared(class, stack);
            }
        }
        RETIRED.fetch_add(self.counter.load(Ordering::Relaxed), Ordering::Relaxed);
        let mut all = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|c| !Arc::ptr_eq(c, &self.counter));
    }
}

thread_local! {
    static CACHE: RefCell<ThreadCache> = RefCell::new(ThreadCache::new());
}

/// A block of `class`: from this thread's cache, else the shared list.
/// Counts its bytes as in use. The flag says the block was never used
/// before (its bytes are all zero).
pub(crate) fn take(slab: &'static Slab, class: usize) -> Option<(u32, bool)> {
    let depth = class::cache_depth(class);
    let bytes = class::size(class) as i64;
    let cached = CACHE.try_with(|c| {
        let mut c = c.borrow_mut();
        let c = &mut *c;
        c.slab = Some(slab);
        bump(&c.counter, bytes);
        let stack = &mut c.stacks[class];
        if let Some(b) = stack.pop() {
            return Some((b, false));
        }
        // Refill half the cache at once, then hand out one more.
        for _ in 0..depth / 2 {
            match super::freelist::pop(&slab.meta.heads[class], &slab.links()) {
                Some(b) => stack.push(b),
                None => break,
            }
        }
        let got = match stack.pop() {
            Some(b) => Some((b, false)),
            None => slab.take_shared(class),
        };
        if got.is_none() {
            bump(&c.counter, -bytes);
        }
        got
    });
    cached.unwrap_or_else(|_| {
        let b = slab.take_shared(class)?;
        RETIRED.fetch_add(bytes, Ordering::Relaxed);
        Some(b)
    })
}

/// Adds `delta` to a counter only this thread writes: no read-modify-write needed.
fn bump(counter: &AtomicI64, delta: i64) {
    counter.store(counter.load(Ordering::Relaxed) + delta, Ordering::Relaxed);
}

/// Returns a freed block of `class` to this thread's cache (or the shared
/// list) and stops counting its bytes as in use.
pub(crate) fn give(slab: &'static Slab, class: usize, block: u32) {
    let depth = class::cache_depth(class);
    let bytes = class::size(class) as i64;
    let kept = CACHE.try_with(|c| {
        let mut c = c.borrow_mut();
        let c = &mut *c;
        c.slab = Some(slab);
        bump(&c.counter, -bytes);
        if depth == 0 {
            return slab.give_shared(class, &[block]);
        }
        let stack = &mut c.stacks[class];
        stack.push(block);
        if stack.len() > depth {
            let keep = depth / 2;
            slab.give_shared(class, &stack[keep..]);
            stack.truncate(keep);
        }
    });
    if kept.is_err() {
        slab.give_shared(class, &[block]);
        RETIRED.fetch_add(-bytes, Ordering::Relaxed);
    }
}

/// In-use bytes over all threads (exact once other threads are quiet).
pub(crate) fn in_use() -> i64 {
    let live: i64 = COUNTERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    live + RETIRED.load(Ordering::Relaxed)
}
