//! The same calls over a byte stream: TCP (peers on other hosts, and the
//! honest baseline) or a Unix stream socket.
//!
//! The connection opens with the same 256-byte hello as shared memory (no
//! region, no descriptor), so a client built against another trait gets
//! `ServiceMismatch` here too. Then each message is a frame:
//!
//! ```text
//! body_len u32 | call_id u64 | method u32 | status u32 | body (body_len bytes)
//! ```
//!
//! all little-endian. Bodies use [`super::wire`] in stream mode: pointed-to
//! data is copied in. The client writes frames under a lock and one reader
//! thread per connection hands replies to their callers; the server runs on
//! tokio, one task per connection, handlers inline.

use std::future::poll_fn;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::table::{Body, Dead, Table, Waiter, thread_wake};
use super::wheel::{Expire, Wheel};
use super::wire::{Reader, Writer};
use super::{Dispatch, Dispatched, HandlerFuture, ReplyCtx};
use rpal_core::budget_of;
use rpal_core::error::{Error, RemoteStatus, Result};
use rpal_core::handshake::{Hello, Kind, MESSAGE_LEN, RejectCode};
use rpal_core::sys;

/// Frame header: body length, call id, method, status.
const FRAME_HEADER: usize = 20;
/// Largest body accepted from a peer (a hostile length must not make us
/// allocate without bound).
pub const MAX_FRAME: usize = 256 << 20;

fn encode_header(buf: &mut [u8], len: usize, id: u64, method: u32, status: u32) {
    buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[4..12].copy_from_slice(&id.to_le_bytes());
    buf[12..16].copy_from_slice(&method.to_le_bytes());
    buf[16..20].copy_from_slice(&status.to_le_bytes());
}

fn decode_header(h: &[u8; FRAME_HEADER]) -> (usize, u64, u32, u32) {
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    (
        u32_at(0) as usize,
        u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
        u32_at(12),
        u32_at(16),
    )
}

/// The socket under a stream channel.
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Sock::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    fn shutdown(&self) {
        match self {
            Sock::Tcp(s) => sys::shutdown_socket(s.as_fd()),
            Sock::Unix(s) => sys::shutdown_socket(s.as_fd()),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stream connection that carries many calls at once.
pub struct StreamChannel {
    writer: Mutex<Sock>,
    table: Arc<Mutex<Table>>,
    endpoint: String,
}

impl std::fmt::Debug for StreamChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamChannel")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl StreamChannel {
    /// Connects over TCP and checks the service.
    pub fn connect_tcp(addr: impl ToSocketAddrs, service: &str, method_hash: u64) -> Result<Arc<Self>> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolve the TCP address".to_owned(), e))?
            .collect();
        let endpoint = addrs.first().map_or_else(|| "?".into(), |a| a.to_string());
        let s = TcpStream::connect(&addrs[..]).map_err(|e| Error::io(format!("connect to {endpoint}"), e))?;
        s.set_nodelay(true)
            .map_err(|e| Error::io(format!("TCP_NODELAY on {endpoint}"), e))?;
        Self::start(Sock::Tcp(s), endpoint, service, method_hash)
    }

    /// Connects to a stream server's Unix socket and checks the service.
    pub fn connect_unix(path: impl AsRef<Path>, service: &str, method_hash: u64) -> Result<Arc<Self>> {
        let endpoint = path.as_ref().display().to_string();
        let s = UnixStream::connect(path.as_ref()).map_err(|e| Error::io(format!("connect to {endpoint}"), e))?;
        Self::start(Sock::Unix(s), endpoint, service, method_hash)
    }

    fn start(mut sock: Sock, endpoint: String, service: &str, method_hash: u64) -> Result<Arc<Self>> {
        let io = |what: &str, e| Error::io(format!("{what} {endpoint}"), e);
        sock.set_timeouts(Some(Duration::from_secs(5)))
            .map_err(|e| io("configure", e))?;
        let hello = Hello {
            method_hash,
            text: service.to_owned(),
            ..Hello::new(Kind::Hello)
        };
        sock.write_all(&hello.encode())
            .map_err(|e| io("send the hello to", e))?;
        let mut m = [0u8; MESSAGE_LEN];
        sock.read_exact(&mut m).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::HandshakeClosed {
                stage: "waiting for the server's welcome",
            },
            _ => io("read the welcome from", e),
        })?;
        let reply = Hello::decode(&m, &endpoint)?;
        match reply.kind {
            Kind::Reject => return Err(reply.reject_error(&hello)),
            Kind::Welcome => rpal_core::handshake::check_compatible(&reply, &hello)?,
            _ => {
                return Err(Error::NotRpal {
                    endpoint,
                    detail: "it answered a hello with a hello".into(),
                });
            }
        }
        sock.set_timeouts(None).map_err(|e| io("configure", e))?;
        // Over a Unix socket the kernel names the server's process: hold a
        // pidfd on it, so that its death is told apart from a hang-up.
        // (Over TCP the peer may be on another host: a lost connection.)
        let server = match &sock {
            Sock::Unix(u) => rpal_core::handshake::peer_cred(u)
                .ok()
                .and_then(|c| sys::pidfd_open(c.pid).ok().map(|fd| (c.pid, fd))),
            Sock::Tcp(_) => None,
        };
        let reader = sock.try_clone().map_err(|e| io("clone the socket of", e))?;
        let chan = Arc::new(StreamChannel {
            writer: Mutex::new(sock),
            table: Arc::new(Mutex::new(Table::new(1))),
            endpoint: endpoint.clone(),
        });
        let table = Arc::downgrade(&chan.table);
        std::thread::Builder::new()
            .name("rpal-stream-rx".into())
            .spawn(move || read_replies(reader, table, endpoint, server))
            .map_err(|e| Error::io("spawn the reply reader".to_owned(), e))?;
        Ok(chan)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        lock(&self.table).in_flight()
    }

    /// Builds the frame, tracks the call, and sends it.
    fn send(
        &self,
        method: u32,
        waiter: Waiter,
        budget: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
    ) -> Result<u64> {
        let mut frame = vec![0u8; FRAME_HEADER];
        let mut w = Writer::stream(&mut frame);
        write(&mut w)?;
        let len = w.finish().expect("a growable body never overflows");
        if len > MAX_FRAME {
            return Err(Error::TooLarge {
                len,
                capacity: MAX_FRAME,
            });
        }
        // The writer lock is taken before the table's so that ids go out in
        // the order they are given.
        let mut sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let id = {
            let mut t = lock(&self.table);
            t.check()?;
            let id = t.next_id();
            t.insert(id, method, waiter);
            id
        };
        encode_header(&mut frame, len, id, method, rpal_core::budget_bits(budget));
        if let Err(e) = sock.write_all(&frame) {
            let dead = Dead::Lost(format!("{}: {e}", self.endpoint));
            lock(&self.table).kill(dead.clone());
            return Err(dead.error());
        }
        Ok(id)
    }

    /// Calls `method` and blocks until the reply, the deadline, or the
    /// connection's end.
    pub fn call<R>(
        &self,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        let deadline = timeout.map(|d| (Instant::now() + d, d));
        let wake = thread_wake();
        let id = self.send(method, Waiter::Thread(wake), timeout, write)?;
        let wake = wake.word();
        loop {
            if let Some(done) = lock(&self.table).take(id) {
                return done.and_then(|b| read(&mut Reader::stream(b.bytes()), &ReplyCtx::stream()));
            }
            let mut slice = Duration::from_secs(1);
            if let Some((at, after)) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let mut t = lock(&self.table);
                    if let Some(done) = t.take(id) {
                        return done.and_then(|b| read(&mut Reader::stream(b.bytes()), &ReplyCtx::stream()));
                    }
                    t.remove(id);
                    return Err(Error::Timeout(after));
                }
                slice = slice.min(left);
            }
            // Acquire pairs with the Release store of a wake word in `Table`.
            if wake.load(Ordering::Acquire) == 0 {
                sys::futex_wait(wake, 0, Some(slice));
            }
        }
    }

    /// The async form of [`StreamChannel::call`]; dropping the future
    /// forgets the call.
    pub async fn call_async<R>(
        self: &Arc<Self>,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        let id = self.send(method, Waiter::Task(None), timeout, write)?;
        let forget = Forget { table: &self.table, id };
        let armed = Wheel::arm_call(self, timeout, id);
        let done = poll_fn(|cx| {
            let mut t = lock(&self.table);
            match t.take(id) {
                Some(done) => Poll::Ready(done),
                None => {
                    t.set_waker(id, cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        std::mem::forget(forget);
        if let Some(a) = armed {
            Wheel::global().disarm(a);
        }
        done.and_then(|b| read(&mut Reader::stream(b.bytes()), &ReplyCtx::stream()))
    }
}

impl Drop for StreamChannel {
    fn drop(&mut self) {
        // Ends the reader thread (it sees end-of-stream).
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    }
}

impl Expire for StreamChannel {
    fn expire(&self, id: u64, err: Error) {
        lock(&self.table).fail(id, err);
    }
}

struct Forget<'a> {
    table: &'a Mutex<Table>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.table).remove(self.id);
    }
}

/// The reader thread: hands each reply to its call; at the end of the
/// stream, fails every call still in flight.
fn read_replies(
    mut sock: Sock,
    table: Weak<Mutex<Table>>,
    endpoint: String,
    server: Option<(i32, std::os::fd::OwnedFd)>,
) {
    let why = loop {
        let mut h = [0u8; FRAME_HEADER];
        if let Err(e) = sock.read_exact(&mut h) {
            break match e.kind() {
                std::io::ErrorKind::UnexpectedEof => format!("{endpoint} closed the connection"),
                _ => format!("{endpoint}: {e}"),
            };
        }
        let (len, id, _method, status) = decode_header(&h);
        if len > MAX_FRAME {
            break format!("{endpoint} sent a frame of {len} bytes (limit {MAX_FRAME})");
        }
        let mut body = Body::zeroed(len);
        if let Err(e) = sock.read_exact(body.bytes_mut()) {
            break format!("{endpoint}: {e}");
        }
        let Some(t) = table.upgrade() else { return };
        if let Err(e) = lock(&t).complete_with(id, status, || body, 0) {
            break e.to_string();
        }
    };
    // A dying process closes its sockets before its pidfd turns readable:
    // give it a moment to finish dying.
    let died = server.and_then(|(pid, fd)| {
        sys::poll_wait(fd.as_fd(), Duration::from_millis(50))
            .unwrap_or(false)
            .then_some(pid)
    });
    if let Some(t) = table.upgrade() {
        lock(&t).kill(match died {
            Some(pid) => Dead::PeerDied(pid),
            None => Dead::Lost(why),
        });
    }
}

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
    rt: &tokio::runtime::Handle,
) -> Result<StreamServer> {
    let _enter = rt.enter();
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
        out.accepting.push(rt.spawn(async move {
            loop {
                if let Ok((s, peer)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve_conn(s, d.clone(), peer.to_string()));
                }
            }
        }));
    }
    if let Some(path) = unix {
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        out.unix = Some(path.to_path_buf());
        l.set_nonblocking(true)
            .map_err(|e| Error::io("nonblocking".to_owned(), e))?;
        let d = dispatch.clone();
        let name = path.display().to_string();
        let l = tokio::net::UnixListener::from_std(l).map_err(|e| Error::io("register Unix listener".to_owned(), e))?;
        out.accepting.push(rt.spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(serve_conn(s, d.clone(), name.clone()));
                }
            }
        }));
    }
    Ok(out)
}

/// Serves one stream connection: handshake, then frames until it closes.
/// Sync handlers run inline, one frame after another; async handlers run
/// as tasks of their own, so slow ones do not hold up the connection, and
/// their replies go out when ready (the client matches them by call id).
async fn serve_conn<S, D>(mut s: S, d: Arc<D>, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    D: Dispatch,
{
    if let Err(e) = stream_handshake(&mut s, &peer, D::SERVICE, D::METHOD_HASH).await {
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
        let mut h = [0u8; FRAME_HEADER];
        if rd.read_exact(&mut h).await.is_err() {
            return;
        }
        let (len, id, method, flags) = decode_header(&h);
        if len > MAX_FRAME {
            tracing::warn!(%peer, len, "frame over the limit; closing");
            return;
        }
        let mut body = Body::zeroed(len);
        if rd.read_exact(body.bytes_mut()).await.is_err() {
            return;
        }
        reply.clear();
        reply.resize(FRAME_HEADER, 0);
        let r = {
            let mut args = Reader::stream(body.bytes());
            let mut w = Writer::stream(&mut reply);
            catch_unwind(AssertUnwindSafe(|| D::dispatch(&d, method, &mut args, &mut w, 0)))
        };
        let status = match r {
            Ok(Ok(Dispatched::Done)) => 0,
            Ok(Ok(Dispatched::Async(fut))) => {
                later.spawn(answer_later(fut, budget_of(flags), id, method, wr.clone()));
                continue;
            }
            Ok(Err(s)) => s.code(),
            Err(_) => RemoteStatus::HandlerPanicked.code(),
        };
        finish_frame(&mut reply, id, method, status);
        if wr.lock().await.write_all(&reply).await.is_err() {
            return;
        }
    }
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
            match r.write(&mut w, 0) {
                Ok(()) => 0,
                Err(s) => s.code(),
            }
        }
        Ok(Err(s)) => s.code(),
        Err(_) => RemoteStatus::HandlerPanicked.code(),
    };
    finish_frame(&mut frame, id, method, status);
    let _ = wr.lock().await.write_all(&frame).await;
}

/// Fills in a reply frame's header; a failed call carries no body.
fn finish_frame(frame: &mut Vec<u8>, id: u64, method: u32, status: u32) {
    if status != 0 {
        frame.truncate(FRAME_HEADER);
    }
    let n = frame.len() - FRAME_HEADER;
    encode_header(frame, n, id, method, status);
}

/// The server side of the stream hello: same message as shared memory.
async fn stream_handshake<S>(s: &mut S, peer: &str, service: &str, method_hash: u64) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut m = [0u8; MESSAGE_LEN];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut m)).await;
    match read {
        Ok(Ok(_)) => {}
        _ => {
            return Err(Error::HandshakeClosed {
                stage: "waiting for the stream hello",
            });
        }
    }
    let theirs = Hello::decode(&m, peer)?;
    let ours = Hello {
        method_hash,
        text: service.to_owned(),
        ..Hello::new(Kind::Welcome)
    };
    let answer = match rpal_core::handshake::check_compatible(
        &theirs,
        &Hello {
            kind: Kind::Hello,
            ..ours.clone()
        },
    ) {
        Ok(()) => Ok(ours.clone()),
        Err(e @ Error::ServiceMismatch { .. }) => {
            let text = format!("{} (methods {:#x})", service, method_hash);
            Err((Hello::reject(RejectCode::ServiceMismatch, 0, 0, &text), e))
        }
        Err(e) => Err((Hello::reject(RejectCode::Other, 0, 0, &e.to_string()), e)),
    };
    let (msg, res) = match answer {
        Ok(h) => (h, Ok(())),
        Err((h, e)) => (h, Err(e)),
    };
    let _ = s.write_all(&msg.encode()).await;
    res
}
