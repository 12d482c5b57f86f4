//! Decoding what agents send, side by side on the same frames (a snapshot hit of about
//! 2 KB after limits, a batch of 100 dynamic log lines, a frame of 20 metric reports with
//! histograms): serde_json and sonic-rs (a SIMD JSON decoder with its own serde
//! deserializer) each reading the protocol's `AgentMessage` enum, and the broker's
//! `decode_agent_message`, which reads these frames straight into their payload (serde's
//! internally tagged enums buffer the whole frame first; that, not the JSON parser, was
//! most of the cost).
//!
//! Run: `cargo bench -p periscope-benches --bench json_decode`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use periscope_benches::hit;
use periscope_protocol::messages::{decode_agent_message, encode};
use periscope_protocol::{ActionId, AgentMessage, CaptureLimits, Histogram, LogLevel, LogLine, MetricReport};

/// A snapshot hit frame of about `bytes` after the broker's limits.
fn hit_frame(bytes: usize) -> String {
    let limits = CaptureLimits::default();
    for lines in 1..200 {
        let mut h = hit(lines);
        h.enforce_limits(&limits);
        let frame = encode(&AgentMessage::Hit(Box::new(h)));
        if frame.len() >= bytes {
            return frame;
        }
    }
    encode(&AgentMessage::Hit(Box::new(hit(200))))
}

fn log_frame(n: usize) -> String {
    let action_id = ActionId::generate();
    let lines = (0..n as u64)
        .map(|i| LogLine {
            action_id: action_id.clone(),
            seq: i + 1,
            time_ms: 1_765_000_000_000 + i * 3,
            level: LogLevel::Info,
            text: format!(
                "order ORD-{:06} for user {} is {} (total {} cents, {} items, region eu-west-{})",
                100_000 + i * 7,
                4_000 + i % 97,
                ["paid", "pending", "shipped", "declined"][(i % 4) as usize],
                1_999 + i * 13,
                1 + i % 9,
                i % 3
            ),
            thread: Some(format!("tokio-runtime-worker-{}", i % 4)),
            redactions: Vec::new(),
            rules_version: 1,
        })
        .collect();
    encode(&AgentMessage::LogLines { lines })
}

fn metrics_frame(n: usize) -> String {
    let reports = (0..n as u64)
        .map(|i| {
            let mut histogram = Histogram::default();
            let mut sum = 0.0;
            for s in 0..200u64 {
                let v = 0.2 + ((s * 7919 + i * 31) % 5_000) as f64 / 37.0;
                histogram.record(v);
                sum += v;
            }
            MetricReport {
                action_id: ActionId::generate(),
                window_start_ms: 1_765_000_000_000,
                window_end_ms: 1_765_000_005_000,
                count: 200,
                sum,
                min: Some(0.2),
                max: Some(135.3),
                histogram,
                skipped: 0,
            }
        })
        .collect();
    encode(&AgentMessage::Metrics { reports })
}

fn bench_decoders(c: &mut Criterion) {
    let frames = [("hit_2kb", hit_frame(2_048)), ("log_lines_100", log_frame(100)), ("metrics_20", metrics_frame(20))];
    for (name, frame) in &frames {
        // Both decoders must read the same message before either is timed, up to the
        // last bit of a float: serde_json (without its `float_roundtrip` feature) reads
        // some decimals one unit in the last place off, which sonic-rs reads exactly.
        let a = decode_agent_message(frame).expect("serde_json decodes the frame");
        let b: AgentMessage = sonic_rs::from_str(frame).expect("sonic-rs decodes the frame");
        if a != b {
            let (a, b) = (format!("{a:?}"), format!("{b:?}"));
            let at = a.bytes().zip(b.bytes()).position(|(x, y)| x != y).unwrap_or(0);
            let around = |s: &str| s.get(at.saturating_sub(40)..(at + 20).min(s.len())).unwrap_or_default().to_owned();
            assert!(
                around(&a).contains("sum:") || around(&a).contains("min:") || around(&a).contains("max:"),
                "{name}: the decoders disagree beyond a float's last digit: {} vs {}",
                around(&a),
                around(&b)
            );
            eprintln!(
                "{name}: the decoders read a float differently: serde_json `{}`, sonic-rs `{}`",
                around(&a),
                around(&b)
            );
        }
        eprintln!("{name}: {} bytes", frame.len());
        let mut g = c.benchmark_group(format!("decode_{name}"));
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function("serde_json_enum", |bch| bch.iter(|| serde_json::from_str::<AgentMessage>(black_box(frame))));
        g.bench_function("sonic_rs_enum", |bch| bch.iter(|| sonic_rs::from_str::<AgentMessage>(black_box(frame))));
        g.bench_function("decode_agent_message", |bch| bch.iter(|| decode_agent_message(black_box(frame))));
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_decoders
}
criterion_main!(benches);
