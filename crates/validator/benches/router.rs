//! Instance selection in the registry: one `acquire` + release (lease
//! dropped) with 100, 10k and 100k instances of one model, all free, and
//! with 90% of the slots already held (small sizes: holding them costs a
//! full acquire each to set up).
//!
//! Run with `cargo bench -p sluice-validator --bench router`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice_validator::registry::{Instance, Lease, Registry};
use tokio::time::Instant;

const MODEL: &str = "bench-model";
/// Instances registered per miner key.
const PER_MINER: usize = 100;

fn registry(n: usize, capacity: u32) -> Arc<Registry> {
    let r = Arc::new(Registry::new(Duration::from_secs(3600), 1 << 20));
    for m in 0..n.div_ceil(PER_MINER) {
        let key = format!("miner-{m:06}");
        let list = (0..PER_MINER.min(n - m * PER_MINER))
            .map(|i| {
                Arc::new(Instance::new(
                    format!("{key}-{i}"),
                    &key,
                    "http://127.0.0.1:9",
                    MODEL,
                    capacity,
                    2048,
                ))
            })
            .collect();
        r.replace_miner(&key, list);
    }
    r
}

async fn acquire(r: &Arc<Registry>) -> Lease {
    r.acquire(MODEL, Instant::now(), &[], 0)
        .await
        .expect("a free instance")
}

fn selection(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("acquire_release");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(4));
    for n in [100usize, 10_000, 100_000] {
        let r = registry(n, 4);
        group.bench_with_input(BenchmarkId::new("all_free", n), &n, |b, _| {
            b.iter(|| rt.block_on(async { black_box(acquire(&r).await) }))
        });
    }
    for n in [100usize, 10_000] {
        let r = registry(n, 10);
        // Hold 9 of every instance's 10 slots.
        let held: Vec<Lease> = rt.block_on(async {
            let mut v = Vec::with_capacity(n * 9);
            for _ in 0..n * 9 {
                v.push(acquire(&r).await);
            }
            v
        });
        group.bench_with_input(BenchmarkId::new("90pct_held", n), &n, |b, _| {
            b.iter(|| rt.block_on(async { black_box(acquire(&r).await) }))
        });
        drop(held);
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
