//! What the authorization server keeps, behind one small trait ([`OAuthStore`]) so that
//! a cluster can keep it elsewhere (the single-node implementation is SQLite:
//! [`super::sqlite`]).
//!
//! Every secret (passwords, codes, tokens, client secrets, browser cookies, CSRF tokens)
//! is stored as a hash: a password as an argon2id PHC string, everything else, being
//! 160 random bits, as its SHA-256. The store never sees a secret in clear.
//!
//! Each operation that must be atomic is one method: taking a code
//! ([`OAuthStore::take_code`]), rotating a refresh token with reuse detection
//! ([`OAuthStore::rotate_refresh`]), revoking a grant with its tokens.

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::auth::{Role, Scope};
use crate::quota::CallerQuotaOverrides;

/// A SHA-256 digest of a random secret.
pub type Digest = [u8; 32];

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OAuthStoreError {
    /// The backend refused or is unreachable.
    #[error("oauth store: {0}")]
    Backend(String),
    /// A name or id is taken.
    #[error("{0}")]
    Conflict(String),
    /// No such record.
    #[error("{0}")]
    NotFound(String),
}

impl From<rusqlite::Error> for OAuthStoreError {
    fn from(e: rusqlite::Error) -> Self {
        OAuthStoreError::Backend(e.to_string())
    }
}

/// A person who signs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// `usr_…`: charged for quotas, named in the audit trail.
    pub user_id: String,
    /// The sign-in name (unique on the broker).
    pub name: String,
    /// The organization.
    pub org: String,
    /// The role, as for keys.
    pub role: Role,
    /// The group (a group admin's group; a developer's reach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only these pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<String>>,
    /// Quota overrides, as for keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<CallerQuotaOverrides>,
    /// The argon2id hash (absent: signs in only through the OpenID provider).
    #[serde(skip)]
    pub password_hash: Option<String>,
    /// `issuer|subject` at the upstream OpenID provider, once linked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// When it was disabled: it signs in no more and its tokens stop working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at_ms: Option<u64>,
    /// Who disabled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_by: Option<String>,
}

impl UserRecord {
    /// Whether the user may sign in and use tokens.
    pub fn active(&self) -> bool {
        self.disabled_at_ms.is_none()
    }

    /// The scopes the user's role grants.
    pub fn scopes(&self) -> &'static [Scope] {
        self.role.scopes()
    }
}

/// How a client proves itself at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A public client (PKCE is its only proof).
    None,
    /// `client_secret_basic`.
    ClientSecretBasic,
    /// `client_secret_post`.
    ClientSecretPost,
}

impl ClientAuth {
    /// The RFC 7591 name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
        }
    }

    /// Parses an RFC 7591 name.
    pub fn parse(s: &str) -> Option<ClientAuth> {
        [ClientAuth::None, ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// A client registered through RFC 7591.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// `pcl_…`.
    pub client_id: String,
    /// What it calls itself (shown on the consent page as the client's claim).
    pub name: String,
    /// Exact redirect URIs (loopback ones match on any port).
    pub redirect_uris: Vec<String>,
    /// How it authenticates at the token endpoint.
    pub auth: ClientAuth,
    /// The secret's hash, for confidential clients.
    #[serde(skip)]
    pub secret_hash: Option<Digest>,
    /// Its home page, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_uri: Option<String>,
    /// When it registered (Unix ms).
    pub created_at_ms: u64,
    /// When a person last authorized it (Unix ms): the least recently used go first.
    pub last_used_ms: u64,
    /// The address it registered from.
    pub registered_from: String,
}

/// An authorization request between the client's redirect and the person's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// `areq_…`, carried by the forms.
    pub request_id: String,
    /// The hash of the browser cookie the request is bound to (CSRF: a form posted
    /// from another browser does not match).
    pub browser: Digest,
    /// The hash of the token the forms carry.
    pub csrf: Digest,
    /// The client.
    pub client_id: String,
    /// Its name as shown.
    pub client_name: String,
    /// Where the answer goes (validated against the client).
    pub redirect_uri: String,
    /// The client's `state`, returned as is.
    pub state: Option<String>,
    /// The PKCE S256 challenge.
    pub code_challenge: String,
    /// Requested scopes, known and ordered.
    pub scopes: Vec<Scope>,
    /// The resource the token is for (RFC 8707).
    pub resource: String,
    /// When it stops being usable (Unix ms).
    pub expires_at_ms: u64,
    /// OpenID sign-in in progress: the `state` sent upstream (hash), PKCE verifier and
    /// nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamAttempt>,
}

/// A sign-in at the upstream OpenID provider on behalf of a pending request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamAttempt {
    /// Hash of the `state` sent upstream.
    pub state: Digest,
    /// The PKCE verifier for the upstream code.
    pub verifier: String,
    /// The nonce the ID token must carry.
    pub nonce: String,
}

/// An authorization code: one use, two minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeRecord {
    /// Hash of the code.
    pub code: Digest,
    /// The client it was issued to.
    pub client_id: String,
    /// The redirect URI of the request (the token request must repeat it).
    pub redirect_uri: String,
    /// The PKCE S256 challenge.
    pub code_challenge: String,
    /// The person.
    pub user_id: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// The resource.
    pub resource: String,
    /// Expiry (Unix ms).
    pub expires_at_ms: u64,
    /// The grant it was exchanged for; a second exchange revokes it.
    pub grant_id: Option<String>,
}

/// A grant: what one person allowed one client, with the refresh tokens and access
/// token issued for it (a refresh-token family).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// `grt_…`.
    pub grant_id: String,
    /// The person.
    pub user_id: String,
    /// The client.
    pub client_id: String,
    /// Its name when granted.
    pub client_name: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// The resource (RFC 8707).
    pub resource: String,
    /// When it was granted (Unix ms).
    pub created_at_ms: u64,
    /// It can be refreshed until then, at the latest.
    pub max_expires_at_ms: u64,
    /// When it was revoked, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<(u64, String)>,
}

/// An access token as kept (by hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// Hash of the token.
    pub token: Digest,
    /// Its grant.
    pub grant_id: String,
    /// Scopes (the grant's, or fewer after a narrowing refresh).
    pub scopes: Vec<Scope>,
    /// Expiry (Unix ms).
    pub expires_at_ms: u64,
}

/// What rotating a refresh token found.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// The token was current: it is now superseded by the new one.
    Rotated(GrantRecord),
    /// The token had already been rotated: someone replayed it. The grant is revoked.
    Reused(GrantRecord),
    /// Unknown, expired, or its grant is revoked.
    Invalid,
}

/// A person signed in to the broker's pages (a browser cookie).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrowserSession {
    /// Hash of the cookie.
    pub cookie: Digest,
    /// The person.
    pub user_id: String,
    /// `password` or `oidc`.
    pub method: String,
    /// Expiry (Unix ms).
    pub expires_at_ms: u64,
}

/// The authorization server's storage. Implementations: [`super::sqlite::SqliteOAuthStore`].
pub trait OAuthStore: Send + Sync + std::fmt::Debug {
    /// Every user (the broker keeps them in memory, reloading when they change).
    fn users(&self) -> BoxFuture<'_, Result<Vec<UserRecord>, OAuthStoreError>>;
    /// Adds a user (its name must be free); writes `audit` with it.
    fn create_user(
        &self,
        user: UserRecord,
        audit: crate::audit::AuditEntry,
    ) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
    /// Replaces a user's record (role, group, pools, password, link, disabled); when it
    /// becomes disabled its grants are revoked in the same transaction.
    fn update_user(
        &self,
        user: UserRecord,
        audit: Option<crate::audit::AuditEntry>,
    ) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// A registered client.
    fn client(&self, client_id: &str) -> BoxFuture<'_, Result<Option<ClientRecord>, OAuthStoreError>>;
    /// Registers a client; beyond `max_clients`, forgets the least recently used one
    /// without a live grant.
    fn register_client(&self, client: ClientRecord, max_clients: u32) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
    /// Notes that a person authorized the client now.
    fn touch_client(&self, client_id: &str, at_ms: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// Keeps a pending authorization request.
    fn put_request(&self, request: PendingRequest) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
    /// A pending request, if not expired.
    fn request(&self, request_id: &str, now_ms: u64) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>>;
    /// The pending request an upstream sign-in is for, by the hash of its `state`.
    fn request_by_upstream_state(
        &self,
        state: Digest,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>>;
    /// Forgets a request (decided, or abandoned).
    fn delete_request(&self, request_id: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// Keeps a browser session.
    fn put_session(&self, session: BrowserSession) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
    /// A browser session, if not expired.
    fn session(&self, cookie: Digest, now_ms: u64) -> BoxFuture<'_, Result<Option<BrowserSession>, OAuthStoreError>>;
    /// Ends a browser session.
    fn delete_session(&self, cookie: Digest) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// The scopes a person already approved for a client (and redirect URI).
    fn consent(
        &self,
        user_id: &str,
        client_id: &str,
        redirect_uri: &str,
    ) -> BoxFuture<'_, Result<Option<Vec<Scope>>, OAuthStoreError>>;
    /// Remembers what a person approved.
    fn put_consent(
        &self,
        user_id: &str,
        client_id: &str,
        redirect_uri: &str,
        scopes: Vec<Scope>,
    ) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// Keeps a new authorization code.
    fn put_code(&self, code: CodeRecord) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
    /// Takes a code once: the first call gets it (with `grant_id` unset); later calls get
    /// it with the grant it was exchanged for, which the caller revokes. Expired or
    /// unknown: `None`.
    fn take_code(&self, code: Digest, now_ms: u64) -> BoxFuture<'_, Result<Option<CodeRecord>, OAuthStoreError>>;
    /// Records the grant a code was exchanged for.
    fn set_code_grant(&self, code: Digest, grant_id: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>>;

    /// Creates a grant with its first refresh and access tokens; beyond
    /// `max_per_user` live grants of the user, revokes the oldest. Returns the grants
    /// revoked to make room.
    fn create_grant(
        &self,
        grant: GrantRecord,
        refresh: Digest,
        refresh_expires_at_ms: u64,
        access: AccessRecord,
        max_per_user: u32,
        audit: crate::audit::AuditEntry,
    ) -> BoxFuture<'_, Result<Vec<String>, OAuthStoreError>>;
    /// Rotates a refresh token: when `old` is the grant's current token (not expired),
    /// it is superseded by `new` (expiring at `new_expires_at_ms`) and the grant's access
    /// token replaced by `access`, atomically. A superseded token presented again
    /// revokes the grant (reuse detection).
    fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        new_expires_at_ms: u64,
        access: AccessRecord,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Rotation, OAuthStoreError>>;
    /// The grant a refresh token belongs to, current or superseded.
    fn grant_of_refresh(&self, refresh: Digest) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>>;
    /// Revokes a grant with all its tokens; writes `audit`. Returns false when it was
    /// already revoked or does not exist.
    fn revoke_grant(
        &self,
        grant_id: &str,
        reason: &str,
        audit: Option<crate::audit::AuditEntry>,
    ) -> BoxFuture<'_, Result<bool, OAuthStoreError>>;
    /// A grant.
    fn grant(&self, grant_id: &str) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>>;
    /// The live grants of a user.
    fn grants_of(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<GrantRecord>, OAuthStoreError>>;
    /// Every access token not expired at `now_ms` of a live grant (loaded at start).
    fn live_access_tokens(
        &self,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Vec<(AccessRecord, GrantRecord)>, OAuthStoreError>>;
    /// Deletes what expired before `now_ms`: requests, sessions, codes, access and
    /// refresh tokens, grants past their age.
    fn purge(&self, now_ms: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>>;
}
