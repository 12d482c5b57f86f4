//! Bad agents get specific errors, and the broker keeps serving the good ones.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{AGENT_KEY, TestAgent, TestBroker, eventually, test_config, wait_online};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, key: Option<&str>) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    if let Some(key) = key {
        req.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

fn registration(version: u32, agent_id: &str) -> Value {
    json!({
        "type": "register", "protocol_version": version, "agent_id": agent_id, "display_name": "raw",
        "pool": "raw", "tags": [], "service": "raw", "language": "test", "agent_version": "0"
    })
}

/// The next text frame as JSON (skipping pings), or None when the socket closed.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s") {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agents_get_specific_errors_and_good_agents_keep_working() {
    let mut config = test_config();
    config.agents.registration_timeout_secs = 1;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let good = TestAgent::start(&broker.ws_url(), "good", &[]);
    wait_online(&api, &good.id()).await;

    // No agent key: refused before the upgrade with a JSON body.
    match connect(&broker.ws_url(), None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
            assert!(body["error"]["message"].as_str().unwrap().contains("agent key"));
        }
        other => panic!("expected HTTP 401, got {:?}", other.map(|_| ())),
    }
    // A wrong agent key too.
    assert!(matches!(
        connect(&broker.ws_url(), Some("not-the-key-at-all-000")).await,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401
    ));

    // Wrong protocol version: the error says which versions the broker speaks.
    let mut ws = connect(&broker.ws_url(), Some(AGENT_KEY)).await.unwrap();
    ws.send(Message::text(registration(99, "agt_rawversion").to_string())).await.unwrap();
    let err = next_json(&mut ws).await.unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "unsupported_version");
    assert_eq!(err["supported_versions"], json!([1]));
    assert!(err["message"].as_str().unwrap().contains("speaks 1"), "{err}");
    assert!(next_json(&mut ws).await.is_none(), "closed after a fatal error");

    // A registration that is not JSON at all.
    let mut ws = connect(&broker.ws_url(), Some(AGENT_KEY)).await.unwrap();
    ws.send(Message::text("{not json")).await.unwrap();
    let err = next_json(&mut ws).await.unwrap();
    assert_eq!(err["code"], "malformed_frame");
    assert!(err["message"].as_str().unwrap().contains("line 1"), "{err}");

    // Silence: closed after the registration timeout.
    let mut ws = connect(&broker.ws_url(), Some(AGENT_KEY)).await.unwrap();
    let err = next_json(&mut ws).await.unwrap();
    assert_eq!(err["code"], "registration_timeout");

    // Registered, then malformed frames: each named, the session survives them.
    let mut ws = connect(&broker.ws_url(), Some(AGENT_KEY)).await.unwrap();
    ws.send(Message::text(registration(1, "agt_rawgood").to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "registered");
    let rules = next_json(&mut ws).await.unwrap();
    assert_eq!(rules["type"], "redaction_rules", "{rules}");
    let blocklist = next_json(&mut ws).await.unwrap();
    assert_eq!(blocklist["type"], "blocklist", "{blocklist}");
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "action_sync");
    ws.send(Message::text(r#"{"type":"hit","action_id":"agt_wrongkind"}"#)).await.unwrap();
    let err = next_json(&mut ws).await.unwrap();
    assert_eq!(err["code"], "malformed_frame");
    assert_eq!(err["fatal"], false);
    assert!(err["message"].as_str().unwrap().contains("act_"), "{err}");
    ws.send(Message::text(r#"{"type":"teleport"}"#)).await.unwrap();
    let err = next_json(&mut ws).await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("teleport"), "{err}");
    ws.send(Message::text(r#"{"type":"heartbeat","hits_sent":1}"#)).await.unwrap();
    let (_, agent) = api.get("/agents/agt_rawgood").await;
    assert_eq!(agent["status"], "online");

    // An oversized frame: refused with its own code, then closed.
    ws.send(Message::text(format!(r#"{{"type":"goodbye","reason":"{}"}}"#, "x".repeat(2 * 1024 * 1024)))).await.ok();
    match next_json(&mut ws).await {
        Some(err) => assert_eq!(err["code"], "frame_too_large", "{err}"),
        None => {
            // The broker may close before our write completes; the reason is recorded.
            let (_, agent) = api.get("/agents/agt_rawgood").await;
            assert!(agent["disconnect_reason"].as_str().unwrap().contains("limit"), "{agent}");
        }
    }

    // The good agent was never disturbed.
    let (_, agent) = api.get(&format!("/agents/{}", good.id())).await;
    assert_eq!(agent["status"], "online");
    good.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_refuses_calls_without_a_valid_key() {
    let broker = TestBroker::start().await;
    let client = reqwest::Client::new();
    let resp = client.get(format!("{}/api/v1/agents", broker.http())).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer resource_metadata=\""), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let resp = client.get(format!("{}/api/v1/agents", broker.http())).bearer_auth("wrong-key-0000000000").send().await;
    assert_eq!(resp.unwrap().status(), 401);
    let resp = client.get(format!("{}/healthz", broker.http())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_at_its_agent_limit_forgets_offline_agents_first_then_refuses() {
    let mut config = test_config();
    config.agents.max_agents_per_org = 2;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let register = |id: &'static str| {
        let url = broker.ws_url();
        async move {
            let mut ws = connect(&url, Some(AGENT_KEY)).await.unwrap();
            ws.send(Message::text(registration(1, id).to_string())).await.unwrap();
            let first = next_json(&mut ws).await.unwrap();
            (ws, first)
        }
    };
    let (mut a, first) = register("agt_limita").await;
    assert_eq!(first["type"], "registered");
    let (_b, first) = register("agt_limitb").await;
    assert_eq!(first["type"], "registered");
    // Full, and everyone is online: refused, with the reason and the setting to change.
    let (_c, first) = register("agt_limitc").await;
    assert_eq!(first["code"], "rate_limited", "{first}");
    assert!(first["message"].as_str().unwrap().contains("max_agents_per_org"), "{first}");
    // One goes away: the next one takes its place.
    a.close(None).await.unwrap();
    let api = broker.api();
    eventually(Duration::from_secs(10), "agent a offline", || {
        let api = api.clone();
        async move {
            let (_, v) = api.get("/agents/agt_limita").await;
            (v["status"] == "offline").then_some(())
        }
    })
    .await;
    let (_d, first) = register("agt_limitd").await;
    assert_eq!(first["type"], "registered", "{first}");
    let (status, _) = api.get("/agents/agt_limita").await;
    assert_eq!(status, 404, "the agent offline the longest was forgotten");
    broker.stop().await;
}
