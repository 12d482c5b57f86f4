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

use periscope_agent_core::Installed;
use periscope_protocol::ThreadInfo;
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, LevelFilter, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::capture::{FieldCollector, Payload, RawField, RawSpan, SpanValues};
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
            self.shared.core.request_rebuild();
            return Interest::sometimes();
        }
        if table.wants(meta, self.shared.core.is_connected()) {
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
        if !self.shared.placed.load(Ordering::Relaxed) {
            return self.shared.wants_unplaced(meta);
        }
        self.shared.table().wants(meta, self.shared.core.is_connected())
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
        let table = self.shared.table();
        let entry = table.by_callsite.get(&attrs.metadata().callsite());
        // Span fields are read for the span stacks of captures; while no capture could
        // be delivered (no broker, or its queue full), a span costs nothing more than
        // counting the captures it would have made.
        if !self.shared.core.can_capture()
            && entry.is_none_or(|e| self.shared.core.refuse_undeliverable(&e.actions, &e.ends))
        {
            return;
        }
        let placed = entry.is_some();
        let Some(span) = ctx.span(id) else { return };
        let mut values = FieldCollector::default();
        attrs.record(&mut values);
        // Stored first, so that a duration started by this span can find it.
        let fields = values.fields.clone();
        span.extensions_mut().insert(SpanValues(values));
        if placed {
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
        let meta = event.metadata();
        let parent = || {
            event
                .parent()
                .cloned()
                .or_else(|| if event.is_contextual() { ctx.current_span().id().cloned() } else { None })
        };
        if table.calls && crate::state::is_call_outcome(meta) {
            record_outcome(event, parent().as_ref(), &ctx);
        }
        let placed = table.by_callsite.contains_key(&meta.callsite());
        let error = table.captures_error(meta) && !IN_AGENT.with(|a| a.get());
        if !placed && !error {
            return;
        }
        // Nothing captured here could be delivered: the captures are counted as drops,
        // and the event's fields are not even read (unless a metric needs them).
        if !self.shared.core.can_capture()
            && table
                .by_callsite
                .get(&meta.callsite())
                .is_none_or(|e| self.shared.core.refuse_undeliverable(&e.actions, &e.ends))
        {
            return;
        }
        let mut values = FieldCollector::default();
        event.record(&mut values);
        let parent = parent();
        let site = Site { meta, parent: parent.as_ref(), span: None };
        if error {
            let fields = if placed { values.fields.clone() } else { std::mem::take(&mut values.fields) };
            self.fire_error(&table, site, fields, &ctx);
        }
        if placed {
            self.fire(&table, site, values.fields, &ctx);
        }
    }

    /// A span closing ends the span-duration metrics it started, and the calls its
    /// function probes hold.
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if !self.shared.active.load(Ordering::Relaxed) {
            return;
        }
        let Some(span) = ctx.span(&id) else { return };
        let (clocks, calls) = {
            let mut ext = span.extensions_mut();
            (ext.remove::<Clocks>(), ext.remove::<Calls>())
        };
        if let Some(clocks) = clocks {
            let now = self.shared.core.clock.now();
            for (action, started) in clocks.0 {
                if periscope_agent_core::fire::times_whole_scope(&action) {
                    periscope_agent_core::fire::record_duration(&action, now.saturating_sub(started));
                }
            }
        }
        if let Some(calls) = calls {
            self.finish_calls(&id, span.metadata(), span.parent().map(|p| p.id()), calls, &ctx);
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
struct Clocks(Vec<(Arc<Installed>, u64)>);

/// Calls of function probes a span holds until it closes: the action, the entry time
/// (agent clock), and the `return`/`error` fields of the events that reported how the
/// call ended. Each holds one of its action's bounded call slots
/// ([`periscope_agent_core::fire::open_call`]); a span that never closes keeps its slot
/// and nothing more.
#[derive(Default)]
struct Calls {
    held: Vec<(Arc<Installed>, u64)>,
    outcome: Vec<RawField>,
}

impl Drop for Calls {
    /// A span dropped without closing (or a table swapped) gives its slots back.
    fn drop(&mut self) {
        for (action, _) in self.held.drain(..) {
            periscope_agent_core::fire::close_call(&action);
        }
    }
}

/// Keeps the `return` or `error` field of an `#[instrument(ret, err)]` event in the
/// calls its span holds.
fn record_outcome<S>(event: &Event<'_>, parent: Option<&Id>, ctx: &Context<'_, S>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(span) = parent.and_then(|id| ctx.span(id)) else { return };
    let mut ext = span.extensions_mut();
    let Some(calls) = ext.get_mut::<Calls>() else { return };
    let mut values = FieldCollector::default();
    event.record(&mut values);
    for field in values.fields.into_iter().filter(|f| f.name == "return" || f.name == "error") {
        calls.outcome.retain(|f| f.name != field.name);
        calls.outcome.push(field);
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
}

impl<S> periscope_agent_core::fire::Site for Firing<'_, S>
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    type Payload = Payload;
    type Scope<'b>
        = HotScope<'b>
    where
        Self: 'b;

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

    /// Copies every field and the span stack: already text or numbers, cheap to copy
    /// whatever the hit is for.
    fn capture(&mut self, need: periscope_agent_core::fire::Need<'_>) -> Payload {
        let backtrace = matches!(need, periscope_agent_core::fire::Need::Snapshot { backtrace: true });
        let spans = self.spans().iter().map(|s| RawSpan { meta: s.meta, fields: s.fields.clone() }).collect();
        Payload {
            meta: Some(self.site.meta),
            fields: self.fields.clone(),
            spans,
            backtrace: backtrace.then(std::backtrace::Backtrace::force_capture),
        }
    }

    fn thread(&mut self) -> ThreadInfo {
        current_thread()
    }

    /// Starts a duration clock: in the span being created (span durations), else in the
    /// innermost span, else on the thread (tic-toc outside spans).
    fn start_clock(&mut self, action: &Arc<Installed>, now: u64) {
        let holder = self.site.span.or(self.site.parent);
        if let Some(span) = holder.and_then(|id| self.ctx.span(id)) {
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
        periscope_agent_core::fire::start_thread_clock(action, 0, now);
    }

    /// Holds a function probe's call in the span being created (its fields are read
    /// again at close, with whatever `record` added).
    fn begin_call(&mut self, action: &Arc<Installed>, started: u64) {
        let Some(span) = self.site.span.and_then(|id| self.ctx.span(id)) else {
            periscope_agent_core::fire::close_call(action);
            return;
        };
        let mut ext = span.extensions_mut();
        match ext.get_mut::<Calls>() {
            Some(calls) => calls.held.push((Arc::clone(action), started)),
            None => ext.insert(Calls { held: vec![(Arc::clone(action), started)], outcome: Vec::new() }),
        }
    }

    /// Stops a tic-toc clock started earlier in this span scope (or on this thread).
    fn stop_clock(&mut self, action: &Arc<Installed>) -> Option<u64> {
        let holders = self.site.span.into_iter().chain(self.site.parent);
        for id in holders {
            let Some(scope) = self.ctx.span_scope(id) else { continue };
            for span in scope {
                let mut ext = span.extensions_mut();
                if let Some(clocks) = ext.get_mut::<Clocks>()
                    && let Some(i) = clocks.0.iter().position(|(a, _)| Arc::ptr_eq(a, action))
                {
                    return Some(clocks.0.swap_remove(i).1);
                }
            }
        }
        periscope_agent_core::fire::stop_thread_clock(action, 0)
    }
}

impl ProbeLayer {
    /// Ends the calls a closing span held: one hit each (when slow enough) with the
    /// span's fields as they are now, the `return`/`error` fields, and the duration.
    fn finish_calls<S>(
        &self,
        id: &Id,
        meta: &'static Metadata<'static>,
        parent: Option<Id>,
        mut calls: Calls,
        ctx: &Context<'_, S>,
    ) where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let table = self.shared.table();
        let outcome = if calls.outcome.iter().any(|f| f.name == "error") {
            periscope_protocol::CallOutcome::Raised
        } else if calls.outcome.iter().any(|f| f.name == "return") {
            periscope_protocol::CallOutcome::Returned
        } else {
            periscope_protocol::CallOutcome::Unknown
        };
        let mut fields = ctx
            .span(id)
            .and_then(|s| s.extensions().get::<SpanValues>().map(|v| v.0.fields.clone()))
            .unwrap_or_default();
        fields.append(&mut calls.outcome);
        let names = meta.fields().iter().map(|f| (f.name(), table.redactor.name_rule(f.name()))).collect::<Vec<_>>();
        for (action, started) in std::mem::take(&mut calls.held) {
            let views = Views {
                limits: table.limits,
                redactor: &table.redactor,
                names: &names,
                fields: Vec::new(),
                spans: Vec::new(),
            };
            let site = Site { meta, parent: parent.as_ref(), span: Some(id) };
            let mut firing = Firing { table: &table, site, fields: fields.clone(), spans: None, ctx, views };
            periscope_agent_core::fire::finish_call(
                &self.shared.core,
                &table.budgets,
                &action,
                started,
                outcome,
                &mut firing,
            );
        }
    }

    /// Runs every action installed on the callsite (the core's firing logic).
    fn fire<S>(&self, table: &Table, site: Site<'_>, fields: Vec<RawField>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(entry) = table.by_callsite.get(&site.meta.callsite()) else { return };
        entry.hits.fetch_add(1, Ordering::Relaxed);
        let views = Views {
            limits: table.limits,
            redactor: &table.redactor,
            names: &entry.names,
            fields: Vec::new(),
            spans: Vec::new(),
        };
        let mut firing = Firing { table, site, fields, spans: None, ctx, views };
        periscope_agent_core::fire::fire(&self.shared.core, &table.budgets, &entry.actions, &entry.ends, &mut firing);
    }
}

impl ProbeLayer {
    /// Runs the error-capture actions for an ERROR event: counted always, captured (its
    /// fields, span stack, optionally a backtrace) when its location and type are due.
    #[cold]
    fn fire_error<S>(&self, table: &Table, site: Site<'_>, fields: Vec<RawField>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let occurrence = crate::panic::event_occurrence(site.meta, &fields);
        let views = Views {
            limits: table.limits,
            redactor: &table.redactor,
            names: &[],
            fields: Vec::new(),
            spans: Vec::new(),
        };
        let mut firing = Firing { table, site, fields, spans: None, ctx, views };
        periscope_agent_core::errors::fire_error(
            &self.shared.core,
            &table.budgets,
            &table.errors,
            &occurrence,
            &mut firing,
        );
    }

    /// Runs the error-capture actions for a panic on this thread (called by the panic
    /// hook, inside the dispatcher this layer is part of): the span stack comes from the
    /// dispatcher's registry, the backtrace from here.
    #[cold]
    pub(crate) fn on_panic(&self, info: &std::panic::PanicHookInfo<'_>, dispatch: &tracing_core::Dispatch) {
        let table = self.shared.table();
        if table.errors.is_empty() {
            return;
        }
        let occurrence = crate::panic::panic_occurrence(info);
        let spans = match (dispatch.downcast_ref::<tracing_subscriber::Registry>(), dispatch.current_span().id()) {
            (Some(registry), Some(id)) => match registry.span(id) {
                Some(span) => raw_spans(span.scope(), &table),
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        let fields =
            vec![RawField { name: "message", value: crate::capture::Raw::Str(occurrence.error.message.clone(), None) }];
        let views = Views {
            limits: table.limits,
            redactor: &table.redactor,
            names: &[],
            fields: Vec::new(),
            spans: Vec::new(),
        };
        let mut site = PanicSite { fields, spans, views };
        periscope_agent_core::errors::fire_error(
            &self.shared.core,
            &table.budgets,
            &table.errors,
            &occurrence,
            &mut site,
        );
    }
}

/// A panic as the core's firing logic sees it: its message as the one field, the span
/// stack read from the registry, and no clocks.
struct PanicSite<'a> {
    fields: Vec<RawField>,
    spans: Vec<RawSpan>,
    views: Views<'a>,
}

impl periscope_agent_core::fire::Site for PanicSite<'_> {
    type Payload = Payload;
    type Scope<'b>
        = HotScope<'b>
    where
        Self: 'b;

    fn scope(&mut self, _roots: &periscope_protocol::expr::Roots) -> HotScope<'_> {
        if self.views.fields.len() != self.fields.len() {
            self.views.fields = std::iter::repeat_with(OnceCell::new).take(self.fields.len()).collect();
        }
        HotScope { fields: &self.fields, spans: &[], views: &self.views }
    }

    fn capture(&mut self, _need: periscope_agent_core::fire::Need<'_>) -> Payload {
        Payload {
            meta: None,
            fields: self.fields.clone(),
            spans: self.spans.iter().map(|s| RawSpan { meta: s.meta, fields: s.fields.clone() }).collect(),
            backtrace: Some(std::backtrace::Backtrace::force_capture()),
        }
    }

    fn thread(&mut self) -> ThreadInfo {
        current_thread()
    }

    fn start_clock(&mut self, _action: &Arc<Installed>, _now: u64) {}

    fn stop_clock(&mut self, _action: &Arc<Installed>) -> Option<u64> {
        None
    }

    /// A panic is not a call of a probed span: nothing to hold.
    fn begin_call(&mut self, action: &Arc<Installed>, _started: u64) {
        periscope_agent_core::fire::close_call(action);
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
    raw_spans(scope, table)
}

/// The span stack from `scope` (innermost first), bounded by the capture limits, with
/// the recorded fields of the innermost frames.
fn raw_spans<'a, R>(scope: tracing_subscriber::registry::Scope<'a, R>, table: &Table) -> Vec<RawSpan>
where
    R: LookupSpan<'a>,
{
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
