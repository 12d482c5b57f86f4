//! `periscope loadtest`: drives a running broker (one node or a cluster) with simulated
//! agents speaking the real protocol over real WebSockets and with callers over REST and
//! MCP (streamable HTTP, the client an assistant uses), and
//! reports what the broker accepted, what it dropped and why, the latencies callers saw,
//! and the broker's memory and CPU.
//!
//! The figures in BENCHMARKS.md's system sections come from here. Everything the load
//! generator keeps is bounded: latencies go into fixed-size log histograms, error messages
//! are kept for the first few distinct kinds only, and each simulated agent holds at
//! most [`MAX_ACTIONS_PER_AGENT`] actions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use periscope_protocol::{
    ActionId, ActionKind, AgentId, AgentMessage, BrokerMessage, CatalogEntry, CatalogUpdate, Field, Heartbeat,
    Histogram, Hit, HitLocation, LocationKind, LogLevel, LogLine, MetricReport, Registration, Value,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Most live actions one simulated agent tracks; a broker sending more is counted, not obeyed.
pub const MAX_ACTIONS_PER_AGENT: usize = 1_000;

/// Distinct error messages kept (each with its count); further kinds are only counted.
const MAX_ERROR_KINDS: usize = 32;

/// What to run, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Broker base URLs (`http://host:port`); agents and callers are spread over them.
    pub brokers: Vec<url::Url>,
    /// API key of the callers (needs `mcp:actions:write`, `mcp:hits:read`, and
    /// `mcp:system:read` for the broker's counters).
    pub api_key: String,
    /// Agent key the simulated agents register with.
    pub agent_key: String,
    /// Pool the agents register into.
    pub pool: String,
    /// Simulated agents.
    pub agents: usize,
    /// Services the agents are spread over (identical catalogs within a service).
    pub services: usize,
    /// Catalog entries per service.
    pub locations: usize,
    /// Callers placing snapshots and waiting for their hits (`wait_seconds`).
    pub callers: usize,
    /// Callers placing snapshots and polling for their hits (no wait).
    pub pollers: usize,
    /// Callers doing the same over MCP (streamable HTTP, one MCP session each), waiting
    /// with `get_action`'s `wait_seconds`.
    pub mcp_callers: usize,
    /// MCP callers polling `get_action` without waiting.
    pub mcp_pollers: usize,
    /// How long the measured window lasts.
    pub duration: Duration,
    /// Hits per snapshot a caller asks for (`max_hits`, 1..=50).
    pub max_hits: u32,
    /// Hits per second a running callsite fires per agent per snapshot action.
    pub hit_rate: f64,
    /// Approximate size of one hit on the wire, in bytes.
    pub hit_bytes: usize,
    /// Dynamic log lines per second per agent (one log action per service is placed
    /// when above zero).
    pub log_rate: f64,
    /// Metric report interval (one metric action per service is placed when set).
    pub metric_interval: Option<Duration>,
    /// Whether callers target one agent (`agent`) or every agent of a service (`service`).
    pub target_service: bool,
    /// The broker's process id, to read its memory and CPU from `/proc`.
    pub broker_pid: Option<u32>,
    /// Agents connecting at once.
    pub connect_concurrency: usize,
    /// Print the report as JSON.
    pub json: bool,
}

impl Options {
    /// Checks the combination of flags makes a run, with a sentence for each problem.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.brokers.is_empty() {
            bail!("--broker: give at least one broker URL (http://host:port), or set PERISCOPE_URL");
        }
        for b in &self.brokers {
            if !matches!(b.scheme(), "http" | "https") {
                bail!("--broker {b}: the URL must start with http:// or https://");
            }
        }
        if self.api_key.is_empty() {
            bail!("--api-key (or PERISCOPE_API_KEY) is required: the callers and the broker's counters need it");
        }
        if self.agent_key.is_empty() && self.agents > 0 {
            bail!("--agent-key (or PERISCOPE_AGENT_KEY) is required to connect agents");
        }
        if !periscope_protocol::messages::is_label(&self.pool, 128) {
            bail!("--pool `{}` must be 1 to 128 characters from A-Z a-z 0-9 . _ : = / -", self.pool);
        }
        if self.services == 0 || self.services > 1_000 {
            bail!("--services is {}; allowed range is 1..=1000", self.services);
        }
        if self.locations == 0 || self.locations > 20_000 {
            bail!("--locations is {}; allowed range is 1..=20000 (the broker's default catalog bound)", self.locations);
        }
        if self.agents > 100_000 {
            bail!("--agents is {}; at most 100000", self.agents);
        }
        if !(1..=50).contains(&self.max_hits) {
            bail!("--max-hits is {}; allowed range is 1..=50 (the broker's bound)", self.max_hits);
        }
        for (name, v) in [("--hit-rate", self.hit_rate), ("--log-rate", self.log_rate)] {
            if !v.is_finite() || !(0.0..=100_000.0).contains(&v) {
                bail!("{name} is {v}; allowed range is 0..=100000 per second per agent");
            }
        }
        if !(256..=60_000).contains(&self.hit_bytes) {
            bail!("--hit-bytes is {}; allowed range is 256..=60000", self.hit_bytes);
        }
        if self.duration.is_zero() {
            bail!("--duration must be above zero");
        }
        if (self.callers + self.pollers + self.mcp_callers + self.mcp_pollers) > 0 && self.agents == 0 {
            bail!("--callers, --pollers, --mcp-callers and --mcp-pollers need agents to place snapshots on (--agents)");
        }
        if self.connect_concurrency == 0 {
            bail!("--connect-concurrency must be above zero");
        }
        Ok(())
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Counters the simulated agents and callers share.
#[derive(Default)]
struct Stats {
    agents_registered: AtomicU64,
    agents_connected: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    hits_sent: AtomicU64,
    hit_bytes_sent: AtomicU64,
    lines_sent: AtomicU64,
    metric_reports_sent: AtomicU64,
    actions_received: AtomicU64,
    actions_ignored: AtomicU64,
    error_frames: AtomicU64,
    placed: AtomicU64,
    place_errors: AtomicU64,
    waits: AtomicU64,
    polls: AtomicU64,
    removed: AtomicU64,
    caller_errors: AtomicU64,
    hits_read: AtomicU64,
    place_to_first_hit: Mutex<Histogram>,
    hit_to_wait_return: Mutex<Histogram>,
    place_call: Mutex<Histogram>,
    mcp_place_call: Mutex<Histogram>,
    mcp_placed: AtomicU64,
    mcp_place_to_first_hit: Mutex<Histogram>,
    mcp_hit_to_wait_return: Mutex<Histogram>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Sessions the broker ended, by the reason it gave.
    closed_by_broker: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn error(&self, what: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = errors.get_mut(&what) {
            *n += 1;
        } else if errors.len() < MAX_ERROR_KINDS {
            errors.insert(what, 1);
        } else {
            *errors.entry("(other errors)".into()).or_default() += 1;
        }
    }

    /// Counts a session the broker ended (by its reason, without ids or numbers, so that
    /// one reason is one line).
    fn closed(&self, reason: &str) {
        let reason: String =
            reason.split(':').next().unwrap_or(reason).chars().filter(|c| !c.is_ascii_digit()).collect();
        let reason = reason.trim();
        let reason = if reason.is_empty() { "no reason given" } else { reason };
        let mut closed = self.closed_by_broker.lock().unwrap_or_else(|e| e.into_inner());
        if closed.contains_key(reason) || closed.len() < MAX_ERROR_KINDS {
            *closed.entry(reason.to_owned()).or_default() += 1;
        } else {
            *closed.entry("(other reasons)".into()).or_default() += 1;
        }
    }

    fn record(h: &Mutex<Histogram>, micros: u64) {
        h.lock().unwrap_or_else(|e| e.into_inner()).record(micros.max(1) as f64);
    }
}

/// One service's catalog, shared by every agent of the service (its frame is sent as is).
struct Service {
    name: String,
    frame: Arc<str>,
    /// The event locations a caller may place on: (file, line).
    locations: Vec<(String, u32)>,
}

fn services(opts: &Options) -> anyhow::Result<Vec<Arc<Service>>> {
    let mut out = Vec::with_capacity(opts.services);
    for s in 0..opts.services {
        let name = format!("svc-{s}");
        let entries: Vec<CatalogEntry> = (0..opts.locations)
            .map(|i| CatalogEntry {
                file: format!("src/{name}/handlers/module_{}.rs", i / 20),
                line: 10 + (i % 20) as u32 * 7,
                kind: if i % 4 == 0 { LocationKind::Span } else { LocationKind::Event },
                name: format!("event src/{name}/handlers/module_{}.rs:{}", i / 20, 10 + (i % 20) * 7),
                module: Some(format!("{}::handlers::module_{}", name.replace('-', "_"), i / 20)),
                level: Some("info".into()),
                fields: vec!["user_id".into(), "order_id".into(), "amount".into(), "status".into()],
                hits: 0,
                hash: None,
            })
            .collect();
        let locations =
            entries.iter().filter(|e| e.kind == LocationKind::Event).map(|e| (e.file.clone(), e.line)).collect();
        // Split as the agents split theirs (small frames); joined here by newlines and
        // split again when sent.
        let mut frames = Vec::new();
        for update in CatalogUpdate::frames(entries, Vec::new(), true) {
            frames.push(serde_json::to_string(&AgentMessage::Catalog(update)).context("encoding a catalog")?);
        }
        out.push(Arc::new(Service { name, frame: frames.join("\n").into(), locations }));
    }
    Ok(out)
}

/// A hit frame for one agent, built once: its fields hold about `hit_bytes` of strings
/// like a typical request object; only the ids, sequence and times change per hit.
struct HitTemplate {
    /// The `fields` object's members after `sent_us`, as JSON text.
    rest: String,
}

impl HitTemplate {
    fn new(hit_bytes: usize) -> anyhow::Result<HitTemplate> {
        let mut fields = vec![
            Field::new("user_id", Value::Int(48_213)),
            Field::new("amount", Value::Float(129.5)),
            Field::new("status", Value::str("pending")),
        ];
        let chunk = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(6); // 216 characters, under 255
        let mut i = 0;
        // The envelope and the fields above take about 400 bytes.
        while 400 + i * (chunk.len() + 40) < hit_bytes {
            fields.push(Field::new(format!("note_{i}"), Value::str(chunk.clone())));
            i += 1;
        }
        let hit = Hit {
            action_id: ActionId::generate(),
            seq: 1,
            time_ms: 0,
            location: HitLocation::default(),
            thread: None,
            fields,
            spans: Vec::new(),
            watches: Vec::new(),
            backtrace: None,
            truncation: Default::default(),
            redactions: Vec::new(),
            rules_version: 0,
            error: None,
            call: None,
        };
        let json = serde_json::to_value(&hit).context("encoding a hit")?;
        let fields = json.get("fields").map(ToString::to_string).unwrap_or_default();
        let rest = fields.strip_prefix('{').unwrap_or("}").to_string();
        Ok(HitTemplate { rest })
    }

    fn frame(&self, action: &ActionId, seq: u64, file: &str, line: u32, rules_version: u64) -> String {
        let us = now_us();
        let file = serde_json::Value::from(file);
        format!(
            r#"{{"type":"hit","action_id":"{action}","seq":{seq},"time_ms":{},"location":{{"file":{file},"line":{line}}},"fields":{{"sent_us":{{"type":"int","value":{us}}},{},"rules_version":{rules_version}}}"#,
            us / 1000,
            self.rest
        )
    }
}

/// An action a simulated agent runs.
struct Running {
    kind: ActionKind,
    file: String,
    line: u32,
    seq: u64,
    sent: u64,
    /// Fractional hits or lines owed since the last tick.
    owed: f64,
    metric_window_start_ms: u64,
}

struct AgentCtx {
    opts: Arc<Options>,
    stats: Arc<Stats>,
    service: Arc<Service>,
    template: Arc<HitTemplate>,
    stop: Arc<AtomicBool>,
    /// Set when the window ends: callsites stop firing (the session stays open).
    idle: Arc<AtomicBool>,
    ids: Arc<Mutex<Vec<Vec<AgentId>>>>,
}

fn agent_url(base: &url::Url) -> anyhow::Result<String> {
    let mut url = base.join(periscope_protocol::messages::AGENT_GATEWAY_PATH).context("building the agent URL")?;
    let scheme = if base.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| anyhow::anyhow!("{base}: cannot use it for WebSockets"))?;
    Ok(url.to_string())
}

async fn run_agent(ctx: AgentCtx, index: usize, connect: Arc<tokio::sync::Semaphore>) {
    let agent_id = AgentId::generate();
    let base = &ctx.opts.brokers[index % ctx.opts.brokers.len()];
    let mut registered_once = false;
    let mut backoff = Duration::from_millis(500);
    while !ctx.stop.load(Ordering::Relaxed) {
        let permit = connect.clone().acquire_owned().await;
        match session(&ctx, base, &agent_id, index, permit.ok(), &mut registered_once).await {
            Ok(()) => return,
            Err(e) => {
                ctx.stats.error(format!("agent: {e:#}"));
                if registered_once {
                    ctx.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    ctx: &AgentCtx,
    base: &url::Url,
    agent_id: &AgentId,
    index: usize,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    registered_once: &mut bool,
) -> anyhow::Result<()> {
    let mut request = agent_url(base)?.into_client_request().context("building the agent request")?;
    let auth = format!("Bearer {}", ctx.opts.agent_key).parse().context("the agent key is not a valid header value")?;
    request.headers_mut().insert("authorization", auth);
    // Small buffers: thousands of simulated agents live in this one process.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("connecting the agent WebSocket")?;
    let (mut tx, mut rx) = ws.split();
    let registration = AgentMessage::Register(Box::new(Registration {
        protocol_version: periscope_protocol::PROTOCOL_VERSION,
        agent_id: agent_id.clone(),
        display_name: format!("{}@load-{index}", ctx.service.name),
        pool: ctx.opts.pool.clone(),
        tags: vec![format!("service:{}", ctx.service.name), "env:load".into()],
        service: ctx.service.name.clone(),
        service_version: "1.0.0".into(),
        build: String::new(),
        language: "rust".into(),
        runtime: "rustc".into(),
        host: format!("load-{}", index / 50),
        pid: 10_000 + index as u32,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        capabilities: vec!["snapshot".into(), "log".into(), "metric".into(), "conditions".into()],
    }));
    tx.send(Message::text(serde_json::to_string(&registration)?)).await.context("sending the registration")?;
    let heartbeat_ms = loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), rx.next())
            .await
            .context("no answer to the registration within 60 s")?
            .context("the broker closed before answering the registration")?
            .context("reading the registration answer")?;
        let Message::Text(text) = frame else { continue };
        match serde_json::from_str::<BrokerMessage>(&text) {
            Ok(BrokerMessage::Registered(r)) => break r.heartbeat_interval_ms.clamp(1_000, 3_600_000),
            Ok(BrokerMessage::Error(e)) => bail!("registration refused: {} ({:?})", e.message, e.code),
            Ok(_) => {}
            Err(e) => bail!("an unreadable answer to the registration: {e}"),
        }
    };
    for frame in ctx.service.frame.split('\n') {
        tx.send(Message::text(frame)).await.context("sending the catalog")?;
    }
    drop(permit);
    if !*registered_once {
        *registered_once = true;
        ctx.stats.agents_registered.fetch_add(1, Ordering::Relaxed);
        let mut ids = ctx.ids.lock().unwrap_or_else(|e| e.into_inner());
        let service = index % ctx.opts.services;
        if let Some(list) = ids.get_mut(service) {
            list.push(agent_id.clone());
        }
    }
    ctx.stats.agents_connected.fetch_add(1, Ordering::Relaxed);
    // Reading never waits for writing, as in a real agent: a simulated agent blocked
    // sending hits to a busy broker still takes in what the broker sends it.
    let (incoming_tx, mut incoming) = tokio::sync::mpsc::channel(INCOMING_QUEUE);
    let reader = tokio::spawn(async move {
        while let Some(frame) = rx.next().await {
            let end = frame.is_err();
            if incoming_tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    let result = drive(ctx, &mut tx, &mut incoming, heartbeat_ms).await;
    reader.abort();
    ctx.stats.agents_connected.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Frames a simulated agent has read and not yet handled.
const INCOMING_QUEUE: usize = 1_024;

type Incoming = tokio::sync::mpsc::Receiver<Result<Message, tokio_tungstenite::tungstenite::Error>>;

type Tx = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

const TICK: Duration = Duration::from_millis(20);

async fn drive(ctx: &AgentCtx, tx: &mut Tx, rx: &mut Incoming, heartbeat_ms: u64) -> anyhow::Result<()> {
    let mut actions: HashMap<ActionId, Running> = HashMap::new();
    let mut rules_version = 0;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    heartbeat.tick().await;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    let mut stop_check = tokio::time::interval(Duration::from_millis(200));
    loop {
        let busy = !actions.is_empty();
        tokio::select! {
            frame = rx.recv() => {
                let frame = match frame {
                    None => {
                        ctx.stats.closed("the connection ended without a close frame");
                        bail!("the broker closed the connection");
                    }
                    Some(Err(e)) => return Err(e).context("reading from the broker"),
                    Some(Ok(f)) => f,
                };
                let text = match frame {
                    Message::Text(text) => text,
                    Message::Close(close) => {
                        let reason = close.map(|c| c.reason.to_string()).unwrap_or_default();
                        ctx.stats.closed(&reason);
                        bail!("the broker closed the session: {reason}");
                    }
                    _ => continue,
                };
                let msg = match serde_json::from_str::<BrokerMessage>(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        ctx.stats.error(format!("agent: an unreadable broker frame: {e}"));
                        continue;
                    }
                };
                match msg {
                    BrokerMessage::ActionSync { actions: all } => {
                        actions.retain(|id, _| all.iter().any(|a| &a.id == id));
                        for a in all {
                            if !actions.contains_key(&a.id) {
                                add(ctx, tx, &mut actions, a, rules_version).await?;
                            }
                        }
                    }
                    BrokerMessage::ActionAdd { action } => add(ctx, tx, &mut actions, action, rules_version).await?,
                    BrokerMessage::ActionRemove { action_id, .. } => {
                        actions.remove(&action_id);
                    }
                    BrokerMessage::RedactionRules { version, .. } => rules_version = version,
                    BrokerMessage::Error(e) => {
                        ctx.stats.error_frames.fetch_add(1, Ordering::Relaxed);
                        ctx.stats.error(format!("broker error frame: {:?}: {}", e.code, e.message));
                        if e.fatal {
                            ctx.stats.closed(&e.message);
                            bail!("the broker ended the session: {}", e.message);
                        }
                    }
                    BrokerMessage::Goodbye { reason } => {
                        ctx.stats.closed(&reason);
                        bail!("the broker said goodbye: {reason}");
                    }
                    // A simulated agent runs no real code: nothing to fence off.
                    BrokerMessage::Registered(_) | BrokerMessage::Blocklist { .. } => {}
                }
            }
            _ = tick.tick(), if busy && !ctx.idle.load(Ordering::Relaxed) => {
                let dt = last_tick.elapsed().as_secs_f64();
                last_tick = Instant::now();
                fire(ctx, tx, &mut actions, dt, rules_version).await?;
            }
            _ = heartbeat.tick() => {
                let hb = Heartbeat {
                    hits_sent: ctx.stats.hits_sent.load(Ordering::Relaxed),
                    actions: actions.len() as u64,
                    ..Heartbeat::default()
                };
                tx.send(Message::text(serde_json::to_string(&AgentMessage::Heartbeat(hb))?)).await?;
            }
            _ = stop_check.tick() => {
                if ctx.stop.load(Ordering::Relaxed) {
                    let bye = AgentMessage::Goodbye { reason: "load test over".into() };
                    tx.send(Message::text(serde_json::to_string(&bye)?)).await?;
                    tx.send(Message::Close(None)).await?;
                    // Read until the broker answers the close: every frame before it was read.
                    let drain = async { while let Some(Ok(_)) = rx.recv().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
                    return Ok(());
                }
            }
        }
        if !busy {
            last_tick = Instant::now();
        }
    }
}

async fn add(
    ctx: &AgentCtx,
    tx: &mut Tx,
    actions: &mut HashMap<ActionId, Running>,
    spec: periscope_protocol::ActionSpec,
    rules_version: u64,
) -> anyhow::Result<()> {
    ctx.stats.actions_received.fetch_add(1, Ordering::Relaxed);
    if actions.len() >= MAX_ACTIONS_PER_AGENT || matches!(spec.kind, ActionKind::Unsupported) {
        ctx.stats.actions_ignored.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let known = ctx
        .service
        .locations
        .iter()
        .find(|(f, l)| *l == spec.location.line && spec.location.file_matches(f))
        .map(|(f, _)| f.clone());
    let status = periscope_protocol::ActionStatusUpdate {
        action_id: spec.id.clone(),
        state: match known {
            Some(_) => periscope_protocol::AgentActionState::Installed { callsites: 1 },
            None => periscope_protocol::AgentActionState::Pending,
        },
    };
    tx.send(Message::text(serde_json::to_string(&AgentMessage::ActionStatus(status))?)).await?;
    let Some(file) = known else { return Ok(()) };
    let mut running = Running {
        kind: spec.kind,
        file,
        line: spec.location.line,
        seq: 0,
        sent: 0,
        owed: 0.0,
        metric_window_start_ms: now_us() / 1000,
    };
    // A callsite that runs continuously fires as soon as the snapshot is installed.
    if matches!(running.kind, ActionKind::Snapshot(_)) && ctx.opts.hit_rate > 0.0 {
        send_hit(ctx, tx, &spec.id, &mut running, rules_version).await?;
    }
    actions.insert(spec.id, running);
    Ok(())
}

async fn send_hit(
    ctx: &AgentCtx,
    tx: &mut Tx,
    id: &ActionId,
    running: &mut Running,
    rules_version: u64,
) -> anyhow::Result<()> {
    running.seq += 1;
    running.sent += 1;
    let frame = ctx.template.frame(id, running.seq, &running.file, running.line, rules_version);
    ctx.stats.hits_sent.fetch_add(1, Ordering::Relaxed);
    ctx.stats.hit_bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
    tx.send(Message::text(frame)).await.context("sending a hit")
}

async fn fire(
    ctx: &AgentCtx,
    tx: &mut Tx,
    actions: &mut HashMap<ActionId, Running>,
    dt: f64,
    rules_version: u64,
) -> anyhow::Result<()> {
    let now_ms = now_us() / 1000;
    let mut lines = Vec::new();
    let mut reports = Vec::new();
    for (id, running) in actions.iter_mut() {
        match &running.kind {
            ActionKind::Snapshot(s) => {
                let max_hits = u64::from(s.max_hits);
                running.owed += ctx.opts.hit_rate * dt;
                while running.owed >= 1.0 && running.sent < max_hits {
                    running.owed -= 1.0;
                    send_hit(ctx, tx, id, running, rules_version).await?;
                }
                running.owed = running.owed.min(1.0);
            }
            ActionKind::Log(spec) => {
                running.owed += ctx.opts.log_rate * dt;
                while running.owed >= 1.0 && spec.max_lines.is_none_or(|m| running.sent < m) {
                    running.owed -= 1.0;
                    running.seq += 1;
                    running.sent += 1;
                    lines.push(LogLine {
                        action_id: id.clone(),
                        seq: running.seq,
                        time_ms: now_ms,
                        level: LogLevel::Info,
                        text: format!(
                            "order ord_{} for user 48213 moved to pending after {} ms",
                            running.seq,
                            running.seq % 97
                        ),
                        thread: Some("tokio-runtime-worker".into()),
                        redactions: Vec::new(),
                        rules_version,
                    });
                }
                running.owed = running.owed.min(1.0);
            }
            ActionKind::Metric(_) => {
                let interval = ctx.opts.metric_interval.map_or(u64::MAX, |d| d.as_millis() as u64);
                if now_ms.saturating_sub(running.metric_window_start_ms) >= interval {
                    let mut histogram = Histogram::default();
                    for v in [3.0, 5.0, 8.0, 13.0] {
                        histogram.record(v);
                    }
                    reports.push(MetricReport {
                        action_id: id.clone(),
                        window_start_ms: running.metric_window_start_ms,
                        window_end_ms: now_ms,
                        count: 4,
                        sum: 29.0,
                        min: Some(3.0),
                        max: Some(13.0),
                        histogram,
                        skipped: 0,
                    });
                    running.metric_window_start_ms = now_ms;
                }
            }
            // Simulated services never fail: an error capture sends nothing.
            ActionKind::CaptureErrors(_) | ActionKind::Unsupported => {}
        }
    }
    for chunk in lines.chunks(periscope_protocol::telemetry::MAX_LOG_LINES_PER_FRAME) {
        let msg = AgentMessage::LogLines { lines: chunk.to_vec() };
        tx.send(Message::text(serde_json::to_string(&msg)?)).await.context("sending log lines")?;
        ctx.stats.lines_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    if !reports.is_empty() {
        let n = reports.len() as u64;
        tx.send(Message::text(serde_json::to_string(&AgentMessage::Metrics { reports })?))
            .await
            .context("sending metric reports")?;
        ctx.stats.metric_reports_sent.fetch_add(n, Ordering::Relaxed);
    }
    // Snapshots that sent all their hits stay until the broker removes them.
    Ok(())
}

/// A REST client of one broker.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: url::Url,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = self.base.join(path).with_context(|| format!("building the URL of {path}"))?;
        let mut req = self.http.request(method.clone(), url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| format!("{method} {path}: reading the answer"))?;
        if !status.is_success() {
            let body = serde_json::from_str::<serde_json::Value>(&text).ok();
            let field = |f: &str| {
                body.as_ref().and_then(|v| v.pointer(f)).and_then(|c| c.as_str()).unwrap_or_default().to_string()
            };
            // Error kinds are counted by their text: no ids in it.
            let path = path.split('?').next().unwrap_or(path);
            let path = if path.starts_with("/api/v1/actions/") { "/api/v1/actions/{id}/…" } else { path };
            bail!("{method} {path}: HTTP {status} {}: {}", field("/error/code"), field("/error/message"));
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: the answer is not JSON"))
    }

    async fn metrics_text(&self) -> anyhow::Result<String> {
        let url = self.base.join("/metrics").context("building the /metrics URL")?;
        let resp = self.http.get(url).bearer_auth(&self.key).send().await.context("GET /metrics")?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET /metrics: HTTP {status} (the API key needs mcp:system:read)");
        }
        resp.text().await.context("GET /metrics: reading the answer")
    }
}

/// The broker counters the report uses, summed over every node and label set.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    /// `name` or `name{reason}` → value.
    pub values: BTreeMap<String, f64>,
}

impl Counters {
    fn parse(text: &str, into: &mut Counters) {
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, Some(l)),
                None => (series, None),
            };
            let wanted = [
                "periscope_hits_accepted_total",
                "periscope_hits_refused_total",
                "periscope_hits_rate_limited_total",
                "periscope_log_lines_accepted_total",
                "periscope_log_lines_refused_total",
                "periscope_log_lines_rate_limited_total",
                "periscope_metric_reports_total",
                "periscope_agents_connected",
                "periscope_broker_dropped_total",
                "periscope_agent_hits_dropped_total",
                "periscope_catalogs_distinct",
                "periscope_store_queue_peak_bytes",
                "periscope_store_ingest_waits_total",
            ];
            if !wanted.contains(&name) {
                continue;
            }
            let reason = labels.and_then(|l| l.split("reason=\"").nth(1)).and_then(|r| r.split('"').next());
            let key = match reason {
                Some(r) => format!("{name}{{{r}}}"),
                None => name.to_string(),
            };
            *into.values.entry(key).or_default() += value;
        }
    }

    fn get(&self, key: &str) -> u64 {
        self.values.get(key).copied().unwrap_or(0.0) as u64
    }

    fn delta(&self, before: &Counters) -> Counters {
        let mut values = BTreeMap::new();
        for (k, v) in &self.values {
            values.insert(k.clone(), v - before.values.get(k).copied().unwrap_or(0.0));
        }
        Counters { values }
    }
}

async fn read_counters(apis: &[Api]) -> anyhow::Result<Counters> {
    let mut c = Counters::default();
    for api in apis {
        Counters::parse(&api.metrics_text().await?, &mut c);
    }
    Ok(c)
}

/// What `/proc/<pid>` says of a process (the broker here; the shops in `host-bench`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Peak resident memory, KiB.
    pub hwm_kib: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

pub(crate) fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime is field 14 and stime 15 (1-based); `after` starts at field 3.
    Ok(ProcSample { rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:"), cpu_ticks: ticks(11) + ticks(12) })
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux build we run on).
pub(crate) const USER_HZ: f64 = 100.0;

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What every caller shares.
#[derive(Clone)]
struct CallerCtx {
    opts: Arc<Options>,
    stats: Arc<Stats>,
    ids: Arc<Mutex<Vec<Vec<AgentId>>>>,
    svcs: Arc<Vec<Arc<Service>>>,
    deadline: tokio::time::Instant,
}

/// A caller's way to the broker: the REST API, or an MCP session over streamable HTTP
/// (the real client an assistant uses), doing the same calls with the same arguments.
enum Transport {
    Rest(Api),
    Mcp(McpClient),
}

type McpClient = rmcp::service::RunningService<rmcp::RoleClient, ()>;

async fn connect_mcp(base: &url::Url, key: &str) -> anyhow::Result<McpClient> {
    use rmcp::ServiceExt as _;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let endpoint = base.join("/mcp").context("building the /mcp URL")?;
    let config = StreamableHttpClientTransportConfig::with_uri(endpoint.to_string()).auth_header(key.to_owned());
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .with_context(|| format!("opening an MCP session at {endpoint}"))
}

/// One MCP tool call; a tool error becomes an error with its code and message (no ids).
async fn mcp_call(client: &McpClient, tool: &str, args: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let args = match args {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let result = client
        .call_tool(rmcp::model::CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .with_context(|| format!("MCP {tool}"))?;
    let body = result.structured_content.unwrap_or(serde_json::Value::Null);
    if result.is_error == Some(true) {
        let field = |f: &str| body.pointer(f).and_then(|c| c.as_str()).unwrap_or_default().to_string();
        bail!("MCP {tool}: {}: {}", field("/error/code"), field("/error/message"));
    }
    Ok(body)
}

impl Transport {
    fn is_mcp(&self) -> bool {
        matches!(self, Transport::Mcp(_))
    }

    /// Places a snapshot (`body` as the REST API takes it); returns its action id.
    async fn place(&self, body: serde_json::Value) -> anyhow::Result<String> {
        let (placed, pointer) = match self {
            Transport::Rest(api) => (api.call(reqwest::Method::POST, "/api/v1/actions", Some(body)).await?, ""),
            Transport::Mcp(client) => {
                let mut args = body;
                if let Some(m) = args.as_object_mut() {
                    m.remove("kind");
                    let expire = m.remove("expire_seconds").unwrap_or_else(|| 300.into());
                    m.insert("timeout_seconds".into(), expire);
                    m.insert("wait".into(), false.into());
                }
                (mcp_call(client, "place_snapshot", args).await?, "/action")
            }
        };
        let action = placed.pointer(pointer).unwrap_or(&placed);
        action
            .get("action_id")
            .or_else(|| action.get("id"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .context("the placed action has no action_id")
    }

    /// Its hits after `since` (`hits`, `next_cursor`), waiting up to `wait_seconds` for one.
    async fn hits(&self, action_id: &str, since: u64, wait_seconds: u64) -> anyhow::Result<serde_json::Value> {
        match self {
            Transport::Rest(api) => {
                let mut path = format!("/api/v1/actions/{action_id}/hits?since={since}");
                if wait_seconds > 0 {
                    path.push_str(&format!("&wait_seconds={wait_seconds}"));
                }
                api.call(reqwest::Method::GET, &path, None).await
            }
            Transport::Mcp(client) => {
                let args = serde_json::json!({ "action_id": action_id, "since": since, "wait_seconds": wait_seconds });
                mcp_call(client, "get_action", args).await
            }
        }
    }

    async fn remove(&self, action_id: &str) -> anyhow::Result<()> {
        match self {
            Transport::Rest(api) => {
                api.call(reqwest::Method::DELETE, &format!("/api/v1/actions/{action_id}"), None).await?;
            }
            Transport::Mcp(client) => {
                mcp_call(client, "remove_action", serde_json::json!({ "action_id": action_id })).await?;
            }
        }
        Ok(())
    }

    async fn close(self) {
        if let Transport::Mcp(client) = self {
            let _ = client.cancel().await;
        }
    }
}

async fn caller(id: usize, to: Transport, poll: bool, ctx: CallerCtx) {
    let CallerCtx { opts, stats, ids, svcs, deadline } = ctx;
    let (place_call, first_hit, wait_return) = if to.is_mcp() {
        (&stats.mcp_place_call, &stats.mcp_place_to_first_hit, &stats.mcp_hit_to_wait_return)
    } else {
        (&stats.place_call, &stats.place_to_first_hit, &stats.hit_to_wait_return)
    };
    let mut n = id;
    while tokio::time::Instant::now() < deadline {
        n = n.wrapping_add(7919);
        let service = n % opts.services;
        let Some((file, line)) = svcs.get(service).and_then(|s| s.locations.get(n % s.locations.len().max(1))).cloned()
        else {
            break;
        };
        let target = {
            let ids = ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.get(service).and_then(|l| if l.is_empty() { None } else { l.get(n % l.len()).cloned() })
        };
        let Some(agent) = target else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut body = serde_json::json!({
            "kind": "snapshot", "file": file, "line": line, "max_hits": opts.max_hits, "expire_seconds": 300,
        });
        if opts.target_service {
            body["pool"] = opts.pool.clone().into();
            body["tags"] = serde_json::json!([format!("service:svc-{service}")]);
        } else {
            body["agent_ids"] = serde_json::json!([agent.to_string()]);
        }
        let placed_at = Instant::now();
        let action_id = match to.place(body).await {
            Ok(v) => v,
            Err(e) => {
                stats.place_errors.fetch_add(1, Ordering::Relaxed);
                stats.error(format!("caller: {e:#}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        Stats::record(place_call, placed_at.elapsed().as_micros() as u64);
        stats.placed.fetch_add(1, Ordering::Relaxed);
        if to.is_mcp() {
            stats.mcp_placed.fetch_add(1, Ordering::Relaxed);
        }
        let mut since = 0u64;
        let mut got = 0u64;
        let mut first = true;
        let give_up = (tokio::time::Instant::now() + Duration::from_secs(30)).min(deadline);
        while got < u64::from(opts.max_hits) && tokio::time::Instant::now() < give_up {
            let waited_from = now_us();
            // Open waits end with the window (whole seconds, at least one).
            let wait = if poll {
                0
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs().clamp(1, 5)
            };
            let page = match to.hits(&action_id, since, wait).await {
                Ok(p) => p,
                Err(e) => {
                    stats.caller_errors.fetch_add(1, Ordering::Relaxed);
                    stats.error(format!("caller: {e:#}"));
                    break;
                }
            };
            if poll { &stats.polls } else { &stats.waits }.fetch_add(1, Ordering::Relaxed);
            let returned = now_us();
            let hits = page.get("hits").and_then(|h| h.as_array()).map(Vec::as_slice).unwrap_or_default();
            for hit in hits {
                got += 1;
                stats.hits_read.fetch_add(1, Ordering::Relaxed);
                let sent = hit.pointer("/fields/sent_us/value").and_then(serde_json::Value::as_u64);
                // Only hits sent while this wait was open measure the broker's delivery.
                if !poll && let Some(sent) = sent.filter(|s| *s >= waited_from) {
                    Stats::record(wait_return, returned.saturating_sub(sent));
                }
            }
            if first && !hits.is_empty() {
                first = false;
                Stats::record(first_hit, placed_at.elapsed().as_micros() as u64);
            }
            since = page.get("next_cursor").and_then(serde_json::Value::as_u64).unwrap_or(since);
            if poll && hits.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match to.remove(&action_id).await {
            Ok(()) => {
                stats.removed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => stats.error(format!("caller: {e:#}")),
        }
    }
    to.close().await;
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Largest, ms.
    pub max_ms: Option<f64>,
}

impl Latency {
    fn of(h: &Mutex<Histogram>) -> Latency {
        let h = h.lock().unwrap_or_else(|e| e.into_inner());
        let q = |q: f64| h.quantile(q).map(|us| (us / 10.0).round() / 100.0);
        Latency { count: h.count(), p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), max_ms: q(1.0) }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Brokers driven.
    pub brokers: Vec<String>,
    /// Agents asked for, registered, and connection failures and losses.
    pub agents: u64,
    /// Agents that registered at least once.
    pub agents_registered: u64,
    /// Connection attempts that failed before registering.
    pub connect_failures: u64,
    /// Sessions lost after registering.
    pub disconnects: u64,
    /// Seconds all agents took to register and send their catalogs.
    pub connect_seconds: f64,
    /// Length of the measured window, seconds.
    pub window_seconds: f64,
    /// Hits the simulated agents sent.
    pub hits_sent: u64,
    /// Their bytes on the wire.
    pub hit_bytes_sent: u64,
    /// Log lines sent.
    pub lines_sent: u64,
    /// Metric reports sent.
    pub metric_reports_sent: u64,
    /// Hits the broker stored (its own counter, over the run).
    pub hits_accepted: u64,
    /// Hits the broker refused (ended action, over `max_hits`).
    pub hits_refused: u64,
    /// Hits the broker dropped over rates.
    pub hits_rate_limited: u64,
    /// Lines the broker stored.
    pub lines_accepted: u64,
    /// Lines refused.
    pub lines_refused: u64,
    /// Lines dropped over rates.
    pub lines_rate_limited: u64,
    /// Metric reports merged.
    pub metric_reports_accepted: u64,
    /// Hits sent that no broker counter accounts for (should be 0).
    pub hits_unaccounted: i64,
    /// Lines sent that no broker counter accounts for (should be 0).
    pub lines_unaccounted: i64,
    /// The broker's per-agent drop counters, by reason (summed over agents).
    pub broker_drops: BTreeMap<String, u64>,
    /// Accepted hits per second over the window.
    pub hits_per_sec: f64,
    /// Hits the broker took in per second over the window (decoded, truncated, redacted:
    /// accepted, refused or rate-limited).
    pub hits_processed_per_sec: f64,
    /// Hits sent per second over the window.
    pub hits_sent_per_sec: f64,
    /// Lines sent per second over the window.
    pub lines_sent_per_sec: f64,
    /// Accepted lines per second over the window.
    pub lines_per_sec: f64,
    /// Actions the simulated agents received.
    pub actions_received: u64,
    /// Error frames the broker sent the agents.
    pub error_frames: u64,
    /// Snapshots placed.
    pub placed: u64,
    /// Placements refused.
    pub place_errors: u64,
    /// Long polls answered.
    pub waits: u64,
    /// Plain polls answered.
    pub polls: u64,
    /// Actions removed.
    pub removed: u64,
    /// Hits callers read.
    pub hits_read: u64,
    /// Failed hit reads.
    pub caller_errors: u64,
    /// The `POST /actions` call alone (placement, the store's commit, the answer).
    pub place_call: Latency,
    /// From `POST /actions` to the first hit in the caller's hands.
    pub place_to_first_hit: Latency,
    /// From the agent sending a hit to the caller's open wait returning it.
    pub hit_to_wait_return: Latency,
    /// MCP callers and pollers (sessions opened).
    pub mcp_sessions: u64,
    /// Snapshots the MCP callers placed (also counted in `placed`).
    pub mcp_placed: u64,
    /// The `place_snapshot` call alone (MCP, `wait: false`).
    pub mcp_place_call: Latency,
    /// From `place_snapshot` (MCP) to the first hit in the caller's hands.
    pub mcp_place_to_first_hit: Latency,
    /// From the agent sending a hit to an MCP `get_action` wait returning it.
    pub mcp_hit_to_wait_return: Latency,
    /// Broker resident memory before the agents connected, KiB.
    pub broker_rss_before_kib: Option<u64>,
    /// After every agent registered and sent its catalog, KiB.
    pub broker_rss_connected_kib: Option<u64>,
    /// At the end, KiB.
    pub broker_rss_end_kib: Option<u64>,
    /// Peak, KiB.
    pub broker_rss_peak_kib: Option<u64>,
    /// (connected − before) / agents, KiB.
    pub broker_kib_per_agent: Option<f64>,
    /// Broker CPU over the window, as a share of one core (1.0 = one core busy).
    pub broker_cpu_cores: Option<f64>,
    /// This load generator's own peak RSS, KiB.
    pub loadgen_rss_peak_kib: Option<u64>,
    /// Load average at the start and the end of the window.
    pub loadavg: (String, String),
    /// Errors seen, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Agent sessions the broker ended during the run, by the reason it gave.
    pub sessions_closed_by_broker: BTreeMap<String, u64>,
    /// Distinct catalogs the broker holds at the end (agents with identical catalogs
    /// share one).
    pub broker_catalogs: Option<u64>,
    /// The most bytes the broker's store writer had queued at once (single node).
    pub broker_store_queue_peak_bytes: Option<u64>,
    /// Times an agent session waited for the store's writer (backpressure).
    pub broker_store_waits: Option<u64>,
}

/// Runs the load test and returns its report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    opts.validate()?;
    let opts = Arc::new(opts);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.callers + opts.pollers + 4)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    let apis: Vec<Api> =
        opts.brokers.iter().map(|b| Api { http: http.clone(), base: b.clone(), key: opts.api_key.clone() }).collect();
    let sample = || opts.broker_pid.map(proc_sample).transpose();
    let before = read_counters(&apis).await.context("reading the broker's counters before the run")?;
    let proc_before = sample()?;
    let stats = Arc::new(Stats::default());
    let svcs = Arc::new(services(&opts)?);
    let template = Arc::new(HitTemplate::new(opts.hit_bytes)?);
    let stop = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(Mutex::new(vec![Vec::new(); opts.services]));
    let connect = Arc::new(tokio::sync::Semaphore::new(opts.connect_concurrency));
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..opts.agents {
        let ctx = AgentCtx {
            opts: opts.clone(),
            stats: stats.clone(),
            service: svcs[i % opts.services].clone(),
            template: template.clone(),
            stop: stop.clone(),
            idle: idle.clone(),
            ids: ids.clone(),
        };
        agents.spawn(run_agent(ctx, i, connect.clone()));
    }
    // Every agent registered (or the connection attempts gave up).
    let connect_deadline = Instant::now() + Duration::from_secs(300);
    while (stats.agents_registered.load(Ordering::Relaxed) as usize) < opts.agents && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    if (stats.agents_registered.load(Ordering::Relaxed) as usize) < opts.agents {
        eprintln!(
            "loadtest: only {} of {} agents registered within 300 s; measuring with them",
            stats.agents_registered.load(Ordering::Relaxed),
            opts.agents
        );
    }
    // Let the broker take in the catalogs before weighing it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let proc_connected = sample()?;
    let mut setup_actions = Vec::new();
    let setup = &apis[0];
    for s in svcs.iter() {
        let Some((file, line)) = s.locations.first().cloned() else { continue };
        let target = serde_json::json!([format!("service:{}", s.name)]);
        if opts.log_rate > 0.0 && opts.agents > 0 {
            let body = serde_json::json!({
                "pool": opts.pool, "tags": target, "file": file, "line": line, "expire_seconds": 3600,
                "template": "order {order_id} for {user_id} is {status}",
            });
            setup_actions.push(
                setup.call(reqwest::Method::POST, "/api/v1/logs", Some(body)).await.context("placing a log action")?,
            );
        }
        if opts.metric_interval.is_some() && opts.agents > 0 {
            let body = serde_json::json!({
                "pool": opts.pool, "tags": target, "file": file, "line": line, "expire_seconds": 3600, "kind": "counter",
            });
            setup_actions.push(
                setup
                    .call(reqwest::Method::POST, "/api/v1/metrics", Some(body))
                    .await
                    .context("placing a metric action")?,
            );
        }
    }
    // MCP sessions are opened before the window: their handshake is not a call measured.
    let mut mcp_clients = Vec::with_capacity(opts.mcp_callers + opts.mcp_pollers);
    for i in 0..opts.mcp_callers + opts.mcp_pollers {
        let base = &opts.brokers[i % opts.brokers.len()];
        mcp_clients.push(connect_mcp(base, &opts.api_key).await?);
    }
    let mcp_sessions = mcp_clients.len() as u64;
    let window_start = Instant::now();
    let load_start = loadavg();
    let proc_window_start = sample()?;
    let deadline = tokio::time::Instant::now() + opts.duration;
    let mut callers = tokio::task::JoinSet::new();
    let caller_ctx =
        CallerCtx { opts: opts.clone(), stats: stats.clone(), ids: ids.clone(), svcs: svcs.clone(), deadline };
    for i in 0..opts.callers + opts.pollers {
        let api = apis[i % apis.len()].clone();
        callers.spawn(caller(i, Transport::Rest(api), i >= opts.callers, caller_ctx.clone()));
    }
    for (i, client) in mcp_clients.into_iter().enumerate() {
        let id = opts.callers + opts.pollers + i;
        callers.spawn(caller(id, Transport::Mcp(client), i >= opts.mcp_callers, caller_ctx.clone()));
    }
    tokio::time::sleep_until(deadline).await;
    while callers.join_next().await.is_some() {}
    idle.store(true, Ordering::Relaxed);
    let window_seconds = window_start.elapsed().as_secs_f64();
    // What the broker took in within the window: the throughput figures.
    let at_window_end = read_counters(&apis).await?.delta(&before);
    let sent_in_window = (stats.hits_sent.load(Ordering::Relaxed), stats.lines_sent.load(Ordering::Relaxed));
    let proc_window_end = sample()?;
    let load_end = loadavg();
    for a in &setup_actions {
        if let Some(id) = a.get("action_id").and_then(|v| v.as_str())
            && let Err(e) = setup.call(reqwest::Method::DELETE, &format!("/api/v1/actions/{id}"), None).await
        {
            stats.error(format!("removing a setup action: {e:#}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    while agents.join_next().await.is_some() {}
    // The broker's counters settle once it has taken in every frame sent.
    let mut after = read_counters(&apis).await?;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = read_counters(&apis).await?;
        let settled = again.values == after.values;
        after = again;
        if settled {
            break;
        }
    }
    let proc_end = sample()?;
    let d = after.delta(&before);
    let own = proc_sample(std::process::id()).ok();
    let sent = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut report = Report {
        brokers: opts.brokers.iter().map(ToString::to_string).collect(),
        agents: opts.agents as u64,
        agents_registered: sent(&stats.agents_registered),
        connect_failures: sent(&stats.connect_failures),
        disconnects: sent(&stats.disconnects),
        connect_seconds,
        window_seconds,
        hits_sent: sent(&stats.hits_sent),
        hit_bytes_sent: sent(&stats.hit_bytes_sent),
        lines_sent: sent(&stats.lines_sent),
        metric_reports_sent: sent(&stats.metric_reports_sent),
        hits_accepted: d.get("periscope_hits_accepted_total"),
        hits_refused: d.get("periscope_hits_refused_total"),
        hits_rate_limited: d.get("periscope_hits_rate_limited_total"),
        lines_accepted: d.get("periscope_log_lines_accepted_total"),
        lines_refused: d.get("periscope_log_lines_refused_total"),
        lines_rate_limited: d.get("periscope_log_lines_rate_limited_total"),
        metric_reports_accepted: d.get("periscope_metric_reports_total"),
        actions_received: sent(&stats.actions_received),
        error_frames: sent(&stats.error_frames),
        placed: sent(&stats.placed),
        place_errors: sent(&stats.place_errors),
        waits: sent(&stats.waits),
        polls: sent(&stats.polls),
        removed: sent(&stats.removed),
        hits_read: sent(&stats.hits_read),
        caller_errors: sent(&stats.caller_errors),
        place_call: Latency::of(&stats.place_call),
        place_to_first_hit: Latency::of(&stats.place_to_first_hit),
        hit_to_wait_return: Latency::of(&stats.hit_to_wait_return),
        mcp_sessions,
        mcp_placed: sent(&stats.mcp_placed),
        mcp_place_call: Latency::of(&stats.mcp_place_call),
        mcp_place_to_first_hit: Latency::of(&stats.mcp_place_to_first_hit),
        mcp_hit_to_wait_return: Latency::of(&stats.mcp_hit_to_wait_return),
        loadavg: (load_start, load_end),
        loadgen_rss_peak_kib: own.map(|p| p.hwm_kib),
        errors: stats.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        sessions_closed_by_broker: stats.closed_by_broker.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        broker_catalogs: after.values.get("periscope_catalogs_distinct").map(|v| *v as u64),
        broker_store_queue_peak_bytes: after.values.get("periscope_store_queue_peak_bytes").map(|v| *v as u64),
        broker_store_waits: d.values.get("periscope_store_ingest_waits_total").map(|v| *v as u64),
        ..Report::default()
    };
    for (k, v) in &d.values {
        if let Some(reason) = k.strip_prefix("periscope_broker_dropped_total{")
            && *v > 0.0
        {
            report.broker_drops.insert(reason.trim_end_matches('}').to_string(), *v as u64);
        }
    }
    // Hit frames the gateway dropped before the engine saw them, and hits that could not be
    // stored, are counted per agent only. (Byte, key and organization budgets drop frames
    // of every kind; when those are non-zero, some of them were hits.)
    let gateway: u64 =
        ["hits_rate", "unavailable", "lease_lost"].iter().filter_map(|r| report.broker_drops.get(*r)).sum();
    report.hits_unaccounted = report.hits_sent as i64
        - (report.hits_accepted + report.hits_refused + report.hits_rate_limited + gateway) as i64;
    report.lines_unaccounted =
        report.lines_sent as i64 - (report.lines_accepted + report.lines_refused + report.lines_rate_limited) as i64;
    let w = window_seconds.max(1e-9);
    report.hits_per_sec = at_window_end.get("periscope_hits_accepted_total") as f64 / w;
    report.hits_processed_per_sec = (at_window_end.get("periscope_hits_accepted_total")
        + at_window_end.get("periscope_hits_refused_total")
        + at_window_end.get("periscope_hits_rate_limited_total")) as f64
        / w;
    report.lines_per_sec = at_window_end.get("periscope_log_lines_accepted_total") as f64 / w;
    report.hits_sent_per_sec = sent_in_window.0 as f64 / w;
    report.lines_sent_per_sec = sent_in_window.1 as f64 / w;
    if let (Some(b), Some(c), Some(e)) = (proc_before, proc_connected, proc_end) {
        report.broker_rss_before_kib = Some(b.rss_kib);
        report.broker_rss_connected_kib = Some(c.rss_kib);
        report.broker_rss_end_kib = Some(e.rss_kib);
        report.broker_rss_peak_kib = Some(e.hwm_kib);
        if opts.agents > 0 {
            report.broker_kib_per_agent = Some((c.rss_kib as f64 - b.rss_kib as f64) / opts.agents as f64);
        }
    }
    if let (Some(s), Some(e)) = (proc_window_start, proc_window_end) {
        report.broker_cpu_cores =
            Some((e.cpu_ticks.saturating_sub(s.cpu_ticks)) as f64 / USER_HZ / window_seconds.max(1e-9));
    }
    Ok(report)
}

impl Report {
    /// The report as a person reads it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let opt =
            |v: Option<u64>| v.map_or("n/a (no --broker-pid)".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let lat = |l: &Latency| {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            format!("n={} p50={} p90={} p99={} max={} ms", l.count, f(l.p50_ms), f(l.p90_ms), f(l.p99_ms), f(l.max_ms))
        };
        let _ = writeln!(o, "brokers: {}", self.brokers.join(", "));
        let _ = writeln!(
            o,
            "agents: {} asked, {} registered in {:.1} s, {} connection failures, {} sessions lost",
            self.agents, self.agents_registered, self.connect_seconds, self.connect_failures, self.disconnects
        );
        let _ =
            writeln!(o, "window: {:.1} s, load average {} -> {}", self.window_seconds, self.loadavg.0, self.loadavg.1);
        let _ = writeln!(
            o,
            "hits: {} sent ({:.1} MiB), {} accepted, {} refused, {} rate-limited, {} unaccounted",
            self.hits_sent,
            self.hit_bytes_sent as f64 / 1048576.0,
            self.hits_accepted,
            self.hits_refused,
            self.hits_rate_limited,
            self.hits_unaccounted
        );
        let _ = writeln!(
            o,
            "log lines: {} sent, {} accepted, {} refused, {} rate-limited, {} unaccounted",
            self.lines_sent, self.lines_accepted, self.lines_refused, self.lines_rate_limited, self.lines_unaccounted
        );
        let _ = writeln!(
            o,
            "within the window: hits {:.0}/s sent, {:.0}/s taken in, {:.0}/s accepted; lines {:.0}/s sent, {:.0}/s accepted",
            self.hits_sent_per_sec,
            self.hits_processed_per_sec,
            self.hits_per_sec,
            self.lines_sent_per_sec,
            self.lines_per_sec
        );
        let _ =
            writeln!(o, "metric reports: {} sent, {} merged", self.metric_reports_sent, self.metric_reports_accepted);
        let drops: Vec<String> = self.broker_drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ =
            writeln!(o, "broker drops by reason: {}", if drops.is_empty() { "none".into() } else { drops.join(" ") });
        let closed: Vec<String> = self.sessions_closed_by_broker.iter().map(|(k, v)| format!("{v}× {k}")).collect();
        let _ = writeln!(
            o,
            "agent sessions the broker ended: {}",
            if closed.is_empty() { "none".into() } else { closed.join("; ") }
        );
        if let Some(c) = self.broker_catalogs {
            let _ = writeln!(o, "distinct catalogs held by the broker at the end: {c}");
        }
        if let Some(p) = self.broker_store_queue_peak_bytes {
            let _ = writeln!(
                o,
                "store writer queue: peak {:.1} MiB, {} waits for room (backpressure)",
                p as f64 / 1048576.0,
                self.broker_store_waits.unwrap_or(0)
            );
        }
        let _ = writeln!(
            o,
            "callers: {} placed, {} refused, {} waits, {} polls, {} removed, {} hits read, {} read errors",
            self.placed, self.place_errors, self.waits, self.polls, self.removed, self.hits_read, self.caller_errors
        );
        let _ = writeln!(o, "REST place call:              {}", lat(&self.place_call));
        let _ = writeln!(o, "REST place -> first hit:      {}", lat(&self.place_to_first_hit));
        let _ = writeln!(o, "REST hit sent -> wait return: {}", lat(&self.hit_to_wait_return));
        if self.mcp_sessions > 0 {
            let _ = writeln!(o, "MCP sessions: {}, {} snapshots placed over MCP", self.mcp_sessions, self.mcp_placed);
            let _ = writeln!(o, "MCP place call:               {}", lat(&self.mcp_place_call));
            let _ = writeln!(o, "MCP place -> first hit:       {}", lat(&self.mcp_place_to_first_hit));
            let _ = writeln!(o, "MCP hit sent -> wait return:  {}", lat(&self.mcp_hit_to_wait_return));
        }
        let _ = writeln!(
            o,
            "broker RSS: before {}, agents connected {}, end {}, peak {}",
            opt(self.broker_rss_before_kib),
            opt(self.broker_rss_connected_kib),
            opt(self.broker_rss_end_kib),
            opt(self.broker_rss_peak_kib)
        );
        if let Some(k) = self.loadgen_rss_peak_kib {
            let _ = writeln!(o, "load generator peak RSS: {:.1} MiB", k as f64 / 1024.0);
        }
        if let Some(k) = self.broker_kib_per_agent {
            let _ = writeln!(o, "broker memory per agent: {k:.1} KiB");
        }
        if let Some(c) = self.broker_cpu_cores {
            let _ = writeln!(o, "broker CPU over the window: {:.0}% of one core", c * 100.0);
        }
        for (e, n) in &self.errors {
            let _ = writeln!(o, "error x{n}: {e}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hit_frame_built_from_the_template_is_a_protocol_hit_of_about_the_size_asked() {
        let template = HitTemplate::new(2048).expect("template");
        let id = ActionId::generate();
        let frame = template.frame(&id, 7, "src/a \"b\".rs", 12, 3);
        assert!((1500..2600).contains(&frame.len()), "{}", frame.len());
        let AgentMessage::Hit(hit) = serde_json::from_str::<AgentMessage>(&frame).expect("a protocol frame") else {
            panic!("not a hit")
        };
        assert_eq!((hit.action_id, hit.seq, hit.location.line, hit.rules_version), (id, 7, 12, 3));
        assert_eq!(hit.location.file, "src/a \"b\".rs");
        assert!(matches!(hit.fields[0].value, Value::Int(us) if us > 0));
        assert_eq!(hit.fields[0].name, "sent_us");
    }

    #[test]
    fn counters_are_summed_over_labels_and_kept_by_reason() {
        let mut c = Counters::default();
        Counters::parse(
            "# HELP x\nperiscope_hits_accepted_total 5\nperiscope_broker_dropped_total{agent=\"a\",pool=\"p\",reason=\"hits_rate\"} 2\n\
             periscope_broker_dropped_total{agent=\"b\",pool=\"p\",reason=\"hits_rate\"} 3\nperiscope_other 9\n",
            &mut c,
        );
        assert_eq!(c.get("periscope_hits_accepted_total"), 5);
        assert_eq!(c.get("periscope_broker_dropped_total{hits_rate}"), 5);
        assert_eq!(c.values.len(), 2);
    }
}
