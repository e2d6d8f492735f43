//! Child processes: starting, pinning, and the callee roles.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use rpal_core::sys;

use crate::*;

/// A child process, killed and reaped on drop; the socket files it served
/// (its first argument, when that is a `.sock` path, and the `.stream`
/// beside it) are removed then, since a killed server cannot.
pub struct ChildGuard {
    pub(crate) child: Child,
    stdout: BufReader<ChildStdout>,
    socket: Option<std::path::PathBuf>,
}

impl ChildGuard {
    /// Starts `exe --child role args...` and waits for its first stdout line
    /// (its "ready" message, which may carry data such as a port).
    pub fn start(exe: &Path, role: &str, args: &[String]) -> std::io::Result<(ChildGuard, String)> {
        let mut child = Command::new(exe)
            .arg("--child")
            .arg(role)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let socket = args
            .first()
            .filter(|a| a.ends_with(".sock"))
            .map(std::path::PathBuf::from);
        let mut guard = ChildGuard { child, stdout, socket };
        let mut line = String::new();
        guard.stdout.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other(format!(
                "child `{role}` exited before it was ready"
            )));
        }
        Ok((guard, line.trim().to_owned()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.stdout.read_to_end(&mut Vec::new());
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
            let _ = std::fs::remove_file(s.with_extension("stream"));
        }
    }
}

/// Pins this process's thread to `cpu` when the machine has more than one.
pub fn pin(cpu: usize) {
    let n = sys::cpus_online();
    if n > 1 {
        if let Err(e) = sys::pin_to_cpu(cpu % n) {
            eprintln!("rpal-bench: cannot pin to CPU {cpu}: {e}; figures will be noisier");
        }
    }
}

/// The server side of every busy row (`rpal busy`, `rpal-stub busy`), so
/// that their ratio compares the code and not two configurations: the
/// poller spins a fixed 200 us before parking, longer than the caller's own
/// work between calls (a 1 MiB write takes 20-60 us here), so no call pays
/// for a wake-up. (The default adaptive budget, 2-50 us, would park between
/// 1 MiB calls.)
pub fn busy_poller() -> rpal::PollerConfig {
    rpal::PollerConfig {
        spin_min: Duration::from_micros(200),
        spin_max: Duration::from_micros(200),
        ..rpal::PollerConfig::default()
    }
}

/// Runs a child role; called by the binary's `main` for `--child`.
pub fn run_child(role: &str, args: &[String]) -> rpal::Result<()> {
    pin(1);
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match role {
        "raw-spin" | "raw-futex" => {
            let fd: i32 = arg(0).parse().expect("fd");
            // SAFETY: the parent passed us this inherited memfd's number; we own it now.
            let page = SharedPage::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
            println!("ready");
            page.echo_loop(role == "raw-futex");
            Ok(())
        }
        "rpal-busy" | "rpal-parked" | "rpal-default" => {
            let mut opts = rpal::ServerOptions::new("bench");
            // The idle row holds 100 connections from one process, past the
            // default per-peer quota of 64.
            opts.quotas.connections_per_peer = 128;
            let server = rpal::raw::Server::bind(arg(0), opts)?;
            let cfg = match role {
                "rpal-parked" => rpal::PollerConfig::parked(),
                "rpal-busy" => busy_poller(),
                _ => rpal::PollerConfig::default(),
            };
            let serving = rpal::raw::serve(server, echo_handler, cfg)?;
            println!("ready");
            serving.join();
            Ok(())
        }
        "tcp" => {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| rpal::Error::io("bind loopback", e))?;
            println!(
                "{}",
                l.local_addr().map_err(|e| rpal::Error::io("local_addr", e))?.port()
            );
            let (mut s, _) = l.accept().map_err(|e| rpal::Error::io("accept", e))?;
            let _ = s.set_nodelay(true);
            let mut frame = [0u8; 16];
            while s.read_exact(&mut frame).is_ok() {
                let v = u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"));
                frame[8..16].copy_from_slice(&(!v).to_le_bytes());
                if s.write_all(&frame).is_err() {
                    break;
                }
            }
            Ok(())
        }
        "stub-busy" | "stub-parked" => stub::run_stub_server(&arg(0), role == "stub-parked"),
        "queue-producer" => queue_producer(
            &arg(0),
            arg(1).parse().expect("payload"),
            arg(2).parse().expect("count"),
        ),
        other => panic!("unknown child role {other}"),
    }
}

/// The callee of the rpal rows: reads the 8-byte payload, answers its complement.
pub fn echo_handler(req: &rpal::raw::Request<'_>, reply: &mut [u8]) -> Result<usize, rpal::RemoteStatus> {
    let v = u64::from_le_bytes(
        req.payload
            .get(..8)
            .ok_or(rpal::RemoteStatus::BadRequest)?
            .try_into()
            .expect("8 bytes"),
    );
    reply[..8].copy_from_slice(&(!v).to_le_bytes());
    Ok(8)
}
