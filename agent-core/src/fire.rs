//! What happens when a location with actions runs, whatever the runtime: the checks
//! every action shares (done, expiry, CPU budget, condition), then the snapshot's rate
//! limits and hit slots, the dynamic log's line budgets, the metric's counter, value or
//! clock. An adapter describes the firing location through [`Site`] (what expressions
//! may read there, how to capture a hit, where duration clocks live) and calls [`fire`].
//!
//! Never blocks: budgets are atomics, the hit queue is `try_send`, and the only lock is a
//! metric's own mutex, held for one update and never across the host's code.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use periscope_protocol::expr::Roots;
use periscope_protocol::{AgentActionState, MetricKind, PauseReason, Scope, ThreadInfo};

use crate::capture::RawHit;
use crate::state::{Budgets, Core, Installed, LogState};

/// A location that is running, as an adapter sees it.
pub trait Site {
    /// The adapter's raw capture (see [`RawHit`]).
    type Payload;
    /// What expressions read here; built lazily, so a condition that reads one value
    /// costs one value.
    type Scope<'a>: Scope
    where
        Self: 'a;

    /// What `roots` (the names an expression reads) may read at this firing.
    fn scope(&mut self, roots: &Roots) -> Self::Scope<'_>;

    /// Copies what a hit needs (bounded) on the host's thread.
    fn capture(&mut self, need: Need<'_>) -> Self::Payload;

    /// The thread (or task) the location runs on.
    fn thread(&mut self) -> ThreadInfo;

    /// Starts `action`'s duration clock at `now` (clock nanoseconds) where this firing
    /// keeps clocks (a span, a frame, the thread).
    fn start_clock(&mut self, action: &Arc<Installed>, now: u64);

    /// Stops `action`'s clock; when it was running, the time it started.
    fn stop_clock(&mut self, action: &Arc<Installed>) -> Option<u64>;
}

/// What a capture is for, so an adapter whose captures are costly copies no more than
/// that.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// A snapshot: everything (the fields or locals, the stack), and a native backtrace
    /// when asked.
    Snapshot {
        /// Whether the snapshot asked for a native backtrace.
        backtrace: bool,
    },
    /// A dynamic log line: what its template reads is enough.
    Log {
        /// The names the template reads.
        roots: &'a Roots,
    },
}

/// Runs `ends` (tic-toc durations that stop here) and `actions` (placed here) at one
/// firing, then charges the time spent to the CPU budget.
pub fn fire<S: Site>(
    core: &Core<S::Payload>,
    budgets: &Budgets,
    actions: &[Arc<Installed>],
    ends: &[Arc<Installed>],
    site: &mut S,
) {
    let started = core.clock.now();
    let mut firing = Firing { core, budgets, now_ms: core.clock.unix_ms(started), started };
    for action in ends {
        if let Some(from) = site.stop_clock(action) {
            record_duration(action, started.saturating_sub(from));
        }
    }
    for action in actions {
        if !firing.admit(action, site) {
            continue;
        }
        if let Some(snapshot) = &action.snapshot {
            firing.snapshot(action, snapshot, site);
        } else if let Some(log) = &action.log {
            firing.log(action, log, site);
        } else if action.metric.is_some() {
            firing.metric(action, site);
        }
    }
    let spent = core.clock.now().saturating_sub(started);
    budgets.cpu.charge(started, spent);
}

/// Records one duration sample (nanoseconds) in a duration metric.
pub fn record_duration(action: &Installed, nanos: u64) {
    if let Some(metric) = &action.metric {
        let ms = nanos as f64 / 1e6;
        metric.aggregate.lock().unwrap_or_else(|p| p.into_inner()).record(ms);
    }
}

/// Whether `action` is a duration of a whole span or function (no end location).
pub fn times_whole_scope(action: &Installed) -> bool {
    action.metric.as_ref().is_some_and(|m| m.spec.metric == MetricKind::Duration && m.spec.end_location.is_none())
}

struct Firing<'a, P> {
    core: &'a Core<P>,
    budgets: &'a Budgets,
    now_ms: u64,
    started: u64,
}

impl<P> Firing<'_, P> {
    /// The checks every kind shares: done, expiry, CPU budget, condition.
    fn admit<S: Site<Payload = P>>(&mut self, action: &Arc<Installed>, site: &mut S) -> bool {
        let core = self.core;
        if action.done.load(Ordering::Relaxed) {
            return false;
        }
        if self.now_ms >= action.spec.expires_at_ms {
            if !action.done.swap(true, Ordering::AcqRel) {
                core.report(
                    &action.spec.id,
                    AgentActionState::Paused { reason: PauseReason::Expired, message: "the action expired".into() },
                );
            }
            return false;
        }
        let budgets = self.budgets;
        if !budgets.cpu.available(self.started) {
            if action.pause(PauseReason::QuotaCpu) {
                let wait = budgets.cpu.recovers_at(self.started).saturating_sub(self.started) / 1_000_000;
                core.report(
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
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(condition) = &action.exprs.condition {
            let scope = site.scope(condition.roots());
            let mut steps = periscope_protocol::Budget::default();
            match condition.eval_condition(&scope, &mut steps) {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => {
                    drop(scope);
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
    fn eval_error(&self, action: &Installed, context: &str, error: &periscope_protocol::EvalError) {
        if let Some(state) = action.eval_error_status(context, error) {
            self.core.report(&action.spec.id, state);
        }
    }

    fn raw_hit<S: Site<Payload = P>>(&self, action: &Arc<Installed>, site: &mut S, need: Need<'_>) -> RawHit<P> {
        RawHit {
            action: Arc::clone(action),
            seq: action.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: self.now_ms,
            thread: site.thread(),
            payload: site.capture(need),
            error: None,
        }
    }

    fn snapshot<S: Site<Payload = P>>(
        &mut self,
        action: &Arc<Installed>,
        snapshot: &periscope_protocol::SnapshotSpec,
        site: &mut S,
    ) {
        let core = self.core;
        let budgets = self.budgets;
        if !action.rate.try_take(self.started, 1) || !budgets.snapshots.try_take(self.started, 1) {
            if action.pause(PauseReason::RateLimited) {
                core.report(
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
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let slot = action.taken.fetch_add(1, Ordering::AcqRel);
        if slot >= snapshot.max_hits {
            action.taken.fetch_sub(1, Ordering::AcqRel);
            core.complete(action);
            return;
        }
        if action.resume() {
            core.report(&action.spec.id, AgentActionState::Resumed);
        }
        let hit = self.raw_hit(action, site, Need::Snapshot { backtrace: snapshot.backtrace });
        if core.enqueue(hit) {
            if slot + 1 >= snapshot.max_hits {
                core.complete(action);
            }
        } else {
            action.taken.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn log<S: Site<Payload = P>>(&mut self, action: &Arc<Installed>, log: &LogState, site: &mut S) {
        let core = self.core;
        let budgets = self.budgets;
        if log.paused_until.load(Ordering::Relaxed) > self.started {
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !log.line_rate.try_take(self.started, 1) || !budgets.log_lines.try_take(self.started, 1) {
            if action.pause(PauseReason::QuotaLog) {
                core.report(
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
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(max) = log.spec.max_lines
            && log.lines.fetch_add(1, Ordering::AcqRel) >= max
        {
            core.complete(action);
            return;
        }
        if action.resume() {
            core.report(&action.spec.id, AgentActionState::Resumed);
        }
        let everything = Roots::default();
        let roots = action.exprs.template.as_ref().map_or(&everything, |t| t.roots());
        let hit = self.raw_hit(action, site, Need::Log { roots });
        core.enqueue(hit);
    }

    fn metric<S: Site<Payload = P>>(&mut self, action: &Arc<Installed>, site: &mut S) {
        let Some(metric) = &action.metric else { return };
        // Past the gate: a metric paused by the CPU budget records again, and says so.
        if action.resume() {
            self.core.report(&action.spec.id, AgentActionState::Resumed);
        }
        match metric.spec.metric {
            MetricKind::Counter => {
                metric.hits.fetch_add(1, Ordering::Relaxed);
            }
            MetricKind::Value => {
                let Some(expr) = &action.exprs.value else { return };
                let scope = site.scope(expr.roots());
                let mut steps = periscope_protocol::Budget::default();
                // Evaluated first; the lock covers only the update.
                let result = expr.eval_number(&scope, &mut steps);
                drop(scope);
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
            MetricKind::Duration => site.start_clock(action, self.started),
        }
    }
}

thread_local! {
    /// Duration clocks kept on the thread (tic-toc outside spans, Python frames), keyed
    /// by the action and a key of the adapter's (bounded).
    static THREAD_CLOCKS: std::cell::RefCell<Vec<(usize, usize, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most clocks a thread holds; the oldest are dropped beyond it.
pub const MAX_THREAD_CLOCKS: usize = 64;

/// Starts `action`'s clock on this thread under `key` (replacing one already running).
pub fn start_thread_clock(action: &Arc<Installed>, key: usize, now: u64) {
    let id = Arc::as_ptr(action) as usize;
    THREAD_CLOCKS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(a, k, _)| !(*a == id && *k == key));
        if c.len() >= MAX_THREAD_CLOCKS {
            c.remove(0);
        }
        c.push((id, key, now));
    });
}

/// Stops `action`'s clock on this thread under `key`; its start when it was running.
pub fn stop_thread_clock(action: &Arc<Installed>, key: usize) -> Option<u64> {
    let id = Arc::as_ptr(action) as usize;
    THREAD_CLOCKS.with(|c| {
        let mut c = c.borrow_mut();
        c.iter().position(|(a, k, _)| *a == id && *k == key).map(|i| c.swap_remove(i).2)
    })
}
