//! The action engine: placing actions, keeping agents in sync with them, collecting
//! hits, and ending actions (by hit count, expiry, removal).
//!
//! All action state lives in one mutex-protected book, never held across an `.await`.
//! Callers that wait for hits take a `watch` receiver under the lock and wait outside.
//!
//! Every action belongs to the organization of the key that placed it and keeps that
//! key's [`Reach`]: it only ever reaches agents of its organization within that reach,
//! including agents that join later. Callers only see actions whose pools they may see
//! (others answer `not_found`, exactly like actions that do not exist). The engine
//! charges the live-action quota of the placing key, re-applies the per-action rates
//! agents enforce (snapshot hits per agent, log lines and bytes), and writes the audit
//! trail of every placement, removal, completion, expiry and quota pause.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use periscope_protocol::limits::action_bounds;
use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, AgentActionState, AgentId, BrokerMessage, CaptureLimits, CatalogEntry, Hit,
    HitId, Location, LocationKind, LogDestination, LogLevel, LogLine, LogSpec, MetricKind, MetricReport, MetricSpec,
    SnapshotSpec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::action_index::LiveIndex;
use crate::audit::{Actor, AuditEntry, AuditKind, Expressions};
use crate::audit_repeats::Repeats;
use crate::auth::{Principal, Reach};
use crate::error::{ApiError, ErrorCode};
use crate::keys::{KeyStore, Tenancy};
use crate::quota::{IngestSettings, OrgCeilings, Rate};
use crate::registry::{AgentRecord, Registry};
use crate::retention::Retention;
use crate::store::{ActionRow, HitRow, LineRow, Loaded, Store, StoreError};
use crate::telemetry::{LineBook, LinesPage, MetricData, MetricView, StoredLine};
use crate::time::now_ms;

/// Quota pauses of one action for one reason closer together than this are one
/// episode, audited once.
pub const PAUSE_EPISODE_GAP_MS: u64 = 60_000;

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
}

/// Whom an action is aimed at, as the caller said it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Exact agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_ids: Vec<AgentId>,
    /// A pool (with `tags`, agents in the pool carrying every tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Tags every targeted agent must carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl Target {
    /// Whether an agent is aimed at. Agents named by id are always; pool/tag targets also
    /// reach agents that register later.
    pub fn includes(&self, agent: &AgentRecord) -> bool {
        if !self.agent_ids.is_empty() {
            return self.agent_ids.contains(&agent.info.agent_id);
        }
        agent.matches(self.pool.as_deref(), &self.tags)
    }
}

/// A snapshot as a caller asks for it (REST and MCP both build one).
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Agents by id (strings from the caller, validated here).
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Condition expression.
    pub condition: Option<String>,
    /// Watch expressions.
    pub watch: Vec<String>,
    /// Hits to collect (default 1, max 50).
    pub max_hits: Option<u32>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Capture a native backtrace too.
    pub backtrace: bool,
    /// Accept a location no target agent has reported yet (code that has not run).
    pub allow_pending: bool,
}

/// A dynamic log as a caller asks for it; also the body of `POST /api/v1/logs` (the
/// `place_log` tool's arguments).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogRequest {
    /// Agents by id.
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Text with `{expression}` placeholders.
    pub template: String,
    /// `trace`, `debug`, `info` (default), `warn`, `error`.
    pub level: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// `broker` (default), `app`, `both`.
    pub destination: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Stop after this many lines.
    pub max_lines: Option<u64>,
    /// Accept a location no agent has reported yet.
    pub allow_pending: bool,
}

/// A dynamic metric as a caller asks for it; also the body of `POST /api/v1/metrics`
/// (the `place_metric` tool's arguments).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricRequest {
    /// Agents by id.
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// `counter`, `duration`, `value`.
    pub kind: String,
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
    /// For tic-toc durations: where the clock stops.
    pub end_file: Option<String>,
    /// For tic-toc durations: the line where the clock stops.
    pub end_line: Option<u32>,
    /// For `value`: the numeric expression.
    pub expression: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Accept a location no agent has reported yet.
    pub allow_pending: bool,
}

/// Most lines a log action may be capped at.
pub const MAX_MAX_LINES: u64 = 1_000_000;

/// What every placement shares: target, location, condition, expiry.
struct Placement<'a> {
    agent_ids: &'a [String],
    pool: Option<&'a str>,
    tags: &'a [String],
    file: &'a str,
    line: u32,
    condition: Option<&'a str>,
    expire_seconds: Option<u64>,
    allow_pending: bool,
}

/// Where an action stands overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Installed or waiting to be, collecting hits.
    Active,
    /// Collected all its hits.
    Completed,
    /// Reached its expiry.
    Expired,
    /// Removed by a caller.
    Removed,
}

impl ActionStatus {
    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ActionStatus::Active => "active",
            ActionStatus::Completed => "completed",
            ActionStatus::Expired => "expired",
            ActionStatus::Removed => "removed",
        }
    }

    /// Parses a status filter.
    pub fn parse(s: &str) -> Option<ActionStatus> {
        match s {
            "active" => Some(ActionStatus::Active),
            "completed" => Some(ActionStatus::Completed),
            "expired" => Some(ActionStatus::Expired),
            "removed" => Some(ActionStatus::Removed),
            _ => None,
        }
    }
}

/// One agent's view of an action.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentActionView {
    /// The agent.
    pub agent_id: AgentId,
    /// Its display name.
    pub display_name: String,
    /// Its pool.
    #[serde(default)]
    pub pool: String,
    /// `pending`, `installed`, `error`, `paused`, `completed`, `eval_error`, `offline`.
    pub state: String,
    /// Why (errors, pauses), or what (callsites installed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Pause reason code (`quota_cpu`, `rate_limited`, ...), while paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The run-time expression error this agent reported (once), kept whatever the
    /// state is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_error: Option<String>,
    /// When this state was reported (Unix ms).
    pub updated_at_ms: u64,
}

/// A hit as stored and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredHit {
    /// The hit's id.
    pub hit_id: HitId,
    /// 1-based position in the action's hits; `since` cursors refer to it.
    pub index: u64,
    /// The agent that sent it.
    pub agent_id: AgentId,
    /// That agent's display name.
    pub agent_name: String,
    /// When the broker accepted it (Unix ms).
    pub received_at_ms: u64,
    /// The hit, truncated and redacted by the broker.
    #[serde(flatten)]
    pub hit: Hit,
}

/// An action with everything the broker knows about it.
#[derive(Debug)]
pub struct Action {
    /// What agents run.
    pub spec: ActionSpec,
    /// Whom it aims at.
    pub target: Target,
    /// Who placed it.
    pub created_by: String,
    /// When (Unix ms).
    pub created_at_ms: u64,
    /// Overall state.
    pub status: ActionStatus,
    /// When it ended (Unix ms).
    pub ended_at_ms: Option<u64>,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Per-agent state.
    pub agents: BTreeMap<AgentId, AgentActionView>,
    /// Hits, in arrival order.
    pub hits: Vec<StoredHit>,
    /// Hits refused because the action already had its hits or had ended.
    pub hits_refused: u64,
    /// Set when it was placed on a location no agent had reported yet.
    pub pending_note: Option<String>,
    /// A log action's lines.
    pub lines: LineBook,
    /// A metric action's figures.
    pub metric: Option<MetricData>,
    /// The organization it belongs to.
    pub org: String,
    /// The placing key's reach: the agents it may ever reach.
    pub reach: Reach,
    /// Pools it was aimed at or reached; a caller sees the action if it sees all of them.
    pub pools: BTreeSet<String>,
    /// Id of the key that placed it (its live-action quota is charged).
    pub created_by_key: String,
    /// Redaction rules that fired in what it collected, with counts.
    pub rules_fired: BTreeMap<String, u64>,
    /// Quota pauses reported, by reason.
    pub pauses: BTreeMap<String, u64>,
    /// What the broker dropped for it, over its own rates.
    pub dropped: ActionDrops,
    pause_last_ms: HashMap<String, u64>,
    /// Agents that refused one of its expressions a read of a redacted value; the first
    /// goes to the audit trail.
    redacted_reads: u64,
    hit_rates: HashMap<AgentId, Rate>,
    log_rates: Option<(Rate, Rate)>,
    changed: watch::Sender<u64>,
}

/// What the broker dropped for one action over its per-action rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ActionDrops {
    /// Snapshot hits over the per-agent rate of the action.
    pub snapshot_rate: u64,
    /// Log lines over the action's line or byte rate.
    pub log_rate: u64,
    /// When the broker last dropped something (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_drop_ms: Option<u64>,
    /// Set while the broker is dropping: from the first drop until it accepts again.
    #[serde(skip)]
    pub paused: bool,
}

/// An action's budgets: what it may still collect, what was dropped, what is paused.
#[derive(Debug, Clone, Serialize)]
pub struct ActionQuotaView {
    /// Snapshot hits it may still collect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits_remaining: Option<u64>,
    /// Log lines it may still collect (when capped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines_remaining: Option<u64>,
    /// Milliseconds until it expires (0 once ended).
    pub expires_in_ms: u64,
    /// Agents paused now, with the reason (`quota_cpu`, `quota_log`, `rate_limited`,
    /// `expired`).
    pub paused: Vec<serde_json::Value>,
    /// Quota pauses reported so far, by reason.
    pub pauses: BTreeMap<String, u64>,
    /// What the broker dropped over its own per-action rates.
    pub broker_dropped: ActionDrops,
    /// The rates in force for this action.
    pub limits: serde_json::Value,
}

impl Action {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn row(&self) -> ActionRow {
        ActionRow {
            id: self.spec.id.to_string(),
            spec: serde_json::to_string(&self.spec).unwrap_or_default(),
            target: serde_json::to_string(&self.target).unwrap_or_default(),
            created_by: self.created_by.clone(),
            created_at_ms: self.created_at_ms,
            status: self.status.as_str().to_owned(),
            ended_at_ms: self.ended_at_ms,
            end_reason: self.end_reason.clone(),
            pending_note: self.pending_note.clone(),
            hits_refused: self.hits_refused,
            org: self.org.clone(),
            created_by_key: self.created_by_key.clone(),
            reach: serde_json::to_string(&self.reach).ok(),
            pools: serde_json::to_string(&self.pools).ok(),
        }
    }

    /// The expressions, for the audit trail.
    fn expressions(&self) -> Expressions {
        let mut e = Expressions { condition: self.spec.condition.clone(), ..Expressions::default() };
        match &self.spec.kind {
            ActionKind::Snapshot(s) => e.watch = s.watch.clone(),
            ActionKind::Log(l) => e.template = Some(l.template.clone()),
            ActionKind::Metric(m) => e.expression = m.expression.clone(),
            _ => {}
        }
        e
    }

    /// An audit entry about this action.
    fn audit(&self, actor: Actor, kind: AuditKind) -> AuditEntry {
        let mut entry = AuditEntry::new(self.org.clone(), actor, kind)
            .target(serde_json::to_value(&self.target).unwrap_or_default());
        entry.action_id = Some(self.spec.id.to_string());
        entry.action_kind = Some(self.spec.kind.name().to_owned());
        entry.location = Some(self.spec.location.clone());
        entry.expressions = self.expressions();
        match &self.spec.kind {
            ActionKind::Snapshot(_) => entry.hits = Some(self.hits.len() as u64),
            ActionKind::Log(_) => entry.lines = Some(self.lines.total),
            _ => {}
        }
        entry.redaction_rules = self.rules_fired.clone();
        entry
    }

    /// Whether `p` may see this action: same organization, and every pool it was aimed
    /// at or reached is within `p`'s reach (an action that has reached no pool yet is
    /// visible to organization-wide keys only).
    pub fn visible_to(&self, p: &Principal) -> bool {
        if self.org != p.org() {
            return false;
        }
        if self.pools.is_empty() {
            return p.reach.group.is_none() && p.reach.pools.is_none();
        }
        self.pools.iter().all(|pool| p.sees_pool(&self.org, pool))
    }

    fn quota_view(&self, now: u64, ingest: &IngestSettings) -> ActionQuotaView {
        let paused = self
            .agents
            .values()
            .filter_map(|a| {
                a.pause_reason.as_ref().map(
                    |r| serde_json::json!({ "agent_id": a.agent_id, "reason": r, "by": "agent", "detail": a.detail }),
                )
            })
            // Paused by the broker from a drop until it accepts again (a minute at most, for
            // agents that stopped sending).
            .chain(self.dropped.last_drop_ms.filter(|t| self.dropped.paused && now.saturating_sub(*t) < 60_000).map(
                |_| {
                    let reason =
                        if matches!(self.spec.kind, ActionKind::Log(_)) { "quota_log" } else { "rate_limited" };
                    serde_json::json!({ "agent_id": null, "reason": reason, "by": "broker",
                                    "detail": "the broker is dropping what exceeds this action's rate" })
                },
            ))
            .collect();
        let (hits_remaining, lines_remaining) = match &self.spec.kind {
            ActionKind::Snapshot(s) => (Some(u64::from(s.max_hits).saturating_sub(self.hits.len() as u64)), None),
            ActionKind::Log(l) => (None, l.max_lines.map(|m| m.saturating_sub(self.lines.total))),
            _ => (None, None),
        };
        let limits = match &self.spec.kind {
            ActionKind::Snapshot(_) => serde_json::json!({
                "broker_hits_per_sec_per_agent": ingest.action_hits_per_sec,
                "burst_factor": ingest.burst_factor,
            }),
            ActionKind::Log(_) => serde_json::json!({
                "broker_lines_per_sec": ingest.action_log_lines_per_sec,
                "broker_bytes_per_sec": ingest.action_log_bytes_per_sec,
                "burst_factor": ingest.burst_factor,
            }),
            _ => serde_json::Value::Null,
        };
        ActionQuotaView {
            hits_remaining,
            lines_remaining,
            expires_in_ms: if self.status == ActionStatus::Active {
                self.spec.expires_at_ms.saturating_sub(now)
            } else {
                0
            },
            paused,
            pauses: self.pauses.clone(),
            broker_dropped: self.dropped,
            limits,
        }
    }

    fn max_hits(&self) -> u32 {
        match &self.spec.kind {
            ActionKind::Snapshot(s) => s.max_hits,
            _ => 0,
        }
    }

    /// The serializable summary.
    pub fn view(&self) -> ActionView {
        let (watch, backtrace) = match &self.spec.kind {
            ActionKind::Snapshot(s) => (s.watch.clone(), s.backtrace),
            _ => (Vec::new(), false),
        };
        let log = match &self.spec.kind {
            ActionKind::Log(l) => Some(l.clone()),
            _ => None,
        };
        let (metric, metric_figures) = match (&self.spec.kind, &self.metric) {
            (ActionKind::Metric(m), data) => {
                let names = self.agents.iter().map(|(id, a)| (id.clone(), a.display_name.clone())).collect();
                (Some(m.clone()), Some(data.clone().unwrap_or_default().view(m.metric, &names)))
            }
            _ => (None, None),
        };
        ActionView {
            action_id: self.spec.id.clone(),
            kind: self.spec.kind.name(),
            status: self.status,
            location: self.spec.location.clone(),
            condition: self.spec.condition.clone(),
            watch,
            backtrace,
            max_hits: self.max_hits(),
            hits: self.hits.len() as u64,
            hits_refused: self.hits_refused,
            created_by: self.created_by.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.spec.expires_at_ms,
            ended_at_ms: self.ended_at_ms,
            end_reason: self.end_reason.clone(),
            target: self.target.clone(),
            agents: self.agents.values().cloned().collect(),
            pending_note: self.pending_note.clone(),
            log,
            lines: self.lines.total,
            metric,
            figures: metric_figures,
            created_by_key: self.created_by_key.clone(),
            redaction_rules_fired: self.rules_fired.clone(),
            quota: None,
        }
    }
}

/// The serializable summary of an action.
#[derive(Debug, Clone, Serialize)]
pub struct ActionView {
    /// The action's id: the handle for `get_action` and `remove_action`.
    pub action_id: ActionId,
    /// `snapshot`, `log` or `metric`.
    pub kind: &'static str,
    /// Overall state.
    pub status: ActionStatus,
    /// Where.
    pub location: Location,
    /// Condition, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Watch expressions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// Whether hits carry a native backtrace.
    pub backtrace: bool,
    /// Hits to collect.
    pub max_hits: u32,
    /// Hits collected.
    pub hits: u64,
    /// Hits refused (beyond `max_hits`, after the end).
    pub hits_refused: u64,
    /// Who placed it.
    pub created_by: String,
    /// When (Unix ms).
    pub created_at_ms: u64,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
    /// When it ended (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// Why it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// Target as given.
    pub target: Target,
    /// Per-agent state.
    pub agents: Vec<AgentActionView>,
    /// Why the location is pending, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_note: Option<String>,
    /// A log's parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSpec>,
    /// Log lines received so far.
    pub lines: u64,
    /// A metric's parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricSpec>,
    /// A metric's figures: totals, per agent, and a short time series.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<MetricView>,
    /// Id of the key that placed it.
    pub created_by_key: String,
    /// Redaction rules that fired in what it collected, with counts (never values).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub redaction_rules_fired: BTreeMap<String, u64>,
    /// Remaining budgets, pauses and drops (in `get_action` and `GET /actions/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<ActionQuotaView>,
}

/// A page of hits after a cursor.
#[derive(Debug, Clone, Serialize)]
pub struct HitsPage {
    /// Hits with `index > since`, oldest first.
    pub hits: Vec<StoredHit>,
    /// Pass as `since` to get only newer hits.
    pub next_cursor: u64,
    /// More hits are stored after this page.
    pub has_more: bool,
}

/// Filters for listing actions.
#[derive(Debug, Clone, Default)]
pub struct ActionFilter {
    /// Only this status.
    pub status: Option<ActionStatus>,
    /// Only actions whose target includes this agent id, pool or tag.
    pub target: Option<String>,
    /// Only actions placed by this caller.
    pub created_by: Option<String>,
}

#[derive(Debug)]
struct Book {
    actions: HashMap<ActionId, Action>,
    /// Live actions by expiry, key and organization.
    live: LiveIndex,
    /// Which ended actions are kept (per organization, fair per key, by age).
    retention: Retention,
}

impl Book {
    fn new(max_ended_per_org: usize) -> Book {
        Book { actions: HashMap::new(), live: LiveIndex::default(), retention: Retention::new(max_ended_per_org) }
    }
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
    /// Hits refused (unknown or ended action, over its count, not a target).
    pub hits_refused: u64,
    /// Hits dropped over an action's per-agent rate.
    pub hits_rate_limited: u64,
    /// Dynamic log lines stored.
    pub lines_accepted: u64,
    /// Dynamic log lines refused (unknown or ended action, not a target).
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

/// What became of a frame of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinesIngested {
    /// Lines stored.
    pub kept: usize,
    /// Lines dropped over their action's rates.
    pub rate_limited: usize,
}

/// The action engine.
#[derive(Debug)]
pub struct Engine {
    /// Counters for `/metrics`.
    pub stats: EngineStats,
    /// Redaction rules applied to everything agents send.
    pub rules: Arc<crate::rules::Rules>,
    metric_interval_ms: u64,
    registry: Arc<Registry>,
    store: Option<Store>,
    keys: Option<Arc<KeyStore>>,
    ingest: IngestSettings,
    shutdown: watch::Receiver<bool>,
    limits: CaptureLimits,
    max_ended: usize,
    org_quotas: OrgCeilings,
    repeats: Repeats,
    book: Mutex<Book>,
}

/// What a location lookup over a set of agents found.
enum LocationMatch {
    /// At least one callsite at this file and line, of these kinds.
    Found(Vec<LocationKind>),
    /// The file is known but not the line; nearest known locations in it.
    Nearest(Vec<CatalogEntry>),
    /// No target agent has reported the file; some known files that look alike.
    UnknownFile(Vec<String>),
    /// The suffix matches several different files.
    Ambiguous(Vec<String>),
}

impl Engine {
    /// An engine over a registry.
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
            store: None,
            keys: None,
            ingest: IngestSettings::default(),
            shutdown,
            limits,
            max_ended,
            org_quotas: OrgCeilings::default(),
            repeats: Repeats::default(),
            book: Mutex::new(Book::new(max_ended)),
            stats: EngineStats::default(),
            metric_interval_ms: 5_000,
        }
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

    /// The per-action and per-agent rates in force.
    pub fn ingest(&self) -> &IngestSettings {
        &self.ingest
    }

    fn tenancy(&self) -> Arc<Tenancy> {
        self.keys.as_ref().map_or_else(|| Arc::new(Tenancy::default()), |k| Arc::clone(&k.current().tenancy))
    }

    /// Appends an entry to the audit trail (through the store's writer; dropped, with a
    /// log line, when the broker runs without a store).
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
        if let Some(store) = &self.store {
            store.put_audit(entry.row());
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

    /// Sets how often agents report metric aggregates.
    pub fn with_metric_interval(mut self, ms: u64) -> Self {
        self.metric_interval_ms = ms.clamp(1_000, 3_600_000);
        self
    }

    /// Makes the engine durable: loads what `store` holds and writes every change to it.
    pub fn with_store(mut self, store: Store, loaded: Loaded) -> Result<Self, StoreError> {
        let Loaded { actions, hits, lines, metrics, settings: _, identities: _ } = loaded;
        let corrupt =
            |what: &'static str, detail: String| StoreError::Corrupt { path: store.path().to_owned(), what, detail };
        let mut book = Book::new(self.max_ended);
        let mut forget = Vec::new();
        for row in actions {
            let spec: ActionSpec = serde_json::from_str(&row.spec).map_err(|e| corrupt("action", e.to_string()))?;
            let target: Target = serde_json::from_str(&row.target).map_err(|e| corrupt("target", e.to_string()))?;
            let status =
                ActionStatus::parse(&row.status).ok_or_else(|| corrupt("action status", row.status.clone()))?;
            let key = row.created_by_key.clone();
            match (status, row.ended_at_ms) {
                (ActionStatus::Active, _) => book.live.insert(&row.org, &key, spec.expires_at_ms, spec.id.clone()),
                (_, ended) => {
                    // Rows come oldest first: a bound lowered since they were written
                    // forgets the oldest ones of whoever holds the most.
                    let ended = ended.unwrap_or(row.created_at_ms);
                    forget.extend(book.retention.keep(&row.org, &key, ended, spec.id.clone()));
                }
            }
            let reach = match row.reach.as_deref() {
                Some(r) => serde_json::from_str(r).map_err(|e| corrupt("action reach", e.to_string()))?,
                None => Reach::org(row.org.clone()),
            };
            let mut pools: BTreeSet<String> =
                row.pools.as_deref().and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default();
            pools.extend(target.pool.clone());
            let log_rates = matches!(spec.kind, ActionKind::Log(_))
                .then(|| (self.ingest.action_lines(), self.ingest.action_log_bytes()));
            book.actions.insert(
                spec.id.clone(),
                Action {
                    org: row.org,
                    reach,
                    pools,
                    created_by_key: row.created_by_key,
                    rules_fired: BTreeMap::new(),
                    pauses: BTreeMap::new(),
                    dropped: ActionDrops::default(),
                    pause_last_ms: HashMap::new(),
                    redacted_reads: 0,
                    hit_rates: HashMap::new(),
                    log_rates,
                    spec,
                    target,
                    created_by: row.created_by,
                    created_at_ms: row.created_at_ms,
                    status,
                    ended_at_ms: row.ended_at_ms,
                    end_reason: row.end_reason,
                    agents: BTreeMap::new(),
                    hits: Vec::new(),
                    hits_refused: row.hits_refused,
                    pending_note: row.pending_note,
                    lines: LineBook::default(),
                    metric: None,
                    changed: watch::channel(0).0,
                },
            );
        }
        for id in &forget {
            book.actions.remove(id);
            store.delete_action(id.as_str());
        }
        for row in lines {
            let line: StoredLine = serde_json::from_str(&row.body).map_err(|e| corrupt("log line", e.to_string()))?;
            if let Some(action) = ActionId::parse(&row.action_id).ok().and_then(|id| book.actions.get_mut(&id)) {
                for f in &line.line.redactions {
                    *action.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
                }
                action.lines.restore(line);
            }
        }
        for (id, body) in metrics {
            let data: MetricData = serde_json::from_str(&body).map_err(|e| corrupt("metric", e.to_string()))?;
            if let Some(action) = ActionId::parse(&id).ok().and_then(|id| book.actions.get_mut(&id)) {
                action.metric = Some(data);
            }
        }
        for row in hits {
            let hit: StoredHit = serde_json::from_str(&row.body).map_err(|e| corrupt("hit", e.to_string()))?;
            if let Some(action) = ActionId::parse(&row.action_id).ok().and_then(|id| book.actions.get_mut(&id)) {
                for f in &hit.hit.redactions {
                    *action.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
                }
                action.hits.push(hit);
            }
        }
        for action in book.actions.values_mut() {
            action.hits.sort_by_key(|h| h.index);
        }
        tracing::info!(
            actions = book.actions.len(),
            live = book.live.len(),
            forgotten = forget.len(),
            db = %store.path().display(),
            "restored actions from the store"
        );
        self.book = Mutex::new(book);
        self.store = Some(store);
        Ok(self)
    }

    fn persist(&self, action: &Action) {
        if let Some(store) = &self.store {
            store.put_action(action.row());
        }
    }

    /// Forgets ended actions (with their hits, lines and figures) that ended before
    /// `cutoff_ms`, in memory and in the store (`store.hit_retention_days`).
    pub fn purge_before(&self, cutoff_ms: u64) {
        let mut book = self.book();
        let old = book.retention.expire_before(cutoff_ms);
        for id in &old {
            book.actions.remove(id);
        }
        drop(book);
        if let Some(store) = &self.store {
            for id in &old {
                store.delete_action(id.as_str());
            }
            // And whatever the store holds that memory no longer does.
            store.purge_before(cutoff_ms);
        }
        if !old.is_empty() {
            tracing::info!(actions = old.len(), "forgot ended actions past their retention");
        }
    }

    /// Deletes audit entries older than `cutoff_ms` (the audit trail's own retention).
    pub fn purge_audit_before(&self, cutoff_ms: u64) {
        if let Some(store) = &self.store {
            store.purge_audit_before(cutoff_ms);
        }
    }

    /// Replaces an organization's redaction rules: compiled, persisted, pushed to every
    /// online agent of the organization, and audited; hits after this carry the new
    /// version.
    pub fn replace_rules(
        &self,
        org: &str,
        config: periscope_redaction::RedactionConfig,
        actor: Actor,
    ) -> Result<periscope_redaction::RedactionConfig, ApiError> {
        let config = self.rules.replace(org, config).map_err(|e| ApiError::invalid(format!("redaction rules: {e}")))?;
        if let Some(store) = &self.store {
            store.put_setting(&crate::rules::setting_key(org), serde_json::to_string(&config).unwrap_or_default());
        }
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

    /// Waits until everything written so far is durable.
    pub fn flush(&self) {
        if let Some(store) = &self.store {
            store.flush(Duration::from_secs(5));
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // The book is only mutated in short, panic-free sections; a poisoned lock still
        // holds consistent data.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The capture limits the broker applies.
    pub fn limits(&self) -> &CaptureLimits {
        &self.limits
    }

    /// Validates and places a snapshot; returns its view.
    pub fn place_snapshot(&self, req: SnapshotRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        let max_hits = req.max_hits.unwrap_or(action_bounds::DEFAULT_MAX_HITS);
        if !(1..=action_bounds::MAX_MAX_HITS).contains(&max_hits) {
            return Err(ApiError::invalid(format!(
                "max_hits is {max_hits}; allowed range is 1..={} (default {})",
                action_bounds::MAX_MAX_HITS,
                action_bounds::DEFAULT_MAX_HITS
            ))
            .with_details(serde_json::json!({"field": "max_hits", "min": 1, "max": action_bounds::MAX_MAX_HITS})));
        }
        if req.watch.len() > action_bounds::MAX_WATCHES {
            return Err(ApiError::invalid(format!(
                "{} watch expressions given; at most {} are allowed",
                req.watch.len(),
                action_bounds::MAX_WATCHES
            )));
        }
        let watch: Vec<String> = req.watch.iter().map(|w| w.trim().to_owned()).collect();
        let kind = ActionKind::Snapshot(SnapshotSpec { max_hits, watch, backtrace: req.backtrace });
        let placement = Placement {
            agent_ids: &req.agent_ids,
            pool: req.pool.as_deref(),
            tags: &req.tags,
            file: &req.file,
            line: req.line,
            condition: req.condition.as_deref(),
            expire_seconds: req.expire_seconds,
            allow_pending: req.allow_pending,
        };
        self.place(placement, kind, caller)
    }

    /// Validates and places a dynamic log; returns its view.
    pub fn place_log(&self, req: LogRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        if req.template.trim().is_empty() {
            return Err(ApiError::invalid(
                "template must not be empty; write text with {expression} placeholders, e.g. \"user {user.id} paid {amount}\"",
            ));
        }
        let level = match req.level.as_deref().map(str::trim).unwrap_or("info") {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" => LogLevel::Error,
            other => {
                return Err(ApiError::invalid(format!(
                    "level `{}` must be one of trace, debug, info, warn, error",
                    truncate(other)
                )));
            }
        };
        let destination = match req.destination.as_deref().map(str::trim).unwrap_or("broker") {
            "broker" => LogDestination::Broker,
            "app" => LogDestination::App,
            "both" => LogDestination::Both,
            other => {
                return Err(ApiError::invalid(format!(
                    "destination `{}` must be broker (stored here), app (the service's own log) or both",
                    truncate(other)
                )));
            }
        };
        if let Some(n) = req.max_lines
            && !(1..=MAX_MAX_LINES).contains(&n)
        {
            return Err(ApiError::invalid(format!("max_lines is {n}; allowed range is 1..={MAX_MAX_LINES}")));
        }
        let kind =
            ActionKind::Log(LogSpec { template: req.template.clone(), level, destination, max_lines: req.max_lines });
        let placement = Placement {
            agent_ids: &req.agent_ids,
            pool: req.pool.as_deref(),
            tags: &req.tags,
            file: &req.file,
            line: req.line,
            condition: req.condition.as_deref(),
            expire_seconds: req.expire_seconds,
            allow_pending: req.allow_pending,
        };
        self.place(placement, kind, caller)
    }

    /// Validates and places a dynamic metric; returns its view.
    pub fn place_metric(&self, req: MetricRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        let metric = match req.kind.trim() {
            "counter" => MetricKind::Counter,
            "duration" => MetricKind::Duration,
            "value" => MetricKind::Value,
            other => {
                return Err(ApiError::invalid(format!(
                    "kind `{}` must be counter (hits at the location), duration (a span's open time, or from \
                     file:line to end_file:end_line) or value (a numeric expression sampled at the location)",
                    truncate(other)
                )));
            }
        };
        let end_location = match (&req.end_file, req.end_line) {
            (None, None) => None,
            (Some(file), Some(line)) => {
                if metric != MetricKind::Duration {
                    return Err(ApiError::invalid("end_file and end_line are only used by duration metrics"));
                }
                let (file, line) = validate_location(file, line)?;
                Some(Location { file, line })
            }
            _ => return Err(ApiError::invalid("give both end_file and end_line (or neither)")),
        };
        let expression = req.expression.as_deref().map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned);
        match (metric, &expression) {
            (MetricKind::Value, None) => {
                return Err(ApiError::invalid(
                    "a value metric needs an `expression`: the number to sample, e.g. `order.total_cents / 100`",
                ));
            }
            (MetricKind::Counter | MetricKind::Duration, Some(_)) => {
                return Err(ApiError::invalid("`expression` is only used by value metrics"));
            }
            _ => {}
        }
        let kind = ActionKind::Metric(MetricSpec {
            metric,
            expression,
            end_location,
            report_interval_ms: self.metric_interval_ms,
        });
        let placement = Placement {
            agent_ids: &req.agent_ids,
            pool: req.pool.as_deref(),
            tags: &req.tags,
            file: &req.file,
            line: req.line,
            condition: req.condition.as_deref(),
            expire_seconds: req.expire_seconds,
            allow_pending: req.allow_pending,
        };
        self.place(placement, kind, caller)
    }

    /// What every kind shares: bounds, expressions, target, location, then insertion.
    fn place(&self, p: Placement<'_>, kind: ActionKind, caller: &Principal) -> Result<ActionView, ApiError> {
        let expire = p.expire_seconds.unwrap_or(action_bounds::DEFAULT_EXPIRE_SECS);
        if !(1..=action_bounds::MAX_EXPIRE_SECS).contains(&expire) {
            return Err(ApiError::invalid(format!(
                "expire_seconds is {expire}; allowed range is 1..={} (default {})",
                action_bounds::MAX_EXPIRE_SECS,
                action_bounds::DEFAULT_EXPIRE_SECS
            ))
            .with_details(
                serde_json::json!({"field": "expire_seconds", "min": 1, "max": action_bounds::MAX_EXPIRE_SECS}),
            ));
        }
        let (file, line) = validate_location(p.file, p.line)?;
        let condition = p.condition.map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned);
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: Location { file, line },
            condition,
            expires_at_ms: now_ms() + expire * 1_000,
            kind,
        };
        check_expressions(&spec)?;
        let target = self.resolve_target(p.agent_ids, p.pool, p.tags, caller)?;
        let tenancy = Arc::clone(&caller.tenancy);
        let agents = self.matching_agents(&target, &caller.reach, &tenancy);
        if agents.is_empty() {
            return Err(self.no_matching_agents(&target, caller));
        }
        let what = spec.kind.name();
        let mut pending_note = self.check_location(&agents, &spec.location, p.allow_pending, what)?;
        if let ActionKind::Metric(m) = &spec.kind {
            if let Some(end) = &m.end_location {
                if let Some(note) = self.check_location(&agents, end, p.allow_pending, what)? {
                    pending_note = Some(note);
                }
            } else if m.metric == MetricKind::Duration
                && let LocationMatch::Found(kinds) = self.find_location(&agents, &spec.location)
                && !kinds.contains(&LocationKind::Span)
            {
                return Err(ApiError::invalid(format!(
                    "{} is an event, which has no duration; place the duration on a span location (see \
                             list_sources, kind span), or give end_file and end_line to time from this event to \
                             another location",
                    spec.location
                )));
            }
        }
        self.insert(spec, target, caller, pending_note, agents)
    }

    /// Checks a location against the target agents' catalogs: `Ok(None)` when known,
    /// `Ok(Some(note))` when accepted as pending, the specific error otherwise.
    fn check_location(
        &self,
        agents: &[(AgentId, String, String)],
        location: &Location,
        allow_pending: bool,
        what: &str,
    ) -> Result<Option<String>, ApiError> {
        match self.find_location(agents, location) {
            LocationMatch::Found(_) => Ok(None),
            LocationMatch::Ambiguous(files) => Err(ApiError::invalid(format!(
                "file `{}` matches several files: {}; give more of the path",
                location.file,
                files.join(", ")
            ))
            .with_details(serde_json::json!({ "candidates": files }))),
            LocationMatch::Nearest(nearest) if !allow_pending => Err(no_such_location(location, nearest)),
            LocationMatch::UnknownFile(files) if !allow_pending => Err(ApiError::new(
                ErrorCode::NoSuchLocation,
                format!(
                    "no target agent has reported any location in a file matching `{}`; use list_sources to \
                     find inspectable locations, or pass allow_pending=true if that code has simply not run yet",
                    location.file
                ),
            )
            .with_details(serde_json::json!({ "similar_files": files, "nearest": [] }))),
            LocationMatch::Nearest(_) | LocationMatch::UnknownFile(_) => Ok(Some(format!(
                "no target agent has seen code run at {location} yet; the {what} is armed and will start once a \
                 callsite there registers"
            ))),
        }
    }

    fn insert(
        &self,
        spec: ActionSpec,
        target: Target,
        caller: &Principal,
        pending_note: Option<String>,
        agents: Vec<(AgentId, String, String)>,
    ) -> Result<ActionView, ApiError> {
        let now = now_ms();
        let mut book = self.book();
        // The key's quota and its organization's ceiling, checked together under the
        // book's lock: concurrent placements cannot both take the last slot.
        let retry = |soonest: Option<u64>| soonest.unwrap_or(now).saturating_sub(now).div_ceil(1_000).max(1);
        let limit = caller.quotas.live_actions as usize;
        let live = book.live.count_key(&caller.key_id);
        if live >= limit {
            // When the caller's soonest action expires, a slot frees by itself.
            let retry_after = retry(book.live.soonest_key(&caller.key_id));
            return Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "you already have {live} live actions (the limit is {limit}); remove one with remove_action \
                     (list_actions with status=active shows them), or retry in {retry_after} s when the soonest one \
                     expires"
                ),
            )
            .with_details(serde_json::json!({
                "quota": "live_actions",
                "limit": limit,
                "retry_after_seconds": retry_after,
            })));
        }
        let org_limit = self.org_quotas.live_actions as usize;
        let org_live = book.live.count_org(caller.org());
        if org_live >= org_limit {
            let retry_after = retry(book.live.soonest_org(caller.org()));
            return Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "your organization already has {org_live} live actions, its ceiling over all keys \
                     (org_quotas.live_actions); remove one, or retry in {retry_after} s when the soonest one expires"
                ),
            )
            .with_details(serde_json::json!({
                "quota": "org_live_actions",
                "limit": org_limit,
                "retry_after_seconds": retry_after,
            })));
        }
        let mut statuses = BTreeMap::new();
        let mut pools: BTreeSet<String> = target.pool.iter().cloned().collect();
        for (agent_id, name, pool) in &agents {
            pools.insert(pool.clone());
            statuses.insert(
                agent_id.clone(),
                AgentActionView {
                    agent_id: agent_id.clone(),
                    display_name: name.clone(),
                    pool: pool.clone(),
                    state: "pending".into(),
                    detail: None,
                    pause_reason: None,
                    eval_error: None,
                    updated_at_ms: now,
                },
            );
        }
        let action = Action {
            org: caller.org().to_owned(),
            reach: caller.reach.clone(),
            pools,
            created_by_key: caller.key_id.clone(),
            rules_fired: BTreeMap::new(),
            pauses: BTreeMap::new(),
            dropped: ActionDrops::default(),
            pause_last_ms: HashMap::new(),
            redacted_reads: 0,
            hit_rates: HashMap::new(),
            log_rates: matches!(spec.kind, ActionKind::Log(_))
                .then(|| (self.ingest.action_lines(), self.ingest.action_log_bytes())),
            spec: spec.clone(),
            target,
            created_by: caller.name.clone(),
            created_at_ms: now,
            status: ActionStatus::Active,
            ended_at_ms: None,
            end_reason: None,
            agents: statuses,
            hits: Vec::new(),
            hits_refused: 0,
            pending_note,
            lines: LineBook::default(),
            metric: matches!(spec.kind, ActionKind::Metric(_)).then(MetricData::default),
            changed: watch::channel(0).0,
        };
        let view = action.view();
        self.persist(&action);
        let mut entry = action.audit(caller.actor(), AuditKind::ActionPlaced);
        entry.hits = None;
        entry.lines = None;
        entry.detail = format!("placed a {} at {}", action.spec.kind.name(), action.spec.location);
        entry.data = serde_json::json!({
            "agents": agents.iter().map(|(id, _, _)| id).collect::<Vec<_>>(),
            "expires_at_ms": action.spec.expires_at_ms,
            "max_hits": action.max_hits(),
            "pending": action.pending_note.is_some(),
        });
        book.live.insert(caller.org(), &caller.key_id, spec.expires_at_ms, spec.id.clone());
        book.actions.insert(spec.id.clone(), action);
        drop(book);
        self.audit(entry);
        for (agent_id, _, _) in agents {
            self.registry.send(&agent_id, BrokerMessage::ActionAdd { action: spec.clone() });
        }
        tracing::info!(action = %spec.id, location = %spec.location, caller = %caller.name, "action placed");
        Ok(view)
    }

    fn resolve_target(
        &self,
        agent_ids: &[String],
        pool: Option<&str>,
        tags: &[String],
        caller: &Principal,
    ) -> Result<Target, ApiError> {
        let pool = pool.map(str::trim).filter(|p| !p.is_empty());
        if agent_ids.is_empty() && pool.is_none() && tags.is_empty() {
            return Err(ApiError::invalid(
                "say which agents to target: `agent_ids`, or `pool` (optionally with `tags`), or `tags`; \
                 list_agents shows what is connected",
            ));
        }
        if !agent_ids.is_empty() && (pool.is_some() || !tags.is_empty()) {
            return Err(ApiError::invalid("give either `agent_ids` or `pool`/`tags`, not both"));
        }
        if agent_ids.len() > 100 || tags.len() > 32 {
            return Err(ApiError::invalid("at most 100 agent ids and 32 tags per target"));
        }
        let mut ids = Vec::with_capacity(agent_ids.len());
        for raw in agent_ids {
            let id = AgentId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("agent_ids: {e}")))?;
            // An agent out of the caller's reach answers exactly like one that does not exist.
            let visible = self.registry.with(&id, |a| caller.sees_pool(&a.org, &a.info.pool)).unwrap_or(false);
            if !visible {
                return Err(ApiError::not_found(format!("no agent `{id}` is known; list_agents shows the agents")));
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if let Some(p) = pool {
            let mut known = caller.tenancy.assigned_pools(caller.org()).contains_key(p);
            if !known {
                self.registry.for_each(|a| known |= a.org == caller.org() && a.info.pool == p);
            }
            if !known || !caller.sees_pool(caller.org(), p) {
                return Err(ApiError::not_found(format!(
                    "no pool `{}` is known to your key; list_agents shows the pools you can use",
                    truncate(p)
                ))
                .with_details(serde_json::json!({ "online_pools": self.online_pools(caller) })));
            }
        }
        Ok(Target { agent_ids: ids, pool: pool.map(str::to_owned), tags: tags.to_vec() })
    }

    /// Online agents of the caller's organization the target includes within `reach`,
    /// with display names and pools.
    fn matching_agents(&self, target: &Target, reach: &Reach, tenancy: &Tenancy) -> Vec<(AgentId, String, String)> {
        let mut out = Vec::new();
        self.registry.for_each(|a| {
            if a.online() && target.includes(a) && reach.allows(&a.org, &a.info.pool, tenancy) {
                out.push((a.info.agent_id.clone(), a.info.display_name.clone(), a.info.pool.clone()));
            }
        });
        out.sort();
        out
    }

    /// Pools with agents online that the caller can see, with their tags.
    fn online_pools(&self, caller: &Principal) -> Vec<serde_json::Value> {
        let mut pools: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        self.registry.for_each(|a| {
            if a.online() && caller.sees_pool(&a.org, &a.info.pool) {
                pools.entry(a.info.pool.clone()).or_default().extend(a.info.tags.iter().cloned());
            }
        });
        pools
            .into_iter()
            .map(|(pool, tags)| {
                let mut tags: Vec<String> = tags.into_iter().collect();
                tags.sort();
                serde_json::json!({ "pool": pool, "tags": tags })
            })
            .collect()
    }

    fn no_matching_agents(&self, target: &Target, caller: &Principal) -> ApiError {
        let available = self.online_pools(caller);
        let what = if !target.agent_ids.is_empty() {
            "none of the given agents is online".to_owned()
        } else {
            format!(
                "no online agent is in pool {} with tags [{}]",
                target.pool.as_deref().unwrap_or("(any)"),
                target.tags.join(", ")
            )
        };
        ApiError::new(ErrorCode::NoMatchingAgents, format!("{what}; list_agents shows who is connected"))
            .with_details(serde_json::json!({ "online_pools": available }))
    }

    fn find_location(&self, agents: &[(AgentId, String, String)], location: &Location) -> LocationMatch {
        let mut files: HashSet<String> = HashSet::new();
        let mut in_file: Vec<CatalogEntry> = Vec::new();
        let mut all_files: HashSet<String> = HashSet::new();
        for (id, _, _) in agents {
            self.registry.with(id, |rec| {
                for e in rec.catalog.values() {
                    if all_files.len() < 10_000 {
                        all_files.insert(e.file.clone());
                    }
                    if location.file_matches(&e.file) {
                        files.insert(e.file.clone());
                        in_file.push(e.clone());
                    }
                }
                for f in rec.files.values() {
                    if all_files.len() < 10_000 {
                        all_files.insert(f.file.clone());
                    }
                    if location.file_matches(&f.file) {
                        files.insert(f.file.clone());
                        in_file.extend(file_locations_near(f, location.line));
                    }
                }
            });
        }
        if files.len() > 1 {
            let mut files: Vec<String> = files.into_iter().collect();
            files.sort();
            return LocationMatch::Ambiguous(files);
        }
        let mut kinds: Vec<LocationKind> = in_file.iter().filter(|e| e.line == location.line).map(|e| e.kind).collect();
        if !kinds.is_empty() {
            kinds.sort();
            kinds.dedup();
            return LocationMatch::Found(kinds);
        }
        if !in_file.is_empty() {
            in_file.sort_by_key(|e| (e.line.abs_diff(location.line), e.line, e.kind));
            in_file.dedup_by(|a, b| a.line == b.line && a.kind == b.kind && a.name == b.name);
            in_file.truncate(5);
            return LocationMatch::Nearest(in_file);
        }
        let base = location.file.rsplit(['/', '\\']).next().unwrap_or(&location.file).to_ascii_lowercase();
        let stem = base.split('.').next().unwrap_or(&base).to_owned();
        let mut similar: Vec<String> = all_files
            .into_iter()
            .filter(|f| {
                let f = f.to_ascii_lowercase();
                !stem.is_empty() && f.contains(&stem)
            })
            .collect();
        similar.sort();
        similar.truncate(10);
        LocationMatch::UnknownFile(similar)
    }

    /// Live actions an agent should run: sent as an `ActionSync` when it registers. Pool
    /// and tag targets reach agents that joined after the action was placed, within the
    /// action's organization and reach.
    pub fn on_agent_registered(&self, agent_id: &AgentId) -> Vec<ActionSpec> {
        let Some((pool, tags, name, org)) = self
            .registry
            .with(agent_id, |r| (r.info.pool.clone(), r.info.tags.clone(), r.info.display_name.clone(), r.org.clone()))
        else {
            return Vec::new();
        };
        let tenancy = self.tenancy();
        let now = now_ms();
        let mut book = self.book();
        let mut specs = Vec::new();
        let live: Vec<ActionId> = book.live.ids_in_org(&org).cloned().collect();
        for id in live {
            let Some(action) = book.actions.get_mut(&id) else { continue };
            if action.status != ActionStatus::Active || action.org != org {
                continue;
            }
            let included = if action.target.agent_ids.is_empty() {
                action.target.pool.as_deref().is_none_or(|p| p == pool)
                    && action.target.tags.iter().all(|t| tags.contains(t))
            } else {
                action.target.agent_ids.contains(agent_id)
            };
            if !included || !action.reach.allows(&org, &pool, &tenancy) {
                continue;
            }
            specs.push(action.spec.clone());
            let entry = action.agents.entry(agent_id.clone()).or_insert_with(|| AgentActionView {
                agent_id: agent_id.clone(),
                display_name: name.clone(),
                pool: pool.clone(),
                state: "pending".into(),
                detail: None,
                pause_reason: None,
                eval_error: None,
                updated_at_ms: now,
            });
            if entry.state == "offline" {
                entry.state = "pending".into();
                entry.detail = None;
                entry.updated_at_ms = now;
            }
            if action.pools.insert(pool.clone())
                && let Some(store) = &self.store
            {
                store.put_action(action.row());
            }
            action.bump();
        }
        specs
    }

    /// Marks the agent offline in the live actions of its organization it runs.
    pub fn on_agent_disconnected(&self, from: &Sender) {
        let now = now_ms();
        let mut book = self.book();
        let live: Vec<ActionId> = book.live.ids_in_org(&from.org).cloned().collect();
        for id in live {
            let Some(action) = book.actions.get_mut(&id) else { continue };
            if action.status != ActionStatus::Active || action.org != from.org {
                continue;
            }
            if let Some(a) = action.agents.get_mut(&from.id) {
                a.state = "offline".into();
                a.detail = Some("the agent disconnected; the action resumes when it reconnects".into());
                a.updated_at_ms = now;
                action.bump();
            }
        }
    }

    /// Records an action state reported by an agent (of the action's organization, and
    /// one the action runs on; anything else is ignored). A quota pause is counted, and
    /// the first pause of an episode (per action and reason) goes to the audit trail, as
    /// does the first expression refused a read of a redacted value (per action).
    pub fn on_status(&self, from: &Sender, action_id: &ActionId, state: AgentActionState) {
        let now = now_ms();
        let agent_id = &from.id;
        let mut book = self.book();
        let Some(action) = book.actions.get_mut(action_id).filter(|a| a.org == from.org) else { return };
        let Some(entry) = action.agents.get_mut(agent_id) else { return };
        let mut paused = None;
        let mut redacted_read = None;
        let (label, detail, pause) = match state {
            AgentActionState::Installed { callsites } => {
                ("installed", Some(format!("armed on {callsites} callsite(s)")), None)
            }
            AgentActionState::Pending => {
                ("pending", Some("armed; waiting for code at the location to run for the first time".into()), None)
            }
            AgentActionState::Error { reason } => ("error", Some(agent_text(&reason)), None),
            AgentActionState::Paused { reason, message } => {
                let reason = reason.as_str().to_owned();
                self.stats.add(from, |s| *s.quota_pauses.entry(reason.clone()).or_insert(0) += 1);
                paused = Some((reason.clone(), agent_text(&message)));
                ("paused", Some(agent_text(&message)), Some(reason))
            }
            AgentActionState::Resumed => ("installed", Some("resumed".into()), None),
            AgentActionState::Completed => ("completed", None, None),
            AgentActionState::EvalError { reason, code } => {
                if code.as_deref() == Some("redacted") {
                    redacted_read = Some(agent_text(&reason));
                }
                entry.eval_error = Some(agent_text(&reason));
                ("eval_error", Some(agent_text(&reason)), None)
            }
        };
        entry.state = label.into();
        entry.detail = detail;
        entry.pause_reason = pause;
        entry.updated_at_ms = now;
        let mut audit = paused.and_then(|(reason, message)| {
            let data = serde_json::json!({ "reason": reason, "agent_id": agent_id, "by": "agent", "message": message });
            Self::pause_episode(action, &reason, now, data)
        });
        if let Some(reason) = redacted_read {
            action.redacted_reads += 1;
            if action.redacted_reads == 1 {
                // Whoever placed the action wrote the expression.
                let actor = Actor::Key { id: action.created_by_key.clone(), name: action.created_by.clone() };
                let mut entry = action.audit(actor, AuditKind::RedactedReadRefused);
                entry.detail = "an expression of the action tried to read a value that redaction hides; the agent \
                                refused it"
                    .into();
                entry.data = serde_json::json!({ "agent_id": agent_id, "reason": reason });
                audit = Some(entry);
            }
        }
        action.bump();
        drop(book);
        if let Some(entry) = audit {
            self.audit(entry);
        }
    }

    /// Counts a quota pause of an action; returns the audit entry when it starts a new
    /// episode (no pause for the same reason in the last [`PAUSE_EPISODE_GAP_MS`]).
    fn pause_episode(action: &mut Action, reason: &str, now: u64, data: serde_json::Value) -> Option<AuditEntry> {
        *action.pauses.entry(reason.to_owned()).or_insert(0) += 1;
        let last = action.pause_last_ms.insert(reason.to_owned(), now);
        if last.is_some_and(|t| now.saturating_sub(t) < PAUSE_EPISODE_GAP_MS) {
            return None;
        }
        let mut entry = action.audit(Actor::System, AuditKind::ActionPaused);
        entry.detail = format!("paused by a quota ({reason})");
        entry.data = data;
        Some(entry)
    }

    /// Accepts a hit from an agent: re-applies redaction and capture limits, enforces
    /// the action's per-agent rate, stores it, and completes the action when it has its
    /// hits.
    pub fn ingest_hit(&self, from: &Sender, mut hit: Hit) -> Ingested {
        // Never trust an agent: its findings must name rules the broker knows, and
        // redaction and the same limits again (a no-op for honest agents). Keys are
        // known here too, so a `password` field is caught by name.
        let redactor = self.rules.redactor(&from.org);
        self.count_unknown_rules(from, keep_known_findings(&redactor, &mut hit.redactions));
        redactor.redact_hit(&mut hit);
        hit.enforce_limits(&self.limits);
        let now = now_ms();
        let mut book = self.book();
        let Some(action) = book.actions.get_mut(&hit.action_id) else {
            self.stats.add(from, |s| s.hits_refused += 1);
            return Ingested::Refused;
        };
        let targeted = action.org == from.org && action.agents.contains_key(&from.id);
        if !targeted || action.status != ActionStatus::Active || action.hits.len() as u32 >= action.max_hits() {
            action.hits_refused += 1;
            self.stats.add(from, |s| s.hits_refused += 1);
            return Ingested::Refused;
        }
        let ingest = &self.ingest;
        let rate = action.hit_rates.entry(from.id.clone()).or_insert_with(|| ingest.action_hits());
        if rate.take(1).is_err() {
            action.dropped.snapshot_rate += 1;
            action.dropped.last_drop_ms = Some(now);
            action.dropped.paused = true;
            self.stats.add(from, |s| s.hits_rate_limited += 1);
            let data = serde_json::json!({
                "reason": "rate_limited", "agent_id": from.id, "by": "broker",
                "message": format!("the broker dropped hits above {}/s for this action from this agent",
                                   self.ingest.action_hits_per_sec),
            });
            let audit = Self::pause_episode(action, "rate_limited", now, data);
            action.bump();
            drop(book);
            if let Some(e) = audit {
                self.audit(e);
            }
            return Ingested::RateLimited;
        }
        self.stats.add(from, |s| s.hits_accepted += 1);
        action.dropped.paused = false;
        for f in &hit.redactions {
            *action.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
        }
        let index = action.hits.len() as u64 + 1;
        let stored = StoredHit {
            hit_id: HitId::generate(),
            index,
            agent_id: from.id.clone(),
            agent_name: from.name.clone(),
            received_at_ms: now,
            hit,
        };
        if let Some(store) = &self.store {
            store.put_hit(HitRow {
                action_id: action.spec.id.to_string(),
                idx: index,
                body: serde_json::to_string(&stored).unwrap_or_default(),
                received_at_ms: stored.received_at_ms,
            });
        }
        action.hits.push(stored);
        let complete = action.hits.len() as u32 >= action.max_hits();
        let id = action.spec.id.clone();
        if complete {
            let ended = self.end(&mut book, &id, ActionStatus::Completed, "collected all its hits", Actor::System);
            drop(book);
            self.after_end(&id, ended, "completed");
        } else {
            action.bump();
        }
        Ingested::Accepted
    }

    /// Counts findings dropped for naming unknown rules as the agent's
    /// `unknown_redaction_rule` drops (never under the book's lock).
    fn count_unknown_rules(&self, from: &Sender, unknown: usize) {
        if unknown > 0 {
            self.registry.count_drop(&from.id, crate::registry::DropReason::UnknownRule, unknown as u64);
            tracing::debug!(agent = %from.id, unknown, "dropped findings naming unknown redaction rules");
        }
    }

    /// Accepts dynamic log lines from an agent; returns how many were kept. Lines for
    /// actions that are not this agent's live logs are refused.
    pub fn ingest_lines(&self, from: &Sender, lines: Vec<LogLine>) -> LinesIngested {
        let now = now_ms();
        let mut out = LinesIngested::default();
        let mut completed = Vec::new();
        let mut audits = Vec::new();
        let mut unknown_rules = 0;
        let redactor = self.rules.redactor(&from.org);
        let mut book = self.book();
        for mut line in lines.into_iter().take(periscope_protocol::telemetry::MAX_LOG_LINES_PER_FRAME) {
            let Some(action) = book.actions.get_mut(&line.action_id) else {
                self.stats.add(from, |s| s.lines_refused += 1);
                continue;
            };
            let max_lines = match &action.spec.kind {
                ActionKind::Log(l) => l.max_lines,
                _ => {
                    self.stats.add(from, |s| s.lines_refused += 1);
                    continue;
                }
            };
            if action.status != ActionStatus::Active || action.org != from.org || !action.agents.contains_key(&from.id)
            {
                self.stats.add(from, |s| s.lines_refused += 1);
                continue;
            }
            // Every field bounded; every byte of it charged (thread name and findings
            // included), whatever the agents' budgets let through.
            line.sanitize();
            let within = action.log_rates.as_ref().is_none_or(|(lines, bytes)| {
                let size = u32::try_from(line.cost()).unwrap_or(u32::MAX);
                lines.take(1).is_ok() && bytes.take(size).is_ok()
            });
            if !within {
                action.dropped.log_rate += 1;
                action.dropped.last_drop_ms = Some(now);
                action.dropped.paused = true;
                out.rate_limited += 1;
                self.stats.add(from, |s| s.lines_rate_limited += 1);
                let data = serde_json::json!({
                    "reason": "quota_log", "agent_id": from.id, "by": "broker",
                    "message": format!("the broker dropped lines above {} lines/s or {} B/s for this log",
                                       self.ingest.action_log_lines_per_sec, self.ingest.action_log_bytes_per_sec),
                });
                audits.extend(Self::pause_episode(action, "quota_log", now, data));
                continue;
            }
            action.dropped.paused = false;
            // The agent redacted each placeholder by name (its findings must name rules
            // the broker knows); the broker redacts the text again.
            unknown_rules += keep_known_findings(&redactor, &mut line.redactions);
            let mut report = periscope_redaction::Report::new();
            if let std::borrow::Cow::Owned(clean) = redactor.redact_text(&line.text, "text", &mut report) {
                line.text = clean;
            }
            line.redactions.extend(report.into_findings().into_iter().map(Into::into));
            line.redactions.truncate(periscope_protocol::hit::MAX_FINDINGS_PER_HIT);
            line.rules_version = line.rules_version.max(redactor.version());
            for f in &line.redactions {
                *action.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
            }
            let stored = StoredLine {
                index: 0,
                agent_id: from.id.clone(),
                agent_name: from.name.clone(),
                received_at_ms: now,
                line,
            };
            let index = action.lines.push(stored);
            if let (Some(store), Some(last)) = (&self.store, action.lines.lines.back()) {
                store.put_line(LineRow {
                    action_id: action.spec.id.to_string(),
                    idx: index,
                    body: serde_json::to_string(last).unwrap_or_default(),
                    received_at_ms: now,
                });
            }
            out.kept += 1;
            self.stats.add(from, |s| s.lines_accepted += 1);
            if max_lines.is_some_and(|m| action.lines.total >= m) {
                completed.push(action.spec.id.clone());
            } else {
                action.bump();
            }
        }
        let mut notify = Vec::new();
        for id in completed {
            if book.actions.get(&id).is_some_and(|a| a.status == ActionStatus::Active) {
                let ended = self.end(&mut book, &id, ActionStatus::Completed, "reached its max_lines", Actor::System);
                notify.push((id, ended));
            }
        }
        drop(book);
        self.count_unknown_rules(from, unknown_rules);
        for entry in audits {
            self.audit(entry);
        }
        for (id, ended) in notify {
            self.after_end(&id, ended, "completed");
        }
        out
    }

    /// Merges metric reports from an agent; returns how many were kept. Reports for a
    /// metric that ended recently are still merged (an agent's last interval arrives
    /// after the removal).
    pub fn ingest_metrics(&self, from: &Sender, reports: Vec<MetricReport>) -> usize {
        let agent_id = &from.id;
        let mut kept = 0;
        let mut book = self.book();
        for mut report in reports.into_iter().take(periscope_protocol::telemetry::MAX_METRIC_REPORTS_PER_FRAME) {
            let Some(action) = book.actions.get_mut(&report.action_id) else { continue };
            if action.org != from.org || !action.agents.contains_key(agent_id) {
                continue;
            }
            let Some(data) = action.metric.as_mut() else { continue };
            crate::telemetry::sanitize(&mut report);
            data.merge(agent_id, &report);
            if let Some(store) = &self.store {
                store.put_metric(action.spec.id.as_str(), serde_json::to_string(data).unwrap_or_default());
            }
            action.bump();
            kept += 1;
            self.stats.add(from, |s| s.metric_reports += 1);
        }
        kept
    }

    /// The action `action_id` names, if the caller may see it; `not_found` otherwise,
    /// the same answer as for an action that does not exist.
    fn visible<'b>(book: &'b Book, id: &ActionId, caller: &Principal) -> Result<&'b Action, ApiError> {
        book.actions
            .get(id)
            .filter(|a| a.visible_to(caller))
            .ok_or_else(|| ApiError::not_found(format!("no action `{id}`; list_actions shows the actions")))
    }

    /// Log lines after `since`, at most `limit`.
    pub fn lines(&self, action_id: &str, since: u64, limit: usize, caller: &Principal) -> Result<LinesPage, ApiError> {
        let id = parse_action_id(action_id)?;
        let book = self.book();
        Ok(Self::visible(&book, &id, caller)?.lines.page(since, limit))
    }

    /// Waits until the action has a line after `since`, has ended, or `timeout` passes.
    pub async fn wait_lines(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
        caller: &Principal,
    ) -> Result<LinesPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(action_id, deadline, caller, |a| a.lines.total > since).await?;
        self.lines(action_id, since, limit, caller)
    }

    /// Every live metric action's figures, for `/metrics`.
    pub fn metric_snapshot(&self) -> Vec<MetricExport> {
        let book = self.book();
        book.actions
            .values()
            .filter(|a| a.status == ActionStatus::Active)
            .filter_map(|a| match (&a.spec.kind, &a.metric) {
                (ActionKind::Metric(m), Some(data)) => Some(MetricExport {
                    action_id: a.spec.id.clone(),
                    kind: m.metric,
                    data: data.clone(),
                    org: a.org.clone(),
                    pools: a.pools.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Removes an action on a caller's request.
    pub fn remove(&self, action_id: &str, caller: &Principal) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        let mut book = self.book();
        let action = Self::visible(&book, &id, caller)?;
        if action.status != ActionStatus::Active {
            return Ok(action.view());
        }
        // Its own retention bound may forget it at once (one ended action per key of a
        // crowded organization): answer with what it was.
        let mut before = action.view();
        let ended = self.end(&mut book, &id, ActionStatus::Removed, "removed by a caller", caller.actor());
        let view = book.actions.get(&id).map_or_else(
            || {
                before.status = ActionStatus::Removed;
                before.ended_at_ms = Some(now_ms());
                before.end_reason = Some("removed by a caller".into());
                before
            },
            Action::view,
        );
        drop(book);
        self.after_end(&id, ended, "removed");
        Ok(view)
    }

    /// Ends actions past their expiry; run periodically.
    pub fn expire_due(&self) {
        let now = now_ms();
        let mut book = self.book();
        let due = book.live.due(now);
        let mut notify = Vec::new();
        for id in due {
            let ended = self.end(&mut book, &id, ActionStatus::Expired, "reached its expiry", Actor::System);
            notify.push((id, ended));
        }
        drop(book);
        for (id, ended) in notify {
            self.after_end(&id, ended, "expired");
        }
    }

    /// Ends an action; returns the agents to tell and the audit entry to write (both
    /// after the book is unlocked).
    fn end(&self, book: &mut Book, id: &ActionId, status: ActionStatus, reason: &str, actor: Actor) -> Ended {
        let Some(action) = book.actions.get_mut(id).filter(|a| a.status == ActionStatus::Active) else {
            return Ended::default();
        };
        let now = now_ms();
        action.status = status;
        action.ended_at_ms = Some(now);
        action.end_reason = Some(reason.to_owned());
        action.bump();
        self.persist(action);
        let kind = match status {
            ActionStatus::Completed => AuditKind::ActionCompleted,
            ActionStatus::Expired => AuditKind::ActionExpired,
            _ => AuditKind::ActionRemoved,
        };
        let mut entry = action.audit(actor, kind);
        entry.detail = format!("the {} at {} {reason}", action.spec.kind.name(), action.spec.location);
        entry.data = serde_json::json!({
            "created_by": action.created_by,
            "created_by_key": action.created_by_key,
            "created_at_ms": action.created_at_ms,
            "agents": action.agents.len(),
            "pauses": action.pauses,
            "broker_dropped": action.dropped,
            "hits_refused": action.hits_refused,
        });
        let agents = action.agents.keys().cloned().collect();
        let (org, key, expires) = (action.org.clone(), action.created_by_key.clone(), action.spec.expires_at_ms);
        book.live.remove(&org, &key, expires, id);
        for old in book.retention.keep(&org, &key, now, id.clone()) {
            book.actions.remove(&old);
            if let Some(store) = &self.store {
                store.delete_action(old.as_str());
            }
        }
        Ended { agents, audit: Some(entry) }
    }

    /// Tells the agents an action ended and records it.
    fn after_end(&self, id: &ActionId, ended: Ended, reason: &str) {
        if let Some(entry) = ended.audit {
            self.audit(entry);
        }
        for agent in ended.agents {
            self.registry.send(&agent, BrokerMessage::ActionRemove { action_id: id.clone(), reason: reason.into() });
        }
    }

    /// One action's view, with its budgets.
    pub fn get(&self, action_id: &str, caller: &Principal) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        let book = self.book();
        let action = Self::visible(&book, &id, caller)?;
        let mut view = action.view();
        view.quota = Some(action.quota_view(now_ms(), &self.ingest));
        Ok(view)
    }

    /// Hits after `since`, at most `limit`.
    pub fn hits(&self, action_id: &str, since: u64, limit: usize, caller: &Principal) -> Result<HitsPage, ApiError> {
        let id = parse_action_id(action_id)?;
        let book = self.book();
        Ok(page(Self::visible(&book, &id, caller)?, since, limit))
    }

    /// Waits until the action has a hit after `since`, has ended, or `timeout` passes;
    /// then returns the page.
    pub async fn wait_hits(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
        caller: &Principal,
    ) -> Result<HitsPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(action_id, deadline, caller, |a| a.hits.len() as u64 > since).await?;
        self.hits(action_id, since, limit, caller)
    }

    /// Waits until `done(action)` holds, the action ends, or `deadline` passes.
    pub async fn wait_until(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&Action) -> bool,
    ) -> Result<(), ApiError> {
        self.wait_with_progress(action_id, deadline, caller, done, |_, _| {}).await
    }

    /// [`Engine::wait_until`] with a progress callback, called with `(hits, max_hits)`
    /// whenever the action changes.
    pub async fn wait_with_progress(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&Action) -> bool,
        mut progress: impl FnMut(u64, u32),
    ) -> Result<(), ApiError> {
        let id = parse_action_id(action_id)?;
        let mut last_hits = u64::MAX;
        let mut shutdown = self.shutdown.clone();
        loop {
            let mut rx = {
                let book = self.book();
                let action = Self::visible(&book, &id, caller)?;
                let hits = action.hits.len() as u64;
                if hits != last_hits {
                    progress(hits, action.max_hits());
                    last_hits = hits;
                }
                if done(action) || action.status != ActionStatus::Active {
                    return Ok(());
                }
                action.changed.subscribe()
            };
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, rx.changed()) => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// Actions the caller may see matching a filter, newest first.
    pub fn list(&self, filter: &ActionFilter, caller: &Principal) -> Vec<ActionView> {
        let book = self.book();
        let mut out: Vec<ActionView> = book
            .actions
            .values()
            .filter(|a| a.visible_to(caller))
            .filter(|a| filter.status.is_none_or(|s| a.status == s))
            .filter(|a| filter.created_by.as_deref().is_none_or(|c| a.created_by == c || a.created_by_key == c))
            .filter(|a| {
                filter.target.as_deref().is_none_or(|t| {
                    a.target.pool.as_deref() == Some(t)
                        || a.target.tags.iter().any(|x| x == t)
                        || a.target.agent_ids.iter().any(|x| x.as_str() == t)
                        || AgentId::parse(t).is_ok_and(|id| a.agents.contains_key(&id))
                })
            })
            .map(Action::view)
            .collect();
        out.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| b.action_id.cmp(&a.action_id)));
        out
    }

    /// Live actions placed by one key (its live-action quota in use).
    pub fn live_count_by_key(&self, key_id: &str) -> usize {
        self.book().live.count_key(key_id)
    }

    /// Live actions the caller may see: its organization's, within its reach (a
    /// pool-restricted key counts only what it could list).
    pub fn live_count_visible(&self, caller: &Principal) -> usize {
        let book = self.book();
        book.live
            .ids_in_org(caller.org())
            .filter(|id| book.actions.get(*id).is_some_and(|a| a.visible_to(caller)))
            .count()
    }

    /// Number of live actions.
    pub fn live_count(&self) -> usize {
        self.book().live.len()
    }

    /// Ended actions kept for an organization (bounded by
    /// `store.max_ended_actions_per_org`).
    pub fn ended_count_in(&self, org: &str) -> usize {
        self.book().retention.count_in(org)
    }

    /// Live actions of the caller's that some agent (or the broker) is pausing now, with
    /// the reasons.
    pub fn paused_for(&self, caller: &Principal) -> Vec<serde_json::Value> {
        let now = now_ms();
        let book = self.book();
        let mut out = Vec::new();
        for a in book.actions.values() {
            if a.status != ActionStatus::Active || !a.visible_to(caller) {
                continue;
            }
            let q = a.quota_view(now, &self.ingest);
            for p in q.paused {
                out.push(serde_json::json!({ "action_id": a.spec.id, "pause": p }));
            }
        }
        out
    }
}

/// An action that just ended: who to tell, what to audit.
#[derive(Debug, Default)]
struct Ended {
    agents: Vec<AgentId>,
    audit: Option<AuditEntry>,
}

fn page(action: &Action, since: u64, limit: usize) -> HitsPage {
    let start = usize::try_from(since).unwrap_or(usize::MAX).min(action.hits.len());
    let end = start.saturating_add(limit.max(1)).min(action.hits.len());
    let hits = action.hits[start..end].to_vec();
    HitsPage { next_cursor: end as u64, has_more: end < action.hits.len(), hits }
}

/// Keeps the findings an agent reported under rule ids its organization's rules have
/// (anything else would be shown in `redaction_rules_fired` and the audit trail);
/// returns how many it dropped. Public for the ingest instruction count
/// (`benches/examples/ingest_cost.rs`).
pub fn keep_known_findings(
    redactor: &periscope_redaction::Redactor,
    findings: &mut Vec<periscope_protocol::RedactionFinding>,
) -> usize {
    if findings.is_empty() {
        return 0;
    }
    let before = findings.len();
    findings.retain(|f| redactor.has_rule(&f.rule));
    before - findings.len()
}

fn parse_action_id(raw: &str) -> Result<ActionId, ApiError> {
    ActionId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("action_id: {e}")))
}

fn truncate(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 512).to_owned()
}

/// Text an agent sent that callers are shown (a status reason): bounded, one line.
fn agent_text(s: &str) -> String {
    let mut out = truncate(s);
    periscope_protocol::value::clip_printable(&mut out, 512);
    out
}

/// Parses every expression of the action (condition, watches, template, metric
/// expression) so a bad one is refused at placement, with its position, before any agent
/// sees it.
fn check_expressions(spec: &ActionSpec) -> Result<(), ApiError> {
    let Err(e) = periscope_protocol::expr::ActionExprs::compile(spec) else { return Ok(()) };
    let source = match (e.field.as_str(), &spec.kind) {
        ("condition", _) => spec.condition.clone().unwrap_or_default(),
        ("template", ActionKind::Log(l)) => l.template.clone(),
        ("expression", ActionKind::Metric(m)) => m.expression.clone().unwrap_or_default(),
        (field, ActionKind::Snapshot(s)) => field
            .strip_prefix("watch[")
            .and_then(|i| i.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| s.watch.get(i).cloned())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let pe = &e.error;
    Err(ApiError::invalid(format!("{}: {}", e.field, pe)).with_details(serde_json::json!({
        "field": e.field,
        "position": pe.position,
        "line": pe.line,
        "column": pe.column,
        "expected": pe.expected,
        "found": pe.found,
        "source": pe.render(&source),
    })))
}

/// Longest file argument accepted.
const MAX_FILE_LEN: usize = 1_024;

fn validate_location(file: &str, line: u32) -> Result<(String, u32), ApiError> {
    let file = file.trim();
    if file.is_empty() || file.len() > MAX_FILE_LEN || file.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "file must be a source path (or a suffix of one, like `src/orders.rs`) of 1 to {MAX_FILE_LEN} characters"
        )));
    }
    if line == 0 {
        return Err(ApiError::invalid("line must be 1 or more (lines are 1-based)"));
    }
    Ok((file.to_owned(), line))
}

/// The locations of a whole-file catalog entry that matter for a placement at `line`:
/// the line itself when it holds code (an event) or a function's definition (a span),
/// and otherwise the nearest lines that hold code, each named after the function around
/// it.
fn file_locations_near(f: &periscope_protocol::FileLines, line: u32) -> Vec<CatalogEntry> {
    let entry = |line: u32, kind: LocationKind, name: String| CatalogEntry {
        file: f.file.clone(),
        line,
        kind,
        name,
        module: f.module.clone(),
        level: None,
        fields: Vec::new(),
        hits: 0,
    };
    let around = |line: u32| f.function_around(line).map_or_else(|| "<module>".to_owned(), |func| func.name.clone());
    let mut out = Vec::new();
    if let Some(func) = f.function_at(line) {
        out.push(entry(line, LocationKind::Span, func.name.clone()));
    }
    if f.lines.contains(line) {
        out.push(entry(line, LocationKind::Event, around(line)));
    }
    if out.is_empty() {
        out.extend(f.lines.nearest(line, 5).into_iter().map(|l| entry(l, LocationKind::Event, around(l))));
    }
    out
}

fn no_such_location(location: &Location, nearest: Vec<CatalogEntry>) -> ApiError {
    let list: Vec<String> =
        nearest.iter().map(|e| format!("{}:{} ({} `{}`)", e.file, e.line, kind_word(e.kind), e.name)).collect();
    ApiError::new(
        ErrorCode::NoSuchLocation,
        format!(
            "no target agent has an inspectable location at {location}; nearest known: {}. Pick one of those, or pass \
             allow_pending=true if code at that line has simply not run yet",
            list.join("; ")
        ),
    )
    .with_details(serde_json::json!({ "nearest": nearest }))
}

fn kind_word(kind: periscope_protocol::LocationKind) -> &'static str {
    match kind {
        periscope_protocol::LocationKind::Span => "span",
        periscope_protocol::LocationKind::Event => "event",
    }
}
