//! State shared between the application's threads (an adapter's probes) and the agent's
//! own thread: each installed action's running state (budgets, hit slots, log and
//! metric state), the agent-wide budgets, the counters reported in heartbeats, and
//! [`Core`]: the status queue, the bounded hit queue and the redaction rules in force.
//!
//! Adapters keep their own table of *where* actions are installed (tracing callsites,
//! Python code objects); everything about *what* an action does and what it may cost
//! lives here, so both languages charge the same budgets the same way.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use periscope_protocol::expr::ActionExprs;
use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, AgentActionState, AgentQuotas, Histogram, Location, LogSpec, MetricKind,
    MetricReport, MetricSpec, PauseReason, SnapshotSpec,
};
use tokio::sync::{Notify, mpsc};

use crate::budget::{Clock, CpuBudget, RateLimiter};
use crate::capture::RawHit;

/// A dynamic log's running state.
#[derive(Debug)]
pub struct LogState {
    /// The log's parameters.
    pub spec: LogSpec,
    /// Lines produced so far (for `max_lines`).
    pub lines: AtomicU64,
    /// Per-action line rate.
    pub line_rate: RateLimiter,
    /// Per-action byte rate (charged on the agent thread, once the line is rendered).
    pub byte_rate: RateLimiter,
    /// Clock time until which the byte budget keeps the action paused.
    pub paused_until: AtomicU64,
}

/// One interval's running aggregate of a metric.
#[derive(Debug, Default)]
pub struct Aggregate {
    /// When the interval started (Unix ms).
    pub window_start_ms: u64,
    /// Samples recorded.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The smallest.
    pub min: Option<f64>,
    /// The largest.
    pub max: Option<f64>,
    /// Their distribution (mergeable at the broker).
    pub histogram: Histogram,
    /// Samples that were not numbers (null, non-finite, an evaluation error).
    pub skipped: u64,
}

impl Aggregate {
    /// Adds one sample (a non-finite one is counted as skipped).
    pub fn record(&mut self, v: f64) {
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
pub struct MetricState {
    /// The metric's parameters.
    pub spec: MetricSpec,
    /// The current interval (values and durations).
    pub aggregate: Mutex<Aggregate>,
    /// Counters count in an atomic, without the lock.
    pub hits: AtomicU64,
}

impl MetricState {
    /// When the current interval started (Unix ms).
    pub fn window_start(&self) -> u64 {
        self.aggregate.lock().unwrap_or_else(|p| p.into_inner()).window_start_ms
    }

    /// Takes the interval's aggregate, starting a new interval at `now_ms`.
    pub fn take(&self, action_id: &ActionId, now_ms: u64) -> MetricReport {
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
pub struct Installed {
    /// The action as the broker sent it.
    pub spec: ActionSpec,
    /// The snapshot parameters, when the action is a snapshot.
    pub snapshot: Option<SnapshotSpec>,
    /// The log state, when the action is a dynamic log.
    pub log: Option<LogState>,
    /// The metric state, when the action is a dynamic metric.
    pub metric: Option<MetricState>,
    /// The error groups and capture budget, when the action captures errors.
    pub errors: Option<crate::errors::ErrorCapture>,
    /// Hit slots taken so far (a slot is returned when its hit is dropped).
    pub taken: AtomicU32,
    /// Sequence numbers handed out, for gaps to be visible.
    pub seq: AtomicU64,
    /// Per-action hit rate.
    pub rate: RateLimiter,
    /// 0 = running, else the [`PauseReason`] code it is paused for.
    pub paused: AtomicU8,
    /// Reached its hit count or expired on this agent.
    pub done: AtomicBool,
    /// Compiled condition and watches.
    pub exprs: ActionExprs,
    /// Why the action cannot run here (an expression this agent cannot compile).
    pub compile_error: Option<String>,
    /// Function probe calls in flight whose entry is held until they end (bounded by
    /// [`MAX_OPEN_CALLS`]).
    pub open_calls: AtomicU32,
    /// An operator's `no_capture` rule covers the location: hits leave without values
    /// (set by the agent thread whenever the blocklist changes).
    pub no_capture: AtomicBool,
    /// The kinds of run-time evaluation error already reported (one bit per
    /// [`periscope_protocol::EvalError::code`]), so each kind is reported once.
    eval_errors_reported: AtomicU32,
}

const PAUSE_NONE: u8 = 0;
const PAUSE_RATE: u8 = 1;
const PAUSE_CPU: u8 = 2;
const PAUSE_LOG: u8 = 3;

impl Installed {
    /// The running state of `spec` under the agent's `quotas` (its expressions compiled).
    pub fn new(spec: ActionSpec, quotas: &AgentQuotas) -> Self {
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
                aggregate: Mutex::new(Aggregate { window_start_ms: crate::unix_ms(), ..Aggregate::default() }),
                hits: AtomicU64::new(0),
            }),
            _ => None,
        };
        let errors = match &spec.kind {
            ActionKind::CaptureErrors(e) => Some(crate::errors::ErrorCapture::new(e.clone())),
            _ => None,
        };
        Installed {
            log,
            metric,
            errors,
            exprs,
            compile_error,
            open_calls: AtomicU32::new(0),
            no_capture: AtomicBool::new(false),
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
    pub fn eval_error_status(&self, context: &str, error: &periscope_protocol::EvalError) -> Option<AgentActionState> {
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
    pub fn pause(&self, reason: PauseReason) -> bool {
        let code = match reason {
            PauseReason::QuotaCpu => PAUSE_CPU,
            PauseReason::QuotaLog => PAUSE_LOG,
            _ => PAUSE_RATE,
        };
        self.paused.swap(code, Ordering::Relaxed) != code
    }

    /// Clears a pause; true when the action was paused.
    pub fn resume(&self) -> bool {
        self.paused.load(Ordering::Relaxed) != PAUSE_NONE
            && self.paused.swap(PAUSE_NONE, Ordering::Relaxed) != PAUSE_NONE
    }

    /// Whether the action is placed at `file:line` (a path as the runtime reports it).
    /// Never for a function probe, which is placed by name ([`Installed::is_function`]).
    pub fn is_at(&self, file: &str, line: u32) -> bool {
        self.spec.function.is_none() && at(&self.spec.location, file, line)
    }

    /// Whether the action is a function probe on the function (span) `name` of `module`.
    pub fn is_function(&self, name: &str, module: Option<&str>) -> bool {
        self.spec.function.as_ref().is_some_and(|f| f.matches(name, module))
    }

    /// Whether the action acts on whole calls of a function (entry to exit): a snapshot
    /// (one hit per call) or a log (one line per call, at its end, with `duration_ms`).
    /// Counters and durations on a function need no held entry.
    pub fn probes_calls(&self) -> bool {
        (self.snapshot.is_some() || self.log.is_some()) && self.spec.function.is_some()
    }

    /// Whether `file:line` is where a tic-toc duration stops.
    pub fn ends_at(&self, file: &str, line: u32) -> bool {
        self.end_location().is_some_and(|end| at(end, file, line))
    }

    /// Where a tic-toc duration stops, when the action is one.
    pub fn end_location(&self) -> Option<&Location> {
        self.metric.as_ref().and_then(|m| m.spec.end_location.as_ref())
    }

    /// Whether this agent can run the action at all.
    pub fn runnable(&self) -> bool {
        self.compile_error.is_none()
            && (self.snapshot.is_some() || self.log.is_some() || self.metric.is_some() || self.errors.is_some())
    }
}

fn at(location: &Location, file: &str, line: u32) -> bool {
    line == location.line && location.file_matches(file)
}

/// Agent-wide budgets, replaced when the broker sends new quotas.
#[derive(Debug)]
pub struct Budgets {
    /// The quotas they were made from.
    pub quotas: AgentQuotas,
    /// Snapshot hits per second across the agent.
    pub snapshots: RateLimiter,
    /// Time spent on conditions and captures.
    pub cpu: CpuBudget,
    /// Dynamic log lines per second across the agent.
    pub log_lines: RateLimiter,
    /// Dynamic log bytes per second across the agent.
    pub log_bytes: RateLimiter,
}

impl Budgets {
    /// Fresh budgets for `quotas`.
    pub fn new(quotas: AgentQuotas) -> Self {
        Budgets {
            log_lines: RateLimiter::new(quotas.log_lines_per_sec, quotas.log_lines_per_sec * quotas.log_burst_factor),
            log_bytes: RateLimiter::new(quotas.log_bytes_per_sec, quotas.log_bytes_per_sec * quotas.log_burst_factor),
            snapshots: RateLimiter::new(quotas.snapshot_hits_per_sec, quotas.snapshot_hits_per_sec.max(1.0)),
            cpu: CpuBudget::new(quotas.cpu_fraction, Duration::from_micros(quotas.cpu_burst_micros)),
            quotas,
        }
    }
}

/// Counters reported in heartbeats so that losses are visible upstream.
#[derive(Debug, Default)]
pub struct Counters {
    /// Hits sent to the broker.
    pub hits_sent: AtomicU64,
    /// Hits dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Firings refused by a rate or CPU budget.
    pub dropped_rate: AtomicU64,
    /// Hits dropped because no broker was there.
    pub dropped_disconnected: AtomicU64,
    /// Function probe calls not held: their action already held
    /// [`MAX_OPEN_CALLS`] calls in flight.
    pub dropped_open_calls: AtomicU64,
}

/// Most calls in flight one function probe holds entry captures for (per action, across
/// threads). Calls that never end (a span never closed, a generator never finished)
/// can only fill this, never grow memory; further calls are counted and skipped.
pub const MAX_OPEN_CALLS: u32 = 1_024;

/// [`Core::connected`]: no broker session.
const DISCONNECTED: u8 = 0;
/// [`Core::connected`]: a registered broker session.
const CONNECTED: u8 = 1;
/// [`Core::connected`]: a bench captures without a broker.
const ASSUMED_CONNECTED: u8 = 2;

/// What an adapter's probes and the agent thread share, whatever the runtime: the
/// statuses raised on the host's threads, the bounded hit queue, the counters, the clock
/// and the redaction rules in force. `P` is the adapter's raw capture.
pub struct Core<P> {
    statuses: Mutex<Vec<(ActionId, AgentActionState)>>,
    /// Wakes the agent thread: new locations, statuses, completed actions.
    pub wake: Notify,
    /// Set when code that ran for the first time matches an installed action: the
    /// adapter's table needs a rebuild.
    pub rebuild_needed: AtomicBool,
    /// Whether a broker is connected to deliver hits to ([`DISCONNECTED`], [`CONNECTED`]
    /// or [`ASSUMED_CONNECTED`]). While none is, nothing is captured: a hit built for
    /// nobody would cost the host for nothing.
    connected: AtomicU8,
    hits_tx: mpsc::Sender<Box<RawHit<P>>>,
    /// Sent and dropped hits, for heartbeats.
    pub counters: Counters,
    /// Monotonic time for budgets and durations.
    pub clock: Clock,
    /// The redaction rules in force (replaced when the broker pushes new ones).
    redactor: RwLock<Arc<periscope_redaction::Redactor>>,
}

impl<P> std::fmt::Debug for Core<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("counters", &self.counters).finish_non_exhaustive()
    }
}

impl<P> Core<P> {
    /// A core with a hit queue of `capacity`, and the queue's receiving end for the
    /// agent thread.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Box<RawHit<P>>>) {
        let (hits_tx, hits_rx) = mpsc::channel(capacity.max(1));
        let core = Core {
            statuses: Mutex::new(Vec::new()),
            wake: Notify::new(),
            rebuild_needed: AtomicBool::new(false),
            connected: AtomicU8::new(DISCONNECTED),
            hits_tx,
            counters: Counters::default(),
            clock: Clock::new(),
            redactor: RwLock::new(Arc::new(periscope_redaction::Redactor::default_rules())),
        };
        (core, hits_rx)
    }

    /// The redaction rules in force.
    pub fn redactor(&self) -> Arc<periscope_redaction::Redactor> {
        match self.redactor.read() {
            Ok(r) => Arc::clone(&r),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Installs new redaction rules (the agent thread then reinstalls the actions, so
    /// that expressions read through them too).
    pub fn set_redactor(&self, redactor: periscope_redaction::Redactor) {
        let redactor = Arc::new(redactor);
        match self.redactor.write() {
            Ok(mut r) => *r = redactor,
            Err(p) => *p.into_inner() = redactor,
        }
    }

    /// Queues an action state for the broker (called from any thread).
    pub fn report(&self, action_id: &ActionId, state: AgentActionState) {
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

    /// The statuses raised since the last call.
    pub fn take_statuses(&self) -> Vec<(ActionId, AgentActionState)> {
        std::mem::take(&mut *self.statuses.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Marks an action done on this agent and wakes the agent thread to drop it.
    pub fn complete(&self, action: &Installed) {
        if !action.done.swap(true, Ordering::AcqRel) {
            self.report(&action.spec.id, AgentActionState::Completed);
        }
    }

    /// Says whether a broker is there to deliver hits to (the agent thread sets it when
    /// a session is registered and clears it when the session ends). Returns whether
    /// that changed anything (not for a failed attempt after a failed attempt, nor ever
    /// under [`Core::assume_connected_for_bench`]): only a change is worth telling the
    /// adapter, which may rebuild the host's caches for it.
    pub fn set_connected(&self, connected: bool) -> bool {
        let to = if connected { CONNECTED } else { DISCONNECTED };
        self.connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now != ASSUMED_CONNECTED && now != to).then_some(to)
            })
            .is_ok()
    }

    /// Whether a broker session is there to deliver captures to (adapters skip reading
    /// values for captures while it is not).
    #[inline]
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) != DISCONNECTED
    }

    /// Whether a capture made now could be queued: a broker session is there and the
    /// queue has room. Adapters read values that only captures need (span fields for
    /// span stacks, an event's fields) only then, so a broker that is unreachable or
    /// stalled (its queue full) costs the host about what an idle agent does.
    #[inline]
    pub fn can_capture(&self) -> bool {
        self.is_connected() && self.hits_tx.capacity() > 0
    }

    /// Benchmarks only: captures as if a broker were always connected, whatever the
    /// agent thread finds (a bench measures the capture path without a broker; its
    /// hits are then dropped and counted by the agent thread).
    #[doc(hidden)]
    pub fn assume_connected_for_bench(&self) {
        self.connected.store(ASSUMED_CONNECTED, Ordering::Release);
    }

    /// Whether a hit built now could be delivered: a broker is connected and the queue
    /// has room. Checked on the host's thread before anything is captured, so that an
    /// unreachable or stalled broker (whose queue stays full) costs the host two atomic
    /// loads per firing instead of a capture that is then thrown away. A refusal is
    /// counted, as a drop while disconnected or on a full queue.
    pub fn can_deliver(&self) -> bool {
        if !self.is_connected() {
            self.counters.dropped_disconnected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.hits_tx.capacity() == 0 {
            self.counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The shortcut a probe takes before it reads anything, while [`Core::can_capture`]
    /// says no: counts a drop for each live snapshot and log in `actions` (as
    /// [`Core::can_deliver`] would have, one by one), and says whether that is all a
    /// firing there would do, no metric, duration or function probe among `actions`
    /// or `ends` still needing it. Then the probe returns at once: an unreachable or
    /// stalled broker costs the host a few atomic loads per firing, in every agent.
    pub fn refuse_undeliverable(&self, actions: &[Arc<Installed>], ends: &[Arc<Installed>]) -> bool {
        let captures = actions
            .iter()
            .filter(|a| (a.snapshot.is_some() || a.log.is_some()) && !a.done.load(Ordering::Relaxed))
            .count() as u64;
        let counter =
            if self.is_connected() { &self.counters.dropped_queue_full } else { &self.counters.dropped_disconnected };
        counter.fetch_add(captures, Ordering::Relaxed);
        ends.is_empty() && actions.iter().all(|a| a.metric.is_none() && !a.probes_calls())
    }

    /// Queues a raw hit for the agent thread without ever waiting: when the queue is
    /// full (or the agent thread is gone) the hit is dropped and counted.
    pub fn enqueue(&self, hit: RawHit<P>) -> bool {
        match self.hits_tx.try_send(Box::new(hit)) {
            Ok(()) => true,
            Err(_) => {
                self.counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Asks the agent thread to rebuild the adapter's table (code that ran for the first
    /// time matches an installed action).
    pub fn request_rebuild(&self) {
        self.rebuild_needed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_captured_for_a_broker_that_is_not_there_or_whose_queue_is_full_and_each_refusal_is_counted() {
        let (core, mut rx) = Core::<()>::new(1);
        assert!(!core.can_capture() && !core.can_deliver(), "no session yet");
        assert_eq!(core.counters.dropped_disconnected.load(Ordering::Relaxed), 1);
        assert!(core.set_connected(true), "a session began");
        assert!(!core.set_connected(true), "no change, nothing to tell the adapter");
        assert!(core.can_capture() && core.can_deliver());
        // One slot: once it is taken the queue is full.
        let spec = periscope_protocol::ActionSpec {
            id: ActionId::generate(),
            location: periscope_protocol::Location { file: "a.rs".into(), line: 1 },
            condition: None,
            expires_at_ms: u64::MAX,
            kind: periscope_protocol::ActionKind::Snapshot(periscope_protocol::SnapshotSpec {
                max_hits: 1,
                watch: Vec::new(),
                backtrace: false,
            }),
            function: None,
            expect: None,
        };
        let action = Arc::new(Installed::new(spec, &AgentQuotas::default()));
        let hit = RawHit {
            action,
            seq: 1,
            time_ms: 1,
            thread: periscope_protocol::ThreadInfo { name: None, id: "1".into() },
            payload: (),
            error: None,
            call: None,
        };
        assert!(core.enqueue(hit));
        assert!(!core.can_capture() && !core.can_deliver(), "the queue is full");
        assert_eq!(core.counters.dropped_queue_full.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_ok());
        assert!(core.can_deliver(), "room again once the agent thread took the hit");
        core.set_connected(false);
        assert!(!core.can_deliver());
        assert_eq!(core.counters.dropped_disconnected.load(Ordering::Relaxed), 2);
        // A bench captures without a broker, whatever the agent thread finds.
        core.assume_connected_for_bench();
        core.set_connected(false);
        assert!(core.can_deliver());
    }

    fn installed(kind: periscope_protocol::ActionKind) -> Arc<Installed> {
        let spec = periscope_protocol::ActionSpec {
            id: ActionId::generate(),
            location: periscope_protocol::Location { file: "a.rs".into(), line: 1 },
            condition: None,
            expires_at_ms: u64::MAX,
            kind,
            function: None,
            expect: None,
        };
        Arc::new(Installed::new(spec, &AgentQuotas::default()))
    }

    #[test]
    fn a_probe_that_cannot_deliver_counts_each_live_capture_and_returns_early_unless_a_metric_needs_the_firing() {
        let (core, _rx) = Core::<()>::new(4);
        let snapshot = || {
            installed(periscope_protocol::ActionKind::Snapshot(periscope_protocol::SnapshotSpec {
                max_hits: 5,
                watch: Vec::new(),
                backtrace: false,
            }))
        };
        let done = snapshot();
        done.done.store(true, Ordering::Relaxed);
        let captures = [snapshot(), snapshot(), done];
        assert!(core.refuse_undeliverable(&captures, &[]), "snapshots alone: nothing else to do");
        assert_eq!(core.counters.dropped_disconnected.load(Ordering::Relaxed), 2, "the finished one is not counted");
        let metric = installed(periscope_protocol::ActionKind::Metric(periscope_protocol::MetricSpec {
            metric: periscope_protocol::MetricKind::Counter,
            expression: None,
            end_location: None,
            report_interval_ms: 1_000,
        }));
        assert!(!core.refuse_undeliverable(&[snapshot(), metric.clone()], &[]), "a metric still counts firings");
        assert!(!core.refuse_undeliverable(&[snapshot()], &[metric]), "a duration still ends here");
        assert_eq!(core.counters.dropped_disconnected.load(Ordering::Relaxed), 4);
        assert_eq!(core.counters.dropped_queue_full.load(Ordering::Relaxed), 0);
    }
}
