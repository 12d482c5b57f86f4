//! Quotas nobody can bypass: each one exceeded, reported (error code, status,
//! `Retry-After`, pause reason, `/metrics`), and recovered. Calls per minute, concurrent
//! waits and live actions per key; hits and bytes per agent at the broker (a flooding
//! agent is throttled, warned, then disconnected while a real agent keeps working); hit
//! rate per action at the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use periscope_broker::config::ApiKeyConfig;
use periscope_broker::quota::CallerQuotaOverrides;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::mcp::{body, call, code, connect_with, text};
use crate::support::{
    ADMIN_KEY, AGENT_KEY, TestAgent, TestBroker, audit, eventually, test_config, wait_action, wait_online,
};

const TIGHT_KEY: &str = "tight-key-0123456789abcdef";
const WAITER_KEY: &str = "waiter-key-0123456789abcdef";

fn key(name: &str, secret: &str, quotas: CallerQuotaOverrides) -> ApiKeyConfig {
    ApiKeyConfig { quotas: Some(quotas), ..ApiKeyConfig::new(name, secret) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_a_keys_rate_are_refused_with_when_to_retry_and_then_work_again() {
    let mut config = test_config();
    // Two calls a second, five at once.
    config.api_keys.push(key(
        "tight",
        TIGHT_KEY,
        CallerQuotaOverrides { calls_per_minute: Some(120), call_burst: Some(5), ..Default::default() },
    ));
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let tight = broker.api_with(TIGHT_KEY);
    for _ in 0..5 {
        assert_eq!(tight.get("/agents").await.0, 200);
    }
    let resp = tight.client.get(format!("{}/agents", tight.base)).bearer_auth(TIGHT_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "quota_exceeded");
    assert_eq!(err["error"]["details"]["quota"], "calls_per_minute");
    assert_eq!(err["error"]["details"]["retry_after_seconds"], retry);
    assert!((1..=2).contains(&retry), "{retry}");
    // No header or parameter switches it off.
    let resp = tight
        .client
        .get(format!("{}/agents?quota=off", tight.base))
        .bearer_auth(TIGHT_KEY)
        .header("x-periscope-quota", "off")
        .send()
        .await
        .unwrap();
    assert!(resp.status() == 429 || resp.status() == 400, "{}", resp.status());
    // Recovered after the time it said.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(tight.get("/agents").await.0, 200);

    // Over MCP the same budget; a tool call over it is a tool result a model can read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let health = broker.api_with(TIGHT_KEY).get("/health").await.1;
    assert_eq!(health["quotas"]["calls_per_minute"]["remaining"], 4, "refilled, less this call: {health}");
    let client = connect_with(&broker, TIGHT_KEY).await.expect("the handshake fits in the burst");
    let mut refused = None;
    for _ in 0..10 {
        let r = call(&client, "list_agents", json!({})).await;
        if code(&r).is_some() {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the budget runs out within 10 calls");
    assert_eq!(code(&r).as_deref(), Some("quota_exceeded"), "{}", text(&r));
    let retry = body(&r)["error"]["details"]["retry_after_seconds"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let health = call(&client, "system_health", json!({})).await;
    assert_eq!(code(&health), None, "{}", text(&health));
    let q = &body(&health)["quotas"]["calls_per_minute"];
    assert_eq!((q["limit_per_minute"].as_u64(), q["burst"].as_u64()), (Some(120), Some(5)), "{q}");
    assert!(q["remaining"].as_u64().unwrap() < 5, "{q}");
    client.cancel().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_beyond_a_keys_limit_are_refused_until_one_ends() {
    let mut config = test_config();
    config.api_keys.push(key(
        "waiter",
        WAITER_KEY,
        CallerQuotaOverrides {
            concurrent_waits: Some(1),
            live_actions: Some(2),
            calls_per_minute: Some(6_000),
            call_burst: Some(1_000),
            ..Default::default()
        },
    ));
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let waiter = broker.api_with(WAITER_KEY);
    let agent = TestAgent::start(&broker.ws_url(), "waits", &[]);
    wait_online(&waiter, &agent.id()).await;
    // Code that never runs: the action waits for nothing.
    let pending = json!({"pool": "waits", "file": "it/quotas.rs", "line": 1, "allow_pending": true});
    let (status, a) = waiter.post("/actions", pending.clone()).await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();

    let long_poll = {
        let (waiter, id) = (waiter.clone(), id.clone());
        tokio::spawn(async move { waiter.get(&format!("/actions/{id}/hits?wait_seconds=60")).await })
    };
    {
        let waiter = waiter.clone();
        eventually(Duration::from_secs(10), "the long poll to hold its slot", move || {
            let waiter = waiter.clone();
            async move {
                let (_, h) = waiter.get("/health").await;
                (h["quotas"]["concurrent_waits"]["in_use"] == 1).then_some(())
            }
        })
        .await;
    }
    let (status, err) = waiter.get(&format!("/actions/{id}/hits?wait_seconds=1")).await;
    assert_eq!(status, 429, "{err}");
    let resp = waiter
        .client
        .get(format!("{}/actions/{id}/lines?wait_seconds=5", waiter.base))
        .bearer_auth(WAITER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["details"]["quota"], "concurrent_waits", "{err}");
    assert!(err["error"]["details"]["retry_after_seconds"].as_u64().unwrap() > 1, "{err}");
    // A waiting place_snapshot counts too, and is refused before anything is placed.
    let client = connect_with(&broker, WAITER_KEY).await.unwrap();
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "waits", "file": "it/quotas.rs", "line": 1,
                                                  "allow_pending": true, "timeout_seconds": 30}),
    )
    .await;
    assert_eq!(code(&r).as_deref(), Some("quota_exceeded"), "{}", text(&r));
    assert_eq!(body(&r)["error"]["details"]["quota"], "concurrent_waits");
    let h = body(&call(&client, "system_health", json!({})).await);
    assert_eq!(h["quotas"]["concurrent_waits"]["in_use"], 1, "{h}");
    assert_eq!(h["quotas"]["live_actions"]["used"], 1, "the refused snapshot was not placed: {h}");

    // Live actions: this key may hold two.
    let (status, _) = waiter.post("/actions", pending.clone()).await;
    assert_eq!(status, 201);
    let (status, err) = waiter.post("/actions", pending.clone()).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(err["error"]["details"]["quota"], "live_actions");
    assert_eq!(err["error"]["details"]["limit"], 2);

    // Removing the action ends the long poll, which frees the slot; and a live action.
    assert_eq!(waiter.delete(&format!("/actions/{id}")).await.0, 200);
    let (status, _) = long_poll.await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = waiter.get(&format!("/actions/{id}/hits?wait_seconds=1")).await;
    assert_eq!(status, 200, "the slot is free again");
    assert_eq!(waiter.post("/actions", pending).await.0, 201, "a live-action slot is free again");
    client.cancel().await.unwrap();
    agent.shutdown();
    broker.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw_agent(broker: &TestBroker, agent_id: &str, pool: &str) -> Ws {
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse().unwrap());
    let (mut ws, _): (Ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let register = json!({"type": "register", "protocol_version": 1, "agent_id": agent_id, "display_name": agent_id,
                          "pool": pool, "tags": [], "service": "raw", "language": "test", "agent_version": "0"});
    ws.send(Message::text(register.to_string())).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"action_sync""#) => return ws,
            Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"error""#) => panic!("refused: {t}"),
            Some(Ok(_)) => {}
            other => panic!("no registration: {other:?}"),
        }
    }
}

fn hit(action_id: &str, line: u64, seq: u64) -> String {
    json!({"type": "hit", "action_id": action_id, "seq": seq, "time_ms": 1,
           "location": {"file": "it/quotas.rs", "line": line},
           "fields": {"n": {"type": "int", "value": seq}}})
    .to_string()
}

#[tracing::instrument]
fn steady(n: u64) {
    tracing::info!(steady_marker = n, "quota steady work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_throttled_warned_then_disconnected_while_a_real_agent_keeps_working() {
    let mut config = test_config();
    // The broker accepts 5 hits/s from an agent (and agents hold themselves to that).
    config.ingest.agent_hits_per_sec = 5.0;
    config.quotas.snapshot_hits_per_sec = 5.0;
    config.ingest.burst_factor = 2.0;
    config.ingest.flood_warnings = 2;
    config.ingest.flood_cooldown_secs = 60;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let real = TestAgent::start(&broker.ws_url(), "flood", &[]);
    wait_online(&api, &real.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let stop = Arc::clone(&stop);
        real.run(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                steady(n);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let line = {
        let api = api.clone();
        eventually(Duration::from_secs(10), "the callsite", move || {
            let api = api.clone();
            async move { api.find_source("it/quotas.rs", "steady_marker").await }
        })
        .await["line"]
            .as_u64()
            .unwrap()
    };
    let mut flood = raw_agent(&broker, "agt_flooder", "flood").await;
    let (status, a) = api
        .post(
            "/actions",
            json!({"pool": "flood", "file": "it/quotas.rs", "line": line, "max_hits": 50, "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();

    // Flood: 25 hit frames every 100 ms until the broker hangs up.
    let (mut warnings, mut fatal) = (0, None);
    let mut note = |frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>| -> bool {
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "error" && v["code"] == "rate_limited" {
                    if v["fatal"] == true {
                        fatal = Some(v);
                    } else {
                        warnings += 1;
                    }
                }
                true
            }
            Some(Ok(_)) => true,
            _ => false,
        }
    };
    let started = std::time::Instant::now();
    let mut seq = 0;
    'flood: while started.elapsed() < Duration::from_secs(30) {
        for _ in 0..25 {
            seq += 1;
            if flood.send(Message::text(hit(&id, line, seq))).await.is_err() {
                break 'flood;
            }
        }
        while let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), flood.next()).await {
            if !note(frame) {
                break 'flood;
            }
        }
    }
    // Whatever the broker said before hanging up is still to be read.
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(2), flood.next()).await {
        if !note(frame) {
            break;
        }
    }
    let (_, dbg) = api.get("/agents/agt_flooder").await;
    let fatal = fatal.unwrap_or_else(|| panic!("disconnected for flooding: {warnings} warnings, {seq} sent, {dbg}"));
    assert_eq!(warnings, 2, "warned before being disconnected");
    assert!(fatal["message"].as_str().unwrap().contains("disconnected"), "{fatal}");

    let (_, flooder) = api.get("/agents/agt_flooder").await;
    assert_eq!(flooder["status"], "offline", "{flooder}");
    assert!(flooder["disconnect_reason"].as_str().unwrap().contains("flooding"), "{flooder}");
    let dropped = &flooder["broker_dropped"];
    assert!(dropped["hits_rate"].as_u64().unwrap() > 0 && dropped["warnings"] == 2, "{flooder}");
    // Refused while cooling down.
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse().unwrap());
    let (mut again, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let register = json!({"type": "register", "protocol_version": 1, "agent_id": "agt_flooder", "display_name": "x",
                          "pool": "flood", "tags": [], "service": "raw", "language": "test", "agent_version": "0"});
    again.send(Message::text(register.to_string())).await.unwrap();
    let refusal = loop {
        match again.next().await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((refusal["code"].as_str(), refusal["fatal"].as_bool()), (Some("rate_limited"), Some(true)), "{refusal}");

    // The real agent never noticed: online, and its hits still arrive.
    let (_, real_view) = api.get(&format!("/agents/{}", real.id())).await;
    assert_eq!(real_view["status"], "online");
    let hits_now = api.get(&format!("/actions/{id}")).await.1["hits"].as_u64().unwrap();
    let real_id = real.id();
    wait_action(&api, &id, "more hits from the real agent", move |a| a["hits"].as_u64().unwrap_or(0) > hits_now + 1)
        .await;
    let (_, page) = api.get(&format!("/actions/{id}/hits?limit=200")).await;
    assert!(page["hits"].as_array().unwrap().iter().any(|h| h["agent_id"] == real_id.as_str()));

    // Reported: /metrics and the audit trail.
    let metrics = api.client.get(format!("{}/metrics", broker.http())).bearer_auth(&api.key).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let dropped_line = metrics
        .lines()
        .find(|l| l.starts_with("periscope_broker_dropped_total{agent=\"agt_flooder\"") && l.contains("hits_rate"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!dropped_line.ends_with(" 0"), "{dropped_line}");
    let admin = broker.api_with(ADMIN_KEY);
    let flooding = audit(&admin, "&kind=agent_flooding").await;
    assert!(flooding.iter().any(|e| e["actor"]["id"] == "agt_flooder"), "{flooding:?}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    real.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_holds_an_action_to_its_hit_rate_even_when_the_agent_does_not() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let mut raw = raw_agent(&broker, "agt_eager", "eager").await;
    let (status, a) = api
        .post(
            "/actions",
            json!({"agent_ids": ["agt_eager"], "file": "it/quotas.rs", "line": 7, "max_hits": 10,
                                 "allow_pending": true}),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let id = a["action_id"].as_str().unwrap().to_owned();
    // Ten hits at once: the action takes 1 a second (burst 2) whatever the agent does.
    for seq in 1..=10 {
        raw.send(Message::text(hit(&id, 7, seq))).await.unwrap();
    }
    let action = wait_action(&api, &id, "the broker's drops", |a| {
        a["quota"]["broker_dropped"]["snapshot_rate"].as_u64().unwrap_or(0) + a["hits"].as_u64().unwrap_or(0) >= 10
    })
    .await;
    let stored = action["hits"].as_u64().unwrap();
    assert!((1..=3).contains(&stored), "{stored} stored of 10 sent at once: {action}");
    assert_eq!(action["quota"]["hits_remaining"].as_u64().unwrap(), 10 - stored);
    let pause = &action["quota"]["paused"][0];
    assert_eq!((pause["reason"].as_str(), pause["by"].as_str()), (Some("rate_limited"), Some("broker")), "{action}");
    // Reported to the caller: system_health lists the pause; the audit trail has one
    // entry for the episode, not one per dropped hit.
    let client = connect_with(&broker, crate::support::API_KEY).await.unwrap();
    let h = body(&call(&client, "system_health", json!({})).await);
    assert!(h["paused_actions"].as_array().unwrap().iter().any(|p| p["action_id"] == id.as_str()), "{h}");
    client.cancel().await.unwrap();
    let admin = broker.api_with(ADMIN_KEY);
    let pauses = audit(&admin, &format!("&kind=action_paused&action_id={id}")).await;
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!(pauses[0]["data"]["reason"], "rate_limited");
    // Recovered: a second later the next hit is taken.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    raw.send(Message::text(hit(&id, 7, 11))).await.unwrap();
    wait_action(&api, &id, "a hit after the pause", move |a| a["hits"].as_u64().unwrap_or(0) > stored).await;
    let (_, agent) = api.get("/agents/agt_eager").await;
    assert!(agent["broker_dropped"]["action_rate"].as_u64().unwrap() >= 1, "{agent}");
    broker.stop().await;
}
