//! Conditions and watch expressions on snapshots.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::support::{Api, TestAgent, TestBroker, eventually, wait_online};

#[derive(Debug)]
#[allow(dead_code)]
struct User {
    name: String,
    tier: Tier,
}

/// A unit variant reaches conditions as its name, a string (`user.tier == "Basic"`).
#[derive(Debug)]
enum Tier {
    Gold,
    Basic,
}

fn emit(i: u64) {
    let user = User { name: format!("user-{i}"), tier: if i.is_multiple_of(3) { Tier::Gold } else { Tier::Basic } };
    tracing::info!(amount = i, user = ?user, "conditional event");
}

fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            emit(i);
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

async fn line_of(api: &Api) -> u64 {
    let api = api.clone();
    let s = eventually(Duration::from_secs(10), "the conditional event in the catalog", move || {
        let api = api.clone();
        async move { api.find_source("conditions.rs", "amount").await }
    })
    .await;
    s["line"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_snapshot_fires_only_on_matching_hits_and_evaluates_its_watches() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "cond", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = line_of(&api).await;

    let (status, action) = api
        .post(
            "/actions",
            json!({"pool": "cond", "file": "conditions.rs", "line": line, "max_hits": 2,
                   "condition": "amount % 5 == 0 && user.tier == \"Basic\"",
                   "watch": ["user.name", "amount * 2", "user.missing"]}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    {
        let api = api.clone();
        let id = id.clone();
        eventually(Duration::from_secs(20), "two conditional hits", move || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let (_, a) = api.get(&format!("/actions/{id}")).await;
                (a["status"] == "completed").then_some(())
            }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let (_, page) = api.get(&format!("/actions/{id}/hits")).await;
    let hits = page["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    for hit in hits {
        let amount = hit["fields"]["amount"]["value"].as_i64().unwrap();
        assert_eq!(amount % 5, 0, "{hit}");
        assert_ne!(amount % 3, 0, "tier must be basic: {hit}");
        assert_eq!(hit["fields"]["user"]["fields"]["tier"], json!({"type": "string", "value": "Basic"}), "{hit}");
        let watches = hit["watches"].as_array().unwrap();
        assert_eq!(watches[0]["expression"], "user.name");
        assert_eq!(watches[0]["value"]["value"], format!("user-{amount}"));
        assert_eq!(watches[1]["value"]["value"], amount * 2);
        assert_eq!(watches[2]["value"]["type"], "null", "a missing field is null: {}", watches[2]);
    }
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_condition_is_refused_at_placement_with_its_position() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "badcond", &[]);
    wait_online(&api, &agent.id()).await;
    agent.run(|| emit(1)).join().unwrap();
    let line = line_of(&api).await;
    let (status, err) = api
        .post("/actions", json!({"pool": "badcond", "file": "conditions.rs", "line": line, "condition": "amount > "}))
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "invalid_input");
    assert!(err["error"]["message"].as_str().unwrap().starts_with("condition: at column"), "{err}");
    assert_eq!(err["error"]["details"]["column"], 9);
    let (status, err) = api
        .post(
            "/actions",
            json!({"pool": "badcond", "file": "conditions.rs", "line": line, "watch": ["ok", "frobnicate(x)"]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().starts_with("watch[1]:"), "{err}");
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_time_type_error_shows_once_as_an_action_status() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "typeerr", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = line_of(&api).await;
    let (status, action) = api
        .post(
            "/actions",
            json!({"pool": "typeerr", "file": "conditions.rs", "line": line, "condition": "user.name > 3"}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    let detail = {
        let api = api.clone();
        let id = id.clone();
        eventually(Duration::from_secs(20), "an eval_error status", move || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let (_, a) = api.get(&format!("/actions/{id}")).await;
                // The error stays on the agent's entry; its state may already have moved
                // on (a CPU-quota pause on a loaded machine, say).
                let agent = a["agents"].as_array()?.first()?.clone();
                agent["eval_error"].as_str().map(str::to_owned)
            }
        })
        .await
    };
    assert!(detail.starts_with("condition:"), "{detail}");
    assert!(detail.contains("string") && detail.contains("int"), "names both types: {detail}");
    // Kept on the agent's entry whatever its state is later (a CPU-quota pause, say).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    assert!(a["agents"][0]["eval_error"].as_str().unwrap().starts_with("condition:"), "{a}");
    assert_eq!(a["hits"], 0);
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
}
