//! A peer's identity as the kernel reports it (`SO_PEERCRED`, a pidfd and
//! the process's start time): a leaf that the connection, the handshake and
//! the arena's lent-block books all use.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};
use crate::sys;

/// One peer process, told apart from any later process that reuses its
/// pid: the pid and the process's start time (clock ticks after boot).
/// What is lent, counted or reclaimed per peer is keyed by this, never by
/// a bare pid.
/// `PeerId::default()` (pid 0) is nobody: what a stream transport, which
/// lends nothing, passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    /// Process id.
    pub pid: i32,
    /// Start time, field 22 of `/proc/<pid>/stat` (0 if it could not be read).
    pub start: u64,
}

impl PeerId {
    /// The process that has `pid` now (for tests and tools: a pid read
    /// earlier may have been reused since).
    pub fn of(pid: i32) -> Option<PeerId> {
        Some(PeerId {
            pid,
            start: sys::proc_start_time(pid)?,
        })
    }

    /// This process.
    pub fn me() -> PeerId {
        PeerId::of(sys::getpid()).unwrap_or(PeerId {
            pid: sys::getpid(),
            start: 0,
        })
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)
    }
}

/// The process at the other end of `sock`: a pidfd (readable once it
/// exits) and its [`PeerId`]. `SO_PEERPIDFD` names the very process that
/// connected; on kernels without it, `pidfd_open` of the `SO_PEERCRED` pid
/// could name a process that reused the pid of a peer that died in between
/// (docs/architecture.md, Trust). The start time is read while the pidfd
/// says the process lives, so it is that process's own.
pub fn peer_process(sock: &UnixStream, cred: &PeerCred) -> Result<(OwnedFd, PeerId)> {
    let pidfd = match sys::peer_pidfd(sock.as_fd()) {
        Ok(fd) => fd,
        Err(_) => sys::pidfd_open(cred.pid).map_err(|e| Error::io(format!("pidfd_open({})", cred.pid), e))?,
    };
    let start = sys::proc_start_time(cred.pid);
    // Still alive after the read: the pid was still its own when we read.
    let alive = sys::poll_readable(&[pidfd.as_fd()])
        .map(|r| r.is_empty())
        .unwrap_or(false);
    match (start, alive) {
        (Some(start), true) => Ok((pidfd, PeerId { pid: cred.pid, start })),
        _ => Err(Error::PeerDied { pid: cred.pid }),
    }
}

/// A peer's kernel-reported credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected socket.
pub fn peer_cred(sock: &UnixStream) -> Result<PeerCred> {
    let c = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Error::io("SO_PEERCRED", e.into()))?;
    Ok(PeerCred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}
