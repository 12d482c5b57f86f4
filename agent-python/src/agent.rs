//! The Python adapter on the agents' core: the state the probes read (the table of
//! instrumented code objects), the runtime the agent thread talks to, and the commands
//! it hands the interpreter-side worker.
//!
//! Three threads meet here. The agent thread (the core's, with its tokio runtime) never
//! holds the GIL: it sends commands down a channel and reads the catalog the worker
//! published. The worker (a Python daemon thread, `periscope-agent-python`) waits for
//! those commands with the GIL released, then does the interpreter-side work with it
//! held: resolve locations to code objects, instrument them, compute catalogs. The
//! host's threads run the probes (`probe.rs`), under the GIL, reading the table that the
//! worker swaps whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};

use periscope_agent_core::{
    AgentConfig, Budgets, CatalogBatch, Core, Installed, RawHit, Running, Runtime, RuntimeIdentity,
};
use periscope_protocol::{
    ActionId, AgentActionState, CaptureLimits, FileLines, Hit, HitLocation, LogLevel, SpanFrame, TruncationSummary,
};
use periscope_redaction::{NameRule, Redactor};

/// What a probe captures on the host's thread: values already read within the
/// redaction limits (reading Python objects needs the GIL, which the agent thread never
/// takes).
#[derive(Debug)]
pub(crate) struct Payload {
    pub(crate) location: HitLocation,
    pub(crate) locals: Vec<periscope_protocol::Field>,
    pub(crate) frames: Vec<SpanFrame>,
    /// The traceback's text, innermost first (error captures only).
    pub(crate) backtrace: Option<Vec<String>>,
}

/// Work for the interpreter-side worker.
#[derive(Debug)]
pub(crate) enum Command {
    /// Install these actions (generation, actions).
    Install(u64, Vec<Arc<Installed>>),
    /// Emit a dynamic log line through Python's `logging`.
    Log(LogLevel, ActionId, String),
    /// A broker session began: places silenced while none was up report again.
    Reconnected,
}

/// Actions at one instrumented place: a line of a code object, or a function's entry
/// or exit.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Actions that fire here.
    pub(crate) actions: Vec<Arc<Installed>>,
    /// Durations that stop here (tic-toc ends, whole-function exits).
    pub(crate) ends: Vec<Arc<Installed>>,
    /// The code object's local names with what the redaction rules make of them.
    pub(crate) names: Vec<(String, NameRule)>,
}

/// A function probe's call in flight: its entry, held until it returns or raises.
#[derive(Debug)]
pub(crate) struct HeldCall {
    /// The probe's action; taken out when the call finishes (its slot then given back
    /// by `finish_call`).
    pub(crate) action: Option<Arc<Installed>>,
    /// Entry time (agent clock).
    pub(crate) started: u64,
    /// Where it was entered.
    pub(crate) location: HitLocation,
    /// Its arguments, read at entry.
    pub(crate) args: Vec<periscope_protocol::Field>,
}

impl Drop for HeldCall {
    /// A call dropped unfinished (replaced, or its action removed) gives its slot back.
    fn drop(&mut self) {
        if let Some(action) = self.action.take() {
            periscope_agent_core::fire::close_call(&action);
        }
    }
}

/// Most calls in flight held across every function probe of the agent (each probe
/// also holds at most `periscope_agent_core::state::MAX_OPEN_CALLS`).
pub(crate) const MAX_HELD_CALLS: usize = 4_096;

/// Calls in flight by (action, frame). Only probes touch it, under the GIL, so the lock
/// is never contended; a probe that finds it taken skips rather than waits.
#[derive(Debug, Default)]
pub(crate) struct Calls(pub(crate) Mutex<HashMap<(usize, usize), HeldCall>>);

impl Calls {
    /// Holds `call` for the frame at `frame`; false (the call dropped) when full.
    pub(crate) fn hold(&self, action: &Arc<Installed>, frame: usize, call: HeldCall) -> bool {
        let Ok(mut calls) = self.0.try_lock() else { return false };
        let key = (Arc::as_ptr(action) as usize, frame);
        // A frame address reused by a new call replaces a call that never ended (one
        // that raised under bytecode injection, a generator never finished).
        if calls.len() >= MAX_HELD_CALLS && !calls.contains_key(&key) {
            return false;
        }
        calls.insert(key, call);
        true
    }

    /// Takes back `action`'s call of the frame at `frame`.
    pub(crate) fn take(&self, action: &Arc<Installed>, frame: usize) -> Option<HeldCall> {
        let mut calls = self.0.try_lock().ok()?;
        calls.remove(&(Arc::as_ptr(action) as usize, frame))
    }

    /// Drops the calls of actions no longer installed.
    pub(crate) fn keep_only(&self, actions: &[Arc<Installed>]) {
        let live: std::collections::HashSet<usize> = actions.iter().map(|a| Arc::as_ptr(a) as usize).collect();
        let dropped: Vec<HeldCall> = {
            let mut calls = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<(usize, usize)> = calls.keys().filter(|(a, _)| !live.contains(a)).copied().collect();
            keys.into_iter().filter_map(|k| calls.remove(&k)).collect()
        };
        drop(dropped);
    }
}

/// Where actions are installed, swapped whole by the worker.
#[derive(Debug)]
pub(crate) struct Table {
    /// Line probes by (code object address, line) (`sys.monitoring` `LINE`).
    pub(crate) lines: HashMap<(usize, u32), Arc<Slot>>,
    /// Function entries by code object address (`PY_START`).
    pub(crate) starts: HashMap<usize, Arc<Slot>>,
    /// Function exits by code object address (`PY_RETURN`, `PY_UNWIND`).
    pub(crate) exits: HashMap<usize, Arc<Slot>>,
    /// Injected probes by key (3.9 to 3.11).
    pub(crate) keys: HashMap<u64, Arc<Slot>>,
    /// Live error-capture actions (`PY_UNWIND` is enabled while there are any).
    pub(crate) errors: Vec<Arc<Installed>>,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) limits: CaptureLimits,
    pub(crate) redactor: Arc<Redactor>,
}

impl Table {
    pub(crate) fn empty(redactor: Arc<Redactor>) -> Table {
        Table {
            lines: HashMap::new(),
            starts: HashMap::new(),
            exits: HashMap::new(),
            keys: HashMap::new(),
            errors: Vec::new(),
            budgets: Arc::new(Budgets::new(Default::default())),
            limits: CaptureLimits::default(),
            redactor,
        }
    }
}

/// The files published and not yet sent, and all of them for full catalogs.
#[derive(Debug, Default)]
struct FileCatalog {
    files: Vec<FileLines>,
    index: HashMap<String, usize>,
    unsent: Vec<usize>,
}

/// The adapter as the agent thread sees it. Holds no Python object: the agent thread
/// must be able to use all of it without the GIL.
pub(crate) struct PyRuntime {
    identity: RuntimeIdentity,
    commands: Mutex<mpsc::Sender<Command>>,
    catalog: Mutex<FileCatalog>,
    /// The actions of the last install, by generation, for the worker to resolve.
    pub(crate) pending: Mutex<(u64, Vec<Arc<Installed>>)>,
    /// The budgets and capture limits of the last install.
    pub(crate) params: Mutex<(Arc<Budgets>, CaptureLimits)>,
    pub(crate) core: Arc<Core<Payload>>,
}

impl std::fmt::Debug for PyRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRuntime").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl PyRuntime {
    /// Adds or replaces published files.
    pub(crate) fn publish(&self, files: Vec<FileLines>) {
        let mut c = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        for f in files {
            match c.index.get(&f.file).copied() {
                Some(i) => {
                    if let Some(slot) = c.files.get_mut(i) {
                        *slot = f;
                    }
                    c.unsent.push(i);
                }
                None => {
                    let i = c.files.len();
                    c.index.insert(f.file.clone(), i);
                    c.files.push(f);
                    c.unsent.push(i);
                }
            }
        }
        drop(c);
        self.core.wake.notify_one();
    }
}

impl Runtime for PyRuntime {
    type Payload = Payload;

    fn identity(&self) -> RuntimeIdentity {
        self.identity.clone()
    }

    /// Hands the actions to the worker; it reports each action's status once it has
    /// resolved and instrumented them.
    fn install(
        &self,
        actions: Vec<Arc<Installed>>,
        budgets: Arc<Budgets>,
        limits: CaptureLimits,
    ) -> Option<Vec<(Arc<Installed>, u32)>> {
        let generation = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.0 += 1;
            pending.1 = actions.clone();
            pending.0
        };
        *self.params.lock().unwrap_or_else(|p| p.into_inner()) = (budgets, limits);
        let sent = self.commands.lock().unwrap_or_else(|p| p.into_inner()).send(Command::Install(generation, actions));
        if sent.is_err() {
            tracing::warn!(target: "periscope_agent", "the Python worker is gone; actions cannot be installed");
        }
        None
    }

    fn catalog(&self, full: bool) -> CatalogBatch {
        let mut c = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let files = if full {
            c.unsent.clear();
            c.files.clone()
        } else {
            let mut unsent = std::mem::take(&mut c.unsent);
            unsent.sort_unstable();
            unsent.dedup();
            unsent.iter().filter_map(|i| c.files.get(*i).cloned()).collect()
        };
        CatalogBatch { entries: Vec::new(), files }
    }

    fn build_hit(&self, raw: &RawHit<Payload>, limits: &CaptureLimits) -> Hit {
        let p = &raw.payload;
        let frames = p.frames.iter().take(limits.max_frames as usize).cloned().collect();
        let mut hit = Hit {
            action_id: raw.action.spec.id.clone(),
            seq: raw.seq,
            time_ms: raw.time_ms,
            location: p.location.clone(),
            thread: Some(raw.thread.clone()),
            fields: p.locals.clone(),
            spans: frames,
            watches: Vec::new(),
            backtrace: p.backtrace.clone(),
            truncation: TruncationSummary::default(),
            redactions: Vec::new(),
            rules_version: 0,
            error: None,
            call: None,
        };
        hit.enforce_limits(limits);
        hit
    }

    fn emit_app_log(&self, level: LogLevel, action_id: &ActionId, text: &str) {
        let command = Command::Log(level, action_id.clone(), text.to_owned());
        let _ = self.commands.lock().unwrap_or_else(|p| p.into_inner()).send(command);
    }

    /// While no session is up, a probe holding only captures answers
    /// `sys.monitoring.DISABLE` (3.12+), so the broker's absence costs the host nothing
    /// at that line; when a session begins the worker re-enables those places.
    fn connection_changed(&self, connected: bool) {
        if connected {
            let _ = self.commands.lock().unwrap_or_else(|p| p.into_inner()).send(Command::Reconnected);
        }
    }
}

/// A running Python agent: its thread, its runtime, and the worker's end of the
/// command channel.
pub(crate) struct PyAgent {
    pub(crate) runtime: Arc<PyRuntime>,
    pub(crate) commands: Mutex<mpsc::Receiver<Command>>,
    pub(crate) running: Mutex<Option<Running>>,
    /// The probes' table.
    pub(crate) table: RwLock<Arc<Table>>,
    /// Function probe calls in flight.
    pub(crate) calls: Calls,
    /// The configuration, for a forked child's own agent.
    pub(crate) config: AgentConfig,
}

impl PyAgent {
    /// Starts the agent thread for `config`.
    pub(crate) fn start(config: AgentConfig, identity: RuntimeIdentity) -> Result<Arc<PyAgent>, String> {
        let config = config.validate().map_err(|e| e.to_string())?;
        let (core, hits_rx) = Core::new(config.queue_capacity);
        let core = Arc::new(core);
        let (tx, rx) = mpsc::channel();
        let runtime = Arc::new(PyRuntime {
            identity,
            commands: Mutex::new(tx),
            catalog: Mutex::new(FileCatalog::default()),
            pending: Mutex::new((0, Vec::new())),
            params: Mutex::new((Arc::new(Budgets::new(Default::default())), CaptureLimits::default())),
            core: Arc::clone(&core),
        });
        let table = RwLock::new(Arc::new(Table::empty(core.redactor())));
        let running = periscope_agent_core::start(config.clone(), Arc::clone(&runtime), core, hits_rx, || {})
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(PyAgent {
            runtime,
            commands: Mutex::new(rx),
            running: Mutex::new(Some(running)),
            table,
            calls: Calls::default(),
            config,
        }))
    }

    pub(crate) fn runtime_identity(&self) -> RuntimeIdentity {
        self.runtime.identity.clone()
    }

    pub(crate) fn core(&self) -> &Core<Payload> {
        &self.runtime.core
    }

    pub(crate) fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => Arc::clone(&t),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    pub(crate) fn set_table(&self, table: Table) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(p) => *p.into_inner() = table,
        }
    }

    /// Reports each action's state after an install: how many places it fires at, or
    /// pending until its code loads.
    pub(crate) fn report_installed(&self, actions: &[Arc<Installed>], places: &HashMap<usize, u32>) {
        for (i, action) in actions.iter().enumerate() {
            let state = match places.get(&i) {
                Some(n) if *n > 0 => AgentActionState::Installed { callsites: *n },
                _ => AgentActionState::Pending,
            };
            self.core().report(&action.spec.id, state);
        }
    }

    pub(crate) fn id(&self) -> String {
        match self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(r) => r.id().to_string(),
            None => String::new(),
        }
    }

    /// Says goodbye and stops the agent thread.
    pub(crate) fn stop(&self, timeout: std::time::Duration) {
        if let Some(mut r) = self.running.lock().unwrap_or_else(|p| p.into_inner()).take() {
            r.stop(timeout);
        }
    }
}

/// The agent of this process, when one is running.
pub(crate) static AGENT: RwLock<Option<Arc<PyAgent>>> = RwLock::new(None);

/// Set between `fork()`'s before and after hooks: probes do nothing while the process
/// is being copied (a child must never touch its parent's agent).
pub(crate) static FORKING: AtomicBool = AtomicBool::new(false);

/// The running agent, if any (and not while forking).
pub(crate) fn current() -> Option<Arc<PyAgent>> {
    if FORKING.load(Ordering::Relaxed) {
        return None;
    }
    match AGENT.read() {
        Ok(a) => a.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Replaces the process's agent, returning the old one.
pub(crate) fn replace(agent: Option<Arc<PyAgent>>) -> Option<Arc<PyAgent>> {
    match AGENT.write() {
        Ok(mut a) => std::mem::replace(&mut *a, agent),
        Err(p) => std::mem::replace(&mut *p.into_inner(), agent),
    }
}
