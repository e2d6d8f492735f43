//! Async handlers (`async fn` in a service trait), server-side deadlines and
//! backpressure, against a real server process, over shared memory, TCP and
//! a Unix stream.

mod common;

use common::{ALL, Transport, retry, runtime};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpal::prelude::*;

/// 4000 bytes passed by value: a request that takes most of a queue record.
#[derive(ShmSafe, Clone, Copy)]
#[repr(C)]
pub struct Block {
    words: [u64; 500],
}

/// The service under test: async and sync handlers side by side.
#[rpal::service]
pub trait Jobs {
    /// Waits (async) until `n` calls of round `round` have arrived; returns
    /// how many had. Only handlers that run concurrently can finish this.
    async fn gather(&self, round: u64, n: u64) -> u64;
    /// Sleeps on tokio, then sums a slice read in place in the caller's memory.
    async fn sum_later(&self, xs: ShmSlice<u64>, ms: u64) -> u64;
    /// Sleeps on tokio, then lends a greeting built in the server's memory.
    async fn greet_later(&self, name: ShmString) -> ShmString;
    /// Panics after its first await.
    async fn boom_later(&self);
    /// Never finishes; counts in `stopped` when its work is dropped.
    async fn stall(&self, tag: u64);
    /// How many `stall` calls the server has stopped.
    fn stopped(&self) -> u64;
    /// Sync, inline on the poller.
    fn add(&self, a: u64, b: u64) -> u64;
    /// Sync: blocks the thread serving this connection for `ms`.
    fn hold(&self, ms: u64);
    /// How many `hold` calls have started.
    fn holds(&self) -> u64;
    /// Sync: a checksum of a 4000-byte value.
    fn check(&self, b: Block) -> u64;
}

#[derive(Default)]
struct JobsImpl {
    rounds: Mutex<HashMap<u64, tokio::sync::watch::Sender<u64>>>,
    stopped: std::sync::Arc<AtomicU64>,
    holds: AtomicU64,
}

/// Counts a stopped `stall` when the handler's future is dropped.
struct CountOnDrop(std::sync::Arc<AtomicU64>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Jobs for JobsImpl {
    async fn gather(&self, round: u64, n: u64) -> u64 {
        let mut rx = {
            let mut rounds = self.rounds.lock().unwrap();
            let tx = rounds.entry(round).or_insert_with(|| tokio::sync::watch::channel(0).0);
            tx.send_modify(|c| *c += 1);
            tx.subscribe()
        };
        *rx.wait_for(|c| *c >= n).await.expect("the sender lives in self")
    }
    async fn sum_later(&self, xs: &[u64], ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        xs.iter().sum()
    }
    async fn greet_later(&self, name: &str) -> ShmString {
        tokio::task::yield_now().await;
        ShmString::copy_from(&format!("later, {name}")).expect("arena")
    }
    async fn boom_later(&self) {
        tokio::task::yield_now().await;
        common::quiet_panic("the async handler panicked on purpose");
    }
    async fn stall(&self, _tag: u64) {
        let _count = CountOnDrop(self.stopped.clone());
        std::future::pending::<()>().await;
    }
    fn stopped(&self) -> u64 {
        self.stopped.load(Ordering::SeqCst)
    }
    fn add(&self, a: u64, b: u64) -> u64 {
        a + b
    }
    fn holds(&self) -> u64 {
        self.holds.load(Ordering::SeqCst)
    }
    fn hold(&self, ms: u64) {
        self.holds.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
    }
    fn check(&self, b: Block) -> u64 {
        b.words.iter().fold(0u64, |h, w| h.rotate_left(5) ^ w)
    }
}

fn checksum(b: &Block) -> u64 {
    b.words.iter().fold(0u64, |h, w| h.rotate_left(5) ^ w)
}

struct ServerChild {
    _guard: common::ChildGuard,
    base: PathBuf,
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = ServeJobs::new(JobsImpl::default())
        .host()
        .shm(&base)
        // One poller: `hold` then blocks every shared-memory connection.
        .poller(PollerConfig {
            threads: 1,
            ..PollerConfig::default()
        })
        .tcp("127.0.0.1:0")
        .unix_stream(base.with_extension("stream"))
        .stream_threads(2)
        .start()
        .expect("start the host");
    let port = host.tcp_addr().expect("tcp").port();
    common::publish_port(&base, port);
    host.join();
}

fn start_server(test: &str, name: &str) -> ServerChild {
    let base = common::sock_path(name);
    let guard = common::spawn(test, "server", &[("RPAL_TEST_SOCK", base.display().to_string())]);
    ServerChild { _guard: guard, base }
}

impl ServerChild {
    fn connect(&self, t: Transport) -> JobsClient {
        let port = common::read_port(&self.base);
        let c = match t {
            Transport::Shm => retry(|| JobsClient::connect(&self.base)),
            Transport::Tcp => retry(|| JobsClient::connect_tcp(("127.0.0.1", port))),
            Transport::UnixStream => retry(|| JobsClient::connect_unix_stream(self.base.with_extension("stream"))),
        };
        // A test that goes wrong fails with Timeout instead of hanging
        // (longer under emulation, where 6000 queued calls take many seconds).
        c.with_timeout(Duration::from_secs(20 * common::time_scale()))
    }
}

/// Polls `f` until it holds (10 s at most).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10 * common::time_scale()),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn async_handlers_run_concurrently_beside_sync_ones() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("async_handlers_run_concurrently_beside_sync_ones", "async-conc");
    let rt = runtime();
    let xs = ShmSlice::from_slice(&(1..=100u64).collect::<Vec<_>>()).unwrap();
    let name = ShmString::copy_from("rpal").unwrap();
    for (round, t) in ALL.into_iter().enumerate() {
        let jobs = server.connect(t);
        let round = round as u64;
        // Seven tasks and one blocked thread wait in `gather` at once: they
        // can only all return if the server runs their handlers concurrently.
        let waiting: Vec<_> = (0..7)
            .map(|_| {
                let jobs = jobs.clone();
                rt.spawn(async move { jobs.gather_async(round, 8).await })
            })
            .collect();
        // Sync calls are answered meanwhile.
        assert_eq!(jobs.add(2, 3).unwrap(), 5, "{t:?}");
        assert_eq!(jobs.gather(round, 8).unwrap(), 8, "{t:?}");
        for w in waiting {
            assert_eq!(rt.block_on(w).unwrap().unwrap(), 8, "{t:?}");
        }
        // Pointer arguments are read in place after the handler's awaits;
        // pointer results of async handlers are lent as sync ones are.
        assert_eq!(jobs.sum_later(&xs, 20).unwrap(), 5050, "{t:?}");
        rt.block_on(async {
            // Each sleeps 5-9 ms (longer under emulation), so all can be sent
            // before the first is answered.
            let ms = |i: u64| (5 + i % 5) * common::time_scale();
            let many: Vec<_> = (0..50).map(|i| jobs.sum_later_async(&xs, ms(i))).collect();
            let (results, peak) = join_all(many, || jobs.channel().in_flight()).await;
            for r in results {
                assert_eq!(r.unwrap(), 5050, "{t:?}");
            }
            assert!(peak >= 25, "{t:?}: only {peak} of the 50 calls were in flight at once");
        });
        let hello = jobs.greet_later(&name).unwrap();
        assert_eq!(&*hello.read(), "later, rpal", "{t:?}");
        // A string result is copied on receipt on every transport (its
        // UTF-8 must hold while it is read); the server's block went back.
        assert!(!hello.is_shared(), "{t:?}");
        // A panicking async handler fails its call only.
        let e = jobs.boom_later().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Remote {
                    status: RemoteStatus::HandlerPanicked,
                    method: JobsService::BOOM_LATER,
                    ref name,
                    ref message,
                } if name == "boom_later" && message == "the async handler panicked on purpose"
            ),
            "{t:?}: {e}"
        );
        assert_eq!(jobs.add(1, 1).unwrap(), 2, "{t:?}: the server goes on");
        assert_eq!(jobs.channel().in_flight(), 0, "{t:?}");
    }
}

/// Polls every future together until all are done (a small `join_all`,
/// to keep dependencies out), and returns their outputs with the largest
/// value `probe` gave after a round of polls (calls in flight, say).
async fn join_all<F: std::future::Future>(fs: Vec<F>, probe: impl Fn() -> usize) -> (Vec<F::Output>, usize) {
    let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = fs.iter().map(|_| None).collect();
    let mut peak = 0;
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in fs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        peak = peak.max(probe());
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    (
        out.into_iter().map(|o| o.expect("every future completed")).collect(),
        peak,
    )
}

#[test]
fn server_stops_async_work_past_its_deadline_or_its_caller() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("server_stops_async_work_past_its_deadline_or_its_caller", "async-dl");
    let rt = runtime();
    let probe = server.connect(Transport::Shm);
    let mut stopped = 0;
    for t in ALL {
        let jobs = server.connect(t);
        // The caller's budget travels with the request: the client times
        // out, and the server (the poller's wheel over shared memory,
        // tokio's timer over streams) drops the handler's future.
        let e = jobs.with_timeout(Duration::from_millis(50)).stall(1).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{t:?}: {e}");
        stopped += 1;
        eventually(&format!("{t:?}: the server stopped a call past its deadline"), || {
            probe.stopped().unwrap() == stopped
        });
        // Async calls carry their budget too.
        let e = rt
            .block_on(jobs.with_timeout(Duration::from_millis(30)).stall_async(2))
            .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{t:?}: {e}");
        stopped += 1;
        eventually(&format!("{t:?}: an async call's deadline"), || {
            probe.stopped().unwrap() == stopped
        });
        // No deadline at all: the work stops when the client goes away.
        let plain = match t {
            Transport::Shm => retry(|| JobsClient::connect(&server.base)),
            _ => server.connect(t).with_timeout(Duration::from_secs(3600)),
        };
        let mut call = Box::pin(plain.stall_async(3));
        rt.block_on(async {
            assert!(
                tokio::time::timeout(Duration::from_millis(100), &mut call)
                    .await
                    .is_err()
            );
        });
        drop(call);
        drop(plain);
        stopped += 1;
        eventually(&format!("{t:?}: the server stopped work of a client that left"), || {
            probe.stopped().unwrap() == stopped
        });
        assert_eq!(jobs.add(2, 2).unwrap(), 4, "{t:?}: the connection still serves");
    }
}

#[test]
fn a_full_queue_waits_and_nothing_is_dropped() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("a_full_queue_waits_and_nothing_is_dropped", "async-bp");
    let rt = runtime();
    let probe = server.connect(Transport::Tcp);
    for (held, t) in ALL.into_iter().enumerate() {
        let jobs = server.connect(t);
        // Hold the serving thread while 6000 requests of about 4 KiB each
        // (24 MiB, more than the 16 MiB a shared-memory queue may have
        // unread) are sent: senders must wait for room, then every call
        // gets its own answer.
        let holder = {
            let jobs = jobs.clone();
            // Long enough for 24 MiB of sends (longer under emulation; the
            // streams assert no backpressure, so they hold briefly).
            let ms = if t == Transport::Shm { 1500 } else { 300 } * common::time_scale();
            std::thread::spawn(move || jobs.hold(ms))
        };
        // The hold must be running before the calls go out: asked over
        // TCP, which the stream threads serve, not the held poller.
        eventually(&format!("{t:?}: the server holds"), || {
            probe.holds().unwrap() > held as u64
        });
        let sums = rt.block_on(async {
            // One task per call, so that all of them are in flight at once.
            let tasks: Vec<_> = (0..6000u64)
                .map(|i| {
                    let jobs = jobs.clone();
                    tokio::spawn(async move {
                        let mut b = Block { words: [i; 500] };
                        b.words[0] = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        b.words[499] = !i;
                        let want = checksum(&b);
                        jobs.check_async(b).await.map(|got| got == want)
                    })
                })
                .collect();
            let mut n = 0;
            for task in tasks {
                assert!(task.await.unwrap().unwrap(), "{t:?}: a reply went to the wrong call");
                n += 1;
            }
            n
        });
        holder.join().unwrap().unwrap();
        assert_eq!(sums, 6000, "{t:?}");
        assert_eq!(jobs.channel().in_flight(), 0, "{t:?}");
        if let rpal::Channel::Shm(c) = jobs.channel() {
            let waits = c.with_client(|c| c.stats().full_waits);
            let stats = c.with_client(|c| c.stats());
            assert!(
                waits > 0,
                "the queue never filled: the test did not test backpressure ({stats:?}, {} holds seen)",
                probe.holds().unwrap()
            );
        }
    }
}
