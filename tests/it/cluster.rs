//! Cluster mode: three broker nodes sharing one Redis behave as one system. An agent
//! connects to one node, callers talk to any node, and every call answers the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::support::{AGENT_KEY, Api, RawAgent, TestAgent, TestCluster, eventually, wait_online};

#[tracing::instrument(fields(order_id = id))]
fn cluster_checkout(id: u64) {
    tracing::info!(order_id = id, total_cents = 2500u64, "cluster order placed");
}

/// Runs the workload every few milliseconds until stopped.
fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        let mut id = 0;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            cluster_checkout(id);
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

async fn agent_ids(api: &Api) -> Vec<(String, String)> {
    let (status, page) = api.get("/agents").await;
    assert_eq!(status, 200, "{page}");
    let mut out: Vec<(String, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["agent_id"].as_str().unwrap().to_owned(), a["status"].as_str().unwrap().to_owned()))
        .collect();
    out.sort();
    out
}

async fn line_of(api: &Api) -> u64 {
    let api = api.clone();
    let source = eventually(Duration::from_secs(15), "the callsite in the cluster's catalog", move || {
        let api = api.clone();
        async move { api.find_source("cluster.rs", "total_cents").await }
    })
    .await;
    source["line"].as_u64().unwrap()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn id(v: &Json) -> String {
    v["action_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_on_one_node_is_placed_on_through_another_and_read_on_a_third() {
    let cluster = TestCluster::start_with(3, |c| c.agents.metric_report_interval_ms = 1_000).await;
    let (a, b, c) = (cluster.node(0).api(), cluster.node(1).api(), cluster.node(2).api());
    let agent = TestAgent::start(&cluster.node(1).ws_url(), "shop", &["env:test"]);
    wait_online(&a, &agent.id()).await;
    wait_online(&c, &agent.id()).await;
    // Every node lists the same agents.
    let on_b = agent_ids(&b).await;
    assert_eq!(agent_ids(&a).await, on_b);
    assert_eq!(agent_ids(&c).await, on_b);
    let (_, via_a) = a.get(&format!("/agents/{}", agent.id())).await;
    assert_eq!(via_a["node"], "b", "{via_a}");

    // The callsite runs once so that it is in the catalog every node sees.
    agent.run(|| cluster_checkout(0)).join().unwrap();
    let line = line_of(&a).await;

    // A snapshot placed through A, waited for on C: the hit is ingested on B.
    let (status, snap) =
        a.post("/actions", json!({"pool": "shop", "file": "it/cluster.rs", "line": line, "max_hits": 2})).await;
    assert_eq!(status, 201, "{snap}");
    let snap = id(&snap);
    let waiter = {
        let c = c.clone();
        let snap = snap.clone();
        tokio::spawn(async move { c.get(&format!("/actions/{snap}/hits?since=0&wait_seconds=30")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let (status, page) = waiter.await.unwrap();
    assert_eq!(status, 200, "{page}");
    let hits = page["hits"].as_array().unwrap();
    assert!(!hits.is_empty(), "{page}");
    assert_eq!(hits[0]["index"], 1);
    assert_eq!(hits[0]["agent_id"], agent.id().as_str());
    assert_eq!(hits[0]["fields"]["total_cents"]["value"], 2500);

    // A log placed through A, read on C.
    let (status, log) = a
        .post(
            "/logs",
            json!({"pool": "shop", "file": "it/cluster.rs", "line": line, "template": "order {order_id}", "max_lines": 3}),
        )
        .await;
    assert_eq!(status, 201, "{log}");
    let (status, lines) = c.get(&format!("/actions/{}/lines?since=0&wait_seconds=30", id(&log))).await;
    assert_eq!(status, 200, "{lines}");
    let first = &lines["lines"][0];
    assert!(first["text"].as_str().unwrap().starts_with("order "), "{lines}");
    assert_eq!(first["index"], 1);

    // A counter placed through A counts on B and reads on C.
    let (status, counter) =
        a.post("/metrics", json!({"pool": "shop", "kind": "counter", "file": "it/cluster.rs", "line": line})).await;
    assert_eq!(status, 201, "{counter}");
    let counter = id(&counter);
    let c2 = c.clone();
    eventually(Duration::from_secs(20), "the counter's figures on C", move || {
        let c = c2.clone();
        let counter = counter.clone();
        async move {
            let (_, v) = c.get(&format!("/actions/{counter}")).await;
            (v["figures"]["total"]["count"].as_u64().unwrap_or(0) > 0).then_some(())
        }
    })
    .await;

    // The snapshot completed with its two hits, seen alike from every node.
    let c3 = c.clone();
    let done = eventually(Duration::from_secs(20), "the snapshot completed", move || {
        let c = c3.clone();
        let snap = snap.clone();
        async move {
            let (_, v) = c.get(&format!("/actions/{snap}")).await;
            (v["status"] == "completed").then_some(v)
        }
    })
    .await;
    assert_eq!(done["hits"], 2, "{done}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_on_one_node_fails_on_another_and_rules_changed_on_a_third_reach_an_agent_on_the_second() {
    use crate::support::{ADMIN_KEY, RawAgent, create_key};
    let cluster = TestCluster::start(3).await;
    let admin_a = cluster.node(0).api_with(ADMIN_KEY);
    let (secret, key_id) = create_key(&admin_a, json!({"name": "temp", "role": "developer"})).await;
    let on_c = cluster.node(2).api_with(&secret);
    // A node refuses a key it does not know without asking Redis (refusals cost nothing);
    // it learns of a new key when A announces the change, a moment later.
    eventually(Duration::from_secs(5), "a key created on A to work on C", || {
        let on_c = on_c.clone();
        async move { (on_c.get("/agents").await.0 == 200).then_some(()) }
    })
    .await;
    let (status, v) = admin_a.delete(&format!("/keys/{key_id}")).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = on_c.get("/agents").await;
    assert_eq!(status, 401, "revoked on A, refused on C at its next call: {v}");

    // An agent on B is told of rules changed through C.
    let (mut raw, first) = RawAgent::register(cluster.node(1), crate::support::AGENT_KEY, "agt_rulesonb", "raw").await;
    assert_eq!(first["type"], "registered", "{first}");
    let initial = raw.until("redaction_rules").await;
    let resp = reqwest::Client::new()
        .put(format!("{}/api/v1/redaction", cluster.node(2).http()))
        .bearer_auth(ADMIN_KEY)
        .body("[[patterns]]\nname = \"order\"\nregex = 'ORD-[0-9]{6}'\nkind = \"ORDER_ID\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rules: Json = resp.json().await.unwrap();
    let pushed = raw.until("redaction_rules").await;
    assert_eq!(pushed["version"], rules["version"], "{pushed}");
    assert!(pushed["version"].as_u64() > initial["version"].as_u64());
    assert!(pushed.to_string().contains("ORD-"), "the agent got the new pattern");
    // And node A answers with them too, once the bus has told it (nodes hear a change
    // each in their own time: B's agent hearing first proves nothing about A).
    let want = rules["version"].clone();
    eventually(Duration::from_secs(20), "the new rules on node A", || {
        let (admin_a, want) = (admin_a.clone(), want.clone());
        async move { (admin_a.get("/redaction").await.1["version"] == want).then_some(()) }
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_calling_every_node_meets_one_budget_not_one_per_node() {
    use periscope_broker::config::ApiKeyConfig;
    use periscope_broker::quota::CallerQuotaOverrides;
    const FLOOD_KEY: &str = "flood-key-0123456789abcdef";
    let cluster = TestCluster::start_with(3, |c| {
        // One call a minute after a burst of 5: the test ends long before a refill.
        c.api_keys.push(ApiKeyConfig {
            quotas: Some(CallerQuotaOverrides { calls_per_minute: Some(1), call_burst: Some(5), ..Default::default() }),
            ..ApiKeyConfig::new("flooder", FLOOD_KEY)
        });
    })
    .await;
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..30 {
        let (status, body) = cluster.node(i % 3).api_with(FLOOD_KEY).get("/agents").await;
        match status {
            200 => accepted += 1,
            429 => {
                refused += 1;
                assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((accepted, refused), (5, 25), "the burst is the key's, whichever node it calls");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mcp_client_needs_no_session_and_any_node_answers_it() {
    use crate::mcp::{body, call, code, connect_with};
    let cluster = TestCluster::start(3).await;
    let agent = TestAgent::start(&cluster.node(1).ws_url(), "mcp-shop", &[]);
    let a = cluster.node(0).api();
    wait_online(&a, &agent.id()).await;
    agent.run(|| cluster_checkout(0)).join().unwrap();
    let line = line_of(&a).await;
    // A stateless server: no session id for the client to stick to a node with.
    let resp = reqwest::Client::new()
        .post(format!("{}/mcp", cluster.node(0).http()))
        .bearer_auth(crate::support::API_KEY)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("mcp-session-id").is_none(), "no session to stick to");

    let on_a = connect_with(cluster.node(0), crate::support::API_KEY).await.expect("connects to A");
    let placed = call(
        &on_a,
        "place_snapshot",
        json!({"pool": "mcp-shop", "file": "it/cluster.rs", "line": line,
                                                       "max_hits": 1, "wait": false}),
    )
    .await;
    assert_eq!(code(&placed), None, "{:?}", body(&placed));
    let id = body(&placed)["action"]["action_id"].as_str().unwrap().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    // The follow-up goes to another node: the action id and the cursor are all it needs.
    let on_c = connect_with(cluster.node(2), crate::support::API_KEY).await.expect("connects to C");
    let got = call(&on_c, "get_action", json!({"action_id": id, "since": 0, "wait_seconds": 30})).await;
    assert_eq!(code(&got), None, "{:?}", body(&got));
    assert_eq!(body(&got)["hits"].as_array().map(Vec::len), Some(1), "{:?}", body(&got));
    let health = call(&on_c, "system_health", json!({})).await;
    let nodes = body(&health)["cluster"]["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{:?}", body(&health));
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let _ = on_a.cancel().await;
    let _ = on_c.cancel().await;
    agent.shutdown();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_say_when_redis_is_away_refuse_placements_count_the_hits_they_cannot_store_and_recover_by_themselves() {
    let mut cluster = TestCluster::start(2).await;
    let (a, b) = (cluster.node(0).api(), cluster.node(1).api());
    let agent = TestAgent::start(&cluster.node(1).ws_url(), "outage", &[]);
    wait_online(&a, &agent.id()).await;
    agent.run(|| cluster_checkout(0)).join().unwrap();
    let line = line_of(&a).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let place = |api: Api| async move {
        api.post("/actions", json!({"pool": "outage", "file": "it/cluster.rs", "line": line, "max_hits": 1})).await
    };
    let (status, snap) = place(a.clone()).await;
    assert_eq!(status, 201, "{snap}");
    let snap = id(&snap);
    let (_, page) = a.get(&format!("/actions/{snap}/hits?wait_seconds=30")).await;
    assert_eq!(page["hits"].as_array().map(Vec::len), Some(1), "{page}");
    // A live snapshot that keeps firing through the outage (one hit a second, the
    // agent's own per-action rate), with one stored before it.
    let (status, live) =
        a.post("/actions", json!({"pool": "outage", "file": "it/cluster.rs", "line": line, "max_hits": 50})).await;
    assert_eq!(status, 201, "{live}");
    let live = id(&live);
    // The agent's clock for each stored hit (Unix ms, the same clock as the test's).
    let stored = |api: Api, live: String| async move {
        let (_, page) = api.get(&format!("/actions/{live}/hits?limit=100")).await;
        page["hits"].as_array().map(|h| h.iter().filter_map(|h| h["time_ms"].as_u64()).collect::<Vec<_>>())
    };
    eventually(Duration::from_secs(20), "a hit of the live snapshot stored", || {
        let (a, live) = (a.clone(), live.clone());
        async move { stored(a, live).await.filter(|t| !t.is_empty()) }
    })
    .await;
    let (_, before) = b.get(&format!("/agents/{}", agent.id())).await;
    assert_eq!(before["broker_dropped"]["unavailable"], 0, "{before}");

    cluster.redis.kill();
    let killed_ms = unix_ms();
    let http = reqwest::Client::new();
    for node in &cluster.nodes {
        let url = format!("{}/healthz", node.http());
        let http = http.clone();
        eventually(Duration::from_secs(15), "the node not ready without redis", move || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                let status = r.status().as_u16();
                let v: Json = r.json().await.ok()?;
                (status == 503 && v["redis"] == "unreachable").then_some(())
            }
        })
        .await;
    }
    let (status, refused) = place(a.clone()).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (503, Some("not_available")), "{refused}");
    let (status, health) = b.get("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["cluster"]["redis"], "unreachable", "{health}");
    assert_eq!(health["status"], "degraded");
    let metrics = http
        .get(format!("{}/metrics", cluster.node(0).http()))
        .bearer_auth(crate::support::API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("periscope_redis_up 0"), "{metrics}");
    // The agent stays connected meanwhile, on the same session: the hits it keeps
    // sending are read and dropped (never queued without bound on the node), each
    // counted as `unavailable` on its record and on /metrics.
    let agent_id = agent.id();
    let me = eventually(Duration::from_secs(20), "hits dropped as unavailable while redis is away", || {
        let (b, agent_id) = (b.clone(), agent_id.clone());
        async move {
            let (_, me) = b.get(&format!("/agents/{agent_id}")).await;
            (me["broker_dropped"]["unavailable"].as_u64().unwrap_or(0) >= 3).then_some(me)
        }
    })
    .await;
    assert_eq!(me["status"], "online", "{me}");
    assert_eq!(me["connected_at_ms"], before["connected_at_ms"], "the session never broke: {me}");
    assert!(me["stats"]["queue_len"].as_u64().is_some_and(|n| n < 1024), "the agent's queue stays bounded: {me}");
    let metrics = http
        .get(format!("{}/metrics", cluster.node(1).http()))
        .bearer_auth(crate::support::API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("periscope_broker_dropped_total{")
                && l.contains(&format!("agent=\"{agent_id}\""))
                && l.contains("reason=\"unavailable\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n >= 3), "{metrics}");

    cluster.redis.restart().expect("redis comes back");
    let restarted_ms = unix_ms();
    for node in &cluster.nodes {
        let url = format!("{}/healthz", node.http());
        let http = http.clone();
        eventually(Duration::from_secs(20), "the node ready again", move || {
            let (http, url) = (http.clone(), url.clone());
            async move { (http.get(&url).send().await.ok()?.status() == 200).then_some(()) }
        })
        .await;
    }
    // What was stored before is still there (Redis replayed its append-only file).
    let (status, kept) = a.get(&format!("/actions/{snap}/hits")).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["hits"][0]["index"], 1, "{kept}");
    let placed = {
        let a = a.clone();
        eventually(Duration::from_secs(20), "placements accepted again", move || {
            let a = a.clone();
            async move {
                let (status, v) = place(a).await;
                (status == 201).then_some(v)
            }
        })
        .await
    };
    let (_, page) = a.get(&format!("/actions/{}/hits?wait_seconds=30", id(&placed))).await;
    assert_eq!(page["hits"].as_array().map(Vec::len), Some(1), "{page}");
    // The snapshot that lived through the outage stores new hits again, from the same
    // session; none of those taken in the heart of the outage was stored later (a
    // second of margin at each end for hits in flight).
    let times = eventually(Duration::from_secs(20), "new hits of the live snapshot stored after the outage", || {
        let (a, live) = (a.clone(), live.clone());
        async move { stored(a, live).await.filter(|t| t.iter().any(|&t| t > restarted_ms)) }
    })
    .await;
    assert!(
        !times.iter().any(|&t| t > killed_ms + 1_000 && t + 1_000 < restarted_ms),
        "a hit taken while redis was away was stored: {times:?} (away from {killed_ms} to {restarted_ms})"
    );
    let (_, after) = b.get(&format!("/agents/{agent_id}")).await;
    assert_eq!(after["status"], "online", "{after}");
    assert_eq!(after["connected_at_ms"], before["connected_at_ms"], "{after}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    cluster.stop().await;
}

/// Cuts every Redis pub/sub connection (as a network blip or `CLIENT KILL` would),
/// leaving Redis itself up; answers how many were cut.
fn cut_subscriptions(port: u16) -> u64 {
    use std::io::{BufRead as _, Write as _};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("redis answers");
    conn.write_all(b"CLIENT KILL TYPE pubsub\r\n").expect("the command is sent");
    let mut reply = String::new();
    std::io::BufReader::new(conn).read_line(&mut reply).expect("redis replies");
    reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("CLIENT KILL replied {reply:?}"))
}

/// A placement travels to the node holding the agent over pub/sub, which forgets what
/// it carried while a node was not listening: a node that subscribes again sends its
/// agents the actions they should run, so what was placed in the gap still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placement_made_while_a_nodes_subscription_was_cut_reaches_its_agent_once_the_node_listens_again() {
    let cluster = TestCluster::start(2).await;
    let a = cluster.node(0).api();
    let agent = TestAgent::start(&cluster.node(1).ws_url(), "blip", &[]);
    wait_online(&a, &agent.id()).await;
    agent.run(|| cluster_checkout(0)).join().unwrap();
    let line = line_of(&a).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    // Both nodes listen on three channels and for action events.
    assert!(cut_subscriptions(cluster.redis.port()) >= 2);
    let (status, snap) =
        a.post("/actions", json!({"pool": "blip", "file": "it/cluster.rs", "line": line, "max_hits": 1})).await;
    assert_eq!(status, 201, "{snap}");
    let (_, page) = a.get(&format!("/actions/{}/hits?wait_seconds=30", id(&snap))).await;
    assert_eq!(page["hits"].as_array().map(Vec::len), Some(1), "{page}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    cluster.stop().await;
}

/// A Python agent publishes whole files (every line that holds code), not callsites:
/// what it published on one node validates placements made through any other, with
/// the nearest code lines named for a line that holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_file_catalog_published_on_one_node_validates_any_line_placed_through_another() {
    let cluster = TestCluster::start(2).await;
    let a = cluster.node(0).api();
    let (mut agent, _) = RawAgent::registered(cluster.node(1), AGENT_KEY, "agt_py_files", "pyshop").await;
    agent
        .send(json!({"type": "catalog", "full": true, "entries": [], "files": [
            {"file": "shop/orders.py", "module": "shop.orders", "lines": "3-7,9,12-20",
             "functions": [{"name": "price_order", "line": 12, "end_line": 20}]}
        ]}))
        .await;
    wait_online(&a, "agt_py_files").await;

    // Line 14 holds code: placed through A once B's catalog reached it.
    let action = eventually(Duration::from_secs(20), "a placement on shop/orders.py:14 through A", || {
        let a = a.clone();
        async move {
            let (status, v) =
                a.post("/actions", json!({"pool": "pyshop", "file": "orders.py", "line": 14, "max_hits": 1})).await;
            (status == 201).then(|| id(&v))
        }
    })
    .await;
    // Line 10 holds none: refused through A, naming the nearest lines of the file.
    let (status, err) = a.post("/actions", json!({"pool": "pyshop", "file": "orders.py", "line": 10})).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "no_such_location", "{err}");
    let nearest: Vec<u64> =
        err["error"]["details"]["nearest"].as_array().unwrap().iter().filter_map(|n| n["line"].as_u64()).collect();
    assert!(nearest.contains(&9) && nearest.contains(&12), "{err}");

    // The agent, held by B, receives the action placed through A; its hit is read on A.
    assert_eq!(agent.until("action_add").await["action"]["id"], action.as_str());
    agent.hit(&action, "shop/orders.py", 14, 1).await;
    let (status, page) = a.get(&format!("/actions/{action}/hits?since=0&wait_seconds=20")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["hits"][0]["agent_id"], "agt_py_files", "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_an_agent_sends_in_a_burst_are_all_stored_in_order_and_those_past_max_hits_refused() {
    // Rates wide enough for the burst: what is refused is refused for max_hits alone.
    let cluster = TestCluster::start_with(2, |c| {
        (c.ingest.agent_hits_per_sec, c.ingest.action_hits_per_sec) = (1_000.0, 1_000.0);
    })
    .await;
    let a = cluster.node(0).api();
    let (mut raw, _) = RawAgent::registered(cluster.node(1), AGENT_KEY, "agt_burst0001", "burst").await;
    raw.publish("it/burst.rs", 7, &["n"]).await;
    // Placed through A once A knows the location the agent published on B.
    let a2 = a.clone();
    let snap = eventually(Duration::from_secs(20), "the snapshot placed through A", move || {
        let a = a2.clone();
        async move {
            let (status, v) = a
                .post(
                    "/actions",
                    json!({"agent_ids": ["agt_burst0001"], "file": "it/burst.rs", "line": 7,
                                         "max_hits": 50}),
                )
                .await;
            (status == 201).then(|| id(&v))
        }
    })
    .await;
    let add = raw.until("action_add").await;
    assert_eq!(add["action"]["id"], snap.as_str(), "{add}");
    // Sixty hits back to back (stored together, a batch at a time), then a status.
    for seq in 1..=60 {
        raw.hit(&snap, "it/burst.rs", 7, seq).await;
    }
    raw.send(json!({"type": "action_status", "action_id": snap, "state": "installed", "callsites": 1})).await;
    let a3 = a.clone();
    let s2 = snap.clone();
    let done = eventually(Duration::from_secs(20), "the snapshot completed with its refusals counted", move || {
        let a = a3.clone();
        let snap = s2.clone();
        async move {
            let (_, v) = a.get(&format!("/actions/{snap}")).await;
            (v["status"] == "completed" && v["hits_refused"].as_u64() == Some(10)).then_some(v)
        }
    })
    .await;
    assert_eq!(done["hits"], 50, "{done}");
    let (status, page) = a.get(&format!("/actions/{snap}/hits?limit=100")).await;
    assert_eq!(status, 200, "{page}");
    let hits = page["hits"].as_array().expect("hits");
    let indexes: Vec<u64> = hits.iter().filter_map(|h| h["index"].as_u64()).collect();
    let values: Vec<u64> = hits.iter().filter_map(|h| h["fields"]["n"]["value"].as_u64()).collect();
    assert_eq!(indexes, (1..=50).collect::<Vec<_>>(), "{page}");
    assert_eq!(values, (1..=50).collect::<Vec<_>>(), "the first fifty, in the order sent");
    cluster.stop().await;
}
