//! The key directory: API keys and agent keys, organizations, groups, and which group
//! each pool belongs to, kept in the store's database and shared by the broker and the
//! `periscope keys` command (which may run against the same data directory while the
//! broker serves).
//!
//! # Keys
//!
//! A key is a random secret (`psk_…` for API keys, `pak_…` for agent keys; 160 bits)
//! shown once, when it is created. The database keeps its SHA-256 (enough for
//! high-entropy secrets: there is nothing to brute-force), a public id (`key_…`),
//! a name, its organization, a role, optional narrower scopes, an optional pool
//! restriction, an optional group, optional quota overrides, who created it and when,
//! an optional expiry, and when and by whom it was revoked. Keys from the
//! configuration file (`[[api_keys]]`, `[[agent_keys]]`) are hashed at start and
//! looked up the same way; they cannot be revoked here (the file is their source).
//!
//! # Freshness
//!
//! Every check reads the in-memory [`Directory`]. A key it holds active is checked
//! again after asking SQLite whether anything changed: `PRAGMA data_version` on the
//! directory's own connection (a few microseconds, no I/O) tells whether any other
//! connection committed; only then is the `auth_epoch` counter read, and only when that
//! moved (every key, group or pool change bumps it in the same transaction) is the
//! directory reloaded. So a key revoked by `periscope keys revoke` in another process
//! fails on the broker's very next call, and the common case costs one pragma. A token
//! the directory does not know, or holds revoked or expired, is refused from memory
//! alone, without the lock or the database: refusals stay cheap under a flood, and a key
//! created by another process works once the broker next looks (its housekeeping does
//! every quarter second).
//!
//! # Tenancy
//!
//! Organizations own groups, groups own pools: [`Tenancy`]. Every organization has a
//! group `default`, which owns every pool not assigned elsewhere. A self-hosted broker
//! has one organization, `default`. Who may do what to keys, groups and pools is decided
//! here ([`check_create`], [`visible_key`], [`check_assign`]), next to the data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::sync::watch;

pub use crate::access::{
    DEFAULT_GROUP, DEFAULT_ORG, MAX_KEY_NAME, MAX_ORG_NAME, Tenancy, plausible_secret, valid_name,
};
use crate::access::{Reach, Role, Scope};
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::{AuthFailure, Principal};
use crate::backend::{BackendError, KeyBackend, KeyRefusal, KeyRow, KeyRows};
use crate::config::{AgentKeyConfig, ApiKeyConfig};
use crate::error::{ApiError, ErrorCode};
use crate::quota::{CallerQuotaOverrides, CallerSettings};
use crate::store::StoreError;
use crate::time::now_ms;

/// A key a directory holds active, with the tenancy it was read with.
type Found = (Arc<KeyRecord>, Arc<Tenancy>);

/// Longest lifetime a key may be given.
pub const MAX_KEY_LIFETIME_MS: u64 = 10 * 366 * 86_400_000;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key directory's backend failed.
    #[error("key store: {0}")]
    Backend(#[from] BackendError),
    /// An argument is wrong; `field` names it.
    #[error("`{field}`: {message}")]
    Invalid {
        /// The argument.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No such key, group or organization (or not one the caller may see).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The operating system gave no randomness; no key is made without it.
    #[error("no secure randomness available to generate a key")]
    Randomness,
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        match e {
            KeyError::Invalid { field, message } => {
                ApiError::invalid(format!("{field}: {message}")).with_details(serde_json::json!({ "field": field }))
            }
            KeyError::NotFound(m) => ApiError::not_found(m),
            KeyError::Forbidden(m) => ApiError::new(ErrorCode::InsufficientScope, m)
                .with_details(serde_json::json!({ "required_scope": Scope::Admin.as_str() })),
            other => {
                tracing::error!(error = %other, "key store failure");
                ApiError::new(ErrorCode::Internal, "the key store failed; see the broker's log")
            }
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> KeyError {
    KeyError::Invalid { field: field.into(), message: message.into() }
}

/// API key or agent key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// For REST and MCP callers.
    Api,
    /// For agents registering into pools.
    Agent,
}

impl KeyKind {
    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyKind::Api => "api",
            KeyKind::Agent => "agent",
        }
    }

    fn prefix(&self) -> &'static str {
        match self {
            KeyKind::Api => "psk_",
            KeyKind::Agent => "pak_",
        }
    }
}

/// Where a key is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The key store (created by `periscope keys`, the API, or the bootstrap).
    Store,
    /// The configuration file.
    Config,
}

/// A key as the directory knows it. Never holds the secret.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRecord {
    /// Public id (`key_…`).
    pub key_id: String,
    /// API or agent key.
    pub kind: KeyKind,
    /// Who or what uses it.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// API keys: the role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The group it belongs to (a group admin's group; a developer's reach).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// API keys: narrower scopes than the role's (absent: the role's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<Scope>>,
    /// The pools it is restricted to (absent: no restriction beyond org and group; for
    /// agent keys `*` means any pool of the organization).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<String>>,
    /// Quota overrides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quotas: Option<CallerQuotaOverrides>,
    /// The first characters of the secret, to recognize it.
    pub hint: String,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// When it stops working (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// When it was revoked (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// Who revoked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    /// Where it is defined.
    pub source: KeySource,
    /// The key that minted this one through the API. Revoking or expiring that key
    /// ends this one too (and everything this one minted): see [`KeyRecord::status`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by_key: Option<String>,
    /// Why the key stopped working with a key it descends from (revoked, expired, gone),
    /// when it did; worked out when the directory loads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    /// The earliest expiry of the key and the keys it descends from.
    #[serde(skip)]
    effective_expires_at_ms: Option<u64>,
    /// Whether a key it descends from was revoked or no longer exists.
    #[serde(skip)]
    ancestor_revoked: bool,
    #[serde(skip)]
    hash: [u8; 32],
}

/// Whether a key works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// It authenticates.
    Active,
    /// It was revoked.
    Revoked,
    /// It passed its expiry.
    Expired,
}

impl KeyRecord {
    /// Whether the key works at `now_ms`.
    pub fn status(&self, now_ms: u64) -> KeyStatus {
        if self.revoked_at_ms.is_some() || self.ancestor_revoked {
            KeyStatus::Revoked
        } else if self.effective_expires_at_ms.or(self.expires_at_ms).is_some_and(|t| t <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// When the key stops working by time: its own expiry or an earlier one of a key it
    /// descends from.
    pub fn effective_expires_at_ms(&self) -> Option<u64> {
        self.effective_expires_at_ms.or(self.expires_at_ms)
    }

    /// The record with its status, as listings show it.
    pub fn view(&self, now_ms: u64) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["status"] = serde_json::to_value(self.status(now_ms)).unwrap_or_default();
        if self.effective_expires_at_ms() != self.expires_at_ms {
            // It expires earlier, with the key that minted it.
            v["effective_expires_at_ms"] = serde_json::json!(self.effective_expires_at_ms());
        }
        v
    }

    /// The effective scopes of an API key.
    pub fn effective_scopes(&self) -> Vec<Scope> {
        let role = self.role.unwrap_or(Role::Developer);
        match &self.scopes {
            Some(s) => role.scopes().iter().copied().filter(|r| s.contains(r)).collect(),
            None => role.scopes().to_vec(),
        }
    }

    /// An agent key's permission to register into `pool`.
    pub fn allows_pool(&self, pool: &str) -> bool {
        self.pools.as_ref().is_none_or(|p| p.iter().any(|x| x == "*" || x == pool))
    }
}

/// A key just created: the only time its secret exists outside its holder.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedKey {
    /// The secret; shown once, stored nowhere.
    pub secret: String,
    /// The record.
    pub key: KeyRecord,
}

/// What an agent key lets an agent do.
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    /// The key's id.
    pub key_id: String,
    /// The organization the agent joins.
    pub org: String,
    /// Pools it may register into (`*`: any).
    pub pools: Option<Vec<String>>,
}

impl AgentCredentials {
    /// Whether the key lets an agent register into `pool`.
    pub fn allows_pool(&self, pool: &str) -> bool {
        self.pools.as_ref().is_none_or(|p| p.iter().any(|x| x == "*" || x == pool))
    }
}

/// A consistent snapshot of keys and tenancy.
#[derive(Debug, Default)]
pub struct Directory {
    by_hash: HashMap<[u8; 32], Arc<KeyRecord>>,
    by_id: BTreeMap<String, Arc<KeyRecord>>,
    /// Organizations, groups and pool assignments.
    pub tenancy: Arc<Tenancy>,
}

impl Directory {
    /// A key by id.
    pub fn key(&self, key_id: &str) -> Option<&Arc<KeyRecord>> {
        self.by_id.get(key_id)
    }

    /// Every key, store and configuration, by id.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.by_id.values()
    }
}

/// The request to create a key.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// API or agent key.
    pub kind: KeyKind,
    /// Who or what uses it.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// API keys: the role (default `developer`).
    pub role: Option<Role>,
    /// The group (required for `group_admin`).
    pub group: Option<String>,
    /// API keys: narrower scopes.
    pub scopes: Option<Vec<Scope>>,
    /// A pool restriction (required for agent keys; `*` for any pool).
    pub pools: Option<Vec<String>>,
    /// Quota overrides (API keys).
    pub quotas: Option<CallerQuotaOverrides>,
    /// When it stops working (Unix ms).
    pub expires_at_ms: Option<u64>,
}

/// The key directory: the last [`Directory`] read from its [`KeyBackend`], re-read
/// whenever the backend's epoch moved.
pub struct KeyStore {
    backend: Arc<dyn KeyBackend>,
    /// The epoch the current directory was read at (held while reloading, so concurrent
    /// checks reload once).
    loaded: tokio::sync::Mutex<i64>,
    current: RwLock<Arc<Directory>>,
    config_keys: Vec<Arc<KeyRecord>>,
    callers: CallerSettings,
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// SHA-256 of a secret.
pub(crate) fn hash(secret: &str) -> [u8; 32] {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new secret: `prefix` and 32 base32 characters (160 random bits).
pub fn new_secret(prefix: &str) -> Result<String, KeyError> {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|_| KeyError::Randomness)?;
    let mut out = String::with_capacity(prefix.len() + 32);
    out.push_str(prefix);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    Ok(out)
}

fn check_name(field: &str, s: &str, max: usize) -> Result<(), KeyError> {
    if valid_name(s, max) {
        Ok(())
    } else {
        Err(invalid(field, format!("`{}` must be 1 to {max} characters from A-Z a-z 0-9 . _ : -", short(s))))
    }
}

fn short(s: &str) -> &str {
    periscope_protocol::value::truncate_chars(s, 80)
}

fn json_opt<T: Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

/// A JSON column: absent is `None`; present but undecodable is an error (the caller
/// fails closed).
fn decode<T: serde::de::DeserializeOwned>(raw: Option<String>) -> Result<Option<T>, serde_json::Error> {
    raw.map(|s| serde_json::from_str(&s)).transpose()
}

/// Longest chain of minting followed; deeper (or circular) chains end the key.
const MAX_MINT_DEPTH: usize = 64;

/// Works out, for every stored key, what it inherits from the keys it descends from:
/// the earliest expiry, and whether one of them was revoked or no longer exists (then
/// the key is revoked too: a key never outlives the key that minted it).
fn inherit(records: &mut BTreeMap<String, KeyRecord>, config: &BTreeMap<&str, &KeyRecord>) {
    let mut inherited: Vec<(String, Option<u64>, Option<String>)> = Vec::new();
    for (id, record) in records.iter() {
        let mut expiry = record.expires_at_ms;
        let mut ended = None;
        let mut parent = record.created_by_key.clone();
        let mut depth = 0;
        while let Some(p) = parent {
            depth += 1;
            let found = records.get(&p).or_else(|| config.get(p.as_str()).copied());
            let Some(up) = found.filter(|_| depth <= MAX_MINT_DEPTH) else {
                ended = Some(format!("the key that minted it (`{p}`) no longer exists"));
                break;
            };
            if let Some(t) = up.expires_at_ms {
                expiry = Some(expiry.map_or(t, |e| e.min(t)));
            }
            if up.revoked_at_ms.is_some() {
                ended = Some(format!("revoked with `{}` ({p}), the key that minted it", up.name));
                break;
            }
            parent = up.created_by_key.clone();
        }
        inherited.push((id.clone(), expiry, ended));
    }
    for (id, expiry, ended) in inherited {
        if let Some(r) = records.get_mut(&id) {
            r.effective_expires_at_ms = expiry;
            r.ancestor_revoked = ended.is_some();
            r.ended_by = ended;
        }
    }
}

/// The directory from what the backend holds and the configuration file's keys.
fn build(rows: KeyRows, config_keys: &[Arc<KeyRecord>]) -> Directory {
    let mut tenancy = Tenancy::default();
    for org in &rows.orgs {
        tenancy.add_org(org);
    }
    for (org, group) in &rows.groups {
        tenancy.add_group(org, group);
    }
    for (org, pool, group) in &rows.pools {
        tenancy.assign(org, pool, group);
    }
    let mut records: BTreeMap<String, KeyRecord> = BTreeMap::new();
    for row in rows.keys {
        let id = row.id.clone();
        let Some(hash) = unhex(&row.hash) else {
            tracing::warn!(key = %id, "skipping a stored key with a malformed hash");
            continue;
        };
        let kind = if row.kind == "agent" { KeyKind::Agent } else { KeyKind::Api };
        let role = row.role.as_deref().and_then(Role::parse);
        if kind == KeyKind::Api && role.is_none() {
            tracing::warn!(key = %id, "skipping a stored API key without a known role");
            continue;
        }
        // A restriction that does not decode is no restriction we can apply: the key is
        // left out (it does not authenticate) rather than given the role's reach.
        let (Ok(scopes), Ok(pools), Ok(quotas)) = (decode(row.scopes), decode(row.pools), decode(row.quotas)) else {
            tracing::error!(key = %id, "skipping a stored key whose scopes, pools or quotas do not decode");
            continue;
        };
        records.insert(
            id.clone(),
            KeyRecord {
                key_id: id,
                kind,
                name: row.name,
                org: row.org,
                role,
                group: row.group,
                scopes,
                pools,
                quotas,
                hint: row.hint,
                created_at_ms: row.created_at_ms,
                created_by: row.created_by,
                expires_at_ms: row.expires_at_ms,
                revoked_at_ms: row.revoked_at_ms,
                revoked_by: row.revoked_by,
                source: KeySource::Store,
                created_by_key: row.created_by_key,
                ended_by: None,
                effective_expires_at_ms: None,
                ancestor_revoked: false,
                hash,
            },
        );
    }
    let config: BTreeMap<&str, &KeyRecord> = config_keys.iter().map(|k| (k.key_id.as_str(), &**k)).collect();
    inherit(&mut records, &config);
    let mut dir = Directory::default();
    for (id, record) in records {
        let record = Arc::new(record);
        dir.by_hash.insert(record.hash, Arc::clone(&record));
        dir.by_id.insert(id, record);
    }
    for k in config_keys {
        dir.by_hash.insert(k.hash, Arc::clone(k));
        dir.by_id.insert(k.key_id.clone(), Arc::clone(k));
    }
    dir.tenancy = Arc::new(tenancy);
    dir
}

/// The records of the configuration file's keys (ids `key_config_<n>` and
/// `key_config_agent_<n>`, stable while the file keeps its order).
fn config_records(api: &[ApiKeyConfig], agent: &[AgentKeyConfig]) -> Vec<Arc<KeyRecord>> {
    let mut out = Vec::new();
    for (i, k) in api.iter().enumerate() {
        out.push(Arc::new(KeyRecord {
            key_id: format!("key_config_{i}"),
            kind: KeyKind::Api,
            name: k.name.clone(),
            org: k.org.clone().unwrap_or_else(|| DEFAULT_ORG.into()),
            role: Some(k.role_or_default()),
            group: k.group.clone(),
            scopes: k.scopes.as_ref().map(|s| s.iter().filter_map(|n| Scope::parse(n)).collect()),
            pools: k.pools.clone(),
            quotas: k.quotas,
            hint: "(configuration file)".into(),
            created_at_ms: 0,
            created_by: "configuration file".into(),
            expires_at_ms: None,
            revoked_at_ms: None,
            revoked_by: None,
            source: KeySource::Config,
            created_by_key: None,
            ended_by: None,
            effective_expires_at_ms: None,
            ancestor_revoked: false,
            hash: hash(&k.key),
        }));
    }
    for (i, k) in agent.iter().enumerate() {
        out.push(Arc::new(KeyRecord {
            key_id: format!("key_config_agent_{i}"),
            kind: KeyKind::Agent,
            name: format!("agent key {i} (configuration file)"),
            org: k.org.clone().unwrap_or_else(|| DEFAULT_ORG.into()),
            role: None,
            group: None,
            scopes: None,
            pools: Some(k.pools.clone()),
            quotas: None,
            hint: "(configuration file)".into(),
            created_at_ms: 0,
            created_by: "configuration file".into(),
            expires_at_ms: None,
            revoked_at_ms: None,
            revoked_by: None,
            source: KeySource::Config,
            created_by_key: None,
            ended_by: None,
            effective_expires_at_ms: None,
            ancestor_revoked: false,
            hash: hash(&k.key),
        }));
    }
    out
}

fn refused(r: KeyRefusal) -> KeyError {
    match r {
        KeyRefusal::NoOrg(org) => KeyError::NotFound(format!("no organization `{org}`")),
        KeyRefusal::NoGroup(g) => invalid("group", format!("no group `{g}`; create it first")),
        KeyRefusal::GroupExists(g) => invalid("name", format!("group `{g}` already exists")),
    }
}

impl KeyStore {
    /// The directory `backend` keeps, for a broker with these configuration keys and
    /// caller quotas (creating the `default` organization and the organizations and
    /// groups the configuration keys name).
    pub async fn open(
        backend: Arc<dyn KeyBackend>,
        api_keys: &[ApiKeyConfig],
        agent_keys: &[AgentKeyConfig],
        callers: CallerSettings,
    ) -> Result<KeyStore, KeyError> {
        let config_keys = config_records(api_keys, agent_keys);
        let orgs = config_keys.iter().map(|k| (k.org.clone(), k.group.clone())).collect();
        backend.ensure(orgs).await?;
        let rows = backend.load().await?;
        let epoch = rows.epoch;
        let directory = build(rows, &config_keys);
        Ok(KeyStore {
            backend,
            loaded: tokio::sync::Mutex::new(epoch),
            current: RwLock::new(Arc::new(directory)),
            config_keys,
            callers,
            generation: watch::channel(0).0,
        })
    }

    /// The directory of the database in `dir`, for the command line (no configuration
    /// keys).
    pub async fn open_cli(dir: &Path) -> Result<KeyStore, KeyError> {
        let backend = crate::backend::local::SqliteKeys::open(dir)?;
        Self::open(Arc::new(backend), &[], &[], CallerSettings::default()).await
    }

    /// Where the directory is kept.
    pub fn backend(&self) -> &Arc<dyn KeyBackend> {
        &self.backend
    }

    /// The last directory loaded, without checking the backend (for decisions where a
    /// second of staleness is harmless, like which new agent an action reaches).
    pub fn current(&self) -> Arc<Directory> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// The directory, reloaded first if anything changed it (in this process, another
    /// one on the same database, or another node).
    pub async fn refresh(&self) -> Result<Arc<Directory>, KeyError> {
        let epoch = self.backend.epoch().await?;
        let mut loaded = self.loaded.lock().await;
        if epoch == *loaded {
            return Ok(self.current());
        }
        self.reload(&mut loaded).await
    }

    async fn reload(&self, loaded: &mut i64) -> Result<Arc<Directory>, KeyError> {
        let rows = self.backend.load().await?;
        *loaded = rows.epoch;
        let directory = Arc::new(build(rows, &self.config_keys));
        match self.current.write() {
            Ok(mut c) => *c = Arc::clone(&directory),
            Err(p) => *p.into_inner() = Arc::clone(&directory),
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(directory)
    }

    /// Reloads now, whatever the epoch says (after a change this process made).
    async fn reload_now(&self) -> Result<Arc<Directory>, KeyError> {
        let mut loaded = self.loaded.lock().await;
        self.reload(&mut loaded).await
    }

    /// Ticks each time the directory is reloaded (agent sessions re-check their key).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many times the directory was reloaded: what else reads the auth tables
    /// (OAuth users) reloads when this moves.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    async fn lookup(&self, token: &str, kind: KeyKind) -> Result<Found, AuthFailure> {
        let (digest, _) = self.precheck(token, kind)?;
        self.confirm(&digest, kind, self.refresh().await)
    }

    /// The record the last loaded directory holds active for `token`, and its digest.
    /// A refusal costs no lock and no database (a flood of bad keys must not queue
    /// behind, or slow, the key store): what cannot be a key is refused unhashed, and
    /// the last loaded directory decides for tokens it does not know and for keys it
    /// holds revoked or expired (neither comes back). A key created by another process
    /// works once the broker next looks (housekeeping does every quarter second). Only
    /// a key the directory holds active is checked for freshness ([`KeyStore::confirm`]),
    /// so a revocation anywhere holds on that key's very next call.
    fn precheck(&self, token: &str, kind: KeyKind) -> Result<([u8; 32], Found), AuthFailure> {
        if !plausible_secret(token) {
            return Err(AuthFailure::Unknown);
        }
        let digest = hash(token);
        let dir = self.current();
        let record = dir.by_hash.get(&digest).filter(|r| r.kind == kind).ok_or(AuthFailure::Unknown)?;
        match record.status(now_ms()) {
            KeyStatus::Revoked => Err(AuthFailure::Revoked),
            KeyStatus::Expired => Err(AuthFailure::Expired),
            KeyStatus::Active => {
                let found = (Arc::clone(record), Arc::clone(&dir.tenancy));
                Ok((digest, found))
            }
        }
    }

    /// Judges the key of `digest` again on the directory `refreshed` returned.
    fn confirm(
        &self,
        digest: &[u8; 32],
        kind: KeyKind,
        refreshed: Result<Arc<Directory>, KeyError>,
    ) -> Result<Found, AuthFailure> {
        let dir = match refreshed {
            Ok(dir) => dir,
            // A shared directory out of reach: nothing can be revoked there either, so the
            // last directory read still holds.
            Err(KeyError::Backend(BackendError::Unavailable(e))) => {
                tracing::debug!(error = %e, "the key directory is out of reach; using the last one read");
                self.current()
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the key store; refusing the call");
                return Err(AuthFailure::Unavailable);
            }
        };
        let Some(record) = dir.by_hash.get(digest).filter(|r| r.kind == kind) else {
            return Err(AuthFailure::Unknown);
        };
        match record.status(now_ms()) {
            KeyStatus::Active => Ok((Arc::clone(record), Arc::clone(&dir.tenancy))),
            KeyStatus::Revoked => Err(AuthFailure::Revoked),
            KeyStatus::Expired => Err(AuthFailure::Expired),
        }
    }

    /// The caller an API key belongs to, checked against the freshest directory.
    pub async fn authenticate_api(&self, token: &str) -> Result<Principal, AuthFailure> {
        let (record, tenancy) = self.lookup(token, KeyKind::Api).await?;
        Ok(self.principal(&record, tenancy))
    }

    /// [`KeyStore::authenticate_api`] that also runs `charge` (the call's budget) for the
    /// caller the last loaded directory names, while the directory's freshness is read:
    /// on a cluster node the two Redis calls go out together, one round trip instead of
    /// two. The key is judged again on the fresh directory before anything is answered;
    /// a key revoked elsewhere a moment ago is refused all the same, having spent one
    /// call of its budget.
    /// `charge` hands the principal back with its result, which is kept when the fresh
    /// directory holds the same record (it was not reloaded).
    pub async fn authenticate_api_charging<T, F>(
        &self,
        token: &str,
        charge: impl FnOnce(Principal) -> F,
    ) -> Result<(Principal, T), AuthFailure>
    where
        F: std::future::Future<Output = (Principal, T)>,
    {
        let (digest, (record, tenancy)) = self.precheck(token, KeyKind::Api)?;
        let (refreshed, (principal, charged)) = tokio::join!(self.refresh(), charge(self.principal(&record, tenancy)));
        let (fresh, tenancy) = self.confirm(&digest, KeyKind::Api, refreshed)?;
        let principal = if Arc::ptr_eq(&fresh, &record) { principal } else { self.principal(&fresh, tenancy) };
        Ok((principal, charged))
    }

    /// The principal of a record (which must be an API key).
    pub fn principal(&self, record: &KeyRecord, tenancy: Arc<Tenancy>) -> Principal {
        let role = record.role.unwrap_or(Role::Developer);
        Principal {
            key_id: record.key_id.clone(),
            name: record.name.clone(),
            role,
            scopes: record.effective_scopes(),
            reach: Reach {
                org: record.org.clone(),
                group: record.group.clone(),
                pools: record.pools.as_ref().map(|p| p.iter().cloned().collect()),
            },
            quotas: self.callers.resolve(role, record.quotas.as_ref()),
            tenancy,
            via: None,
        }
    }

    /// What an agent key allows.
    pub async fn authenticate_agent(&self, token: &str) -> Result<AgentCredentials, AuthFailure> {
        let (record, _) = self.lookup(token, KeyKind::Agent).await?;
        Ok(AgentCredentials { key_id: record.key_id.clone(), org: record.org.clone(), pools: record.pools.clone() })
    }

    /// Whether a key still works (after the last reload).
    pub fn key_active(&self, key_id: &str) -> bool {
        self.current().key(key_id).is_some_and(|k| k.status(now_ms()) == KeyStatus::Active)
    }

    /// Creates a key and records it in the audit trail, in one transaction. The
    /// organization (and, from the command line, the group) is created when missing;
    /// through the API the caller's authority was checked with [`check_create`].
    ///
    /// A key created by another key (an API caller) is minted by it: it never outlives
    /// its creator. With no expiry given it expires when the creator does; an expiry
    /// after the creator's is refused. Revoking the creator revokes it
    /// ([`KeyStore::revoke`]). Keys made on the command line belong to no other key.
    pub async fn create(&self, mut new: NewKey, actor: &Actor) -> Result<IssuedKey, KeyError> {
        validate_new(&new)?;
        let parent = match actor {
            Actor::Key { id, .. } => {
                let dir = self.refresh().await?;
                let Some(creator) = dir.key(id).filter(|k| k.status(now_ms()) == KeyStatus::Active).cloned() else {
                    return Err(forbidden("the key making this request is no longer active"));
                };
                if let Some(limit) = creator.effective_expires_at_ms() {
                    match new.expires_at_ms {
                        None => new.expires_at_ms = Some(limit),
                        Some(t) if t > limit => {
                            return Err(invalid(
                                "expires_at",
                                format!(
                                    "is after the expiry of the key creating it ({limit} Unix ms); a minted key never \
                                     outlives its creator: give an earlier expiry, or none to expire with it"
                                ),
                            ));
                        }
                        Some(_) => {}
                    }
                }
                Some(creator.key_id.clone())
            }
            _ => None,
        };
        let secret = new_secret(new.kind.prefix())?;
        let now = now_ms();
        let record = KeyRecord {
            key_id: periscope_protocol::KeyId::generate().to_string(),
            kind: new.kind,
            name: new.name.trim().to_owned(),
            org: new.org.clone(),
            role: match new.kind {
                KeyKind::Api => Some(new.role.unwrap_or(Role::Developer)),
                KeyKind::Agent => None,
            },
            group: new.group.clone(),
            scopes: new.scopes.clone(),
            pools: new.pools.clone(),
            quotas: new.quotas,
            hint: format!("{}…", secret.get(..8).unwrap_or(&secret)),
            created_at_ms: now,
            created_by: actor.name(),
            expires_at_ms: new.expires_at_ms,
            revoked_at_ms: None,
            revoked_by: None,
            source: KeySource::Store,
            created_by_key: parent,
            ended_by: None,
            effective_expires_at_ms: None,
            ancestor_revoked: false,
            hash: hash(&secret),
        };
        let row = KeyRow {
            id: record.key_id.clone(),
            hash: hex(&record.hash),
            kind: record.kind.as_str().to_owned(),
            name: record.name.clone(),
            org: record.org.clone(),
            role: record.role.map(|r| r.as_str().to_owned()),
            group: record.group.clone(),
            scopes: json_opt(&record.scopes),
            pools: json_opt(&record.pools),
            quotas: json_opt(&record.quotas),
            hint: record.hint.clone(),
            created_at_ms: record.created_at_ms,
            created_by: record.created_by.clone(),
            expires_at_ms: record.expires_at_ms,
            revoked_at_ms: None,
            revoked_by: None,
            created_by_key: record.created_by_key.clone(),
        };
        let role = record.role.map_or("agent key".to_owned(), |r| format!("{} key", r.as_str()));
        let entry = AuditEntry::new(record.org.clone(), actor.clone(), AuditKind::KeyCreated)
            .target(serde_json::json!({ "key_id": record.key_id, "kind": record.kind }))
            .detail(format!("created {role} `{}`", record.name))
            .data(serde_json::json!({
                "name": record.name,
                "role": record.role,
                "group": record.group,
                "scopes": record.scopes,
                "pools": record.pools,
                "quotas": record.quotas,
                "expires_at_ms": record.expires_at_ms,
                "created_by_key": record.created_by_key,
            }));
        // Through the API the organization and group must exist; the command line and
        // the bootstrap create them.
        let cli = matches!(actor, Actor::Cli { .. } | Actor::System);
        self.backend.insert(row, entry, cli).await?.map_err(refused)?;
        self.reload_now().await?;
        Ok(IssuedKey { secret, key: record })
    }

    /// Revokes a key (it fails from the next call on) and records it, together with
    /// every key it minted, and every key those minted, in one transaction: a key never
    /// outlives the key that minted it. Each is a `key_revoked` entry naming the key
    /// revoked first. Revoking a revoked key changes nothing and returns it.
    pub async fn revoke(&self, key_id: &str, actor: &Actor) -> Result<KeyRecord, KeyError> {
        let dir = self.refresh().await?;
        let Some(record) = dir.key(key_id.trim()).cloned() else {
            return Err(KeyError::NotFound(format!("no key `{}`; `keys list` shows the keys", short(key_id))));
        };
        if record.source == KeySource::Config {
            return Err(invalid(
                "key_id",
                format!("`{key_id}` is defined in the configuration file; remove it there and restart the broker"),
            ));
        }
        if record.revoked_at_ms.is_some() {
            return Ok((*record).clone());
        }
        let minted = descendants(&dir, &record.key_id);
        let now = now_ms();
        let mut changes = Vec::new();
        for (i, key) in std::iter::once(&record).chain(minted.iter()).enumerate() {
            let detail = if i == 0 {
                format!("revoked {} key `{}`", key.kind.as_str(), key.name)
            } else {
                format!(
                    "revoked {} key `{}` with `{}` ({}), which minted it",
                    key.kind.as_str(),
                    key.name,
                    record.name,
                    record.key_id
                )
            };
            let entry = AuditEntry::new(key.org.clone(), actor.clone(), AuditKind::KeyRevoked)
                .target(serde_json::json!({ "key_id": key.key_id, "kind": key.kind }))
                .detail(detail)
                .data(serde_json::json!({
                    "name": key.name, "role": key.role, "group": key.group,
                    "cascade_from": (i > 0).then_some(&record.key_id),
                    "minted_keys_revoked": (i == 0).then_some(minted.len()),
                }));
            changes.push((key.key_id.clone(), entry));
        }
        self.backend.revoke(changes, now, actor.name()).await?;
        let dir = self.reload_now().await?;
        Ok(dir.key(&record.key_id).map_or_else(|| (*record).clone(), |k| (**k).clone()))
    }

    /// Creates a group in an organization.
    pub async fn create_group(&self, org: &str, group: &str, actor: &Actor) -> Result<(), KeyError> {
        check_name("name", group, MAX_ORG_NAME)?;
        let entry = AuditEntry::new(org, actor.clone(), AuditKind::GroupCreated)
            .target(serde_json::json!({ "group": group }))
            .detail(format!("created group `{group}`"));
        self.backend.create_group(org.to_owned(), group.to_owned(), entry).await?.map_err(refused)?;
        self.reload_now().await?;
        Ok(())
    }

    /// Assigns a pool of an organization to a group (`default` releases it).
    pub async fn assign_pool(&self, org: &str, pool: &str, group: &str, actor: &Actor) -> Result<(), KeyError> {
        check_name("pool", pool, periscope_protocol::messages::registration_bounds::MAX_NAME_LEN)?;
        let (o, p, g, a) = (org.to_owned(), pool.to_owned(), group.to_owned(), actor.clone());
        let audit: crate::backend::AssignAudit = Box::new(move |from: &str| {
            AuditEntry::new(o.clone(), a.clone(), AuditKind::PoolAssigned)
                .target(serde_json::json!({ "pool": p }))
                .detail(format!("moved pool `{p}` from group `{from}` to group `{g}`"))
                .data(serde_json::json!({ "from": from, "to": g }))
        });
        self.backend.assign_pool(org.to_owned(), pool.to_owned(), group.to_owned(), audit).await?.map_err(
            |r| match r {
                KeyRefusal::NoGroup(g) => KeyError::NotFound(format!("no group `{g}`; create it first")),
                other => refused(other),
            },
        )?;
        self.reload_now().await?;
        Ok(())
    }

    /// On a fresh store (no API key ever stored, none configured, no bootstrap key
    /// issued before), creates a `company_admin` key of `default` and remembers that it
    /// did, so it happens once per data directory. The caller prints the secret.
    pub async fn bootstrap(&self, configured_api_keys: usize) -> Result<Option<IssuedKey>, KeyError> {
        let (issued, stored_keys) = self.backend.bootstrap_state().await?;
        if issued || stored_keys > 0 || configured_api_keys > 0 {
            return Ok(None);
        }
        let key = self
            .create(
                NewKey {
                    kind: KeyKind::Api,
                    name: "bootstrap".into(),
                    org: DEFAULT_ORG.into(),
                    role: Some(Role::CompanyAdmin),
                    group: None,
                    scopes: None,
                    pools: None,
                    quotas: None,
                    expires_at_ms: None,
                },
                &Actor::System,
            )
            .await?;
        self.backend.mark_bootstrap(now_ms()).await?;
        Ok(Some(key))
    }

    /// Whether the bootstrap key was issued on this directory.
    pub async fn bootstrap_issued(&self) -> Result<bool, KeyError> {
        Ok(self.backend.bootstrap_state().await?.0)
    }
}

/// Every key minted, directly or not, by `root`, nearest first.
fn descendants(dir: &Directory, root: &str) -> Vec<Arc<KeyRecord>> {
    let mut children: BTreeMap<&str, Vec<&Arc<KeyRecord>>> = BTreeMap::new();
    for k in dir.keys() {
        if let Some(p) = &k.created_by_key {
            children.entry(p.as_str()).or_default().push(k);
        }
    }
    let mut out: Vec<Arc<KeyRecord>> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::from([root]);
    let mut queue = std::collections::VecDeque::from([root]);
    while let Some(id) = queue.pop_front() {
        for child in children.get(id).into_iter().flatten() {
            if seen.insert(&child.key_id) {
                out.push(Arc::clone(child));
                queue.push_back(&child.key_id);
            }
        }
    }
    out
}

/// Checks a key request on its own (names, role and group, scopes, pools, expiry).
pub fn validate_new(new: &NewKey) -> Result<(), KeyError> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > MAX_KEY_NAME || name.chars().any(char::is_control) {
        return Err(invalid("name", format!("must be 1 to {MAX_KEY_NAME} printable characters")));
    }
    check_name("org", &new.org, MAX_ORG_NAME)?;
    if let Some(g) = &new.group {
        check_name("group", g, MAX_ORG_NAME)?;
    }
    match new.kind {
        KeyKind::Api => {
            let role = new.role.unwrap_or(Role::Developer);
            if role == Role::GroupAdmin && new.group.is_none() {
                return Err(invalid("group", "a group_admin key needs the group it administers"));
            }
            if role == Role::CompanyAdmin && new.group.is_some() {
                return Err(invalid("group", "a company_admin key covers the whole organization; give no group"));
            }
            if let Some(scopes) = &new.scopes {
                if scopes.is_empty() {
                    return Err(invalid("scopes", "give at least one scope (or none at all for the role's)"));
                }
                if let Some(extra) = scopes.iter().find(|s| !role.scopes().contains(s)) {
                    return Err(invalid(
                        "scopes",
                        format!(
                            "`{}` is beyond the role `{}`, which grants {}",
                            extra.as_str(),
                            role.as_str(),
                            role.scopes().iter().map(Scope::as_str).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        KeyKind::Agent => {
            if new.role.is_some() || new.scopes.is_some() || new.quotas.is_some() {
                return Err(invalid("role", "agent keys have no role, scopes or caller quotas; give pools"));
            }
            if new.pools.as_ref().is_none_or(Vec::is_empty) {
                return Err(invalid("pools", "an agent key needs the pools it may register into (or `*`)"));
            }
        }
    }
    if let Some(pools) = &new.pools {
        if pools.is_empty() {
            return Err(invalid("pools", "give at least one pool, or no restriction at all"));
        }
        if pools.len() > 1_000 {
            return Err(invalid("pools", "at most 1000 pools"));
        }
        for p in pools {
            if !(p == "*" && new.kind == KeyKind::Agent) {
                check_name("pools", p, periscope_protocol::messages::registration_bounds::MAX_NAME_LEN)?;
            }
        }
    }
    if let Some(q) = &new.quotas {
        q.validate("quotas.").map_err(|(field, message)| invalid(&field, message))?;
    }
    if let Some(t) = new.expires_at_ms {
        let now = now_ms();
        if t <= now {
            return Err(invalid("expires_at", "is in the past"));
        }
        if t - now > MAX_KEY_LIFETIME_MS {
            return Err(invalid("expires_at", "is more than 10 years away"));
        }
    }
    Ok(())
}

fn forbidden(message: impl Into<String>) -> KeyError {
    KeyError::Forbidden(message.into())
}

/// Whether `by` may create `new` (which must be in `by`'s organization). A key never
/// gets more than its creator holds: no higher role, no scope the creator lacks, no
/// pool beyond the creator's reach; group admins create keys of their own group only;
/// quota overrides are for company admins.
pub fn check_create(by: &Principal, new: &NewKey) -> Result<(), KeyError> {
    if new.org != by.org() {
        return Err(KeyError::NotFound(format!("no organization `{}`", new.org)));
    }
    if by.role < Role::GroupAdmin || !by.has(Scope::Admin) {
        return Err(forbidden("creating keys needs the role group_admin or company_admin with the scope mcp:admin"));
    }
    if let Some(role) = new.role
        && role > by.role
    {
        return Err(forbidden(format!("a {} key cannot create a {} key", by.role.as_str(), role.as_str())));
    }
    if new.kind == KeyKind::Api {
        let role = new.role.unwrap_or(Role::Developer);
        let wanted = new.scopes.clone().unwrap_or_else(|| role.scopes().to_vec());
        if let Some(s) = wanted.iter().find(|s| !by.has(**s)) {
            return Err(forbidden(format!(
                "the new key would hold `{}`, which your key lacks; give `scopes` you hold",
                s.as_str()
            )));
        }
    }
    if new.quotas.is_some() && by.role < Role::CompanyAdmin {
        return Err(forbidden("only a company_admin key may set quota overrides"));
    }
    if by.role == Role::GroupAdmin {
        let Some(own) = by.reach.group.as_deref() else {
            return Err(forbidden("this group_admin key names no group"));
        };
        if new.kind == KeyKind::Api && new.group.as_deref() != Some(own) {
            return Err(forbidden(format!("a group_admin of `{own}` creates keys of group `{own}` only")));
        }
        if new.kind == KeyKind::Agent {
            let pools = new.pools.as_deref().unwrap_or_default();
            if let Some(p) = pools.iter().find(|p| *p == "*" || by.tenancy.group_of(by.org(), p) != own) {
                return Err(forbidden(format!(
                    "pool `{p}` is not in group `{own}`; assign it to the group first (PUT /api/v1/pools/{p})"
                )));
            }
        }
    }
    if let Some(mine) = &by.reach.pools {
        let theirs = new.pools.as_deref().unwrap_or_default();
        if theirs.is_empty() || theirs.iter().any(|p| !mine.contains(p)) {
            return Err(forbidden(format!(
                "your key is limited to the pools {}; the new key must be limited to some of them",
                mine.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if let Some(pools) = &new.pools
        && let Some(p) = pools.iter().find(|p| *p != "*" && !by.sees_pool(by.org(), p))
    {
        return Err(forbidden(format!("pool `{p}` is outside your key's reach")));
    }
    Ok(())
}

/// Whether `by` may see (list, revoke) `key`: company admins every key of their
/// organization, group admins the keys of their group (API keys of the group, agent
/// keys whose pools all belong to it).
pub fn visible_key(by: &Principal, key: &KeyRecord) -> bool {
    if key.org != by.org() || !by.has(Scope::Admin) {
        return false;
    }
    match by.role {
        Role::CompanyAdmin => true,
        Role::GroupAdmin => {
            let Some(own) = by.reach.group.as_deref() else { return false };
            match key.kind {
                KeyKind::Api => key.group.as_deref() == Some(own) && key.role != Some(Role::CompanyAdmin),
                KeyKind::Agent => key.pools.as_ref().is_some_and(|p| {
                    !p.is_empty() && p.iter().all(|x| x != "*" && by.tenancy.group_of(by.org(), x) == own)
                }),
            }
        }
        Role::Developer => false,
    }
}

/// Whether `by` may move `pool` to `group`: company admins any pool of their
/// organization to any of its groups; group admins may take a pool that belongs to no
/// group (it is in `default`) into their group, and give one of theirs back.
pub fn check_assign(by: &Principal, pool: &str, group: &str) -> Result<(), KeyError> {
    if by.role < Role::GroupAdmin || !by.has(Scope::Admin) {
        return Err(forbidden("assigning pools needs the role group_admin or company_admin with the scope mcp:admin"));
    }
    if by.reach.pools.as_ref().is_some_and(|p| !p.contains(pool)) {
        return Err(KeyError::NotFound(format!("no pool `{pool}` in your reach")));
    }
    if by.role == Role::CompanyAdmin {
        return Ok(());
    }
    let Some(own) = by.reach.group.as_deref() else {
        return Err(forbidden("this group_admin key names no group"));
    };
    let from = by.tenancy.group_of(by.org(), pool);
    let assigned = by.tenancy.assigned_pools(by.org()).contains_key(pool);
    let from_ok = from == own || (!assigned && from == DEFAULT_GROUP);
    let to_ok = group == own || group == DEFAULT_GROUP;
    if from_ok && to_ok {
        Ok(())
    } else {
        Err(forbidden(format!(
            "a group_admin of `{own}` may take unassigned pools into `{own}` and give its pools back to `default`; \
             pool `{pool}` is in `{from}`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    async fn store() -> (crate::store::ScratchDir, KeyStore) {
        let dir = crate::store::ScratchDir::new().unwrap();
        let keys = KeyStore::open_cli(dir.path()).await.unwrap();
        (dir, keys)
    }

    fn api(name: &str, role: Role) -> NewKey {
        NewKey {
            kind: KeyKind::Api,
            name: name.into(),
            org: DEFAULT_ORG.into(),
            role: Some(role),
            group: None,
            scopes: None,
            pools: None,
            quotas: None,
            expires_at_ms: None,
        }
    }

    #[tokio::test]
    async fn secrets_are_long_random_and_never_stored() {
        let (dir, keys) = store().await;
        let issued = keys.create(api("alice", Role::Developer), &Actor::cli()).await.unwrap();
        assert!(issued.secret.starts_with("psk_") && issued.secret.len() == 36, "{}", issued.secret);
        assert!(issued.key.key_id.starts_with("key_"));
        let db = std::fs::read(crate::store::db_path(dir.path())).unwrap();
        let text = String::from_utf8_lossy(&db);
        assert!(!text.contains(&issued.secret), "the secret is not in the database");
        let p = keys.authenticate_api(&issued.secret).await.unwrap();
        assert_eq!((p.name.as_str(), p.org(), p.role), ("alice", "default", Role::Developer));
        assert_eq!(keys.authenticate_api("psk_wrong").await.unwrap_err(), AuthFailure::Unknown);
    }

    #[tokio::test]
    async fn a_revocation_by_another_process_is_seen_on_the_next_check() {
        let (dir, broker) = store().await;
        let issued = broker.create(api("bob", Role::Developer), &Actor::cli()).await.unwrap();
        assert!(broker.authenticate_api(&issued.secret).await.is_ok());
        // Another connection (as `periscope keys revoke` would be).
        let cli = KeyStore::open_cli(dir.path()).await.unwrap();
        cli.revoke(&issued.key.key_id, &Actor::cli()).await.unwrap();
        assert_eq!(broker.authenticate_api(&issued.secret).await.unwrap_err(), AuthFailure::Revoked);
        // A key created elsewhere works once the broker looks again (housekeeping does
        // every quarter second): an unknown key alone never makes it read the database.
        let other = cli.create(api("carol", Role::Developer), &Actor::cli()).await.unwrap();
        assert_eq!(broker.authenticate_api(&other.secret).await.unwrap_err(), AuthFailure::Unknown);
        broker.refresh().await.unwrap();
        assert!(broker.authenticate_api(&other.secret).await.is_ok());
    }

    #[tokio::test]
    async fn a_refused_key_takes_no_lock_and_reads_no_database() {
        let dir = crate::store::ScratchDir::new().unwrap();
        let backend = Arc::new(crate::backend::local::SqliteKeys::open(dir.path()).unwrap());
        let keys = KeyStore::open(backend.clone(), &[], &[], CallerSettings::default()).await.unwrap();
        let revoked = keys.create(api("gone", Role::Developer), &Actor::cli()).await.unwrap();
        keys.revoke(&revoked.key.key_id, &Actor::cli()).await.unwrap();
        let good = keys.create(api("good", Role::Developer), &Actor::cli()).await.unwrap();
        let keys = Arc::new(keys);
        // Every database access goes through this lock: while a thread holds it, a
        // lookup that wanted the database would hang.
        let held = backend.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let keys = Arc::clone(&keys);
            let secret = revoked.secret.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                rt.block_on(async {
                    let mut outcomes = Vec::new();
                    for token in [
                        "psk_00000000000000000000000000000000",
                        "short",
                        &"x".repeat(10_000),
                        "psk_with spaces and\u{1}controls",
                        &secret,
                    ] {
                        outcomes.push(keys.authenticate_api(token).await.map(|p| p.key_id).unwrap_err());
                    }
                    let agent = keys.authenticate_agent("pak_00000000000000000000000000000000").await.map(|a| a.key_id);
                    let _ = tx.send((outcomes, agent.unwrap_err()));
                })
            })
        };
        // Waited for on this thread (the worker has a runtime of its own), so that the
        // lock is never held across an await.
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        worker.join().unwrap();
        let (outcomes, agent) = got.expect("refusals were decided without waiting for the key store's lock");
        use AuthFailure::{Revoked, Unknown};
        assert_eq!(outcomes, [Unknown, Unknown, Unknown, Unknown, Revoked]);
        assert_eq!(agent, Unknown);
        // A key the directory holds active is still checked against the database.
        assert!(keys.authenticate_api(&good.secret).await.is_ok());
    }

    #[tokio::test]
    async fn roles_bound_what_a_key_can_create() {
        let (_dir, keys) = store().await;
        keys.create_group(DEFAULT_ORG, "payments", &Actor::cli()).await.unwrap();
        let g = keys
            .create(NewKey { group: Some("payments".into()), ..api("gadmin", Role::GroupAdmin) }, &Actor::cli())
            .await
            .unwrap();
        let gadmin = keys.authenticate_api(&g.secret).await.unwrap();
        let err = check_create(&gadmin, &api("boss", Role::CompanyAdmin)).unwrap_err();
        assert!(matches!(err, KeyError::Forbidden(_)), "{err}");
        let err = check_create(&gadmin, &api("dev", Role::Developer)).unwrap_err();
        assert!(err.to_string().contains("group `payments`"), "{err}");
        check_create(&gadmin, &NewKey { group: Some("payments".into()), ..api("dev", Role::Developer) }).unwrap();
        let dev = keys.create(api("dev", Role::Developer), &Actor::cli()).await.unwrap();
        let dev = keys.authenticate_api(&dev.secret).await.unwrap();
        assert!(check_create(&dev, &api("x", Role::Developer)).is_err());
    }

    #[tokio::test]
    async fn group_admins_take_unassigned_pools_but_not_other_groups_pools() {
        let (_dir, keys) = store().await;
        keys.create_group(DEFAULT_ORG, "a", &Actor::cli()).await.unwrap();
        keys.create_group(DEFAULT_ORG, "b", &Actor::cli()).await.unwrap();
        keys.assign_pool(DEFAULT_ORG, "billing", "b", &Actor::cli()).await.unwrap();
        let g = keys
            .create(NewKey { group: Some("a".into()), ..api("ga", Role::GroupAdmin) }, &Actor::cli())
            .await
            .unwrap();
        let ga = keys.authenticate_api(&g.secret).await.unwrap();
        check_assign(&ga, "shop", "a").unwrap();
        assert!(check_assign(&ga, "billing", "a").is_err());
        assert!(!ga.sees_pool(DEFAULT_ORG, "billing") && !ga.sees_pool(DEFAULT_ORG, "shop"));
        keys.assign_pool(DEFAULT_ORG, "shop", "a", &ga.actor()).await.unwrap();
        let ga = keys.authenticate_api(&g.secret).await.unwrap();
        assert!(ga.sees_pool(DEFAULT_ORG, "shop"));
    }

    #[tokio::test]
    async fn the_bootstrap_key_is_issued_once_per_data_directory() {
        let (dir, keys) = store().await;
        let first = keys.bootstrap(0).await.unwrap().expect("a fresh store issues one");
        assert_eq!(first.key.role, Some(Role::CompanyAdmin));
        keys.revoke(&first.key.key_id, &Actor::cli()).await.unwrap();
        assert!(keys.bootstrap(0).await.unwrap().is_none());
        let again = KeyStore::open_cli(dir.path()).await.unwrap();
        assert!(again.bootstrap(0).await.unwrap().is_none());
        let (_d, fresh) = store().await;
        assert!(fresh.bootstrap(1).await.unwrap().is_none(), "configured keys: no bootstrap");
    }

    fn minted_by(issued: &IssuedKey) -> Actor {
        Actor::Key { id: issued.key.key_id.clone(), name: issued.key.name.clone() }
    }

    #[tokio::test]
    async fn a_minted_key_never_outlives_the_key_that_minted_it() {
        let (_dir, keys) = store().await;
        let expiry = now_ms() + 3_600_000;
        let admin = keys
            .create(NewKey { expires_at_ms: Some(expiry), ..api("admin", Role::CompanyAdmin) }, &Actor::cli())
            .await
            .unwrap();
        // No expiry given: it expires with its creator.
        let dev = keys.create(api("dev", Role::Developer), &minted_by(&admin)).await.unwrap();
        assert_eq!(dev.key.expires_at_ms, Some(expiry));
        assert_eq!(dev.key.created_by_key.as_deref(), Some(admin.key.key_id.as_str()));
        // A later expiry is refused, naming the rule.
        let err = keys
            .create(NewKey { expires_at_ms: Some(expiry + 1), ..api("late", Role::Developer) }, &minted_by(&admin))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never outlives its creator"), "{err}");
        // An earlier one is kept.
        let early = keys
            .create(NewKey { expires_at_ms: Some(expiry - 1_000), ..api("early", Role::Developer) }, &minted_by(&admin))
            .await
            .unwrap();
        assert_eq!(early.key.expires_at_ms, Some(expiry - 1_000));
    }

    #[tokio::test]
    async fn revoking_a_key_revokes_every_key_it_minted_down_the_line() {
        let (dir, keys) = store().await;
        let admin = keys.create(api("admin", Role::CompanyAdmin), &Actor::cli()).await.unwrap();
        let child = keys.create(api("child", Role::CompanyAdmin), &minted_by(&admin)).await.unwrap();
        let grandchild = keys.create(api("grandchild", Role::Developer), &minted_by(&child)).await.unwrap();
        let other = keys.create(api("other", Role::Developer), &Actor::cli()).await.unwrap();
        keys.revoke(&admin.key.key_id, &Actor::cli()).await.unwrap();
        for k in [&admin, &child, &grandchild] {
            assert_eq!(keys.authenticate_api(&k.secret).await.unwrap_err(), AuthFailure::Revoked, "{}", k.key.name);
            assert!(keys.current().key(&k.key.key_id).unwrap().revoked_at_ms.is_some(), "stored as revoked");
        }
        assert!(keys.authenticate_api(&other.secret).await.is_ok(), "keys it did not mint keep working");
        // A child whose creator was revoked by an older broker (no cascade in the rows)
        // still fails: what a key inherits is worked out when the directory loads.
        let a2 = keys.create(api("a2", Role::CompanyAdmin), &Actor::cli()).await.unwrap();
        let c2 = keys.create(api("c2", Role::Developer), &minted_by(&a2)).await.unwrap();
        let conn = crate::store::open_connection(dir.path()).unwrap();
        conn.execute("UPDATE keys SET revoked_at_ms = 1 WHERE id = ?1", params![a2.key.key_id]).unwrap();
        conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_epoch'", [])
            .unwrap();
        assert_eq!(keys.authenticate_api(&c2.secret).await.unwrap_err(), AuthFailure::Revoked);
        let record = keys.current().key(&c2.key.key_id).cloned().unwrap();
        assert!(record.ended_by.as_deref().unwrap_or("").contains("a2"), "{record:?}");
    }

    #[tokio::test]
    async fn a_stored_key_whose_restrictions_do_not_decode_does_not_authenticate() {
        let (dir, keys) = store().await;
        let narrow = keys
            .create(NewKey { pools: Some(vec!["shop".into()]), ..api("narrow", Role::Developer) }, &Actor::cli())
            .await
            .unwrap();
        assert!(keys.authenticate_api(&narrow.secret).await.is_ok());
        let conn = crate::store::open_connection(dir.path()).unwrap();
        for column in ["pools", "scopes", "quotas"] {
            conn.execute(&format!("UPDATE keys SET {column} = '{{broken' WHERE id = ?1"), params![narrow.key.key_id])
                .unwrap();
            conn.execute(
                "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_epoch'",
                [],
            )
            .unwrap();
            // Fail closed: not the role's full reach, no access at all.
            assert_eq!(keys.authenticate_api(&narrow.secret).await.unwrap_err(), AuthFailure::Unknown, "{column}");
            conn.execute(&format!("UPDATE keys SET {column} = NULL WHERE id = ?1"), params![narrow.key.key_id])
                .unwrap();
        }
    }

    #[tokio::test]
    async fn scopes_beyond_the_role_and_past_expiry_are_refused() {
        let mut k = api("x", Role::Developer);
        k.scopes = Some(vec![Scope::Admin]);
        assert!(validate_new(&k).unwrap_err().to_string().contains("scopes"));
        let mut k = api("x", Role::Developer);
        k.expires_at_ms = Some(1);
        assert!(validate_new(&k).unwrap_err().to_string().contains("expires_at"));
        let agent = NewKey { kind: KeyKind::Agent, role: None, ..api("a", Role::Developer) };
        assert!(validate_new(&agent).unwrap_err().to_string().contains("pools"));
    }
}
