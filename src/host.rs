//! Serving one service everywhere at once: shared memory (pollers, handlers
//! inline) plus TCP and Unix-stream peers (tokio, the same handler).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use crate::rpc::{Dispatch, ShmHandler, StreamLimits, StreamServer, serve_stream};
use rpal_core::{Error, Result, Server, ServerOptions};

use rpal_poller::{PollerConfig, Serving, serve};

/// Where and how to serve a service; [`HostBuilder::start`] starts it.
pub struct HostBuilder<D> {
    dispatch: Arc<D>,
    shm: Option<(PathBuf, ServerOptions)>,
    poller: PollerConfig,
    tcp: Option<String>,
    unix_stream: Option<PathBuf>,
    stream_threads: usize,
    stream_limits: StreamLimits,
}

impl<D: Dispatch> HostBuilder<D> {
    /// Serves `dispatch` (a generated `ServeX`); add at least one endpoint.
    pub fn new(dispatch: D) -> Self {
        Self {
            dispatch: Arc::new(dispatch),
            shm: None,
            poller: PollerConfig::default(),
            tcp: None,
            unix_stream: None,
            stream_threads: 1,
            stream_limits: StreamLimits::default(),
        }
    }

    /// Serves shared-memory clients at the Unix socket `path`.
    pub fn shm(self, path: impl Into<PathBuf>) -> Self {
        self.shm_with(path, ServerOptions::new(D::SERVICE))
    }

    /// As [`HostBuilder::shm`] with explicit options (policy, wait); the
    /// service name and method hash are filled in.
    pub fn shm_with(mut self, path: impl Into<PathBuf>, mut opts: ServerOptions) -> Self {
        opts.service = D::SERVICE.to_owned();
        opts.method_hash = D::METHOD_HASH;
        opts.methods = D::METHODS;
        self.shm = Some((path.into(), opts));
        self
    }

    /// Poller threads and their spin policy, for shared-memory clients.
    pub fn poller(mut self, cfg: PollerConfig) -> Self {
        self.poller = cfg;
        self
    }

    /// Serves TCP clients at `addr` (port 0 picks one; see [`Host::tcp_addr`]).
    pub fn tcp(mut self, addr: impl Into<String>) -> Self {
        self.tcp = Some(addr.into());
        self
    }

    /// Serves stream clients at the Unix socket `path` (no shared memory).
    pub fn unix_stream(mut self, path: impl Into<PathBuf>) -> Self {
        self.unix_stream = Some(path.into());
        self
    }

    /// What one stream peer may hold and how long it may keep the server
    /// waiting (frame size, idle and I/O deadlines, connection and call caps).
    pub fn stream_limits(mut self, limits: StreamLimits) -> Self {
        self.stream_limits = limits;
        self
    }

    /// Tokio worker threads, for the stream endpoints and async handlers.
    pub fn stream_threads(mut self, n: usize) -> Self {
        self.stream_threads = n.max(1);
        self
    }

    /// Binds every endpoint and starts serving.
    pub fn start(self) -> Result<Host> {
        let streams = self.tcp.is_some() || self.unix_stream.is_some();
        // One runtime for stream peers and async handlers (of every transport).
        let rt = if streams || D::HAS_ASYNC {
            Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(self.stream_threads)
                    .thread_name("rpal-tokio")
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|e| Error::io("start the tokio runtime".to_owned(), e))?,
            )
        } else {
            None
        };
        let handle = rt.as_ref().map(|r| r.handle().clone());
        let shm = match self.shm {
            Some((path, opts)) => {
                let server = Server::bind(&path, opts)?;
                let handler = ShmHandler::new(self.dispatch.clone(), handle.clone());
                Some(serve(server, handler, self.poller)?)
            }
            None => None,
        };
        let tcp: Option<SocketAddr> = match &self.tcp {
            Some(a) => Some(
                a.to_socket_addrs()
                    .map_err(|e| Error::io(format!("resolve {a}"), e))?
                    .next()
                    .ok_or_else(|| Error::io(format!("resolve {a}"), std::io::ErrorKind::NotFound.into()))?,
            ),
            None => None,
        };
        let stream = match &handle {
            Some(h) if streams => Some(serve_stream(
                self.dispatch.clone(),
                tcp,
                self.unix_stream.as_deref(),
                self.stream_limits,
                h,
            )?),
            _ => None,
        };
        Ok(Host { shm, stream, rt })
    }
}

/// A service being served. Dropping it stops every endpoint.
pub struct Host {
    shm: Option<Serving>,
    stream: Option<StreamServer>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Host {
    /// The shared-memory side: pollers, their stats, server counters.
    pub fn shm(&self) -> Option<&Serving> {
        self.shm.as_ref()
    }

    /// The TCP address (with the real port).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.stream.as_ref().and_then(|s| s.tcp_addr())
    }

    /// Serves until the process ends.
    pub fn join(mut self) {
        match self.shm.take() {
            Some(s) => s.join(),
            None => loop {
                std::thread::park();
            },
        }
    }

    /// Stops every endpoint and waits for the pollers.
    pub fn shutdown(mut self) {
        if let Some(s) = self.shm.take() {
            s.shutdown();
        }
        self.stream = None;
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        drop(self.shm.take());
        self.stream = None;
        // Do not wait for handlers still running: their callers are told
        // by the connection's end.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
