//! A server's end of one connection: reading requests in place, running
//! the handler, writing replies, deferred replies and their deadlines.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::ServerStats;
use super::request::{Handler, Request};
use crate::conn::{
    Conn, FLAG_LENDS, FLAG_ONEWAY, INLINE_CAPACITY, METHOD_CLOSE, MSG_HEADER, Peer, budget_of, next_msg, put_header,
};
use crate::deferred::{DeferredQueue, Filled};
use crate::doorbell::{DoorbellSnapshot, WaitConfig};
use crate::error::{Error, RemoteStatus, Result};
use crate::pkey::Access;
use crate::quota::{Quota, Quotas};

/// What one [`ServerConn::poll`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Polled {
    /// Requests handled.
    pub served: usize,
    /// The client said goodbye.
    pub closed: bool,
}

/// A server's end of one connection.
pub struct ServerConn {
    pub(super) conn: Conn,
    pub(super) stats: Arc<ServerStats>,
    /// Releases a handler asked for, published after each batch.
    pub(super) releases: RefCell<Vec<u64>>,
    /// Replies of deferred calls, completed by other threads.
    pub(super) later: Arc<DeferredQueue>,
    /// Set by [`Request::defer`] during the handler's run.
    pub(super) deferred: Cell<bool>,
    /// Set by a handler whose reply ends with a lent-block table.
    pub(super) lends: Cell<bool>,
    /// Deferred calls not answered yet (by call id).
    pub(super) outstanding: HashMap<u64, u32>,
    /// Deferred calls with a budget, for the serving thread's timing wheel.
    pub(super) new_deadlines: Vec<(u64, Duration)>,
    pub(super) quotas: Quotas,
    /// The arena had no room for a reply block at the last look: requests
    /// wait in the client's queue (nothing is lost) until room is made.
    pub(super) starved: bool,
    /// This connection's place in the server's connection quota.
    pub(super) slot: super::Slot,
}

/// Writes a reply's header after its handler ran: the length to commit.
fn fill_reply(
    buf: &mut [u8],
    call_id: u64,
    method: u32,
    r: std::thread::Result<std::result::Result<Filled, RemoteStatus>>,
) -> usize {
    // An error reply's body is its message: the handler's, or the panic's.
    let message = crate::error::take_failure_message();
    let body = &mut buf[MSG_HEADER..];
    let (n, status) = match r {
        Ok(Ok(f)) if f.len <= INLINE_CAPACITY => (f.len, if f.lends { FLAG_LENDS } else { 0 }),
        Ok(Ok(_)) => (0, RemoteStatus::BadReply.code()),
        Ok(Err(s)) => (message.map_or(0, |m| crate::error::put_message(body, &m)), s.code()),
        Err(p) => (
            crate::error::put_message(body, &crate::error::panic_message(&*p)),
            RemoteStatus::HandlerPanicked.code(),
        ),
    };
    put_header(buf, call_id, method, status);
    MSG_HEADER + n
}

impl ServerConn {
    /// The client: credentials and region.
    pub fn peer(&self) -> &Peer {
        &self.conn.peer
    }

    /// Doorbell counters of this connection.
    pub fn stats(&self) -> DoorbellSnapshot {
        self.conn.snapshot()
    }

    /// Frees our blocks that the client released (this also happens on
    /// every batch). Returns how many were freed.
    pub fn reclaim(&mut self) -> Result<usize> {
        let access = self.conn.peer.region.access();
        self.conn.reclaim(&access)
    }

    /// Releases by the client that matched no block lent to it, refused so far.
    pub fn refused_releases(&self) -> u64 {
        self.conn.refused_releases
    }

    /// Changes the spin budget and park slice.
    pub fn set_wait(&mut self, wait: WaitConfig) {
        self.conn.wait = wait;
    }

    /// Whether a request is ready, without waiting.
    pub fn ready(&mut self) -> Result<bool> {
        if self.backpressured() {
            return Ok(false); // requests wait until the client reads its replies
        }
        let access = self.conn.peer.region.access();
        self.conn.rx.ready_record(self.conn.peer.region.mem(&access))
    }

    /// Whether the client has left more replies unread than the backlog
    /// limit: then [`ServerConn::poll`] takes no requests from it, and a
    /// poller should not count its pending requests as work (it would spin).
    pub fn backpressured(&self) -> bool {
        // A hint from our own state; `poll` recycles and checks again.
        self.starved || self.conn.mine.tx.backlog_blocks() > self.quotas.reply_backlog_blocks
    }

    /// The word the client's next request will change and its current value:
    /// what a poller sleeps on. `None` if a request is already there. The
    /// word is in the client's memory: readable (and waitable) while
    /// `access` lives.
    pub fn wait_target<'a>(&'a self, access: &'a Access) -> Option<(&'a AtomicU32, u32)> {
        self.conn.rx.wait_word(self.conn.mem(access))
    }

    /// Our `parked` flag for this connection: set it before sleeping on
    /// [`ServerConn::wait_target`], so the client wakes us.
    pub fn parked_flag(&self) -> &AtomicU32 {
        self.conn.my_parked()
    }

    /// The control socket (readable when the client hangs up).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.conn.sock)
    }

    /// Errors if the client died, hung up, or wrote on the control socket.
    /// Never waits: a poller calls it.
    pub fn check_alive(&self) -> Result<()> {
        self.conn.check_alive_now()
    }

    /// Handles up to `max` ready requests without waiting and answers them
    /// (one wake-up for the batch, if the client sleeps).
    pub fn poll(&mut self, handler: &mut impl Handler, max: usize) -> Result<Polled> {
        // The batch, handlers included, reads this client's memory alone.
        let access = self.conn.peer.region.access_only();
        let mut out = Polled::default();
        let backlog = self.quotas.reply_backlog_blocks;
        if self.starved || self.conn.mine.tx.backlog_blocks() > backlog {
            // The client is not reading its replies (or the arena was full):
            // stop taking requests until it catches up, rather than growing
            // without bound.
            self.conn.housekeeping(&access)?;
            if self.conn.mine.tx.backlog_blocks() > backlog {
                return Ok(out);
            }
        }
        self.starved = false;
        while out.served < max {
            // Room for the reply first, so a full arena leaves the request
            // in the client's queue: that client waits, nobody is dropped.
            match self.conn.mine.tx.reserve(MSG_HEADER + INLINE_CAPACITY) {
                Ok(_) => {}
                Err(Error::RegionFull { .. }) => {
                    self.starved = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            let mem = self.conn.peer.region.mem(&access);
            let Some(msg) = next_msg(&mut self.conn.rx, mem)? else {
                break;
            };
            if msg.method == METHOD_CLOSE {
                out.closed = true;
                break;
            }
            let (method, call_id) = (msg.method, msg.call_id);
            let oneway = msg.status & FLAG_ONEWAY != 0;
            let refuse = if oneway {
                None
            } else if self.outstanding.contains_key(&call_id) {
                // A second call under an id still in flight would take over
                // the first one's cancel hook and reply.
                Some(RemoteStatus::BadRequest)
            } else {
                None
            };
            let req = Request {
                method: msg.method,
                call_id: msg.call_id,
                payload: msg.body,
                peer: &self.conn.peer.region,
                client: self.conn.peer.id,
                mem,
                budget: budget_of(msg.status),
                releases: &self.releases,
                later: &self.later,
                deferred: &self.deferred,
                lends: &self.lends,
            };
            self.deferred.set(false);
            self.lends.set(false);
            let reply_len = if oneway {
                let r = catch_unwind(AssertUnwindSafe(|| handler.handle(&req, &mut [])));
                // No reply carries its error's message: drop it here, or the
                // next error reply on this thread (another client's) would.
                let _ = crate::error::take_failure_message();
                if !matches!(r, Ok(Ok(_))) {
                    tracing::warn!(pid = self.conn.pid(), method, "one-way message failed in its handler");
                }
                None
            } else if let Some(status) = refuse {
                let buf = self.conn.mine.tx.reserve(MSG_HEADER)?;
                Some(fill_reply(buf, call_id, method, Ok(Err(status))))
            } else {
                // The reply is written in place in our queue while the request
                // is read in place from the client's: the two never alias.
                let buf = self.conn.mine.tx.reserve(MSG_HEADER + INLINE_CAPACITY)?;
                let r = catch_unwind(AssertUnwindSafe(|| handler.handle(&req, &mut buf[MSG_HEADER..]))).map(|r| {
                    r.map(|len| Filled {
                        len,
                        lends: self.lends.get(),
                    })
                });
                if self.deferred.get() && matches!(r, Ok(Ok(_))) {
                    if self.outstanding.len() >= self.quotas.deferred_calls {
                        // Over the quota: stop its work and say so now.
                        self.later.cancel(call_id);
                        self.stats.over_quota.fetch_add(1, Ordering::Relaxed);
                        let status = RemoteStatus::QuotaExceeded(Quota::DeferredCalls);
                        Some(fill_reply(buf, call_id, method, Ok(Err(status))))
                    } else {
                        // Answered later (the reservation is simply not committed).
                        self.outstanding.insert(call_id, method);
                        if let Some(b) = req.budget {
                            self.new_deadlines.push((call_id, b));
                        }
                        None
                    }
                } else {
                    // A handler that deferred and then failed has answered:
                    // its Deferred's reply finds no outstanding call.
                    Some(fill_reply(buf, call_id, method, r))
                }
            };
            // Releases go out before the reply, so a client that sees the
            // reply sees them too.
            if !self.releases.borrow().is_empty() {
                let released = std::mem::take(&mut *self.releases.borrow_mut());
                self.conn.release_all(&access, released)?;
            }
            if let Some(n) = reply_len {
                self.conn.mine.tx.commit(n);
            }
            out.served += 1;
        }
        if out.served > 0 || out.closed {
            self.conn.publish_cursor();
            self.conn.housekeeping(&access)?;
            self.conn.ring(&access);
            self.stats.calls.fetch_add(out.served as u64, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// How the serving thread is woken when a deferred call completes
    /// (a poller bumps its own wake word).
    pub fn set_later_waker(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        self.later.set_waker(wake);
    }

    /// Whether deferred replies are waiting to be written (and can be: not
    /// while the arena has no room for them).
    #[inline]
    pub fn later_pending(&self) -> bool {
        !self.starved && self.later.pending()
    }

    /// Deferred calls not answered yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Deferred calls that arrived with a budget since the last look: the
    /// serving thread arms its timing wheel with them and calls
    /// [`ServerConn::expire`] when they are due.
    pub fn take_deadlines(&mut self) -> Vec<(u64, Duration)> {
        std::mem::take(&mut self.new_deadlines)
    }

    /// Writes the replies of deferred calls that completed. Returns how many.
    /// With no room in the arena, the rest wait for the next look.
    pub fn flush_later(&mut self) -> Result<usize> {
        if self.starved {
            return Ok(0);
        }
        let mut done = self.later.take().into_iter();
        let access = self.conn.peer.region.access_only();
        let mut n = 0;
        while let Some((call_id, method, write)) = done.next() {
            if !self.outstanding.contains_key(&call_id) {
                continue; // its deadline passed and it was answered already
            }
            let buf = match self.conn.mine.tx.reserve(MSG_HEADER + INLINE_CAPACITY) {
                Ok(b) => b,
                Err(Error::RegionFull { .. }) => {
                    self.starved = true;
                    self.later
                        .requeue(std::iter::once((call_id, method, write)).chain(done).collect());
                    break;
                }
                Err(e) => return Err(e),
            };
            self.outstanding.remove(&call_id);
            let r = match write {
                Ok(w) => catch_unwind(AssertUnwindSafe(|| w(&mut buf[MSG_HEADER..]))),
                Err(s) => Ok(Err(s)),
            };
            let len = fill_reply(buf, call_id, method, r);
            self.conn.mine.tx.commit(len);
            n += 1;
        }
        if n > 0 {
            self.conn.ring(&access);
        }
        Ok(n)
    }

    /// Deferred call `call_id`'s budget has passed: answers it with
    /// `DeadlineExceeded` and stops its work. False if it was answered (or,
    /// with the arena full, will be: it is due again in 1 ms).
    pub fn expire(&mut self, call_id: u64) -> Result<bool> {
        let Some(&method) = self.outstanding.get(&call_id) else {
            return Ok(false);
        };
        let access = self.conn.peer.region.access();
        let buf = match self.conn.mine.tx.reserve(MSG_HEADER) {
            Ok(b) => b,
            Err(Error::RegionFull { .. }) => {
                self.starved = true;
                self.new_deadlines.push((call_id, Duration::from_millis(1)));
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        self.outstanding.remove(&call_id);
        self.later.cancel(call_id);
        let len = fill_reply(buf, call_id, method, Ok(Err(RemoteStatus::DeadlineExceeded)));
        self.conn.mine.tx.commit(len);
        self.conn.ring(&access);
        Ok(true)
    }

    /// Live connections of this connection's client process to this server.
    pub fn peer_connections(&self) -> usize {
        self.slot.live.of(self.slot.peer)
    }

    /// Waits for a request (spinning, then parking) until one is ready.
    pub fn wait_ready(&mut self) -> Result<()> {
        let access = self.conn.peer.region.access();
        self.conn.wait_ready(&access, None)
    }

    /// Waits for one request and answers it. Returns `Ok(false)` when the
    /// client closed the connection.
    pub fn serve_one(&mut self, handler: &mut impl Handler) -> Result<bool> {
        loop {
            match self.wait_ready() {
                Ok(()) => {}
                Err(Error::Closed { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
            let p = self.poll(handler, 1)?;
            if p.closed {
                return Ok(false);
            }
            if p.served > 0 {
                return Ok(true);
            }
        }
    }

    /// Serves until the client closes (`Ok`) or fails (`Err`: died,
    /// protocol violation), on the calling thread.
    pub fn run(mut self, mut handler: impl Handler) -> Result<()> {
        loop {
            match self.wait_ready() {
                Ok(()) => {}
                Err(Error::Closed { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
            if self.poll(&mut handler, 64)?.closed {
                return Ok(());
            }
        }
    }

    /// Test hook: publishes an arbitrary cursor over the client's queue.
    #[doc(hidden)]
    pub fn inject_cursor(&mut self, value: u64) {
        self.conn.inject_cursor(value);
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // The client is gone or closing: deferred work has no one to answer.
        self.later.close();
    }
}
