//! The REST API under `/api/v1`: JSON in, JSON out, errors as
//! `{"error": {"code", "message", "details"}}` with a fitting HTTP status.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/agents` | agents (`pool`, `tag`, `service`, `language`, `status`, `q`, `cursor`, `limit`) |
//! | GET | `/agents/{agent_id}` | one agent |
//! | GET | `/sources` | inspectable locations (`agent_id`, `pool`, `tag`, `file`, `name`, `q`, `cursor`, `limit`) |
//! | POST | `/actions` | place a snapshot (body: [`PlaceBody`]) |
//! | POST | `/logs` | place a dynamic log (body: [`LogRequest`], the `place_log` tool's arguments) |
//! | POST | `/metrics` | place a dynamic metric (body: [`MetricRequest`], the `place_metric` tool's arguments) |
//! | POST | `/errors/capture` | capture errors on a target (body: [`ErrorCaptureRequest`], the `capture_errors` tool's arguments) |
//! | GET | `/errors` | the distinct errors, newest first (`pool`, `tag`, `service`, `since_ms`, `limit`, `snapshots`; the `list_errors` tool) |
//! | GET | `/actions` | actions (`status`, `target`, `created_by`) |
//! | GET | `/actions/{action_id}` | one action with per-agent status |
//! | DELETE | `/actions/{action_id}` | remove an action |
//! | GET | `/actions/{action_id}/hits` | hits after `since`; `wait_seconds` long-polls for new ones |
//! | GET | `/actions/{action_id}/lines` | a log's lines after `since`; `wait_seconds` long-polls |
//! | GET | `/health` | the `system_health` tool: caller, scopes, remaining quotas, pauses (`mcp:system:read`) |
//! | GET | `/pools` | pools within the caller's reach, with their group (`mcp:agents:read`) |
//! | GET | `/cluster` | the nodes, their agents and their load, and whether Redis answers (`mcp:admin`, `company_admin`) |
//! | GET | `/redaction` | the organization's redaction rules (`mcp:admin`, `company_admin`) |
//! | PUT | `/redaction` | replace them: TOML, or JSON with `Content-Type: application/json` (`mcp:admin`, `company_admin`); pushed to the organization's agents |
//!
//! Keys, groups, pool assignments and the audit trail are in [`crate::admin`]; the
//! blocklist and the pause switch in [`crate::safety_api`].
//!
//! Each route needs the scope of the MCP tool that does the same thing (agents and
//! sources: `mcp:agents:read`; placing and removing: `mcp:actions:write`; reading
//! actions and hits: `mcp:hits:read`); without it the answer is 403 `insufficient_scope`.
//! Agents, pools and actions outside the key's reach are not listed, and naming them
//! answers 404 `not_found`, exactly like names that do not exist. Long polls
//! (`wait_seconds`) count against the key's concurrent waits.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::handler::Handler as _;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::{Json, Router};
use periscope_protocol::limits::action_bounds;
use serde::Deserialize;

use crate::AppState;
use crate::auth::{CallCharge, CompanyAdmin, Principal, Scope, require_scope};
use crate::engine::requests::{check_limit, check_wait_seconds};
use crate::engine::{
    ActionFilter, ActionStatus, ActionView, ErrorCaptureRequest, HitsPage, LogRequest, MetricRequest, SnapshotRequest,
};
use crate::error::ApiError;
use crate::query::{self, AgentFilter, Page, PoolView, SourceFilter, SourceView};
use crate::registry::AgentView;
use crate::telemetry::LinesPage;

/// The `/api/v1` router (authentication is layered on by the caller). Each route needs
/// the same scope as the MCP tool that does the same thing; a key without it gets 403
/// `insufficient_scope`.
pub fn router() -> Router<AppState> {
    let agents = || from_fn_with_state(Scope::AgentsRead, require_scope);
    let write = || from_fn_with_state(Scope::ActionsWrite, require_scope);
    let read = || from_fn_with_state(Scope::HitsRead, require_scope);
    Router::new()
        .route("/agents", get(list_agents.layer(agents())))
        .route("/agents/{agent_id}", get(get_agent.layer(agents())))
        .route("/sources", get(list_sources.layer(agents())))
        .route("/actions", get(list_actions.layer(read())).post(place_action.layer(write())))
        .route("/actions/{action_id}", get(get_action.layer(read())).delete(remove_action.layer(write())))
        .route("/actions/{action_id}/hits", get(get_hits.layer(read())))
        .route("/actions/{action_id}/lines", get(get_lines.layer(read())))
        .route(
            "/redaction",
            get(get_redaction.layer(from_fn_with_state(Scope::Admin, require_scope)))
                .put(put_redaction.layer(from_fn_with_state(Scope::Admin, require_scope))),
        )
        .route("/logs", axum::routing::post(place_log.layer(write())))
        .route("/metrics", axum::routing::post(place_metric.layer(write())))
        .route("/errors/capture", axum::routing::post(capture_errors.layer(write())))
        .route("/errors", get(list_errors.layer(read())))
        .route("/health", get(health.layer(from_fn_with_state(Scope::SystemRead, require_scope))))
        .route("/pools", get(list_pools.layer(agents())))
        .route("/cluster", get(cluster.layer(from_fn_with_state(Scope::Admin, require_scope))))
        .merge(crate::admin::router())
        .merge(crate::safety_api::router())
}

/// The `system_health` answer, shared by the tool and `GET /api/v1/health`: who the
/// caller is, what it may do, its remaining budgets, and its paused actions.
pub async fn health_body(
    state: &AppState,
    p: &Principal,
    charge: Option<&CallCharge>,
) -> Result<serde_json::Value, ApiError> {
    // Counts kept in the shared state are left out (null) while it is out of reach: the
    // answer then says so rather than failing.
    let mine = state.engine.live_count_by_key(p).await.ok();
    let actions_live = state.engine.live_count_visible(p).await.ok();
    let paused = state.engine.paused_for(p).await.ok();
    let q = p.quotas;
    let calls = match charge.map(|c| &c.0) {
        Some(Ok(b)) => {
            serde_json::json!({ "limit_per_minute": b.limit_per_minute, "burst": b.burst, "remaining": b.remaining })
        }
        _ => serde_json::json!({ "limit_per_minute": q.calls_per_minute, "burst": q.call_burst }),
    };
    let waits = state.callers.waits_in_use(&p.key_id).await;
    let agent_quotas = &state.config.quotas;
    let ingest = &state.config.ingest;
    let cluster = cluster_view(state).await;
    let status = if state.redis.as_ref().is_some_and(|r| !r.is_up()) { "degraded" } else { "ok" };
    Ok(serde_json::json!({
        "status": status,
        "cluster": cluster,
        "version": env!("CARGO_PKG_VERSION"),
        "authenticated": true,
        "caller": {
            "key_id": p.key_id,
            "name": p.name,
            "org": p.org(),
            "role": p.role,
            "group": p.reach.group,
            "pools": p.reach.pools,
            "scopes": p.scope_names(),
        },
        // Within the key's reach: a pool-restricted key learns nothing of other pools.
        "agents_online": state.registry.count(|a| a.online() && p.sees_pool(&a.org, &a.info.pool)),
        "actions_live": actions_live,
        "quotas": {
            "calls_per_minute": calls,
            "concurrent_waits": { "in_use": waits, "limit": q.concurrent_waits,
                                  "remaining": (q.concurrent_waits as usize).saturating_sub(waits) },
            "live_actions": { "used": mine, "limit": q.live_actions,
                              "remaining": mine.map(|m| (q.live_actions as usize).saturating_sub(m)) },
            "agents": {
                "snapshot_hits_per_sec_per_action": agent_quotas.snapshot_hits_per_sec_per_action,
                "snapshot_hits_per_sec": agent_quotas.snapshot_hits_per_sec,
                "log_lines_per_sec": agent_quotas.log_lines_per_sec,
                "log_bytes_per_sec": agent_quotas.log_bytes_per_sec,
                "log_burst_factor": agent_quotas.log_burst_factor,
                "cpu_fraction": agent_quotas.cpu_fraction,
                "cpu_burst_micros": agent_quotas.cpu_burst_micros,
            },
            "broker_ingest": ingest,
            // The ceilings over all of the organization's keys (limits only: what other
            // keys use is not this key's to see).
            "organization": state.callers.org_quotas(),
        },
        "paused_actions": paused,
        "limits": {
            "max_hits": { "min": 1, "max": action_bounds::MAX_MAX_HITS, "default": action_bounds::DEFAULT_MAX_HITS },
            "timeout_seconds": { "min": 1, "max": action_bounds::MAX_WAIT_SECS, "default": action_bounds::DEFAULT_WAIT_SECS },
            "capture": state.engine.limits(),
        },
    }))
}

/// The nodes of the cluster this broker belongs to (itself alone on a single node), with
/// each one's load, and whether the shared Redis answers.
pub async fn cluster_view(state: &AppState) -> serde_json::Value {
    let here = crate::cluster::load(state);
    let Some(redis) = &state.redis else {
        return serde_json::json!({ "mode": "single", "node": state.directory.node(), "nodes": [here] });
    };
    let nodes = if redis.is_up() {
        state.directory.nodes().await.map(|n| n.into_iter().map(|(_, load)| load).collect::<Vec<_>>()).ok()
    } else {
        None
    };
    serde_json::json!({
        "mode": "cluster",
        "node": state.directory.node(),
        "redis": if redis.is_up() { "up" } else { "unreachable" },
        "nodes": nodes.unwrap_or_else(|| vec![here]),
    })
}

async fn cluster(State(state): State<AppState>, CompanyAdmin(_): CompanyAdmin) -> ApiResult<serde_json::Value> {
    Ok(Json(cluster_view(&state).await))
}

async fn health(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    charge: Option<Extension<CallCharge>>,
) -> ApiResult<serde_json::Value> {
    Ok(Json(health_body(&state, &principal, charge.as_ref().map(|c| &c.0)).await?))
}

async fn list_pools(State(state): State<AppState>, Extension(principal): Extension<Principal>) -> Json<Page<PoolView>> {
    let items = query::list_pools(&state.registry, &principal);
    Json(Page { total: items.len(), has_more: false, next_cursor: None, items, versions: None })
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn query_params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::invalid(format!("query string: {}", e.body_text())))
}

/// Splits comma-separated tags.
fn tags(raw: Option<&str>) -> Vec<String> {
    raw.map(|t| t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    pool: Option<String>,
    tag: Option<String>,
    service: Option<String>,
    language: Option<String>,
    status: Option<String>,
    q: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list_agents(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<AgentsQuery>, QueryRejection>,
) -> ApiResult<Page<AgentView>> {
    let q = query_params(q)?;
    let filter = AgentFilter {
        pool: q.pool,
        tags: tags(q.tag.as_deref()),
        service: q.service,
        language: q.language,
        status: q.status,
        text: q.q,
    };
    Ok(Json(query::list_agents(&state.registry, &filter, q.cursor.as_deref(), q.limit, &principal)?))
}

async fn get_agent(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent_id): Path<String>,
) -> ApiResult<AgentView> {
    Ok(Json(query::get_agent(&state.registry, &agent_id, &principal)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesQuery {
    agent_id: Option<String>,
    pool: Option<String>,
    tag: Option<String>,
    file: Option<String>,
    name: Option<String>,
    q: Option<String>,
    include_offline: Option<bool>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list_sources(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<SourcesQuery>, QueryRejection>,
) -> ApiResult<Page<SourceView>> {
    let q = query_params(q)?;
    let filter = SourceFilter {
        agent_id: q.agent_id,
        pool: q.pool,
        tags: tags(q.tag.as_deref()),
        file: q.file,
        name: q.name,
        text: q.q,
        include_offline: q.include_offline.unwrap_or(false),
    };
    Ok(Json(query::list_sources(&state.registry, &filter, q.cursor.as_deref(), q.limit, &principal)?))
}

/// Body of `POST /api/v1/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceBody {
    /// `snapshot` (logs and metrics arrive with their issue).
    #[serde(default = "snapshot_kind")]
    pub kind: String,
    /// Target agents by id.
    #[serde(default)]
    pub agent_ids: Vec<String>,
    /// Target pool.
    pub pool: Option<String>,
    /// Target tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// File path or suffix (with `line`; or `function` instead).
    pub file: Option<String>,
    /// Line.
    pub line: Option<u32>,
    /// A function (Python `module:qualname`) or span (Rust) instead of `file` and `line`.
    pub function: Option<String>,
    /// With `function`: only calls lasting at least this long are captured.
    pub min_duration_ms: Option<u64>,
    /// Condition expression.
    pub condition: Option<String>,
    /// Watch expressions.
    #[serde(default)]
    pub watch: Vec<String>,
    /// Hits to collect (default 1, max 50).
    pub max_hits: Option<u32>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Capture a native backtrace.
    #[serde(default)]
    pub backtrace: bool,
    /// Accept a location no agent has reported yet.
    #[serde(default)]
    pub allow_pending: bool,
    /// Run only on agents running this service version or build.
    #[serde(default)]
    pub expected_version: Option<String>,
    /// Run only where the file has this content hash (`sha256:<hex>`).
    #[serde(default)]
    pub file_hash: Option<String>,
}

fn snapshot_kind() -> String {
    "snapshot".into()
}

async fn place_action(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<PlaceBody>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::body_rejected(&e))?;
    match body.kind.as_str() {
        "snapshot" => {}
        "log" => return Err(ApiError::invalid("place dynamic logs with POST /api/v1/logs")),
        "metric" => return Err(ApiError::invalid("place dynamic metrics with POST /api/v1/metrics")),
        other => {
            return Err(ApiError::invalid(format!(
                "kind `{other}` must be snapshot (logs and metrics have their own endpoints)"
            )));
        }
    }
    let req = SnapshotRequest {
        agent_ids: body.agent_ids,
        pool: body.pool,
        tags: body.tags,
        file: body.file,
        line: body.line,
        function: body.function,
        min_duration_ms: body.min_duration_ms,
        condition: body.condition,
        watch: body.watch,
        max_hits: body.max_hits,
        expire_seconds: body.expire_seconds,
        backtrace: body.backtrace,
        allow_pending: body.allow_pending,
        expected_version: body.expected_version,
        file_hash: body.file_hash,
    };
    let view = state.engine.place_snapshot(req, &principal).await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

async fn get_redaction(
    State(state): State<AppState>,
    CompanyAdmin(principal): CompanyAdmin,
) -> ApiResult<periscope_redaction::RedactionConfig> {
    Ok(Json(state.engine.rules.config(principal.org())))
}

async fn put_redaction(
    State(state): State<AppState>,
    CompanyAdmin(principal): CompanyAdmin,
    headers: axum::http::HeaderMap,
    body: String,
) -> ApiResult<periscope_redaction::RedactionConfig> {
    // An empty document parses as the defaults: it would silently drop every custom
    // rule and exclusion the organization has. Replacing rules takes a document.
    if body.trim().is_empty() {
        return Err(ApiError::invalid(
            "redaction rules: the body is empty; send the whole configuration (TOML, or JSON with \
             Content-Type: application/json), e.g. `strict = false` for the built-in rules alone",
        ));
    }
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let config = if json {
        // An object only: serde would also read a struct from an array, and `[]` would
        // then be the defaults (found by schemathesis).
        let doc: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| ApiError::invalid(format!("redaction rules (JSON): {e}")))?;
        if !doc.is_object() {
            return Err(ApiError::invalid("redaction rules (JSON): the body must be a JSON object"));
        }
        serde_json::from_value::<periscope_redaction::RedactionConfig>(doc)
            .map_err(|e| ApiError::invalid(format!("redaction rules (JSON): {e}")))?
    } else {
        periscope_redaction::RedactionConfig::from_toml_str(&body)
            .map_err(|e| ApiError::invalid(format!("redaction rules (TOML): {e}")))?
    };
    Ok(Json(state.engine.replace_rules(principal.org(), config, principal.actor()).await?))
}

async fn place_log(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<LogRequest>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::body_rejected(&e))?;
    Ok((axum::http::StatusCode::CREATED, Json(state.engine.place_log(req, &principal).await?)))
}

async fn place_metric(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<MetricRequest>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::body_rejected(&e))?;
    Ok((axum::http::StatusCode::CREATED, Json(state.engine.place_metric(req, &principal).await?)))
}

async fn capture_errors(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<ErrorCaptureRequest>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::body_rejected(&e))?;
    Ok((axum::http::StatusCode::CREATED, Json(state.engine.place_capture_errors(req, &principal).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorsQuery {
    pool: Option<String>,
    tag: Option<String>,
    service: Option<String>,
    since_ms: Option<u64>,
    limit: Option<usize>,
    snapshots: Option<bool>,
}

/// `GET /api/v1/errors`: the `list_errors` answer.
#[derive(Debug, serde::Serialize)]
struct ErrorsPage {
    errors: Vec<crate::engine::ErrorView>,
    count: usize,
}

async fn list_errors(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<ErrorsQuery>, QueryRejection>,
) -> ApiResult<ErrorsPage> {
    let q = query_params(q)?;
    let query = crate::engine::ErrorQuery {
        pool: q.pool,
        tags: tags(q.tag.as_deref()),
        service: q.service,
        since_ms: q.since_ms,
        limit: q.limit,
        snapshots: q.snapshots,
    };
    let errors = state.engine.list_errors(&query, &principal).await?;
    Ok(Json(ErrorsPage { count: errors.len(), errors }))
}

async fn get_lines(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(action_id): Path<String>,
    q: Result<Query<HitsQuery>, QueryRejection>,
) -> ApiResult<LinesPage> {
    let q = query_params(q)?;
    let limit = q.limit.unwrap_or(query::MAX_PAGE);
    check_limit(limit, query::MAX_PAGE, query::MAX_PAGE)?;
    let since = q.since.unwrap_or(0);
    let w = q.wait_seconds.unwrap_or(0);
    check_wait_seconds("wait_seconds", w)?;
    if w == 0 {
        return Ok(Json(state.engine.lines(&action_id, since, limit, &principal).await?));
    }
    let wait = Duration::from_secs(w);
    let _slot = state.callers.begin_wait(&principal, tokio::time::Instant::now() + wait).await?;
    let page = state.engine.wait_lines(&action_id, since, limit, wait, &principal).await?;
    state.recheck(&principal).await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionsQuery {
    status: Option<String>,
    target: Option<String>,
    created_by: Option<String>,
}

async fn list_actions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<ActionsQuery>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let q = query_params(q)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(ActionStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!("status `{s}` must be one of active, completed, expired, removed"))
        })?),
    };
    let filter = ActionFilter { status, target: q.target, created_by: q.created_by };
    let actions = state.engine.list(&filter, &principal).await?;
    Ok(Json(serde_json::json!({ "items": actions })))
}

async fn get_action(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(action_id): Path<String>,
) -> ApiResult<ActionView> {
    Ok(Json(state.engine.get(&action_id, &principal).await?))
}

async fn remove_action(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(action_id): Path<String>,
) -> ApiResult<ActionView> {
    Ok(Json(state.engine.remove(&action_id, &principal).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HitsQuery {
    since: Option<u64>,
    limit: Option<usize>,
    wait_seconds: Option<u64>,
}

async fn get_hits(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(action_id): Path<String>,
    q: Result<Query<HitsQuery>, QueryRejection>,
) -> ApiResult<HitsPage> {
    let q = query_params(q)?;
    let limit = q.limit.unwrap_or(action_bounds::MAX_MAX_HITS as usize);
    check_limit(limit, query::MAX_PAGE, action_bounds::MAX_MAX_HITS as usize)?;
    let since = q.since.unwrap_or(0);
    let w = q.wait_seconds.unwrap_or(0);
    check_wait_seconds("wait_seconds", w)?;
    if w == 0 {
        return Ok(Json(state.engine.hits(&action_id, since, limit, &principal).await?));
    }
    let wait = Duration::from_secs(w);
    let _slot = state.callers.begin_wait(&principal, tokio::time::Instant::now() + wait).await?;
    let page = state.engine.wait_hits(&action_id, since, limit, wait, &principal).await?;
    state.recheck(&principal).await?;
    Ok(Json(page))
}
