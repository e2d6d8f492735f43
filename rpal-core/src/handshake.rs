//! The control-plane handshake over a Unix socket.
//!
//! 1. The server reads the client's credentials (`SO_PEERCRED`) and applies
//!    its [`PeerPolicy`].
//! 2. The client sends a [`Hello`]: magic, protocol version, layout hash,
//!    service name, method-table hash, its region's address and length and
//!    its endpoint block, with the region's memfd attached (`SCM_RIGHTS`).
//! 3. The server validates all of it, maps the client's region read-only at
//!    its address, and answers with its own hello (kind `Welcome`) and memfd,
//!    or with a `Reject` that names the reason.
//! 4. The client validates and maps the server's region the same way. Both
//!    open a pidfd of the other to notice its death.
//!
//! Messages are fixed 256-byte little-endian records.

pub use crate::cred::{PeerCred, peer_cred};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::error::{Error, Result};
use crate::quota::Quota;

/// Handshake magic: the first 8 bytes of every control message.
pub const MAGIC: [u8; 8] = *b"RPAL\0HS\x01";
/// Protocol version spoken by this build (2: replies that lend end with a
/// lent-block table, `FLAG_LENDS`).
pub const PROTOCOL_VERSION: u32 = 2;
/// Size of every control message.
pub const MESSAGE_LEN: usize = 256;
/// Longest service name or reject text.
pub const TEXT_LEN: usize = 128;

/// What a control message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Client to server: who I am, here is my region.
    Hello = 1,
    /// Server to client: accepted, here is mine.
    Welcome = 2,
    /// Server to client: refused, with a reason.
    Reject = 3,
}

/// Why a server rejected a hello (the `code` of a `Reject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RejectCode {
    /// `a` = uid, `b` = pid.
    PermissionDenied = 1,
    /// `a` = server's version.
    VersionMismatch = 2,
    /// `text` = server's service name.
    ServiceMismatch = 3,
    /// `a` = server's layout hash.
    LayoutMismatch = 4,
    /// `text` explains.
    Other = 5,
    /// `a` = the quota's code, `b` = its limit.
    QuotaExceeded = 6,
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Message kind.
    pub kind: Kind,
    /// Sender's protocol version.
    pub version: u32,
    /// Hash of the shared-memory layout the sender was built with.
    pub layout_hash: u64,
    /// Hash of the service's method table (0: unchecked).
    pub method_hash: u64,
    /// Sender's pid (informational; the kernel's `SO_PEERCRED` is what counts).
    pub pid: u32,
    /// Start of the sender's region.
    pub region_addr: u64,
    /// Length of the sender's region.
    pub region_len: u64,
    /// The sender's endpoint block for this connection, inside its region.
    pub endpoint_addr: u64,
    /// Reject code (Reject only).
    pub code: u32,
    /// Reject argument.
    pub a: u64,
    /// Reject argument.
    pub b: u64,
    /// Service name, or reject text.
    pub text: String,
}

impl Hello {
    /// A blank message of `kind` from this process.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            version: PROTOCOL_VERSION,
            layout_hash: crate::conn::LAYOUT_HASH,
            method_hash: 0,
            pid: std::process::id(),
            region_addr: 0,
            region_len: 0,
            endpoint_addr: 0,
            code: 0,
            a: 0,
            b: 0,
            text: String::new(),
        }
    }

    /// A reject message.
    pub fn reject(code: RejectCode, a: u64, b: u64, text: &str) -> Self {
        Self {
            code: code as u32,
            a,
            b,
            text: text.to_owned(),
            ..Self::new(Kind::Reject)
        }
    }

    /// Encodes into the wire format.
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut m = [0u8; MESSAGE_LEN];
        m[0..8].copy_from_slice(&MAGIC);
        let mut put = |at: usize, v: &[u8]| m[at..at + v.len()].copy_from_slice(v);
        put(8, &(self.kind as u32).to_le_bytes());
        put(12, &self.version.to_le_bytes());
        put(16, &self.layout_hash.to_le_bytes());
        put(24, &self.method_hash.to_le_bytes());
        put(32, &self.pid.to_le_bytes());
        put(36, &self.code.to_le_bytes());
        put(40, &self.region_addr.to_le_bytes());
        put(48, &self.region_len.to_le_bytes());
        put(56, &self.endpoint_addr.to_le_bytes());
        put(64, &self.a.to_le_bytes());
        put(72, &self.b.to_le_bytes());
        let text = truncate_utf8(&self.text, TEXT_LEN);
        put(80, &(text.len() as u32).to_le_bytes());
        put(128, text.as_bytes());
        m
    }

    /// Decodes the wire format; `endpoint` names the peer in errors.
    pub fn decode(m: &[u8; MESSAGE_LEN], endpoint: &str) -> Result<Self> {
        if m[0..8] != MAGIC {
            return Err(Error::NotRpal {
                endpoint: endpoint.to_owned(),
                detail: describe_foreign(&m[..8]),
            });
        }
        let u32_at = |at: usize| u32::from_le_bytes(m[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
        let kind = match u32_at(8) {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Reject,
            k => {
                return Err(Error::Rejected {
                    reason: format!("unknown control message kind {k} from {endpoint}"),
                });
            }
        };
        let text_len = (u32_at(80) as usize).min(TEXT_LEN);
        let text = String::from_utf8_lossy(&m[128..128 + text_len]).into_owned();
        Ok(Self {
            kind,
            version: u32_at(12),
            layout_hash: u64_at(16),
            method_hash: u64_at(24),
            pid: u32_at(32),
            code: u32_at(36),
            region_addr: u64_at(40),
            region_len: u64_at(48),
            endpoint_addr: u64_at(56),
            a: u64_at(64),
            b: u64_at(72),
            text,
        })
    }

    /// Turns a `Reject` into the typed error it stands for, seen from the
    /// rejected side (`ours` is what we sent).
    pub fn reject_error(&self, ours: &Hello) -> Error {
        match self.code {
            c if c == RejectCode::PermissionDenied as u32 => Error::PermissionDenied {
                uid: self.a as u32,
                gid: (self.a >> 32) as u32,
                pid: self.b as i32,
            },
            c if c == RejectCode::VersionMismatch as u32 => Error::VersionMismatch {
                ours: ours.version,
                theirs: self.a as u32,
            },
            c if c == RejectCode::ServiceMismatch as u32 => Error::ServiceMismatch {
                ours: ours.text.clone(),
                theirs: self.text.clone(),
            },
            c if c == RejectCode::LayoutMismatch as u32 => Error::LayoutMismatch {
                ours: ours.layout_hash,
                theirs: self.a,
            },
            c if c == RejectCode::QuotaExceeded as u32 => match Quota::from_code(self.a as u32) {
                Some(quota) => Error::QuotaExceeded { quota, limit: self.b },
                None => Error::Rejected {
                    reason: format!("over a quota this version does not know (code {})", self.a),
                },
            },
            _ => Error::Rejected {
                reason: self.text.clone(),
            },
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn describe_foreign(head: &[u8]) -> String {
    let shown: String = head
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("it sent {:?} instead of the rpal magic", shown)
}

/// Which peers a server accepts, judged by the kernel's `SO_PEERCRED`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PeerPolicy {
    /// Only processes of our own uid (the default).
    #[default]
    SameUid,
    /// Only these uids.
    AllowUids(Vec<u32>),
    /// Only processes whose primary group is one of these gids (the
    /// socket's mode must then let the group open it, e.g. `0o660`).
    AllowGids(Vec<u32>),
    /// Anyone who can open the socket (its file mode still applies).
    Anyone,
}

impl PeerPolicy {
    /// Whether a peer with the kernel's credentials `cred` may connect.
    pub fn allows(&self, cred: &PeerCred) -> bool {
        match self {
            Self::SameUid => cred.uid == crate::sys::getuid(),
            Self::AllowUids(uids) => uids.contains(&cred.uid),
            Self::AllowGids(gids) => gids.contains(&cred.gid),
            Self::Anyone => true,
        }
    }
}

/// Sends one control message, with `fd` attached if given.
pub fn send(sock: &UnixStream, msg: &Hello, fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let buf = msg.encode();
    let iov = [IoSlice::new(&buf)];
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let n = match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
        Ok(n) => n,
        Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
            return Err(Error::HandshakeClosed {
                stage: "sending a control message",
            });
        }
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(Error::Timeout(sock.write_timeout().ok().flatten().unwrap_or_default()));
        }
        Err(e) => return Err(Error::io("send handshake message", e.into())),
    };
    if n != MESSAGE_LEN {
        // A 256-byte message fits any socket buffer; a short write means trouble.
        return Err(Error::HandshakeClosed { stage: "sending hello" });
    }
    Ok(())
}

/// Receives one control message and the descriptor attached to it, if any,
/// within `timeout` for the whole message. Extra descriptors are closed and
/// refused.
pub fn recv(
    sock: &UnixStream,
    endpoint: &str,
    stage: &'static str,
    timeout: Duration,
) -> Result<(Hello, Option<OwnedFd>)> {
    recv_by(sock, endpoint, stage, Instant::now() + timeout, timeout)
}

/// As [`recv`], by `deadline` (`timeout` is what the error reports): a peer
/// that sends a byte now and then cannot stretch the wait, because each
/// read waits only for what is left.
pub(crate) fn recv_by(
    sock: &UnixStream,
    endpoint: &str,
    stage: &'static str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Hello, Option<OwnedFd>)> {
    let mut buf = [0u8; MESSAGE_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut truncated = false;
    while got < MESSAGE_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(timeout));
        }
        // A zero timeout would mean "forever" to the kernel: `left` is not zero.
        sock.set_read_timeout(Some(left))
            .map_err(|e| Error::io(format!("configure socket {endpoint}"), e))?;
        let mut cspace = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let r = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cspace),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match r {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Err(Error::Timeout(timeout)),
            Err(e) => return Err(Error::io(format!("receive handshake from {endpoint}"), e.into())),
        };
        truncated |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS gave us fresh descriptors that nothing else owns.
                    fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
        }
        if msg.bytes == 0 {
            return Err(if got >= MAGIC.len() && buf[..MAGIC.len()] != MAGIC {
                Error::NotRpal {
                    endpoint: endpoint.to_owned(),
                    detail: describe_foreign(&buf[..MAGIC.len()]),
                }
            } else {
                Error::HandshakeClosed { stage }
            });
        }
        got += msg.bytes;
        // Fail fast on a foreign protocol instead of waiting for 256 bytes.
        if got >= MAGIC.len() && buf[..MAGIC.len()] != MAGIC {
            return Err(Error::NotRpal {
                endpoint: endpoint.to_owned(),
                detail: describe_foreign(&buf[..MAGIC.len()]),
            });
        }
    }
    let hello = Hello::decode(&buf, endpoint)?;
    if truncated || fds.len() > 1 {
        return Err(Error::InvalidDescriptor {
            reason: format!("{endpoint} sent more than one descriptor"),
        });
    }
    Ok((hello, fds.pop()))
}

/// Sends a reject naming `err`, best effort, and returns `err`.
pub(crate) fn refuse(sock: &UnixStream, err: Error, ours: &Hello) -> Error {
    let msg = match &err {
        // The gid rides in the high half of `a` (a peer of protocol 1 read only the low half).
        Error::PermissionDenied { uid, gid, pid } => Hello::reject(
            RejectCode::PermissionDenied,
            *uid as u64 | (*gid as u64) << 32,
            *pid as u64,
            "",
        ),
        Error::VersionMismatch { .. } => Hello::reject(RejectCode::VersionMismatch, ours.version as u64, 0, ""),
        Error::ServiceMismatch { .. } => Hello::reject(RejectCode::ServiceMismatch, 0, 0, &ours.text),
        Error::LayoutMismatch { .. } => Hello::reject(RejectCode::LayoutMismatch, ours.layout_hash, 0, ""),
        Error::QuotaExceeded { quota, limit } => {
            Hello::reject(RejectCode::QuotaExceeded, quota.code() as u64, *limit, "")
        }
        other => Hello::reject(RejectCode::Other, 0, 0, &other.to_string()),
    };
    let _ = send(sock, &msg, None);
    err
}

/// Checks the fixed fields of a peer's hello against ours.
pub fn check_compatible(theirs: &Hello, ours: &Hello) -> Result<()> {
    if theirs.version != ours.version {
        return Err(Error::VersionMismatch {
            ours: ours.version,
            theirs: theirs.version,
        });
    }
    if theirs.layout_hash != ours.layout_hash {
        return Err(Error::LayoutMismatch {
            ours: ours.layout_hash,
            theirs: theirs.layout_hash,
        });
    }
    if theirs.text != ours.text || theirs.method_hash != ours.method_hash {
        let show = |h: &Hello| format!("{} (methods {:#x})", h.text, h.method_hash);
        return Err(Error::ServiceMismatch {
            ours: show(ours),
            theirs: show(theirs),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut h = Hello::new(Kind::Hello);
        h.region_addr = 0x5000_0000_0000;
        h.region_len = 1 << 20;
        h.endpoint_addr = 0x5000_0000_1000;
        h.text = "calc".into();
        assert_eq!(Hello::decode(&h.encode(), "t").unwrap(), h);
    }

    #[test]
    fn foreign_bytes_are_not_rpal() {
        let mut m = [0u8; MESSAGE_LEN];
        m[..8].copy_from_slice(b"HTTP/1.1");
        assert!(matches!(Hello::decode(&m, "x"), Err(Error::NotRpal { .. })));
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let s = "é".repeat(100);
        let t = truncate_utf8(&s, TEXT_LEN);
        assert!(t.len() <= TEXT_LEN && t.is_char_boundary(t.len()));
    }
}
