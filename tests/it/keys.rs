//! Keys over their life: created and shown once, used over REST and MCP, revoked (the
//! next call fails), expired, agent keys bound to pools, and everything still there
//! after a restart on the same data directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::mcp::{call, code, connect_with, try_call};
use crate::support::{
    ADMIN_KEY, TestAgent, TestBroker, audit, create_key, eventually, temp_dir, test_config, wait_online,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_fails_on_its_very_next_call_over_rest_and_mcp() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (secret, key_id) = create_key(&admin, json!({"name": "alice"})).await;
    assert!(secret.starts_with("psk_") && secret.len() >= 36, "{secret}");
    // Shown once: listings never carry a secret.
    let (_, keys) = admin.get("/keys?include_revoked=true").await;
    assert!(!keys.to_string().contains(&secret));
    assert!(
        keys["items"].as_array().unwrap().iter().any(|k| k["key_id"] == key_id.as_str() && k["status"] == "active")
    );

    let alice = broker.api_with(&secret);
    assert_eq!(alice.get("/agents").await.0, 200);
    let client = connect_with(&broker, &secret).await.unwrap();
    assert_eq!(code(&call(&client, "list_agents", json!({})).await), None);

    let (status, revoked) = admin.delete(&format!("/keys/{key_id}")).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["revoked_by"], "admin");

    let resp = alice.client.get(format!("{}/agents", alice.base)).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer resource_metadata="));
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    // The open MCP session is refused on its next call too.
    assert!(try_call(&client, "list_agents", json!({})).await.is_err(), "the next MCP call fails");
    // Missing and wrong keys: 401.
    let anonymous = reqwest::Client::new().get(format!("{}/agents", alice.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(broker.api_with("psk_nothing_like_a_real_key_000000").get("/agents").await.0, 401);

    let entries = audit(&admin, "&kind=key_revoked").await;
    assert!(entries.iter().any(|e| e["target"]["key_id"] == key_id.as_str() && e["actor"]["name"] == "admin"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_refused() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (secret, key_id) = create_key(&admin, json!({"name": "temp", "expires_in_seconds": 1})).await;
    let temp = broker.api_with(&secret);
    let (status, _) = temp.get("/agents").await;
    assert_eq!(status, 200, "works until it expires");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, body) = temp.get("/agents").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
    let (_, k) = admin.get(&format!("/keys/{key_id}")).await;
    assert_eq!(k["status"], "expired", "{k}");
    // An expiry in the past is refused at creation.
    let (status, _) = admin.post("/keys", json!({"name": "x", "expires_at_ms": 1})).await;
    assert_eq!(status, 400);
    broker.stop().await;
}

/// Sends a raw registration with `key`; returns the first frame back.
async fn register_raw(broker: &TestBroker, key: &str, agent_id: &str, pool: &str) -> Result<Value, u16> {
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => return Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    };
    let register = json!({"type": "register", "protocol_version": 1, "agent_id": agent_id, "display_name": "raw",
                          "pool": pool, "tags": [], "service": "raw", "language": "test", "agent_version": "0"});
    ws.send(Message::text(register.to_string())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer") {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(_)) => {}
            other => panic!("closed without an answer: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_key_registers_only_into_its_pools_and_stops_working_when_revoked() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (agent_key, agent_key_id) =
        create_key(&admin, json!({"kind": "agent", "name": "checkout agents", "pools": ["checkout"]})).await;
    assert!(agent_key.starts_with("pak_"), "{agent_key}");
    // An agent key is not an API key, and the other way round.
    assert_eq!(broker.api_with(&agent_key).get("/agents").await.0, 401);
    assert_eq!(register_raw(&broker, ADMIN_KEY, "agt_notanagentkey", "checkout").await.unwrap_err(), 401);

    let refused = register_raw(&broker, &agent_key, "agt_wrongpool", "payments").await.unwrap();
    assert_eq!((refused["code"].as_str(), refused["fatal"].as_bool()), (Some("unauthorized"), Some(true)), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("payments"));
    let misuse = audit(&admin, "&kind=agent_refused").await;
    assert!(
        misuse.iter().any(|e| e["actor"]["id"] == "agt_wrongpool" && e["actor"]["key_id"] == agent_key_id.as_str()),
        "{misuse:?}"
    );

    let agent = TestAgent::start_with_key(&broker.ws_url(), &agent_key, "checkout", &[]);
    wait_online(&admin, &agent.id()).await;
    // Another process cannot take over the id of an online agent.
    let taken = register_raw(&broker, &agent_key, &agent.id(), "checkout").await.unwrap();
    assert_eq!(taken["code"], "duplicate_agent", "{taken}");
    assert!(
        audit(&admin, "&kind=agent_impersonation").await.iter().any(|e| e["target"]["agent_id"] == agent.id().as_str())
    );

    // Revoking the key ends the live session and refuses new ones.
    assert_eq!(admin.delete(&format!("/keys/{agent_key_id}")).await.0, 200);
    let id = agent.id();
    let api = admin.clone();
    eventually(Duration::from_secs(10), "the agent's session to end", move || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let (_, a) = api.get(&format!("/agents/{id}")).await;
            (a["status"] == "offline" && a["disconnect_reason"].as_str().unwrap_or("").contains("revoked"))
                .then_some(())
        }
    })
    .await;
    assert_eq!(register_raw(&broker, &agent_key, "agt_afterwards", "checkout").await.unwrap_err(), 401);
    agent.shutdown();
    broker.stop().await;
}

#[tracing::instrument]
fn restart_work(n: u64) {
    tracing::info!(restart_marker = n, "keys restart work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_data_directory_keeps_keys_agent_keys_actions_hits_and_audit() {
    let data_dir = temp_dir("restart");
    let mut config = test_config();
    config.data_dir = Some(data_dir.clone());
    let broker = TestBroker::start_with(config.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = broker.addr;
    let admin = broker.api_with(ADMIN_KEY);
    let (dev, dev_id) = create_key(&admin, json!({"name": "dev"})).await;
    let (gone, gone_id) = create_key(&admin, json!({"name": "gone"})).await;
    assert_eq!(admin.delete(&format!("/keys/{gone_id}")).await.0, 200);
    let (agent_key, _) =
        create_key(&admin, json!({"kind": "agent", "name": "restart agents", "pools": ["restart"]})).await;
    let (status, _) = admin.post("/groups", json!({"name": "ops"})).await;
    assert_eq!(status, 201);
    assert_eq!(admin.put("/pools/restart", json!({"group": "ops"})).await.0, 200);

    let agent = TestAgent::start_with_key(&broker.ws_url(), &agent_key, "restart", &[]);
    let dev_api = broker.api_with(&dev);
    wait_online(&dev_api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let stop = Arc::clone(&stop);
        agent.run(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                restart_work(n);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let source = {
        let api = dev_api.clone();
        eventually(Duration::from_secs(10), "the callsite", move || {
            let api = api.clone();
            async move { api.find_source("it/keys.rs", "restart_marker").await }
        })
        .await
    };
    let (status, action) = dev_api
        .post("/actions", json!({"pool": "restart", "file": "it/keys.rs", "line": source["line"], "max_hits": 2}))
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    let (_, page) = dev_api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    assert!(!page["hits"].as_array().unwrap().is_empty(), "{page}");
    let before = audit(&admin, "").await.len();
    broker.stop().await;

    let broker = TestBroker::start_with(config, addr).await;
    let admin = broker.api_with(ADMIN_KEY);
    let dev_api = broker.api_with(&dev);
    // Keys: the created one works, the revoked one stays revoked.
    assert_eq!(dev_api.get("/agents").await.0, 200);
    assert_eq!(broker.api_with(&gone).get("/agents").await.0, 401);
    let (_, k) = admin.get(&format!("/keys/{dev_id}")).await;
    assert_eq!((k["status"].as_str(), k["name"].as_str()), (Some("active"), Some("dev")), "{k}");
    // The agent key: the agent reconnects with it.
    wait_online(&dev_api, &agent.id()).await;
    // Groups and pools.
    let (_, groups) = admin.get("/groups").await;
    assert!(groups.to_string().contains("\"ops\"") && groups.to_string().contains("\"restart\""), "{groups}");
    // The action and its hits.
    let (status, action) = dev_api.get(&format!("/actions/{id}")).await;
    assert_eq!(status, 200, "{action}");
    let (_, page) = dev_api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    assert!(!page["hits"].as_array().unwrap().is_empty(), "{page}");
    // The audit trail, with what came before the restart.
    let trail = audit(&admin, "").await;
    assert!(trail.len() >= before, "{} entries after, {before} before", trail.len());
    for kind in ["key_created", "key_revoked", "group_created", "pool_assigned", "action_placed"] {
        assert!(trail.iter().any(|e| e["kind"] == kind), "{kind} survived the restart");
    }
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
