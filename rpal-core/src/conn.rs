//! One established connection: the endpoint blocks and the record protocol.
//!
//! Each side owns one [`Endpoint`] block per connection, in its own arena.
//! A side writes its outgoing record into its block and bumps the block's
//! sequence word; the other side polls that word through its read-only
//! mapping. One call is in flight per connection: the client's request is
//! consumed once the server's reply appears, and the reply once the next
//! request appears, so neither side overwrites a record still being read.

use std::cell::RefCell;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::addr_of_mut;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::arena::Arena;
use crate::doorbell::{self, Deadline, DoorbellSnapshot, DoorbellStats, WaitConfig};
use crate::error::{Error, Result};
use crate::handshake::PeerCred;
use crate::region::PeerRegion;
use crate::sys;

/// Bytes of payload a record carries inline. Larger data travels by pointer
/// into the sender's arena.
pub const INLINE_CAPACITY: usize = 4096 - RECORD_HEADER;
const RECORD_HEADER: usize = 32;

/// Reserved method id: the client is closing the connection.
pub const METHOD_CLOSE: u32 = u32::MAX;

/// One side's block for one connection, in that side's arena.
///
/// The first cache line holds the sequence word and the record header, so a
/// small call moves one line each way. `parked` sits on its own line: the
/// owner writes it when it sleeps waiting for the *peer's* record.
#[repr(C, align(128))]
pub struct Endpoint {
    /// Bumped (Release) after each record is written; the peer waits on it.
    seq: AtomicU32,
    method: u32,
    len: u32,
    status: u32,
    call_id: u64,
    _reserved: u64,
    payload: [u8; INLINE_CAPACITY],
    /// Non-zero while the owner sleeps on the peer's `seq`.
    parked: CachePadded<AtomicU32>,
    /// How many releases this side has published in `releases`.
    release_tail: CachePadded<AtomicU64>,
    /// How many of the *peer's* releases this side has consumed.
    release_head: CachePadded<AtomicU64>,
    /// Ring of addresses of the peer's blocks that this side is done with.
    releases: [AtomicU64; RELEASE_SLOTS],
}

/// Entries in each side's release ring.
pub const RELEASE_SLOTS: usize = 256;

const _: () = assert!(std::mem::offset_of!(Endpoint, payload) == RECORD_HEADER);

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
    h = fnv1a(h, size_of::<Endpoint>() as u64);
    h = fnv1a(h, align_of::<Endpoint>() as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, seq) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, method) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, len) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, status) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, call_id) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, payload) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, parked) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, release_tail) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, release_head) as u64);
    h = fnv1a(h, std::mem::offset_of!(Endpoint, releases) as u64);
    h = fnv1a(h, RELEASE_SLOTS as u64);
    h
};

/// Endpoint blocks of closed connections, for reuse (addresses in our arena).
static FREE_ENDPOINTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Our endpoint block for one connection; returned to the pool on drop.
pub(crate) struct OwnEndpoint {
    ptr: *mut Endpoint,
}

// SAFETY: the block lives in the process-wide arena (never unmapped), and an
// `OwnEndpoint` is its only writer in this process.
unsafe impl Send for OwnEndpoint {}

impl OwnEndpoint {
    pub(crate) fn new() -> Result<Self> {
        let reused = FREE_ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let ptr = match reused {
            Some(addr) => addr as *mut Endpoint,
            None => Arena::global()?
                .alloc_raw(size_of::<Endpoint>(), align_of::<Endpoint>())?
                .as_ptr()
                .cast(),
        };
        // SAFETY: `ptr` is an aligned Endpoint-sized block of our arena that
        // no one else in this process uses. Zero words: no peer is attached yet.
        unsafe {
            (*ptr).seq = AtomicU32::new(0);
            (*ptr).parked = CachePadded::new(AtomicU32::new(0));
            (*ptr).release_tail = CachePadded::new(AtomicU64::new(0));
            (*ptr).release_head = CachePadded::new(AtomicU64::new(0));
        }
        Ok(Self { ptr })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn seq(&self) -> &AtomicU32 {
        // SAFETY: the block is live and `seq` is only accessed atomically.
        unsafe { &(*self.ptr).seq }
    }

    fn parked(&self) -> &AtomicU32 {
        // SAFETY: as for `seq`.
        unsafe { &(*self.ptr).parked }
    }

    fn block(&self) -> &Endpoint {
        // SAFETY: the block is live; the fields read through this shared
        // reference are atomics (the record fields are written only through
        // `payload_mut`/`write_header`, never while this borrow is used).
        unsafe { &*self.ptr }
    }

    /// The inline payload area, for writing the next record.
    fn payload_mut(&mut self) -> &mut [u8; INLINE_CAPACITY] {
        // SAFETY: we are the block's only writer, and the peer has consumed the
        // previous record (see the module comment), so nobody reads it now.
        unsafe { &mut *addr_of_mut!((*self.ptr).payload) }
    }

    fn write_header(&mut self, method: u32, len: u32, status: u32, call_id: u64) {
        // SAFETY: as in `payload_mut`; plain field writes to our own block.
        unsafe {
            addr_of_mut!((*self.ptr).method).write(method);
            addr_of_mut!((*self.ptr).len).write(len);
            addr_of_mut!((*self.ptr).status).write(status);
            addr_of_mut!((*self.ptr).call_id).write(call_id);
        }
    }
}

impl Drop for OwnEndpoint {
    fn drop(&mut self) {
        FREE_ENDPOINTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.ptr as usize);
    }
}

/// What serving one request borrows from a connection (see [`Conn::parts`]).
pub(crate) struct Parts<'a> {
    pub request: &'a [u8],
    pub region: &'a PeerRegion,
    pub reply: &'a mut [u8],
    pub releases: &'a RefCell<Vec<u64>>,
}

/// A record header copied out of the peer's block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordHeader {
    pub method: u32,
    pub len: u32,
    pub status: u32,
    pub call_id: u64,
}

/// The peer of a connection.
#[derive(Debug)]
pub struct Peer {
    /// Kernel-reported credentials.
    pub cred: PeerCred,
    /// The peer's region, mapped read-only here.
    pub region: PeerRegion,
    pidfd: OwnedFd,
}

/// The state both a client and a server connection share.
pub(crate) struct Conn {
    pub sock: UnixStream,
    pub peer: Peer,
    mine: OwnEndpoint,
    theirs: *const Endpoint,
    /// Last sequence we published.
    my_seq: u32,
    /// Last sequence of the peer's we consumed.
    their_seq: u32,
    pub wait: WaitConfig,
    pub stats: DoorbellStats,
    /// Releases of the peer's blocks not yet published (our ring was full).
    pending_releases: RefCell<Vec<u64>>,
    /// Releases by the peer that matched no block lent to it (refused).
    pub refused_releases: u64,
}

// SAFETY: `theirs` points into `peer.region`, which the Conn owns and keeps
// mapped; nothing in a Conn is tied to the creating thread.
unsafe impl Send for Conn {}

impl Conn {
    /// Builds a connection once the handshake has mapped the peer's region.
    /// `their_endpoint` is validated here.
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
        // The peer may have used this block before (a reused endpoint): start
        // from whatever sequence it shows now.
        // SAFETY: `check` proved the block lies inside the mapped region and is aligned.
        let their_seq = unsafe {
            (*(their_endpoint as *const Endpoint))
                .seq
                .load(std::sync::atomic::Ordering::Acquire)
        };
        let theirs = their_endpoint as *const Endpoint;
        Ok(Conn {
            sock,
            peer: Peer { cred, region, pidfd },
            mine,
            theirs,
            my_seq: 0,
            their_seq,
            wait,
            stats: DoorbellStats::default(),
            pending_releases: RefCell::new(Vec::new()),
            refused_releases: 0,
        })
    }

    fn their_seq_word(&self) -> &AtomicU32 {
        // SAFETY: `theirs` was validated in `new` and the mapping lives as long as `self`.
        unsafe { &(*self.theirs).seq }
    }

    fn their_parked(&self) -> &AtomicU32 {
        // SAFETY: as in `their_seq_word`.
        unsafe { &(*self.theirs).parked }
    }

    /// Errors if the peer died or hung up; used between sleeps.
    pub(crate) fn check_alive(&self) -> Result<()> {
        let pid = self.peer.cred.pid;
        if sys::poll_ready(&[self.peer.pidfd.as_fd()]).unwrap_or(false) {
            return Err(Error::PeerDied { pid });
        }
        // A readable control socket means data (unexpected) or hang-up.
        if sys::poll_ready(&[self.sock.as_fd()]).unwrap_or(false) {
            let mut b = [0u8; 1];
            match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                &mut b,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) | Err(_) => return Err(Error::Closed { pid }),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Our outgoing payload area, to fill before [`Conn::commit`].
    pub(crate) fn out_buf(&mut self) -> &mut [u8] {
        self.mine.payload_mut()
    }

    /// Publishes the record whose payload was written into [`Conn::out_buf`]
    /// (after any pending releases), then rings.
    pub(crate) fn commit(&mut self, method: u32, call_id: u64, len: usize, status: u32) -> Result<()> {
        if len > INLINE_CAPACITY {
            return Err(Error::TooLarge {
                len,
                capacity: INLINE_CAPACITY,
            });
        }
        self.flush_releases();
        self.mine.write_header(method, len as u32, status, call_id);
        self.my_seq = self.my_seq.wrapping_add(1);
        doorbell::ring(self.mine.seq(), self.my_seq, self.their_parked(), &self.stats);
        Ok(())
    }

    /// Borrows, all at once, what serving a request needs: the request
    /// payload and the client's region (peer memory), our reply area, and
    /// the list where releases are queued.
    pub(crate) fn parts(&mut self, h: &RecordHeader) -> Parts<'_> {
        // SAFETY: `h.len <= INLINE_CAPACITY` (checked in `recv`), so the bytes
        // lie inside the peer's validated block, mapped as long as `self`;
        // it is peer memory, disjoint from everything else borrowed here.
        let request = unsafe {
            std::slice::from_raw_parts(std::ptr::addr_of!((*self.theirs).payload).cast::<u8>(), h.len as usize)
        };
        Parts {
            request,
            region: &self.peer.region,
            reply: self.mine.payload_mut(),
            releases: &self.pending_releases,
        }
    }

    /// Waits for the peer's next record and returns its validated header.
    pub(crate) fn recv(&mut self, deadline: Option<Deadline>) -> Result<RecordHeader> {
        let now = doorbell::wait(
            self.their_seq_word(),
            self.their_seq,
            self.mine.parked(),
            &self.wait,
            deadline,
            &self.stats,
            || self.check_alive(),
        )?;
        let pid = self.peer.cred.pid;
        let expected = self.their_seq.wrapping_add(1);
        if now != expected {
            return Err(Error::Protocol {
                pid,
                detail: format!("sequence word jumped from {} to {now}", self.their_seq),
            });
        }
        self.their_seq = now;
        // Copy the header out once (the peer could change it under us), then validate the copy.
        // SAFETY: `theirs` is validated and mapped; volatile reads of plain
        // integers tolerate concurrent writes by a misbehaving peer.
        let h = unsafe {
            RecordHeader {
                method: std::ptr::addr_of!((*self.theirs).method).read_volatile(),
                len: std::ptr::addr_of!((*self.theirs).len).read_volatile(),
                status: std::ptr::addr_of!((*self.theirs).status).read_volatile(),
                call_id: std::ptr::addr_of!((*self.theirs).call_id).read_volatile(),
            }
        };
        self.reclaim()?;
        if h.len as usize > INLINE_CAPACITY {
            return Err(Error::Protocol {
                pid,
                detail: format!("record length {} exceeds the inline capacity {INLINE_CAPACITY}", h.len),
            });
        }
        Ok(h)
    }

    fn theirs(&self) -> &Endpoint {
        // SAFETY: `theirs` was validated in `new` and stays mapped with `self`;
        // only its atomics are read through this reference.
        unsafe { &*self.theirs }
    }

    /// Says we are done with the peer's block at `addr`; published in our
    /// release ring now or, if it is full, at the next send or receive.
    pub(crate) fn release(&mut self, addr: u64) {
        self.pending_releases.get_mut().push(addr);
        self.flush_releases();
    }

    /// Publishes pending releases while our ring has room.
    pub(crate) fn flush_releases(&mut self) {
        let pending = self.pending_releases.get_mut();
        if pending.is_empty() {
            return;
        }
        let mine = self.mine.block();
        let tail = mine.release_tail.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store of `release_head` in the
        // peer's `reclaim`; slots it consumed may be overwritten.
        // SAFETY: `theirs` was validated in `new` and stays mapped with `self`.
        let head = unsafe { (*self.theirs).release_head.load(Ordering::Acquire) };
        let room = (RELEASE_SLOTS as u64).saturating_sub(tail.wrapping_sub(head));
        let n = (room as usize).min(pending.len());
        for (i, &addr) in pending[..n].iter().enumerate() {
            mine.releases[(tail as usize + i) % RELEASE_SLOTS].store(addr, Ordering::Relaxed);
        }
        // Release: publishes the slots written above; pairs with the Acquire in `reclaim`.
        mine.release_tail.store(tail + n as u64, Ordering::Release);
        pending.drain(..n);
    }

    /// Frees our blocks that the peer released. A release that matches no
    /// block lent to this peer is refused and counted; a release cursor that
    /// jumps or goes backwards is a protocol violation.
    pub(crate) fn reclaim(&mut self) -> Result<usize> {
        let pid = self.peer.cred.pid;
        let mine = self.mine.block();
        let head = mine.release_head.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store of `release_tail` in the peer's `flush_releases`.
        let tail = self.theirs().release_tail.load(Ordering::Acquire);
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
            let addr = self.theirs().releases[i as usize % RELEASE_SLOTS].load(Ordering::Relaxed);
            match arena.reclaim(addr, pid) {
                Ok(()) => freed += 1,
                Err(e) => {
                    self.refused_releases += 1;
                    tracing::warn!(pid, %e, "refused a release");
                }
            }
        }
        // Release: the peer may reuse the slots we read; pairs with the Acquire in `flush_releases`.
        mine.release_head.store(tail, Ordering::Release);
        self.flush_releases();
        Ok(freed)
    }

    pub(crate) fn snapshot(&self) -> DoorbellSnapshot {
        self.stats.snapshot()
    }
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
