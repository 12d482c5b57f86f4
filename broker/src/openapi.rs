//! The REST API's description: an OpenAPI 3.0 document (`openapi.json` beside this
//! file) served at `GET /api/v1/openapi.json`, and the layer that gives every error
//! under `/api/v1` the documented JSON shape.
//!
//! The document is written by hand rather than derived from the handlers: deriving it
//! (utoipa) would put annotations on every handler and a schema derive on every wire
//! type of three crates, for a compile cost on every build; a hand-written document
//! costs nothing to build and is held true by tests instead (`tests/it/openapi.rs`:
//! every route the router serves is in it and every path in it is served, and a
//! property-based run checks real answers against its schemas). It is served without
//! a key, like `/healthz`: it says nothing about any tenant.

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/v1/openapi.json`.
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], DOCUMENT).into_response()
}

/// The answer for a path under `/api/v1` that no route serves.
pub async fn unknown_route(request: Request<Body>) -> ApiError {
    let path = request.uri().path();
    let shown: String = path.chars().take(200).collect();
    ApiError::not_found(format!("no such endpoint: {} {shown}; see /api/v1/openapi.json", request.method()))
}

/// Longest plain-text rejection kept as the message of the JSON error that replaces it.
const MAX_REJECTION_BYTES: usize = 4 * 1024;

/// Rewrites an error answer that is not JSON (axum's own rejections: a body over the
/// size limit, a path that does not decode, a method the route does not serve) into
/// `{"error": {"code", "message"}}`, keeping its status and its text as the message.
/// Handlers map their own rejections; this catches what happens before a handler runs,
/// so no error under `/api/v1` leaves in another shape.
pub async fn json_errors(request: Request<Body>, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REJECTION_BYTES).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::InsufficientScope,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::QuotaExceeded,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidInput,
    };
    let body = ApiError::new(code, text).body();
    let mut out = (status, axum::Json(body)).into_response();
    // Keep what the rejection said beyond its body (`Allow` on a 405, `Retry-After`).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
