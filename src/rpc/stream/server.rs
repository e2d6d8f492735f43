//! The serving side: listeners on tokio, one task per connection, sync
//! handlers inline and async handlers as tasks of their own.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::table::Body;
use super::super::wire::{Reader, Writer};
use super::super::{Dispatch, Dispatched, HandlerFuture};
use super::frame::{FRAME_HEADER, MAX_FRAME, decode_header, finish_frame};
use rpal_core::budget_of;
use rpal_core::error::{Error, RemoteStatus, Result};
use rpal_core::handshake::{Hello, Kind, MESSAGE_LEN, RejectCode};

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
