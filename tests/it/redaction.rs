//! Redaction on both sides: the agent before anything leaves the process, the broker
//! again before anything is stored; rules changed at run time reach every agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{
    ADMIN_KEY, AGENT_KEY, Api, TestAgent, TestBroker, eventually, wait_action, wait_installed, wait_online,
};

#[derive(Debug)]
#[allow(dead_code)]
struct Customer {
    name: &'static str,
    email: &'static str,
    card_number: &'static str,
    note: String,
}

fn signup(order_ref: &str) {
    let customer = Customer {
        name: "Ada",
        email: "ada@example.com",
        card_number: "4111 1111 1111 1111",
        note: format!("call +1 415 555 0199 about {order_ref}"),
    };
    tracing::info!(password = "hunter2", customer = ?customer, order_ref, "redaction signup");
}

fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        while !stop.load(Ordering::Relaxed) {
            signup("ORD-123456");
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

async fn signup_line(api: &Api) -> u64 {
    let api = api.clone();
    eventually(Duration::from_secs(10), "the signup event in the catalog", move || {
        let api = api.clone();
        async move { api.find_source("redaction.rs", "order_ref").await.and_then(|s| s["line"].as_u64()) }
    })
    .await
}

async fn snapshot(api: &Api, pool: &str, line: u64) -> serde_json::Value {
    let (status, action) = api.post("/actions", json!({"pool": pool, "file": "it/redaction.rs", "line": line})).await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap();
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    page["hits"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_secrets_and_pii_never_reach_a_client_and_the_hit_says_what_fired_where() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "red", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = signup_line(&api).await;
    let hit = snapshot(&api, "red", line).await;
    let text = hit.to_string();
    for secret in ["hunter2", "ada@example.com", "4111 1111 1111 1111", "555 0199"] {
        assert!(!text.contains(secret), "`{secret}` leaked: {text}");
    }
    assert_eq!(hit["fields"]["password"]["value"], "[REDACTED:PASSWORD]", "caught by its name");
    let customer = &hit["fields"]["customer"]["fields"];
    assert_eq!(customer["name"]["value"], "Ada");
    assert_eq!(customer["email"]["value"], "[REDACTED:EMAIL]");
    assert!(customer["note"]["value"].as_str().unwrap().contains("[REDACTED:PHONE]"), "{customer}");
    let findings = hit["redactions"].as_array().unwrap();
    let has = |path: &str, rule: &str| findings.iter().any(|f| f["path"] == path && f["rule"] == rule);
    assert!(has("fields.password", "key:password"), "{findings:?}");
    assert!(has("fields.customer.email", "email"), "{findings:?}");
    assert!(findings.iter().all(|f| f.as_object().unwrap().len() == 2), "path and rule only, never values");
    assert!(hit["rules_version"].is_u64());

    // An expression cannot carry a secret out from under its name: the fields are
    // redacted before watches read them, and a redacted value can only be shown.
    let (status, action) = api
        .post(
            "/actions",
            json!({"pool": "red", "file": "it/redaction.rs", "line": line,
                   "watch": ["password + \"!\"", "[password, customer.card_number]"]}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap();
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    let watched = &page["hits"][0]["watches"];
    assert!(!watched.to_string().contains("hunter2") && !watched.to_string().contains("4111"), "{watched}");
    assert!(watched[0]["error"].as_str().unwrap().contains("redaction hides ([REDACTED:PASSWORD])"), "{watched}");
    // A watch value is also judged by the watch's last name, here the whole list.
    assert_eq!(watched[1]["value"]["value"], "[REDACTED:CARD_NUMBER]", "{watched}");

    // Rules changed at run time reach the agent and stamp later hits.
    let resp = api
        .client
        .put(format!("{}/redaction", api.base))
        .bearer_auth(ADMIN_KEY)
        .body("[[patterns]]\nname = \"order\"\nregex = 'ORD-[0-9]{6}'\nkind = \"ORDER_ID\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rules: serde_json::Value = resp.json().await.unwrap();
    let version = rules["version"].as_u64().unwrap();
    assert!(version >= 1);
    let hit = eventually(Duration::from_secs(20), "a hit under the new rules", || {
        let api = api.clone();
        async move {
            let hit = snapshot(&api, "red", line).await;
            (hit["rules_version"] == version).then_some(hit)
        }
    })
    .await;
    assert!(!hit.to_string().contains("ORD-123456"), "{hit}");
    assert_eq!(hit["fields"]["order_ref"]["value"], "[REDACTED:ORDER_ID]");
    // A rule that does not compile is refused by name, and the old rules stay.
    let resp = api
        .client
        .put(format!("{}/redaction", api.base))
        .bearer_auth(ADMIN_KEY)
        .body("[[patterns]]\nname = \"broken\"\nregex = '(['\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("broken"), "{err}");
    let (status, _) = api.get("/redaction").await;
    assert_eq!(status, 403, "reading the rules needs mcp:admin");
    let current: serde_json::Value = api
        .client
        .get(format!("{}/redaction", api.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current["version"], version);
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_placeholder_is_redacted_before_it_becomes_text() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "redlog", &[]);
    wait_online(&api, &agent.id()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let work = workload(&agent, Arc::clone(&stop));
    let line = signup_line(&api).await;
    let (status, action) = api
        .post(
            "/logs",
            json!({"pool": "redlog", "file": "it/redaction.rs", "line": line,
                   "template": "signup {customer.email} pw {password} card {customer.card_number}", "max_lines": 1}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    wait_installed(&api, &id, &agent.id()).await;
    wait_action(&api, &id, "one line", |a| a["lines"] == 1).await;
    let (_, page) = api.get(&format!("/actions/{id}/lines")).await;
    let line = &page["lines"][0];
    assert_eq!(line["text"], "signup [REDACTED:EMAIL] pw [REDACTED:PASSWORD] card [REDACTED:CARD_NUMBER]", "{line}");
    assert!(line["redactions"].as_array().unwrap().len() >= 3, "{line}");
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_redacts_what_an_untrusted_agent_sends() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    // A real agent makes the callsite known; a raw one will send the hit.
    let agent = TestAgent::start(&broker.ws_url(), "untrusted", &[]);
    wait_online(&api, &agent.id()).await;
    agent.run(|| signup("ORD-000001")).join().unwrap();
    let line = signup_line(&api).await;
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let register = json!({"type": "register", "protocol_version": 1, "agent_id": "agt_rawsender", "display_name": "raw",
                          "pool": "untrusted", "tags": [], "service": "raw", "language": "test", "agent_version": "0"});
    ws.send(Message::text(register.to_string())).await.unwrap();
    // Registered before it is targeted.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"registered""#) => break,
            Some(Ok(_)) => {}
            other => panic!("no registration: {other:?}"),
        }
    }
    let (status, action) = api
        .post("/actions", json!({"agent_ids": ["agt_rawsender", agent.id()], "file": "it/redaction.rs", "line": line}))
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap();
    let hit = json!({"type": "hit", "action_id": id, "seq": 1, "time_ms": 1,
                     "location": {"file": "it/redaction.rs", "line": line},
                     "fields": {"secret_token": {"type": "string", "value": "looks harmless"},
                                "note": {"type": "string", "value": "card 4111111111111111, key AKIAIOSFODNN7ABCDEFG"}}});
    ws.send(Message::text(hit.to_string())).await.unwrap();
    let (_, page) = api.get(&format!("/actions/{id}/hits?wait_seconds=10")).await;
    let stored = &page["hits"][0];
    assert_eq!(stored["agent_id"], "agt_rawsender", "{page}");
    assert_eq!(stored["fields"]["secret_token"]["value"], "[REDACTED:TOKEN]", "{stored}");
    let note = stored["fields"]["note"]["value"].as_str().unwrap();
    assert!(!note.contains("4111111111111111") && !note.contains("AKIAIOSFODNN7ABCDEFG"), "{note}");
    agent.shutdown();
    broker.stop().await;
}
