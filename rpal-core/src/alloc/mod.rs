//! The arena's slab allocator.
//!
//! - Size classes ([`class`]) from 32 bytes to 4 GiB; each block starts with
//!   a 16-byte header (class, state, offset to the block start) that only
//!   this process writes.
//! - Each class has a lock-free free list ([`freelist`]) whose head lives in
//!   the arena header; empty lists are refilled by carving 64 KiB chunks (or
//!   one big block) off a bump pointer.
//! - Each thread keeps a small cache of freed blocks per class (`cache`),
//!   so the common alloc/free pair touches no shared cache line.
//! - Blocks handed to a peer are *lent*: recorded here, and freed only when
//!   that peer publishes that it is done with them (or dies). A release that
//!   does not match a lent block is refused, so a peer cannot make us free
//!   memory we still use. A peer never writes our arena.
//!
//! Running out: the arena does not grow. An allocation that does not fit
//! returns [`Error::RegionFull`] with the sizes involved. Growing would mean
//! mapping a second region and announcing it to every connected peer,
//! mid-connection, before any pointer into it could be sent; a fixed arena
//! sized up front (`RPAL_ARENA_SIZE`, pages touched lazily, so a large
//! setting is cheap) keeps the handshake the only place regions are
//! exchanged.

pub(crate) mod cache;
pub mod class;
pub mod freelist;

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cred::PeerId;
use crate::error::{Error, Result};
use crate::quota::{LentQuota, Quota};
use crate::sys;

/// Block header size, and the allocation granule.
pub const HEADER: usize = 16;
const CHUNK: usize = 64 << 10;
/// Blocks at least this big give their pages back to the kernel when freed.
const DISCARD_FROM: usize = 256 << 10;

const MAGIC: u64 = 0xA11C;
const FREE: u64 = 0;
const OWNED: u64 = 1;
const LENT: u64 = 2;

fn pack(class: usize, state: u64, back: u64) -> u64 {
    (MAGIC << 48) | ((class as u64) << 40) | (state << 32) | back
}

/// Decoded header: (class, state, back).
fn unpack(word: u64) -> Option<(usize, u64, u64)> {
    (word >> 48 == MAGIC).then_some((((word >> 40) & 0xff) as usize, (word >> 32) & 0xff, word & 0xffff_ffff))
}

/// Allocator metadata at the start of the arena (after the arena's own fields).
#[repr(C)]
pub(crate) struct SlabHeader {
    /// Offset of the first never-used byte.
    bump: AtomicU64,
    /// Free-list heads, one per class (see [`freelist`]).
    heads: [AtomicU64; class::COUNT],
}

/// Allocation counters of an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocStats {
    /// Arena size.
    pub capacity: u64,
    /// Bytes in blocks handed out and not yet freed (block sizes, headers included).
    pub in_use: u64,
    /// Bytes never carved yet.
    pub untouched: u64,
    /// Blocks currently lent to peers.
    pub lent: usize,
}

/// The allocator of one arena.
pub(crate) struct Slab {
    base: u64,
    capacity: u64,
    meta: &'static SlabHeader,
    lent: Mutex<Lent>,
}

/// Blocks lent to peers, and each peer's totals against the quota.
struct Lent {
    /// Block address -> (peer, block size).
    blocks: HashMap<u64, (PeerId, u64)>,
    /// Peer -> (blocks, bytes) lent to it.
    per_peer: HashMap<PeerId, (usize, u64)>,
    quota: LentQuota,
}

impl Lent {
    fn lock(m: &Mutex<Lent>) -> std::sync::MutexGuard<'_, Lent> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Link words of free blocks: the second word of each block's header area,
/// which user code never writes.
struct ArenaLinks {
    base: u64,
}

impl freelist::Links for ArenaLinks {
    type W = AtomicU64;
    fn link(&self, block: u32) -> &AtomicU64 {
        // SAFETY: block ids come from carving inside the arena, so the word is
        // mapped read-write for the process's lifetime and 8-aligned; it is
        // only accessed atomically.
        unsafe { &*((self.base + block as u64 * 16 + 8) as *const AtomicU64) }
    }
}

impl Slab {
    /// Sets up the allocator over `[base, base+capacity)`, whose first bytes
    /// at `meta` hold the [`SlabHeader`]; blocks start at `first`.
    ///
    /// # Safety
    /// `meta` must point to zeroed, writable memory inside the arena that
    /// lives for the process, and `[base+first, base+capacity)` must be
    /// writable arena memory that nothing else uses.
    pub(crate) unsafe fn new(base: u64, capacity: u64, meta: *mut SlabHeader, first: u64) -> Slab {
        // SAFETY: guaranteed by the caller.
        let meta = unsafe { &*meta };
        meta.bump
            .store(first.next_multiple_of(HEADER as u64), Ordering::Relaxed);
        Slab {
            base,
            capacity,
            meta,
            lent: Mutex::new(Lent {
                blocks: HashMap::new(),
                per_peer: HashMap::new(),
                quota: LentQuota::for_capacity(capacity),
            }),
        }
    }

    fn links(&self) -> ArenaLinks {
        ArenaLinks { base: self.base }
    }

    fn header(&self, payload: u64) -> &AtomicU64 {
        // SAFETY: callers pass payload addresses checked to lie in the arena at
        // least 16 bytes past its start, 16-aligned; header words are atomic.
        unsafe { &*((payload - HEADER as u64) as *const AtomicU64) }
    }

    fn full(&self, requested: usize) -> Error {
        let used = self.meta.bump.load(Ordering::Relaxed);
        Error::RegionFull {
            requested,
            available: self.capacity.saturating_sub(used) as usize,
            capacity: self.capacity as usize,
        }
    }

    /// Carves `bytes` off the never-used tail; `None` when it is used up.
    /// (The allocation paths return `Option`s, small values, and build the
    /// `Error` only when the arena is full: big `Result`s were most of the
    /// cost of an alloc/free pair.)
    fn carve(&self, bytes: usize) -> Option<u64> {
        let mut cur = self.meta.bump.load(Ordering::Relaxed);
        loop {
            let end = cur.checked_add(bytes as u64).filter(|&e| e <= self.capacity)?;
            // Relaxed: the offset only splits our own memory among our threads.
            match self
                .meta
                .bump
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(cur),
                Err(now) => cur = now,
            }
        }
    }

    /// Pops a block of `class` from the shared list, carving a chunk if
    /// empty. The flag says the block was carved just now (all zeros).
    pub(crate) fn take_shared(&'static self, class: usize) -> Option<(u32, bool)> {
        if let Some(b) = freelist::pop(&self.meta.heads[class], &self.links()) {
            return Some((b, false));
        }
        let cs = class::size(class);
        let chunk = if cs >= CHUNK { cs } else { CHUNK / cs * cs };
        let off = self.carve(chunk)?;
        let first = (off / 16) as u32;
        let n = chunk / cs;
        if n > 1 {
            let step = (cs / 16) as u32;
            let links = self.links();
            for i in 1..n as u32 - 1 {
                freelist::Links::link(&links, first + i * step)
                    .store((first + (i + 1) * step) as u64, Ordering::Relaxed);
            }
            freelist::push_chain(
                &self.meta.heads[class],
                &links,
                first + step,
                first + (n as u32 - 1) * step,
            );
        }
        Some((first, true))
    }

    /// Returns a chain of blocks of `class` to the shared list.
    pub(crate) fn give_shared(&'static self, class: usize, blocks: &[u32]) {
        let Some((&first, rest)) = blocks.split_first() else {
            return;
        };
        let links = self.links();
        let mut prev = first;
        for &b in rest {
            freelist::Links::link(&links, prev).store(b as u64, Ordering::Relaxed);
            prev = b;
        }
        freelist::push_chain(&self.meta.heads[class], &links, first, prev);
    }

    /// Allocates `size` bytes aligned to `align` (a power of two).
    pub(crate) fn alloc(&'static self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.alloc_fresh(size, align).map(|(p, _)| p)
    }

    /// As [`Slab::alloc`]; the flag says the block was never used before, so
    /// its bytes are all zero (fresh memfd pages).
    pub(crate) fn alloc_fresh(&'static self, size: usize, align: usize) -> Result<(NonNull<u8>, bool)> {
        if !align.is_power_of_two() {
            return Err(Error::InvalidPointer {
                addr: 0,
                len: size as u64,
                reason: "asked with a non-power-of-two alignment",
            });
        }
        let align = align.max(HEADER);
        let Some(class) = size.checked_add(align).and_then(class::of) else {
            return Err(self.full(size));
        };
        let Some((block, fresh)) = cache::take(self, class) else {
            return Err(self.full(size));
        };
        let start = self.base + block as u64 * 16;
        let payload = (start + HEADER as u64).next_multiple_of(align as u64);
        self.header(payload)
            .store(pack(class, OWNED, payload - start), Ordering::Relaxed);
        Ok((
            NonNull::new(payload as *mut u8).expect("arena addresses are non-null"),
            fresh,
        ))
    }

    fn check_block(&self, addr: u64) -> Result<(usize, u64, u64)> {
        let bad = |reason| Error::InvalidPointer { addr, len: 0, reason };
        if addr < self.base + 2 * HEADER as u64 || addr >= self.base + self.capacity || addr % HEADER as u64 != 0 {
            return Err(bad("is not a block of this arena"));
        }
        unpack(self.header(addr).load(Ordering::Relaxed)).ok_or(bad("has no block header (not allocated here)"))
    }

    /// Frees a block allocated by [`Slab::alloc`] and not lent.
    pub(crate) fn free(&'static self, ptr: *mut u8) -> Result<()> {
        let addr = ptr as u64;
        let (class, state, back) = self.check_block(addr)?;
        if state != OWNED {
            let reason = if state == LENT {
                "is lent to a peer; it is freed when the peer releases it"
            } else {
                "is already free"
            };
            return Err(Error::InvalidPointer { addr, len: 0, reason });
        }
        // Clear the header, so a stale one never passes for a live block.
        self.header(addr).store(FREE, Ordering::Relaxed);
        let start = addr - back;
        let cs = class::size(class);
        if cs >= DISCARD_FROM {
            let page = sys::page_size() as u64;
            let from = (start + page).next_multiple_of(page);
            let to = (start + cs as u64) / page * page;
            if to > from {
                // SAFETY: whole pages inside a block being freed: nothing
                // refers to them, and no peer is owed them.
                // Ignored on purpose: the pages are free either way; a
                // refusal only means they stay resident.
                let _ = unsafe { sys::discard(from as usize, (to - from) as usize) };
            }
        }
        cache::give(self, class, ((start - self.base) / 16) as u32);
        Ok(())
    }

    /// Marks an owned block as lent to `peer`, unless that takes the
    /// peer past its [`LentQuota`] (`QuotaExceeded`; the block stays ours).
    pub(crate) fn lend(&'static self, ptr: *const u8, peer: PeerId) -> Result<()> {
        let addr = ptr as u64;
        let (class, state, back) = self.check_block(addr)?;
        if state != OWNED {
            return Err(Error::InvalidPointer {
                addr,
                len: 0,
                reason: "is not an owned block (already lent or free)",
            });
        }
        let size = class::size(class) as u64;
        let mut lent = Lent::lock(&self.lent);
        let quota = lent.quota;
        let (blocks, bytes) = lent.per_peer.get(&peer).copied().unwrap_or_default();
        if blocks >= quota.blocks {
            return Err(Quota::LentBlocks.exceeded(quota.blocks as u64));
        }
        if bytes + size > quota.bytes {
            return Err(Quota::LentBytes.exceeded(quota.bytes));
        }
        lent.per_peer.insert(peer, (blocks + 1, bytes + size));
        lent.blocks.insert(addr, (peer, size));
        self.header(addr).store(pack(class, LENT, back), Ordering::Relaxed);
        Ok(())
    }

    /// Frees a block that `peer` says it is done with. Refuses (and
    /// changes nothing) unless the block is lent to that very process.
    pub(crate) fn reclaim(&'static self, addr: u64, peer: PeerId) -> Result<()> {
        let refuse = |reason: String| Error::InvalidRelease {
            addr,
            pid: peer.pid,
            reason,
        };
        {
            let mut lent = Lent::lock(&self.lent);
            match lent.blocks.get(&addr) {
                Some(&(owner, size)) if owner == peer => {
                    lent.blocks.remove(&addr);
                    if let Some(t) = lent.per_peer.get_mut(&peer) {
                        *t = (t.0.saturating_sub(1), t.1.saturating_sub(size));
                        if t.0 == 0 {
                            lent.per_peer.remove(&peer);
                        }
                    }
                }
                Some(&(owner, _)) if owner.pid == peer.pid => {
                    return Err(refuse("the block is lent to an earlier process with that pid".into()));
                }
                Some(&(owner, _)) => return Err(refuse(format!("the block is lent to {owner}"))),
                None => return Err(refuse("no block is lent at that address".into())),
            }
        }
        let (class, _, back) = self.check_block(addr)?;
        self.header(addr).store(pack(class, OWNED, back), Ordering::Relaxed);
        self.free(addr as *mut u8)
    }

    /// Frees every block lent to `peer` (it died or disconnected). Returns how many.
    pub(crate) fn reclaim_all(&'static self, peer: PeerId) -> usize {
        let addrs: Vec<u64> = {
            let lent = Lent::lock(&self.lent);
            lent.blocks
                .iter()
                .filter(|&(_, &(p, _))| p == peer)
                .map(|(&a, _)| a)
                .collect()
        };
        addrs.into_iter().filter(|&a| self.reclaim(a, peer).is_ok()).count()
    }

    /// Blocks and bytes lent to `peer` now.
    pub(crate) fn lent_to(&self, peer: PeerId) -> (usize, u64) {
        Lent::lock(&self.lent).per_peer.get(&peer).copied().unwrap_or_default()
    }

    /// How much one peer may hold lent.
    pub(crate) fn lent_quota(&self) -> LentQuota {
        Lent::lock(&self.lent).quota
    }

    /// Changes [`Slab::lent_quota`]; blocks lent already stay lent.
    pub(crate) fn set_lent_quota(&self, quota: LentQuota) {
        Lent::lock(&self.lent).quota = quota;
    }

    pub(crate) fn stats(&self) -> AllocStats {
        AllocStats {
            capacity: self.capacity,
            in_use: cache::in_use().max(0) as u64,
            untouched: self.capacity.saturating_sub(self.meta.bump.load(Ordering::Relaxed)),
            lent: Lent::lock(&self.lent).blocks.len(),
        }
    }
}
