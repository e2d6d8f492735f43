//! rpal's error type. Each message says what happened and what to do next.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::quota::Quota;

/// Result alias for rpal-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a remote call failed on the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteStatus {
    /// The server has no handler for this method id.
    UnknownMethod,
    /// The handler rejected the request's bytes or pointers.
    BadRequest,
    /// The handler panicked; the server kept running.
    HandlerPanicked,
    /// The handler claimed a reply longer than the reply buffer.
    BadReply,
    /// The caller's deadline passed while the server still worked on the
    /// call; the server stopped that work.
    DeadlineExceeded,
    /// The call would have taken the caller past one of its quotas on the
    /// server (deferred calls in flight, lent memory); it was not run, or
    /// its result was dropped.
    QuotaExceeded(Quota),
    /// A status code this version does not know.
    Other(u32),
}

/// Status codes `QUOTA_BASE + quota code` name the quota a call hit.
const QUOTA_BASE: u32 = 0x100;

impl RemoteStatus {
    /// The status as it travels in a reply's header.
    pub fn code(self) -> u32 {
        match self {
            Self::UnknownMethod => 1,
            Self::BadRequest => 2,
            Self::HandlerPanicked => 3,
            Self::BadReply => 4,
            Self::DeadlineExceeded => 5,
            Self::QuotaExceeded(q) => QUOTA_BASE + q.code(),
            Self::Other(c) => c,
        }
    }

    /// The status a reply's header carries.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::UnknownMethod,
            2 => Self::BadRequest,
            3 => Self::HandlerPanicked,
            4 => Self::BadReply,
            5 => Self::DeadlineExceeded,
            c => match c.checked_sub(QUOTA_BASE).and_then(Quota::from_code) {
                Some(q) => Self::QuotaExceeded(q),
                None => Self::Other(c),
            },
        }
    }
}

/// Everything that can go wrong in rpal-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket's other end does not speak rpal.
    #[error("{endpoint} is not an rpal endpoint ({detail}); check the socket path")]
    NotRpal {
        /// Socket path or peer description.
        endpoint: String,
        /// What was seen instead.
        detail: String,
    },
    /// The peer closed the socket before the handshake finished.
    #[error("peer closed the connection during the handshake ({stage}); it may have crashed or rejected us")]
    HandshakeClosed {
        /// Which step was under way.
        stage: &'static str,
    },
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}; upgrade the older side")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The two sides were built with different shared-memory layouts.
    #[error(
        "layout mismatch: our layout hash is {ours:#018x}, the peer's is {theirs:#018x}; rebuild both with the same rpal"
    )]
    LayoutMismatch {
        /// Our layout hash.
        ours: u64,
        /// The peer's layout hash.
        theirs: u64,
    },
    /// The peer serves (or asks for) another service.
    #[error("service mismatch: we expect `{ours}`, the peer offers `{theirs}`; check the socket path")]
    ServiceMismatch {
        /// The service we expect.
        ours: String,
        /// The service the peer announced.
        theirs: String,
    },
    /// The peer serves the same service, built from another version of its
    /// trait or of its argument and result types.
    #[error(
        "method table mismatch for `{service}`: ours is {ours:#018x}, the peer's is {theirs:#018x}{}; rebuild both sides from the same service trait and types",
        crate::error::list_diffs(.methods)
    )]
    MethodTableMismatch {
        /// The service.
        service: String,
        /// Our method hash.
        ours: u64,
        /// The peer's method hash.
        theirs: u64,
        /// The methods that differ (empty if the peer did not send its table).
        methods: Vec<crate::handshake::MethodDiff>,
    },
    /// The peer reserves another address window: the two cannot map each
    /// other's regions at the same addresses.
    #[error(
        "window mismatch: ours is {:#x}+{:#x}, the peer's is {:#x}+{:#x}; give both the same RPAL_WINDOW_BASE and RPAL_WINDOW_SLOTS",
        .ours.0, .ours.1, .theirs.0, .theirs.1
    )]
    WindowMismatch {
        /// Our window (base, length).
        ours: (u64, u64),
        /// The peer's window (base, length).
        theirs: (u64, u64),
    },
    /// The peer uses another slot registry file, so the two cannot agree on
    /// who owns which slot.
    #[error(
        "the peer uses another slot registry{}{}; give both the same RPAL_REGISTRY",
        if .ours.is_empty() { String::new() } else { format!(" than ours ({})", .ours) },
        if .theirs.is_empty() { String::new() } else { format!(" ({})", .theirs) }
    )]
    OtherRegistry {
        /// Our registry path (empty if unknown).
        ours: String,
        /// The peer's registry path (empty if it did not say).
        theirs: String,
    },
    /// The peer's credentials are refused by the policy.
    #[error(
        "permission denied: pid {pid} (uid {uid}, gid {gid}) is not allowed by the server's peer policy (ServerOptions::policy)"
    )]
    PermissionDenied {
        /// The refused uid.
        uid: u32,
        /// The refused process's primary gid.
        gid: u32,
        /// The refused process.
        pid: i32,
    },
    /// The peer rejected our handshake for a reason it explained.
    #[error("the peer rejected the handshake: {reason}")]
    Rejected {
        /// The peer's explanation.
        reason: String,
    },
    /// A descriptor received from the peer is unusable.
    #[error("invalid descriptor from the peer: {reason}")]
    InvalidDescriptor {
        /// What is wrong with it.
        reason: String,
    },
    /// A region announced by the peer cannot be mapped.
    #[error("invalid region {addr:#x}+{len:#x}: {reason}")]
    InvalidRegion {
        /// Announced address.
        addr: u64,
        /// Announced length.
        len: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A region would overlap one already mapped here.
    #[error("address in use: {addr:#x}+{len:#x} overlaps the region at {other:#x} already mapped here")]
    AddressInUse {
        /// Requested address.
        addr: u64,
        /// Requested length.
        len: u64,
        /// Start of the region in the way.
        other: u64,
    },
    /// The address window cannot be reserved in this process.
    #[error("cannot reserve the rpal window {base:#x}+{len:#x}: {source}; set RPAL_WINDOW_BASE to a free range")]
    WindowUnavailable {
        /// Window start.
        base: u64,
        /// Window length.
        len: u64,
        /// The mmap failure.
        #[source]
        source: io::Error,
    },
    /// Every slot of the host-wide registry is taken by a live process.
    #[error("no free slot among {slots} in {}: held by pids {holders:?}; end idle rpal processes (or one that hoards slots) or enlarge the window", registry.display())]
    NoFreeSlot {
        /// Slot count.
        slots: usize,
        /// Registry file.
        registry: PathBuf,
        /// The processes holding them.
        holders: Vec<i32>,
    },
    /// The registry file exists with another geometry.
    #[error("registry {} has another geometry ({detail}); every process on the host must use the same window settings", path.display())]
    RegistryMismatch {
        /// Registry file.
        path: PathBuf,
        /// Which field differs.
        detail: String,
    },
    /// An arena has no room left.
    #[error("region full: asked for {requested} bytes, {available} of {capacity} left; raise RPAL_ARENA_SIZE")]
    RegionFull {
        /// Bytes asked for.
        requested: usize,
        /// Bytes still free.
        available: usize,
        /// Arena capacity.
        capacity: usize,
    },
    /// A pointer or length received from a peer does not lie inside its region.
    #[error("invalid pointer from the peer: {addr:#x}+{len:#x} {reason}")]
    InvalidPointer {
        /// The pointer.
        addr: u64,
        /// The length in bytes.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A peer released a block that is not lent to it.
    #[error("refused release of {addr:#x} by pid {pid}: {reason}")]
    InvalidRelease {
        /// The released address.
        addr: u64,
        /// The releasing peer.
        pid: i32,
        /// Why it was refused.
        reason: String,
    },
    /// A walk over nested peer pointers went past its limits (a cycle or an
    /// oversized structure).
    #[error("walk over peer data stopped after {visits} blocks at depth {depth}: {reason}")]
    WalkLimit {
        /// Blocks visited.
        visits: usize,
        /// Nesting depth reached.
        depth: usize,
        /// Which limit was hit.
        reason: &'static str,
    },
    /// A string received from a peer is not UTF-8.
    #[error("invalid UTF-8 in a peer string at {addr:#x}")]
    InvalidUtf8 {
        /// Start of the string.
        addr: u64,
    },
    /// The peer broke the call protocol (bad record length, bad sequence...).
    #[error("protocol violation by peer pid {pid}: {detail}; the connection is closed")]
    Protocol {
        /// The offending peer.
        pid: i32,
        /// What it did.
        detail: String,
    },
    /// The peer process exited.
    #[error("peer process {pid} died; reconnect once it is restarted")]
    PeerDied {
        /// The dead peer.
        pid: i32,
    },
    /// The peer closed the connection.
    #[error("peer process {pid} closed the connection")]
    Closed {
        /// The peer.
        pid: i32,
    },
    /// A wait passed its deadline.
    #[error("timed out after {0:?}; the peer may be overloaded or hung")]
    Timeout(Duration),
    /// The server answered the call with an error status.
    #[error("method {method:#x} failed on the server: {status:?}")]
    Remote {
        /// Method id of the call.
        method: u32,
        /// What the server reported.
        status: RemoteStatus,
    },
    /// A stream connection (TCP, Unix stream) broke or was closed while
    /// calls were in flight; the peer may have died or hung up.
    #[error("connection lost: {detail}")]
    ConnectionLost {
        /// What the transport reported.
        detail: String,
    },
    /// A peer went over one of its quotas; the call or connection was
    /// refused, and other peers were not touched.
    #[error("quota exceeded: {quota} (limit {limit}); raise {}", quota.setting())]
    QuotaExceeded {
        /// Which quota.
        quota: Quota,
        /// Its limit.
        limit: u64,
    },
    /// A message does not fit in the inline record.
    #[error("message of {len} bytes exceeds the inline capacity of {capacity}; pass large data by pointer")]
    TooLarge {
        /// Message length.
        len: usize,
        /// Inline capacity.
        capacity: usize,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing, naming the path or peer.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// `: a, b` for the methods of a table mismatch, or nothing.
pub(crate) fn list_diffs(methods: &[crate::handshake::MethodDiff]) -> String {
    if methods.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = methods.iter().map(ToString::to_string).collect();
    format!("; methods that differ: {}", shown.join(", "))
}

impl Error {
    /// Wraps an OS error with a description of the operation.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Self::Io { op: op.into(), source }
    }
}
