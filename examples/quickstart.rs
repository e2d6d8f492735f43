//! Quickstart: a `calc` service in one process, called from another.
//!
//! The service is a trait with `#[rpal::service]`. The program starts a copy
//! of itself as the server (`--server`), which serves the same handler over
//! shared memory and, for comparison, over loopback TCP. The client times
//! `add(a, b)` through the same generated client on both and prints p50/p99
//! and the speed-up.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use rpal::prelude::*;

const CALLS: usize = 20_000;

/// A calculator, declared once: `#[rpal::service]` makes the `Calc` handler
/// trait, `ServeCalc` (the dispatcher) and `CalcClient` (blocking and async
/// methods, over shared memory or TCP).
#[rpal::service]
pub trait Calc {
    /// `a + b`, wrapping.
    fn add(&self, a: u64, b: u64) -> u64;
    /// The sum of a slice the caller built in its own shared memory: the
    /// server reads it in place.
    fn sum(&self, xs: ShmSlice<u64>) -> u64;
}

struct Calculator;

impl Calc for Calculator {
    fn add(&self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    fn sum(&self, xs: &[u64]) -> u64 {
        xs.iter().copied().fold(0, u64::wrapping_add)
    }
}

/// Pins this thread to `cpu`: a spinning caller and its server each keep
/// a core (p99 0.6 us here, against 50-120 us unpinned, see the README).
/// `--no-pin` (passed on to the server) leaves placement to the scheduler.
fn pin(cpu: usize) {
    let n = rpal::cpus_online();
    if n > 1 && !std::env::args().any(|a| a == "--no-pin") {
        let _ = rpal::pin_to_cpu(cpu % n);
    }
}

fn run_server(path: &str) -> std::result::Result<(), Box<dyn std::error::Error>> {
    pin(1);
    // The same handler on shared memory and on loopback TCP.
    let host = ServeCalc::new(Calculator).host().shm(path).tcp("127.0.0.1:0").start()?;
    println!("ready {}", host.tcp_addr().ok_or("no TCP address")?.port());
    host.join();
    Ok(())
}

/// Kills the server process when the client is done, however it ends,
/// and removes the socket file it cannot remove once killed.
struct ServerProcess(Child, std::path::PathBuf);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn percentiles(mut ns: Vec<u64>) -> (f64, f64) {
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn time_calls(mut call: impl FnMut(u64, u64) -> u64) -> (f64, f64) {
    for i in 0..2_000 {
        assert_eq!(call(i, 1), i + 1);
    }
    let mut ns = Vec::with_capacity(CALLS);
    for i in 0..CALLS as u64 {
        let t0 = Instant::now();
        let sum = call(i, 2 * i);
        ns.push(t0.elapsed().as_nanos() as u64);
        assert_eq!(sum, 3 * i);
    }
    percentiles(ns)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--server") {
        return run_server(&args[2]);
    }
    pin(0);
    let path = std::env::temp_dir().join(format!("rpal-quickstart-{}.sock", std::process::id()));
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--server")
        .arg(&path)
        .args(args.iter().filter(|a| *a == "--no-pin"))
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let server = ServerProcess(child, path.clone());
    let port: u16 = line
        .trim()
        .strip_prefix("ready ")
        .ok_or("server did not start")?
        .parse()?;

    let calc = CalcClient::connect(&path)?;
    let rpal::Channel::Shm(shm) = calc.channel() else {
        unreachable!("connect is shared memory")
    };
    println!(
        "client pid {} connected to server pid {} over shared memory",
        std::process::id(),
        shm.server_pid()
    );
    println!("2 + 40 = {}", calc.add(2, 40)?);
    let xs = ShmSlice::from_slice(&(1..=100u64).collect::<Vec<_>>())?;
    println!(
        "sum(1..=100) = {} (read in place from this process's memory)",
        calc.sum(&xs)?
    );

    let (rpal_p50, rpal_p99) = time_calls(|a, b| calc.add(a, b).expect("rpal call"));
    let tcp = CalcClient::connect_tcp(("127.0.0.1", port))?;
    let (tcp_p50, tcp_p99) = time_calls(|a, b| tcp.add(a, b).expect("tcp call"));

    println!("{CALLS} calls of add(a, b), round trip between two processes on different cores:");
    println!("  rpal, shared memory  p50 {rpal_p50:>8.2} us   p99 {rpal_p99:>8.2} us");
    println!("  rpal, loopback TCP   p50 {tcp_p50:>8.2} us   p99 {tcp_p99:>8.2} us");
    println!("  speed-up (TCP p50 / rpal p50): {:.0}x", tcp_p50 / rpal_p50);
    drop(calc);
    drop(server);
    Ok(())
}
