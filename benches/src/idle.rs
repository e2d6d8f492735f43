//! An idle server's CPU and memory per connection.

use std::path::Path;
use std::time::Duration;

use crate::*;

/// User + system CPU ticks of process `pid`. An error, never 0, if its
/// `/proc` entry cannot be read: a dead server must not read as idle.
fn proc_cpu_ticks(pid: u32) -> rpal::Result<u64> {
    let bad = |why: String| rpal::Error::io(format!("read /proc/{pid}/stat"), std::io::Error::other(why));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| rpal::Error::io(format!("read /proc/{pid}/stat (did the server die?)"), e))?;
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| bad("no ')'".into()))?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let field = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad(format!("field {} missing or not a number", i + 3)))
    };
    Ok(field(11)? + field(12)?)
}

/// Resident KiB of process `pid` (an error if its `/proc` entry is gone).
fn proc_rss_kib(pid: u32) -> rpal::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| rpal::Error::io(format!("read /proc/{pid}/status (did the server die?)"), e))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| rpal::Error::io(format!("VmRSS of {pid}"), std::io::Error::other("missing")))
}

/// Idle cost of a server: `conns` connected clients (each made one call and
/// went silent); returns (CPU % over `window`, resident KiB per connection).
pub fn measure_idle(exe: &Path, conns: usize, window: Duration) -> rpal::Result<(f64, f64)> {
    let path = std::env::temp_dir().join(format!("rpal-bench-idle-{}.sock", std::process::id()));
    // The default configuration: what an idle server costs as deployed.
    let (child, _) = ChildGuard::start(exe, "rpal-default", &[path.display().to_string()])
        .map_err(|e| rpal::Error::io("start the idle server child", e))?;
    let pid = child.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = proc_rss_kib(pid)?;
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut c = rpal::raw::Client::connect(&path, rpal::ClientOptions::new("bench"))?;
        c.call(1, &7u64.to_le_bytes())?;
        clients.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = proc_rss_kib(pid)?;
    let cpu0 = proc_cpu_ticks(pid)?;
    std::thread::sleep(window);
    let cpu1 = proc_cpu_ticks(pid)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_pct = (cpu1 - cpu0) as f64 / hz / window.as_secs_f64() * 100.0;
    drop(clients);
    Ok((cpu_pct, rss1.saturating_sub(rss0) as f64 / conns as f64))
}
