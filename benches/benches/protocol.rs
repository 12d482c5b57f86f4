//! Serialization and truncation of the wire types: the work every hit costs the agent's
//! thread (encode, enforce limits) and the broker (decode, enforce limits again), and the
//! broker's whole per-hit ingest pipeline (decode, redact, enforce limits).
//!
//! Run: `cargo bench -p periscope-benches --bench protocol`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use periscope_protocol::messages::{decode_agent_message, encode};
use periscope_protocol::value::{List, Object};
use periscope_protocol::{
    ActionId, AgentMessage, CaptureLimits, Field, Hit, HitLocation, SpanFrame, ThreadInfo, TruncationSummary, Value,
};

fn object(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.into(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

/// An order as a snapshot captures it: nested four levels, 40 lines, long strings.
fn order(lines: usize) -> Value {
    let geo = object("GeoPoint", vec![("lat", Value::Float(47.37)), ("lon", Value::Float(8.54))]);
    let address = object(
        "Address",
        vec![("street", "1 Main Street".into()), ("city", "Zürich".into()), ("postcode", "8001".into()), ("geo", geo)],
    );
    let customer = object(
        "Customer",
        vec![
            ("id", Value::Int(7)),
            ("name", "Ada Lovelace".into()),
            ("email", "[REDACTED:EMAIL]".into()),
            ("address", address),
        ],
    );
    let items = (0..lines)
        .map(|i| {
            object(
                "Line",
                vec![("sku", format!("SKU-{i:05}").into()), ("qty", Value::Int(2)), ("price_cents", Value::Int(1999))],
            )
        })
        .collect();
    object(
        "Order",
        vec![
            ("id", Value::Int(42)),
            ("customer", customer),
            ("lines", Value::List(List { type_name: Some("Vec".into()), items, omitted: 0 })),
            ("gift_message", "Happy birthday! ".repeat(40).into()),
            ("status", "Paid".into()),
        ],
    )
}

fn hit(lines: usize) -> Hit {
    Hit {
        action_id: ActionId::generate(),
        seq: 1,
        time_ms: 1_795_000_000_000,
        location: HitLocation { file: "demo/src/shop.rs".into(), line: 501, module: Some("shop".into()), name: None },
        thread: Some(ThreadInfo { name: Some("tokio-rt-worker".into()), id: "3".into() }),
        fields: vec![
            Field::new("message", "order placed".into()),
            Field::new("order_id", Value::Int(1045)),
            Field::new("order", order(lines)),
        ],
        spans: (0..3)
            .map(|i| SpanFrame {
                name: format!("span{i}"),
                target: Some("shop".into()),
                file: Some("demo/src/shop.rs".into()),
                line: Some(100 + i),
                fields: vec![Field::new("user_id", Value::Int(1037)), Field::new("cart_id", Value::Int(1040))],
            })
            .collect(),
        watches: vec![],
        backtrace: None,
        truncation: TruncationSummary::default(),
        redactions: vec![],
        rules_version: 3,
    }
}

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
