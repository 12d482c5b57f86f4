//! Cluster mode measured: place-to-hit latency on one node and across nodes, hits per
//! second with one, two and three nodes, and memory per connected agent (the broker's
//! and Redis's), side by side in one run.
//!
//! ```sh
//! cargo run --release -p periscope-benches --example cluster -- all
//! ```
//!
//! `remote URL [placements]` measures the latency and throughput of a single node
//! already running at URL (`periscope serve` with `benches/cluster_bench.toml` and the
//! bench's keys), to compare two builds of the broker side by side.
//!
//! Agents here are raw WebSocket clients that answer an `action_add` with a hit at once,
//! so what is measured is the broker's part (and loopback HTTP): from a caller placing a
//! snapshot until a caller reads its hit. Brokers run in this process, except for the
//! memory figures, where each broker is a child process of its own (`cluster serve`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use periscope_broker::BrokerConfig;
use periscope_broker::backend::redis::server::RedisServer;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Numbers each measurement's agents and pools apart.
static RUN: AtomicU64 = AtomicU64::new(0);

const API_KEY: &str = "bench-api-key-0123456789";
const AGENT_KEY: &str = "bench-agent-key-0123456789";

fn config(redis: Option<&str>, name: &str) -> BrokerConfig {
    let mut c = BrokerConfig::default();
    c.api_keys.push(ApiKeyConfig::new("bench", API_KEY));
    c.agent_keys.push(AgentKeyConfig::any_pool(AGENT_KEY));
    c.callers.calls_per_minute = 60_000;
    c.callers.call_burst = 10_000;
    c.callers.live_actions = 1_000;
    c.org_quotas.calls_per_minute = Some(600_000);
    c.org_quotas.call_burst = Some(100_000);
    c.org_quotas.live_actions = Some(100_000);
    let i = &mut c.ingest;
    (i.agent_hits_per_sec, i.action_hits_per_sec, i.burst_factor) = (100_000.0, 10_000.0, 100.0);
    (i.key_hits_per_sec, i.org_hits_per_sec) = (1_000_000.0, 10_000_000.0);
    (i.agent_bytes_per_sec, i.key_bytes_per_sec, i.org_bytes_per_sec) = (1 << 30, 1 << 36, 1 << 40);
    c.agents.max_sessions_per_key = 100_000;
    c.agents.heartbeat_interval_secs = 1;
    c.http.max_connections_per_ip = c.http.max_connections;
    c.cluster.redis_url = redis.map(str::to_owned);
    c.cluster.node_name = Some(name.to_owned());
    c
}

struct Node {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn node(redis: Option<&str>, name: &str) -> anyhow::Result<Node> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(periscope_broker::run(listener, config(redis, name), async move {
        let _ = stopped.await;
    }));
    Ok(Node { base, stop: Some(stop), task })
}

impl Node {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A raw agent: registers, publishes one location, answers each `action_add` with a
/// hit (or, in throughput mode, with `hits` hits).
async fn agent(base: &str, id: &str, hits: u64, pool: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut req = format!("{}/agents", base.replace("http://", "ws://")).into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let reg = json!({"type": "register", "protocol_version": 1, "agent_id": id, "display_name": id, "pool": pool,
                     "tags": [], "service": "bench", "language": "test", "agent_version": "0", "host": "bench",
                     "pid": 1});
    ws.send(Message::text(reg.to_string())).await?;
    let catalog = json!({"type": "catalog", "full": true, "entries": (1..=20).map(|l| json!(
        {"file": "bench.rs", "line": l, "kind": "event", "name": format!("event {l}"), "fields": ["n"]})).collect::<Vec<_>>()});
    ws.send(Message::text(catalog.to_string())).await?;
    Ok(tokio::spawn(async move {
        let mut seq = 0u64;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
            if v["type"] != "action_add" {
                continue;
            }
            let action = v["action"]["id"].clone();
            for _ in 0..hits {
                seq += 1;
                let hit = json!({"type": "hit", "action_id": action, "seq": seq, "time_ms": 1,
                                 "location": {"file": "bench.rs", "line": 1}, "fields": {"n": {"type": "int", "value": seq}}});
                if ws.send(Message::text(hit.to_string())).await.is_err() {
                    return;
                }
            }
        }
    }))
}

async fn wait_online(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<()> {
    for _ in 0..400 {
        let v: Value = http.get(format!("{base}/api/v1/agents/{id}")).bearer_auth(API_KEY).send().await?.json().await?;
        if v["status"] == "online" && v["locations"].as_u64() > Some(0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{id} never showed online on {base}")
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Place on `place`, agent on `agent_node`, read on `read`: the milliseconds from
/// placing until the hit is read.
async fn latency(place: &str, agent_node: &str, read: &str, n: usize, label: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let id = format!("agt_lat{}", RUN.fetch_add(1, Ordering::Relaxed));
    let _agent = agent(agent_node, &id, 1, "lat").await?;
    wait_online(&http, place, &id).await?;
    wait_online(&http, read, &id).await?;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let t0 = Instant::now();
        let v: Value = http
            .post(format!("{place}/api/v1/actions"))
            .bearer_auth(API_KEY)
            .json(&json!({"agent_ids": [id], "file": "bench.rs", "line": 1, "max_hits": 1}))
            .send()
            .await?
            .json()
            .await?;
        let action = v["action_id"].as_str().ok_or_else(|| anyhow::anyhow!("not placed: {v}"))?.to_owned();
        let page: Value = http
            .get(format!("{read}/api/v1/actions/{action}/hits?wait_seconds=10"))
            .bearer_auth(API_KEY)
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(page["hits"].as_array().map(Vec::len) == Some(1), "no hit: {page}");
        if i >= 20 {
            ms.push(t0.elapsed().as_secs_f64() * 1_000.0);
        }
    }
    ms.sort_by(f64::total_cmp);
    println!("latency {label}: p50 {:.2} ms, p99 {:.2} ms ({n} placements)", quantile(&ms, 0.5), quantile(&ms, 0.99));
    Ok(())
}

/// Hits per second into `nodes` (two agents on each, each filling 60 snapshots of 50).
async fn throughput(nodes: &[String], label: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let pool = format!("tp{run}");
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (n, base) in nodes.iter().enumerate() {
        for k in 0..2 {
            let id = format!("agt_tp{run}n{n}k{k}");
            agents.push(agent(base, &id, 50, &pool).await?);
            ids.push(id);
        }
    }
    for id in &ids {
        wait_online(&http, &nodes[0], id).await?;
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut placed = Vec::new();
    for id in &ids {
        for _ in 0..60 {
            let v: Value = http
                .post(format!("{}/api/v1/actions", nodes[0]))
                .bearer_auth(API_KEY)
                .json(&json!({"agent_ids": [id], "file": "bench.rs", "line": 1, "max_hits": 50}))
                .send()
                .await?
                .json()
                .await?;
            placed.push(v["action_id"].as_str().ok_or_else(|| anyhow::anyhow!("not placed: {v}"))?.to_owned());
        }
    }
    for action in &placed {
        let v: Value = http
            .get(format!("{}/api/v1/actions/{action}/hits?since=49&wait_seconds=60", nodes[nodes.len() - 1]))
            .bearer_auth(API_KEY)
            .send()
            .await?
            .json()
            .await?;
        accepted.fetch_add(v["next_cursor"].as_u64().unwrap_or(0), Ordering::Relaxed);
    }
    let took = t0.elapsed().as_secs_f64();
    // Each page's cursor is the index of its action's last hit: the hits it took.
    let hits = accepted.load(Ordering::Relaxed);
    println!(
        "throughput {label}: {:.0} hits/s ({hits} hits into {} actions in {took:.2} s, placements included)",
        hits as f64 / took,
        placed.len()
    );
    for a in agents {
        a.abort();
    }
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn redis_used(url: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    Ok(info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}

/// A broker in a child process (this example, `serve`), for its memory alone.
struct Child {
    child: std::process::Child,
    base: String,
}

fn child(redis: Option<&str>) -> anyhow::Result<Child> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", redis.unwrap_or("-")])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?).read_line(&mut line)?;
    Ok(Child { child, base: line.trim().to_owned() })
}

async fn memory(redis: Option<&RedisServer>, n: usize, label: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = redis.map(RedisServer::url);
    let mut broker = child(url.as_deref())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm = agent(&broker.base, "agt_warm", 1, "mem").await?;
    wait_online(&http, &broker.base, "agt_warm").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, used0) = (
        rss_kib(broker.child.id()),
        match &url {
            Some(u) => redis_used(u).await?,
            None => 0,
        },
    );
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(agent(&broker.base, &format!("agt_mem{i}"), 1, "mem").await?);
    }
    wait_online(&http, &broker.base, &format!("agt_mem{}", n - 1)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(broker.child.id());
    let mut line = format!(
        "memory {label}: broker {:.1} KiB per connected agent (RSS {rss0} → {rss1} KiB for {n} agents with 20 locations each)",
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );
    if let Some(u) = &url {
        let used1 = redis_used(u).await?;
        line.push_str(&format!("; redis {:.0} B per agent", used1.saturating_sub(used0) as f64 / n as f64));
        // Actions and hits: 200 snapshots of 1 hit each, on the warm agent.
        let before = redis_used(u).await?;
        for _ in 0..200 {
            let v: Value = http
                .post(format!("{}/api/v1/actions", broker.base))
                .bearer_auth(API_KEY)
                .json(&json!({"agent_ids": ["agt_warm"], "file": "bench.rs", "line": 1, "max_hits": 1}))
                .send()
                .await?
                .json()
                .await?;
            let id = v["action_id"].as_str().unwrap_or_default().to_owned();
            let _: Value = http
                .get(format!("{}/api/v1/actions/{id}/hits?wait_seconds=10", broker.base))
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json()
                .await?;
        }
        let after = redis_used(u).await?;
        line.push_str(&format!(
            "; {:.0} B per ended action with its one {}-byte hit (record, indexes, audit entries)",
            after.saturating_sub(before) as f64 / 200.0,
            HIT_JSON_BYTES
        ));
    }
    println!("{line}");
    drop((agents, warm));
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    Ok(())
}

/// About how long the bench's hit is as stored (JSON).
const HIT_JSON_BYTES: usize = 330;

async fn serve(redis: Option<String>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("http://{}", listener.local_addr()?);
    periscope_broker::run(listener, config(redis.as_deref(), "child"), std::future::pending()).await
}

async fn all(n: usize) -> anyhow::Result<()> {
    // Latency: one node on its own store; one cluster node; three cluster nodes.
    let single = node(None, "single").await?;
    latency(&single.base, &single.base, &single.base, n, "single node (memory + SQLite)").await?;
    single.stop().await;
    let redis = RedisServer::start()?;
    let url = redis.url();
    let nodes = vec![node(Some(&url), "a").await?, node(Some(&url), "b").await?, node(Some(&url), "c").await?];
    let (a, b, c) = (nodes[0].base.clone(), nodes[1].base.clone(), nodes[2].base.clone());
    latency(&a, &a, &a, n, "cluster, one node (Redis)").await?;
    latency(&a, &b, &c, n, "cluster, placed on A, agent on B, read on C").await?;
    for k in 1..=3 {
        let bases: Vec<String> = [&a, &b, &c].iter().take(k).map(|s| s.to_string()).collect();
        throughput(&bases, &format!("{k} cluster node(s), placed on the first, read on the last")).await?;
    }
    for n in nodes {
        n.stop().await;
    }
    let single = node(None, "single").await?;
    throughput(std::slice::from_ref(&single.base), "single node (memory + SQLite)").await?;
    single.stop().await;
    memory(None, 200, "single node").await?;
    memory(Some(&redis), 200, "cluster node").await?;
    Ok(())
}

async fn remote(base: String, n: usize) -> anyhow::Result<()> {
    latency(&base, &base, &base, n, &format!("single node at {base}")).await?;
    throughput(std::slice::from_ref(&base), &format!("single node at {base}")).await
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.get(1).map(String::as_str) {
        Some("serve") => rt.block_on(serve(args.get(2).filter(|r| *r != "-").cloned())),
        Some("all") | None => rt.block_on(all(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(500))),
        Some("remote") => {
            let base = args.get(2).cloned().ok_or_else(|| anyhow::anyhow!("remote URL [placements]"))?;
            rt.block_on(remote(base, args.get(3).and_then(|n| n.parse().ok()).unwrap_or(500)))
        }
        Some(other) => anyhow::bail!("unknown mode `{other}`: all [placements] | serve REDIS_URL|-"),
    }
}
