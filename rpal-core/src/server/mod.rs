//! The serving side: a listening socket, handshakes, and serving one
//! connection. `rpal-poller` serves many connections with a few threads;
//! [`ServerConn::run`] serves one on the calling thread.
//!
//! `request` is what a handler sees; `conn` serves one connection; this
//! module listens and runs the handshake.

mod conn;
mod request;

pub use conn::{Polled, ServerConn};
pub use request::{Handler, Request};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::arena::Arena;
use crate::conn::{Conn, OwnEndpoint};
use crate::cred::PeerId;
use crate::doorbell::WaitConfig;
use crate::error::{Error, Result};
use crate::handshake::{self, Hello, Kind, PeerPolicy};
use crate::quota::{Counter, Quota, Quotas};
use crate::region::PeerRegion;
use crate::space::Space;

/// How a server accepts and waits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The service name clients must ask for.
    pub service: String,
    /// Hash of the method table both sides must share (0: unchecked).
    pub method_hash: u64,
    /// The methods of the table, sent to a client whose table differs so
    /// that its error names the methods (generated servers fill it in).
    pub methods: &'static [handshake::MethodInfo],
    /// Which peers may connect.
    pub policy: PeerPolicy,
    /// Deadline of each handshake, so a stuck peer cannot hold the acceptor.
    /// Default 5 s.
    pub handshake_timeout: Duration,
    /// Spin budget and park slice for waiting on requests.
    pub wait: WaitConfig,
    /// File mode of the socket.
    pub socket_mode: u32,
    /// What one client may hold of this server (see [`Quotas`]).
    pub quotas: Quotas,
}

impl ServerOptions {
    /// Options for `service`, with the defaults (same uid, mode 0600).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            method_hash: 0,
            methods: &[],
            policy: PeerPolicy::SameUid,
            handshake_timeout: Duration::from_secs(5),
            wait: WaitConfig::default(),
            socket_mode: 0o600,
            quotas: Quotas::default(),
        }
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
    /// Connections and calls refused because a peer was over a quota.
    pub over_quota: AtomicU64,
}

/// A listening rpal server.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    opts: ServerOptions,
    stats: Arc<ServerStats>,
    /// Live connections, per client process and in total.
    live: Arc<Counter<PeerId>>,
    /// Handshakes under way, per pid (see [`Server::admit`]; a place
    /// lives only until its handshake's deadline, so pid reuse cannot
    /// matter).
    handshaking: Arc<Counter<i32>>,
}

/// A live connection's place in its server's connection quota.
pub(crate) struct Slot {
    pub(crate) live: Arc<Counter<PeerId>>,
    pub(crate) peer: PeerId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.live.give(self.peer);
    }
}

/// A handshake's place in the server's handshake quota (from
/// [`Server::admit`]); the handshake runs with it.
pub struct Admitted {
    sock: UnixStream,
    started: Instant,
    _slot: Handshaking,
}

struct Handshaking(Arc<Counter<i32>>, i32);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.give(self.1);
    }
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
            live: Arc::default(),
            handshaking: Arc::default(),
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

    /// Waits for the next connection, without a handshake: an acceptor that
    /// runs handshakes concurrently takes it to [`Server::admit`].
    pub fn accept_socket(&self) -> Result<UnixStream> {
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

    /// Takes a place among the handshakes under way for `sock`, or refuses
    /// it at once (the peer gets `QuotaExceeded`) when its process holds
    /// [`Quotas::connections_per_peer`] connections already, when
    /// [`Quotas::handshakes_per_peer`] of its handshakes are running, or
    /// [`Quotas::handshakes`] in all (an acceptor waits for a place before
    /// it accepts, see [`Server::handshakes`]). The handshake's deadline starts now.
    pub fn admit(&self, sock: UnixStream) -> Result<Admitted> {
        let q = &self.opts.quotas;
        // The kernel's credentials cost no wait; a peer without them counts as pid 0.
        let pid = handshake::peer_cred(&sock).map(|c| c.pid).unwrap_or(0);
        // A peer already at its connection quota is refused here, without a
        // handshake thread: a refused reconnect loop then costs the acceptor
        // a few syscalls. (A peek: the handshake takes the place for real.)
        let taken = if self.live.of_pid(pid) >= q.connections_per_peer {
            Err(Quota::ConnectionsPerPeer.exceeded(q.connections_per_peer as u64))
        } else {
            self.handshaking.take(
                pid,
                (Quota::HandshakesPerPeer, q.handshakes_per_peer),
                (Quota::Handshakes, q.handshakes),
            )
        };
        if let Err(e) = taken {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            self.stats.over_quota.fetch_add(1, Ordering::Relaxed);
            // Best effort, without waiting: a peer that does not read is dropped.
            let _ = sock.set_nonblocking(true);
            return Err(handshake::refuse(&sock, e, &Hello::new(Kind::Welcome)));
        }
        Ok(Admitted {
            sock,
            started: Instant::now(),
            _slot: Handshaking(self.handshaking.clone(), pid),
        })
    }

    /// Runs the server side of the handshake on an accepted socket.
    pub fn handshake(&self, sock: UnixStream) -> Result<ServerConn> {
        self.handshake_admitted(self.admit(sock)?)
    }

    /// Runs the handshake of an admitted socket, all of it within
    /// [`ServerOptions::handshake_timeout`] of its admission.
    pub fn handshake_admitted(&self, admitted: Admitted) -> Result<ServerConn> {
        let Admitted { sock, started, _slot } = admitted;
        let r = self.handshake_inner(sock, started + self.opts.handshake_timeout);
        let counter = if r.is_ok() {
            &self.stats.accepted
        } else {
            &self.stats.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(r, Err(Error::QuotaExceeded { .. })) {
            self.stats.over_quota.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Handshakes under way.
    pub fn handshakes(&self) -> usize {
        self.handshaking.total()
    }

    /// The quotas this server enforces.
    pub fn quotas(&self) -> &Quotas {
        &self.opts.quotas
    }

    /// Live connections (all clients together).
    pub fn connections(&self) -> usize {
        self.live.total()
    }

    fn handshake_inner(&self, sock: UnixStream, deadline: Instant) -> Result<ServerConn> {
        let space = Space::global()?;
        let arena = Arena::global()?;
        let timeout = self.opts.handshake_timeout;
        let endpoint = format!("client on {}", self.path.display());
        let io = |e| Error::io(format!("configure socket {endpoint}"), e);
        // Sends wait at most what is left of the handshake (never zero:
        // that would mean no limit).
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        sock.set_write_timeout(Some(left())).map_err(io)?;
        let cred = handshake::peer_cred(&sock)?;
        let mine = OwnEndpoint::new()?;
        let ours = Hello {
            region_addr: arena.region().addr(),
            region_len: arena.region().len(),
            endpoint_addr: mine.addr(),
            method_hash: self.opts.method_hash,
            text: self.opts.service.clone(),
            ..Hello::for_space(Kind::Welcome, space)
        };
        if !self.opts.policy.allows(&cred) {
            // Who was refused, whatever the caller does with the error.
            tracing::warn!(pid = cred.pid, uid = cred.uid, gid = cred.gid, policy = ?self.opts.policy, "rpal peer refused by policy");
            return Err(handshake::refuse(
                &sock,
                Error::PermissionDenied {
                    uid: cred.uid,
                    gid: cred.gid,
                    pid: cred.pid,
                },
                &ours,
            ));
        }
        let (pidfd, peer) = crate::cred::peer_process(&sock, &cred)?;
        // The connection's place in the quotas, before it costs anything.
        let q = &self.opts.quotas;
        self.live
            .take(
                peer,
                (Quota::ConnectionsPerPeer, q.connections_per_peer),
                (Quota::Connections, q.connections),
            )
            .map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let slot = Slot {
            live: self.live.clone(),
            peer,
        };
        let (hello, fd) = handshake::recv_by(&sock, &endpoint, "waiting for the client's hello", deadline, timeout)?;
        if hello.kind != Kind::Hello {
            return Err(Error::NotRpal {
                endpoint,
                detail: format!("it opened with a {:?}, not a hello", hello.kind),
            });
        }
        handshake::check_compatible(&hello, &ours)
            .map_err(|e| handshake::refuse_table(&sock, e, &ours, self.opts.methods))?;
        let fd = fd.ok_or_else(|| Error::InvalidDescriptor {
            reason: "the client's hello carried no memfd".into(),
        });
        let fd = fd.map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let region = PeerRegion::map(space, fd, hello.region_addr, hello.region_len, cred.pid)
            .map_err(|e| handshake::refuse(&sock, e, &ours))?;
        let conn = Conn::new(
            sock,
            cred,
            (pidfd, peer),
            region,
            mine,
            hello.endpoint_addr,
            self.opts.wait,
        )?;
        conn.sock.set_write_timeout(Some(left())).map_err(io)?;
        handshake::send(&conn.sock, &ours, Some(std::os::fd::AsFd::as_fd(arena.region())))?;
        conn.sock.set_read_timeout(None).map_err(io)?;
        conn.sock.set_write_timeout(None).map_err(io)?;
        tracing::debug!(client = cred.pid, "rpal client accepted");
        Ok(ServerConn {
            conn,
            stats: self.stats.clone(),
            releases: RefCell::new(Vec::new()),
            later: Arc::default(),
            deferred: Cell::new(false),
            lends: Cell::new(false),
            outstanding: HashMap::new(),
            new_deadlines: Vec::new(),
            quotas: self.opts.quotas,
            starved: false,
            slot,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
