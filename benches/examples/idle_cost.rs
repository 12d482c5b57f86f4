//! Emits N events the way a service does, with or without the Periscope agent, so that
//! `benches/instructions.sh` can count the instructions each costs under callgrind: a
//! measure that, unlike time, does not move with the load of a shared machine.
//!
//! Run: `cargo run --release -p periscope-benches --example idle_cost -- <mode> <events> <logged|filtered|login>`
//!
//! Modes: `none` (no agent), `idle` (an agent with nothing installed), `capture` (a
//! snapshot on the logged event, every event a hit), `cond_plain` (a snapshot whose
//! condition on a plain field of the event is false), `cond_redacted` (a snapshot on
//! the login event whose condition reads its `password` field, which redaction hides).

use std::hint::black_box;

use tracing::Dispatch;
use tracing_subscriber::prelude::*;

#[derive(Debug)]
#[allow(dead_code)]
struct Order {
    id: u64,
    customer: &'static str,
    total_cents: u64,
}

const LOGGED_LINE: u32 = line!() + 4;

#[inline(never)]
fn logged(order: &Order) {
    tracing::info!(order_id = order.id, order = ?order, "order placed");
}

#[inline(never)]
fn filtered(order: &Order) {
    tracing::debug!(order_id = order.id, order = ?order, "order details");
}

const LOGIN_LINE: u32 = line!() + 4;

#[inline(never)]
fn login(order: &Order) {
    tracing::info!(user_id = order.id, password = "correct horse battery staple", "login attempt");
}

/// A request: a span of its own around the logged event (span-heavy hosts).
#[inline(never)]
fn spanned(order: &Order) {
    let _span = tracing::info_span!("handle", order_id = order.id).entered();
    logged(order);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "none".into());
    let events: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let which = args.next().unwrap_or_else(|| "logged".into());
    let host = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
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
    let order = Order { id: 42, customer: "Ada Lovelace", total_cents: 4_548 };
    // Run each callsite once so it is registered (and in the agent's catalog) first.
    tracing::dispatcher::with_default(&dispatch, || {
        logged(&order);
        filtered(&order);
        login(&order);
    });
    if let Some(a) = &agent {
        let quotas = periscope_protocol::AgentQuotas {
            snapshot_hits_per_sec_per_action: 1e12,
            snapshot_hits_per_sec: 1e12,
            cpu_fraction: 1.0,
            cpu_burst_micros: u64::MAX / 4_000,
            ..Default::default()
        };
        let line = if which == "login" { LOGIN_LINE } else { LOGGED_LINE };
        // False at every event: `order.id` is 42.
        let plain = if which == "login" { "user_id == 7" } else { "order_id == 7" };
        match mode.as_str() {
            "capture" => a.install_for_bench(file!(), LOGGED_LINE, None, quotas),
            // A live error capture while no error happens: what it costs the host.
            "errors" => a.install_errors_for_bench(quotas),
            "cond_plain" => a.install_for_bench(file!(), line, Some(plain), quotas),
            "cond_redacted" => a.install_for_bench(file!(), LOGIN_LINE, Some(r#"password == "hunter2""#), quotas),
            _ => {}
        }
    }
    let f: fn(&Order) = match which.as_str() {
        "filtered" => filtered,
        "login" => login,
        "spanned" => spanned,
        _ => logged,
    };
    tracing::dispatcher::with_default(&dispatch, || {
        let span = tracing::info_span!("checkout", user_id = 7u64);
        let _enter = span.enter();
        for _ in 0..events {
            f(black_box(&order));
        }
    });
    eprintln!("{mode}: {events} {which} events");
}
