//! Hostile peers, one class per test, each against a real server process
//! while an honest client keeps calling: the hostile peer gets a typed
//! error for its own call, the honest client's calls all succeed, and a
//! fresh connection succeeds within 2 s after the attack.
//!
//! Classes covered so far: views a peer rewrites after the check (a string
//! made invalid UTF-8 while the handler reads it; a nested pointer turned
//! into the server's own arena), and a server that stops reading (the
//! client's deadline still holds). The other classes of the hostile-peers
//! issue (quotas, the acceptor, the poller, streams) are still to come.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpal::prelude::*;
use rpal::*;

/// An entry with a nested pointer type.
#[derive(ShmSafe)]
#[repr(C)]
pub struct Entry {
    name: ShmString,
}

#[rpal::service]
pub trait Views {
    /// For the honest client.
    fn add(&self, a: u64, b: u64) -> u64;
    /// Reads `s` for `ms` milliseconds: its length in chars if it stayed
    /// the same valid string throughout, else `u64::MAX`.
    fn hold_text(&self, s: ShmString, ms: u64) -> u64;
    /// Waits `ms`, then reads the entry's nested string in place.
    fn peek(&self, e: ShmBox<Entry>, ms: u64) -> u64;
}

struct ViewsImpl;

impl Views for ViewsImpl {
    fn add(&self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    fn hold_text(&self, s: &str, ms: u64) -> u64 {
        let chars = s.chars().count();
        let first = s.to_string();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(ms) {
            // `chars()` trusts the UTF-8 invariant: on bytes a peer rewrote
            // after the check it would run past the end.
            if s.chars().count() != chars || s != first {
                return u64::MAX;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        chars as u64
    }
    fn peek(&self, e: &Entry, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        // The nested string's header lives in the client's memory: reading
        // it in place must be refused, whatever its words say now.
        let text: &str = &e.name; // the deref that reads it in place
        text.len() as u64
    }
}

fn serve_child() {
    let base = std::path::PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = ServeViews::new(ViewsImpl)
        .host()
        .shm(&base)
        .poller(PollerConfig {
            threads: 2,
            ..PollerConfig::default()
        })
        .start()
        .expect("start the host");
    host.join();
}

struct Server {
    _guard: common::ChildGuard,
    base: std::path::PathBuf,
}

impl Server {
    fn start(test: &str, name: &str) -> Server {
        let base = common::sock_path(name);
        let guard = common::spawn(test, "server", &[("RPAL_TEST_SOCK", base.display().to_string())]);
        Server { _guard: guard, base }
    }

    fn connect(&self) -> ViewsClient {
        common::retry(|| ViewsClient::connect(&self.base)).with_timeout(Duration::from_secs(20 * common::time_scale()))
    }
}

/// An honest client calling throughout; `stop` ends it, and it returns how
/// many calls it made (each one checked).
fn honest(server: &Server, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let c = server.connect();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            assert_eq!(c.add(n, 1).expect("the honest client's call"), n + 1);
            n += 1;
            std::thread::sleep(Duration::from_micros(100));
        }
        n
    })
}

/// After an attack: the honest client kept calling, and a fresh connection
/// answers within 2 s.
fn still_serving(server: &Server, stop: Arc<AtomicBool>, honest: std::thread::JoinHandle<u64>) {
    stop.store(true, Ordering::Relaxed);
    let calls = honest.join().expect("the honest client");
    assert!(calls > 0, "the honest client made no call");
    let t0 = Instant::now();
    let fresh = common::retry(|| ViewsClient::connect(&server.base));
    assert_eq!(fresh.add(2, 2).unwrap(), 4);
    assert!(
        t0.elapsed() < Duration::from_secs(2 * common::time_scale()),
        "a fresh connection took {:?}",
        t0.elapsed()
    );
}

/// A peer's string, valid ASCII when the server checks it, rewritten with
/// a 0xF0 byte (a four-byte sequence's lead, with nothing after it) again
/// and again while the handler reads it: the handler's `&str` is a copy
/// made at the check, so it never changes, and the server lives.
#[test]
fn a_string_rewritten_after_the_check_cannot_break_the_handler() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = Server::start(
        "a_string_rewritten_after_the_check_cannot_break_the_handler",
        "chaos-str",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest(&server, stop.clone());
    let c = server.connect();
    let s = ShmString::copy_from(&"a".repeat(4096)).unwrap();
    // The attacker writes its own memory (the arena is ours to write) while
    // the call is in flight; the server only ever reads it.
    let last = AtomicU64::new(s.as_ptr() as u64 + 4095);
    let flipping = AtomicBool::new(true);
    let (flips, whole, refused) = std::thread::scope(|sc| {
        // Stops the flipper even if an assertion below fails (the scope
        // would otherwise wait for it forever).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&flipping);
        let flipper = sc.spawn(|| {
            let p = last.load(Ordering::Relaxed) as *mut u8;
            let mut n = 0u64;
            while flipping.load(Ordering::Relaxed) {
                // SAFETY: the string's last byte, in our own arena, which
                // this process maps read-write; `s` outlives the scope. The
                // attacker breaks its own string on purpose; only the
                // server (another process) reads it meanwhile.
                unsafe {
                    p.write_volatile(0xF0);
                    std::hint::spin_loop();
                    p.write_volatile(b'a');
                }
                n += 1;
            }
            n
        });
        let (mut whole, mut refused) = (0, 0);
        for _ in 0..20 {
            // The copy was taken between flips (all ASCII: 4096 chars) or
            // during one (ending in 0xF0: not UTF-8, refused as a bad
            // request, the attacker's own call); never a string that
            // changed under the handler (u64::MAX).
            match c.hold_text(&s, 5 * common::time_scale()) {
                Ok(got) => {
                    assert_eq!(got, 4096, "the handler's string changed while it read it");
                    whole += 1;
                }
                Err(Error::Remote {
                    status: RemoteStatus::BadRequest,
                    ..
                }) => refused += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        flipping.store(false, Ordering::Relaxed);
        (flipper.join().unwrap(), whole, refused)
    });
    eprintln!("{flips} flips: {whole} calls read a whole string, {refused} refused");
    assert!(flips > 0);
    assert_eq!(whole + refused, 20);
    still_serving(&server, stop, honest);
}

/// A peer sends an entry whose nested string points into its own memory
/// (valid at the check), then rewrites the nested pointer to the server's
/// own arena with a length of 1 GiB. Reading the field in place is refused
/// (its header lives in the peer's memory): that call fails with
/// `HandlerPanicked`, nothing of the server's memory is read or sent, and
/// the server serves on.
#[test]
fn a_nested_pointer_rewritten_to_the_servers_arena_is_refused() {
    if common::role().is_some() {
        return serve_child();
    }
    let server = Server::start(
        "a_nested_pointer_rewritten_to_the_servers_arena_is_refused",
        "chaos-nest",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest(&server, stop.clone());
    let c = server.connect();
    let server_arena = match c.channel() {
        Channel::Shm(s) => s.with_client(|cl| cl.peer().region.addr()),
        _ => unreachable!("a shared-memory client"),
    };
    let e = ShmBox::new(Entry {
        name: ShmString::copy_from("honest at the check").unwrap(),
    })
    .unwrap();
    // The nested string's words (address, length, capacity) in our arena.
    let words = std::ptr::addr_of!(e.name) as *mut [u64; 3];
    // SAFETY: the entry is ours, in our read-write arena; read before the call.
    let honest_words = unsafe { words.read_volatile() };
    let r = std::thread::scope(|sc| {
        let call = sc.spawn(|| c.peek(&e, 50 * common::time_scale()));
        // Once the server has checked the entry (it sleeps 50 ms before
        // reading), point the nested string at the server's arena.
        std::thread::sleep(Duration::from_millis(10 * common::time_scale()));
        // SAFETY: as above; the original words go back below, before the
        // entry is dropped (so the forged address is never freed by us).
        unsafe { words.write_volatile([server_arena, 1 << 30, 1 << 30]) };
        call.join().unwrap()
    });
    // SAFETY: as above.
    unsafe { words.write_volatile(honest_words) };
    let err = r.expect_err("the server read a nested pointer in place");
    assert!(
        matches!(
            err,
            Error::Remote {
                status: RemoteStatus::HandlerPanicked,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(c.add(1, 1).unwrap(), 2, "the attacker's own connection still serves");
    still_serving(&server, stop, honest);
}

/// A raw server whose one poller stops reading at its first message.
fn stalled_server_child() {
    let server = rpal::raw::Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("stall")).unwrap();
    let handler = |_: &rpal::raw::Request<'_>, _: &mut [u8]| {
        std::thread::sleep(Duration::from_secs(3600)); // killed by the test
        Ok(0)
    };
    rpal::raw::serve(
        server,
        handler,
        PollerConfig {
            threads: 1,
            ..PollerConfig::default()
        },
    )
    .unwrap()
    .join();
}

/// A server that stops reading (alive, its queue of our requests full)
/// cannot hold a client past its deadline: sending into the full queue
/// ends with `Timeout` after the call timeout, and dropping the client (its
/// goodbye needs room too) returns after at most one park slice.
#[test]
fn a_server_that_stops_reading_cannot_hold_a_client_past_its_deadline() {
    if common::role().is_some() {
        return stalled_server_child();
    }
    let test = "a_server_that_stops_reading_cannot_hold_a_client_past_its_deadline";
    let path = common::sock_path("chaos-stall");
    let _server = common::spawn(test, "server", &[("RPAL_TEST_SOCK", path.display().to_string())]);
    let timeout = Duration::from_millis(300);
    let mut opts = ClientOptions::new("stall");
    opts.call_timeout = Some(timeout);
    let mut c = common::retry(|| rpal::raw::Client::connect(&path, opts.clone()));
    // 60 KB messages: the queue holds 256 blocks (16 MiB) unread, then waits.
    let t0 = Instant::now();
    let mut sent = 0u64;
    let err = loop {
        match c.send_oneway(1, 60_000, |b| b.fill(7)) {
            Ok(()) => {
                sent += 1;
                c.flush();
            }
            Err(e) => break e,
        }
        assert!(sent < 100_000, "the queue never filled");
    };
    let took = t0.elapsed();
    assert!(matches!(err, Error::Timeout(t) if t == timeout), "{err}");
    assert!(sent >= 256, "only {sent} messages before the wait");
    // Far under a hang; the bound is behaviour, not speed.
    assert!(
        took < Duration::from_secs(60),
        "the full queue held the sender {took:?}"
    );
    let t1 = Instant::now();
    drop(c);
    assert!(
        t1.elapsed() < Duration::from_secs(30),
        "dropping the client waited {:?} for room",
        t1.elapsed()
    );
}
