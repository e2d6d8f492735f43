//! The serving side: listeners on tokio, one task per connection, sync
//! handlers inline and async handlers as tasks of their own.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::table::Body;
use super::super::wire::{Reader, Writer};
use super::super::{Dispatch, Dispatched, HandlerFuture};
use super::StreamLimits;
use super::frame::{FRAME_HEADER, decode_header, finish_frame};
use rpal_core::error::{Error, RemoteStatus, Result};
use rpal_core::handshake::{Hello, Kind, MESSAGE_LEN, MethodInfo, RejectCode};
use rpal_core::{PeerId, Quota, budget_of};

/// A running stream server: TCP and/or Unix-stream listeners on a small
/// tokio runtime. Dropping it stops accepting and closes every connection.
pub struct StreamServer {
    tcp: Option<SocketAddr>,
    unix: Option<PathBuf>,
    /// The accept loops, stopped on drop.
    accepting: Vec<tokio::task::JoinHandle<()>>,
}

impl StreamServer {
    /// The TCP address it listens on (with the real port if 0 was asked).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The Unix socket path it listens on.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        for a in &self.accepting {
            a.abort();
        }
        if let Some(p) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves `dispatch` over TCP at `tcp` and/or a Unix stream socket at
/// `unix`, on the tokio runtime `rt` (which needs IO and time enabled).
/// Dropping the result stops accepting; connections end with the runtime.
pub fn serve_stream<D: Dispatch>(
    dispatch: Arc<D>,
    tcp: Option<SocketAddr>,
    unix: Option<&Path>,
    limits: StreamLimits,
    rt: &tokio::runtime::Handle,
) -> Result<StreamServer> {
    let _enter = rt.enter();
    // Connections at once, over both listeners.
    let live = Arc::new(AtomicUsize::new(0));
    let mut out = StreamServer {
        tcp: None,
        unix: None,
        accepting: Vec::new(),
    };
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("bind TCP {addr}"), e))?;
        out.tcp = Some(l.local_addr().map_err(|e| Error::io("local address".to_owned(), e))?);
        l.set_nonblocking(true)
            .map_err(|e| Error::io("nonblocking".to_owned(), e))?;
        let d = dispatch.clone();
        let l = tokio::net::TcpListener::from_std(l).map_err(|e| Error::io("register TCP listener".to_owned(), e))?;
        let live = live.clone();
        out.accepting.push(rt.spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        backoff.reset();
                        let _ = s.set_nodelay(true);
                        tokio::spawn(serve_conn(s, d.clone(), peer.to_string(), limits, live.clone()));
                    }
                    Err(e) => backoff.wait(&e).await,
                }
            }
        }));
    }
    if let Some(path) = unix {
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        // Only our uid may connect, as to the shared-memory socket (the
        // umask alone would leave it to chance).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
        out.unix = Some(path.to_path_buf());
        l.set_nonblocking(true)
            .map_err(|e| Error::io("nonblocking".to_owned(), e))?;
        let d = dispatch.clone();
        let name = path.display().to_string();
        let l = tokio::net::UnixListener::from_std(l).map_err(|e| Error::io("register Unix listener".to_owned(), e))?;
        out.accepting.push(rt.spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        backoff.reset();
                        tokio::spawn(serve_conn(s, d.clone(), name.clone(), limits, live.clone()));
                    }
                    Err(e) => backoff.wait(&e).await,
                }
            }
        }));
    }
    Ok(out)
}

/// Accept errors (EMFILE, ENFILE, ENOBUFS) back off from 1 ms to 1 s, so a
/// host out of descriptors does not spin the accept loop.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(1))
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.0 = Duration::from_millis(1);
    }

    async fn wait(&mut self, e: &std::io::Error) {
        if self.0 == Duration::from_millis(1) {
            tracing::error!(%e, "stream accept failed; backing off");
        }
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
}

/// A connection's place in [`StreamLimits::connections`].
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one stream connection: handshake, then frames until it closes
/// (or breaks a limit). Sync handlers run inline, one frame after another;
/// async handlers run as tasks of their own, so slow ones do not hold up
/// the connection, and their replies go out when ready (the client matches
/// them by call id).
async fn serve_conn<S, D>(mut s: S, d: Arc<D>, peer: String, limits: StreamLimits, live: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    D: Dispatch,
{
    let _live = Live(live.clone());
    let full = live.fetch_add(1, Ordering::Relaxed) >= limits.connections;
    let refuse = full.then(|| Quota::StreamConnections.exceeded(limits.connections as u64));
    let hello = stream_handshake(
        &mut s,
        &peer,
        (D::SERVICE, D::METHOD_HASH, D::METHODS),
        limits.handshake,
        refuse,
    );
    if let Err(e) = hello.await {
        tracing::debug!(%peer, %e, "stream handshake failed");
        return;
    }
    let (mut rd, wr) = tokio::io::split(s);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    // Async calls in flight; dropped (aborted) when the connection ends.
    let mut later = tokio::task::JoinSet::new();
    let mut reply = Vec::with_capacity(4096);
    loop {
        while later.try_join_next().is_some() {}
        let (id, method, flags, body) = match read_frame(&mut rd, &limits).await {
            Ok(f) => f,
            Err(FrameError::TooLarge { id, method, len }) => {
                // Its body cannot be skipped cheaply: answer, then close.
                tracing::warn!(%peer, len, limit = limits.max_frame, "frame over the limit; closing");
                let over = RemoteStatus::QuotaExceeded(Quota::FrameBytes);
                let _ = write_status(&wr, id, method, over, limits.io).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, ?e, "stream connection ends");
                return;
            }
        };
        if later.len() >= limits.calls_in_flight {
            // Answered without running it (sync handlers included: the
            // count is of work this connection already has under way).
            let over = RemoteStatus::QuotaExceeded(Quota::StreamCalls);
            if write_status(&wr, id, method, over, limits.io).await.is_err() {
                return;
            }
            continue;
        }
        reply.clear();
        reply.resize(FRAME_HEADER, 0);
        let r = {
            let mut args = Reader::stream(body.bytes());
            let mut w = Writer::stream(&mut reply);
            catch_unwind(AssertUnwindSafe(|| {
                D::dispatch(&d, method, &mut args, &mut w, PeerId::default())
            }))
        };
        // Taken whatever happened, so no message outlives its call on this thread.
        let message = rpal_core::error::take_failure_message();
        let status = match r {
            Ok(Ok(Dispatched::Done)) => 0,
            Ok(Ok(Dispatched::Async(fut))) => {
                later.spawn(answer_later(fut, budget_of(flags), id, method, wr.clone(), limits.io));
                continue;
            }
            Ok(Err(s)) => error_body(&mut reply, s, message),
            Err(p) => error_body(
                &mut reply,
                RemoteStatus::HandlerPanicked,
                Some(rpal_core::error::panic_message(&*p)),
            ),
        };
        finish_frame(&mut reply, id, method, status);
        if write_within(&wr, &reply, limits.io).await.is_err() {
            return;
        }
    }
}

/// Why no frame was read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The stream ended or failed.
    Closed,
    /// No frame began within the idle limit.
    Idle,
    /// A body did not arrive within the I/O limit.
    Slow,
    /// A header announced a body over the frame limit.
    TooLarge { id: u64, method: u32, len: usize },
}

/// The stream frame decoder: the next frame's call id, method, flags and
/// body, within the idle limit for its header and the I/O limit for the
/// rest, its memory growing as its bytes arrive.
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limits: &StreamLimits,
) -> std::result::Result<(u64, u32, u32, Body), FrameError> {
    let mut h = [0u8; FRAME_HEADER];
    match tokio::time::timeout(limits.idle, rd.read_exact(&mut h)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(FrameError::Closed),
        Err(_) => return Err(FrameError::Idle),
    }
    let (len, id, method, flags) = decode_header(&h);
    if len > limits.max_frame {
        return Err(FrameError::TooLarge { id, method, len });
    }
    match tokio::time::timeout(limits.io, read_body(rd, len)).await {
        Ok(Ok(b)) => Ok((id, method, flags, b)),
        Ok(Err(_)) => Err(FrameError::Closed),
        Err(_) => Err(FrameError::Slow),
    }
}

/// Reads a body of `len` bytes, its memory growing as they arrive.
async fn read_body<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Body> {
    let mut body = Body::growing(len);
    while !body.done() {
        match rd.read(body.spare()).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => body.filled(n),
        }
    }
    Ok(body.finish())
}

/// Writes `frame` unless the peer stops reading for `limit` (then the
/// connection is given up: a partial frame cannot be taken back).
async fn write_within<W: tokio::io::AsyncWrite + Unpin>(
    wr: &tokio::sync::Mutex<W>,
    frame: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, async { wr.lock().await.write_all(frame).await }).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Makes `frame` an error reply: its body is `message` (cut), if any.
/// Returns the status code.
fn error_body(frame: &mut Vec<u8>, status: RemoteStatus, message: Option<String>) -> u32 {
    frame.truncate(FRAME_HEADER);
    if let Some(m) = message {
        let mut buf = [0u8; rpal_core::error::MAX_ERROR_MESSAGE];
        let n = rpal_core::error::put_message(&mut buf, &m);
        frame.extend_from_slice(&buf[..n]);
    }
    status.code()
}

/// Answers call `id` with `status` and no body.
async fn write_status<W: tokio::io::AsyncWrite + Unpin>(
    wr: &tokio::sync::Mutex<W>,
    id: u64,
    method: u32,
    status: RemoteStatus,
    limit: Duration,
) -> std::io::Result<()> {
    let mut frame = vec![0u8; FRAME_HEADER];
    finish_frame(&mut frame, id, method, status.code());
    write_within(wr, &frame, limit).await
}

/// Aborts a task when dropped (its connection ended or its deadline passed).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one async handler and writes its reply frame. The handler runs as
/// a task of its own, so its panic comes back as a `JoinError` here; past
/// the caller's `budget` it is aborted and the call fails with
/// `DeadlineExceeded` (tokio's timer wheel holds the deadline).
async fn answer_later<W>(
    fut: HandlerFuture,
    budget: Option<Duration>,
    id: u64,
    method: u32,
    wr: Arc<tokio::sync::Mutex<W>>,
    io: Duration,
) where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut task = AbortOnDrop(tokio::spawn(fut));
    let joined = match budget {
        None => (&mut task.0).await,
        Some(b) => match tokio::time::timeout(b, &mut task.0).await {
            Ok(j) => j,
            Err(_) => Ok(Err(RemoteStatus::DeadlineExceeded)),
        },
    };
    drop(task);
    let mut frame = vec![0u8; FRAME_HEADER];
    let status = match joined {
        Ok(Ok(r)) => {
            let mut w = Writer::stream(&mut frame);
            let written = r.write(&mut w, PeerId::default());
            let message = rpal_core::error::take_failure_message();
            match written {
                Ok(()) => 0,
                Err(s) => error_body(&mut frame, s, message),
            }
        }
        Ok(Err(s)) => error_body(&mut frame, s, None),
        Err(e) => {
            let message = e.try_into_panic().ok().map(|p| rpal_core::error::panic_message(&*p));
            error_body(&mut frame, RemoteStatus::HandlerPanicked, message)
        }
    };
    finish_frame(&mut frame, id, method, status);
    let _ = write_within(&wr, &frame, io).await;
}

/// The server side of the stream hello: same message as shared memory.
/// `refuse` (a quota the connection is over) is sent instead of a welcome.
async fn stream_handshake<S>(
    s: &mut S,
    peer: &str,
    (service, method_hash, methods): (&str, u64, &[MethodInfo]),
    deadline: Duration,
    refuse: Option<Error>,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut m = [0u8; MESSAGE_LEN];
    let read = tokio::time::timeout(deadline, s.read_exact(&mut m)).await;
    match read {
        Ok(Ok(_)) => {}
        _ => {
            return Err(Error::HandshakeClosed {
                stage: "waiting for the stream hello",
            });
        }
    }
    // Refused after its hello is read: closing with unread bytes would
    // reset a TCP connection, and the peer would lose the reason.
    if let Some(e) = refuse {
        let msg = match &e {
            Error::QuotaExceeded { quota, limit } => {
                Hello::reject(RejectCode::QuotaExceeded, quota.code() as u64, *limit, "")
            }
            other => Hello::reject(RejectCode::Other, 0, 0, &other.to_string()),
        };
        // Best effort within the deadline; the peer is refused either way.
        let _ = tokio::time::timeout(deadline, s.write_all(&msg.encode())).await;
        return Err(e);
    }
    let theirs = Hello::decode(&m, peer)?;
    let ours = Hello {
        method_hash,
        text: service.to_owned(),
        ..Hello::new(Kind::Welcome)
    };
    let check = rpal_core::handshake::check_compatible(
        &theirs,
        &Hello {
            kind: Kind::Hello,
            ..ours.clone()
        },
    );
    // The answer, and for a method-table mismatch our table after it.
    let (msgs, res) = match check {
        Ok(()) => (vec![ours], Ok(())),
        Err(e @ Error::ServiceMismatch { .. }) => {
            (vec![Hello::reject(RejectCode::ServiceMismatch, 0, 0, service)], Err(e))
        }
        Err(e @ Error::MethodTableMismatch { .. }) => {
            let (reject, table) = rpal_core::handshake::table_reject(&ours, methods);
            (std::iter::once(reject).chain(table).collect(), Err(e))
        }
        Err(e @ Error::VersionMismatch { .. }) => (
            vec![Hello::reject(RejectCode::VersionMismatch, ours.version as u64, 0, "")],
            Err(e),
        ),
        Err(e @ Error::LayoutMismatch { .. }) => (
            vec![Hello::reject(RejectCode::LayoutMismatch, ours.layout_hash, 0, "")],
            Err(e),
        ),
        Err(e) => (vec![Hello::reject(RejectCode::Other, 0, 0, &e.to_string())], Err(e)),
    };
    let bytes: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
    let _ = tokio::time::timeout(deadline, s.write_all(&bytes)).await;
    res
}
