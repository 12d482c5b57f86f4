//! Serialization and truncation of the wire types: the work every hit costs the agent's
//! thread (encode, enforce limits) and the broker (decode, enforce limits again), and the
//! broker's whole per-hit ingest pipeline (decode, redact, enforce limits).
//!
//! Run: `cargo bench -p periscope-benches --bench protocol`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use periscope_benches::hit;
use periscope_protocol::messages::{decode_agent_message, encode};
use periscope_protocol::{AgentMessage, CaptureLimits};

fn bench_protocol(c: &mut Criterion) {
    let limits = CaptureLimits::default();
    let mut truncated = hit(40);
    truncated.enforce_limits(&limits);
    let message = AgentMessage::Hit(Box::new(truncated.clone()));
    let frame = encode(&message);

    let mut g = c.benchmark_group("hit");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&message))));
    g.bench_function("decode", |b| b.iter(|| decode_agent_message(black_box(&frame))));
    // The broker re-applies limits to an honest agent's hit: a no-op that must be cheap.
    g.bench_function("enforce_limits_again", |b| {
        b.iter_batched(|| truncated.clone(), |mut h| h.enforce_limits(&limits), criterion::BatchSize::SmallInput)
    });
    g.finish();

    // What the broker does with every hit frame before storing it.
    let redactor = periscope_redaction::Redactor::default_rules();
    let mut g = c.benchmark_group("broker_ingest");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode_redact_enforce", |b| {
        b.iter(|| {
            if let Ok(AgentMessage::Hit(mut hit)) = decode_agent_message(black_box(&frame)) {
                redactor.redact_hit(&mut hit);
                hit.enforce_limits(&limits);
                black_box(hit);
            }
        })
    });
    g.finish();

    // First enforcement on a hit far over its limits (400 lines, deep, long strings).
    let big = hit(400);
    let mut g = c.benchmark_group("truncate");
    g.bench_function("enforce_limits_on_an_oversized_hit", |b| {
        b.iter_batched(|| big.clone(), |mut h| h.enforce_limits(&limits), criterion::BatchSize::SmallInput)
    });
    g.finish();
    eprintln!("hit frame: {} bytes after limits (40-line order)", frame.len());
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_protocol
}
criterion_main!(benches);
