//! rpal (raw endpoints) and loopback TCP round trips.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::*;

/// rpal calls to a child server.
pub struct RpalRoundTrip {
    client: rpal::raw::Client,
    _child: ChildGuard,
    _path: PathBuf,
}

impl RpalRoundTrip {
    /// Starts a child server (`parked`: both sides park at once) and connects.
    pub fn start(exe: &Path, parked: bool) -> rpal::Result<Self> {
        let path = std::env::temp_dir().join(format!("rpal-bench-{}-{parked}.sock", std::process::id()));
        let role = if parked { "rpal-parked" } else { "rpal-busy" };
        let (child, _) = ChildGuard::start(exe, role, &[path.display().to_string()])
            .map_err(|e| rpal::Error::io("start the rpal server child", e))?;
        let mut opts = rpal::ClientOptions::new("bench");
        if parked {
            opts.wait = rpal::WaitConfig::parked();
        }
        opts.call_timeout = Some(Duration::from_secs(10));
        let client = rpal::raw::Client::connect(&path, opts)?;
        Ok(Self {
            client,
            _child: child,
            _path: path,
        })
    }
}

impl RoundTrip for RpalRoundTrip {
    fn round_trip(&mut self, value: u64) -> u64 {
        self.client
            .call_with(
                1,
                None,
                |buf| {
                    buf[..8].copy_from_slice(&value.to_le_bytes());
                    8
                },
                |reply, _| u64::from_le_bytes(reply[..8].try_into().expect("8-byte reply")),
            )
            .expect("rpal call")
    }
}

/// Loopback TCP (TCP_NODELAY) request/response with a 16-byte frame (method,
/// length, 8-byte payload), as an RPC over TCP would send.
pub struct TcpRoundTrip {
    sock: TcpStream,
    _child: ChildGuard,
}

impl TcpRoundTrip {
    /// Starts the echoing child and connects.
    pub fn start(exe: &Path) -> std::io::Result<Self> {
        let (child, port) = ChildGuard::start(exe, "tcp", &[])?;
        let sock = TcpStream::connect(("127.0.0.1", port.parse::<u16>().map_err(std::io::Error::other)?))?;
        sock.set_nodelay(true)?;
        Ok(Self { sock, _child: child })
    }
}

impl RoundTrip for TcpRoundTrip {
    fn round_trip(&mut self, value: u64) -> u64 {
        let mut frame = [0u8; 16];
        frame[0..4].copy_from_slice(&1u32.to_le_bytes());
        frame[4..8].copy_from_slice(&8u32.to_le_bytes());
        frame[8..16].copy_from_slice(&value.to_le_bytes());
        self.sock.write_all(&frame).expect("tcp write");
        self.sock.read_exact(&mut frame).expect("tcp read");
        u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"))
    }
}
