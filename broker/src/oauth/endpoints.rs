//! The authorization server's endpoints and the browser flow.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/.well-known/oauth-authorization-server` | RFC 8414 metadata |
//! | GET | `/oauth/authorize` | checks the request, shows sign-in or consent |
//! | POST | `/oauth/sign-in` | password sign-in (CSRF-checked, rate-limited, audited) |
//! | GET | `/oauth/consent` | the consent page of a pending request |
//! | POST | `/oauth/consent` | the person's decision: a code, or `access_denied` |
//! | POST | `/oauth/upstream` | starts sign-in at the OpenID provider |
//! | GET | `/oauth/upstream/callback` | the provider's answer |
//! | POST | `/oauth/token` | `authorization_code` (PKCE S256) and `refresh_token` grants |
//! | POST | `/oauth/revoke` | RFC 7009 |
//! | POST | `/oauth/register` | RFC 7591 |
//!
//! Errors are the RFCs' own: before the client and its redirect URI are known to match,
//! the browser gets an error page (nothing is sent anywhere); after, the client gets
//! `error` (and `state`, `iss`) on its redirect URI. The token, revocation and
//! registration endpoints answer JSON `{"error", "error_description"}`.
//!
//! A pending request is bound to the browser that started it (a cookie whose hash the
//! request keeps) and its forms carry a token whose hash it keeps too: a form posted
//! from another site, or into another browser, is refused (CSRF, login CSRF).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use dashmap::DashMap;
use sha2::Digest as _;

use super::clients::{self, ClientError, Registration};
use super::pages::{self, Asking};
use super::store::{
    AccessRecord, BrowserSession, ClientAuth, ClientRecord, CodeRecord, GrantRecord, PendingRequest, Rotation,
    UserRecord,
};
use super::{OAuth, OAuthSettings, new_id, plausible};
use crate::AppState;
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::Scope;
use crate::keys::{self, DEFAULT_ORG};
use crate::listener::ClientAddr;
use crate::quota::{Rate, retry_secs};
use crate::time::now_ms;

/// The cookie a pending request is bound to.
const BROWSER_COOKIE: &str = "periscope_oauth_browser";
/// The cookie of a person signed in to the pages.
const SESSION_COOKIE: &str = "periscope_oauth_session";
/// How long a person has between the client's redirect and their decision.
const REQUEST_TTL_MS: u64 = 15 * 60_000;
/// How long a code lives.
const CODE_TTL_MS: u64 = 120_000;
/// Largest `state` kept.
const MAX_STATE: usize = 1_024;
/// Largest form or JSON body the endpoints read.
pub const MAX_BODY: usize = 16 * 1024;
/// Keys tracked by one per-name or per-address limiter; beyond, the oldest are dropped.
const MAX_TRACKED: usize = 100_000;

/// A limiter per name or address, each a GCRA.
#[derive(Debug)]
pub struct KeyedRate {
    per_minute: u32,
    burst: u32,
    period_minutes: u32,
    rates: DashMap<String, (Arc<Rate>, AtomicU64)>,
}

impl KeyedRate {
    fn new(per_minute: u32, burst: u32, period_minutes: u32) -> KeyedRate {
        KeyedRate { per_minute, burst, period_minutes, rates: DashMap::new() }
    }

    /// Takes one cell for `key`: `Err(seconds to wait)` when spent.
    pub fn take(&self, key: &str) -> Result<(), u64> {
        if self.rates.len() >= MAX_TRACKED && !self.rates.contains_key(key) {
            self.retain();
        }
        let rate = {
            let entry = self.rates.entry(key.to_owned()).or_insert_with(|| {
                let rate = if self.period_minutes <= 1 {
                    Rate::per_minute(self.per_minute, self.burst)
                } else {
                    Rate::per_second(
                        f64::from(self.per_minute) / f64::from(self.period_minutes * 60),
                        f64::from(self.burst),
                    )
                };
                (Arc::new(rate), AtomicU64::new(0))
            });
            entry.1.store(now_ms(), Ordering::Relaxed);
            Arc::clone(&entry.0)
        };
        rate.take(1).map(|_| ()).map_err(retry_secs)
    }

    /// Forgets keys idle for longer than the period (their bucket is full again).
    fn retain(&self) {
        let horizon = now_ms().saturating_sub(u64::from(self.period_minutes.max(1)) * 60_000 * 2);
        self.rates.retain(|_, (_, used)| used.load(Ordering::Relaxed) >= horizon);
        if self.rates.len() >= MAX_TRACKED {
            self.rates.clear();
        }
    }
}

/// Sign-in and registration limits.
#[derive(Debug)]
pub struct Limits {
    /// Password attempts per user name.
    pub per_user: KeyedRate,
    /// Sign-in attempts per client address.
    pub per_address: KeyedRate,
    /// Registrations per client address (per hour).
    pub registrations: KeyedRate,
}

impl Limits {
    /// From `[oauth]`.
    pub fn new(s: &OAuthSettings) -> Limits {
        Limits {
            per_user: KeyedRate::new(s.sign_in_per_minute_per_user, s.sign_in_per_minute_per_user, 1),
            per_address: KeyedRate::new(s.sign_in_per_minute_per_address, s.sign_in_per_minute_per_address, 1),
            registrations: KeyedRate::new(
                s.registrations_per_hour_per_address,
                s.registrations_per_hour_per_address,
                60,
            ),
        }
    }

    /// Forgets idle keys.
    pub fn retain(&self) {
        self.per_user.retain();
        self.per_address.retain();
        self.registrations.retain();
    }
}

/// The routes, mounted when `[oauth] enabled`.
pub fn router() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/oauth/authorize", get(authorize))
        .route("/oauth/sign-in", post(sign_in))
        .route("/oauth/consent", get(consent_page).post(consent))
        .route("/oauth/upstream", post(super::oidc::start))
        .route("/oauth/upstream/callback", get(super::oidc::callback))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/register", post(register))
}

/// The broker's base URL (no trailing slash): the issuer.
pub fn issuer(state: &AppState) -> String {
    state.public_url().trim_end_matches('/').to_owned()
}

/// The resources a token of this broker may be for: the broker and its `/mcp`.
fn resource_of(state: &AppState, asked: Option<&str>) -> Option<String> {
    let base = issuer(state);
    let mcp = format!("{base}/mcp");
    match asked.map(|r| r.trim_end_matches('/')) {
        None => Some(mcp),
        Some(r) if r == mcp || r == base => Some(r.to_owned()),
        Some(_) => None,
    }
}

fn oauth(state: &AppState) -> Option<Arc<OAuth>> {
    state.oauth.clone()
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
pub async fn metadata(State(state): State<AppState>) -> Response {
    let base = issuer(&state);
    let mut m = serde_json::json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "token_endpoint": format!("{base}/oauth/token"),
        "registration_endpoint": format!("{base}/oauth/register"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "scopes_supported": Scope::KNOWN.map(|s| s.as_str()),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "client_id_metadata_document_supported": true,
        "authorization_response_iss_parameter_supported": true,
        "service_documentation": format!("{base}/healthz"),
    });
    if let Some(o) = oauth(&state).and_then(|o| o.oidc.as_ref().map(|u| u.label().to_owned())) {
        m["x_periscope_upstream_sign_in"] = serde_json::json!(o);
    }
    ([(header::CACHE_CONTROL, "max-age=300")], Json(m)).into_response()
}

/// Parses `application/x-www-form-urlencoded` (or a query): every parameter once.
pub fn parse_params(raw: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (k, v) in url::form_urlencoded::parse(raw) {
        // Checkboxes repeat `scope`; every OAuth parameter appears once (RFC 6749 §3.1).
        if k != "scope" && !seen.insert(k.to_string()) {
            return Err(format!("the parameter `{k}` appears more than once"));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if issuer(state).starts_with("https://") { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/oauth; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn address(ext: &Option<axum::Extension<ClientAddr>>) -> String {
    ext.as_ref().map(|a| a.0.0.to_string()).unwrap_or_else(|| "unknown".into())
}

/// Where the client gets its answer: `redirect_uri` with `params`, `state` and `iss`.
fn to_client(state: &AppState, request: &PendingRequest, params: &[(&str, &str)]) -> Response {
    let Ok(mut url) = reqwest::Url::parse(&request.redirect_uri) else {
        return pages::error(StatusCode::BAD_REQUEST, "Bad redirect", "the client's redirect URI does not parse");
    };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
        if let Some(s) = &request.state {
            q.append_pair("state", s);
        }
        q.append_pair("iss", &issuer(state));
    }
    let mut r = Redirect::to(url.as_str()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn error_to_client(state: &AppState, request: &PendingRequest, error: &str, description: &str) -> Response {
    to_client(state, request, &[("error", error), ("error_description", description)])
}

/// Resolves a client id: a metadata document's URL, or a registered id.
pub async fn client(o: &OAuth, client_id: &str) -> Result<ClientRecord, ClientError> {
    if clients::is_metadata_url(client_id) {
        return o.clients.from_document(client_id).await;
    }
    match o.store.client(client_id).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => {
            Err(ClientError { code: "invalid_client", description: format!("no client `{}`", short(client_id)) })
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read OAuth clients");
            Err(ClientError { code: "server_error", description: "the client registry cannot be read".into() })
        }
    }
}

fn short(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 120).to_owned()
}

/// Parses a scope parameter: known names only (`offline_access` is accepted and
/// ignored: refresh tokens are always issued); absent means the default set.
fn parse_scopes(raw: Option<&str>) -> Result<Vec<Scope>, String> {
    let Some(raw) = raw else { return Ok(Scope::DEFAULT.to_vec()) };
    let mut out = BTreeSet::new();
    for s in raw.split(' ').filter(|s| !s.is_empty()) {
        if s == "offline_access" {
            continue;
        }
        out.insert(Scope::parse(s).ok_or_else(|| format!("unknown scope `{}`", short(s)))?);
    }
    if out.is_empty() {
        return Ok(Scope::DEFAULT.to_vec());
    }
    Ok(out.into_iter().collect())
}

fn scope_string(scopes: &[Scope]) -> String {
    scopes.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
}

fn digest(secret: &str) -> [u8; 32] {
    keys::hash(secret)
}

/// The operating system gave no randomness: nothing is issued without it.
pub struct NoRandomness;

impl IntoResponse for NoRandomness {
    fn into_response(self) -> Response {
        pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "the broker has no secure randomness right now")
    }
}

fn secret(prefix: &str) -> Result<String, NoRandomness> {
    keys::new_secret(prefix).map_err(|_| NoRandomness)
}

fn store_failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "OAuth store failure");
    pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "the broker cannot reach its store; try again shortly")
}

/// `GET /oauth/authorize`.
async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let params = match parse_params(query.unwrap_or_default().as_bytes()) {
        Ok(p) => p,
        Err(e) => return pages::error(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let Some(client_id) = param(&params, "client_id") else {
        return pages::error(StatusCode::BAD_REQUEST, "Bad request", "the request names no client_id");
    };
    let client = match client(&o, client_id).await {
        Ok(c) => c,
        Err(e) => return pages::error(StatusCode::BAD_REQUEST, "Unknown client", &e.description),
    };
    let redirect_uri = match param(&params, "redirect_uri") {
        Some(r) if clients::redirect_matches(&client.redirect_uris, r) => r.to_owned(),
        Some(r) => {
            return pages::error(
                StatusCode::BAD_REQUEST,
                "Unknown redirect URI",
                &format!("the redirect URI `{}` is not registered for this client; nothing was sent to it", short(r)),
            );
        }
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        None => return pages::error(StatusCode::BAD_REQUEST, "Bad request", "the request names no redirect_uri"),
    };
    let state_param = param(&params, "state").map(str::to_owned);
    let mut pending = PendingRequest {
        request_id: new_id("areq_"),
        browser: [0; 32],
        csrf: [0; 32],
        client_id: client.client_id.clone(),
        client_name: client.name.clone(),
        redirect_uri,
        state: state_param.clone(),
        code_challenge: String::new(),
        scopes: Vec::new(),
        resource: String::new(),
        expires_at_ms: now_ms() + REQUEST_TTL_MS,
        upstream: None,
    };
    if state_param.as_ref().is_some_and(|s| s.len() > MAX_STATE) {
        pending.state = None;
        return error_to_client(&state, &pending, "invalid_request", "state is longer than 1024 characters");
    }
    if param(&params, "response_type") != Some("code") {
        return error_to_client(&state, &pending, "unsupported_response_type", "only response_type=code is supported");
    }
    match (param(&params, "code_challenge"), param(&params, "code_challenge_method")) {
        (None, _) => {
            return error_to_client(
                &state,
                &pending,
                "invalid_request",
                "PKCE is required: send code_challenge (S256)",
            );
        }
        (Some(_), m) if m != Some("S256") => {
            return error_to_client(
                &state,
                &pending,
                "invalid_request",
                "code_challenge_method must be S256 (plain is not supported)",
            );
        }
        (Some(c), _) if c.len() != 43 || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {
            return error_to_client(&state, &pending, "invalid_request", "code_challenge is not a base64url SHA-256");
        }
        (Some(c), _) => pending.code_challenge = c.to_owned(),
    }
    pending.scopes = match parse_scopes(param(&params, "scope")) {
        Ok(s) => s,
        Err(e) => return error_to_client(&state, &pending, "invalid_scope", &e),
    };
    pending.resource = match resource_of(&state, param(&params, "resource")) {
        Some(r) => r,
        None => {
            return error_to_client(
                &state,
                &pending,
                "invalid_target",
                &format!("this server issues tokens for {}/mcp only", issuer(&state)),
            );
        }
    };
    let browser = match cookie(&headers, BROWSER_COOKIE).filter(|c| plausible(c, "pbr_")) {
        Some(b) => b,
        None => match secret("pbr_") {
            Ok(s) => s,
            Err(r) => return r.into_response(),
        },
    };
    let csrf = match secret("pcf_") {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    pending.browser = digest(&browser);
    pending.csrf = digest(&csrf);
    if let Err(e) = o.store.put_request(pending.clone()).await {
        return store_failed(e);
    }
    let mut response = match signed_in(&o, &headers).await {
        Some(user) => decide(&state, &o, &pending, &csrf, &user, None).await,
        None => sign_in_page(&o, &pending, &csrf, "", None, StatusCode::OK),
    };
    response.headers_mut().append(header::SET_COOKIE, set_cookie(&state, BROWSER_COOKIE, &browser, 3_600));
    response
}

fn asking(p: &PendingRequest) -> Asking<'_> {
    Asking { client_name: &p.client_name, client_id: &p.client_id, redirect_uri: &p.redirect_uri }
}

fn sign_in_page(
    o: &OAuth,
    p: &PendingRequest,
    csrf: &str,
    name: &str,
    problem: Option<&str>,
    status: StatusCode,
) -> Response {
    let upstream = o.oidc.as_ref().map(|u| u.label());
    let form = pages::Pending { asking: asking(p), request_id: &p.request_id, csrf, scopes: &p.scopes };
    pages::sign_in(&form, name, problem, upstream, status)
}

/// The user signed in to the pages in this browser, if any (and still active).
async fn signed_in(o: &OAuth, headers: &HeaderMap) -> Option<Arc<UserRecord>> {
    let cookie = cookie(headers, SESSION_COOKIE).filter(|c| plausible(c, "pbs_"))?;
    let session = o.store.session(digest(&cookie), now_ms()).await.ok()??;
    o.users_now().get(&session.user_id).filter(|u| u.active()).cloned()
}

/// The consent step for a signed-in person: a code at once when they already approved
/// these scopes for this client and redirect URI, else the consent page.
async fn decide(
    state: &AppState,
    o: &OAuth,
    p: &PendingRequest,
    csrf: &str,
    user: &UserRecord,
    problem: Option<&str>,
) -> Response {
    let (grantable, refused): (Vec<Scope>, Vec<Scope>) = p.scopes.iter().partition(|s| user.scopes().contains(s));
    if grantable.is_empty() {
        let _ = o.store.delete_request(&p.request_id).await;
        return error_to_client(state, p, "invalid_scope", "the signed-in user holds none of the requested scopes");
    }
    if problem.is_none()
        && let Ok(Some(approved)) = o.store.consent(&user.user_id, &p.client_id, &p.redirect_uri).await
        && grantable.iter().all(|s| approved.contains(s))
    {
        return issue_code(state, o, p, user, grantable).await;
    }
    pages::consent(&asking(p), &p.request_id, csrf, &user.name, &grantable, &refused, problem)
}

/// Loads a pending request posted by a form, checking that it comes from the browser
/// it is bound to and carries its CSRF token.
pub async fn posted_request(
    o: &OAuth,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<(PendingRequest, String), Response> {
    let expired = || {
        pages::error(
            StatusCode::BAD_REQUEST,
            "Sign-in expired",
            "this sign-in is no longer pending (it took too long, or was already answered); start again from your \
             client",
        )
    };
    let Some(id) = param(params, "request") else { return Err(expired()) };
    let request = match o.store.request(id, now_ms()).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(expired()),
        Err(e) => return Err(store_failed(e)),
    };
    let browser_ok = cookie(headers, BROWSER_COOKIE).is_some_and(|b| digest(&b) == request.browser);
    let csrf = param(params, "csrf").unwrap_or_default().to_owned();
    if !browser_ok || digest(&csrf) != request.csrf {
        return Err(pages::error(
            StatusCode::FORBIDDEN,
            "Request refused",
            "this form was not sent by the page the broker showed in this browser (cross-site request refused)",
        ));
    }
    Ok((request, csrf))
}

/// Whether the browser presenting `headers` is the one `request` is bound to.
pub fn browser_matches(headers: &HeaderMap, request: &PendingRequest) -> bool {
    cookie(headers, BROWSER_COOKIE).is_some_and(|b| digest(&b) == request.browser)
}

/// `POST /oauth/sign-in`.
async fn sign_in(
    State(state): State<AppState>,
    addr: Option<axum::Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let params = match parse_params(&body) {
        Ok(p) => p,
        Err(e) => return pages::error(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let (request, csrf) = match posted_request(&o, &headers, &params).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let name = param(&params, "username").unwrap_or_default().trim().to_owned();
    let password = param(&params, "password").unwrap_or_default();
    let address = address(&addr);
    let limited = o.limits.per_address.take(&address).and_then(|()| o.limits.per_user.take(&name.to_lowercase()));
    if let Err(secs) = limited {
        let mut r = sign_in_page(
            &o,
            &request,
            &csrf,
            &name,
            Some(&format!("Too many sign-in attempts; try again in {secs} seconds.")),
            StatusCode::TOO_MANY_REQUESTS,
        );
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
        return r;
    }
    let users = match o.fresh_users(&state.keys).await {
        Ok(u) => u,
        Err(_) => return store_failed("users cannot be read"),
    };
    let user = users.named(&name).cloned();
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    // The same argon2 work whether or not the name exists: names cannot be probed by
    // timing.
    let verified = {
        let o = Arc::clone(&o);
        let (password, hash) = (password.to_owned(), hash.clone());
        tokio::task::spawn_blocking(move || {
            let ok = o.passwords.verify(&password, hash.as_deref().unwrap_or(o.passwords.decoy()));
            ok && hash.is_some()
        })
        .await
        .unwrap_or(false)
    };
    let failure = match &user {
        None => Some("unknown_user"),
        Some(_) if !verified => Some("wrong_password"),
        Some(u) if !u.active() => Some("disabled"),
        Some(_) => None,
    };
    if let Some(reason) = failure {
        match &user {
            Some(u) => {
                let entry = AuditEntry::new(u.org.clone(), user_actor(u), AuditKind::UserSignInFailed)
                    .target(
                        serde_json::json!({ "user_id": u.user_id, "address": address, "client_id": request.client_id }),
                    )
                    .detail(format!("sign-in of `{}` failed: {}", u.name, reason.replace('_', " ")))
                    .data(serde_json::json!({ "reason": reason }));
                state.engine.audit_repeated(entry, &u.user_id, reason);
            }
            None => tracing::info!(target: "periscope::audit", address = %address, "sign-in with an unknown user name"),
        }
        let message = if reason == "disabled" {
            "This account is disabled; ask an administrator."
        } else {
            "Wrong user name or password."
        };
        return sign_in_page(&o, &request, &csrf, &name, Some(message), StatusCode::UNAUTHORIZED);
    }
    let Some(user) = user else { return store_failed("user vanished") };
    let mut response = match start_session(&state, &o, &user, "password", &address, &request).await {
        Ok(cookie) => {
            let mut r = Redirect::to(&format!("/oauth/consent?request={}", request.request_id)).into_response();
            r.headers_mut().append(header::SET_COOKIE, cookie);
            r
        }
        Err(r) => r,
    };
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The audit actor for a person at the pages.
pub fn user_actor(u: &UserRecord) -> Actor {
    Actor::User { id: u.user_id.clone(), name: u.name.clone(), client_id: None, client_name: None }
}

/// Signs `user` in to the pages: a new browser session (a fresh cookie, never one the
/// browser brought), audited. Returns the `Set-Cookie` value.
pub async fn start_session(
    state: &AppState,
    o: &OAuth,
    user: &UserRecord,
    method: &str,
    address: &str,
    request: &PendingRequest,
) -> Result<HeaderValue, Response> {
    let cookie = secret("pbs_").map_err(IntoResponse::into_response)?;
    let ttl = o.settings.sign_in_session_secs;
    let session = BrowserSession {
        cookie: digest(&cookie),
        user_id: user.user_id.clone(),
        method: method.to_owned(),
        expires_at_ms: now_ms() + ttl * 1_000,
    };
    o.store.put_session(session).await.map_err(store_failed)?;
    state.engine.audit(
        AuditEntry::new(user.org.clone(), user_actor(user), AuditKind::UserSignedIn)
            .target(serde_json::json!({ "user_id": user.user_id, "address": address, "client_id": request.client_id }))
            .detail(format!("`{}` signed in ({method}) for client `{}`", user.name, request.client_name))
            .data(serde_json::json!({ "method": method })),
    );
    Ok(set_cookie(state, SESSION_COOKIE, &cookie, ttl))
}

/// `GET /oauth/consent?request=…`.
async fn consent_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let id = q.get("request").cloned().unwrap_or_default();
    let request = match o.store.request(&id, now_ms()).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return pages::error(StatusCode::BAD_REQUEST, "Sign-in expired", "start again from your client");
        }
        Err(e) => return store_failed(e),
    };
    if !browser_matches(&headers, &request) {
        return pages::error(StatusCode::FORBIDDEN, "Request refused", "this sign-in was started in another browser");
    }
    // The form needs a token whose hash the request keeps: a fresh one replaces it.
    let csrf = match secret("pcf_") {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let mut request = request;
    request.csrf = digest(&csrf);
    if let Err(e) = o.store.put_request(request.clone()).await {
        return store_failed(e);
    }
    match signed_in(&o, &headers).await {
        Some(user) => decide(&state, &o, &request, &csrf, &user, None).await,
        None => sign_in_page(&o, &request, &csrf, "", None, StatusCode::OK),
    }
}

/// `POST /oauth/consent`.
async fn consent(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let params = match parse_params(&body) {
        Ok(p) => p,
        Err(e) => return pages::error(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let (request, csrf) = match posted_request(&o, &headers, &params).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(user) = signed_in(&o, &headers).await else {
        return sign_in_page(&o, &request, &csrf, "", Some("Sign in first."), StatusCode::UNAUTHORIZED);
    };
    if param(&params, "decision") != Some("approve") {
        let _ = o.store.delete_request(&request.request_id).await;
        return error_to_client(&state, &request, "access_denied", "the person denied the request");
    }
    let chosen: Vec<Scope> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, v)| Scope::parse(v))
        .filter(|s| request.scopes.contains(s) && user.scopes().contains(s))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if chosen.is_empty() {
        return decide(&state, &o, &request, &csrf, &user, Some("Choose at least one permission, or deny.")).await;
    }
    if let Err(e) = o.store.put_consent(&user.user_id, &request.client_id, &request.redirect_uri, chosen.clone()).await
    {
        return store_failed(e);
    }
    issue_code(&state, &o, &request, &user, chosen).await
}

/// Issues a code for `scopes` and sends the browser back to the client.
async fn issue_code(
    state: &AppState,
    o: &OAuth,
    p: &PendingRequest,
    user: &UserRecord,
    scopes: Vec<Scope>,
) -> Response {
    let code = match secret(super::CODE_PREFIX) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let record = CodeRecord {
        code: digest(&code),
        client_id: p.client_id.clone(),
        redirect_uri: p.redirect_uri.clone(),
        code_challenge: p.code_challenge.clone(),
        user_id: user.user_id.clone(),
        scopes,
        resource: p.resource.clone(),
        expires_at_ms: now_ms() + CODE_TTL_MS,
        grant_id: None,
    };
    if let Err(e) = o.store.put_code(record).await {
        return store_failed(e);
    }
    let _ = o.store.delete_request(&p.request_id).await;
    if !clients::is_metadata_url(&p.client_id) {
        let _ = o.store.touch_client(&p.client_id, now_ms()).await;
    }
    to_client(state, p, &[("code", &code)])
}

/// An error of the token, revocation or registration endpoints.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    basic_challenge: bool,
}

impl OAuthError {
    fn new(code: &'static str, description: impl Into<String>) -> OAuthError {
        let status = match code {
            "invalid_client" => StatusCode::UNAUTHORIZED,
            "server_error" => StatusCode::SERVICE_UNAVAILABLE,
            "slow_down" => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        OAuthError { status, code, description: description.into(), basic_challenge: false }
    }
}

impl From<ClientError> for OAuthError {
    fn from(e: ClientError) -> Self {
        OAuthError::new(e.code, e.description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut r =
            (self.status, Json(serde_json::json!({ "error": self.code, "error_description": self.description })))
                .into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.basic_challenge {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"periscope\""));
        }
        r
    }
}

fn server_error(e: impl std::fmt::Display) -> OAuthError {
    tracing::error!(error = %e, "OAuth store failure");
    OAuthError::new("server_error", "the broker cannot reach its store; retry shortly")
}

/// Authenticates the client of a token or revocation request (Basic header, or
/// `client_id` with `client_secret` in the body, or `client_id` alone for a public
/// client).
async fn authenticate_client(
    o: &OAuth,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<ClientRecord, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
        .map(|(_, c)| c.trim().to_owned());
    let (id, secret, via_basic) = match basic {
        Some(creds) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(creds)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| OAuthError::new("invalid_client", "the Basic credentials do not decode"))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| OAuthError::new("invalid_client", "malformed Basic credentials"))?;
            let decode =
                |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
            let (id, secret) = (decode(id).unwrap_or_default(), decode(secret).unwrap_or_default());
            if param(params, "client_id").is_some_and(|p| p != id) {
                return Err(OAuthError::new("invalid_request", "client_id differs from the Basic credentials"));
            }
            (id, Some(secret), true)
        }
        None => (
            param(params, "client_id")
                .map(str::to_owned)
                .ok_or_else(|| OAuthError::new("invalid_client", "the request names no client_id"))?,
            param(params, "client_secret").map(str::to_owned),
            false,
        ),
    };
    let client = client(o, &id).await.map_err(|e| {
        let mut err = OAuthError::from(e);
        if err.code != "server_error" {
            err.code = "invalid_client";
        }
        err.basic_challenge = via_basic;
        err
    })?;
    if client.auth != ClientAuth::None {
        let ok = match (&secret, client.secret_hash) {
            (Some(s), Some(h)) => plausible(s, super::CLIENT_SECRET_PREFIX) && digest(s) == h,
            _ => false,
        };
        if !ok {
            let mut e = OAuthError::new("invalid_client", "the client secret is missing or wrong");
            e.basic_challenge = via_basic;
            return Err(e);
        }
    }
    Ok(client)
}

/// Checks a PKCE verifier against an S256 challenge (RFC 7636).
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let shaped = (43..=128).contains(&verifier.len())
        && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    shaped
        && base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
            == challenge
}

/// `POST /oauth/token`.
async fn token(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    match token_inner(&state, &o, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn token_response(access: &str, refresh: &str, ttl_secs: u64, scopes: &[Scope]) -> Response {
    let mut r = Json(serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl_secs,
        "refresh_token": refresh,
        "scope": scope_string(scopes),
    }))
    .into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

async fn token_inner(state: &AppState, o: &OAuth, headers: &HeaderMap, body: &[u8]) -> Result<Response, OAuthError> {
    if body.len() > MAX_BODY {
        return Err(OAuthError::new("invalid_request", "the request body is too large"));
    }
    let params = parse_params(body).map_err(|e| OAuthError::new("invalid_request", e))?;
    let grant_type =
        param(&params, "grant_type").ok_or_else(|| OAuthError::new("invalid_request", "grant_type is missing"))?;
    if !matches!(grant_type, "authorization_code" | "refresh_token") {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type `{}` is not supported; use authorization_code or refresh_token", short(grant_type)),
        ));
    }
    let client = authenticate_client(o, headers, &params).await?;
    let access_ttl = o.settings.access_token_ttl_secs;
    let access = keys::new_secret(super::ACCESS_PREFIX).map_err(server_error)?;
    let refresh = keys::new_secret(super::REFRESH_PREFIX).map_err(server_error)?;
    let now = now_ms();
    let users = o.fresh_users(&state.keys).await.map_err(|_| server_error("users cannot be read"))?;
    if grant_type == "authorization_code" {
        let code = param(&params, "code").ok_or_else(|| OAuthError::new("invalid_request", "code is missing"))?;
        let verifier = param(&params, "code_verifier")
            .ok_or_else(|| OAuthError::new("invalid_request", "code_verifier is missing (PKCE is required)"))?;
        if !plausible(code, super::CODE_PREFIX) {
            return Err(OAuthError::new("invalid_grant", "the code is not valid"));
        }
        let record = o.store.take_code(digest(code), now).await.map_err(server_error)?;
        let Some(record) = record else {
            return Err(OAuthError::new("invalid_grant", "the code is unknown or expired"));
        };
        if let Some(grant) = &record.grant_id {
            // RFC 6749 §4.1.2: a code used twice revokes what it was exchanged for.
            if !grant.is_empty() {
                let user = users.get(&record.user_id);
                let entry = user.map(|u| {
                    AuditEntry::new(u.org.clone(), user_actor(u), AuditKind::OauthGrantRevoked)
                        .target(serde_json::json!({ "grant_id": grant, "client_id": record.client_id }))
                        .detail("an authorization code was used a second time; the tokens issued for it are revoked")
                        .data(serde_json::json!({ "reason": "code_reused" }))
                });
                let _ = o.revoke_grant(grant, "its authorization code was used again", entry).await;
            }
            return Err(OAuthError::new(
                "invalid_grant",
                "the code was already used; the tokens issued for it are revoked",
            ));
        }
        if record.client_id != client.client_id {
            return Err(OAuthError::new("invalid_grant", "the code was issued to another client"));
        }
        if param(&params, "redirect_uri").is_some_and(|r| r != record.redirect_uri) {
            return Err(OAuthError::new("invalid_grant", "redirect_uri differs from the authorization request's"));
        }
        if !pkce_matches(verifier, &record.code_challenge) {
            return Err(OAuthError::new("invalid_grant", "the code_verifier does not match the code_challenge"));
        }
        if let Some(r) = param(&params, "resource")
            && resource_of(state, Some(r)).as_deref() != Some(record.resource.as_str())
        {
            return Err(OAuthError::new("invalid_target", format!("the code was issued for {}", record.resource)));
        }
        let Some(user) = users.get(&record.user_id).filter(|u| u.active()) else {
            return Err(OAuthError::new("invalid_grant", "the user is disabled"));
        };
        let grant = GrantRecord {
            grant_id: new_id("grt_"),
            user_id: user.user_id.clone(),
            client_id: client.client_id.clone(),
            client_name: client.name.clone(),
            scopes: record.scopes.clone(),
            resource: record.resource.clone(),
            created_at_ms: now,
            max_expires_at_ms: now + o.settings.grant_max_age_secs * 1_000,
            revoked: None,
        };
        let access_record = AccessRecord {
            token: digest(&access),
            grant_id: grant.grant_id.clone(),
            scopes: grant.scopes.clone(),
            expires_at_ms: now + access_ttl * 1_000,
        };
        let entry = AuditEntry::new(
            user.org.clone(),
            Actor::User {
                id: user.user_id.clone(),
                name: user.name.clone(),
                client_id: Some(client.client_id.clone()),
                client_name: Some(client.name.clone()),
            },
            AuditKind::OauthClientAuthorized,
        )
        .target(serde_json::json!({ "grant_id": grant.grant_id, "client_id": client.client_id }))
        .detail(format!("`{}` authorized the client `{}` for {}", user.name, client.name, scope_string(&grant.scopes)))
        .data(serde_json::json!({ "scopes": grant.scopes, "resource": grant.resource }));
        let evicted = o
            .store
            .create_grant(
                grant.clone(),
                digest(&refresh),
                now + o.settings.refresh_token_ttl_secs * 1_000,
                access_record,
                o.settings.max_grants_per_user,
                entry,
            )
            .await
            .map_err(server_error)?;
        for g in evicted {
            o.forget_grant(&g);
        }
        o.store.set_code_grant(digest(code), &grant.grant_id).await.map_err(server_error)?;
        o.remember(digest(&access), &grant, grant.scopes.clone(), now + access_ttl * 1_000);
        return Ok(token_response(&access, &refresh, access_ttl, &grant.scopes));
    }
    // refresh_token
    let presented = param(&params, "refresh_token")
        .ok_or_else(|| OAuthError::new("invalid_request", "refresh_token is missing"))?;
    if !plausible(presented, super::REFRESH_PREFIX) {
        return Err(OAuthError::new("invalid_grant", "the refresh token is not valid"));
    }
    let Some(grant) = o.store.grant_of_refresh(digest(presented)).await.map_err(server_error)? else {
        return Err(OAuthError::new("invalid_grant", "the refresh token is unknown, expired or revoked"));
    };
    if grant.client_id != client.client_id {
        return Err(OAuthError::new("invalid_grant", "the refresh token was issued to another client"));
    }
    let scopes = match param(&params, "scope") {
        None => grant.scopes.clone(),
        Some(s) => {
            let asked = parse_scopes(Some(s)).map_err(|e| OAuthError::new("invalid_scope", e))?;
            if let Some(extra) = asked.iter().find(|s| !grant.scopes.contains(s)) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("`{}` was not granted; a refresh can only narrow", extra.as_str()),
                ));
            }
            asked
        }
    };
    if let Some(r) = param(&params, "resource")
        && resource_of(state, Some(r)).as_deref() != Some(grant.resource.as_str())
    {
        return Err(OAuthError::new("invalid_target", format!("the grant is for {}", grant.resource)));
    }
    let Some(user) = users.get(&grant.user_id).filter(|u| u.active()) else {
        return Err(OAuthError::new("invalid_grant", "the user is disabled"));
    };
    let access_record = AccessRecord {
        token: digest(&access),
        grant_id: grant.grant_id.clone(),
        scopes: scopes.clone(),
        expires_at_ms: now + access_ttl * 1_000,
    };
    let rotation = o
        .store
        .rotate_refresh(
            digest(presented),
            digest(&refresh),
            now + o.settings.refresh_token_ttl_secs * 1_000,
            access_record,
            now,
        )
        .await
        .map_err(server_error)?;
    match rotation {
        Rotation::Rotated(g) => {
            o.remember(digest(&access), &g, scopes.clone(), now + access_ttl * 1_000);
            Ok(token_response(&access, &refresh, access_ttl, &scopes))
        }
        Rotation::Reused(g) => {
            o.forget_grant(&g.grant_id);
            state.engine.audit(
                AuditEntry::new(user.org.clone(), user_actor(user), AuditKind::OauthGrantRevoked)
                    .target(serde_json::json!({ "grant_id": g.grant_id, "client_id": g.client_id }))
                    .detail(format!(
                        "a refresh token of `{}` for the client `{}` was used after it had been rotated: the grant is \
                         revoked (a stolen token, or a client that lost its latest one)",
                        user.name, g.client_name
                    ))
                    .data(serde_json::json!({ "reason": "refresh_token_reused" })),
            );
            Err(OAuthError::new(
                "invalid_grant",
                "the refresh token was already used; the grant is revoked, sign in again",
            ))
        }
        Rotation::Invalid => Err(OAuthError::new("invalid_grant", "the refresh token is unknown, expired or revoked")),
    }
}

/// `POST /oauth/revoke` (RFC 7009): revokes the grant the token belongs to (access or
/// refresh token). Unknown tokens are answered 200 as well.
async fn revoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let result: Result<(), OAuthError> = async {
        if body.len() > MAX_BODY {
            return Err(OAuthError::new("invalid_request", "the request body is too large"));
        }
        let params = parse_params(&body).map_err(|e| OAuthError::new("invalid_request", e))?;
        let client = authenticate_client(&o, &headers, &params).await?;
        let token = param(&params, "token").ok_or_else(|| OAuthError::new("invalid_request", "token is missing"))?;
        let grant_id = if plausible(token, super::ACCESS_PREFIX) {
            o.access.get(&digest(token)).map(|e| e.grant_id.clone())
        } else if plausible(token, super::REFRESH_PREFIX) {
            o.store.grant_of_refresh(digest(token)).await.map_err(server_error)?.map(|g| g.grant_id)
        } else {
            None
        };
        let Some(grant_id) = grant_id else { return Ok(()) };
        let Some(grant) = o.store.grant(&grant_id).await.map_err(server_error)? else { return Ok(()) };
        if grant.client_id != client.client_id {
            // Another client's token: not revoked, and nothing said about it.
            return Ok(());
        }
        let users = o.users_now();
        let entry = users.get(&grant.user_id).map(|u| {
            AuditEntry::new(
                u.org.clone(),
                Actor::User {
                    id: u.user_id.clone(),
                    name: u.name.clone(),
                    client_id: Some(grant.client_id.clone()),
                    client_name: Some(grant.client_name.clone()),
                },
                AuditKind::OauthGrantRevoked,
            )
            .target(serde_json::json!({ "grant_id": grant.grant_id, "client_id": grant.client_id }))
            .detail(format!("the client `{}` revoked its grant from `{}`", grant.client_name, u.name))
            .data(serde_json::json!({ "reason": "revoked_by_client" }))
        });
        o.revoke_grant(&grant_id, "revoked by the client", entry).await.map_err(server_error)?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /oauth/register` (RFC 7591): bounded, rate-limited per address, audited.
async fn register(State(state): State<AppState>, addr: Option<axum::Extension<ClientAddr>>, body: Bytes) -> Response {
    let Some(o) = oauth(&state) else { return StatusCode::NOT_FOUND.into_response() };
    let address = address(&addr);
    if let Err(secs) = o.limits.registrations.take(&address) {
        let mut r =
            OAuthError::new("slow_down", format!("too many registrations from this address; retry in {secs} s"))
                .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
        return r;
    }
    if body.len() > MAX_BODY {
        return OAuthError::new("invalid_client_metadata", format!("the registration is larger than {MAX_BODY} bytes"))
            .into_response();
    }
    let registration: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return OAuthError::new("invalid_client_metadata", format!("the registration is not valid JSON: {e}"))
                .into_response();
        }
    };
    let (name, redirect_uris, auth) = match clients::validate_registration(&registration) {
        Ok(v) => v,
        Err(e) => return OAuthError::from(e).into_response(),
    };
    let secret = match auth {
        ClientAuth::None => None,
        _ => match keys::new_secret(super::CLIENT_SECRET_PREFIX) {
            Ok(s) => Some(s),
            Err(e) => return server_error(e).into_response(),
        },
    };
    let now = now_ms();
    let record = ClientRecord {
        client_id: new_id("pcl_"),
        name,
        redirect_uris,
        auth,
        secret_hash: secret.as_deref().map(digest),
        client_uri: registration.client_uri.clone(),
        created_at_ms: now,
        last_used_ms: now,
        registered_from: address.clone(),
    };
    if let Err(e) = o.store.register_client(record.clone(), o.settings.max_clients).await {
        return match e {
            super::OAuthStoreError::Conflict(m) => OAuthError::new("invalid_client_metadata", m).into_response(),
            other => server_error(other).into_response(),
        };
    }
    // Registration belongs to no organization yet: it is recorded in the broker's own
    // (`default`) trail, and each organization sees the client when one of its people
    // authorizes it.
    state.engine.audit(
        AuditEntry::new(DEFAULT_ORG, Actor::System, AuditKind::OauthClientRegistered)
            .target(serde_json::json!({ "client_id": record.client_id, "address": address }))
            .detail(format!("the client `{}` registered itself", record.name))
            .data(serde_json::json!({ "redirect_uris": record.redirect_uris, "token_endpoint_auth_method": auth.as_str() })),
    );
    let mut out = serde_json::json!({
        "client_id": record.client_id,
        "client_id_issued_at": now / 1_000,
        "client_name": record.name,
        "redirect_uris": record.redirect_uris,
        "token_endpoint_auth_method": auth.as_str(),
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    if let Some(s) = secret {
        out["client_secret"] = serde_json::json!(s);
        out["client_secret_expires_at"] = serde_json::json!(0);
    }
    if let Some(u) = &record.client_uri {
        out["client_uri"] = serde_json::json!(u);
    }
    let mut r = (StatusCode::CREATED, Json(out)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_the_rfc_example_only() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXj", challenge));
        assert!(!pkce_matches("short", challenge));
    }

    #[test]
    fn oauth_parameters_appear_once_and_scopes_are_known() {
        assert!(parse_params(b"a=1&a=2").is_err());
        assert_eq!(parse_params(b"scope=x&scope=y").unwrap().len(), 2);
        assert_eq!(parse_scopes(Some("mcp:hits:read offline_access")).unwrap(), vec![Scope::HitsRead]);
        assert!(parse_scopes(Some("mcp:hits:write")).is_err());
        assert_eq!(parse_scopes(None).unwrap(), Scope::DEFAULT.to_vec());
    }
}
