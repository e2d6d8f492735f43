//! One established connection: endpoint blocks, the two queues, releases.
//!
//! Each side owns, in its own arena, an [`Endpoint`] block for the
//! connection and the blocks of its outgoing [`queue`](crate::queue). The
//! endpoint holds what the *other* side needs to read: where our queue
//! starts, whether we are parked, how far we have read the peer's queue
//! (so it can recycle its blocks), and the ring of peer blocks we release.
//!
//! A message is one queue record: a 16-byte header (call id, method,
//! status) and the body.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::arena::Arena;
use crate::doorbell::{self, Deadline, DoorbellSnapshot, DoorbellStats, WaitConfig};
use crate::error::{Error, Result};
use crate::handshake::PeerCred;
use crate::pkey::Access;
use crate::queue::{Consumer, Producer};
use crate::region::{PeerMem, PeerRegion};
use crate::sys;

/// Message header: call id, method, status.
pub const MSG_HEADER: usize = 16;
/// Body bytes a reply (and a default request) may carry inline. Larger data
/// travels by pointer into the sender's arena, or with a sized call.
pub const INLINE_CAPACITY: usize = 4096 - MSG_HEADER;
/// Reserved method id: the client is closing the connection.
pub const METHOD_CLOSE: u32 = u32::MAX;
/// Request status bit: the client expects no reply.
pub(crate) const FLAG_ONEWAY: u32 = 1 << 31;
/// Request status bits 0..24: the caller's remaining budget in milliseconds
/// (0: no deadline). Relative, so it means the same over TCP between hosts;
/// the time the request waits in the queue is not counted.
const BUDGET_MASK: u32 = 0x00ff_ffff;

/// The status bits that carry a request's deadline `budget` (rounded up to
/// whole milliseconds; budgets over about 4.6 hours saturate).
pub fn budget_bits(budget: Option<Duration>) -> u32 {
    match budget {
        None => 0,
        Some(d) => d.as_micros().div_ceil(1000).clamp(1, BUDGET_MASK as u128) as u32,
    }
}

/// The deadline budget a request's status bits carry.
pub fn budget_of(status: u32) -> Option<Duration> {
    match status & BUDGET_MASK {
        0 => None,
        ms => Some(Duration::from_millis(ms as u64)),
    }
}
/// Entries in each side's release ring.
pub const RELEASE_SLOTS: usize = 256;
/// Queue blocks (about 64 KiB each) a producer may have unread before it
/// waits for the consumer: backpressure instead of unbounded growth.
pub const BACKLOG_BLOCKS: usize = 256;

/// One side's block for one connection, in that side's arena.
#[repr(C, align(128))]
pub struct Endpoint {
    /// First block of this side's outgoing queue.
    queue_head: AtomicU64,
    /// Non-zero while this side sleeps waiting on the peer's queue.
    parked: CachePadded<AtomicU32>,
    /// Blocks of the peer's queue this side has passed.
    cursor: CachePadded<AtomicU64>,
    /// How many releases this side has published in `releases`.
    release_tail: CachePadded<AtomicU64>,
    /// How many of the *peer's* releases this side has consumed.
    release_head: CachePadded<AtomicU64>,
    /// Ring of addresses of the peer's blocks that this side is done with.
    releases: [AtomicU64; RELEASE_SLOTS],
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

/// One message, read in place from the peer's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub call_id: u64,
    pub method: u32,
    pub status: u32,
    pub body: &'a [u8],
}

/// Reads the next message, if one is ready. `rx` and `mem` are separate
/// borrows so the caller can answer while holding the message.
pub(crate) fn next_msg<'a>(rx: &mut Consumer, mem: PeerMem<'a>) -> Result<Option<Msg<'a>>> {
    let Some(rec) = rx.next(mem)? else { return Ok(None) };
    if rec.len() < MSG_HEADER {
        return Err(Error::Protocol {
            pid: mem.pid(),
            detail: format!("message of {} bytes is shorter than its header", rec.len()),
        });
    }
    let (head, body) = rec.split_at(MSG_HEADER);
    let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    Ok(Some(Msg {
        call_id: u64::from_le_bytes(head[0..8].try_into().expect("8 bytes")),
        method: u32_at(8),
        status: u32_at(12),
        body,
    }))
}

/// Appends one message to `tx`: `write` fills the body (at most `cap`
/// bytes) and returns its length and the status to send.
pub(crate) fn write_msg(
    tx: &mut Producer,
    method: u32,
    call_id: u64,
    cap: usize,
    write: impl FnOnce(&mut [u8]) -> (usize, u32),
) -> Result<()> {
    let buf = tx.reserve(MSG_HEADER + cap)?;
    let (n, status) = write(&mut buf[MSG_HEADER..]);
    if n > cap {
        return Err(Error::TooLarge { len: n, capacity: cap });
    }
    put_header(buf, call_id, method, status);
    tx.commit(MSG_HEADER + n);
    Ok(())
}

/// Writes a message header (call id, method, status) at the start of `buf`.
pub(crate) fn put_header(buf: &mut [u8], call_id: u64, method: u32, status: u32) {
    buf[0..8].copy_from_slice(&call_id.to_le_bytes());
    buf[8..12].copy_from_slice(&method.to_le_bytes());
    buf[12..16].copy_from_slice(&status.to_le_bytes());
}

/// The peer of a connection.
#[derive(Debug)]
pub struct Peer {
    /// Kernel-reported credentials.
    pub cred: PeerCred,
    /// The peer's region, mapped read-only here.
    pub region: Arc<PeerRegion>,
    pidfd: OwnedFd,
}

impl Peer {
    /// The pidfd, readable once the peer has exited.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

/// The state both a client and a server connection share.
pub(crate) struct Conn {
    pub sock: UnixStream,
    pub peer: Peer,
    pub mine: OwnEndpoint,
    theirs: *const Endpoint,
    pub rx: Consumer,
    /// Last cursor value we published.
    cursor_shown: u64,
    /// Test hook: a forged cursor that stays published.
    forged_cursor: bool,
    pub wait: WaitConfig,
    pub stats: DoorbellStats,
    /// Releases of the peer's blocks not yet published (our ring was full).
    pending_releases: Vec<u64>,
    /// Releases by the peer that matched no block lent to it (refused).
    pub refused_releases: u64,
}

// SAFETY: `theirs` points into `peer.region`, which the Conn owns and keeps
// mapped; nothing in a Conn is tied to the creating thread.
unsafe impl Send for Conn {}

impl Conn {
    /// Builds a connection once the handshake has mapped the peer's region.
    /// `their_endpoint` and the peer's first queue block are validated here.
    pub(crate) fn new(
        sock: UnixStream,
        cred: PeerCred,
        region: PeerRegion,
        mine: OwnEndpoint,
        their_endpoint: u64,
        wait: WaitConfig,
    ) -> Result<Conn> {
        region.check(
            their_endpoint,
            size_of::<Endpoint>() as u64,
            align_of::<Endpoint>() as u64,
        )?;
        let pidfd = sys::pidfd_open(cred.pid).map_err(|e| Error::io(format!("pidfd_open({})", cred.pid), e))?;
        let theirs = their_endpoint as *const Endpoint;
        let access = region.access();
        let mem = region.mem(&access);
        // SAFETY: `check` proved the block lies inside the mapped region and
        // is aligned; `access` lets this thread read it.
        // Acquire: the peer wrote `queue_head` before sending its hello; the
        // socket exchange already orders it, this documents the dependency.
        let head = unsafe { (*theirs).queue_head.load(Ordering::Acquire) };
        let rx = Consumer::new(mem, head, cred.pid)?;
        drop(access);
        Ok(Conn {
            sock,
            peer: Peer {
                cred,
                region: Arc::new(region),
                pidfd,
            },
            mine,
            theirs,
            rx,
            cursor_shown: 0,
            forged_cursor: false,
            wait,
            stats: DoorbellStats::default(),
            pending_releases: Vec::new(),
            refused_releases: 0,
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.peer.cred.pid
    }

    /// The peer's endpoint block, readable while `access` lives.
    fn theirs<'a>(&'a self, access: &'a Access) -> &'a Endpoint {
        let _ = self.peer.region.mem(access); // checks the grant in debug builds
        // SAFETY: `theirs` was validated in `new` and stays mapped with `self`;
        // `access` lets this thread read it; only its atomics are read
        // through this reference.
        unsafe { &*self.theirs }
    }

    /// The peer's memory, readable while `access` lives.
    pub(crate) fn mem<'a>(&'a self, access: &'a Access) -> PeerMem<'a> {
        self.peer.region.mem(access)
    }

    /// Our `parked` flag (the peer reads it before waking us).
    pub(crate) fn my_parked(&self) -> &AtomicU32 {
        &self.mine.block().parked
    }

    /// Errors if the peer died or hung up; used between sleeps.
    pub(crate) fn check_alive(&self) -> Result<()> {
        check_alive(&self.peer, &self.sock)
    }

    /// Appends a message whose body `write` fills (at most `cap` bytes; it
    /// returns the length). Waits if the peer is `BACKLOG_BLOCKS` behind.
    /// Does not wake the peer: call [`Conn::ring`] after a batch.
    pub(crate) fn send(
        &mut self,
        access: &Access,
        method: u32,
        call_id: u64,
        status: u32,
        cap: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<()> {
        self.housekeeping(access)?;
        if self.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
            self.wait_for_room(access)?;
        }
        write_msg(&mut self.mine.tx, method, call_id, cap, |body| (write(body), status))
    }

    /// Wakes the peer if it sleeps on our queue.
    pub(crate) fn ring(&mut self, access: &Access) {
        let _ = self.peer.region.mem(access); // checks the grant in debug builds
        // SAFETY: see `theirs` (`access` lets us read it); split from
        // `self.mine` for the borrow checker.
        let parked = unsafe { &(*self.theirs).parked };
        if self.mine.tx.ring(parked) {
            self.stats
                .wakes
                .store(self.stats.wakes.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Backpressure: wait until the peer's cursor frees some of our blocks.
    fn wait_for_room(&mut self, access: &Access) -> Result<()> {
        let start = Instant::now();
        let waits = &self.stats.full_waits;
        waits.store(waits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        while self.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
            self.ring(access);
            // Acquire: pairs with the Release store of `cursor` in `publish_cursor`.
            let seen = self.theirs(access).cursor.load(Ordering::Acquire);
            self.mine.tx.recycle(seen, self.pid())?;
            if self.mine.tx.backlog_blocks() <= BACKLOG_BLOCKS {
                break;
            }
            // The consumer does not wake producers: poll its cursor gently.
            std::thread::sleep(std::time::Duration::from_micros(50));
            if start.elapsed() > self.wait.park_slice {
                self.check_alive()?;
            }
        }
        Ok(())
    }

    /// Recycles our queue blocks the peer has passed, publishes pending
    /// releases, and frees our blocks the peer released.
    pub(crate) fn housekeeping(&mut self, access: &Access) -> Result<()> {
        // Acquire: pairs with the Release store of `cursor` in `publish_cursor`.
        let cursor = self.theirs(access).cursor.load(Ordering::Acquire);
        let pid = self.pid();
        self.mine.tx.recycle(cursor, pid)?;
        self.flush_releases(access);
        self.reclaim(access)?;
        Ok(())
    }

    /// Tells the peer how many of its queue blocks we have passed.
    pub(crate) fn publish_cursor(&mut self) {
        let passed = self.rx.passed();
        if passed != self.cursor_shown && !self.forged_cursor {
            // Release: we are done with the passed blocks; pairs with the
            // Acquire in the peer's `housekeeping`.
            self.mine.block().cursor.store(passed, Ordering::Release);
            self.cursor_shown = passed;
        }
    }

    /// Waits until a message is ready (or the deadline, or the peer's death).
    pub(crate) fn wait_ready(&mut self, access: &Access, deadline: Option<&Deadline>) -> Result<()> {
        loop {
            if self.rx.ready_record(self.peer.region.mem(access))? {
                return Ok(());
            }
            self.publish_cursor();
            // The record may have landed since `ready_record` looked.
            let Some((word, seen)) = self.rx.wait_word(self.peer.region.mem(access)) else {
                continue;
            };
            let parked = &self.mine.block().parked;
            let (peer, sock) = (&self.peer, &self.sock);
            doorbell::wait(word, seen, parked, &self.wait, deadline, &self.stats, || {
                check_alive(peer, sock)
            })?;
        }
    }

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
    fn flush_releases(&mut self, access: &Access) {
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

    pub(crate) fn snapshot(&self) -> DoorbellSnapshot {
        self.stats.snapshot()
    }

    /// Test hook: publishes an arbitrary queue cursor, as a hostile peer might.
    #[doc(hidden)]
    pub fn inject_cursor(&mut self, value: u64) {
        self.mine.block().cursor.store(value, Ordering::Release);
        self.cursor_shown = value;
        self.forged_cursor = true;
    }
}

/// Errors if the peer died (its pidfd is readable) or hung up its socket.
pub(crate) fn check_alive(peer: &Peer, sock: &UnixStream) -> Result<()> {
    let pid = peer.cred.pid;
    if sys::poll_ready(&[peer.pidfd.as_fd()]).unwrap_or(false) {
        return Err(Error::PeerDied { pid });
    }
    // A readable control socket means data (unexpected) or hang-up.
    if sys::poll_ready(&[sock.as_fd()]).unwrap_or(false) {
        let mut b = [0u8; 1];
        match nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            &mut b,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) | Err(_) => {
                // An exiting process closes its files before its pidfd turns
                // readable: give it a moment to tell death from a hang-up.
                let died = sys::poll_wait(peer.pidfd.as_fd(), std::time::Duration::from_millis(200)).unwrap_or(false);
                return Err(if died {
                    Error::PeerDied { pid }
                } else {
                    Error::Closed { pid }
                });
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Blocks lent to a peer that died will never be released: take them back.
        if sys::poll_ready(&[self.peer.pidfd.as_fd()]).unwrap_or(false) {
            if let Ok(arena) = Arena::global() {
                let n = arena.reclaim_all(self.peer.cred.pid);
                if n > 0 {
                    tracing::debug!(pid = self.peer.cred.pid, n, "reclaimed blocks lent to a dead peer");
                }
            }
        }
    }
}
