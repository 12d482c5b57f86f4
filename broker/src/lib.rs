//! Periscope's broker: the agent gateway, the action engine, the REST API (and the
//! MCP server). The `periscope` command is the `periscope` crate (`cli/`).
//!
//! [`run`] serves everything on one listener until a shutdown future resolves; the
//! binary and the tests both call it (tests on `127.0.0.1:0`).
//!
//! # Layout
//!
//! - [`config`]: [`BrokerConfig`] from TOML, flags and environment, validated.
//! - [`listener`]: accepts connections and holds each to the caps and timeouts of
//!   `[http]`.
//! - [`logging`]: the log filter (session ids and secrets stay out of info logs).
//! - [`gateway`]: `GET /agents`, the agent WebSocket sessions and their ingest budgets.
//! - [`registry`]: connected and recently gone agents, their catalogs.
//! - [`engine`]: actions, hits, waiting, completion and expiry.
//! - [`backend`]: the seams to where the shared state lives, and the single-node
//!   implementations (memory and SQLite).
//! - [`telemetry`]: dynamic log lines and metric figures kept by the broker.
//! - [`rules`]: the redaction rules in force per organization, swapped and pushed at
//!   run time.
//! - [`store`]: the SQLite database under `--data-dir` (actions, hits, settings, audit,
//!   keys).
//! - [`keys`]: API and agent keys, organizations, groups and pools; freshness across
//!   processes.
//! - [`access`]: roles, scopes, reach, tenancy: who may see and do what, as plain data.
//! - [`auth`]: principals, scope and role checks; the authentication middleware.
//! - [`quota`]: per-caller, per-agent and per-action quotas (`governor`).
//! - [`audit`]: the audit trail: entries, queries, exports.
//! - [`query`]: listing agents and sources with filters and pagination.
//! - [`api`]: the REST API under `/api/v1`.
//! - [`admin`]: the administration endpoints (keys, groups, pools, audit).
//! - [`openapi`]: the REST API's OpenAPI document and the JSON shape of every error.
//! - [`mcp`]: the MCP server at `/mcp` (streamable HTTP) and `periscope mcp` (stdio).
//! - [`oauth`]: the OAuth 2.1 authorization server: people sign in from MCP clients.
//! - [`error`]: the error codes callers see.

pub mod access;
pub mod admin;
pub mod agent_limits;
pub mod api;
pub mod audit;
pub mod audit_repeats;
pub mod auth;
pub mod backend;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod keys;
pub mod listener;
pub mod logging;
pub mod mcp;
pub mod oauth;
pub mod openapi;
pub mod query;
pub mod quota;
pub mod registry;
pub mod rules;
pub mod safety;
pub mod safety_api;
pub mod store;
pub mod telemetry;
pub mod time;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::BrokerConfig;

use crate::auth::{Principal, Scope};
use crate::engine::Engine;
use crate::keys::KeyStore;
use crate::quota::CallerLimits;
use crate::registry::Registry;

/// Everything request handlers share.
#[derive(Debug)]
pub struct BrokerState {
    /// The validated configuration.
    pub config: BrokerConfig,
    /// Agents.
    pub registry: Arc<Registry>,
    /// Actions and hits.
    pub engine: Engine,
    /// Flips to true when the broker shuts down; sessions and long polls watch it.
    pub shutdown: watch::Receiver<bool>,
    /// The address actually bound (port 0 resolved).
    pub bound: SocketAddr,
    /// Cancelled when the broker shuts down: ends MCP sessions and their open streams,
    /// which graceful shutdown would otherwise wait on.
    pub cancel: CancellationToken,
    /// API and agent keys, organizations, groups, pools.
    pub keys: Arc<KeyStore>,
    /// Per-caller rate and wait limits.
    pub callers: CallerLimits,
    /// Which key owns each MCP session.
    pub mcp_sessions: Arc<mcp::sessions::SessionOwners>,
    /// Per-agent-key and per-organization ingest budgets, cool-downs, session slots.
    pub agent_limits: agent_limits::AgentLimits,
    /// The database directory: the data directory, or a scratch directory removed when
    /// the broker stops.
    pub data_dir: std::path::PathBuf,
    /// Reads the audit trail.
    pub audit: Arc<dyn backend::AuditReader>,
    /// The database writer (flushed and stopped when the state is dropped).
    pub durable: Option<store::Store>,
    /// Which node holds each agent, and the bus between nodes (one node: the local
    /// directory).
    pub directory: Arc<dyn backend::AgentDirectory>,
    /// The shared Redis, in cluster mode.
    pub redis: Option<backend::redis::Redis>,
    /// Where organizations' redaction rules changed at run time are kept.
    pub rule_store: Option<Arc<dyn backend::RuleStore>>,
    /// Where organizations' blocklists and pauses are kept (`safety` namespace).
    pub safety_store: Option<Arc<dyn backend::RuleStore>>,
    /// When this node started (Unix ms).
    pub started_at_ms: u64,
    /// The scratch directory of a broker without `--data-dir` (removed when dropped).
    pub scratch: Option<store::ScratchDir>,
    /// The authorization server, when `[oauth] enabled`.
    pub oauth: Option<Arc<oauth::OAuth>>,
}

/// Shared state as handlers receive it.
pub type AppState = Arc<BrokerState>;

impl BrokerState {
    /// Checks again, after a long wait, that the caller's key still works: a key
    /// revoked while its call waited gets no result.
    pub async fn recheck(&self, principal: &Principal) -> Result<(), error::ApiError> {
        if principal.via.is_some() {
            let valid = match &self.oauth {
                Some(o) => o.still_valid(self, principal).await,
                None => false,
            };
            return if valid {
                Ok(())
            } else {
                Err(error::ApiError::new(
                    error::ErrorCode::Unauthorized,
                    "the sign-in was revoked or the user disabled while the call waited; nothing is returned",
                ))
            };
        }
        let active = self
            .keys
            .refresh()
            .await
            .ok()
            .and_then(|d| d.key(&principal.key_id).map(|k| k.status(time::now_ms()) == keys::KeyStatus::Active));
        if active == Some(true) {
            Ok(())
        } else {
            Err(error::ApiError::new(
                error::ErrorCode::Unauthorized,
                "the API key was revoked or expired while the call waited; nothing is returned",
            ))
        }
    }

    /// Base URL clients use.
    pub fn public_url(&self) -> String {
        self.config.public_url(self.bound)
    }
}

/// Builds the HTTP application.
pub fn app(state: AppState) -> Router {
    let api = api::router()
        .merge(oauth::admin::router())
        .fallback(openapi::unknown_route)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), committed))
        .layer(axum::middleware::from_fn(openapi::json_errors));
    let mcp = Router::new()
        .route_service("/mcp", mcp::service(Arc::clone(&state), state.cancel.child_token()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), mcp::sessions::bind_sessions))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    let metrics = Router::new()
        .route(
            "/metrics",
            get(prometheus).layer(axum::middleware::from_fn_with_state(Scope::SystemRead, auth::require_scope)),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    Router::new()
        .merge(mcp)
        .merge(metrics)
        .route("/healthz", get(healthz))
        .route("/.well-known/oauth-protected-resource", get(protected_resource))
        .route("/.well-known/oauth-protected-resource/mcp", get(protected_resource))
        .merge(match state.oauth {
            Some(_) => oauth::endpoints::router(),
            None => Router::new(),
        })
        .route(periscope_protocol::messages::AGENT_GATEWAY_PATH, get(gateway::agents_ws))
        .route("/api/v1/openapi.json", get(openapi::document))
        .nest("/api/v1", api)
        .fallback(openapi::unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024))
        .with_state(state)
}

/// Holds every REST answer until what the broker queued for the store before it is
/// committed: a caller told that an action, a key's use, a hit, a line or an audit
/// entry exists can count on it surviving a crash right after (see
/// [`store::StoreHandle::barrier`]; MCP tools do the same on their way out).
async fn committed(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    state.engine.committed().await;
    response
}

/// `GET /healthz`: ready or not, for load balancers; says nothing about any tenant. A
/// cluster node that cannot reach Redis is not ready (503): it keeps its agents
/// connected but refuses new placements.
async fn healthz(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let node = state.directory.node().to_owned();
    match &state.redis {
        Some(r) if !r.is_up() => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "5")],
            Json(serde_json::json!({
                "status": "not_ready", "version": env!("CARGO_PKG_VERSION"), "node": node, "redis": "unreachable",
            })),
        )
            .into_response(),
        Some(_) => Json(serde_json::json!({
            "status": "ok", "version": env!("CARGO_PKG_VERSION"), "node": node, "redis": "up",
        }))
        .into_response(),
        None => Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })).into_response(),
    }
}

/// `GET /metrics` (an API key with `mcp:system:read`; Prometheus sends it as a bearer
/// token): live dynamic metrics and the broker's counters in the Prometheus text
/// exposition format (0.0.4), limited to what the key may see: its organization's
/// counters, and the agents and actions of the pools within its reach.
async fn prometheus(
    State(state): State<AppState>,
    axum::extract::Extension(caller): axum::extract::Extension<Principal>,
) -> impl axum::response::IntoResponse {
    use std::fmt::Write as _;
    use telemetry::{label, num};
    let mut out = String::new();
    let stats = state.engine.stats.visible_to(&caller);
    let mut agents: Vec<AgentRow> = Vec::new();
    let (mut known, mut online) = (0usize, 0usize);
    state.registry.for_each(|a| {
        if !caller.sees_pool(&a.org, &a.info.pool) {
            return;
        }
        known += 1;
        online += usize::from(a.online());
        agents.push((a.info.agent_id.to_string(), a.info.pool.clone(), a.stats.clone(), a.dropped));
    });
    agents.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let _ = writeln!(out, "# HELP periscope_agents_connected Agents with a live session.");
    let _ = writeln!(out, "# TYPE periscope_agents_connected gauge");
    let _ = writeln!(out, "periscope_agents_connected {online}");
    let _ = writeln!(out, "# HELP periscope_agents_known Agents listed, online or recently offline.");
    let _ = writeln!(out, "# TYPE periscope_agents_known gauge");
    let _ = writeln!(out, "periscope_agents_known {known}");
    let _ = writeln!(out, "# HELP periscope_actions_live Actions collecting.");
    let _ = writeln!(out, "# TYPE periscope_actions_live gauge");
    let live = state.engine.live_count_visible(&caller).await.unwrap_or(0);
    if let Some(redis) = &state.redis {
        let _ =
            writeln!(out, "# HELP periscope_redis_up Whether this node reaches the cluster's Redis (1) or not (0).");
        let _ = writeln!(out, "# TYPE periscope_redis_up gauge");
        let _ = writeln!(out, "periscope_redis_up {}", u8::from(redis.is_up()));
    }
    let _ = writeln!(out, "periscope_actions_live {live}");
    if let Some(q) = state.engine.store_queue() {
        for (name, help, value) in [
            ("periscope_store_queue_bytes", "Bytes of hits, lines and figures queued for the store's writer.", q.bytes),
            ("periscope_store_queue_rows", "Hits, lines and figures queued for the store's writer.", q.rows),
            ("periscope_store_queue_peak_bytes", "The most bytes queued for the store's writer at once.", q.peak_bytes),
            ("periscope_store_queue_capacity_bytes", "Room agents' sessions may reserve in that queue.", q.capacity),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "periscope_store_ingest_waits_total";
        let _ = writeln!(out, "# HELP {name} Times an agent's session waited for the store's writer (backpressure).");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", q.waits);
    }
    let catalogs = state.registry.catalog_stats();
    let _ =
        writeln!(out, "# HELP periscope_catalogs_distinct Distinct agent catalogs held (shared by identical agents).");
    let _ = writeln!(out, "# TYPE periscope_catalogs_distinct gauge");
    let _ = writeln!(out, "periscope_catalogs_distinct {}", catalogs.catalogs);
    let _ = writeln!(out, "# HELP periscope_catalog_bytes Bytes those catalogs are charged, each counted once.");
    let _ = writeln!(out, "# TYPE periscope_catalog_bytes gauge");
    let _ = writeln!(out, "periscope_catalog_bytes {}", catalogs.bytes);
    for (name, help, value) in [
        ("periscope_hits_accepted_total", "Snapshot hits stored.", stats.hits_accepted),
        (
            "periscope_hits_refused_total",
            "Snapshot hits refused (ended or unknown action, over its count).",
            stats.hits_refused,
        ),
        (
            "periscope_hits_rate_limited_total",
            "Snapshot hits the broker dropped over an action's per-agent rate.",
            stats.hits_rate_limited,
        ),
        ("periscope_log_lines_accepted_total", "Dynamic log lines stored.", stats.lines_accepted),
        ("periscope_log_lines_refused_total", "Dynamic log lines refused.", stats.lines_refused),
        (
            "periscope_log_lines_rate_limited_total",
            "Dynamic log lines the broker dropped over an action's rates.",
            stats.lines_rate_limited,
        ),
        ("periscope_metric_reports_total", "Dynamic metric reports merged.", stats.metric_reports),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let mut tail = String::new();
    let _ = writeln!(tail, "# HELP periscope_quota_pauses_total Actions paused by a quota, by reason.");
    let _ = writeln!(tail, "# TYPE periscope_quota_pauses_total counter");
    for (reason, n) in &stats.quota_pauses {
        let _ = writeln!(tail, "periscope_quota_pauses_total{{reason=\"{}\"}} {n}", label(reason));
    }

    let metrics: Vec<_> = state
        .engine
        .metric_snapshot(caller.org())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.pools.iter().all(|p| caller.sees_pool(&m.org, p)))
        .collect();
    let pool_of =
        |id: &periscope_protocol::AgentId| state.registry.with(id, |a| a.info.pool.clone()).unwrap_or_default();
    let _ = writeln!(tail, "# HELP periscope_dynamic_hits_total Hits counted by counter metrics.");
    let _ = writeln!(tail, "# TYPE periscope_dynamic_hits_total counter");
    for m in &metrics {
        let (action, kind, data) = (&m.action_id, m.kind, &m.data);
        if kind != periscope_protocol::MetricKind::Counter {
            continue;
        }
        for (agent, totals) in &data.per_agent {
            let _ = writeln!(
                tail,
                "periscope_dynamic_hits_total{{action=\"{action}\",pool=\"{}\",agent=\"{agent}\"}} {}",
                label(&pool_of(agent)),
                totals.count
            );
        }
    }
    let _ = writeln!(tail, "# HELP periscope_dynamic_value Samples of duration (ms) and value metrics.");
    let _ = writeln!(tail, "# TYPE periscope_dynamic_value summary");
    for m in &metrics {
        let (action, data) = (&m.action_id, &m.data);
        let kind_name = match m.kind {
            periscope_protocol::MetricKind::Counter => continue,
            periscope_protocol::MetricKind::Duration => "duration",
            periscope_protocol::MetricKind::Value => "value",
        };
        for (agent, totals) in &data.per_agent {
            let labels = format!(
                "action=\"{action}\",pool=\"{}\",agent=\"{agent}\",kind=\"{kind_name}\"",
                label(&pool_of(agent))
            );
            for q in [0.5, 0.9, 0.99] {
                if let Some(v) = totals.histogram.quantile(q) {
                    let _ = writeln!(tail, "periscope_dynamic_value{{{labels},quantile=\"{q}\"}} {}", num(v));
                }
            }
            let _ = writeln!(tail, "periscope_dynamic_value_sum{{{labels}}} {}", num(totals.sum));
            let _ = writeln!(tail, "periscope_dynamic_value_count{{{labels}}} {}", totals.count);
        }
    }
    // Each agent's series are written a few hundred agents at a time as the response
    // is sent: with 10,000 agents they are megabytes of text, never held at once.
    let agents = Arc::new(agents);
    let families = [AgentFamily::HitsDropped, AgentFamily::BrokerDropped, AgentFamily::Warnings];
    let per_agent = families.into_iter().flat_map(move |family| {
        let agents = Arc::clone(&agents);
        let chunks = (0..agents.len()).step_by(METRICS_AGENTS_PER_CHUNK).map(move |from| {
            let to = (from + METRICS_AGENTS_PER_CHUNK).min(agents.len());
            let mut chunk = String::new();
            for row in agents.get(from..to).unwrap_or_default() {
                family.write(&mut chunk, row);
            }
            chunk
        });
        std::iter::once(family.header().to_owned()).chain(chunks)
    });
    let body = std::iter::once(out).chain(per_agent).chain(std::iter::once(tail));
    let body = axum::body::Body::from_stream(futures_util::stream::iter(body.map(Ok::<_, std::convert::Infallible>)));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// Agents written per chunk of a `/metrics` response.
const METRICS_AGENTS_PER_CHUNK: usize = 256;

/// What `/metrics` lists of one agent: its id, pool, last heartbeat and the broker's drops.
type AgentRow = (String, String, periscope_protocol::Heartbeat, registry::IngestDrops);

/// The `/metrics` families with one series (or several) per agent.
#[derive(Debug, Clone, Copy)]
enum AgentFamily {
    HitsDropped,
    BrokerDropped,
    Warnings,
}

impl AgentFamily {
    fn header(self) -> &'static str {
        match self {
            AgentFamily::HitsDropped => {
                "# HELP periscope_agent_hits_dropped_total Hits agents dropped, by reason, as they report.\n\
                 # TYPE periscope_agent_hits_dropped_total counter\n"
            }
            AgentFamily::BrokerDropped => {
                "# HELP periscope_broker_dropped_total What the broker dropped from each agent over its budgets, by \
                 reason.\n# TYPE periscope_broker_dropped_total counter\n"
            }
            AgentFamily::Warnings => {
                "# HELP periscope_agent_warnings_total Rate-limit warnings the broker sent each agent.\n\
                 # TYPE periscope_agent_warnings_total counter\n"
            }
        }
    }

    fn write(self, out: &mut String, (agent, pool, hb, d): &AgentRow) {
        use std::fmt::Write as _;
        use telemetry::label;
        let (agent, pool) = (label(agent), label(pool));
        let (name, counts): (&str, &[(&str, u64)]) = match self {
            AgentFamily::HitsDropped => (
                "periscope_agent_hits_dropped_total",
                &[
                    ("queue_full", hb.hits_dropped_queue_full),
                    ("rate_limited", hb.hits_dropped_rate),
                    ("disconnected", hb.hits_dropped_disconnected),
                    ("open_calls_full", hb.calls_dropped_open),
                ],
            ),
            AgentFamily::BrokerDropped => (
                "periscope_broker_dropped_total",
                &[
                    ("hits_rate", d.hits_rate),
                    ("bytes_rate", d.bytes_rate),
                    ("action_rate", d.action_rate),
                    ("log_rate", d.log_rate),
                    ("key_rate", d.key_rate),
                    ("org_rate", d.org_rate),
                    ("unknown_redaction_rule", d.unknown_rules),
                    ("catalog", d.catalog),
                    ("bad_frame", d.bad_frames),
                    ("protocol_error", d.protocol_errors),
                    ("ping_timeout", d.ping_timeouts),
                    ("outbound_queue_full", d.queue_full),
                    ("unavailable", d.unavailable),
                    ("lease_lost", d.lease_lost),
                ],
            ),
            AgentFamily::Warnings => {
                let _ =
                    writeln!(out, "periscope_agent_warnings_total{{agent=\"{agent}\",pool=\"{pool}\"}} {}", d.warnings);
                return;
            }
        };
        for (reason, n) in counts {
            let _ = writeln!(out, "{name}{{agent=\"{agent}\",pool=\"{pool}\",reason=\"{reason}\"}} {n}");
        }
    }
}

/// RFC 9728 protected-resource metadata: tells clients this resource takes bearer
/// tokens in the `Authorization` header.
async fn protected_resource(State(state): State<AppState>) -> Json<serde_json::Value> {
    let base = state.public_url();
    Json(serde_json::json!({
        "resource": format!("{base}/mcp"),
        "resource_name": "Periscope",
        "bearer_methods_supported": ["header"],
        "authorization_servers": if state.oauth.is_some() { vec![base.clone()] } else { Vec::new() },
        "scopes_supported": ["mcp:system:read", "mcp:agents:read", "mcp:actions:write", "mcp:hits:read", "mcp:admin"],
        "resource_documentation": format!("{base}/healthz"),
    }))
}

/// How long open connections get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the broker on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let bound = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let a = &config.agents;
    let node_name = config.cluster.node_name(bound);
    let (bus_tx, bus_rx) = tokio::sync::mpsc::channel(16_384);
    let mut registry = Registry::new(a.max_catalog_entries)
        .with_max_per_org(a.max_agents_per_org)
        .with_max_catalog_bytes(a.max_catalog_bytes)
        .with_identities(identity::Identities::new(
            a.identity_retention_secs.saturating_mul(1_000),
            usize::try_from(a.max_identities_per_org).unwrap_or(usize::MAX),
        ));
    if config.cluster.enabled() {
        registry = registry.with_cluster(node_name.clone(), bus_tx);
    }
    let registry = Arc::new(registry);
    // Without a data directory the same database lives in a scratch directory that
    // goes away with the broker: one code path, nothing survives.
    let scratch = match &config.data_dir {
        Some(_) => None,
        None => Some(store::ScratchDir::new()?),
    };
    let dir = match (&config.data_dir, &scratch) {
        (Some(d), _) => d.clone(),
        (None, Some(s)) => s.path().to_owned(),
        (None, None) => anyhow::bail!("no data directory"),
    };
    // In a cluster the key directory, like the rest of the shared state, is in Redis.
    let redis = match &config.cluster.redis_url {
        None => None,
        Some(url) => Some(
            backend::redis::Redis::connect(url, &config.cluster.key_prefix)
                .await
                .map_err(|e| anyhow::anyhow!("cluster.redis_url ({}): {e}", backend::redis::redact_url(url)))?,
        ),
    };
    let key_backend: Arc<dyn backend::KeyBackend> = match &redis {
        None => Arc::new(backend::local::SqliteKeys::open(&dir)?),
        Some(r) => Arc::new(backend::redis::RedisKeys::new(r.clone(), node_name.clone())),
    };
    let keys =
        Arc::new(KeyStore::open(key_backend, &config.api_keys, &config.agent_keys, config.callers.clone()).await?);
    if let Some(issued) = keys.bootstrap(config.api_keys.len()).await? {
        print_bootstrap_key(&issued, config.data_dir.is_some());
    } else if config.api_keys.is_empty()
        && !keys
            .current()
            .keys()
            .any(|k| k.kind == keys::KeyKind::Api && k.status(time::now_ms()) == keys::KeyStatus::Active)
    {
        tracing::warn!(
            data_dir = %dir.display(),
            "no API key works on this broker; create one with `periscope keys create --data-dir {} --name NAME \
             --role company_admin`",
            dir.display()
        );
    }
    let (store, mut loaded) = store::Store::open_with(&dir, config.store.max_queued_bytes)?;
    // Agent ids stay bound to their keys across restarts.
    registry.identities().restore(std::mem::take(&mut loaded.identities), store.handle());
    let rules = rules::Rules::new(config.redaction.clone())?;
    let engine = Engine::new(
        Arc::clone(&registry),
        Arc::new(rules),
        config.limits,
        config.store.max_ended_actions_per_org,
        stop_rx.clone(),
    )
    .with_metric_interval(config.agents.metric_report_interval_ms)
    .with_keys(Arc::clone(&keys))
    .with_ingest(config.ingest.clone())
    .with_org_quotas(config.org_quotas.resolve(&config.callers));
    let Wired { engine, audit, directory, redis, rule_store, safety_store } = match &config.cluster.redis_url {
        None => {
            let audit = Arc::new(backend::local::SqliteAudit::new(store.handle(), dir.clone()));
            let rule_store = Arc::new(backend::local::SqliteRules::new(Some(store.handle()), loaded.settings.clone()));
            let safety_store = Arc::new(backend::local::SqliteRules::namespaced(
                safety::NAMESPACE,
                Some(store.handle()),
                loaded.settings.clone(),
            ));
            let engine = engine.with_store(&store, dir.clone(), loaded, config.store.max_ended_actions_per_org)?;
            let directory = Arc::new(backend::local::LocalDirectory::new(node_name.clone()));
            Wired { engine, audit, directory, redis: None, rule_store, safety_store }
        }
        Some(url) => {
            let redis = backend::redis::Redis::connect(url, &config.cluster.key_prefix)
                .await
                .map_err(|e| anyhow::anyhow!("cluster.redis_url ({}): {e}", backend::redis::redact_url(url)))?;
            tracing::info!(node = %node_name, redis = %backend::redis::redact_url(url), "cluster node");
            let audit = Arc::new(backend::redis::RedisAudit::start(redis.clone()));
            let rule_store = Arc::new(backend::redis::RedisRules::new(redis.clone(), node_name.clone()));
            let safety_store =
                Arc::new(backend::redis::RedisRules::namespaced(safety::NAMESPACE, redis.clone(), node_name.clone()));
            let engine = engine
                .with_backend(
                    Arc::new(backend::redis::RedisActions::new(redis.clone(), config.store.max_ended_actions_per_org)),
                    backend::redis::RedisEvents::start(redis.clone(), stop_rx.clone()),
                )
                .with_audit(audit.clone())
                .with_rule_store(rule_store.clone())
                .with_errors(Arc::new(backend::redis::RedisErrors::new(redis.clone())));
            let directory = backend::redis::RedisDirectory::start(redis.clone(), node_name.clone(), stop_rx.clone());
            Wired { engine, audit, directory, redis: Some(redis), rule_store, safety_store }
        }
    };
    let engine = engine.with_safety(Arc::new(safety::Safety::new(config.blocklist.clone())), safety_store.clone());
    // Blocklists and pauses outlive a restart.
    match safety_store.load_all().await {
        Ok(stored) => {
            for (org, json) in stored {
                match serde_json::from_str::<safety::SafetySettings>(&json) {
                    Ok(settings) => {
                        engine.safety.restore(&org, settings);
                    }
                    Err(e) => tracing::warn!(org, error = %e, "ignoring stored safety settings that do not decode"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the stored safety settings"),
    }
    // Rules changed at run time outlive a restart unless the file's are newer.
    match rule_store.load_all().await {
        Ok(stored) => {
            for (org, json) in stored {
                match serde_json::from_str::<periscope_redaction::RedactionConfig>(&json) {
                    Ok(config) => engine.rules.restore(&org, config),
                    Err(e) => tracing::warn!(org, error = %e, "ignoring stored redaction rules that do not decode"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the stored redaction rules"),
    }
    if config.mcp_allowed_hosts().iter().all(|h| h != &bound.ip().to_string()) && !bound.ip().is_loopback() {
        tracing::warn!(
            listen = %bound,
            "the broker listens beyond loopback but /mcp only answers the Host names in mcp.allowed_hosts \
             (and public_url's); add the names clients use"
        );
    }
    let cancel = CancellationToken::new();
    let org_quotas = config.org_quotas.resolve(&config.callers);
    let agent_limits = agent_limits::AgentLimits::new(
        config.ingest.clone(),
        usize::try_from(config.agents.max_sessions_per_key).unwrap_or(usize::MAX),
    );
    let oauth = if config.oauth.enabled {
        let store: Arc<dyn oauth::OAuthStore> = Arc::new(oauth::sqlite::SqliteOAuthStore::open(&dir)?);
        Some(Arc::new(oauth::OAuth::open(config.oauth.clone(), store, &keys).await?))
    } else {
        None
    };
    let state = Arc::new(BrokerState {
        config,
        registry,
        engine,
        shutdown: stop_rx.clone(),
        bound,
        cancel: cancel.clone(),
        keys,
        mcp_sessions: Arc::default(),
        callers: match &redis {
            Some(r) => CallerLimits::with_budgets(org_quotas, Arc::new(backend::redis::RedisBudgets::new(r.clone()))),
            None => CallerLimits::new(org_quotas),
        },
        agent_limits,
        data_dir: dir,
        audit,
        durable: Some(store),
        directory,
        redis,
        rule_store: Some(rule_store),
        safety_store: Some(safety_store),
        started_at_ms: time::now_ms(),
        scratch,
        oauth,
    });
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&state)));
    let node_tasks = cluster::spawn(Arc::clone(&state), bus_rx);
    let app = app(Arc::clone(&state));
    let serve_stop = CancellationToken::new();
    let server =
        tokio::spawn(listener::serve(listener, app, state.config.http.clone(), serve_stop.clone(), SHUTDOWN_GRACE));
    tracing::info!(listen = %bound, "periscope broker listening");
    shutdown.await;
    tracing::info!("periscope broker shutting down");
    let _ = stop_tx.send(true);
    cancel.cancel();
    housekeeping.abort();
    for t in node_tasks {
        t.abort();
    }
    serve_stop.cancel();
    // The listener closes what is still open after the grace period itself.
    let served = match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), server).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(join)) => Err(anyhow::anyhow!("server task failed: {join}")),
        Err(_) => {
            tracing::warn!("the listener did not stop after the grace period");
            Ok(())
        }
    };
    state.mcp_sessions.flush(&state.engine);
    state.engine.flush();
    served
}

/// Prints the one-time bootstrap key to standard error, where an operator starting the
/// broker sees it (and a log collector keeps it only if the operator lets it).
fn print_bootstrap_key(issued: &keys::IssuedKey, persistent: bool) {
    let rule = "=".repeat(78);
    eprintln!("{rule}");
    eprintln!("PERISCOPE BOOTSTRAP KEY (shown once; it is not stored and will not be shown again)");
    eprintln!();
    eprintln!("  {}", issued.secret);
    eprintln!();
    eprintln!(
        "  id {}, role company_admin, organization default. Use it to create the keys people and",
        issued.key.key_id
    );
    eprintln!("  assistants use, then revoke it. Keys it creates through the API are revoked with it; create");
    eprintln!("  lasting admin keys with `periscope keys create`, which belong to no other key.");
    if !persistent {
        eprintln!("  (No --data-dir: this broker keeps nothing, so the next start issues another one.)");
    }
    eprintln!("{rule}");
}

/// The engine and the parts beside it, wired to one backend (single node or Redis).
struct Wired {
    engine: Engine,
    audit: Arc<dyn backend::AuditReader>,
    directory: Arc<dyn backend::AgentDirectory>,
    redis: Option<backend::redis::Redis>,
    rule_store: Arc<dyn backend::RuleStore>,
    safety_store: Arc<dyn backend::RuleStore>,
}

async fn housekeeping(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        state.engine.expire_due().await;
        state.mcp_sessions.flush(&state.engine);
        // Notices key changes made by other processes (`periscope keys revoke`) even
        // with no API traffic, so agent sessions on a revoked agent key end promptly.
        if let Err(e) = state.keys.refresh().await {
            tracing::warn!(error = %e, "cannot read the key store");
        }
        n += 1;
        if n.is_multiple_of(4) {
            state.engine.flush_repeats();
        }
        if n.is_multiple_of(240) {
            let gone = state.registry.expire_offline(state.config.agents.offline_retention_secs * 1_000);
            // And from the cluster's directory (any node may: forgetting twice is harmless).
            for id in gone {
                let _ = state.directory.forget(&id).await;
            }
            state.registry.identities().expire();
        }
        if n % 240 == 1
            && let Some(o) = &state.oauth
        {
            o.purge().await;
        }
        if n % 14_400 == 1 {
            let retention_ms = state.config.store.hit_retention_days * 86_400_000;
            state.engine.purge_before(time::now_ms().saturating_sub(retention_ms)).await;
            let audit_ms = state.config.store.audit_retention_days * 86_400_000;
            state.engine.purge_audit_before(time::now_ms().saturating_sub(audit_ms));
            let directory = state.keys.current();
            let active =
                |id: &str| directory.key(id).is_some_and(|k| k.status(time::now_ms()) == keys::KeyStatus::Active);
            state.callers.retain(active);
            state.agent_limits.retain(active);
        }
    }
}
