//! Who may connect, and what a connected peer can do to our memory, with
//! real processes: peers the policy refuses (another uid, another gid, not
//! on the allow list) get `PermissionDenied` and the server logs who they
//! were; the socket files are 0600; a received memfd cannot be resized or
//! mapped writable; and a write into a peer's region faults.
//!
//! The other-uid and other-gid cases need root (the child drops to uid or
//! gid 65534); elsewhere they skip and say why. Each case prints an
//! `access-row:` line.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rpal::prelude::*;
use rpal::*;

#[rpal::service]
pub trait Guarded {
    /// `a + b`.
    fn add(&self, a: u64, b: u64) -> u64;
}

struct Impl;

impl Guarded for Impl {
    fn add(&self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
}

/// The uid and gid the refused children drop to.
const NOBODY: u32 = 65534;

/// What the servers of this process log (a tracing subscriber writes here).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::WARN)
            .init();
    });
}

/// The log lines that mention `pid` as the refused peer.
fn logged_refusal(pid: i32) -> Vec<String> {
    let log = String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    log.lines()
        .filter(|l| l.contains("refused by policy") && l.contains(&format!("pid={pid} ")))
        .map(str::to_owned)
        .collect()
}

/// Tests in this file share the log and the registry of uid 65534.
static SERIAL: Mutex<()> = Mutex::new(());

/// A server in this process with `policy`, its socket open to everyone
/// (`0o666`) so that the policy, not the file mode, decides.
fn serve(name: &str, policy: PeerPolicy) -> (Host, PathBuf) {
    capture_logs();
    let path = common::sock_path(name);
    let mut opts = ServerOptions::new("");
    opts.policy = policy;
    opts.socket_mode = 0o666;
    let host = ServeGuarded::new(Impl)
        .host()
        .shm_with(&path, opts)
        .poller(PollerConfig::parked())
        .start()
        .expect("start the host");
    (host, path)
}

/// A child playing `role`, optionally under another uid or gid. `None` if
/// the kernel refused the switch (no CAP_SETUID/CAP_SETGID).
fn spawn_as(test: &str, role: &str, path: &Path, uid: Option<u32>, gid: Option<u32>) -> Option<common::ChildGuard> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("RPAL_TEST_ROLE", role)
        .env("RPAL_TEST_SOCK", path)
        .env("RPAL_TEST_DIR", common::test_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(g) = gid {
        cmd.gid(g);
    }
    if let Some(u) = uid {
        cmd.uid(u);
    }
    match cmd.spawn() {
        Ok(child) => Some(common::ChildGuard { child: Some(child) }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => None,
        Err(e) => panic!("spawn: {e}"),
    }
}

/// In a child: connects and expects to be refused by the policy, with its
/// own credentials in the error.
fn expect_refused() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let e = GuardedClient::connect(&path).expect_err("the policy refuses us");
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let me = std::process::id() as i32;
    assert!(
        matches!(e, Error::PermissionDenied { uid: u, gid: g, pid } if u == uid && g == gid && pid == me),
        "{e}"
    );
    eprintln!("refused as expected: {e}");
}

/// In a child: connects and calls.
fn expect_allowed() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let c = GuardedClient::connect(&path).expect("the policy lets us in");
    assert_eq!(c.add(2, 3).unwrap(), 5);
}

fn child_role() -> bool {
    match common::role().as_deref() {
        Some("refused") => expect_refused(),
        Some("allowed") => expect_allowed(),
        Some("scribbler") => scribble(),
        _ => return false,
    }
    true
}

/// Runs one policy case: the child must exit 0 (its own assertions), and a
/// refused one must appear in the server's log with its pid, uid and gid.
fn case(test: &str, what: &str, policy: PeerPolicy, uid: Option<u32>, gid: Option<u32>, refused: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let registry = PathBuf::from(format!("/dev/shm/rpal-{}.slots", uid.unwrap_or(0)));
    let had_registry = registry.exists();
    let (host, path) = serve(&format!("access-{}", what.replace(' ', "-")), policy.clone());
    let role = if refused { "refused" } else { "allowed" };
    let Some(mut child) = spawn_as(test, role, &path, uid, gid) else {
        common::skip(&format!(
            "{what}: cannot start a child as uid {uid:?} gid {gid:?} (no CAP_SETUID/CAP_SETGID)"
        ));
        return;
    };
    let pid = child.pid();
    child.expect_success();
    let stats = host.shm().unwrap().server_stats();
    let (accepted, rejected) = (
        stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
        stats.rejected.load(std::sync::atomic::Ordering::Relaxed),
    );
    let lines = logged_refusal(pid);
    eprintln!(
        "access-row: {what} | policy {policy:?} | child uid {} gid {} | {} | server: accepted {accepted}, rejected {rejected} | log: {}",
        uid.map_or("same".into(), |u| u.to_string()),
        gid.map_or("same".into(), |g| g.to_string()),
        if refused { "PermissionDenied" } else { "served" },
        lines.first().map_or("-", |l| l.trim())
    );
    if refused {
        assert_eq!((accepted, rejected), (0, 1));
        assert_eq!(lines.len(), 1, "the server did not log the refusal of pid {pid}");
        let l = &lines[0];
        if let Some(u) = uid {
            assert!(l.contains(&format!("uid={u}")), "{l}");
        }
        if let Some(g) = gid {
            assert!(l.contains(&format!("gid={g}")), "{l}");
        }
    } else {
        assert_eq!((accepted, rejected), (1, 0));
    }
    host.shutdown();
    let _ = std::fs::remove_file(&path);
    if !had_registry && uid.is_some() {
        // The child's own uid's registry (it was made for this test).
        let _ = std::fs::remove_file(&registry);
    }
}

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn another_uid_is_refused() {
    const TEST: &str = "another_uid_is_refused";
    if child_role() {
        return;
    }
    if !root() {
        return common::skip("needs root to run a child under another uid");
    }
    case(
        TEST,
        "another uid",
        PeerPolicy::SameUid,
        Some(NOBODY),
        Some(NOBODY),
        true,
    );
}

#[test]
fn another_gid_is_refused() {
    const TEST: &str = "another_gid_is_refused";
    if child_role() {
        return;
    }
    if !root() {
        return common::skip("needs root to run a child under another gid");
    }
    // SAFETY: getgid cannot fail.
    let mine = unsafe { libc::getgid() };
    case(
        TEST,
        "another gid",
        PeerPolicy::AllowGids(vec![mine]),
        None,
        Some(NOBODY),
        true,
    );
    // The same policy lets a child of our own gid in.
    case(
        TEST,
        "the allowed gid",
        PeerPolicy::AllowGids(vec![mine]),
        None,
        None,
        false,
    );
}

#[test]
fn a_uid_not_on_the_allow_list_is_refused() {
    const TEST: &str = "a_uid_not_on_the_allow_list_is_refused";
    if child_role() {
        return;
    }
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    case(
        TEST,
        "not on the allow list",
        PeerPolicy::AllowUids(vec![me.wrapping_add(1)]),
        None,
        None,
        true,
    );
    case(
        TEST,
        "on the allow list",
        PeerPolicy::AllowUids(vec![me]),
        None,
        None,
        false,
    );
}

#[test]
fn socket_files_are_0600() {
    if child_role() {
        return;
    }
    let shm = common::sock_path("mode-shm");
    let stream = common::sock_path("mode-stream");
    let host = ServeGuarded::new(Impl)
        .host()
        .shm(&shm)
        .unix_stream(&stream)
        .start()
        .unwrap();
    for p in [&shm, &stream] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        eprintln!("access-row: socket mode | {} | {mode:o}", p.display());
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    host.shutdown();
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_file(&stream);
}

/// A server child for the memfd test: serves until killed.
fn server_child() {
    let host = ServeGuarded::new(Impl)
        .host()
        .shm(common::arg("RPAL_TEST_SOCK"))
        .poller(PollerConfig::parked())
        .start()
        .unwrap();
    host.join();
}

#[test]
fn a_received_memfd_cannot_be_resized_or_mapped_writable() {
    const TEST: &str = "a_received_memfd_cannot_be_resized_or_mapped_writable";
    if common::role().as_deref() == Some("server") {
        return server_child();
    }
    let path = common::sock_path("memfd");
    let _server = common::spawn(TEST, "server", &[("RPAL_TEST_SOCK", path.display().to_string())]);
    let c = common::retry(|| GuardedClient::connect(&path));
    assert_eq!(c.add(1, 1).unwrap(), 2);
    let Channel::Shm(shm) = c.channel() else {
        unreachable!("a shared-memory client")
    };
    shm.with_client(|cl| {
        let region = &cl.peer().region;
        let fd = region.memfd().as_raw_fd();
        let len = region.len() as libc::off_t;
        // SAFETY: fcntl, ftruncate, mmap and pwrite on a descriptor we hold;
        // the mmap asks for a fresh placement and is unmapped if it works.
        let (seals, grow, shrink, map, write) = unsafe {
            let seals = libc::fcntl(fd, libc::F_GET_SEALS);
            let grow = (libc::ftruncate(fd, len + 4096), std::io::Error::last_os_error());
            let shrink = (libc::ftruncate(fd, len - 4096), std::io::Error::last_os_error());
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            let map = (p, std::io::Error::last_os_error());
            if p != libc::MAP_FAILED {
                libc::munmap(p, 4096);
            }
            let write = (
                libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0),
                std::io::Error::last_os_error(),
            );
            (seals, grow, shrink, map, write)
        };
        eprintln!(
            "access-row: received memfd | seals {seals:#x} | ftruncate +4 KiB: {} | ftruncate -4 KiB: {} | mmap writable: {} | pwrite: {}",
            grow.1, shrink.1, map.1, write.1
        );
        for (name, bit) in [
            ("F_SEAL_SHRINK", libc::F_SEAL_SHRINK),
            ("F_SEAL_GROW", libc::F_SEAL_GROW),
            ("F_SEAL_SEAL", libc::F_SEAL_SEAL),
            ("F_SEAL_FUTURE_WRITE", libc::F_SEAL_FUTURE_WRITE),
        ] {
            assert!(seals & bit != 0, "{name} missing from {seals:#x}");
        }
        // EPERM is what a seal answers (a read-only descriptor would give EINVAL or EBADF).
        for (what, r, e) in [("grow", grow.0, &grow.1), ("shrink", shrink.0, &shrink.1)] {
            assert_eq!(r, -1, "ftruncate to {what} succeeded");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}");
        }
        assert_eq!(map.0, libc::MAP_FAILED, "the peer's memfd mapped writable");
        assert_eq!(map.1.raw_os_error(), Some(libc::EPERM), "{}", map.1);
        assert_eq!(write.0, -1, "pwrite into the peer's memfd succeeded");
        assert_eq!(write.1.raw_os_error(), Some(libc::EPERM), "{}", write.1);
        assert_eq!(
            nix::sys::stat::fstat(region.memfd()).unwrap().st_size,
            len,
            "the size changed"
        );
    });
    drop(c);
    let _ = std::fs::remove_file(&path);
}

/// In a child: connects, then writes into the server's region at
/// `RPAL_TEST_ADDR` with access to it granted (so protection keys are not
/// what stops it). Never returns: the write faults.
fn scribble() {
    let path = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let addr: u64 = common::arg("RPAL_TEST_ADDR").parse().unwrap();
    let c = GuardedClient::connect(&path).unwrap();
    assert_eq!(c.add(1, 1).unwrap(), 2);
    let Channel::Shm(shm) = c.channel() else {
        unreachable!("a shared-memory client")
    };
    shm.with_client(|cl| {
        let region = &cl.peer().region;
        assert!(region.addr() <= addr && addr + 8 <= region.addr() + region.len());
        let _grant = region.access();
        eprintln!("scribbler: writing to {addr:#x}");
        // SAFETY: not safe: this is the attack. The mapping is read-only,
        // so the kernel stops it with SIGSEGV.
        unsafe { std::ptr::write_volatile(addr as *mut u64, 0xbad) };
    });
    unreachable!("a write into the peer's read-only mapping went through");
}

#[test]
fn a_write_into_a_peers_region_faults() {
    const TEST: &str = "a_write_into_a_peers_region_faults";
    if child_role() {
        return;
    }
    let (host, path) = serve("scribble", PeerPolicy::SameUid);
    // A word of ours the child will try to overwrite.
    let word = ShmBox::new(0x5eed_u64).unwrap();
    let addr = word.addr();
    let mut child = common::spawn(
        TEST,
        "scribbler",
        &[
            ("RPAL_TEST_SOCK", path.display().to_string()),
            ("RPAL_TEST_ADDR", addr.to_string()),
        ],
    );
    let pid = child.pid();
    let st = child.wait_timeout(Duration::from_secs(60 * common::time_scale()));
    eprintln!(
        "access-row: write into a peer's region | child {pid} ended with {st:?} | our word still {:#x}",
        *word
    );
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "the write did not fault: {st:?}");
    assert_eq!(*word, 0x5eed, "the peer changed our memory");
    // The server lost only that connection.
    let mut next = common::spawn(TEST, "allowed", &[("RPAL_TEST_SOCK", path.display().to_string())]);
    next.expect_success();
    host.shutdown();
    let _ = std::fs::remove_file(&path);
}
