//! Calls an `#[instrument(ret)]` function N times, with or without the Periscope agent,
//! so that `benches/span_probe_instructions.sh` can count what a span (function) probe
//! costs the calling thread under callgrind: instructions, which do not move with the
//! load of a shared machine.
//!
//! Run: `cargo run --release -p periscope-benches --example span_probe_cost -- <mode> <calls>`
//!
//! Modes: `none` (no agent), `idle` (an agent with nothing installed), `probe_fast` (a
//! function probe on the span whose `min_duration_ms` no call reaches: what every fast
//! call pays while one waits for the slow one), `probe_hit` (`min_duration_ms` 0: every
//! call a hit, its fields and return value captured).

use std::hint::black_box;

use tracing::Dispatch;
use tracing_subscriber::prelude::*;

/// The probed function: a span with two fields, a return event.
#[inline(never)]
#[tracing::instrument(ret, skip(note))]
fn checkout(order_id: u64, note: &str) -> u64 {
    black_box(order_id.wrapping_mul(31) + note.len() as u64)
}

/// What the callgrind toggle counts: one call, span and all.
#[inline(never)]
fn call(i: u64) -> u64 {
    checkout(i, "gift")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "none".into());
    let calls: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let host = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::filter::LevelFilter::WARN)
    };
    let agent = (mode != "none").then(|| {
        periscope_agent::Agent::builder()
            .broker_url("ws://127.0.0.1:1")
            .agent_key("bench-agent-key")
            .pool("bench")
            .queue_capacity(65_536)
            .start()
            .expect("agent config is valid")
    });
    let dispatch = match &agent {
        None => Dispatch::new(tracing_subscriber::registry().with(host())),
        Some(a) => Dispatch::new(tracing_subscriber::registry().with(host()).with(a.layer())),
    };
    // Registered (and in the agent's catalog) first.
    tracing::dispatcher::with_default(&dispatch, || call(0));
    if let Some(a) = &agent {
        let quotas = periscope_protocol::AgentQuotas {
            snapshot_hits_per_sec_per_action: 1e12,
            snapshot_hits_per_sec: 1e12,
            cpu_fraction: 1.0,
            cpu_burst_micros: u64::MAX / 4_000,
            ..Default::default()
        };
        match mode.as_str() {
            "probe_fast" => a.install_function_for_bench("span_probe_cost::checkout", 3_600_000, quotas),
            "probe_hit" => a.install_function_for_bench("span_probe_cost::checkout", 0, quotas),
            _ => {}
        }
    }
    tracing::dispatcher::with_default(&dispatch, || {
        let mut acc = 0u64;
        for i in 0..calls {
            acc = acc.wrapping_add(call(black_box(i)));
        }
        black_box(acc);
    });
    eprintln!("{mode}: {calls} calls");
}
