//! The process's own arena: one region, shared read-only with every peer.
//!
//! For now it hands out memory with a lock-free bump pointer and never frees
//! what it hands out to users, which is why it can return `&'static mut`: the
//! arena stays mapped until the process exits. (The slab allocator with
//! reclamation replaces the bump pointer in a later step.)

use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;

use crate::error::{Error, Result};
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
    /// Offset of the next free byte. Only this process writes it.
    bump: AtomicU64,
}

/// This process's arena.
#[derive(Debug)]
pub struct Arena {
    region: Region,
}

static GLOBAL: OnceLock<std::result::Result<Arena, String>> = OnceLock::new();

impl Arena {
    /// The process's arena, created on first use with `RPAL_ARENA_SIZE`
    /// bytes (decimal or `0x` hex; default [`DEFAULT_ARENA_SIZE`]).
    pub fn global() -> Result<&'static Arena> {
        let arena = GLOBAL.get_or_init(|| {
            let size = std::env::var("RPAL_ARENA_SIZE")
                .ok()
                .and_then(|v| match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => v.parse().ok(),
                })
                .unwrap_or(DEFAULT_ARENA_SIZE);
            Self::create(size).map_err(|e| e.to_string())
        });
        arena
            .as_ref()
            .map_err(|msg| Error::io("create the process arena", std::io::Error::other(msg.clone())))
    }

    fn create(size: u64) -> Result<Arena> {
        let space = Space::global()?;
        let region = Region::create(space, "rpal-arena", size)?;
        let arena = Arena { region };
        let h = arena.header_ptr();
        // SAFETY: the region is freshly mapped read-write, at least a page
        // long, and nobody else has seen it yet.
        unsafe {
            (*h).magic = ARENA_MAGIC;
            (*h).owner_pid = sys::getpid() as u64;
            (*h).capacity = arena.region.len();
            (*h).bump = AtomicU64::new(size_of::<ArenaHeader>().next_multiple_of(128) as u64);
        }
        Ok(arena)
    }

    fn header_ptr(&self) -> *mut ArenaHeader {
        self.region.addr() as *mut ArenaHeader
    }

    fn bump(&self) -> &AtomicU64 {
        // SAFETY: the header was initialised in `create` and the region lives
        // as long as `self`.
        unsafe { &(*self.header_ptr()).bump }
    }

    /// The region behind the arena.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.region.len()
    }

    /// Bytes handed out so far, header included.
    pub fn used(&self) -> u64 {
        self.bump().load(Ordering::Relaxed)
    }

    /// Whether `ptr` points into this arena.
    pub fn contains<T: ?Sized>(&self, ptr: *const T) -> bool {
        self.region.contains(ptr as *const u8 as u64, 1)
    }

    /// Reserves `size` bytes aligned to `align` (a power of two). Lock-free:
    /// one CAS on the bump offset.
    pub fn alloc_raw(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let cap = self.capacity();
        let bump = self.bump();
        let mut cur = bump.load(Ordering::Relaxed);
        loop {
            let start = (self.region.addr() + cur).next_multiple_of(align.max(1) as u64) - self.region.addr();
            let end = start
                .checked_add(size as u64)
                .filter(|&e| e <= cap)
                .ok_or(Error::RegionFull {
                    requested: size,
                    available: cap.saturating_sub(cur) as usize,
                    capacity: cap as usize,
                })?;
            // Relaxed: the bump offset only partitions our own memory between
            // our threads; nothing is published through it.
            match bump.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    let p = (self.region.addr() + start) as *mut u8;
                    return Ok(NonNull::new(p).expect("arena addresses are non-null"));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Moves `value` into the arena.
    #[allow(clippy::mut_from_ref)] // each call hands out fresh, distinct memory
    pub fn alloc<T: Pod>(&'static self, value: T) -> Result<&'static mut T> {
        let p = self.alloc_raw(size_of::<T>(), align_of::<T>())?.cast::<T>();
        // SAFETY: `p` is fresh, aligned, in-bounds memory that no one else was
        // handed, and it stays mapped for the process's lifetime.
        unsafe {
            p.as_ptr().write(value);
            Ok(&mut *p.as_ptr())
        }
    }

    /// Copies `values` into the arena.
    #[allow(clippy::mut_from_ref)] // each call hands out fresh, distinct memory
    pub fn alloc_slice<T: Pod>(&'static self, values: &[T]) -> Result<&'static mut [T]> {
        let p = self
            .alloc_raw(std::mem::size_of_val(values), align_of::<T>())?
            .cast::<T>();
        // SAFETY: as in `alloc`, for `values.len()` contiguous elements.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), p.as_ptr(), values.len());
            Ok(std::slice::from_raw_parts_mut(p.as_ptr(), values.len()))
        }
    }

    /// Copies `s` into the arena.
    pub fn alloc_str(&'static self, s: &str) -> Result<&'static str> {
        let bytes = self.alloc_slice(s.as_bytes())?;
        // SAFETY: the bytes were copied from a valid `str`.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_allocates_aligned_and_reports_full() {
        let a = Arena::global().unwrap();
        let x = a.alloc(0x1234_5678_u64).unwrap();
        assert_eq!(*x, 0x1234_5678);
        assert!(a.contains(x as *const u64));
        assert_eq!(x as *const u64 as usize % 8, 0);
        let s = a.alloc_str("hello").unwrap();
        assert_eq!(s, "hello");
        match a.alloc_raw(usize::MAX / 2, 8) {
            Err(Error::RegionFull {
                requested, capacity, ..
            }) => {
                assert_eq!(requested, usize::MAX / 2);
                assert_eq!(capacity as u64, a.capacity());
            }
            other => panic!("expected RegionFull, got {other:?}"),
        }
    }
}
