//! One established connection: endpoint blocks (`layout`), messages
//! (`message`), the two queues, and the release ring (`release`).
//!
//! Each side owns, in its own arena, an `Endpoint` block for the
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::arena::{Arena, PeerLease};
use crate::cred::{PeerCred, PeerId};
use crate::doorbell::{self, Deadline, DoorbellSnapshot, DoorbellStats, WaitConfig};
use crate::error::{Error, Result};
use crate::pkey::Access;
use crate::queue::{self, Consumer};
use crate::region::PeerRegion;
use crate::sys;
use crate::types::PeerMem;

mod layout;
mod message;
pub(crate) mod release;

pub use layout::LAYOUT_HASH;
pub(crate) use layout::OwnEndpoint;
pub(crate) use layout::{BACKLOG_BLOCKS, Endpoint};
pub use message::{
    FLAG_LENDS, INLINE_CAPACITY, LentTable, MAX_LENT_PER_REPLY, METHOD_CLOSE, MSG_HEADER, budget_bits, budget_of,
    put_lent_table, split_reply,
};
pub(crate) use message::{FLAG_ONEWAY, next_msg, put_header, write_msg};

/// How long a waiter of our own gives a peer that hung up to show its
/// death (its pidfd turns readable after it closed its files).
const DEATH_GRACE: Duration = Duration::from_millis(200);

/// The peer of a connection.
#[derive(Debug)]
pub struct Peer {
    /// Kernel-reported credentials.
    pub cred: PeerCred,
    /// The peer process (pid and start time): what we lend it is booked
    /// under this.
    pub id: PeerId,
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
    /// Our blocks lent to the peer come back when its last connection ends.
    _lease: PeerLease,
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
        (pidfd, id): (OwnedFd, PeerId),
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
                id,
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
            _lease: Arena::global()?.lease(id),
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

    /// Errors if the peer died or hung up; used between sleeps (of our own:
    /// it may wait [`DEATH_GRACE`] to tell a death from a hang-up).
    pub(crate) fn check_alive(&self) -> Result<()> {
        check_alive(&self.peer, &self.sock, DEATH_GRACE)
    }

    /// As [`Conn::check_alive`], without waiting at all: for a poller.
    pub(crate) fn check_alive_now(&self) -> Result<()> {
        check_alive(&self.peer, &self.sock, Duration::ZERO)
    }

    /// Appends a message whose body `write` fills (at most `cap` bytes; it
    /// returns the length). Waits if the peer is `BACKLOG_BLOCKS` behind, at
    /// most `room_wait` (then `Timeout`; `None`: while the peer lives).
    /// Does not wake the peer: call [`Conn::ring`] after a batch.
    #[allow(clippy::too_many_arguments)] // the message header's fields, its body, and the wait bound
    pub(crate) fn send(
        &mut self,
        access: &Access,
        method: u32,
        call_id: u64,
        status: u32,
        cap: usize,
        room_wait: Option<Duration>,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<()> {
        self.housekeeping(access)?;
        if self.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
            self.wait_for_room(access, room_wait)?;
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

    /// Backpressure: wait until the peer's cursor frees some of our blocks,
    /// at most `limit`.
    /// Whether our queue is short enough to send now, from our own counts.
    #[inline]
    pub(crate) fn room_now(&self) -> bool {
        self.mine.tx.backlog_blocks() <= BACKLOG_BLOCKS
    }

    /// Whether a message can go out without waiting: recycles what the peer
    /// has passed, then checks that it is at most `BACKLOG_BLOCKS` behind.
    pub(crate) fn has_room(&mut self, access: &Access) -> Result<bool> {
        if self.room_now() {
            return Ok(true);
        }
        let seen = queue::read_cursor(&*self.theirs(access).cursor);
        self.mine.tx.recycle(seen, self.pid())?;
        Ok(self.mine.tx.backlog_blocks() <= BACKLOG_BLOCKS)
    }

    fn wait_for_room(&mut self, access: &Access, limit: Option<Duration>) -> Result<()> {
        let start = Instant::now();
        let waits = &self.stats.full_waits;
        waits.store(waits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        while self.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
            self.ring(access);
            let seen = queue::read_cursor(&*self.theirs(access).cursor);
            self.mine.tx.recycle(seen, self.pid())?;
            if self.mine.tx.backlog_blocks() <= BACKLOG_BLOCKS {
                break;
            }
            // The consumer does not wake producers: poll its cursor gently.
            std::thread::sleep(Duration::from_micros(50));
            let waited = start.elapsed();
            if let Some(limit) = limit.filter(|l| waited >= *l) {
                return Err(Error::Timeout(limit));
            }
            if waited > self.wait.park_slice {
                self.check_alive()?;
            }
        }
        Ok(())
    }

    /// Recycles our queue blocks the peer has passed, publishes pending
    /// releases, and frees our blocks the peer released.
    pub(crate) fn housekeeping(&mut self, access: &Access) -> Result<()> {
        let cursor = queue::read_cursor(&*self.theirs(access).cursor);
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
            // We are done with the passed blocks (the loom-modelled pair).
            queue::publish_cursor(&*self.mine.block().cursor, passed);
            self.cursor_shown = passed;
        }
    }

    /// Waits until a message is ready (or the deadline, or the peer's death).
    pub(crate) fn wait_ready(&mut self, access: &Access, deadline: Option<&Deadline>) -> Result<()> {
        let mut first = true;
        loop {
            if self.rx.ready_record(self.peer.region.mem(access))? {
                return Ok(());
            }
            // A peer that keeps moving its word without publishing a record
            // ends every `doorbell::wait` at once, before it looks at the
            // deadline: so look here, from the second round on (the first
            // costs no clock read, the hot path).
            if !std::mem::take(&mut first) {
                if let Some(d) = deadline.filter(|d| Instant::now() >= d.at()) {
                    return Err(Error::Timeout(d.after));
                }
            }
            self.publish_cursor();
            // The record may have landed since `ready_record` looked.
            let Some((word, seen)) = self.rx.wait_word(self.peer.region.mem(access)) else {
                continue;
            };
            let parked = &self.mine.block().parked;
            let (peer, sock) = (&self.peer, &self.sock);
            let watch = [peer.pidfd.as_fd()];
            doorbell::wait(word, seen, parked, &self.wait, deadline, &self.stats, &watch, || {
                check_alive(peer, sock, DEATH_GRACE)
            })?;
        }
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

/// Errors if the peer died (its pidfd is readable), hung up its socket, or
/// sent anything on it (nothing is sent after the handshake). An exiting
/// process closes its files before its pidfd turns readable: a hang-up is
/// told from a death by waiting up to `grace` for the pidfd. A poller passes
/// zero (it never waits on a peer's behalf; a death seen as `Closed` ends
/// the connection all the same).
pub(crate) fn check_alive(peer: &Peer, sock: &UnixStream, grace: Duration) -> Result<()> {
    let pid = peer.cred.pid;
    if sys::poll_ready(&[peer.pidfd.as_fd()]).unwrap_or(false) {
        return Err(Error::PeerDied { pid });
    }
    // A readable control socket means data (a violation) or hang-up.
    if sys::poll_ready(&[sock.as_fd()]).unwrap_or(false) {
        let mut b = [0u8; 1];
        return Err(
            match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(sock),
                &mut b,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) | Err(_) => {
                    let died = !grace.is_zero() && sys::poll_wait(peer.pidfd.as_fd(), grace).unwrap_or(false);
                    if died {
                        Error::PeerDied { pid }
                    } else {
                        Error::Closed { pid }
                    }
                }
                Ok(_) => Error::Protocol {
                    pid,
                    detail: "it sent data on the control socket after the handshake".into(),
                },
            },
        );
    }
    Ok(())
}
