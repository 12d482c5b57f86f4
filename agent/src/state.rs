//! State shared between the application's threads (the layer) and the agent's own
//! thread: the action table, the catalog of callsites, budgets and counters.
//!
//! The action table is an immutable snapshot behind an `RwLock<Arc<_>>`: the agent
//! thread builds a new one whenever actions or callsites change and swaps it in; the
//! layer only ever clones the `Arc`. The `active` flag lets an idle agent answer
//! `enabled` with one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use periscope_protocol::expr::ActionExprs;
use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, AgentActionState, AgentQuotas, CaptureLimits, CatalogEntry, Histogram,
    LocationKind, LogSpec, MetricKind, MetricReport, MetricSpec, PauseReason, SnapshotSpec,
};
use tokio::sync::{Notify, mpsc};
use tracing_core::callsite::Identifier;
use tracing_core::{Level, LevelFilter, Metadata};

use crate::budget::{Clock, CpuBudget, RateLimiter};
use crate::capture::RawHit;

/// Spans are recorded (for the span stack of hits) up to this level while any snapshot
/// is live; TRACE spans are left alone unless an action targets one.
const SPAN_RECORD_LEVEL: Level = Level::DEBUG;

/// A dynamic log's running state.
#[derive(Debug)]
pub(crate) struct LogState {
    pub(crate) spec: LogSpec,
    /// Lines produced so far (for `max_lines`).
    pub(crate) lines: AtomicU64,
    /// Per-action line rate.
    pub(crate) line_rate: RateLimiter,
    /// Per-action byte rate (charged on the agent thread, once the line is rendered).
    pub(crate) byte_rate: RateLimiter,
    /// Clock time until which the byte budget keeps the action paused.
    pub(crate) paused_until: AtomicU64,
}

/// One interval's running aggregate of a metric.
#[derive(Debug, Default)]
pub(crate) struct Aggregate {
    pub(crate) window_start_ms: u64,
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) min: Option<f64>,
    pub(crate) max: Option<f64>,
    pub(crate) histogram: Histogram,
    pub(crate) skipped: u64,
}

impl Aggregate {
    pub(crate) fn record(&mut self, v: f64) {
        if !v.is_finite() {
            self.skipped += 1;
            return;
        }
        self.count += 1;
        self.sum += v;
        self.min = Some(self.min.map_or(v, |m| m.min(v)));
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        self.histogram.record(v);
    }
}

/// A dynamic metric's running state.
#[derive(Debug)]
pub(crate) struct MetricState {
    pub(crate) spec: MetricSpec,
    pub(crate) aggregate: Mutex<Aggregate>,
    /// Counters count in an atomic, without the lock.
    pub(crate) hits: AtomicU64,
}

impl MetricState {
    /// When the current interval started (Unix ms).
    pub(crate) fn window_start(&self) -> u64 {
        self.aggregate.lock().unwrap_or_else(|p| p.into_inner()).window_start_ms
    }

    /// Takes the interval's aggregate, starting a new interval at `now_ms`.
    pub(crate) fn take(&self, action_id: &ActionId, now_ms: u64) -> MetricReport {
        let mut agg = self.aggregate.lock().unwrap_or_else(|p| p.into_inner());
        let taken = std::mem::replace(&mut *agg, Aggregate { window_start_ms: now_ms, ..Aggregate::default() });
        drop(agg);
        let hits = self.hits.swap(0, Ordering::Relaxed);
        MetricReport {
            action_id: action_id.clone(),
            window_start_ms: taken.window_start_ms,
            window_end_ms: now_ms,
            count: if self.spec.metric == MetricKind::Counter { hits } else { taken.count },
            sum: taken.sum,
            min: taken.min,
            max: taken.max,
            histogram: taken.histogram,
            skipped: taken.skipped,
        }
    }
}

/// One action as installed in this process.
#[derive(Debug)]
pub(crate) struct Installed {
    pub(crate) spec: ActionSpec,
    /// The snapshot parameters, when the action is a snapshot.
    pub(crate) snapshot: Option<SnapshotSpec>,
    /// The log state, when the action is a dynamic log.
    pub(crate) log: Option<LogState>,
    /// The metric state, when the action is a dynamic metric.
    pub(crate) metric: Option<MetricState>,
    /// Hit slots taken so far (a slot is returned when its hit is dropped).
    pub(crate) taken: AtomicU32,
    /// Sequence numbers handed out, for gaps to be visible.
    pub(crate) seq: AtomicU64,
    /// Per-action hit rate.
    pub(crate) rate: RateLimiter,
    /// 0 = running, else the [`PauseReason`] code it is paused for.
    pub(crate) paused: AtomicU8,
    /// Reached its hit count or expired on this agent.
    pub(crate) done: AtomicBool,
    /// Compiled condition and watches.
    pub(crate) exprs: ActionExprs,
    /// Why the action cannot run here (an expression this agent cannot compile).
    pub(crate) compile_error: Option<String>,
    /// The kinds of run-time evaluation error already reported (one bit per
    /// [`periscope_protocol::EvalError::code`]), so each kind is reported once.
    eval_errors_reported: AtomicU32,
}

const PAUSE_NONE: u8 = 0;
const PAUSE_RATE: u8 = 1;
const PAUSE_CPU: u8 = 2;
const PAUSE_LOG: u8 = 3;

impl Installed {
    pub(crate) fn new(spec: ActionSpec, quotas: &AgentQuotas) -> Self {
        let snapshot = match &spec.kind {
            ActionKind::Snapshot(s) => Some(s.clone()),
            _ => None,
        };
        // The broker validated the expressions; a failure here means this agent speaks an
        // older dialect, which is reported as the action's error.
        let (exprs, compile_error) = match ActionExprs::compile(&spec) {
            Ok(e) => (e, None),
            Err(e) => (ActionExprs::default(), Some(e.to_string())),
        };
        let log = match &spec.kind {
            ActionKind::Log(l) => Some(LogState {
                spec: l.clone(),
                lines: AtomicU64::new(0),
                line_rate: RateLimiter::new(
                    quotas.log_lines_per_sec,
                    quotas.log_lines_per_sec * quotas.log_burst_factor,
                ),
                byte_rate: RateLimiter::new(
                    quotas.log_bytes_per_sec,
                    quotas.log_bytes_per_sec * quotas.log_burst_factor,
                ),
                paused_until: AtomicU64::new(0),
            }),
            _ => None,
        };
        let metric = match &spec.kind {
            ActionKind::Metric(m) => Some(MetricState {
                spec: m.clone(),
                aggregate: Mutex::new(Aggregate { window_start_ms: crate::layer::unix_ms(), ..Aggregate::default() }),
                hits: AtomicU64::new(0),
            }),
            _ => None,
        };
        Installed {
            log,
            metric,
            exprs,
            compile_error,
            eval_errors_reported: AtomicU32::new(0),
            spec,
            snapshot,
            taken: AtomicU32::new(0),
            seq: AtomicU64::new(0),
            rate: RateLimiter::new(quotas.snapshot_hits_per_sec_per_action, 1.0),
            paused: AtomicU8::new(PAUSE_NONE),
            done: AtomicBool::new(false),
        }
    }

    /// The status to report for an evaluation error in `context` (`condition`,
    /// `expression`, `template`...): `Some` the first time this kind of error is seen for
    /// the action, so a kind is reported once while others still get through (a
    /// `redacted` error after a `type_mismatch`, say).
    pub(crate) fn eval_error_status(
        &self,
        context: &str,
        error: &periscope_protocol::EvalError,
    ) -> Option<AgentActionState> {
        let code = error.code();
        let index = periscope_protocol::EvalError::CODES.iter().position(|c| *c == code).unwrap_or(31).min(31);
        let bit = 1u32 << index;
        if self.eval_errors_reported.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return None;
        }
        Some(AgentActionState::EvalError { reason: format!("{context}: {error}"), code: Some(code.to_owned()) })
    }

    /// Marks the action paused for `reason`; true when this is a change of state, so the
    /// caller reports it once per episode rather than once per refused hit.
    pub(crate) fn pause(&self, reason: PauseReason) -> bool {
        let code = match reason {
            PauseReason::QuotaCpu => PAUSE_CPU,
            PauseReason::QuotaLog => PAUSE_LOG,
            _ => PAUSE_RATE,
        };
        self.paused.swap(code, Ordering::Relaxed) != code
    }

    /// Clears a pause; true when the action was paused.
    pub(crate) fn resume(&self) -> bool {
        self.paused.load(Ordering::Relaxed) != PAUSE_NONE
            && self.paused.swap(PAUSE_NONE, Ordering::Relaxed) != PAUSE_NONE
    }

    pub(crate) fn matches(&self, meta: &Metadata<'_>) -> bool {
        at(&self.spec.location, meta)
    }

    /// Whether `meta` is where a tic-toc duration stops.
    pub(crate) fn ends_at(&self, meta: &Metadata<'_>) -> bool {
        self.metric.as_ref().and_then(|m| m.spec.end_location.as_ref()).is_some_and(|end| at(end, meta))
    }

    /// Whether this agent can run the action at all.
    pub(crate) fn runnable(&self) -> bool {
        self.compile_error.is_none() && (self.snapshot.is_some() || self.log.is_some() || self.metric.is_some())
    }
}

fn at(location: &periscope_protocol::Location, meta: &Metadata<'_>) -> bool {
    match (meta.file(), meta.line()) {
        (Some(file), Some(line)) => line == location.line && location.file_matches(file),
        _ => false,
    }
}

/// Actions on one callsite, with the callsite's hit counter.
#[derive(Debug)]
pub(crate) struct CallsiteActions {
    /// Actions placed here.
    pub(crate) actions: Vec<Arc<Installed>>,
    /// Tic-toc durations that stop here.
    pub(crate) ends: Vec<Arc<Installed>>,
    pub(crate) hits: Arc<AtomicU64>,
    /// What the table's redaction rules make of each of the callsite's field names,
    /// worked out once here rather than at every value an expression reads.
    pub(crate) names: Vec<(&'static str, periscope_redaction::NameRule)>,
}

/// Agent-wide budgets, replaced when the broker sends new quotas.
#[derive(Debug)]
pub(crate) struct Budgets {
    pub(crate) quotas: AgentQuotas,
    pub(crate) snapshots: RateLimiter,
    pub(crate) cpu: CpuBudget,
    /// Dynamic log lines per second across the agent.
    pub(crate) log_lines: RateLimiter,
    /// Dynamic log bytes per second across the agent.
    pub(crate) log_bytes: RateLimiter,
}

impl Budgets {
    pub(crate) fn new(quotas: AgentQuotas) -> Self {
        Budgets {
            log_lines: RateLimiter::new(quotas.log_lines_per_sec, quotas.log_lines_per_sec * quotas.log_burst_factor),
            log_bytes: RateLimiter::new(quotas.log_bytes_per_sec, quotas.log_bytes_per_sec * quotas.log_burst_factor),
            snapshots: RateLimiter::new(quotas.snapshot_hits_per_sec, quotas.snapshot_hits_per_sec.max(1.0)),
            cpu: CpuBudget::new(quotas.cpu_fraction, Duration::from_micros(quotas.cpu_burst_micros)),
            quotas,
        }
    }
}

/// An immutable snapshot of what is installed where.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) actions: HashMap<ActionId, Arc<Installed>>,
    pub(crate) by_callsite: HashMap<Identifier, CallsiteActions>,
    /// Record span fields (for span stacks) while any snapshot is live.
    pub(crate) record_spans: bool,
    /// What the agent's level hint asks for.
    pub(crate) max_level: LevelFilter,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) limits: CaptureLimits,
    /// The redaction rules expressions read values through (the agent's rules when the
    /// table was built; a change of rules builds a new table).
    pub(crate) redactor: Arc<periscope_redaction::Redactor>,
}

impl Table {
    fn empty(redactor: Arc<periscope_redaction::Redactor>) -> Self {
        Table {
            actions: HashMap::new(),
            by_callsite: HashMap::new(),
            record_spans: false,
            max_level: LevelFilter::OFF,
            budgets: Arc::new(Budgets::new(AgentQuotas::default())),
            limits: CaptureLimits::default(),
            redactor,
        }
    }

    /// Whether the layer wants this callsite.
    pub(crate) fn wants(&self, meta: &Metadata<'_>) -> bool {
        self.by_callsite.contains_key(&meta.callsite())
            || (self.record_spans && meta.is_span() && *meta.level() <= SPAN_RECORD_LEVEL)
    }
}

/// A callsite the agent has seen register.
#[derive(Debug)]
struct Known {
    meta: &'static Metadata<'static>,
    hits: Arc<AtomicU64>,
    /// Hit count last published in the catalog.
    published_hits: u64,
}

#[derive(Debug, Default)]
struct Catalog {
    known: HashMap<Identifier, Known>,
    /// Registration order, for stable catalogs.
    order: Vec<Identifier>,
    /// Registered since the last catalog update was sent.
    unsent: Vec<Identifier>,
}

/// Counters reported in heartbeats so that losses are visible upstream.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits_sent: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_rate: AtomicU64,
    pub(crate) dropped_disconnected: AtomicU64,
}

/// Everything the layer and the agent thread share.
pub(crate) struct Shared {
    /// Fast idle check: false when no action is installed.
    pub(crate) active: AtomicBool,
    table: RwLock<Arc<Table>>,
    catalog: Mutex<Catalog>,
    statuses: Mutex<Vec<(ActionId, AgentActionState)>>,
    /// Wakes the agent thread: new callsites, statuses, completed actions.
    pub(crate) wake: Notify,
    /// Set when a new callsite matches an installed action: the table needs a rebuild.
    pub(crate) rebuild_needed: AtomicBool,
    pub(crate) hits_tx: mpsc::Sender<Box<RawHit>>,
    pub(crate) counters: Counters,
    pub(crate) clock: Clock,
    /// The dispatchers our layer is part of.
    dispatches: Mutex<Vec<tracing_core::dispatcher::WeakDispatch>>,
    /// The redaction rules in force (replaced when the broker pushes new ones).
    redactor: RwLock<Arc<periscope_redaction::Redactor>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("active", &self.active).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(hits_tx: mpsc::Sender<Box<RawHit>>) -> Self {
        let redactor = Arc::new(periscope_redaction::Redactor::default_rules());
        Shared {
            active: AtomicBool::new(false),
            table: RwLock::new(Arc::new(Table::empty(Arc::clone(&redactor)))),
            catalog: Mutex::new(Catalog::default()),
            statuses: Mutex::new(Vec::new()),
            wake: Notify::new(),
            rebuild_needed: AtomicBool::new(false),
            hits_tx,
            counters: Counters::default(),
            clock: Clock::new(),
            dispatches: Mutex::new(Vec::new()),
            redactor: RwLock::new(redactor),
        }
    }

    /// The redaction rules in force.
    pub(crate) fn redactor(&self) -> Arc<periscope_redaction::Redactor> {
        match self.redactor.read() {
            Ok(r) => Arc::clone(&r),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Installs new redaction rules (the agent thread then rebuilds the table, so that
    /// expressions read through them too).
    pub(crate) fn set_redactor(&self, redactor: periscope_redaction::Redactor) {
        let redactor = Arc::new(redactor);
        match self.redactor.write() {
            Ok(mut r) => *r = redactor,
            Err(p) => *p.into_inner() = redactor,
        }
    }

    /// Emits a dynamic log line through the host's own `tracing` subscriber (target
    /// `periscope::dynamic_log`), so it lands wherever the service's logs go. Runs on the
    /// agent thread, which our filter ignores, so the line is never captured again.
    pub(crate) fn emit_app_log(&self, level: periscope_protocol::LogLevel, action_id: &ActionId, text: &str) {
        use periscope_protocol::LogLevel;
        let emit = || match level {
            LogLevel::Trace => tracing::trace!(target: "periscope::dynamic_log", action_id = %action_id, "{text}"),
            LogLevel::Debug => tracing::debug!(target: "periscope::dynamic_log", action_id = %action_id, "{text}"),
            LogLevel::Info => tracing::info!(target: "periscope::dynamic_log", action_id = %action_id, "{text}"),
            LogLevel::Warn => tracing::warn!(target: "periscope::dynamic_log", action_id = %action_id, "{text}"),
            LogLevel::Error => tracing::error!(target: "periscope::dynamic_log", action_id = %action_id, "{text}"),
        };
        let dispatch = self.dispatches.lock().unwrap_or_else(|p| p.into_inner()).iter().find_map(|w| w.upgrade());
        match dispatch {
            Some(d) => tracing_core::dispatcher::with_default(&d, emit),
            None => emit(),
        }
    }

    pub(crate) fn remember_dispatch(&self, dispatch: &tracing_core::Dispatch) {
        let mut d = self.dispatches.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|w| w.upgrade().is_some());
        d.push(dispatch.downgrade());
    }

    /// Rebuilds tracing's interest cache so that our filter is asked again about every
    /// callsite. When the only dispatcher in the process is a scoped one (set with
    /// `with_default`, as in tests), tracing rebuilds through the *calling thread's*
    /// default dispatcher; so we run the rebuild inside our own dispatcher.
    pub(crate) fn rebuild_interest(&self) {
        let live: Vec<tracing_core::Dispatch> =
            self.dispatches.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(|w| w.upgrade()).collect();
        match live.first() {
            Some(d) => tracing_core::dispatcher::with_default(d, tracing_core::callsite::rebuild_interest_cache),
            None => tracing_core::callsite::rebuild_interest_cache(),
        }
    }

    /// The current table. Poisoning cannot leave the table inconsistent (it is only ever
    /// replaced whole), so a poisoned lock is simply entered.
    pub(crate) fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set_table(&self, table: Table) {
        let active = !table.actions.is_empty();
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        self.active.store(active, Ordering::Release);
    }

    /// Queues an action state for the broker (called from any thread).
    pub(crate) fn report(&self, action_id: &ActionId, state: AgentActionState) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        // A flood of statuses cannot grow without bound: the newest per action wins.
        if statuses.len() >= 1024 {
            statuses.retain(|(id, _)| id != action_id);
            if statuses.len() >= 1024 {
                return;
            }
        }
        statuses.push((action_id.clone(), state));
        drop(statuses);
        self.wake.notify_one();
    }

    pub(crate) fn take_statuses(&self) -> Vec<(ActionId, AgentActionState)> {
        std::mem::take(&mut *self.statuses.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records a callsite the first time tracing registers it; returns whether it is
    /// new. Called under tracing's callsite registry lock, so it only touches our mutex.
    pub(crate) fn register_callsite(&self, meta: &'static Metadata<'static>) -> bool {
        let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let id = meta.callsite();
        if catalog.known.contains_key(&id) {
            return false;
        }
        catalog.known.insert(id.clone(), Known { meta, hits: Arc::new(AtomicU64::new(0)), published_hits: 0 });
        catalog.order.push(id.clone());
        catalog.unsent.push(id);
        drop(catalog);
        self.wake.notify_one();
        true
    }

    /// Catalog entries not yet published (all of them when `full`), marking them sent.
    pub(crate) fn catalog_updates(&self, full: bool) -> Vec<CatalogEntry> {
        let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let Catalog { known, order, unsent } = &mut *catalog;
        let mut out = Vec::new();
        if full {
            unsent.clear();
            for id in order.iter() {
                if let Some(k) = known.get_mut(id) {
                    k.published_hits = k.hits.load(Ordering::Relaxed);
                    out.push(entry(k));
                }
            }
        } else {
            let mut changed: Vec<Identifier> = std::mem::take(unsent);
            for id in order.iter() {
                if let Some(k) = known.get(id)
                    && k.hits.load(Ordering::Relaxed) != k.published_hits
                    && !changed.contains(id)
                {
                    changed.push(id.clone());
                }
            }
            for id in changed {
                if let Some(k) = known.get_mut(&id) {
                    k.published_hits = k.hits.load(Ordering::Relaxed);
                    out.push(entry(k));
                }
            }
        }
        out.retain(|e| !e.file.is_empty());
        out
    }

    /// Builds and installs a new table for `specs`; returns, per action, how many
    /// callsites matched (0 = pending until its code runs).
    pub(crate) fn install(
        &self,
        specs: Vec<Arc<Installed>>,
        budgets: Arc<Budgets>,
        limits: CaptureLimits,
    ) -> Vec<(Arc<Installed>, u32)> {
        let redactor = self.redactor();
        let catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_callsite: HashMap<Identifier, CallsiteActions> = HashMap::new();
        let mut matched = Vec::with_capacity(specs.len());
        let mut max_level = LevelFilter::OFF;
        for action in &specs {
            let mut count = 0u32;
            for id in &catalog.order {
                let Some(known) = catalog.known.get(id) else { continue };
                let here = action.matches(known.meta);
                let ends_here = action.ends_at(known.meta);
                if here || ends_here {
                    max_level = max_level.max(LevelFilter::from_level(*known.meta.level()));
                    let entry = by_callsite.entry(id.clone()).or_insert_with(|| CallsiteActions {
                        actions: Vec::new(),
                        ends: Vec::new(),
                        hits: Arc::clone(&known.hits),
                        names: known.meta.fields().iter().map(|f| (f.name(), redactor.name_rule(f.name()))).collect(),
                    });
                    if here {
                        count += 1;
                        entry.actions.push(Arc::clone(action));
                    }
                    if ends_here {
                        entry.ends.push(Arc::clone(action));
                    }
                }
            }
            matched.push((Arc::clone(action), count));
        }
        drop(catalog);
        // Spans are recorded while anything is live: snapshots report the span stack,
        // logs and conditions may read span fields, durations time spans.
        let record_spans = !specs.is_empty();
        if record_spans {
            max_level = max_level.max(LevelFilter::from_level(SPAN_RECORD_LEVEL));
        }
        // An action whose code has not run yet (or runs below the host's level) needs its
        // callsite to register when it runs: let every level through while one is pending.
        if matched.iter().any(|(_, n)| *n == 0) {
            max_level = LevelFilter::TRACE;
        }
        let actions = specs.into_iter().map(|a| (a.spec.id.clone(), a)).collect();
        self.set_table(Table { actions, by_callsite, record_spans, max_level, budgets, limits, redactor });
        matched
    }

    /// Whether a just-registered callsite matches an installed action.
    pub(crate) fn matches_installed(&self, meta: &Metadata<'_>) -> bool {
        self.table().actions.values().any(|a| a.matches(meta) || a.ends_at(meta))
    }

    /// Marks an action done on this agent and wakes the agent thread to drop it.
    pub(crate) fn complete(&self, action: &Installed) {
        if !action.done.swap(true, Ordering::AcqRel) {
            self.report(&action.spec.id, AgentActionState::Completed);
        }
    }
}

fn entry(k: &Known) -> CatalogEntry {
    let meta = k.meta;
    CatalogEntry {
        file: meta.file().unwrap_or_default().to_owned(),
        line: meta.line().unwrap_or(0),
        kind: if meta.is_span() { LocationKind::Span } else { LocationKind::Event },
        name: meta.name().to_owned(),
        module: meta.module_path().map(str::to_owned).or_else(|| Some(meta.target().to_owned())),
        level: Some(meta.level().as_str().to_ascii_lowercase()),
        fields: meta.fields().iter().map(|f| f.name().to_owned()).collect(),
        hits: k.hits.load(Ordering::Relaxed),
    }
}
