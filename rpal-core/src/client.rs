//! The calling side of a connection.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::arena::Arena;
use crate::conn::{Conn, FLAG_ONEWAY, INLINE_CAPACITY, METHOD_CLOSE, OwnEndpoint, Peer, budget_bits, next_msg};
use crate::doorbell::{Deadline, DoorbellSnapshot, WaitConfig};
use crate::error::{Error, RemoteStatus, Result};
use crate::handshake::{self, Hello, Kind};
use crate::pkey::Access;
use crate::region::PeerRegion;
use crate::space::Space;
use crate::types::PeerMem;

/// How a client connects and waits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The service name the server must offer.
    pub service: String,
    /// Hash of the method table both sides must share (0: unchecked).
    pub method_hash: u64,
    /// The methods of the table, named in a [`Error::MethodTableMismatch`]
    /// when the server's differs (generated clients fill it in).
    pub methods: &'static [handshake::MethodInfo],
    /// Spin budget and park slice for waiting on replies.
    pub wait: WaitConfig,
    /// Default deadline of each call; `None` waits as long as the server lives.
    pub call_timeout: Option<Duration>,
    /// Deadline of the handshake. Default 5 s.
    pub handshake_timeout: Duration,
}

impl ClientOptions {
    /// Options for `service`, with the defaults.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            method_hash: 0,
            methods: &[],
            wait: WaitConfig::default(),
            call_timeout: None,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection to one server. One call at a time (`&mut self`); one-way
/// messages may be pipelined.
pub struct Client {
    conn: Conn,
    /// The server's pidfd under the process's death watch: a waiting
    /// caller learns of its death within milliseconds, not a park slice.
    _death_watch: Option<crate::wait::deaths::Watch>,
    next_call: u64,
    call_timeout: Option<Duration>,
}

impl Client {
    /// Connects to the server at `path` and runs the handshake.
    pub fn connect(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client> {
        let path = path.as_ref();
        let endpoint = path.display().to_string();
        let sock = UnixStream::connect(path).map_err(|e| Error::io(format!("connect to {endpoint}"), e))?;
        Self::handshake(sock, &endpoint, opts)
    }

    /// Runs the client handshake on an already connected socket.
    pub fn handshake(sock: UnixStream, endpoint: &str, opts: ClientOptions) -> Result<Client> {
        // One deadline for the whole exchange, a server's method table included.
        let deadline = std::time::Instant::now() + opts.handshake_timeout;
        let space = Space::global()?;
        let arena = Arena::global()?;
        let io = |e| Error::io(format!("configure socket {endpoint}"), e);
        sock.set_read_timeout(Some(opts.handshake_timeout)).map_err(io)?;
        sock.set_write_timeout(Some(opts.handshake_timeout)).map_err(io)?;
        let cred = handshake::peer_cred(&sock)?;
        let mine = OwnEndpoint::new()?;
        let hello = Hello {
            region_addr: arena.region().addr(),
            region_len: arena.region().len(),
            endpoint_addr: mine.addr(),
            method_hash: opts.method_hash,
            text: opts.service.clone(),
            ..Hello::for_space(Kind::Hello, space)
        };
        let sent = handshake::send(&sock, &hello, Some(std::os::fd::AsFd::as_fd(arena.region())));
        // A server that refuses us (policy) may answer and hang up before our
        // hello lands: read its reject, which names the reason, if there is one.
        let received = handshake::recv(
            &sock,
            endpoint,
            "waiting for the server's welcome",
            opts.handshake_timeout,
        );
        let (reply, fd) = match (sent, received) {
            (_, Ok((r, _))) if r.kind == Kind::Reject => {
                let next = || {
                    handshake::recv_by(
                        &sock,
                        endpoint,
                        "reading the server's method table",
                        deadline,
                        opts.handshake_timeout,
                    )
                };
                return Err(handshake::rejection(&r, &hello, opts.methods, || {
                    next().map(|(m, _)| m)
                }));
            }
            (Err(e), _) => return Err(e),
            (Ok(()), r) => r?,
        };
        if reply.kind != Kind::Welcome {
            return Err(Error::NotRpal {
                endpoint: endpoint.to_owned(),
                detail: "it answered a hello with a hello".into(),
            });
        }
        handshake::check_compatible(&reply, &hello)?;
        let fd = fd.ok_or_else(|| Error::InvalidDescriptor {
            reason: "the server's welcome carried no memfd".into(),
        })?;
        let region = PeerRegion::map(space, fd, reply.region_addr, reply.region_len, cred.pid)?;
        sock.set_read_timeout(None).map_err(io)?;
        let process = crate::cred::peer_process(&sock, &cred)?;
        let conn = Conn::new(sock, cred, process, region, mine, reply.endpoint_addr, opts.wait)?;
        tracing::debug!(server = cred.pid, endpoint, "rpal client connected");
        let death_watch = crate::wait::deaths::watch(conn.peer.pidfd().as_fd())
            .map_err(|e| tracing::warn!(%e, "no death watch: a dead server is noticed at the park slice"))
            .ok();
        Ok(Client {
            conn,
            _death_watch: death_watch,
            next_call: 1,
            call_timeout: opts.call_timeout,
        })
    }

    /// The server: credentials and region.
    pub fn peer(&self) -> &Peer {
        &self.conn.peer
    }

    /// Doorbell counters of this connection.
    pub fn stats(&self) -> DoorbellSnapshot {
        self.conn.snapshot()
    }

    /// The spin budget and park slice in force.
    pub fn wait_config(&self) -> WaitConfig {
        self.conn.wait
    }

    /// Changes the spin budget and park slice for later calls.
    pub fn set_wait(&mut self, wait: WaitConfig) {
        self.conn.wait = wait;
    }

    /// Calls `method`. `write` fills the request body in place in our queue
    /// (at most [`INLINE_CAPACITY`] bytes) and returns its length; `read` gets
    /// the reply body in place in the server's memory (validated, read-only)
    /// and the server's memory for following pointers. The reply is valid
    /// only inside `read`. The calling thread has access to the server's
    /// region (protection keys) from the send to the end of `read`.
    pub fn call_with<R>(
        &mut self,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut [u8]) -> usize,
        read: impl FnOnce(&[u8], PeerMem<'_>) -> R,
    ) -> Result<R> {
        self.call_sized(method, INLINE_CAPACITY, timeout, write, read)
    }

    /// As [`Client::call_with`], with room for a request body of `cap` bytes
    /// (any size: big bodies get a queue block of their own).
    pub fn call_sized<R>(
        &mut self,
        method: u32,
        cap: usize,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut [u8]) -> usize,
        read: impl FnOnce(&[u8], PeerMem<'_>) -> R,
    ) -> Result<R> {
        let deadline = timeout.or(self.call_timeout).map(Deadline::after);
        // One grant for the whole call: the steps below nest in it for free.
        let access = self.conn.peer.region.access();
        let id = self.send_request(method, cap, write)?;
        let mut read = Some(read);
        loop {
            self.conn.wait_ready(&access, deadline.as_ref())?;
            if let Some(out) = self.try_reply(id, method, &mut read)? {
                return Ok(out);
            }
        }
    }

    /// The call id for a new message of `method` (the reserved close id is refused).
    fn next_id(&mut self, method: u32) -> Result<u64> {
        if method == METHOD_CLOSE {
            return Err(Error::remote(method, RemoteStatus::UnknownMethod.code(), &[]));
        }
        self.next_call += 1;
        Ok(self.next_call - 1)
    }

    /// Sends a request without waiting for its reply, and returns its call
    /// id; collect the reply with [`Client::try_reply`]. For event loops.
    pub fn send_request(&mut self, method: u32, cap: usize, write: impl FnOnce(&mut [u8]) -> usize) -> Result<u64> {
        self.send_request_within(method, cap, None, write)
    }

    /// As [`Client::send_request`], telling the server how long we will
    /// wait (`budget`): a server that answers later gives up after it.
    pub fn send_request_within(
        &mut self,
        method: u32,
        cap: usize,
        budget: Option<Duration>,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<u64> {
        let id = self.next_id(method)?;
        let access = self.conn.peer.region.access();
        // Waiting for room counts against the call's own deadline.
        let room_wait = budget.or(self.call_timeout);
        self.conn
            .send(&access, method, id, budget_bits(budget), cap, room_wait, write)?;
        self.conn.ring(&access);
        Ok(id)
    }

    /// The reply to call `id` of `method`, if it has arrived, given to the
    /// `read` in the option (taken once used); `None` if it has not arrived
    /// yet. Never waits. Replies of earlier calls (that timed out or were
    /// cancelled) are discarded on the way.
    pub fn try_reply<R, F>(&mut self, id: u64, method: u32, read: &mut Option<F>) -> Result<Option<R>>
    where
        F: FnOnce(&[u8], PeerMem<'_>) -> R,
    {
        let access = self.conn.peer.region.access();
        loop {
            let pid = self.conn.pid();
            let Some(msg) = next_msg(&mut self.conn.rx, self.conn.peer.region.mem(&access))? else {
                self.conn.publish_cursor();
                return Ok(None);
            };
            if msg.call_id < id {
                continue; // the late reply of an abandoned call
            }
            if msg.call_id != id {
                return Err(Error::Protocol {
                    pid,
                    detail: format!("reply carries call id {} while call {id} is in flight", msg.call_id),
                });
            }
            if msg.status != 0 {
                return Err(Error::remote(method, msg.status, msg.body));
            }
            let read = read.take().expect("a reply is read once");
            let out = read(msg.body, self.conn.peer.region.mem(&access));
            // Recycling and releases wait for the next send; the cursor goes now.
            self.conn.publish_cursor();
            return Ok(Some(out));
        }
    }

    /// Reads the replies that have arrived, in place, in arrival order, and
    /// hands each to `f` with its call id and status, until `f` returns
    /// `Ok(false)` or an error, or none is left. Never waits. For callers
    /// that track many calls themselves (replies may come in any order).
    /// Stopping as soon as the wanted reply is read matters: looking at the
    /// next record would pull in a line the server is about to write.
    pub fn drain_replies(&mut self, mut f: impl FnMut(u64, u32, &[u8], PeerMem<'_>) -> Result<bool>) -> Result<usize> {
        let access = self.conn.peer.region.access();
        let mut n = 0;
        let out = loop {
            let mem = self.conn.peer.region.mem(&access);
            match next_msg(&mut self.conn.rx, mem) {
                Ok(Some(msg)) => {
                    n += 1;
                    match f(msg.call_id, msg.status, msg.body, mem) {
                        Ok(true) => {}
                        Ok(false) => break Ok(n),
                        Err(e) => break Err(e),
                    }
                }
                Ok(None) => break Ok(n),
                Err(e) => break Err(e),
            }
        };
        self.conn.publish_cursor();
        out
    }

    /// Whether a request can be sent without waiting for the server to
    /// read (it is at most 256 queue blocks behind). Rings the server if
    /// not, so that a parked server reads on. A caller that must not wait
    /// under a lock checks this first, and waits itself without the lock.
    #[inline]
    pub fn has_room(&mut self) -> Result<bool> {
        if self.conn.room_now() {
            return Ok(true); // the common case: no grant, no look at the server
        }
        let access = self.conn.peer.region.access();
        let room = self.conn.has_room(&access)?;
        if !room {
            self.conn.ring(&access);
        }
        Ok(room)
    }

    /// The call timeout of [`ClientOptions`], if set.
    pub fn call_timeout(&self) -> Option<Duration> {
        self.call_timeout
    }

    /// Counts a wait for room (see [`Client::has_room`]) in the stats.
    pub fn count_full_wait(&self) {
        let w = &self.conn.stats.full_waits;
        w.store(
            w.load(std::sync::atomic::Ordering::Relaxed) + 1,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The call id the next request will get.
    pub fn next_call_id(&self) -> u64 {
        self.next_call
    }

    /// What to sleep on until the next reply: the word it will change and
    /// its current value, or `None` if something has arrived already. Set
    /// [`Client::parked_flag`] (then fence, then look again) before sleeping,
    /// so that the server wakes you. The word is in the server's memory:
    /// readable (and waitable) while `access` lives.
    pub fn reply_wait_target<'a>(&'a self, access: &'a Access) -> Option<(&'a AtomicU32, u32)> {
        self.conn.rx.wait_word(self.conn.mem(access))
    }

    /// A grant of access to the server's region for this thread (see
    /// [`crate::pkey`]), for [`Client::reply_wait_target`] and waits on it.
    pub fn access(&self) -> Access {
        self.conn.peer.region.access()
    }

    /// Our `parked` flag for this connection.
    pub fn parked_flag(&self) -> &AtomicU32 {
        self.conn.my_parked()
    }

    /// The control socket (readable when the server hangs up).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.conn.sock)
    }

    /// Errors if the server died or hung up.
    pub fn check_alive(&self) -> Result<()> {
        self.conn.check_alive()
    }

    /// Calls `method` with `request` copied inline and returns a copy of the reply.
    pub fn call(&mut self, method: u32, request: &[u8]) -> Result<Vec<u8>> {
        self.call_sized(
            method,
            request.len(),
            None,
            |buf| {
                buf[..request.len()].copy_from_slice(request);
                request.len()
            },
            |reply, _| reply.to_vec(),
        )
    }

    /// Sends a one-way message of `len` bytes that `write` fills: no reply,
    /// no wait (unless the server is far behind: then backpressure waits).
    /// Messages are delivered in order; call [`Client::flush`] to wake a
    /// parked server after a batch (the next call does it too).
    pub fn send_oneway(&mut self, method: u32, len: usize, write: impl FnOnce(&mut [u8])) -> Result<()> {
        let id = self.next_id(method)?;
        let access = self.conn.peer.region.access();
        let room_wait = self.call_timeout;
        self.conn.send(&access, method, id, FLAG_ONEWAY, len, room_wait, |buf| {
            write(&mut buf[..len]);
            len
        })
    }

    /// Wakes the server if it sleeps, so that one-way messages sent so far
    /// are handled.
    pub fn flush(&mut self) {
        let access = self.conn.peer.region.access();
        self.conn.ring(&access);
    }

    /// Says we are done with the server's block at `addr` (one it lent us);
    /// the server frees it once it sees the release. A server that never
    /// consumes our releases loses those past a bound (its own blocks).
    pub fn release(&mut self, addr: u64) {
        let access = self.conn.peer.region.access();
        if let Err(e) = self.conn.release(&access, addr) {
            tracing::debug!(pid = self.conn.pid(), %e, "a release was dropped");
        }
    }

    /// Frees our blocks that the server released, now (this also happens on
    /// every reply). Returns how many were freed.
    pub fn reclaim(&mut self) -> Result<usize> {
        let access = self.conn.peer.region.access();
        self.conn.reclaim(&access)
    }

    /// Releases by the server that matched no block lent to it, refused so far.
    pub fn refused_releases(&self) -> u64 {
        self.conn.refused_releases
    }

    /// Test hook: the next call gets id `id` again, as a hostile client's
    /// reused call id would.
    #[doc(hidden)]
    pub fn reuse_call_id(&mut self, id: u64) {
        self.next_call = id;
    }

    /// Test hook: publishes an arbitrary cursor over the server's queue.
    #[doc(hidden)]
    pub fn inject_cursor(&mut self, value: u64) {
        self.conn.inject_cursor(value);
    }

    /// Test hook: publishes a raw queue header, its sequence number
    /// `seq_skew` past the right one, with length `len`.
    #[doc(hidden)]
    pub fn inject_header(&mut self, seq_skew: u32, len: u32) {
        self.conn.mine.tx.inject_header(seq_skew, len);
        self.flush();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Tell the server we are done, so it stops waiting at once. Best
        // effort: a server that died needs no goodbye, and one that stopped
        // reading gets one park slice to make room, never a hung drop.
        let access = self.conn.peer.region.access();
        let room_wait = Some(self.conn.wait.park_slice);
        if self
            .conn
            .send(&access, METHOD_CLOSE, 0, FLAG_ONEWAY, 0, room_wait, |_| 0)
            .is_ok()
        {
            self.conn.ring(&access);
        }
    }
}
