//! kill -9 on either side, with real processes: the survivors keep working
//! and everything the dead process held comes back.
//!
//! - A client killed at a random point of a call (idle before a send, in a
//!   sync or an async handler, while it reads replies, while it holds lent
//!   blocks), again and again, while other clients keep calling: its
//!   connection, the server's mapping of its region, its lent blocks, its
//!   deferred calls and its registry entry are all reclaimed.
//! - A server killed while callers wait (blocking, parked, async): each gets
//!   `PeerDied` long before its deadline, later calls fail at once, and a
//!   new server on the same path is reachable.
//! - Either side killed in the middle of a handshake.
//!
//! Each test prints `crash-row:` lines with its figures:
//! `cargo test --release --test crash -- --nocapture 2>&1 | grep crash-row`.
//! 200 client kill cycles (1000 with `RPAL_STRESS=1`; 20 under pku-vm's
//! emulation, where each process start takes a second).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rpal::prelude::*;
use rpal::raw::Space;
use rpal::*;

#[rpal::service]
pub trait Crashy {
    /// For the clients that keep calling.
    fn add(&self, a: u64, b: u64) -> u64;
    /// Spins `us` microseconds in a sync handler, then returns `us`.
    fn work(&self, us: u64) -> u64;
    /// Sleeps `ms` in a sync handler (holds one poller thread).
    fn sleep(&self, ms: u64) -> u64;
    /// `n` bytes of `fill`, built in the server's memory and lent.
    fn lend(&self, n: u64, fill: u8) -> ShmVec<u8>;
    /// Sleeps `ms` on tokio: a deferred call while it sleeps.
    async fn nap(&self, ms: u64) -> u64;
}

/// Handlers running now, by kind: what the parent watches to kill a client
/// while its call is in a handler, and to see deferred calls reclaimed.
static WORKING: AtomicI64 = AtomicI64::new(0);
static NAPPING: AtomicI64 = AtomicI64::new(0);

/// Counts itself in or out of a gauge for as long as it lives (an aborted
/// async handler drops it too).
struct Gauge(&'static AtomicI64);

impl Gauge {
    fn new(g: &'static AtomicI64) -> Gauge {
        g.fetch_add(1, Ordering::SeqCst);
        Gauge(g)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Impl;

impl Crashy for Impl {
    fn add(&self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    fn work(&self, us: u64) -> u64 {
        let _g = Gauge::new(&WORKING);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_micros(us) {
            std::hint::spin_loop();
        }
        us
    }
    fn sleep(&self, ms: u64) -> u64 {
        let _g = Gauge::new(&WORKING);
        running_mark();
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
    fn lend(&self, n: u64, fill: u8) -> ShmVec<u8> {
        let mut v = ShmVec::new();
        // Allocation fails only when the arena is full; the client's
        // checks then see a remote error, which this test never expects.
        v.extend_from_slice(&vec![fill; n.min(1 << 20) as usize])
            .expect("room in the arena");
        v
    }
    async fn nap(&self, ms: u64) -> u64 {
        let _g = Gauge::new(&NAPPING);
        running_mark();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

/// In a server child: once `RPAL_TEST_RUNNING` handlers wait, says so by
/// creating the file named in `RPAL_TEST_MARK`.
fn running_mark() {
    let (Ok(mark), Ok(want)) = (std::env::var("RPAL_TEST_MARK"), std::env::var("RPAL_TEST_RUNNING")) else {
        return;
    };
    let want: i64 = want.parse().unwrap();
    if WORKING.load(Ordering::SeqCst) + NAPPING.load(Ordering::SeqCst) >= want {
        let _ = std::fs::write(mark, b"");
    }
}

/// A small deterministic generator (xorshift64*), seeded per run and printed,
/// so a failing run's kill points can be replayed with `RPAL_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("RPAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_nanos() as u64 | 1);
        eprintln!("crash: seed {seed} (RPAL_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One test at a time in this process: each compares what the process
/// holds (mappings, arena bytes) before and after, which another test's
/// connections would change.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits up to `limit` (scaled under emulation) for `done`; false if it never came.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit * common::time_scale() as u32 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Waits for the file `mark` (created by a child), or panics after `limit`.
fn await_mark(mark: &Path, limit: Duration) {
    assert!(eventually(limit, || mark.exists()), "{} never appeared", mark.display());
}

/// What a process holds of the shared window and its arena.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    /// Our connections (shm clients of the server).
    connections: usize,
    /// Peer regions mapped here, and their bytes.
    peer_maps: usize,
    peer_bytes: u64,
    /// Memfd mappings in /proc/self/maps (ours and peers').
    memfd_maps: usize,
    /// The arena's bytes in use, and blocks lent to peers.
    in_use: u64,
    lent: usize,
    /// Registry entries held by live processes.
    registry_live: usize,
}

fn held(connections: usize) -> Held {
    let space = Space::global().unwrap();
    let peers: Vec<_> = space
        .mapped()
        .into_iter()
        .filter(|(_, _, who)| matches!(who, rpal::raw::Occupant::Peer { .. }))
        .collect();
    let stats = Arena::global().unwrap().stats();
    Held {
        connections,
        peer_maps: peers.len(),
        peer_bytes: peers.iter().map(|p| p.1).sum(),
        memfd_maps: memfd_maps(),
        in_use: stats.in_use,
        lent: stats.lent,
        registry_live: space
            .registry_entries()
            .iter()
            .filter(|(_, o)| alive_as(o.pid, o.start_time))
            .count(),
    }
}

/// Whether `pid` is a live process that started at `start`.
fn alive_as(pid: i32, start: u64) -> bool {
    PeerId::of(pid).is_some_and(|p| p.start == start) && !zombie(pid)
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s[s.rfind(')').unwrap() + 1..].split_whitespace().next() == Some("Z"))
        .unwrap_or(true)
}

/// Mappings of rpal arenas (memfds) in this process, from the kernel's view.
fn memfd_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:rpal-arena"))
        .count()
}

/// Registry entries (live or not) that name one of `pids`.
fn registry_entries_of(pids: &[i32]) -> Vec<(usize, rpal::raw::SlotOwner)> {
    Space::global()
        .unwrap()
        .registry_entries()
        .into_iter()
        .filter(|(_, o)| pids.contains(&o.pid))
        .collect()
}

fn serve(path: &Path) -> Host {
    let mut opts = ServerOptions::new("");
    opts.handshake_timeout = Duration::from_secs(30);
    ServeCrashy::new(Impl)
        .host()
        .shm_with(path, opts)
        .poller(PollerConfig {
            threads: 2,
            ..PollerConfig::parked()
        })
        .start()
        .expect("start the host")
}

fn connections(host: &Host) -> usize {
    host.shm()
        .unwrap()
        .pollers()
        .iter()
        .map(|p| p.connections as usize)
        .sum()
}

fn connect(path: &Path) -> CrashyClient {
    common::retry(|| CrashyClient::connect(path)).with_timeout(Duration::from_secs(20 * common::time_scale()))
}

/// How many clients the first test kills.
fn kill_cycles() -> usize {
    if common::stress() {
        1000
    } else if common::time_scale() > 1 {
        20
    } else {
        200
    }
}

/// The kill points of a client, one per cycle in turn.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// Connected, no call sent.
    BeforeSend,
    /// In a sync handler (spinning).
    InSyncHandler,
    /// In an async handler (a deferred call).
    InAsyncHandler,
    /// Somewhere in a loop of calls whose replies it reads and checks.
    ReadingReplies,
    /// Holding lent results.
    HoldingLent,
}

const POINTS: [Point; 5] = [
    Point::BeforeSend,
    Point::InSyncHandler,
    Point::InAsyncHandler,
    Point::ReadingReplies,
    Point::HoldingLent,
];

/// The client side of a kill cycle: connects, gets to its point, creates
/// its mark, and carries on until it is killed.
fn victim() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let mark = common::arg("RPAL_TEST_MARK");
    let point = POINTS[common::arg("RPAL_TEST_POINT").parse::<usize>().unwrap()];
    let c = connect(&path);
    match point {
        Point::BeforeSend => {
            std::fs::write(&mark, b"").unwrap();
            std::thread::sleep(Duration::from_secs(3600));
        }
        Point::InSyncHandler => {
            std::fs::write(&mark, b"").unwrap();
            loop {
                assert_eq!(c.work(500).unwrap(), 500);
            }
        }
        Point::InAsyncHandler => {
            std::fs::write(&mark, b"").unwrap();
            let _ = c.nap(3_600_000);
            unreachable!("the nap outlives the test");
        }
        Point::ReadingReplies => {
            std::fs::write(&mark, b"").unwrap();
            for i in 0u64.. {
                let fill = i as u8;
                let v = c.lend(64 << 10, fill).unwrap();
                let got = v.read();
                assert!(got.iter().all(|&b| b == fill), "a reply was corrupted");
            }
        }
        Point::HoldingLent => {
            let held: Vec<_> = (0..4).map(|i| c.lend(256 << 10, i).unwrap()).collect();
            std::fs::write(&mark, b"").unwrap();
            std::thread::sleep(Duration::from_secs(3600));
            drop(held);
        }
    }
}

/// A client that keeps calling (and checking) until the file `RPAL_TEST_STOP`
/// exists, then writes its count of calls to `RPAL_TEST_COUNT`.
fn survivor() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let stop = PathBuf::from(common::arg("RPAL_TEST_STOP"));
    let c = connect(&path);
    let mut n = 0u64;
    while !stop.exists() {
        for _ in 0..64 {
            assert_eq!(c.add(n, 1).expect("a survivor's call"), n + 1);
            n += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    std::fs::write(common::arg("RPAL_TEST_COUNT"), n.to_string()).unwrap();
}

#[test]
fn clients_killed_at_any_point_are_reclaimed() {
    const TEST: &str = "clients_killed_at_any_point_are_reclaimed";
    match common::role().as_deref() {
        Some("victim") => return victim(),
        Some("survivor") => return survivor(),
        _ => {}
    }
    let _serial = serial();
    let cycles = kill_cycles();
    let path = common::sock_path("crash-clients");
    let stop = path.with_extension("stop");
    let _ = std::fs::remove_file(&stop);
    let host = serve(&path);
    let env = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("RPAL_TEST_SOCK", path.display().to_string()),
            ("RPAL_TEST_STOP", stop.display().to_string()),
        ];
        v.extend(extra.iter().cloned());
        v
    };
    let counts: Vec<PathBuf> = (0..2).map(|i| path.with_extension(format!("count{i}"))).collect();
    let mut survivors: Vec<_> = counts
        .iter()
        .map(|f| common::spawn(TEST, "survivor", &env(&[("RPAL_TEST_COUNT", f.display().to_string())])))
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || connections(&host) == 2),
        "the survivors never connected"
    );
    // The survivors' reply queues reach their steady size (a queue keeps a
    // second 64 KiB block once its first has filled) before the baseline.
    let calls = || host.shm().unwrap().server_stats().calls.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(30), || calls() >= 20_000),
        "the survivors are not calling"
    );
    let served0 = calls();
    let baseline = held(2);

    let mut rng = Rng::new();
    let mark = path.with_extension("ready");
    let mut killed = Vec::new();
    let mut peak = baseline.clone();
    let t_all = Instant::now();
    for cycle in 0..cycles {
        let point = cycle % POINTS.len();
        let _ = std::fs::remove_file(&mark);
        let mut child = common::spawn(
            TEST,
            "victim",
            &env(&[
                ("RPAL_TEST_MARK", mark.display().to_string()),
                ("RPAL_TEST_POINT", point.to_string()),
            ]),
        );
        await_mark(&mark, Duration::from_secs(30));
        let pid = child.pid();
        let start = PeerId::of(pid).expect("the victim runs").start;
        match POINTS[point] {
            Point::InSyncHandler => assert!(
                eventually(Duration::from_secs(10), || WORKING.load(Ordering::SeqCst) > 0),
                "the victim's sync call never reached its handler"
            ),
            Point::InAsyncHandler => assert!(
                eventually(Duration::from_secs(10), || NAPPING.load(Ordering::SeqCst) > 0),
                "the victim's async call never reached its handler"
            ),
            Point::HoldingLent => {
                let arena = Arena::global().unwrap();
                let me = PeerId { pid, start };
                assert!(
                    eventually(Duration::from_secs(10), || arena.lent_to(me).1 >= 4 * (256 << 10)),
                    "the victim holds no lent blocks"
                );
            }
            Point::BeforeSend | Point::ReadingReplies => {}
        }
        // A random moment within the next 2 ms: inside a call or between two.
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        let now = held(connections(&host));
        if now.in_use > peak.in_use {
            peak = now;
        }
        child.kill();
        killed.push((pid, start));
    }
    let kill_time = t_all.elapsed();

    // Everything the victims held comes back (their deaths are seen by
    // pidfd; the last few may still be in flight).
    let t0 = Instant::now();
    let back = eventually(Duration::from_secs(10), || {
        held(connections(&host)) == baseline
            && WORKING.load(Ordering::SeqCst) == 0
            && NAPPING.load(Ordering::SeqCst) == 0
    });
    let after = held(connections(&host));
    let reclaim = t0.elapsed();
    let pids: Vec<i32> = killed.iter().map(|k| k.0).collect();
    let left: Vec<_> = registry_entries_of(&pids)
        .into_iter()
        .filter(|(_, o)| killed.contains(&(o.pid, o.start_time)))
        .collect();
    eprintln!(
        "crash-row: client kills | {cycles} cycles in {:.1} s | before {baseline:?} | peak in-use {} B, lent {} | after {after:?} (back in {:.0} ms) | victims' registry entries left {}",
        kill_time.as_secs_f64(),
        peak.in_use,
        peak.lent,
        reclaim.as_secs_f64() * 1e3,
        left.len()
    );
    assert!(back, "not everything came back: before {baseline:?}, after {after:?}");
    assert!(left.is_empty(), "registry entries of killed clients remain: {left:?}");
    assert_eq!(WORKING.load(Ordering::SeqCst), 0, "sync handlers still run");
    assert_eq!(
        NAPPING.load(Ordering::SeqCst),
        0,
        "deferred calls of dead clients still run"
    );

    // The survivors called throughout, every call checked, none failed.
    std::fs::write(&stop, b"").unwrap();
    let mut total = 0;
    for (s, f) in survivors.iter_mut().zip(&counts) {
        s.expect_success();
        let n: u64 = std::fs::read_to_string(f).unwrap().parse().unwrap();
        assert!(n > 0, "a survivor made no call");
        total += n;
        let _ = std::fs::remove_file(f);
    }
    let served = calls() - served0;
    eprintln!(
        "crash-row: survivors | {total} calls checked, all answered | server answered {served} calls during the kills"
    );
    let _ = std::fs::remove_file(&stop);
    host.shutdown();
}

/// A server child for the server-kill tests: serves `RPAL_TEST_SOCK` until killed.
fn server_child() {
    let host = serve(Path::new(&common::arg("RPAL_TEST_SOCK")));
    host.join();
}

/// Files in /dev/shm now (rpal keeps none there but its registry).
fn dev_shm() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_killed_server_fails_its_waiting_callers_with_peer_died() {
    const TEST: &str = "a_killed_server_fails_its_waiting_callers_with_peer_died";
    if common::role().as_deref() == Some("server") {
        return server_child();
    }
    let _serial = serial();
    let path = common::sock_path("crash-server");
    let mark = path.with_extension("running");
    let _ = std::fs::remove_file(&mark);
    let shm_before = dev_shm();
    let env = [
        ("RPAL_TEST_SOCK", path.display().to_string()),
        ("RPAL_TEST_MARK", mark.display().to_string()),
        ("RPAL_TEST_RUNNING", "3".to_string()),
    ];
    let mut server = common::spawn(TEST, "server", &env);
    let deadline = Duration::from_secs(20 * common::time_scale());
    let blocked = connect(&path).with_timeout(deadline);
    let mut parked_opts = ClientOptions::new("");
    parked_opts.wait = WaitConfig::parked();
    let parked = common::retry(|| CrashyClient::connect_with(&path, parked_opts.clone())).with_timeout(deadline);
    let asynced = connect(&path).with_timeout(deadline);
    let server_pid = server.pid();
    let region = match blocked.channel() {
        Channel::Shm(s) => s.with_client(|c| c.peer().region.addr()),
        _ => unreachable!("a shared-memory client"),
    };
    assert_eq!(blocked.add(1, 2).unwrap(), 3);

    // Three callers waiting in the server's handlers, then kill -9.
    type Waiter = std::thread::JoinHandle<(rpal::Error, Instant)>;
    let wait = |f: Box<dyn FnOnce() -> rpal::Result<u64> + Send>| -> Waiter {
        std::thread::spawn(move || (f().expect_err("the server died"), Instant::now()))
    };
    let waiters: Vec<(&str, Waiter)> = vec![
        ("blocking", {
            let c = blocked.clone();
            wait(Box::new(move || c.nap(3_600_000)))
        }),
        ("parked", {
            let c = parked.clone();
            wait(Box::new(move || c.nap(3_600_000)))
        }),
        ("async", {
            let c = asynced.clone();
            wait(Box::new(move || common::runtime().block_on(c.nap_async(3_600_000))))
        }),
    ];
    await_mark(&mark, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(20)); // all three are asleep in their waits
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(server_pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let mut worst = Duration::ZERO;
    for (kind, w) in waiters {
        let (e, at) = w.join().unwrap();
        let took = at - killed;
        worst = worst.max(took);
        eprintln!(
            "crash-row: server killed | {kind} caller | {e} after {:.1} ms (deadline {deadline:?})",
            took.as_secs_f64() * 1e3
        );
        assert!(matches!(e, Error::PeerDied { pid } if pid == server_pid), "{kind}: {e}");
        // Well under the deadline: the death was seen, not timed out.
        assert!(took < deadline / 10, "{kind}: PeerDied after {took:?}");
    }
    server.wait_timeout(Duration::from_secs(10));

    // Later calls fail at once.
    for c in [&blocked, &parked, &asynced] {
        let t0 = Instant::now();
        let e = c.add(1, 1).unwrap_err();
        assert!(matches!(e, Error::PeerDied { .. } | Error::Closed { .. }), "{e}");
        assert!(t0.elapsed() < deadline / 10, "a later call took {:?}", t0.elapsed());
    }
    drop((blocked, parked, asynced));

    // Nothing of the dead server stays here.
    let space = Space::global().unwrap();
    assert_eq!(
        space.occupant(region),
        None,
        "the dead server's region is still recorded"
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let at = format!("{region:x}-");
    assert!(
        !maps.lines().any(|l| l.starts_with(&at) && l.contains("memfd:")),
        "the dead server's memfd is still mapped"
    );
    let entries = registry_entries_of(&[server_pid]);
    assert!(
        entries.is_empty(),
        "the dead server's registry entry stays: {entries:?}"
    );
    assert_eq!(dev_shm(), shm_before, "files were left in /dev/shm");

    // A new server on the same path (its socket file was left by the dead one).
    let _ = std::fs::remove_file(&mark);
    let mut again = common::spawn(TEST, "server", &env[..1]);
    let t0 = Instant::now();
    let c = connect(&path);
    assert_eq!(c.add(2, 3).unwrap(), 5);
    eprintln!(
        "crash-row: server killed | slowest PeerDied {:.1} ms; later calls fail at once; nothing left in the window, the registry or /dev/shm; reconnected to a new server in {:.0} ms",
        worst.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    drop(c);
    again.kill();
    let _ = std::fs::remove_file(&path);
}

/// The client side of a handshake, stopped halfway: connects, sends the
/// first half of a hello, says so, and waits to be killed.
fn half_hello() {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(common::arg("RPAL_TEST_SOCK")).unwrap();
    let hello = rpal::raw::handshake::Hello::new(rpal::raw::handshake::Kind::Hello).encode();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    std::fs::write(common::arg("RPAL_TEST_MARK"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

/// Connects, calls once and hangs up, again and again, until killed.
fn reconnector() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    std::fs::write(common::arg("RPAL_TEST_MARK"), b"").unwrap();
    for i in 0u64.. {
        if let Ok(c) = CrashyClient::connect(&path) {
            let _ = c.add(i, 1);
        }
    }
}

/// The server side of a handshake, stopped halfway: accepts, reads the
/// client's hello, says so, and waits to be killed.
fn mute_server() {
    use std::io::Read;
    let path = common::arg("RPAL_TEST_SOCK");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let _ = s.read(&mut [0u8; 512]);
    std::fs::write(common::arg("RPAL_TEST_MARK"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

#[test]
fn a_handshake_survives_either_side_killed_midway() {
    const TEST: &str = "a_handshake_survives_either_side_killed_midway";
    match common::role().as_deref() {
        Some("half-hello") => return half_hello(),
        Some("reconnector") => return reconnector(),
        Some("mute-server") => return mute_server(),
        Some("server") => return server_child(),
        Some("once") => {
            let c = connect(Path::new(&common::arg("RPAL_TEST_SOCK")));
            assert_eq!(c.add(1, 1).unwrap(), 2);
            return;
        }
        _ => {}
    }
    let _serial = serial();
    let mut rng = Rng::new();
    let rounds = if common::time_scale() > 1 { 3 } else { 10 };
    // Handshakes may take 30 s: an end seen sooner came from the death.
    let handshake_timeout = Duration::from_secs(30);
    let prompt = Duration::from_secs(3 * common::time_scale());

    // The client killed mid-handshake: after half a hello, and at random
    // points of real connects, against a server in this process.
    let path = common::sock_path("crash-hs");
    let mark = path.with_extension("ready");
    let host = serve(&path);
    let env = [
        ("RPAL_TEST_SOCK", path.display().to_string()),
        ("RPAL_TEST_MARK", mark.display().to_string()),
    ];
    let stats = host.shm().unwrap().server_stats();
    let rejected = || stats.rejected.load(Ordering::Relaxed);
    let baseline = held(0);
    let mut killed = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&mark);
        let mut child = common::spawn(TEST, "half-hello", &env);
        await_mark(&mark, Duration::from_secs(30));
        let before = rejected();
        killed.push(child.pid());
        child.kill();
        let t0 = Instant::now();
        assert!(
            eventually(prompt, || rejected() > before),
            "the half-done handshake outlived its client"
        );
        slowest = slowest.max(t0.elapsed());
    }
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&mark);
        let mut child = common::spawn(TEST, "reconnector", &env);
        await_mark(&mark, Duration::from_secs(30));
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        killed.push(child.pid());
        child.kill();
    }
    let back = eventually(Duration::from_secs(10), || held(connections(&host)) == baseline);
    let after = held(connections(&host));
    let live_left: Vec<_> = registry_entries_of(&killed)
        .into_iter()
        .filter(|(_, o)| alive_as(o.pid, o.start_time))
        .collect();
    eprintln!(
        "crash-row: clients killed mid-handshake | {rounds} after half a hello (server gave up at most {:.2} ms after the kill returned, timeout {handshake_timeout:?}), {rounds} at random points of connect loops | accepted {} rejected {} | before {baseline:?} | after {after:?}",
        slowest.as_secs_f64() * 1e3,
        stats.accepted.load(Ordering::Relaxed),
        rejected(),
    );
    assert!(back, "the server kept something: before {baseline:?}, after {after:?}");
    assert!(live_left.is_empty(), "{live_left:?}");
    // A fresh client (another process: this one is the server) is served.
    common::spawn(TEST, "once", &env).expect_success();
    host.shutdown();

    // The server killed mid-handshake: one that read the hello and went
    // quiet, then real servers killed at random moments of connect loops.
    let path = common::sock_path("crash-hs-server");
    let env = [
        ("RPAL_TEST_SOCK", path.display().to_string()),
        ("RPAL_TEST_MARK", mark.display().to_string()),
    ];
    let mut opts = ClientOptions::new("");
    opts.handshake_timeout = handshake_timeout;
    let _ = std::fs::remove_file(&mark);
    let mut mute = common::spawn(TEST, "mute-server", &env);
    let attempt = {
        let (path, opts) = (path.clone(), opts.clone());
        std::thread::spawn(move || {
            let r = common::retry(|| match CrashyClient::connect_with(&path, opts.clone()) {
                // Not listening yet: retried.
                Err(Error::Io { .. }) => Err(Error::Timeout(Duration::ZERO)),
                other => Ok(other),
            });
            (r.map(|_| ()), Instant::now())
        })
    };
    await_mark(&mark, Duration::from_secs(30));
    let server_pids = vec![mute.pid()];
    mute.kill();
    let t0 = Instant::now();
    let (r, at) = attempt.join().unwrap();
    let e = r.expect_err("a handshake with a dead server");
    let took = at.saturating_duration_since(t0);
    assert!(took < prompt, "the client saw the death after {took:?}");
    eprintln!(
        "crash-row: server killed mid-handshake | the client got `{e}` {:.2} ms after the kill returned (timeout {handshake_timeout:?})",
        took.as_secs_f64() * 1e3
    );
    let mut server_pids = server_pids;
    let (mut ok, mut failed, mut longest) = (0, 0, Duration::ZERO);
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&path);
        let mut server = common::spawn(TEST, "server", &env[..1]);
        server_pids.push(server.pid());
        assert!(
            eventually(Duration::from_secs(30), || path.exists()),
            "the server never bound"
        );
        // Connects and calls on another thread while the server is killed
        // at a random moment: in a handshake, a call, or between them.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = {
            let (path, opts, stop) = (path.clone(), opts.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut longest) = (0, 0, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match CrashyClient::connect_with(&path, opts.clone()).and_then(|c| c.add(1, 2)) {
                        Ok(3) => ok += 1,
                        Ok(v) => panic!("a wrong answer: {v}"),
                        Err(_) => failed += 1,
                    }
                    longest = longest.max(t.elapsed());
                }
                (ok, failed, longest)
            })
        };
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        server.kill();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let (o, f, l) = looping.join().expect("the connect loop");
        (ok, failed, longest) = (ok + o, failed + f, longest.max(l));
        assert!(l < prompt, "a connect or call took {l:?}");
        // Connects to the dead server fail at once.
        let t = Instant::now();
        assert!(CrashyClient::connect_with(&path, opts.clone()).is_err());
        assert!(
            t.elapsed() < prompt,
            "a connect to a dead server took {:?}",
            t.elapsed()
        );
    }
    let left: Vec<_> = registry_entries_of(&server_pids)
        .into_iter()
        .filter(|(_, o)| alive_as(o.pid, o.start_time))
        .collect();
    let here = held(0);
    eprintln!(
        "crash-row: servers killed during connect loops | {rounds} servers | {ok} connects and calls succeeded, {failed} failed with an error, the longest took {:.1} ms | this process now {here:?}",
        longest.as_secs_f64() * 1e3
    );
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(here.peer_maps, 0, "a dead server's region is still mapped here");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&mark);
}
