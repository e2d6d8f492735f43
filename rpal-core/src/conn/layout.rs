//! The endpoint block each side keeps per connection, in its own arena,
//! and the hash of every layout fact both sides must agree on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::arena::Arena;
use crate::error::Result;
use crate::queue::Producer;

use super::message::MSG_HEADER;

/// Entries in each side's release ring.
pub const RELEASE_SLOTS: usize = 256;
/// Queue blocks (about 64 KiB each) a producer may have unread before it
/// waits for the consumer: backpressure instead of unbounded growth.
pub const BACKLOG_BLOCKS: usize = 256;

/// One side's block for one connection, in that side's arena.
#[repr(C, align(128))]
pub struct Endpoint {
    /// First block of this side's outgoing queue.
    pub(super) queue_head: AtomicU64,
    /// Non-zero while this side sleeps waiting on the peer's queue.
    pub(super) parked: CachePadded<AtomicU32>,
    /// Blocks of the peer's queue this side has passed.
    pub(super) cursor: CachePadded<AtomicU64>,
    /// How many releases this side has published in `releases`.
    pub(super) release_tail: CachePadded<AtomicU64>,
    /// How many of the *peer's* releases this side has consumed.
    pub(super) release_head: CachePadded<AtomicU64>,
    /// Ring of addresses of the peer's blocks that this side is done with.
    pub(super) releases: [AtomicU64; RELEASE_SLOTS],
}

const fn fnv1a(mut h: u64, v: u64) -> u64 {
    let mut i = 0;
    while i < 8 {
        h ^= (v >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
        i += 1;
    }
    h
}

/// Hash of every shared-memory layout fact both sides must agree on.
pub const LAYOUT_HASH: u64 = {
    let mut h = 0xcbf2_9ce4_8422_2325;
    h = fnv1a(h, 2); // layout generation: linked-buffer queues
    h = fnv1a(h, size_of::<Endpoint>() as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, parked) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, cursor) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, release_tail) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, release_head) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, releases) as u64);
    h = fnv1a(h, RELEASE_SLOTS as u64);
    h = fnv1a(h, crate::queue::BLOCK_HEADER as u64);
    h = fnv1a(h, MSG_HEADER as u64);
    h
};

/// Our endpoint block for one connection and our outgoing queue.
pub(crate) struct OwnEndpoint {
    ptr: *const Endpoint,
    pub tx: Producer,
}

// SAFETY: the block lives in the process-wide arena (never unmapped), and an
// `OwnEndpoint` is its only user in this process.
unsafe impl Send for OwnEndpoint {}

impl OwnEndpoint {
    pub(crate) fn new() -> Result<Self> {
        let ptr: *mut Endpoint = Arena::global()?
            .alloc_raw(size_of::<Endpoint>(), align_of::<Endpoint>())?
            .as_ptr()
            .cast();
        let tx = Producer::new()?;
        // SAFETY: `ptr` is a fresh, aligned Endpoint-sized block of our arena;
        // no peer is attached yet. All fields are atomics, so initialising
        // them by store is valid.
        let e = unsafe { &*ptr };
        // Relaxed: published to the peer by the handshake's socket exchange.
        e.queue_head.store(tx.head(), Ordering::Relaxed);
        e.parked.store(0, Ordering::Relaxed);
        e.cursor.store(0, Ordering::Relaxed);
        e.release_tail.store(0, Ordering::Relaxed);
        e.release_head.store(0, Ordering::Relaxed);
        Ok(Self { ptr, tx })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub(crate) fn block(&self) -> &Endpoint {
        // SAFETY: the block is live for as long as `self`; only atomics in it.
        unsafe { &*self.ptr }
    }
}

impl Drop for OwnEndpoint {
    fn drop(&mut self) {
        if let (Ok(arena), Some(p)) = (Arena::global(), std::ptr::NonNull::new(self.ptr as *mut u8)) {
            // SAFETY: the connection is gone; nothing of ours refers to the block
            // (a peer may still read it, harmlessly: it validates what it reads).
            let _ = unsafe { arena.free_raw(p) };
        }
    }
}
