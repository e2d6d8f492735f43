//! Async calls for tokio: the task sleeps on a client-side io_uring ring
//! whose descriptor is registered with tokio's reactor.
//!
//! After sending a request the task looks for the reply once; if it is not
//! there it announces that it sleeps (the doorbell's parked flag), arms a
//! `FUTEX_WAIT` on the server's next-record word plus a `POLL_ADD` on the
//! server's pidfd and socket, and awaits the ring becoming readable. The
//! server's reply rings the futex, the op completes, the ring's descriptor
//! turns readable, and tokio wakes the task. No task ever spins.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use rpal_core::PeerMem;
use rpal_core::doorbell::announce_park;
use rpal_core::{Client, ClientOptions, Error, Result};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const FUTEX2_SIZE_U32: u32 = 2;
const FUTEX: u64 = 1;
const PEER: u64 = 2;

/// A connection whose calls are `async`. One call at a time (`&mut self`).
///
/// Dropping a call's future abandons the call: its reply, when it comes, is
/// discarded by the next call, and nothing leaks.
pub struct AsyncClient {
    // Dropped before `client`: the ring's pending ops refer to words in the
    // server's region, which `client` keeps mapped.
    ring: IoUring,
    /// An eventfd the kernel signals on every completion (registered with
    /// the ring), watched by tokio's reactor.
    completions: AsyncFd<OwnedFd>,
    client: Client,
    timeout: Option<Duration>,
    /// Longest sleep before looking again anyway; bounds the cost of a
    /// missed wake-up.
    slice: Duration,
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::io(what.to_string(), e)
}

impl AsyncClient {
    /// Connects (the handshake runs on tokio's blocking pool) and sets up
    /// the wake-up ring. Fails if io_uring with `FUTEX_WAIT` is unavailable.
    pub async fn connect(path: impl Into<PathBuf>, opts: ClientOptions) -> Result<Self> {
        let path = path.into();
        let timeout = opts.call_timeout;
        let client = tokio::task::spawn_blocking(move || Client::connect(path, opts))
            .await
            .map_err(|e| io_err("join the connecting task", io::Error::other(e)))??;
        Self::from_client(client, timeout)
    }

    /// Wraps a connected client. Must be called inside a tokio runtime.
    pub fn from_client(client: Client, timeout: Option<Duration>) -> Result<Self> {
        let ring = IoUring::new(8).map_err(|e| io_err("create the client's io_uring", e))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io_err("probe io_uring", e))?;
        if !probe.is_supported(opcode::FutexWait::CODE) {
            return Err(io_err(
                "async calls",
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring lacks FUTEX_WAIT (needs Linux 6.7)",
                ),
            ));
        }
        // Tokio watches an eventfd that the kernel signals on each
        // completion, rather than the ring's own descriptor: completion
        // wake-ups through a ring polled from several threads can be missed.
        let efd = rpal_core::sys::eventfd_nonblocking().map_err(|e| io_err("create an eventfd", e))?;
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| io_err("register the eventfd", e))?;
        // SAFETY: the OwnedFd stays open and the same for the AsyncFd's whole life.
        let completions = unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
            .map_err(|e| io_err("register the eventfd with tokio", e.into_parts().1))?;
        let slice = client_slice(&client);
        Ok(Self {
            ring,
            completions,
            client,
            timeout,
            slice,
        })
    }

    /// The synchronous client inside.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Calls `method` with `request` and returns a copy of the reply body.
    pub async fn call(&mut self, method: u32, request: &[u8]) -> Result<Vec<u8>> {
        self.call_with(
            method,
            request.len(),
            |b| {
                b[..request.len()].copy_from_slice(request);
                request.len()
            },
            |reply, _| reply.to_vec(),
        )
        .await
    }

    /// Calls `method`; `write` fills the request in place (up to `cap`
    /// bytes), `read` sees the reply in place. Honours the connection's call
    /// timeout.
    pub async fn call_with<R, W, F>(&mut self, method: u32, cap: usize, write: W, read: F) -> Result<R>
    where
        W: FnOnce(&mut [u8]) -> usize,
        F: FnOnce(&[u8], PeerMem<'_>) -> R,
    {
        let id = self.client.send_request(method, cap, write)?;
        let timeout = self.timeout;
        let wait = self.wait_reply(id, method, read);
        match timeout {
            Some(t) => tokio::time::timeout(t, wait).await.map_err(|_| Error::Timeout(t))?,
            None => wait.await,
        }
    }

    async fn wait_reply<R, F>(&mut self, id: u64, method: u32, read: F) -> Result<R>
    where
        F: FnOnce(&[u8], PeerMem<'_>) -> R,
    {
        let mut read = Some(read);
        loop {
            if let Some(out) = self.client.try_reply(id, method, &mut read)? {
                return Ok(out);
            }
            self.sleep_until_woken().await?;
        }
    }

    /// Arms the ring and awaits it; returns once something may have changed.
    async fn sleep_until_woken(&mut self) -> Result<()> {
        let submitted = {
            // Access to the server's region for arming only (the kernel reads
            // the futex word at submission): never held across the await.
            let access = self.client.access();
            let Some((word, seen)) = self.client.reply_wait_target(&access) else {
                return Ok(());
            };
            let parked = self.client.parked_flag();
            if !announce_park(parked, word, seen) {
                parked.store(0, Ordering::Relaxed);
                return Ok(());
            }
            let ops = [
                opcode::FutexWait::new(word.as_ptr(), seen as u64, u32::MAX as u64, FUTEX2_SIZE_U32)
                    .build()
                    .user_data(FUTEX),
                opcode::PollAdd::new(types::Fd(self.client.peer().pidfd().as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(PEER),
                opcode::PollAdd::new(types::Fd(self.client.socket().as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(PEER),
            ];
            let ring = &mut self.ring;
            // SAFETY: the ops point at no buffer of ours: the futex word lives
            // in the server's region, which stays mapped while `client` lives
            // (and the ring is dropped first). The ring has room: 8 entries,
            // and every op is reaped before the next sleep.
            unsafe {
                ring.submission()
                    .push_multiple(&ops)
                    .map_err(|_| io_err("arm the ring", io::Error::other("full")))?
            };
            ring.submit().map_err(|e| io_err("submit to the ring", e))
        };
        let outcome = match submitted {
            Ok(n) => await_completion(&mut self.ring, &self.completions, self.slice)
                .await
                .map(|c| (n, c)),
            Err(e) => Err(e),
        };
        self.client.parked_flag().store(0, Ordering::Relaxed);
        // Whatever woke us, take the other ops back before the next sleep.
        let (total, taken) = match &outcome {
            Ok((n, c)) => (*n, usize::from(c.is_some())),
            Err(_) => (0, 0),
        };
        let ring = &mut self.ring;
        let _ = ring.submitter().register_sync_cancel(None, types::CancelBuilder::any());
        let mut reaped = taken;
        while reaped < total {
            let n = ring.completion().count();
            reaped += n;
            if n == 0 && ring.submit_and_wait(1).is_err() {
                break;
            }
        }
        if let (_, Some(true)) = outcome? {
            self.client.check_alive()?;
        }
        Ok(())
    }
}

/// Awaits the first completion on `ring` (and takes it): `Some(true)` if it
/// came from the peer's pidfd or socket, `Some(false)` from the futex, `None`
/// if `slice` passed first (the caller looks again anyway).
async fn await_completion(ring: &mut IoUring, completions: &AsyncFd<OwnedFd>, slice: Duration) -> Result<Option<bool>> {
    let deadline = tokio::time::Instant::now() + slice;
    loop {
        if let Some(cqe) = ring.completion().next() {
            return Ok(Some(cqe.user_data() == PEER));
        }
        let Ok(guard) = tokio::time::timeout_at(deadline, completions.readable()).await else {
            return Ok(None);
        };
        let mut guard = guard.map_err(|e| io_err("await the eventfd", e))?;
        // Reset the eventfd's counter, then look at the queue again.
        rpal_core::sys::drain_eventfd(completions.get_ref().as_fd());
        guard.clear_ready();
    }
}

/// How long an async wait sleeps before looking again anyway: the
/// connection's park slice, as for synchronous waits.
fn client_slice(client: &Client) -> Duration {
    client.wait_config().park_slice
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        let _ = self
            .ring
            .submitter()
            .register_sync_cancel(None, types::CancelBuilder::any());
    }
}
