//! The test harness: start a broker on loopback, attach agents with a private
//! subscriber, talk to the REST API, poll until something holds.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use periscope_broker::BrokerConfig;
use periscope_broker::auth::Role;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use periscope_broker::quota::CallerQuotaOverrides;
use serde_json::Value as Json;
use tokio::sync::oneshot;
use tracing::Dispatch;
use tracing_subscriber::prelude::*;

/// A `developer` of `default`.
pub const API_KEY: &str = "test-api-key-0123456789";
/// A `company_admin` of `default` (keys, redaction rules, audit).
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const AGENT_KEY: &str = "test-agent-key-0123456789";

/// A broker running in this process on a loopback port.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub data_dir: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Room for the harness's polling loops (every 50 ms): the tests that are about the
/// call rate use keys of their own with small budgets.
pub fn polling_quotas() -> Option<CallerQuotaOverrides> {
    Some(CallerQuotaOverrides { calls_per_minute: Some(60_000), call_burst: Some(10_000), ..Default::default() })
}

pub fn test_config() -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.api_keys.push(ApiKeyConfig { quotas: polling_quotas(), ..ApiKeyConfig::new("tester", API_KEY) });
    config.api_keys.push(ApiKeyConfig {
        quotas: polling_quotas(),
        ..ApiKeyConfig::new("admin", ADMIN_KEY).with_role(Role::CompanyAdmin)
    });
    config.agent_keys.push(AgentKeyConfig::any_pool(AGENT_KEY));
    config.agents.heartbeat_interval_secs = 1;
    // The agents under test are unoptimized builds on a shared two-core machine, where a
    // firing costs tens of times what it does in a release build and the agent's clock
    // (wall time) also counts the time its thread waits to be scheduled. Under the
    // production budget (1% of a core, 1 ms burst) a busy machine pauses any steady
    // workload for `quota_cpu`, which is that budget doing its job, and not what the
    // tests that use this configuration are about; they get most of a core instead.
    config.quotas.cpu_fraction = 0.5;
    config.quotas.cpu_burst_micros = 200_000;
    // The harness's keys poll fast (`polling_quotas`); their organization's ceiling
    // sits above them. Tests about the ceiling lower it.
    config.org_quotas.calls_per_minute = Some(600_000);
    config.org_quotas.call_burst = Some(100_000);
    config
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(test_config(), "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_with(config: BrokerConfig, addr: SocketAddr) -> TestBroker {
        // `run` validates too, but a refusal there only shows as a refused connection.
        if let Err(e) = config.validate() {
            panic!("the test configuration is invalid: {e}");
        }
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(periscope_broker::run(listener, config, async move {
            let _ = stopped.await;
        }));
        TestBroker { addr, data_dir: None, stop: Some(stop), task: Some(task) }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/agents", self.addr)
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn api(&self) -> Api {
        self.api_with(API_KEY)
    }

    /// A REST client with another key.
    pub fn api_with(&self, key: &str) -> Api {
        Api { client: reqwest::Client::new(), base: format!("{}/api/v1", self.http()), key: key.into() }
    }

    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(result.is_ok(), "broker did not stop within 10 s");
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A REST client with the test API key.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    pub key: String,
}

impl Api {
    pub async fn get(&self, path: &str) -> (u16, Json) {
        let resp = self.client.get(format!("{}{path}", self.base)).bearer_auth(&self.key).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Json::Null))
    }

    pub async fn post(&self, path: &str, body: Json) -> (u16, Json) {
        let resp =
            self.client.post(format!("{}{path}", self.base)).bearer_auth(&self.key).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Json::Null))
    }

    pub async fn put(&self, path: &str, body: Json) -> (u16, Json) {
        let resp =
            self.client.put(format!("{}{path}", self.base)).bearer_auth(&self.key).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Json::Null))
    }

    pub async fn delete(&self, path: &str) -> (u16, Json) {
        let resp = self.client.delete(format!("{}{path}", self.base)).bearer_auth(&self.key).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Json::Null))
    }

    /// The first source whose name or fields contain `text` in a file ending with `file`.
    pub async fn find_source(&self, file: &str, text: &str) -> Option<Json> {
        let (_, page) = self.get(&format!("/sources?file={file}&q={text}&limit=200")).await;
        page["items"].as_array()?.iter().find(|s| s["file"].as_str().is_some_and(|f| f.ends_with(file))).cloned()
    }
}

/// An agent attached to a private subscriber (an `fmt` layer writing to a sink plus
/// the agent), so tests do not share global state.
pub struct TestAgent {
    pub agent: Option<periscope_agent::Agent>,
    pub dispatch: Dispatch,
}

/// The host's own log output, captured (an `fmt` layer's writer).
#[derive(Clone, Default)]
pub struct HostLog(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl HostLog {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for HostLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for HostLog {
    type Writer = HostLog;
    fn make_writer(&'a self) -> HostLog {
        self.clone()
    }
}

impl TestAgent {
    /// An agent whose host logs INFO and above into `log`.
    pub fn start_logging(broker_ws: &str, pool: &str, tags: &[&str], log: HostLog) -> TestAgent {
        let agent = Self::agent(broker_ws, pool, tags);
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(log)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(agent.layer());
        TestAgent { dispatch: Dispatch::new(subscriber), agent: Some(agent) }
    }

    fn agent(broker_ws: &str, pool: &str, tags: &[&str]) -> periscope_agent::Agent {
        Self::agent_with_key(broker_ws, AGENT_KEY, pool, tags)
    }

    fn agent_with_key(broker_ws: &str, key: &str, pool: &str, tags: &[&str]) -> periscope_agent::Agent {
        Self::builder(broker_ws, key, pool, tags).start().expect("agent starts")
    }

    fn builder(broker_ws: &str, key: &str, pool: &str, tags: &[&str]) -> periscope_agent::AgentBuilder {
        periscope_agent::Agent::builder()
            .broker_url(broker_ws)
            .agent_key(key)
            .pool(pool)
            .tags(tags.iter().copied())
            .service("it-service")
            .reconnect_initial(Duration::from_millis(100))
            .reconnect_max(Duration::from_millis(500))
    }

    /// An agent of a service at `version`, built from `build`.
    pub fn start_version(broker_ws: &str, pool: &str, version: &str, build: &str) -> TestAgent {
        let agent = Self::builder(broker_ws, AGENT_KEY, pool, &[])
            .service_version(version)
            .build_commit(build)
            .start()
            .expect("agent starts");
        Self::attached(agent)
    }

    fn attached(agent: periscope_agent::Agent) -> TestAgent {
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(agent.layer());
        TestAgent { dispatch: Dispatch::new(subscriber), agent: Some(agent) }
    }

    pub fn start(broker_ws: &str, pool: &str, tags: &[&str]) -> TestAgent {
        Self::start_with_key(broker_ws, AGENT_KEY, pool, tags)
    }

    /// An agent registering with another agent key.
    pub fn start_with_key(broker_ws: &str, key: &str, pool: &str, tags: &[&str]) -> TestAgent {
        let agent = Self::agent_with_key(broker_ws, key, pool, tags);
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(agent.layer());
        TestAgent { dispatch: Dispatch::new(subscriber), agent: Some(agent) }
    }

    pub fn id(&self) -> String {
        self.agent.as_ref().unwrap().id().to_string()
    }

    /// Runs `f` on a fresh thread with this agent's subscriber as the default.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let dispatch = self.dispatch.clone();
        std::thread::spawn(move || tracing::dispatcher::with_default(&dispatch, f))
    }

    pub fn shutdown(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown(Duration::from_secs(2));
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
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

/// Waits until `agent_id` reports the action installed (or a state only an installed
/// action reaches: a busy agent may install, fire, pause or complete between two polls).
pub async fn wait_installed(api: &Api, action_id: &str, agent_id: &str) {
    let agent = agent_id.to_owned();
    wait_action(api, action_id, "the action installed on the agent", move |a| {
        a["agents"].as_array().is_some_and(|agents| {
            agents.iter().any(|x| {
                x["agent_id"] == agent.as_str()
                    && matches!(
                        x["state"].as_str(),
                        Some("installed" | "paused" | "resumed" | "completed" | "eval_error")
                    )
            })
        })
    })
    .await;
}

/// Waits until the action's JSON satisfies `check`; returns it.
pub async fn wait_action(api: &Api, action_id: &str, what: &str, check: impl Fn(&Json) -> bool) -> Json {
    let timeout = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, a) = api.get(&format!("/actions/{action_id}")).await;
        if check(&a) {
            return a;
        }
        // The last answer is in the message: the state the action was left in says why
        // it never got there.
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}; the action:\n{a:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker lists `agent_id` online.
pub async fn wait_online(api: &Api, agent_id: &str) {
    let api = api.clone();
    let id = agent_id.to_owned();
    eventually(Duration::from_secs(10), "agent online", move || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let (status, v) = api.get(&format!("/agents/{id}")).await;
            (status == 200 && v["status"] == "online").then_some(())
        }
    })
    .await
}

/// A fresh data directory under the system's temporary directory.
pub fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("periscope-it-{what}-{}", periscope_protocol::ActionId::generate()))
}

/// Creates a key through `POST /api/v1/keys` with `api`'s key; returns (secret, key id).
pub async fn create_key(api: &Api, body: Json) -> (String, String) {
    let (status, v) = api.post("/keys", body.clone()).await;
    assert_eq!(status, 201, "creating {body}: {v}");
    (v["secret"].as_str().unwrap().to_owned(), v["key"]["key_id"].as_str().unwrap().to_owned())
}

/// The audit trail as `api`'s key sees it (every page).
pub async fn audit(api: &Api, query: &str) -> Vec<Json> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = api.get(&format!("/audit?limit=500{query}{cursor}")).await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// Shared flag to stop background workloads.
pub type Stop = Arc<std::sync::atomic::AtomicBool>;

/// A WebSocket agent driven frame by frame (what a hostile or broken agent can send).
pub struct RawAgent {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

/// A registration frame for a raw agent.
pub fn registration(agent_id: &str, pool: &str) -> Json {
    serde_json::json!({"type": "register", "protocol_version": 1, "agent_id": agent_id, "display_name": agent_id,
                       "pool": pool, "tags": [], "service": "raw", "language": "test", "agent_version": "0",
                       "host": "raw-host", "pid": 1})
}

impl RawAgent {
    /// Opens a socket with `key`; the HTTP status when the upgrade is refused.
    pub async fn connect(broker: &TestBroker, key: &str) -> Result<RawAgent, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut req = broker.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(RawAgent { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }

    /// Connects and registers; returns the agent and the broker's first answer
    /// (`registered`, or the error frame refusing it).
    pub async fn register(broker: &TestBroker, key: &str, agent_id: &str, pool: &str) -> (RawAgent, Json) {
        let mut agent = Self::connect(broker, key).await.unwrap_or_else(|s| panic!("upgrade refused: {s}"));
        agent.send(registration(agent_id, pool)).await;
        let first = agent.next().await.unwrap_or(Json::Null);
        (agent, first)
    }

    /// Registers and expects to be accepted; reads up to the `action_sync`, returns it.
    pub async fn registered(broker: &TestBroker, key: &str, agent_id: &str, pool: &str) -> (RawAgent, Json) {
        let (mut agent, first) = Self::register(broker, key, agent_id, pool).await;
        assert_eq!(first["type"], "registered", "{agent_id} refused: {first}");
        let sync = agent.until("action_sync").await;
        (agent, sync)
    }

    pub async fn send(&mut self, frame: Json) {
        use futures_util::SinkExt as _;
        let _ = self.ws.send(tokio_tungstenite::tungstenite::Message::text(frame.to_string())).await;
    }

    /// The next text frame as JSON (skipping pings), or None once the socket closed.
    pub async fn next(&mut self) -> Option<Json> {
        use futures_util::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await.expect("a frame within 30 s") {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Frames until one of type `kind` (panics if the socket closes first).
    pub async fn until(&mut self, kind: &str) -> Json {
        loop {
            match self.next().await {
                Some(v) if v["type"] == kind => return v,
                Some(_) => {}
                None => panic!("closed before a `{kind}` frame"),
            }
        }
    }

    /// Publishes one catalog entry (an event at `file`:`line` with `fields`).
    pub async fn publish(&mut self, file: &str, line: u32, fields: &[&str]) {
        self.send(serde_json::json!({"type": "catalog", "full": false, "entries": [
            {"file": file, "line": line, "kind": "event", "name": format!("event {file}:{line}"), "fields": fields}
        ]}))
        .await;
    }

    /// Sends one hit for `action_id`.
    pub async fn hit(&mut self, action_id: &str, file: &str, line: u32, seq: u64) {
        self.send(serde_json::json!({"type": "hit", "action_id": action_id, "seq": seq, "time_ms": 1,
                                     "location": {"file": file, "line": line},
                                     "fields": {"n": {"type": "int", "value": seq}}}))
            .await;
    }
}

/// Several broker nodes in this process sharing one `redis-server` the test started.
pub struct TestCluster {
    pub redis: periscope_broker::backend::redis::server::RedisServer,
    pub nodes: Vec<TestBroker>,
}

impl TestCluster {
    /// `n` nodes named `a`, `b`, `c`, ... on loopback port 0.
    pub async fn start(n: usize) -> TestCluster {
        Self::start_with(n, |_| {}).await
    }

    /// `n` nodes whose configuration `tweak` adjusts (after the harness's own).
    pub async fn start_with(n: usize, tweak: impl Fn(&mut BrokerConfig)) -> TestCluster {
        let redis = periscope_broker::backend::redis::server::RedisServer::start().expect("redis-server starts");
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(TestBroker::start_with(Self::config(&redis, i, &tweak), "127.0.0.1:0".parse().unwrap()).await);
        }
        TestCluster { redis, nodes }
    }

    /// The configuration of node `i`.
    pub fn config(
        redis: &periscope_broker::backend::redis::server::RedisServer,
        i: usize,
        tweak: &impl Fn(&mut BrokerConfig),
    ) -> BrokerConfig {
        let mut config = test_config();
        config.cluster.redis_url = Some(redis.url());
        config.cluster.node_name = Some(((b'a' + i as u8) as char).to_string());
        tweak(&mut config);
        config
    }

    pub fn node(&self, i: usize) -> &TestBroker {
        &self.nodes[i]
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}
