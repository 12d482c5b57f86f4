//! Repeated audit entries, aggregated: the first of a kind opens a window and is
//! written at once; the same event again within the window (same organization, same
//! key, same kind and reason) is only counted; when the window ends, one more entry
//! says how many there were and over what time.
//!
//! Used for what an outsider can cause at will: refused agent registrations (wrong
//! pool, a bound identity, a cooling-down key, a full organization, too many
//! sessions) and flood disconnections. An agent key hammering the gateway writes two
//! entries a minute per reason, not one per attempt, and the operator still learns
//! when it started, how often, and when it stopped.
//!
//! Bounded: at most [`MAX_WINDOWS`] windows are open; opening one more closes the
//! oldest (writing its summary) first.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::audit::{AuditEntry, AuditKind};

/// How long one window lasts.
pub const WINDOW_MS: u64 = 60_000;

/// Most windows open at once.
pub const MAX_WINDOWS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RepeatKey {
    org: String,
    key_id: String,
    kind: AuditKind,
    reason: &'static str,
}

#[derive(Debug)]
struct Window {
    started_ms: u64,
    last_ms: u64,
    repeats: u64,
    sample: AuditEntry,
}

impl Window {
    /// The entry that closes the window, if anything was held back.
    fn summary(self, reason: &str) -> Option<AuditEntry> {
        if self.repeats == 0 {
            return None;
        }
        let mut entry = AuditEntry::new(self.sample.org.clone(), self.sample.actor.clone(), self.sample.kind);
        entry.target = self.sample.target.clone();
        entry.detail = format!(
            "{} more like this within {} s of the first (not written one by one): {}",
            self.repeats,
            self.last_ms.saturating_sub(self.started_ms).div_ceil(1_000).max(1),
            self.sample.detail
        );
        entry.data = serde_json::json!({
            "repeated": self.repeats,
            "reason": reason,
            "first_at_ms": self.started_ms,
            "last_at_ms": self.last_ms,
            "window_ms": WINDOW_MS,
        });
        Some(entry)
    }
}

/// The open windows; see the module docs.
#[derive(Debug, Default)]
pub struct Repeats {
    windows: Mutex<HashMap<RepeatKey, Window>>,
}

impl Repeats {
    /// Notes `entry` (caused by key `key_id`, for `reason`); returns what to write now:
    /// the entry itself when it opens a window, nothing when it repeats one, and the
    /// summary of any window this closes.
    pub fn note(&self, mut entry: AuditEntry, key_id: &str, reason: &'static str) -> Vec<AuditEntry> {
        let now = entry.at_ms;
        let key = RepeatKey { org: entry.org.clone(), key_id: key_id.to_owned(), kind: entry.kind, reason };
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if let Some(w) = windows.get_mut(&key) {
            if now.saturating_sub(w.started_ms) < WINDOW_MS {
                w.repeats += 1;
                w.last_ms = now;
                return out;
            }
            if let Some(w) = windows.remove(&key) {
                out.extend(w.summary(reason));
            }
        }
        if windows.len() >= MAX_WINDOWS
            && let Some(oldest) = windows.iter().min_by_key(|(_, w)| w.started_ms).map(|(k, _)| k.clone())
            && let Some(w) = windows.remove(&oldest)
        {
            out.extend(w.summary(oldest.reason));
        }
        if entry.data.is_null() {
            entry.data = serde_json::json!({});
        }
        if let Some(obj) = entry.data.as_object_mut() {
            obj.insert("reason".into(), reason.into());
            obj.insert("repeats_aggregated_for_ms".into(), WINDOW_MS.into());
        }
        windows.insert(key, Window { started_ms: now, last_ms: now, repeats: 0, sample: entry.clone() });
        out.push(entry);
        out
    }

    /// Closes the windows that ended by `now_ms`; returns their summaries.
    pub fn flush(&self, now_ms: u64) -> Vec<AuditEntry> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let done: Vec<RepeatKey> = windows
            .iter()
            .filter(|(_, w)| now_ms.saturating_sub(w.started_ms) >= WINDOW_MS)
            .map(|(k, _)| k.clone())
            .collect();
        done.into_iter().filter_map(|k| windows.remove(&k).and_then(|w| w.summary(k.reason))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;

    fn refusal(at_ms: u64) -> AuditEntry {
        let mut e = AuditEntry::new(
            "acme",
            Actor::Agent { id: "agt_x".into(), key_id: Some("key_a".into()) },
            AuditKind::AgentRefused,
        );
        e.at_ms = at_ms;
        e.detail = "refused".into();
        e
    }

    #[test]
    fn a_thousand_refusals_in_a_minute_are_two_entries() {
        let r = Repeats::default();
        let mut written = Vec::new();
        for i in 0..1_000 {
            written.extend(r.note(refusal(1_000 + i), "key_a", "wrong_pool"));
        }
        assert_eq!(written.len(), 1, "the first one at once");
        assert_eq!(written[0].data["reason"], "wrong_pool");
        assert!(r.flush(30_000).is_empty(), "the window is still open");
        let summary = r.flush(61_000);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].data["repeated"], 999);
        assert!(summary[0].detail.starts_with("999 more like this"), "{}", summary[0].detail);
        // Another reason, key or organization is its own window.
        assert_eq!(r.note(refusal(70_000), "key_a", "cooling_down").len(), 1);
        assert_eq!(r.note(refusal(70_001), "key_b", "cooling_down").len(), 1);
        // A repeat after the window closes opens a new one, summarizing the old.
        r.note(refusal(70_002), "key_a", "cooling_down");
        let next = r.note(refusal(140_000), "key_a", "cooling_down");
        assert_eq!(next.len(), 2, "{next:?}");
        assert_eq!(next[0].data["repeated"], 1);
    }
}
