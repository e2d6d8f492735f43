//! The pointer validator against a real peer's region: property tests with
//! random pointers and lengths, and crafted bad records (cycles, invalid
//! UTF-8, overflowing lengths) built by a real child process.

mod common;

use std::mem::ManuallyDrop;
use std::sync::Mutex;

use proptest::prelude::*;
use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

/// A node whose children may point anywhere, including back at itself.
#[repr(C)]
#[derive(ShmSafe)]
struct Cyclic {
    value: u64,
    kids: ShmVec<Cyclic>,
}

/// What the child lays out in its arena: raw words shaped like shm values,
/// with deliberately bad contents.
#[repr(C)]
#[derive(ShmSafe)]
struct Crafted {
    /// `Cyclic` whose `kids` is a one-element vector pointing at itself.
    cycle: [u64; 4],
    /// A `ShmString` header pointing at `bad_utf8`.
    string: [u64; 3],
    bad_utf8: [u8; 8],
    /// A `ShmVec<u64>` header whose length overflows when multiplied.
    overflow: [u64; 3],
    /// A `ShmBox<u64>` pointing one byte off alignment.
    misaligned: u64,
}

fn crafted_in_child() -> ShmBox<Crafted> {
    let mut c = ShmBox::new(Crafted {
        cycle: [0; 4],
        string: [0; 3],
        bad_utf8: [0xff, 0xfe, b'a', 0, 0, 0, 0, 0],
        overflow: [0; 3],
        misaligned: 0,
    })
    .unwrap();
    let base = c.addr();
    let cycle_addr = base;
    c.cycle = [7, cycle_addr, 1, 1];
    let bad = base + std::mem::offset_of!(Crafted, bad_utf8) as u64;
    c.string = [bad, 3, 8];
    c.overflow = [base, u64::MAX / 4, u64::MAX / 4];
    c.misaligned = base + 1;
    c
}

#[test]
fn validator_against_a_real_peer() {
    if common::role().is_some() {
        let crafted = crafted_in_child();
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("validate")).unwrap();
        c.call(1, &crafted.addr().to_le_bytes()).unwrap();
        // Wait until the parent hangs up.
        let _ = c.call(2, &[]);
        return;
    }
    let path = common::sock_path("validate");
    let server = Server::bind(&path, ServerOptions::new("validate")).unwrap();
    let mut child = common::spawn(
        "validator_against_a_real_peer",
        "client",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let mut conn = server.accept().unwrap();
    let got = Mutex::new(0u64);
    let mut take = |req: &Request<'_>, _: &mut [u8]| {
        *got.lock().unwrap() = u64::from_le_bytes(req.payload[..8].try_into().unwrap());
        Ok(0)
    };
    assert!(conn.serve_one(&mut take).unwrap());
    let crafted_addr = *got.lock().unwrap();
    let region = &conn.peer().region;
    // Reading the client's memory takes a grant of access to it (pkeys).
    let access = region.access();
    let peer = region.mem(&access);

    // Crafted bad records: each a typed error, never a crash.
    let crafted: &Crafted = peer.view(crafted_addr).unwrap();
    let e = peer.walk::<Cyclic>(crafted_addr).err().unwrap();
    assert!(matches!(e, Error::WalkLimit { .. }), "{e}");
    // SAFETY: `Crafted::string` has ShmString's layout (three u64); never dropped.
    let s: &ShmString = unsafe { &*(crafted.string.as_ptr() as *const ShmString) };
    assert!(matches!(s.get(peer), Err(Error::InvalidUtf8 { .. })));
    // SAFETY: as above, for ShmVec<u64>.
    let v: &ShmVec<u64> = unsafe { &*(crafted.overflow.as_ptr() as *const ShmVec<u64>) };
    assert!(matches!(v.get(peer), Err(Error::InvalidPointer { .. })));
    // SAFETY: as above, for ShmBox<u64> (one u64).
    let b: &ShmBox<u64> = unsafe { &*(&crafted.misaligned as *const u64 as *const ShmBox<u64>) };
    assert!(matches!(b.get(peer), Err(Error::InvalidPointer { reason, .. }) if reason.contains("aligned")));
    let limits = rpal::WalkLimits {
        max_visits: 10,
        max_depth: 1000,
    };
    let e = Walk::with_limits(peer, limits)
        .visit::<Cyclic>(crafted_addr, 1)
        .err()
        .unwrap();
    assert!(matches!(e, Error::WalkLimit { visits: 11, .. }), "{e}");

    // Properties with random pointers and lengths.
    let (base, len) = (region.addr(), region.len());
    let model = |addr: u64, n: u64, align: u64| {
        addr % align == 0 && addr.checked_add(n).is_some_and(|end| addr >= base && end <= base + len)
    };
    let near = prop_oneof![
        any::<u64>(),
        (0..len + 4096).prop_map(move |o| base.wrapping_add(o).wrapping_sub(2048)),
        Just(base),
        Just(base + len),
    ];
    let lens = prop_oneof![any::<u64>(), 0..8192u64, Just(u64::MAX), Just(len)];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: common::size(20_000, 2000) as u32,
        ..ProptestConfig::default()
    });
    runner
        .run(&(near.clone(), lens.clone(), 0..7u32), |(addr, n, align_log)| {
            let align = 1u64 << align_log;
            prop_assert_eq!(peer.check(addr, n, align).is_ok(), model(addr, n, align));
            if let Ok(bytes) = peer.bytes(addr, n) {
                prop_assert_eq!(bytes.as_ptr() as u64, addr);
                prop_assert_eq!(bytes.len() as u64, n);
            }
            if let Ok(s) = peer.copy_str(addr, n) {
                prop_assert_eq!(s.len() as u64, n);
            }
            // Any words read as shm headers: never a panic; Ok only inside the region.
            let words = [addr, n, n];
            // SAFETY: ShmVec<u64> and ShmString are three u64 (repr(C)); ManuallyDrop
            // keeps the forged values from being freed.
            let v = unsafe { std::mem::transmute::<[u64; 3], ManuallyDrop<ShmVec<u64>>>(words) };
            if let Ok(xs) = v.get(peer) {
                prop_assert!(xs.is_empty() || model(xs.as_ptr() as u64, xs.len() as u64 * 8, 8));
            }
            // SAFETY: as above.
            let s = unsafe { std::mem::transmute::<[u64; 3], ManuallyDrop<ShmString>>(words) };
            if let Ok(b) = s.get_bytes(peer) {
                prop_assert!(b.is_empty() || model(b.as_ptr() as u64, b.len() as u64, 1));
            }
            prop_assert_eq!(
                s.get(peer).is_ok(),
                s.get_bytes(peer).is_ok_and(|b| std::str::from_utf8(b).is_ok())
            );
            // SAFETY: ShmBox<u64> is one u64.
            let b = unsafe { std::mem::transmute::<u64, ManuallyDrop<ShmBox<u64>>>(addr) };
            prop_assert_eq!(b.get(peer).is_ok(), model(addr, 8, 8));
            Ok(())
        })
        .unwrap();
    drop(conn);
    child.expect_success();
}
