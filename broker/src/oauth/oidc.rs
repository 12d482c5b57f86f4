//! Sign-in delegated to the company's OpenID Connect provider (`[oauth.oidc]`): the
//! authorization code flow with PKCE against the provider, then the ID token verified
//! here: signature (RS256 or ES256, against the provider's published keys), issuer,
//! audience, expiry and nonce. The person is the Periscope user linked to the
//! provider's subject, or named by `username_claim` (an email must be verified), or,
//! with `provision_role`, a user created on first sign-in.
//!
//! Implemented on the HTTP client the broker already has and ring (which rustls
//! brings) rather than the `openidconnect` crate: the flow is three requests and one
//! signature check, and that crate's tree would cost more to compile than the rest
//! of the authorization server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use reqwest::Url;
use serde::Deserialize;
use sha2::Digest as _;

use super::clients::Fetcher;
use super::config::OidcSettings;
use super::endpoints::{self, parse_params};
use super::pages;
use super::store::{UpstreamAttempt, UserRecord};
use super::{OAuth, new_id};
use crate::AppState;
use crate::audit::{AuditEntry, AuditKind};
use crate::keys::{self, DEFAULT_ORG};
use crate::listener::ClientAddr;
use crate::time::now_ms;

/// How long the provider's discovery document and keys are trusted.
const DISCOVERY_TTL: Duration = Duration::from_secs(3_600);
/// Clock skew allowed on `exp`, `iat`, `nbf`.
const SKEW_SECS: u64 = 120;

/// The provider's endpoints, from its discovery document.
#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    userinfo_endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

/// The upstream provider and what was learned of it.
#[derive(Debug)]
pub struct Upstream {
    settings: OidcSettings,
    fetcher: Fetcher,
    cached: std::sync::Mutex<Option<(Instant, Discovery, Jwks)>>,
}

/// Why an ID token or an exchange was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OidcError(String);

fn fail(m: impl Into<String>) -> OidcError {
    OidcError(m.into())
}

fn b64(s: &str) -> Result<Vec<u8>, OidcError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| fail("the ID token is not base64url"))
}

impl Upstream {
    /// The provider of `[oauth.oidc]`.
    pub fn new(settings: OidcSettings) -> anyhow::Result<Upstream> {
        let fetcher = Fetcher::new(
            Duration::from_secs(10),
            3,
            256 * 1024,
            settings.allow_private_addresses,
            settings.extra_ca_file.as_deref(),
        )?;
        Ok(Upstream { settings, fetcher, cached: std::sync::Mutex::new(None) })
    }

    /// The button's label.
    pub fn label(&self) -> &str {
        self.settings.display_name.as_deref().unwrap_or("single sign-on")
    }

    async fn discovery(&self, refresh_keys: bool) -> Result<(Discovery, Jwks), OidcError> {
        if !refresh_keys
            && let Some((at, d, k)) = self.cached.lock().unwrap_or_else(|p| p.into_inner()).clone()
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok((d, k));
        }
        let issuer = self.settings.issuer.trim_end_matches('/');
        let url = Url::parse(&format!("{issuer}/.well-known/openid-configuration"))
            .map_err(|e| fail(format!("the issuer is not a URL: {e}")))?;
        let doc = self.fetcher.get_json(&url).await.map_err(fail)?;
        let d: Discovery = serde_json::from_value(doc)
            .map_err(|e| fail(format!("the provider's discovery document does not fit: {e}")))?;
        if d.issuer.trim_end_matches('/') != issuer {
            return Err(fail(format!("the provider names its issuer `{}`, not `{issuer}`", d.issuer)));
        }
        let jwks_url = Url::parse(&d.jwks_uri).map_err(|e| fail(format!("jwks_uri is not a URL: {e}")))?;
        let k: Jwks = serde_json::from_value(self.fetcher.get_json(&jwks_url).await.map_err(fail)?)
            .map_err(|e| fail(format!("the provider's keys do not fit: {e}")))?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), d.clone(), k.clone()));
        Ok((d, k))
    }

    /// Where to send the browser: the provider's authorization endpoint.
    async fn authorization_url(
        &self,
        redirect: &str,
        state: &str,
        challenge: &str,
        nonce: &str,
    ) -> Result<Url, OidcError> {
        let (d, _) = self.discovery(false).await?;
        let mut url =
            Url::parse(&d.authorization_endpoint).map_err(|e| fail(format!("authorization_endpoint: {e}")))?;
        self.fetcher.check(&url).map_err(fail)?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", redirect)
            .append_pair("scope", "openid email profile")
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url)
    }

    /// Exchanges the provider's code and verifies the ID token; returns its claims.
    async fn exchange(
        &self,
        code: &str,
        redirect: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<serde_json::Value, OidcError> {
        let (d, _) = self.discovery(false).await?;
        let url = Url::parse(&d.token_endpoint).map_err(|e| fail(format!("token_endpoint: {e}")))?;
        self.fetcher.check(&url).map_err(fail)?;
        let response = self
            .fetcher
            .post_form(
                &url,
                Some((&self.settings.client_id, &self.settings.client_secret)),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect),
                    ("code_verifier", verifier),
                ],
            )
            .await
            .map_err(|e| fail(format!("the provider's token endpoint failed: {e}")))?;
        let status = response.status;
        let json: serde_json::Value = serde_json::from_slice(&response.body)
            .map_err(|_| fail(format!("the provider answered HTTP {status} without JSON")))?;
        if !(200..300).contains(&status) {
            return Err(fail(format!(
                "the provider refused the code: {} {}",
                json["error"].as_str().unwrap_or("?"),
                json["error_description"].as_str().unwrap_or("")
            )));
        }
        let id_token = json["id_token"].as_str().ok_or_else(|| fail("the provider returned no id_token"))?;
        let mut claims = self.verify(id_token, nonce).await?;
        // Providers that keep profile claims out of the ID token (OpenID Connect core
        // 5.4) serve them at userinfo, for the same subject.
        let claim = self.settings.username_claim.as_str();
        if claims.get(claim).is_none()
            && let (Some(endpoint), Some(access)) = (d.userinfo_endpoint.as_deref(), json["access_token"].as_str())
        {
            let url = Url::parse(endpoint).map_err(|e| fail(format!("userinfo_endpoint: {e}")))?;
            let headers = vec![
                (axum::http::header::AUTHORIZATION, format!("Bearer {access}")),
                (axum::http::header::ACCEPT, "application/json".to_owned()),
            ];
            let r = self
                .fetcher
                .request(axum::http::Method::GET, &url, headers, axum::body::Bytes::new())
                .await
                .map_err(|e| fail(format!("the provider's userinfo failed: {e}")))?;
            let info: serde_json::Value = serde_json::from_slice(&r.body)
                .map_err(|_| fail(format!("the provider's userinfo answered HTTP {} without JSON", r.status)))?;
            if info["sub"] != claims["sub"] {
                return Err(fail("the provider's userinfo names another subject"));
            }
            if let (Some(target), Some(extra)) = (claims.as_object_mut(), info.as_object()) {
                for (k, v) in extra {
                    target.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        Ok(claims)
    }

    /// Verifies an ID token: signature against the provider's keys (fetched again once
    /// when the key id is unknown: keys rotate), then the claims.
    pub async fn verify(&self, jwt: &str, nonce: &str) -> Result<serde_json::Value, OidcError> {
        let kid = jwt
            .split('.')
            .next()
            .and_then(|h| b64(h).ok())
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
            .and_then(|h| h["kid"].as_str().map(str::to_owned));
        let (mut d, mut keys) = self.discovery(false).await?;
        if kid.is_some() && !keys.keys.iter().any(|k| k.kid == kid) {
            (d, keys) = self.discovery(true).await?;
        }
        check_id_token(jwt, &keys, &d.issuer, &self.settings.client_id, nonce, now_ms() / 1_000)
    }

    /// The user for verified claims: linked by subject, else named by the configured
    /// claim (linked then), else provisioned when configured.
    async fn user_for(&self, o: &OAuth, claims: &serde_json::Value) -> Result<Arc<UserRecord>, OidcError> {
        let issuer = claims["iss"].as_str().unwrap_or_default();
        let external = format!("{issuer}|{}", claims["sub"].as_str().unwrap_or_default());
        let users = o.users_now();
        if let Some(u) = users.linked(&external) {
            return Ok(Arc::clone(u));
        }
        let claim = self.settings.username_claim.as_str();
        let name = claims[claim].as_str().ok_or_else(|| fail(format!("the ID token has no `{claim}` claim")))?;
        if claim == "email" && claims["email_verified"].as_bool() != Some(true) {
            return Err(fail("the provider has not verified this email address"));
        }
        if let Some(u) = users.named(name) {
            if u.external_id.as_ref().is_some_and(|e| e != &external) {
                return Err(fail(format!("the user `{name}` is linked to another identity")));
            }
            let mut linked = (**u).clone();
            linked.external_id = Some(external);
            o.store.update_user(linked, None).await.map_err(|e| fail(e.to_string()))?;
            let users = o.reload_users().await.map_err(|e| fail(e.to_string()))?;
            return users.get(&u.user_id).cloned().ok_or_else(|| fail("the user vanished"));
        }
        let Some(role) = self.settings.provision_role else {
            return Err(fail(format!("no Periscope user `{name}`; ask an administrator to create one")));
        };
        if !super::users::valid_user_name(name) {
            return Err(fail(format!("`{name}` cannot be a Periscope user name")));
        }
        let user = UserRecord {
            user_id: new_id("usr_"),
            name: name.to_owned(),
            org: self.settings.provision_org.clone().unwrap_or_else(|| DEFAULT_ORG.into()),
            role,
            group: self.settings.provision_group.clone(),
            pools: None,
            quotas: None,
            password_hash: None,
            external_id: Some(external),
            created_at_ms: now_ms(),
            created_by: format!("OpenID provider {issuer}"),
            disabled_at_ms: None,
            disabled_by: None,
        };
        let entry = AuditEntry::new(user.org.clone(), endpoints::user_actor(&user), AuditKind::UserCreated)
            .target(serde_json::json!({ "user_id": user.user_id, "name": user.name }))
            .detail(format!("`{}` was created at first sign-in through the OpenID provider", user.name))
            .data(serde_json::json!({ "role": role.as_str() }));
        o.store.create_user(user.clone(), entry).await.map_err(|e| fail(e.to_string()))?;
        let users = o.reload_users().await.map_err(|e| fail(e.to_string()))?;
        users.get(&user.user_id).cloned().ok_or_else(|| fail("the user vanished"))
    }
}

/// Checks an ID token against the provider's keys and the expected issuer, audience and
/// nonce at `now` (Unix seconds): RS256 or ES256 only (`none` and HMAC are refused),
/// expiry and not-before with two minutes of skew, a subject present.
fn check_id_token(
    jwt: &str,
    keys: &Jwks,
    issuer: &str,
    client_id: &str,
    nonce: &str,
    now: u64,
) -> Result<serde_json::Value, OidcError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(fail("the ID token is not a signed JWT"));
    };
    let header: serde_json::Value =
        serde_json::from_slice(&b64(h)?).map_err(|_| fail("the ID token's header is not JSON"))?;
    let alg = header["alg"].as_str().unwrap_or_default().to_owned();
    let kid = header["kid"].as_str().map(str::to_owned);
    let signature = b64(s)?;
    let signed = format!("{h}.{p}");
    let candidates: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid == kid)
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == alg))
        .collect();
    if candidates.is_empty() {
        return Err(fail("no key of the provider matches the ID token"));
    }
    if !candidates.iter().any(|k| verify_signature(k, &alg, signed.as_bytes(), &signature)) {
        return Err(fail(format!("the ID token's signature ({alg}) does not verify")));
    }
    let claims: serde_json::Value =
        serde_json::from_slice(&b64(p)?).map_err(|_| fail("the ID token's claims are not JSON"))?;
    if claims["iss"].as_str() != Some(issuer) {
        return Err(fail("the ID token's issuer is not the provider"));
    }
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == client_id,
        serde_json::Value::Array(a) => a.iter().any(|x| x.as_str() == Some(client_id)),
        _ => false,
    };
    if !aud_ok {
        return Err(fail("the ID token is for another client (aud)"));
    }
    if claims["exp"].as_u64().is_none_or(|e| e + SKEW_SECS < now) {
        return Err(fail("the ID token has expired"));
    }
    if claims["nbf"].as_u64().is_some_and(|n| n > now + SKEW_SECS) {
        return Err(fail("the ID token is not valid yet"));
    }
    if claims["nonce"].as_str() != Some(nonce) {
        return Err(fail("the ID token's nonce does not match this sign-in"));
    }
    if claims["sub"].as_str().is_none_or(str::is_empty) {
        return Err(fail("the ID token names no subject"));
    }
    Ok(claims)
}

fn verify_signature(key: &Jwk, alg: &str, message: &[u8], signature: &[u8]) -> bool {
    use ring::signature;
    match (alg, key.kty.as_str()) {
        ("RS256", "RSA") => {
            let (Some(n), Some(e)) = (key.n.as_deref(), key.e.as_deref()) else { return false };
            let (Ok(n), Ok(e)) = (b64(n), b64(e)) else { return false };
            signature::RsaPublicKeyComponents { n: &n, e: &e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok()
        }
        ("ES256", "EC") if key.crv.as_deref() == Some("P-256") => {
            let (Some(x), Some(y)) = (key.x.as_deref(), key.y.as_deref()) else { return false };
            let (Ok(x), Ok(y)) = (b64(x), b64(y)) else { return false };
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok()
        }
        _ => false,
    }
}

fn callback_url(state: &AppState) -> String {
    format!("{}/oauth/upstream/callback", endpoints::issuer(state))
}

/// `POST /oauth/upstream`: the sign-in page's button; sends the browser to the provider.
pub async fn start(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(o) = state.oauth.clone() else { return StatusCode::NOT_FOUND.into_response() };
    let Some(upstream) = o.oidc.as_ref() else { return StatusCode::NOT_FOUND.into_response() };
    let params = match parse_params(&body) {
        Ok(p) => p,
        Err(e) => return pages::error(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let (mut request, _) = match endpoints::posted_request(&o, &headers, &params).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (Ok(up_state), Ok(verifier), Ok(nonce)) =
        (keys::new_secret("pus_"), keys::new_secret("pkv_verifier_long_enough_"), keys::new_secret("pno_"))
    else {
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "no secure randomness");
    };
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let url = match upstream.authorization_url(&callback_url(&state), &up_state, &challenge, &nonce).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "the OpenID provider cannot be used");
            return pages::error(StatusCode::BAD_GATEWAY, "Sign-in provider unavailable", &e.0);
        }
    };
    request.upstream = Some(UpstreamAttempt { state: keys::hash(&up_state), verifier, nonce });
    if let Err(e) = o.store.put_request(request).await {
        tracing::error!(error = %e, "OAuth store failure");
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "the broker cannot reach its store");
    }
    let mut r = Redirect::to(url.as_str()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The provider's answer.
#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// `GET /oauth/upstream/callback`: verifies the provider's answer, signs the person in,
/// and continues to the consent page.
pub async fn callback(
    State(state): State<AppState>,
    addr: Option<axum::Extension<ClientAddr>>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let Some(o) = state.oauth.clone() else { return StatusCode::NOT_FOUND.into_response() };
    let Some(upstream) = o.oidc.as_ref() else { return StatusCode::NOT_FOUND.into_response() };
    let Some(up_state) = q.state.as_deref().filter(|s| super::plausible(s, "pus_")) else {
        return pages::error(StatusCode::BAD_REQUEST, "Sign-in failed", "the provider's answer carries no valid state");
    };
    let request = match o.store.request_by_upstream_state(keys::hash(up_state), now_ms()).await {
        Ok(Some(r)) => r,
        Ok(None) => return pages::error(StatusCode::BAD_REQUEST, "Sign-in expired", "start again from your client"),
        Err(e) => {
            tracing::error!(error = %e, "OAuth store failure");
            return pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "the broker cannot reach its store");
        }
    };
    if !endpoints::browser_matches(&headers, &request) {
        return pages::error(StatusCode::FORBIDDEN, "Request refused", "this sign-in was started in another browser");
    }
    let Some(attempt) = request.upstream.clone() else {
        return pages::error(StatusCode::BAD_REQUEST, "Sign-in failed", "no sign-in at the provider is pending");
    };
    if let Some(e) = &q.error {
        return pages::error(
            StatusCode::UNAUTHORIZED,
            "Sign-in refused",
            &format!("the provider answered {e}: {}", q.error_description.as_deref().unwrap_or("")),
        );
    }
    let Some(code) = q.code.as_deref() else {
        return pages::error(StatusCode::BAD_REQUEST, "Sign-in failed", "the provider's answer carries no code");
    };
    let address = addr.map(|a| a.0.0.to_string()).unwrap_or_else(|| "unknown".into());
    let claims = match upstream.exchange(code, &callback_url(&state), &attempt.verifier, &attempt.nonce).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(target: "periscope::audit", address = %address, error = %e, "sign-in through the OpenID provider refused");
            return pages::error(StatusCode::UNAUTHORIZED, "Sign-in refused", &e.0);
        }
    };
    let user = match upstream.user_for(&o, &claims).await {
        Ok(u) => u,
        Err(e) => return pages::error(StatusCode::FORBIDDEN, "Sign-in refused", &e.0),
    };
    if !user.active() {
        let entry = AuditEntry::new(user.org.clone(), endpoints::user_actor(&user), AuditKind::UserSignInFailed)
            .target(serde_json::json!({ "user_id": user.user_id, "address": address }))
            .detail(format!("sign-in of `{}` through the OpenID provider refused: disabled", user.name))
            .data(serde_json::json!({ "reason": "disabled" }));
        state.engine.audit_repeated(entry, &user.user_id, "disabled");
        return pages::error(
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "this account is disabled; ask an administrator",
        );
    }
    let mut request = request;
    request.upstream = None;
    if o.store.put_request(request.clone()).await.is_err() {
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "the broker cannot reach its store");
    }
    match endpoints::start_session(&state, &o, &user, "oidc", &address, &request).await {
        Ok(cookie) => {
            let mut r = Redirect::to(&format!("/oauth/consent?request={}", request.request_id)).into_response();
            r.headers_mut().append(header::SET_COOKIE, cookie);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// An ES256 key and its JWK.
    fn key() -> (EcdsaKeyPair, Jwks) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some("k1".into()),
            alg: Some("ES256".into()),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: Some(enc(&public[1..33])),
            y: Some(enc(&public[33..65])),
        };
        (pair, Jwks { keys: vec![jwk] })
    }

    fn sign(pair: &EcdsaKeyPair, header: serde_json::Value, claims: serde_json::Value) -> String {
        let signed = format!("{}.{}", enc(header.to_string().as_bytes()), enc(claims.to_string().as_bytes()));
        let sig = pair.sign(&ring::rand::SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", enc(sig.as_ref()))
    }

    #[test]
    fn an_id_token_is_refused_unless_signed_by_the_provider_for_this_client_and_sign_in() {
        let (pair, keys) = key();
        let header = serde_json::json!({ "alg": "ES256", "kid": "k1" });
        let claims = serde_json::json!({
            "iss": "https://login.example.com", "aud": "periscope", "sub": "u1", "nonce": "n1",
            "exp": 2_000, "iat": 1_000, "email": "ada@example.com", "email_verified": true,
        });
        let check = |jwt: &str, nonce: &str, now: u64| {
            check_id_token(jwt, &keys, "https://login.example.com", "periscope", nonce, now)
        };
        let good = sign(&pair, header.clone(), claims.clone());
        assert_eq!(check(&good, "n1", 1_500).unwrap()["email"], "ada@example.com");
        assert!(check(&good, "n2", 1_500).unwrap_err().0.contains("nonce"));
        assert!(check(&good, "n1", 3_000).unwrap_err().0.contains("expired"));
        let mut other = claims.clone();
        other["aud"] = serde_json::json!("someone-else");
        assert!(check(&sign(&pair, header.clone(), other), "n1", 1_500).unwrap_err().0.contains("aud"));
        let mut other = claims.clone();
        other["iss"] = serde_json::json!("https://evil.example.com");
        assert!(check(&sign(&pair, header.clone(), other), "n1", 1_500).unwrap_err().0.contains("issuer"));
        // Another key, a tampered payload, `alg: none`: the signature does not verify.
        let (stranger, _) = key();
        assert!(
            check(&sign(&stranger, header.clone(), claims.clone()), "n1", 1_500).unwrap_err().0.contains("signature")
        );
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut tampered = claims.clone();
        tampered["email"] = serde_json::json!("mallory@example.com");
        parts[1] = enc(tampered.to_string().as_bytes());
        assert!(check(&parts.join("."), "n1", 1_500).is_err());
        let none = format!("{}.{}.", enc(br#"{"alg":"none","kid":"k1"}"#), enc(claims.to_string().as_bytes()));
        assert!(check(&none, "n1", 1_500).is_err());
    }
}
