//! The allocator rows: alloc+free of one block, rpal against the system.

use std::time::Instant;

use crate::*;

/// Pairs per timed sample: one alloc+free is ~20 ns, below the clock's resolution.
pub const ALLOC_BATCH: usize = 64;

/// Times alloc+free pairs of `size` bytes with rpal's arena (`rpal`) or the
/// system allocator (`system`); returns per-pair p50, p99, mean over `samples`.
pub fn measure_alloc(which: &str, size: usize, samples: usize) -> (u64, u64, u64) {
    let arena = rpal::Arena::global().expect("arena");
    let layout = std::alloc::Layout::from_size_align(size, 8).expect("layout");
    let pair = |touch: u8| {
        if which == "rpal" {
            let p = arena.alloc_raw(size, 8).expect("alloc");
            // SAFETY: `p` is a fresh block of `size` bytes; freed right after, unused since.
            unsafe {
                p.as_ptr().write_volatile(touch);
                arena.free_raw(p).expect("free");
            }
        } else {
            // SAFETY: `layout` has a non-zero size; the block is freed with the same layout.
            unsafe {
                let p = std::alloc::alloc(layout);
                assert!(!p.is_null());
                p.write_volatile(touch);
                std::alloc::dealloc(p, layout);
            }
        }
    };
    for i in 0..1000 {
        pair(i as u8);
    }
    let mut per_pair = Vec::with_capacity(samples);
    for s in 0..samples {
        let t0 = Instant::now();
        for i in 0..ALLOC_BATCH {
            pair((s + i) as u8);
        }
        per_pair.push(t0.elapsed().as_nanos() as u64 / ALLOC_BATCH as u64);
    }
    summarize(&mut per_pair)
}
