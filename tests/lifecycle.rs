//! A server's life as its clients see it: its death noticed within
//! milliseconds by blocking and async callers (the process-wide death
//! watch, not the park slice), a connect that waits for a server that is
//! starting, and a reconnecting client that fails only the calls in flight.

mod common;

use common::{ChildGuard, runtime, time_scale};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rpal::prelude::*;

#[rpal::service]
pub trait Nap {
    /// Sleeps `ms`, then answers it.
    fn nap(&self, ms: u64) -> u64;
    /// The same, in an async handler.
    async fn nap_later(&self, ms: u64) -> u64;
    /// The server's pid.
    fn pid(&self) -> u64;
}

struct NapImpl;

impl Nap for NapImpl {
    fn nap(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
    async fn nap_later(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
    fn pid(&self) -> u64 {
        std::process::id() as u64
    }
}

/// The server child: waits `RPAL_TEST_DELAY_MS` (a server that is slow to
/// start), then serves at `RPAL_TEST_SOCK` and on TCP at `RPAL_TEST_PORT`.
fn serve_child() {
    let delay: u64 = std::env::var("RPAL_TEST_DELAY_MS").map_or(0, |v| v.parse().unwrap());
    std::thread::sleep(Duration::from_millis(delay));
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let port = common::arg("RPAL_TEST_PORT");
    let host = ServeNap::new(NapImpl)
        .host()
        .shm(&base)
        .poller(PollerConfig {
            threads: 2,
            ..PollerConfig::default()
        })
        .tcp(format!("127.0.0.1:{port}"))
        .start()
        .expect("start the host");
    host.join();
}

fn server(test: &str, base: &Path, port: u16, delay_ms: u64) -> ChildGuard {
    common::spawn(
        test,
        "server",
        &[
            ("RPAL_TEST_SOCK", base.display().to_string()),
            ("RPAL_TEST_PORT", port.to_string()),
            ("RPAL_TEST_DELAY_MS", delay_ms.to_string()),
        ],
    )
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn a_dead_server_is_noticed_within_milliseconds() {
    const TEST: &str = "a_dead_server_is_noticed_within_milliseconds";
    if common::role().is_some() {
        return serve_child();
    }
    let runs = common::size(20, 20);
    let rt = runtime();
    let (mut blocking, mut asynchronous) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let base = common::sock_path(&format!("death-{run}"));
        let mut child = server(TEST, &base, free_port(), 0);
        let c = NapClient::connect_waiting(&base, Duration::from_secs(20)).expect("connect");
        assert_eq!(c.pid().unwrap(), child.pid() as u64);
        // One blocking and one async call, each in a handler for a minute.
        let sync_call = {
            let c = c.clone();
            std::thread::spawn(move || {
                let r = c.nap(60_000);
                (r, Instant::now())
            })
        };
        let async_call = {
            let c = c.clone();
            rt.spawn(async move {
                let r = c.nap_later_async(60_000).await;
                (r, Instant::now())
            })
        };
        // Both are in flight (and parked) before the kill.
        std::thread::sleep(Duration::from_millis(30 * time_scale()));
        let killed = Instant::now();
        child.kill();
        let (r, at) = sync_call.join().unwrap();
        assert!(matches!(r, Err(rpal::Error::PeerDied { .. })), "blocking: {r:?}");
        blocking.push(at - killed);
        let (r, at) = rt.block_on(async_call).unwrap();
        assert!(matches!(r, Err(rpal::Error::PeerDied { .. })), "async: {r:?}");
        asynchronous.push(at.saturating_duration_since(killed));
    }
    let (b, a) = (median(blocking.clone()), median(asynchronous.clone()));
    println!(
        "lifecycle-row: SIGKILL to PeerDied over {runs} runs | blocking median {:.2} ms, max {:.2} ms | async median {:.2} ms, max {:.2} ms",
        b.as_secs_f64() * 1e3,
        blocking.iter().max().unwrap().as_secs_f64() * 1e3,
        a.as_secs_f64() * 1e3,
        asynchronous.iter().max().unwrap().as_secs_f64() * 1e3,
    );
    // The park slice is 100 ms: a median far below it is the death watch.
    let bound = Duration::from_millis(30 * time_scale());
    assert!(
        b < bound && a < bound,
        "blocking {b:?}, async {a:?}: noticed at the park slice?"
    );
}

#[test]
fn connect_waits_for_a_server_that_is_starting() {
    const TEST: &str = "connect_waits_for_a_server_that_is_starting";
    if common::role().is_some() {
        return serve_child();
    }
    // Nobody there: the wait ends at its deadline with the reason.
    let nowhere = common::sock_path("nowhere");
    let t0 = Instant::now();
    let e = NapClient::connect_waiting(&nowhere, Duration::from_millis(100)).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(50), "gave up early: {e}");
    assert!(rpal::__private::not_up_yet(&e), "{e}");
    // Something there that answers, but not as rpal: no waiting for it.
    let foreign = common::sock_path("foreign");
    let listener = std::os::unix::net::UnixListener::bind(&foreign).unwrap();
    let speaker = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let t0 = Instant::now();
    let e = NapClient::connect_waiting(&foreign, Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, rpal::Error::NotRpal { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "waited on a foreign server: {e}");
    speaker.join().unwrap();
    let _ = std::fs::remove_file(&foreign);

    // A server that takes 300 ms to start, over shared memory and TCP.
    let base = common::sock_path("starting");
    let port = free_port();
    let _child = server(TEST, &base, port, 300);
    let t0 = Instant::now();
    let c = NapClient::connect_waiting(&base, Duration::from_secs(20)).expect("shm");
    let waited = t0.elapsed();
    assert_eq!(c.nap(0).unwrap(), 0);
    let tcp = NapClient::connect_tcp_waiting(("127.0.0.1", port), Duration::from_secs(20)).expect("tcp");
    assert_eq!(tcp.nap(1).unwrap(), 1);
    println!(
        "lifecycle-row: connect waited {:.0} ms for a server that starts in 300 ms",
        waited.as_secs_f64() * 1e3
    );
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
}

#[test]
fn a_reconnecting_client_fails_only_the_calls_in_flight() {
    const TEST: &str = "a_reconnecting_client_fails_only_the_calls_in_flight";
    if common::role().is_some() {
        return serve_child();
    }
    let base = common::sock_path("reconnect");
    let port = free_port();
    let rt = runtime();
    let wait = Duration::from_secs(20);
    let mut first = server(TEST, &base, port, 0);
    let clients = [
        (
            "shm",
            NapClient::reconnecting(&base, rpal::ClientOptions::new("Nap"), wait).expect("shm"),
        ),
        (
            "tcp",
            NapClient::reconnecting_tcp(("127.0.0.1", port), wait).expect("tcp"),
        ),
    ];
    for (how, c) in &clients {
        assert_eq!(c.pid().unwrap(), first.pid() as u64, "{how}");
    }
    // A blocking and an async call in flight on each when the server dies.
    let in_flight: Vec<_> = clients
        .iter()
        .map(|(how, c)| {
            let (c2, c3) = (c.clone(), c.clone());
            let sync_call = std::thread::spawn(move || c2.nap(60_000));
            let async_call = rt.spawn(async move { c3.nap_later_async(60_000).await });
            (*how, sync_call, async_call)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50 * time_scale()));
    first.kill();
    for (how, sync_call, async_call) in in_flight {
        let r = sync_call.join().unwrap();
        assert!(
            matches!(
                r,
                Err(rpal::Error::PeerDied { .. } | rpal::Error::ConnectionLost { .. })
            ),
            "{how}, blocking: {r:?}"
        );
        let r = rt.block_on(async_call).unwrap();
        assert!(
            matches!(
                r,
                Err(rpal::Error::PeerDied { .. } | rpal::Error::ConnectionLost { .. })
            ),
            "{how}, async: {r:?}"
        );
    }
    // A new server on the same path and port: the next calls reconnect
    // (waiting for it to start), blocking and async alike.
    let second = server(TEST, &base, port, 200);
    for (how, c) in &clients {
        assert_eq!(c.pid().unwrap(), second.pid() as u64, "{how}");
        assert_eq!(rt.block_on(c.nap_later_async(3)).unwrap(), 3, "{how}");
        assert_eq!(c.channel().reconnects(), 1, "{how}");
    }
    println!("lifecycle-row: reconnecting clients (shm, tcp): in-flight calls failed, next calls reconnected once");
}
