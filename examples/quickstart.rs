//! Quickstart: a `calc` service in one process, called from another.
//!
//! The program starts a copy of itself as the server (`--server`), which
//! serves `add(a, b)` over rpal and, for comparison, over loopback TCP. The
//! client then times both and prints p50/p99 and the speed-up.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use rpal::prelude::*;

const ADD: u32 = 1;
const CALLS: usize = 20_000;

/// The server's handler: `add` reads two u64 in place in the client's
/// memory and writes the sum in place in ours.
fn calc(req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus> {
    match req.method {
        ADD => {
            let args: &[u8; 16] = req.payload.try_into().map_err(|_| RemoteStatus::BadRequest)?;
            let (a, b) = args.split_at(8);
            let sum = u64::from_le_bytes(a.try_into().unwrap()).wrapping_add(u64::from_le_bytes(b.try_into().unwrap()));
            reply[..8].copy_from_slice(&sum.to_le_bytes());
            Ok(8)
        }
        _ => Err(RemoteStatus::UnknownMethod),
    }
}

fn pin(cpu: usize) {
    let n = rpal::sys::cpus_online();
    if n > 1 {
        let _ = rpal::sys::pin_to_cpu(cpu % n);
    }
}

fn run_server(path: &str) -> std::result::Result<(), Box<dyn std::error::Error>> {
    pin(1);
    let server = Server::bind(path, ServerOptions::new("calc"))?;
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    println!("ready {}", tcp.local_addr()?.port());
    std::thread::spawn(move || {
        // The same add over TCP: 16 bytes in, 8 bytes out.
        if let Ok((mut s, _)) = tcp.accept() {
            let _ = s.set_nodelay(true);
            let mut args = [0u8; 16];
            while s.read_exact(&mut args).is_ok() {
                let a = u64::from_le_bytes(args[..8].try_into().unwrap());
                let b = u64::from_le_bytes(args[8..].try_into().unwrap());
                if s.write_all(&a.wrapping_add(b).to_le_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    rpal::serve(server, calc, PollerConfig::default())?.join();
    Ok(())
}

/// Kills the server process when the client is done, however it ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let server = ServerProcess(child);
    let port: u16 = line
        .trim()
        .strip_prefix("ready ")
        .ok_or("server did not start")?
        .parse()?;

    let mut client = Client::connect(&path, ClientOptions::new("calc"))?;
    println!(
        "client pid {} connected to server pid {}; server region {:#x} mapped here read-only at the same address",
        std::process::id(),
        client.peer().cred.pid,
        client.peer().region.addr()
    );
    println!(
        "2 + 40 = {}",
        u64::from_le_bytes(client.call(ADD, &[2u64.to_le_bytes(), 40u64.to_le_bytes()].concat())?[..8].try_into()?)
    );

    let (rpal_p50, rpal_p99) = time_calls(|a, b| {
        client
            .call_with(
                ADD,
                None,
                |buf| {
                    buf[..8].copy_from_slice(&a.to_le_bytes());
                    buf[8..16].copy_from_slice(&b.to_le_bytes());
                    16
                },
                |reply, _| u64::from_le_bytes(reply[..8].try_into().unwrap()),
            )
            .expect("rpal call")
    });
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    let (tcp_p50, tcp_p99) = time_calls(|a, b| {
        tcp.write_all(&[a.to_le_bytes(), b.to_le_bytes()].concat())
            .expect("tcp write");
        let mut out = [0u8; 8];
        tcp.read_exact(&mut out).expect("tcp read");
        u64::from_le_bytes(out)
    });

    println!("{CALLS} calls of add(a, b), round trip between two processes on different cores:");
    println!("  rpal          p50 {rpal_p50:>8.2} us   p99 {rpal_p99:>8.2} us");
    println!("  loopback TCP  p50 {tcp_p50:>8.2} us   p99 {tcp_p99:>8.2} us");
    println!("  speed-up (TCP p50 / rpal p50): {:.0}x", tcp_p50 / rpal_p50);
    drop(client);
    drop(server);
    Ok(())
}
