//! Dynamic logs and dynamic metrics, end to end, and the Prometheus endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Api, HostLog, TestAgent, TestBroker, eventually, test_config, wait_action, wait_installed, wait_online,
};

fn order_event(i: u64) {
    tracing::info!(order_id = i, email = "ada@example.com", "telemetry order");
}

fn tick() {
    tracing::info!(kind = "tick", "telemetry tick");
}

fn sample(amount: u64) {
    tracing::info!(amount, "telemetry sample");
}

#[tracing::instrument]
fn timed_work(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[tracing::instrument]
fn tic_toc(ms: u64) {
    tracing::info!("telemetry toc start");
    std::thread::sleep(Duration::from_millis(ms));
    tracing::info!("telemetry toc end");
}

/// The catalog line of a callsite in this file whose name or fields contain `text`.
async fn line(api: &Api, text: &str, kind: &str) -> u64 {
    let api = api.clone();
    let (text, kind) = (text.to_owned(), kind.to_owned());
    eventually(Duration::from_secs(10), "a callsite in the catalog", move || {
        let api = api.clone();
        let (text, kind) = (text.clone(), kind.clone());
        async move {
            let (_, page) = api.get(&format!("/sources?file=telemetry.rs&q={text}&limit=200")).await;
            page["items"].as_array()?.iter().find(|s| s["kind"] == kind.as_str()).map(|s| s["line"].as_u64().unwrap())
        }
    })
    .await
}

async fn message_line(api: &Api, message_word: &str) -> u64 {
    // Events are named by file and line; find the one whose line emits `message_word` by
    // reading this file, which is what a person would do.
    let source = include_str!("telemetry.rs");
    let wanted = source
        .lines()
        .position(|l| l.contains("tracing::info!") && l.contains(message_word))
        .map(|i| i as u64 + 1)
        .unwrap();
    let api = api.clone();
    eventually(Duration::from_secs(10), "the event in the catalog", move || {
        let api = api.clone();
        async move {
            let (_, page) = api.get("/sources?file=telemetry.rs&limit=200").await;
            page["items"].as_array()?.iter().any(|s| s["line"] == wanted).then_some(wanted)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_log_reaches_the_broker_and_the_services_own_log_with_its_placeholders() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let host_log = HostLog::default();
    let agent = TestAgent::start_logging(&broker.ws_url(), "logs", &[], host_log.clone());
    wait_online(&api, &agent.id()).await;
    agent.run(|| order_event(0)).join().unwrap();
    let line = message_line(&api, "telemetry order").await;

    let (status, action) = api
        .post(
            "/logs",
            json!({"pool": "logs", "file": "telemetry.rs", "line": line, "template": "order {order_id} for {email} done",
                   "level": "warn", "destination": "both", "max_lines": 5}),
        )
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    assert_eq!(action["kind"], "log");
    wait_installed(&api, &id, &agent.id()).await;
    agent
        .run(|| {
            for i in 1..=8 {
                order_event(i);
                std::thread::sleep(Duration::from_millis(30));
            }
        })
        .join()
        .unwrap();
    let done = wait_action(&api, &id, "the log to reach max_lines", |a| a["status"] == "completed").await;
    assert_eq!(done["lines"], 5, "{done}");
    let (_, page) = api.get(&format!("/actions/{id}/lines")).await;
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 5, "{page}");
    assert!(lines[0]["text"].as_str().unwrap().starts_with("order 1 for "), "{page}");
    assert_eq!(lines[0]["level"], "warn");
    assert_eq!(lines[0]["agent_id"], agent.id().as_str());
    let (_, newer) = api.get(&format!("/actions/{id}/lines?since=3")).await;
    assert_eq!(newer["lines"].as_array().unwrap().len(), 2);
    // The same line in the host's own output, at the right level and target.
    let out = host_log.text();
    let emitted: Vec<&str> = out.lines().filter(|l| l.contains("periscope::dynamic_log")).collect();
    assert!(emitted.iter().any(|l| l.contains("WARN") && l.contains("order 1 for ")), "{out}");

    // A bad template is refused at placement with its position.
    let (status, err) = api
        .post("/logs", json!({"pool": "logs", "file": "telemetry.rs", "line": line, "template": "total {amount +}"}))
        .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().starts_with("template: at column"), "{err}");
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_log_over_its_quota_pauses_and_resumes_by_itself() {
    let mut config = test_config();
    config.quotas.log_lines_per_sec = 5.0;
    config.quotas.log_burst_factor = 1.0;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "quota", &[]);
    wait_online(&api, &agent.id()).await;
    agent.run(|| order_event(0)).join().unwrap();
    let line = message_line(&api, "telemetry order").await;
    let (status, action) = api
        .post("/logs", json!({"pool": "quota", "file": "telemetry.rs", "line": line, "template": "order {order_id}"}))
        .await;
    assert_eq!(status, 201, "{action}");
    let id = action["action_id"].as_str().unwrap().to_owned();
    wait_installed(&api, &id, &agent.id()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let work = {
        let (stop, events) = (Arc::clone(&stop), Arc::clone(&events));
        agent.run(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                order_event(i);
                events.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Paused with its reason...
    let paused = wait_action(&api, &id, "a quota_log pause", |a| {
        a["agents"][0]["pause_reason"] == "quota_log" || a["agents"][0]["detail"] == "resumed"
    })
    .await;
    let (_, metrics) = api
        .client
        .get(format!("{}/metrics", broker.http()))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| ((), t))
        .unwrap();
    assert!(metrics.contains("periscope_quota_pauses_total{reason=\"quota_log\"}"), "{metrics}");
    // ...and resumed: lines keep coming, at the quota's pace rather than the workload's.
    let lines_then = paused["lines"].as_u64().unwrap();
    let since = std::time::Instant::now();
    let later = wait_action(&api, &id, "more lines after the pause", move |a| {
        a["lines"].as_u64().unwrap_or(0) >= lines_then + 5
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    let line_delta = later["lines"].as_u64().unwrap() - lines_then;
    // At most the quota's pace plus its burst (and lines already in flight); the
    // elapsed time is measured generously, so a slow machine only loosens the bound.
    let allowed = 5.0 * since.elapsed().as_secs_f64() + 15.0;
    assert!((line_delta as f64) <= allowed, "{line_delta} lines in {:?}: the quota held", since.elapsed());
    assert!(events.load(Ordering::Relaxed) > later["lines"].as_u64().unwrap(), "the workload outpaced the log");
    agent.shutdown();
    broker.stop().await;
}

fn figures(a: &Value) -> &Value {
    &a["figures"]["total"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_metric_kind_measures_a_workload_with_known_counts_and_durations() {
    let mut config = test_config();
    config.agents.metric_report_interval_ms = 1_000;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "metrics", &[]);
    wait_online(&api, &agent.id()).await;
    agent
        .run(|| {
            tick();
            sample(0);
            timed_work(1);
            tic_toc(1);
        })
        .join()
        .unwrap();
    let tick_line = message_line(&api, "telemetry tick").await;
    let sample_line = message_line(&api, "telemetry sample").await;
    let start_line = message_line(&api, "telemetry toc start").await;
    let end_line = message_line(&api, "telemetry toc end").await;
    let span_line = line(&api, "timed_work", "span").await;

    let place = |body: Value| {
        let api = api.clone();
        async move {
            let (status, a) = api.post("/metrics", body).await;
            assert_eq!(status, 201, "{a}");
            a["action_id"].as_str().unwrap().to_owned()
        }
    };
    let counter = place(json!({"pool": "metrics", "kind": "counter", "file": "telemetry.rs", "line": tick_line})).await;
    let value = place(json!({"pool": "metrics", "kind": "value", "file": "telemetry.rs", "line": sample_line,
                             "expression": "amount * 2", "condition": "amount > 0"}))
    .await;
    let span = place(json!({"pool": "metrics", "kind": "duration", "file": "telemetry.rs", "line": span_line})).await;
    let tictoc = place(json!({"pool": "metrics", "kind": "duration", "file": "telemetry.rs", "line": start_line,
                              "end_file": "telemetry.rs", "end_line": end_line}))
    .await;
    for id in [&counter, &value, &span, &tictoc] {
        wait_installed(&api, id, &agent.id()).await;
    }
    // A duration on an event needs an end location: refused with the reason.
    let (status, err) = api
        .post("/metrics", json!({"pool": "metrics", "kind": "duration", "file": "telemetry.rs", "line": tick_line}))
        .await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("has no duration"), "{err}");

    agent
        .run(|| {
            for _ in 0..37 {
                tick();
            }
            for amount in 1..=10 {
                sample(amount);
            }
            for _ in 0..5 {
                timed_work(20);
            }
            for _ in 0..4 {
                tic_toc(15);
            }
        })
        .join()
        .unwrap();

    let c = wait_action(&api, &counter, "37 counted", |a| figures(a)["count"] == 37).await;
    assert!(figures(&c)["p50"].is_null(), "counters have no distribution");
    assert_eq!(c["figures"]["per_agent"][0]["count"], 37);
    let v = wait_action(&api, &value, "10 samples", |a| figures(a)["count"] == 10).await;
    assert_eq!(figures(&v)["sum"], 110.0);
    assert_eq!(figures(&v)["min"], 2.0);
    assert_eq!(figures(&v)["max"], 20.0);
    let p50 = figures(&v)["p50"].as_f64().unwrap();
    assert!((9.0..=13.0).contains(&p50), "median of 2..20 by 2 is 10-12: {p50}");
    let s = wait_action(&api, &span, "5 span durations", |a| figures(a)["count"] == 5).await;
    assert_eq!(s["figures"]["unit"], "ms");
    assert!(figures(&s)["min"].as_f64().unwrap() >= 20.0, "{s}");
    assert!(figures(&s)["max"].as_f64().unwrap() < 60_000.0);
    let t = wait_action(&api, &tictoc, "4 tic-toc durations", |a| figures(a)["count"] == 4).await;
    assert!(figures(&t)["min"].as_f64().unwrap() >= 15.0, "{t}");
    assert!(!t["figures"]["series"].as_array().unwrap().is_empty());

    // Counts stay exact: a later report adds nothing when nothing ran.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, c) = api.get(&format!("/actions/{counter}")).await;
    assert_eq!(figures(&c)["count"], 37);
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_parses_as_prometheus_exposition() {
    let python = std::env::var("PERISCOPE_PYTHON")
        .expect("PERISCOPE_PYTHON must point at the test virtualenv's python; run scripts/test");
    let mut config = test_config();
    config.agents.metric_report_interval_ms = 1_000;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "prom", &["env:test"]);
    wait_online(&api, &agent.id()).await;
    agent
        .run(|| {
            tick();
            timed_work(1);
        })
        .join()
        .unwrap();
    let tick_line = message_line(&api, "telemetry tick").await;
    let span_line = line(&api, "timed_work", "span").await;
    let (_, counter) = api
        .post("/metrics", json!({"pool": "prom", "kind": "counter", "file": "telemetry.rs", "line": tick_line}))
        .await;
    let (_, duration) = api
        .post("/metrics", json!({"pool": "prom", "kind": "duration", "file": "telemetry.rs", "line": span_line}))
        .await;
    let (counter, duration) =
        (counter["action_id"].as_str().unwrap().to_owned(), duration["action_id"].as_str().unwrap().to_owned());
    wait_installed(&api, &counter, &agent.id()).await;
    wait_installed(&api, &duration, &agent.id()).await;
    agent
        .run(|| {
            for _ in 0..3 {
                tick();
                timed_work(2);
            }
        })
        .join()
        .unwrap();
    wait_action(&api, &counter, "3 ticks", |a| figures(a)["count"] == 3).await;
    wait_action(&api, &duration, "3 durations", |a| figures(a)["count"] == 3).await;

    // Prometheus scrapes with a bearer key; without one the endpoint is closed.
    let anonymous = reqwest::get(format!("{}/metrics", broker.http())).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let resp = api.client.get(format!("{}/metrics", broker.http())).bearer_auth(&api.key).send().await.unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    let file = std::env::temp_dir().join(format!("periscope-metrics-{}.txt", periscope_protocol::ActionId::generate()));
    std::fs::write(&file, &text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[family.name] = {"type": family.type, "samples": [[s.name, s.labels, s.value] for s in family.samples]}
print(json.dumps(out))
"#;
    let parsed = std::process::Command::new(python).arg("-c").arg(script).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(parsed.status.success(), "{}\n{text}", String::from_utf8_lossy(&parsed.stderr));
    let families: Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(families["periscope_agents_connected"]["samples"][0][2], 1.0);
    assert_eq!(families["periscope_dynamic_hits"]["type"], "counter");
    let hits = &families["periscope_dynamic_hits"]["samples"][0];
    assert_eq!(hits[1]["action"], counter.as_str());
    assert_eq!(hits[1]["pool"], "prom");
    assert_eq!(hits[1]["agent"], agent.id().as_str());
    assert_eq!(hits[2], 3.0);
    let summary = &families["periscope_dynamic_value"];
    assert_eq!(summary["type"], "summary");
    let samples = summary["samples"].as_array().unwrap();
    assert!(samples.iter().any(|s| s[0] == "periscope_dynamic_value_count" && s[2] == 3.0), "{summary}");
    assert!(samples.iter().any(|s| s[1]["quantile"] == "0.99" && s[1]["kind"] == "duration"), "{summary}");
    agent.shutdown();
    broker.stop().await;
}
