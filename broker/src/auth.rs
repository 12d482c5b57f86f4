//! Authentication and authorization of API callers: bearer API keys, checked by a
//! middleware layer that puts the caller's [`Principal`] (name and [`Scope`]s) in the
//! request extensions, and [`authorize`], the one place that decides whether a
//! principal may use a tool or endpoint.
//!
//! A request without a valid key gets HTTP 401 with a JSON error body and
//! `WWW-Authenticate: Bearer resource_metadata="…"` pointing at the RFC 9728
//! protected-resource metadata, so MCP clients can discover how to authenticate.
//! Authorization is per call, never per connection: an MCP session opened with a key
//! is checked again on every tool call.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::{ApiError, ErrorCode};

/// What a key may do. Each MCP tool and REST endpoint needs exactly one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// `system_health`.
    SystemRead,
    /// Listing agents and their inspectable locations.
    AgentsRead,
    /// Placing and removing actions.
    ActionsWrite,
    /// Reading actions and their hits.
    HitsRead,
    /// Everything (later also key management).
    Admin,
}

impl Scope {
    /// Every scope a key can name.
    pub const KNOWN: [Scope; 5] =
        [Scope::SystemRead, Scope::AgentsRead, Scope::ActionsWrite, Scope::HitsRead, Scope::Admin];
    /// What a key gets when its configuration names no scopes.
    pub const DEFAULT: [Scope; 4] = [Scope::SystemRead, Scope::AgentsRead, Scope::ActionsWrite, Scope::HitsRead];

    /// The scope's name in configuration, OAuth metadata and errors.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::SystemRead => "mcp:system:read",
            Scope::AgentsRead => "mcp:agents:read",
            Scope::ActionsWrite => "mcp:actions:write",
            Scope::HitsRead => "mcp:hits:read",
            Scope::Admin => "mcp:admin",
        }
    }

    /// Parses a scope name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::KNOWN.into_iter().find(|k| k.as_str() == s.trim())
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name: shown as the creator of actions.
    pub name: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// A principal with the default scopes.
    pub fn with_default_scopes(name: impl Into<String>) -> Self {
        Principal { name: name.into(), scopes: Scope::DEFAULT.to_vec() }
    }

    /// Whether the principal holds `scope` (directly or through `mcp:admin`).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| *s == scope || *s == Scope::Admin)
    }

    /// The scope names, for callers to see.
    pub fn scope_names(&self) -> Vec<&'static str> {
        self.scopes.iter().map(Scope::as_str).collect()
    }
}

/// Decides whether `principal` may do `what` (a tool name or `METHOD /path`), which needs
/// `scope`. The one authorization check for MCP tools and REST endpoints, evaluated on
/// every call.
pub fn authorize(principal: &Principal, scope: Scope, what: &str) -> Result<(), ApiError> {
    if principal.has(scope) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InsufficientScope,
        format!(
            "the API key `{}` lacks the scope `{}`, which {what} needs; ask an operator to add it to the key's \
             `scopes`, or use a key that has it",
            principal.name,
            scope.as_str()
        ),
    )
    .with_details(serde_json::json!({
        "required_scope": scope.as_str(),
        "granted_scopes": principal.scope_names(),
    })))
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

/// Compares secrets in time independent of where they differ.
pub fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

/// Middleware: authenticates the bearer API key or answers 401.
pub async fn require_api_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let principal = bearer(req.headers()).and_then(|token| state.api_principal(token));
    match principal {
        Some(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => unauthorized(&state, bearer(req.headers()).is_some()),
    }
}

/// The 401 response, with the protected-resource metadata URL.
pub fn unauthorized(state: &AppState, had_token: bool) -> Response {
    let metadata = format!("{}/.well-known/oauth-protected-resource", state.public_url());
    let (code, message) = if had_token {
        ("invalid_token", "the API key is not valid")
    } else {
        ("missing_token", "send an API key as `Authorization: Bearer <key>`")
    };
    let challenge = format!("Bearer resource_metadata=\"{metadata}\", error=\"{code}\"");
    let body = serde_json::json!({ "error": { "code": "unauthorized", "reason": code, "message": message } });
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = Principal { name: "dash".into(), scopes: vec![Scope::AgentsRead, Scope::HitsRead] };
        assert!(authorize(&p, Scope::AgentsRead, "list_agents").is_ok());
        let err = authorize(&p, Scope::ActionsWrite, "place_snapshot").unwrap_err();
        assert_eq!(err.code, ErrorCode::InsufficientScope);
        assert!(err.message.contains("mcp:actions:write") && err.message.contains("place_snapshot"), "{err}");
        let admin = Principal { name: "root".into(), scopes: vec![Scope::Admin] };
        assert!(authorize(&admin, Scope::ActionsWrite, "place_snapshot").is_ok());
    }

    #[test]
    fn scope_names_round_trip() {
        for s in Scope::KNOWN {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("mcp:hits:write"), None);
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(secret_eq("abcdef", "abcdef"));
        assert!(!secret_eq("abcdef", "abcdeg"));
        assert!(!secret_eq("abc", "abcdef"));
        assert!(!secret_eq("", "a"));
    }
}
