//! Attacks by agents (issue 9, items 2, 3 and 7): taking an offline agent's id, flooding
//! under fresh ids, opening sessions without end, and sending fields without bounds.
//! Each must fail with a specific error, be audited where an operator would want it,
//! and leave honest agents alone.

use std::time::Duration;

use periscope_broker::config::AgentKeyConfig;
use serde_json::{Value, json};

use crate::support::{
    ADMIN_KEY, AGENT_KEY, API_KEY, Api, RawAgent, TestBroker, audit, create_key, eventually, temp_dir, test_config,
};

const ACME_AGENT_KEY: &str = "acme-agent-key-0123456789";

async fn wait_offline(api: &Api, agent_id: &str) {
    let (api, id) = (api.clone(), agent_id.to_owned());
    eventually(Duration::from_secs(10), "the agent offline", move || {
        let (api, id) = (api.clone(), id.clone());
        async move { (api.get(&format!("/agents/{id}")).await.1["status"] == "offline").then_some(()) }
    })
    .await;
}

async fn wait_source(api: &Api, agent_id: &str, file: &str) -> Value {
    let (api, id, file) = (api.clone(), agent_id.to_owned(), file.to_owned());
    eventually(Duration::from_secs(10), "the location listed", move || {
        let (api, id, file) = (api.clone(), id.clone(), file.clone());
        async move {
            let (_, page) = api.get(&format!("/sources?agent_id={id}&file={file}")).await;
            page["items"].as_array().and_then(|i| i.first().cloned())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agents_id_cannot_be_taken_by_another_key_pool_or_organization_even_after_a_restart() {
    let dir = temp_dir("identity");
    let mut config = test_config();
    config.data_dir = Some(dir.clone());
    config.agent_keys.push(AgentKeyConfig { org: Some("acme".into()), ..AgentKeyConfig::any_pool(ACME_AGENT_KEY) });
    let broker = TestBroker::start_with(config.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = broker.addr;
    let (api, admin) = (broker.api(), broker.api_with(ADMIN_KEY));
    let (other_key, other_key_id) =
        create_key(&admin, json!({"kind": "agent", "name": "other agents", "pools": ["shop", "admin"]})).await;

    // The victim registers, publishes a location, and a snapshot is aimed at it by id,
    // with a condition and a watch.
    let id = "agt_victim01";
    let (mut victim, _) = RawAgent::registered(&broker, AGENT_KEY, id, "shop").await;
    victim.publish("src/pay.rs", 10, &["card"]).await;
    wait_source(&api, id, "src/pay.rs").await;
    let (status, action) = api
        .post(
            "/actions",
            json!({"agent_ids": [id], "file": "src/pay.rs", "line": 10, "condition": "card != \"\"",
                   "watch": ["card"], "max_hits": 2, "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let action_id = action["action_id"].as_str().unwrap().to_owned();
    assert_eq!(victim.until("action_add").await["action"]["id"], action_id.as_str());
    drop(victim);
    wait_offline(&api, id).await;

    // Every other claim on the id is refused: another agent key of the organization (in
    // the victim's pool or another), the victim's own key in another pool, and another
    // organization's key.
    for (key, pool, why) in [
        (other_key.as_str(), "shop", "another agent key"),
        (other_key.as_str(), "admin", "another key and pool"),
        (AGENT_KEY, "admin", "the same key in another pool"),
        (ACME_AGENT_KEY, "shop", "another organization"),
    ] {
        let (mut taker, first) = RawAgent::register(&broker, key, id, pool).await;
        assert_eq!(
            (first["code"].as_str(), first["fatal"].as_bool()),
            (Some("identity_bound"), Some(true)),
            "{why}: {first}"
        );
        assert!(taker.next().await.is_none(), "{why}: the socket is closed, no action was sent");
    }
    // Nothing reached a taker: the action still runs on the victim alone, with no hit.
    let (_, view) = api.get(&format!("/actions/{action_id}")).await;
    assert_eq!(view["hits"], 0);
    assert_eq!(view["agents"].as_array().unwrap().len(), 1, "{view}");
    let (_, agent) = api.get(&format!("/agents/{id}")).await;
    assert_eq!(agent["pool"], "shop", "the catalog and listing are the victim's: {agent}");

    // Audited, naming the key that tried and why.
    let trail = audit(&admin, "&kind=agent_impersonation").await;
    let reasons: Vec<&str> =
        trail.iter().filter(|e| e["target"]["agent_id"] == id).filter_map(|e| e["data"]["reason"].as_str()).collect();
    for reason in ["other_agent_key", "other_pool", "claimed_by_other_organization"] {
        assert!(reasons.contains(&reason), "{reason} missing from {reasons:?}");
    }
    assert!(trail.iter().any(|e| e["actor"]["key_id"] == other_key_id.as_str()), "{trail:?}");

    // The owner comes back (same key, same pool) and gets its action.
    let (back, sync) = RawAgent::registered(&broker, AGENT_KEY, id, "shop").await;
    assert!(sync["actions"].as_array().unwrap().iter().any(|a| a["id"] == action_id.as_str()), "{sync}");
    drop(back);
    wait_offline(&api, id).await;

    // The binding is stored: after a restart on the same data directory it holds.
    broker.stop().await;
    let broker = TestBroker::start_with(config, addr).await;
    let (_, first) = RawAgent::register(&broker, &other_key, id, "shop").await;
    assert_eq!(first["code"], "identity_bound", "{first}");
    let (_, sync) = RawAgent::registered(&broker, AGENT_KEY, id, "shop").await;
    assert!(sync["actions"].as_array().unwrap().iter().any(|a| a["id"] == action_id.as_str()), "{sync}");
    broker.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends hit frames until the broker hangs up; returns the fatal frame.
async fn flood(agent: &mut RawAgent) -> Value {
    let started = std::time::Instant::now();
    let mut seq = 0;
    while started.elapsed() < Duration::from_secs(30) {
        for _ in 0..30 {
            seq += 1;
            agent.hit("act_nosuchaction", "src/flood.rs", 1, seq).await;
        }
        use futures_util::StreamExt as _;
        while let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), agent.ws.next()).await {
            match frame {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "error" && v["fatal"] == true {
                        return v;
                    }
                }
                Some(Ok(_)) => {}
                _ => panic!("closed without a fatal error frame"),
            }
        }
    }
    panic!("never disconnected for flooding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_reconnecting_under_a_fresh_id_is_refused_for_its_keys_cool_down() {
    let mut config = test_config();
    config.ingest.agent_hits_per_sec = 5.0;
    config.quotas.snapshot_hits_per_sec = 5.0;
    config.ingest.flood_warnings = 1;
    config.ingest.flood_cooldown_secs = 60;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let admin = broker.api_with(ADMIN_KEY);
    let (flood_key, flood_key_id) =
        create_key(&admin, json!({"kind": "agent", "name": "flooder", "pools": ["flood"]})).await;
    let (calm_key, _) = create_key(&admin, json!({"kind": "agent", "name": "calm", "pools": ["flood"]})).await;

    let (mut flooder, _) = RawAgent::registered(&broker, &flood_key, "agt_flood0001", "flood").await;
    let fatal = flood(&mut flooder).await;
    assert_eq!(fatal["code"], "rate_limited", "{fatal}");
    assert!(fatal["message"].as_str().unwrap().contains("agent key"), "{fatal}");

    // Under a fresh id, with the same key: refused, saying for how long and why.
    for fresh in ["agt_fresh0001", "agt_fresh0002"] {
        let (_, refusal) = RawAgent::register(&broker, &flood_key, fresh, "flood").await;
        assert_eq!((refusal["code"].as_str(), refusal["fatal"].as_bool()), (Some("rate_limited"), Some(true)));
        let msg = refusal["message"].as_str().unwrap();
        assert!(msg.contains("agent key flooded") && msg.contains(" s more"), "{msg}");
    }
    // Another agent key of the same organization does not notice.
    let (_calm, _) = RawAgent::registered(&broker, &calm_key, "agt_calm00001", "flood").await;

    let flooding = audit(&admin, "&kind=agent_flooding").await;
    assert!(flooding.iter().any(|e| e["actor"]["key_id"] == flood_key_id.as_str()), "{flooding:?}");
    let refused = audit(&admin, "&kind=agent_refused").await;
    let cooling: Vec<&Value> = refused.iter().filter(|e| e["data"]["reason"] == "key_cooling_down").collect();
    assert_eq!(cooling.len(), 1, "two refusals, one entry (repeats are aggregated): {refused:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_key_holds_a_bounded_number_of_sessions_which_share_its_budget() {
    let mut config = test_config();
    config.agents.max_sessions_per_key = 2;
    config.ingest.agent_hits_per_sec = 5.0;
    config.quotas.snapshot_hits_per_sec = 5.0;
    config.ingest.key_hits_per_sec = 5.0;
    config.ingest.burst_factor = 1.0;
    config.ingest.agent_bytes_per_sec = 1024 * 1024;
    config.ingest.flood_warnings = 1_000;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let (api, admin) = (broker.api(), broker.api_with(ADMIN_KEY));
    let (key, _) = create_key(&admin, json!({"kind": "agent", "name": "shared", "pools": ["*"]})).await;

    let (mut a, _) = RawAgent::registered(&broker, &key, "agt_share0a", "share").await;
    let (mut b, _) = RawAgent::registered(&broker, &key, "agt_share0b", "share").await;
    // A third socket of the key is refused as soon as it opens, registered or not.
    let (mut c, refusal) = RawAgent::register(&broker, &key, "agt_share0c", "share").await;
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("max_sessions_per_key"), "{refusal}");
    assert!(c.next().await.is_none());
    let refused = audit(&admin, "&kind=agent_refused").await;
    assert!(refused.iter().any(|e| e["data"]["reason"] == "sessions_per_key"), "{refused:?}");

    // Each session is within its own budget (5 hits/s), the two together are not: the
    // key's budget (5 hits/s for all its sessions) drops the second one's.
    for seq in 1..=5 {
        a.hit("act_nosuchaction", "src/share.rs", 1, seq).await;
    }
    for seq in 1..=5 {
        b.hit("act_nosuchaction", "src/share.rs", 1, seq).await;
    }
    // The broker serves the two sessions concurrently, so which one's hits find the
    // key's budget spent varies; together at least 3 of the 10 do.
    let views = eventually(Duration::from_secs(10), "every hit counted", || {
        let api = api.clone();
        async move {
            let (_, a) = api.get("/agents/agt_share0a").await;
            let (_, b) = api.get("/agents/agt_share0b").await;
            let seen = |v: &Value| {
                v["broker_dropped"]["key_rate"].as_u64().unwrap_or(0) + v["hits_refused"].as_u64().unwrap_or(0)
            };
            (seen(&a) + seen(&b) >= 10).then_some((a, b))
        }
    })
    .await;
    let key_rate = |v: &Value| v["broker_dropped"]["key_rate"].as_u64().unwrap();
    assert!(key_rate(&views.0) + key_rate(&views.1) >= 3, "{views:?}");
    for v in [&views.0, &views.1] {
        assert_eq!(v["broker_dropped"]["hits_rate"], 0, "no session was over its own budget: {v}");
    }

    // When one ends, its slot is free again.
    drop(a);
    wait_offline(&api, "agt_share0a").await;
    let (_again, _) = RawAgent::registered(&broker, &key, "agt_share0d", "share").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_input_over_its_bounds_is_cut_charged_in_full_and_unknown_rule_names_are_dropped() {
    let mut config = test_config();
    config.agents.max_catalog_bytes = 64 * 1024;
    config.ingest.action_log_bytes_per_sec = 2_100;
    config.ingest.burst_factor = 2.0;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let (api, admin) = (broker.api(), broker.api_with(ADMIN_KEY));
    let id = "agt_input001";
    let (mut agent, _) = RawAgent::registered(&broker, AGENT_KEY, id, "input").await;

    // A catalog entry with a thousand one-character fields and control characters, and
    // more entries than 64 KiB of catalog may hold.
    let mut entries = vec![json!({"file": "src/in.rs", "line": 5, "kind": "event", "name": "evil\nname\u{1b}[2J",
                                  "fields": vec!["a"; 1_000]})];
    for i in 0..200 {
        let fields: Vec<String> = (0..20).map(|f| format!("{f:040}")).collect();
        entries.push(
            json!({"file": format!("src/bulk{i}.rs"), "line": 1, "kind": "event", "name": "bulk", "fields": fields}),
        );
    }
    agent.send(json!({"type": "catalog", "full": true, "entries": entries})).await;
    let full = agent.until("error").await;
    assert_eq!((full["code"].as_str(), full["fatal"].as_bool()), (Some("rate_limited"), Some(false)), "{full}");
    assert!(full["message"].as_str().unwrap().contains("catalog is full"), "{full}");
    let source = wait_source(&api, id, "src/in.rs").await;
    assert_eq!(source["fields"].as_array().unwrap().len(), 64, "fields cut to their bound");
    let name = source["name"].as_str().unwrap();
    assert!(!name.contains('\n') && !name.contains('\u{1b}'), "{name:?}");
    let (_, view) = api.get(&format!("/agents/{id}")).await;
    assert!(view["locations"].as_u64().unwrap() < 201, "the byte bound held: {view}");
    assert!(view["broker_dropped"]["catalog"].as_u64().unwrap() > 100, "{view}");

    // A log line with a huge thread name and made-up rule names.
    let (status, log) =
        api.post("/logs", json!({"pool": "input", "file": "src/in.rs", "line": 5, "template": "x"})).await;
    assert_eq!(status, 201, "{log}");
    let action_id = log["action_id"].as_str().unwrap().to_owned();
    agent.until("action_add").await;
    let line = |seq: u64, thread: String, redactions: Value| {
        json!({"action_id": action_id, "seq": seq, "time_ms": 1, "level": "info", "text": "x", "thread": thread,
               "redactions": redactions})
    };
    let made_up = json!([
        {"path": "text", "rule": "email"},
        {"path": "x\ny", "rule": "made-up\nrule shown to admins"},
        {"path": "p", "rule": "z".repeat(600)},
    ]);
    agent.send(json!({"type": "log_lines", "lines": [line(1, "t".repeat(900_000), made_up)]})).await;
    let page = eventually(Duration::from_secs(10), "the line stored", || {
        let (api, id) = (api.clone(), action_id.clone());
        async move {
            let (_, page) = api.get(&format!("/actions/{id}/lines")).await;
            (page["lines"].as_array().is_some_and(|l| !l.is_empty())).then_some(page)
        }
    })
    .await;
    let stored = &page["lines"][0];
    assert_eq!(stored["thread"].as_str().unwrap().chars().count(), 128, "thread cut to its bound");
    let rules: Vec<&str> = stored["redactions"].as_array().unwrap().iter().filter_map(|f| f["rule"].as_str()).collect();
    assert_eq!(rules, ["email"], "only rules the broker knows: {stored}");
    let (_, view) = api.get(&format!("/agents/{id}")).await;
    assert_eq!(view["broker_dropped"]["unknown_rules"], 2, "{view}");

    // Every byte of a line is charged: 60 one-character lines with 128-character thread
    // names do not fit a 4,200-byte burst (they would at one byte each).
    let lines: Vec<Value> = (2..62).map(|seq| line(seq, "t".repeat(128), json!([]))).collect();
    agent.send(json!({"type": "log_lines", "lines": lines})).await;
    let view = eventually(Duration::from_secs(10), "the frame processed", || {
        let (api, id) = (api.clone(), action_id.clone());
        async move {
            let (_, v) = api.get(&format!("/actions/{id}")).await;
            (v["lines"].as_u64().unwrap_or(0) + v["quota"]["broker_dropped"]["log_rate"].as_u64().unwrap_or(0) >= 61)
                .then_some(v)
        }
    })
    .await;
    assert!(view["lines"].as_u64().unwrap() < 45, "{view}");
    assert!(view["quota"]["broker_dropped"]["log_rate"].as_u64().unwrap() > 15, "{view}");
    assert_eq!(view["redaction_rules_fired"], json!({"email": 1}), "{view}");

    // The audit trail names known rules only.
    assert_eq!(api.delete(&format!("/actions/{action_id}")).await.0, 200);
    let removed = audit(&admin, &format!("&kind=action_removed&action_id={action_id}")).await;
    assert_eq!(removed[0]["redaction_rules"], json!({"email": 1}), "{removed:?}");

    // A hit's names, paths and rule ids are held to the same: printable, known rules.
    let (status, snap) = api.post("/actions", json!({"pool": "input", "file": "src/in.rs", "line": 5})).await;
    assert_eq!(status, 201, "{snap}");
    let snap_id = snap["action_id"].as_str().unwrap().to_owned();
    agent.until("action_add").await;
    agent
        .send(json!({"type": "hit", "action_id": snap_id, "seq": 1, "time_ms": 1,
                     "location": {"file": "src/in.rs\n#2 forged line", "line": 5},
                     "fields": {"n": {"type": "int", "value": 1}},
                     "redactions": [{"path": "fields.n\nforged", "rule": "email"}, {"path": "p", "rule": "made-up"}]}))
        .await;
    let hits = eventually(Duration::from_secs(10), "the hit stored", || {
        let (api, id) = (api.clone(), snap_id.clone());
        async move {
            let (_, page) = api.get(&format!("/actions/{id}/hits")).await;
            page["hits"].as_array().filter(|h| !h.is_empty()).cloned()
        }
    })
    .await;
    let hit = &hits[0];
    assert!(!hit["location"]["file"].as_str().unwrap().contains('\n'), "{hit}");
    let findings = hit["redactions"].as_array().unwrap();
    assert!(findings.iter().all(|f| f["rule"] != "made-up" && !f["path"].as_str().unwrap().contains('\n')), "{hit}");
    let (_, view) = api.get(&format!("/agents/{id}")).await;
    assert_eq!(view["broker_dropped"]["unknown_rules"], 3, "{view}");
    broker.stop().await;
}

/// An agent that goes on sending from a location a `no_actions` rule has come to cover
/// (an honest one drops the action when told) has nothing of it kept: its hits and its
/// log lines are refused and counted, as a placement there would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_and_lines_from_a_location_a_no_actions_rule_came_to_cover_are_refused() {
    let broker = TestBroker::start().await;
    let (api, admin) = (broker.api(), broker.api_with(ADMIN_KEY));
    let id = "agt_stubborn1";
    let (mut agent, _) = RawAgent::registered(&broker, AGENT_KEY, id, "shop").await;
    agent.publish("src/vault.rs", 7, &["key"]).await;
    wait_source(&api, id, "src/vault.rs").await;
    let at = |extra: Value| {
        let mut body = json!({"agent_ids": [id], "file": "src/vault.rs", "line": 7});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, snap) = api.post("/actions", at(json!({"max_hits": 10}))).await;
    assert_eq!(status, 201, "{snap}");
    let snap = snap["action_id"].as_str().unwrap().to_owned();
    let (status, log) = api.post("/logs", at(json!({"template": "opened"}))).await;
    assert_eq!(status, 201, "{log}");
    let log = log["action_id"].as_str().unwrap().to_owned();
    agent.until("action_add").await;
    agent.until("action_add").await;
    let line = |seq: u64| json!({"action_id": log, "seq": seq, "time_ms": 1, "level": "info", "text": "opened"});
    let counts = |api: Api, snap: String, log: String| async move {
        let (_, s) = api.get(&format!("/actions/{snap}")).await;
        let (_, l) = api.get(&format!("/actions/{log}")).await;
        (s["hits"].as_u64().unwrap_or(0), l["lines"].as_u64().unwrap_or(0))
    };

    // Before the rule, what it sends is kept.
    agent.hit(&snap, "src/vault.rs", 7, 1).await;
    agent.send(json!({"type": "log_lines", "lines": [line(1)]})).await;
    eventually(Duration::from_secs(10), "the first hit and line kept", || {
        let (api, snap, log) = (api.clone(), snap.clone(), log.clone());
        async move { (counts(api, snap, log).await == (1, 1)).then_some(()) }
    })
    .await;
    let (status, r) = admin
        .put("/blocklist", json!({"rules": [{"name": "vault", "effect": "no_actions", "file": "src/vault.rs"}]}))
        .await;
    assert_eq!(status, 200, "{r}");

    // After it, the agent goes on as if it had not heard; nothing more is kept.
    agent.hit(&snap, "src/vault.rs", 7, 2).await;
    agent.send(json!({"type": "log_lines", "lines": [line(2), line(3)]})).await;
    let metrics = eventually(Duration::from_secs(10), "the hit and the lines refused", || {
        let http = reqwest::Client::new();
        let url = format!("http://{}/metrics", broker.addr);
        async move {
            let text = http.get(url).bearer_auth(API_KEY).send().await.ok()?.text().await.ok()?;
            let value = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            (value("periscope_hits_refused_total") == Some(1) && value("periscope_log_lines_refused_total") == Some(2))
                .then_some(text)
        }
    })
    .await;
    assert!(metrics.contains("periscope_hits_refused_total"), "{metrics}");
    assert_eq!(counts(api.clone(), snap.clone(), log.clone()).await, (1, 1), "nothing kept after the rule");
    let (_, me) = api.get(&format!("/agents/{id}")).await;
    assert_eq!(me["hits_refused"], 1, "{me}");
    broker.stop().await;
}
