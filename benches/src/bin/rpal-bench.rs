//! `rpal-bench`: round trips between two pinned processes for every
//! transport, in one run, so they can be compared as ratios.
//!
//! ```text
//! cargo run --release -p rpal-bench -- [--json] [--iters N] [--quick] [--payload BYTES] [--only NAME]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use rpal_bench::stub::{StubMode, StubRoundTrip};
use rpal_bench::{
    ALLOC_BATCH, RawPingPong, RoundTrip, Row, RpalRoundTrip, TcpRoundTrip, measure_alloc, measure_idle, measure_queue,
    measure_samples, pin, run_child, summarize,
};

/// Stub payloads: (bytes, iterations of fast rows, of sleeping or TCP rows).
const STUB_PAYLOADS: [(usize, usize, usize); 4] = [
    (8, 200_000, 20_000),
    (4096, 50_000, 10_000),
    (65536, 10_000, 5_000),
    (1 << 20, 2_000, 1_000),
];
/// Rows that `--only stub` selects.
const STUB_ROWS: [&str; 3] = ["local", "rpal-stub", "tcp-stub"];

struct Args {
    json: bool,
    iters: Option<usize>,
    quick: bool,
    only: Option<String>,
    payload: Option<usize>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        iters: None,
        quick: false,
        only: None,
        payload: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--json" => a.json = true,
            "--quick" => a.quick = true,
            "--iters" => a.iters = Some(it.next().and_then(|v| v.parse().ok()).ok_or("--iters needs a number")?),
            "--payload" => {
                a.payload = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--payload needs a number")?,
                )
            }
            "--only" => a.only = Some(it.next().ok_or("--only needs a transport name")?),
            "-h" | "--help" => {
                println!(
                    "usage: rpal-bench [--json] [--iters N] [--quick] [--payload BYTES] [--only NAME[,NAME...]] (raw-spin raw-futex rpal rpal-busy rpal-parked tcp stub local rpal-stub tcp-stub queue idle alloc)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help")),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--child") {
        let role = argv.get(2).ok_or("--child needs a role")?;
        run_child(role, &argv[3..])?;
        return Ok(());
    }
    let args = parse()?;
    let exe: PathBuf = std::env::current_exe()?;
    pin(0);
    // (transport, mode, payload, default iterations): sleeping rows are
    // ~100x slower, and big payloads cost their write on every call.
    let mut plan: Vec<(&str, &str, usize, usize)> = vec![
        ("raw-spin", "busy", 8, 200_000),
        ("raw-futex", "parked", 8, 20_000),
        ("rpal", "busy", 8, 200_000),
        ("rpal", "parked", 8, 20_000),
        ("tcp", "busy", 8, 20_000),
    ];
    for (payload, fast, slow) in STUB_PAYLOADS {
        // At 8 B the payload is an inline argument: there is no write of
        // the caller's to time alone, so no `local` row.
        if payload > 8 {
            plan.push(("local", "write", payload, fast));
        }
        plan.push(("rpal-stub", "busy", payload, fast));
        plan.push(("rpal-stub", "parked", payload, slow));
        plan.push(("rpal-stub", "async", payload, slow));
        plan.push(("tcp-stub", "busy", payload, slow));
        if payload == 8 {
            // What an async handler adds: the hop to tokio and back.
            plan.push(("rpal-stub", "async-handler", payload, slow));
        }
    }
    // The machine's two vCPUs may sit on two cores or on one core's two
    // hyperthreads, and the hypervisor moves them: so every row runs in
    // several short rounds, interleaved with the others, and the rows pool
    // their samples. Each row's p50 then covers the same placements.
    let rounds = if args.quick { 2 } else { 5 };
    let chosen: Vec<_> = plan
        .iter()
        .filter(|(_, _, p, _)| args.payload.is_none_or(|want| want == *p))
        .filter(|(t, m, _, _)| {
            args.only.as_deref().is_none_or(|o| {
                o.split(',')
                    .any(|o| o == *t || o == format!("{t}-{m}") || (o == "stub" && STUB_ROWS.contains(t)))
            })
        })
        .collect();
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); chosen.len()];
    let mut iters_of = vec![0usize; chosen.len()];
    for _ in 0..rounds {
        for (k, &&(transport, mode, payload, default_iters)) in chosen.iter().enumerate() {
            let iters = (args
                .iters
                .unwrap_or(if args.quick { default_iters / 20 } else { default_iters })
                / rounds)
                .max(10);
            let stub = |m| StubRoundTrip::start(&exe, m, payload);
            let mut rt: Box<dyn RoundTrip> = match (transport, mode) {
                ("raw-spin", _) => Box::new(RawPingPong::start(&exe, false)?),
                ("raw-futex", _) => Box::new(RawPingPong::start(&exe, true)?),
                ("rpal", m) => Box::new(RpalRoundTrip::start(&exe, m == "parked")?),
                ("tcp", _) => Box::new(TcpRoundTrip::start(&exe)?),
                ("local", _) => Box::new(stub(StubMode::Local)?),
                ("rpal-stub", "busy") => Box::new(stub(StubMode::Busy)?),
                ("rpal-stub", "parked") => Box::new(stub(StubMode::Parked)?),
                ("rpal-stub", "async-handler") => Box::new(stub(StubMode::AsyncHandler)?),
                ("rpal-stub", _) => Box::new(stub(StubMode::Async)?),
                _ => Box::new(stub(StubMode::Tcp)?),
            };
            samples[k].extend(measure_samples(rt.as_mut(), iters / 10 + 10, iters));
            iters_of[k] += iters;
        }
    }
    let mut rows = Vec::new();
    for (k, &&(transport, mode, payload, _)) in chosen.iter().enumerate() {
        let (p50, p99, mean) = summarize(&mut samples[k]);
        let row = Row {
            transport,
            mode,
            payload,
            p50_ns: p50,
            p99_ns: p99,
            mean_ns: mean,
            iters: iters_of[k],
        };
        if args.json {
            println!("{}", row.json());
        }
        rows.push(row);
    }
    // The allocator rows run before the queue and idle rows, in a quiet
    // process: after the queue row the same loop reads up to 1.9x slower.
    let mut alloc_rows = Vec::new();
    if args.only.as_deref().is_none_or(|o| o.split(',').any(|o| o == "alloc")) {
        let samples = args.iters.unwrap_or(if args.quick { 2_000 } else { 20_000 });
        for payload in [64, 65536] {
            for which in ["rpal", "system"] {
                let (p50, p99, mean) = measure_alloc(which, payload, samples);
                let row = Row {
                    transport: "alloc",
                    mode: which,
                    payload,
                    p50_ns: p50,
                    p99_ns: p99,
                    mean_ns: mean,
                    iters: samples * ALLOC_BATCH,
                };
                if args.json {
                    println!("{}", row.json());
                }
                alloc_rows.push(row);
            }
        }
    }
    let want = |name: &str| args.only.as_deref().is_none_or(|o| o.split(',').any(|o| o == name));
    let mut extra_lines = Vec::new();
    if want("queue") {
        for (payload, default_count) in [(8usize, 20_000_000u64), (4096, 1_000_000)] {
            let count = args
                .iters
                .map_or(if args.quick { default_count / 20 } else { default_count }, |n| {
                    n as u64
                });
            let rps = measure_queue(&exe, payload, count)?;
            let json = format!(
                "{{\"transport\":\"queue\",\"payload\":{payload},\"records_per_s\":{rps:.0},\"records\":{count}}}"
            );
            if args.json {
                println!("{json}");
            }
            extra_lines.push(format!(
                "queue     payload {payload:>5} B: {:>8.1} M records/s ({:.2} GB/s), one queue between two processes",
                rps / 1e6,
                rps * payload as f64 / 1e9
            ));
        }
    }
    if want("idle") {
        let window = if args.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        let (cpu, rss) = measure_idle(&exe, 100, window)?;
        if args.json {
            println!(
                "{{\"transport\":\"idle\",\"connections\":100,\"idle_cpu_pct\":{cpu:.2},\"rss_per_conn_kib\":{rss:.1},\"window_s\":{}}}",
                window.as_secs()
            );
        }
        extra_lines.push(format!(
            "idle      100 silent connections: server CPU {cpu:.2}% over {}s, {rss:.1} KiB resident per connection",
            window.as_secs()
        ));
    }
    if !args.json {
        let (basic, stubs): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| !STUB_ROWS.contains(&r.transport));
        print_table(&basic);
        print_stub_table(&stubs, &basic);
        println!();
        for l in &extra_lines {
            println!("{l}");
        }
        print_alloc_table(&alloc_rows);
    }
    Ok(())
}

fn print_alloc_table(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("alloc+free of one block, same thread, ns per pair (batches of {ALLOC_BATCH})");
    println!(
        "{:<8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "impl", "payload", "p50", "p99", "mean", "/system"
    );
    for r in rows {
        let system = rows
            .iter()
            .find(|s| s.mode == "system" && s.payload == r.payload)
            .map_or(0, |s| s.p50_ns);
        let ratio = if system > 0 {
            format!("{:.2}x", r.p50_ns as f64 / system as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            r.mode, r.payload, r.p50_ns, r.p99_ns, r.mean_ns, ratio
        );
    }
}

fn print_table(rows: &[Row]) {
    let find = |t: &str| rows.iter().find(|r| r.transport == t).map(|r| r.p50_ns as f64);
    let (spin, tcp) = (find("raw-spin"), find("tcp"));
    println!(
        "round trips between two processes pinned to different CPUs, 8-byte payload each way, rows interleaved in rounds"
    );
    println!(
        "{:<10} {:<7} {:>10} {:>10} {:>10} {:>8} {:>11} {:>9}",
        "transport", "mode", "p50", "p99", "mean", "iters", "/raw-spin", "tcp/x"
    );
    let us = |ns: u64| format!("{:.2} us", ns as f64 / 1000.0);
    for r in rows {
        let ratio = |base: Option<f64>, inv: bool| match base {
            Some(b) if r.p50_ns > 0 => {
                let x = if inv { b / r.p50_ns as f64 } else { r.p50_ns as f64 / b };
                format!("{x:.2}x")
            }
            _ => "-".into(),
        };
        println!(
            "{:<10} {:<7} {:>10} {:>10} {:>10} {:>8} {:>11} {:>9}",
            r.transport,
            r.mode,
            us(r.p50_ns),
            us(r.p99_ns),
            us(r.mean_ns),
            r.iters,
            ratio(spin, false),
            ratio(tcp, true)
        );
    }
    println!(
        "p50/p99/mean are per round trip; /raw-spin: p50 over the spin floor; tcp/x: how many times faster than TCP."
    );
}

fn print_stub_table(rows: &[Row], basic: &[Row]) {
    if rows.is_empty() {
        return;
    }
    let p50 = |t: &str, m: &str, payload: usize| {
        rows.iter()
            .chain(basic)
            .find(|r| r.transport == t && r.mode == m && r.payload == payload)
            .map(|r| r.p50_ns as f64)
    };
    println!();
    println!(
        "generated stubs (#[rpal::service]): the caller writes the whole payload each call, the callee checks its first and last 8 bytes"
    );
    println!(
        "{:<10} {:<13} {:>9} {:>11} {:>11} {:>11} {:>8} {:>11}",
        "transport", "mode", "payload", "p50", "p99", "mean", "iters", "-local p50"
    );
    let us = |ns: f64| format!("{:.2} us", ns / 1000.0);
    for r in rows {
        let over = match p50("local", "write", r.payload) {
            Some(l) if r.transport != "local" => us(r.p50_ns as f64 - l),
            _ => "-".into(),
        };
        println!(
            "{:<10} {:<13} {:>9} {:>11} {:>11} {:>11} {:>8} {:>11}",
            r.transport,
            r.mode,
            r.payload,
            us(r.p50_ns as f64),
            us(r.p99_ns as f64),
            us(r.mean_ns as f64),
            r.iters,
            over
        );
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let stub8 = p50("rpal-stub", "busy", 8);
    println!(
        "stub busy 8 B / raw queue round trip (rpal busy): {}; / raw spin: {}",
        ratio(stub8, p50("rpal", "busy", 8)),
        ratio(stub8, p50("raw-spin", "busy", 8))
    );
    if let (Some(s1m), Some(l1m), Some(s8)) = (p50("rpal-stub", "busy", 1 << 20), p50("local", "write", 1 << 20), stub8)
    {
        println!(
            "zero copy at 1 MiB: stub p50 - local p50 = {} ({:.2}x the 8 B stub p50)",
            us(s1m - l1m),
            (s1m - l1m) / s8
        );
    }
    println!(
        "tcp-stub / rpal-stub p50: {} at 8 B, {} at 1 MiB",
        ratio(p50("tcp-stub", "busy", 8), stub8),
        ratio(p50("tcp-stub", "busy", 1 << 20), p50("rpal-stub", "busy", 1 << 20))
    );
}
