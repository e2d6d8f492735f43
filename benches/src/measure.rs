//! What a row is and how samples are taken and summarized.

use std::time::Instant;

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// `raw-spin`, `raw-futex`, `rpal`, `tcp`, `local`, `rpal-stub`, `tcp-stub`, `alloc`.
    pub transport: &'static str,
    /// `busy`, `parked` or `async` for round trips, `write` for `local`; the
    /// implementation (`rpal`, `system`) for `alloc` rows.
    pub mode: &'static str,
    /// Payload bytes each way.
    pub payload: usize,
    /// Median round trip.
    pub p50_ns: u64,
    /// 99th percentile round trip.
    pub p99_ns: u64,
    /// Mean round trip.
    pub mean_ns: u64,
    /// Timed iterations.
    pub iters: usize,
}

impl Row {
    /// The row as one JSON object (field names are stable: tools read them).
    pub fn json(&self) -> String {
        // Alloc rows name the implementation `impl` and measure one alloc+free pair.
        let (key, measure) = if self.transport == "alloc" {
            ("impl", "alloc_free")
        } else if self.transport == "local" {
            ("mode", "local_write")
        } else {
            ("mode", "round_trip")
        };
        format!(
            "{{\"transport\":\"{}\",\"{key}\":\"{}\",\"payload\":{},\"measure\":\"{measure}\",\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{},\"iters\":{}}}",
            self.transport, self.mode, self.payload, self.p50_ns, self.p99_ns, self.mean_ns, self.iters
        )
    }
}

/// Something that can make one round trip carrying `value`, returning what
/// the callee sent back.
pub trait RoundTrip {
    /// One round trip.
    fn round_trip(&mut self, value: u64) -> u64;
}

/// Times `iters` round trips after `warmup` untimed ones, checking each
/// echo; returns every sample (ns).
pub fn measure_samples(rt: &mut dyn RoundTrip, warmup: usize, iters: usize) -> Vec<u64> {
    for i in 0..warmup {
        let v = 0xA5A5_0000_0000 + i as u64;
        assert_eq!(rt.round_trip(v), !v, "the callee must read the payload and answer");
    }
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters {
        let v = i as u64 + 1;
        let t0 = Instant::now();
        let back = rt.round_trip(v);
        samples.push(t0.elapsed().as_nanos() as u64);
        assert_eq!(back, !v, "the callee must read the payload and answer");
    }
    samples
}

/// As [`measure_samples`], summarized: p50, p99, mean.
pub fn measure(rt: &mut dyn RoundTrip, warmup: usize, iters: usize) -> (u64, u64, u64) {
    summarize(&mut measure_samples(rt, warmup, iters))
}

/// p50, p99 and mean of `samples` (sorted in place).
pub fn summarize(samples: &mut [u64]) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let mean = samples.iter().sum::<u64>() / samples.len() as u64;
    (pct(0.50), pct(0.99), mean)
}
