//! The calling side: a stream connection that carries many calls at once,
//! written under a lock, with one reader thread handing replies out.

use std::future::poll_fn;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use super::super::ReplyCtx;
use super::super::table::{Body, Dead, Table, Waiter, thread_wake};
use super::super::wheel::{Expire, Wheel};
use super::super::wire::{Reader, Writer};
use super::frame::{FRAME_HEADER, MAX_FRAME, decode_header, encode_header};
use rpal_core::error::{Error, Result};
use rpal_core::handshake::{Hello, Kind, MESSAGE_LEN};
use rpal_core::sys;

/// Longest a frame's write may wait for the server to read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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

    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
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

/// What a stream client announces: the service's name, method hash and
/// method table.
pub type ServiceTable = (&'static str, u64, &'static [rpal_core::handshake::MethodInfo]);

impl StreamChannel {
    /// Connects over TCP and checks the service.
    pub fn connect_tcp(addr: impl ToSocketAddrs, service: ServiceTable) -> Result<Arc<Self>> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolve the TCP address".to_owned(), e))?
            .collect();
        let endpoint = addrs.first().map_or_else(|| "?".into(), |a| a.to_string());
        let s = TcpStream::connect(&addrs[..]).map_err(|e| Error::io(format!("connect to {endpoint}"), e))?;
        s.set_nodelay(true)
            .map_err(|e| Error::io(format!("TCP_NODELAY on {endpoint}"), e))?;
        Self::start(Sock::Tcp(s), endpoint, service)
    }

    /// Connects to a stream server's Unix socket and checks the service.
    pub fn connect_unix(path: impl AsRef<Path>, service: ServiceTable) -> Result<Arc<Self>> {
        let endpoint = path.as_ref().display().to_string();
        let s = UnixStream::connect(path.as_ref()).map_err(|e| Error::io(format!("connect to {endpoint}"), e))?;
        Self::start(Sock::Unix(s), endpoint, service)
    }

    fn start(mut sock: Sock, endpoint: String, (service, method_hash, methods): ServiceTable) -> Result<Arc<Self>> {
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
        let mut next = |stage: &'static str| {
            let mut m = [0u8; MESSAGE_LEN];
            sock.read_exact(&mut m).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::HandshakeClosed { stage },
                _ => io("read the handshake from", e),
            })?;
            Hello::decode(&m, &endpoint)
        };
        let reply = next("waiting for the server's welcome")?;
        match reply.kind {
            Kind::Reject => {
                let table = || next("reading the server's method table");
                return Err(rpal_core::handshake::rejection(&reply, &hello, methods, table));
            }
            Kind::Welcome => rpal_core::handshake::check_compatible(&reply, &hello)?,
            _ => {
                return Err(Error::NotRpal {
                    endpoint,
                    detail: "it answered a hello with a hello".into(),
                });
            }
        }
        // Reads wait as long as calls are in flight (each call has its own
        // deadline); a write waits at most WRITE_TIMEOUT, so a server that
        // stops reading cannot hold a caller (and the writer lock) for ever.
        sock.set_timeouts(None).map_err(|e| io("configure", e))?;
        sock.set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| io("configure", e))?;
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
                    let _ = t.remove(id); // streams copy: nothing is lent
                    return Err(Error::Timeout(after));
                }
                slice = slice.min(left);
            }
            // The call table's hand-off (`rpal_core::doorbell::bell_rang`).
            if !rpal_core::doorbell::bell_rang(wake) {
                // With no backend at all (out of descriptors), a short
                // plain sleep: the loop looks again and the deadline holds.
                if rpal_core::wait::sleep(&[(wake, 0)], &[], slice).is_err() {
                    std::thread::sleep(slice.min(Duration::from_millis(1)));
                }
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
        let _ = lock(self.table).remove(self.id); // streams copy: nothing is lent
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
        // Memory as the bytes arrive: a hostile server's header costs nothing.
        let mut growing = Body::growing(len);
        let mut failed = None;
        while !growing.done() {
            match sock.read(growing.spare()) {
                Ok(0) => failed = Some(format!("{endpoint} closed the connection mid-frame")),
                Ok(n) => growing.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => failed = Some(format!("{endpoint}: {e}")),
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(why) = failed {
            break why;
        }
        let body = growing.finish();
        let Some(t) = table.upgrade() else { return };
        if let Err(e) = lock(&t).complete_with(id, status, || body, rpal_core::LentTable::default(), 0) {
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
