//! Criterion round-trip benchmarks against real child processes: rpal busy
//! and parked, and the raw spin floor and loopback TCP for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rpal_bench::{RawPingPong, RoundTrip, RpalRoundTrip, TcpRoundTrip, pin};

fn bench_rt(c: &mut Criterion, name: &str, mut rt: Box<dyn RoundTrip>) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            // Every reply is checked, as `rpal-bench` does: the callee must
            // have read the payload and answered its complement. A count of
            // wrong replies, asserted after the clock stops.
            let mut wrong = 0u64;
            let t0 = Instant::now();
            for i in 0..iters {
                let v = i + 1;
                wrong += u64::from(std::hint::black_box(rt.round_trip(v)) != !v);
            }
            let took = t0.elapsed();
            assert_eq!(wrong, 0, "{name}: {wrong} of {iters} replies were wrong");
            took
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
