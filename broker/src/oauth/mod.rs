//! The broker as an OAuth 2.1 authorization server for its own users, so that MCP
//! clients sign people in by themselves: a client that gets 401 from `/mcp` reads the
//! protected-resource metadata (RFC 9728), then this server's metadata (RFC 8414),
//! identifies itself (a client ID metadata document, or RFC 7591 registration), sends
//! the person's browser to the sign-in and consent pages, and exchanges the code (PKCE
//! S256 only) for a short-lived access token bound to this broker (RFC 8707) and a
//! refresh token that rotates (a replayed one revokes the grant).
//!
//! An access token stands for a person through one client: the broker turns it into a
//! [`Principal`] carrying the person's organization, role, group, pools and quotas, the
//! scopes they approved, and the client ([`crate::auth::Delegation`]); from there on
//! per-tool authorization, quotas (per person, under the organization's ceilings), the
//! audit trail and MCP session binding work as for API keys.
//!
//! # Tokens
//!
//! Access tokens are opaque random strings (`poa_` and 160 bits), kept by SHA-256 like
//! API keys, not signed JWTs: the broker is the only party that reads them, and a JWT
//! would need a lookup anyway for revocation to hold on the next call. Checking one is
//! a map lookup in memory ([`OAuth::authenticate`]): a token that cannot be valid (wrong
//! shape, unknown) is refused without a lock or the database, exactly like a key.
//!
//! # Layout
//!
//! - `config`: `[oauth]`.
//! - `store`: what is kept (users, clients, requests, codes, grants, tokens,
//!   consents, browser sessions), behind [`OAuthStore`]; `sqlite`: its SQLite
//!   implementation.
//! - `users`: users' validation and permissions (the keys' rules), argon2id.
//! - `clients`: client registration, client ID metadata documents (fetched with
//!   bounds, SSRF-guarded), redirect-URI matching.
//! - `endpoints`: the HTTP endpoints and the sign-in and consent flow.
//! - `pages`: the server-rendered HTML.
//! - `oidc`: sign-in delegated to an upstream OpenID Connect provider.
//! - `admin`: `/api/v1/users` (and what `periscope users` calls).

pub mod admin;
pub mod clients;
pub mod config;
pub mod endpoints;
pub mod oidc;
mod pages;
pub mod sqlite;
pub mod store;
pub mod users;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

pub use config::OAuthSettings;
pub use store::{OAuthStore, OAuthStoreError};

use crate::BrokerState;
use crate::auth::{AuthFailure, Delegation, Principal, Reach, Scope};
use crate::keys::{self, KeyStore};
use crate::time::now_ms;
use store::{Digest, GrantRecord, UserRecord};

/// Prefix of access tokens.
pub const ACCESS_PREFIX: &str = "poa_";
/// Prefix of refresh tokens.
pub const REFRESH_PREFIX: &str = "por_";
/// Prefix of authorization codes.
pub const CODE_PREFIX: &str = "poc_";
/// Prefix of client secrets.
pub const CLIENT_SECRET_PREFIX: &str = "pcs_";

/// Whether `token` has the shape of a token with `prefix` (what [`keys::new_secret`]
/// makes): anything else is refused before it is hashed.
pub fn plausible(token: &str, prefix: &str) -> bool {
    token.len() == prefix.len() + 32
        && token.starts_with(prefix)
        && token.bytes().skip(prefix.len()).all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A new random identifier `prefix` + 26 characters (like every other id).
pub fn new_id(prefix: &str) -> String {
    let key = periscope_protocol::KeyId::generate();
    format!("{prefix}{}", key.as_str().trim_start_matches(periscope_protocol::KeyId::PREFIX))
}

/// An access token in memory: what a call with it may do.
#[derive(Debug, Clone)]
struct AccessEntry {
    grant_id: String,
    user_id: String,
    client_id: String,
    client_name: String,
    scopes: Vec<Scope>,
    expires_at_ms: u64,
}

/// Users by id and by name.
#[derive(Debug, Default)]
pub struct Users {
    by_id: HashMap<String, Arc<UserRecord>>,
    by_name: HashMap<String, Arc<UserRecord>>,
}

impl Users {
    fn new(list: Vec<UserRecord>) -> Users {
        let mut u = Users::default();
        for r in list {
            let r = Arc::new(r);
            u.by_name.insert(r.name.clone(), Arc::clone(&r));
            u.by_id.insert(r.user_id.clone(), r);
        }
        u
    }

    /// A user by id.
    pub fn get(&self, id: &str) -> Option<&Arc<UserRecord>> {
        self.by_id.get(id)
    }

    /// A user by sign-in name.
    pub fn named(&self, name: &str) -> Option<&Arc<UserRecord>> {
        self.by_name.get(name)
    }

    /// A user linked to an upstream identity.
    pub fn linked(&self, external: &str) -> Option<&Arc<UserRecord>> {
        self.by_id.values().find(|u| u.external_id.as_deref() == Some(external))
    }

    /// Every user, by name.
    pub fn all(&self) -> Vec<Arc<UserRecord>> {
        let mut v: Vec<_> = self.by_name.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The authorization server's state.
#[derive(Debug)]
pub struct OAuth {
    /// `[oauth]`.
    pub settings: OAuthSettings,
    /// Where everything is kept.
    pub store: Arc<dyn OAuthStore>,
    /// Password hashing.
    pub passwords: users::Passwords,
    /// Live access tokens by hash.
    access: DashMap<Digest, Arc<AccessEntry>>,
    /// Each live grant's access token.
    grant_tokens: DashMap<String, Digest>,
    /// Users as last loaded.
    users: RwLock<Arc<Users>>,
    /// The key directory's generation when users were last loaded.
    users_generation: AtomicU64,
    /// Sign-in and registration rate limits.
    pub limits: endpoints::Limits,
    /// Fetches client ID metadata documents.
    pub clients: clients::Clients,
    /// The upstream OpenID provider, when configured.
    pub oidc: Option<oidc::Upstream>,
}

impl OAuth {
    /// Opens the authorization server's state over `store` and loads users and live
    /// access tokens.
    pub async fn open(
        settings: OAuthSettings,
        store: Arc<dyn OAuthStore>,
        keys: &KeyStore,
    ) -> Result<OAuth, anyhow::Error> {
        let passwords = users::Passwords::new(settings.password_memory_kib, settings.password_iterations)?;
        let limits = endpoints::Limits::new(&settings);
        let clients = clients::Clients::new(&settings.client_metadata)?;
        let oidc = settings.oidc.clone().map(oidc::Upstream::new).transpose()?;
        let oauth = OAuth {
            settings,
            store,
            passwords,
            access: DashMap::new(),
            grant_tokens: DashMap::new(),
            users: RwLock::new(Arc::default()),
            users_generation: AtomicU64::new(keys.generation()),
            limits,
            clients,
            oidc,
        };
        oauth.reload_users().await?;
        let now = now_ms();
        let users = oauth.users_now();
        for (access, grant) in oauth.store.live_access_tokens(now).await? {
            if users.get(&grant.user_id).is_some_and(|u| u.active()) {
                oauth.remember(access.token, &grant, access.scopes, access.expires_at_ms);
            }
        }
        Ok(oauth)
    }

    /// Users as last loaded.
    pub fn users_now(&self) -> Arc<Users> {
        match self.users.read() {
            Ok(u) => Arc::clone(&u),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Reloads users from the store, and forgets the tokens of users no longer active.
    pub async fn reload_users(&self) -> Result<Arc<Users>, OAuthStoreError> {
        let users = Arc::new(Users::new(self.store.users().await?));
        match self.users.write() {
            Ok(mut u) => *u = Arc::clone(&users),
            Err(p) => *p.into_inner() = Arc::clone(&users),
        }
        self.access.retain(|_, e| users.get(&e.user_id).is_some_and(|u| u.active()));
        self.grant_tokens.retain(|_, t| self.access.contains_key(t));
        Ok(users)
    }

    /// Users, reloaded first when the key directory (which user changes bump) moved.
    pub async fn fresh_users(&self, keys: &KeyStore) -> Result<Arc<Users>, AuthFailure> {
        keys.refresh().await.map_err(|e| {
            tracing::error!(error = %e, "cannot read the key store; refusing the call");
            AuthFailure::Unavailable
        })?;
        let generation = keys.generation();
        if self.users_generation.swap(generation, Ordering::AcqRel) == generation {
            return Ok(self.users_now());
        }
        self.reload_users().await.map_err(|e| {
            // The next call tries again.
            self.users_generation.store(u64::MAX, Ordering::Release);
            tracing::error!(error = %e, "cannot read users; refusing the call");
            AuthFailure::Unavailable
        })
    }

    fn remember(&self, token: Digest, grant: &GrantRecord, scopes: Vec<Scope>, expires_at_ms: u64) {
        if let Some((_, old)) = self.grant_tokens.remove(&grant.grant_id) {
            self.access.remove(&old);
        }
        self.access.insert(
            token,
            Arc::new(AccessEntry {
                grant_id: grant.grant_id.clone(),
                user_id: grant.user_id.clone(),
                client_id: grant.client_id.clone(),
                client_name: grant.client_name.clone(),
                scopes,
                expires_at_ms,
            }),
        );
        self.grant_tokens.insert(grant.grant_id.clone(), token);
    }

    /// Forgets a grant's access token (revoked).
    fn forget_grant(&self, grant_id: &str) {
        if let Some((_, t)) = self.grant_tokens.remove(grant_id) {
            self.access.remove(&t);
        }
    }

    /// Whether `token` looks like an access token (the middleware's dispatch).
    pub fn is_access_token(token: &str) -> bool {
        token.starts_with(ACCESS_PREFIX)
    }

    /// The caller an access token stands for. What cannot be a token, or is not a live
    /// one, is refused from memory alone; a live one is checked against the freshest
    /// user records (a user disabled by `periscope users disable` elsewhere fails on the
    /// next call).
    pub async fn authenticate(&self, state: &BrokerState, token: &str) -> Result<Principal, AuthFailure> {
        if !plausible(token, ACCESS_PREFIX) {
            return Err(AuthFailure::Unknown);
        }
        let digest = keys::hash(token);
        let entry = match self.access.get(&digest) {
            None => return Err(AuthFailure::Unknown),
            Some(e) => Arc::clone(&e),
        };
        if entry.expires_at_ms <= now_ms() {
            return Err(AuthFailure::Expired);
        }
        let users = self.fresh_users(&state.keys).await?;
        // A reload may just have dropped it.
        if !self.access.contains_key(&digest) {
            return Err(AuthFailure::Revoked);
        }
        let Some(user) = users.get(&entry.user_id).filter(|u| u.active()) else {
            return Err(AuthFailure::Revoked);
        };
        Ok(self.principal(state, user, &entry))
    }

    fn principal(&self, state: &BrokerState, user: &UserRecord, entry: &AccessEntry) -> Principal {
        Principal {
            key_id: user.user_id.clone(),
            name: user.name.clone(),
            role: user.role,
            scopes: user.scopes().iter().copied().filter(|s| entry.scopes.contains(s)).collect(),
            reach: Reach {
                org: user.org.clone(),
                group: user.group.clone(),
                pools: user.pools.as_ref().map(|p| p.iter().cloned().collect()),
            },
            quotas: state.config.callers.resolve(user.role, user.quotas.as_ref()),
            tenancy: Arc::clone(&state.keys.current().tenancy),
            via: Some(Arc::new(Delegation {
                client_id: entry.client_id.clone(),
                client_name: entry.client_name.clone(),
                grant_id: entry.grant_id.clone(),
            })),
        }
    }

    /// Whether a delegated principal still holds: its grant live and its user active
    /// (checked again after a long wait).
    pub async fn still_valid(&self, state: &BrokerState, principal: &Principal) -> bool {
        let Some(via) = &principal.via else { return false };
        // Its access token may have expired (and been purged) while the call waited:
        // the grant itself decides.
        if !self.grant_tokens.contains_key(&via.grant_id)
            && !matches!(self.store.grant(&via.grant_id).await, Ok(Some(g)) if g.revoked.is_none())
        {
            return false;
        }
        self.fresh_users(&state.keys)
            .await
            .ok()
            .and_then(|u| u.get(&principal.key_id).map(|u| u.active()))
            .unwrap_or(false)
    }

    /// Revokes a grant everywhere (store and memory).
    pub async fn revoke_grant(
        &self,
        grant_id: &str,
        reason: &str,
        audit: Option<crate::audit::AuditEntry>,
    ) -> Result<bool, OAuthStoreError> {
        self.forget_grant(grant_id);
        let revoked = self.store.revoke_grant(grant_id, reason, audit).await?;
        self.forget_grant(grant_id);
        Ok(revoked)
    }

    /// Housekeeping: drops expired tokens from memory and the store.
    pub async fn purge(&self) {
        let now = now_ms();
        self.access.retain(|_, e| e.expires_at_ms > now);
        self.grant_tokens.retain(|_, t| self.access.contains_key(t));
        self.limits.retain();
        if let Err(e) = self.store.purge(now).await {
            tracing::warn!(error = %e, "cannot purge expired OAuth records");
        }
    }

    /// Live access tokens in memory (for tests and `system_health`).
    pub fn live_tokens(&self) -> usize {
        self.access.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use store::*;

    /// A store that fails the test if anything reaches it.
    #[derive(Debug)]
    struct Untouchable;

    fn never<T: Send + 'static>() -> BoxFuture<'static, Result<T, OAuthStoreError>> {
        panic!("a refusal reached the store")
    }

    impl OAuthStore for Untouchable {
        fn users(&self) -> BoxFuture<'_, Result<Vec<UserRecord>, OAuthStoreError>> {
            never()
        }
        fn create_user(
            &self,
            _: UserRecord,
            _: crate::audit::AuditEntry,
        ) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn update_user(
            &self,
            _: UserRecord,
            _: Option<crate::audit::AuditEntry>,
        ) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn client(&self, _: &str) -> BoxFuture<'_, Result<Option<ClientRecord>, OAuthStoreError>> {
            never()
        }
        fn register_client(&self, _: ClientRecord, _: u32) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn touch_client(&self, _: &str, _: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn put_request(&self, _: PendingRequest) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn request(&self, _: &str, _: u64) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>> {
            never()
        }
        fn request_by_upstream_state(
            &self,
            _: Digest,
            _: u64,
        ) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>> {
            never()
        }
        fn delete_request(&self, _: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn put_session(&self, _: BrowserSession) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn session(&self, _: Digest, _: u64) -> BoxFuture<'_, Result<Option<BrowserSession>, OAuthStoreError>> {
            never()
        }
        fn delete_session(&self, _: Digest) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn consent(&self, _: &str, _: &str, _: &str) -> BoxFuture<'_, Result<Option<Vec<Scope>>, OAuthStoreError>> {
            never()
        }
        fn put_consent(&self, _: &str, _: &str, _: &str, _: Vec<Scope>) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn put_code(&self, _: CodeRecord) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn take_code(&self, _: Digest, _: u64) -> BoxFuture<'_, Result<Option<CodeRecord>, OAuthStoreError>> {
            never()
        }
        fn set_code_grant(&self, _: Digest, _: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
        fn create_grant(
            &self,
            _: GrantRecord,
            _: Digest,
            _: u64,
            _: AccessRecord,
            _: u32,
            _: crate::audit::AuditEntry,
        ) -> BoxFuture<'_, Result<Vec<String>, OAuthStoreError>> {
            never()
        }
        fn rotate_refresh(
            &self,
            _: Digest,
            _: Digest,
            _: u64,
            _: AccessRecord,
            _: u64,
        ) -> BoxFuture<'_, Result<Rotation, OAuthStoreError>> {
            never()
        }
        fn grant_of_refresh(&self, _: Digest) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>> {
            never()
        }
        fn revoke_grant(
            &self,
            _: &str,
            _: &str,
            _: Option<crate::audit::AuditEntry>,
        ) -> BoxFuture<'_, Result<bool, OAuthStoreError>> {
            never()
        }
        fn grant(&self, _: &str) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>> {
            never()
        }
        fn grants_of(&self, _: &str) -> BoxFuture<'_, Result<Vec<GrantRecord>, OAuthStoreError>> {
            never()
        }
        fn live_access_tokens(
            &self,
            _: u64,
        ) -> BoxFuture<'_, Result<Vec<(AccessRecord, GrantRecord)>, OAuthStoreError>> {
            never()
        }
        fn purge(&self, _: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
            never()
        }
    }

    #[test]
    fn a_refused_access_token_takes_no_lock_and_reaches_no_store() {
        let (state, key_db) = crate::mcp::tests::state_with_keys(crate::BrokerConfig::default());
        let settings = OAuthSettings { password_memory_kib: 8_192, password_iterations: 1, ..Default::default() };
        let oauth = Arc::new(OAuth {
            passwords: users::Passwords::new(8_192, 1).unwrap(),
            limits: endpoints::Limits::new(&settings),
            clients: clients::Clients::new(&settings.client_metadata).unwrap(),
            settings,
            store: Arc::new(Untouchable),
            access: DashMap::new(),
            grant_tokens: DashMap::new(),
            users: RwLock::new(Arc::default()),
            users_generation: AtomicU64::new(0),
            oidc: None,
        });
        let grant = |id: &str| GrantRecord {
            grant_id: id.into(),
            user_id: "usr_x".into(),
            client_id: "pcl_x".into(),
            client_name: "x".into(),
            scopes: Scope::DEFAULT.to_vec(),
            resource: "r".into(),
            created_at_ms: 0,
            max_expires_at_ms: u64::MAX,
            revoked: None,
        };
        let expired = keys::new_secret(ACCESS_PREFIX).unwrap();
        oauth.remember(keys::hash(&expired), &grant("grt_old"), Scope::DEFAULT.to_vec(), 1);
        // Every database access of the key directory goes through this lock.
        let held = key_db.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let (oauth, state) = (Arc::clone(&oauth), Arc::clone(&state));
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let outcomes = rt.block_on(async {
                    let mut out = Vec::new();
                    for token in [
                        "poa_00000000000000000000000000000000".to_owned(),
                        "poa_short".to_owned(),
                        format!("poa_{}", "x".repeat(10_000)),
                        "poa_WITH spaces and\u{1}controls000000".to_owned(),
                        expired.clone(),
                    ] {
                        out.push(oauth.authenticate(&state, &token).await.map(|p| p.key_id).unwrap_err());
                    }
                    out
                });
                let _ = tx.send(outcomes);
            })
        };
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        worker.join().unwrap();
        let outcomes = got.expect("refusals were decided without waiting for the key store's lock");
        use AuthFailure::{Expired, Unknown};
        assert_eq!(outcomes, [Unknown, Unknown, Unknown, Unknown, Expired]);
    }
}
