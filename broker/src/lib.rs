//! Periscope's broker: the agent gateway, the action engine, the REST API (and the
//! MCP server), and the `periscope` command.
//!
//! [`run`] serves everything on one listener until a shutdown future resolves; the
//! binary and the tests both call it (tests on `127.0.0.1:0`).
//!
//! # Layout
//!
//! - [`config`]: [`BrokerConfig`] from TOML and flags, validated.
//! - [`gateway`]: `GET /agents`, the agent WebSocket sessions.
//! - [`registry`]: connected and recently gone agents, their catalogs.
//! - [`engine`]: actions, hits, waiting, completion and expiry.
//! - [`telemetry`]: dynamic log lines and metric figures kept by the broker.
//! - [`rules`]: the redaction rules in force, swapped and pushed at run time.
//! - [`store`]: SQLite persistence of actions and hits under `--data-dir`.
//! - [`query`]: listing agents and sources with filters and pagination.
//! - [`api`]: the REST API under `/api/v1`.
//! - [`mcp`]: the MCP server at `/mcp` (streamable HTTP) and `periscope mcp` (stdio).
//! - [`auth`]: API-key authentication middleware and the per-call scope check.
//! - [`error`]: the error codes callers see.
//! - [`demo`]: `periscope demo` and its shop processes.

pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod mcp;
pub mod query;
pub mod registry;
pub mod rules;
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

use crate::auth::{Principal, Scope, secret_eq};
use crate::engine::Engine;
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
}

/// Shared state as handlers receive it.
pub type AppState = Arc<BrokerState>;

impl BrokerState {
    /// The principal an API key belongs to.
    pub fn api_principal(&self, token: &str) -> Option<Principal> {
        let mut found = None;
        // Compare against every key so timing does not reveal which one matched.
        for k in &self.config.api_keys {
            if secret_eq(&k.key, token) {
                let scopes = match &k.scopes {
                    Some(names) => names.iter().filter_map(|n| Scope::parse(n)).collect(),
                    None => Scope::DEFAULT.to_vec(),
                };
                found = Some(Principal { name: k.name.clone(), scopes });
            }
        }
        found
    }

    /// Pools an agent key may register into.
    pub fn agent_pools(&self, token: &str) -> Option<Vec<String>> {
        let mut found = None;
        for k in &self.config.agent_keys {
            if secret_eq(&k.key, token) {
                found = Some(k.pools.clone());
            }
        }
        found
    }

    /// Base URL clients use.
    pub fn public_url(&self) -> String {
        self.config.public_url(self.bound)
    }
}

/// Builds the HTTP application.
pub fn app(state: AppState) -> Router {
    let api = api::router().layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    let mcp = Router::new()
        .route_service("/mcp", mcp::service(Arc::clone(&state), state.cancel.child_token()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    Router::new()
        .merge(mcp)
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .route("/.well-known/oauth-protected-resource", get(protected_resource))
        .route("/.well-known/oauth-protected-resource/mcp", get(protected_resource))
        .route(periscope_protocol::messages::AGENT_GATEWAY_PATH, get(gateway::agents_ws))
        .nest("/api/v1", api)
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "agents_online": state.registry.online_count(),
        "actions_live": state.engine.live_count(),
    }))
}

/// `GET /metrics`: live dynamic metrics and the broker's own counters in the Prometheus
/// text exposition format (0.0.4), so they show up in Grafana with a scrape job.
async fn prometheus(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    use std::fmt::Write as _;
    use telemetry::{label, num};
    let mut out = String::new();
    let stats = &state.engine.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let mut agents: Vec<(String, String, u64, u64, u64)> = Vec::new();
    let mut known = 0usize;
    state.registry.for_each(|a| {
        known += 1;
        let s = &a.stats;
        agents.push((
            a.info.agent_id.to_string(),
            a.info.pool.clone(),
            s.hits_dropped_queue_full,
            s.hits_dropped_rate,
            s.hits_dropped_disconnected,
        ));
    });
    agents.sort();
    let _ = writeln!(out, "# HELP periscope_agents_connected Agents with a live session.");
    let _ = writeln!(out, "# TYPE periscope_agents_connected gauge");
    let _ = writeln!(out, "periscope_agents_connected {}", state.registry.online_count());
    let _ = writeln!(out, "# HELP periscope_agents_known Agents listed, online or recently offline.");
    let _ = writeln!(out, "# TYPE periscope_agents_known gauge");
    let _ = writeln!(out, "periscope_agents_known {known}");
    let _ = writeln!(out, "# HELP periscope_actions_live Actions collecting.");
    let _ = writeln!(out, "# TYPE periscope_actions_live gauge");
    let _ = writeln!(out, "periscope_actions_live {}", state.engine.live_count());
    for (name, help, value) in [
        ("periscope_hits_accepted_total", "Snapshot hits stored.", load(&stats.hits_accepted)),
        (
            "periscope_hits_refused_total",
            "Snapshot hits refused (ended or unknown action, over its count).",
            load(&stats.hits_refused),
        ),
        ("periscope_log_lines_accepted_total", "Dynamic log lines stored.", load(&stats.lines_accepted)),
        ("periscope_log_lines_refused_total", "Dynamic log lines refused.", load(&stats.lines_refused)),
        ("periscope_metric_reports_total", "Dynamic metric reports merged.", load(&stats.metric_reports)),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(out, "# HELP periscope_agent_hits_dropped_total Hits agents dropped, by reason, as they report.");
    let _ = writeln!(out, "# TYPE periscope_agent_hits_dropped_total counter");
    for (agent, pool, queue, rate, disconnected) in &agents {
        for (reason, n) in [("queue_full", queue), ("rate_limited", rate), ("disconnected", disconnected)] {
            let _ = writeln!(
                out,
                "periscope_agent_hits_dropped_total{{agent=\"{}\",pool=\"{}\",reason=\"{reason}\"}} {n}",
                label(agent),
                label(pool)
            );
        }
    }
    let _ = writeln!(out, "# HELP periscope_quota_pauses_total Actions paused by a quota, by reason.");
    let _ = writeln!(out, "# TYPE periscope_quota_pauses_total counter");
    let pauses = stats.quota_pauses.lock().map(|p| p.clone()).unwrap_or_default();
    for (reason, n) in pauses {
        let _ = writeln!(out, "periscope_quota_pauses_total{{reason=\"{}\"}} {n}", label(&reason));
    }

    let metrics = state.engine.metric_snapshot();
    let pool_of =
        |id: &periscope_protocol::AgentId| state.registry.with(id, |a| a.info.pool.clone()).unwrap_or_default();
    let _ = writeln!(out, "# HELP periscope_dynamic_hits_total Hits counted by counter metrics.");
    let _ = writeln!(out, "# TYPE periscope_dynamic_hits_total counter");
    for m in &metrics {
        let (action, kind, data) = (&m.action_id, m.kind, &m.data);
        if kind != periscope_protocol::MetricKind::Counter {
            continue;
        }
        for (agent, totals) in &data.per_agent {
            let _ = writeln!(
                out,
                "periscope_dynamic_hits_total{{action=\"{action}\",pool=\"{}\",agent=\"{agent}\"}} {}",
                label(&pool_of(agent)),
                totals.count
            );
        }
    }
    let _ = writeln!(out, "# HELP periscope_dynamic_value Samples of duration (ms) and value metrics.");
    let _ = writeln!(out, "# TYPE periscope_dynamic_value summary");
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
                    let _ = writeln!(out, "periscope_dynamic_value{{{labels},quantile=\"{q}\"}} {}", num(v));
                }
            }
            let _ = writeln!(out, "periscope_dynamic_value_sum{{{labels}}} {}", num(totals.sum));
            let _ = writeln!(out, "periscope_dynamic_value_count{{{labels}}} {}", totals.count);
        }
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out)
}

/// RFC 9728 protected-resource metadata: tells clients this resource takes bearer
/// tokens in the `Authorization` header.
async fn protected_resource(State(state): State<AppState>) -> Json<serde_json::Value> {
    let base = state.public_url();
    Json(serde_json::json!({
        "resource": format!("{base}/mcp"),
        "resource_name": "Periscope",
        "bearer_methods_supported": ["header"],
        "authorization_servers": [],
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
    let registry = Arc::new(Registry::new(config.agents.max_catalog_entries));
    let mut redaction = config.redaction.clone();
    let loaded = match &config.data_dir {
        Some(dir) => {
            let (store, loaded) = store::Store::open(dir)?;
            // Rules changed at run time outlive a restart unless the file is newer.
            if let Some((_, json)) = loaded.settings.iter().find(|(k, _)| k == rules::SETTING_KEY) {
                match serde_json::from_str::<periscope_redaction::RedactionConfig>(json) {
                    Ok(stored) if stored.version >= redaction.version => redaction = stored,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring stored redaction rules that do not decode"),
                }
            }
            Some((store, loaded))
        }
        None => None,
    };
    let rules = Arc::new(rules::Rules::new(redaction)?);
    let mut engine = Engine::new(
        Arc::clone(&registry),
        Arc::clone(&rules),
        config.limits,
        config.store.max_ended_actions,
        stop_rx.clone(),
    )
    .with_metric_interval(config.agents.metric_report_interval_ms);
    if let Some((store, loaded)) = loaded {
        engine = engine.with_store(store, loaded)?;
    }
    if config.mcp_allowed_hosts().iter().all(|h| h != &bound.ip().to_string()) && !bound.ip().is_loopback() {
        tracing::warn!(
            listen = %bound,
            "the broker listens beyond loopback but /mcp only answers the Host names in mcp.allowed_hosts \
             (and public_url's); add the names clients use"
        );
    }
    let cancel = CancellationToken::new();
    let state =
        Arc::new(BrokerState { config, registry, engine, shutdown: stop_rx.clone(), bound, cancel: cancel.clone() });
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&state)));
    let app = app(Arc::clone(&state));
    let mut serve_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = serve_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(listen = %bound, "periscope broker listening");
    shutdown.await;
    tracing::info!("periscope broker shutting down");
    let _ = stop_tx.send(true);
    cancel.cancel();
    housekeeping.abort();
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.map_err(anyhow::Error::from),
        Ok(Err(join)) => Err(anyhow::anyhow!("server task failed: {join}")),
        Err(_) => {
            tracing::warn!("connections still open after the grace period; closing them");
            Ok(())
        }
    };
    state.engine.flush();
    served
}

async fn housekeeping(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        state.engine.expire_due();
        n += 1;
        if n.is_multiple_of(240) {
            state.registry.expire_offline(state.config.agents.offline_retention_secs * 1_000);
        }
        if n % 14_400 == 1 {
            let retention_ms = state.config.store.hit_retention_days * 86_400_000;
            state.engine.purge_before(time::now_ms().saturating_sub(retention_ms));
        }
    }
}
