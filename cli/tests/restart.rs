//! A broker killed with SIGKILL and started again on the same data directory: agents
//! come back spread out by their jittered backoff (no thundering herd), live actions
//! resume on them, and nothing a caller was told was stored is lost: keys, actions,
//! hits, log lines, audit entries, and an action placed the instant before the kill.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing_subscriber::prelude::*;

mod support;

use support::{Served, temp_dir};

const ADMIN_KEY: &str = "restart-admin-key-0123456789";
const AGENT_KEY: &str = "restart-agent-key-0123456789";
const AGENTS: usize = 20;
/// The agents' first reconnect delay; the jitter spreads each retry over [d/2, d].
const BACKOFF: Duration = Duration::from_secs(2);

fn tick(n: u64) {
    tracing::info!(n, "restart tick");
}

fn tick_line() -> u64 {
    let source = include_str!("restart.rs");
    source.lines().position(|l| l.contains("tracing::info!(n, \"restart tick\")")).unwrap() as u64 + 1
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}/api/v1{path}", self.base)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every agent of the fleet online; their `connected_at_ms`.
async fn fleet_online(api: &Client) -> Vec<u64> {
    eventually("every agent online", || async {
        let (status, page) = api.get("/agents?pool=fleet&status=online&limit=100").await;
        let items = page["items"].as_array()?;
        (status == 200 && items.len() == AGENTS)
            .then(|| items.iter().map(|a| a["connected_at_ms"].as_u64().unwrap()).collect())
    })
    .await
}

fn start(dir: &std::path::Path, config: &std::path::Path, listen: &str) -> Served {
    Served::start_with(&[
        OsStr::new("--listen"),
        OsStr::new(listen),
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--config"),
        config.as_os_str(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_loses_nothing_it_acknowledged_and_its_agents_return_spread_out() {
    let dir = temp_dir("restart");
    let config = dir.join("periscope.toml");
    std::fs::write(
        &config,
        format!(
            "[[api_keys]]\nname = \"admin\"\nkey = \"{ADMIN_KEY}\"\nrole = \"company_admin\"\n\
             [api_keys.quotas]\ncalls_per_minute = 60000\ncall_burst = 10000\n\
             [[agent_keys]]\nkey = \"{AGENT_KEY}\"\n\
             [agents]\nheartbeat_interval_secs = 1\n\
             # Unoptimized agents on a busy machine: see tests/it/support.rs.\n\
             [quotas]\ncpu_fraction = 0.5\ncpu_burst_micros = 200000\n"
        ),
    )
    .unwrap();
    let first = start(&dir, &config, "127.0.0.1:0");
    let base = first.base.clone();
    let listen = base.trim_start_matches("http://").to_owned();
    let api = Client { http: reqwest::Client::new(), base: base.clone(), key: ADMIN_KEY.into() };

    // A fleet of real agents, each with its own subscriber and a callsite that runs
    // continuously.
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    let mut workers = Vec::new();
    for i in 0..AGENTS {
        let agent = periscope_agent::Agent::builder()
            .broker_url(format!("ws://{listen}/agents"))
            .agent_key(AGENT_KEY)
            .pool("fleet")
            .tags([format!("n:{i}")])
            .service("restart")
            .reconnect_initial(BACKOFF)
            .reconnect_max(BACKOFF * 4)
            .start()
            .expect("agent starts");
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
                .with(agent.layer()),
        );
        let stop = Arc::clone(&stop);
        workers.push(std::thread::spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    tick(n);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        }));
        agents.push(agent);
    }
    fleet_online(&api).await;
    let line = tick_line();
    eventually("the tick callsite in the catalog", || async {
        let (_, page) = api.get("/sources?pool=fleet&file=restart.rs").await;
        page["items"].as_array()?.iter().any(|s| s["line"] == line).then_some(())
    })
    .await;

    // What callers are told is stored: a key, actions, hits, lines, audit entries.
    let (status, created) = api.post("/keys", json!({"name": "survivor", "role": "developer"})).await;
    assert_eq!(status, 201, "{created}");
    let survivor = created["secret"].as_str().unwrap().to_owned();
    let one_agent = agents[0].id().to_string();
    let (status, snap) = api
        .post(
            "/actions",
            json!({"agent_ids": [one_agent], "file": "restart.rs", "line": line, "max_hits": 50,
                                 "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{snap}");
    let snap_id = snap["action_id"].as_str().unwrap().to_owned();
    let (status, log) = api
        .post(
            "/logs",
            json!({"pool": "fleet", "tags": ["n:1"], "file": "restart.rs", "line": line,
                              "template": "tick {n}", "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{log}");
    let log_id = log["action_id"].as_str().unwrap().to_owned();
    let hits_before: BTreeSet<String> = eventually("a few hits", || async {
        let (_, page) = api.get(&format!("/actions/{snap_id}/hits")).await;
        let ids: BTreeSet<String> =
            page["hits"].as_array()?.iter().map(|h| h["hit_id"].as_str().unwrap().to_owned()).collect();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    let lines_before: BTreeSet<u64> = eventually("a few lines", || async {
        let (_, page) = api.get(&format!("/actions/{log_id}/lines")).await;
        let seqs: BTreeSet<u64> = page["lines"].as_array()?.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        (seqs.len() >= 3).then_some(seqs)
    })
    .await;
    let (_, audit) = api.get("/audit?limit=500").await;
    let audit_before: Vec<Value> = audit["items"].as_array().unwrap().clone();
    assert!(audit_before.iter().any(|e| e["action_id"] == log_id.as_str()), "{audit_before:?}");
    // The last thing before the kill: an action acknowledged an instant before it.
    let (status, last) = api
        .post(
            "/actions",
            json!({"pool": "fleet", "file": "restart.rs", "line": line, "max_hits": 50,
                                 "expire_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{last}");
    let last_id = last["action_id"].as_str().unwrap().to_owned();

    // SIGKILL at once: no shutdown path runs.
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    std::mem::forget(first);
    let second = start(&dir, &config, &listen);
    assert_eq!(second.base, base);

    // The agents come back by themselves, spread out by their jitter.
    let mut connected = fleet_online(&api).await;
    connected.sort_unstable();
    let spread = Duration::from_millis(connected[AGENTS - 1] - connected[0]);
    assert!(spread >= BACKOFF / 4, "{AGENTS} agents reconnected within {spread:?} of each other: a thundering herd");
    let window = (BACKOFF / 10).as_millis() as u64;
    let crowd = connected.iter().map(|&t| connected.iter().filter(|&&u| u >= t && u < t + window).count()).max();
    assert!(
        crowd.unwrap() <= AGENTS * 3 / 4,
        "{crowd:?} of {AGENTS} agents reconnected within {window} ms: {connected:?}"
    );

    // Nothing acknowledged was lost.
    let survivor_api = Client { http: reqwest::Client::new(), base: base.clone(), key: survivor };
    assert_eq!(survivor_api.get("/health").await.0, 200, "the key created before the kill works");
    let (status, last_after) = api.get(&format!("/actions/{last_id}")).await;
    assert_eq!(status, 200, "the action placed just before the kill survives: {last_after}");
    assert_eq!(last_after["status"], "active");
    let (_, audit) = api.get("/audit?limit=500").await;
    let audit_after = audit["items"].as_array().unwrap();
    for entry in &audit_before {
        assert!(audit_after.contains(entry), "audit entry lost: {entry}");
    }
    assert!(
        audit_after.iter().any(|e| e["action_id"] == last_id.as_str() && e["kind"] == "action_placed"),
        "the placing of the last action is audited"
    );
    // The live actions resume: new hits and lines after the restart, old ones kept.
    let hits_after: BTreeSet<String> = eventually("hits after the restart", || async {
        let (_, page) = api.get(&format!("/actions/{snap_id}/hits")).await;
        let ids: BTreeSet<String> =
            page["hits"].as_array()?.iter().map(|h| h["hit_id"].as_str().unwrap().to_owned()).collect();
        (ids.len() > hits_before.len() + 1).then_some(ids)
    })
    .await;
    assert!(hits_after.is_superset(&hits_before), "hits lost: {:?}", hits_before.difference(&hits_after));
    let lines_after: BTreeSet<u64> = eventually("lines after the restart", || async {
        let (_, page) = api.get(&format!("/actions/{log_id}/lines")).await;
        let seqs: BTreeSet<u64> = page["lines"].as_array()?.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        (seqs.len() > lines_before.len() + 2).then_some(seqs)
    })
    .await;
    assert!(lines_after.is_superset(&lines_before), "lines lost: {:?}", lines_before.difference(&lines_after));
    let (_, last_after) = api.get(&format!("/actions/{last_id}")).await;
    eventually("the last action installed on the fleet after the restart", || {
        let api = &api;
        let last_id = last_id.clone();
        async move {
            let (_, a) = api.get(&format!("/actions/{last_id}")).await;
            (a["hits"].as_u64()? > 0).then_some(())
        }
    })
    .await;
    drop(last_after);

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    for a in agents {
        a.shutdown(Duration::from_secs(2));
    }
    second.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
