//! Criterion: alloc+free of one block in rpal's arena against the system
//! allocator, at 64 B and 64 KiB.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn alloc_free(c: &mut Criterion) {
    let arena = rpal::Arena::global().expect("arena");
    let mut g = c.benchmark_group("alloc_free");
    for size in [64usize, 65536] {
        g.bench_with_input(BenchmarkId::new("rpal", size), &size, |b, &size| {
            b.iter(|| {
                let p = arena.alloc_raw(size, 8).expect("alloc");
                // SAFETY: freed right after allocation, never used.
                unsafe { arena.free_raw(std::hint::black_box(p)).expect("free") };
            })
        });
        let layout = std::alloc::Layout::from_size_align(size, 8).expect("layout");
        g.bench_with_input(BenchmarkId::new("system", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: non-zero layout; freed with the same layout.
                unsafe { std::alloc::dealloc(std::hint::black_box(std::alloc::alloc(layout)), layout) };
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    targets = alloc_free
}
criterion_main!(benches);
