//! The MCP server over streamable HTTP, driven by a real rmcp client on loopback (and
//! by the official Python SDK): the whole flow an assistant follows, progress while a
//! snapshot waits, every error code a model can act on, and the HTTP-level guards
//! (401 with the metadata URL, DNS-rebinding protection).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use periscope_broker::config::ApiKeyConfig;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation, ProgressNotificationParam,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{AGENT_KEY, API_KEY, TestAgent, TestBroker, eventually, test_config, wait_online};

const POOL: &str = "mcp";

#[derive(Debug)]
#[allow(dead_code)]
struct Basket {
    owner: String,
    items: Vec<u32>,
}

#[tracing::instrument(skip(basket, note), fields(basket_owner = %basket.owner))]
fn mcp_checkout(basket: &Basket, note: &str) {
    tracing::info!(basket = ?basket, total_cents = 4200u64, note, "mcp checkout");
}

/// Runs the instrumented code every few milliseconds until stopped.
fn workload(agent: &TestAgent, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    agent.run(move || {
        let basket = Basket { owner: "Ada".into(), items: vec![1, 2, 3] };
        let note = "n".repeat(300);
        while !stop.load(Ordering::Relaxed) {
            mcp_checkout(&basket, &note);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// A client handler that records progress notifications.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Recorder {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.progress.lock().unwrap().push(params);
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("periscope-it", "0"))
    }
}

pub(crate) type Client = RunningService<RoleClient, Recorder>;

pub(crate) async fn connect_with(
    broker: &TestBroker,
    key: &str,
) -> Result<Client, rmcp::service::ClientInitializeError> {
    connect_to(&broker.http(), key).await
}

/// A client of the broker at `http` (`http://host:port`), from a task that does not hold
/// the [`TestBroker`].
pub(crate) async fn connect_to(http: &str, key: &str) -> Result<Client, rmcp::service::ClientInitializeError> {
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{http}/mcp")).auth_header(key);
    Recorder::default().serve(StreamableHttpClientTransport::from_config(config)).await
}

async fn connect(broker: &TestBroker) -> Client {
    connect_with(broker, API_KEY).await.expect("the MCP client connects")
}

pub(crate) async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    try_call(client, tool, args).await.expect("a tool result")
}

/// A tool call that may fail below the tool (HTTP 401 for a revoked key).
pub(crate) async fn try_call(client: &Client, tool: &str, args: Value) -> Result<CallToolResult, rmcp::ServiceError> {
    let args = args.as_object().cloned().unwrap_or_default();
    client.call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args)).await
}

/// The error code of an error result (None for a success).
pub(crate) fn code(result: &CallToolResult) -> Option<String> {
    if result.is_error != Some(true) {
        return None;
    }
    Some(body(result)["error"]["code"].as_str().unwrap_or("<no code>").to_owned())
}

pub(crate) fn body(result: &CallToolResult) -> Value {
    result.structured_content.clone().unwrap_or(Value::Null)
}

pub(crate) fn text(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

/// Waits until the instrumented event is in the catalog; returns its line.
async fn event_line(client: &Client) -> u64 {
    eventually(Duration::from_secs(10), "the event callsite in list_sources", || async {
        let r = call(client, "list_sources", json!({"pool": POOL, "query": "total_cents"})).await;
        let items = body(&r)["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .find(|s| s["file"].as_str().is_some_and(|f| f.ends_with("it/mcp.rs")))
            .and_then(|s| s["line"].as_u64())
    })
    .await
}

struct Fixture {
    broker: TestBroker,
    agent: TestAgent,
    stop: Arc<AtomicBool>,
    work: std::thread::JoinHandle<()>,
}

impl Fixture {
    async fn start(config: periscope_broker::BrokerConfig) -> Fixture {
        let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
        let agent = TestAgent::start(&broker.ws_url(), POOL, &["env:test"]);
        wait_online(&broker.api(), &agent.id()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let work = workload(&agent, Arc::clone(&stop));
        Fixture { broker, agent, stop, work }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.work.join();
        self.agent.shutdown();
        self.broker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_list_returns_every_contract_tool_with_its_schema_and_the_prompts() {
    let broker = TestBroker::start().await;
    let client = connect(&broker).await;
    let info = client.peer_info().expect("server info");
    assert_eq!(info.server_info.as_ref().unwrap().name, "periscope");
    assert!(info.instructions.as_deref().unwrap_or_default().contains("list_sources"));

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "capture_errors",
            "get_action",
            "get_blocklist",
            "list_actions",
            "list_agents",
            "list_errors",
            "list_sources",
            "pause_actions",
            "place_log",
            "place_metric",
            "place_snapshot",
            "query_audit",
            "remove_action",
            "remove_all_actions",
            "resume_actions",
            "set_blocklist",
            "system_health"
        ]
    );
    let schema = |name: &str| tools.iter().find(|t| t.name == name).unwrap().input_schema.clone();
    let snap = schema("place_snapshot");
    for arg in
        ["agent_ids", "pool", "tags", "file", "line", "condition", "watch", "max_hits", "timeout_seconds", "wait"]
    {
        assert!(snap["properties"].get(arg).is_some(), "place_snapshot lacks `{arg}`");
    }
    assert_eq!(snap["properties"]["timeout_seconds"]["maximum"], 600);
    let log = schema("place_log");
    for arg in ["template", "level", "destination", "expire_seconds", "max_lines", "condition"] {
        assert!(log["properties"].get(arg).is_some(), "place_log lacks `{arg}`");
    }
    assert_eq!(log["properties"]["expire_seconds"]["maximum"], 86_400);
    let metric = schema("place_metric");
    for arg in ["kind", "end_file", "end_line", "expression", "expire_seconds"] {
        assert!(metric["properties"].get(arg).is_some(), "place_metric lacks `{arg}`");
    }
    let log_tool = tools.iter().find(|t| t.name == "place_log").unwrap();
    assert!(log_tool.description.as_deref().unwrap().contains("destination"));
    assert!(schema("get_action")["properties"].get("since").is_some());

    let prompts = client.list_all_prompts().await.unwrap();
    let names: Vec<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"investigate") && names.contains(&"summarize_hits"), "{names:?}");
    let prompt = client
        .get_prompt(
            rmcp::model::GetPromptRequestParams::new("investigate")
                .with_arguments(json!({"symptom": "EU totals are wrong"}).as_object().cloned().unwrap()),
        )
        .await
        .unwrap();
    assert!(format!("{:?}", prompt.messages).contains("EU totals are wrong"));
    client.cancel().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_finds_a_location_places_a_snapshot_and_reads_its_hits() {
    let fx = Fixture::start(test_config()).await;
    let client = connect(&fx.broker).await;

    let health = call(&client, "system_health", json!({})).await;
    assert_eq!(code(&health), None, "{}", text(&health));
    let h = body(&health);
    assert_eq!(h["caller"]["name"], "tester");
    assert_eq!(h["agents_online"], 1);
    assert_eq!(h["quotas"]["live_actions"]["limit"], 20);
    assert_eq!(h["quotas"]["live_actions"]["remaining"], 20);

    let agents = call(&client, "list_agents", json!({"pool": POOL, "tags": ["env:test"], "status": "online"})).await;
    let page = body(&agents);
    assert_eq!(page["items"][0]["agent_id"], fx.agent.id().as_str(), "{page}");
    assert_eq!(page["has_more"], false);
    assert!(text(&agents).contains(&fx.agent.id()));

    let line = event_line(&client).await;
    let sources = call(&client, "list_sources", json!({"agent_id": fx.agent.id(), "name": "mcp_checkout"})).await;
    assert!(text(&sources).contains("span `mcp_checkout`"), "{}", text(&sources));

    let placed = call(
        &client,
        "place_snapshot",
        json!({"pool": POOL, "tags": ["env:test"], "file": "it/mcp.rs", "line": line, "max_hits": 2, "timeout_seconds": 60}),
    )
    .await;
    assert_eq!(code(&placed), None, "{}", text(&placed));
    let b = body(&placed);
    let hits = b["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2, "{b}");
    assert_eq!(b["action"]["status"], "completed");
    let hit = &hits[0];
    assert_eq!(hit["agent_id"], fx.agent.id().as_str());
    assert_eq!(hit["location"]["line"], line);
    assert_eq!(hit["fields"]["total_cents"], json!({"type": "int", "value": 4200}));
    assert!(hit["fields"]["basket"].to_string().contains("Ada"), "{hit}");
    assert_eq!(hit["fields"]["note"]["original_len"], 300, "a truncation marker: 300 chars, 255 kept");
    // The second hit's span opened after the snapshot was armed (the first one's may
    // have opened before, while spans were not recorded).
    assert_eq!(hits[1]["spans"][0]["name"], "mcp_checkout", "{}", hits[1]);
    assert_eq!(hits[1]["spans"][0]["fields"]["basket_owner"]["value"], "Ada");
    assert!(hit["truncation"]["strings_shortened"].as_u64().unwrap() >= 1);
    // The model's text: one line per hit, values compact, cuts said out loud.
    let t = text(&placed);
    assert!(t.starts_with("2 hit(s) at it/mcp.rs:"), "{t}");
    assert!(t.contains("total_cents=4200") && t.contains("basket=") && t.contains("Ada"), "{t}");
    assert!(t.contains("…(300 chars)") && t.contains("strings shortened"), "{t}");
    assert!(t.contains("spans: mcp_checkout{basket_owner=\"Ada\"}"), "{t}");
    let id = b["action"]["action_id"].as_str().unwrap().to_owned();

    // Polling with a cursor returns only what is new.
    let all = body(&call(&client, "get_action", json!({"action_id": id, "since": 0})).await);
    assert_eq!(all["hits"].as_array().unwrap().len(), 2);
    assert_eq!(all["next_cursor"], 2);
    let newer = call(&client, "get_action", json!({"action_id": id, "since": 2})).await;
    let nb = body(&newer);
    assert_eq!(nb["hits"], json!([]));
    assert_eq!((nb["next_cursor"].as_u64(), nb["has_more"].as_bool()), (Some(2), Some(false)));
    assert_eq!(nb["action"]["agents"][0]["state"], "completed", "{nb}");
    let one = body(&call(&client, "get_action", json!({"action_id": id, "since": 1})).await);
    assert_eq!(one["hits"][0]["index"], 2);

    // Without waiting: the id at once (on code that has not run, so it stays live),
    // visible in list_actions, then removed.
    let later = call(
        &client,
        "place_snapshot",
        json!({"agent_ids": [fx.agent.id()], "file": "it/mcp.rs", "line": 1, "allow_pending": true, "wait": false}),
    )
    .await;
    assert_eq!(code(&later), None, "{}", text(&later));
    let later_id = body(&later)["action"]["action_id"].as_str().unwrap().to_owned();
    assert!(text(&later).contains("get_action"), "{}", text(&later));
    let active = body(&call(&client, "list_actions", json!({"status": "active"})).await);
    assert_eq!(active["items"][0]["action_id"], later_id.as_str(), "{active}");
    assert_eq!(active["total"], 1);
    let mine = body(&call(&client, "list_actions", json!({"created_by": "tester", "limit": 1})).await);
    assert_eq!((mine["total"].as_u64(), mine["has_more"].as_bool()), (Some(2), Some(true)));
    assert_eq!(mine["items"][0]["action_id"], later_id.as_str(), "newest first");
    let older = body(&call(&client, "list_actions", json!({"created_by": "tester", "limit": 1, "cursor": "1"})).await);
    assert_eq!(older["items"][0]["action_id"], id.as_str());
    let removed = call(&client, "remove_action", json!({"action_id": later_id})).await;
    assert_eq!(code(&removed), None, "{}", text(&removed));
    assert_eq!(body(&removed)["action"]["status"], "removed");
    let after = body(&call(&client, "get_action", json!({"action_id": later_id})).await);
    assert_eq!(after["action"]["status"], "removed");
    assert_eq!(body(&call(&client, "system_health", json!({})).await)["quotas"]["live_actions"]["used"], 0);

    client.cancel().await.unwrap();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_places_a_dynamic_log_and_a_counter_and_reads_them_back() {
    let mut config = test_config();
    config.agents.metric_report_interval_ms = 1_000;
    let fx = Fixture::start(config).await;
    let client = connect(&fx.broker).await;
    let line = event_line(&client).await;
    let r = call(
        &client,
        "place_log",
        json!({"pool": POOL, "file": "it/mcp.rs", "line": line, "template": "total {total_cents} for {basket.owner}",
               "max_lines": 3}),
    )
    .await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let log_id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    assert!(text(&r).contains("get_action"), "{}", text(&r));
    let r = call(&client, "get_action", json!({"action_id": log_id, "since": 0, "wait_seconds": 20})).await;
    let lines = body(&r)["lines"].as_array().cloned().unwrap_or_default();
    assert!(!lines.is_empty(), "{}", text(&r));
    assert_eq!(lines[0]["text"], "total 4200 for Ada", "{}", text(&r));
    assert!(text(&r).contains("total 4200 for Ada"), "{}", text(&r));

    let r = call(&client, "place_metric", json!({"pool": POOL, "kind": "counter", "file": "it/mcp.rs", "line": line}))
        .await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let metric_id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    let counted = eventually(Duration::from_secs(20), "a counter report", || async {
        let r = call(&client, "get_action", json!({"action_id": metric_id})).await;
        let count = body(&r)["action"]["figures"]["total"]["count"].as_u64().unwrap_or(0);
        (count > 0).then(|| text(&r))
    })
    .await;
    assert!(counted.contains("total: count="), "{counted}");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_arrive_while_a_snapshot_waits() {
    let fx = Fixture::start(test_config()).await;
    let client = connect(&fx.broker).await;
    let line = event_line(&client).await;
    let progress = client.service().progress.clone();

    // Snapshots fire at most once a second per action, so three hits take seconds.
    let placed =
        call(&client, "place_snapshot", json!({"pool": POOL, "file": "it/mcp.rs", "line": line, "max_hits": 3})).await;
    assert_eq!(code(&placed), None, "{}", text(&placed));
    assert_eq!(body(&placed)["hits"].as_array().unwrap().len(), 3);
    let seen = eventually(Duration::from_secs(5), "progress 1/3 and 2/3", || {
        let progress = progress.clone();
        async move {
            let notes = progress.lock().unwrap().clone();
            let has = |n: f64| notes.iter().any(|p| p.progress == n && p.total == Some(3.0));
            (has(1.0) && has(2.0)).then_some(notes)
        }
    })
    .await;
    // rmcp's client hands each notification to the handler on its own task, so the
    // order they are recorded in is not the wire order: check the values, sorted.
    let mut values: Vec<f64> = seen.iter().map(|p| p.progress).collect();
    values.sort_by(f64::total_cmp);
    assert!(values.windows(2).all(|w| w[0] < w[1]), "each progress value once, increasing: {values:?}");
    assert!(seen.iter().any(|p| p.message.as_deref() == Some("1 of 3 hit(s) collected")), "{seen:?}");

    client.cancel().await.unwrap();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_works_without_a_session_under_the_sessionless_protocol() {
    let fx = Fixture::start(test_config()).await;
    let recorder = Recorder::default();
    let progress = recorder.progress.clone();
    let config =
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", fx.broker.http())).auth_header(API_KEY);
    let lifecycle =
        ClientLifecycleMode::Discover { preferred_versions: vec![rmcp::model::ProtocolVersion::V_2026_07_28] };
    let client = recorder
        .serve_with_lifecycle(StreamableHttpClientTransport::from_config(config), lifecycle)
        .await
        .expect("server/discover succeeds");
    assert_eq!(client.peer_info().unwrap().protocol_version, rmcp::model::ProtocolVersion::V_2026_07_28);

    // Each call stands alone: the key is checked and the caller known on every request.
    let health = body(&call(&client, "system_health", json!({})).await);
    assert_eq!(health["caller"]["name"], "tester", "{health}");
    let line = event_line(&client).await;
    let placed =
        call(&client, "place_snapshot", json!({"pool": POOL, "file": "it/mcp.rs", "line": line, "max_hits": 2})).await;
    assert_eq!(code(&placed), None, "{}", text(&placed));
    let id = body(&placed)["action"]["action_id"].as_str().unwrap().to_owned();
    let newer = body(&call(&client, "get_action", json!({"action_id": id, "since": 1})).await);
    assert_eq!(newer["hits"][0]["index"], 2);
    eventually(Duration::from_secs(5), "progress on the request's own stream", || {
        let progress = progress.clone();
        async move { progress.lock().unwrap().iter().any(|p| p.progress == 1.0).then_some(()) }
    })
    .await;
    client.cancel().await.unwrap();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_a_model_can_act_on_comes_back_as_a_tool_result_with_its_code() {
    let mut config = test_config();
    config.api_keys.push(ApiKeyConfig {
        scopes: Some(vec!["mcp:agents:read".into(), "mcp:hits:read".into()]),
        ..ApiKeyConfig::new("dashboard", "dashboard-key-0123456789")
    });
    let fx = Fixture::start(config).await;
    let client = connect(&fx.broker).await;
    let line = event_line(&client).await;
    let snap = |extra: Value| {
        let mut args = json!({"pool": POOL, "file": "it/mcp.rs", "line": line});
        for (k, v) in extra.as_object().unwrap() {
            args[k] = v.clone();
        }
        args
    };

    // invalid_input, naming the allowed range; nothing is placed.
    let r = call(&client, "place_snapshot", snap(json!({"max_hits": 51}))).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"));
    assert!(text(&r).contains("1..=50"), "{}", text(&r));
    let r = call(&client, "place_snapshot", snap(json!({"timeout_seconds": 601}))).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"));
    assert_eq!(body(&r)["error"]["details"]["max"], 600);
    let r = call(&client, "place_snapshot", snap(json!({"timeout": 5}))).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"));
    assert!(text(&r).contains("`timeout`") && text(&r).contains("timeout_seconds"), "{}", text(&r));
    let r = call(&client, "list_agents", json!({"status": "Online"})).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"), "{}", text(&r));
    let r = call(&client, "get_action", json!({"action_id": "agt_notanaction"})).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"));
    assert_eq!(body(&call(&client, "list_actions", json!({})).await)["total"], 0, "nothing was placed");

    // not_found.
    let unknown = periscope_protocol::ActionId::generate().to_string();
    let r = call(&client, "get_action", json!({"action_id": unknown})).await;
    assert_eq!(code(&r).as_deref(), Some("not_found"));
    assert!(text(&r).contains("list_actions"), "{}", text(&r));

    // A pool nobody knows (or one outside the key's reach: the same answer) is not_found,
    // with the pools that are online.
    let r = call(&client, "place_snapshot", snap(json!({"pool": "nowhere"}))).await;
    assert_eq!(code(&r).as_deref(), Some("not_found"));
    assert_eq!(body(&r)["error"]["details"]["online_pools"][0]["pool"], POOL);
    // no_matching_agents: the pool exists but no online agent carries the tags.
    let r = call(&client, "place_snapshot", snap(json!({"tags": ["env:nowhere"]}))).await;
    assert_eq!(code(&r).as_deref(), Some("no_matching_agents"));
    assert_eq!(body(&r)["error"]["details"]["online_pools"][0]["pool"], POOL);

    // no_such_location, with the nearest locations.
    let r = call(&client, "place_snapshot", snap(json!({"line": line + 500}))).await;
    assert_eq!(code(&r).as_deref(), Some("no_such_location"), "{}", text(&r));
    let nearest = body(&r)["error"]["details"]["nearest"].as_array().cloned().unwrap();
    assert!(nearest.iter().any(|n| n["line"] == line), "{nearest:?}");
    assert!(text(&r).contains(&format!("it/mcp.rs:{line}")), "{}", text(&r));

    // expired: code that never runs, with advice.
    let r =
        call(&client, "place_snapshot", snap(json!({"line": 1, "allow_pending": true, "timeout_seconds": 1}))).await;
    assert_eq!(code(&r).as_deref(), Some("expired"), "{}", text(&r));
    assert!(text(&r).contains("list_sources") && text(&r).contains("timeout_seconds"), "{}", text(&r));

    // invalid_input for logs and metrics too: a bad template names its position; a
    // duration on an event says what to do instead.
    let r = call(
        &client,
        "place_log",
        json!({"pool": POOL, "file": "it/mcp.rs", "line": line, "template": "t {total_cents +}"}),
    )
    .await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"), "{}", text(&r));
    assert!(text(&r).contains("template: at column"), "{}", text(&r));
    let r = call(&client, "place_metric", json!({"pool": POOL, "kind": "duration", "file": "it/mcp.rs", "line": line}))
        .await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"), "{}", text(&r));
    assert!(text(&r).contains("end_file"), "{}", text(&r));

    // insufficient_scope, per call: the dashboard key reads but cannot place.
    let dash = connect_with(&fx.broker, "dashboard-key-0123456789").await.unwrap();
    let r = call(&dash, "list_agents", json!({})).await;
    assert_eq!(code(&r), None);
    let r = call(&dash, "place_snapshot", snap(json!({}))).await;
    assert_eq!(code(&r).as_deref(), Some("insufficient_scope"));
    assert!(text(&r).contains("mcp:actions:write"), "{}", text(&r));
    let r = call(&dash, "system_health", json!({})).await;
    assert_eq!(body(&r)["error"]["details"]["required_scope"], "mcp:system:read");
    // The REST API applies the same check.
    let rest = reqwest::Client::new()
        .post(format!("{}/api/v1/actions", fx.broker.http()))
        .bearer_auth("dashboard-key-0123456789")
        .json(&snap(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 403);
    let rest: Value = rest.json().await.unwrap();
    assert_eq!(rest["error"]["code"], "insufficient_scope");
    dash.cancel().await.unwrap();

    // quota_exceeded on the 21st live action, with when to retry.
    for _ in 0..20 {
        let r = call(
            &client,
            "place_snapshot",
            snap(json!({"line": 1, "allow_pending": true, "wait": false, "timeout_seconds": 300})),
        )
        .await;
        assert_eq!(code(&r), None, "{}", text(&r));
    }
    let r = call(&client, "place_snapshot", snap(json!({"line": 1, "allow_pending": true, "wait": false}))).await;
    assert_eq!(code(&r).as_deref(), Some("quota_exceeded"));
    let retry = body(&r)["error"]["details"]["retry_after_seconds"].as_u64().unwrap();
    assert!((1..=300).contains(&retry), "{retry}");
    assert!(text(&r).contains("remove_action"), "{}", text(&r));
    let h = body(&call(&client, "system_health", json!({})).await);
    assert_eq!(h["quotas"]["live_actions"]["remaining"], 0);
    // REST says the same, with a Retry-After header.
    let rest = reqwest::Client::new()
        .post(format!("{}/api/v1/actions", fx.broker.http()))
        .bearer_auth(API_KEY)
        .json(&snap(json!({"line": 1, "allow_pending": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 429);
    assert!(rest.headers().get("retry-after").is_some());

    client.cancel().await.unwrap();
    fx.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An agent speaking the wire protocol that cannot run any action it is sent (like an
/// old agent version): it answers every `action_add` with an `error` status.
async fn refusing_agent(broker: &TestBroker) -> tokio::task::JoinHandle<()> {
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse().unwrap());
    let (mut ws, _): (Ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let register = json!({
        "type": "register", "protocol_version": 1, "agent_id": "agt_legacybilling", "display_name": "legacy-billing",
        "pool": "legacy", "tags": [], "service": "billing", "language": "cobol", "agent_version": "0.0.1"
    });
    ws.send(Message::text(register.to_string())).await.unwrap();
    let catalog = json!({"type": "catalog", "full": true, "entries": [
        {"file": "src/billing.cbl", "line": 120, "kind": "event", "name": "charge", "fields": ["amount"], "hits": 9}
    ]});
    ws.send(Message::text(catalog.to_string())).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = ws.next().await {
            let Message::Text(t) = frame else { continue };
            let msg: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
            if msg["type"] == "action_add" {
                let status = json!({
                    "type": "action_status", "action_id": msg["action"]["id"], "state": "error",
                    "reason": "this agent cannot capture values in paragraphs"
                });
                if ws.send(Message::text(status.to_string())).await.is_err() {
                    break;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_every_agent_refuses_is_an_agent_error_with_their_reasons() {
    let broker = TestBroker::start().await;
    let agent = refusing_agent(&broker).await;
    let api = broker.api();
    eventually(Duration::from_secs(10), "the legacy agent's catalog", || {
        let api = api.clone();
        async move { api.find_source("billing.cbl", "charge").await }
    })
    .await;
    let client = connect(&broker).await;
    let r = call(
        &client,
        "place_snapshot",
        json!({"pool": "legacy", "file": "billing.cbl", "line": 120, "timeout_seconds": 60}),
    )
    .await;
    assert_eq!(code(&r).as_deref(), Some("agent_error"), "{}", text(&r));
    assert!(text(&r).contains("legacy-billing: this agent cannot capture values in paragraphs"), "{}", text(&r));
    let details = body(&r)["error"]["details"].clone();
    assert_eq!(details["agents"][0]["agent_id"], "agt_legacybilling");
    // Nothing will come: the action was removed, freeing the caller's quota.
    let id = details["action_id"].as_str().unwrap();
    let after = body(&call(&client, "get_action", json!({"action_id": id})).await);
    assert_eq!(after["action"]["status"], "removed");
    client.cancel().await.unwrap();
    agent.abort();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_endpoint_refuses_missing_keys_and_foreign_hosts() {
    let broker = TestBroker::start().await;
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "curl", "version": "0"}}});
    let post = || {
        http.post(format!("{}/mcp", broker.http())).header("accept", "application/json, text/event-stream").json(&init)
    };

    // No key: 401 pointing at the RFC 9728 metadata, which is served.
    let resp = post().send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let metadata_url = format!("{}/.well-known/oauth-protected-resource", broker.http());
    assert!(challenge.starts_with(&format!("Bearer resource_metadata=\"{metadata_url}\"")), "{challenge}");
    let metadata: Value = http.get(&metadata_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(metadata["resource"], format!("{}/mcp", broker.http()));
    assert_eq!(metadata["bearer_methods_supported"], json!(["header"]));
    // A wrong key, through a real MCP client: it reports that authorization is required.
    let err = connect_with(&broker, "not-a-key-0000000000").await.err().expect("refused");
    assert!(err.is_authorization_required(), "{err}");

    // With the key, the endpoint answers; a foreign Host or Origin (DNS rebinding) does not.
    assert_eq!(post().bearer_auth(API_KEY).send().await.unwrap().status(), 200);
    let resp = post().bearer_auth(API_KEY).header("host", "attacker.example").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = post().bearer_auth(API_KEY).header("origin", "http://attacker.example").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = post().bearer_auth(API_KEY).header("origin", "http://localhost:6274").send().await.unwrap();
    assert_eq!(resp.status(), 200, "a page served from loopback (the MCP Inspector) may call");
    // Bodies beyond the limit are refused.
    let big = json!({"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x".repeat(300 * 1024)}});
    let resp = http
        .post(format!("{}/mcp", broker.http()))
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(API_KEY)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_drives_the_whole_flow() {
    let python = std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PERISCOPE_PYTHON is not set: run the tests through scripts/test, which creates .venv from \
             requirements-dev.txt (with the `mcp` SDK), or set PERISCOPE_PYTHON to a python that has it"
        )
    });
    let fx = Fixture::start(test_config()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/it/mcp_python_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script)
            .arg(format!("{}/mcp", fx.broker.http()))
            .arg(API_KEY)
            .arg(POOL)
            .arg("it/mcp.rs")
            .arg("total_cents")
            .output(),
    )
    .await
    .expect("the Python client finishes within 120 s")
    .expect("the Python interpreter runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        stderr.chars().take(4_000).collect::<String>()
    );
    let steps: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!(step("initialize")["server"], "periscope");
    assert_eq!(step("place_snapshot")["hits"], 2);
    assert_eq!(step("place_snapshot")["field"], json!({"type": "int", "value": 4200}));
    let progress = step("place_snapshot")["progress"].as_array().cloned().unwrap_or_default();
    assert!(progress.iter().any(|p| p["progress"] == 1.0 && p["total"] == 2.0), "{progress:?}");
    assert_eq!(step("get_action")["next_cursor"], 2);
    assert!(step("invalid_input")["message"].as_str().unwrap_or_default().contains("1..=50"));
    assert_eq!(steps.last().map(|s| s["step"].clone()), Some(json!("done")));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_output_validates_and_resources_logging_completion_and_the_kill_switch_work() {
    let python = std::env::var("PERISCOPE_PYTHON")
        .unwrap_or_else(|_| panic!("PERISCOPE_PYTHON is not set: run the tests through scripts/test"));
    let fx = Fixture::start(test_config()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/it/mcp_surface.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script)
            .arg(format!("{}/mcp", fx.broker.http()))
            .arg(API_KEY)
            .arg(crate::support::ADMIN_KEY)
            .arg(POOL)
            .arg("it/mcp.rs")
            .arg("total_cents")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finishes within 120 s")
    .expect("the Python interpreter runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        stderr.chars().take(4_000).collect::<String>()
    );
    let steps: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!(step("validated")["tools"].as_array().map(Vec::len), Some(17), "{stdout}");
    assert!(step("resources")["updates"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(steps.last().map(|s| s["step"].clone()), Some(json!("done")));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_snapshot_runs_as_a_task_that_the_client_polls_or_cancels() {
    use rmcp::model::{
        CallToolResponse, CancelTaskParams, ClientCapabilities, ClientConfig, GetTaskParams, Implementation,
        TaskPayload, TaskStatus,
    };
    let fx = Fixture::start(test_config()).await;
    let config =
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", fx.broker.http())).auth_header(API_KEY);
    let client =
        ClientConfig::new(ClientCapabilities::builder().enable_tasks().build(), Implementation::from_build_env())
            .serve(StreamableHttpClientTransport::from_config(config))
            .await
            .unwrap();
    let api = fx.broker.api();
    // The workload's callsite reaches the catalog once it has run: wait for it, as every
    // other test does (a single look raced the workload's first iteration).
    let source = crate::support::eventually(Duration::from_secs(30), "the location in the catalog", || {
        let api = api.clone();
        async move { api.find_source("it/mcp.rs", "total_cents").await }
    })
    .await;
    let args = |max_hits: u32| {
        json!({ "pool": POOL, "file": source["file"], "line": source["line"], "max_hits": max_hits, "timeout_seconds": 30 })
            .as_object()
            .cloned()
            .unwrap()
    };
    let task_of = |r: CallToolResponse| match r {
        CallToolResponse::Task(t) => t.task,
        other => panic!("expected a task, got {other:?}"),
    };
    // Polled to completion: the same result as the blocking call.
    let task = task_of(
        client.call_tool_once(CallToolRequestParams::new("place_snapshot").with_arguments(args(2))).await.unwrap(),
    );
    let done = crate::support::eventually(Duration::from_secs(30), "the task completes", || {
        let (peer, id) = (client.peer().clone(), task.task_id.clone());
        async move {
            let t = peer.get_task(GetTaskParams::new(id)).await.ok()?.task;
            t.status().is_terminal().then_some(t)
        }
    })
    .await;
    let TaskPayload::Completed { result } = done.payload else { panic!("not completed: {:?}", done.payload) };
    let result: CallToolResult = serde_json::from_value(Value::Object(result)).unwrap();
    assert_eq!(code(&result), None, "{result:?}");
    assert_eq!(body(&result)["hits"].as_array().map(Vec::len), Some(2));

    // Cancelled: the snapshot is removed.
    let task = task_of(
        client
            .call_tool_once(CallToolRequestParams::new("place_snapshot").with_arguments({
                let mut a = args(50);
                a.insert("condition".into(), json!("total_cents < 0"));
                a
            }))
            .await
            .unwrap(),
    );
    client.peer().cancel_task(CancelTaskParams::new(task.task_id.clone())).await.unwrap();
    let status = crate::support::eventually(Duration::from_secs(10), "the task is cancelled", || {
        let (peer, id) = (client.peer().clone(), task.task_id.clone());
        async move {
            let t = peer.get_task(GetTaskParams::new(id)).await.ok()?.task;
            t.status().is_terminal().then_some(t.status())
        }
    })
    .await;
    assert_eq!(status, TaskStatus::Cancelled);
    let (_, listed) = api.get("/actions?status=active").await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(0), "the cancelled snapshot was removed: {listed}");

    // Refusals are ordinary results, not tasks.
    let bad =
        client.call_tool_once(CallToolRequestParams::new("place_snapshot").with_arguments(args(99))).await.unwrap();
    let CallToolResponse::Complete(bad) = bad else { panic!("a refusal is no task") };
    assert_eq!(code(&bad).as_deref(), Some("invalid_input"));
    client.cancel().await.unwrap();
    fx.stop().await;
}
