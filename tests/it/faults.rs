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
        .post("/actions", json!({"agent_ids": [good.id()], "file": "faults.rs", "line": line, "max_hits": 50,
                                 "expire_seconds": 600}))
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
