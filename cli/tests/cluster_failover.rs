//! Node loss, with real processes: three `periscope serve --redis` nodes, an agent
//! connected to one of them, a live log placed through another. The agent's node is
//! killed with SIGKILL: the agent moves to another node and its log keeps producing
//! lines, nothing stored is lost, a caller waiting on the killed node sees its
//! connection drop (and can retry elsewhere), and a caller waiting on a surviving node
//! gets its answer.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use periscope_broker::backend::redis::server::RedisServer;
use serde_json::{Value, json};
use tracing_subscriber::prelude::*;

const API_KEY: &str = "failover-api-key-0123456789";
const AGENT_KEY: &str = "failover-agent-key-0123456789";

/// A `periscope serve --redis` node on a free port.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn start(redis: &RedisServer, name: &str) -> Node {
        // Agents report new locations with their heartbeat: every second here; the test
        // polls faster than a person would.
        let config =
            std::env::temp_dir().join(format!("periscope-failover-{}.toml", periscope_protocol::ActionId::generate()));
        std::fs::write(
            &config,
            "[agents]\nheartbeat_interval_secs = 1\n[callers]\ncalls_per_minute = 60000\ncall_burst = 10000\n\
             [org_quotas]\ncalls_per_minute = 600000\ncall_burst = 100000\n",
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_periscope"))
            .args(["serve", "--listen", "127.0.0.1:0", "--redis", &redis.url(), "--node-name", name])
            .arg("--config")
            .arg(&config)
            .args(["--api-key", API_KEY, "--agent-key", AGENT_KEY])
            .env_remove("PERISCOPE_DATA_DIR")
            .env_remove("PERISCOPE_CONFIG")
            .env("PERISCOPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("periscope serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("periscope serve prints until it listens").unwrap();
            if line.contains("periscope broker listening")
                && let Some(addr) = line.split("listen=").nth(1)
            {
                break format!("http://{}", addr.split_whitespace().next().unwrap());
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let _ = std::fs::remove_file(&config);
        Node { child, base }
    }

    fn ws(&self) -> String {
        self.base.replace("http://", "ws://")
    }

    fn kill9(&mut self) {
        let _ = Command::new("kill").arg("-KILL").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new().get(format!("{base}/api/v1{path}")).bearer_auth(API_KEY).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tracing::instrument(fields(order_id = id))]
fn failover_checkout(id: u64) {
    tracing::info!(order_id = id, "failover order placed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_hands_its_agents_to_the_others_and_nothing_stored_is_lost() {
    let redis = RedisServer::start().expect("redis-server starts");
    let mut nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::start(&redis, n)).collect();
    let (a, c) = (nodes[0].base.clone(), nodes[2].base.clone());
    // The agent knows every node and starts with B.
    let urls = format!("{},{},{}", nodes[1].ws(), nodes[0].ws(), nodes[2].ws());
    let agent = periscope_agent::Agent::builder()
        .broker_url(urls)
        .agent_key(AGENT_KEY)
        .pool("failover")
        .service("failover-test")
        .reconnect_initial(Duration::from_millis(200))
        .reconnect_max(Duration::from_millis(1_000))
        .start()
        .unwrap();
    let id = agent.id().to_string();
    // The host logs INFO (to nowhere) beside the agent, as a service would.
    let host = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(host).with(agent.layer()));
    let held_by = |node: &'static str| {
        let (a, id) = (a.clone(), id.clone());
        move || {
            let (a, id) = (a.clone(), id.clone());
            async move {
                let (_, v) = get(&a, &format!("/agents/{id}")).await;
                (v["status"] == "online" && v["node"] == node).then_some(())
            }
        }
    };
    eventually(20, "the agent online on B", held_by("b")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let (stop, dispatch) = (Arc::clone(&stop), dispatch.clone());
        std::thread::spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    failover_checkout(n);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
    };
    let line = eventually(20, "the callsite in the catalog", || {
        let a = a.clone();
        async move {
            let (_, page) = get(&a, "/sources?q=failover&limit=50").await;
            let items = page["items"].as_array()?;
            let found =
                items.iter().find(|s| s["file"].as_str().is_some_and(|f| f.ends_with("cluster_failover.rs")))?;
            found["line"].as_u64()
        }
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{a}/api/v1/logs"))
        .bearer_auth(API_KEY)
        .json(&json!({"pool": "failover", "file": "cluster_failover.rs", "line": line, "template": "order {order_id}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let log = resp.json::<Value>().await.unwrap()["action_id"].as_str().unwrap().to_owned();
    let (_, before) = get(&c, &format!("/actions/{log}/lines?since=0&wait_seconds=30&limit=200")).await;
    let before = before["lines"].as_array().cloned().unwrap_or_default();
    assert!(!before.is_empty(), "lines flow through B");

    // Callers waiting for lines that do not exist yet, on B and on A.
    let far = before.len() as u64 + 1_000_000;
    let on_b = {
        let b = nodes[1].base.clone();
        let log = log.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{b}/api/v1/actions/{log}/lines?since={far}&wait_seconds=60"))
                .bearer_auth(API_KEY)
                .send()
                .await
        })
    };
    let killed_at = Instant::now();
    nodes[1].kill9();
    let moved = killed_at.elapsed();
    let dropped = tokio::time::timeout(Duration::from_secs(30), on_b).await.expect("never a hang").unwrap();
    assert!(dropped.is_err(), "the caller waiting on the killed node sees its connection drop");

    // The agent moves to another node, and its log keeps producing lines there.
    eventually(30, "the agent online on another node", || {
        let (a, id) = (a.clone(), id.clone());
        async move {
            let (_, v) = get(&a, &format!("/agents/{id}")).await;
            (v["status"] == "online" && v["node"] != "b").then_some(())
        }
    })
    .await;
    let failover = killed_at.elapsed();
    let last = before.last().unwrap()["index"].as_u64().unwrap();
    let (_, after) = get(&a, &format!("/actions/{log}/lines?since={last}&wait_seconds=30&limit=10")).await;
    assert!(!after["lines"].as_array().unwrap().is_empty(), "the live log resumed: {after}");
    let resumed = killed_at.elapsed();
    eprintln!("kill -9 → agent online elsewhere in {failover:?}, new lines after {resumed:?} (kill took {moved:?})");
    assert!(resumed < Duration::from_secs(10), "live actions resume within 10 s of a node's loss, took {resumed:?}");

    // Nothing stored before the kill is lost: the same lines at the same indexes.
    let (_, kept) = get(&c, &format!("/actions/{log}/lines?since=0&limit=200")).await;
    let kept = kept["lines"].as_array().unwrap();
    for (old, now) in before.iter().zip(kept) {
        assert_eq!((&old["index"], &old["text"]), (&now["index"], &now["text"]));
    }
    stop.store(true, Ordering::Relaxed);
    work.join().unwrap();
    agent.shutdown(Duration::from_secs(2));
}
