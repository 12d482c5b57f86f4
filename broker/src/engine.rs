//! The action engine: placing actions, keeping agents in sync with them, collecting
//! hits, and ending actions (by hit count, expiry, removal).
//!
//! All action state lives in one mutex-protected book, never held across an `.await`.
//! Callers that wait for hits take a `watch` receiver under the lock and wait outside.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
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

use crate::error::{ApiError, ErrorCode};
use crate::registry::{AgentRecord, Registry};
use crate::store::{ActionRow, HitRow, LineRow, Loaded, Store, StoreError};
use crate::telemetry::{LineBook, LinesPage, MetricData, MetricView, StoredLine};
use crate::time::now_ms;

/// Live actions one caller may hold at once (keeps one runaway assistant from filling
/// every agent).
pub const MAX_LIVE_ACTIONS_PER_CALLER: usize = 20;

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

/// A dynamic log as a caller asks for it.
#[derive(Debug, Clone, Default)]
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

/// A dynamic metric as a caller asks for it.
#[derive(Debug, Clone, Default)]
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
#[derive(Debug, Clone, Serialize)]
pub struct AgentActionView {
    /// The agent.
    pub agent_id: AgentId,
    /// Its display name.
    pub display_name: String,
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
    changed: watch::Sender<u64>,
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

#[derive(Debug, Default)]
struct Book {
    actions: HashMap<ActionId, Action>,
    /// Ended actions, oldest first, for bounded retention.
    ended: VecDeque<ActionId>,
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
}

/// Counters the broker exports on `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Hits stored.
    pub hits_accepted: AtomicU64,
    /// Hits refused (unknown or ended action, over its count, not a target).
    pub hits_refused: AtomicU64,
    /// Dynamic log lines stored.
    pub lines_accepted: AtomicU64,
    /// Dynamic log lines refused.
    pub lines_refused: AtomicU64,
    /// Metric reports merged.
    pub metric_reports: AtomicU64,
    /// Quota pauses reported by agents, by reason.
    pub quota_pauses: Mutex<BTreeMap<String, u64>>,
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
    shutdown: watch::Receiver<bool>,
    limits: CaptureLimits,
    max_ended: usize,
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
            shutdown,
            limits,
            max_ended,
            book: Mutex::new(Book::default()),
            stats: EngineStats::default(),
            metric_interval_ms: 5_000,
        }
    }

    /// Sets how often agents report metric aggregates.
    pub fn with_metric_interval(mut self, ms: u64) -> Self {
        self.metric_interval_ms = ms.clamp(1_000, 3_600_000);
        self
    }

    /// Makes the engine durable: loads what `store` holds and writes every change to it.
    pub fn with_store(mut self, store: Store, loaded: Loaded) -> Result<Self, StoreError> {
        let Loaded { actions, hits, lines, metrics, settings: _ } = loaded;
        let corrupt =
            |what: &'static str, detail: String| StoreError::Corrupt { path: store.path().to_owned(), what, detail };
        let mut book = Book::default();
        for row in actions {
            let spec: ActionSpec = serde_json::from_str(&row.spec).map_err(|e| corrupt("action", e.to_string()))?;
            let target: Target = serde_json::from_str(&row.target).map_err(|e| corrupt("target", e.to_string()))?;
            let status =
                ActionStatus::parse(&row.status).ok_or_else(|| corrupt("action status", row.status.clone()))?;
            if status != ActionStatus::Active {
                book.ended.push_back(spec.id.clone());
            }
            book.actions.insert(
                spec.id.clone(),
                Action {
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
        for row in lines {
            let line: StoredLine = serde_json::from_str(&row.body).map_err(|e| corrupt("log line", e.to_string()))?;
            if let Some(action) = ActionId::parse(&row.action_id).ok().and_then(|id| book.actions.get_mut(&id)) {
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
                action.hits.push(hit);
            }
        }
        for action in book.actions.values_mut() {
            action.hits.sort_by_key(|h| h.index);
        }
        tracing::info!(
            actions = book.actions.len(),
            live = book.actions.values().filter(|a| a.status == ActionStatus::Active).count(),
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

    /// Deletes stored hits and ended actions older than `cutoff_ms` (retention).
    pub fn purge_before(&self, cutoff_ms: u64) {
        let mut book = self.book();
        let old: Vec<ActionId> = book
            .actions
            .values()
            .filter(|a| a.status != ActionStatus::Active && a.ended_at_ms.is_some_and(|t| t < cutoff_ms))
            .map(|a| a.spec.id.clone())
            .collect();
        for id in &old {
            book.actions.remove(id);
        }
        book.ended.retain(|id| !old.contains(id));
        for action in book.actions.values_mut() {
            action.hits.retain(|h| h.received_at_ms >= cutoff_ms);
        }
        drop(book);
        if let Some(store) = &self.store {
            store.purge_before(cutoff_ms);
        }
    }

    /// Replaces the redaction rules: compiled, persisted, and pushed to every online
    /// agent; hits after this carry the new version.
    pub fn replace_rules(
        &self,
        config: periscope_redaction::RedactionConfig,
    ) -> Result<periscope_redaction::RedactionConfig, ApiError> {
        let config = self.rules.replace(config).map_err(|e| ApiError::invalid(format!("redaction rules: {e}")))?;
        if let Some(store) = &self.store {
            store.put_setting(crate::rules::SETTING_KEY, serde_json::to_string(&config).unwrap_or_default());
        }
        let message = self.rules.message();
        let mut online = Vec::new();
        self.registry.for_each(|a| {
            if a.online() {
                online.push(a.info.agent_id.clone());
            }
        });
        for agent in online {
            self.registry.send(&agent, message.clone());
        }
        tracing::info!(version = config.version, "redaction rules replaced");
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
    pub fn place_snapshot(&self, req: SnapshotRequest, caller: &str) -> Result<ActionView, ApiError> {
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
    pub fn place_log(&self, req: LogRequest, caller: &str) -> Result<ActionView, ApiError> {
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
    pub fn place_metric(&self, req: MetricRequest, caller: &str) -> Result<ActionView, ApiError> {
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
    fn place(&self, p: Placement<'_>, kind: ActionKind, caller: &str) -> Result<ActionView, ApiError> {
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
        let target = self.resolve_target(p.agent_ids, p.pool, p.tags)?;
        let agents = self.matching_agents(&target);
        if agents.is_empty() {
            return Err(self.no_matching_agents(&target));
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
        agents: &[(AgentId, String)],
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
        caller: &str,
        pending_note: Option<String>,
        agents: Vec<(AgentId, String)>,
    ) -> Result<ActionView, ApiError> {
        let now = now_ms();
        let mut book = self.book();
        let mine = || book.actions.values().filter(|a| a.status == ActionStatus::Active && a.created_by == caller);
        let live = mine().count();
        if live >= MAX_LIVE_ACTIONS_PER_CALLER {
            // When the caller's soonest action expires, a slot frees by itself.
            let retry_after =
                mine().map(|a| a.spec.expires_at_ms).min().unwrap_or(now).saturating_sub(now).div_ceil(1_000).max(1);
            return Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "you already have {live} live actions (the limit is {MAX_LIVE_ACTIONS_PER_CALLER}); remove one \
                     with remove_action (list_actions with status=active shows them), or retry in {retry_after} s \
                     when the soonest one expires"
                ),
            )
            .with_details(serde_json::json!({
                "quota": "live_actions",
                "limit": MAX_LIVE_ACTIONS_PER_CALLER,
                "retry_after_seconds": retry_after,
            })));
        }
        let mut statuses = BTreeMap::new();
        for (agent_id, name) in &agents {
            statuses.insert(
                agent_id.clone(),
                AgentActionView {
                    agent_id: agent_id.clone(),
                    display_name: name.clone(),
                    state: "pending".into(),
                    detail: None,
                    pause_reason: None,
                    eval_error: None,
                    updated_at_ms: now,
                },
            );
        }
        let action = Action {
            spec: spec.clone(),
            target,
            created_by: caller.to_owned(),
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
        book.actions.insert(spec.id.clone(), action);
        drop(book);
        for (agent_id, _) in agents {
            self.registry.send(&agent_id, BrokerMessage::ActionAdd { action: spec.clone() });
        }
        tracing::info!(action = %spec.id, location = %spec.location, caller, "action placed");
        Ok(view)
    }

    fn resolve_target(&self, agent_ids: &[String], pool: Option<&str>, tags: &[String]) -> Result<Target, ApiError> {
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
            if self.registry.with(&id, |_| ()).is_none() {
                return Err(ApiError::not_found(format!("no agent `{id}` is known; list_agents shows the agents")));
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(Target { agent_ids: ids, pool: pool.map(str::to_owned), tags: tags.to_vec() })
    }

    /// Online agents the target includes, with display names.
    fn matching_agents(&self, target: &Target) -> Vec<(AgentId, String)> {
        let mut out = Vec::new();
        self.registry.for_each(|a| {
            if a.online() && target.includes(a) {
                out.push((a.info.agent_id.clone(), a.info.display_name.clone()));
            }
        });
        out.sort();
        out
    }

    fn no_matching_agents(&self, target: &Target) -> ApiError {
        let mut pools: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        self.registry.for_each(|a| {
            if a.online() {
                pools.entry(a.info.pool.clone()).or_default().extend(a.info.tags.iter().cloned());
            }
        });
        let available: Vec<serde_json::Value> = pools
            .into_iter()
            .map(|(pool, tags)| {
                let mut tags: Vec<String> = tags.into_iter().collect();
                tags.sort();
                serde_json::json!({ "pool": pool, "tags": tags })
            })
            .collect();
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

    fn find_location(&self, agents: &[(AgentId, String)], location: &Location) -> LocationMatch {
        let mut files: HashSet<String> = HashSet::new();
        let mut in_file: Vec<CatalogEntry> = Vec::new();
        let mut all_files: HashSet<String> = HashSet::new();
        for (id, _) in agents {
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
    /// and tag targets reach agents that joined after the action was placed.
    pub fn on_agent_registered(&self, agent_id: &AgentId) -> Vec<ActionSpec> {
        let Some((pool, tags, name)) =
            self.registry.with(agent_id, |r| (r.info.pool.clone(), r.info.tags.clone(), r.info.display_name.clone()))
        else {
            return Vec::new();
        };
        let now = now_ms();
        let mut book = self.book();
        let mut specs = Vec::new();
        for action in book.actions.values_mut() {
            if action.status != ActionStatus::Active {
                continue;
            }
            let included = if action.target.agent_ids.is_empty() {
                action.target.pool.as_deref().is_none_or(|p| p == pool)
                    && action.target.tags.iter().all(|t| tags.contains(t))
            } else {
                action.target.agent_ids.contains(agent_id)
            };
            if !included {
                continue;
            }
            specs.push(action.spec.clone());
            let entry = action.agents.entry(agent_id.clone()).or_insert_with(|| AgentActionView {
                agent_id: agent_id.clone(),
                display_name: name.clone(),
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
            action.bump();
        }
        specs
    }

    /// Marks the agent offline in the actions it runs.
    pub fn on_agent_disconnected(&self, agent_id: &AgentId) {
        let now = now_ms();
        let mut book = self.book();
        for action in book.actions.values_mut() {
            if action.status != ActionStatus::Active {
                continue;
            }
            if let Some(a) = action.agents.get_mut(agent_id) {
                a.state = "offline".into();
                a.detail = Some("the agent disconnected; the action resumes when it reconnects".into());
                a.updated_at_ms = now;
                action.bump();
            }
        }
    }

    /// Records an action state reported by an agent.
    pub fn on_status(&self, agent_id: &AgentId, action_id: &ActionId, state: AgentActionState) {
        let now = now_ms();
        let mut book = self.book();
        let Some(action) = book.actions.get_mut(action_id) else { return };
        let Some(entry) = action.agents.get_mut(agent_id) else { return };
        let (label, detail, pause) = match state {
            AgentActionState::Installed { callsites } => {
                ("installed", Some(format!("armed on {callsites} callsite(s)")), None)
            }
            AgentActionState::Pending => {
                ("pending", Some("armed; waiting for code at the location to run for the first time".into()), None)
            }
            AgentActionState::Error { reason } => ("error", Some(truncate(&reason)), None),
            AgentActionState::Paused { reason, message } => {
                let mut pauses = self.stats.quota_pauses.lock().unwrap_or_else(|p| p.into_inner());
                *pauses.entry(reason.as_str().to_owned()).or_insert(0) += 1;
                ("paused", Some(truncate(&message)), Some(reason.as_str().to_owned()))
            }
            AgentActionState::Resumed => ("installed", Some("resumed".into()), None),
            AgentActionState::Completed => ("completed", None, None),
            AgentActionState::EvalError { reason } => {
                entry.eval_error = Some(truncate(&reason));
                ("eval_error", Some(truncate(&reason)), None)
            }
        };
        entry.state = label.into();
        entry.detail = detail;
        entry.pause_reason = pause;
        entry.updated_at_ms = now;
        action.bump();
    }

    /// Accepts a hit from an agent: re-applies capture limits, stores it, and completes
    /// the action when it has its hits. Returns whether the hit was kept.
    pub fn ingest_hit(&self, agent_id: &AgentId, agent_name: &str, mut hit: Hit) -> bool {
        // Never trust an agent: redaction and the same limits again (a no-op for honest
        // agents). Keys are known here too, so a `password` field is caught by name.
        self.rules.redactor().redact_hit(&mut hit);
        hit.enforce_limits(&self.limits);
        let mut book = self.book();
        let Some(action) = book.actions.get_mut(&hit.action_id) else { return false };
        let targeted = action.agents.contains_key(agent_id);
        if !targeted || action.status != ActionStatus::Active || action.hits.len() as u32 >= action.max_hits() {
            action.hits_refused += 1;
            self.stats.hits_refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.hits_accepted.fetch_add(1, Ordering::Relaxed);
        let index = action.hits.len() as u64 + 1;
        let stored = StoredHit {
            hit_id: HitId::generate(),
            index,
            agent_id: agent_id.clone(),
            agent_name: agent_name.to_owned(),
            received_at_ms: now_ms(),
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
            let agents = self.end(&mut book, &id, ActionStatus::Completed, "collected all its hits");
            drop(book);
            self.notify_removed(&id, agents, "completed");
        } else {
            action.bump();
        }
        true
    }

    /// Accepts dynamic log lines from an agent; returns how many were kept. Lines for
    /// actions that are not this agent's live logs are refused.
    pub fn ingest_lines(&self, agent_id: &AgentId, agent_name: &str, lines: Vec<LogLine>) -> usize {
        let now = now_ms();
        let mut kept = 0;
        let mut completed = Vec::new();
        let mut book = self.book();
        for mut line in lines.into_iter().take(periscope_protocol::telemetry::MAX_LOG_LINES_PER_FRAME) {
            let Some(action) = book.actions.get_mut(&line.action_id) else {
                self.stats.lines_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let max_lines = match &action.spec.kind {
                ActionKind::Log(l) => l.max_lines,
                _ => {
                    self.stats.lines_refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            if action.status != ActionStatus::Active || !action.agents.contains_key(agent_id) {
                self.stats.lines_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let keep = periscope_protocol::value::truncate_chars(
                &line.text,
                periscope_protocol::telemetry::MAX_LOG_LINE_BYTES,
            )
            .len();
            line.text.truncate(keep);
            // The agent redacted each placeholder by name; the broker redacts the text again.
            let redactor = self.rules.redactor();
            let mut report = periscope_redaction::Report::new();
            if let std::borrow::Cow::Owned(clean) = redactor.redact_text(&line.text, "text", &mut report) {
                line.text = clean;
            }
            line.redactions.extend(report.into_findings().into_iter().map(Into::into));
            line.redactions.truncate(periscope_protocol::hit::MAX_FINDINGS_PER_HIT);
            line.rules_version = line.rules_version.max(redactor.version());
            let stored = StoredLine {
                index: 0,
                agent_id: agent_id.clone(),
                agent_name: agent_name.to_owned(),
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
            kept += 1;
            self.stats.lines_accepted.fetch_add(1, Ordering::Relaxed);
            if max_lines.is_some_and(|m| action.lines.total >= m) {
                completed.push(action.spec.id.clone());
            } else {
                action.bump();
            }
        }
        let mut notify = Vec::new();
        for id in completed {
            if book.actions.get(&id).is_some_and(|a| a.status == ActionStatus::Active) {
                let agents = self.end(&mut book, &id, ActionStatus::Completed, "reached its max_lines");
                notify.push((id, agents));
            }
        }
        drop(book);
        for (id, agents) in notify {
            self.notify_removed(&id, agents, "completed");
        }
        kept
    }

    /// Merges metric reports from an agent; returns how many were kept. Reports for a
    /// metric that ended recently are still merged (an agent's last interval arrives
    /// after the removal).
    pub fn ingest_metrics(&self, agent_id: &AgentId, reports: Vec<MetricReport>) -> usize {
        let mut kept = 0;
        let mut book = self.book();
        for mut report in reports.into_iter().take(periscope_protocol::telemetry::MAX_METRIC_REPORTS_PER_FRAME) {
            let Some(action) = book.actions.get_mut(&report.action_id) else { continue };
            if !action.agents.contains_key(agent_id) {
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
            self.stats.metric_reports.fetch_add(1, Ordering::Relaxed);
        }
        kept
    }

    /// Log lines after `since`, at most `limit`.
    pub fn lines(&self, action_id: &str, since: u64, limit: usize) -> Result<LinesPage, ApiError> {
        let id = parse_action_id(action_id)?;
        let book = self.book();
        let action = book.actions.get(&id).ok_or_else(|| ApiError::not_found(format!("no action `{id}`")))?;
        Ok(action.lines.page(since, limit))
    }

    /// Waits until the action has a line after `since`, has ended, or `timeout` passes.
    pub async fn wait_lines(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
    ) -> Result<LinesPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(action_id, deadline, |a| a.lines.total > since).await?;
        self.lines(action_id, since, limit)
    }

    /// Every live metric action's figures, for `/metrics`.
    pub fn metric_snapshot(&self) -> Vec<MetricExport> {
        let book = self.book();
        book.actions
            .values()
            .filter(|a| a.status == ActionStatus::Active)
            .filter_map(|a| match (&a.spec.kind, &a.metric) {
                (ActionKind::Metric(m), Some(data)) => {
                    Some(MetricExport { action_id: a.spec.id.clone(), kind: m.metric, data: data.clone() })
                }
                _ => None,
            })
            .collect()
    }

    /// Removes an action on a caller's request.
    pub fn remove(&self, action_id: &str) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        let mut book = self.book();
        let Some(action) = book.actions.get(&id) else {
            return Err(ApiError::not_found(format!("no action `{id}`; list_actions shows the actions")));
        };
        if action.status != ActionStatus::Active {
            return Ok(action.view());
        }
        let agents = self.end(&mut book, &id, ActionStatus::Removed, "removed by a caller");
        let view = book.actions.get(&id).map(Action::view);
        drop(book);
        self.notify_removed(&id, agents, "removed");
        view.ok_or_else(|| ApiError::not_found(format!("no action `{id}`")))
    }

    /// Ends actions past their expiry; run periodically.
    pub fn expire_due(&self) {
        let now = now_ms();
        let mut book = self.book();
        let due: Vec<ActionId> = book
            .actions
            .values()
            .filter(|a| a.status == ActionStatus::Active && a.spec.expires_at_ms <= now)
            .map(|a| a.spec.id.clone())
            .collect();
        let mut notify = Vec::new();
        for id in due {
            let agents = self.end(&mut book, &id, ActionStatus::Expired, "reached its expiry");
            notify.push((id, agents));
        }
        drop(book);
        for (id, agents) in notify {
            self.notify_removed(&id, agents, "expired");
        }
    }

    /// Ends an action; returns the agents to tell.
    fn end(&self, book: &mut Book, id: &ActionId, status: ActionStatus, reason: &str) -> Vec<AgentId> {
        let Some(action) = book.actions.get_mut(id) else { return Vec::new() };
        action.status = status;
        action.ended_at_ms = Some(now_ms());
        action.end_reason = Some(reason.to_owned());
        action.bump();
        self.persist(action);
        let agents = action.agents.keys().cloned().collect();
        book.ended.push_back(id.clone());
        while book.ended.len() > self.max_ended {
            if let Some(old) = book.ended.pop_front() {
                book.actions.remove(&old);
                if let Some(store) = &self.store {
                    store.delete_action(old.as_str());
                }
            }
        }
        agents
    }

    fn notify_removed(&self, id: &ActionId, agents: Vec<AgentId>, reason: &str) {
        for agent in agents {
            self.registry.send(&agent, BrokerMessage::ActionRemove { action_id: id.clone(), reason: reason.into() });
        }
    }

    /// One action's view.
    pub fn get(&self, action_id: &str) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        self.book()
            .actions
            .get(&id)
            .map(Action::view)
            .ok_or_else(|| ApiError::not_found(format!("no action `{id}`; list_actions shows the actions")))
    }

    /// Hits after `since`, at most `limit`.
    pub fn hits(&self, action_id: &str, since: u64, limit: usize) -> Result<HitsPage, ApiError> {
        let id = parse_action_id(action_id)?;
        let book = self.book();
        let action = book.actions.get(&id).ok_or_else(|| ApiError::not_found(format!("no action `{id}`")))?;
        Ok(page(action, since, limit))
    }

    /// Waits until the action has a hit after `since`, has ended, or `timeout` passes;
    /// then returns the page.
    pub async fn wait_hits(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
    ) -> Result<HitsPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(action_id, deadline, |a| a.hits.len() as u64 > since).await?;
        self.hits(action_id, since, limit)
    }

    /// Waits until `done(action)` holds, the action ends, or `deadline` passes; calls
    /// `progress(hits, max_hits)` whenever the action changes.
    pub async fn wait_until(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        done: impl Fn(&Action) -> bool,
    ) -> Result<(), ApiError> {
        self.wait_with_progress(action_id, deadline, done, |_, _| {}).await
    }

    /// [`Engine::wait_until`] with a progress callback.
    pub async fn wait_with_progress(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        done: impl Fn(&Action) -> bool,
        mut progress: impl FnMut(u64, u32),
    ) -> Result<(), ApiError> {
        let id = parse_action_id(action_id)?;
        let mut last_hits = u64::MAX;
        let mut shutdown = self.shutdown.clone();
        loop {
            let mut rx = {
                let book = self.book();
                let action = book.actions.get(&id).ok_or_else(|| ApiError::not_found(format!("no action `{id}`")))?;
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

    /// Actions matching a filter, newest first.
    pub fn list(&self, filter: &ActionFilter) -> Vec<ActionView> {
        let book = self.book();
        let mut out: Vec<ActionView> = book
            .actions
            .values()
            .filter(|a| filter.status.is_none_or(|s| a.status == s))
            .filter(|a| filter.created_by.as_deref().is_none_or(|c| a.created_by == c))
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

    /// Number of live actions.
    pub fn live_count(&self) -> usize {
        self.book().actions.values().filter(|a| a.status == ActionStatus::Active).count()
    }
}

fn page(action: &Action, since: u64, limit: usize) -> HitsPage {
    let start = usize::try_from(since).unwrap_or(usize::MAX).min(action.hits.len());
    let end = start.saturating_add(limit.max(1)).min(action.hits.len());
    let hits = action.hits[start..end].to_vec();
    HitsPage { next_cursor: end as u64, has_more: end < action.hits.len(), hits }
}

fn parse_action_id(raw: &str) -> Result<ActionId, ApiError> {
    ActionId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("action_id: {e}")))
}

fn truncate(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 512).to_owned()
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
