//! The `tracing` adapter's state: which callsites hold which actions (an immutable
//! table swapped whole), the catalog of callsites, and the dispatchers the layer is part
//! of. What actions do and cost lives in the core (`periscope_agent_core::state`).
//!
//! The action table is an immutable snapshot behind an `RwLock<Arc<_>>`: the agent
//! thread builds a new one whenever actions or callsites change and swaps it in; the
//! layer only ever clones the `Arc`. The `active` flag lets an idle agent answer
//! `enabled` with one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use periscope_agent_core::{Budgets, CatalogBatch, Core, Installed, RawHit, Runtime, RuntimeIdentity};
use periscope_protocol::{ActionId, AgentQuotas, CaptureLimits, CatalogEntry, Hit, LocationKind, LogLevel};
use tracing_core::callsite::Identifier;
use tracing_core::{Level, LevelFilter, Metadata};

use crate::capture::Payload;

/// Spans are recorded (for the span stack of hits) up to this level while any snapshot
/// is live; TRACE spans are left alone unless an action targets one.
const SPAN_RECORD_LEVEL: Level = Level::DEBUG;

/// Whether `meta` is where `action` is placed: its file and line, or, for a function
/// probe, a span of that name whose module path or target is the probe's module.
fn placed_at(action: &Installed, meta: &Metadata<'_>) -> bool {
    if action.spec.function.is_some() {
        return meta.is_span()
            && (action.is_function(meta.name(), meta.module_path())
                || action.is_function(meta.name(), Some(meta.target())));
    }
    matches!((meta.file(), meta.line()), (Some(file), Some(line)) if action.is_at(file, line))
}

/// Whether an event reports how a call ended: the `return` and `error` events that
/// `#[instrument(ret, err)]` emits inside its span.
pub(crate) fn is_call_outcome(meta: &Metadata<'_>) -> bool {
    meta.is_event() && (meta.fields().field("return").is_some() || meta.fields().field("error").is_some())
}

/// Whether `meta` is where `action`'s tic-toc duration stops.
fn ends_at(action: &Installed, meta: &Metadata<'_>) -> bool {
    matches!((meta.file(), meta.line()), (Some(file), Some(line)) if action.ends_at(file, line))
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

/// An immutable snapshot of what is installed where.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) actions: HashMap<ActionId, Arc<Installed>>,
    pub(crate) by_callsite: HashMap<Identifier, CallsiteActions>,
    /// Live error-capture actions: every ERROR event and every panic is theirs.
    pub(crate) errors: Vec<Arc<Installed>>,
    /// Record span fields (for span stacks) while any snapshot is live.
    pub(crate) record_spans: bool,
    /// A function probe's snapshot is live: `return` and `error` events are read into
    /// the calls their spans hold.
    pub(crate) calls: bool,
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
            errors: Vec::new(),
            record_spans: false,
            calls: false,
            max_level: LevelFilter::OFF,
            budgets: Arc::new(Budgets::new(AgentQuotas::default())),
            limits: CaptureLimits::default(),
            redactor,
        }
    }

    /// Whether the layer wants this callsite. Spans are recorded only while a broker
    /// session is `connected`: their fields are for the span stacks of captures, and
    /// none is made while nothing could be delivered.
    pub(crate) fn wants(&self, meta: &Metadata<'_>, connected: bool) -> bool {
        self.by_callsite.contains_key(&meta.callsite())
            || (self.record_spans && connected && meta.is_span() && *meta.level() <= SPAN_RECORD_LEVEL)
            || (self.captures_error(meta))
            || (self.calls && is_call_outcome(meta))
    }

    /// Whether `meta` is an ERROR event and an error-capture action is live.
    #[inline]
    pub(crate) fn captures_error(&self, meta: &Metadata<'_>) -> bool {
        !self.errors.is_empty() && *meta.level() == Level::ERROR && meta.is_event()
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

/// Everything the layer and the agent thread share.
pub(crate) struct Shared {
    /// The runtime-neutral state: statuses, the hit queue, counters, redaction rules.
    pub(crate) core: Arc<Core<Payload>>,
    /// Fast idle check: false when no action is installed.
    pub(crate) active: AtomicBool,
    /// Whether any action is placed at a callsite (else `enabled` decides from the two
    /// flags below, without reading the table).
    pub(crate) placed: AtomicBool,
    /// Whether spans are recorded (the table's `record_spans`).
    pub(crate) record_spans: AtomicBool,
    table: RwLock<Arc<Table>>,
    catalog: Mutex<Catalog>,
    /// The dispatchers our layer is part of.
    dispatches: Mutex<Vec<tracing_core::dispatcher::WeakDispatch>>,
    /// Whether this agent counts in [`crate::panic::LIVE`] (an error-capture action is
    /// installed).
    errors_live: AtomicBool,
    /// Content hashes of the catalog's files (agent thread only).
    source_hashes: crate::source_hash::SourceHashes,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("active", &self.active).finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.errors_live.load(Ordering::Acquire) {
            crate::panic::LIVE.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Shared {
    /// Whether the layer wants `meta` when no action is placed at any callsite: spans to
    /// record, and ERROR events while an error capture is live. Reads two flags, not the
    /// table: with only an error capture live, every event the host logs is decided in
    /// a few instructions.
    #[inline]
    pub(crate) fn wants_unplaced(&self, meta: &Metadata<'_>) -> bool {
        let level = *meta.level();
        if meta.is_span() {
            return level <= SPAN_RECORD_LEVEL && self.record_spans.load(Ordering::Relaxed) && self.core.is_connected();
        }
        level == Level::ERROR && self.errors_live.load(Ordering::Relaxed)
    }

    pub(crate) fn new(core: Arc<Core<Payload>>) -> Self {
        let redactor = core.redactor();
        Shared {
            core,
            active: AtomicBool::new(false),
            placed: AtomicBool::new(false),
            record_spans: AtomicBool::new(false),
            table: RwLock::new(Arc::new(Table::empty(redactor))),
            catalog: Mutex::new(Catalog::default()),
            dispatches: Mutex::new(Vec::new()),
            errors_live: AtomicBool::new(false),
            source_hashes: crate::source_hash::SourceHashes::from_env(),
        }
    }

    /// Emits a dynamic log line through the host's own `tracing` subscriber (target
    /// `periscope::dynamic_log`), so it lands wherever the service's logs go. Runs on the
    /// agent thread, which our filter ignores, so the line is never captured again.
    pub(crate) fn emit_app_log(&self, level: LogLevel, action_id: &ActionId, text: &str) {
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
        let errors = !table.errors.is_empty();
        let (placed, record_spans) = (!table.by_callsite.is_empty(), table.record_spans);
        if errors {
            crate::panic::ensure_installed();
        }
        if self.errors_live.swap(errors, Ordering::AcqRel) != errors {
            if errors {
                crate::panic::LIVE.fetch_add(1, Ordering::AcqRel);
            } else {
                crate::panic::LIVE.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        self.placed.store(placed, Ordering::Release);
        self.record_spans.store(record_spans, Ordering::Release);
        self.active.store(active, Ordering::Release);
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
        self.core.wake.notify_one();
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
        let redactor = self.core.redactor();
        let catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_callsite: HashMap<Identifier, CallsiteActions> = HashMap::new();
        let mut matched = Vec::with_capacity(specs.len());
        let mut max_level = LevelFilter::OFF;
        let mut errors = Vec::new();
        for action in &specs {
            if action.errors.is_some() {
                // Everywhere at once: ERROR events (through `wants`) and panics.
                errors.push(Arc::clone(action));
                max_level = max_level.max(LevelFilter::ERROR);
                matched.push((Arc::clone(action), 1));
                continue;
            }
            let mut count = 0u32;
            for id in &catalog.order {
                let Some(known) = catalog.known.get(id) else { continue };
                let here = placed_at(action, known.meta);
                let ends_here = ends_at(action, known.meta);
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
        let calls = specs.iter().any(|a| a.probes_calls());
        if record_spans {
            max_level = max_level.max(LevelFilter::from_level(SPAN_RECORD_LEVEL));
        }
        // An action whose code has not run yet (or runs below the host's level) needs its
        // callsite to register when it runs: let every level through while one is pending.
        if matched.iter().any(|(_, n)| *n == 0) {
            max_level = LevelFilter::TRACE;
        }
        let actions = specs.into_iter().map(|a| (a.spec.id.clone(), a)).collect();
        self.set_table(Table {
            actions,
            by_callsite,
            errors,
            record_spans,
            calls,
            max_level,
            budgets,
            limits,
            redactor,
        });
        matched
    }

    /// Whether a just-registered callsite matches an installed action.
    pub(crate) fn matches_installed(&self, meta: &Metadata<'_>) -> bool {
        self.table().actions.values().any(|a| placed_at(a, meta) || ends_at(a, meta))
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
        hash: None,
    }
}

/// The `tracing` adapter as the agent thread sees it.
impl Runtime for Shared {
    type Payload = Payload;

    fn identity(&self) -> RuntimeIdentity {
        RuntimeIdentity {
            language: "rust".into(),
            runtime: format!("rust ({} {})", std::env::consts::OS, std::env::consts::ARCH),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![
                "snapshot".into(),
                "backtrace".into(),
                "span_stack".into(),
                "capture_errors".into(),
                "function_probe".into(),
            ],
        }
    }

    fn install(
        &self,
        actions: Vec<Arc<Installed>>,
        budgets: Arc<Budgets>,
        limits: CaptureLimits,
    ) -> Option<Vec<(Arc<Installed>, u32)>> {
        let matched = Shared::install(self, actions, budgets, limits);
        // Interest rebuilds take tracing's global callsite lock and call back into our
        // filter, which must know this thread is the agent's.
        crate::layer::IN_AGENT.with(|a| a.set(true));
        self.rebuild_interest();
        Some(matched)
    }

    fn catalog(&self, full: bool) -> CatalogBatch {
        // Hashed after the catalog's lock is released: reading files takes time.
        let mut entries = self.catalog_updates(full);
        self.source_hashes.fill(&mut entries);
        CatalogBatch { entries, files: Vec::new() }
    }

    fn build_hit(&self, raw: &RawHit<Payload>, limits: &CaptureLimits) -> Hit {
        crate::capture::build_hit(raw, limits)
    }

    fn emit_app_log(&self, level: LogLevel, action_id: &ActionId, text: &str) {
        Shared::emit_app_log(self, level, action_id, text);
    }

    /// Spans are recorded only while a session is up (`Table::wants`): tracing's cached
    /// interest is rebuilt so that, while the broker is away, spans that are not probed
    /// cost what they cost without an action.
    fn connection_changed(&self, _connected: bool) {
        if self.record_spans.load(Ordering::Acquire) {
            self.rebuild_interest();
        }
    }
}
