//! The REST API under `/api/v1`: JSON in, JSON out, errors as
//! `{"error": {"code", "message", "details"}}` with a fitting HTTP status.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/agents` | agents (`pool`, `tag`, `service`, `language`, `status`, `q`, `cursor`, `limit`) |
//! | GET | `/agents/{agent_id}` | one agent |
//! | GET | `/sources` | inspectable locations (`agent_id`, `pool`, `tag`, `file`, `name`, `q`, `cursor`, `limit`) |
//! | POST | `/actions` | place a snapshot (body: [`PlaceBody`]) |
//! | POST | `/logs` | place a dynamic log (body: [`LogBody`], the `place_log` tool's arguments) |
//! | POST | `/metrics` | place a dynamic metric (body: [`MetricBody`], the `place_metric` tool's arguments) |
//! | GET | `/actions` | actions (`status`, `target`, `created_by`) |
//! | GET | `/actions/{action_id}` | one action with per-agent status |
//! | DELETE | `/actions/{action_id}` | remove an action |
//! | GET | `/actions/{action_id}/hits` | hits after `since`; `wait_seconds` long-polls for new ones |
//! | GET | `/actions/{action_id}/lines` | a log's lines after `since`; `wait_seconds` long-polls |
//! | GET | `/redaction` | the redaction rules in force (`mcp:admin`) |
//! | PUT | `/redaction` | replace them: TOML, or JSON with `Content-Type: application/json` (`mcp:admin`); pushed to every agent |
//!
//! Each route needs the scope of the MCP tool that does the same thing (agents and
//! sources: `mcp:agents:read`; placing and removing: `mcp:actions:write`; reading
//! actions and hits: `mcp:hits:read`); without it the answer is 403 `insufficient_scope`.

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
use crate::auth::{Principal, Scope, require_scope};
use crate::engine::{ActionFilter, ActionStatus, ActionView, HitsPage, LogRequest, MetricRequest, SnapshotRequest};
use crate::error::ApiError;
use crate::query::{self, AgentFilter, Page, SourceFilter, SourceView};
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
    Ok(Json(query::list_agents(&state.registry, &filter, q.cursor.as_deref(), q.limit)?))
}

async fn get_agent(State(state): State<AppState>, Path(agent_id): Path<String>) -> ApiResult<AgentView> {
    let id = periscope_protocol::AgentId::parse(&agent_id).map_err(|e| ApiError::invalid(format!("agent_id: {e}")))?;
    state.registry.with(&id, |a| a.view()).map(Json).ok_or_else(|| ApiError::not_found(format!("no agent `{id}`")))
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
    Ok(Json(query::list_sources(&state.registry, &filter, q.cursor.as_deref(), q.limit)?))
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
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
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
}

fn snapshot_kind() -> String {
    "snapshot".into()
}

async fn place_action(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<PlaceBody>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))?;
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
        condition: body.condition,
        watch: body.watch,
        max_hits: body.max_hits,
        expire_seconds: body.expire_seconds,
        backtrace: body.backtrace,
        allow_pending: body.allow_pending,
    };
    let view = state.engine.place_snapshot(req, &principal.name)?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

async fn get_redaction(State(state): State<AppState>) -> Json<periscope_redaction::RedactionConfig> {
    Json(state.engine.rules.config())
}

async fn put_redaction(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> ApiResult<periscope_redaction::RedactionConfig> {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let config = if json {
        serde_json::from_str::<periscope_redaction::RedactionConfig>(&body)
            .map_err(|e| ApiError::invalid(format!("redaction rules (JSON): {e}")))?
    } else {
        periscope_redaction::RedactionConfig::from_toml_str(&body)
            .map_err(|e| ApiError::invalid(format!("redaction rules (TOML): {e}")))?
    };
    Ok(Json(state.engine.replace_rules(config)?))
}

/// Body of `POST /api/v1/logs`: the `place_log` tool's arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogBody {
    /// Target agents by id.
    #[serde(default)]
    pub agent_ids: Vec<String>,
    /// Target pool.
    pub pool: Option<String>,
    /// Target tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Text with `{expression}` placeholders.
    pub template: String,
    /// Level (default `info`).
    pub level: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// `broker` (default), `app`, `both`.
    pub destination: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Stop after this many lines.
    pub max_lines: Option<u64>,
    /// Accept a location no agent has reported yet.
    #[serde(default)]
    pub allow_pending: bool,
}

async fn place_log(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<LogBody>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(b) = body.map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))?;
    let req = LogRequest {
        agent_ids: b.agent_ids,
        pool: b.pool,
        tags: b.tags,
        file: b.file,
        line: b.line,
        template: b.template,
        level: b.level,
        condition: b.condition,
        destination: b.destination,
        expire_seconds: b.expire_seconds,
        max_lines: b.max_lines,
        allow_pending: b.allow_pending,
    };
    Ok((axum::http::StatusCode::CREATED, Json(state.engine.place_log(req, &principal.name)?)))
}

/// Body of `POST /api/v1/metrics`: the `place_metric` tool's arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBody {
    /// Target agents by id.
    #[serde(default)]
    pub agent_ids: Vec<String>,
    /// Target pool.
    pub pool: Option<String>,
    /// Target tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `counter`, `duration` or `value`.
    pub kind: String,
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Where a tic-toc duration stops.
    pub end_file: Option<String>,
    /// Line where a tic-toc duration stops.
    pub end_line: Option<u32>,
    /// The numeric expression of a value metric.
    pub expression: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Accept a location no agent has reported yet.
    #[serde(default)]
    pub allow_pending: bool,
}

async fn place_metric(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<MetricBody>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<ActionView>), ApiError> {
    let Json(b) = body.map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))?;
    let req = MetricRequest {
        agent_ids: b.agent_ids,
        pool: b.pool,
        tags: b.tags,
        kind: b.kind,
        file: b.file,
        line: b.line,
        end_file: b.end_file,
        end_line: b.end_line,
        expression: b.expression,
        condition: b.condition,
        expire_seconds: b.expire_seconds,
        allow_pending: b.allow_pending,
    };
    Ok((axum::http::StatusCode::CREATED, Json(state.engine.place_metric(req, &principal.name)?)))
}

async fn get_lines(
    State(state): State<AppState>,
    Path(action_id): Path<String>,
    q: Result<Query<HitsQuery>, QueryRejection>,
) -> ApiResult<LinesPage> {
    let q = query_params(q)?;
    let limit = q.limit.unwrap_or(query::MAX_PAGE);
    if !(1..=query::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit is {limit}; allowed range is 1..={}", query::MAX_PAGE)));
    }
    let since = q.since.unwrap_or(0);
    match q.wait_seconds {
        None | Some(0) => Ok(Json(state.engine.lines(&action_id, since, limit)?)),
        Some(w) if w <= action_bounds::MAX_WAIT_SECS => {
            Ok(Json(state.engine.wait_lines(&action_id, since, limit, Duration::from_secs(w)).await?))
        }
        Some(w) => Err(ApiError::invalid(format!(
            "wait_seconds is {w}; allowed range is 0..={}",
            action_bounds::MAX_WAIT_SECS
        ))),
    }
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
    q: Result<Query<ActionsQuery>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let q = query_params(q)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(ActionStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!("status `{s}` must be one of active, completed, expired, removed"))
        })?),
    };
    let actions = state.engine.list(&ActionFilter { status, target: q.target, created_by: q.created_by });
    Ok(Json(serde_json::json!({ "items": actions })))
}

async fn get_action(State(state): State<AppState>, Path(action_id): Path<String>) -> ApiResult<ActionView> {
    Ok(Json(state.engine.get(&action_id)?))
}

async fn remove_action(State(state): State<AppState>, Path(action_id): Path<String>) -> ApiResult<ActionView> {
    Ok(Json(state.engine.remove(&action_id)?))
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
    Path(action_id): Path<String>,
    q: Result<Query<HitsQuery>, QueryRejection>,
) -> ApiResult<HitsPage> {
    let q = query_params(q)?;
    let limit = q.limit.unwrap_or(action_bounds::MAX_MAX_HITS as usize);
    if !(1..=query::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit is {limit}; allowed range is 1..={}", query::MAX_PAGE)));
    }
    let since = q.since.unwrap_or(0);
    match q.wait_seconds {
        None | Some(0) => Ok(Json(state.engine.hits(&action_id, since, limit)?)),
        Some(w) if w <= action_bounds::MAX_WAIT_SECS => {
            Ok(Json(state.engine.wait_hits(&action_id, since, limit, Duration::from_secs(w)).await?))
        }
        Some(w) => Err(ApiError::invalid(format!(
            "wait_seconds is {w}; allowed range is 0..={}",
            action_bounds::MAX_WAIT_SECS
        ))),
    }
}
