//! Redaction throughput, single thread, on realistic captured data.
//!
//! Run: `cargo bench -p periscope-benches --bench redaction`
//!
//! - `clean_log_lines`: service logs with timestamps, ids, UUIDs, versions, durations,
//!   URLs and `key=value` pairs but no PII (the common case).
//! - `pii_dense_log_lines`: the same shape with an email, phone, card, IP, token or
//!   `password=` in every line.
//! - `json_snapshot_value`: a captured `Value` tree (objects, maps, lists, strings).
//! - `debug_output`: Rust `{:#?}` dumps of request structs.
//!
//! Throughput is reported in bytes of input per second.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use periscope_benches::{redaction_snapshots, redaction_text_cases};
use periscope_protocol::Value;
use periscope_redaction::{Redactor, Report};

fn bench(c: &mut Criterion) {
    let redactor = Redactor::default_rules();
    let mut group = c.benchmark_group("redaction");

    for (name, text) in redaction_text_cases() {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| {
            let mut report = Report::new();
            b.iter(|| {
                report.clear();
                let mut out = 0usize;
                for line in text.split_inclusive('\n') {
                    out += redactor.redact_text(black_box(line), "log", &mut report).len();
                }
                out
            })
        });
    }

    let snapshots = redaction_snapshots();
    let bytes: usize = snapshots.iter().map(Value::encoded_len).sum();
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("json_snapshot_value", |b| {
        let mut report = Report::new();
        b.iter_batched_ref(
            || snapshots.clone(),
            |values| {
                report.clear();
                for v in values.iter_mut() {
                    redactor.redact_field("request", v, "fields.request", &mut report);
                }
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
