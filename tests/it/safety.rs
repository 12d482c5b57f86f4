//! Code-version safety, blocklists and the pause switch, through MCP against real
//! agents: a placement for one version refused per agent by the others, a blocklisted
//! file refused at placement and dropped by the agent when the rule comes later, a
//! `no_capture` rule leaving hits without values, pause and resume (also across the
//! nodes of a cluster).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::mcp::{body, call, code, connect_with, text};
use crate::support::{ADMIN_KEY, API_KEY, Api, TestAgent, TestBroker, TestCluster, audit, eventually, wait_online};

#[tracing::instrument(fields(shard = "s1"))]
fn vault_unseal(secret_len: u64) {
    tracing::info!(secret_len, shard = "s1", "vault unsealed");
}

/// Runs the instrumented code every few milliseconds until stopped.
fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        while !stop.load(Ordering::Relaxed) {
            vault_unseal(32);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// The line of `vault unsealed` once the agents of `pool` reported it.
async fn event_line(api: &Api, agents: usize) -> u64 {
    let api = api.clone();
    eventually(Duration::from_secs(15), "the event in list_sources", move || {
        let api = api.clone();
        async move {
            let s = api.find_source("it/safety.rs", "secret_len").await?;
            (s["agents"].as_u64() == Some(agents as u64)).then(|| s["line"].as_u64()).flatten()
        }
    })
    .await
}

fn this_file_hash() -> String {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/it/safety.rs")).unwrap();
    format!("sha256:{}", Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn agent_state(action: &Value, agent_id: &str) -> (String, String) {
    let a =
        action["agents"].as_array().unwrap().iter().find(|a| a["agent_id"] == agent_id).cloned().unwrap_or_default();
    (a["state"].as_str().unwrap_or_default().to_owned(), a["detail"].as_str().unwrap_or_default().to_owned())
}

async fn wait_agent_state(
    api: &Api,
    action_id: &str,
    agent_id: &str,
    want: &'static [&'static str],
) -> (String, String) {
    let api = api.clone();
    let (action_id, agent_id) = (action_id.to_owned(), agent_id.to_owned());
    eventually(Duration::from_secs(20), "the agent's state of the action", move || {
        let api = api.clone();
        let (action_id, agent_id) = (action_id.clone(), agent_id.clone());
        async move {
            let (_, a) = api.get(&format!("/actions/{action_id}")).await;
            let (state, detail) = agent_state(&a, &agent_id);
            want.contains(&state.as_str()).then_some((state, detail))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placement_for_one_version_runs_on_its_agents_and_is_refused_by_the_others() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let old = TestAgent::start_version(&broker.ws_url(), "vault", "1.4.0", "0123456789abcdef0123");
    let new = TestAgent::start_version(&broker.ws_url(), "vault", "1.5.0", "fedcba9876543210fedc");
    wait_online(&api, &old.id()).await;
    wait_online(&api, &new.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let works = [workload(&old, Arc::clone(&stop)), workload(&new, Arc::clone(&stop))];
    let line = event_line(&api, 2).await;
    let client = connect_with(&broker, API_KEY).await.unwrap();

    // The pool's two versions show at a glance, each agent with its version and build.
    let r = call(&client, "list_agents", json!({"pool": "vault"})).await;
    let versions = &body(&r)["versions"][0];
    assert_eq!(versions["pool"], "vault");
    assert_eq!(versions["mixed"], true, "{versions}");
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2, "{versions}");
    assert!(text(&r).contains("runs several versions"), "{}", text(&r));
    assert!(text(&r).contains("build=0123456789ab"), "{}", text(&r));
    // The Rust agent hashes the file it could read; list_sources shows it.
    let r = call(&client, "list_sources", json!({"pool": "vault", "query": "secret_len"})).await;
    let source = body(&r)["items"].as_array().unwrap().iter().find(|s| s["line"] == line).cloned().unwrap();
    assert_eq!(source["hash"], this_file_hash().as_str(), "{source}");

    // A snapshot for 1.5.0: the answer counts both agents and says why one is out.
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "vault", "file": "it/safety.rs", "line": line, "max_hits": 5, "wait": false,
               "expected_version": "1.5.0"}),
    )
    .await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let placed = body(&r)["action"].clone();
    let check = &placed["code_check"];
    assert_eq!((check["matched"].as_u64(), check["mismatched"].as_u64()), (Some(1), Some(1)), "{placed}");
    assert_eq!(check["agents"][0]["agent_id"], old.id().as_str());
    assert!(check["agents"][0]["reason"].as_str().unwrap().contains("1.4.0"), "{check}");
    let id = placed["action_id"].as_str().unwrap().to_owned();
    // The old agent refuses it with the reason in its status; the new one runs it.
    let (_, detail) = wait_agent_state(&api, &id, &old.id(), &["error"]).await;
    assert!(detail.contains("code version differs") && detail.contains("`1.5.0`"), "{detail}");
    wait_agent_state(&api, &id, &new.id(), &["installed", "completed", "paused"]).await;
    let action = crate::support::wait_action(&api, &id, "five hits", |a| a["hits"] == 5).await;
    let (_, page) = api.get(&format!("/actions/{id}/hits?since=0&limit=10")).await;
    assert!(page["hits"].as_array().unwrap().iter().all(|h| h["agent_id"] == new.id().as_str()), "{action}");

    // A build prefix and the file's hash match both: nothing refused.
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "vault", "file": "it/safety.rs", "line": line, "wait": false, "file_hash": this_file_hash()}),
    )
    .await;
    assert_eq!(code(&r), None, "{}", text(&r));
    assert_eq!(body(&r)["action"]["code_check"]["matched"], 2, "{}", body(&r));
    // A hash no agent has: refused at placement, each agent's reason in the details.
    let other = format!("sha256:{}", "ab".repeat(32));
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "vault", "file": "it/safety.rs", "line": line, "wait": false, "file_hash": other}),
    )
    .await;
    assert_eq!(code(&r).as_deref(), Some("no_matching_agents"), "{}", text(&r));
    assert_eq!(body(&r)["error"]["details"]["code_check"]["mismatched"], 2, "{}", body(&r));
    assert!(text(&r).contains("file hash differs"), "{}", text(&r));

    stop.store(true, Ordering::Relaxed);
    for w in works {
        w.join().unwrap();
    }
    old.shutdown();
    new.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocklisted_file_is_refused_at_placement_and_dropped_by_the_agent_when_the_rule_comes_later() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "vault", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = event_line(&api, 1).await;
    let admin = connect_with(&broker, ADMIN_KEY).await.unwrap();
    let dev = connect_with(&broker, API_KEY).await.unwrap();
    let rule = json!({"rules": [{"name": "vault-code", "effect": "no_actions", "file": "it/safety.rs",
                                 "reason": "credential handling"}]});

    // Only company admins change the blocklist.
    let r = call(&dev, "set_blocklist", rule.clone()).await;
    assert_eq!(code(&r).as_deref(), Some("insufficient_scope"), "{}", text(&r));
    let r = call(&admin, "set_blocklist", rule.clone()).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    assert_eq!(body(&r)["rules"][0]["name"], "vault-code");

    // Refused at placement, naming the rule; audited.
    let r = call(&dev, "place_snapshot", json!({"pool": "vault", "file": "it/safety.rs", "line": line, "wait": false}))
        .await;
    assert_eq!(code(&r).as_deref(), Some("blocked"), "{}", text(&r));
    assert!(text(&r).contains("`vault-code`") && text(&r).contains("credential handling"), "{}", text(&r));
    let admin_api = broker.api_with(ADMIN_KEY);
    assert_eq!(audit(&admin_api, "&kind=placement_blocked").await.len(), 1);

    // Placed while no rule holds, then the rule comes: the agent drops the action and
    // says why; no hit arrives after that.
    call(&admin, "set_blocklist", json!({"rules": []})).await;
    let r = call(
        &dev,
        "place_log",
        json!({"pool": "vault", "file": "it/safety.rs", "line": line, "template": "unsealed", "max_lines": 1000000}),
    )
    .await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    crate::support::wait_action(&api, &id, "lines", |a| a["lines"].as_u64().unwrap_or(0) > 0).await;
    call(&admin, "set_blocklist", rule).await;
    let (_, detail) = wait_agent_state(&api, &id, &agent.id(), &["error"]).await;
    assert!(detail.contains("`vault-code`") && detail.contains("dropped"), "{detail}");
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    let lines = a["lines"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    assert_eq!(a["lines"].as_u64().unwrap(), lines, "no line after the agent dropped the action: {a}");
    assert_eq!(audit(&admin_api, "&kind=blocklist_changed").await.len(), 3);

    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_no_capture_rule_leaves_hits_without_values() {
    let mut config = crate::support::test_config();
    // From the configuration file: every organization.
    config.blocklist.push(periscope_protocol::BlockRule {
        name: "unseal".into(),
        effect: periscope_protocol::BlockEffect::NoCapture,
        pool: Some("vault".into()),
        file: None,
        module: None,
        function: Some("vault_unseal".into()),
        reason: String::new(),
    });
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    // The same code in a pool the rule does not name, for comparison.
    let covered = TestAgent::start(&broker.ws_url(), "vault", &[]);
    let open = TestAgent::start(&broker.ws_url(), "open", &[]);
    wait_online(&api, &covered.id()).await;
    wait_online(&api, &open.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let works = [workload(&covered, Arc::clone(&stop)), workload(&open, Arc::clone(&stop))];
    event_line(&api, 2).await;
    let client = connect_with(&broker, API_KEY).await.unwrap();
    // The span's own line is where the rule names the function.
    let span = eventually(Duration::from_secs(10), "the span in list_sources", || async {
        let r = call(&client, "list_sources", json!({"query": "vault_unseal"})).await;
        body(&r)["items"].as_array().unwrap().iter().find(|s| s["kind"] == "span").and_then(|s| s["line"].as_u64())
    })
    .await;

    // Reading values there is refused; counting is not.
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "vault", "file": "it/safety.rs", "line": span, "wait": false, "condition": "secret_len > 1"}),
    )
    .await;
    assert_eq!(code(&r).as_deref(), Some("blocked"), "{}", text(&r));
    assert!(text(&r).contains("`unseal`"), "{}", text(&r));
    let snapshot =
        |pool: &str| json!({"pool": pool, "file": "it/safety.rs", "line": span, "max_hits": 2, "timeout_seconds": 30});
    let r = call(&client, "place_snapshot", snapshot("vault")).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let hits = body(&r)["hits"].as_array().cloned().unwrap();
    assert!(!hits.is_empty(), "{}", body(&r));
    for h in &hits {
        assert!(h["fields"].as_object().is_none_or(|f| f.is_empty()), "a value left where no_capture holds: {h}");
        assert!(h["location"]["file"].as_str().unwrap().ends_with("it/safety.rs"), "{h}");
    }
    // Where the rule does not hold, the same snapshot has its values.
    let r = call(&client, "place_snapshot", snapshot("open")).await;
    let hits = body(&r)["hits"].as_array().cloned().unwrap();
    assert!(!hits.is_empty(), "{}", body(&r));
    assert_eq!(hits[0]["fields"]["secret_len"]["value"], 32, "{}", hits[0]);

    stop.store(true, Ordering::Relaxed);
    for w in works {
        w.join().unwrap();
    }
    covered.shutdown();
    open.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pausing_a_pool_stops_its_actions_without_removing_them_and_resuming_brings_them_back() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "vault", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = event_line(&api, 1).await;
    let admin = connect_with(&broker, ADMIN_KEY).await.unwrap();
    let dev = connect_with(&broker, API_KEY).await.unwrap();
    let r = call(
        &dev,
        "place_log",
        json!({"pool": "vault", "file": "it/safety.rs", "line": line, "template": "unsealed", "max_lines": 1000000}),
    )
    .await;
    let id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    crate::support::wait_action(&api, &id, "lines", |a| a["lines"].as_u64().unwrap_or(0) > 0).await;

    // Developers cannot pause.
    let r = call(&dev, "pause_actions", json!({"pool": "vault"})).await;
    assert_eq!(code(&r).as_deref(), Some("insufficient_scope"), "{}", text(&r));
    let r = call(&admin, "pause_actions", json!({"pool": "vault", "reason": "incident 4711"})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    assert_eq!(body(&r)["actions"], 1, "{}", body(&r));
    // Nothing more is kept from the moment the answer came.
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    let lines = a["lines"].as_u64().unwrap();
    assert_eq!(a["status"], "active", "paused, not removed: {a}");
    assert_eq!(a["paused_by_operator"]["reason"], "incident 4711", "{a}");
    let (state, detail) = agent_state(&a, &agent.id());
    assert_eq!(state, "paused", "{a}");
    assert!(detail.contains("paused by an operator"), "{detail}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    assert_eq!(a["lines"].as_u64().unwrap(), lines, "no line while paused: {a}");
    // Placing into the paused pool is refused, naming the pause.
    let r = call(&dev, "place_snapshot", json!({"pool": "vault", "file": "it/safety.rs", "line": line, "wait": false}))
        .await;
    assert_eq!(code(&r).as_deref(), Some("paused"), "{}", text(&r));
    assert!(text(&r).contains("incident 4711"), "{}", text(&r));

    // Resumed: the same action runs again.
    let r = call(&admin, "resume_actions", json!({"pool": "vault"})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    crate::support::wait_action(&api, &id, "lines again", |a| a["lines"].as_u64().unwrap_or(0) > lines).await;
    let (_, a) = api.get(&format!("/actions/{id}")).await;
    assert!(a.get("paused_by_operator").is_none(), "{a}");
    let admin_api = broker.api_with(ADMIN_KEY);
    let paused = audit(&admin_api, "&kind=actions_paused_by_operator").await;
    assert_eq!(paused.len(), 1);
    assert!(paused[0]["detail"].as_str().unwrap().contains("pool `vault`"), "{}", paused[0]);
    assert_eq!(audit(&admin_api, "&kind=actions_resumed_by_operator").await.len(), 1);

    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_through_one_node_holds_the_agents_of_another() {
    let cluster = TestCluster::start(2).await;
    let (a, b) = (cluster.node(0).api(), cluster.node(1).api());
    let agent = TestAgent::start(&cluster.node(1).ws_url(), "vault", &[]);
    wait_online(&a, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = event_line(&a, 1).await;
    let (status, log) = b
        .post(
            "/logs",
            json!({"pool": "vault", "file": "it/safety.rs", "line": line, "template": "x", "max_lines": 1000000}),
        )
        .await;
    assert_eq!(status, 201, "{log}");
    let id = log["action_id"].as_str().unwrap().to_owned();
    crate::support::wait_action(&b, &id, "lines", |v| v["lines"].as_u64().unwrap_or(0) > 0).await;

    let admin = connect_with(cluster.node(0), ADMIN_KEY).await.unwrap();
    let r = call(&admin, "pause_actions", json!({"pool": "vault"})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    // Node B hears of it: the agent it holds stops, and B refuses placements there.
    let b2 = b.clone();
    eventually(Duration::from_secs(10), "node B refusing placements into the paused pool", move || {
        let b = b2.clone();
        async move {
            let (status, _) = b.post("/actions", json!({"pool": "vault", "file": "it/safety.rs", "line": line})).await;
            (status == 409).then_some(())
        }
    })
    .await;
    let (_, v) = b.get(&format!("/actions/{id}")).await;
    assert_eq!(agent_state(&v, &agent.id()).0, "paused", "{v}");
    let lines = v["lines"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, v) = b.get(&format!("/actions/{id}")).await;
    assert_eq!(v["lines"].as_u64().unwrap(), lines, "no line while paused: {v}");

    // Resumed through B: lines again.
    let (status, v) = cluster.node(1).api_with(ADMIN_KEY).post("/resume", json!({"pool": "vault"})).await;
    assert_eq!(status, 200, "{v}");
    crate::support::wait_action(&a, &id, "lines again", |v| v["lines"].as_u64().unwrap_or(0) > lines).await;

    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    cluster.stop().await;
}
