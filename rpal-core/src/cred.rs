//! A peer's identity as the kernel reports it (`SO_PEERCRED`): a leaf that
//! the connection and the handshake both use.

use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};

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
