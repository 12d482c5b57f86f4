//! The `tracing` integration: a per-layer filter that decides which callsites the agent
//! sees, and a layer that captures hits on them.
//!
//! # Cost model
//!
//! - Idle (no action installed): [`ProbeFilter::callsite_enabled`] answers
//!   `Interest::never()` and the level hint is `OFF`, so callsites the host does not log
//!   cost nothing, and callsites the host does log cost one relaxed atomic load in
//!   [`ProbeFilter::enabled`] (the host's own layers still get every event: a per-layer
//!   filter never vetoes them).
//! - With actions installed: targeted callsites get `Interest::always()`; every span up to
//!   DEBUG is recorded (its fields copied) so hits can carry the span stack; other
//!   callsites stay as above plus a table lookup.
//! - A hit: budget checks, copying the fields (bounded), a `try_send` on a bounded
//!   queue. Never a lock held across user code, never an await, never a block.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use periscope_protocol::{AgentActionState, PauseReason, ThreadInfo};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, LevelFilter, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::capture::{FieldCollector, RawHit, RawSpan, SpanValues};
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
        let new = self.shared.register_callsite(meta);
        if !self.shared.active.load(Ordering::Acquire) {
            return Interest::never();
        }
        let table = self.shared.table();
        if table.wants(meta) {
            return Interest::always();
        }
        if new && self.shared.matches_installed(meta) {
            // Code that had not run yet when its action was placed: ask the agent thread
            // to rebuild the table with it. Until then, `enabled` is asked per event.
            self.shared.rebuild_needed.store(true, Ordering::Release);
            self.shared.wake.notify_one();
            return Interest::sometimes();
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
        let table = self.shared.table();
        if table.by_callsite.contains_key(&attrs.metadata().callsite()) {
            // A snapshot on a span location fires when the span is created.
            let parent = span.parent().map(|p| p.id());
            self.fire(&table, attrs.metadata(), values.fields.clone(), parent.as_ref(), &ctx);
        }
        span.extensions_mut().insert(SpanValues(values));
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
        self.fire(&table, event.metadata(), values.fields, parent.as_ref(), &ctx);
    }
}

impl ProbeLayer {
    /// Runs every action installed on the callsite: budgets, hit slots, capture, enqueue.
    fn fire<S>(
        &self,
        table: &Table,
        meta: &'static Metadata<'static>,
        fields: Vec<crate::capture::RawField>,
        parent: Option<&Id>,
        ctx: &Context<'_, S>,
    ) where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(entry) = table.by_callsite.get(&meta.callsite()) else { return };
        entry.hits.fetch_add(1, Ordering::Relaxed);
        let shared = &self.shared;
        let started = shared.clock.now();
        let budgets = &table.budgets;
        let now_ms = unix_ms();
        let mut fields = Some(fields);
        let mut spans: Option<Vec<RawSpan>> = None;
        for action in &entry.actions {
            if action.done.load(Ordering::Relaxed) {
                continue;
            }
            let Some(snapshot) = &action.snapshot else { continue };
            if now_ms >= action.spec.expires_at_ms {
                if !action.done.swap(true, Ordering::AcqRel) {
                    shared.report(
                        &action.spec.id,
                        AgentActionState::Paused { reason: PauseReason::Expired, message: "the action expired".into() },
                    );
                }
                continue;
            }
            if !budgets.cpu.available(started) {
                if action.pause(PauseReason::QuotaCpu) {
                    let wait = budgets.cpu.recovers_at(started).saturating_sub(started) / 1_000_000;
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
                continue;
            }
            if let Some(condition) = &action.exprs.condition {
                let fields = fields.as_deref().unwrap_or_default();
                let spans = if condition.roots().uses_spans() {
                    Some(spans.get_or_insert_with(|| capture_spans(parent, table, ctx)).as_slice())
                } else {
                    None
                };
                let scope = HotScope::build(fields, spans, condition.roots(), &table.limits);
                let mut steps = periscope_protocol::Budget::default();
                match condition.eval_condition(&scope, &mut steps) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        if !action.eval_error_reported.swap(true, Ordering::Relaxed) {
                            shared.report(
                                &action.spec.id,
                                AgentActionState::EvalError { reason: format!("condition: {e}") },
                            );
                        }
                        continue;
                    }
                }
            }
            if !action.rate.try_take(started, 1) || !budgets.snapshots.try_take(started, 1) {
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
                continue;
            }
            let slot = action.taken.fetch_add(1, Ordering::AcqRel);
            if slot >= snapshot.max_hits {
                action.taken.fetch_sub(1, Ordering::AcqRel);
                shared.complete(action);
                continue;
            }
            if action.resume() {
                shared.report(&action.spec.id, AgentActionState::Resumed);
            }
            let spans = spans.get_or_insert_with(|| capture_spans(parent, table, ctx));
            let hit = Box::new(RawHit {
                action: Arc::clone(action),
                seq: action.seq.fetch_add(1, Ordering::Relaxed) + 1,
                time_ms: now_ms,
                meta,
                thread: current_thread(),
                // The last action on the callsite takes the fields; earlier ones clone.
                fields: fields.clone().unwrap_or_default(),
                spans: spans.iter().map(|s| RawSpan { meta: s.meta, fields: s.fields.clone() }).collect(),
                backtrace: snapshot.backtrace.then(std::backtrace::Backtrace::force_capture),
            });
            match shared.hits_tx.try_send(hit) {
                Ok(()) => {
                    if slot + 1 >= snapshot.max_hits {
                        shared.complete(action);
                    }
                }
                Err(_) => {
                    // Full (or the agent thread is gone): give the slot back, count the loss.
                    action.taken.fetch_sub(1, Ordering::AcqRel);
                    shared.counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        drop(fields.take());
        let spent = shared.clock.now().saturating_sub(started);
        budgets.cpu.charge(started, spent);
    }
}

/// The values a condition reads, converted from the raw capture on the host's thread.
/// Only the fields the expression names are converted (parsing `Debug` text only for
/// those), so a condition on a plain number costs little more than the comparison.
struct HotScope {
    fields: Vec<periscope_protocol::Field>,
    spans: Vec<(&'static str, Vec<periscope_protocol::Field>)>,
}

impl HotScope {
    fn build(
        raw: &[crate::capture::RawField],
        spans: Option<&[RawSpan]>,
        roots: &periscope_protocol::expr::Roots,
        limits: &periscope_protocol::CaptureLimits,
    ) -> HotScope {
        let convert = |f: &crate::capture::RawField| {
            let mut summary = periscope_protocol::TruncationSummary::default();
            periscope_protocol::Field::new(f.name, crate::capture::to_value(&f.value, limits, &mut summary))
        };
        let fields = raw.iter().filter(|f| roots.reads_field(f.name)).map(convert).collect();
        let spans = spans
            .map(|spans| {
                spans
                    .iter()
                    .map(|s| {
                        let fields = s
                            .fields
                            .iter()
                            .filter(|f| roots.span_fields.iter().any(|n| n == f.name))
                            .map(convert)
                            .collect();
                        (s.meta.name(), fields)
                    })
                    .collect()
            })
            .unwrap_or_default();
        HotScope { fields, spans }
    }
}

impl periscope_protocol::Scope for HotScope {
    fn field(&self, name: &str) -> Option<&periscope_protocol::Value> {
        self.fields.iter().find(|f| f.name == name).map(|f| &f.value)
    }

    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&periscope_protocol::Value> {
        match span {
            Some(name) => self
                .spans
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, fields)| fields.iter().find(|f| f.name == field).map(|f| &f.value)),
            None => self.spans.iter().find_map(|(_, fields)| fields.iter().find(|f| f.name == field).map(|f| &f.value)),
        }
    }

    fn has_span(&self, name: &str) -> bool {
        self.spans.iter().any(|(n, _)| *n == name)
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
