//! Zero-copy types: owner-side behaviour, peer-side validation, a
//! multi-thread allocator stress test, and blocks released by a real peer
//! process and reclaimed by their owner.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

/// In-use figures are process-wide: tests that compare them run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn in_use() -> u64 {
    Arena::global().unwrap().stats().in_use
}

#[repr(C)]
#[derive(ShmSafe)]
struct Order {
    id: u64,
    customer: ShmString,
    lines: ShmVec<Line>,
    note: ShmBox<[u8; 16]>,
}

#[repr(C)]
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
struct Line {
    sku: u32,
    qty: u32,
    price_cents: u64,
}

#[test]
fn owner_builds_nested_data_and_drops_it_without_leaks() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let start = in_use();
    {
        let mut v: ShmVec<u64> = ShmVec::new();
        for i in 0..10_000u64 {
            v.push(i * 3).unwrap();
        }
        assert_eq!(v.len(), 10_000);
        assert!(v.capacity() >= 10_000);
        assert_eq!(v.iter().sum::<u64>(), 3 * (0..10_000u64).sum::<u64>());
        assert_eq!(v.pop(), Some(29_997));
        v[0] = 7;
        assert_eq!(v[0], 7);

        let mut s = ShmString::copy_from("héllo").unwrap();
        s.push_str(", wörld").unwrap();
        assert_eq!(&*s, "héllo, wörld");

        let mut slice = ShmSlice::<u32>::zeroed(100).unwrap();
        assert!(slice.iter().all(|&x| x == 0));
        slice[99] = 5;
        assert_eq!(ShmSlice::from_slice(&[1u8, 2, 3]).unwrap()[..], [1, 2, 3]);

        let mut order = ShmBox::new(Order {
            id: 1,
            customer: ShmString::copy_from("ACME").unwrap(),
            lines: ShmVec::new(),
            note: ShmBox::new(*b"fragile, handle!").unwrap(),
        })
        .unwrap();
        for sku in 0..50 {
            order
                .lines
                .push(Line {
                    sku,
                    qty: 2,
                    price_cents: 199,
                })
                .unwrap();
        }
        assert_eq!(
            order.lines.iter().map(|l| l.qty as u64 * l.price_cents).sum::<u64>(),
            50 * 398
        );
        assert_eq!(&*order.customer, "ACME");
        assert!(in_use() > start);
    }
    assert_eq!(
        in_use(),
        start,
        "dropping the values frees every block, nested ones included"
    );
}

#[test]
fn allocator_survives_many_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let start = in_use();
    let rounds = if cfg!(miri) { 50 } else { 20_000 };
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let mut live: Vec<ShmVec<u64>> = Vec::new();
                let mut x = t + 1;
                for i in 0..rounds {
                    // xorshift: a mix of sizes from 8 bytes to ~32 KiB.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = 1 + (x % if i % 100 == 0 { 4096 } else { 64 }) as usize;
                    let mut v = ShmVec::with_capacity(n).unwrap();
                    for k in 0..n as u64 {
                        v.push(t << 32 | k).unwrap();
                    }
                    live.push(v);
                    if live.len() > 32 {
                        let v = live.swap_remove((x % 32) as usize);
                        // Nobody else wrote our blocks.
                        assert!(v.iter().enumerate().all(|(k, &w)| w == (t << 32 | k as u64)));
                    }
                }
            });
        }
    });
    assert_eq!(in_use(), start, "every block came back");
}

const BATCH: usize = 250; // (addr, len) pairs per call: 4000 bytes inline
/// Blocks lent and released: 100,000 with `RPAL_STRESS=1`.
fn released() -> usize {
    common::size(100_000, 20_000)
}
const CHECK: u32 = 0x5EED;

fn pattern(len: usize, seed: u64) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| (seed as usize).wrapping_mul(31).wrapping_add(i) as u8)
}

#[test]
fn peer_releases_every_block_and_the_owner_reclaims_them() {
    if common::role().is_some() {
        // The peer: checks each lent block in place, then releases it.
        let server = Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("sink")).unwrap();
        let conn = server.accept().unwrap();
        conn.run(|req: &Request<'_>, reply: &mut [u8]| {
            let mut ok = 0u32;
            for pair in req.payload.chunks_exact(16) {
                let addr = u64::from_le_bytes(pair[..8].try_into().unwrap());
                let len = u64::from_le_bytes(pair[8..].try_into().unwrap());
                let bytes = req.mem().bytes(addr, len).map_err(|_| RemoteStatus::BadRequest)?;
                ok += bytes.iter().copied().eq(pattern(len as usize, addr)) as u32;
                req.release(addr);
            }
            // Also try to release what was never lent: the owner must refuse it.
            if req.method == CHECK {
                req.release(req.peer.addr() + 4096);
            }
            reply[..4].copy_from_slice(&ok.to_le_bytes());
            Ok(4)
        })
        .unwrap();
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = common::sock_path("sink");
    let mut child = common::spawn(
        "peer_releases_every_block_and_the_owner_reclaims_them",
        "peer",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let arena = Arena::global().unwrap();
    // Measured before connecting: the connection's own blocks (endpoint,
    // queue) come back when it closes.
    let start = arena.stats();
    let mut client = connect_retry(&path);
    let pid = client.peer().id;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut sent = 0;
    let released = released();
    while sent < released {
        let mut pairs = Vec::with_capacity(BATCH * 16);
        for _ in 0..BATCH.min(released - sent) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mixed sizes: mostly small, some pages, a few big blocks.
            let len = match x % 100 {
                0 => (64 << 10) + (x >> 40) as usize % (192 << 10),
                1..=10 => 1 + (x >> 20) as usize % 16384,
                _ => 1 + (x >> 20) as usize % 512,
            };
            let mut block = ShmSlice::<u8>::zeroed(len).unwrap();
            let addr = block.addr();
            for (b, v) in block.iter_mut().zip(pattern(len, addr)) {
                *b = v;
            }
            let (addr, len) = block.lend(pid).unwrap();
            pairs.extend_from_slice(&addr.to_le_bytes());
            pairs.extend_from_slice(&len.to_le_bytes());
        }
        let n = pairs.len() / 16;
        let ok = client.call(1, &pairs).unwrap();
        assert_eq!(
            u32::from_le_bytes(ok[..4].try_into().unwrap()) as usize,
            n,
            "the peer saw every block intact"
        );
        sent += n;
    }
    // One more call whose forged release must be refused.
    client.call(CHECK, &[]).unwrap();
    client.reclaim().unwrap();
    assert_eq!(arena.stats().lent, 0, "nothing is still lent");
    assert_eq!(client.refused_releases(), 1, "the forged release was refused");
    drop(client);
    child.expect_success();
    assert_eq!(arena.stats().in_use, start.in_use, "every byte came back");
}

#[test]
fn blocks_lent_to_a_dead_peer_are_reclaimed() {
    if common::role().is_some() {
        let server = Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("dies")).unwrap();
        let conn = server.accept().unwrap();
        let _ = conn.run(|_: &Request<'_>, _: &mut [u8]| {
            // SAFETY: _exit ends the process at once, without releasing anything.
            unsafe { libc::_exit(0) }
        });
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = common::sock_path("dies");
    let mut child = common::spawn(
        "blocks_lent_to_a_dead_peer_are_reclaimed",
        "peer",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let arena = Arena::global().unwrap();
    let start = arena.stats();
    let mut client = connect_retry(&path);
    let peer = client.peer().id;
    for len in [10, 1000, 100_000] {
        ShmSlice::<u8>::zeroed(len).unwrap().lend(peer).unwrap();
    }
    assert_eq!(arena.stats().lent, start.lent + 3);
    assert!(matches!(client.call(1, &[]), Err(Error::PeerDied { .. })));
    child.wait_timeout(Duration::from_secs(10));
    drop(client);
    let end = arena.stats();
    assert_eq!((end.lent, end.in_use), (start.lent, start.in_use));
}

fn connect_retry(path: &std::path::Path) -> Client {
    let t0 = std::time::Instant::now();
    loop {
        let service = if path.to_string_lossy().contains("sink") {
            "sink"
        } else {
            "dies"
        };
        match Client::connect(path, ClientOptions::new(service)) {
            Ok(c) => return c,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}
