//! REST for the operator safety settings (company administrators with `mcp:admin`;
//! the role is the [`CompanyAdmin`] extractor's to check):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/blocklist` | the organization's blocklist, and the configuration file's rules |
//! | PUT | `/blocklist` | replace it (body `{"rules": [...]}`); pushed to the agents, audited |
//! | GET | `/pauses` | the pools (or the organization) paused now |
//! | POST | `/pause` | pause every action of a pool (body `{"pool", "reason"}`) or, without `pool`, of the organization |
//! | POST | `/resume` | resume a pool, or without `pool` every pause of the organization |
//!
//! The MCP tools `get_blocklist`, `set_blocklist`, `pause_actions` and
//! `resume_actions` (in `mcp/safety.rs`) answer with the same bodies.

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::handler::Handler as _;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Json, Router};
use periscope_protocol::BlockRule;
use serde::Deserialize;

use crate::AppState;
use crate::auth::{CompanyAdmin, Principal, Scope, require_scope};
use crate::engine::PauseOutcome;
use crate::error::ApiError;

/// Body of `PUT /api/v1/blocklist` (and the `set_blocklist` tool's arguments).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocklistBody {
    /// The whole list: it replaces the organization's rules.
    pub rules: Vec<BlockRule>,
}

/// Body of `POST /api/v1/pause` and `/resume` (and the tools' arguments).
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PauseBody {
    /// The pool; absent: the whole organization.
    pub pool: Option<String>,
    /// Why (pause only), shown in every paused action's status and in the audit trail.
    pub reason: Option<String>,
}

impl PauseBody {
    /// The pool, checked (a label), and the reason, bounded.
    pub fn checked(&self) -> Result<(Option<String>, String), ApiError> {
        // An empty pool is a mistake, not "every pool": the whole organization is said
        // by leaving the pool out.
        let pool = self.pool.as_deref().map(str::trim);
        if let Some(p) = pool
            && !periscope_protocol::messages::is_label(p, 128)
        {
            return Err(ApiError::invalid(
                "pool must be 1 to 128 characters from A-Z a-z 0-9 . _ : = / - (leave it out for the whole organization)",
            ));
        }
        let reason = self.reason.as_deref().unwrap_or_default().trim();
        if reason.len() > 512 || reason.chars().any(char::is_control) {
            return Err(ApiError::invalid("reason must be at most 512 bytes of printable text"));
        }
        Ok((pool.map(str::to_owned), reason.to_owned()))
    }
}

/// The routes (authentication is layered on by the caller).
pub fn router() -> Router<AppState> {
    let admin = || from_fn_with_state(Scope::Admin, require_scope);
    Router::new()
        .route("/blocklist", get(get_blocklist.layer(admin())).put(put_blocklist.layer(admin())))
        .route("/pauses", get(get_pauses.layer(admin())))
        .route("/pause", post(pause.layer(admin())))
        .route("/resume", post(resume.layer(admin())))
}

/// The blocklist answer: the organization's rules with their version, and the
/// configuration file's rules that apply to every organization.
pub fn blocklist_body(state: &AppState, org: &str) -> serde_json::Value {
    let settings = state.engine.safety.settings(org);
    serde_json::json!({
        "version": settings.version,
        "rules": settings.blocklist,
        "config_rules": state.engine.safety.base_rules(),
    })
}

/// The pauses answer.
pub fn pauses_body(state: &AppState, org: &str) -> serde_json::Value {
    serde_json::json!({ "pauses": state.engine.safety.settings(org).pauses })
}

/// Pauses or resumes for `caller` as `body` says.
pub async fn pause_or_resume(
    state: &AppState,
    caller: &Principal,
    body: &PauseBody,
    pause: bool,
) -> Result<PauseOutcome, ApiError> {
    let (pool, reason) = body.checked()?;
    if pause {
        state.engine.pause(caller.org(), pool, reason, caller).await
    } else {
        state.engine.resume(caller.org(), pool, caller).await
    }
}

fn json<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(b)| b).map_err(|e| ApiError::body_rejected(&e))
}

/// A pause or resume body: a JSON object. serde reads a struct from an array too
/// (`[null, null]` would be a pause of the whole organization); refused here instead.
fn pause_body(b: Result<Json<serde_json::Value>, JsonRejection>) -> Result<PauseBody, ApiError> {
    let value = json(b)?;
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object such as {\"pool\": \"shop\"}"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("the body is not a pause request: {e}")))
}

async fn get_blocklist(State(state): State<AppState>, CompanyAdmin(caller): CompanyAdmin) -> Json<serde_json::Value> {
    Json(blocklist_body(&state, caller.org()))
}

async fn put_blocklist(
    State(state): State<AppState>,
    CompanyAdmin(caller): CompanyAdmin,
    body: Result<Json<BlocklistBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json(body)?;
    state.engine.set_blocklist(caller.org(), body.rules, caller.actor()).await?;
    Ok(Json(blocklist_body(&state, caller.org())))
}

async fn get_pauses(State(state): State<AppState>, CompanyAdmin(caller): CompanyAdmin) -> Json<serde_json::Value> {
    Json(pauses_body(&state, caller.org()))
}

async fn pause(
    State(state): State<AppState>,
    CompanyAdmin(caller): CompanyAdmin,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<PauseOutcome>, ApiError> {
    Ok(Json(pause_or_resume(&state, &caller, &pause_body(body)?, true).await?))
}

async fn resume(
    State(state): State<AppState>,
    CompanyAdmin(caller): CompanyAdmin,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<PauseOutcome>, ApiError> {
    Ok(Json(pause_or_resume(&state, &caller, &pause_body(body)?, false).await?))
}
