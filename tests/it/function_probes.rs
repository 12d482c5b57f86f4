//! Function (span) probes through MCP against a real Rust agent: a snapshot of whole
//! calls (span fields at entry, the `return`/`error` events of `#[instrument(ret, err)]`
//! at exit, the duration) that `min_duration_ms` keeps to the slow calls; a duration
//! metric on a span named as a function; unknown names refused with suggestions;
//! list_sources naming spans as functions. Slowness is a sleep argument, never a timing
//! threshold: the fast calls sleep 0 ms, the slow ones far over the threshold.

use std::time::Duration;

use serde_json::{Value, json};

use crate::mcp::{body, call, code, connect_with, text};
use crate::support::{
    API_KEY, TestAgent, TestBroker, eventually, test_config, wait_action, wait_installed, wait_online,
};

const POOL: &str = "probes";

#[derive(Debug)]
struct Cart {
    owner: String,
    items: u32,
}

/// The function under test: its arguments are span fields, its result an event.
#[tracing::instrument(ret, err, skip(cart), fields(owner = %cart.owner, items = cart.items))]
fn probe_checkout(cart: &Cart, delay_ms: u64, fail: bool) -> Result<u64, String> {
    std::thread::sleep(Duration::from_millis(delay_ms));
    if fail {
        return Err(format!("card declined for {}", cart.owner));
    }
    Ok(u64::from(cart.items) * 1_000)
}

fn checkout(owner: &str, items: u32, delay_ms: u64, fail: bool) {
    let _ = probe_checkout(&Cart { owner: owner.into(), items }, delay_ms, fail);
}

/// Waits until list_sources shows the span as a function; returns its entry.
async fn function_source(client: &crate::mcp::Client, agent: &str) -> Value {
    eventually(Duration::from_secs(10), "the probe_checkout span in list_sources", || async {
        let r = call(client, "list_sources", json!({"agent_id": agent, "name": "probe_checkout"})).await;
        let items = body(&r)["items"].as_array().cloned().unwrap_or_default();
        items.into_iter().find(|s| s["kind"] == "span")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_probe_catches_only_the_slow_calls_with_arguments_return_value_error_and_duration() {
    let broker = TestBroker::start().await;
    let agent = TestAgent::start(&broker.ws_url(), POOL, &[]);
    wait_online(&broker.api(), &agent.id()).await;
    let client = connect_with(&broker, API_KEY).await.unwrap();
    agent.run(|| checkout("warm", 1, 0, false)).join().unwrap();

    let source = function_source(&client, &agent.id()).await;
    let function = source["function"].as_str().unwrap().to_owned();
    assert!(function.ends_with("::probe_checkout"), "{source}");
    let listing = call(&client, "list_sources", json!({"agent_id": agent.id(), "name": "probe_checkout"})).await;
    assert!(text(&listing).contains(&format!("function={function}")), "{}", text(&listing));

    let placed = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "function": "probe_checkout", "min_duration_ms": 250, "max_hits": 2,
               "wait": false, "timeout_seconds": 120}),
    )
    .await;
    assert_eq!(code(&placed), None, "{}", text(&placed));
    let action = body(&placed)["action"].clone();
    let id = action["action_id"].as_str().unwrap().to_owned();
    assert_eq!(action["function"]["name"], "probe_checkout");
    assert_eq!(action["function"]["min_duration_ms"], 250);
    assert!(action["function"]["module"].as_str().unwrap().ends_with("function_probes"), "{action}");
    assert!(action["location"]["file"].as_str().unwrap().ends_with("function_probes.rs"), "{action}");
    wait_installed(&broker.api(), &id, &agent.id()).await;

    agent
        .run(|| {
            for i in 0..40 {
                checkout(&format!("fast{i}"), 1, 0, i % 7 == 0);
            }
            checkout("Slow Sam", 3, 400, false);
            for i in 0..40 {
                checkout(&format!("fast{i}"), 1, 0, false);
            }
            // Past the per-action hit rate (one a second), so both slow calls count.
            std::thread::sleep(Duration::from_millis(1_100));
            checkout("Failing Fay", 2, 300, true);
            checkout("after", 1, 0, false);
        })
        .join()
        .unwrap();

    // A wait answers at the first hit; the second may still be on its way.
    let done = eventually(Duration::from_secs(30), "the action ended with its two hits", || async {
        let done = call(&client, "get_action", json!({"action_id": id, "since": 0, "wait_seconds": 5})).await;
        assert_eq!(code(&done), None, "{}", text(&done));
        (body(&done)["action"]["status"] != "active").then_some(done)
    })
    .await;
    let b = body(&done);
    let hits = b["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2, "only the two slow calls: {b}");
    let ok = &hits[0];
    assert_eq!(ok["fields"]["delay_ms"]["value"], 400, "{ok}");
    assert_eq!(ok["fields"]["owner"]["value"], "Slow Sam", "{ok}");
    assert_eq!(ok["fields"]["return"]["value"], 3_000, "{ok}");
    assert_eq!(ok["call"]["outcome"], "returned", "{ok}");
    assert!(ok["call"]["duration_ms"].as_f64().unwrap() >= 400.0, "{ok}");
    assert_eq!(ok["location"]["name"], "probe_checkout");
    let failed = &hits[1];
    assert_eq!(failed["fields"]["owner"]["value"], "Failing Fay", "{failed}");
    assert!(failed["fields"]["error"].to_string().contains("card declined for Failing Fay"), "{failed}");
    assert!(failed["fields"].get("return").is_none(), "{failed}");
    assert_eq!(failed["call"]["outcome"], "raised", "{failed}");
    assert!(failed["call"]["duration_ms"].as_f64().unwrap() >= 300.0, "{failed}");
    let t = text(&done);
    assert!(t.contains("call returned after") && t.contains("call raised after"), "{t}");
    wait_action(&broker.api(), &id, "completed", |a| a["status"] == "completed").await;

    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_metric_on_a_function_times_each_call_and_unknown_functions_are_refused_with_suggestions() {
    let mut config = test_config();
    config.agents.metric_report_interval_ms = 1_000;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let agent = TestAgent::start(&broker.ws_url(), POOL, &[]);
    wait_online(&broker.api(), &agent.id()).await;
    let client = connect_with(&broker, API_KEY).await.unwrap();
    agent.run(|| checkout("warm", 1, 0, false)).join().unwrap();
    function_source(&client, &agent.id()).await;

    let unknown = call(&client, "place_snapshot", json!({"pool": POOL, "function": "probe_chekout"})).await;
    assert_eq!(code(&unknown).as_deref(), Some("no_such_location"), "{}", text(&unknown));
    assert!(text(&unknown).contains("probe_checkout"), "a suggestion: {}", text(&unknown));
    let suggestions = body(&unknown)["error"]["details"]["suggestions"].clone();
    assert!(suggestions.to_string().contains("probe_checkout"), "{suggestions}");
    let both =
        call(&client, "place_snapshot", json!({"pool": POOL, "function": "probe_checkout", "file": "x.rs", "line": 3}))
            .await;
    assert_eq!(code(&both).as_deref(), Some("invalid_input"), "{}", text(&both));
    assert!(text(&both).contains("not both"), "{}", text(&both));
    let slow_line = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "file": "function_probes.rs", "line": 3, "min_duration_ms": 5}),
    )
    .await;
    assert_eq!(code(&slow_line).as_deref(), Some("invalid_input"), "{}", text(&slow_line));
    let neither = call(&client, "place_snapshot", json!({"pool": POOL})).await;
    assert!(text(&neither).contains("`function`"), "{}", text(&neither));

    let placed = call(
        &client,
        "place_metric",
        json!({"pool": POOL, "kind": "duration", "function": "function_probes::probe_checkout"}),
    )
    .await;
    assert_eq!(code(&placed), None, "{}", text(&placed));
    let id = body(&placed)["action"]["action_id"].as_str().unwrap().to_owned();
    wait_installed(&broker.api(), &id, &agent.id()).await;
    agent
        .run(|| {
            for delay in [20, 30, 40] {
                checkout("timed", 1, delay, false);
            }
        })
        .join()
        .unwrap();
    let m = wait_action(&broker.api(), &id, "3 call durations", |a| a["figures"]["total"]["count"] == 3).await;
    assert!(m["figures"]["total"]["min"].as_f64().unwrap() >= 20.0, "{m}");
    assert!(m["figures"]["total"]["max"].as_f64().unwrap() >= 40.0, "{m}");

    // A log on a function is written when each call ends, and reads its duration.
    let log = call(
        &client,
        "place_log",
        json!({"pool": POOL, "function": "probe_checkout",
               "template": "checkout by {owner} returned {return} after {duration_ms >= 50} slow"}),
    )
    .await;
    assert_eq!(code(&log), None, "{}", text(&log));
    let log_id = body(&log)["action"]["action_id"].as_str().unwrap().to_owned();
    wait_installed(&broker.api(), &log_id, &agent.id()).await;
    agent.run(|| checkout("Logged Lou", 2, 60, false)).join().unwrap();
    let lines = eventually(Duration::from_secs(10), "the call's log line", || async {
        let r = call(&client, "get_action", json!({"action_id": log_id, "since": 0})).await;
        let lines = body(&r)["lines"].as_array().cloned().unwrap_or_default();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(lines[0]["text"], "checkout by Logged Lou returned 2000 after true slow", "{lines:?}");

    agent.shutdown();
    broker.stop().await;
}
