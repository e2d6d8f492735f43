//! Criterion round-trip benchmarks against real child processes: rpal busy
//! and parked, and the raw spin floor and loopback TCP for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rpal_bench::{RawPingPong, RoundTrip, RpalRoundTrip, TcpRoundTrip, pin};

fn bench_rt(c: &mut Criterion, name: &str, mut rt: Box<dyn RoundTrip>) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for i in 0..iters {
                std::hint::black_box(rt.round_trip(i));
            }
            t0.elapsed()
        })
    });
}

fn round_trips(c: &mut Criterion) {
    let exe = Path::new(env!("CARGO_BIN_EXE_rpal-bench"));
    pin(0);
    bench_rt(
        c,
        "round_trip/raw-spin",
        Box::new(RawPingPong::start(exe, false).expect("raw-spin child")),
    );
    bench_rt(
        c,
        "round_trip/rpal-busy",
        Box::new(RpalRoundTrip::start(exe, false).expect("rpal child")),
    );
    bench_rt(
        c,
        "round_trip/rpal-parked",
        Box::new(RpalRoundTrip::start(exe, true).expect("rpal child")),
    );
    bench_rt(
        c,
        "round_trip/tcp",
        Box::new(TcpRoundTrip::start(exe).expect("tcp child")),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = round_trips
}
criterion_main!(benches);
