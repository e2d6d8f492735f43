//! Bad input at the handshake: each case is a typed error naming the
//! problem, and the server keeps accepting others.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use rpal::prelude::*;
use rpal::raw::handshake::{self, Hello, Kind, RejectCode};
use rpal::raw::*;
use rpal::*;

fn memfd(len: u64, sealed: bool) -> OwnedFd {
    let m = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("crafted")
        .unwrap();
    m.as_file().set_len(len).unwrap();
    if sealed {
        m.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .unwrap();
    }
    m.into_file().into()
}

fn crafted(service: &str, addr: u64, len: u64) -> Hello {
    Hello {
        region_addr: addr,
        region_len: len,
        endpoint_addr: addr + 4096,
        text: service.into(),
        ..Hello::new(Kind::Hello)
    }
}

/// Runs `client` against one `server.accept()` and returns the server's result.
fn accept_while(server: &Server, client: impl FnOnce() + Send) -> rpal::Result<rpal::raw::ServerConn> {
    std::thread::scope(|s| {
        let t = s.spawn(client);
        let r = server.accept();
        t.join().unwrap();
        r
    })
}

/// Sends `hello` with `fd` and returns the server's answer.
fn send_crafted(path: &std::path::Path, hello: &Hello, fd: Option<&OwnedFd>) -> Option<Hello> {
    let sock = UnixStream::connect(path).unwrap();
    handshake::send(&sock, hello, fd.map(|f| f.as_fd())).unwrap();
    handshake::recv(&sock, "server", "test", Duration::from_secs(5))
        .ok()
        .map(|(h, _)| h)
}

#[test]
fn server_survives_bad_handshakes() {
    if common::role().is_some() {
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("guarded")).unwrap();
        assert_eq!(c.call(1, b"still serving").unwrap(), b"still serving");
        return;
    }
    let path = common::sock_path("guarded");
    let mut opts = ServerOptions::new("guarded");
    // Scaled: under emulation the real client's own handshake (after a child
    // start) takes longer than 500 ms.
    let handshake_timeout = Duration::from_millis(500 * common::time_scale());
    opts.handshake_timeout = handshake_timeout;
    let server = Server::bind(&path, opts).unwrap();
    let space = rpal::raw::Space::global().unwrap();
    let window_end = space.config().base + space.config().window_len();
    let own = Arena::global().unwrap().region().addr();
    let free_slot = space.slot_addr(space.config().slots as usize - 1);

    // A client that speaks another protocol.
    let e = accept_while(&server, || {
        let mut s = UnixStream::connect(&path).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = s.read(&mut [0u8; 16]);
    })
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::NotRpal { detail, .. } if detail.contains("GET / HT")),
        "{e}"
    );

    // A peer that closes mid-handshake.
    let e = accept_while(&server, || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&crafted("guarded", free_slot, 4096).encode()[..100])
            .unwrap();
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::HandshakeClosed { .. }), "{e}");

    // A peer that says nothing until the handshake deadline.
    let e = accept_while(&server, || {
        let s = UnixStream::connect(&path).unwrap();
        std::thread::sleep(handshake_timeout * 8 / 5);
        drop(s);
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::Timeout(_)), "{e}");

    // A wrong protocol version: both sides get VersionMismatch.
    let fd = memfd(1 << 20, true);
    let e = accept_while(&server, || {
        let h = Hello {
            version: 99,
            ..crafted("guarded", free_slot, 1 << 20)
        };
        let answer = send_crafted(&path, &h, Some(&fd)).expect("a reject message");
        assert_eq!(
            (answer.kind, answer.code),
            (Kind::Reject, RejectCode::VersionMismatch as u32)
        );
        assert!(matches!(
            answer.reject_error(&h),
            Error::VersionMismatch {
                ours: 99,
                theirs: PROTOCOL_VERSION
            }
        ));
    })
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            Error::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 99
            }
        ),
        "{e}"
    );

    // A memfd without seals.
    let e = accept_while(&server, || {
        let answer = send_crafted(
            &path,
            &crafted("guarded", free_slot, 1 << 20),
            Some(&memfd(1 << 20, false)),
        );
        assert_eq!(answer.map(|a| a.kind), Some(Kind::Reject));
    })
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::InvalidDescriptor { reason } if reason.contains("seals")),
        "{e}"
    );

    // A memfd of another size than announced.
    let e = accept_while(&server, || {
        send_crafted(&path, &crafted("guarded", free_slot, 1 << 20), Some(&memfd(8192, true)));
    })
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::InvalidDescriptor { reason } if reason.contains("8192")),
        "{e}"
    );

    // A hello with no memfd at all.
    let e = accept_while(&server, || {
        send_crafted(&path, &crafted("guarded", free_slot, 1 << 20), None);
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::InvalidDescriptor { .. }), "{e}");

    // A region outside the window, and one that ends past it.
    for addr in [0x1000_0000u64, window_end - 4096] {
        let e = accept_while(&server, || {
            send_crafted(&path, &crafted("guarded", addr, 1 << 20), Some(&memfd(1 << 20, true)));
        })
        .err()
        .unwrap();
        assert!(
            matches!(&e, Error::InvalidRegion { reason, .. } if reason.contains("window")),
            "{e}"
        );
    }

    // A region overlapping one mapped here (the server's own arena).
    let e = accept_while(&server, || {
        send_crafted(&path, &crafted("guarded", own, 1 << 20), Some(&memfd(1 << 20, true)));
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, Error::AddressInUse { addr, other, .. } if addr == own && other == own),
        "{e}"
    );

    // A slot that the registry says belongs to someone else (nobody, here).
    let e = accept_while(&server, || {
        send_crafted(
            &path,
            &crafted("guarded", free_slot, 1 << 20),
            Some(&memfd(1 << 20, true)),
        );
    })
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::InvalidRegion { reason, .. } if reason.contains("registry")),
        "{e}"
    );
    assert_eq!(
        space.occupant(free_slot),
        None,
        "a refused region leaves nothing mapped"
    );

    // After all that, a real client in another process is served.
    let mut child = common::spawn(
        "server_survives_bad_handshakes",
        "client",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let conn = server.accept().unwrap();
    conn.run(|req: &Request<'_>, reply: &mut [u8]| {
        reply[..req.payload.len()].copy_from_slice(req.payload);
        Ok(req.payload.len())
    })
    .unwrap();
    child.expect_success();
    let stats = server.stats();
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed), 11);
    assert_eq!(stats.accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn policy_refuses_a_uid() {
    let path = common::sock_path("policy");
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let mut opts = ServerOptions::new("policy");
    opts.policy = PeerPolicy::AllowUids(vec![me.wrapping_add(1)]);
    let server = Server::bind(&path, opts).unwrap();
    let e = accept_while(&server, || {
        let e = Client::connect(&path, ClientOptions::new("policy")).err().unwrap();
        assert!(matches!(e, Error::PermissionDenied { uid, .. } if uid == me), "{e}");
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, Error::PermissionDenied { uid, pid, .. } if uid == me && pid == std::process::id() as i32),
        "{e}"
    );
}

#[test]
fn service_name_must_match() {
    let path = common::sock_path("svcname");
    let server = Server::bind(&path, ServerOptions::new("calc")).unwrap();
    let e = accept_while(&server, || {
        let e = Client::connect(&path, ClientOptions::new("kv")).err().unwrap();
        assert!(
            matches!(&e, Error::ServiceMismatch { ours, theirs } if ours == "kv" && theirs == "calc"),
            "{e}"
        );
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::ServiceMismatch { .. }), "{e}");
}

#[test]
fn connecting_to_a_foreign_socket_is_not_rpal() {
    let path = common::sock_path("foreign");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.read(&mut [0u8; 256]);
        s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    });
    let e = Client::connect(&path, ClientOptions::new("any")).err().unwrap();
    assert!(
        matches!(&e, Error::NotRpal { detail, .. } if detail.contains("SSH-2.0")),
        "{e}"
    );
    t.join().unwrap();
    let _ = std::fs::remove_file(&path);

    let e = Client::connect("/nonexistent/rpal.sock", ClientOptions::new("any"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/rpal.sock"), "{e}");
}

#[test]
fn a_server_that_hangs_up_mid_handshake() {
    let path = common::sock_path("hangup");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.read(&mut [0u8; 256]);
    });
    let e = Client::connect(&path, ClientOptions::new("any")).err().unwrap();
    assert!(matches!(e, Error::HandshakeClosed { .. }), "{e}");
    t.join().unwrap();
    let _ = std::fs::remove_file(&path);
}
