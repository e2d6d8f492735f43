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
/// lent-block table, `FLAG_LENDS`; 3: method ids cover type layouts, hellos
/// carry the window and registry, a method-table reject is followed by the
/// server's table, and a handler's error carries a code and a message).
pub const PROTOCOL_VERSION: u32 = 3;
/// Most [`Kind::Table`] messages read after a method-table reject: a peer
/// cannot make us read more than 32 × 128 bytes of names.
pub const MAX_TABLE_MESSAGES: u64 = 32;
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
    /// After a method-table reject: part of the server's method table, as
    /// `name=id;` entries in `text` (`a` = index, `b` = count).
    Table = 4,
}

/// A method's name and id, as a generated service lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// The method's name.
    pub name: &'static str,
    /// Its id (signature and type layouts).
    pub id: u32,
}

/// A method whose id differs between two builds of a service, or that only
/// one of them has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodDiff {
    /// The method's name.
    pub name: String,
    /// Our id for it (`None`: we have no such method).
    pub ours: Option<u32>,
    /// The peer's id for it (`None`: the peer has no such method).
    pub theirs: Option<u32>,
}

impl std::fmt::Display for MethodDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.ours, self.theirs) {
            (Some(o), Some(t)) => write!(f, "`{}` (ours {o:#010x}, the peer's {t:#010x})", self.name),
            (Some(o), None) => write!(f, "`{}` (ours {o:#010x}, the peer has none)", self.name),
            (None, Some(t)) => write!(f, "`{}` (the peer's {t:#010x}, we have none)", self.name),
            (None, None) => write!(f, "`{}`", self.name),
        }
    }
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
    /// `text` = service name, `a` = server's method hash, `b` = how many
    /// [`Kind::Table`] messages follow.
    MethodTableMismatch = 7,
    /// `a` = server's window base, `b` = its length.
    WindowMismatch = 8,
    /// `text` = the server's registry path.
    OtherRegistry = 9,
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
    /// Identity of the sender's slot registry (its file's device and inode;
    /// 0: no shared memory, as over TCP).
    pub registry_id: u64,
    /// Start of the sender's address window (0: no shared memory).
    pub window_base: u64,
    /// Length of the sender's address window.
    pub window_len: u64,
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
            registry_id: 0,
            window_base: 0,
            window_len: 0,
            text: String::new(),
        }
    }

    /// A blank message of `kind` for a shared-memory peer: it names our
    /// window and registry, so a peer set up with others is told so at once.
    pub fn for_space(kind: Kind, space: &crate::space::Space) -> Self {
        let cfg = space.config();
        Self {
            registry_id: space.registry_id(),
            window_base: cfg.base,
            window_len: cfg.slot_size.saturating_mul(cfg.slots),
            ..Self::new(kind)
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
        put(88, &self.registry_id.to_le_bytes());
        put(96, &self.window_base.to_le_bytes());
        put(104, &self.window_len.to_le_bytes());
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
            4 => Kind::Table,
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
            registry_id: u64_at(88),
            window_base: u64_at(96),
            window_len: u64_at(104),
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
            c if c == RejectCode::MethodTableMismatch as u32 => Error::MethodTableMismatch {
                service: ours.text.clone(),
                ours: ours.method_hash,
                theirs: self.a,
                methods: Vec::new(),
            },
            c if c == RejectCode::WindowMismatch as u32 => Error::WindowMismatch {
                ours: (ours.window_base, ours.window_len),
                theirs: (self.a, self.b),
            },
            c if c == RejectCode::OtherRegistry as u32 => Error::OtherRegistry {
                ours: crate::space::Space::existing()
                    .map(|s| s.config().registry.display().to_string())
                    .unwrap_or_default(),
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
        Error::MethodTableMismatch { .. } => {
            Hello::reject(RejectCode::MethodTableMismatch, ours.method_hash, 0, &ours.text)
        }
        Error::WindowMismatch { .. } => {
            Hello::reject(RejectCode::WindowMismatch, ours.window_base, ours.window_len, "")
        }
        Error::OtherRegistry { ours: path, .. } => Hello::reject(RejectCode::OtherRegistry, 0, 0, path),
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
    // Zero on either side: no shared memory (a stream peer), nothing to agree on.
    let both = |a: u64, b: u64| a != 0 && b != 0;
    if both(theirs.window_base, ours.window_base)
        && (theirs.window_base, theirs.window_len) != (ours.window_base, ours.window_len)
    {
        return Err(Error::WindowMismatch {
            ours: (ours.window_base, ours.window_len),
            theirs: (theirs.window_base, theirs.window_len),
        });
    }
    if both(theirs.registry_id, ours.registry_id) && theirs.registry_id != ours.registry_id {
        let ours = crate::space::Space::existing()
            .map(|s| s.config().registry.display().to_string())
            .unwrap_or_default();
        return Err(Error::OtherRegistry {
            ours,
            theirs: String::new(),
        });
    }
    if theirs.text != ours.text {
        return Err(Error::ServiceMismatch {
            ours: ours.text.clone(),
            theirs: theirs.text.clone(),
        });
    }
    if theirs.method_hash != ours.method_hash {
        return Err(Error::MethodTableMismatch {
            service: ours.text.clone(),
            ours: ours.method_hash,
            theirs: theirs.method_hash,
            methods: Vec::new(),
        });
    }
    Ok(())
}

/// A method table as [`Kind::Table`] messages: `name=id;` entries, never
/// split across two messages.
pub fn table_messages(methods: &[MethodInfo]) -> Vec<Hello> {
    let mut texts: Vec<String> = vec![String::new()];
    for m in methods {
        let entry = format!("{}={:x};", truncate_utf8(m.name, TEXT_LEN - 10), m.id);
        if texts.last().is_some_and(|t| t.len() + entry.len() > TEXT_LEN) {
            texts.push(String::new());
        }
        if let Some(t) = texts.last_mut() {
            t.push_str(&entry);
        }
    }
    texts.truncate(MAX_TABLE_MESSAGES as usize);
    let n = texts.len() as u64;
    texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| Hello {
            a: i as u64,
            b: n,
            text,
            ..Hello::new(Kind::Table)
        })
        .collect()
}

/// The reject for a method-table mismatch, with how many table messages
/// follow it.
pub fn table_reject(ours: &Hello, methods: &[MethodInfo]) -> (Hello, Vec<Hello>) {
    let table = table_messages(methods);
    let reject = Hello::reject(
        RejectCode::MethodTableMismatch,
        ours.method_hash,
        table.len() as u64,
        &ours.text,
    );
    (reject, table)
}

/// Sends a method-table reject and the table after it, best effort, and
/// returns `err`.
pub(crate) fn refuse_table(sock: &UnixStream, err: Error, ours: &Hello, methods: &[MethodInfo]) -> Error {
    if !matches!(err, Error::MethodTableMismatch { .. }) {
        return refuse(sock, err, ours);
    }
    let (reject, table) = table_reject(ours, methods);
    for m in std::iter::once(&reject).chain(&table) {
        if send(sock, m, None).is_err() {
            break;
        }
    }
    err
}

/// The typed error for a `Reject`: a method-table reject reads the server's
/// table with `next` (at most [`MAX_TABLE_MESSAGES`]) and names the
/// methods that differ from ours.
pub fn rejection(
    reject: &Hello,
    ours: &Hello,
    methods: &[MethodInfo],
    mut next: impl FnMut() -> Result<Hello>,
) -> Error {
    let mut err = reject.reject_error(ours);
    if let Error::MethodTableMismatch { methods: diff, .. } = &mut err {
        let count = reject.b.min(MAX_TABLE_MESSAGES);
        let mut theirs: Vec<(String, u32)> = Vec::new();
        for _ in 0..count {
            let Ok(m) = next() else { break };
            if m.kind != Kind::Table {
                break;
            }
            theirs.extend(parse_table(&m.text));
        }
        *diff = diff_tables(methods, &theirs);
    }
    err
}

/// The entries of one table message; malformed ones are skipped.
fn parse_table(text: &str) -> impl Iterator<Item = (String, u32)> + '_ {
    text.split(';').filter_map(|e| {
        let (name, id) = e.split_once('=')?;
        Some((name.to_owned(), u32::from_str_radix(id, 16).ok()?))
    })
}

/// The methods whose ids differ, or that one side lacks, in our order and
/// then the peer's. Empty when either table is unknown.
pub fn diff_tables(ours: &[MethodInfo], theirs: &[(String, u32)]) -> Vec<MethodDiff> {
    if ours.is_empty() || theirs.is_empty() {
        return Vec::new();
    }
    let theirs_of = |name: &str| theirs.iter().find(|(n, _)| n == name).map(|&(_, id)| id);
    let mut out: Vec<MethodDiff> = ours
        .iter()
        .filter_map(|m| {
            let t = theirs_of(m.name);
            (t != Some(m.id)).then(|| MethodDiff {
                name: m.name.to_owned(),
                ours: Some(m.id),
                theirs: t,
            })
        })
        .collect();
    out.extend(
        theirs
            .iter()
            .filter(|(n, _)| !ours.iter().any(|m| m.name == n))
            .map(|(n, id)| MethodDiff {
                name: n.clone(),
                ours: None,
                theirs: Some(*id),
            }),
    );
    out
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
