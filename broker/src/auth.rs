//! Authentication of API callers: bearer API keys, checked by a middleware layer that
//! puts the caller's [`Principal`] in the request extensions.
//!
//! A request without a valid key gets HTTP 401 with a JSON error body and
//! `WWW-Authenticate: Bearer resource_metadata="…"` pointing at the RFC 9728
//! protected-resource metadata, so MCP clients can discover how to authenticate.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name: shown as the creator of actions.
    pub name: String,
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
    fn secrets_compare_by_value() {
        assert!(secret_eq("abcdef", "abcdef"));
        assert!(!secret_eq("abcdef", "abcdeg"));
        assert!(!secret_eq("abc", "abcdef"));
        assert!(!secret_eq("", "a"));
    }
}
