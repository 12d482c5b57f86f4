//! Attacks across tenants and keys (issue 9, items 4 and 8, and the "also fix" list):
//! deleting another tenant's results by churn, multiplying quotas by minting keys,
//! keys outliving the key that minted them, flooding the audit trail with refused
//! registrations, reading other pools' counts, and changing another organization's
//! actions from an agent.

use std::time::Duration;

use periscope_broker::auth::Role;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use serde_json::{Value, json};

use crate::support::{
    ADMIN_KEY, AGENT_KEY, API_KEY, Api, RawAgent, TestBroker, audit, create_key, eventually, polling_quotas, temp_dir,
    test_config,
};

const ACME_ADMIN_KEY: &str = "acme-admin-key-0123456789";
const ACME_AGENT_KEY: &str = "acme-agent-key-0123456789";
const MALLORY_KEY: &str = "mallory-dev-key-0123456789";
const NARROW_KEY: &str = "narrow-dev-key-0123456789";

/// The test configuration plus an organization `acme` (an admin and an agent key) and
/// a second developer of `default`, `mallory`.
fn two_tenants() -> periscope_broker::BrokerConfig {
    let mut config = test_config();
    config.api_keys.push(ApiKeyConfig {
        org: Some("acme".into()),
        quotas: polling_quotas(),
        ..ApiKeyConfig::new("acme-admin", ACME_ADMIN_KEY).with_role(Role::CompanyAdmin)
    });
    config.api_keys.push(ApiKeyConfig { quotas: polling_quotas(), ..ApiKeyConfig::new("mallory", MALLORY_KEY) });
    config.agent_keys.push(AgentKeyConfig { org: Some("acme".into()), ..AgentKeyConfig::any_pool(ACME_AGENT_KEY) });
    config
}

async fn wait_source(api: &Api, agent_id: &str, file: &str) {
    let (api, id, file) = (api.clone(), agent_id.to_owned(), file.to_owned());
    eventually(Duration::from_secs(10), "the location listed", move || {
        let (api, id, file) = (api.clone(), id.clone(), file.clone());
        async move {
            let (_, page) = api.get(&format!("/sources?agent_id={id}&file={file}")).await;
            (page["total"].as_u64().unwrap_or(0) > 0).then_some(())
        }
    })
    .await;
}

/// Places a one-hit snapshot on pool `shop` at `src/r.rs:1` with `api`, has `agent` send
/// its hit, and waits until it completed; returns its id.
async fn completed_snapshot(api: &Api, agent: &mut RawAgent) -> String {
    let (status, a) = api.post("/actions", json!({"pool": "shop", "file": "src/r.rs", "line": 1})).await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();
    agent.until("action_add").await;
    agent.hit(&id, "src/r.rs", 1, 1).await;
    let (api2, id2) = (api.clone(), id.clone());
    eventually(Duration::from_secs(10), "the snapshot completed", move || {
        let (api, id) = (api2.clone(), id2.clone());
        async move { (api.get(&format!("/actions/{id}")).await.1["status"] == "completed").then_some(()) }
    })
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_churn_never_deletes_another_tenants_finished_results() {
    let dir = temp_dir("retention");
    let mut config = two_tenants();
    config.data_dir = Some(dir.clone());
    config.store.max_ended_actions_per_org = 10;
    let broker = TestBroker::start_with(config.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = broker.addr;
    let (alice, mallory, acme) = (broker.api(), broker.api_with(MALLORY_KEY), broker.api_with(ACME_ADMIN_KEY));
    let (mut ours, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_retain01", "shop").await;
    ours.publish("src/r.rs", 1, &["n"]).await;
    let (mut theirs, _) = RawAgent::registered(&broker, ACME_AGENT_KEY, "agt_retain02", "shop").await;
    theirs.publish("src/r.rs", 1, &["n"]).await;
    wait_source(&alice, "agt_retain01", "src/r.rs").await;
    wait_source(&acme, "agt_retain02", "src/r.rs").await;

    let alices = completed_snapshot(&alice, &mut ours).await;
    let bobs = completed_snapshot(&acme, &mut theirs).await;

    // Mallory places and removes actions as fast as she can.
    let mut mallorys = Vec::new();
    for _ in 0..30 {
        let (status, a) = mallory.post("/actions", json!({"pool": "shop", "file": "src/r.rs", "line": 1})).await;
        assert_eq!(status, 201, "{a}");
        let id = a["action_id"].as_str().unwrap().to_owned();
        assert_eq!(mallory.delete(&format!("/actions/{id}")).await.0, 200);
        mallorys.push(id);
    }

    // Alice's and Bob's finished results are intact, hits included; Mallory lost her
    // own oldest.
    let check = |broker_alice: Api, broker_acme: Api, mallory: Api, first: String| {
        let (alices, bobs) = (alices.clone(), bobs.clone());
        async move {
            let (status, a) = broker_alice.get(&format!("/actions/{alices}/hits")).await;
            assert_eq!((status, a["hits"].as_array().map(Vec::len)), (200, Some(1)), "{a}");
            let (status, b) = broker_acme.get(&format!("/actions/{bobs}/hits")).await;
            assert_eq!((status, b["hits"].as_array().map(Vec::len)), (200, Some(1)), "{b}");
            assert_eq!(mallory.get(&format!("/actions/{first}")).await.0, 404, "mallory's oldest went first");
        }
    };
    check(alice.clone(), acme.clone(), mallory.clone(), mallorys[0].clone()).await;
    let (_, listed) = mallory.get("/actions?status=removed").await;
    let kept = listed.as_array().map_or(0, Vec::len);
    assert!(kept < 10, "the organization holds at most 10 ended actions: {kept}");

    // The store forgot the same ones: a restart brings none of Mallory's evicted back.
    drop((ours, theirs));
    broker.stop().await;
    let broker = TestBroker::start_with(config, addr).await;
    check(broker.api(), broker.api_with(ACME_ADMIN_KEY), broker.api_with(MALLORY_KEY), mallorys[0].clone()).await;
    broker.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_key_never_outlives_its_creator_and_is_revoked_with_it() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (g_secret, g_id) =
        create_key(&admin, json!({"name": "temp admin", "role": "company_admin", "expires_in_seconds": 3_600})).await;
    let g = broker.api_with(&g_secret);
    let (_, g_view) = admin.get(&format!("/keys/{g_id}")).await;
    let g_expiry = g_view["expires_at_ms"].as_u64().unwrap();

    // No expiry given: it expires with its creator. A later one: refused.
    let (status, d) = g.post("/keys", json!({"name": "dev"})).await;
    assert_eq!(status, 201, "{d}");
    assert_eq!(d["key"]["expires_at_ms"].as_u64(), Some(g_expiry));
    assert_eq!(d["key"]["created_by_key"], g_id.as_str());
    let (d_secret, d_id) = (d["secret"].as_str().unwrap().to_owned(), d["key"]["key_id"].as_str().unwrap().to_owned());
    let (status, late) = g.post("/keys", json!({"name": "late", "expires_in_seconds": 7_200})).await;
    assert_eq!(status, 400, "{late}");
    assert_eq!(late["error"]["code"], "invalid_input");
    assert!(late["error"]["message"].as_str().unwrap().contains("never outlives its creator"), "{late}");

    // An agent key it mints, in use.
    let (agent_key, _) = create_key(&g, json!({"kind": "agent", "name": "minted agents", "pools": ["shop"]})).await;
    let (mut agent, _) = RawAgent::registered(&broker, &agent_key, "agt_minted01", "shop").await;
    let dev = broker.api_with(&d_secret);
    assert_eq!(dev.get("/agents").await.0, 200);

    // Revoking the creator revokes what it minted: the next call fails, the agent's
    // session ends, and the trail says why.
    assert_eq!(admin.delete(&format!("/keys/{g_id}")).await.0, 200);
    let (status, body) = dev.get("/agents").await;
    assert_eq!(status, 401, "{body}");
    let ended = loop {
        match agent.next().await {
            Some(v) if v["type"] == "error" => break v,
            Some(_) => {}
            None => panic!("closed without saying why"),
        }
    };
    assert!(ended["message"].as_str().unwrap().contains("revoked"), "{ended}");
    let (_, d_view) = admin.get(&format!("/keys/{d_id}")).await;
    assert_eq!(d_view["status"], "revoked", "{d_view}");
    let revoked = audit(&admin, "&kind=key_revoked").await;
    let cascade = revoked.iter().find(|e| e["target"]["key_id"] == d_id.as_str()).expect("an entry for the minted key");
    assert_eq!(cascade["data"]["cascade_from"], g_id.as_str(), "{cascade}");

    // Expiry is inherited too: a key minted by a key that expires in 2 s expires with it.
    let (e_secret, _) =
        create_key(&admin, json!({"name": "short", "role": "company_admin", "expires_in_seconds": 2})).await;
    let (f_secret, _) = create_key(&broker.api_with(&e_secret), json!({"name": "child"})).await;
    let f = broker.api_with(&f_secret);
    assert_eq!(f.get("/agents").await.0, 200);
    let f2 = f.clone();
    eventually(Duration::from_secs(10), "the minted key expired with its creator", move || {
        let f = f2.clone();
        async move { (f.get("/agents").await.0 == 401).then_some(()) }
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_keys_does_not_multiply_an_organizations_live_actions_or_calls() {
    let mut config = two_tenants();
    config.callers.live_actions = 2;
    config.org_quotas.live_actions = Some(3);
    // As much as one key may do: every other call of the organization makes it the
    // first limit the minted keys meet.
    config.org_quotas.calls_per_minute = Some(120);
    config.org_quotas.call_burst = Some(30);
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let admin = broker.api_with(ADMIN_KEY);
    let (one, _) = create_key(&admin, json!({"name": "minted one"})).await;
    let (two, _) = create_key(&admin, json!({"name": "minted two"})).await;
    let (one, two) = (broker.api_with(&one), broker.api_with(&two));
    let (mut agent, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_ceiling1", "shop").await;
    agent.publish("src/c.rs", 1, &["n"]).await;
    wait_source(&one, "agt_ceiling1", "src/c.rs").await;
    let place = json!({"pool": "shop", "file": "src/c.rs", "line": 1, "expire_seconds": 600});

    // Each key may hold 2 live actions; the organization 3, however many keys it mints.
    assert_eq!(one.post("/actions", place.clone()).await.0, 201);
    assert_eq!(one.post("/actions", place.clone()).await.0, 201);
    assert_eq!(two.post("/actions", place.clone()).await.0, 201);
    let (status, err) = two.post("/actions", place.clone()).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(err["error"]["code"], "quota_exceeded");
    assert_eq!(err["error"]["details"]["quota"], "org_live_actions", "{err}");
    assert!(err["error"]["details"]["retry_after_seconds"].as_u64().unwrap() > 500, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("org_quotas.live_actions"), "{err}");
    assert_eq!(one.post("/actions", place.clone()).await.1["error"]["details"]["quota"], "live_actions");

    // Calls: the organization's keys together stop at its ceiling; another
    // organization's key does not notice.
    let mut refused = None;
    for _ in 0..200 {
        let (status, body) = one.get("/health").await;
        if status == 429 {
            refused = Some(body);
            break;
        }
    }
    let refused = refused.expect("the organization's call ceiling");
    assert_eq!(refused["error"]["details"]["quota"], "org_calls_per_minute", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("org_quotas.calls_per_minute"), "{refused}");
    let (status, body) = two.get("/health").await;
    assert_eq!(status, 429, "a fresh key of the same organization: {body}");
    assert_eq!(body["error"]["details"]["quota"], "org_calls_per_minute", "{body}");
    assert!(body["error"]["details"]["retry_after_seconds"].as_u64().unwrap() >= 1);
    assert_eq!(broker.api_with(ACME_ADMIN_KEY).get("/health").await.0, 200, "another organization");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_agent_registrations_are_audited_once_per_key_and_reason_not_once_each() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (key, key_id) = create_key(&admin, json!({"kind": "agent", "name": "shop only", "pools": ["shop"]})).await;
    for i in 0..40 {
        let (_, refusal) = RawAgent::register(&broker, &key, &format!("agt_noisy{i:04}"), "admin").await;
        assert_eq!(refusal["code"], "unauthorized", "{refusal}");
    }
    let refused: Vec<Value> = audit(&admin, "&kind=agent_refused")
        .await
        .into_iter()
        .filter(|e| e["actor"]["key_id"] == key_id.as_str())
        .collect();
    assert_eq!(refused.len(), 1, "40 refusals, one entry until the minute is over: {refused:?}");
    assert_eq!(refused[0]["data"]["reason"], "pool_not_allowed");
    assert!(refused[0]["data"]["repeats_aggregated_for_ms"].as_u64().is_some(), "{}", refused[0]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_restricted_key_sees_only_its_pools_counts_in_health_and_metrics() {
    let mut config = test_config();
    config.api_keys.push(ApiKeyConfig {
        pools: Some(vec!["shop".into()]),
        quotas: polling_quotas(),
        ..ApiKeyConfig::new("narrow", NARROW_KEY)
    });
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let (wide, narrow) = (broker.api(), broker.api_with(NARROW_KEY));
    let (_shop, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_count0s", "shop").await;
    let (mut admin_pool, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_count0a", "admin").await;
    admin_pool.publish("src/c.rs", 1, &["n"]).await;
    wait_source(&wide, "agt_count0a", "src/c.rs").await;
    let (status, a) =
        wide.post("/actions", json!({"pool": "admin", "file": "src/c.rs", "line": 1, "max_hits": 5})).await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();
    admin_pool.until("action_add").await;
    admin_pool.hit(&id, "src/c.rs", 1, 1).await;
    let w = wide.clone();
    eventually(Duration::from_secs(10), "the hit stored", move || {
        let w = w.clone();
        let id = id.clone();
        async move { (w.get(&format!("/actions/{id}")).await.1["hits"] == 1).then_some(()) }
    })
    .await;

    let (_, h) = wide.get("/health").await;
    assert_eq!((h["agents_online"].as_u64(), h["actions_live"].as_u64()), (Some(2), Some(1)), "{h}");
    let (_, h) = narrow.get("/health").await;
    assert_eq!((h["agents_online"].as_u64(), h["actions_live"].as_u64()), (Some(1), Some(0)), "{h}");

    let metrics = |key: &'static str| {
        let (client, url) = (wide.client.clone(), format!("{}/metrics", broker.http()));
        async move { client.get(url).bearer_auth(key).send().await.unwrap().text().await.unwrap() }
    };
    let value = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    let (wide_m, narrow_m) = (metrics(API_KEY).await, metrics(NARROW_KEY).await);
    assert_eq!(value(&wide_m, "periscope_hits_accepted_total"), 1);
    assert_eq!(value(&wide_m, "periscope_actions_live"), 1);
    assert_eq!(value(&narrow_m, "periscope_hits_accepted_total"), 0, "{narrow_m}");
    assert_eq!(value(&narrow_m, "periscope_actions_live"), 0);
    assert_eq!(value(&narrow_m, "periscope_agents_connected"), 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_organization_cannot_change_an_actions_state() {
    let broker = TestBroker::start_with(two_tenants(), "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let (mut ours, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_state001", "shop").await;
    ours.publish("src/s.rs", 1, &["n"]).await;
    wait_source(&api, "agt_state001", "src/s.rs").await;
    let (status, a) = api.post("/actions", json!({"pool": "shop", "file": "src/s.rs", "line": 1})).await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();
    ours.until("action_add").await;
    ours.send(json!({"type": "action_status", "action_id": id, "state": "installed", "callsites": 1})).await;

    // Their agent names our action (an id it could learn from anywhere).
    let (mut theirs, _) = RawAgent::registered(&broker, ACME_AGENT_KEY, "agt_state002", "shop").await;
    theirs.send(json!({"type": "action_status", "action_id": id, "state": "error", "reason": "pwned"})).await;
    theirs
        .send(json!({"type": "action_status", "action_id": id, "state": "paused", "reason": "quota_cpu",
                       "message": "pwned"}))
        .await;
    drop(theirs);
    let (api2, id2) = (api.clone(), id.clone());
    let view = eventually(Duration::from_secs(10), "our agent's state", move || {
        let (api, id) = (api2.clone(), id2.clone());
        async move {
            let (_, v) = api.get(&format!("/actions/{id}")).await;
            (v["agents"][0]["state"] == "installed").then_some(v)
        }
    })
    .await;
    // Give their frames time to arrive, then look again: still ours alone.
    let (_, h) = broker.api_with(ACME_ADMIN_KEY).get("/health").await;
    assert_eq!(h["status"], "ok");
    let (_, again) = api.get(&format!("/actions/{id}")).await;
    assert_eq!(again["agents"], view["agents"], "{again}");
    assert!(!again.to_string().contains("pwned"), "{again}");
    assert_eq!(again["quota"]["pauses"], json!({}), "{again}");
    broker.stop().await;
}

/// Opens an MCP session with `key` over raw streamable HTTP: the status, and the
/// session id or the error body.
async fn open_mcp_session(broker: &TestBroker, key: &str) -> (u16, String) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let resp = reqwest::Client::new()
        .post(format!("{}/mcp", broker.http()))
        .bearer_auth(key)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let session = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = resp.text().await.unwrap_or_default();
    (status, session.unwrap_or(body))
}

/// Ends an MCP session.
async fn close_mcp_session(broker: &TestBroker, key: &str, session: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!("{}/mcp", broker.http()))
        .bearer_auth(key)
        .header("mcp-session-id", session)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_keys_does_not_multiply_an_organizations_mcp_sessions() {
    let mut config = two_tenants();
    config.callers.mcp_sessions = 2;
    config.org_quotas.mcp_sessions = Some(3);
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let admin = broker.api_with(ADMIN_KEY);
    let (one, _) = create_key(&admin, json!({"name": "minted one"})).await;
    let (two, _) = create_key(&admin, json!({"name": "minted two"})).await;

    // Each key may hold 2 sessions; the organization 3, however many keys it mints.
    let (status, first) = open_mcp_session(&broker, &one).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(open_mcp_session(&broker, &one).await.0, 200);
    let (status, body) = open_mcp_session(&broker, &one).await;
    assert_eq!(status, 429, "a third session of one key: {body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["details"]["quota"], "mcp_sessions", "{err}");

    assert_eq!(open_mcp_session(&broker, &two).await.0, 200);
    let (status, body) = open_mcp_session(&broker, &two).await;
    assert_eq!(status, 429, "the organization's fourth session: {body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["details"]["quota"], "org_mcp_sessions", "{err}");
    assert_eq!(open_mcp_session(&broker, ACME_ADMIN_KEY).await.0, 200, "another organization does not notice");

    // Ending a session gives its place back.
    assert_eq!(close_mcp_session(&broker, &one, &first).await, 202);
    let (status, body) = open_mcp_session(&broker, &two).await;
    assert_eq!(status, 200, "a place freed by the ended session: {body}");
    broker.stop().await;
}
