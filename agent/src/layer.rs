//! The `tracing` integration: a per-layer filter that decides which callsites the agent
//! sees, and a layer that captures hits on them.
//!
//! # Cost model
//!
//! - Idle (no action installed): [`ProbeFilter::callsite_enabled`] answers
//!   `Interest::never()` and the level hint is `OFF`, so callsites the host does not log
//!   cost nothing (17 instructions per event with or without the agent). Callsites the
//!   host does log become "sometimes" interesting instead of "always", so tracing asks
//!   every layer's `enabled` per event; [`ProbeFilter::enabled`] answers with one relaxed
//!   atomic load, and the whole detour costs about 130 instructions, under 1% of
//!   formatting the host's own line (`benches/instructions.sh`). The host's own layers
//!   still get every event: a per-layer filter never vetoes them.
//! - With actions installed: targeted callsites get `Interest::always()`; every span up to
//!   DEBUG is recorded (its fields copied) so hits can carry the span stack; other
//!   callsites stay as above plus a table lookup.
//! - A hit: budget checks, copying the fields (bounded), a `try_send` on a bounded
//!   queue. Never a lock held across user code, never an await, never a block.

use std::cell::OnceCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use periscope_protocol::{AgentActionState, MetricKind, PauseReason, ThreadInfo};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, LevelFilter, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::capture::{FieldCollector, RawField, RawHit, RawSpan, SpanValues};
use crate::state::{Shared, Table};

thread_local! {
    /// Set on the agent's own thread so that the agent never captures itself.
    pub(crate) static IN_AGENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Decides, per callsite and per event, whether the agent's layer sees it.
#[derive(Debug, Clone)]
pub struct ProbeFilter {
    shared: Arc<Shared>,
}

/// Captures snapshots at callsites the [`ProbeFilter`] lets through.
#[derive(Debug, Clone)]
pub struct ProbeLayer {
    shared: Arc<Shared>,
}

pub(crate) fn new(shared: Arc<Shared>) -> (ProbeLayer, ProbeFilter) {
    (ProbeLayer { shared: Arc::clone(&shared) }, ProbeFilter { shared })
}

impl<S> Filter<S> for ProbeFilter {
    /// Runs once per callsite (and again on every interest rebuild): records the callsite
    /// in the catalog and says whether an installed action wants it.
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_internal(meta) {
            return Interest::never();
        }
        let new = self.shared.register_callsite(meta);
        if !self.shared.active.load(Ordering::Acquire) {
            return Interest::never();
        }
        let table = self.shared.table();
        // First: code that had not run yet when its action was placed (a pending
        // action). Checked before `wants`, which says yes to every span while anything is
        // live and would hide that this callsite still needs to join the table.
        if new && !table.by_callsite.contains_key(&meta.callsite()) && self.shared.matches_installed(meta) {
            // Ask the agent thread to rebuild the table with it; until then `enabled` is
            // asked per event.
            self.shared.rebuild_needed.store(true, Ordering::Release);
            self.shared.wake.notify_one();
            return Interest::sometimes();
        }
        if table.wants(meta) {
            return Interest::always();
        }
        Interest::never()
    }

    /// Per event or span, only for callsites whose combined interest is "sometimes".
    #[inline]
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        if !self.shared.active.load(Ordering::Relaxed) {
            return false;
        }
        if IN_AGENT.with(|a| a.get()) {
            return false;
        }
        self.shared.table().wants(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        if !self.shared.active.load(Ordering::Acquire) {
            return Some(LevelFilter::OFF);
        }
        Some(self.shared.table().max_level)
    }
}

impl<S> Layer<S> for ProbeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    /// Remembers the dispatcher we are part of, so interest rebuilds can run in its
    /// context (see `Shared::rebuild_interest`).
    fn on_register_dispatch(&self, dispatch: &tracing_core::Dispatch) {
        self.shared.remember_dispatch(dispatch);
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut values = FieldCollector::default();
        attrs.record(&mut values);
        // Stored first, so that a duration started by this span can find it.
        let fields = values.fields.clone();
        span.extensions_mut().insert(SpanValues(values));
        let table = self.shared.table();
        if table.by_callsite.contains_key(&attrs.metadata().callsite()) {
            // Actions on a span location fire when the span is created.
            let parent = span.parent().map(|p| p.id());
            let site = Site { meta: attrs.metadata(), parent: parent.as_ref(), span: Some(id) };
            self.fire(&table, site, fields, &ctx);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(stored) = ext.get_mut::<SpanValues>() {
            values.record(&mut stored.0);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let table = self.shared.table();
        if !table.by_callsite.contains_key(&event.metadata().callsite()) {
            return;
        }
        let mut values = FieldCollector::default();
        event.record(&mut values);
        let parent = event
            .parent()
            .cloned()
            .or_else(|| if event.is_contextual() { ctx.current_span().id().cloned() } else { None });
        let site = Site { meta: event.metadata(), parent: parent.as_ref(), span: None };
        self.fire(&table, site, values.fields, &ctx);
    }

    /// A span closing ends the span-duration metrics it started.
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if !self.shared.active.load(Ordering::Relaxed) {
            return;
        }
        let Some(span) = ctx.span(&id) else { return };
        let Some(clocks) = span.extensions_mut().remove::<Clocks>() else { return };
        let now = self.shared.clock.now();
        for (action, started) in clocks.0 {
            if action.metric.as_ref().is_some_and(|m| m.spec.end_location.is_none()) {
                record_duration(&action, now.saturating_sub(started));
            }
        }
    }
}

/// Where an action fires: the callsite, the span it runs in, and (for span
/// callsites) the span being created.
#[derive(Clone, Copy)]
struct Site<'a> {
    meta: &'static Metadata<'static>,
    parent: Option<&'a Id>,
    span: Option<&'a Id>,
}

/// Clocks started in a span: the duration metric and its start (agent clock).
#[derive(Default)]
struct Clocks(Vec<(Arc<crate::state::Installed>, u64)>);

thread_local! {
    /// Tic-toc clocks started outside any span, per thread (bounded).
    static THREAD_CLOCKS: std::cell::RefCell<Vec<(usize, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most tic-toc clocks a thread holds; the oldest are dropped beyond it.
const MAX_THREAD_CLOCKS: usize = 64;

fn record_duration(action: &crate::state::Installed, nanos: u64) {
    if let Some(metric) = &action.metric {
        let ms = nanos as f64 / 1e6;
        metric.aggregate.lock().unwrap_or_else(|p| p.into_inner()).record(ms);
    }
}

/// What one firing has captured so far, computed lazily and shared by the actions on
/// the callsite.
struct Firing<'a, S: for<'l> LookupSpan<'l>> {
    table: &'a Table,
    site: Site<'a>,
    fields: Vec<RawField>,
    spans: Option<Vec<RawSpan>>,
    ctx: &'a Context<'a, S>,
    now_ms: u64,
    started: u64,
    /// What expressions have read so far, as a client will see it.
    views: Views<'a>,
}

/// The values expressions read at one firing, each built (parsed, redacted, cut to the
/// capture limits) the first time any expression reads it and then shared by every
/// action on the callsite: a condition that reads one field costs one field.
struct Views<'a> {
    limits: periscope_protocol::CaptureLimits,
    /// The table's redaction rules.
    redactor: &'a periscope_redaction::Redactor,
    /// What they make of the callsite's field names.
    names: &'a [(&'static str, periscope_redaction::NameRule)],
    /// One per event field, in order; empty until an expression runs.
    fields: Vec<OnceCell<periscope_protocol::Value>>,
    /// One list per captured span, in order; empty until an expression reads spans.
    spans: Vec<Vec<OnceCell<periscope_protocol::Value>>>,
}

impl Views<'_> {
    fn build(&self, raw: &RawField) -> periscope_protocol::Value {
        // A span's fields belong to another callsite: their names are worked out here.
        let rule = match self.names.iter().find(|(n, _)| *n == raw.name) {
            Some((_, rule)) => *rule,
            None => self.redactor.name_rule(raw.name),
        };
        crate::capture::client_value(raw, &self.limits, self.redactor, rule)
    }
}

impl<S> Firing<'_, S>
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    fn spans(&mut self) -> &[RawSpan] {
        let (parent, table, ctx) = (self.site.parent, self.table, self.ctx);
        self.spans.get_or_insert_with(|| capture_spans(parent, table, ctx))
    }

    /// What `roots` may read at this firing: nothing is built until it is read.
    fn scope(&mut self, roots: &periscope_protocol::expr::Roots) -> HotScope<'_> {
        if self.views.fields.len() != self.fields.len() {
            self.views.fields = std::iter::repeat_with(OnceCell::new).take(self.fields.len()).collect();
        }
        if roots.uses_spans() && self.views.spans.is_empty() {
            let spans = self.spans();
            let views = spans.iter().map(|s| std::iter::repeat_with(OnceCell::new).take(s.fields.len()).collect());
            self.views.spans = views.collect();
        }
        let spans = if self.views.spans.is_empty() { &[][..] } else { self.spans.as_deref().unwrap_or_default() };
        HotScope { fields: &self.fields, spans, views: &self.views }
    }
}

impl ProbeLayer {
    /// Runs every action installed on the callsite. Never blocks: budgets are atomics,
    /// the queue is `try_send`, and the only lock is a metric's own uncontended mutex.
    fn fire<S>(&self, table: &Table, site: Site<'_>, fields: Vec<RawField>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(entry) = table.by_callsite.get(&site.meta.callsite()) else { return };
        entry.hits.fetch_add(1, Ordering::Relaxed);
        let shared = &self.shared;
        let started = shared.clock.now();
        let views = Views {
            limits: table.limits,
            redactor: &table.redactor,
            names: &entry.names,
            fields: Vec::new(),
            spans: Vec::new(),
        };
        let mut firing = Firing { table, site, fields, spans: None, ctx, now_ms: unix_ms(), started, views };
        for action in &entry.ends {
            self.stop_clock(action, &firing);
        }
        for action in &entry.actions {
            if !self.admit(action, &mut firing) {
                continue;
            }
            if let Some(snapshot) = &action.snapshot {
                self.snapshot(action, snapshot, &mut firing);
            } else if let Some(log) = &action.log {
                self.log(action, log, &mut firing);
            } else if action.metric.is_some() {
                self.metric(action, &mut firing);
            }
        }
        let spent = shared.clock.now().saturating_sub(started);
        table.budgets.cpu.charge(started, spent);
    }

    /// The checks every kind shares: done, expiry, CPU budget, condition.
    fn admit<S>(&self, action: &Arc<crate::state::Installed>, firing: &mut Firing<'_, S>) -> bool
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let shared = &self.shared;
        if action.done.load(Ordering::Relaxed) {
            return false;
        }
        if firing.now_ms >= action.spec.expires_at_ms {
            if !action.done.swap(true, Ordering::AcqRel) {
                shared.report(
                    &action.spec.id,
                    AgentActionState::Paused { reason: PauseReason::Expired, message: "the action expired".into() },
                );
            }
            return false;
        }
        let budgets = &firing.table.budgets;
        if !budgets.cpu.available(firing.started) {
            if action.pause(PauseReason::QuotaCpu) {
                let wait = budgets.cpu.recovers_at(firing.started).saturating_sub(firing.started) / 1_000_000;
                shared.report(
                    &action.spec.id,
                    AgentActionState::Paused {
                        reason: PauseReason::QuotaCpu,
                        message: format!(
                            "the agent spent its CPU budget ({}% of a core); resuming in about {wait} ms",
                            budgets.quotas.cpu_fraction * 100.0
                        ),
                    },
                );
            }
            shared.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(condition) = &action.exprs.condition {
            let scope = firing.scope(condition.roots());
            let mut steps = periscope_protocol::Budget::default();
            match condition.eval_condition(&scope, &mut steps) {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => {
                    self.eval_error(action, "condition", &e);
                    return false;
                }
            }
        }
        true
    }

    /// Reports an evaluation error once per action and kind (the action's status says
    /// why it never fires, or why a metric skips samples).
    #[cold]
    fn eval_error(&self, action: &crate::state::Installed, context: &str, error: &periscope_protocol::EvalError) {
        if let Some(state) = action.eval_error_status(context, error) {
            self.shared.report(&action.spec.id, state);
        }
    }

    fn enqueue(&self, hit: RawHit) -> bool {
        match self.shared.hits_tx.try_send(Box::new(hit)) {
            Ok(()) => true,
            Err(_) => {
                // Full (or the agent thread is gone): count the loss, never wait.
                self.shared.counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn raw_hit<S>(&self, action: &Arc<crate::state::Installed>, firing: &mut Firing<'_, S>, backtrace: bool) -> RawHit
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let spans = firing.spans().iter().map(|s| RawSpan { meta: s.meta, fields: s.fields.clone() }).collect();
        RawHit {
            action: Arc::clone(action),
            seq: action.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: firing.now_ms,
            meta: firing.site.meta,
            thread: current_thread(),
            fields: firing.fields.clone(),
            spans,
            backtrace: backtrace.then(std::backtrace::Backtrace::force_capture),
        }
    }

    fn snapshot<S>(
        &self,
        action: &Arc<crate::state::Installed>,
        snapshot: &periscope_protocol::SnapshotSpec,
        firing: &mut Firing<'_, S>,
    ) where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let shared = &self.shared;
        let budgets = &firing.table.budgets;
        if !action.rate.try_take(firing.started, 1) || !budgets.snapshots.try_take(firing.started, 1) {
            if action.pause(PauseReason::RateLimited) {
                shared.report(
                    &action.spec.id,
                    AgentActionState::Paused {
                        reason: PauseReason::RateLimited,
                        message: format!(
                            "hit rate limit reached ({}/s per action, {}/s per agent)",
                            budgets.quotas.snapshot_hits_per_sec_per_action, budgets.quotas.snapshot_hits_per_sec
                        ),
                    },
                );
            }
            shared.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let slot = action.taken.fetch_add(1, Ordering::AcqRel);
        if slot >= snapshot.max_hits {
            action.taken.fetch_sub(1, Ordering::AcqRel);
            shared.complete(action);
            return;
        }
        if action.resume() {
            shared.report(&action.spec.id, AgentActionState::Resumed);
        }
        let hit = self.raw_hit(action, firing, snapshot.backtrace);
        if self.enqueue(hit) {
            if slot + 1 >= snapshot.max_hits {
                shared.complete(action);
            }
        } else {
            action.taken.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn log<S>(&self, action: &Arc<crate::state::Installed>, log: &crate::state::LogState, firing: &mut Firing<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let shared = &self.shared;
        let budgets = &firing.table.budgets;
        if log.paused_until.load(Ordering::Relaxed) > firing.started {
            shared.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !log.line_rate.try_take(firing.started, 1) || !budgets.log_lines.try_take(firing.started, 1) {
            if action.pause(PauseReason::QuotaLog) {
                shared.report(
                    &action.spec.id,
                    AgentActionState::Paused {
                        reason: PauseReason::QuotaLog,
                        message: format!(
                            "dynamic log line budget reached ({} lines/s, burst x{}); lines are dropped until it recovers",
                            budgets.quotas.log_lines_per_sec, budgets.quotas.log_burst_factor
                        ),
                    },
                );
            }
            shared.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(max) = log.spec.max_lines
            && log.lines.fetch_add(1, Ordering::AcqRel) >= max
        {
            shared.complete(action);
            return;
        }
        if action.resume() {
            shared.report(&action.spec.id, AgentActionState::Resumed);
        }
        let hit = self.raw_hit(action, firing, false);
        self.enqueue(hit);
    }

    fn metric<S>(&self, action: &Arc<crate::state::Installed>, firing: &mut Firing<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(metric) = &action.metric else { return };
        match metric.spec.metric {
            MetricKind::Counter => {
                metric.hits.fetch_add(1, Ordering::Relaxed);
            }
            MetricKind::Value => {
                let Some(expr) = &action.exprs.value else { return };
                let scope = firing.scope(expr.roots());
                let mut steps = periscope_protocol::Budget::default();
                // Evaluated first; the lock covers only the update.
                let result = expr.eval_number(&scope, &mut steps);
                let mut agg = metric.aggregate.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(Some(v)) => agg.record(v),
                    Ok(None) => agg.skipped += 1,
                    Err(e) => {
                        agg.skipped += 1;
                        drop(agg);
                        self.eval_error(action, "expression", &e);
                    }
                }
            }
            MetricKind::Duration => self.start_clock(action, firing),
        }
    }

    /// Starts a duration clock: in the span being created (span durations), else in the
    /// innermost span, else on the thread (tic-toc outside spans).
    fn start_clock<S>(&self, action: &Arc<crate::state::Installed>, firing: &Firing<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let now = firing.started;
        let holder = firing.site.span.or(firing.site.parent);
        if let Some(span) = holder.and_then(|id| firing.ctx.span(id)) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<Clocks>() {
                Some(clocks) => {
                    clocks.0.retain(|(a, _)| !Arc::ptr_eq(a, action));
                    clocks.0.push((Arc::clone(action), now));
                }
                None => ext.insert(Clocks(vec![(Arc::clone(action), now)])),
            }
            return;
        }
        let key = Arc::as_ptr(action) as usize;
        THREAD_CLOCKS.with(|c| {
            let mut c = c.borrow_mut();
            c.retain(|(k, _)| *k != key);
            if c.len() >= MAX_THREAD_CLOCKS {
                c.remove(0);
            }
            c.push((key, now));
        });
    }

    /// Stops a tic-toc clock started earlier in this span scope (or on this thread).
    fn stop_clock<S>(&self, action: &Arc<crate::state::Installed>, firing: &Firing<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let now = firing.started;
        let holders = firing.site.span.into_iter().chain(firing.site.parent);
        for id in holders {
            let Some(scope) = firing.ctx.span_scope(id) else { continue };
            for span in scope {
                let mut ext = span.extensions_mut();
                if let Some(clocks) = ext.get_mut::<Clocks>()
                    && let Some(i) = clocks.0.iter().position(|(a, _)| Arc::ptr_eq(a, action))
                {
                    let (_, started) = clocks.0.swap_remove(i);
                    drop(ext);
                    record_duration(action, now.saturating_sub(started));
                    return;
                }
            }
        }
        let key = Arc::as_ptr(action) as usize;
        let started = THREAD_CLOCKS.with(|c| {
            let mut c = c.borrow_mut();
            c.iter().position(|(k, _)| *k == key).map(|i| c.swap_remove(i).1)
        });
        if let Some(started) = started {
            record_duration(action, now.saturating_sub(started));
        }
    }
}

/// What a condition or a metric value reads on the host's thread: the firing's fields
/// and spans, each turned into the value a client will see (parsed, redacted, cut) the
/// first time it is read. A field no expression reads is never parsed or redacted.
struct HotScope<'f> {
    fields: &'f [RawField],
    spans: &'f [RawSpan],
    views: &'f Views<'f>,
}

impl HotScope<'_> {
    fn span_value(&self, span: usize, field: usize) -> Option<&periscope_protocol::Value> {
        let raw = self.spans.get(span)?.fields.get(field)?;
        Some(self.views.spans.get(span)?.get(field)?.get_or_init(|| self.views.build(raw)))
    }
}

impl periscope_protocol::Scope for HotScope<'_> {
    fn field(&self, name: &str) -> Option<&periscope_protocol::Value> {
        let i = self.fields.iter().position(|f| f.name == name)?;
        let raw = self.fields.get(i)?;
        Some(self.views.fields.get(i)?.get_or_init(|| self.views.build(raw)))
    }

    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&periscope_protocol::Value> {
        let find = |s: &RawSpan| s.fields.iter().position(|f| f.name == field);
        let (i, j) = match span {
            Some(name) => {
                let i = self.spans.iter().position(|s| s.meta.name() == name)?;
                (i, find(self.spans.get(i)?)?)
            }
            None => self.spans.iter().enumerate().find_map(|(i, s)| find(s).map(|j| (i, j)))?,
        };
        self.span_value(i, j)
    }

    fn has_span(&self, name: &str) -> bool {
        self.spans.iter().any(|s| s.meta.name() == name)
    }
}

fn capture_spans<S>(parent: Option<&Id>, table: &Table, ctx: &Context<'_, S>) -> Vec<RawSpan>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(parent) = parent else { return Vec::new() };
    let Some(scope) = ctx.span_scope(parent) else { return Vec::new() };
    let max_frames = table.limits.max_frames as usize;
    let with_values = table.limits.frames_with_values as usize;
    scope
        .take(max_frames)
        .enumerate()
        .map(|(i, span)| {
            let fields = if i < with_values {
                span.extensions().get::<SpanValues>().map(|v| v.0.fields.clone()).unwrap_or_default()
            } else {
                Vec::new()
            };
            RawSpan { meta: span.metadata(), fields }
        })
        .collect()
}

/// The agent's own callsites (and the dynamic log lines it emits) are neither
/// inspectable nor captured.
fn is_internal(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    target.starts_with("periscope_agent") || target.starts_with("periscope::")
}

fn current_thread() -> ThreadInfo {
    let t = std::thread::current();
    let id = format!("{:?}", t.id());
    let id = id.strip_prefix("ThreadId(").and_then(|s| s.strip_suffix(')')).map(str::to_owned).unwrap_or(id);
    ThreadInfo { name: t.name().map(str::to_owned), id }
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
