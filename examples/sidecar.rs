//! An app and its sidecar, two processes that call each other.
//!
//! The sidecar is a rate limiter and log shipper: for every request the app
//! asks `allow(client)` and ships one log line, built in the app's own
//! shared memory and read in place by the sidecar. The sidecar in turn
//! calls the app's `health()` service to decide how strict to be: when the
//! app reports a long queue, the limit drops.
//!
//! ```text
//! cargo run --release --example sidecar
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpal::prelude::*;

/// How long a process waits for the one it calls to start serving.
const START_WAIT: Duration = Duration::from_secs(10);

const REQUESTS: u64 = 20_000;

/// What the app reports about itself.
#[derive(ShmSafe, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Health {
    /// Requests waiting in the app.
    pub queue_len: u64,
    /// Requests served so far.
    pub served: u64,
}

/// The sidecar's service, called by the app.
#[rpal::service]
pub trait Sidecar {
    /// 1 if `client` may make another request now, 0 if it is over its limit.
    fn allow(&self, client: u64) -> u32;
    /// Ships one log line; returns how many lines were shipped so far.
    fn ship(&self, line: ShmString) -> u64;
    /// How many times the sidecar has called the app back.
    fn health_checks(&self) -> u64;
    /// Waits until every line shipped so far is written out; returns how
    /// many. An async handler: it runs on the sidecar's tokio runtime and
    /// may wait as long as it likes without holding up `allow` and `ship`,
    /// which run inline on the poller.
    async fn flush(&self) -> u64;
}

/// The app's service, called by the sidecar.
#[rpal::service]
pub trait App {
    /// The app's current load.
    fn health(&self) -> Health;
}

/// The sidecar's limit per client, set from the app's health.
static LIMIT: AtomicU64 = AtomicU64::new(1_000);
/// How often the sidecar has called the app.
static CHECKS: AtomicU64 = AtomicU64::new(0);

/// The sidecar: a request counter per client and a log sink.
struct Limiter {
    counts: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    shipped: AtomicU64,
    bytes: AtomicU64,
}

impl Sidecar for Limiter {
    fn allow(&self, client: u64) -> u32 {
        let mut c = self.counts.lock().unwrap();
        let n = c.entry(client).or_default();
        *n += 1;
        u32::from(*n <= LIMIT.load(Ordering::Relaxed))
    }
    fn ship(&self, line: &str) -> u64 {
        // A real shipper would batch to a file or the network; the line is
        // read in place in the app's memory, without a copy.
        self.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        self.shipped.fetch_add(1, Ordering::Relaxed) + 1
    }
    fn health_checks(&self) -> u64 {
        CHECKS.load(Ordering::Relaxed)
    }
    async fn flush(&self) -> u64 {
        let upto = self.shipped.load(Ordering::Relaxed);
        // A real shipper would await its file or network write here.
        tokio::time::sleep(Duration::from_millis(5)).await;
        upto
    }
}

fn run_sidecar(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let limiter = Limiter {
        counts: Default::default(),
        shipped: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    let _host = ServeSidecar::new(limiter)
        .host()
        .shm(dir.join("sidecar.sock"))
        .start()?;
    println!("ready");
    // Call the app back every few milliseconds while it runs.
    let app = AppClient::connect_waiting(dir.join("app.sock"), START_WAIT)?.with_timeout(Duration::from_secs(1));
    while let Ok(h) = app.health() {
        CHECKS.fetch_add(1, Ordering::Relaxed);
        let limit = if h.queue_len > 100 { 500 } else { 1_000 };
        LIMIT.store(limit, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    }
    // The app has gone: so do we.
    Ok(())
}

/// The app: counts what it serves and how much waits.
struct AppState {
    served: AtomicU64,
}

impl App for &'static AppState {
    fn health(&self) -> Health {
        Health {
            queue_len: 0,
            served: self.served.load(Ordering::Relaxed),
        }
    }
}

/// Kills the sidecar when the app is done, however it ends.
struct SidecarProcess(Child);

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sidecar") {
        return run_sidecar(Path::new(&args[2]));
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("rpal-sidecar-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let state: &'static AppState = Box::leak(Box::new(AppState {
        served: AtomicU64::new(0),
    }));
    let _app_host = ServeApp::new(state).host().shm(dir.join("app.sock")).start()?;

    let mut child = Command::new(std::env::current_exe()?)
        .arg("--sidecar")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let sidecar_process = SidecarProcess(child);
    if line.trim() != "ready" {
        return Err("the sidecar did not start".into());
    }
    let sidecar = SidecarClient::connect_waiting(dir.join("sidecar.sock"), START_WAIT)?;

    let mut log = ShmString::new();
    let (mut allowed, mut denied) = (0u64, 0u64);
    let mut ns = Vec::with_capacity(REQUESTS as usize);
    for i in 0..REQUESTS {
        let client = i % 8;
        let t0 = Instant::now();
        let ok = sidecar.allow(client)? == 1;
        log.clear();
        log.push_str(&format!(
            "request {i} from client {client}: {}",
            if ok { "served" } else { "throttled" }
        ))?;
        sidecar.ship(&log)?;
        ns.push(t0.elapsed().as_nanos() as u64);
        if ok {
            allowed += 1;
            state.served.fetch_add(1, Ordering::Relaxed);
        } else {
            denied += 1;
        }
    }
    ns.sort_unstable();
    // While `flush` waits on the sidecar's tokio runtime,
    // `allow` is still answered inline by its poller.
    let flushing = {
        let sidecar = sidecar.clone();
        std::thread::spawn(move || sidecar.flush())
    };
    sidecar.allow(0)?;
    let flushed = flushing.join().map_err(|_| "the flushing thread panicked")??;
    if flushed != REQUESTS {
        return Err(format!("flush confirmed {flushed} lines, not {REQUESTS}").into());
    }
    let checks = sidecar.health_checks()?;
    println!(
        "app pid {} and sidecar pid {} called each other:",
        std::process::id(),
        sidecar_process.0.id()
    );
    println!("  {REQUESTS} requests: {allowed} allowed, {denied} throttled by the sidecar's limit of 1000 per client");
    println!(
        "  allow + ship per request: p50 {:.2} us, p99 {:.2} us (two calls; log lines read in place)",
        ns[ns.len() / 2] as f64 / 1000.0,
        ns[ns.len() * 99 / 100] as f64 / 1000.0
    );
    println!("  the sidecar called the app's health() {checks} times meanwhile");
    println!("  flush() (an async handler, on the sidecar's tokio runtime) confirmed {flushed} lines");
    if checks == 0 {
        return Err("the sidecar never called the app".into());
    }
    drop(sidecar_process);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
