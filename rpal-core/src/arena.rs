//! The process's own arena: one region, shared read-only with every peer,
//! managed by the slab allocator in [`crate::alloc`].

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use crate::alloc::{AllocStats, Slab, SlabHeader};
use crate::cred::PeerId;
use crate::error::{Error, Result};
use crate::quota::LentQuota;
use crate::region::Region;
use crate::space::Space;
use crate::sys;

/// Default arena size. Pages are touched lazily, so a large arena costs
/// nothing until used.
pub const DEFAULT_ARENA_SIZE: u64 = 64 << 20;
const ARENA_MAGIC: u64 = u64::from_le_bytes(*b"RPALAREN");

/// Header at the start of every arena, readable by peers.
#[repr(C)]
struct ArenaHeader {
    magic: u64,
    owner_pid: u64,
    capacity: u64,
    slab: SlabHeader,
}

/// This process's arena.
pub struct Arena {
    region: Region,
    slab: Slab,
    /// Live connections per peer process, over every client and server of
    /// this process: what a peer was lent comes back when its last one ends.
    leases: Mutex<HashMap<PeerId, usize>>,
}

/// A connection's hold on its peer's lent blocks: while one lease of a
/// peer lives, blocks lent to it stay lent; when its last lease is dropped
/// (the peer disconnected or died), they are freed. Keyed by [`PeerId`], so
/// a later process that reuses the pid neither keeps them nor frees them.
#[derive(Debug)]
pub struct PeerLease {
    arena: &'static Arena,
    peer: PeerId,
}

impl Drop for PeerLease {
    fn drop(&mut self) {
        let last = {
            let mut l = self.arena.leases.lock().unwrap_or_else(|p| p.into_inner());
            match l.get_mut(&self.peer) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    l.remove(&self.peer);
                    true
                }
            }
        };
        if last {
            // A peer still alive that holds our blocks after its last
            // connection ended cannot release them any more: whatever it
            // reads there from now on is reused memory (docs/architecture.md).
            let n = self.arena.reclaim_all(self.peer);
            if n > 0 {
                tracing::debug!(pid = self.peer.pid, n, "reclaimed blocks lent to a peer that left");
            }
        }
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("region", &self.region)
            .field("stats", &self.slab.stats())
            .finish()
    }
}

static GLOBAL: OnceLock<std::result::Result<Arena, ArenaFailed>> = OnceLock::new();

/// Why the process has no arena: kept, since the arena is made once.
enum ArenaFailed {
    /// `RPAL_ARENA_SIZE` was refused.
    Setting {
        name: String,
        value: String,
        accepted: String,
    },
    /// Anything else, as its message.
    Other(String),
}

/// `RPAL_ARENA_SIZE`: from 1 MiB (the header and the first classes) to one
/// slot, the largest region a process can own.
fn arena_size() -> std::result::Result<u64, ArenaFailed> {
    let failed = |e: Error| match e {
        Error::BadSetting { name, value, accepted } => ArenaFailed::Setting { name, value, accepted },
        e => ArenaFailed::Other(e.to_string()),
    };
    let slot = Space::global().map(|s| s.config().slot_size).map_err(failed)?;
    let size = crate::settings::size("RPAL_ARENA_SIZE", 1 << 20, slot).map_err(failed)?;
    Ok(size.unwrap_or(DEFAULT_ARENA_SIZE))
}

impl Arena {
    /// The process's arena, created on first use with `RPAL_ARENA_SIZE`
    /// bytes (decimal or `0x` hex; default [`DEFAULT_ARENA_SIZE`]).
    pub fn global() -> Result<&'static Arena> {
        let arena = GLOBAL.get_or_init(|| {
            let size = arena_size()?;
            Self::create(size).map_err(|e| ArenaFailed::Other(e.to_string()))
        });
        arena.as_ref().map_err(|e| match e {
            ArenaFailed::Setting { name, value, accepted } => Error::BadSetting {
                name: name.clone(),
                value: value.clone(),
                accepted: accepted.clone(),
            },
            ArenaFailed::Other(msg) => Error::io("create the process arena", std::io::Error::other(msg.clone())),
        })
    }

    fn create(size: u64) -> Result<Arena> {
        let space = Space::global()?;
        let region = Region::create(space, "rpal-arena", size.max(1 << 20))?;
        let h = region.addr() as *mut ArenaHeader;
        // SAFETY: the region is freshly mapped read-write and zeroed, larger
        // than the header, and nobody else has seen it yet.
        let slab = unsafe {
            (*h).magic = ARENA_MAGIC;
            (*h).owner_pid = sys::getpid() as u64;
            (*h).capacity = region.len();
            Slab::new(
                region.addr(),
                region.len(),
                std::ptr::addr_of_mut!((*h).slab),
                size_of::<ArenaHeader>() as u64,
            )
        };
        Ok(Arena {
            region,
            slab,
            leases: Mutex::new(HashMap::new()),
        })
    }

    /// The region behind the arena.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.region.len()
    }

    /// Allocation counters.
    pub fn stats(&self) -> AllocStats {
        self.slab.stats()
    }

    /// Whether `ptr` points into this arena.
    pub fn contains<T: ?Sized>(&self, ptr: *const T) -> bool {
        self.region.contains(ptr as *const u8 as u64, 1)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two), lock-free.
    pub fn alloc_raw(&'static self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.slab.alloc(size, align)
    }

    /// Allocates `size` zeroed bytes aligned to `align`. Blocks never used
    /// before are zero already (fresh memfd pages, not touched here, so they
    /// cost no memory until written); others are cleared.
    pub fn alloc_zeroed(&'static self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let (p, fresh) = self.slab.alloc_fresh(size, align)?;
        if !fresh {
            // SAFETY: a block of at least `size` bytes that we own exclusively.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0, size) };
        }
        Ok(p)
    }

    /// Frees a block from [`Arena::alloc_raw`].
    ///
    /// # Safety
    /// No reference into the block may be used afterwards.
    pub unsafe fn free_raw(&'static self, ptr: NonNull<u8>) -> Result<()> {
        self.slab.free(ptr.as_ptr())
    }

    /// Lends a block to `peer`: we may not free it until that peer
    /// releases it (or leaves). Called when ownership crosses to the peer.
    pub fn lend(&'static self, ptr: NonNull<u8>, peer: PeerId) -> Result<()> {
        self.slab.lend(ptr.as_ptr(), peer)
    }

    /// Frees a block that `peer` released. Anything but a block lent to
    /// that peer is refused with [`Error::InvalidRelease`], changing nothing.
    pub fn reclaim(&'static self, addr: u64, peer: PeerId) -> Result<()> {
        self.slab.reclaim(addr, peer)
    }

    /// Blocks and bytes lent to `peer` and not released yet.
    pub fn lent_to(&self, peer: PeerId) -> (usize, u64) {
        self.slab.lent_to(peer)
    }

    /// How much one peer may hold lent from this arena (default: an eighth
    /// of its capacity, see [`LentQuota::for_capacity`]).
    pub fn lent_quota(&self) -> LentQuota {
        self.slab.lent_quota()
    }

    /// Sets [`Arena::lent_quota`] for every peer of this process. Going over
    /// it fails the lend with `QuotaExceeded` (the call gets
    /// `RemoteStatus::QuotaExceeded`), and the block stays ours.
    pub fn set_lent_quota(&self, quota: LentQuota) {
        self.slab.set_lent_quota(quota);
    }

    /// Takes a lease on `peer` for one connection (see [`PeerLease`]).
    pub fn lease(&'static self, peer: PeerId) -> PeerLease {
        *self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default() += 1;
        PeerLease { arena: self, peer }
    }

    /// Frees every block lent to `peer`; returns how many.
    pub fn reclaim_all(&'static self, peer: PeerId) -> usize {
        self.slab.reclaim_all(peer)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// In-use figures are process-wide: tests that compare them run one at a time.
    pub(crate) static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn alloc_free_and_region_full() {
        let _serial = SERIAL.lock();
        let a = Arena::global().unwrap();
        let before = a.stats().in_use;
        let p = a.alloc_raw(100, 8).unwrap();
        assert!(a.contains(p.as_ptr()));
        assert_eq!(p.as_ptr() as usize % 16, 0);
        let q = a.alloc_raw(64, 256).unwrap();
        assert_eq!(q.as_ptr() as usize % 256, 0);
        assert!(a.stats().in_use > before);
        // SAFETY: nothing refers to the blocks.
        unsafe {
            a.free_raw(p).unwrap();
            a.free_raw(q).unwrap();
            assert!(
                matches!(a.free_raw(p), Err(Error::InvalidPointer { .. })),
                "double free is refused"
            );
        }
        assert_eq!(a.stats().in_use, before);
        match a.alloc_raw(usize::MAX / 4, 8) {
            Err(Error::RegionFull {
                requested, capacity, ..
            }) => {
                assert_eq!(requested, usize::MAX / 4);
                assert_eq!(capacity as u64, a.capacity());
            }
            other => panic!("expected RegionFull, got {other:?}"),
        }
    }

    #[test]
    fn lent_blocks_are_freed_only_by_their_peer() {
        let _serial = SERIAL.lock();
        let a = Arena::global().unwrap();
        let before = a.stats().in_use;
        let p = a.alloc_raw(40, 8).unwrap();
        let peer = PeerId { pid: 4242, start: 10 };
        a.lend(p, peer).unwrap();
        // SAFETY: nothing refers to the block.
        assert!(unsafe { a.free_raw(p) }.is_err(), "the owner cannot free a lent block");
        assert!(matches!(
            a.reclaim(p.as_ptr() as u64, PeerId { pid: 1, start: 10 }),
            Err(Error::InvalidRelease { .. })
        ));
        // The same pid, another process (it reused the pid): refused.
        assert!(matches!(
            a.reclaim(p.as_ptr() as u64, PeerId { pid: 4242, start: 11 }),
            Err(Error::InvalidRelease { .. })
        ));
        assert!(matches!(
            a.reclaim(p.as_ptr() as u64 + 16, peer),
            Err(Error::InvalidRelease { .. })
        ));
        // A lease of the later process does not keep or free the first's.
        drop(a.lease(PeerId { pid: 4242, start: 11 }));
        assert_eq!(a.lent_to(peer).0, 1);
        a.reclaim(p.as_ptr() as u64, peer).unwrap();
        assert!(
            a.reclaim(p.as_ptr() as u64, peer).is_err(),
            "a second release is refused"
        );
        assert_eq!(a.stats().in_use, before);
    }
}
