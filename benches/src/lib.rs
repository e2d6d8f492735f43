//! Round-trip benchmarks between two real processes pinned to different
//! cores: the raw floors (spin, futex), rpal, and loopback TCP, all with the
//! same payload written by the caller and read back by the callee.
//!
//! The parent is the caller; each transport's callee runs in a child process
//! started from the same executable with `--child ROLE ARGS...`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpal_core::sys;

pub mod stub;

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// `raw-spin`, `raw-futex`, `rpal`, `tcp`, `local`, `rpal-stub`, `tcp-stub`, `alloc`.
    pub transport: &'static str,
    /// `busy`, `parked` or `async` for round trips, `write` for `local`; the
    /// implementation (`rpal`, `system`) for `alloc` rows.
    pub mode: &'static str,
    /// Payload bytes each way.
    pub payload: usize,
    /// Median round trip.
    pub p50_ns: u64,
    /// 99th percentile round trip.
    pub p99_ns: u64,
    /// Mean round trip.
    pub mean_ns: u64,
    /// Timed iterations.
    pub iters: usize,
}

impl Row {
    /// The row as one JSON object (field names are stable: tools read them).
    pub fn json(&self) -> String {
        // Alloc rows name the implementation `impl` and measure one alloc+free pair.
        let (key, measure) = if self.transport == "alloc" {
            ("impl", "alloc_free")
        } else if self.transport == "local" {
            ("mode", "local_write")
        } else {
            ("mode", "round_trip")
        };
        format!(
            "{{\"transport\":\"{}\",\"{key}\":\"{}\",\"payload\":{},\"measure\":\"{measure}\",\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{},\"iters\":{}}}",
            self.transport, self.mode, self.payload, self.p50_ns, self.p99_ns, self.mean_ns, self.iters
        )
    }
}

/// Something that can make one round trip carrying `value`, returning what
/// the callee sent back.
pub trait RoundTrip {
    /// One round trip.
    fn round_trip(&mut self, value: u64) -> u64;
}

/// Times `iters` round trips after `warmup` untimed ones, checking each
/// echo; returns every sample (ns).
pub fn measure_samples(rt: &mut dyn RoundTrip, warmup: usize, iters: usize) -> Vec<u64> {
    for i in 0..warmup {
        let v = 0xA5A5_0000_0000 + i as u64;
        assert_eq!(rt.round_trip(v), !v, "the callee must read the payload and answer");
    }
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters {
        let v = i as u64 + 1;
        let t0 = Instant::now();
        let back = rt.round_trip(v);
        samples.push(t0.elapsed().as_nanos() as u64);
        assert_eq!(back, !v, "the callee must read the payload and answer");
    }
    samples
}

/// As [`measure_samples`], summarized: p50, p99, mean.
pub fn measure(rt: &mut dyn RoundTrip, warmup: usize, iters: usize) -> (u64, u64, u64) {
    summarize(&mut measure_samples(rt, warmup, iters))
}

/// p50, p99 and mean of `samples` (sorted in place).
pub fn summarize(samples: &mut [u64]) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let mean = samples.iter().sum::<u64>() / samples.len() as u64;
    (pct(0.50), pct(0.99), mean)
}

// ---- allocator -------------------------------------------------------------

/// Pairs per timed sample: one alloc+free is ~20 ns, below the clock's resolution.
pub const ALLOC_BATCH: usize = 64;

/// Times alloc+free pairs of `size` bytes with rpal's arena (`rpal`) or the
/// system allocator (`system`); returns per-pair p50, p99, mean over `samples`.
pub fn measure_alloc(which: &str, size: usize, samples: usize) -> (u64, u64, u64) {
    let arena = rpal::Arena::global().expect("arena");
    let layout = std::alloc::Layout::from_size_align(size, 8).expect("layout");
    let pair = |touch: u8| {
        if which == "rpal" {
            let p = arena.alloc_raw(size, 8).expect("alloc");
            // SAFETY: `p` is a fresh block of `size` bytes; freed right after, unused since.
            unsafe {
                p.as_ptr().write_volatile(touch);
                arena.free_raw(p).expect("free");
            }
        } else {
            // SAFETY: `layout` has a non-zero size; the block is freed with the same layout.
            unsafe {
                let p = std::alloc::alloc(layout);
                assert!(!p.is_null());
                p.write_volatile(touch);
                std::alloc::dealloc(p, layout);
            }
        }
    };
    for i in 0..1000 {
        pair(i as u8);
    }
    let mut per_pair = Vec::with_capacity(samples);
    for s in 0..samples {
        let t0 = Instant::now();
        for i in 0..ALLOC_BATCH {
            pair((s + i) as u8);
        }
        per_pair.push(t0.elapsed().as_nanos() as u64 / ALLOC_BATCH as u64);
    }
    summarize(&mut per_pair)
}

// ---- child processes -------------------------------------------------------

/// A child process, killed and reaped on drop.
pub struct ChildGuard {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl ChildGuard {
    /// Starts `exe --child role args...` and waits for its first stdout line
    /// (its "ready" message, which may carry data such as a port).
    pub fn start(exe: &Path, role: &str, args: &[String]) -> std::io::Result<(ChildGuard, String)> {
        let mut child = Command::new(exe)
            .arg("--child")
            .arg(role)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut guard = ChildGuard { child, stdout };
        let mut line = String::new();
        guard.stdout.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other(format!(
                "child `{role}` exited before it was ready"
            )));
        }
        Ok((guard, line.trim().to_owned()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.stdout.read_to_end(&mut Vec::new());
    }
}

/// Pins this process's thread to `cpu` when the machine has more than one.
pub fn pin(cpu: usize) {
    let n = sys::cpus_online();
    if n > 1 {
        if let Err(e) = sys::pin_to_cpu(cpu % n) {
            eprintln!("rpal-bench: cannot pin to CPU {cpu}: {e}; figures will be noisier");
        }
    }
}

/// The server side of every busy row (`rpal busy`, `rpal-stub busy`), so
/// that their ratio compares the code and not two configurations: the
/// poller spins a fixed 200 us before parking, longer than the caller's own
/// work between calls (a 1 MiB write takes 20-60 us here), so no call pays
/// for a wake-up. (The default adaptive budget, 2-50 us, would park between
/// 1 MiB calls.)
pub fn busy_poller() -> rpal::PollerConfig {
    rpal::PollerConfig {
        spin_min: Duration::from_micros(200),
        spin_max: Duration::from_micros(200),
        ..rpal::PollerConfig::default()
    }
}

/// Runs a child role; called by the binary's `main` for `--child`.
pub fn run_child(role: &str, args: &[String]) -> rpal::Result<()> {
    pin(1);
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match role {
        "raw-spin" | "raw-futex" => {
            let fd: i32 = arg(0).parse().expect("fd");
            // SAFETY: the parent passed us this inherited memfd's number; we own it now.
            let page = SharedPage::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
            println!("ready");
            page.echo_loop(role == "raw-futex");
            Ok(())
        }
        "rpal-busy" | "rpal-parked" | "rpal-default" => {
            let server = rpal::raw::Server::bind(arg(0), rpal::ServerOptions::new("bench"))?;
            let cfg = match role {
                "rpal-parked" => rpal::PollerConfig::parked(),
                "rpal-busy" => busy_poller(),
                _ => rpal::PollerConfig::default(),
            };
            let serving = rpal::raw::serve(server, echo_handler, cfg)?;
            println!("ready");
            serving.join();
            Ok(())
        }
        "tcp" => {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| rpal::Error::io("bind loopback", e))?;
            println!(
                "{}",
                l.local_addr().map_err(|e| rpal::Error::io("local_addr", e))?.port()
            );
            let (mut s, _) = l.accept().map_err(|e| rpal::Error::io("accept", e))?;
            let _ = s.set_nodelay(true);
            let mut frame = [0u8; 16];
            while s.read_exact(&mut frame).is_ok() {
                let v = u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"));
                frame[8..16].copy_from_slice(&(!v).to_le_bytes());
                if s.write_all(&frame).is_err() {
                    break;
                }
            }
            Ok(())
        }
        "stub-busy" | "stub-parked" => stub::run_stub_server(&arg(0), role == "stub-parked"),
        "queue-producer" => queue_producer(
            &arg(0),
            arg(1).parse().expect("payload"),
            arg(2).parse().expect("count"),
        ),
        other => panic!("unknown child role {other}"),
    }
}

/// The callee of the rpal rows: reads the 8-byte payload, answers its complement.
pub fn echo_handler(req: &rpal::raw::Request<'_>, reply: &mut [u8]) -> Result<usize, rpal::RemoteStatus> {
    let v = u64::from_le_bytes(
        req.payload
            .get(..8)
            .ok_or(rpal::RemoteStatus::BadRequest)?
            .try_into()
            .expect("8 bytes"),
    );
    reply[..8].copy_from_slice(&(!v).to_le_bytes());
    Ok(8)
}

// ---- raw shared-memory floors ---------------------------------------------

/// One shared page: a ping line and a pong line, each a sequence word and
/// an 8-byte payload, on separate 128-byte lines.
pub struct SharedPage {
    base: *mut u8,
    fd: OwnedFd,
}

const PING: usize = 0;
const PONG: usize = 128;
const STOP: u32 = u32::MAX;

impl SharedPage {
    /// A fresh page, inheritable by children (no close-on-exec).
    pub fn new() -> std::io::Result<Self> {
        let m = memfd::MemfdOptions::default()
            .close_on_exec(false)
            .create("rpal-bench-raw")
            .map_err(std::io::Error::other)?;
        m.as_file().set_len(4096)?;
        Ok(Self::from_fd(m.into_file().into()))
    }

    fn from_fd(fd: OwnedFd) -> Self {
        let base = sys::map_file(std::os::fd::AsFd::as_fd(&fd), 4096).expect("map the shared page");
        Self { base, fd }
    }

    /// The descriptor number to pass to the child.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn seq(&self, line: usize) -> &AtomicU32 {
        // SAFETY: the page is mapped for our lifetime; the word is aligned and only used atomically.
        unsafe { &*(self.base.add(line) as *const AtomicU32) }
    }

    fn val(&self, line: usize) -> &AtomicU64 {
        // SAFETY: as in `seq`, 8 bytes further on.
        unsafe { &*(self.base.add(line + 8) as *const AtomicU64) }
    }

    fn wait_for(&self, line: usize, want: u32, futex: bool) -> u32 {
        loop {
            // Acquire: pairs with the Release store in `signal`.
            let now = self.seq(line).load(Ordering::Acquire);
            if now == want || now == STOP {
                return now;
            }
            if futex {
                sys::futex_wait(self.seq(line), now, None);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn signal(&self, line: usize, value: u32, futex: bool) {
        // Release: publishes the payload written before; pairs with the Acquire in `wait_for`.
        self.seq(line).store(value, Ordering::Release);
        if futex {
            sys::futex_wake(self.seq(line), 1);
        }
    }

    fn echo_loop(&self, futex: bool) {
        let mut n = 1u32;
        while self.wait_for(PING, n, futex) != STOP {
            let v = self.val(PING).load(Ordering::Relaxed);
            self.val(PONG).store(!v, Ordering::Relaxed);
            self.signal(PONG, n, futex);
            n = n.wrapping_add(1) % STOP;
        }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `from_fd` and nothing borrows it past `self`.
        unsafe { libc::munmap(self.base.cast(), 4096) };
    }
}

/// Raw atomic ping-pong (busy) or futex ping-pong (always sleeps).
pub struct RawPingPong {
    page: SharedPage,
    futex: bool,
    n: u32,
    _child: ChildGuard,
}

impl RawPingPong {
    /// Starts the echoing child.
    pub fn start(exe: &Path, futex: bool) -> std::io::Result<Self> {
        let page = SharedPage::new()?;
        let role = if futex { "raw-futex" } else { "raw-spin" };
        let (child, _) = ChildGuard::start(exe, role, &[page.raw_fd().to_string()])?;
        Ok(Self {
            page,
            futex,
            n: 0,
            _child: child,
        })
    }
}

impl RoundTrip for RawPingPong {
    fn round_trip(&mut self, value: u64) -> u64 {
        self.n = (self.n + 1) % STOP;
        self.page.val(PING).store(value, Ordering::Relaxed);
        self.page.signal(PING, self.n, self.futex);
        self.page.wait_for(PONG, self.n, self.futex);
        self.page.val(PONG).load(Ordering::Relaxed)
    }
}

impl Drop for RawPingPong {
    fn drop(&mut self) {
        self.page.signal(PING, STOP, self.futex);
    }
}

// ---- rpal and TCP ----------------------------------------------------------

/// rpal calls to a child server.
pub struct RpalRoundTrip {
    client: rpal::raw::Client,
    _child: ChildGuard,
    _path: PathBuf,
}

impl RpalRoundTrip {
    /// Starts a child server (`parked`: both sides park at once) and connects.
    pub fn start(exe: &Path, parked: bool) -> rpal::Result<Self> {
        let path = std::env::temp_dir().join(format!("rpal-bench-{}-{parked}.sock", std::process::id()));
        let role = if parked { "rpal-parked" } else { "rpal-busy" };
        let (child, _) = ChildGuard::start(exe, role, &[path.display().to_string()])
            .map_err(|e| rpal::Error::io("start the rpal server child", e))?;
        let mut opts = rpal::ClientOptions::new("bench");
        if parked {
            opts.wait = rpal::WaitConfig::parked();
        }
        opts.call_timeout = Some(Duration::from_secs(10));
        let client = rpal::raw::Client::connect(&path, opts)?;
        Ok(Self {
            client,
            _child: child,
            _path: path,
        })
    }
}

impl RoundTrip for RpalRoundTrip {
    fn round_trip(&mut self, value: u64) -> u64 {
        self.client
            .call_with(
                1,
                None,
                |buf| {
                    buf[..8].copy_from_slice(&value.to_le_bytes());
                    8
                },
                |reply, _| u64::from_le_bytes(reply[..8].try_into().expect("8-byte reply")),
            )
            .expect("rpal call")
    }
}

/// Loopback TCP (TCP_NODELAY) request/response with a 16-byte frame (method,
/// length, 8-byte payload), as an RPC over TCP would send.
pub struct TcpRoundTrip {
    sock: TcpStream,
    _child: ChildGuard,
}

impl TcpRoundTrip {
    /// Starts the echoing child and connects.
    pub fn start(exe: &Path) -> std::io::Result<Self> {
        let (child, port) = ChildGuard::start(exe, "tcp", &[])?;
        let sock = TcpStream::connect(("127.0.0.1", port.parse::<u16>().map_err(std::io::Error::other)?))?;
        sock.set_nodelay(true)?;
        Ok(Self { sock, _child: child })
    }
}

impl RoundTrip for TcpRoundTrip {
    fn round_trip(&mut self, value: u64) -> u64 {
        let mut frame = [0u8; 16];
        frame[0..4].copy_from_slice(&1u32.to_le_bytes());
        frame[4..8].copy_from_slice(&8u32.to_le_bytes());
        frame[8..16].copy_from_slice(&value.to_le_bytes());
        self.sock.write_all(&frame).expect("tcp write");
        self.sock.read_exact(&mut frame).expect("tcp read");
        u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"))
    }
}

// ---- queue throughput and idle cost ----------------------------------------

/// Method of the queue bench's setup call: body = the consumer's cursor
/// address; reply = the producer's first block.
const QUEUE_SETUP: u32 = 7;

/// Child side of the queue bench: streams `count` records of `payload`
/// bytes through a bare [`rpal::raw::queue::Producer`] to the connected parent.
fn queue_producer(path: &str, payload: usize, count: u64) -> rpal::Result<()> {
    use rpal::raw::queue::Producer;
    let server = rpal::raw::Server::bind(path, rpal::ServerOptions::new("queue-bench"))?;
    println!("ready");
    let mut conn = server.accept()?;
    let slot: std::cell::RefCell<Option<(Producer, u64)>> = std::cell::RefCell::new(None);
    let mut setup = |req: &rpal::raw::Request<'_>, reply: &mut [u8]| {
        let cursor = u64::from_le_bytes(
            req.payload
                .get(..8)
                .ok_or(rpal::RemoteStatus::BadRequest)?
                .try_into()
                .unwrap(),
        );
        let p = Producer::new().map_err(|_| rpal::RemoteStatus::BadRequest)?;
        reply[..8].copy_from_slice(&p.head().to_le_bytes());
        *slot.borrow_mut() = Some((p, cursor));
        Ok(8)
    };
    conn.serve_one(&mut setup)?;
    let (mut p, cursor_addr) = slot.borrow_mut().take().expect("setup call");
    let pid = conn.peer().cred.pid;
    // The consumer's cursor is in its memory: read it with access granted.
    let region = conn.peer().region.clone();
    let access = region.access();
    let cursor: &AtomicU64 = region.mem(&access).view(cursor_addr)?;
    let record = vec![0x5Au8; payload];
    for i in 0..count {
        // Backpressure: keep at most 64 blocks unread.
        while p.backlog_blocks() > 64 {
            p.recycle(cursor.load(Ordering::Acquire), pid)?;
            std::hint::spin_loop();
        }
        let buf = p.reserve(payload)?;
        if payload == 8 {
            buf.copy_from_slice(&i.to_le_bytes());
        } else {
            buf.copy_from_slice(&record);
            buf[..8.min(payload)].copy_from_slice(&i.to_le_bytes()[..8.min(payload)]);
        }
        p.commit(payload);
    }
    // Keep the blocks alive until the parent hangs up.
    while conn.serve_one(&mut |_: &rpal::raw::Request<'_>, _: &mut [u8]| Ok(0))? {}
    Ok(())
}

/// Records per second through one queue between two processes: a child
/// produces `count` records of `payload` bytes, this process consumes them
/// in place (reading every byte of each, and checking its sequence number).
pub fn measure_queue(exe: &Path, payload: usize, count: u64) -> rpal::Result<f64> {
    use rpal::raw::queue::Consumer;
    let path = std::env::temp_dir().join(format!("rpal-bench-q-{}-{payload}.sock", std::process::id()));
    let (_child, _) = ChildGuard::start(
        exe,
        "queue-producer",
        &[path.display().to_string(), payload.to_string(), count.to_string()],
    )
    .map_err(|e| rpal::Error::io("start the producer child", e))?;
    let mut client = rpal::raw::Client::connect(&path, rpal::ClientOptions::new("queue-bench"))?;
    let cursor_box = rpal::ShmBox::new(AtomicU64::new(0))?;
    let head = client.call(QUEUE_SETUP, &cursor_box.addr().to_le_bytes())?;
    let cursor: &AtomicU64 = &cursor_box;
    let head = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let region: &rpal::PeerRegion = &client.peer().region;
    let access = region.access();
    let mem = region.mem(&access);
    let mut rx = Consumer::new(mem, head, client.peer().cred.pid)?;
    let mut got = 0u64;
    let mut start = None;
    let mut check = 0u64;
    while got < count {
        match rx.next(mem)? {
            Some(rec) => {
                start.get_or_insert_with(Instant::now);
                // Read the whole record, as a consumer of the data would (so
                // records/s x payload is a real bandwidth), and check that it
                // is the next one.
                if payload >= 8 && rec[..8] != got.to_le_bytes() {
                    return Err(rpal::Error::io(
                        format!("queue record {got}"),
                        std::io::Error::other("out of order or corrupted"),
                    ));
                }
                check = rec.chunks_exact(8).fold(check, |h, w| {
                    h.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
                });
                got += 1;
            }
            None => {
                // Publish progress so the producer can recycle, then spin.
                cursor.store(rx.passed(), Ordering::Release);
                std::hint::spin_loop();
            }
        }
    }
    let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    std::hint::black_box(check);
    drop(client);
    Ok(if secs > 0.0 { count as f64 / secs } else { 0.0 })
}

/// User + system CPU ticks of process `pid`. An error, never 0, if its
/// `/proc` entry cannot be read: a dead server must not read as idle.
fn proc_cpu_ticks(pid: u32) -> rpal::Result<u64> {
    let bad = |why: String| rpal::Error::io(format!("read /proc/{pid}/stat"), std::io::Error::other(why));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| rpal::Error::io(format!("read /proc/{pid}/stat (did the server die?)"), e))?;
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| bad("no ')'".into()))?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let field = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad(format!("field {} missing or not a number", i + 3)))
    };
    Ok(field(11)? + field(12)?)
}

/// Resident KiB of process `pid` (an error if its `/proc` entry is gone).
fn proc_rss_kib(pid: u32) -> rpal::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| rpal::Error::io(format!("read /proc/{pid}/status (did the server die?)"), e))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| rpal::Error::io(format!("VmRSS of {pid}"), std::io::Error::other("missing")))
}

/// Idle cost of a server: `conns` connected clients (each made one call and
/// went silent); returns (CPU % over `window`, resident KiB per connection).
pub fn measure_idle(exe: &Path, conns: usize, window: Duration) -> rpal::Result<(f64, f64)> {
    let path = std::env::temp_dir().join(format!("rpal-bench-idle-{}.sock", std::process::id()));
    // The default configuration: what an idle server costs as deployed.
    let (child, _) = ChildGuard::start(exe, "rpal-default", &[path.display().to_string()])
        .map_err(|e| rpal::Error::io("start the idle server child", e))?;
    let pid = child.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = proc_rss_kib(pid)?;
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut c = rpal::raw::Client::connect(&path, rpal::ClientOptions::new("bench"))?;
        c.call(1, &7u64.to_le_bytes())?;
        clients.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = proc_rss_kib(pid)?;
    let cpu0 = proc_cpu_ticks(pid)?;
    std::thread::sleep(window);
    let cpu1 = proc_cpu_ticks(pid)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_pct = (cpu1 - cpu0) as f64 / hz / window.as_secs_f64() * 100.0;
    drop(clients);
    Ok((cpu_pct, rss1.saturating_sub(rss0) as f64 / conns as f64))
}
