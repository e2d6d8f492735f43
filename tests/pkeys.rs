//! Protection keys, in a child process: touching a peer's region outside an
//! access guard faults with SEGV_PKUERR; inside the guard it works.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use rpal::pkey::{self, PkeyStatus};
use rpal::prelude::*;

#[test]
fn pkeys_status_is_reported_and_switchable() {
    // Each probe answers with a reason; the switch turns keys off in a child.
    if common::role().is_some() {
        assert!(pkey::set_enabled(false));
        assert_eq!(*pkey::status(), PkeyStatus::Disabled);
        return;
    }
    eprintln!("protection keys here: {:?}", pkey::status());
    common::spawn("pkeys_status_is_reported_and_switchable", "child", &[]).expect_success();
}

#[test]
fn touching_a_peer_region_outside_the_guard_faults() {
    if let Some(role) = common::role() {
        // No core file for the expected crash.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        assert_eq!(role, "client");
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("pk")).unwrap();
        c.call(1, b"warm").unwrap();
        let region = &c.peer().region;
        assert!(region.pkey().is_some(), "the server's region is tagged");
        {
            let _guard = region.access();
            let magic: &u64 = region.view(region.addr()).unwrap();
            eprintln!("inside the guard: read {magic:#x}");
        }
        eprintln!("touching the region outside the guard");
        // SAFETY: the address is mapped (read-only); the key denies access, so this faults.
        let v = unsafe { std::ptr::read_volatile(region.addr() as *const u64) };
        eprintln!("UNEXPECTED: read {v:#x} without a fault");
        std::process::exit(0);
    }
    let why_not = match pkey::status() {
        PkeyStatus::Active => None,
        PkeyStatus::Disabled => Some("turned off by RPAL_PKEYS".to_string()),
        PkeyStatus::Unsupported(reason) => Some(reason.clone()),
    };
    if let Some(reason) = why_not {
        eprintln!("skipped: protection keys are not active here: {reason}");
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
    let mut stderr = String::new();
    child
        .child
        .as_mut()
        .unwrap()
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let st = child.wait_timeout(Duration::from_secs(30));
    assert_eq!(
        st.signal(),
        Some(libc::SIGSEGV),
        "child should die of SIGSEGV; stderr:\n{stderr}"
    );
    assert!(stderr.contains("inside the guard: read 0x"), "{stderr}");
    assert!(
        stderr.contains("SEGV_PKUERR") && stderr.contains("peer region"),
        "{stderr}"
    );
    assert!(!stderr.contains("UNEXPECTED"), "{stderr}");
    let _ = t.join();
}
