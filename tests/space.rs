//! The host-wide slot registry with real processes: dead owners' slots are
//! reclaimed, pid reuse is detected by start time, live owners are left alone.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const HEADER: u64 = 40;
const ENTRY: u64 = 16;

fn registry(name: &str) -> PathBuf {
    let p = common::test_dir().join(format!("{name}.slots"));
    let _ = std::fs::remove_file(&p);
    p
}

fn read_entry(reg: &Path, slot: u64) -> (u32, i32, u64) {
    // Header: magic, version, base, slot_size, slots (u64 each); then 16-byte entries.
    let f = std::fs::File::open(reg).unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, HEADER + slot * ENTRY).unwrap();
    let owner = u64::from_le_bytes(b[..8].try_into().unwrap());
    // The start word is the owner's start time in clock ticks.
    let start = u64::from_le_bytes(b[8..].try_into().unwrap());
    ((owner >> 32) as u32, owner as u32 as i32, start)
}

/// A process's start time (clock ticks since boot), from /proc.
fn start_time(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn write_entry(reg: &Path, slot: u64, generation: u32, pid: i32, start: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(reg).unwrap();
    let owner = ((generation as u64) << 32) | pid as u32 as u64;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&owner.to_le_bytes());
    b[8..].copy_from_slice(&start.to_le_bytes());
    f.write_all_at(&b, HEADER + slot * ENTRY).unwrap();
}

/// Runs a child that creates its arena against `reg` (a one-slot window, so
/// every claim must reuse slot 0), writes its slot to `out` (or `full` if
/// none was free), then exits or waits to be killed.
fn claim(reg: &Path, out: &Path, linger: bool) -> common::ChildGuard {
    let _ = std::fs::remove_file(out);
    common::spawn(
        "slots_of_dead_owners_are_reclaimed",
        if linger { "linger" } else { "exit" },
        &[
            ("RPAL_REGISTRY", reg.display().to_string()),
            ("RPAL_WINDOW_SLOTS", "1".to_string()),
            ("RPAL_TEST_OUT", out.display().to_string()),
        ],
    )
}

fn read_slot(out: &Path) -> String {
    for _ in 0..2000 {
        if let Ok(s) = std::fs::read_to_string(out) {
            if s.ends_with('\n') {
                return s.trim().to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("child never reported its slot");
}

#[test]
fn slots_of_dead_owners_are_reclaimed() {
    if let Some(role) = common::role() {
        let report = match rpal::Arena::global() {
            Ok(arena) => arena.region().slot().to_string(),
            Err(e) if e.to_string().contains("no free slot") => "full".to_string(),
            Err(e) => panic!("{e}"),
        };
        std::fs::write(common::arg("RPAL_TEST_OUT"), format!("{report}\n")).unwrap();
        if role == "linger" {
            std::thread::sleep(Duration::from_secs(60));
        }
        return;
    }
    let reg = registry("reclaim");
    let out = common::test_dir().join("reclaim.out");

    // A first owner takes the only slot and is killed: the slot stays recorded as its own.
    let mut a = claim(&reg, &out, true);
    assert_eq!(read_slot(&out), "0");
    let (gen_a, pid, start) = read_entry(&reg, 0);
    assert_eq!(pid, a.pid());
    assert_ne!(start, 0);
    a.kill();

    // The next process reclaims the dead owner's slot, with a new generation.
    let mut b = claim(&reg, &out, false);
    assert_eq!(read_slot(&out), "0");
    b.expect_success();
    let (gen_b, _, _) = read_entry(&reg, 0);
    assert_eq!(gen_b, gen_a + 1);

    // A live pid with the wrong start time is a reused pid: reclaimed too.
    let me = std::process::id() as i32;
    write_entry(&reg, 0, 40, me, 12345);
    let mut c = claim(&reg, &out, false);
    assert_eq!(read_slot(&out), "0");
    c.expect_success();
    assert_eq!(read_entry(&reg, 0).0, 41);

    // A live owner with its real start time keeps its slot: no room for another.
    let my_start = start_time(me);
    write_entry(&reg, 0, 50, me, my_start);
    let mut d = claim(&reg, &out, false);
    assert_eq!(read_slot(&out), "full");
    d.expect_success();
    assert_eq!(read_entry(&reg, 0), (50, me, my_start));
    let _ = std::fs::remove_file(&reg);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn a_registry_of_another_geometry_is_refused() {
    if let Some(role) = common::role() {
        match rpal::Arena::global() {
            // A live process uses the other geometry: refused, with the reason.
            Err(e) if role == "refused" => assert!(
                e.to_string().contains("geometry") || e.to_string().contains("base"),
                "{e}"
            ),
            // Nobody alive uses it (an older build's leftover): started afresh.
            Ok(_) if role == "afresh" => {}
            other => panic!("{role}: {other:?}"),
        }
        return;
    }
    let reg = registry("geometry");
    // A header with another window base, as a process with other settings would write.
    let f = std::fs::File::create(&reg).unwrap();
    f.set_len(HEADER + 1024 * ENTRY).unwrap();
    // Same slot count as the child's default; another base.
    let mut h = Vec::new();
    for v in [u64::from_le_bytes(*b"RPALSLOT"), 2, 0x6000_0000_0000, 1 << 32, 1024] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    f.write_all_at(&h, 0).unwrap();
    // This (live) process holds a slot under that geometry.
    let me = std::process::id() as i32;
    write_entry(&reg, 3, 1, me, start_time(me));
    let env = [("RPAL_REGISTRY", reg.display().to_string())];
    common::spawn("a_registry_of_another_geometry_is_refused", "refused", &env).expect_success();
    // Once no live process holds a slot, the file is taken over afresh.
    write_entry(&reg, 3, 1, 0, 0);
    common::spawn("a_registry_of_another_geometry_is_refused", "afresh", &env).expect_success();
    let _ = std::fs::remove_file(&reg);
}

/// A same-uid process truncates the registry and scribbles on it while an
/// rpal process reads it: the registry is read with `pread` under a lock,
/// never mapped, so the reader sees free or stale entries, never a SIGBUS;
/// and a process started meanwhile still gets a slot.
#[test]
fn a_truncated_or_scribbled_registry_crashes_nobody() {
    if let Some(role) = common::role() {
        let arena = rpal::Arena::global().expect("a slot, whatever the registry holds");
        if role == "reader" {
            let space = rpal::raw::Space::global().unwrap();
            let slots = space.config().slots as usize;
            let mine = arena.region().slot();
            let t0 = std::time::Instant::now();
            let mut looks = 0u64;
            while t0.elapsed() < Duration::from_millis(1500) {
                for i in 0..slots.min(64) {
                    let _ = space.slot_owner(i);
                }
                let _ = space.slot_owner(mine);
                looks += 1;
            }
            println!("{looks} looks at the registry");
        }
        return;
    }
    let reg = registry("scribble");
    let env = [
        ("RPAL_REGISTRY", reg.display().to_string()),
        ("RPAL_WINDOW_SLOTS", "64".to_string()),
    ];
    let test = "a_truncated_or_scribbled_registry_crashes_nobody";
    let mut reader = common::spawn(test, "reader", &env);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    let mut rounds = 0;
    while t0.elapsed() < Duration::from_millis(1000) {
        // Truncate to nothing, to half a header, then fill with garbage.
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&reg) {
            let _ = f.set_len(0);
            let _ = f.set_len(HEADER / 2);
            let junk: Vec<u8> = (0..(HEADER + 64 * ENTRY) as usize).map(|i| (i * 37) as u8).collect();
            let _ = f.write_all_at(&junk, 0);
            let _ = f.set_len(3);
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    // Left truncated: a newcomer rewrites the header and gets a slot. (Left
    // as garbage, a newcomer is refused with `RegistryMismatch`, naming the
    // file: a denial that says so, not a crash.)
    std::fs::OpenOptions::new()
        .write(true)
        .open(&reg)
        .unwrap()
        .set_len(0)
        .unwrap();
    common::spawn(test, "newcomer", &env).expect_success();
    let st = reader.wait_timeout(Duration::from_secs(30 * common::time_scale()));
    assert!(
        st.success(),
        "the reader died while the registry was scribbled on: {st:?}"
    );
    assert!(rounds > 10);
    let _ = std::fs::remove_file(&reg);
}
