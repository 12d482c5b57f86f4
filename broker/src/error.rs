//! Errors a caller can act on, shared by the REST API and the MCP tools.
//!
//! Each has a stable `code` (part of the public contract, see `docs/design.md`), a sentence
//! that says what to do next, and optional structured details (the nearest locations,
//! when to retry). REST maps them to HTTP statuses; MCP returns them as tool results
//! with `isError: true`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Arguments are missing, malformed or out of range.
    InvalidInput,
    /// The named agent, action or hit does not exist (or is not visible to the caller).
    NotFound,
    /// No agent matches the target.
    NoMatchingAgents,
    /// The target agents do not know the location.
    NoSuchLocation,
    /// The caller's key lacks a scope.
    InsufficientScope,
    /// A quota is spent; retry later.
    QuotaExceeded,
    /// The action has ended by expiry.
    Expired,
    /// An agent reported it cannot run the action.
    AgentError,
    /// Missing or bad credentials.
    Unauthorized,
    /// The broker cannot do it right now (a cluster node that cannot reach its Redis);
    /// retry shortly, or through another node.
    NotAvailable,
    /// Something broke inside the broker.
    Internal,
    /// An operator's blocklist rule forbids the action there (the rule is named).
    Blocked,
    /// A company administrator paused the pool or organization; placements wait until
    /// they resume it.
    Paused,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoMatchingAgents => "no_matching_agents",
            ErrorCode::NoSuchLocation => "no_such_location",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Expired => "expired",
            ErrorCode::AgentError => "agent_error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::Internal => "internal",
            ErrorCode::Blocked => "blocked",
            ErrorCode::Paused => "paused",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ErrorCode::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::NoMatchingAgents | ErrorCode::NoSuchLocation => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InsufficientScope => StatusCode::FORBIDDEN,
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Expired => StatusCode::GONE,
            ErrorCode::AgentError => StatusCode::BAD_GATEWAY,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotAvailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Blocked => StatusCode::FORBIDDEN,
            ErrorCode::Paused => StatusCode::CONFLICT,
        }
    }
}

/// An error for a caller: code, message, details.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong and what to do next.
    pub message: String,
    /// Structured details (nearest locations, retry time, allowed range).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// The HTTP status when it is not the code's own (a body too large is 413, one of
    /// the wrong media type 415, both `invalid_input`).
    #[serde(skip)]
    pub status: Option<StatusCode>,
}

impl ApiError {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: serde_json::Value::Null, status: None }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    /// `invalid_input`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }

    /// A request body axum refused before the handler could read it: `invalid_input`,
    /// with the rejection's own status when it says more than 400 (413 too large, 415
    /// not JSON).
    pub fn body_rejected(rejection: &axum::extract::rejection::JsonRejection) -> Self {
        let status = rejection.status();
        let mut e = Self::invalid(format!("request body: {}", rejection.body_text()));
        if matches!(status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) {
            e.status = Some(status);
        }
        e
    }

    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// The JSON body both REST and MCP return.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": { "code": self.code.as_str(), "message": self.message } });
        if !self.details.is_null() {
            body["error"]["details"] = self.details.clone();
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status.unwrap_or(self.code.status()), axum::Json(self.body())).into_response();
        // RFC 6750 §3.1: a refusal for scope names the scope the request needs.
        if self.code == ErrorCode::InsufficientScope
            && let Some(scope) = self.details.get("required_scope").and_then(serde_json::Value::as_str)
            && let Ok(v) =
                axum::http::HeaderValue::from_str(&format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""))
        {
            response.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, v);
        }
        if let Some(secs) = self.details.get("retry_after_seconds").and_then(serde_json::Value::as_u64) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}
