//! Every `RPAL_*` setting says no to a value it does not accept, naming
//! the variable, the value and what it takes; peers set up with another
//! registry or window are told so by name. Each case runs in a child
//! process of its own, since settings are read once per process.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[rpal::service]
pub trait Echo {
    /// `x`.
    fn echo(&self, x: u64) -> u64;
}

struct EchoImpl;

impl Echo for EchoImpl {
    fn echo(&self, x: u64) -> u64 {
        x
    }
}

/// A child: sets up its arena (or connects to `RPAL_TEST_SOCK`) and prints
/// `outcome: ...` for the parent.
fn child() {
    let outcome = match std::env::var("RPAL_TEST_SOCK") {
        Ok(sock) => EchoClient::connect(&sock)
            .and_then(|c| c.echo(7))
            .map(|v| format!("echoed {v}")),
        Err(_) => rpal::Arena::global().map(|a| format!("arena of {} bytes", a.region().len())),
    };
    match outcome {
        Ok(v) => println!("outcome: ok: {v}"),
        Err(e) => println!("outcome: error: {e}"),
    }
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SERVE"));
    let host = ServeEcho::new(EchoImpl).host().shm(&base).start().expect("start");
    host.join();
}

/// Runs the child with `env` and returns its outcome line.
fn outcome(test: &str, env: &[(&str, String)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env("RPAL_TEST_ROLE", "child");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("outcome: "))
        .unwrap_or_else(|| panic!("no outcome from the child: {stdout}"))
        .to_owned()
}

#[test]
fn bad_values_are_refused_by_name() {
    const TEST: &str = "bad_values_are_refused_by_name";
    if common::role().is_some() {
        return child();
    }
    let cases: &[(&str, &str, &str)] = &[
        ("RPAL_ARENA_SIZE", "lots", "a size from 1M to 4G bytes"),
        ("RPAL_ARENA_SIZE", "4096", "a size from 1M to 4G bytes"),
        ("RPAL_ARENA_SIZE", "8589934592", "a size from 1M to 4G bytes"),
        ("RPAL_ARENA_SIZE", "64Q", "a size from 1M to 4G bytes"),
        ("RPAL_WINDOW_SLOTS", "many", "a whole number from 1 to 32768"),
        ("RPAL_WINDOW_SLOTS", "0", "a whole number from 1 to 32768"),
        (
            "RPAL_WINDOW_SLOTS",
            "20000",
            "at most 12288 slots above the window base 0x500000000000",
        ),
        ("RPAL_WINDOW_BASE", "0x1234", "a non-zero multiple of the slot size"),
        ("RPAL_WINDOW_BASE", "0x7fff00000000", "below 0x800000000000"),
        ("RPAL_REGISTRY", "", "a file path"),
        ("RPAL_PKEYS", "maybe", "on or off"),
    ];
    for (name, value, accepted) in cases {
        let got = outcome(TEST, &[(name, value.to_string())]);
        println!("settings-row: {name}={value:?} -> {got}");
        assert!(got.starts_with("error: "), "{name}={value}: {got}");
        assert!(
            got.contains(&format!("{name}={value:?} is not accepted")),
            "{name}={value}: {got}"
        );
        assert!(got.contains(accepted), "{name}={value}: {got}");
    }
    // Good values, with suffixes, are taken as given.
    for (value, bytes) in [("64M", 64u64 << 20), ("1G", 1 << 30), ("0x200000", 2 << 20)] {
        let got = outcome(TEST, &[("RPAL_ARENA_SIZE", value.to_string())]);
        println!("settings-row: RPAL_ARENA_SIZE={value:?} -> {got}");
        assert_eq!(got, format!("ok: arena of {bytes} bytes"), "{value}");
    }
}

#[test]
fn a_peer_with_another_registry_or_window_is_told_which() {
    const TEST: &str = "a_peer_with_another_registry_or_window_is_told_which";
    match common::role().as_deref() {
        Some("server") => return serve_child(),
        Some(_) => return child(),
        None => {}
    }
    let base = common::sock_path("settings");
    let _server = common::spawn(TEST, "server", &[("RPAL_TEST_SERVE", base.display().to_string())]);
    let sock = base.display().to_string();
    // Wait for it with a client of the same settings.
    let t0 = std::time::Instant::now();
    while outcome(TEST, &[("RPAL_TEST_SOCK", sock.clone())]) != "ok: echoed 7" {
        assert!(t0.elapsed() < Duration::from_secs(20), "the server never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let registry = common::test_dir().join("other.slots");
    let other_registry = outcome(
        TEST,
        &[
            ("RPAL_TEST_SOCK", sock.clone()),
            ("RPAL_REGISTRY", registry.display().to_string()),
        ],
    );
    println!("settings-row: another RPAL_REGISTRY -> {other_registry}");
    assert!(
        other_registry.contains("the peer uses another slot registry"),
        "{other_registry}"
    );
    assert!(
        other_registry.contains("give both the same RPAL_REGISTRY"),
        "{other_registry}"
    );
    // Another window needs another registry too (a registry has one geometry).
    let other_window = outcome(
        TEST,
        &[
            ("RPAL_TEST_SOCK", sock),
            ("RPAL_REGISTRY", registry.display().to_string()),
            ("RPAL_WINDOW_BASE", "0x6000_0000_0000".into()),
        ],
    );
    println!("settings-row: another RPAL_WINDOW_BASE -> {other_window}");
    assert!(other_window.contains("window mismatch"), "{other_window}");
    assert!(other_window.contains("0x600000000000"), "{other_window}");
    let _ = std::fs::remove_file(&registry);
}
