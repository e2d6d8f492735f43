//! The release ring: how each side says it is done with the peer's lent
//! blocks (in its own arena), and how the owner frees them.

use std::sync::atomic::Ordering;

use super::{Conn, RELEASE_SLOTS};
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::pkey::Access;

impl Conn {
    /// Says we are done with the peer's block at `addr`; published in our
    /// release ring now or, if it is full, at the next send or receive.
    pub(crate) fn release(&mut self, access: &Access, addr: u64) {
        self.pending_releases.push(addr);
        self.flush_releases(access);
    }

    /// Queues releases gathered elsewhere (a handler's).
    pub(crate) fn release_all(&mut self, access: &Access, addrs: impl IntoIterator<Item = u64>) {
        self.pending_releases.extend(addrs);
        self.flush_releases(access);
    }

    /// Publishes pending releases while our ring has room.
    pub(super) fn flush_releases(&mut self, access: &Access) {
        if self.pending_releases.is_empty() {
            return;
        }
        let mine = self.mine.block();
        let tail = mine.release_tail.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store of `release_head` in the
        // peer's `reclaim`; slots it consumed may be overwritten.
        let head = self.theirs(access).release_head.load(Ordering::Acquire);
        let room = (RELEASE_SLOTS as u64).saturating_sub(tail.wrapping_sub(head));
        let n = (room as usize).min(self.pending_releases.len());
        for (i, &addr) in self.pending_releases[..n].iter().enumerate() {
            mine.releases[(tail as usize + i) % RELEASE_SLOTS].store(addr, Ordering::Relaxed);
        }
        // Release: publishes the slots written above; pairs with the Acquire in `reclaim`.
        mine.release_tail.store(tail + n as u64, Ordering::Release);
        self.pending_releases.drain(..n);
    }

    /// Frees our blocks that the peer released. A release that matches no
    /// block lent to this peer is refused and counted; a release cursor that
    /// jumps or goes backwards is a protocol violation.
    pub(crate) fn reclaim(&mut self, access: &Access) -> Result<usize> {
        let pid = self.pid();
        let head = self.mine.block().release_head.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store of `release_tail` in the peer's `flush_releases`.
        let tail = self.theirs(access).release_tail.load(Ordering::Acquire);
        let ahead = tail.wrapping_sub(head);
        if ahead == 0 {
            return Ok(0);
        }
        if ahead > RELEASE_SLOTS as u64 {
            return Err(Error::Protocol {
                pid,
                detail: format!("release cursor moved from {head} to {tail}: ahead of its ring or backwards"),
            });
        }
        let arena = Arena::global()?;
        let mut freed = 0;
        for i in head..tail {
            let addr = self.theirs(access).releases[i as usize % RELEASE_SLOTS].load(Ordering::Relaxed);
            match arena.reclaim(addr, pid) {
                Ok(()) => freed += 1,
                Err(e) => {
                    self.refused_releases += 1;
                    tracing::warn!(pid, %e, "refused a release");
                }
            }
        }
        // Release: the peer may reuse the slots we read; pairs with the Acquire in `flush_releases`.
        self.mine.block().release_head.store(tail, Ordering::Release);
        self.flush_releases(access);
        Ok(freed)
    }
}
