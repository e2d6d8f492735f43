//! The single-producer single-consumer linked-buffer queue.
//!
//! Records of any size are appended inline in a chain of blocks that live in
//! the **producer's** arena. Each record is an 8-byte header (`seq`, `len`)
//! followed by its payload, padded to 8 bytes. The consumer reads records in
//! place through its read-only mapping and polls the *next record's own
//! sequence word* (written last, with Release), so a hop costs one cache-line
//! transfer and no shared tail counter. When a record does not fit in the
//! rest of a block, the producer writes a skip record there and continues in
//! a fresh block linked from the old one; a record larger than a block gets
//! a block of its own ("jumbo").
//!
//! The consumer publishes how many blocks it has passed in a cursor word in
//! **its own** arena; the producer recycles those blocks. Both sides check
//! what they read from the other: a record that runs past its block, a
//! sequence word that jumps, a cursor that runs ahead or goes backwards are
//! protocol errors, never undefined behaviour.
//!
//! Sequence numbers start at 1 and skip 0 on wrap, so a zeroed block never
//! holds a valid record. Bytes left in a block by an earlier use must never
//! pass for the next record either, and the producer does not clear headers
//! one by one on the hot path (each such store would delay the publication
//! behind a cache-line transfer). Instead every block enters the queue
//! *clean*: zeroed when recycled (once per ~2000 small records), or fresh
//! memfd pages, which are zero already and stay untouched (no memory cost)
//! until written. So a header the consumer reads is 0 or a record of this
//! lap, and a sequence number ahead of the expected one can only come from a
//! broken producer.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::types::PeerMem;

/// Size of a normal block (fits the allocator's 64 KiB class with its header).
pub const BLOCK_SIZE: usize = (64 << 10) - 128;
/// Block header: the link to the next block and the block's size, padded
/// so records start on a fresh cache line.
pub const BLOCK_HEADER: usize = 64;
const RECORD_HEADER: usize = 8;
/// `len` of a skip record: the next record is at the start of the next block.
const SKIP: u32 = u32::MAX;
/// Largest block a consumer accepts (a jumbo record of 1 GiB).
pub const MAX_BLOCK: u64 = 1 << 30;
/// Normal blocks kept for reuse instead of going back to the allocator.
const KEEP_FREE: usize = 4;

#[repr(C)]
struct BlockHeader {
    next: AtomicU64,
    size: AtomicU64,
}

#[repr(C)]
struct RecordHeader {
    seq: AtomicU32,
    len: u32,
}

const fn next_seq(s: u32) -> u32 {
    if s == u32::MAX { 1 } else { s + 1 }
}

const fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

/// Bytes a record of `len` takes in a block, header included.
const fn footprint(len: usize) -> usize {
    pad8(RECORD_HEADER + len)
}

/// Where the consumer validates what it reads: a peer's memory while this
/// thread may read it ([`PeerMem`]), or (in tests) any checker with the
/// same contract.
///
/// # Safety
/// `check` may return `Ok` only for a range that is mapped, and readable by
/// the calling thread (protection keys included) for as long as `self` is
/// borrowed, that is for `'a`.
pub unsafe trait Bounds<'a>: Copy {
    /// Errors unless `[addr, addr+len)` is readable and aligned to `align`.
    fn check(&self, addr: u64, len: u64, align: u64) -> Result<()>;
}

// SAFETY: a PeerMem exists only while its Access (or an equivalent grant)
// lives, and the region stays mapped while it is borrowed, both for 'a.
unsafe impl<'a> Bounds<'a> for PeerMem<'a> {
    fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
        PeerMem::check(self, addr, len, align)
    }
}

/// The writing end, in the producer's process. Blocks are in its arena.
pub struct Producer {
    /// Blocks from the oldest one the consumer may still read to the current one.
    chain: VecDeque<u64>,
    /// The current (last) block of `chain`, and its size: kept at hand for
    /// the hot path.
    cur: u64,
    cur_size: usize,
    /// Write offset in the current block.
    off: usize,
    /// Last sequence number published.
    seq: u32,
    /// Recycled normal blocks.
    free: Vec<u64>,
    /// Blocks we have moved past (linked a successor to).
    passed: u64,
    /// Blocks the consumer said it passed (the last cursor value accepted).
    consumed: u64,
    /// Header word of the first record published since the last ring: the
    /// word a parked consumer is sleeping on.
    wake_word: Option<NonNull<AtomicU32>>,
}

// SAFETY: the raw pointers point into the process-wide arena, which outlives
// every thread; a Producer is used by one thread at a time (`&mut self`).
unsafe impl Send for Producer {}

/// A clean normal block: zeroed, with its header written.
fn alloc_block() -> Result<u64> {
    let p = Arena::global()?.alloc_zeroed(BLOCK_SIZE, 64)?;
    init_block(p.as_ptr() as u64, BLOCK_SIZE);
    Ok(p.as_ptr() as u64)
}

/// A block for one record of `len` bytes: only its two header positions
/// (the record and the skip after it) need to be clean.
fn alloc_jumbo(len: usize) -> Result<u64> {
    let size = BLOCK_HEADER + footprint(len) + RECORD_HEADER;
    let b = Arena::global()?.alloc_raw(size, 64)?.as_ptr() as u64;
    init_block(b, size);
    for at in [BLOCK_HEADER, BLOCK_HEADER + footprint(len)] {
        // SAFETY: both positions leave room for a header inside the block.
        unsafe {
            (*((b + at as u64) as *const RecordHeader))
                .seq
                .store(0, Ordering::Relaxed)
        };
    }
    Ok(b)
}

fn init_block(b: u64, size: usize) {
    let h = b as *const BlockHeader;
    // SAFETY: a block of `size >= BLOCK_HEADER` bytes in our arena, ours alone.
    unsafe {
        (*h).next.store(0, Ordering::Relaxed);
        (*h).size.store(size as u64, Ordering::Relaxed);
    }
}

fn free_block(addr: u64) {
    if let (Ok(arena), Some(p)) = (Arena::global(), NonNull::new(addr as *mut u8)) {
        // SAFETY: the consumer has passed the block and we hold no reference into it.
        let _ = unsafe { arena.free_raw(p) };
    }
}

impl Producer {
    /// A queue with one empty block.
    pub fn new() -> Result<Self> {
        let first = alloc_block()?;
        Ok(Self {
            chain: VecDeque::from([first]),
            cur: first,
            cur_size: BLOCK_SIZE,
            off: BLOCK_HEADER,
            seq: 0,
            free: Vec::new(),
            passed: 0,
            consumed: 0,
            wake_word: None,
        })
    }

    /// Address of the first block; the consumer starts there.
    pub fn head(&self) -> u64 {
        *self.chain.front().expect("the chain is never empty")
    }

    fn current(&self) -> u64 {
        self.cur
    }

    fn block_size(block: u64) -> usize {
        // SAFETY: `block` is one of our live blocks.
        unsafe { (*(block as *const BlockHeader)).size.load(Ordering::Relaxed) as usize }
    }

    fn header(&self, at: usize) -> *mut RecordHeader {
        (self.current() + at as u64) as *mut RecordHeader
    }

    /// Publishes the header at offset `at` of the current block.
    fn publish_header(&mut self, at: usize, len: u32) {
        self.seq = next_seq(self.seq);
        let h = self.header(at);
        // SAFETY: `at` leaves room for a header in our current block (kept by
        // `reserve`), and the consumer does not read it before `seq` changes.
        unsafe {
            std::ptr::addr_of_mut!((*h).len).write(len);
            // Release: publishes `len`, the payload and (for a skip) the next
            // link; pairs with the Acquire in `Consumer::ready_record`.
            (*h).seq.store(self.seq, Ordering::Release);
            if self.wake_word.is_none() {
                self.wake_word = NonNull::new(std::ptr::addr_of_mut!((*h).seq));
            }
        }
    }

    /// A clean normal block: recycled (and zeroed) if one is at hand, else
    /// allocated. Recycled blocks must be zeroed: new records do not line up
    /// with old ones, so an old payload could pass for a header.
    fn clean_block(&mut self) -> Result<u64> {
        let Some(b) = self.free.pop() else { return alloc_block() };
        // SAFETY: a recycled block of ours that the consumer has passed.
        unsafe { std::ptr::write_bytes((b + BLOCK_HEADER as u64) as *mut u8, 0, BLOCK_SIZE - BLOCK_HEADER) };
        init_block(b, BLOCK_SIZE);
        Ok(b)
    }

    /// Moves to a fresh block with room for a record of `len`, leaving a skip
    /// record behind.
    fn advance(&mut self, len: usize) -> Result<()> {
        let need = BLOCK_HEADER + footprint(len) + RECORD_HEADER;
        let next = if need <= BLOCK_SIZE {
            self.clean_block()?
        } else {
            alloc_jumbo(len)?
        };
        // SAFETY: the current block is ours; the link is published by the
        // skip record's Release store below.
        unsafe {
            (*(self.current() as *const BlockHeader))
                .next
                .store(next, Ordering::Relaxed)
        };
        let at = self.off;
        self.publish_header(at, SKIP);
        self.chain.push_back(next);
        self.cur = next;
        self.cur_size = Self::block_size(next);
        self.passed += 1;
        self.off = BLOCK_HEADER;
        Ok(())
    }

    /// Space for a record of exactly `len` bytes, to fill before
    /// [`Producer::commit`]. Moves to a new block if this one is too full.
    pub fn reserve(&mut self, len: usize) -> Result<&mut [u8]> {
        if len >= SKIP as usize {
            return Err(Error::TooLarge {
                len,
                capacity: SKIP as usize - 1,
            });
        }
        // Always leave room for one more header (a skip record) after this one.
        if self.off + footprint(len) + RECORD_HEADER > self.cur_size {
            self.advance(len)?;
        }
        let payload = (self.current() + (self.off + RECORD_HEADER) as u64) as *mut u8;
        // SAFETY: the bytes lie in our current block (checked above) and are
        // not visible to the consumer until `commit` publishes them.
        Ok(unsafe { std::slice::from_raw_parts_mut(payload, len) })
    }

    /// Publishes the record reserved with [`Producer::reserve`], `len` bytes
    /// long (at most what was reserved). Does not wake the consumer: call
    /// [`Producer::ring`] after a batch.
    pub fn commit(&mut self, len: usize) {
        let at = self.off;
        self.off += footprint(len);
        self.publish_header(at, len as u32);
    }

    /// Appends one record (reserve, copy, commit).
    pub fn push(&mut self, bytes: &[u8]) -> Result<()> {
        self.reserve(bytes.len())?.copy_from_slice(bytes);
        self.commit(bytes.len());
        Ok(())
    }

    /// After a batch: wakes the consumer if its `parked` flag (its memory)
    /// is set. Returns whether a wake system call was made.
    pub fn ring(&mut self, consumer_parked: &AtomicU32) -> bool {
        let Some(word) = self.wake_word.take() else {
            return false;
        };
        // The producer half of the doorbell handshake (see `doorbell`).
        if !crate::doorbell::must_wake(consumer_parked) {
            return false;
        }
        // SAFETY: the word is in one of our live blocks (not recycled: the
        // consumer cannot have passed a record it has not seen).
        crate::sys::futex_wake(unsafe { word.as_ref() }, i32::MAX);
        true
    }

    /// Takes the consumer's cursor (blocks it has passed) and recycles those
    /// blocks. A cursor that runs ahead of what we wrote or goes backwards
    /// is a protocol violation by `pid`.
    pub fn recycle(&mut self, cursor: u64, pid: i32) -> Result<()> {
        if cursor == self.consumed {
            return Ok(());
        }
        if cursor < self.consumed || cursor > self.passed {
            return Err(Error::Protocol {
                pid,
                detail: format!(
                    "queue cursor {cursor} {} (consumed {}, written {})",
                    if cursor < self.consumed {
                        "went backwards"
                    } else {
                        "ran ahead of the producer"
                    },
                    self.consumed,
                    self.passed
                ),
            });
        }
        for _ in self.consumed..cursor {
            let b = self.chain.pop_front().expect("passed blocks are in the chain");
            if Self::block_size(b) == BLOCK_SIZE && self.free.len() < KEEP_FREE {
                self.free.push(b);
            } else {
                free_block(b);
            }
        }
        self.consumed = cursor;
        Ok(())
    }

    /// Blocks written and not yet passed by the consumer.
    pub fn backlog_blocks(&self) -> usize {
        self.chain.len()
    }

    /// Test hook: publishes a header at the write position whose sequence
    /// number is `seq_skew` past the right one and whose length is `len`,
    /// as a buggy or hostile producer might.
    #[doc(hidden)]
    pub fn inject_header(&mut self, seq_skew: u32, len: u32) {
        let h = self.header(self.off);
        let seq = next_seq(self.seq).wrapping_add(seq_skew);
        // SAFETY: the write position always has room for a header.
        unsafe {
            std::ptr::addr_of_mut!((*h).len).write(len);
            (*h).seq.store(seq, Ordering::Release);
            self.wake_word = NonNull::new(std::ptr::addr_of_mut!((*h).seq));
        }
        // Later records go after it, so they do not overwrite the forgery.
        self.seq = seq;
        self.off += RECORD_HEADER;
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        for b in self.chain.drain(..).chain(self.free.drain(..)) {
            free_block(b);
        }
    }
}

/// The reading end, in the consumer's process. Reads the producer's blocks
/// in place and validates everything.
pub struct Consumer {
    block: u64,
    size: u64,
    off: u64,
    expected: u32,
    passed: u64,
    pid: i32,
}

impl Consumer {
    /// Starts reading at the producer's first block `head`.
    pub fn new<'a>(bounds: impl Bounds<'a>, head: u64, pid: i32) -> Result<Self> {
        let size = Self::check_block(bounds, head, pid)?;
        Ok(Self {
            block: head,
            size,
            off: BLOCK_HEADER as u64,
            expected: 1,
            passed: 0,
            pid,
        })
    }

    fn violation(&self, detail: String) -> Error {
        Error::Protocol { pid: self.pid, detail }
    }

    fn check_block<'a>(bounds: impl Bounds<'a>, addr: u64, pid: i32) -> Result<u64> {
        bounds.check(addr, BLOCK_HEADER as u64, 64)?;
        // SAFETY: the header lies in the peer's mapping (checked just above).
        let size = unsafe { (*(addr as *const BlockHeader)).size.load(Ordering::Relaxed) };
        if !(BLOCK_HEADER as u64 + RECORD_HEADER as u64..=MAX_BLOCK).contains(&size) {
            return Err(Error::Protocol {
                pid,
                detail: format!("queue block at {addr:#x} claims a size of {size}"),
            });
        }
        bounds.check(addr, size, 64)?;
        Ok(size)
    }

    fn header(&self) -> &RecordHeader {
        // SAFETY: the block was checked to lie in the peer's mapping, and every
        // position we move to leaves room for a header (checked in `next`).
        unsafe { &*((self.block + self.off) as *const RecordHeader) }
    }

    /// The word the next record's header will change and its current value,
    /// to sleep on; `None` if a record (or skip) is already there, so there
    /// is nothing to wait for. The word is readable while `bounds` is.
    pub fn wait_word<'a>(&'a self, bounds: impl Bounds<'a>) -> Option<(&'a AtomicU32, u32)> {
        let _ = bounds;
        let w = &self.header().seq;
        let now = w.load(Ordering::Relaxed);
        (now != self.expected).then_some((w, now))
    }

    /// Blocks passed so far (what to publish as the cursor).
    pub fn passed(&self) -> u64 {
        self.passed
    }

    /// Whether a record is ready at the read position. Steps over skip
    /// records into the next block (validating it) on the way, and reports
    /// a sequence word that jumps.
    pub fn ready_record<'a>(&mut self, bounds: impl Bounds<'a>) -> Result<bool> {
        loop {
            let h = self.header();
            // Acquire: pairs with the Release store in `Producer::publish_header`.
            let seq = h.seq.load(Ordering::Acquire);
            if seq != self.expected {
                // Blocks enter the queue clean (see the module docs): a header
                // not yet rewritten holds 0 or a number behind the expected
                // one. A number ahead of it can only be a broken producer.
                let behind = self.expected.wrapping_sub(seq);
                if seq != 0 && behind >= 1 << 31 {
                    return Err(self.violation(format!(
                        "queue sequence word jumped to {seq} while {} was next",
                        self.expected
                    )));
                }
                return Ok(false);
            }
            // SAFETY: as in `header`; a volatile read takes one snapshot of a
            // value the peer could be changing, validated before use.
            let len = unsafe { std::ptr::addr_of!(h.len).read_volatile() };
            if len != SKIP {
                return Ok(true);
            }
            // SAFETY: the block header was validated in `check_block`.
            let next = unsafe { (*(self.block as *const BlockHeader)).next.load(Ordering::Relaxed) };
            self.size = Self::check_block(bounds, next, self.pid)?;
            self.expected = next_seq(self.expected);
            self.block = next;
            self.off = BLOCK_HEADER as u64;
            self.passed += 1;
        }
    }

    /// The next record's payload, in place in the producer's block, or `None`
    /// if it has not been published yet.
    pub fn next<'a>(&mut self, bounds: impl Bounds<'a>) -> Result<Option<&'a [u8]>> {
        let h = self.header();
        // Acquire: pairs with the Release store in `Producer::publish_header`.
        // (The fast path: a ready, ordinary record; `ready_record` handles
        // everything else, including skips and broken headers.)
        let ready = h.seq.load(Ordering::Acquire) == self.expected;
        // SAFETY: as in `header`; a volatile read takes one snapshot of a
        // value the peer could be changing, validated before use.
        let len = unsafe { std::ptr::addr_of!(h.len).read_volatile() };
        if !ready || len == SKIP {
            if !self.ready_record(bounds)? {
                return Ok(None);
            }
            return self.next(bounds);
        }
        let end = self.off + footprint(len as usize) as u64;
        if end + RECORD_HEADER as u64 > self.size {
            return Err(self.violation(format!(
                "queue record of {len} bytes at offset {} runs past its block of {}",
                self.off, self.size
            )));
        }
        self.expected = next_seq(self.expected);
        let payload = self.block + self.off + RECORD_HEADER as u64;
        self.off = end;
        // SAFETY: `[payload, payload+len)` lies inside the checked block; the
        // producer does not reuse it before we pass the block.
        Ok(Some(unsafe {
            std::slice::from_raw_parts(payload as *const u8, len as usize)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own arena stands in for the peer's region in single-process tests.
    #[derive(Clone, Copy)]
    struct OwnArena;
    // SAFETY: our own arena is mapped read-write for the process's life and
    // carries no protection key.
    unsafe impl Bounds<'static> for OwnArena {
        fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
            let r = Arena::global()?.region();
            if addr % align == 0 && r.contains(addr, len) {
                Ok(())
            } else {
                Err(Error::InvalidPointer {
                    addr,
                    len,
                    reason: "outside",
                })
            }
        }
    }

    #[test]
    fn records_of_every_size_cross_blocks_in_order() {
        // Allocates from the process-wide arena, whose in-use figure other
        // tests compare: one at a time.
        let _serial = crate::arena::tests::SERIAL.lock();
        let mut p = Producer::new().unwrap();
        let mut c = Consumer::new(OwnArena, p.head(), 0).unwrap();
        let sizes = [0usize, 1, 7, 8, 9, 100, 4000, 70_000, 3, BLOCK_SIZE, 5];
        for round in 0..20u8 {
            for &n in &sizes {
                let buf = p.reserve(n).unwrap();
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = round.wrapping_add(i as u8));
                p.commit(n);
            }
            for &n in &sizes {
                let rec = c.next(OwnArena).unwrap().expect("published");
                assert_eq!(rec.len(), n);
                assert!(rec.iter().enumerate().all(|(i, &b)| b == round.wrapping_add(i as u8)));
            }
            assert!(c.next(OwnArena).unwrap().is_none());
            p.recycle(c.passed(), 0).unwrap();
        }
        assert!(p.backlog_blocks() <= 2, "passed blocks are recycled");
    }

    #[test]
    fn hostile_values_are_protocol_errors() {
        // Allocates from the process-wide arena, whose in-use figure other
        // tests compare: one at a time.
        let _serial = crate::arena::tests::SERIAL.lock();
        let mut p = Producer::new().unwrap();
        let mut c = Consumer::new(OwnArena, p.head(), 7).unwrap();
        p.push(b"ok").unwrap();
        assert_eq!(c.next(OwnArena).unwrap(), Some(&b"ok"[..]));
        // A length past the block.
        p.inject_header(0, 1 << 20);
        assert!(matches!(c.next(OwnArena), Err(Error::Protocol { pid: 7, .. })));

        let mut p = Producer::new().unwrap();
        let mut c = Consumer::new(OwnArena, p.head(), 7).unwrap();
        assert!(c.next(OwnArena).unwrap().is_none());
        // A sequence word that jumps.
        p.inject_header(8, 4);
        assert!(matches!(c.next(OwnArena), Err(Error::Protocol { .. })));

        // Cursors that run ahead or go backwards.
        let mut p = Producer::new().unwrap();
        for _ in 0..3 {
            p.push(&vec![0u8; BLOCK_SIZE / 2]).unwrap();
        }
        assert!(p.recycle(1, 3).is_ok());
        assert!(matches!(p.recycle(0, 3), Err(Error::Protocol { .. })));
        assert!(matches!(p.recycle(99, 3), Err(Error::Protocol { .. })));
    }
}
