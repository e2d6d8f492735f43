//! Starting, observing and stopping a set of pollers with their acceptor.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use rpal_core::{Error, Handler, Result, Server, ServerStats};

use crate::backend::{Backend, BackendChoice};
use crate::poller::{Inbox, Poller};
use crate::stats::{PollerSnapshot, PollerStats};

/// How pollers run.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Poller threads. Default 1.
    pub threads: usize,
    /// How they sleep.
    pub backend: BackendChoice,
    /// Smallest adaptive spin budget. Default 2 us.
    pub spin_min: Duration,
    /// Largest (and starting) spin budget; zero parks at once. Default 50 us.
    pub spin_max: Duration,
    /// Longest sleep; peers' deaths wake a poller earlier (except with the
    /// futex_waitv backend, which notices them at the latest here).
    /// Default 1 s.
    pub park_slice: Duration,
    /// Most requests served from one connection per sweep (fairness).
    /// Default 64.
    pub batch: usize,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            backend: BackendChoice::Auto,
            spin_min: Duration::from_micros(2),
            spin_max: Duration::from_micros(50),
            park_slice: Duration::from_secs(1),
            batch: 64,
        }
    }
}

impl PollerConfig {
    /// Parks at once when idle: no spinning at all.
    pub fn parked() -> Self {
        Self {
            spin_min: Duration::ZERO,
            spin_max: Duration::ZERO,
            ..Self::default()
        }
    }
}

/// A running server: acceptor plus pollers. Dropping it shuts it down.
pub struct Serving {
    server: Arc<Server>,
    inboxes: Vec<Arc<Inbox>>,
    stats: Vec<Arc<PollerStats>>,
    backend: &'static str,
    threads: Vec<JoinHandle<()>>,
    acceptor: Option<JoinHandle<()>>,
}

/// Serves `server` with `cfg.threads` pollers, each with a clone of
/// `handler`. Fails if the chosen backend is unavailable.
pub fn serve<H>(server: Server, handler: H, cfg: PollerConfig) -> Result<Serving>
where
    H: Handler + Clone + Send + 'static,
{
    let server = Arc::new(server);
    let mut inboxes = Vec::new();
    let mut stats = Vec::new();
    let mut threads = Vec::new();
    let mut backend_name = "";
    for i in 0..cfg.threads.max(1) {
        let backend =
            Backend::new(cfg.backend).map_err(|e| Error::io(format!("start poller backend {:?}", cfg.backend), e))?;
        backend_name = backend.name();
        let inbox = Arc::new(Inbox::default());
        let st = Arc::new(PollerStats::default());
        st.spin_budget_ns
            .store(cfg.spin_max.as_nanos() as u64, Ordering::Relaxed);
        let poller = Poller::new(inbox.clone(), handler.clone(), backend, cfg.clone(), st.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("rpal-poller-{i}"))
                .spawn(move || poller.run())
                .map_err(|e| Error::io("spawn a poller thread", e))?,
        );
        inboxes.push(inbox);
        stats.push(st);
    }
    let acceptor = {
        let (server, inboxes, stats) = (server.clone(), inboxes.clone(), stats.clone());
        std::thread::Builder::new()
            .name("rpal-acceptor".into())
            .spawn(move || accept_loop(&server, &inboxes, &stats))
            .map_err(|e| Error::io("spawn the acceptor thread", e))?
    };
    tracing::info!(backend = backend_name, threads = threads.len(), path = %server.path().display(), "rpal serving");
    Ok(Serving {
        server,
        inboxes,
        stats,
        backend: backend_name,
        threads,
        acceptor: Some(acceptor),
    })
}

/// Accepts connections and runs each handshake on a thread of its own, at
/// most `Quotas::handshakes` at once, each within the handshake deadline: a
/// slow or silent peer holds only its own handshake.
fn accept_loop(server: &Arc<Server>, inboxes: &[Arc<Inbox>], stats: &[Arc<PollerStats>]) {
    // Accept errors (EMFILE, ENFILE, ENOBUFS) back off from 1 ms up to 1 s,
    // so a host out of descriptors does not spin this thread.
    let mut backoff = Duration::from_millis(1);
    loop {
        // At the handshake cap, new connections wait in the listen backlog
        // rather than being refused: a burst of honest clients gets through
        // (each handshake ends by its deadline, and one peer holds at most
        // `handshakes_per_peer` of the places).
        while server.handshakes() >= server.quotas().handshakes {
            if inboxes.iter().any(|b| b.shutdown.load(Ordering::Acquire)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let sock = match server.accept_socket() {
            Ok(s) => {
                backoff = Duration::from_millis(1);
                s
            }
            Err(e) => {
                if inboxes.iter().any(|b| b.shutdown.load(Ordering::Acquire)) {
                    return;
                }
                if backoff == Duration::from_millis(1) {
                    tracing::error!(%e, "accept failed; backing off");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let admitted = match server.admit(sock) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%e, "rpal connection refused");
                continue;
            }
        };
        let (server, inboxes, stats) = (server.clone(), inboxes.to_vec(), stats.to_vec());
        let spawned = std::thread::Builder::new()
            .name("rpal-handshake".into())
            .spawn(move || match server.handshake_admitted(admitted) {
                Ok(conn) => {
                    // The poller with the fewest connections takes it.
                    let i = (0..inboxes.len())
                        .min_by_key(|&i| stats[i].connections.load(Ordering::Relaxed))
                        .unwrap_or(0);
                    inboxes[i].deliver(conn);
                }
                Err(e) => tracing::warn!(%e, "rpal handshake failed"),
            });
        if let Err(e) = spawned {
            // The admitted socket went down with the closure: that peer is refused.
            tracing::error!(%e, "cannot start a handshake thread");
        }
    }
}

impl Serving {
    /// Counters of every poller.
    pub fn pollers(&self) -> Vec<PollerSnapshot> {
        self.stats.iter().map(|s| s.snapshot(self.backend)).collect()
    }

    /// The backend the pollers park with.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Handshake and call counters of the server.
    pub fn server_stats(&self) -> &ServerStats {
        self.server.stats()
    }

    /// Serves until the process ends (or another thread shuts it down).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting, stops the pollers (dropping their connections) and
    /// waits for every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for inbox in &self.inboxes {
            inbox.shutdown.store(true, Ordering::Release);
            inbox.ring();
        }
        self.server.stop_accepting();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop();
    }
}
