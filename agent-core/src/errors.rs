//! Capture on error, whatever the runtime: an error-capture action's running state
//! (occurrences grouped by location and error type, one capture per group per interval,
//! a capture budget per agent) and what an adapter calls when the host fails
//! ([`fire_error`]).
//!
//! Every occurrence is counted; at most one per group and `min_interval_ms` is
//! captured, and at most `max_captures_per_agent` over the action's life (the agent's
//! snapshot rate applies too). The agent thread takes the counts about once a second
//! ([`ErrorCapture::take_counts`]) and reports them, so the broker's counts hold every
//! occurrence, captured or not.
//!
//! Cost: nothing at all until an adapter calls [`fire_error`], which only happens when
//! the host fails while an error-capture action is live. There, one short mutex (the
//! action's groups, held for a map update and never across the host's code) and, when
//! captured, the capture itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use periscope_protocol::{ActionId, ErrorCaptureSpec, ErrorCount, ErrorKind, HitError};

use crate::fire::{Need, Site};
use crate::state::{Budgets, Core, Installed};

/// Most distinct errors (location and type) one action tracks on an agent; beyond it,
/// occurrences of new ones are counted in [`ErrorCapture::overflow`] only.
pub const MAX_GROUPS: usize = 512;

/// One failure as an adapter saw it on the host's thread.
#[derive(Debug, Clone)]
pub struct ErrorOccurrence {
    /// What failed, and how.
    pub error: HitError,
    /// Where: source file as the runtime reports it.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// Module path or logger name, when known.
    pub module: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    file: String,
    line: u32,
    kind: ErrorKind,
    error_type: String,
}

#[derive(Debug)]
struct Group {
    message: String,
    /// Occurrences since the last report.
    count: u64,
    uncaptured: u64,
    first_seen_ms: u64,
    last_seen_ms: u64,
    /// When the group was last captured (clock nanoseconds).
    last_capture: Option<u64>,
}

/// An error-capture action's running state on this agent.
#[derive(Debug)]
pub struct ErrorCapture {
    /// The action's parameters.
    pub spec: ErrorCaptureSpec,
    groups: Mutex<HashMap<GroupKey, Group>>,
    /// Captures taken (the per-agent budget).
    captured: AtomicU32,
    /// Occurrences of groups beyond [`MAX_GROUPS`], never captured.
    pub overflow: AtomicU64,
}

impl ErrorCapture {
    /// Fresh state for `spec`.
    pub fn new(spec: ErrorCaptureSpec) -> Self {
        ErrorCapture {
            spec,
            groups: Mutex::new(HashMap::new()),
            captured: AtomicU32::new(0),
            overflow: AtomicU64::new(0),
        }
    }

    /// Captures taken so far.
    pub fn captured(&self) -> u32 {
        self.captured.load(Ordering::Relaxed)
    }

    /// Counts one occurrence and decides whether it is captured: the group's first in
    /// its interval, within the per-agent budget and the agent's snapshot rate.
    fn occur(&self, e: &ErrorOccurrence, budgets: &Budgets, now: u64, now_ms: u64) -> bool {
        let key =
            GroupKey { file: e.file.clone(), line: e.line, kind: e.error.kind, error_type: e.error.error_type.clone() };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if !groups.contains_key(&key) && groups.len() >= MAX_GROUPS {
            drop(groups);
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let group = groups.entry(key).or_insert_with(|| Group {
            message: String::new(),
            count: 0,
            uncaptured: 0,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_capture: None,
        });
        if group.count == 0 {
            group.first_seen_ms = now_ms;
        }
        group.count += 1;
        group.last_seen_ms = now_ms;
        if group.message != e.error.message {
            group.message.clone_from(&e.error.message);
        }
        let interval = self.spec.min_interval_ms.max(ErrorCaptureSpec::DEFAULT_INTERVAL_MS).saturating_mul(1_000_000);
        let due = group.last_capture.is_none_or(|at| now.saturating_sub(at) >= interval);
        let capture = due
            && self
                .captured
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.spec.max_captures_per_agent).then_some(n + 1)
                })
                .is_ok();
        let capture = capture && {
            let ok = budgets.snapshots.try_take(now, 1);
            if !ok {
                self.captured.fetch_sub(1, Ordering::AcqRel);
            }
            ok
        };
        if capture {
            group.last_capture = Some(now);
        } else {
            group.uncaptured += 1;
        }
        capture
    }

    /// A capture that could not be queued is counted as not captured (and its budget
    /// given back).
    fn unqueued(&self, e: &ErrorOccurrence) {
        self.captured.fetch_sub(1, Ordering::AcqRel);
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let key =
            GroupKey { file: e.file.clone(), line: e.line, kind: e.error.kind, error_type: e.error.error_type.clone() };
        if let Some(g) = groups.get_mut(&key) {
            g.uncaptured += 1;
            g.last_capture = None;
        }
    }

    /// The occurrences counted since the last call, one report per group that had any;
    /// groups quiet for longer than their interval are forgotten (bounded memory).
    pub fn take_counts(&self, action_id: &ActionId, now: u64) -> Vec<ErrorCount> {
        let interval = self.spec.min_interval_ms.max(ErrorCaptureSpec::DEFAULT_INTERVAL_MS).saturating_mul(1_000_000);
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        groups.retain(|key, g| {
            if g.count == 0 {
                return g.last_capture.is_some_and(|at| now.saturating_sub(at) < interval);
            }
            out.push(ErrorCount {
                action_id: action_id.clone(),
                file: key.file.clone(),
                line: key.line,
                kind: key.kind,
                error_type: key.error_type.clone(),
                message: g.message.clone(),
                count: g.count,
                uncaptured: g.uncaptured,
                first_seen_ms: g.first_seen_ms,
                last_seen_ms: g.last_seen_ms,
            });
            g.count = 0;
            g.uncaptured = 0;
            true
        });
        out
    }
}

/// Runs every live error-capture action of `actions` for one failure on the host's
/// thread: counts it, and captures it through `site` when its group is due (the
/// capture's payload is the adapter's; the hit carries `occurrence` as its location
/// and error). Charges the time spent to the CPU budget.
pub fn fire_error<S: Site>(
    core: &Core<S::Payload>,
    budgets: &Budgets,
    actions: &[Arc<Installed>],
    occurrence: &ErrorOccurrence,
    site: &mut S,
) {
    let started = core.clock.now();
    let now_ms = core.clock.unix_ms(started);
    for action in actions {
        let Some(errors) = &action.errors else { continue };
        if action.done.load(Ordering::Relaxed) || now_ms >= action.spec.expires_at_ms {
            continue;
        }
        if !budgets.cpu.available(started) {
            // Counted, never captured, while the CPU budget recovers.
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if !errors.occur(occurrence, budgets, started, now_ms) {
            core.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // Counted as an occurrence either way; captured only when it can be delivered.
        if !core.can_deliver() {
            errors.unqueued(occurrence);
            continue;
        }
        let backtrace = errors.spec.backtrace || occurrence.error.kind == ErrorKind::Panic;
        let hit = crate::RawHit {
            action: Arc::clone(action),
            seq: action.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: now_ms,
            thread: site.thread(),
            payload: site.capture(Need::Snapshot { backtrace }),
            error: Some(occurrence.clone()),
            call: None,
        };
        if !core.enqueue(hit) {
            errors.unqueued(occurrence);
        }
    }
    let spent = core.clock.now().saturating_sub(started);
    budgets.cpu.charge(started, spent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use periscope_protocol::AgentQuotas;

    fn occurrence(line: u32, ty: &str) -> ErrorOccurrence {
        ErrorOccurrence {
            error: HitError { kind: ErrorKind::Event, error_type: ty.into(), message: format!("failed {ty}") },
            file: "src/a.rs".into(),
            line,
            module: None,
        }
    }

    #[test]
    fn one_capture_per_group_per_interval_within_the_agent_budget_and_every_occurrence_counted() {
        let spec = ErrorCaptureSpec { max_captures_per_agent: 2, ..ErrorCaptureSpec::default() };
        let errors = ErrorCapture::new(spec);
        let budgets = Budgets::new(AgentQuotas::default());
        let second = 1_000_000_000;
        let a = occurrence(3, "E");
        assert!(errors.occur(&a, &budgets, second, 1_000));
        assert!(!errors.occur(&a, &budgets, second + 10, 1_000), "same group within the interval");
        assert!(errors.occur(&occurrence(4, "E"), &budgets, second + 20, 1_000), "another location");
        assert!(!errors.occur(&a, &budgets, 3 * second, 3_000), "the per-agent budget is spent");
        let id = ActionId::generate();
        let mut counts = errors.take_counts(&id, 3 * second);
        counts.sort_by_key(|c| c.line);
        assert_eq!(counts.len(), 2);
        assert_eq!((counts[0].count, counts[0].uncaptured), (3, 2));
        assert_eq!((counts[0].first_seen_ms, counts[0].last_seen_ms), (1_000, 3_000));
        assert_eq!((counts[1].count, counts[1].uncaptured), (1, 0));
        assert!(errors.take_counts(&id, 3 * second).is_empty(), "counts are reported once");
    }

    #[test]
    fn groups_beyond_the_bound_are_counted_as_overflow() {
        let errors = ErrorCapture::new(ErrorCaptureSpec { max_captures_per_agent: 0, ..ErrorCaptureSpec::default() });
        let budgets = Budgets::new(AgentQuotas::default());
        for line in 1..=(MAX_GROUPS as u32 + 10) {
            errors.occur(&occurrence(line, "E"), &budgets, 1, 1);
        }
        assert_eq!(errors.overflow.load(Ordering::Relaxed), 10);
        assert_eq!(errors.take_counts(&ActionId::generate(), 1).len(), MAX_GROUPS);
    }
}
