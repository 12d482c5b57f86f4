//! `[oauth]`: whether people sign in, token lifetimes, the bounds of sign-in, client
//! registration and client metadata documents, and the optional upstream OpenID
//! Connect provider.

use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::config::ConfigError;

/// The broker as an OAuth 2.1 authorization server for its own users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthSettings {
    /// Serve the authorization server (metadata, sign-in and consent pages, token,
    /// registration and revocation endpoints) and name it in the protected-resource
    /// metadata, so MCP clients sign people in by themselves. Off by default: a broker
    /// without users has no one to sign in.
    pub enabled: bool,
    /// Lifetime of an access token (default 3600, 60..=86400). Short: a client refreshes.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, renewed by each rotation (default 30 days).
    pub refresh_token_ttl_secs: u64,
    /// Longest a grant lives however often it is refreshed (default 90 days): then the
    /// person signs in again.
    pub grant_max_age_secs: u64,
    /// How long a person stays signed in to the broker's pages (default 8 hours); a
    /// client asking again in that time only shows the consent page.
    pub sign_in_session_secs: u64,
    /// Password sign-in attempts per minute for one user (default 5, burst as many).
    pub sign_in_per_minute_per_user: u32,
    /// Sign-in attempts per minute from one address (default 20; IPv6 per /64).
    pub sign_in_per_minute_per_address: u32,
    /// Dynamic client registrations per hour from one address (default 20).
    pub registrations_per_hour_per_address: u32,
    /// Registered clients kept (default 10000); beyond, the least recently used one
    /// that holds no live grant is forgotten.
    pub max_clients: u32,
    /// Live grants (one per client a person signed in with) per user (default 50);
    /// beyond, the oldest is revoked.
    pub max_grants_per_user: u32,
    /// Argon2id memory per password hash, KiB (default 19456, OWASP's minimum).
    pub password_memory_kib: u32,
    /// Argon2id passes (default 2).
    pub password_iterations: u32,
    /// How client ID metadata documents are fetched.
    pub client_metadata: ClientMetadataSettings,
    /// Sign-in delegated to the company's OpenID Connect provider.
    pub oidc: Option<OidcSettings>,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        OAuthSettings {
            enabled: false,
            access_token_ttl_secs: 3_600,
            refresh_token_ttl_secs: 30 * 86_400,
            grant_max_age_secs: 90 * 86_400,
            sign_in_session_secs: 8 * 3_600,
            sign_in_per_minute_per_user: 5,
            sign_in_per_minute_per_address: 20,
            registrations_per_hour_per_address: 20,
            max_clients: 10_000,
            max_grants_per_user: 50,
            password_memory_kib: 19_456,
            password_iterations: 2,
            client_metadata: ClientMetadataSettings::default(),
            oidc: None,
        }
    }
}

/// Bounds on fetching a client's metadata document (its `client_id` is an HTTPS URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientMetadataSettings {
    /// Whole fetch, redirects included (default 5 s).
    pub timeout_secs: u64,
    /// Largest document (default 16384 bytes).
    pub max_bytes: usize,
    /// Redirects followed, each to a checked address (default 3).
    pub max_redirects: usize,
    /// How long a fetched document is trusted (default 3600 s).
    pub cache_secs: u64,
    /// Fetch from loopback, private, link-local and other non-public addresses. Off by
    /// default: a client id must not make the broker probe its own network (SSRF).
    pub allow_private_addresses: bool,
    /// PEM file of extra certificate authorities trusted for these fetches (a company
    /// CA), beside the public web roots.
    pub extra_ca_file: Option<std::path::PathBuf>,
}

impl Default for ClientMetadataSettings {
    fn default() -> Self {
        ClientMetadataSettings {
            timeout_secs: 5,
            max_bytes: 16_384,
            max_redirects: 3,
            cache_secs: 3_600,
            allow_private_addresses: false,
            extra_ca_file: None,
        }
    }
}

/// An upstream OpenID Connect provider people sign in with (authorization code flow
/// with PKCE; the ID token is verified against the provider's published keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The provider's issuer URL (its `/.well-known/openid-configuration` is read).
    pub issuer: String,
    /// The broker's client id at the provider.
    pub client_id: String,
    /// The broker's client secret at the provider.
    pub client_secret: String,
    /// The button's label on the sign-in page (default "single sign-on").
    #[serde(default)]
    pub display_name: Option<String>,
    /// The claim that names the Periscope user (default `email`, which must then be
    /// verified: `email_verified` true).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Creates a user on first sign-in with this role (in `provision_org` and
    /// `provision_group`); absent, only people an administrator created may sign in.
    #[serde(default)]
    pub provision_role: Option<Role>,
    /// Organization of provisioned users (default `default`).
    #[serde(default)]
    pub provision_org: Option<String>,
    /// Group of provisioned users.
    #[serde(default)]
    pub provision_group: Option<String>,
    /// PEM file of extra certificate authorities for the provider.
    #[serde(default)]
    pub extra_ca_file: Option<std::path::PathBuf>,
    /// Allow an issuer on a loopback or private address (a provider inside the company
    /// network).
    #[serde(default)]
    pub allow_private_addresses: bool,
}

fn default_username_claim() -> String {
    "email".into()
}

impl OAuthSettings {
    /// Checks ranges and consistency; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid { key: format!("oauth.{key}"), message };
        for (key, v, min, max) in [
            ("access_token_ttl_secs", self.access_token_ttl_secs, 60, 86_400),
            ("refresh_token_ttl_secs", self.refresh_token_ttl_secs, 3_600, 365 * 86_400),
            ("grant_max_age_secs", self.grant_max_age_secs, 3_600, 365 * 86_400),
            ("sign_in_session_secs", self.sign_in_session_secs, 60, 30 * 86_400),
            ("sign_in_per_minute_per_user", u64::from(self.sign_in_per_minute_per_user), 1, 1_000),
            ("sign_in_per_minute_per_address", u64::from(self.sign_in_per_minute_per_address), 1, 100_000),
            ("registrations_per_hour_per_address", u64::from(self.registrations_per_hour_per_address), 1, 100_000),
            ("max_clients", u64::from(self.max_clients), 10, 10_000_000),
            ("max_grants_per_user", u64::from(self.max_grants_per_user), 1, 10_000),
            ("password_memory_kib", u64::from(self.password_memory_kib), 8_192, 1_048_576),
            ("password_iterations", u64::from(self.password_iterations), 1, 20),
            ("client_metadata.timeout_secs", self.client_metadata.timeout_secs, 1, 60),
            ("client_metadata.max_bytes", self.client_metadata.max_bytes as u64, 1_024, 1_048_576),
            ("client_metadata.max_redirects", self.client_metadata.max_redirects as u64, 0, 10),
            ("client_metadata.cache_secs", self.client_metadata.cache_secs, 0, 7 * 86_400),
        ] {
            if v < min || v > max {
                return Err(bad(key, format!("{v} is outside {min}..={max}")));
            }
        }
        if self.grant_max_age_secs < self.refresh_token_ttl_secs {
            return Err(bad("grant_max_age_secs", "must be at least refresh_token_ttl_secs".into()));
        }
        if let Some(o) = &self.oidc {
            let url = reqwest::Url::parse(&o.issuer)
                .map_err(|e| bad("oidc.issuer", format!("`{}` is not a URL: {e}", o.issuer)))?;
            let loopback = url.host_str().is_some_and(|h| h == "localhost" || h.starts_with("127.") || h == "[::1]");
            if url.scheme() != "https" && !(url.scheme() == "http" && loopback && o.allow_private_addresses) {
                return Err(bad("oidc.issuer", "must be an https:// URL".into()));
            }
            if o.client_id.trim().is_empty() || o.client_secret.is_empty() {
                return Err(bad("oidc.client_id", "client_id and client_secret are required".into()));
            }
            if o.username_claim.trim().is_empty() {
                return Err(bad("oidc.username_claim", "must name a claim".into()));
            }
            if o.provision_role == Some(Role::GroupAdmin) && o.provision_group.is_none() {
                return Err(bad("oidc.provision_group", "a group_admin needs a group".into()));
            }
        }
        Ok(())
    }
}

/// Sign-in needs the URL browsers and clients reach the broker at (the issuer, the
/// pages' and callbacks' addresses), over https unless it is on loopback: tokens and
/// passwords never cross a network in clear.
pub fn check_public_url(public_url: Option<&str>, listen: std::net::SocketAddr) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Invalid { key: "public_url".into(), message };
    let Some(url) = public_url else {
        if listen.ip().is_loopback() {
            return Ok(());
        }
        return Err(bad(
            "[oauth] is enabled: set public_url to the https:// URL browsers and MCP clients reach the broker at"
                .into(),
        ));
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(format!("`{url}` is not a URL: {e}")))?;
    let loopback = parsed.host_str().is_some_and(|h| {
        h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) || h == "[::1]"
    });
    if parsed.scheme() != "https" && !loopback {
        return Err(bad(format!(
            "`{url}`: with [oauth] enabled the broker must be reached over https:// (a TLS-terminating proxy in front \
             is fine), except on loopback"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_needs_an_https_public_url_off_loopback() {
        let lo: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(check_public_url(None, lo).is_ok());
        assert!(check_public_url(None, any).is_err());
        assert!(check_public_url(Some("https://periscope.example.com"), any).is_ok());
        assert!(check_public_url(Some("http://periscope.example.com"), any).is_err());
        assert!(check_public_url(Some("http://localhost:7070"), lo).is_ok());
        let mut s = OAuthSettings::default();
        assert!(s.validate().is_ok());
        s.access_token_ttl_secs = 10;
        assert!(s.validate().unwrap_err().to_string().contains("oauth.access_token_ttl_secs"));
    }
}
