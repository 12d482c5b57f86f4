//! The seams between the broker's logic and where its shared state lives.
//!
//! Each seam is a small trait with its implementations beside it. The single-node
//! backend ([`local`]) keeps everything in this process's memory and persists it to
//! SQLite under `--data-dir`, as the broker always has. A backend that keeps the state
//! elsewhere (shared by several broker nodes) implements the same traits, and both pass
//! the one conformance suite (`conformance`, generic test functions run against each).
//!
//! # Layout
//!
//! - [`ActionStore`]: actions (insert under the live-action budgets, compare-and-swap
//!   update, end, list), their hits (appended with an index shared by every node), log
//!   lines and metric figures, the live counts per key and organization, expiry and
//!   retention.
//! - [`ActionEvents`]: "this action changed", for callers waiting on it.
//! - [`AuditSink`] and [`AuditReader`]: the audit trail.
//! - [`RuleStore`]: the redaction rules each organization changed at run time.
//! - [`KeyBackend`]: where the key directory (keys, organizations, groups, pool
//!   assignments) is kept; the broker keeps it in memory and re-reads it whenever its
//!   epoch moved.
//! - [`ErrorStore`] (in [`errors`]): the error groups behind `list_errors`.
//! - [`AgentDirectory`]: which node holds each agent (a lease with an epoch), what
//!   every node knows of it, and the bus that carries messages to the node holding it.
//!
//! Calls that may reach another process are async and return a [`BackendFuture`];
//! the local implementations answer at once, under a short lock, as the broker did
//! before it had seams.

pub mod errors;
pub mod local;
pub mod redis;

#[cfg(test)]
pub(crate) mod conformance;

use futures_util::future::BoxFuture;
use periscope_protocol::{ActionId, Hit, LogLine, MetricReport};

pub use errors::{ErrorGroup, ErrorHit, ErrorSource, ErrorStore};

use crate::audit::{AuditEntry, AuditPage, AuditQuery};
use crate::engine::{ActionRecord, ActionStatus, HitsPage, Sender};
use crate::error::{ApiError, ErrorCode};
use crate::registry::AgentSnapshot;
use crate::telemetry::{LinesPage, MetricData};

/// A backend call in flight.
pub type BackendFuture<'a, T> = BoxFuture<'a, Result<T, BackendError>>;

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The shared state cannot be reached right now; retry later.
    #[error("the shared state is unreachable: {0}")]
    Unavailable(String),
    /// Stored data does not decode (written by an incompatible version?).
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    /// A compare-and-swap kept losing to concurrent changes.
    #[error("too many concurrent changes to {0}; retry")]
    Contended(String),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        match e {
            BackendError::Unavailable(_) | BackendError::Contended(_) => {
                tracing::warn!(error = %e, "backend unavailable");
                ApiError::new(
                    ErrorCode::NotAvailable,
                    "the broker cannot reach its shared state right now; retry in a few seconds",
                )
                .with_details(serde_json::json!({ "retry_after_seconds": 5 }))
            }
            BackendError::Corrupt(_) => {
                tracing::error!(error = %e, "backend data does not decode");
                ApiError::new(ErrorCode::Internal, "stored data does not decode; see the broker's log")
            }
        }
    }
}

/// The live-action budgets an insertion is checked against, together and atomically
/// (concurrent placements cannot both take the last slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveLimits {
    /// Live actions the placing key may hold.
    pub per_key: usize,
    /// Live actions its organization may hold, all keys together.
    pub per_org: usize,
}

/// Why an insertion was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveRefusal {
    /// The key holds `live` actions already; the soonest expires at `soonest_ms`.
    Key {
        /// Live actions of the key.
        live: usize,
        /// When its soonest live action expires (Unix ms).
        soonest_ms: Option<u64>,
    },
    /// The organization holds `live` actions already.
    Org {
        /// Live actions of the organization.
        live: usize,
        /// When its soonest live action expires (Unix ms).
        soonest_ms: Option<u64>,
    },
}

/// An action that just ended: the record as it ended, and the ended actions its
/// organization's retention bound forgot to make room (already deleted).
#[derive(Debug, Clone)]
pub struct Ended {
    /// The record, with its final status.
    pub record: ActionRecord,
    /// Ended actions forgotten (with their hits, lines and figures).
    pub forgotten: Vec<ActionId>,
}

/// A per-agent-per-action or per-action rate: `per_sec` cells a second, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    /// Cells per second.
    pub per_sec: f64,
    /// Cells at once.
    pub burst: f64,
}

/// What became of a hit an agent sent.
#[derive(Debug, Clone, PartialEq)]
pub enum HitOutcome {
    /// Stored at `index`; `complete` when it was the action's last.
    Accepted {
        /// Its 1-based index.
        index: u64,
        /// The action has all its hits now (it is still live: the caller ends it).
        complete: bool,
    },
    /// Unknown or ended action, not a target of it, over its hit count.
    Refused,
    /// Over the action's per-agent rate.
    RateLimited,
    /// The agent's lease moved to another node: this node may no longer write for it.
    LeaseLost,
}

/// What became of a frame's log lines for one action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinesOutcome {
    /// Lines stored.
    pub kept: usize,
    /// Lines refused (unknown or ended action, not a log, not a target).
    pub refused: usize,
    /// Lines dropped over the action's rates.
    pub rate_limited: usize,
    /// The action has its `max_lines` now (it is still live: the caller ends it).
    pub complete: bool,
}

/// Actions, their hits, lines and figures; see the module docs.
///
/// Every change to a record is a compare-and-swap ([`ActionStore::load`] gives a
/// version, [`ActionStore::swap`] writes only over that version), except the appends
/// and [`ActionStore::end`], which check what they need atomically themselves.
pub trait ActionStore: Send + Sync + std::fmt::Debug {
    /// Inserts a new live action, unless its key or organization already holds its
    /// budget of live actions (checked together with the insertion).
    fn insert(&self, record: ActionRecord, limits: LiveLimits) -> BackendFuture<'_, Result<(), LiveRefusal>>;

    /// An action and the version to swap against.
    fn load<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<(ActionRecord, u64)>>;

    /// Writes `record` if the action is still at `version`; false when it moved on (or
    /// is gone).
    fn swap<'a>(&'a self, record: &'a ActionRecord, version: u64) -> BackendFuture<'a, bool>;

    /// Ends a live action with `status` and `reason` at `now_ms`: off the live counts,
    /// into its organization's retention. `None` when it is not live.
    fn end<'a>(
        &'a self,
        id: &'a ActionId,
        status: ActionStatus,
        reason: &'a str,
        now_ms: u64,
    ) -> BackendFuture<'a, Option<Ended>>;

    /// Every action of an organization (live and kept).
    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>>;

    /// The live actions of an organization.
    fn live<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>>;

    /// Live actions whose expiry is at or before `now_ms`.
    fn due(&self, now_ms: u64) -> BackendFuture<'_, Vec<ActionId>>;

    /// Live actions of a key and of an organization.
    fn live_counts<'a>(&'a self, key_id: &'a str, org: &'a str) -> BackendFuture<'a, (usize, usize)>;

    /// Ended actions kept for an organization.
    fn ended_count<'a>(&'a self, org: &'a str) -> BackendFuture<'a, usize>;

    /// Appends a hit (`hit.index` is assigned here) if the action is live, targets the
    /// agent, has room, and the agent is within `rate` for it; counts the redaction
    /// rules that fired. Refusals are counted on the action.
    fn append_hit<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        hit: Hit,
        now_ms: u64,
        rate: RateSpec,
    ) -> BackendFuture<'a, HitOutcome>;

    /// [`ActionStore::append_hit`] for each of `hits` (of any actions, each to its own
    /// `action_id`), in order, with one outcome each. A shared backend stores them in
    /// one round trip (an agent's hits arrive in bursts); each hit is still checked and
    /// written on its own terms.
    fn append_hits<'a>(
        &'a self,
        from: &'a Sender,
        hits: Vec<Hit>,
        now_ms: u64,
        rate: RateSpec,
    ) -> BackendFuture<'a, Vec<HitOutcome>> {
        use futures_util::FutureExt as _;
        async move {
            let mut out = Vec::with_capacity(hits.len());
            for hit in hits {
                let id = hit.action_id.clone();
                out.push(self.append_hit(&id, from, hit, now_ms, rate).await?);
            }
            Ok(out)
        }
        .boxed()
    }

    /// Hits after `since`, at most `limit`.
    fn hits<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, HitsPage>;

    /// [`ActionStore::load`] and [`ActionStore::hits`] together (a shared backend reads
    /// both in one round trip): what a caller waiting for hits reads on every wake. The
    /// page is empty until the action has hits after `since`.
    fn load_with_hits<'a>(
        &'a self,
        id: &'a ActionId,
        since: u64,
        limit: usize,
    ) -> BackendFuture<'a, Option<(ActionRecord, HitsPage)>> {
        use futures_util::FutureExt as _;
        async move {
            let Some((record, _)) = self.load(id).await? else { return Ok(None) };
            Ok(Some((record, self.hits(id, since, limit).await?)))
        }
        .boxed()
    }

    /// Which of a frame's lines for one action (given by their costs in bytes) the action
    /// admits within its line and byte rates (all agents together), one flag per line;
    /// `None` when it is not a live log targeting the agent.
    fn admit_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        costs: &'a [u32],
        rates: (RateSpec, RateSpec),
    ) -> BackendFuture<'a, Option<Vec<bool>>>;

    /// Appends admitted (and redacted) lines, assigning their indexes.
    fn append_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        lines: Vec<LogLine>,
        now_ms: u64,
    ) -> BackendFuture<'a, LinesOutcome>;

    /// Lines after `since`, at most `limit`.
    fn lines<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, LinesPage>;

    /// Merges a metric report of an agent the action targets (ended ones too: an agent's
    /// last interval arrives after the removal); false when refused.
    fn merge_metric<'a>(&'a self, id: &'a ActionId, from: &'a Sender, report: MetricReport) -> BackendFuture<'a, bool>;

    /// A metric action's figures.
    fn metric<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<MetricData>>;

    /// Forgets ended actions that ended before `cutoff_ms`; returns them.
    fn purge_before(&self, cutoff_ms: u64) -> BackendFuture<'_, Vec<ActionId>>;
}

/// "This action changed", for callers waiting on it. Subscribe before reading the
/// action, then wait for a change: a change between the two is never missed.
pub trait ActionEvents: Send + Sync + std::fmt::Debug {
    /// A receiver that changes whenever the action does.
    fn subscribe(&self, id: &ActionId) -> tokio::sync::watch::Receiver<u64>;
    /// Tells every waiter (on every node) the action changed.
    fn changed(&self, id: &ActionId);
}

/// Where audit entries go. Writing never fails the caller: an entry that cannot be
/// written is logged (every entry is also logged under `periscope::audit`).
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Appends an entry.
    fn append(&self, entry: AuditEntry);
    /// Deletes entries older than `cutoff_ms`.
    fn purge_before(&self, cutoff_ms: u64);
}

/// Reading the audit trail.
pub trait AuditReader: Send + Sync + std::fmt::Debug {
    /// One page of matching entries after `q.after_seq` (entries written before the
    /// call are in it).
    fn page(&self, q: AuditQuery) -> BackendFuture<'_, AuditPage>;
    /// Every matching entry, oldest first, as JSON lines, in chunks of about 64 KiB, into
    /// `out` until it closes.
    fn export(&self, q: AuditQuery, out: tokio::sync::mpsc::Sender<Vec<u8>>) -> BackendFuture<'_, u64>;
}

/// The redaction rules each organization changed at run time (the configuration file's
/// rules apply to the others).
pub trait RuleStore: Send + Sync + std::fmt::Debug {
    /// Stores an organization's rules (JSON of a `RedactionConfig`).
    fn save<'a>(&'a self, org: &'a str, json: String) -> BackendFuture<'a, ()>;
    /// Every organization's stored rules.
    fn load_all(&self) -> BackendFuture<'_, Vec<(String, String)>>;
}

/// Another process holds the agent id (a live lease from another host or pid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeld {
    /// The node holding it.
    pub node: String,
}

/// What a node hears from the others.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// An agent's record changed (held by another node, or gone offline there).
    Agent(periscope_protocol::AgentId),
    /// A message for an agent this node holds.
    Message(periscope_protocol::AgentId, periscope_protocol::BrokerMessage),
    /// An organization's redaction rules changed.
    Rules(String),
    /// An organization's blocklist or pauses changed.
    Safety(String),
    /// The key directory changed.
    Keys,
    /// Events may have been missed (a subscription was lost and is back).
    Resync,
}

/// Which node holds each agent, what every node knows of each agent, and the bus to the
/// node holding one.
///
/// An agent id is held by one node at a time, under a lease with an epoch: the node
/// that registers the agent takes the lease (over a live one only when the same process,
/// host and pid, reconnects: it moved), renews it while the session lasts, and releases
/// it at the end. Writes for the agent carry the epoch, and a store shared by several
/// nodes refuses them once the lease moved on ([`HitOutcome::LeaseLost`]).
pub trait AgentDirectory: Send + Sync + std::fmt::Debug {
    /// This node's name.
    fn node(&self) -> &str;

    /// Takes the lease on `agent` for a session of process `pid` on `host`; its epoch.
    fn acquire<'a>(
        &'a self,
        agent: &'a periscope_protocol::AgentId,
        host: &'a str,
        pid: u32,
    ) -> BackendFuture<'a, Result<u64, LeaseHeld>>;

    /// Keeps leases alive; returns the agents whose lease moved to another epoch.
    fn renew(
        &self,
        leases: Vec<(periscope_protocol::AgentId, u64)>,
    ) -> BackendFuture<'_, Vec<periscope_protocol::AgentId>>;

    /// Gives a lease up (the session ended), if it is still at `epoch`.
    fn release<'a>(&'a self, agent: &'a periscope_protocol::AgentId, epoch: u64) -> BackendFuture<'a, ()>;

    /// The epoch of the lease on `agent` now, if any.
    fn lease<'a>(&'a self, agent: &'a periscope_protocol::AgentId) -> BackendFuture<'a, Option<u64>>;

    /// Tells the other nodes what this node knows of an agent it holds (and its catalog,
    /// when it changed).
    fn publish(
        &self,
        record: AgentSnapshot,
        catalog: Option<crate::registry::PublishedCatalog>,
    ) -> BackendFuture<'_, ()>;

    /// What the nodes published of an agent.
    fn get<'a>(&'a self, agent: &'a periscope_protocol::AgentId) -> BackendFuture<'a, Option<AgentSnapshot>>;

    /// Everything the nodes published.
    fn all(&self) -> BackendFuture<'_, Vec<AgentSnapshot>>;

    /// An agent's catalog as its node published it.
    fn catalog<'a>(
        &'a self,
        agent: &'a periscope_protocol::AgentId,
    ) -> BackendFuture<'a, crate::registry::PublishedCatalog>;

    /// Forgets an agent (offline beyond its retention).
    fn forget<'a>(&'a self, agent: &'a periscope_protocol::AgentId) -> BackendFuture<'a, ()>;

    /// Sends a message to an agent held by `node`.
    fn send<'a>(
        &'a self,
        node: &'a str,
        agent: &'a periscope_protocol::AgentId,
        msg: &'a periscope_protocol::BrokerMessage,
    ) -> BackendFuture<'a, ()>;

    /// Tells every node something changed that is not an agent (rules, keys).
    fn broadcast(&self, event: ClusterEvent) -> BackendFuture<'_, ()>;

    /// This node is alive and serves `load` (agents, connections, ...): called every
    /// second; a node silent for a few seconds is taken for gone.
    fn heartbeat(&self, load: serde_json::Value) -> BackendFuture<'_, ()>;

    /// The nodes alive now, with what each said of its load.
    fn nodes(&self) -> BackendFuture<'_, Vec<(String, serde_json::Value)>>;

    /// What the other nodes say, from now on.
    fn subscribe(&self) -> tokio::sync::mpsc::Receiver<ClusterEvent>;
}

/// A stored key, as the key directory keeps it (JSON columns for what may grow).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRow {
    /// `key_…`.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// `api` or `agent`.
    pub kind: String,
    /// Who or what uses it.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// API keys: the role.
    pub role: Option<String>,
    /// The group.
    pub group: Option<String>,
    /// Narrower scopes, JSON.
    pub scopes: Option<String>,
    /// Pool restriction, JSON.
    pub pools: Option<String>,
    /// Quota overrides, JSON.
    pub quotas: Option<String>,
    /// The first characters of the secret.
    pub hint: String,
    /// When (Unix ms).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// When it stops working.
    pub expires_at_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_at_ms: Option<u64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// The key that minted it.
    pub created_by_key: Option<String>,
}

/// Everything the key directory holds, with the epoch it was read at.
#[derive(Debug, Clone, Default)]
pub struct KeyRows {
    /// The stored keys.
    pub keys: Vec<KeyRow>,
    /// Organizations.
    pub orgs: Vec<String>,
    /// Groups: (organization, group).
    pub groups: Vec<(String, String)>,
    /// Pool assignments: (organization, pool, group).
    pub pools: Vec<(String, String, String)>,
    /// Bumped by every change.
    pub epoch: i64,
}

/// Why a change to the key directory was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No such organization.
    NoOrg(String),
    /// No such group in the organization.
    NoGroup(String),
    /// The group exists already.
    GroupExists(String),
}

/// Builds a pool assignment's audit entry from the group the pool leaves.
pub type AssignAudit = Box<dyn Fn(&str) -> AuditEntry + Send + Sync>;

/// Where the key directory is kept. Every change is atomic with the audit entries that
/// record it, and bumps the directory's epoch, so every broker process (or node) reading
/// the directory sees it at its next check.
pub trait KeyBackend: Send + Sync + std::fmt::Debug {
    /// Everything, consistently.
    fn load(&self) -> BackendFuture<'_, KeyRows>;
    /// The epoch now (cheap: checked on every authenticated call).
    fn epoch(&self) -> BackendFuture<'_, i64>;
    /// Creates missing organizations and groups (`None`: just the organization).
    fn ensure(&self, orgs: Vec<(String, Option<String>)>) -> BackendFuture<'_, ()>;
    /// Stores a new key with its audit entry; missing organization and group are
    /// created when `create_missing`, refused otherwise.
    fn insert(&self, row: KeyRow, audit: AuditEntry, create_missing: bool)
    -> BackendFuture<'_, Result<(), KeyRefusal>>;
    /// Revokes the keys (each with its audit entry, written only if it was not revoked
    /// already) at `at_ms` by `by`.
    fn revoke(&self, keys: Vec<(String, AuditEntry)>, at_ms: u64, by: String) -> BackendFuture<'_, ()>;
    /// Creates a group.
    fn create_group(&self, org: String, group: String, audit: AuditEntry) -> BackendFuture<'_, Result<(), KeyRefusal>>;
    /// Assigns a pool to a group (`default` releases it); the audit entry names the group
    /// it leaves.
    fn assign_pool(
        &self,
        org: String,
        pool: String,
        group: String,
        audit: AssignAudit,
    ) -> BackendFuture<'_, Result<(), KeyRefusal>>;
    /// Whether the bootstrap key was issued, and how many API keys are stored.
    fn bootstrap_state(&self) -> BackendFuture<'_, (bool, usize)>;
    /// Records that the bootstrap key was issued.
    fn mark_bootstrap(&self, at_ms: u64) -> BackendFuture<'_, ()>;
}
