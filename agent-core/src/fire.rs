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
use periscope_protocol::{AgentActionState, CallInfo, CallOutcome, MetricKind, PauseReason, Scope, ThreadInfo};

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

    /// Holds what a function probe captured at entry (the arguments, span fields) with
    /// its start `started` (clock nanoseconds) wherever the adapter keeps calls in flight
    /// (the span's extensions, a table by frame), until the call ends and the adapter
    /// calls [`finish_call`]. The slot is already taken ([`open_call`]); an adapter that
    /// cannot hold the call gives it back with [`close_call`].
    fn begin_call(&mut self, action: &Arc<Installed>, started: u64);
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
        if action.probes_calls() {
            // A whole call: the entry is held until it ends, then judged by its duration
            // (snapshots) or logged with it (logs).
            if open_call(core, action) {
                site.begin_call(action, started);
            }
        } else if let Some(snapshot) = &action.snapshot {
            firing.snapshot(action, snapshot, site, None);
        } else if let Some(log) = &action.log {
            firing.log(action, log, site, None);
        } else if action.metric.is_some() {
            firing.metric(action, site);
        }
    }
    let spent = core.clock.now().saturating_sub(started);
    budgets.cpu.charge(started, spent);
}

/// Takes a slot for one more call in flight of `action`'s function probe; false (and
/// counted) when [`crate::state::MAX_OPEN_CALLS`] are already held.
pub fn open_call<P>(core: &Core<P>, action: &Installed) -> bool {
    let taken = action
        .open_calls
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < crate::state::MAX_OPEN_CALLS).then_some(n + 1));
    if taken.is_err() {
        core.counters.dropped_open_calls.fetch_add(1, Ordering::Relaxed);
    }
    taken.is_ok()
}

/// Gives back a call's slot without a hit (the adapter dropped the held call).
pub fn close_call(action: &Installed) {
    let _ = action.open_calls.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

/// Ends a call of `action`'s function probe that started at `started` (clock
/// nanoseconds), as `outcome`: gives its slot back, and when it lasted at least the
/// probe's `min_duration_ms`, takes a hit like any snapshot (rate limits, hit slots) or a
/// log line like any log (line budgets), captured through `site` (the entry's values and
/// the return value or error) with the call's duration. A faster call costs nothing
/// more.
pub fn finish_call<S: Site>(
    core: &Core<S::Payload>,
    budgets: &Budgets,
    action: &Arc<Installed>,
    started: u64,
    outcome: CallOutcome,
    site: &mut S,
) {
    close_call(action);
    let now = core.clock.now();
    let min = action.spec.function.as_ref().map_or(0, |f| f.min_duration_nanos());
    let nanos = now.saturating_sub(started);
    if nanos < min || action.done.load(Ordering::Relaxed) {
        return;
    }
    let mut firing = Firing { core, budgets, now_ms: core.clock.unix_ms(now), started: now };
    if firing.now_ms >= action.spec.expires_at_ms {
        return;
    }
    let call = CallInfo { duration_ms: nanos as f64 / 1e6, outcome };
    if let Some(snapshot) = &action.snapshot {
        firing.snapshot(action, snapshot, site, Some(call));
    } else if let Some(log) = &action.log {
        firing.log(action, log, site, Some(call));
    }
    budgets.cpu.charge(now, core.clock.now().saturating_sub(now));
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

    fn raw_hit<S: Site<Payload = P>>(
        &self,
        action: &Arc<Installed>,
        site: &mut S,
        need: Need<'_>,
        call: Option<CallInfo>,
    ) -> RawHit<P> {
        RawHit {
            action: Arc::clone(action),
            seq: action.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: self.now_ms,
            thread: site.thread(),
            payload: site.capture(need),
            error: None,
            call,
        }
    }

    fn snapshot<S: Site<Payload = P>>(
        &mut self,
        action: &Arc<Installed>,
        snapshot: &periscope_protocol::SnapshotSpec,
        site: &mut S,
        call: Option<CallInfo>,
    ) {
        let core = self.core;
        let budgets = self.budgets;
        // Before any budget is spent: a hit nobody can receive takes no slot and no rate.
        if !core.can_deliver() {
            return;
        }
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
        let hit = self.raw_hit(action, site, Need::Snapshot { backtrace: snapshot.backtrace }, call);
        if core.enqueue(hit) {
            if slot + 1 >= snapshot.max_hits {
                core.complete(action);
            }
        } else {
            action.taken.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn log<S: Site<Payload = P>>(
        &mut self,
        action: &Arc<Installed>,
        log: &LogState,
        site: &mut S,
        call: Option<CallInfo>,
    ) {
        let core = self.core;
        let budgets = self.budgets;
        if log.paused_until.load(Ordering::Relaxed) > self.started {
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !core.can_deliver() {
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
        let hit = self.raw_hit(action, site, Need::Log { roots }, call);
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

#[cfg(test)]
mod tests {
    use periscope_protocol::{ActionId, ActionKind, ActionSpec, AgentQuotas, FunctionTarget, Location, SnapshotSpec};

    use super::*;
    use crate::state::MAX_OPEN_CALLS;

    fn call_probe() -> Installed {
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: Location { file: "a.rs".into(), line: 1 },
            condition: None,
            expires_at_ms: u64::MAX,
            kind: ActionKind::Snapshot(SnapshotSpec { max_hits: 1, watch: Vec::new(), backtrace: false }),
            function: Some(Box::new(FunctionTarget::parse("checkout"))),
            expect: None,
        };
        Installed::new(spec, &AgentQuotas::default())
    }

    #[test]
    fn calls_in_flight_are_bounded_per_action_and_refusals_are_counted() {
        let (core, _rx) = Core::<()>::new(4);
        let action = call_probe();
        assert!(action.probes_calls() && !action.is_at("a.rs", 1), "a function probe is not a line action");
        for _ in 0..MAX_OPEN_CALLS {
            assert!(open_call(&core, &action));
        }
        assert!(!open_call(&core, &action), "calls that never end fill the table, never grow it");
        assert!(!open_call(&core, &action));
        assert_eq!(core.counters.dropped_open_calls.load(Ordering::Relaxed), 2);
        close_call(&action);
        assert!(open_call(&core, &action), "an ended call frees its slot");
        let other = call_probe();
        assert!(open_call(&core, &other), "each probe has its own table");
    }

    #[test]
    fn closing_more_calls_than_were_opened_never_wraps() {
        let action = call_probe();
        close_call(&action);
        assert_eq!(action.open_calls.load(Ordering::Relaxed), 0);
    }
}
