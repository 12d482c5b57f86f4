//! Authentication and authorization of API callers.
//!
//! A bearer API key (from the key store or the configuration file, see
//! [`crate::keys`]) becomes a [`Principal`]: its organization, [`Role`], [`Scope`]s,
//! [`Reach`] (the pools it may see) and quotas. The middleware ([`require_api_key`])
//! authenticates every REST request and every MCP message, charges it to the key's
//! calls-per-minute budget, and puts the principal in the request extensions; each
//! tool and endpoint then calls [`authorize`] (scope) and, for administration,
//! [`require_role`]. Nothing is decided per connection: a key revoked or expired
//! between two calls of one MCP session fails the second one.
//!
//! A request without a valid key gets HTTP 401 with a JSON error body and
//! `WWW-Authenticate: Bearer resource_metadata="…"` pointing at the RFC 9728
//! protected-resource metadata, so MCP clients can discover how to authenticate.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::AppState;
use crate::access::Tenancy;
pub use crate::access::{Reach, Role, Scope};
use crate::audit::Actor;
use crate::error::{ApiError, ErrorCode};
use crate::quota::{CallBudget, CallerQuotas, Charged};

/// Who is calling, resolved from an API key on each request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id (`key_…`): charged for quotas, named in the audit trail.
    pub key_id: String,
    /// The key's name: shown as the creator of actions.
    pub name: String,
    /// The key's role.
    pub role: Role,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// What the key may see.
    pub reach: Reach,
    /// The key's quotas.
    pub quotas: CallerQuotas,
    /// The pool-to-group assignments when the key was checked.
    pub tenancy: Arc<Tenancy>,
    /// For a person signed in through an OAuth client: which client and grant. `key_id`
    /// and `name` are then the user's (quotas are per person, across their clients).
    pub via: Option<Arc<Delegation>>,
}

/// The client a person signed in through, carried by their principal so that the audit
/// trail names both and an MCP session stays with the grant that opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The OAuth client id (`pcl_…`, or its metadata document's URL).
    pub client_id: String,
    /// The client's name.
    pub client_name: String,
    /// The grant (`grt_…`): one person, one client, its refresh-token family.
    pub grant_id: String,
}

impl Principal {
    /// The caller's organization.
    pub fn org(&self) -> &str {
        &self.reach.org
    }

    /// Whether the principal holds `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// The scope names, for callers to see.
    pub fn scope_names(&self) -> Vec<&'static str> {
        self.scopes.iter().map(Scope::as_str).collect()
    }

    /// Whether a pool of an organization is within the caller's reach.
    pub fn sees_pool(&self, org: &str, pool: &str) -> bool {
        self.reach.allows(org, pool, &self.tenancy)
    }

    /// The caller as the audit trail names it: the key, or the person and the client.
    pub fn actor(&self) -> Actor {
        match &self.via {
            None => Actor::Key { id: self.key_id.clone(), name: self.name.clone() },
            Some(via) => Actor::User {
                id: self.key_id.clone(),
                name: self.name.clone(),
                client_id: Some(via.client_id.clone()),
                client_name: Some(via.client_name.clone()),
            },
        }
    }

    /// Who an MCP session opened by this caller belongs to: the key, or the person
    /// through one client (another client of the same person is someone else to the
    /// session; the same client keeps it when it re-authorizes for more scopes).
    pub fn session_owner(&self) -> String {
        match &self.via {
            None => self.key_id.clone(),
            Some(via) => format!("{} via {}", self.key_id, via.client_id),
        }
    }
}

impl Charged for Principal {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn org(&self) -> &str {
        &self.reach.org
    }

    fn quotas(&self) -> CallerQuotas {
        self.quotas
    }
}

/// Decides whether `principal` may do `what` (a tool name or `METHOD /path`), which needs
/// `scope`. The one scope check for MCP tools and REST endpoints, evaluated on every
/// call.
pub fn authorize(principal: &Principal, scope: Scope, what: &str) -> Result<(), ApiError> {
    if principal.has(scope) {
        return Ok(());
    }
    let message = match &principal.via {
        None => format!(
            "the API key `{}` lacks the scope `{}`, which {what} needs; ask an administrator for a key that has it",
            principal.name,
            scope.as_str()
        ),
        Some(via) => format!(
            "`{}` did not allow the scope `{}` to `{}` (or their role lacks it), and {what} needs it; sign in again \
             from the client and allow it",
            principal.name,
            scope.as_str(),
            via.client_name
        ),
    };
    Err(ApiError::new(ErrorCode::InsufficientScope, message).with_details(serde_json::json!({
        "required_scope": scope.as_str(),
        "granted_scopes": principal.scope_names(),
        "role": principal.role.as_str(),
    })))
}

/// Decides whether `principal`'s role allows `what` (administration needs
/// `group_admin` or `company_admin` on top of `mcp:admin`). Answers
/// `insufficient_scope` naming the role.
pub fn require_role(principal: &Principal, role: Role, what: &str) -> Result<(), ApiError> {
    authorize(principal, Scope::Admin, what)?;
    if principal.role >= role {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InsufficientScope,
        format!(
            "the API key `{}` has the role `{}`; {what} needs the role `{}` (with the scope `mcp:admin`)",
            principal.name,
            principal.role.as_str(),
            role.as_str()
        ),
    )
    .with_details(serde_json::json!({
        "required_scope": Scope::Admin.as_str(),
        "required_role": role.as_str(),
        "role": principal.role.as_str(),
    })))
}

/// The authenticated caller of a REST route, when a company administrator holding
/// `mcp:admin`; any other caller is answered 403 `insufficient_scope` naming the role,
/// before the handler runs. A handler asks for it as an argument instead of repeating
/// the check in its body.
#[derive(Debug, Clone)]
pub struct CompanyAdmin(pub Principal);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CompanyAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let principal =
            parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthorized, "this request carries no authenticated caller")
            })?;
        // The path as the caller sent it (a nested router sees it without its prefix).
        let path = parts.extensions.get::<axum::extract::OriginalUri>().map_or(parts.uri.path(), |u| u.path());
        require_role(&principal, Role::CompanyAdmin, &format!("{} {path}", parts.method))?;
        Ok(CompanyAdmin(principal))
    }
}

/// Middleware for one REST route: answers 403 `insufficient_scope` unless the
/// authenticated principal holds the route's scope (the state).
pub async fn require_scope(State(scope): State<Scope>, req: Request, next: Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let verdict = match req.extensions().get::<Principal>() {
        Some(p) => authorize(p, scope, &what),
        None => Err(ApiError::new(ErrorCode::Unauthorized, "the request is not authenticated")),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Why a key did not authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No key was sent.
    Missing,
    /// No such key (or a key of the other kind).
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key expired.
    Expired,
    /// The key store could not be read; refused rather than trusted.
    Unavailable,
}

/// The outcome of charging a request to its caller's calls-per-minute budget, left in
/// the request extensions for MCP tools (which report `quota_exceeded` as a tool
/// result rather than as HTTP 429).
#[derive(Debug, Clone)]
pub struct CallCharge(pub Result<CallBudget, ApiError>);

/// Middleware: authenticates the bearer API key (401 otherwise), charges the call to
/// the key's budget (429 with `Retry-After` when spent; MCP tool calls carry the
/// verdict to the tool instead), and hands the [`Principal`] to the handler.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mcp_post = req.uri().path() == "/mcp" && req.method() == Method::POST;
    // A REST call is one message: a key's call is charged while the key's freshness is
    // read (one round trip to a cluster's Redis instead of two).
    let mut charged = None;
    let callers = &state.callers;
    let authenticated = match bearer(req.headers()) {
        None => Err(AuthFailure::Missing),
        Some(token) if crate::oauth::OAuth::is_access_token(token) => match &state.oauth {
            Some(o) => o.authenticate(&state, token).await,
            None => Err(AuthFailure::Unknown),
        },
        Some(token) if !mcp_post => state
            .keys
            .authenticate_api_charging(token, |p| async move {
                let charged = callers.charge_call(&p).await;
                (p, charged)
            })
            .await
            .map(|(p, c)| {
                charged = Some(c);
                p
            }),
        Some(token) => state.keys.authenticate_api(token).await,
    };
    let principal = match authenticated {
        Ok(p) => p,
        Err(failure) => return unauthorized(&state, &failure),
    };
    let (mut req, messages) = if mcp_post {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, state.config.mcp.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => {
                if let Some(late) = crate::listener::body_timeout(&e) {
                    return ApiError::invalid(late.to_string()).into_response_with(StatusCode::REQUEST_TIMEOUT);
                }
                return ApiError::invalid(format!(
                    "the request body exceeds {} bytes (mcp.max_body_bytes) or could not be read",
                    state.config.mcp.max_body_bytes
                ))
                .into_response_with(StatusCode::PAYLOAD_TOO_LARGE);
            }
        };
        let messages = jsonrpc_messages(&bytes);
        // A person's token that lacks a tool's scope is answered 403 with a challenge
        // naming it (MCP's step-up authorization): their client can ask them for it.
        // A key cannot be widened, so its tool calls answer `insufficient_scope` as a
        // tool result instead.
        if principal.via.is_some()
            && let Some(scope) =
                messages.tools.iter().filter_map(|t| crate::mcp::tool_scope(t)).find(|s| !principal.has(*s))
        {
            return insufficient_scope(&state, &principal, scope);
        }
        (Request::from_parts(parts, Body::from(bytes)), messages)
    } else {
        (req, Messages { tool_calls: 0, others: 1, tools: Vec::new() })
    };
    // Every message is charged; a tool call over budget still reaches its tool, which
    // answers `quota_exceeded` as a tool result a model can read.
    let mut budget = None;
    let mut others = messages.others;
    if let Some(c) = charged {
        match c {
            Ok(b) => budget = Some(Ok(b)),
            Err(e) => return e.into_response(),
        }
        others = others.saturating_sub(1);
    }
    for _ in 0..others {
        match state.callers.charge_call(&principal).await {
            Ok(b) => budget = Some(Ok(b)),
            Err(e) => return e.into_response(),
        }
    }
    for _ in 0..messages.tool_calls {
        let c = state.callers.charge_call(&principal).await;
        if budget.as_ref().is_none_or(|b: &Result<CallBudget, ApiError>| b.is_ok()) {
            budget = Some(c);
        }
    }
    if let Some(b) = budget {
        req.extensions_mut().insert(CallCharge(b));
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// How many JSON-RPC messages of each sort a request body holds, and which tools it
/// calls.
struct Messages {
    tool_calls: usize,
    others: usize,
    tools: Vec<String>,
}

#[derive(Deserialize)]
struct JsonRpcMethod {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Option<ToolParams>,
}

#[derive(Deserialize)]
struct ToolParams {
    #[serde(default)]
    name: Option<String>,
}

/// 403 `insufficient_scope` with the RFC 6750 challenge naming the scope and the
/// protected-resource metadata.
fn insufficient_scope(state: &AppState, principal: &Principal, scope: Scope) -> Response {
    let metadata = format!("{}/.well-known/oauth-protected-resource", state.public_url());
    let challenge = format!(
        "Bearer error=\"insufficient_scope\", scope=\"{}\", resource_metadata=\"{metadata}\", \
         error_description=\"this call needs the scope {}\"",
        scope.as_str(),
        scope.as_str()
    );
    let body = ApiError::new(
        ErrorCode::InsufficientScope,
        format!(
            "`{}` did not allow the scope `{}` to this client; approve it when the client asks again",
            principal.name,
            scope.as_str()
        ),
    )
    .with_details(serde_json::json!({ "required_scope": scope.as_str(), "granted_scopes": principal.scope_names() }));
    (StatusCode::FORBIDDEN, [(header::WWW_AUTHENTICATE, challenge)], axum::Json(body.body())).into_response()
}

fn jsonrpc_messages(body: &[u8]) -> Messages {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let parsed: Vec<JsonRpcMethod> = if first == Some(&b'[') {
        serde_json::from_slice::<Vec<JsonRpcMethod>>(body)
    } else {
        serde_json::from_slice::<JsonRpcMethod>(body).map(|m| vec![m])
    }
    .ok()
    .filter(|m| !m.is_empty())
    .unwrap_or_else(|| vec![JsonRpcMethod { method: None, params: None }]);
    let calls: Vec<&JsonRpcMethod> = parsed.iter().filter(|m| m.method.as_deref() == Some("tools/call")).collect();
    let tools = calls.iter().filter_map(|m| m.params.as_ref()?.name.clone()).collect();
    Messages { tool_calls: calls.len(), others: parsed.len() - calls.len(), tools }
}

trait WithStatus {
    fn into_response_with(self, status: StatusCode) -> Response;
}

impl WithStatus for ApiError {
    fn into_response_with(self, status: StatusCode) -> Response {
        (status, axum::Json(self.body())).into_response()
    }
}

/// The 401 response, with the protected-resource metadata URL.
pub fn unauthorized(state: &AppState, failure: &AuthFailure) -> Response {
    let metadata = format!("{}/.well-known/oauth-protected-resource", state.public_url());
    let (code, message) = match failure {
        AuthFailure::Missing => ("missing_token", "send an API key as `Authorization: Bearer <key>`"),
        AuthFailure::Unknown => ("invalid_token", "the API key is not valid"),
        AuthFailure::Revoked => ("invalid_token", "the API key has been revoked; ask an administrator for a new one"),
        AuthFailure::Expired => ("invalid_token", "the API key has expired; ask an administrator for a new one"),
        AuthFailure::Unavailable => {
            let body = ApiError::new(ErrorCode::Internal, "the key store cannot be read right now; retry shortly")
                .with_details(serde_json::json!({ "retry_after_seconds": 5 }));
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], axum::Json(body.body()))
                .into_response();
        }
    };
    // The scopes a client should ask a person for by default (RFC 6750 §3 `scope`):
    // every tool but administration, which an admin's client asks for when needed.
    let scope = Scope::DEFAULT.map(|s| s.as_str()).join(" ");
    let challenge = format!("Bearer resource_metadata=\"{metadata}\", error=\"{code}\", scope=\"{scope}\"");
    let body = serde_json::json!({ "error": { "code": "unauthorized", "reason": code, "message": message } });
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, scopes: &[Scope]) -> Principal {
        Principal {
            key_id: "key_x".into(),
            name: "dash".into(),
            role,
            scopes: scopes.to_vec(),
            reach: Reach::org("default"),
            quotas: CallerQuotas::default(),
            tenancy: Arc::new(Tenancy::default()),
            via: None,
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer  abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn a_key_without_a_scope_is_refused_naming_the_scope() {
        let p = principal(Role::Developer, &[Scope::AgentsRead, Scope::HitsRead]);
        assert!(authorize(&p, Scope::AgentsRead, "list_agents").is_ok());
        let err = authorize(&p, Scope::ActionsWrite, "place_snapshot").unwrap_err();
        assert_eq!(err.code, ErrorCode::InsufficientScope);
        assert!(err.message.contains("mcp:actions:write") && err.message.contains("place_snapshot"), "{err}");
        let admin_only = principal(Role::CompanyAdmin, &[Scope::Admin]);
        assert!(authorize(&admin_only, Scope::ActionsWrite, "place_snapshot").is_err(), "scopes are literal");
    }

    #[test]
    fn administration_needs_the_role_as_well_as_the_scope() {
        let group = principal(Role::GroupAdmin, Role::GroupAdmin.scopes());
        assert!(require_role(&group, Role::GroupAdmin, "POST /api/v1/keys").is_ok());
        let err = require_role(&group, Role::CompanyAdmin, "GET /api/v1/audit").unwrap_err();
        assert_eq!(err.code, ErrorCode::InsufficientScope);
        assert_eq!(err.details["required_role"], "company_admin");
        let narrowed = principal(Role::CompanyAdmin, &Scope::DEFAULT);
        assert_eq!(
            require_role(&narrowed, Role::CompanyAdmin, "GET /api/v1/audit").unwrap_err().details["required_scope"],
            "mcp:admin"
        );
    }

    #[test]
    fn scope_and_role_names_round_trip() {
        for s in Scope::KNOWN {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("mcp:hits:write"), None);
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn tool_calls_are_told_apart_from_other_mcp_messages() {
        let m = jsonrpc_messages(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#);
        assert_eq!((m.tool_calls, m.others), (1, 0));
        let m = jsonrpc_messages(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!((m.tool_calls, m.others), (0, 1));
        let m = jsonrpc_messages(br#"[{"method":"tools/call"},{"method":"tools/list"}]"#);
        assert_eq!((m.tool_calls, m.others), (1, 1));
        let m = jsonrpc_messages(b"not json");
        assert_eq!((m.tool_calls, m.others), (0, 1));
    }
}
