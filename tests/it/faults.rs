//! Faults: agents that break the protocol in every way a network or a bug can, and
//! callers that wait in crowds and hang up, while agents come and go. Each is handled,
//! counted where an operator looks, and harms no one else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    AGENT_KEY, API_KEY, Api, RawAgent, TestAgent, TestBroker, eventually, test_config, wait_installed, wait_online,
};

fn fault_event(n: u64) {
    tracing::info!(n, "faults tick");
}

fn fault_line() -> u64 {
    let source = include_str!("faults.rs");
    source.lines().position(|l| l.contains("tracing::info!(n, \"faults tick\")")).unwrap() as u64 + 1
}

/// Runs `fault_event` every 20 ms on the agent until `stop`.
fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            fault_event(n);
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

async fn callsite(api: &Api) -> u64 {
    let line = fault_line();
    let api = api.clone();
    eventually(Duration::from_secs(20), "the faults callsite in the catalog", move || {
        let api = api.clone();
        async move {
            let (_, page) = api.get("/sources?file=faults.rs&limit=200").await;
            page["items"].as_array()?.iter().any(|s| s["line"] == line).then_some(line)
        }
    })
    .await
}

async fn hits(api: &Api, action: &str) -> u64 {
    api.get(&format!("/actions/{action}")).await.1["hits"].as_u64().unwrap_or(0)
}

async fn broker_dropped(api: &Api, agent: &str) -> Value {
    api.get(&format!("/agents/{agent}")).await.1["broker_dropped"].clone()
}

/// Writes the first bytes of a masked text frame that announces 1000 bytes of payload.
async fn half_a_frame(agent: RawAgent) -> tokio::net::TcpStream {
    let MaybeTlsStream::Plain(mut tcp) = agent.ws.into_inner() else { panic!("plain TCP") };
    let mut frame = vec![0x81, 0x80 | 126, 0x03, 0xE8, 1, 2, 3, 4];
    frame.extend_from_slice(b"{\"type\":\"h");
    tcp.write_all(&frame).await.unwrap();
    tcp.flush().await.unwrap();
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_break_the_protocol_are_handled_and_counted_and_never_slow_a_good_agent() {
    let mut config = test_config();
    config.agents.ping_interval_secs = 1;
    config.agents.ping_timeout_secs = 1;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let good = TestAgent::start(&broker.ws_url(), "faults", &[]);
    wait_online(&api, &good.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&good, Arc::clone(&stop));
    let line = callsite(&api).await;
    let (status, action) = api
        .post(
            "/actions",
            json!({"agent_ids": [good.id()], "file": "faults.rs", "line": line, "max_hits": 50,
                                 "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    wait_installed(&api, &id, &good.id()).await;
    let before = {
        let api = api.clone();
        let id = id.clone();
        eventually(Duration::from_secs(20), "a first hit", move || {
            let (api, id) = (api.clone(), id.clone());
            async move { Some(hits(&api, &id).await).filter(|&n| n >= 1) }
        })
        .await
    };

    // Binary frames: answered with an error each, the session survives, each counted.
    let (mut binary, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_faultbinary", "faults").await;
    for _ in 0..3 {
        binary.ws.send(Message::binary(vec![0u8, 159, 146, 150])).await.unwrap();
        let err = binary.until("error").await;
        assert_eq!(err["code"], "malformed_frame", "{err}");
        assert_eq!(err["fatal"], false, "{err}");
    }
    binary.send(json!({"type": "heartbeat", "hits_sent": 0})).await;
    // Half a frame, then gone: the session ends on the broken frame.
    let (vanish, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_faultvanish", "faults").await;
    drop(half_a_frame(vanish).await);
    // Half a frame, then silence: the rest never comes, nor an answer to a ping.
    let (stall, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_faultstall", "faults").await;
    let stalled = half_a_frame(stall).await;
    // Registered, then deaf: never reads, so never answers a ping.
    let (deaf, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_faultdeaf", "faults").await;
    // A flood of hit frames for an action it is not part of.
    let (mut flood, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_faultflood", "faults").await;
    let flooding = tokio::spawn(async move {
        for seq in 1..=5_000u64 {
            flood.hit("act_0000000000000000", "faults.rs", 1, seq).await;
        }
        flood
    });

    // Each is handled and counted where an operator looks.
    let offline = |agent: &'static str, counter: &'static str| {
        let api = api.clone();
        async move {
            eventually(Duration::from_secs(30), &format!("{agent} offline with {counter} counted"), move || {
                let api = api.clone();
                async move {
                    let (_, a) = api.get(&format!("/agents/{agent}")).await;
                    (a["status"] == "offline" && a["broker_dropped"][counter].as_u64()? >= 1).then_some(a)
                }
            })
            .await
        }
    };
    let vanished = offline("agt_faultvanish", "protocol_errors").await;
    let timed_out = offline("agt_faultstall", "ping_timeouts").await;
    assert!(timed_out["disconnect_reason"].as_str().unwrap().contains("ping"), "{timed_out}");
    let deafened = offline("agt_faultdeaf", "ping_timeouts").await;
    assert!(deafened["disconnect_reason"].as_str().unwrap().contains("ping"), "{deafened}");
    let flood = flooding.await.unwrap();
    let flooded = eventually(Duration::from_secs(30), "the flood dropped and counted", || {
        let api = api.clone();
        async move {
            let d = broker_dropped(&api, "agt_faultflood").await;
            (d["hits_rate"].as_u64()? + d["bytes_rate"].as_u64()? + d["bad_frames"].as_u64()? > 0).then_some(d)
        }
    })
    .await;
    assert_eq!(broker_dropped(&api, "agt_faultbinary").await["bad_frames"], 3);
    let (_, binary_view) = api.get("/agents/agt_faultbinary").await;
    // Binary frames alone do not end a session (this one stops reading, so in the end
    // it is closed for its silence, not for the frames).
    let reason = binary_view["disconnect_reason"].as_str().unwrap_or("still online");
    assert!(reason == "still online" || reason.contains("ping"), "{binary_view}");
    let metrics = api
        .client
        .get(format!("{}/metrics", broker.http()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (agent, reason) in [
        ("agt_faultbinary", "bad_frame"),
        ("agt_faultvanish", "protocol_error"),
        ("agt_faultstall", "ping_timeout"),
        ("agt_faultdeaf", "ping_timeout"),
    ] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("periscope_broker_dropped_total")
                    && l.contains(&format!("agent=\"{agent}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no {reason} line for {agent} in /metrics"));
        assert!(!line.ends_with(" 0"), "{line}");
    }

    // The good agent kept delivering throughout, and nothing was charged to it.
    let after = hits(&api, &id).await;
    assert!(after > before, "the good agent's hits stopped: {before} then {after}");
    let later = {
        let api = api.clone();
        let id = id.clone();
        eventually(Duration::from_secs(20), "more hits from the good agent", move || {
            let (api, id) = (api.clone(), id.clone());
            async move { Some(hits(&api, &id).await).filter(|&n| n > after) }
        })
        .await
    };
    assert!(later > after);
    let (_, good_view) = api.get(&format!("/agents/{}", good.id())).await;
    assert_eq!(good_view["status"], "online", "{good_view}");
    let zero = good_view["broker_dropped"].as_object().unwrap().iter().all(|(_, v)| v == 0);
    assert!(zero, "the good agent was charged for others' faults: {good_view}");
    assert!(vanished["disconnect_reason"].is_string(), "{vanished}");
    eprintln!("flood counted: {flooded}");

    drop((stalled, deaf, flood, binary));
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    good.shutdown();
    broker.stop().await;
}

const WAITER_KEY: &str = "test-waiter-key-0123456789";
const WAITS: u32 = 16;

async fn health(api: &Api) -> Value {
    let (status, h) = api.get("/health").await;
    assert_eq!(status, 200, "{h}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowds_of_waiting_callers_that_hang_up_while_agents_come_and_go_leak_no_wait_or_slot() {
    use periscope_broker::config::ApiKeyConfig;
    use periscope_broker::quota::CallerQuotaOverrides;
    let mut config = test_config();
    config.api_keys.push(ApiKeyConfig {
        quotas: Some(CallerQuotaOverrides {
            concurrent_waits: Some(WAITS),
            ..crate::support::polling_quotas().unwrap()
        }),
        ..ApiKeyConfig::new("waiter", WAITER_KEY)
    });
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api_with(WAITER_KEY);
    let stop = Arc::new(AtomicBool::new(false));
    let first = TestAgent::start(&broker.ws_url(), "waits", &[]);
    let second = TestAgent::start(&broker.ws_url(), "waits", &[]);
    wait_online(&api, &first.id()).await;
    wait_online(&api, &second.id()).await;
    let mut work = vec![workload(&first, Arc::clone(&stop)), workload(&second, Arc::clone(&stop))];
    let line = callsite(&api).await;
    let place = |body: Value| {
        let api = api.clone();
        async move {
            let (status, a) = api.post("/actions", body).await;
            assert_eq!(status, 201, "{a}");
            a["action_id"].as_str().unwrap().to_owned()
        }
    };
    // An agent of the late pool makes the pool known, then leaves.
    let early = TestAgent::start(&broker.ws_url(), "waits-late", &[]);
    wait_online(&api, &early.id()).await;
    // One action many wait on, two only a late agent (gone now) will serve.
    let shared = place(json!({"pool": "waits", "file": "faults.rs", "line": line, "max_hits": 50,
                              "expire_seconds": 600}))
    .await;
    let late: Vec<String> = vec![
        place(json!({"pool": "waits-late", "file": "faults.rs", "line": line, "max_hits": 50,
                     "expire_seconds": 600, "allow_pending": true}))
        .await,
        place(json!({"pool": "waits-late", "file": "faults.rs", "line": line, "max_hits": 50,
                     "expire_seconds": 600, "allow_pending": true}))
        .await,
    ];

    early.shutdown();
    let mut tasks = tokio::task::JoinSet::new();
    // REST callers waiting on the shared action and on the late ones.
    for i in 0..10 {
        let api = api.clone();
        let action = if i < 6 { shared.clone() } else { late[i % 2].clone() };
        tasks.spawn(async move {
            let (status, page) = api.get(&format!("/actions/{action}/hits?since=0&wait_seconds=3")).await;
            assert!(status == 200 || status == 429, "{status} {page}");
        });
    }
    // REST callers that hang up mid-wait.
    for i in 0..4 {
        let api = api.clone();
        let action = if i % 2 == 0 { shared.clone() } else { late[0].clone() };
        tasks.spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
            let r = client
                .get(format!("{}/actions/{action}/hits?since=100&wait_seconds=30", api.base))
                .bearer_auth(&api.key)
                .send()
                .await;
            assert!(r.is_err() || r.is_ok_and(|r| r.status() == 429), "the caller hung up before an answer");
        });
    }
    // MCP callers waiting, and one that hangs up mid-wait.
    for i in 0..3 {
        let broker_http = broker.http();
        let action = if i == 0 { shared.clone() } else { late[1].clone() };
        tasks.spawn(async move {
            let client = crate::mcp::connect_to(&broker_http, WAITER_KEY).await.expect("MCP connects");
            let call = crate::mcp::try_call(&client, "get_action", json!({"action_id": action, "since": 100,
                                                                           "wait_seconds": if i == 2 { 30 } else { 3 }}));
            if i == 2 {
                // Hang up: the call is abandoned and the client closed under it.
                let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
                let _ = client.cancel().await;
            } else {
                let result = call.await.expect("a tool result");
                let code = crate::mcp::code(&result);
                assert!(code.is_none() || code.as_deref() == Some("quota_exceeded"), "{code:?}");
                let _ = client.cancel().await;
            }
        });
    }
    // The waits are really held (the test would prove nothing otherwise)...
    {
        let api = api.clone();
        eventually(Duration::from_secs(10), "waits in progress", move || {
            let api = api.clone();
            async move { (health(&api).await["quotas"]["concurrent_waits"]["in_use"].as_u64()? > 0).then_some(()) }
        })
        .await;
    }
    // ...while agents come and go: one leaves, a late one arrives and serves the late
    // actions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in work.drain(..) {
        w.join().unwrap();
    }
    first.shutdown();
    stop.store(false, Ordering::Relaxed);
    work.push(workload(&second, Arc::clone(&stop)));
    let newcomer = TestAgent::start(&broker.ws_url(), "waits-late", &[]);
    work.push(workload(&newcomer, Arc::clone(&stop)));
    wait_online(&api, &newcomer.id()).await;
    wait_installed(&api, &late[0], &newcomer.id()).await;
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    // No wait outlives its caller, and every live action is counted once.
    let h = {
        let api = api.clone();
        eventually(Duration::from_secs(20), "every wait slot back", move || {
            let api = api.clone();
            async move {
                let h = health(&api).await;
                (h["quotas"]["concurrent_waits"]["in_use"] == 0).then_some(h)
            }
        })
        .await
    };
    assert_eq!(h["quotas"]["concurrent_waits"]["remaining"], WAITS, "{h}");
    assert_eq!(h["quotas"]["live_actions"]["used"], 3, "{h}");
    // The whole quota is usable again: as many waits at once as the key may hold.
    let mut again = tokio::task::JoinSet::new();
    for _ in 0..WAITS {
        let api = api.clone();
        let action = late[1].clone();
        again.spawn(async move { api.get(&format!("/actions/{action}/hits?since=100000&wait_seconds=1")).await.0 });
    }
    while let Some(status) = again.join_next().await {
        assert_eq!(status.unwrap(), 200, "a wait refused after the storm: a slot leaked");
    }
    for action in std::iter::once(&shared).chain(&late) {
        assert_eq!(api.delete(&format!("/actions/{action}")).await.0, 200);
    }
    let h = health(&api).await;
    assert_eq!(h["quotas"]["live_actions"]["used"], 0, "{h}");
    assert_eq!(h["quotas"]["concurrent_waits"]["in_use"], 0, "{h}");

    stop.store(true, Ordering::Relaxed);
    for w in work {
        w.join().unwrap();
    }
    second.shutdown();
    newcomer.shutdown();
    broker.stop().await;
}
