//! The unsafe-heavy parts over ordinary heap memory instead of a mapped
//! memfd, so that Miri can check them (it has no `memfd_create` and no
//! shared mappings): the allocator's slab with its per-thread caches and
//! lent books, the queue's producer and consumer on two threads with block
//! recycling, and the release ring. The same code runs as in production;
//! only where the memory comes from differs. The free lists' own tests need
//! no such seam (they run under Miri as they are).
//!
//! `cargo +nightly miri test -p rpal-core --lib -- heap_models freelist`
//! (`.ci/run` runs it when the toolchain has Miri). They run in the normal
//! test suite too.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cred::PeerId;
use crate::error::{Error, Result};
use crate::queue::{Blocks, Bounds, Consumer, Producer, Shm, publish_cursor, read_cursor};

/// Fewer rounds under Miri, which runs each step thousands of times slower.
const fn rounds(native: usize, miri: usize) -> usize {
    if cfg!(miri) { miri } else { native }
}

/// Queue blocks from the heap. Loads, stores and byte views are the real
/// queue's (`Shm`'s raw accesses); only allocation differs. Every live
/// block is recorded, so the consumer's bounds can refuse anything else.
#[derive(Clone, Copy)]
struct HeapBlocks(&'static Mutex<BTreeMap<u64, usize>>);

impl HeapBlocks {
    fn new() -> HeapBlocks {
        HeapBlocks(Box::leak(Box::new(Mutex::new(BTreeMap::new()))))
    }

    fn live(&self, addr: u64, len: u64) -> bool {
        let blocks = self.0.lock().unwrap();
        blocks
            .range(..=addr)
            .next_back()
            .is_some_and(|(&start, &size)| addr.checked_add(len).is_some_and(|end| end <= start + size as u64))
    }
}

/// Small blocks, so that a few records cross several of them.
const HEAP_BLOCK: usize = 512;

// SAFETY: blocks are live heap allocations of the size asked, 64-aligned;
// the raw accesses are `Shm`'s, whose contract the callers keep.
unsafe impl Blocks for HeapBlocks {
    const BLOCK_SIZE: usize = HEAP_BLOCK;

    fn alloc(self, size: usize, _zeroed: bool) -> Result<u64> {
        let layout = Layout::from_size_align(size, 64).map_err(|_| Error::RegionFull {
            requested: size,
            available: 0,
            capacity: 0,
        })?;
        // SAFETY: a non-zero size (the queue never asks for less than a block).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "out of memory");
        self.0.lock().unwrap().insert(p as u64, size);
        Ok(p as u64)
    }

    unsafe fn free(self, block: u64) {
        let size = self
            .0
            .lock()
            .unwrap()
            .remove(&block)
            .expect("freeing a block we gave out");
        // SAFETY: allocated above with this layout, and unread now (the caller's contract).
        unsafe { std::alloc::dealloc(block as *mut u8, Layout::from_size_align(size, 64).unwrap()) }
    }

    unsafe fn zero(self, addr: u64, len: usize) {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.zero(addr, len) }
    }
    unsafe fn load32(self, addr: u64, order: Ordering) -> u32 {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.load32(addr, order) }
    }
    unsafe fn store32(self, addr: u64, value: u32, order: Ordering) {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.store32(addr, value, order) }
    }
    unsafe fn read32(self, addr: u64) -> u32 {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.read32(addr) }
    }
    unsafe fn write32(self, addr: u64, value: u32) {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.write32(addr, value) }
    }
    unsafe fn load64(self, addr: u64) -> u64 {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.load64(addr) }
    }
    unsafe fn store64(self, addr: u64, value: u64) {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.store64(addr, value) }
    }
    unsafe fn bytes_mut<'a>(self, addr: u64, len: usize) -> &'a mut [u8] {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.bytes_mut(addr, len) }
    }
    unsafe fn bytes<'a>(self, addr: u64, len: usize) -> &'a [u8] {
        // SAFETY: the caller's contract, passed on.
        unsafe { Shm.bytes(addr, len) }
    }
}

// SAFETY: accepts only ranges inside live heap blocks of the producer,
// which outlive the consumer's reads (the producer frees a block only after
// the consumer's cursor has passed it).
unsafe impl Bounds<'static> for HeapBlocks {
    fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
        if addr % align.max(1) == 0 && self.live(addr, len) {
            Ok(())
        } else {
            Err(Error::InvalidPointer {
                addr,
                len,
                reason: "not inside a live heap block",
            })
        }
    }
}

/// The bytes of record `i`: a length that crosses block boundaries now and
/// then (and needs a jumbo block once in a while), filled with its number.
fn record(i: usize) -> Vec<u8> {
    let len = match i % 7 {
        0 => 1,
        1 => 8,
        2 => 63,
        3 => HEAP_BLOCK / 2,
        4 => HEAP_BLOCK * 2, // bigger than a block: a jumbo one
        5 => 200,
        _ => 24,
    };
    vec![i as u8; len]
}

/// The producer on this thread, the consumer on another, publishing its
/// cursor as `Conn` does: every record arrives once, in order and intact,
/// and every block the consumer passed is recycled or freed.
#[test]
fn queue_across_threads_over_heap_blocks() {
    let n = rounds(3000, 60);
    let mem = HeapBlocks::new();
    let cursor: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let mut p = Producer::new_in(mem).unwrap();
    let mut c = Consumer::new_in(mem, mem, p.head(), 7).unwrap();
    let consumer = std::thread::spawn(move || {
        for i in 0..n {
            let rec = loop {
                match c.next(mem) {
                    Ok(Some(r)) => break r,
                    Ok(None) => std::thread::yield_now(),
                    Err(e) => panic!("record {i}: {e}"),
                }
            };
            assert_eq!(rec, &record(i)[..], "record {i}");
            publish_cursor(cursor, c.passed());
        }
        c.passed()
    });
    for i in 0..n {
        p.push(&record(i)).unwrap();
        p.recycle(read_cursor(cursor), 7).unwrap();
    }
    let passed = consumer.join().unwrap();
    p.recycle(read_cursor(cursor), 7).unwrap();
    assert_eq!(read_cursor(cursor), passed);
    assert!(p.backlog_blocks() <= 2, "passed blocks were not recycled");
    drop(p);
    // Jumbo blocks are freed once passed; the producer's drop frees the rest.
    assert!(
        mem.0.lock().unwrap().is_empty(),
        "blocks leaked: {:?}",
        mem.0.lock().unwrap()
    );
}

/// A peer that lies about the queue (a head outside any block, a length
/// past the block) is refused without a read out of bounds.
#[test]
fn queue_refuses_a_head_outside_the_blocks() {
    let mem = HeapBlocks::new();
    let p = Producer::new_in(mem).unwrap();
    assert!(Consumer::new_in(mem, mem, p.head() + 4096 * 64, 7).is_err());
    assert!(Consumer::new_in(mem, mem, 0, 7).is_err());
}

/// The release ring over std atomics: one thread publishes addresses into a
/// small ring as room appears, the other consumes them; each arrives once,
/// in order.
#[test]
fn release_ring_across_threads() {
    use crate::conn::release::{consume, publish};
    let n = rounds(20_000, 300) as u64;
    let words = || (0..8).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let (slots, tail, head): (&'static [AtomicU64], &'static AtomicU64, &'static AtomicU64) = (
        Box::leak(words().into_boxed_slice()),
        Box::leak(Box::new(AtomicU64::new(0))),
        Box::leak(Box::new(AtomicU64::new(0))),
    );
    let publisher = std::thread::spawn(move || {
        let mut pending: Vec<u64> = (1..=n).map(|i| i * 16).collect();
        while !pending.is_empty() {
            if publish(tail, slots, head, &mut pending) == 0 {
                std::thread::yield_now();
            }
        }
    });
    let mut got = Vec::new();
    while got.len() < n as usize {
        match consume(head, tail, slots, |a| got.push(a)) {
            Ok(0) => std::thread::yield_now(),
            Ok(_) => {}
            Err((h, t)) => panic!("cursor jumped: head {h}, tail {t}"),
        }
    }
    publisher.join().unwrap();
    assert!(
        got.iter().copied().eq((1..=n).map(|i| i * 16)),
        "releases lost, doubled or reordered"
    );
}

/// A 4 MiB slab over a heap buffer, leaked as the arena's is.
fn heap_slab() -> &'static crate::alloc::Slab {
    const CAPACITY: usize = 4 << 20;
    let layout = Layout::from_size_align(CAPACITY, 4096).unwrap();
    // SAFETY: a non-zero size.
    let base = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!base.is_null(), "out of memory");
    let meta = base.cast::<crate::alloc::SlabHeader>();
    // SAFETY: zeroed, writable, leaked (lives for the process); blocks start
    // past the header and nothing else uses the buffer.
    let slab = unsafe {
        crate::alloc::Slab::new(
            base as u64,
            CAPACITY as u64,
            meta,
            size_of::<crate::alloc::SlabHeader>() as u64,
        )
    };
    Box::leak(Box::new(slab))
}

/// Two threads allocate blocks of many sizes and alignments through their
/// caches, fill each with their own pattern, and free them in another
/// order; a block handed out twice would show the other thread's pattern.
/// Then lending: only the borrower's release frees a lent block, once.
#[test]
fn slab_over_heap_memory() {
    let _serial = crate::arena::tests::SERIAL.lock();
    let slab = heap_slab();
    let before = slab.stats().in_use;
    let per_thread = rounds(4000, 24);
    std::thread::scope(|s| {
        for t in 0..2u8 {
            s.spawn(move || {
                let mut live: Vec<(std::ptr::NonNull<u8>, usize)> = Vec::new();
                for i in 0..per_thread {
                    let size = [8, 16, 40, 100, 700, 4096, 9000, 70_000][i % 8];
                    let align = [8, 16, 64, 256][i % 4];
                    let p = slab.alloc(size, align).unwrap();
                    assert_eq!(p.as_ptr() as usize % align, 0);
                    // SAFETY: a fresh block of `size` bytes, ours alone.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), t + 1, size) };
                    live.push((p, size));
                    if live.len() > 16 {
                        let (q, n) = live.swap_remove(i * 7 % live.len());
                        // SAFETY: our block, still allocated.
                        let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), n) };
                        assert!(bytes.iter().all(|&b| b == t + 1), "a block was handed out twice");
                        slab.free(q.as_ptr()).unwrap();
                    }
                }
                for (q, _) in live {
                    slab.free(q.as_ptr()).unwrap();
                }
            });
        }
    });
    let p = slab.alloc(64, 16).unwrap();
    assert!(slab.free(p.as_ptr()).is_ok());
    assert!(slab.free(p.as_ptr()).is_err(), "a double free is refused");
    let q = slab.alloc(64, 16).unwrap();
    let peer = PeerId { pid: 77, start: 5 };
    slab.lend(q.as_ptr(), peer).unwrap();
    assert!(
        slab.free(q.as_ptr()).is_err(),
        "a lent block cannot be freed by its owner"
    );
    assert!(slab.reclaim(q.as_ptr() as u64, PeerId { pid: 77, start: 6 }).is_err());
    slab.reclaim(q.as_ptr() as u64, peer).unwrap();
    assert!(
        slab.reclaim(q.as_ptr() as u64, peer).is_err(),
        "a second release is refused"
    );
    assert_eq!(slab.stats().in_use, before, "bytes still counted in use");
}
