//! Three microservices merged onto one node, each in its own process,
//! calling one another in a chain: gateway -> auth -> store.
//!
//! The client asks the gateway for a user's profile. The gateway asks auth
//! to check the token; auth asks the store for the user's record. Every hop
//! is a generated stub call. The chain runs twice: over shared memory, then
//! with the same stubs over loopback TCP, the way these services would talk
//! if they were not merged.
//!
//! ```text
//! cargo run --release --example merged_services
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rpal::prelude::*;

/// How long a process waits for the one it calls to start serving.
const START_WAIT: Duration = Duration::from_secs(10);

const CALLS: usize = 10_000;

/// A user record.
#[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Profile {
    /// User id.
    pub user: u64,
    /// Account balance, in cents.
    pub balance: u64,
    /// 1 if the token was valid, else 0 (and the rest is zero).
    pub authorized: u64,
}

/// The storage service at the end of the chain.
#[rpal::service]
pub trait Store {
    /// The record of `user`.
    fn get(&self, user: u64) -> Profile;
}

/// The auth service in the middle.
#[rpal::service]
pub trait Auth {
    /// The record of `user` if `token` is valid for it.
    fn profile(&self, user: u64, token: u64) -> Profile;
}

/// The gateway at the front.
#[rpal::service]
pub trait Gateway {
    /// Handles a request for `user`'s profile with `token`.
    fn request(&self, user: u64, token: u64) -> Profile;
}

struct StoreImpl;

impl Store for StoreImpl {
    fn get(&self, user: u64) -> Profile {
        Profile {
            user,
            balance: user * 100 + 7,
            authorized: 1,
        }
    }
}

struct AuthImpl(StoreClient);

impl Auth for AuthImpl {
    fn profile(&self, user: u64, token: u64) -> Profile {
        if token != user ^ 0x5eed {
            return Profile {
                user,
                balance: 0,
                authorized: 0,
            };
        }
        // A failed downstream call answers "unauthorized" rather than panicking.
        self.0.get(user).unwrap_or(Profile {
            user,
            balance: 0,
            authorized: 0,
        })
    }
}

struct GatewayImpl(AuthClient);

impl Gateway for GatewayImpl {
    fn request(&self, user: u64, token: u64) -> Profile {
        self.0.profile(user, token).unwrap_or(Profile {
            user,
            balance: 0,
            authorized: 0,
        })
    }
}

/// One service process: `role` in `dir`, calling downstream over `transport`.
/// Prints `ready <tcp port>` once it serves.
fn run_service(
    role: &str,
    dir: &Path,
    transport: &str,
    downstream_port: u16,
) -> Result<(), Box<dyn std::error::Error>> {
    let shm = dir.join(format!("{role}.sock"));
    macro_rules! downstream {
        ($client:ident, $name:literal) => {
            if transport == "tcp" {
                $client::connect_tcp_waiting(("127.0.0.1", downstream_port), START_WAIT)?
            } else {
                $client::connect_waiting(dir.join(concat!($name, ".sock")), START_WAIT)?
            }
        };
    }
    let host = match role {
        "store" => ServeStore::new(StoreImpl).host(),
        "auth" => {
            return serve(ServeAuth::new(AuthImpl(downstream!(StoreClient, "store"))).host(), &shm);
        }
        "gateway" => {
            return serve(
                ServeGateway::new(GatewayImpl(downstream!(AuthClient, "auth"))).host(),
                &shm,
            );
        }
        other => return Err(format!("unknown role {other}").into()),
    };
    serve(host, &shm)
}

fn serve<D: rpal::Dispatch>(b: rpal::HostBuilder<D>, shm: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let host = b.shm(shm).tcp("127.0.0.1:0").start()?;
    println!("ready {}", host.tcp_addr().map_or(0, |a| a.port()));
    host.join();
    Ok(())
}

/// The three service processes; killed when dropped.
struct Chain(Vec<Child>);

impl Drop for Chain {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts store, auth, gateway (each connecting downstream over
/// `transport`) and returns them with the gateway's TCP port.
fn start_chain(dir: &Path, transport: &str) -> Result<(Chain, u16), Box<dyn std::error::Error>> {
    let mut chain = Chain(Vec::new());
    let mut port = 0u16;
    for role in ["store", "auth", "gateway"] {
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--service",
                role,
                &dir.display().to_string(),
                transport,
                &port.to_string(),
            ])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        chain.0.push(child);
        port = line
            .trim()
            .strip_prefix("ready ")
            .ok_or_else(|| format!("{role} did not start"))?
            .parse()?;
    }
    Ok((chain, port))
}

fn time_chain(gateway: &GatewayClient) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let mut ns = Vec::with_capacity(CALLS);
    for i in 0..CALLS as u64 + 1_000 {
        let user = i % 1000;
        let t0 = Instant::now();
        let p = gateway.request(user, user ^ 0x5eed)?;
        if i >= 1_000 {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
        assert_eq!(p, StoreImpl.get(user), "the chain answered wrongly");
    }
    let denied = gateway.request(1, 0)?;
    assert_eq!(denied.authorized, 0, "a bad token must be refused");
    ns.sort_unstable();
    Ok((
        ns[ns.len() / 2] as f64 / 1000.0,
        ns[ns.len() * 99 / 100] as f64 / 1000.0,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--service") {
        let port = args.get(5).and_then(|p| p.parse().ok()).unwrap_or(0);
        return run_service(&args[2], Path::new(&args[3]), &args[4], port);
    }
    let mut results = Vec::new();
    for transport in ["shm", "tcp"] {
        let dir: PathBuf = std::env::temp_dir().join(format!("rpal-merged-{}-{transport}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (chain, port) = start_chain(&dir, transport)?;
        let gateway = if transport == "tcp" {
            GatewayClient::connect_tcp(("127.0.0.1", port))?
        } else {
            GatewayClient::connect_waiting(dir.join("gateway.sock"), START_WAIT)?
        };
        let pids: Vec<u32> = chain.0.iter().map(Child::id).collect();
        results.push((transport, time_chain(&gateway)?, pids));
        drop(gateway);
        drop(chain);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{CALLS} requests through gateway -> auth -> store, three hops, each service in its own process:");
    for (transport, (p50, p99), pids) in &results {
        let name = if *transport == "shm" {
            "rpal, shared memory"
        } else {
            "rpal, loopback TCP "
        };
        println!("  {name}  p50 {p50:>8.2} us   p99 {p99:>8.2} us   (pids {pids:?})");
    }
    println!(
        "  speed-up of the chain (TCP p50 / shared-memory p50): {:.1}x",
        results[1].1.0 / results[0].1.0
    );
    let cpus = rpal::cpus_online();
    if cpus < 4 {
        println!(
            "  note: {cpus} CPUs for 4 processes that each spin while they wait: spinners take turns at the \
             scheduler's pace, so hops cost wake-ups here, not the sub-microsecond spin round trip"
        );
    }
    Ok(())
}
