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
use std::time::Duration;

use crate::arena::Arena;
use crate::conn::{Conn, OwnEndpoint};
use crate::doorbell::WaitConfig;
use crate::error::{Error, Result};
use crate::handshake::{self, Hello, Kind, PeerPolicy};
use crate::region::PeerRegion;
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
