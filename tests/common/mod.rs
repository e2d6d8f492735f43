//! Helpers for tests that run real child processes.
//!
//! A test re-runs its own test binary, filtered to itself, with
//! `RPAL_TEST_ROLE` set; the test function sees the role and plays the child.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The role this process plays, if it is a child.
pub fn role() -> Option<String> {
    std::env::var("RPAL_TEST_ROLE").ok()
}

/// An env var passed to the child.
pub fn arg(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

/// A child process killed and reaped when dropped, even if the test fails.
pub struct ChildGuard {
    pub child: Option<Child>,
}

impl ChildGuard {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            assert!(t0.elapsed() < limit, "child did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the child and asserts it succeeded.
    pub fn expect_success(&mut self) {
        let st = self.wait_timeout(Duration::from_secs(60));
        assert!(st.success(), "child failed: {st:?}");
    }

    /// Kills the child now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs test `test` of this binary as a child with `role` and `env`.
pub fn spawn(test: &str, role: &str, env: &[(&str, String)]) -> ChildGuard {
    spawn_with(test, role, env, false)
}

/// As [`spawn`]; `capture` pipes the child's stderr for inspection.
pub fn spawn_with(test: &str, role: &str, env: &[(&str, String)], capture: bool) -> ChildGuard {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("RPAL_TEST_ROLE", role)
        .env("RPAL_TEST_DIR", test_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    // The child's own harness lines ("running 1 test", "test result")
    // would repeat the parent's; its panics still reach stderr.
    // `RPAL_TEST_VERBOSE=1` shows them.
    if std::env::var_os("RPAL_TEST_VERBOSE").is_none() {
        cmd.stdout(Stdio::null());
    }
    if capture {
        cmd.stderr(Stdio::piped());
    }
    ChildGuard {
        child: Some(cmd.spawn().expect("spawn child")),
    }
}

/// Says that the calling test skips, and why, where a run's output shows it
/// even when the harness captures the test's output: one line
/// `skipped: TEST: REASON` written straight to the process's stderr
/// (`eprintln!` would be captured). `.ci/run` counts these lines.
pub fn skip(reason: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("?").to_string();
    // A newline first: the harness may have left "test NAME ... " unfinished.
    let _ = writeln!(std::io::stderr().lock(), "\nskipped: {name}: {reason}");
}

/// How much slower than native this machine runs the tests: 1, or
/// `RPAL_TEST_TIME_SCALE` (the pku-vm CI step sets it: emulation is 5-20x
/// slower). For the few tests whose setup needs wall time to pass, never for
/// asserting on speed.
pub fn time_scale() -> u64 {
    std::env::var("RPAL_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Whether the long stress sizes were asked for (`RPAL_STRESS=1`); CI runs
/// the short ones.
pub fn stress() -> bool {
    std::env::var("RPAL_STRESS").is_ok_and(|v| v == "1")
}

/// `full` with `RPAL_STRESS=1`, else `short` (and a quarter of it under
/// emulation, where each step is many times slower).
pub fn size(full: usize, short: usize) -> usize {
    if stress() {
        full
    } else if time_scale() > 1 {
        (short / 4).max(1)
    } else {
        short
    }
}

/// This test run's directory for sockets, port files and registries:
/// `rpal-test-<pid>` in the temp dir, made by the test process and removed
/// when it exits, whether its tests passed or not (an `atexit` handler:
/// libtest ends with `exit`). Children use their parent's, named in
/// `RPAL_TEST_DIR`, so a child that is killed leaves nothing of its own.
pub fn test_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove_dir() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("RPAL_TEST_DIR") {
            return PathBuf::from(d);
        }
        let d = std::env::temp_dir().join(format!("rpal-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("make the test directory");
        // SAFETY: registers a plain function, which touches only the
        // initialised static above, to run at exit.
        unsafe { libc::atexit(remove_dir) };
        d
    })
}

/// A socket path unique to this test run and `name`, in [`test_dir`].
pub fn sock_path(name: &str) -> PathBuf {
    test_dir().join(format!("{name}.sock"))
}

/// How a service test reaches its server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transport {
    Shm,
    Tcp,
    UnixStream,
}

/// Every transport a service test runs over.
pub const ALL: [Transport; 3] = [Transport::Shm, Transport::Tcp, Transport::UnixStream];

/// Retries `f` until the server is up (20 s at most).
pub fn retry<T>(mut f: impl FnMut() -> rpal::Result<T>) -> T {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if t0.elapsed() > Duration::from_secs(20) => panic!("cannot connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A server child's side: tells the test its TCP port in `base.port`
/// (written whole, then renamed, so a reader never sees half of it).
pub fn publish_port(base: &std::path::Path, port: u16) {
    std::fs::write(base.with_extension("tmp"), port.to_string()).unwrap();
    std::fs::rename(base.with_extension("tmp"), base.with_extension("port")).unwrap();
}

/// The test's side of [`publish_port`]: waits for the port.
pub fn read_port(base: &std::path::Path) -> u16 {
    retry(|| {
        std::fs::read_to_string(base.with_extension("port"))
            .map_err(|e| rpal::Error::io("port file", e))?
            .parse::<u16>()
            .map_err(|e| rpal::Error::io("port", std::io::Error::other(e)))
    })
}

/// A small multi-thread tokio runtime for a test's tasks.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Silences the panic hook's report and backtrace for panics whose message
/// contains `pattern` (in this process): for panics a test causes on
/// purpose, such as a handler refusing a hostile peer's pointer. Other
/// panics are still reported.
pub fn silence_panics(pattern: &'static str) {
    static PATTERNS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    PATTERNS.lock().unwrap_or_else(|p| p.into_inner()).push(pattern);
    HOOK.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let text = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            let quiet = PATTERNS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|p| text.contains(p));
            if !quiet {
                report(info);
            }
        }));
    });
}

/// Panics with `msg`, which must end with "on purpose", without the
/// panic hook's report and backtrace (see [`silence_panics`]).
pub fn quiet_panic(msg: &str) -> ! {
    assert!(msg.ends_with("on purpose"), "a quiet panic says it is on purpose");
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| silence_panics("on purpose"));
    std::panic::panic_any(msg.to_owned())
}
