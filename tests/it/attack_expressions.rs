//! Issue 9, item 1: reading secrets through expressions. A developer key may place
//! conditions, watches, log templates and metric values; every one of them reads what a
//! client could see, so a value that redaction hides (by its name, by its shape, by a
//! rule the organization added; in an event field, inside a struct, in a span) can be
//! shown as its marker or compared with null, and any other use fails with a `redacted`
//! evaluation error that the action's per-agent status shows and the audit trail keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, Api, TestAgent, TestBroker, audit, eventually, test_config, wait_action, wait_online};

#[derive(Debug)]
#[allow(dead_code)]
struct Account {
    name: &'static str,
    password: &'static str,
    cvv: u32,
}

/// The values an attacker is after: raw, they would make every attack below succeed.
const API_TOKEN: &str = "a1b2c3d4e5f6";
const PASSWORD: &str = "hunter2";
const CVV: u64 = 737;

fn checkout(amount: u64) {
    let account = Account { name: "Ada", password: PASSWORD, cvv: 737 };
    let span = tracing::info_span!("attack_session", session_token = "s3ss10n-abcdef", user_id = 7u64);
    let _entered = span.enter();
    tracing::info!(
        amount,
        api_token = API_TOKEN,
        password = PASSWORD,
        cvv = CVV,
        email = "ada@example.com",
        employee = "EMP-123456",
        account = ?account,
        "attack checkout"
    );
}

fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            checkout(i);
            std::thread::sleep(Duration::from_millis(3));
        }
    })
}

async fn checkout_line(api: &Api) -> u64 {
    let api = api.clone();
    eventually(Duration::from_secs(10), "the checkout event in the catalog", move || {
        let api = api.clone();
        async move { api.find_source("attack_expressions.rs", "api_token").await.and_then(|s| s["line"].as_u64()) }
    })
    .await
}

/// A running broker and agent with the checkout workload going.
struct Scene {
    broker: TestBroker,
    api: Api,
    agent: TestAgent,
    stop: Arc<AtomicBool>,
    work: std::thread::JoinHandle<()>,
    line: u64,
    pool: String,
}

impl Scene {
    async fn start(pool: &str) -> Scene {
        let mut config = test_config();
        config.agents.metric_report_interval_ms = 1_000;
        let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
        let api = broker.api();
        let agent = TestAgent::start(&broker.ws_url(), pool, &[]);
        wait_online(&api, &agent.id()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let work = workload(&agent, Arc::clone(&stop));
        let line = checkout_line(&api).await;
        Scene { broker, api, agent, stop, work, line, pool: pool.to_owned() }
    }

    async fn place(&self, path: &str, body: Value) -> String {
        let mut body = body;
        body["pool"] = json!(self.pool);
        body["file"] = json!("attack_expressions.rs");
        body["line"] = json!(self.line);
        let (status, action) = self.api.post(path, body.clone()).await;
        assert_eq!(status, 201, "placing {body}: {action}");
        action["action_id"].as_str().unwrap().to_owned()
    }

    /// Waits for the agent's `redacted` evaluation error on `id`; returns its text.
    async fn redacted_error(&self, id: &str) -> String {
        let a = wait_action(&self.api, id, "a redacted evaluation error in the agent's status", |a| {
            a["agents"][0]["eval_error"].as_str().is_some_and(|e| e.contains("redaction hides"))
        })
        .await;
        a["agents"][0]["eval_error"].as_str().unwrap().to_owned()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.work.join().unwrap();
        self.agent.shutdown();
        self.broker.stop().await;
    }
}

fn figures(a: &Value) -> &Value {
    &a["figures"]["total"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_secrets_length_or_a_cvv_through_a_value_metric_fails_as_redacted_and_is_audited() {
    let scene = Scene::start("atk-metric").await;
    // Control: a metric on a plain field samples.
    let plain = scene.place("/metrics", json!({"kind": "value", "expression": "amount % 10"})).await;
    let length = scene.place("/metrics", json!({"kind": "value", "expression": "len(api_token)"})).await;
    let cvv = scene.place("/metrics", json!({"kind": "value", "expression": "cvv + 0"})).await;
    let nested = scene.place("/metrics", json!({"kind": "value", "expression": "account.cvv * 1"})).await;
    wait_action(&scene.api, &plain, "samples of a plain field", |a| figures(a)["count"].as_u64() >= Some(20)).await;
    for id in [&length, &cvv, &nested] {
        let error = scene.redacted_error(id).await;
        assert!(error.starts_with("expression: "), "{error}");
        assert!(error.contains("[REDACTED:"), "names the marker: {error}");
        for secret in [API_TOKEN, PASSWORD, "737", "12"] {
            assert!(!error.contains(secret), "the error must not quote a value: {error}");
        }
        // Every sample is skipped: no length, no min or max of the CVV.
        let a =
            wait_action(&scene.api, id, "skipped samples reported", |a| figures(a)["skipped"].as_u64() > Some(0)).await;
        assert_eq!(figures(&a)["count"], 0, "{a}");
        assert!(figures(&a)["min"].is_null() && figures(&a)["max"].is_null(), "{a}");
    }
    // The audit trail says who tried, once per action.
    let admin = scene.broker.api_with(ADMIN_KEY);
    let entries = audit(&admin, "&kind=redacted_read_refused").await;
    for id in [&length, &cvv, &nested] {
        let mine: Vec<&Value> = entries.iter().filter(|e| e["action_id"] == id.as_str()).collect();
        assert_eq!(mine.len(), 1, "one entry per action: {entries:?}");
        assert_eq!(mine[0]["actor"]["type"], "key", "{}", mine[0]);
        assert_eq!(mine[0]["actor"]["name"], "tester", "attributed to the key that placed it: {}", mine[0]);
        assert_eq!(mine[0]["data"]["agent_id"], scene.agent.id().as_str());
    }
    assert!(!entries.iter().any(|e| e["action_id"] == plain.as_str()));
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_a_secret_with_conditions_fails_as_redacted_and_collects_nothing() {
    let scene = Scene::start("atk-cond").await;
    // Control: a condition on a plain field matches.
    let plain = scene.place("/actions", json!({"condition": "amount > 0", "max_hits": 1})).await;
    // Each of these is true on the raw values.
    let attacks = [
        // A guess, by name rule.
        "password == \"hunter2\"",
        // Character by character, with a counter.
        "starts_with(api_token, \"a\")",
        // Binary search.
        "api_token < \"b\"",
        "api_token >= \"a\"",
        // Indexing and conversions.
        "api_token[0] == \"a\"",
        "api_token + \"\" == \"a1b2c3d4e5f6\"",
        "lower(password) == \"hunter2\"",
        "len(password) == 7",
        // Arithmetic on a redacted integer.
        "cvv - 737 == 0",
        "cvv > 700",
        // Inside a struct, by the field's own name.
        "account.password == \"hunter2\"",
        "account.cvv == 737",
        // A value rule (an email, whatever the field is called).
        "\"example.com\" in email",
        // A span field.
        "span.session_token == \"s3ss10n-abcdef\"",
        "span.attack_session.session_token.starts_with(\"s3\")",
    ];
    let mut snapshots = Vec::new();
    for condition in attacks {
        snapshots.push((condition, scene.place("/actions", json!({"condition": condition, "max_hits": 1})).await));
    }
    let counter =
        scene.place("/metrics", json!({"kind": "counter", "condition": "starts_with(api_token, \"a1\")"})).await;
    wait_action(&scene.api, &plain, "the control snapshot", |a| a["hits"] == 1).await;
    for (condition, id) in &snapshots {
        let error = scene.redacted_error(id).await;
        assert!(error.starts_with("condition: "), "{condition}: {error}");
        // The error quotes the expression (the caller's own guess), never a value.
        for secret in [API_TOKEN, PASSWORD, "s3ss10n-abcdef", "EMP-123456"] {
            assert!(condition.contains(secret) || !error.contains(secret), "{error}");
        }
    }
    scene.redacted_error(&counter).await;
    // Later hits keep failing the same way: nothing was captured, nothing counted.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for (condition, id) in &snapshots {
        let (_, a) = scene.api.get(&format!("/actions/{id}")).await;
        assert_eq!(a["hits"], 0, "{condition} must never match: {a}");
        assert_eq!(a["status"], "active", "{a}");
    }
    let (_, c) = scene.api.get(&format!("/actions/{counter}")).await;
    assert!(figures(&c)["count"].as_u64().unwrap_or(0) == 0, "{c}");
    // Comparing with null only says that the value is there, as a client sees.
    let present = scene.place("/actions", json!({"condition": "password != null && cvv != null", "max_hits": 1})).await;
    wait_action(&scene.api, &present, "a hit where the secret is present", |a| a["hits"] == 1).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_or_a_log_placeholder_shows_a_secret_only_as_its_marker() {
    let scene = Scene::start("atk-watch").await;
    let id = scene
        .place(
            "/actions",
            json!({"watch": ["api_token", "len(api_token)", "[password, account.cvv, amount]", "span.session_token", "amount"]}),
        )
        .await;
    let (_, page) = scene.api.get(&format!("/actions/{id}/hits?wait_seconds=20")).await;
    let hit = &page["hits"][0];
    let text = hit.to_string();
    for secret in [API_TOKEN, PASSWORD, "s3ss10n-abcdef", "\"value\":737"] {
        assert!(!text.contains(secret), "`{secret}` leaked: {text}");
    }
    let watches = &hit["watches"];
    assert_eq!(watches[0]["value"]["value"], "[REDACTED:TOKEN]", "{watches}");
    assert!(watches[1]["error"].as_str().unwrap().contains("redaction hides"), "{watches}");
    assert_eq!(watches[2]["value"]["items"][0]["value"], "[REDACTED:PASSWORD]", "{watches}");
    assert_eq!(watches[2]["value"]["items"][1]["value"], "[REDACTED:CVV]", "{watches}");
    assert!(watches[3]["value"]["value"].as_str().unwrap().starts_with("[REDACTED:"), "{watches}");
    assert!(watches[4]["value"]["value"].as_u64().is_some(), "plain values are read: {watches}");
    assert!(scene.redacted_error(&id).await.starts_with("watch[1]: "));

    let log = scene
        .place("/logs", json!({"template": "pw={password} n={len(password)} amount={amount}", "max_lines": 1}))
        .await;
    wait_action(&scene.api, &log, "one line", |a| a["lines"] == 1).await;
    let (_, page) = scene.api.get(&format!("/actions/{log}/lines")).await;
    let line = page["lines"][0]["text"].as_str().unwrap();
    assert!(line.starts_with("pw=[REDACTED:PASSWORD] n={len(password): "), "{line}");
    assert!(line.contains("redaction hides") && line.contains(" amount="), "{line}");
    assert!(!line.contains(PASSWORD) && !line.contains("n=7"), "{line}");
    assert!(scene.redacted_error(&log).await.starts_with("template placeholder 1: "));
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_the_organization_adds_hides_values_from_conditions_too() {
    let scene = Scene::start("atk-org").await;
    // Before the rule, the employee number is plain data and a condition reads it.
    let before = scene.place("/actions", json!({"condition": "employee == \"EMP-123456\"", "max_hits": 1})).await;
    wait_action(&scene.api, &before, "a hit before the rule", |a| a["hits"] == 1).await;
    let resp = scene
        .api
        .client
        .put(format!("{}/redaction", scene.api.base))
        .bearer_auth(ADMIN_KEY)
        .body("[[patterns]]\nname = \"employee\"\nregex = 'EMP-[0-9]{6}'\nkind = \"EMPLOYEE_ID\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let version = resp.json::<Value>().await.unwrap()["version"].as_u64().unwrap();
    // Once the agent has the rule (its hits say so)...
    eventually(Duration::from_secs(20), "a hit under the organization's rule", || {
        let scene = &scene;
        async move {
            let id = scene.place("/actions", json!({"max_hits": 1})).await;
            let (_, page) = scene.api.get(&format!("/actions/{id}/hits?wait_seconds=10")).await;
            (page["hits"][0]["rules_version"] == version).then_some(())
        }
    })
    .await;
    // ... a condition can no longer test a guess.
    let after = scene.place("/actions", json!({"condition": "employee == \"EMP-123456\"", "max_hits": 1})).await;
    let error = scene.redacted_error(&after).await;
    assert!(error.contains("[REDACTED:EMPLOYEE_ID]"), "{error}");
    let (_, a) = scene.api.get(&format!("/actions/{after}")).await;
    assert_eq!(a["hits"], 0, "{a}");
    scene.stop().await;
}
