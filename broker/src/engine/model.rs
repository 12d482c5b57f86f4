//! What the engine knows about an action, as the action store keeps it
//! ([`ActionRecord`]), and the views callers get of it.
//!
//! A record holds everything about an action but its hits, log lines and metric
//! figures, which the store keeps beside it (appended, paged by cursor); the record
//! carries their counts. Records are plain data (serializable), so a store may keep
//! them in another process, and every change to one goes through the store's
//! compare-and-swap ([`crate::backend::ActionStore::update`]).

use std::collections::{BTreeMap, BTreeSet};

use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, AgentId, FunctionTarget, Hit, HitId, Location, LogSpec, MetricSpec,
};
use serde::{Deserialize, Serialize};

use crate::audit::{Actor, AuditEntry, AuditKind, Expressions};
use crate::auth::{Principal, Reach};
use crate::quota::IngestSettings;
use crate::registry::AgentRecord;
use crate::telemetry::MetricView;

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
        self.includes_parts(&agent.info.agent_id, &agent.info.pool, &agent.info.tags)
    }

    /// [`Target::includes`] from an agent's id, pool and tags.
    pub fn includes_parts(&self, id: &AgentId, pool: &str, tags: &[String]) -> bool {
        if !self.agent_ids.is_empty() {
            return self.agent_ids.contains(id);
        }
        self.pool.as_deref().is_none_or(|p| p == pool) && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// Where an action stands overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// Where an action stands on one agent. The names are a stable contract (`get_action`,
/// `GET /actions/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Sent to the agent, not confirmed yet (or armed, waiting for its code to run).
    Pending,
    /// Armed on at least one callsite.
    Installed,
    /// The agent cannot run it (the reason is in `detail`).
    Error,
    /// Paused by a quota; `pause_reason` says which.
    Paused,
    /// The agent collected what it had to.
    Completed,
    /// An expression failed at run time (reported once).
    EvalError,
    /// The agent disconnected; the action resumes when it comes back.
    Offline,
}

impl AgentState {
    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentState::Pending => "pending",
            AgentState::Installed => "installed",
            AgentState::Error => "error",
            AgentState::Paused => "paused",
            AgentState::Completed => "completed",
            AgentState::EvalError => "eval_error",
            AgentState::Offline => "offline",
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One agent's view of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentActionView {
    /// The agent.
    pub agent_id: AgentId,
    /// Its display name.
    pub display_name: String,
    /// Its pool.
    #[serde(default)]
    pub pool: String,
    /// Where the action stands there.
    pub state: AgentState,
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

impl AgentActionView {
    /// A target the action was just sent to.
    pub fn pending(agent_id: AgentId, display_name: String, pool: String, now_ms: u64) -> AgentActionView {
        AgentActionView {
            agent_id,
            display_name,
            pool,
            state: AgentState::Pending,
            detail: None,
            pause_reason: None,
            eval_error: None,
            updated_at_ms: now_ms,
        }
    }
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

/// What the broker dropped for one action over its per-action rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// An action with everything the store keeps about it but its hits, lines and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// What agents run.
    pub spec: ActionSpec,
    /// Whom it aims at.
    pub target: Target,
    /// The organization it belongs to.
    pub org: String,
    /// The placing key's reach: the agents it may ever reach.
    pub reach: Reach,
    /// Pools it was aimed at or reached; a caller sees the action if it sees all of them.
    pub pools: BTreeSet<String>,
    /// Who placed it (the key's name).
    pub created_by: String,
    /// Id of the key that placed it (its live-action quota is charged).
    pub created_by_key: String,
    /// When (Unix ms).
    pub created_at_ms: u64,
    /// Set when it was placed on a location no agent had reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_note: Option<String>,
    /// Overall state.
    pub status: ActionStatus,
    /// When it ended (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// Per-agent state.
    #[serde(default)]
    pub agents: BTreeMap<AgentId, AgentActionView>,
    /// Hits stored (the index of the newest).
    #[serde(default)]
    pub hits: u64,
    /// Hits refused because the action already had its hits or had ended.
    #[serde(default)]
    pub hits_refused: u64,
    /// Log lines accepted (the index of the newest).
    #[serde(default)]
    pub lines: u64,
    /// Redaction rules that fired in what it collected, with counts.
    #[serde(default)]
    pub rules_fired: BTreeMap<String, u64>,
    /// Quota pauses reported, by reason.
    #[serde(default)]
    pub pauses: BTreeMap<String, u64>,
    /// When the last pause of each reason was counted (Unix ms): pauses closer than
    /// [`crate::engine::PAUSE_EPISODE_GAP_MS`] are one episode, audited once.
    #[serde(default)]
    pub pause_last_ms: BTreeMap<String, u64>,
    /// What the broker dropped for it, over its own rates.
    #[serde(default)]
    pub dropped: ActionDrops,
    /// Agents that refused one of its expressions a read of a redacted value; the first
    /// goes to the audit trail.
    #[serde(default)]
    pub redacted_reads: u64,
}

impl ActionRecord {
    /// The most hits it collects (snapshots; 0 otherwise).
    pub fn max_hits(&self) -> u32 {
        match &self.spec.kind {
            ActionKind::Snapshot(s) => s.max_hits,
            ActionKind::CaptureErrors(_) => super::errors::MAX_ERROR_HITS,
            _ => 0,
        }
    }

    /// Whether it is still collecting.
    pub fn is_live(&self) -> bool {
        self.status == ActionStatus::Active
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

    /// Whether every agent it reached reported it cannot run it.
    pub fn all_agents_failed(&self) -> bool {
        !self.agents.is_empty() && self.agents.values().all(|s| s.state == AgentState::Error)
    }

    /// The expressions, for the audit trail.
    pub fn expressions(&self) -> Expressions {
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
    pub fn audit(&self, actor: Actor, kind: AuditKind) -> AuditEntry {
        let mut entry = AuditEntry::new(self.org.clone(), actor, kind)
            .target(serde_json::to_value(&self.target).unwrap_or_default());
        entry.action_id = Some(self.spec.id.to_string());
        entry.action_kind = Some(self.spec.kind.name().to_owned());
        entry.location = Some(self.spec.location.clone());
        entry.expressions = self.expressions();
        match &self.spec.kind {
            ActionKind::Snapshot(_) | ActionKind::CaptureErrors(_) => entry.hits = Some(self.hits),
            ActionKind::Log(_) => entry.lines = Some(self.lines),
            _ => {}
        }
        entry.redaction_rules = self.rules_fired.clone();
        entry
    }

    /// Counts a quota pause for `reason` at `now`; returns the audit entry when it starts
    /// a new episode (no pause for the same reason in the last
    /// [`crate::engine::PAUSE_EPISODE_GAP_MS`]).
    pub fn pause_episode(&mut self, reason: &str, now: u64, data: serde_json::Value) -> Option<AuditEntry> {
        *self.pauses.entry(reason.to_owned()).or_insert(0) += 1;
        let last = self.pause_last_ms.insert(reason.to_owned(), now);
        if last.is_some_and(|t| now.saturating_sub(t) < crate::engine::PAUSE_EPISODE_GAP_MS) {
            return None;
        }
        let mut entry = self.audit(Actor::System, AuditKind::ActionPaused);
        entry.detail = format!("paused by a quota ({reason})");
        entry.data = data;
        Some(entry)
    }

    /// Its budgets: what it may still collect, what was dropped, what is paused.
    pub fn quota_view(&self, now: u64, ingest: &IngestSettings) -> ActionQuotaView {
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
            ActionKind::Snapshot(s) => (Some(u64::from(s.max_hits).saturating_sub(self.hits)), None),
            ActionKind::CaptureErrors(_) => {
                (Some(u64::from(super::errors::MAX_ERROR_HITS).saturating_sub(self.hits)), None)
            }
            ActionKind::Log(l) => (None, l.max_lines.map(|m| m.saturating_sub(self.lines))),
            _ => (None, None),
        };
        let limits = match &self.spec.kind {
            ActionKind::Snapshot(_) => serde_json::json!({
                "broker_hits_per_sec_per_agent": ingest.action_hits_per_sec,
                "burst_factor": ingest.burst_factor,
            }),
            ActionKind::CaptureErrors(e) => serde_json::json!({
                "broker_hits_per_sec_per_agent": ingest.action_hits_per_sec,
                "burst_factor": ingest.burst_factor,
                "max_captures_per_agent": e.max_captures_per_agent,
                "min_interval_ms": e.min_interval_ms,
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
            expires_in_ms: if self.is_live() { self.spec.expires_at_ms.saturating_sub(now) } else { 0 },
            paused,
            pauses: self.pauses.clone(),
            broker_dropped: self.dropped,
            limits,
        }
    }

    /// The serializable summary (a metric's figures are added by the caller, who reads
    /// them from the store).
    pub fn view(&self) -> ActionView {
        let (watch, backtrace) = match &self.spec.kind {
            ActionKind::Snapshot(s) => (s.watch.clone(), s.backtrace),
            ActionKind::CaptureErrors(e) => (Vec::new(), e.backtrace),
            _ => (Vec::new(), false),
        };
        let errors = match &self.spec.kind {
            ActionKind::CaptureErrors(e) => Some(e.clone()),
            _ => None,
        };
        let log = match &self.spec.kind {
            ActionKind::Log(l) => Some(l.clone()),
            _ => None,
        };
        let metric = match &self.spec.kind {
            ActionKind::Metric(m) => Some(m.clone()),
            _ => None,
        };
        ActionView {
            action_id: self.spec.id.clone(),
            kind: self.spec.kind.name(),
            status: self.status,
            location: self.spec.location.clone(),
            function: self.spec.function.as_deref().cloned(),
            condition: self.spec.condition.clone(),
            watch,
            backtrace,
            max_hits: self.max_hits(),
            hits: self.hits,
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
            lines: self.lines,
            metric,
            errors,
            figures: None,
            created_by_key: self.created_by_key.clone(),
            redaction_rules_fired: self.rules_fired.clone(),
            quota: None,
            expect: self.spec.expect.as_deref().cloned(),
            code_check: None,
            paused_by_operator: None,
        }
    }

    /// The display names of its agents, for a metric's per-agent figures.
    pub fn agent_names(&self) -> BTreeMap<AgentId, String> {
        self.agents.iter().map(|(id, a)| (id.clone(), a.display_name.clone())).collect()
    }
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

/// The serializable summary of an action.
#[derive(Debug, Clone, Serialize)]
pub struct ActionView {
    /// The action's id: the handle for `get_action` and `remove_action`.
    pub action_id: ActionId,
    /// `snapshot`, `log`, `metric` or `capture_errors`.
    pub kind: &'static str,
    /// Overall state.
    pub status: ActionStatus,
    /// Where (for a function probe: where the function was found, or its name while
    /// pending).
    pub location: Location,
    /// The function or span a function probe targets (with `min_duration_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionTarget>,
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
    /// An error capture's parameters (its location is `*:0`: everywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<periscope_protocol::ErrorCaptureSpec>,
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
    /// The code the action runs on only (`expected_version`, `file_hash`), as placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<periscope_protocol::CodeExpectation>,
    /// In the placement's answer: how many target agents run the expected code, how
    /// many do not, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_check: Option<super::CodeCheck>,
    /// While an operator's pause holds the action: who paused what, when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_by_operator: Option<crate::safety::Pause>,
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

impl ActionFilter {
    /// Whether `a` passes the filter.
    pub fn admits(&self, a: &ActionRecord) -> bool {
        self.status.is_none_or(|s| a.status == s)
            && self.created_by.as_deref().is_none_or(|c| a.created_by == c || a.created_by_key == c)
            && self.target.as_deref().is_none_or(|t| {
                a.target.pool.as_deref() == Some(t)
                    || a.target.tags.iter().any(|x| x == t)
                    || a.target.agent_ids.iter().any(|x| x.as_str() == t)
                    || AgentId::parse(t).is_ok_and(|id| a.agents.contains_key(&id))
            })
    }
}
