//! Waiting for a server that is starting, and clients that connect again
//! after their server died.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rpal_core::error::{Error, Result};

use super::Channel;

/// Whether `e` says that no server is there yet (or any more): no socket
/// file, nobody listening, or a server that went away mid-handshake.
pub fn not_up_yet(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
        ),
        Error::HandshakeClosed { .. } => true,
        _ => false,
    }
}

/// Calls `connect` until it succeeds, fails for a reason other than
/// [`not_up_yet`], or `wait` has passed (then its last error is returned).
/// Sleeps between tries grow from 1 ms to 50 ms.
pub fn wait_for<T>(wait: Duration, mut connect: impl FnMut() -> Result<T>) -> Result<T> {
    // No deadline for a wait too long to add (`Duration::MAX`: for ever).
    let deadline = Instant::now().checked_add(wait);
    let mut pause = Duration::from_millis(1);
    loop {
        match connect() {
            Err(e) if not_up_yet(&e) && deadline.is_none_or(|d| Instant::now() + pause <= d) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// How a reconnecting channel makes a connection.
type Connect = dyn Fn() -> Result<Channel> + Send + Sync;

/// A channel that connects again after its peer died or hung up. The calls
/// in flight when the connection broke fail (with `PeerDied`,
/// `ConnectionLost` or `Closed`: they may or may not have run); the next
/// call makes a new connection, waiting up to `wait` for a server.
pub struct Reconnecting {
    connect: Box<Connect>,
    wait: Duration,
    current: Mutex<Option<Channel>>,
    reconnects: AtomicU64,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting")
            .field("wait", &self.wait)
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Option<Channel>>) -> MutexGuard<'_, Option<Channel>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reconnecting {
    /// Connects with `connect` (waiting up to `wait` for a server), and
    /// again the same way whenever the connection breaks.
    pub fn new(wait: Duration, connect: impl Fn() -> Result<Channel> + Send + Sync + 'static) -> Result<Arc<Self>> {
        let first = wait_for(wait, &connect)?;
        Ok(Arc::new(Self {
            connect: Box::new(connect),
            wait,
            current: Mutex::new(Some(first)),
            reconnects: AtomicU64::new(0),
        }))
    }

    /// How many times the connection was made again.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The live connection, made now if the last one broke. Callers that
    /// arrive during a reconnect wait for it (it is one connection for all).
    pub(crate) fn channel(&self) -> Result<Channel> {
        let mut cur = lock(&self.current);
        if let Some(c) = &*cur {
            return Ok(c.clone());
        }
        let c = wait_for(self.wait, &self.connect)?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        *cur = Some(c.clone());
        Ok(c)
    }

    /// As [`Reconnecting::channel`], without blocking an async task's
    /// thread: a reconnect runs on a thread of its own.
    pub(crate) async fn channel_async(self: &Arc<Self>) -> Result<Channel> {
        if let Some(c) = &*lock(&self.current) {
            return Ok(c.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        std::thread::Builder::new()
            .name("rpal-reconnect".into())
            .spawn(move || {
                let _ = tx.send(this.channel());
            })
            .map_err(|e| Error::io("start a reconnect thread", e))?;
        rx.await.unwrap_or_else(|_| {
            Err(Error::ConnectionLost {
                detail: "the reconnect thread ended without an answer".into(),
            })
        })
    }

    /// Called with a call's result on `used`: a broken connection is
    /// dropped (if it is still the current one), so the next call reconnects.
    pub(crate) fn after<R>(&self, used: &Channel, r: &Result<R>) {
        if let Err(Error::PeerDied { .. } | Error::ConnectionLost { .. } | Error::Closed { .. }) = r {
            let mut cur = lock(&self.current);
            if cur.as_ref().is_some_and(|c| c.same(used)) {
                *cur = None;
            }
        }
    }

    /// The current connection, if there is one (for stats).
    pub(crate) fn current(&self) -> Option<Channel> {
        lock(&self.current).clone()
    }
}
