//! OAuth clients: who they are and where codes may be sent.
//!
//! A client identifies itself in one of two ways:
//! - a **client ID metadata document**: its `client_id` is an HTTPS URL serving a JSON
//!   document with its name and redirect URIs. The broker fetches it with bounds (time,
//!   size, redirects, each to a checked address), refuses non-public addresses unless
//!   `oauth.client_metadata.allow_private_addresses` (a client id must not make the broker
//!   probe its own network), and caches it for `cache_secs`;
//! - **dynamic registration** (RFC 7591, [`validate_registration`]): the broker issues a
//!   `pcl_…` id (and a secret when the client asks to be confidential).
//!
//! Redirect URIs match exactly, except that a loopback `http` URI (`127.0.0.1`,
//! `[::1]`, `localhost`) matches on any port (RFC 8252 §7.3): native apps listen on
//! whatever port is free.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http;
use reqwest::Url;
use serde::Deserialize;

use super::config::ClientMetadataSettings;
use super::store::{ClientAuth, ClientRecord};

/// Longest redirect URI.
pub const MAX_REDIRECT_URI: usize = 2_000;
/// Most redirect URIs per client.
pub const MAX_REDIRECT_URIS: usize = 10;
/// Longest client name kept (longer ones are cut).
pub const MAX_CLIENT_NAME: usize = 100;
/// Metadata documents kept in the cache.
const MAX_CACHED: usize = 1_000;

/// Why a client could not be identified or registered; `code` is the RFC's error name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct ClientError {
    /// `invalid_client`, `invalid_redirect_uri`, `invalid_client_metadata`, ...
    pub code: &'static str,
    /// A sentence for the developer of the client.
    pub description: String,
}

fn err(code: &'static str, description: impl Into<String>) -> ClientError {
    ClientError { code, description: description.into() }
}

/// Whether an address is on the public internet (not loopback, private, link-local,
/// shared, documentation, multicast, reserved).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks a redirect URI a client registers or sends: `https`, loopback `http`, or a
/// private-use scheme with a dot (`com.example.app:/cb`, RFC 8252 §7.1); no fragment.
pub fn check_redirect_uri(uri: &str) -> Result<Url, ClientError> {
    if uri.len() > MAX_REDIRECT_URI {
        return Err(err(
            "invalid_redirect_uri",
            format!("a redirect URI is longer than {MAX_REDIRECT_URI} characters"),
        ));
    }
    let url = Url::parse(uri).map_err(|e| err("invalid_redirect_uri", format!("`{uri}` is not a URL: {e}")))?;
    if url.fragment().is_some() {
        return Err(err("invalid_redirect_uri", format!("`{uri}` has a fragment")));
    }
    match url.scheme() {
        "https" if url.host_str().is_some() => {}
        "http" if url.host_str().is_some_and(is_loopback_host) => {}
        "http" => {
            return Err(err(
                "invalid_redirect_uri",
                format!("`{uri}`: plain http is only for loopback redirect URIs (127.0.0.1, [::1], localhost)"),
            ));
        }
        s if s.contains('.') && !matches!(s, "javascript" | "data" | "file" | "vbscript") => {}
        s => return Err(err("invalid_redirect_uri", format!("`{uri}`: the scheme `{s}` cannot receive a code"))),
    }
    Ok(url)
}

/// Whether `presented` matches a registered redirect URI: the same string, or for
/// loopback `http` URIs the same but for the port.
pub fn redirect_matches(registered: &[String], presented: &str) -> bool {
    if registered.iter().any(|r| r == presented) {
        return true;
    }
    let Ok(p) = Url::parse(presented) else { return false };
    if p.scheme() != "http" || !p.host_str().is_some_and(is_loopback_host) {
        return false;
    }
    registered.iter().filter_map(|r| Url::parse(r).ok()).any(|r| {
        r.scheme() == "http"
            && r.host_str() == p.host_str()
            && r.path() == p.path()
            && r.query() == p.query()
            && r.username() == p.username()
            && r.password() == p.password()
    })
}

/// An RFC 7591 registration request (the fields the broker reads; others ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Registration {
    /// Where codes go.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Its name.
    #[serde(default)]
    pub client_name: Option<String>,
    /// `none` (public), `client_secret_basic` or `client_secret_post`.
    #[serde(default)]
    pub token_endpoint_auth_method: Option<String>,
    /// Must be within `authorization_code`, `refresh_token`.
    #[serde(default)]
    pub grant_types: Option<Vec<String>>,
    /// Must be within `code`.
    #[serde(default)]
    pub response_types: Option<Vec<String>>,
    /// Its home page.
    #[serde(default)]
    pub client_uri: Option<String>,
}

fn clean_name(name: Option<&str>, fallback: &str) -> String {
    let n: String = name.unwrap_or(fallback).chars().filter(|c| !c.is_control()).take(MAX_CLIENT_NAME).collect();
    if n.trim().is_empty() { fallback.to_owned() } else { n.trim().to_owned() }
}

/// Checks a registration; returns the name, redirect URIs and authentication method.
pub fn validate_registration(r: &Registration) -> Result<(String, Vec<String>, ClientAuth), ClientError> {
    if r.redirect_uris.is_empty() {
        return Err(err("invalid_redirect_uri", "give at least one redirect URI"));
    }
    if r.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(err("invalid_redirect_uri", format!("at most {MAX_REDIRECT_URIS} redirect URIs")));
    }
    for u in &r.redirect_uris {
        check_redirect_uri(u)?;
    }
    let auth = match r.token_endpoint_auth_method.as_deref() {
        None => ClientAuth::ClientSecretBasic,
        Some(m) => ClientAuth::parse(m).ok_or_else(|| {
            err(
                "invalid_client_metadata",
                format!("token_endpoint_auth_method `{m}` is not supported; use none, client_secret_basic or client_secret_post"),
            )
        })?,
    };
    if let Some(g) = &r.grant_types
        && let Some(bad) = g.iter().find(|g| !matches!(g.as_str(), "authorization_code" | "refresh_token"))
    {
        return Err(err(
            "invalid_client_metadata",
            format!("grant type `{bad}` is not supported; this server issues authorization_code and refresh_token"),
        ));
    }
    if let Some(t) = &r.response_types
        && let Some(bad) = t.iter().find(|t| t.as_str() != "code")
    {
        return Err(err("invalid_client_metadata", format!("response type `{bad}` is not supported; only code")));
    }
    if let Some(u) = &r.client_uri
        && (u.len() > MAX_REDIRECT_URI || Url::parse(u).map(|u| u.scheme() != "https").unwrap_or(true))
    {
        return Err(err("invalid_client_metadata", "client_uri must be an https URL"));
    }
    Ok((clean_name(r.client_name.as_deref(), "unnamed client"), r.redirect_uris.clone(), auth))
}

/// A client ID metadata document (the fields the broker reads).
#[derive(Debug, Deserialize)]
struct MetadataDocument {
    client_id: String,
    #[serde(default)]
    client_name: Option<String>,
    #[serde(default)]
    client_uri: Option<String>,
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default)]
    token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    grant_types: Option<Vec<String>>,
    #[serde(default)]
    response_types: Option<Vec<String>>,
}

/// Whether a `client_id` is a metadata document's URL (rather than a registered id).
pub fn is_metadata_url(client_id: &str) -> bool {
    client_id.starts_with("https://")
}

/// Checks a URL the broker is about to fetch: https, a host, no credentials, and an IP
/// literal only if public (IP literals skip the resolver).
fn check_fetch_url(url: &Url, allow_private: bool, allow_http_loopback: bool) -> Result<(), String> {
    let loopback = url.host_str().is_some_and(is_loopback_host);
    if url.scheme() != "https" && !(url.scheme() == "http" && allow_http_loopback && loopback) {
        return Err(format!("`{url}` is not an https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{url}` carries credentials"));
    }
    match url.host() {
        None => Err(format!("`{url}` has no host")),
        Some(url::Host::Ipv4(ip)) if !allow_private && !is_public(IpAddr::V4(ip)) => {
            Err(format!("`{url}` is a non-public address"))
        }
        Some(url::Host::Ipv6(ip)) if !allow_private && !is_public(IpAddr::V6(ip)) => {
            Err(format!("`{url}` is a non-public address"))
        }
        Some(_) => Ok(()),
    }
}

/// A bounded HTTP(S) client for fetching documents from addresses a caller chose: the
/// whole fetch (redirects included) under one deadline, bodies cut at `max_bytes`,
/// every hop's URL checked, and host names resolved here to public addresses only
/// (unless private ones are allowed): the connection goes to the very addresses
/// checked, so a name cannot be re-pointed between the check and the connection.
///
/// Built on hyper and tokio-rustls (ring) directly rather than reqwest: reqwest's TLS
/// would bring aws-lc, or oblige every reqwest client of the workspace to install a
/// process-wide crypto provider.
#[derive(Clone)]
pub struct Fetcher {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
    max_redirects: usize,
    max_bytes: usize,
    allow_private: bool,
    allow_http_loopback: bool,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("timeout", &self.timeout)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// The TLS configuration: ring, the public web roots and the PEM file of extra CAs.
fn tls(extra_ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let cert: rustls::pki_types::CertificateDer<'static> =
                cert.map_err(|e| anyhow::anyhow!("{}: not PEM certificates: {e}", path.display()))?;
            roots.add(cert).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("{} holds no certificate", path.display());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A response: status and (bounded) body.
#[derive(Debug)]
pub struct Fetched {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Fetcher {
    /// A client with `timeout` for a whole fetch, `max_redirects` each checked like the
    /// first URL, and `max_bytes` per document. With `allow_private`, plain `http` to
    /// loopback is also allowed (a provider or client on the same host).
    pub fn new(
        timeout: Duration,
        max_redirects: usize,
        max_bytes: usize,
        allow_private: bool,
        extra_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Fetcher> {
        Ok(Fetcher {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls(extra_ca)?)),
            timeout,
            max_redirects,
            max_bytes,
            allow_private,
            allow_http_loopback: allow_private,
        })
    }

    /// Checks a URL as fetches do.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        check_fetch_url(url, self.allow_private, self.allow_http_loopback)
    }

    async fn resolve(&self, url: &Url) -> Result<Vec<SocketAddr>, String> {
        let port = url.port_or_known_default().ok_or_else(|| format!("`{url}` has no port"))?;
        match url.host() {
            Some(url::Host::Ipv4(ip)) => Ok(vec![SocketAddr::new(IpAddr::V4(ip), port)]),
            Some(url::Host::Ipv6(ip)) => Ok(vec![SocketAddr::new(IpAddr::V6(ip), port)]),
            Some(url::Host::Domain(d)) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((d, port))
                    .await
                    .map_err(|e| format!("cannot resolve `{d}`: {e}"))?
                    .filter(|a| self.allow_private || is_public(a.ip()))
                    .collect();
                if addrs.is_empty() {
                    return Err(format!("`{d}` resolves to no public address"));
                }
                Ok(addrs)
            }
            None => Err(format!("`{url}` has no host")),
        }
    }

    async fn once(
        &self,
        method: &http::Method,
        url: &Url,
        headers: &[(http::HeaderName, String)],
        body: &Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, Vec<u8>), String> {
        self.check(url)?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let mut last = String::from("no address");
        let mut tcp = None;
        for a in self.resolve(url).await? {
            match tokio::net::TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let tcp = tcp.ok_or_else(|| format!("cannot connect to `{host}`: {last}"))?;
        if url.scheme() == "https" {
            let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| format!("`{host}` is no TLS server name: {e}"))?;
            let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS with `{host}` failed: {e}"))?;
            self.exchange(hyper_util::rt::TokioIo::new(tls), method, url, headers, body).await
        } else {
            self.exchange(hyper_util::rt::TokioIo::new(tcp), method, url, headers, body).await
        }
    }

    async fn exchange<IO>(
        &self,
        io: IO,
        method: &http::Method,
        url: &Url,
        headers: &[(http::HeaderName, String)],
        body: &Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, Vec<u8>), String>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        use http_body_util::BodyExt as _;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP with `{url}` failed: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut target = url.path().to_owned();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(target)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, concat!("periscope/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let request = request
            .body(http_body_util::Full::new(body.clone()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response =
            sender.send_request(request).await.map_err(|e| format!("`{url}` failed: {}", error_chain(&e)))?;
        let (parts, mut incoming) = response.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(format!("the document is larger than {} bytes", self.max_bytes));
        }
        let mut out = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| format!("reading `{url}` failed: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > self.max_bytes {
                    return Err(format!("the document is larger than {} bytes", self.max_bytes));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok((parts.status, parts.headers, out))
    }

    /// Sends a request and follows redirects (GET only), all within the deadline.
    pub async fn request(
        &self,
        method: http::Method,
        url: &Url,
        headers: Vec<(http::HeaderName, String)>,
        body: Bytes,
    ) -> Result<Fetched, String> {
        let work = async {
            let mut url = url.clone();
            for _ in 0..=self.max_redirects {
                let (status, headers, out) = self.once(&method, &url, &headers, &body).await?;
                if status.is_redirection() && method == http::Method::GET {
                    let location = headers
                        .get(http::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| format!("`{url}` redirects nowhere"))?;
                    url = url.join(location).map_err(|e| format!("`{url}` redirects to a bad URL: {e}"))?;
                    continue;
                }
                return Ok(Fetched { status: status.as_u16(), body: out });
            }
            Err(format!("more than {} redirects", self.max_redirects))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("`{url}` did not answer within {} s", self.timeout.as_secs()))?
    }

    /// GETs a JSON document.
    pub async fn get_json(&self, url: &Url) -> Result<serde_json::Value, String> {
        let accept = vec![(http::header::ACCEPT, "application/json".to_owned())];
        let r = self.request(http::Method::GET, url, accept, Bytes::new()).await?;
        if !(200..300).contains(&r.status) {
            return Err(format!("`{url}` answered HTTP {}", r.status));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("`{url}` is not JSON: {e}"))
    }

    /// POSTs a form (with HTTP Basic credentials, when given).
    pub async fn post_form(
        &self,
        url: &Url,
        basic: Option<(&str, &str)>,
        form: &[(&str, &str)],
    ) -> Result<Fetched, String> {
        use base64::Engine as _;
        let body: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut headers = vec![
            (http::header::CONTENT_TYPE, "application/x-www-form-urlencoded".to_owned()),
            (http::header::ACCEPT, "application/json".to_owned()),
        ];
        if let Some((user, password)) = basic {
            let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let creds = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(user), enc(password)));
            headers.push((http::header::AUTHORIZATION, format!("Basic {creds}")));
        }
        self.request(http::Method::POST, url, headers, Bytes::from(body)).await
    }
}

/// The causes of an error, joined (reqwest's own message hides why a connection failed).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Client ID metadata documents, fetched and cached.
#[derive(Debug)]
pub struct Clients {
    fetcher: Fetcher,
    cache_for: Duration,
    cache: Mutex<HashMap<String, (Instant, ClientRecord)>>,
}

impl Clients {
    /// The fetcher for `settings`.
    pub fn new(settings: &ClientMetadataSettings) -> anyhow::Result<Clients> {
        Ok(Clients {
            fetcher: Fetcher::new(
                Duration::from_secs(settings.timeout_secs),
                settings.max_redirects,
                settings.max_bytes,
                settings.allow_private_addresses,
                settings.extra_ca_file.as_deref(),
            )?,
            cache_for: Duration::from_secs(settings.cache_secs),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The client a metadata document describes (from the cache while fresh).
    pub async fn from_document(&self, client_id: &str) -> Result<ClientRecord, ClientError> {
        if let Some((at, c)) = self.lock().get(client_id)
            && at.elapsed() < self.cache_for
        {
            return Ok(c.clone());
        }
        let url = Url::parse(client_id).map_err(|e| err("invalid_client", format!("client_id is not a URL: {e}")))?;
        if url.path() == "/" || url.path().is_empty() || url.fragment().is_some() {
            return Err(err("invalid_client", "a client_id URL needs a path and no fragment"));
        }
        if url.path().split('/').any(|s| s == "." || s == "..") {
            return Err(err("invalid_client", "a client_id URL has no dot segments"));
        }
        let doc = self.fetcher.get_json(&url).await.map_err(|e| err("invalid_client", e))?;
        let doc: MetadataDocument = serde_json::from_value(doc)
            .map_err(|e| err("invalid_client", format!("the client metadata document does not fit: {e}")))?;
        if doc.client_id != client_id {
            return Err(err(
                "invalid_client",
                format!("the metadata document names client_id `{}`, not its own URL", doc.client_id),
            ));
        }
        match doc.token_endpoint_auth_method.as_deref() {
            None | Some("none") => {}
            Some(m) => {
                return Err(err(
                    "invalid_client",
                    format!("token_endpoint_auth_method `{m}` is not supported for metadata documents; use none"),
                ));
            }
        }
        let registration = Registration {
            redirect_uris: doc.redirect_uris,
            client_name: doc.client_name.clone(),
            token_endpoint_auth_method: Some("none".into()),
            grant_types: doc.grant_types,
            response_types: doc.response_types,
            client_uri: doc.client_uri.clone(),
        };
        let host = url.host_str().unwrap_or_default().to_owned();
        let (name, redirect_uris, auth) =
            validate_registration(&registration).map_err(|e| err("invalid_client", e.description))?;
        let now = crate::time::now_ms();
        let record = ClientRecord {
            client_id: client_id.to_owned(),
            name: if doc.client_name.is_some() { name } else { host },
            redirect_uris,
            auth,
            secret_hash: None,
            client_uri: doc.client_uri,
            created_at_ms: now,
            last_used_ms: now,
            registered_from: "metadata document".into(),
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            let cache_for = self.cache_for;
            cache.retain(|_, (at, _)| at.elapsed() < cache_for);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(client_id.to_owned(), (Instant::now(), record.clone()));
        Ok(record)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, ClientRecord)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_redirects_match_on_any_port_and_others_exactly() {
        let reg = vec!["http://127.0.0.1/callback".to_owned(), "https://app.example.com/cb".to_owned()];
        assert!(redirect_matches(&reg, "http://127.0.0.1:53121/callback"));
        assert!(redirect_matches(&reg, "http://127.0.0.1/callback"));
        assert!(!redirect_matches(&reg, "http://127.0.0.1:53121/other"));
        assert!(!redirect_matches(&reg, "http://localhost:53121/callback"), "same host name");
        assert!(redirect_matches(&reg, "https://app.example.com/cb"));
        assert!(!redirect_matches(&reg, "https://app.example.com:444/cb"), "ports matter off loopback");
        assert!(!redirect_matches(&reg, "https://app.example.com/cb?x=1"));
        assert!(!redirect_matches(&reg, "https://app.example.com/cb/"));
    }

    #[test]
    fn redirect_uris_that_could_leak_a_code_are_refused() {
        for ok in [
            "https://claude.ai/api/mcp/auth_callback",
            "http://127.0.0.1:3334/cb",
            "http://[::1]/cb",
            "com.example.app:/cb",
        ] {
            assert!(check_redirect_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://evil.example.com/cb",
            "javascript:alert(1)",
            "data:text/html,x",
            "https://app.example.com/cb#frag",
            "not a url",
        ] {
            assert_eq!(check_redirect_uri(bad).unwrap_err().code, "invalid_redirect_uri", "{bad}");
        }
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        assert!(check_fetch_url(&Url::parse("https://169.254.169.254/latest").unwrap(), false, false).is_err());
        assert!(check_fetch_url(&Url::parse("http://example.com/x").unwrap(), false, false).is_err());
        assert!(check_fetch_url(&Url::parse("https://u:p@example.com/x").unwrap(), false, false).is_err());
        assert!(check_fetch_url(&Url::parse("https://example.com/x").unwrap(), false, false).is_ok());
    }

    #[test]
    fn registrations_are_bounded_and_checked() {
        let mut r = Registration {
            redirect_uris: vec!["http://127.0.0.1:9/cb".into()],
            client_name: Some("My\u{7}Client".into()),
            token_endpoint_auth_method: Some("none".into()),
            grant_types: Some(vec!["authorization_code".into(), "refresh_token".into()]),
            response_types: Some(vec!["code".into()]),
            client_uri: None,
        };
        let (name, _, auth) = validate_registration(&r).unwrap();
        assert_eq!((name.as_str(), auth), ("MyClient", ClientAuth::None));
        r.grant_types = Some(vec!["implicit".into()]);
        assert_eq!(validate_registration(&r).unwrap_err().code, "invalid_client_metadata");
        r.grant_types = None;
        r.redirect_uris = vec!["http://127.0.0.1/cb".into(); 11];
        assert_eq!(validate_registration(&r).unwrap_err().code, "invalid_redirect_uri");
        r.redirect_uris = vec![];
        assert_eq!(validate_registration(&r).unwrap_err().code, "invalid_redirect_uri");
    }
}
