//! People as administrators manage them: the operations `periscope users` and the REST
//! API share ([`create`], [`change`]), and the REST endpoints.
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | GET | `/api/v1/users` | group or company admin | users they may see |
//! | POST | `/api/v1/users` | as for keys | create (name, role, group, pools, quotas, password) |
//! | GET | `/api/v1/users/{user_id}` | as `GET /users` | one user, with its live grants |
//! | PATCH | `/api/v1/users/{user_id}` | as for keys | `disabled`, `password`, `role`, `group`, `pools` |
//! | DELETE | `/api/v1/users/{user_id}/grants/{grant_id}` | as `GET /users` | revoke one grant (a client's tokens) |
//!
//! Disabling a user revokes every grant in the same transaction: their tokens fail on
//! the next call.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::handler::Handler as _;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;

use super::store::{OAuthStore, OAuthStoreError, UserRecord};
use super::users::{self, NewUser, Passwords};
use super::{OAuth, new_id};
use crate::AppState;
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::{Principal, Role, Scope, require_role, require_scope};
use crate::error::{ApiError, ErrorCode};
use crate::keys::KeyError;
use crate::quota::CallerQuotaOverrides;
use crate::time::now_ms;

/// Why a user operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Invalid, not found or forbidden (the keys' errors).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store failed, or the name is taken.
    #[error(transparent)]
    Store(#[from] OAuthStoreError),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] users::HashError),
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> ApiError {
        match e {
            UserError::Key(k) => k.into(),
            UserError::Store(OAuthStoreError::Conflict(m)) => {
                ApiError::invalid(m).with_details(serde_json::json!({ "field": "name" }))
            }
            UserError::Store(OAuthStoreError::NotFound(m)) => ApiError::not_found(m),
            other => {
                tracing::error!(error = %other, "user store failure");
                ApiError::new(ErrorCode::Internal, "the user store failed; see the broker's log")
            }
        }
    }
}

/// Creates a user (validated; the caller checked authority), audited.
pub async fn create(
    store: &dyn OAuthStore,
    passwords: &Passwords,
    new: NewUser,
    actor: Actor,
) -> Result<UserRecord, UserError> {
    users::validate(&new)?;
    let password_hash = match new.password.clone() {
        Some(p) => {
            let passwords = passwords.clone();
            Some(
                tokio::task::spawn_blocking(move || passwords.hash(&p))
                    .await
                    .map_err(|e| users::HashError::from_join(&e))??,
            )
        }
        None => None,
    };
    let user = UserRecord {
        user_id: new_id("usr_"),
        name: new.name.clone(),
        org: new.org.clone(),
        role: new.role,
        group: new.group.clone(),
        pools: new.pools.clone(),
        quotas: new.quotas,
        password_hash,
        external_id: None,
        created_at_ms: now_ms(),
        created_by: actor.name(),
        disabled_at_ms: None,
        disabled_by: None,
    };
    let entry = AuditEntry::new(user.org.clone(), actor, AuditKind::UserCreated)
        .target(serde_json::json!({ "user_id": user.user_id, "name": user.name }))
        .detail(format!("user `{}` created with the role {}", user.name, user.role.as_str()))
        .data(serde_json::json!({ "role": user.role.as_str(), "group": user.group, "pools": user.pools }));
    store.create_user(user.clone(), entry).await?;
    Ok(user)
}

/// What to change on a user.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    /// Disable (true) or enable (false).
    #[serde(default)]
    pub disabled: Option<bool>,
    /// A new password.
    #[serde(default)]
    pub password: Option<String>,
    /// A new role.
    #[serde(default)]
    pub role: Option<Role>,
    /// A new group (`""` for none).
    #[serde(default)]
    pub group: Option<String>,
    /// New pools (`[]` for no restriction).
    #[serde(default)]
    pub pools: Option<Vec<String>>,
}

/// Applies `change` to `user` (validated as a whole), audited.
pub async fn change(
    store: &dyn OAuthStore,
    passwords: &Passwords,
    user: &UserRecord,
    change: UserChange,
    actor: Actor,
    check: impl FnOnce(&NewUser) -> Result<(), KeyError>,
) -> Result<UserRecord, UserError> {
    let mut next = user.clone();
    let mut what = Vec::new();
    if let Some(r) = change.role {
        next.role = r;
        what.push(format!("role {}", r.as_str()));
    }
    if let Some(g) = &change.group {
        next.group = (!g.is_empty()).then(|| g.clone());
        what.push(format!("group {}", if g.is_empty() { "(none)" } else { g }));
    }
    if let Some(p) = &change.pools {
        next.pools = (!p.is_empty()).then(|| p.clone());
        what.push(format!("pools {}", if p.is_empty() { "(any)".into() } else { p.join(",") }));
    }
    let as_new = NewUser {
        name: next.name.clone(),
        org: next.org.clone(),
        role: next.role,
        group: next.group.clone(),
        pools: next.pools.clone(),
        quotas: next.quotas,
        password: change.password.clone(),
    };
    users::validate(&as_new)?;
    check(&as_new)?;
    if let Some(p) = change.password {
        let passwords = passwords.clone();
        next.password_hash = Some(
            tokio::task::spawn_blocking(move || passwords.hash(&p))
                .await
                .map_err(|e| users::HashError::from_join(&e))??,
        );
        what.push("password".into());
    }
    match change.disabled {
        Some(true) if next.disabled_at_ms.is_none() => {
            next.disabled_at_ms = Some(now_ms());
            next.disabled_by = Some(actor.name());
            what.push("disabled (its tokens are revoked)".into());
        }
        Some(false) if next.disabled_at_ms.is_some() => {
            next.disabled_at_ms = None;
            next.disabled_by = None;
            what.push("enabled".into());
        }
        _ => {}
    }
    if what.is_empty() {
        return Ok(next);
    }
    let entry = AuditEntry::new(next.org.clone(), actor, AuditKind::UserChanged)
        .target(serde_json::json!({ "user_id": next.user_id, "name": next.name }))
        .detail(format!("user `{}`: {}", next.name, what.join(", ")))
        .data(serde_json::json!({ "changes": what }));
    store.update_user(next.clone(), Some(entry)).await?;
    Ok(next)
}

/// The REST routes (authentication layered on by the caller).
pub fn router() -> Router<AppState> {
    let admin = || from_fn_with_state(Scope::Admin, require_scope);
    Router::new()
        .route("/users", get(list.layer(admin())).post(create_route.layer(admin())))
        .route("/users/{user_id}", get(one.layer(admin())).patch(patch.layer(admin())))
        .route("/users/{user_id}/grants/{grant_id}", delete(revoke_grant.layer(admin())))
}

fn oauth(state: &AppState) -> Result<std::sync::Arc<OAuth>, ApiError> {
    state.oauth.clone().ok_or_else(|| {
        ApiError::new(ErrorCode::NotAvailable, "sign-in is not enabled on this broker ([oauth] enabled = true)")
    })
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(b)| b).map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))
}

async fn list(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_role(&by, Role::GroupAdmin, "GET /api/v1/users")?;
    let o = oauth(&state)?;
    let users =
        o.fresh_users(&state.keys).await.map_err(|_| ApiError::new(ErrorCode::Internal, "users cannot be read"))?;
    let visible: Vec<_> = users.all().into_iter().filter(|u| users::visible(&by, u)).map(|u| view(&u)).collect();
    Ok(Json(serde_json::json!({ "users": visible })))
}

fn view(u: &UserRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(u).unwrap_or_default();
    v["status"] = serde_json::json!(if u.active() { "active" } else { "disabled" });
    v["password_set"] = serde_json::json!(u.password_hash.is_some());
    v
}

/// Body of `POST /api/v1/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    /// The sign-in name.
    pub name: String,
    /// `developer` (default), `group_admin`, `company_admin`.
    pub role: Option<Role>,
    /// The group (a group admin's own group by default).
    pub group: Option<String>,
    /// Only these pools.
    pub pools: Option<Vec<String>>,
    /// Quota overrides (company admins only).
    pub quotas: Option<CallerQuotaOverrides>,
    /// The initial password (absent: sign-in through the OpenID provider only).
    pub password: Option<String>,
}

async fn create_route(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    b: Result<Json<CreateUserBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let b = body(b)?;
    require_role(&by, Role::GroupAdmin, "POST /api/v1/users")?;
    let o = oauth(&state)?;
    let group = match (by.role, b.group) {
        (Role::GroupAdmin, None) => by.reach.group.clone(),
        (_, g) => g,
    };
    let new = NewUser {
        name: b.name.trim().to_owned(),
        org: by.org().to_owned(),
        role: b.role.unwrap_or(Role::Developer),
        group,
        pools: b.pools,
        quotas: b.quotas,
        password: b.password,
    };
    users::check_manage(&by, &new)?;
    let user = create(o.store.as_ref(), &o.passwords, new, by.actor()).await?;
    let _ = o.reload_users().await;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "user": view(&user) }))))
}

async fn find(
    state: &AppState,
    by: &Principal,
    id: &str,
) -> Result<(std::sync::Arc<OAuth>, std::sync::Arc<UserRecord>), ApiError> {
    let o = oauth(state)?;
    let users =
        o.fresh_users(&state.keys).await.map_err(|_| ApiError::new(ErrorCode::Internal, "users cannot be read"))?;
    let user = users.get(id.trim()).filter(|u| users::visible(by, u)).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "no user `{}`; GET /api/v1/users lists them",
            id.chars().take(80).collect::<String>()
        ))
    })?;
    Ok((o, user))
}

async fn one(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_role(&by, Role::GroupAdmin, "GET /api/v1/users/{user_id}")?;
    let (o, user) = find(&state, &by, &id).await?;
    let grants = o.store.grants_of(&user.user_id).await.map_err(UserError::from)?;
    let mut v = view(&user);
    v["grants"] = serde_json::to_value(&grants).unwrap_or_default();
    Ok(Json(serde_json::json!({ "user": v })))
}

async fn patch(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
    b: Result<Json<UserChange>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b = body(b)?;
    require_role(&by, Role::GroupAdmin, "PATCH /api/v1/users/{user_id}")?;
    let (o, user) = find(&state, &by, &id).await?;
    if user.user_id == by.key_id && b.disabled == Some(true) {
        return Err(ApiError::invalid("you cannot disable yourself"));
    }
    let next = change(o.store.as_ref(), &o.passwords, &user, b, by.actor(), |n| users::check_manage(&by, n)).await?;
    o.reload_users().await.map_err(UserError::from)?;
    Ok(Json(serde_json::json!({ "user": view(&next) })))
}

async fn revoke_grant(
    State(state): State<AppState>,
    Extension(by): Extension<Principal>,
    Path((id, grant_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_role(&by, Role::GroupAdmin, "DELETE /api/v1/users/{user_id}/grants/{grant_id}")?;
    let (o, user) = find(&state, &by, &id).await?;
    let grant = o.store.grant(grant_id.trim()).await.map_err(UserError::from)?;
    let Some(grant) = grant.filter(|g| g.user_id == user.user_id && g.revoked.is_none()) else {
        return Err(ApiError::not_found("no such live grant of this user"));
    };
    let entry = AuditEntry::new(user.org.clone(), by.actor(), AuditKind::OauthGrantRevoked)
        .target(
            serde_json::json!({ "grant_id": grant.grant_id, "client_id": grant.client_id, "user_id": user.user_id }),
        )
        .detail(format!(
            "the grant of `{}` to the client `{}` was revoked by an administrator",
            user.name, grant.client_name
        ))
        .data(serde_json::json!({ "reason": "revoked_by_admin" }));
    o.revoke_grant(&grant.grant_id, "revoked by an administrator", Some(entry)).await.map_err(UserError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
