//! The serving side: a listening socket, handshakes, and serving one
//! connection. `rpal-poller` serves many connections with a few threads;
//! [`ServerConn::run`] serves one on the calling thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::arena::Arena;
use crate::conn::{
    BACKLOG_BLOCKS, Conn, FLAG_ONEWAY, INLINE_CAPACITY, METHOD_CLOSE, MSG_HEADER, OwnEndpoint, Peer, budget_of,
    next_msg, put_header,
};
use crate::deferred::{Deferred, DeferredQueue};
use crate::doorbell::{DoorbellSnapshot, WaitConfig};
use crate::error::{Error, RemoteStatus, Result};
use crate::handshake::{self, Hello, Kind, PeerPolicy};
use crate::pkey::Access;
use crate::region::{PeerMem, PeerRegion};
use crate::space::Space;

/// How a server accepts and waits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The service name clients must ask for.
    pub service: String,
    /// Hash of the method table both sides must share (0: unchecked).
    pub method_hash: u64,
    /// Which peers may connect.
    pub policy: PeerPolicy,
    /// Deadline of each handshake, so a stuck peer cannot hold the acceptor.
    pub handshake_timeout: Duration,
    /// Spin budget and park slice for waiting on requests.
    pub wait: WaitConfig,
    /// File mode of the socket.
    pub socket_mode: u32,
}

impl ServerOptions {
    /// Options for `service`, with the defaults (same uid, mode 0600).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            method_hash: 0,
            policy: PeerPolicy::SameUid,
            handshake_timeout: Duration::from_secs(5),
            wait: WaitConfig::default(),
            socket_mode: 0o600,
        }
    }
}

/// One request, as the handler sees it. The payload and every pointer in it
/// live in the client's memory: read them through [`Request::mem`], which
/// validates, and copy what must stay stable. The handler runs with access
/// to this client's region alone (protection keys): views of it are valid
/// for the handler's run, and no other peer's memory is readable.
pub struct Request<'a> {
    /// Method id.
    pub method: u32,
    /// Call id, unique per connection.
    pub call_id: u64,
    /// The inline payload, in place in the client's region.
    pub payload: &'a [u8],
    /// The client's region (an `Arc`, so work that outlives the request,
    /// like an async handler, can keep it mapped).
    pub peer: &'a Arc<PeerRegion>,
    /// The client's memory, readable during the handler's run.
    mem: PeerMem<'a>,
    /// How long the caller will wait for the reply, if it set a deadline.
    pub budget: Option<Duration>,
    releases: &'a RefCell<Vec<u64>>,
    later: &'a Arc<DeferredQueue>,
    deferred: &'a Cell<bool>,
}

impl<'a> Request<'a> {
    /// The client's memory, for following pointers in the payload.
    pub fn mem(&self) -> PeerMem<'a> {
        self.mem
    }

    /// Answers later: the handler returns (its reply buffer is not used)
    /// and the returned [`Deferred`] is completed from any thread. The
    /// serving thread writes the reply then; if the caller's budget passes
    /// first it fails the call with `DeadlineExceeded` and runs the
    /// deferred call's cancel hook. Not for one-way messages.
    pub fn defer(&self) -> Deferred {
        self.deferred.set(true);
        Deferred::new(self.call_id, self.method, self.later.clone())
    }

    /// How to stop a deferred call's work (abort its task) if its deadline
    /// passes or its client goes away before it completes.
    pub fn on_cancel(&self, cancel: impl FnOnce() + Send + 'static) {
        self.later.on_cancel(self.call_id, Box::new(cancel));
    }

    /// Says we are done with the client's block at `addr` (one it lent us).
    /// Published with the reply; the client frees it when it sees it.
    pub fn release(&self, addr: u64) {
        self.releases.borrow_mut().push(addr);
    }
}

/// Serves requests: fill `reply` (in place in our arena) and return its
/// length, or fail the call with a status.
pub trait Handler {
    /// Handles one request.
    fn handle(&mut self, req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus>;
}

impl<F> Handler for F
where
    F: FnMut(&Request<'_>, &mut [u8]) -> std::result::Result<usize, RemoteStatus>,
{
    fn handle(&mut self, req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus> {
        self(req, reply)
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Handshakes that succeeded.
    pub accepted: AtomicU64,
    /// Handshakes that failed (bad peer, policy, timeout...).
    pub rejected: AtomicU64,
    /// Calls answered, over all connections.
    pub calls: AtomicU64,
}

/// A listening rpal server.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    opts: ServerOptions,
    stats: Arc<ServerStats>,
}

impl Server {
    /// Listens on `path` (mode `opts.socket_mode`). A stale socket file that
    /// nobody listens on is replaced.
    pub fn bind(path: impl AsRef<Path>, opts: ServerOptions) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        // Create the arena now, so the first handshake does not pay for it.
        Arena::global()?;
        if path.exists() && UnixStream::connect(&path).is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(opts.socket_mode))
            .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
        Ok(Server {
            listener,
            path,
            opts,
            stats: Arc::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Server-wide counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Waits for the next connection and runs its handshake. A failed
    /// handshake returns that peer's typed error; the server stays usable.
    pub fn accept(&self) -> Result<ServerConn> {
        let sock = self.accept_socket()?;
        self.handshake(sock)
    }

    fn accept_socket(&self) -> Result<UnixStream> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("accept on {}", self.path.display()), e)),
            }
        }
    }

    /// Makes a blocked [`Server::accept`] return (with an error) and refuses
    /// later connections: used to shut an acceptor thread down.
    pub fn stop_accepting(&self) {
        crate::sys::shutdown_socket(std::os::fd::AsFd::as_fd(&self.listener));
    }

    /// Runs the server side of the handshake on an accepted socket.
    pub fn handshake(&self, sock: UnixStream) -> Result<ServerConn> {
        let r = self.handshake_inner(sock);
        let counter = if r.is_ok() {
            &self.stats.accepted
        } else {
            &self.stats.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn handshake_inner(&self, sock: UnixStream) -> Result<ServerConn> {
        let space = Space::global()?;
        let arena = Arena::global()?;
        let endpoint = format!("client on {}", self.path.display());
        let io = |e| Error::io(format!("configure socket {endpoint}"), e);
        sock.set_read_timeout(Some(self.opts.handshake_timeout)).map_err(io)?;
        sock.set_write_timeout(Some(self.opts.handshake_timeout)).map_err(io)?;
        let cred = handshake::peer_cred(&sock)?;
        let mine = OwnEndpoint::new()?;
        let ours = Hello {
            region_addr: arena.region().addr(),
            region_len: arena.region().len(),
            endpoint_addr: mine.addr(),
            method_hash: self.opts.method_hash,
            text: self.opts.service.clone(),
            ..Hello::new(Kind::Welcome)
        };
        if !self.opts.policy.allows(cred.uid) {
            return Err(handshake::refuse(
                &sock,
                Error::PermissionDenied {
                    uid: cred.uid,
                    pid: cred.pid,
                },
                &ours,
            ));
        }
        let (hello, fd) = handshake::recv(
            &sock,
            &endpoint,
            "waiting for the client's hello",
            self.opts.handshake_timeout,
        )?;
        if hello.kind != Kind::Hello {
            return Err(Error::NotRpal {
                endpoint,
                detail: format!("it opened with a {:?}, not a hello", hello.kind),
            });
        }
        handshake::check_compatible(&hello, &ours).map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let fd = fd.ok_or_else(|| Error::InvalidDescriptor {
            reason: "the client's hello carried no memfd".into(),
        });
        let fd = fd.map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let region = PeerRegion::map(space, fd, hello.region_addr, hello.region_len, cred.pid)
            .map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let conn = Conn::new(sock, cred, region, mine, hello.endpoint_addr, self.opts.wait)?;
        handshake::send(&conn.sock, &ours, Some(std::os::fd::AsFd::as_fd(arena.region())))?;
        conn.sock.set_read_timeout(None).map_err(io)?;
        tracing::debug!(client = cred.pid, "rpal client accepted");
        Ok(ServerConn {
            conn,
            stats: self.stats.clone(),
            releases: RefCell::new(Vec::new()),
            later: Arc::default(),
            deferred: Cell::new(false),
            outstanding: HashMap::new(),
            new_deadlines: Vec::new(),
        })
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // The client is gone or closing: deferred work has no one to answer.
        self.later.close();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

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
    conn: Conn,
    stats: Arc<ServerStats>,
    /// Releases a handler asked for, published after each batch.
    releases: RefCell<Vec<u64>>,
    /// Replies of deferred calls, completed by other threads.
    later: Arc<DeferredQueue>,
    /// Set by [`Request::defer`] during the handler's run.
    deferred: Cell<bool>,
    /// Deferred calls not answered yet (by call id).
    outstanding: HashMap<u64, u32>,
    /// Deferred calls with a budget, for the serving thread's timing wheel.
    new_deadlines: Vec<(u64, Duration)>,
}

/// Writes a reply's header after its handler ran: the length to commit.
fn fill_reply(
    buf: &mut [u8],
    call_id: u64,
    method: u32,
    r: std::thread::Result<std::result::Result<usize, RemoteStatus>>,
) -> usize {
    let (n, status) = match r {
        Ok(Ok(n)) if n <= INLINE_CAPACITY => (n, 0),
        Ok(Ok(_)) => (0, RemoteStatus::BadReply.code()),
        Ok(Err(s)) => (0, s.code()),
        Err(_) => (0, RemoteStatus::HandlerPanicked.code()),
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
        self.conn.mine.tx.backlog_blocks() > BACKLOG_BLOCKS
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

    /// Errors if the client died or hung up.
    pub fn check_alive(&self) -> Result<()> {
        self.conn.check_alive()
    }

    /// Handles up to `max` ready requests without waiting and answers them
    /// (one wake-up for the batch, if the client sleeps).
    pub fn poll(&mut self, handler: &mut impl Handler, max: usize) -> Result<Polled> {
        // The batch, handlers included, reads this client's memory alone.
        let access = self.conn.peer.region.access_only();
        let mut out = Polled::default();
        if self.conn.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
            // The client is not reading its replies: stop taking requests
            // until it catches up, rather than growing without bound.
            self.conn.housekeeping(&access)?;
            if self.conn.mine.tx.backlog_blocks() > BACKLOG_BLOCKS {
                return Ok(out);
            }
        }
        while out.served < max {
            let mem = self.conn.peer.region.mem(&access);
            let Some(msg) = next_msg(&mut self.conn.rx, mem)? else {
                break;
            };
            if msg.method == METHOD_CLOSE {
                out.closed = true;
                break;
            }
            let req = Request {
                method: msg.method,
                call_id: msg.call_id,
                payload: msg.body,
                peer: &self.conn.peer.region,
                mem,
                budget: budget_of(msg.status),
                releases: &self.releases,
                later: &self.later,
                deferred: &self.deferred,
            };
            let (method, call_id) = (msg.method, msg.call_id);
            self.deferred.set(false);
            let reply_len = if msg.status & FLAG_ONEWAY != 0 {
                let r = catch_unwind(AssertUnwindSafe(|| handler.handle(&req, &mut [])));
                if !matches!(r, Ok(Ok(_))) {
                    tracing::warn!(pid = self.conn.pid(), method, "one-way message failed in its handler");
                }
                None
            } else {
                // The reply is written in place in our queue while the request
                // is read in place from the client's: the two never alias.
                let buf = self.conn.mine.tx.reserve(MSG_HEADER + INLINE_CAPACITY)?;
                let r = catch_unwind(AssertUnwindSafe(|| handler.handle(&req, &mut buf[MSG_HEADER..])));
                if self.deferred.get() && matches!(r, Ok(Ok(_))) {
                    // Answered later (the reservation is simply not committed).
                    self.outstanding.insert(call_id, method);
                    if let Some(b) = req.budget {
                        self.new_deadlines.push((call_id, b));
                    }
                    None
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
                self.conn.release_all(&access, released);
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

    /// Whether deferred replies are waiting to be written.
    #[inline]
    pub fn later_pending(&self) -> bool {
        self.later.pending()
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
    pub fn flush_later(&mut self) -> Result<usize> {
        let done = self.later.take();
        if done.is_empty() {
            return Ok(0);
        }
        let access = self.conn.peer.region.access_only();
        let mut n = 0;
        for (call_id, method, write) in done {
            if self.outstanding.remove(&call_id).is_none() {
                continue; // its deadline passed and it was answered already
            }
            let buf = self.conn.mine.tx.reserve(MSG_HEADER + INLINE_CAPACITY)?;
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
    /// `DeadlineExceeded` and stops its work. False if it was answered.
    pub fn expire(&mut self, call_id: u64) -> Result<bool> {
        let Some(method) = self.outstanding.remove(&call_id) else {
            return Ok(false);
        };
        self.later.cancel(call_id);
        let access = self.conn.peer.region.access();
        let buf = self.conn.mine.tx.reserve(MSG_HEADER)?;
        let len = fill_reply(buf, call_id, method, Ok(Err(RemoteStatus::DeadlineExceeded)));
        self.conn.mine.tx.commit(len);
        self.conn.ring(&access);
        Ok(true)
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
