//! Heavy load without losing a call: 16 client processes call one server
//! at once, over shared memory (blocking, then async with 8 calls in flight
//! per process) and over loopback TCP. Every call carries its client, a
//! sequence number and a checksum of its payload (async calls reach a sync
//! handler and an async one, half each); the server counts each
//! (client, sequence) it sees and checks the checksum, the client checks
//! the receipt. Lost, duplicated and corrupted calls must all be 0.
//!
//! Sizes: 100,000 calls per process with `RPAL_STRESS=1`, 2,000 otherwise,
//! and 4 processes of 500 under emulation. Each mode prints a `load-row:`
//! line with the counts and the p50/p99 of the calls' round trips:
//! `cargo test --release --test load -- --nocapture 2>&1 | grep load-row`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpal::prelude::*;
use rpal::*;

/// One call: who sent it, its number, a payload and the payload's checksum.
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Call {
    client: u64,
    seq: u64,
    payload: [u64; 8],
    sum: u64,
}

/// The server's answer: the call's client and number, the checksum it
/// computed, and whether it matched.
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Receipt {
    client: u64,
    seq: u64,
    sum: u64,
    intact: u64,
}

#[rpal::service]
pub trait Ledger {
    /// Records one call.
    fn record(&self, call: Call) -> Receipt;
    /// The same, from an async handler.
    async fn deposit(&self, call: Call) -> Receipt;
}

/// A checksum of the payload bound to its client and number.
fn checksum(client: u64, seq: u64, payload: &[u64; 8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ client.rotate_left(17) ^ seq;
    for w in payload {
        h = (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(23);
    }
    h
}

fn call_for(client: u64, seq: u64) -> Call {
    let mut payload = [0u64; 8];
    for (i, w) in payload.iter_mut().enumerate() {
        *w = (client << 48) ^ (seq << 8) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    Call {
        client,
        seq,
        payload,
        sum: checksum(client, seq, &payload),
    }
}

/// What the server saw: per client, how often each sequence number came.
struct Seen {
    clients: Vec<Mutex<Vec<u8>>>,
    corrupted: AtomicU64,
}

impl Seen {
    fn new(clients: usize, calls: usize) -> Seen {
        Seen {
            clients: (0..clients).map(|_| Mutex::new(vec![0; calls])).collect(),
            corrupted: AtomicU64::new(0),
        }
    }

    fn record(&self, c: Call) -> Receipt {
        let sum = checksum(c.client, c.seq, &c.payload);
        let intact = sum == c.sum;
        let counted = self.clients.get(c.client as usize).and_then(|m| {
            m.lock()
                .unwrap()
                .get_mut(c.seq as usize)
                .map(|n| *n = n.saturating_add(1))
        });
        if !intact || counted.is_none() {
            self.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        Receipt {
            client: c.client,
            seq: c.seq,
            sum,
            intact: (intact && counted.is_some()) as u64,
        }
    }
}

/// The ledger of the mode under way (a new one per mode).
static SEEN: Mutex<Option<std::sync::Arc<Seen>>> = Mutex::new(None);

fn seen() -> std::sync::Arc<Seen> {
    SEEN.lock().unwrap().clone().expect("a mode under way")
}

struct Impl;

impl Ledger for Impl {
    fn record(&self, call: Call) -> Receipt {
        seen().record(call)
    }
    async fn deposit(&self, call: Call) -> Receipt {
        seen().record(call)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    ShmBlocking,
    ShmAsync,
    Tcp,
}

const MODES: [Mode; 3] = [Mode::ShmBlocking, Mode::ShmAsync, Mode::Tcp];

/// Async calls in flight per client process.
const IN_FLIGHT: u64 = 8;

/// What one client process reports: calls sent, receipts that matched,
/// receipts that did not, calls that failed; then each call's round trip
/// in nanoseconds.
fn report(path: &Path, counts: [u64; 4], mut rtt: Vec<u64>) {
    rtt.sort_unstable();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for c in counts {
        f.write_all(&c.to_le_bytes()).unwrap();
    }
    for t in rtt {
        f.write_all(&t.to_le_bytes()).unwrap();
    }
}

fn read_report(path: &Path) -> ([u64; 4], Vec<u64>) {
    let b = std::fs::read(path).unwrap();
    let words: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ([words[0], words[1], words[2], words[3]], words[4..].to_vec())
}

/// Checks one receipt against the call it answers: [matched, mismatched].
fn check(call: &Call, r: &Receipt) -> [u64; 2] {
    if r.client == call.client && r.seq == call.seq && r.sum == call.sum && r.intact == 1 {
        [1, 0]
    } else {
        [0, 1]
    }
}

/// A client's counts: receipts that matched, that did not, calls that
/// failed, and each answered call's round trip in nanoseconds.
#[derive(Default)]
struct Tally {
    ok: u64,
    bad: u64,
    failed: u64,
    rtt: Vec<u64>,
}

impl Tally {
    fn add(&mut self, call: &Call, r: rpal::Result<Receipt>, t0: Instant) {
        match r {
            Ok(r) => {
                self.rtt.push(t0.elapsed().as_nanos() as u64);
                let [o, b] = check(call, &r);
                (self.ok, self.bad) = (self.ok + o, self.bad + b);
            }
            Err(e) => {
                eprintln!("load: client {} call {}: {e}", call.client, call.seq);
                self.failed += 1;
            }
        }
    }
}

/// A client process: makes its calls in the mode it is given, then reports.
fn client() {
    let mode = MODES[common::arg("RPAL_TEST_MODE").parse::<usize>().unwrap()];
    let id: u64 = common::arg("RPAL_TEST_CLIENT").parse().unwrap();
    let calls: u64 = common::arg("RPAL_TEST_CALLS").parse().unwrap();
    let out = PathBuf::from(common::arg("RPAL_TEST_OUT"));
    let deadline = Duration::from_secs(60 * common::time_scale());
    let mut opts = ClientOptions::new("");
    opts.wait = WaitConfig::parked();
    let c = match mode {
        Mode::Tcp => {
            let port = common::arg("RPAL_TEST_PORT");
            common::retry(|| LedgerClient::connect_tcp(format!("127.0.0.1:{port}")))
        }
        _ => common::retry(|| LedgerClient::connect_with(common::arg("RPAL_TEST_SOCK"), opts.clone())),
    }
    .with_timeout(deadline);
    let mut all = Tally::default();
    match mode {
        Mode::ShmBlocking | Mode::Tcp => {
            for seq in 0..calls {
                let call = call_for(id, seq);
                let t0 = Instant::now();
                all.add(&call, c.record(call), t0);
            }
        }
        Mode::ShmAsync => {
            let rt = common::runtime();
            let tasks: Vec<_> = (0..IN_FLIGHT)
                .map(|t| {
                    let c = c.clone();
                    rt.spawn(async move {
                        let mut mine = Tally::default();
                        for seq in (t..calls).step_by(IN_FLIGHT as usize) {
                            let call = call_for(id, seq);
                            let t0 = Instant::now();
                            // Half the tasks reach a sync handler, half an async one.
                            let r = if t % 2 == 0 {
                                c.record_async(call).await
                            } else {
                                c.deposit_async(call).await
                            };
                            mine.add(&call, r, t0);
                        }
                        mine
                    })
                })
                .collect();
            for t in tasks {
                let mine = rt.block_on(t).unwrap();
                (all.ok, all.bad, all.failed) = (all.ok + mine.ok, all.bad + mine.bad, all.failed + mine.failed);
                all.rtt.extend(mine.rtt);
            }
        }
    }
    report(&out, [calls, all.ok, all.bad, all.failed], all.rtt);
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
}

#[test]
fn many_processes_lose_no_call() {
    const TEST: &str = "many_processes_lose_no_call";
    if common::role().as_deref() == Some("client") {
        return client();
    }
    let emulated = common::time_scale() > 1;
    let procs: usize = if emulated { 4 } else { 16 };
    let calls = common::size(100_000, 2_000);
    let path = common::sock_path("load");
    let host = ServeLedger::new(Impl)
        .host()
        .shm(&path)
        .tcp("127.0.0.1:0")
        .poller(PollerConfig {
            threads: 2,
            ..PollerConfig::parked()
        })
        .start()
        .expect("start the host");
    let port = host.tcp_addr().unwrap().port();
    for (m, mode) in MODES.iter().enumerate() {
        let ledger = std::sync::Arc::new(Seen::new(procs, calls));
        *SEEN.lock().unwrap() = Some(ledger.clone());
        let t0 = Instant::now();
        let outs: Vec<PathBuf> = (0..procs).map(|i| path.with_extension(format!("out{m}-{i}"))).collect();
        let mut children: Vec<_> = outs
            .iter()
            .enumerate()
            .map(|(i, out)| {
                common::spawn(
                    TEST,
                    "client",
                    &[
                        ("RPAL_TEST_MODE", m.to_string()),
                        ("RPAL_TEST_CLIENT", i.to_string()),
                        ("RPAL_TEST_CALLS", calls.to_string()),
                        ("RPAL_TEST_OUT", out.display().to_string()),
                        ("RPAL_TEST_SOCK", path.display().to_string()),
                        ("RPAL_TEST_PORT", port.to_string()),
                    ],
                )
            })
            .collect();
        for c in &mut children {
            let st = c.wait_timeout(Duration::from_secs(600 * common::time_scale()));
            assert!(st.success(), "a client failed: {st:?}");
        }
        let wall = t0.elapsed();
        let (mut sent, mut ok, mut bad, mut failed, mut rtt) = (0, 0, 0, 0, Vec::new());
        for out in &outs {
            let ([s, o, b, f], r) = read_report(out);
            (sent, ok, bad, failed) = (sent + s, ok + o, bad + b, failed + f);
            rtt.extend(r);
            let _ = std::fs::remove_file(out);
        }
        rtt.sort_unstable();
        // From the server's ledger: each (client, seq) must have come once.
        let (mut lost, mut duplicated) = (0u64, 0u64);
        for m in &ledger.clients {
            for &n in m.lock().unwrap().iter() {
                match n {
                    0 => lost += 1,
                    1 => {}
                    k => duplicated += k as u64 - 1,
                }
            }
        }
        let corrupted = ledger.corrupted.load(Ordering::Relaxed) + bad;
        eprintln!(
            "load-row: {mode:?} | {procs} processes x {calls} calls | sent {sent}, answered and checked {ok} | lost {lost}, duplicated {duplicated}, corrupted {corrupted}, failed {failed} | p50 {:.1} us, p99 {:.1} us | {:.0} calls/s (process starts included)",
            percentile(&rtt, 0.5),
            percentile(&rtt, 0.99),
            sent as f64 / wall.as_secs_f64()
        );
        assert_eq!(sent, (procs * calls) as u64);
        assert_eq!((lost, duplicated, corrupted, failed), (0, 0, 0, 0), "{mode:?}");
        assert_eq!(ok, sent);
    }
    host.shutdown();
    let _ = std::fs::remove_file(&path);
}
