//! `#[rpal::service]` end to end, against real server processes, over
//! shared memory, TCP and a Unix stream: typed calls, many calls in flight
//! from threads and tasks, deadlines, cancellation, panics, peer death and
//! bad input.

mod common;

use common::{ALL, Transport, retry, runtime};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

/// A point, passed by value or in a `ShmBox`.
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Point {
    x: u64,
    y: u64,
}

/// The server's arena, as `Arena::stats` reports it.
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct ArenaUse {
    in_use: u64,
    lent: u64,
}

/// The service under test.
#[rpal::service]
pub trait Kv {
    /// `a + b`.
    fn add(&self, a: u64, b: u64) -> u64;
    /// Sum of a slice read in place.
    fn sum(&self, xs: ShmSlice<u64>) -> u64;
    /// A greeting built in the server's memory and lent to the caller.
    fn greet(&self, name: ShmString) -> ShmString;
    /// Swaps the coordinates of a boxed point.
    fn swap(&self, p: ShmBox<Point>) -> Point;
    /// Sleeps, then answers `ms`.
    fn sleep_ms(&self, ms: u64) -> u64;
    /// Panics.
    fn boom(&self);
    /// The server's arena use: bytes in use, blocks lent.
    fn arena(&self) -> ArenaUse;
    /// The first `n` squares, built in the server's memory and lent to the caller.
    fn squares(&self, n: u64) -> ShmVec<u64>;
}

mod other {
    /// Same name as the real service, another signature.
    #[rpal::service]
    pub trait Kv {
        /// `add` on u32: a different method id and hash.
        fn add(&self, a: u32, b: u32) -> u32;
    }
}

struct KvImpl;

impl Kv for KvImpl {
    fn add(&self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    fn sum(&self, xs: &[u64]) -> u64 {
        xs.iter().sum()
    }
    fn greet(&self, name: &str) -> ShmString {
        ShmString::copy_from(&format!("hello, {name}")).expect("arena")
    }
    fn swap(&self, p: &Point) -> Point {
        Point { x: p.y, y: p.x }
    }
    fn sleep_ms(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
    fn boom(&self) {
        common::quiet_panic("the handler panicked on purpose");
    }
    fn arena(&self) -> ArenaUse {
        let s = Arena::global().expect("arena").stats();
        ArenaUse {
            in_use: s.in_use,
            lent: s.lent as u64,
        }
    }
    fn squares(&self, n: u64) -> ShmVec<u64> {
        let mut v = ShmVec::new();
        for i in 0..n {
            v.push(i * i).expect("arena");
        }
        v
    }
}

/// A server child: shared memory at `base`, a Unix stream at `base.stream`,
/// TCP on a port it writes to `base.port`.
struct ServerChild {
    guard: common::ChildGuard,
    base: PathBuf,
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = ServeKv::new(KvImpl)
        .host()
        .shm(&base)
        .poller(PollerConfig {
            threads: 2,
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
    ServerChild { guard, base }
}

impl ServerChild {
    fn port(&self) -> u16 {
        common::read_port(&self.base)
    }

    fn connect(&self, t: Transport) -> KvClient {
        match t {
            Transport::Shm => retry(|| KvClient::connect(&self.base)),
            Transport::Tcp => {
                let port = self.port();
                retry(|| KvClient::connect_tcp(("127.0.0.1", port)))
            }
            Transport::UnixStream => {
                self.port(); // bound after the stream socket
                retry(|| KvClient::connect_unix_stream(self.base.with_extension("stream")))
            }
        }
    }
}

#[test]
fn typed_calls_over_every_transport() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("typed_calls_over_every_transport", "typed");
    let xs = ShmSlice::from_slice(&(1..=1000u64).collect::<Vec<_>>()).unwrap();
    let name = ShmString::copy_from("rpal").unwrap();
    let point = ShmBox::new(Point { x: 1, y: 2 }).unwrap();
    let rt = runtime();
    for t in ALL {
        let kv = server.connect(t);
        assert_eq!(kv.channel().is_shm(), t == Transport::Shm);
        assert_eq!(kv.add(40, 2).unwrap(), 42, "{t:?}");
        assert_eq!(kv.sum(&xs).unwrap(), 500_500, "{t:?}");
        let hello = kv.greet(&name).unwrap();
        assert_eq!(&*hello.read(), "hello, rpal", "{t:?}");
        // A string result is a copy on every transport: its UTF-8 must hold
        // while it is read, and the server could rewrite its bytes.
        assert!(!hello.is_shared(), "{t:?}");
        drop(hello);
        // Other pointer results stay in the server's memory over shm.
        let sq = kv.squares(100).unwrap();
        assert_eq!(sq.read().last(), Some(&9801), "{t:?}");
        assert_eq!(sq.is_shared(), t == Transport::Shm);
        drop(sq);
        assert_eq!(kv.swap(&point).unwrap(), Point { x: 2, y: 1 }, "{t:?}");
        // A panicking handler fails that call only.
        let e = kv.boom().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Remote {
                    status: RemoteStatus::HandlerPanicked,
                    method: KvService::BOOM,
                    ref name,
                    ref message,
                } if name == "boom" && message == "the handler panicked on purpose"
            ),
            "{t:?}: {e}"
        );
        assert_eq!(kv.add(1, 1).unwrap(), 2, "the server goes on after a panic");
        rt.block_on(async {
            assert_eq!(kv.add_async(5, 6).await.unwrap(), 11, "{t:?}");
            assert_eq!(&*kv.greet_async(&name).await.unwrap().read(), "hello, rpal");
        });
        // A client built from another trait of the same name is refused.
        let e = match t {
            Transport::Shm => other::KvClient::connect(&server.base).unwrap_err(),
            Transport::Tcp => other::KvClient::connect_tcp(("127.0.0.1", server.port())).unwrap_err(),
            Transport::UnixStream => {
                other::KvClient::connect_unix_stream(server.base.with_extension("stream")).unwrap_err()
            }
        };
        // Same name, other methods: the error names each method that differs.
        match &e {
            Error::MethodTableMismatch { service, methods, .. } => {
                assert_eq!(service, "Kv", "{t:?}: {e}");
                assert!(
                    methods
                        .iter()
                        .any(|m| m.name == "add" && m.ours.is_some() && m.theirs.is_some()),
                    "{t:?}: {e}"
                );
            }
            other => panic!("{t:?}: expected MethodTableMismatch, got {other}"),
        }
    }
    assert_ne!(KvService::METHOD_HASH, other::KvService::METHOD_HASH);
    assert_ne!(KvService::ADD, other::KvService::ADD);
    // The generated ids are the runtime's hashes of the signatures as
    // written here and of their types' layout fingerprints; the table hash
    // covers the ids in signature order (a change of either side breaks this).
    use rpal::raw::{method_id_typed, service_hash_ids};
    let u = <u64 as ShmSafe>::LAYOUT;
    assert_eq!(KvService::ADD, method_id_typed("add(u64,u64)->u64", &[u, u, u]));
    assert_eq!(KvService::BOOM, method_id_typed("boom()->()", &[]));
    assert_eq!(
        KvService::GREET,
        method_id_typed("greet(ShmString)->ShmString", &[ShmString::LAYOUT, ShmString::LAYOUT])
    );
    // Sorted by signature: add, arena, boom, greet, sleep_ms, squares, sum, swap.
    let sorted = [
        KvService::ADD,
        KvService::ARENA,
        KvService::BOOM,
        KvService::GREET,
        KvService::SLEEP_MS,
        KvService::SQUARES,
        KvService::SUM,
        KvService::SWAP,
    ];
    assert_eq!(KvService::METHOD_HASH, service_hash_ids("Kv", &sorted));

    // Lent results went back: the server's arena is not leaking greetings
    // (copied on receipt, their blocks released at once) or squares (held
    // by the caller, ten at a time, and released when dropped).
    // A dropped result's release goes out with the next call, and the server
    // frees the block after that call's batch: so look twice.
    let kv = server.connect(Transport::Shm);
    let settled = |kv: &KvClient| {
        kv.arena().unwrap();
        kv.arena().unwrap()
    };
    (0..50).for_each(|_| drop(kv.greet(&name).unwrap())); // warm the server's caches
    let before = settled(&kv);
    for _ in 0..500 {
        assert_eq!(&*kv.greet(&name).unwrap().read(), "hello, rpal");
    }
    for _ in 0..50 {
        let held: Vec<_> = (0..10).map(|_| kv.squares(64).unwrap()).collect();
        assert!(held.iter().all(|s| s.is_shared() && s.read()[63] == 3969));
        let mid = kv.arena().unwrap();
        assert!(mid.lent >= before.lent + 10, "held squares are lent: {mid:?}");
    }
    let after = settled(&kv);
    eprintln!("server arena before {before:?}, after 500 greetings and 500 lent squares {after:?}");
    assert_eq!(after.lent, before.lent, "lent results were not released");
    assert_eq!(after.in_use, before.in_use, "the server's arena grew");
}

#[test]
fn many_threads_and_tasks_share_one_connection() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("many_threads_and_tasks_share_one_connection", "many");
    let rt = runtime();
    for t in ALL {
        let kv = server.connect(t);
        // Threads: each call's reply reaches its own caller.
        std::thread::scope(|s| {
            for th in 0..6u64 {
                let kv = kv.clone();
                s.spawn(move || {
                    let xs = ShmSlice::from_slice(&[th, 1, 2]).unwrap();
                    for i in 0..400u64 {
                        assert_eq!(kv.add(th << 32, i).unwrap(), (th << 32) + i, "{t:?}");
                        assert_eq!(kv.sum(&xs).unwrap(), th + 3);
                    }
                });
            }
        });
        // Tasks, with many calls in flight at once; backpressure waits,
        // nothing is dropped.
        let calls = rt.block_on(async {
            let mut tasks = Vec::new();
            for task in 0..500u64 {
                let kv = kv.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..4u64 {
                        assert_eq!(kv.add_async(task, i).await.unwrap(), task + i);
                    }
                    4
                }));
            }
            let mut n = 0;
            for task in tasks {
                n += task.await.unwrap();
            }
            n
        });
        assert_eq!(calls, 2000);
        assert_eq!(kv.channel().in_flight(), 0, "{t:?}");
    }
}

#[test]
fn deadlines_and_cancellation_discard_late_replies() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = start_server("deadlines_and_cancellation_discard_late_replies", "deadline");
    let rt = runtime();
    for t in ALL {
        let kv = server.connect(t);
        let hurried = kv.with_timeout(Duration::from_millis(50));
        let t0 = Instant::now();
        let e = hurried.sleep_ms(300).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{t:?}: {e}");
        assert!(
            t0.elapsed() < Duration::from_millis(280),
            "{t:?}: the deadline fired late"
        );
        // The late reply arrives while the next call waits: it is discarded.
        assert_eq!(kv.sleep_ms(400).unwrap(), 400, "{t:?}");
        rt.block_on(async {
            // An async deadline comes from the timing wheel.
            let e = hurried.sleep_ms_async(300).await.unwrap_err();
            assert!(matches!(e, Error::Timeout(_)), "{t:?}: {e}");
            // Dropping the future cancels the call.
            let dropped = tokio::time::timeout(Duration::from_millis(20), kv.sleep_ms_async(200)).await;
            assert!(dropped.is_err());
            assert_eq!(kv.channel().in_flight(), 0, "{t:?}: a cancelled call stays tracked");
            assert_eq!(kv.add_async(2, 3).await.unwrap(), 5);
            assert_eq!(kv.sleep_ms_async(250).await.unwrap(), 250);
        });
    }
}

#[test]
fn calls_in_flight_fail_when_the_server_dies() {
    if common::role().is_some() {
        return serve_child();
    }
    let rt = runtime();
    for t in ALL {
        let mut server = start_server("calls_in_flight_fail_when_the_server_dies", &format!("die-{t:?}"));
        let kv = server.connect(t);
        assert_eq!(kv.add(1, 2).unwrap(), 3);
        let blocked = {
            let kv = kv.clone();
            std::thread::spawn(move || kv.sleep_ms(10_000))
        };
        let waiting = {
            let kv = kv.clone();
            rt.spawn(async move { kv.sleep_ms_async(10_000).await })
        };
        std::thread::sleep(Duration::from_millis(200));
        let pid = server.guard.pid();
        let t0 = Instant::now();
        server.guard.kill();
        // Over TCP the server may be on another host: the connection is lost.
        let dead = |e: &Error| match t {
            Transport::Shm | Transport::UnixStream => matches!(e, Error::PeerDied { pid: p } if *p == pid),
            Transport::Tcp => matches!(e, Error::ConnectionLost { .. }),
        };
        let e = blocked.join().unwrap().unwrap_err();
        assert!(dead(&e), "{t:?}: {e}");
        let e = rt.block_on(waiting).unwrap().unwrap_err();
        assert!(dead(&e), "{t:?}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{t:?}: death noticed late");
        assert!(kv.add(1, 1).is_err(), "{t:?}: later calls fail at once");
    }
}

/// A hostile server for the `Kv` service: lies about result pointers and
/// never answers `sleep_ms`.
fn liar_child() {
    let path = common::arg("RPAL_TEST_SOCK");
    let mut opts = ServerOptions::new(KvService::NAME);
    opts.method_hash = KvService::METHOD_HASH;
    let server = Server::bind(&path, opts).unwrap();
    let handler = |req: &Request<'_>, reply: &mut [u8]| match req.method {
        KvService::GREET => {
            // A "string" at an address outside our region.
            reply[..8].copy_from_slice(&0x1000u64.to_le_bytes());
            reply[8..16].copy_from_slice(&5u64.to_le_bytes());
            Ok(16)
        }
        KvService::SLEEP_MS => {
            std::thread::sleep(Duration::from_secs(30));
            Ok(0)
        }
        _ => Err(RemoteStatus::UnknownMethod),
    };
    rpal::raw::serve(server, handler, PollerConfig::default())
        .unwrap()
        .join();
}

#[test]
fn bad_input_gets_a_typed_error_for_that_call_alone() {
    match common::role().as_deref() {
        Some("server") => return serve_child(),
        Some("liar") => return liar_child(),
        _ => {}
    }
    let test = "bad_input_gets_a_typed_error_for_that_call_alone";
    let server = start_server(test, "bad");
    // Raw calls against the generated dispatcher.
    let mut opts = ClientOptions::new(KvService::NAME);
    opts.method_hash = KvService::METHOD_HASH;
    let mut raw = retry(|| Client::connect(&server.base, opts.clone()));
    let e = raw.call(0x1234_5678, &[0; 16]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                status: RemoteStatus::UnknownMethod,
                ..
            }
        ),
        "{e}"
    );
    let e = raw.call(KvService::ADD, &[0; 3]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                status: RemoteStatus::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    let e = raw.call(KvService::ADD, &[0; 24]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                status: RemoteStatus::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    // A slice pointing outside the client's region.
    let mut bogus = [0u8; 16];
    bogus[..8].copy_from_slice(&0x10u64.to_le_bytes());
    bogus[8..].copy_from_slice(&4u64.to_le_bytes());
    let e = raw.call(KvService::SUM, &bogus).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                status: RemoteStatus::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    let mut args = [0u8; 16];
    args[..8].copy_from_slice(&40u64.to_le_bytes());
    args[8..].copy_from_slice(&2u64.to_le_bytes());
    assert_eq!(
        raw.call(KvService::ADD, &args).unwrap(),
        42u64.to_le_bytes(),
        "the connection survives"
    );

    // A server that lies about its result pointer, and one that never answers.
    let liar_path = common::sock_path("liar");
    let _liar = common::spawn(test, "liar", &[("RPAL_TEST_SOCK", liar_path.display().to_string())]);
    let kv = retry(|| KvClient::connect(&liar_path));
    let e = kv.greet(&ShmString::copy_from("x").unwrap()).unwrap_err();
    assert!(matches!(e, Error::InvalidPointer { .. }), "{e}");
    let e = kv.add(1, 2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                status: RemoteStatus::UnknownMethod,
                ..
            }
        ),
        "{e}"
    );
    let e = kv.with_timeout(Duration::from_millis(100)).sleep_ms(1).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    drop(server);
}
