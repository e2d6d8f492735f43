//! A lock-free LIFO free list (Treiber stack) of blocks, with a tagged head
//! against ABA.
//!
//! The head word packs `tag << 32 | block`, where `block` is a block id
//! (0: empty). Every successful CAS bumps the tag, so a head that was popped
//! and pushed back in between (same block, new links) no longer compares
//! equal. Links live in memory the list does not own (the arena), reached
//! through [`Links`]; the list only ever touches them atomically.

use std::sync::atomic::Ordering;

/// The link and head words: the sync shim's 64-bit atomic.
pub use crate::sync::Word64 as Word;

/// Where each block's "next" link lives.
pub trait Links {
    /// The word type of links.
    type W: Word;
    /// The link word of `block` (never 0).
    fn link(&self, block: u32) -> &Self::W;
}

fn bump(head: u64, block: u32) -> u64 {
    // `--cfg rpal_loom_no_aba_tag` drops the tag, only to show that the loom
    // model `loom_aba_pop_against_two_pops_and_a_push` then fails.
    let tag = if cfg!(rpal_loom_no_aba_tag) {
        0
    } else {
        (head >> 32).wrapping_add(1)
    };
    (tag << 32) | block as u64
}

/// Pushes the chain `first -> ... -> last` (already linked) in one CAS.
pub fn push_chain<L: Links>(head: &L::W, links: &L, first: u32, last: u32) {
    let mut cur = head.load(Ordering::Relaxed);
    loop {
        links.link(last).store(cur & 0xffff_ffff, Ordering::Relaxed);
        // Release: publishes the links written above (and the chain's) to the
        // Acquire in `pop` that takes these blocks.
        match head.cas(cur, bump(cur, first), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Pushes one block.
pub fn push<L: Links>(head: &L::W, links: &L, block: u32) {
    push_chain(head, links, block, block)
}

/// Pops one block, if any.
pub fn pop<L: Links>(head: &L::W, links: &L) -> Option<u32> {
    // Acquire: pairs with the Release CAS in `push_chain`, so the top
    // block's link is visible.
    let mut cur = head.load(Ordering::Acquire);
    loop {
        let block = cur as u32;
        if block == 0 {
            return None;
        }
        // If another thread pops `block` and reuses it meanwhile, this link
        // is stale, but then the head's tag has moved and the CAS fails.
        let next = links.link(block).load(Ordering::Relaxed) as u32;
        // Acquire on both paths: a retry reads a link published by a push.
        match head.cas(cur, bump(cur, next), Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return Some(block),
            Err(now) => cur = now,
        }
    }
}

#[cfg(all(test, not(rpal_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    struct VecLinks(Vec<AtomicU64>);
    impl Links for VecLinks {
        type W = AtomicU64;
        fn link(&self, block: u32) -> &AtomicU64 {
            &self.0[block as usize]
        }
    }

    #[test]
    fn lifo_and_chains() {
        let links = VecLinks((0..10).map(|_| AtomicU64::new(0)).collect());
        let head = AtomicU64::new(0);
        push(&head, &links, 1);
        // Chain 2 -> 3 pushed at once.
        links.link(2).store(3, Ordering::Relaxed);
        push_chain(&head, &links, 2, 3);
        assert_eq!(pop(&head, &links), Some(2));
        assert_eq!(pop(&head, &links), Some(3));
        assert_eq!(pop(&head, &links), Some(1));
        assert_eq!(pop(&head, &links), None);
    }

    #[test]
    fn threads_never_lose_or_duplicate_blocks() {
        const N: u32 = 64;
        let links = VecLinks((0..=N).map(|_| AtomicU64::new(0)).collect());
        let head = AtomicU64::new(0);
        for b in 1..=N {
            push(&head, &links, b);
        }
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    // Miri runs each step thousands of times slower.
                    for _ in 0..if cfg!(miri) { 200 } else { 20_000 } {
                        if let Some(b) = pop(&head, &links) {
                            push(&head, &links, b);
                        }
                    }
                });
            }
        });
        let mut seen = std::collections::HashSet::new();
        while let Some(b) = pop(&head, &links) {
            assert!(seen.insert(b), "block {b} twice");
        }
        assert_eq!(seen.len(), N as usize);
    }
}

#[cfg(all(test, rpal_loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg rpal_loom" cargo test -p rpal-core --release loom`
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64;

    struct VecLinks(Vec<AtomicU64>);
    impl Links for VecLinks {
        type W = AtomicU64;
        fn link(&self, block: u32) -> &AtomicU64 {
            &self.0[block as usize]
        }
    }

    #[test]
    fn loom_concurrent_pop_push_keeps_every_block() {
        loom::model(|| {
            let links = Arc::new(VecLinks((0..4).map(|_| AtomicU64::new(0)).collect()));
            let head = Arc::new(AtomicU64::new(0));
            for b in 1..=3 {
                push(&*head, &*links, b);
            }
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (h, l) = (head.clone(), links.clone());
                    loom::thread::spawn(move || {
                        if let Some(b) = pop(&*h, &*l) {
                            push(&*h, &*l, b);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let mut seen = Vec::new();
            while let Some(b) = pop(&*head, &*links) {
                assert!(!seen.contains(&b));
                seen.push(b);
            }
            assert_eq!(seen.len(), 3);
        });
    }

    /// The ABA case: thread A reads the head (block 1) and its link (2),
    /// then thread B pops 1, pops 2 and pushes 1 back (now linked to 3). The
    /// head is block 1 again; only the tag tells A's CAS that its link is
    /// stale. Without it A would install block 2, which B holds.
    #[test]
    fn loom_aba_pop_against_two_pops_and_a_push() {
        loom::model(|| {
            let links = Arc::new(VecLinks((0..4).map(|_| AtomicU64::new(0)).collect()));
            let head = Arc::new(AtomicU64::new(0));
            for b in [3, 2, 1] {
                push(&*head, &*links, b);
            }
            let (h, l) = (head.clone(), links.clone());
            let b_thread = loom::thread::spawn(move || {
                let x = pop(&*h, &*l);
                let y = pop(&*h, &*l);
                if let Some(x) = x {
                    push(&*h, &*l, x);
                }
                y // kept by B
            });
            let a = pop(&*head, &*links);
            if let Some(a) = a {
                push(&*head, &*links, a);
            }
            let kept = b_thread.join().unwrap();
            let mut seen: Vec<u32> = kept.into_iter().collect();
            while let Some(b) = pop(&*head, &*links) {
                assert!(!seen.contains(&b), "block {b} is both held and free");
                seen.push(b);
            }
            seen.sort();
            assert_eq!(seen, vec![1, 2, 3]);
        });
    }

    #[test]
    fn loom_pop_races_with_chain_push() {
        loom::model(|| {
            let links = Arc::new(VecLinks((0..5).map(|_| AtomicU64::new(0)).collect()));
            let head = Arc::new(AtomicU64::new(0));
            push(&*head, &*links, 1);
            let (h, l) = (head.clone(), links.clone());
            let pusher = loom::thread::spawn(move || {
                l.link(2).store(3, Ordering::Relaxed);
                push_chain(&*h, &*l, 2, 3);
            });
            let got = pop(&*head, &*links);
            pusher.join().unwrap();
            let mut seen: Vec<u32> = got.into_iter().collect();
            while let Some(b) = pop(&*head, &*links) {
                assert!(!seen.contains(&b));
                seen.push(b);
            }
            seen.sort();
            assert_eq!(seen, vec![1, 2, 3]);
        });
    }
}
