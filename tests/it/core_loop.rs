//! The core loop: place a snapshot by file:line, the workload hits it, the hit comes
//! back with fields, span stack and depth markers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::support::{TestAgent, TestBroker, eventually, wait_online};

#[derive(Debug)]
#[allow(dead_code)]
struct Geo {
    lat: f64,
    lon: f64,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Address {
    street: String,
    city: String,
    geo: Geo,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Customer {
    name: String,
    address: Address,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Order {
    id: u64,
    customer: Customer,
    items: Vec<u32>,
}

fn order(id: u64) -> Order {
    Order {
        id,
        customer: Customer {
            name: "Ada".into(),
            address: Address {
                street: "1 Main St".into(),
                city: "Springfield".into(),
                geo: Geo { lat: 1.5, lon: -2.0 },
            },
        },
        items: vec![1, 2, 3],
    }
}

#[tracing::instrument(skip(order), fields(order_id = order.id, region = "eu"))]
fn checkout(order: &Order) {
    place(order);
}

#[tracing::instrument(skip(order))]
fn place(order: &Order) {
    tracing::info!(order = ?order, total_cents = 1999u64, "core loop order placed");
}

/// Runs the workload every few milliseconds until stopped; counts iterations.
fn workload(agent: &TestAgent, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        while !stop.load(Ordering::Relaxed) {
            checkout(&order(7));
            count.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

async fn placed_line(api: &crate::support::Api) -> u64 {
    let api = api.clone();
    let source = eventually(Duration::from_secs(10), "the event callsite in the catalog", move || {
        let api = api.clone();
        async move { api.find_source("core_loop.rs", "total_cents").await }
    })
    .await;
    assert_eq!(source["kind"], "event");
    assert!(source["fields"].as_array().unwrap().iter().any(|f| f == "order"), "{source}");
    source["line"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_by_file_and_line_returns_fields_span_stack_and_depth_markers() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "shop", &["env:test"]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let work = workload(&agent, Arc::clone(&stop), Arc::clone(&count));
    let line = placed_line(&api).await;

    let (status, action) =
        api.post("/actions", json!({"pool": "shop", "file": "it/core_loop.rs", "line": line, "max_hits": 2})).await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("act_"));
    assert_eq!(action["status"], "active");

    let (status, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    assert_eq!(status, 200, "{page}");
    let hits = page["hits"].as_array().unwrap();
    assert!(!hits.is_empty(), "{page}");
    let hit = &hits[0];
    assert!(hit["hit_id"].as_str().unwrap().starts_with("hit_"));
    assert_eq!(hit["agent_id"], agent.id().as_str());
    assert_eq!(hit["location"]["line"], line);
    assert_eq!(hit["fields"]["total_cents"], json!({"type": "int", "value": 1999}));
    assert_eq!(hit["fields"]["message"]["value"], "core loop order placed");

    // Debug output parsed back into structure, cut at depth 3 with a marker.
    let order = &hit["fields"]["order"];
    assert_eq!(order["type"], "object", "{order}");
    assert_eq!(order["type_name"], "Order");
    assert_eq!(order["fields"]["id"]["value"], 7);
    let address = &order["fields"]["customer"]["fields"]["address"];
    assert_eq!(address["type_name"], "Address", "{order}");
    assert_eq!(address["fields"]["city"]["value"], "Springfield");
    assert_eq!(address["fields"]["geo"], json!({"type": "cut", "reason": "depth", "type_name": "Geo", "size": 2}));
    assert!(hit["truncation"]["depth_cuts"].as_u64().unwrap() >= 1);

    // The span stack, innermost first, with span fields. Read from the second hit: the
    // first may fire in spans the workload opened before the snapshot was armed, which
    // the agent was not recording (README: "Span stacks").
    let (status, page) = api.get(&format!("/actions/{id}/hits?since=1&wait_seconds=20")).await;
    assert_eq!(status, 200, "{page}");
    let hit = &page["hits"][0];
    assert_eq!(hit["index"], 2, "{page}");
    let spans = hit["spans"].as_array().unwrap();
    assert_eq!(spans[0]["name"], "place", "{spans:?}");
    assert_eq!(spans[1]["name"], "checkout");
    assert_eq!(spans[1]["fields"]["order_id"]["value"], 7);
    assert_eq!(spans[1]["fields"]["region"]["value"], "eu");
    assert!(hit["thread"]["id"].is_string());

    let (_, action) = api.get(&format!("/actions/{id}")).await;
    assert_eq!(action["status"], "completed", "{action}");
    assert_eq!(action["hits"], 2);

    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    assert!(count.load(Ordering::Relaxed) > 0);
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_targeting_reaches_an_agent_that_registers_after_the_action_was_placed() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let early = TestAgent::start(&broker.ws_url(), "tags", &["env:prod", "region:eu"]);
    wait_online(&api, &early.id()).await;
    // Make the callsite known (callsites register process-wide the first time they run).
    early.run(|| checkout(&order(1))).join().unwrap();
    let line = placed_line(&api).await;

    let (status, action) = api
        .post(
            "/actions",
            json!({"pool": "tags", "tags": ["env:prod"], "file": "core_loop.rs", "line": line, "max_hits": 1}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();

    let late = TestAgent::start(&broker.ws_url(), "tags", &["env:prod", "region:us"]);
    wait_online(&api, &late.id()).await;
    let late_id = late.id();
    {
        let api = api.clone();
        let id = id.clone();
        let late_id = late_id.clone();
        eventually(Duration::from_secs(10), "the late agent to be part of the action", move || {
            let api = api.clone();
            let id = id.clone();
            let late_id = late_id.clone();
            async move {
                let (_, a) = api.get(&format!("/actions/{id}")).await;
                a["agents"]
                    .as_array()?
                    .iter()
                    .any(|x| x["agent_id"] == late_id.as_str() && x["state"] == "installed")
                    .then_some(())
            }
        })
        .await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&late, Arc::clone(&stop), Arc::new(AtomicU64::new(0)));
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let hits = page["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 1, "{page}");
    assert_eq!(hits[0]["agent_id"], late_id.as_str());
    early.shutdown();
    late.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_location_answers_with_the_nearest_known_locations() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "near", &[]);
    wait_online(&api, &agent.id()).await;
    agent.run(|| checkout(&order(1))).join().unwrap();
    let line = placed_line(&api).await;

    let (status, err) =
        api.post("/actions", json!({"pool": "near", "file": "core_loop.rs", "line": line + 1000})).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "no_such_location");
    let nearest = err["error"]["details"]["nearest"].as_array().unwrap();
    assert!(!nearest.is_empty() && nearest.len() <= 5);
    assert!(nearest.iter().all(|n| n["file"].as_str().unwrap().ends_with("core_loop.rs")));
    assert!(err["error"]["message"].as_str().unwrap().contains("nearest known"), "{err}");

    let (status, err) = api.post("/actions", json!({"pool": "near", "file": "nowhere_at_all.rs", "line": 3})).await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["code"], "no_such_location");

    // Accepted as pending when the caller says the code has not run yet, and says so.
    let (status, action) = api
        .post("/actions", json!({"pool": "near", "file": "core_loop.rs", "line": line + 1000, "allow_pending": true}))
        .await;
    assert_eq!(status, 201, "{action}");
    assert!(action["pending_note"].as_str().unwrap().contains("armed"));

    // Out-of-range arguments name the allowed range; nothing is clamped.
    let (status, err) =
        api.post("/actions", json!({"pool": "near", "file": "core_loop.rs", "line": line, "max_hits": 51})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_input");
    assert!(err["error"]["message"].as_str().unwrap().contains("1..=50"));
    let (status, err) =
        api.post("/actions", json!({"pool": "near", "tags": ["env:none"], "file": "core_loop.rs", "line": line})).await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["code"], "no_matching_agents");
    // A pool nobody knows is not found (as one outside the key's reach would be).
    let (status, err) =
        api.post("/actions", json!({"pool": "nobody-here", "file": "core_loop.rs", "line": line})).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "not_found");
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_reconnects_and_the_live_action_keeps_working() {
    let data_dir = std::env::temp_dir().join(format!("periscope-it-{}", periscope_protocol::ActionId::generate()));
    let mut config = crate::support::test_config();
    config.data_dir = Some(data_dir.clone());
    let broker = TestBroker::start_with(config.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = broker.addr;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "restart", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let work = workload(&agent, Arc::clone(&stop), Arc::clone(&count));
    let line = placed_line(&api).await;
    let (status, action) =
        api.post("/actions", json!({"pool": "restart", "file": "core_loop.rs", "line": line, "max_hits": 3})).await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    let (_, dbg) = api.get(&format!("/actions/{id}")).await;
    assert!(!page["hits"].as_array().unwrap().is_empty(), "{dbg}");

    broker.stop().await;
    // The host keeps running while the broker is gone.
    let before = count.load(Ordering::Relaxed);
    {
        let count = Arc::clone(&count);
        eventually(Duration::from_secs(10), "the workload to keep running", move || {
            let c = count.load(Ordering::Relaxed);
            async move { (c > before + 20).then_some(()) }
        })
        .await;
    }
    let restarted_at = periscope_broker::time::now_ms();
    let broker = TestBroker::start_with(config, addr).await;
    let api = broker.api();
    wait_online(&api, &agent.id()).await;
    let (status, action) = api.get(&format!("/actions/{id}")).await;
    assert_eq!(status, 200, "the action survived the restart: {action}");
    {
        let api = api.clone();
        let id = id.clone();
        eventually(Duration::from_secs(20), "the action to complete after the restart", move || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let (_, a) = api.get(&format!("/actions/{id}")).await;
                (a["status"] == "completed").then_some(())
            }
        })
        .await;
    }
    let (_, page) = api.get(&format!("/actions/{id}/hits")).await;
    let hits = page["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.last().unwrap()["received_at_ms"].as_u64().unwrap() >= restarted_at, "{page}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_can_carry_the_native_backtrace_when_asked() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "bt", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop), Arc::new(AtomicU64::new(0)));
    let line = placed_line(&api).await;
    let (status, action) =
        api.post("/actions", json!({"pool": "bt", "file": "core_loop.rs", "line": line, "backtrace": true})).await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let frames = page["hits"][0]["backtrace"].as_array().unwrap_or_else(|| panic!("{page}"));
    assert!(!frames.is_empty());
    // The first frames are the application's, not the agent's or tracing's.
    assert!(!frames[0].as_str().unwrap().contains("periscope_agent::"), "{frames:?}");
    assert!(frames.iter().take(8).any(|f| f.as_str().unwrap().contains("core_loop::place")), "{frames:?}");
    agent.shutdown();
    broker.stop().await;
}

const PENDING_SPAN_LINE: u32 = line!() + 3;

fn code_that_has_not_run_yet(n: u64) {
    let span = tracing::info_span!("pending_span", n);
    let _entered = span.enter();
    tracing::info!(n, "inside the pending span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_snapshot_on_a_span_arms_when_its_code_first_runs_while_other_actions_are_live() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "pending", &[]);
    wait_online(&api, &agent.id()).await;
    // Another live action: spans are being recorded, the case that used to hide the
    // pending callsite from the table.
    agent.run(|| checkout(&order(1))).join().unwrap();
    let line = placed_line(&api).await;
    let (status, other) =
        api.post("/actions", json!({"pool": "pending", "file": "core_loop.rs", "line": line, "max_hits": 1})).await;
    assert_eq!(status, 201, "{other}");
    let (status, action) = api
        .post(
            "/actions",
            json!({"pool": "pending", "file": "it/core_loop.rs", "line": PENDING_SPAN_LINE, "allow_pending": true}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    assert!(action["pending_note"].is_string(), "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    crate::support::wait_action(&api, &id, "the agent's pending state", |a| a["agents"][0]["state"] == "pending").await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let stop = Arc::clone(&stop);
        agent.run(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                code_that_has_not_run_yet(n);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let hit = &page["hits"][0];
    assert_eq!(hit["location"]["line"], PENDING_SPAN_LINE, "{page}");
    assert!(hit["fields"]["n"]["value"].as_i64().unwrap() >= 1, "the span's own fields: {hit}");
    agent.shutdown();
    broker.stop().await;
}
