//! Async calls for tokio at the byte level.
//!
//! An `AsyncClient` is a [`ShmChannel`] seen through raw bytes: its calls
//! wait exactly as the generated `_async` methods do. A task sends its
//! request, looks for the reply once, and otherwise leaves its waker in the
//! call table; the channel's pump thread sleeps in the thread's wait backend
//! (`rpal_core::wait`, the one way rpal sleeps) on the reply word and the
//! server's pidfd, reads whatever replies arrive, and wakes their tasks. No
//! task spins; the pump spins only its short budget after a reply, then
//! parks. Any number of calls may be in flight on one client (`&self`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::rpc::ShmChannel;
use rpal_core::{Client, ClientOptions, Error, PeerMem, Result};

/// A connection whose calls are `async`, at the byte level. Cheap to share
/// by reference: every method takes `&self`, and calls may overlap.
///
/// Dropping a call's future abandons the call: its reply, when it comes, is
/// discarded, and nothing leaks.
pub struct AsyncClient {
    chan: Arc<ShmChannel>,
    timeout: Option<Duration>,
}

impl AsyncClient {
    /// Connects (the handshake runs on tokio's blocking pool).
    pub async fn connect(path: impl Into<PathBuf>, opts: ClientOptions) -> Result<Self> {
        let path = path.into();
        let timeout = opts.call_timeout;
        let client = tokio::task::spawn_blocking(move || Client::connect(path, opts))
            .await
            .map_err(|e| Error::io("join the connecting task", std::io::Error::other(e)))??;
        Self::from_client(client, timeout)
    }

    /// Wraps a connected client; `timeout` bounds each call.
    pub fn from_client(client: Client, timeout: Option<Duration>) -> Result<Self> {
        Ok(Self {
            chan: ShmChannel::new(client)?,
            timeout,
        })
    }

    /// Runs `f` on the synchronous client inside (stats, test hooks).
    pub fn with_client<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        self.chan.with_client(f)
    }

    /// Calls `method` with `request` and returns a copy of the reply body.
    pub async fn call(&self, method: u32, request: &[u8]) -> Result<Vec<u8>> {
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
    /// bytes; it returns the length), `read` sees the reply in place, or a
    /// copy if another task's wait read it first. Honours the client's
    /// call timeout.
    pub async fn call_with<R, W, F>(&self, method: u32, cap: usize, write: W, read: F) -> Result<R>
    where
        W: FnOnce(&mut [u8]) -> usize,
        F: FnOnce(&[u8], PeerMem<'_>) -> R,
    {
        self.chan
            .call_async_capped(
                method,
                cap,
                self.timeout,
                |w| {
                    w.bytes_with(cap, write);
                    Ok(())
                },
                |r, _| {
                    let (body, mem) = r.raw();
                    // Our own invariant, not the peer's: a ShmChannel reads
                    // every reply with the server's memory.
                    Ok(read(
                        body,
                        mem.expect("a shared-memory reply comes with the server's memory"),
                    ))
                },
            )
            .await
    }
}
