//! Rows for the generated stubs: the same `#[rpal::service]` client over
//! shared memory (`rpal-stub`: busy, parked, async) and over loopback TCP
//! (`tcp-stub`), plus `local`: the caller's own write of the payload, with
//! no call, in one process.
//!
//! Every call writes the whole payload with a new value (the application's
//! work); the callee reads its first and last 8 bytes and answers the
//! complement of the first if they match. At 8 B the payload is a `u64`
//! argument, inline in the request; above, it is a `ShmSlice<u64>` that the
//! caller fills in its own arena and the callee reads in place (over TCP it
//! is copied into the frame).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rpal::ShmSlice;

use crate::{ChildGuard, RoundTrip};

/// The benchmark service.
#[rpal::service]
pub trait Bench {
    /// Answers `!v`: an 8-byte payload each way, inline.
    fn ping(&self, v: u64) -> u64;
    /// Answers `!first` if the first and last values of `data` match, else 0.
    fn check(&self, data: ShmSlice<u64>) -> u64;
    /// `ping` as an async handler: what the hop to tokio and back costs.
    async fn ping_later(&self, v: u64) -> u64;
}

/// The callee.
pub struct Callee;

impl Bench for Callee {
    fn ping(&self, v: u64) -> u64 {
        !v
    }
    fn check(&self, data: &[u64]) -> u64 {
        match (data.first(), data.last()) {
            (Some(f), Some(l)) if f == l => !f,
            _ => 0,
        }
    }
    async fn ping_later(&self, v: u64) -> u64 {
        !v
    }
}

/// Child role `stub-busy` / `stub-parked`: hosts the service on shared memory
/// at `path` and on loopback TCP; prints the TCP port.
pub fn run_stub_server(path: &str, parked: bool) -> rpal::Result<()> {
    let cfg = if parked {
        rpal::PollerConfig::parked()
    } else {
        crate::busy_poller()
    };
    let host = ServeBench::new(Callee)
        .host()
        .shm(path)
        .poller(cfg)
        .tcp("127.0.0.1:0")
        .start()?;
    println!("{}", host.tcp_addr().map_or(0, |a| a.port()));
    host.join();
    Ok(())
}

/// How a stub row calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StubMode {
    /// Shared memory, both sides spin before parking.
    Busy,
    /// Shared memory, both sides park at once.
    Parked,
    /// Shared memory, `_async` methods on a tokio current-thread runtime.
    Async,
    /// Shared memory, a blocking caller, an async handler (`ping_later`): the
    /// poller spawns it on the host's tokio runtime and writes its reply back.
    AsyncHandler,
    /// Loopback TCP, same client type.
    Tcp,
    /// No call: the caller's write alone.
    Local,
}

/// One stub row's caller.
pub struct StubRoundTrip {
    client: Option<BenchClient>,
    data: Option<ShmSlice<u64>>,
    mode: StubMode,
    rt: Option<tokio::runtime::Runtime>,
    _child: Option<ChildGuard>,
    _path: PathBuf,
}

impl StubRoundTrip {
    /// Starts a callee (unless `Local`) and connects in `mode`.
    pub fn start(exe: &Path, mode: StubMode, payload: usize) -> rpal::Result<Self> {
        let data = if payload > 8 {
            Some(ShmSlice::<u64>::zeroed(payload / 8)?)
        } else {
            None
        };
        let path = std::env::temp_dir().join(format!("rpal-bench-stub-{}-{mode:?}.sock", std::process::id()));
        let mut out = Self {
            client: None,
            data,
            mode,
            rt: None,
            _child: None,
            _path: path.clone(),
        };
        if mode == StubMode::Local {
            return Ok(out);
        }
        let role = if mode == StubMode::Parked {
            "stub-parked"
        } else {
            "stub-busy"
        };
        let (child, port) = ChildGuard::start(exe, role, &[path.display().to_string()])
            .map_err(|e| rpal::Error::io("start the stub server child", e))?;
        out._child = Some(child);
        let client = if mode == StubMode::Tcp {
            BenchClient::connect_tcp(("127.0.0.1", port.parse::<u16>().unwrap_or(0)))?
        } else {
            let mut opts = rpal::ClientOptions::new("");
            if mode == StubMode::Parked {
                opts.wait = rpal::WaitConfig::parked();
            }
            BenchClient::connect_with(&path, opts)?
        };
        out.client = Some(client.with_timeout(Duration::from_secs(10)));
        if mode == StubMode::Async {
            out.rt = Some(
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(|e| rpal::Error::io("tokio runtime", e))?,
            );
        }
        Ok(out)
    }
}

impl RoundTrip for StubRoundTrip {
    fn round_trip(&mut self, value: u64) -> u64 {
        if let Some(d) = &mut self.data {
            d.fill(value); // the application's work: a new payload every call
        }
        let Some(client) = &self.client else {
            // `local`: the write alone, then what the callee would read.
            return match &self.data {
                Some(d) => std::hint::black_box(!d[d.len() - 1]),
                None => std::hint::black_box(!value),
            };
        };
        let r = match (&self.data, &self.rt) {
            (None, None) if self.mode == StubMode::AsyncHandler => client.ping_later(value),
            (None, None) => client.ping(value),
            (Some(d), None) => client.check(d),
            (None, Some(rt)) => rt.block_on(client.ping_async(value)),
            (Some(d), Some(rt)) => rt.block_on(client.check_async(d)),
        };
        r.unwrap_or_else(|e| panic!("{:?} call failed: {e}", self.mode))
    }
}
