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
    /// The handler returned an error with this code (see
    /// [`ServiceError::code`]); its message is in [`Error::Remote`].
    Failed(u32),
    /// A status code this version does not know.
    Other(u32),
}

impl std::fmt::Display for RemoteStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownMethod => f.write_str("the server has no such method"),
            Self::BadRequest => f.write_str("the server could not read the arguments"),
            Self::HandlerPanicked => f.write_str("the handler panicked"),
            Self::BadReply => f.write_str("the handler's reply could not be sent"),
            Self::DeadlineExceeded => f.write_str("the call's deadline passed on the server"),
            Self::QuotaExceeded(q) => write!(f, "over the server's quota of {q}"),
            Self::Failed(code) => write!(f, "the handler returned error {code}"),
            Self::Other(c) => write!(f, "status {c:#x}"),
        }
    }
}

/// An error a handler may return to its caller: its `Display` text and
/// [`ServiceError::code`] cross the boundary, and the caller gets them in
/// [`Error::Remote`] (with [`RemoteStatus::Failed`]).
pub trait ServiceError: std::fmt::Display {
    /// The code the caller sees, below 2^30 (higher bits are dropped).
    /// The default is 1.
    fn code(&self) -> u32 {
        1
    }
}

/// rpal's own errors in a handler (an arena that is full, say) reach the
/// caller with code 0 and their message.
impl ServiceError for Error {
    fn code(&self) -> u32 {
        0
    }
}

/// The longest message an error reply carries; longer ones are cut.
pub const MAX_ERROR_MESSAGE: usize = 1024;

thread_local! {
    /// The message of the error reply the serving thread is about to write:
    /// set by the handler's side just before it returns an error status, on
    /// the thread that writes the reply, and taken by that write.
    static FAILURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records `msg` for the error reply this thread writes next.
pub fn set_failure_message(msg: String) {
    FAILURE.with(|f| *f.borrow_mut() = Some(msg));
}

/// Takes the message recorded by [`set_failure_message`], if any.
pub fn take_failure_message() -> Option<String> {
    FAILURE.with(|f| f.borrow_mut().take())
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Copies `msg` into `buf` (cut at [`MAX_ERROR_MESSAGE`], the buffer's
/// length, and a character boundary) and returns how many bytes it took.
pub fn put_message(buf: &mut [u8], msg: &str) -> usize {
    let mut n = msg.len().min(MAX_ERROR_MESSAGE).min(buf.len());
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    buf[..n].copy_from_slice(&msg.as_bytes()[..n]);
    n
}

/// Handler error codes travel as `HANDLER_BASE | code`.
const HANDLER_BASE: u32 = 0x4000_0000;
const HANDLER_MASK: u32 = 0x3fff_ffff;

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
            Self::Failed(c) => HANDLER_BASE | (c & HANDLER_MASK),
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
            c if c & !HANDLER_MASK == HANDLER_BASE => Self::Failed(c & HANDLER_MASK),
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
        "the peer uses another slot registry ({}{}); give both the same RPAL_REGISTRY",
        if .ours.is_empty() { "ours is another file".to_owned() } else { format!("ours is {}", .ours) },
        if .theirs.is_empty() { String::new() } else { format!(", the peer's is {}", .theirs) }
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
    /// An `RPAL_*` environment variable has a value that is not accepted.
    #[error("{name}={value:?} is not accepted: expected {accepted}")]
    BadSetting {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What it accepts.
        accepted: String,
    },
    /// An arena has no room left.
    #[error(
        "region full: asked for {requested} bytes, {available} of {capacity} left; {}",
        crate::error::region_full_advice(*.requested as u64)
    )]
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
    /// The server answered the call with an error status: the handler
    /// returned an error ([`RemoteStatus::Failed`]), panicked, or the call
    /// could not run.
    #[error(
        "{} failed on the server: {status}{}",
        if .name.is_empty() { format!("method {method:#x}") } else { format!("`{name}`") },
        if .message.is_empty() { String::new() } else { format!(": {message}") }
    )]
    Remote {
        /// Method id of the call.
        method: u32,
        /// The method's name (empty when called by id, through the raw API).
        name: String,
        /// What the server reported.
        status: RemoteStatus,
        /// The handler's error message, or the panic's; may be empty.
        message: String,
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

/// What to do about a full arena: more room, or smaller pieces when no
/// arena can hold the request (an arena is at most one slot).
pub(crate) fn region_full_advice(requested: u64) -> String {
    let max = crate::space::Space::existing().map_or(crate::space::DEFAULT_SLOT_SIZE, |s| s.config().slot_size);
    if requested >= max {
        format!(
            "no arena can hold it (an arena is at most {}, one slot): pass it in pieces",
            crate::settings::show_size(max)
        )
    } else {
        format!(
            "raise RPAL_ARENA_SIZE (at most {}), or free what you hold",
            crate::settings::show_size(max)
        )
    }
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
    /// The error for a reply with status `code` to `method`, whose body is
    /// the server's message (cut and made UTF-8, lossily: a peer wrote it).
    pub fn remote(method: u32, code: u32, body: &[u8]) -> Self {
        // Copied first: the body may lie in the peer's memory, which it can
        // change while we decode (a String must stay valid UTF-8).
        let body = body[..body.len().min(MAX_ERROR_MESSAGE)].to_vec();
        Self::Remote {
            method,
            name: String::new(),
            status: RemoteStatus::from_code(code),
            message: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// This error, naming `method` if it is a [`Error::Remote`] without a name.
    pub fn in_method(self, method: &str) -> Self {
        match self {
            Self::Remote {
                method: id,
                name,
                status,
                message,
            } if name.is_empty() => Self::Remote {
                method: id,
                name: method.to_owned(),
                status,
                message,
            },
            e => e,
        }
    }

    /// The code and message of an error the handler returned, if this is one.
    pub fn handler_error(&self) -> Option<(u32, &str)> {
        match self {
            Self::Remote {
                status: RemoteStatus::Failed(code),
                message,
                ..
            } => Some((*code, message)),
            _ => None,
        }
    }

    /// Wraps an OS error with a description of the operation.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Self::Io { op: op.into(), source }
    }
}
