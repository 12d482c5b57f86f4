//! `periscope mcp` over stdio: the real binary, spawned the way a stdio-only MCP client
//! (Claude Desktop, an IDE) spawns it, forwarding to a broker on loopback. The tool
//! surface is the broker's own, the whole flow works through it (progress included),
//! logs stay on stderr, and a refused key or an unreachable broker is a clear error.
//!
//! These tests live in the broker crate because they need the `periscope` binary
//! (`CARGO_BIN_EXE_periscope`); the harness below is the minimum they need: a broker
//! started in-process with `periscope_broker::run` and one agent on a private
//! subscriber.

#![allow(clippy::unwrap_used)] // A test that cannot go on should stop right there.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use periscope_broker::BrokerConfig;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation, ProgressNotificationParam,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tracing_subscriber::prelude::*;

const API_KEY: &str = "stdio-api-key-0123456789";
const AGENT_KEY: &str = "stdio-agent-key-0123456789";
const POOL: &str = "stdio";

/// A broker in this process on a loopback port.
struct Broker {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Broker {
    async fn start() -> Broker {
        let mut config = BrokerConfig::default();
        // Room for this test's polling loop (the call-rate quota has its own tests).
        config.api_keys.push(ApiKeyConfig {
            quotas: Some(periscope_broker::quota::CallerQuotaOverrides {
                calls_per_minute: Some(60_000),
                call_burst: Some(10_000),
                ..Default::default()
            }),
            ..ApiKeyConfig::new("stdio-tester", API_KEY)
        });
        config.agent_keys.push(AgentKeyConfig::any_pool(AGENT_KEY));
        config.agents.heartbeat_interval_secs = 1;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(periscope_broker::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Broker { addr, stop: Some(stop), task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stopped = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(stopped.is_ok(), "broker did not stop within 10 s");
    }
}

/// One agent in pool `stdio`, running instrumented code under its own subscriber.
struct Agent {
    agent: periscope_agent::Agent,
    stop: Arc<AtomicBool>,
    work: std::thread::JoinHandle<()>,
}

#[tracing::instrument]
fn stdio_lookup(sku: u64) {
    tracing::info!(sku, in_stock = sku.is_multiple_of(2), "stdio lookup");
}

impl Agent {
    fn start(broker: &Broker) -> Agent {
        let agent = periscope_agent::Agent::builder()
            .broker_url(format!("ws://{}/agents", broker.addr))
            .agent_key(AGENT_KEY)
            .pool(POOL)
            .service("stdio-service")
            .reconnect_initial(Duration::from_millis(100))
            .reconnect_max(Duration::from_millis(500))
            .start()
            .expect("agent starts");
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(agent.layer());
        let dispatch = tracing::Dispatch::new(subscriber);
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let work = std::thread::spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                let mut sku = 0;
                while !running.load(Ordering::Relaxed) {
                    sku += 1;
                    stdio_lookup(sku);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        });
        Agent { agent, stop, work }
    }

    fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.work.join();
        self.agent.shutdown(Duration::from_secs(2));
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Recorder {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.progress.lock().unwrap().push(params);
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("stdio-it", "0"))
    }
}

type Client = RunningService<RoleClient, Recorder>;

fn periscope_mcp(url: &str, key: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_periscope"));
    cmd.arg("mcp").arg("--url").arg(url).env("PERISCOPE_API_KEY", key).env_remove("PERISCOPE_LOG");
    cmd
}

async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    let args = args.as_object().cloned().unwrap_or_default();
    client.call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args)).await.expect("a tool result")
}

fn body(result: &CallToolResult) -> Value {
    result.structured_content.clone().unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_works_through_periscope_mcp_on_stdio() {
    let broker = Broker::start().await;
    let agent = Agent::start(&broker);

    let recorder = Recorder::default();
    let progress = recorder.progress.clone();
    let (transport, stderr) = TokioChildProcess::builder(periscope_mcp(&broker.url(), API_KEY))
        .stderr(Stdio::piped())
        .spawn()
        .expect("periscope mcp starts");
    let client = recorder.serve(transport).await.expect("the stdio server initializes");
    assert_eq!(client.peer_info().unwrap().server_info.as_ref().unwrap().name, "periscope");

    // The same tools, with the same schemas, as the broker's own endpoint.
    let over_stdio = client.list_all_tools().await.unwrap();
    let http = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", broker.url())).auth_header(API_KEY),
    );
    let direct = ().serve(http).await.unwrap();
    let over_http = direct.list_all_tools().await.unwrap();
    assert_eq!(over_stdio.len(), 17);
    assert_eq!(serde_json::to_value(&over_stdio).unwrap(), serde_json::to_value(&over_http).unwrap());
    direct.cancel().await.unwrap();
    assert!(client.list_all_prompts().await.unwrap().iter().any(|p| p.name == "investigate"));
    // Resources and completion are forwarded too.
    let templates = client.list_all_resource_templates().await.unwrap();
    assert!(templates.iter().any(|t| t.uri_template == "periscope://actions/{action_id}/hits"), "{templates:?}");
    let pools = client
        .complete(rmcp::model::CompleteRequestParams::new(
            rmcp::model::Reference::for_prompt("inspect_location"),
            rmcp::model::ArgumentInfo::new("pool", ""),
        ))
        .await
        .unwrap();
    assert!(pools.completion.values.contains(&POOL.to_owned()), "{pools:?}");

    let agents = body(&call(&client, "list_agents", json!({"pool": POOL})).await);
    assert_eq!(agents["items"][0]["agent_id"], agent.agent.id().to_string());
    let line = eventually(Duration::from_secs(10), "the event in list_sources", || async {
        let page = body(&call(&client, "list_sources", json!({"pool": POOL, "query": "in_stock"})).await);
        page["items"].as_array()?.iter().find(|s| s["kind"] == "event").and_then(|s| s["line"].as_u64())
    })
    .await;

    let placed = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "file": "tests/mcp_stdio.rs", "line": line, "max_hits": 2}),
    )
    .await;
    assert_eq!(placed.is_error, Some(false), "{:?}", placed.content);
    let b = body(&placed);
    assert_eq!(b["hits"].as_array().unwrap().len(), 2, "{b}");
    assert!(b["hits"][0]["fields"]["sku"]["value"].as_u64().is_some(), "{b}");
    assert_eq!(b["hits"][0]["spans"][0]["name"], "stdio_lookup");
    // Progress the broker sent reached the stdio client under its own token.
    eventually(Duration::from_secs(5), "relayed progress 1/2", || {
        let progress = progress.clone();
        async move { progress.lock().unwrap().iter().any(|p| p.progress == 1.0 && p.total == Some(2.0)).then_some(()) }
    })
    .await;

    let id = b["action"]["action_id"].as_str().unwrap().to_owned();
    let newer = body(&call(&client, "get_action", json!({"action_id": id, "since": 1})).await);
    assert_eq!(newer["hits"][0]["index"], 2);
    assert_eq!(newer["next_cursor"], 2);
    let later = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "file": "tests/mcp_stdio.rs", "line": 1, "allow_pending": true, "wait": false}),
    )
    .await;
    let later_id = body(&later)["action"]["action_id"].as_str().unwrap().to_owned();
    let removed = body(&call(&client, "remove_action", json!({"action_id": later_id})).await);
    assert_eq!(removed["action"]["status"], "removed");
    // Errors a model can act on come through unchanged.
    let bad = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "file": "tests/mcp_stdio.rs", "line": line, "timeout_seconds": 900}),
    )
    .await;
    assert_eq!(bad.is_error, Some(true));
    assert_eq!(body(&bad)["error"]["code"], "invalid_input");

    client.cancel().await.unwrap();
    // Logs went to stderr (stdout carried only JSON-RPC, or the client would have failed).
    let mut logs = String::new();
    if let Some(mut stderr) = stderr {
        let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut logs)).await;
    }
    assert!(logs.contains("connected to the broker"), "{logs}");
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periscope_mcp_says_clearly_when_the_key_is_refused_or_the_broker_is_unreachable() {
    let broker = Broker::start().await;
    let refused = periscope_mcp(&broker.url(), "wrong-key-0000000000000").stdin(Stdio::null()).output().await.unwrap();
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty(), "nothing but JSON-RPC on stdout");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("refused the API key") && err.contains("--api-key"), "{err}");
    broker.stop().await;

    // The same port, now closed.
    let gone = periscope_mcp(&broker_url_closed().await, API_KEY).stdin(Stdio::null()).output().await.unwrap();
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(err.contains("cannot reach the Periscope broker"), "{err}");

    let tls = periscope_mcp("https://periscope.example.com", API_KEY).stdin(Stdio::null()).output().await.unwrap();
    assert!(!tls.status.success());
    assert!(String::from_utf8_lossy(&tls.stderr).contains("plain HTTP only"));
}

/// A loopback URL where nothing listens.
async fn broker_url_closed() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
