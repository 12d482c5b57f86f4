//! The agent's cost to its host.
//!
//! Run: `cargo bench -p periscope-benches --bench agent`
//!
//! Every case runs the same event inside a span under a subscriber that logs INFO to a
//! sink through `fmt` (the host's own logging), with or without the Periscope agent:
//!
//! - `logged/*`: an INFO event the host logs. `no_agent` vs `agent_idle` is the
//!   idle cost of an installed agent on a hot, logged callsite.
//! - `filtered/*`: a DEBUG event the host does not log: the idle agent should add
//!   nothing measurable.
//! - `capture/one_snapshot_hit`: the same INFO event with a snapshot installed on it,
//!   quotas raised so that every event is a hit: the cost on the host's thread of one
//!   captured hit (fields, Debug text of a nested struct, span stack, enqueue). The
//!   agent's own thread parses, truncates, redacts and sends off the hot path.
//! - `errors_live/*`: the logged, filtered and spanned events (`spanned`: a span of its
//!   own around the logged event) while an error-capture action is live and no error
//!   happens, beside `*/agent_idle`: what capture on error costs while nothing fails.
//! - `condition/false_plain_field`: a snapshot on the INFO event whose condition
//!   (`order_id == 7`) is false: the cost of deciding not to capture.
//! - `condition/false_redacted_field`: a snapshot on a login event whose condition
//!   reads its `password` field (`password == "hunter2"`), which redaction hides: the
//!   value is redacted on the host's thread before the condition reads it, and the
//!   condition fails (counted as false).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use periscope_protocol::AgentQuotas;
use tracing::Dispatch;
use tracing_subscriber::prelude::*;

#[derive(Debug)]
#[allow(dead_code)]
struct Item {
    sku: &'static str,
    qty: u32,
    price_cents: u64,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Order {
    id: u64,
    customer: &'static str,
    items: Vec<Item>,
}

fn order() -> Order {
    Order {
        id: 42,
        customer: "Ada Lovelace",
        items: vec![Item { sku: "A-1", qty: 2, price_cents: 1999 }, Item { sku: "B-7", qty: 1, price_cents: 550 }],
    }
}

/// Line of the logged event, for the capture case.
const LOGGED_LINE: u32 = line!() + 4;

#[inline(never)]
fn logged(order: &Order) {
    tracing::info!(order_id = order.id, order = ?order, total_cents = 4548u64, "order placed");
}

/// Line of the login event, for the redacted-condition case.
const LOGIN_LINE: u32 = line!() + 4;

#[inline(never)]
fn login(order: &Order) {
    tracing::info!(user_id = order.id, password = "correct horse battery staple", "login attempt");
}

/// A request: a span of its own around the logged event.
#[inline(never)]
fn spanned(order: &Order) {
    let _span = tracing::info_span!("handle", order_id = order.id).entered();
    logged(order);
}

#[inline(never)]
fn filtered(order: &Order) {
    tracing::debug!(order_id = order.id, order = ?order, "order details");
}

fn host_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
}

fn agent() -> periscope_agent::Agent {
    // An unreachable broker: the agent keeps retrying in the background, which is also
    // what it does in production when the broker is down.
    periscope_agent::Agent::builder()
        .broker_url("ws://127.0.0.1:1")
        .agent_key("bench-agent-key")
        .pool("bench")
        .service("bench")
        .queue_capacity(65_536)
        .start()
        .expect("agent config is valid")
}

fn run_in_span(dispatch: &Dispatch, c: &mut Criterion, name: &str, f: fn(&Order)) {
    let order = order();
    tracing::dispatcher::with_default(dispatch, || {
        let span = tracing::info_span!("checkout", user_id = 7u64);
        let _enter = span.enter();
        c.bench_function(name, |b| b.iter(|| f(black_box(&order))));
    });
}

fn bench_agent(c: &mut Criterion) {
    let no_agent = Dispatch::new(tracing_subscriber::registry().with(host_layer()));
    run_in_span(&no_agent, c, "logged/no_agent", logged);
    run_in_span(&no_agent, c, "filtered/no_agent", filtered);

    let idle = agent();
    let with_agent = Dispatch::new(tracing_subscriber::registry().with(host_layer()).with(idle.layer()));
    run_in_span(&with_agent, c, "logged/agent_idle", logged);
    run_in_span(&with_agent, c, "filtered/agent_idle", filtered);
    run_in_span(&with_agent, c, "spanned/agent_idle", spanned);

    // Install a snapshot on the logged callsite, with budgets that let every event hit.
    let quotas = AgentQuotas {
        snapshot_hits_per_sec_per_action: 1e9,
        snapshot_hits_per_sec: 1e9,
        cpu_fraction: 1.0,
        cpu_burst_micros: 60_000_000,
        ..AgentQuotas::default()
    };
    // A live error capture while no error happens, side by side with the idle agent.
    idle.install_errors_for_bench(quotas);
    run_in_span(&with_agent, c, "errors_live/logged", logged);
    run_in_span(&with_agent, c, "errors_live/filtered", filtered);
    run_in_span(&with_agent, c, "errors_live/spanned", spanned);
    idle.install_for_bench(file!(), LOGGED_LINE, Some("order_id == 7"), quotas);
    run_in_span(&with_agent, c, "condition/false_plain_field", logged);
    // The login callsite registers on its first event.
    tracing::dispatcher::with_default(&with_agent, || login(&order()));
    idle.install_for_bench(file!(), LOGIN_LINE, Some(r#"password == "hunter2""#), quotas);
    run_in_span(&with_agent, c, "condition/false_redacted_field", login);
    idle.install_for_bench(file!(), LOGGED_LINE, None, quotas);
    run_in_span(&with_agent, c, "capture/one_snapshot_hit", logged);
    let dropped = idle.dropped_hits();
    eprintln!("capture bench: {dropped} hits were dropped by the agent thread (no broker), as expected");
    idle.shutdown(Duration::from_secs(1));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_agent
}
criterion_main!(benches);
