//! Protection keys, with real processes. Where the CPU has PKU (natively, or
//! under `../shared/pku-vm`, which CI runs this file in):
//! - touching a peer's region outside an access grant faults with
//!   SEGV_PKUERR, and the report names the region and the peer; inside the
//!   grant the read works;
//! - a `Returned` may be kept across calls and read through its guard; a
//!   view smuggled out of the guard faults;
//! - a handler serving one client cannot read another client's memory;
//! - a blocking stub call costs the caller two PKRU writes, and a poller
//!   with one client process none.
//!
//! Elsewhere the fault tests skip and say why.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rpal::pkey::{self, PkeyStatus};
use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

/// The service the fault tests call.
#[rpal::service]
pub trait Keys {
    /// Echoes `x`.
    fn echo(&self, x: u64) -> u64;
    /// A label's bytes, built in the server's memory and lent to the caller
    /// (bytes, not a string: a string result is copied on receipt).
    fn label(&self, id: u64) -> ShmVec<u8>;
    /// PKRU writes made so far by the thread running the handlers.
    fn writes(&self) -> u64;
}

struct KeysImpl;

impl Keys for KeysImpl {
    fn echo(&self, x: u64) -> u64 {
        x
    }
    fn label(&self, id: u64) -> ShmVec<u8> {
        let mut v = ShmVec::new();
        v.extend_from_slice(format!("#{id}").as_bytes()).expect("arena");
        v
    }
    fn writes(&self) -> u64 {
        pkey::pkru_writes()
    }
}

/// True (after saying why) if the fault tests cannot run here.
fn skipped_without_keys() -> bool {
    let why = match pkey::status() {
        PkeyStatus::Active => return false,
        PkeyStatus::Disabled => "turned off by RPAL_PKEYS".to_string(),
        PkeyStatus::Unsupported(reason) | PkeyStatus::Degraded(reason) => reason,
    };
    common::skip(&format!("protection keys are not active here: {why}"));
    true
}

/// No core file for a crash the test expects.
fn no_core_dump() {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
}

/// Reads all of `child`'s captured stderr and waits for it to exit.
fn finish(child: &mut common::ChildGuard) -> (std::process::ExitStatus, String) {
    let mut stderr = String::new();
    child
        .child
        .as_mut()
        .expect("running")
        .stderr
        .take()
        .expect("captured")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (child.wait_timeout(Duration::from_secs(120)), stderr)
}

/// Asserts that a child died of a protection-key fault in a region of `owner`.
fn assert_pkey_fault(st: std::process::ExitStatus, stderr: &str, owner: i32) {
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "expected SIGSEGV; stderr:\n{stderr}");
    assert!(stderr.contains("SEGV_PKUERR at 0x"), "{stderr}");
    assert!(
        stderr.contains(&format!("of pid {owner} touched outside an access guard")),
        "the report names the peer {owner}:\n{stderr}"
    );
    assert!(!stderr.contains("UNEXPECTED"), "{stderr}");
    let report = stderr.lines().find(|l| l.contains("SEGV_PKUERR")).unwrap_or_default();
    eprintln!("the child's fault report: {report}");
}

/// A Keys server on `base` (a host with one poller), until killed.
fn serve_keys(base: &Path) {
    let host = ServeKeys::new(KeysImpl)
        .host()
        .shm(base)
        .start()
        .expect("start the host");
    host.join();
}

#[test]
fn pkeys_status_is_reported_and_switchable() {
    // Each probe answers with a reason; the switch turns keys off in a child.
    if common::role().is_some() {
        assert!(pkey::set_enabled(false));
        assert_eq!(pkey::status(), PkeyStatus::Disabled);
        // Off means every grant is free, and nothing faults.
        let before = pkey::pkru_writes();
        drop(pkey::Access::all());
        assert_eq!(pkey::pkru_writes(), before);
        return;
    }
    eprintln!("protection keys here: {:?}", pkey::status());
    common::spawn("pkeys_status_is_reported_and_switchable", "child", &[]).expect_success();
}

#[test]
fn touching_a_peer_region_outside_the_guard_faults() {
    if let Some(role) = common::role() {
        no_core_dump();
        assert_eq!(role, "client");
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("pk")).unwrap();
        c.call(1, b"warm").unwrap();
        let region = &c.peer().region;
        assert!(region.pkey().is_some(), "the server's region is tagged");
        {
            let access = region.access();
            let magic: &u64 = region.mem(&access).view(region.addr()).unwrap();
            eprintln!("inside the guard: read {magic:#x}");
        }
        eprintln!("touching the region outside the guard");
        // SAFETY: the address is mapped (read-only); the key denies access, so this faults.
        let v = unsafe { std::ptr::read_volatile(region.addr() as *const u64) };
        eprintln!("UNEXPECTED: read {v:#x} without a fault");
        std::process::exit(0);
    }
    if skipped_without_keys() {
        return;
    }
    let path = common::sock_path("pk");
    let server = Server::bind(&path, ServerOptions::new("pk")).unwrap();
    let mut child = common::spawn_with(
        "touching_a_peer_region_outside_the_guard_faults",
        "client",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
        true,
    );
    let conn = server.accept().unwrap();
    let t = std::thread::spawn(move || conn.run(|_: &Request<'_>, _: &mut [u8]| Ok(0)));
    let (st, stderr) = finish(&mut child);
    assert!(stderr.contains("inside the guard: read 0x"), "{stderr}");
    assert_pkey_fault(st, &stderr, std::process::id() as i32);
    // The server saw its client die; a typed error, not a crash.
    assert!(matches!(t.join().unwrap(), Err(Error::PeerDied { .. }) | Ok(())));
}

#[test]
fn a_returned_value_is_read_through_its_guard_and_a_smuggled_view_faults() {
    match common::role().as_deref() {
        Some("server") => return serve_keys(&PathBuf::from(common::arg("RPAL_TEST_SOCK"))),
        Some("client") => {
            no_core_dump();
            let c = common::retry(|| KeysClient::connect(common::arg("RPAL_TEST_SOCK")));
            let name = c.label(7).unwrap();
            assert!(name.is_shared(), "the result stays in the server's memory");
            // The handle may be kept across other calls, and read any time.
            for i in 0..100 {
                assert_eq!(c.echo(i).unwrap(), i);
            }
            assert_eq!(&*name.read(), b"#7");
            assert_eq!(name.to_owned(), b"#7");
            eprintln!("read through the guard: {}", String::from_utf8_lossy(&name.read()));
            // Breaking the rule: a pointer taken inside the guard, used after it.
            let smuggled = name.read().as_ptr();
            eprintln!("reading a view smuggled out of its guard");
            // SAFETY: the byte is mapped (the handle keeps the region); the key
            // denies access now that the guard is gone, so this faults.
            let b = unsafe { std::ptr::read_volatile(smuggled) };
            eprintln!("UNEXPECTED: read {b:#x} without a fault");
            std::process::exit(0);
        }
        _ => {}
    }
    if skipped_without_keys() {
        return;
    }
    let test = "a_returned_value_is_read_through_its_guard_and_a_smuggled_view_faults";
    let base = common::sock_path("pk-returned");
    let env = [("RPAL_TEST_SOCK", base.display().to_string())];
    let server = common::spawn(test, "server", &env);
    let mut client = common::spawn_with(test, "client", &env, true);
    let (st, stderr) = finish(&mut client);
    assert!(stderr.contains("read through the guard: #7"), "{stderr}");
    assert_pkey_fault(st, &stderr, server.pid());
}

#[test]
fn a_handler_cannot_read_another_clients_memory() {
    const STASH: u32 = 1;
    const PEEK: u32 = 2;
    match common::role().as_deref() {
        Some("server") => {
            no_core_dump();
            let server = Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("pk-two")).unwrap();
            let stashed = std::cell::Cell::new(0u64);
            let mut handler = |req: &Request<'_>, reply: &mut [u8]| {
                let addr = u64::from_le_bytes(req.payload[..8].try_into().unwrap());
                match req.method {
                    STASH => {
                        // Client A's value, read with access to A (the handler's caller).
                        let v: &u64 = req.mem().view(addr).map_err(|_| RemoteStatus::BadRequest)?;
                        eprintln!("client A's value, read while serving A: {v}");
                        stashed.set(addr);
                    }
                    _ => {
                        eprintln!("serving client B, reading client A's value");
                        // SAFETY: mapped (A is alive and connected); the key of
                        // A's region is denied while B is served, so this faults.
                        let v = unsafe { std::ptr::read_volatile(stashed.get() as *const u64) };
                        eprintln!("UNEXPECTED: read {v} without a fault");
                    }
                }
                reply[..8].copy_from_slice(&[0; 8]);
                Ok(8)
            };
            let mut a = server.accept().unwrap();
            assert!(a.serve_one(&mut handler).unwrap());
            let mut b = server.accept().unwrap();
            assert!(b.serve_one(&mut handler).unwrap());
            std::process::exit(0);
        }
        Some(role) => {
            // Client A stashes the address of a value of its own and stays
            // connected; client B asks the server to peek at it.
            let mut c = common::retry(|| Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("pk-two")));
            let value = ShmBox::new(42u64).unwrap();
            let method = if role == "a" { STASH } else { PEEK };
            let r = c.call(method, &value.addr().to_le_bytes());
            if role == "a" {
                r.unwrap();
                std::fs::write(common::arg("RPAL_TEST_MARK"), b"stashed").unwrap();
                std::thread::sleep(Duration::from_secs(120)); // killed by the test
            } else {
                assert!(r.is_err(), "the server died serving the peek: {r:?}");
            }
            return;
        }
        None => {}
    }
    if skipped_without_keys() {
        return;
    }
    let test = "a_handler_cannot_read_another_clients_memory";
    let path = common::sock_path("pk-two");
    let mark = path.with_extension("mark");
    let env = |extra: &[(&'static str, String)]| {
        let mut v = vec![("RPAL_TEST_SOCK", path.display().to_string())];
        v.extend_from_slice(extra);
        v
    };
    let mut server = common::spawn_with(test, "server", &env(&[]), true);
    let client_a = common::spawn(test, "a", &env(&[("RPAL_TEST_MARK", mark.display().to_string())]));
    let t0 = std::time::Instant::now();
    while !mark.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "client A never stashed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client_b = common::spawn(test, "b", &env(&[]));
    let (st, stderr) = finish(&mut server);
    assert!(
        stderr.contains("client A's value, read while serving A: 42"),
        "{stderr}"
    );
    assert_pkey_fault(st, &stderr, client_a.pid());
    client_b.expect_success();
    let _ = std::fs::remove_file(&mark);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn pkru_writes_per_call() {
    if common::role().is_some() {
        return serve_keys(&PathBuf::from(common::arg("RPAL_TEST_SOCK")));
    }
    if skipped_without_keys() {
        return;
    }
    let base = common::sock_path("pk-writes");
    let _server = common::spawn(
        "pkru_writes_per_call",
        "server",
        &[("RPAL_TEST_SOCK", base.display().to_string())],
    );
    let c = common::retry(|| KeysClient::connect(&base));
    c.echo(0).unwrap();
    const CALLS: u64 = 1000;
    let (mine, theirs) = (pkey::pkru_writes(), c.writes().unwrap());
    for i in 0..CALLS {
        assert_eq!(c.echo(i).unwrap(), i);
    }
    let mine = pkey::pkru_writes() - mine;
    // The `writes` call itself runs on the poller too: its own cost is included.
    let theirs = c.writes().unwrap() - theirs;
    eprintln!(
        "PKRU writes per call: caller {}, poller {} (over {CALLS} calls)",
        mine as f64 / CALLS as f64,
        theirs as f64 / CALLS as f64
    );
    assert_eq!(mine, 2 * CALLS + 2, "one grant (write, restore) per blocking call");
    assert_eq!(theirs, 0, "a poller with one client process never narrows");
}

#[test]
fn without_a_free_key_regions_go_unguarded_and_status_says_so() {
    match common::role().as_deref() {
        Some("server") => return serve_keys(&PathBuf::from(common::arg("RPAL_TEST_SOCK"))),
        Some("client") => {
            assert_eq!(pkey::status(), PkeyStatus::Active);
            // Take every free key before rpal asks for one (as an application
            // using keys of its own might).
            let mut taken = 0;
            // SAFETY: integer-only system call; the keys are never freed (the
            // child exits).
            while unsafe { libc::syscall(libc::SYS_pkey_alloc, 0u32, 0u32) } >= 0 {
                taken += 1;
            }
            eprintln!("took the {taken} free keys");
            let c = common::retry(|| KeysClient::connect(common::arg("RPAL_TEST_SOCK")));
            // Calls work, unguarded; the status says why.
            for i in 0..100 {
                assert_eq!(c.echo(i).unwrap(), i);
            }
            assert_eq!(&*c.label(3).unwrap().read(), b"#3");
            match pkey::status() {
                PkeyStatus::Degraded(why) => {
                    assert!(why.contains("no protection key"), "{why}");
                    eprintln!("status: degraded: {why}");
                }
                other => panic!("expected Degraded, got {other:?}"),
            }
            return;
        }
        _ => {}
    }
    if skipped_without_keys() {
        return;
    }
    let test = "without_a_free_key_regions_go_unguarded_and_status_says_so";
    let base = common::sock_path("pk-nokey");
    let env = [("RPAL_TEST_SOCK", base.display().to_string())];
    let _server = common::spawn(test, "server", &env);
    common::spawn(test, "client", &env).expect_success();
}
