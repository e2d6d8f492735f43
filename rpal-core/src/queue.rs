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
use std::sync::atomic::{AtomicU32, Ordering};

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::sync::Word64;
use crate::types::PeerMem;

/// Size of a normal block (fits the allocator's 64 KiB class with its header).
pub const BLOCK_SIZE: usize = (64 << 10) - 128;
/// Block header: the link to the next block and the block's size, padded
/// so records start on a fresh cache line.
pub const BLOCK_HEADER: usize = 64;
const RECORD_HEADER: usize = 8;
/// `len` of a skip record: the next record is at the start of the next block.
const SKIP: u32 = u32::MAX;
/// Most skip records followed in a row before the producer is called broken.
const MAX_SKIPS: usize = 64;
/// Largest block a consumer accepts (a jumbo record of 1 GiB).
pub const MAX_BLOCK: u64 = 1 << 30;
/// Normal blocks kept for reuse instead of going back to the allocator.
const KEEP_FREE: usize = 4;
/// The ordering that publishes a record. `--cfg rpal_loom_weak_publish`
/// weakens it, only to show that the loom model then fails.
const PUBLISH: Ordering = if cfg!(rpal_loom_weak_publish) {
    Ordering::Relaxed
} else {
    Ordering::Release
};

// Layout of a block (offsets from its address): the header's `next` link
// (u64) at 0 and `size` (u64) at 8; then records, each a `seq` word (u32)
// at +0, its `len` (u32) at +4 and the payload at +8.
const LINK_AT: u64 = 0;
const SIZE_AT: u64 = 8;
const LEN_AT: u64 = 4;

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

/// The seam between the queue's protocol and its memory: where blocks come
/// from (the producer's allocator) and how the words and bytes in them are
/// reached. [`Shm`] is the real one (the process's arena, plain loads and
/// stores on mapped memory); a loom model plugs in memory whose words are
/// loom atomics, so the same producer and consumer code runs in the model.
///
/// # Safety
/// Every method that takes an address is called only with addresses inside
/// a block that `alloc` returned (on the producer's side) or that the
/// consumer's [`Bounds`] accepted, and an implementation must make such
/// accesses sound (mapped, aligned, atomic where the method says so).
#[doc(hidden)]
pub unsafe trait Blocks: Copy {
    /// Bytes of a normal block.
    const BLOCK_SIZE: usize;
    /// A block of `size` bytes, 64-byte aligned; zeroed if `zeroed`.
    fn alloc(self, size: usize, zeroed: bool) -> Result<u64>;
    /// Gives a block back to the allocator.
    ///
    /// # Safety
    /// `block` came from `alloc`, and nothing reads it any more.
    unsafe fn free(self, block: u64);
    /// Zeroes `len` bytes at `addr`.
    ///
    /// # Safety
    /// The range lies in one of our blocks that no consumer reads.
    unsafe fn zero(self, addr: u64, len: usize);
    /// Atomic load of the u32 at `addr`.
    ///
    /// # Safety
    /// `addr` is a 4-aligned word in a block (see the trait's contract).
    unsafe fn load32(self, addr: u64, order: Ordering) -> u32;
    /// Atomic store of the u32 at `addr`.
    ///
    /// # Safety
    /// As [`Blocks::load32`], in a block of ours.
    unsafe fn store32(self, addr: u64, value: u32, order: Ordering);
    /// One snapshot of the u32 at `addr`, which the peer may be changing.
    ///
    /// # Safety
    /// As [`Blocks::load32`].
    unsafe fn read32(self, addr: u64) -> u32;
    /// A plain write of the u32 at `addr`, published by a later Release.
    ///
    /// # Safety
    /// As [`Blocks::store32`]; no consumer reads it before that Release.
    unsafe fn write32(self, addr: u64, value: u32);
    /// Relaxed load of the u64 at `addr` (a block header field).
    ///
    /// # Safety
    /// `addr` is an 8-aligned word in a block.
    unsafe fn load64(self, addr: u64) -> u64;
    /// Relaxed store of the u64 at `addr` (a block header field).
    ///
    /// # Safety
    /// As [`Blocks::load64`], in a block of ours.
    unsafe fn store64(self, addr: u64, value: u64);
    /// The `len` bytes at `addr`, to fill.
    ///
    /// # Safety
    /// The range lies in a block of ours, unpublished, and no other
    /// reference to it lives for `'a`.
    unsafe fn bytes_mut<'a>(self, addr: u64, len: usize) -> &'a mut [u8];
    /// The `len` bytes at `addr`, to read.
    ///
    /// # Safety
    /// The range lies in a checked block that stays mapped and readable for `'a`.
    unsafe fn bytes<'a>(self, addr: u64, len: usize) -> &'a [u8];
}

/// The real memory: blocks from the process's arena, read and written in
/// place through our mapping of it (or the consumer's of the producer's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shm;

// SAFETY: the callers' contract (addresses inside live, mapped blocks,
// aligned as each method says) is exactly what these raw accesses need.
unsafe impl Blocks for Shm {
    const BLOCK_SIZE: usize = BLOCK_SIZE;

    fn alloc(self, size: usize, zeroed: bool) -> Result<u64> {
        let arena = Arena::global()?;
        let p = if zeroed {
            arena.alloc_zeroed(size, 64)?
        } else {
            arena.alloc_raw(size, 64)?
        };
        Ok(p.as_ptr() as u64)
    }

    unsafe fn free(self, block: u64) {
        if let (Ok(arena), Some(p)) = (Arena::global(), std::ptr::NonNull::new(block as *mut u8)) {
            // SAFETY: per the caller, the block is ours and unread.
            let _ = unsafe { arena.free_raw(p) };
        }
    }

    #[inline(always)]
    unsafe fn zero(self, addr: u64, len: usize) {
        // SAFETY: per the caller, the range is in one of our unread blocks.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) }
    }

    #[inline(always)]
    unsafe fn load32(self, addr: u64, order: Ordering) -> u32 {
        // SAFETY: per the caller, a live aligned word; AtomicU32 has u32's layout.
        unsafe { (*(addr as *const AtomicU32)).load(order) }
    }

    #[inline(always)]
    unsafe fn store32(self, addr: u64, value: u32, order: Ordering) {
        // SAFETY: as in `load32`, in our own writable block.
        unsafe { (*(addr as *const AtomicU32)).store(value, order) }
    }

    #[inline(always)]
    unsafe fn read32(self, addr: u64) -> u32 {
        // SAFETY: as in `load32`. An atomic (Relaxed) load, not a plain
        // or volatile one: the word may be written by the peer as we read
        // it, which is a data race for a non-atomic access (Miri found it);
        // on x86-64 it is the same single `mov`.
        unsafe { (*(addr as *const AtomicU32)).load(Ordering::Relaxed) }
    }

    #[inline(always)]
    unsafe fn write32(self, addr: u64, value: u32) {
        // SAFETY: as in `store32`. Relaxed atomic, for the reason in `read32`.
        unsafe { (*(addr as *const AtomicU32)).store(value, Ordering::Relaxed) }
    }

    #[inline(always)]
    unsafe fn load64(self, addr: u64) -> u64 {
        // SAFETY: per the caller, a live aligned word; AtomicU64 has u64's layout.
        unsafe { (*(addr as *const std::sync::atomic::AtomicU64)).load(Ordering::Relaxed) }
    }

    #[inline(always)]
    unsafe fn store64(self, addr: u64, value: u64) {
        // SAFETY: as in `load64`, in our own writable block.
        unsafe { (*(addr as *const std::sync::atomic::AtomicU64)).store(value, Ordering::Relaxed) }
    }

    #[inline(always)]
    unsafe fn bytes_mut<'a>(self, addr: u64, len: usize) -> &'a mut [u8] {
        // SAFETY: per the caller, unaliased bytes of our block.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
    }

    #[inline(always)]
    unsafe fn bytes<'a>(self, addr: u64, len: usize) -> &'a [u8] {
        // SAFETY: per the caller, mapped and readable for 'a.
        unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
    }
}

/// The consumer's side of the cursor: says it has passed `passed` blocks.
/// Release: everything it read in those blocks happens before the producer
/// recycles (zeroes, rewrites) them; pairs with [`read_cursor`].
pub(crate) fn publish_cursor(word: &impl Word64, passed: u64) {
    word.store(passed, Ordering::Release);
}

/// The producer's side of the cursor: how many blocks the consumer says it
/// passed (to give to [`Producer::recycle`]). Acquire: pairs with
/// [`publish_cursor`].
pub(crate) fn read_cursor(word: &impl Word64) -> u64 {
    word.load(Ordering::Acquire)
}

/// The writing end, in the producer's process. Blocks are in its arena.
pub struct Producer<B: Blocks = Shm> {
    mem: B,
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
    /// Address of the header word of the first record published since the
    /// last ring (0: none): the word a parked consumer is sleeping on.
    wake_at: u64,
}

impl<B: Blocks> Producer<B> {
    /// A queue with one empty block, in `mem`.
    pub fn new_in(mem: B) -> Result<Self> {
        let first = Self::alloc_block(mem)?;
        Ok(Self {
            mem,
            chain: VecDeque::from([first]),
            cur: first,
            cur_size: B::BLOCK_SIZE,
            off: BLOCK_HEADER,
            seq: 0,
            free: Vec::new(),
            passed: 0,
            consumed: 0,
            wake_at: 0,
        })
    }

    /// A clean normal block: zeroed, with its header written.
    fn alloc_block(mem: B) -> Result<u64> {
        let b = mem.alloc(B::BLOCK_SIZE, true)?;
        // SAFETY: a block of ours, just allocated.
        unsafe { init_block(mem, b, B::BLOCK_SIZE) };
        Ok(b)
    }

    /// A block for one record of `len` bytes: only its two header positions
    /// (the record and the skip after it) need to be clean.
    fn alloc_jumbo(mem: B, len: usize) -> Result<u64> {
        let size = BLOCK_HEADER + footprint(len) + RECORD_HEADER;
        let b = mem.alloc(size, false)?;
        // SAFETY: a block of `size` bytes of ours, just allocated; both header
        // positions leave room for a header inside it.
        unsafe {
            init_block(mem, b, size);
            for at in [BLOCK_HEADER, BLOCK_HEADER + footprint(len)] {
                mem.store32(b + at as u64, 0, Ordering::Relaxed);
            }
        }
        Ok(b)
    }

    /// Address of the first block; the consumer starts there.
    pub fn head(&self) -> u64 {
        *self.chain.front().expect("the chain is never empty")
    }

    fn block_size(&self, block: u64) -> usize {
        // SAFETY: `block` is one of our live blocks.
        unsafe { self.mem.load64(block + SIZE_AT) as usize }
    }

    /// Publishes the header at offset `at` of the current block.
    #[inline(always)]
    fn publish_header(&mut self, at: usize, len: u32) {
        self.seq = next_seq(self.seq);
        let h = self.cur + at as u64;
        // SAFETY: `at` leaves room for a header in our current block (kept by
        // `reserve`), and the consumer does not read it before `seq` changes.
        unsafe {
            self.mem.write32(h + LEN_AT, len);
            // Release: publishes `len`, the payload and (for a skip) the next
            // link; pairs with the Acquire in `Consumer::ready_record`.
            self.mem.store32(h, self.seq, PUBLISH);
        }
        if self.wake_at == 0 {
            self.wake_at = h;
        }
    }

    /// A clean normal block: recycled (and zeroed) if one is at hand, else
    /// allocated. Recycled blocks must be zeroed: new records do not line up
    /// with old ones, so an old payload could pass for a header.
    fn clean_block(&mut self) -> Result<u64> {
        let Some(b) = self.free.pop() else {
            return Self::alloc_block(self.mem);
        };
        // SAFETY: a recycled block of ours that the consumer has passed.
        unsafe {
            self.mem.zero(b + BLOCK_HEADER as u64, B::BLOCK_SIZE - BLOCK_HEADER);
            init_block(self.mem, b, B::BLOCK_SIZE);
        }
        Ok(b)
    }

    /// Moves to a fresh block with room for a record of `len`, leaving a skip
    /// record behind.
    fn advance(&mut self, len: usize) -> Result<()> {
        let need = BLOCK_HEADER + footprint(len) + RECORD_HEADER;
        let next = if need <= B::BLOCK_SIZE {
            self.clean_block()?
        } else {
            Self::alloc_jumbo(self.mem, len)?
        };
        // SAFETY: the current block is ours; the link is published by the
        // skip record's Release store below.
        unsafe { self.mem.store64(self.cur + LINK_AT, next) };
        let at = self.off;
        self.publish_header(at, SKIP);
        self.chain.push_back(next);
        self.cur = next;
        self.cur_size = self.block_size(next);
        self.passed += 1;
        self.off = BLOCK_HEADER;
        Ok(())
    }

    /// Space for a record of exactly `len` bytes, to fill before
    /// [`Producer::commit`]. Moves to a new block if this one is too full.
    #[inline]
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
        let payload = self.cur + (self.off + RECORD_HEADER) as u64;
        // SAFETY: the bytes lie in our current block (checked above) and are
        // not visible to the consumer until `commit` publishes them.
        Ok(unsafe { self.mem.bytes_mut(payload, len) })
    }

    /// Publishes the record reserved with [`Producer::reserve`], `len` bytes
    /// long (at most what was reserved). Does not wake the consumer: call
    /// [`Producer::ring`] after a batch.
    #[inline]
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
            if self.block_size(b) == B::BLOCK_SIZE && self.free.len() < KEEP_FREE {
                self.free.push(b);
            } else {
                // SAFETY: the consumer has passed the block and we hold no
                // reference into it.
                unsafe { self.mem.free(b) };
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
        let h = self.cur + self.off as u64;
        let seq = next_seq(self.seq).wrapping_add(seq_skew);
        // SAFETY: the write position always has room for a header.
        unsafe {
            self.mem.write32(h + LEN_AT, len);
            self.mem.store32(h, seq, Ordering::Release);
        }
        self.wake_at = h;
        // Later records go after it, so they do not overwrite the forgery.
        self.seq = seq;
        self.off += RECORD_HEADER;
    }
}

impl Producer {
    /// A queue with one empty block, in the process's arena.
    pub fn new() -> Result<Self> {
        Self::new_in(Shm)
    }

    /// After a batch: wakes the consumer if its `parked` flag (its memory)
    /// is set. Returns whether a wake system call was made.
    pub fn ring(&mut self, consumer_parked: &AtomicU32) -> bool {
        let word = std::mem::take(&mut self.wake_at);
        if word == 0 {
            return false;
        }
        // The producer half of the doorbell handshake (see `doorbell`).
        if !crate::doorbell::must_wake(consumer_parked) {
            return false;
        }
        // SAFETY: the word is in one of our live blocks (not recycled: the
        // consumer cannot have passed a record it has not seen), aligned,
        // and AtomicU32 has u32's layout.
        crate::sys::futex_wake(unsafe { &*(word as *const AtomicU32) }, i32::MAX);
        true
    }
}

/// Writes a block's header: no successor yet, and its size.
///
/// # Safety
/// `b` is a block of `size >= BLOCK_HEADER` bytes of ours that no consumer reads.
unsafe fn init_block<B: Blocks>(mem: B, b: u64, size: usize) {
    // SAFETY: per the caller.
    unsafe {
        mem.store64(b + LINK_AT, 0);
        mem.store64(b + SIZE_AT, size as u64);
    }
}

impl<B: Blocks> Drop for Producer<B> {
    fn drop(&mut self) {
        for b in self.chain.drain(..).chain(self.free.drain(..)) {
            // SAFETY: the queue is gone; nothing of ours reads its blocks.
            unsafe { self.mem.free(b) };
        }
    }
}

/// The reading end, in the consumer's process. Reads the producer's blocks
/// in place and validates everything.
pub struct Consumer<B: Blocks = Shm> {
    mem: B,
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
        Self::new_in(Shm, bounds, head, pid)
    }

    /// The word the next record's header will change and its current value,
    /// to sleep on; `None` if a record (or skip) is already there, so there
    /// is nothing to wait for. The word is readable while `bounds` is.
    pub fn wait_word<'a>(&'a self, bounds: impl Bounds<'a>) -> Option<(&'a AtomicU32, u32)> {
        let _ = bounds;
        // SAFETY: the block was checked to lie in the peer's mapping, which
        // `bounds` keeps readable for 'a; the position leaves room for a header.
        let w = unsafe { &*((self.block + self.off) as *const AtomicU32) };
        let now = w.load(Ordering::Relaxed);
        (now != self.expected).then_some((w, now))
    }
}

impl<B: Blocks> Consumer<B> {
    /// Starts reading at `head`, a block in `mem`.
    pub fn new_in<'a>(mem: B, bounds: impl Bounds<'a>, head: u64, pid: i32) -> Result<Self> {
        let size = Self::check_block(mem, bounds, head, pid)?;
        Ok(Self {
            mem,
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

    fn check_block<'a>(mem: B, bounds: impl Bounds<'a>, addr: u64, pid: i32) -> Result<u64> {
        bounds.check(addr, BLOCK_HEADER as u64, 64)?;
        // SAFETY: the header lies in the peer's mapping (checked just above).
        let size = unsafe { mem.load64(addr + SIZE_AT) };
        if !(BLOCK_HEADER as u64 + RECORD_HEADER as u64..=MAX_BLOCK).contains(&size) {
            return Err(Error::Protocol {
                pid,
                detail: format!("queue block at {addr:#x} claims a size of {size}"),
            });
        }
        bounds.check(addr, size, 64)?;
        Ok(size)
    }

    /// Address of the header at the read position. The block was checked to
    /// lie in the peer's mapping, and every position we move to leaves room
    /// for a header (checked in `next`).
    #[inline(always)]
    fn header(&self) -> u64 {
        self.block + self.off
    }

    /// Blocks passed so far (what to publish as the cursor).
    pub fn passed(&self) -> u64 {
        self.passed
    }

    /// Whether a record is ready at the read position. Steps over skip
    /// records into the next block (validating it) on the way, and reports
    /// a sequence word that jumps.
    pub fn ready_record<'a>(&mut self, bounds: impl Bounds<'a>) -> Result<bool> {
        let mut skips = 0;
        loop {
            let h = self.header();
            // Acquire: pairs with the Release store in `Producer::publish_header`.
            // SAFETY: see `header`.
            let seq = unsafe { self.mem.load32(h, Ordering::Acquire) };
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
            // SAFETY: see `header`; one snapshot of a value the peer could be
            // changing, validated before use.
            let len = unsafe { self.mem.read32(h + LEN_AT) };
            if len != SKIP {
                return Ok(true);
            }
            // An honest producer skips at most a block or two in a row (a
            // reservation it did not commit, then a larger one); a long or
            // cyclic chain would hold us here.
            skips += 1;
            if skips > MAX_SKIPS {
                return Err(self.violation(format!("more than {MAX_SKIPS} queue blocks in a row hold no record")));
            }
            // SAFETY: the block header was validated in `check_block`.
            let next = unsafe { self.mem.load64(self.block + LINK_AT) };
            self.size = Self::check_block(self.mem, bounds, next, self.pid)?;
            self.expected = next_seq(self.expected);
            self.block = next;
            self.off = BLOCK_HEADER as u64;
            self.passed += 1;
        }
    }

    /// The next record's payload, in place in the producer's block, or `None`
    /// if it has not been published yet.
    #[inline]
    pub fn next<'a>(&mut self, bounds: impl Bounds<'a>) -> Result<Option<&'a [u8]>> {
        let h = self.header();
        // Acquire: pairs with the Release store in `Producer::publish_header`.
        // (The fast path: a ready, ordinary record; `ready_record` handles
        // everything else, including skips and broken headers.)
        // SAFETY: see `header`.
        let ready = unsafe { self.mem.load32(h, Ordering::Acquire) } == self.expected;
        // SAFETY: see `header`; one snapshot, validated before use.
        let len = unsafe { self.mem.read32(h + LEN_AT) };
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
        // SAFETY: `[payload, payload+len)` lies inside the checked block, which
        // `bounds` keeps readable for 'a; the producer does not reuse it
        // before we pass the block.
        Ok(Some(unsafe { self.mem.bytes(payload, len as usize) }))
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

        // Blocks that hold nothing but a skip record: up to MAX_SKIPS in a
        // row are followed, one more is a broken (or hostile) producer, and
        // the consumer's work per look stays bounded either way.
        for (skips, ok) in [(MAX_SKIPS, true), (MAX_SKIPS + 1, false)] {
            let mut p = Producer::new().unwrap();
            let mut c = Consumer::new(OwnArena, p.head(), 7).unwrap();
            for _ in 0..skips {
                p.advance(0).unwrap();
            }
            p.push(b"after").unwrap();
            let r = c.next(OwnArena);
            if ok {
                assert_eq!(r.unwrap(), Some(&b"after"[..]));
            } else {
                assert!(matches!(r, Err(Error::Protocol { pid: 7, .. })), "{r:?}");
            }
        }
    }
}

#[cfg(all(test, rpal_loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg rpal_loom" cargo test -p rpal-core --release loom_models::`
    //!
    //! The real `Producer` and `Consumer` run over [`Model`], a `Blocks`
    //! whose words are loom atomics: loom then explores how the producer's
    //! publication (header `len` written, `seq` stored with Release), its
    //! skip links, the consumer's cursor and the producer's recycling
    //! interleave. Each block's bytes are one loom cell, so loom also reports
    //! a block rewritten (zeroed on recycling, refilled) without a
    //! happens-before from the consumer's last read of it: the cursor's
    //! Release/Acquire pair. (One cell per block is exact here because no
    //! two records of the model share a block.)
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU32 as LoomU32, AtomicU64 as LoomU64};

    /// A normal block in the model: the header and 32 bytes of records, so
    /// an 8-byte record and the skip after it fill a block.
    const MODEL_BLOCK: usize = BLOCK_HEADER + 32;
    /// Room per block slot (a jumbo record of 40 bytes needs 120).
    const SLOT: usize = 128;
    const SLOTS: usize = 8;
    /// Fake addresses: slot `i` is at `BASE + i * SLOT` (64-aligned).
    const BASE: u64 = 0x1000_0000;

    struct Slot {
        link: LoomU64,
        size: LoomU64,
        /// Every u32 of the slot (headers live at 8-byte positions).
        words: Vec<LoomU32>,
        bytes: UnsafeCell<[u8; SLOT]>,
    }

    struct Model {
        slots: Vec<Slot>,
        /// Per slot: in use, and ever used (a fresh slot's atomics are zero
        /// already, so allocating it zeroed needs no stores).
        used: std::sync::Mutex<[(bool, bool); SLOTS]>,
    }

    // SAFETY: the atomics and cells are loom's, which checks every access to
    // the cells for a missing happens-before (the property under test).
    unsafe impl Sync for Model {}

    impl Model {
        fn new() -> &'static Model {
            let slots = (0..SLOTS)
                .map(|_| Slot {
                    link: LoomU64::new(0),
                    size: LoomU64::new(0),
                    words: (0..SLOT / 4).map(|_| LoomU32::new(0)).collect(),
                    bytes: UnsafeCell::new([0; SLOT]),
                })
                .collect();
            // One per model execution, small: leaked so that `&'static Model` is Copy.
            Box::leak(Box::new(Model {
                slots,
                used: std::sync::Mutex::new([(false, false); SLOTS]),
            }))
        }

        fn at(&self, addr: u64) -> (&Slot, usize) {
            let i = ((addr - BASE) / SLOT as u64) as usize;
            (&self.slots[i], ((addr - BASE) % SLOT as u64) as usize)
        }

        fn in_use(&self, addr: u64, len: u64) -> bool {
            if addr < BASE || addr >= BASE + (SLOTS * SLOT) as u64 {
                return false;
            }
            let i = ((addr - BASE) / SLOT as u64) as usize;
            let off = (addr - BASE) % SLOT as u64;
            self.used.lock().unwrap()[i].0 && off + len <= SLOT as u64
        }
    }

    // SAFETY: every access is bounds-checked by indexing, atomics are loom's.
    unsafe impl Blocks for &'static Model {
        const BLOCK_SIZE: usize = MODEL_BLOCK;

        fn alloc(self, size: usize, zeroed: bool) -> Result<u64> {
            assert!(size <= SLOT, "the model has no block of {size} bytes");
            let mut used = self.used.lock().unwrap();
            let i = used.iter().position(|u| !u.0).expect("the model ran out of blocks");
            let dirty = used[i].1;
            used[i] = (true, true);
            drop(used);
            let b = BASE + (i * SLOT) as u64;
            if zeroed && dirty {
                // SAFETY: the slot is ours alone (just taken).
                unsafe { self.zero(b, SLOT) };
            }
            Ok(b)
        }

        unsafe fn free(self, block: u64) {
            let i = ((block - BASE) / SLOT as u64) as usize;
            let mut used = self.used.lock().unwrap();
            assert!(used[i].0, "block {block:#x} freed twice");
            used[i].0 = false;
        }

        unsafe fn zero(self, addr: u64, len: usize) {
            let (slot, off) = self.at(addr);
            for w in &slot.words[off / 4..(off + len) / 4] {
                w.store(0, Ordering::Relaxed);
            }
            // SAFETY: loom checks that no read of the block races this write.
            slot.bytes.with_mut(|b| unsafe { (&mut *b)[off..off + len].fill(0) });
        }

        unsafe fn load32(self, addr: u64, order: Ordering) -> u32 {
            let (slot, off) = self.at(addr);
            slot.words[off / 4].load(order)
        }

        unsafe fn store32(self, addr: u64, value: u32, order: Ordering) {
            let (slot, off) = self.at(addr);
            slot.words[off / 4].store(value, order)
        }

        unsafe fn read32(self, addr: u64) -> u32 {
            // A plain read in the real code, published by the Release of `seq`:
            // Relaxed here, so loom shows what an unordered read could see.
            // SAFETY: the caller's contract, passed on.
            unsafe { self.load32(addr, Ordering::Relaxed) }
        }

        unsafe fn write32(self, addr: u64, value: u32) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.store32(addr, value, Ordering::Relaxed) }
        }

        unsafe fn load64(self, addr: u64) -> u64 {
            let (slot, off) = self.at(addr);
            match off as u64 {
                LINK_AT => slot.link.load(Ordering::Relaxed),
                SIZE_AT => slot.size.load(Ordering::Relaxed),
                _ => panic!("no u64 at offset {off}"),
            }
        }

        unsafe fn store64(self, addr: u64, value: u64) {
            let (slot, off) = self.at(addr);
            match off as u64 {
                LINK_AT => slot.link.store(value, Ordering::Relaxed),
                SIZE_AT => slot.size.store(value, Ordering::Relaxed),
                _ => panic!("no u64 at offset {off}"),
            }
        }

        unsafe fn bytes_mut<'a>(self, addr: u64, len: usize) -> &'a mut [u8] {
            let (slot, off) = self.at(addr);
            // SAFETY: the model lives for the execution; loom records this as
            // a write of the block, checked against the consumer's reads.
            slot.bytes.with_mut(|b| unsafe { &mut (&mut *b)[off..off + len] })
        }

        unsafe fn bytes<'a>(self, addr: u64, len: usize) -> &'a [u8] {
            let (slot, off) = self.at(addr);
            // SAFETY: as in `bytes_mut`, recorded as a read.
            slot.bytes.with(|b| unsafe { &(&*b)[off..off + len] })
        }
    }

    /// The consumer's bounds: a range inside a block the producer holds (a
    /// read of a freed block is an error the model reports).
    #[derive(Clone, Copy)]
    struct InUse(&'static Model);

    // SAFETY: the model's memory lives for the whole execution.
    unsafe impl Bounds<'static> for InUse {
        fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
            if addr % align == 0 && self.0.in_use(addr, len) {
                Ok(())
            } else {
                Err(Error::InvalidPointer {
                    addr,
                    len,
                    reason: "not a live block of the model",
                })
            }
        }
    }

    /// A record, a skip to a jumbo block (40 bytes), and a skip to a normal
    /// block: the first one again, recycled and zeroed, if the consumer's
    /// cursor said it passed it by then, else a fresh one.
    const SIZES: [usize; 3] = [8, 40, 8];

    /// The producer publishes, skips and recycles while the consumer reads
    /// and publishes its cursor: every record arrives once, in order, with
    /// its length and bytes; no read lands in a freed or reused block; and
    /// every block the consumer passed is recycled. Fails with
    /// `--cfg rpal_loom_weak_publish` (the record's Release made Relaxed).
    #[test]
    fn loom_queue_publish_skip_recycle() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(|| {
            let mem = Model::new();
            let cursor = Arc::new(LoomU64::new(0));
            let mut p = Producer::new_in(mem).unwrap();
            let mut c = Consumer::new_in(mem, InUse(mem), p.head(), 9).unwrap();
            let seen = cursor.clone();
            let consumer = loom::thread::spawn(move || {
                // As `Conn` does: the cursor is published when it moved.
                let mut shown = 0;
                let mut show = |passed: u64| {
                    if passed != shown {
                        publish_cursor(&*seen, passed);
                        shown = passed;
                    }
                };
                for (i, &len) in SIZES.iter().enumerate() {
                    let rec = loop {
                        match c.next(InUse(mem)) {
                            Ok(Some(r)) => break r,
                            Ok(None) => loom::thread::yield_now(),
                            Err(e) => panic!("record {i}: {e}"),
                        }
                    };
                    assert_eq!(rec.len(), len, "record {i}'s length");
                    assert!(rec.iter().all(|&b| b == i as u8 + 1), "record {i}'s bytes");
                    // Done with the record: only now may its block be reused.
                    show(c.passed());
                }
                c.passed()
            });
            for (i, &len) in SIZES.iter().enumerate() {
                p.reserve(len).unwrap().fill(i as u8 + 1);
                p.commit(len);
                p.recycle(read_cursor(&*cursor), 9).unwrap();
            }
            let passed = consumer.join().unwrap();
            p.recycle(read_cursor(&*cursor), 9).unwrap();
            assert_eq!(p.consumed, passed);
            assert_eq!(p.backlog_blocks(), 1, "every passed block was recycled");
        });
    }
}
