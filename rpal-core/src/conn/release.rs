//! The release ring: how each side says it is done with the peer's lent
//! blocks (in its own arena), and how the owner frees them.

use std::sync::atomic::Ordering;

use super::Conn;
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::pkey::Access;
use crate::quota::Quota;
use crate::sync::Word64;

/// The publishing half, on our side: writes as many of `pending` as the
/// ring has room for into `slots` (ours) after `tail` (ours), then moves
/// `tail`. `peer_head` is how far the peer has consumed (its memory).
/// Returns how many were published (drained from `pending`).
pub(crate) fn publish<W: Word64>(tail: &W, slots: &[W], peer_head: &W, pending: &mut Vec<u64>) -> usize {
    let t = tail.load(Ordering::Relaxed);
    // Acquire: pairs with the Release store of the head in `consume`;
    // slots the peer consumed may be overwritten.
    let head = peer_head.load(Ordering::Acquire);
    let room = (slots.len() as u64).saturating_sub(t.wrapping_sub(head));
    let n = (room as usize).min(pending.len());
    for (i, &addr) in pending[..n].iter().enumerate() {
        slots[(t as usize + i) % slots.len()].store(addr, Ordering::Relaxed);
    }
    // Release: publishes the slots written above; pairs with the Acquire in `consume`.
    tail.store(t + n as u64, Ordering::Release);
    pending.drain(..n);
    n
}

/// The consuming half, on the owner's side: hands every address the peer
/// published since `head` (ours) to `take`, then moves `head`. `peer_tail`
/// and `peer_slots` are the peer's. A tail that jumps past the ring or goes
/// backwards is returned as `Err((head, tail))`, and nothing is taken.
pub(crate) fn consume<W: Word64>(
    head: &W,
    peer_tail: &W,
    peer_slots: &[W],
    mut take: impl FnMut(u64),
) -> std::result::Result<usize, (u64, u64)> {
    let h = head.load(Ordering::Relaxed);
    // Acquire: pairs with the Release store of the tail in `publish`.
    let tail = peer_tail.load(Ordering::Acquire);
    let ahead = tail.wrapping_sub(h);
    if ahead > peer_slots.len() as u64 {
        return Err((h, tail));
    }
    for i in 0..ahead {
        take(peer_slots[(h.wrapping_add(i)) as usize % peer_slots.len()].load(Ordering::Relaxed));
    }
    if ahead > 0 {
        // Release: the peer may reuse the slots we read; pairs with the
        // Acquire in `publish`.
        head.store(tail, Ordering::Release);
    }
    Ok(ahead as usize)
}

/// Most releases we hold for a peer that does not consume its ring (8 bytes
/// each): past this, the peer is broken or hostile and its connection ends.
pub(crate) const MAX_PENDING_RELEASES: usize = 1 << 16;

impl Conn {
    /// Says we are done with the peer's block at `addr`; published in our
    /// release ring now or, if it is full, at the next send or receive.
    pub(crate) fn release(&mut self, access: &Access, addr: u64) -> Result<()> {
        self.release_all(access, [addr])
    }

    /// Queues releases gathered elsewhere (a handler's). Fails with
    /// `QuotaExceeded` once more than [`MAX_PENDING_RELEASES`] wait for a
    /// peer that does not consume its ring.
    pub(crate) fn release_all(&mut self, access: &Access, addrs: impl IntoIterator<Item = u64>) -> Result<()> {
        self.pending_releases.extend(addrs);
        self.flush_releases(access);
        if self.pending_releases.len() > MAX_PENDING_RELEASES {
            // The rest are dropped: blocks of the peer's own that it will
            // not get back, since it does not read its ring.
            self.pending_releases.truncate(MAX_PENDING_RELEASES);
            return Err(Quota::PendingReleases.exceeded(MAX_PENDING_RELEASES as u64));
        }
        Ok(())
    }

    /// Publishes pending releases while our ring has room.
    pub(super) fn flush_releases(&mut self, access: &Access) {
        if self.pending_releases.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending_releases);
        let mine = self.mine.block();
        let theirs = self.theirs(access);
        publish(&*mine.release_tail, &mine.releases, &*theirs.release_head, &mut pending);
        self.pending_releases = pending;
    }

    /// Frees our blocks that the peer released. A release that matches no
    /// block lent to this peer is refused and counted; a release cursor that
    /// jumps or goes backwards is a protocol violation.
    pub(crate) fn reclaim(&mut self, access: &Access) -> Result<usize> {
        let (pid, peer) = (self.pid(), self.peer.id);
        let arena = Arena::global()?;
        let (mut freed, mut refused) = (0, 0);
        let already = self.refused_releases;
        let mine = self.mine.block();
        let theirs = self.theirs(access);
        let took = consume(
            &*mine.release_head,
            &*theirs.release_tail,
            &theirs.releases,
            |addr| match arena.reclaim(addr, peer) {
                Ok(()) => freed += 1,
                Err(e) => {
                    // The first refusal and then one in 4096 are logged, so
                    // a peer forging releases cannot flood the log; the
                    // count is in `refused_releases`.
                    if (already + refused) % 4096 == 0 {
                        tracing::warn!(pid, %e, refused = already + refused + 1, "refused a release");
                    }
                    refused += 1;
                }
            },
        );
        self.refused_releases += refused;
        match took {
            Ok(0) => return Ok(0),
            Ok(_) => {}
            Err((head, tail)) => {
                return Err(Error::Protocol {
                    pid,
                    detail: format!("release cursor moved from {head} to {tail}: ahead of its ring or backwards"),
                });
            }
        }
        self.flush_releases(access);
        Ok(freed)
    }
}

#[cfg(all(test, rpal_loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg rpal_loom" cargo test -p rpal-core --release loom_models::`
    use super::{consume, publish};
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64;

    /// One side's ring: its slots and tail (it publishes), its head over
    /// the other side's ring (it consumes).
    struct Ring {
        slots: [AtomicU64; 2],
        tail: AtomicU64,
        head: AtomicU64,
    }

    fn ring() -> Ring {
        Ring {
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
        }
    }

    /// Three releases through a ring of two slots (so it fills and wraps),
    /// published by one side while the other consumes: each arrives once,
    /// in order, and none is overwritten before it is read.
    #[test]
    fn loom_release_ring_delivers_each_release_once_in_order() {
        loom::model(|| {
            // `a` publishes into its ring; `b` consumes it (b's head).
            let a = Arc::new(ring());
            let b = Arc::new(ring());
            let publisher = {
                let (a, b) = (a.clone(), b.clone());
                loom::thread::spawn(move || {
                    let mut pending = vec![11, 12, 13];
                    while !pending.is_empty() {
                        if publish(&a.tail, &a.slots, &b.head, &mut pending) == 0 {
                            loom::thread::yield_now();
                        }
                    }
                })
            };
            let mut got = Vec::new();
            while got.len() < 3 {
                match consume(&b.head, &a.tail, &a.slots, |addr| got.push(addr)) {
                    Ok(0) => loom::thread::yield_now(),
                    Ok(_) => {}
                    Err(bad) => panic!("a well-behaved ring looked broken: {bad:?}"),
                }
            }
            publisher.join().unwrap();
            assert_eq!(got, [11, 12, 13]);
        });
    }
}
