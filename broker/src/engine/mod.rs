//! The action engine: placing actions, keeping agents in sync with them, collecting
//! hits, and ending actions (by hit count, expiry, removal).
//!
//! Every action belongs to the organization of the key that placed it and keeps that
//! key's [`Reach`]: it only ever reaches agents of its organization within that reach,
//! including agents that join later. Callers only see actions whose pools they may see
//! (others answer `not_found`, exactly like actions that do not exist). The engine
//! charges the live-action quota of the placing key, re-applies the per-action rates
//! agents enforce (snapshot hits per agent, log lines and bytes), and writes the audit
//! trail of every placement, removal, completion, expiry and quota pause.
//!
//! The engine holds no action state itself: actions live in an
//! [`ActionStore`](crate::backend::ActionStore), waiters are woken through
//! [`ActionEvents`](crate::backend::ActionEvents), and the audit trail goes to an
//! [`AuditSink`](crate::backend::AuditSink). Nothing is locked across an `.await`, and
//! agents and waiters are told of a change after the store has it.
//!
//! # Layout
//!
//! - [`errors`]: capture on error: placing it, error groups, `list_errors`.
//! - [`model`]: the action record, per-agent states, the views callers get.
//! - [`requests`]: what callers ask for, validated once for REST and MCP.
//! - `placement`: targets, matching agents, locations, insertion under the quotas.
//! - `ingest`: hits, log lines, metric reports and status updates from agents.
//! - `lifecycle`: ending actions (completion, removal, expiry), retention, agents
//!   coming and going.
//! - `waits`: waiting for hits, lines or the end of an action.
//! - `views`: reading actions, hits, lines and counts within a caller's reach.
//! - `restore`: rebuilding the single-node store from the database at start.

pub mod errors;
mod ingest;
mod lifecycle;
pub mod model;
mod placement;
pub mod requests;
mod restore;
mod safety;
mod views;
mod waits;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use periscope_protocol::{ActionId, AgentId, CaptureLimits, MetricKind};
use tokio::sync::watch;

pub use errors::{ErrorQuery, ErrorView};
pub use ingest::keep_known_findings;
pub use model::{
    ActionDrops, ActionFilter, ActionQuotaView, ActionRecord, ActionStatus, ActionView, AgentActionView, AgentState,
    HitsPage, StoredHit, Target,
};
pub use requests::{ErrorCaptureRequest, LogRequest, MAX_MAX_LINES, MetricRequest, SnapshotRequest};
pub use safety::{CodeCheck, CodeCheckAgent, PauseOutcome};

use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::audit_repeats::Repeats;
use crate::auth::Principal;
use crate::backend::local::{LocalEvents, MemoryActions};
use crate::backend::{ActionEvents, ActionStore, AuditSink, BackendError, ErrorStore, RuleStore};
use crate::error::ApiError;
use crate::keys::{KeyStore, Tenancy};
use crate::quota::{IngestSettings, OrgCeilings};
use crate::registry::Registry;
use crate::telemetry::MetricData;
use crate::time::now_ms;

/// Quota pauses of one action for one reason closer together than this are one
/// episode, audited once.
pub const PAUSE_EPISODE_GAP_MS: u64 = 60_000;

/// How often a compare-and-swap is retried before the change is given up as contended.
const CAS_ATTEMPTS: usize = 16;

/// The agent a frame came from, as the gateway authenticated it.
#[derive(Debug, Clone)]
pub struct Sender {
    /// Its id.
    pub id: AgentId,
    /// Its display name.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// The pool it registered into (counters are kept per pool, so a pool-restricted
    /// key sees only its pools' counts).
    pub pool: String,
    /// The epoch of this node's lease on the agent (0: no leases, a single node). A store
    /// shared by several nodes refuses what a node writes under an epoch that moved on.
    pub epoch: u64,
}

/// What became of a hit an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored.
    Accepted,
    /// Refused: unknown or ended action, not a target, over its hit count.
    Refused,
    /// Dropped: over the action's per-agent rate.
    RateLimited,
    /// Not stored: the shared state could not be reached (counted as a drop).
    Unavailable,
    /// Not stored: the agent is held by another node now; this session must end.
    LeaseLost,
}

/// What became of a frame of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinesIngested {
    /// Lines stored.
    pub kept: usize,
    /// Lines dropped over their action's rates.
    pub rate_limited: usize,
}

/// One metric action's figures, as `/metrics` exports them.
#[derive(Debug, Clone)]
pub struct MetricExport {
    /// The action.
    pub action_id: ActionId,
    /// What it measures.
    pub kind: MetricKind,
    /// Its figures, per agent.
    pub data: MetricData,
    /// The organization.
    pub org: String,
    /// Its pools (callers see it if they see all of them).
    pub pools: BTreeSet<String>,
}

/// Counters the broker exports on `/metrics`, per organization and pool.
#[derive(Debug, Default)]
pub struct EngineStats {
    orgs: Mutex<BTreeMap<String, BTreeMap<String, OrgStats>>>,
}

/// One organization's counters.
#[derive(Debug, Clone, Default)]
pub struct OrgStats {
    /// Hits stored.
    pub hits_accepted: u64,
    /// Hits refused (unknown or ended action, over its count, not a target, from a
    /// place a `no_actions` rule covers).
    pub hits_refused: u64,
    /// Hits dropped over an action's per-agent rate.
    pub hits_rate_limited: u64,
    /// Dynamic log lines stored.
    pub lines_accepted: u64,
    /// Dynamic log lines refused (unknown or ended action, not a target, from a place a
    /// `no_actions` rule covers).
    pub lines_refused: u64,
    /// Dynamic log lines dropped over an action's rates.
    pub lines_rate_limited: u64,
    /// Metric reports merged.
    pub metric_reports: u64,
    /// Quota pauses reported by agents, by reason.
    pub quota_pauses: BTreeMap<String, u64>,
}

impl OrgStats {
    fn absorb(&mut self, other: &OrgStats) {
        self.hits_accepted += other.hits_accepted;
        self.hits_refused += other.hits_refused;
        self.hits_rate_limited += other.hits_rate_limited;
        self.lines_accepted += other.lines_accepted;
        self.lines_refused += other.lines_refused;
        self.lines_rate_limited += other.lines_rate_limited;
        self.metric_reports += other.metric_reports;
        for (reason, n) in &other.quota_pauses {
            *self.quota_pauses.entry(reason.clone()).or_insert(0) += n;
        }
    }
}

impl EngineStats {
    /// Every organization's counters added up (this node's load).
    pub fn totals(&self) -> OrgStats {
        let orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = OrgStats::default();
        for pools in orgs.values() {
            for stats in pools.values() {
                out.absorb(stats);
            }
        }
        out
    }

    /// Updates the counters of the agent's organization and pool.
    pub fn add(&self, from: &Sender, f: impl FnOnce(&mut OrgStats)) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        match orgs.get_mut(&from.org).and_then(|o| o.get_mut(&from.pool)) {
            Some(s) => f(s),
            None => f(orgs.entry(from.org.clone()).or_default().entry(from.pool.clone()).or_default()),
        }
    }

    /// The counters of the pools `caller` may see, added up: the whole organization for
    /// an organization-wide key, its pools' alone for a restricted one.
    pub fn visible_to(&self, caller: &Principal) -> OrgStats {
        let orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = OrgStats::default();
        for (pool, stats) in orgs.get(caller.org()).into_iter().flatten() {
            if caller.sees_pool(caller.org(), pool) {
                out.absorb(stats);
            }
        }
        out
    }
}

/// The action engine.
#[derive(Debug)]
pub struct Engine {
    /// Counters for `/metrics`.
    pub stats: EngineStats,
    /// Redaction rules applied to everything agents send.
    pub rules: Arc<crate::rules::Rules>,
    /// Blocklists and pauses per organization.
    pub safety: Arc<crate::safety::Safety>,
    safety_store: Option<Arc<dyn RuleStore>>,
    metric_interval_ms: u64,
    registry: Arc<Registry>,
    actions: Arc<dyn ActionStore>,
    events: Arc<dyn ActionEvents>,
    /// The error groups behind `list_errors`.
    errors: Arc<dyn ErrorStore>,
    audit_sink: Option<Arc<dyn AuditSink>>,
    rule_store: Option<Arc<dyn RuleStore>>,
    durable: Option<crate::store::StoreHandle>,
    keys: Option<Arc<KeyStore>>,
    ingest: IngestSettings,
    shutdown: watch::Receiver<bool>,
    limits: CaptureLimits,
    org_quotas: OrgCeilings,
    repeats: Repeats,
}

impl Engine {
    /// An engine over a registry, keeping actions in memory (at most `max_ended` ended
    /// ones per organization) and persisting nothing until [`Engine::with_store`].
    pub fn new(
        registry: Arc<Registry>,
        rules: Arc<crate::rules::Rules>,
        limits: CaptureLimits,
        max_ended: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Engine {
            rules,
            registry,
            actions: Arc::new(MemoryActions::new(max_ended, None)),
            events: Arc::new(LocalEvents::default()),
            errors: Arc::new(crate::backend::local::MemoryErrors::default()),
            audit_sink: None,
            rule_store: None,
            safety: Arc::default(),
            safety_store: None,
            durable: None,
            keys: None,
            ingest: IngestSettings::default(),
            shutdown,
            limits,
            org_quotas: OrgCeilings::default(),
            repeats: Repeats::default(),
            stats: EngineStats::default(),
            metric_interval_ms: 5_000,
        }
    }

    /// Keeps actions in `actions` and tells waiters through `events`.
    pub fn with_backend(mut self, actions: Arc<dyn ActionStore>, events: Arc<dyn ActionEvents>) -> Self {
        self.actions = actions;
        self.events = events;
        self
    }

    /// Keeps error groups in `errors` (the cluster's shared store).
    pub fn with_errors(mut self, errors: Arc<dyn ErrorStore>) -> Self {
        self.errors = errors;
        self
    }

    /// Writes the audit trail to `sink`.
    pub fn with_audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit_sink = Some(sink);
        self
    }

    /// Keeps the redaction rules organizations change in `store`.
    pub fn with_rule_store(mut self, store: Arc<dyn RuleStore>) -> Self {
        self.rule_store = Some(store);
        self
    }

    /// Applies the blocklists and pauses in `safety`, keeping what organizations change
    /// in `store` (the `safety` namespace).
    pub fn with_safety(mut self, safety: Arc<crate::safety::Safety>, store: Arc<dyn RuleStore>) -> Self {
        self.safety = safety;
        self.safety_store = Some(store);
        self
    }

    /// Uses the key directory's pool-to-group assignments when deciding which agents an
    /// action placed by a group-restricted key reaches.
    pub fn with_keys(mut self, keys: Arc<KeyStore>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Sets the per-action rates the broker enforces on what agents send.
    pub fn with_ingest(mut self, ingest: IngestSettings) -> Self {
        self.ingest = ingest;
        self
    }

    /// Sets the organization ceilings (live actions per organization).
    pub fn with_org_quotas(mut self, quotas: OrgCeilings) -> Self {
        self.org_quotas = quotas;
        self
    }

    /// Sets how often agents report metric aggregates.
    pub fn with_metric_interval(mut self, ms: u64) -> Self {
        self.metric_interval_ms = ms.clamp(1_000, 3_600_000);
        self
    }

    /// The per-action and per-agent rates in force.
    pub fn ingest(&self) -> &IngestSettings {
        &self.ingest
    }

    /// The capture limits the broker applies.
    pub fn limits(&self) -> &CaptureLimits {
        &self.limits
    }

    /// The action store.
    pub fn actions(&self) -> &Arc<dyn ActionStore> {
        &self.actions
    }

    fn tenancy(&self) -> Arc<Tenancy> {
        self.keys.as_ref().map_or_else(|| Arc::new(Tenancy::default()), |k| Arc::clone(&k.current().tenancy))
    }

    /// Appends an entry to the audit trail (and logs it under `periscope::audit`); without
    /// a sink, the log line is all there is.
    pub fn audit(&self, entry: AuditEntry) {
        tracing::info!(
            target: "periscope::audit",
            org = %entry.org,
            actor = %entry.actor.name(),
            kind = entry.kind.as_str(),
            action = entry.action_id.as_deref().unwrap_or(""),
            detail = %entry.detail,
            "audit"
        );
        if let Some(sink) = &self.audit_sink {
            sink.append(entry);
        }
    }

    /// Appends an entry an outsider can cause at will (a refused registration, a flood)
    /// through [`Repeats`]: the first of its kind for `key_id` and `reason` at once, the
    /// repeats of the next minute as one summary.
    pub fn audit_repeated(&self, entry: AuditEntry, key_id: &str, reason: &'static str) {
        for e in self.repeats.note(entry, key_id, reason) {
            self.audit(e);
        }
    }

    /// Writes the summaries of repeat windows that ended (housekeeping).
    pub fn flush_repeats(&self) {
        for e in self.repeats.flush(now_ms()) {
            self.audit(e);
        }
    }

    /// Deletes audit entries older than `cutoff_ms` (the audit trail's own retention).
    pub fn purge_audit_before(&self, cutoff_ms: u64) {
        if let Some(sink) = &self.audit_sink {
            sink.purge_before(cutoff_ms);
        }
    }

    /// Resolves once everything this engine queued for the store so far is committed:
    /// what a caller is told (an action placed, a hit or line returned, an audit entry)
    /// survives the broker being killed right after it answers. Immediate where writes
    /// are not queued (no store, or the shared backend, whose writes are awaited).
    pub fn committed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let barrier = self.durable.as_ref().map(crate::store::StoreHandle::barrier);
        async move {
            if let Some(b) = barrier {
                b.await;
            }
        }
    }

    /// Room for what an agent's session is about to take in (`items` hits, lines or
    /// reports in `bytes` of frames): waits while the store's writer is that far behind
    /// ([`crate::store::IngestGate`]). `None` where writes are not queued (no store, or
    /// the shared backend, whose writes each session awaits).
    pub async fn reserve_ingest(&self, bytes: usize, items: usize) -> Option<crate::store::IngestPermit> {
        match &self.durable {
            Some(store) => Some(store.reserve(bytes, items).await),
            None => None,
        }
    }

    /// Gives the room back once what was taken in under it is committed.
    pub fn ingest_queued(&self, permit: Option<crate::store::IngestPermit>) {
        if let (Some(store), Some(permit)) = (&self.durable, permit) {
            store.release_after_commit(permit);
        }
    }

    /// What the store's writer has queued, when there is one.
    pub fn store_queue(&self) -> Option<crate::store::QueueStats> {
        self.durable.as_ref().map(crate::store::StoreHandle::queue_stats)
    }

    /// Waits until everything written so far is durable.
    pub fn flush(&self) {
        if let Some(store) = &self.durable {
            store.flush(std::time::Duration::from_secs(5));
        }
    }

    /// Replaces an organization's redaction rules: compiled, stored, pushed to every
    /// online agent of the organization, and audited; hits after this carry the new
    /// version.
    pub async fn replace_rules(
        &self,
        org: &str,
        config: periscope_redaction::RedactionConfig,
        actor: Actor,
    ) -> Result<periscope_redaction::RedactionConfig, ApiError> {
        let rules = Arc::clone(&self.rules);
        let owned = org.to_owned();
        // Compiling user patterns is CPU work: off the async workers.
        let config = tokio::task::spawn_blocking(move || rules.replace(&owned, config))
            .await
            .map_err(|e| ApiError::new(crate::error::ErrorCode::Internal, format!("replacing the rules: {e}")))?
            .map_err(|e| ApiError::invalid(format!("redaction rules: {e}")))?;
        if let Some(store) = &self.rule_store {
            store.save(org, serde_json::to_string(&config).unwrap_or_default()).await?;
        }
        self.push_rules(org);
        // What changed, never what the rules match: names and counts.
        let summary = serde_json::json!({
            "version": config.version,
            "strict": config.strict,
            "builtin_detectors": config.builtins.detectors,
            "builtin_key_names": config.builtins.key_names,
            "disabled": config.builtins.disabled,
            "custom_patterns": config.patterns.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "key_names": config.key_names.len(),
            "excluded_key_names": config.exclusions.key_names.len(),
            "excluded_values": config.exclusions.values.len(),
        });
        self.audit(
            AuditEntry::new(org, actor, AuditKind::RedactionRulesChanged)
                .detail(format!("replaced the redaction rules (version {})", config.version))
                .data(summary),
        );
        tracing::info!(org, version = config.version, "redaction rules replaced");
        Ok(config)
    }

    /// Sends an organization's rules in force to its agents connected here.
    pub fn push_rules(&self, org: &str) {
        let message = self.rules.message(org);
        let mut online = Vec::new();
        self.registry.for_each(|a| {
            if a.online() && a.org == org {
                online.push(a.info.agent_id.clone());
            }
        });
        for agent in online {
            self.registry.send(&agent, message.clone());
        }
    }

    /// Changes an action by compare-and-swap: `f` gets the current record and returns
    /// what to report (`None`: nothing to change); retried on a concurrent change. The
    /// waiters are told when it changed.
    async fn change<R>(
        &self,
        id: &ActionId,
        mut f: impl FnMut(&mut ActionRecord) -> Option<R>,
    ) -> Result<Option<(ActionRecord, R)>, BackendError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut record, version)) = self.actions.load(id).await? else { return Ok(None) };
            let Some(out) = f(&mut record) else { return Ok(None) };
            if self.actions.swap(&record, version).await? {
                self.events.changed(id);
                return Ok(Some((record, out)));
            }
        }
        Err(BackendError::Contended(id.to_string()))
    }
}

fn parse_action_id(raw: &str) -> Result<ActionId, ApiError> {
    ActionId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("action_id: {e}")))
}
