//! Administration over REST, under `/api/v1`: keys, groups, pool assignments and the
//! audit trail. Every route needs `mcp:admin`; what a key may do with it depends on
//! its role ([`crate::keys::check_create`], [`crate::keys::visible_key`],
//! [`crate::keys::check_assign`]), always inside its own organization.
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | GET | `/keys` | group admin (its group's keys), company admin | keys, never secrets (`kind`, `include_revoked`) |
//! | POST | `/keys` | group admin, company admin | create an API or agent key ([`CreateKeyBody`]); the secret is in this answer only |
//! | GET | `/keys/{key_id}` | as `GET /keys` | one key |
//! | DELETE | `/keys/{key_id}` | as `GET /keys` | revoke it: it fails from the next call on |
//! | GET | `/groups` | group admin (its group), company admin | groups and their pools |
//! | POST | `/groups` | company admin | create a group (`{"name": …}`) |
//! | PUT | `/pools/{pool}` | group admin, company admin | assign a pool to a group (`{"group": …}`; `default` releases it) |
//! | GET | `/audit` | company admin | audit entries, oldest first (`since`, `until` in Unix ms, `actor`, `kind`, `action_id`, `cursor`, `limit`) |
//! | GET | `/audit/export` | company admin | the same filters, every entry, as JSON lines (`application/x-ndjson`, streamed) |

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::handler::Handler as _;
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::AppState;
use crate::audit::{self, AuditKind, AuditPage, AuditQuery};
use crate::auth::{Principal, Role, Scope, require_role, require_scope};
use crate::error::ApiError;
use crate::keys::{self, KeyKind, NewKey};
use crate::quota::CallerQuotaOverrides;
use crate::time::now_ms;

/// The administration routes (authentication is layered on by the caller).
pub fn router() -> Router<AppState> {
    let admin = || from_fn_with_state(Scope::Admin, require_scope);
    Router::new()
        .route("/keys", get(list_keys.layer(admin())).post(create_key.layer(admin())))
        .route("/keys/{key_id}", get(get_key.layer(admin())).delete(revoke_key.layer(admin())))
        .route("/groups", get(list_groups.layer(admin())).post(create_group.layer(admin())))
        .route("/pools/{pool}", put(assign_pool.layer(admin())))
        .route("/audit", get(query_audit.layer(admin())))
        .route("/audit/export", get(export_audit.layer(admin())))
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(b)| b).map_err(|e| ApiError::body_rejected(&e))
}

fn query_params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::invalid(format!("query string: {}", e.body_text())))
}

/// Body of `POST /api/v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// `api` (default) or `agent`.
    #[serde(default)]
    pub kind: Option<KeyKind>,
    /// Who or what uses it.
    pub name: String,
    /// API keys: `developer` (default), `group_admin`, `company_admin`.
    pub role: Option<Role>,
    /// The group (a group admin's own group by default).
    pub group: Option<String>,
    /// Narrower scopes than the role's.
    pub scopes: Option<Vec<Scope>>,
    /// Only these pools (agent keys: the pools it may register into).
    pub pools: Option<Vec<String>>,
    /// Quota overrides (company admins only).
    pub quotas: Option<CallerQuotaOverrides>,
    /// Expires this many seconds from now.
    pub expires_in_seconds: Option<u64>,
    /// Expires at this time (Unix ms).
    pub expires_at_ms: Option<u64>,
}

async fn create_key(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    b: Result<Json<CreateKeyBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let b = body(b)?;
    require_role(&by, Role::GroupAdmin, "POST /api/v1/keys")?;
    let kind = b.kind.unwrap_or(KeyKind::Api);
    let expires_at_ms = match (b.expires_in_seconds, b.expires_at_ms) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("give expires_in_seconds or expires_at_ms, not both")),
        (Some(s), None) => Some(now_ms().saturating_add(s.saturating_mul(1_000))),
        (None, at) => at,
    };
    let group = match (kind, by.role, b.group) {
        (KeyKind::Api, Role::GroupAdmin, None) => by.reach.group.clone(),
        (_, _, g) => g,
    };
    let new = NewKey {
        kind,
        name: b.name,
        org: by.org().to_owned(),
        role: b.role.or((kind == KeyKind::Api).then_some(Role::Developer)),
        group,
        scopes: b.scopes,
        pools: b.pools,
        quotas: b.quotas,
        expires_at_ms,
    };
    // Authority first: a refusal says what the caller may not do, not what is malformed.
    keys::check_create(&by, &new)?;
    keys::validate_new(&new)?;
    let issued = state.keys.create(new, &by.actor()).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "secret": issued.secret,
            "note": "the secret is shown once; store it now",
            "key": issued.key.view(now_ms()),
        })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    kind: Option<KeyKind>,
    #[serde(default)]
    include_revoked: bool,
}

async fn list_keys(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    q: Result<Query<KeysQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = query_params(q)?;
    require_role(&by, Role::GroupAdmin, "GET /api/v1/keys")?;
    let dir = state.keys.refresh().await?;
    let now = now_ms();
    let items: Vec<serde_json::Value> = dir
        .keys()
        .filter(|k| keys::visible_key(&by, k))
        .filter(|k| q.kind.is_none_or(|kind| k.kind == kind))
        .filter(|k| q.include_revoked || k.status(now) == keys::KeyStatus::Active)
        .map(|k| k.view(now))
        .collect();
    Ok(Json(serde_json::json!({ "total": items.len(), "items": items })))
}

async fn get_key(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_role(&by, Role::GroupAdmin, "GET /api/v1/keys/{key_id}")?;
    let dir = state.keys.refresh().await?;
    dir.key(key_id.trim())
        .filter(|k| keys::visible_key(&by, k))
        .map(|k| Json(k.view(now_ms())))
        .ok_or_else(|| ApiError::not_found(format!("no key `{}`; GET /api/v1/keys lists them", short(&key_id))))
}

async fn revoke_key(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_role(&by, Role::GroupAdmin, "DELETE /api/v1/keys/{key_id}")?;
    let dir = state.keys.refresh().await?;
    if !dir.key(key_id.trim()).is_some_and(|k| keys::visible_key(&by, k)) {
        return Err(ApiError::not_found(format!("no key `{}`; GET /api/v1/keys lists them", short(&key_id))));
    }
    let record = state.keys.revoke(key_id.trim(), &by.actor()).await?;
    Ok(Json(record.view(now_ms())))
}

fn short(s: &str) -> &str {
    periscope_protocol::value::truncate_chars(s, 80)
}

async fn list_groups(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_role(&by, Role::GroupAdmin, "GET /api/v1/groups")?;
    let dir = state.keys.refresh().await?;
    let t = &dir.tenancy;
    let org = by.org();
    let assigned = t.assigned_pools(org);
    let items: Vec<serde_json::Value> = t
        .groups(org)
        .into_iter()
        .filter(|g| by.role == Role::CompanyAdmin || by.reach.group.as_deref() == Some(g.as_str()))
        .map(|g| {
            let pools: Vec<&String> = assigned.iter().filter(|(_, group)| **group == g).map(|(p, _)| p).collect();
            let note = (g == keys::DEFAULT_GROUP).then_some("also owns every pool not assigned to another group");
            serde_json::json!({ "group": g, "pools": pools, "note": note })
        })
        .collect();
    Ok(Json(serde_json::json!({ "org": org, "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    name: String,
}

async fn create_group(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    b: Result<Json<GroupBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let b = body(b)?;
    require_role(&by, Role::CompanyAdmin, "POST /api/v1/groups")?;
    let created = b.name.trim().to_owned();
    state.keys.create_group(by.org(), &created, &by.actor()).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "group": created, "org": by.org() }))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    group: String,
}

async fn assign_pool(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(pool): Path<String>,
    b: Result<Json<AssignBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b = body(b)?;
    require_role(&by, Role::GroupAdmin, "PUT /api/v1/pools/{pool}")?;
    keys::check_assign(&by, &pool, b.group.trim())?;
    state.keys.assign_pool(by.org(), &pool, b.group.trim(), &by.actor()).await?;
    Ok(Json(serde_json::json!({ "pool": pool, "group": b.group.trim() })))
}

/// Query string of the audit endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Entries at or after this time (Unix ms).
    pub since: Option<u64>,
    /// Entries before this time (Unix ms).
    pub until: Option<u64>,
    /// A key id, a key name, `agent:<id>`, `system` or `cli`.
    pub actor: Option<String>,
    /// An entry kind (`action_placed`, `key_revoked`, ...).
    pub kind: Option<String>,
    /// Entries about this action.
    pub action_id: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Entries per page (1 to 500, default 100).
    pub limit: Option<usize>,
}

impl AuditParams {
    /// The query for the caller's organization, with its inputs checked.
    pub fn query(self, org: &str) -> Result<AuditQuery, ApiError> {
        let kind = match self.kind.as_deref() {
            None => None,
            Some(k) => Some(AuditKind::parse(k).ok_or_else(|| {
                ApiError::invalid(format!(
                    "kind `{}` must be one of {}",
                    short(k),
                    AuditKind::ALL.map(|k| k.as_str()).join(", ")
                ))
            })?),
        };
        let after_seq = match self.cursor.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
            None => 0,
            Some(c) => c.parse().map_err(|_| {
                ApiError::invalid(format!("cursor `{}` is not one this server issued; omit it to start over", short(c)))
            })?,
        };
        let limit = self.limit.unwrap_or(audit::DEFAULT_PAGE);
        if !(1..=audit::MAX_PAGE).contains(&limit) {
            return Err(ApiError::invalid(format!("limit is {limit}; allowed range is 1..={}", audit::MAX_PAGE)));
        }
        if let (Some(s), Some(u)) = (self.since, self.until)
            && s > u
        {
            return Err(ApiError::invalid("since is after until"));
        }
        Ok(AuditQuery {
            org: Some(org.to_owned()),
            since_ms: self.since,
            until_ms: self.until,
            actor: self.actor.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()),
            kind,
            action_id: self.action_id.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()),
            after_seq,
            limit,
        })
    }
}

/// Reads a page of the audit trail (entries written before the call are in it).
pub async fn audit_page(state: &AppState, q: AuditQuery) -> Result<AuditPage, ApiError> {
    Ok(state.audit.page(q).await?)
}

async fn query_audit(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = query_params(q)?;
    require_role(&by, Role::CompanyAdmin, "GET /api/v1/audit")?;
    Ok(Json(audit_page(&state, q.query(by.org())?).await?))
}

async fn export_audit(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query_params(q)?;
    require_role(&by, Role::CompanyAdmin, "GET /api/v1/audit/export")?;
    let q = q.query(by.org())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let reader = std::sync::Arc::clone(&state.audit);
    tokio::spawn(async move {
        if let Err(e) = reader.export(q, tx).await {
            tracing::error!(error = %e, "audit export failed");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    let filename = format!("attachment; filename=\"periscope-audit-{}.ndjson\"", by.org());
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson".to_owned()), (header::CONTENT_DISPOSITION, filename)],
        Body::from_stream(stream),
    )
        .into_response())
}
