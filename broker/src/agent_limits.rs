//! What the broker accepts from agents, keyed by what an agent cannot choose.
//!
//! An agent picks its own id, so nothing that protects the broker may hang on the id
//! alone. Every frame is charged to three budgets ([`SessionBudget`]): the session's
//! own (`ingest.agent_*`), its agent key's (`ingest.key_*`, all sessions of the key
//! together) and its organization's (`ingest.org_*`), narrowest first, so a session
//! over its own budget never spends its key's or its organization's. What exceeds one
//! is dropped and counted; the session is warned (at most once a second) and, still
//! flooding after `ingest.flood_warnings` warnings, disconnected.
//!
//! A disconnection for flooding cools down the agent id, and the agent key: for
//! `ingest.flood_cooldown_secs` no session of that key may register, under any id. When
//! `ingest.org_flood_keys` keys of one organization are cooling down at once, the whole
//! organization's new registrations wait too. The number of sessions one agent key
//! holds open is bounded (`agents.max_sessions_per_key`), counted from the upgrade, so
//! sessions that never register count as well.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use periscope_protocol::{ProtocolErrorBody, ProtocolErrorCode};

use crate::quota::{IngestSettings, Rate};
use crate::time::now_ms;

/// How long without drops before a session's warnings are forgiven.
const FLOOD_FORGET: Duration = Duration::from_secs(10);

/// Whose budget a frame exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The session's own.
    Agent,
    /// The agent key's (all its sessions together).
    Key,
    /// The organization's (all its agents together).
    Org,
}

/// What to do after a drop.
#[derive(Debug)]
pub enum Verdict {
    /// Nothing (a warning went out less than a second ago).
    Quiet,
    /// Tell the agent.
    Warn(ProtocolErrorBody),
    /// Disconnect it (and cool it down).
    Disconnect(ProtocolErrorBody),
}

/// Who is cooling down, when a registration is refused for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cooling {
    /// The agent key, until this time (Unix ms).
    Key(u64),
    /// The whole organization, until this time (Unix ms).
    Org(u64),
}

/// One agent key's shared budgets and state.
#[derive(Debug)]
struct KeyState {
    hits: Rate,
    bytes: Rate,
    sessions: Mutex<usize>,
    cooldown_until_ms: AtomicU64,
}

/// One organization's shared budgets and state.
#[derive(Debug)]
struct OrgState {
    hits: Rate,
    bytes: Rate,
    cooldown_until_ms: AtomicU64,
    /// Keys of the organization cooling down, until when.
    cooling_keys: Mutex<HashMap<String, u64>>,
}

/// The agent-side limits of the broker; see the module docs.
#[derive(Debug)]
pub struct AgentLimits {
    settings: IngestSettings,
    max_sessions_per_key: usize,
    keys: DashMap<String, Arc<KeyState>>,
    orgs: DashMap<String, Arc<OrgState>>,
}

/// A session's budgets: its own, and handles on its key's and organization's. Holding
/// one holds one of the key's session slots.
#[derive(Debug)]
pub struct SessionBudget {
    hits: Rate,
    bytes: Rate,
    key: Arc<KeyState>,
    org: Arc<OrgState>,
    warnings_sent: u32,
    last_warning: Option<tokio::time::Instant>,
    last_drop: Option<tokio::time::Instant>,
    dropped_since_warning: u64,
}

impl Drop for SessionBudget {
    fn drop(&mut self) {
        let mut n = self.key.sessions.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
    }
}

fn error_body(code: ProtocolErrorCode, message: String, fatal: bool) -> ProtocolErrorBody {
    ProtocolErrorBody { code, message, fatal, supported_versions: Vec::new() }
}

impl AgentLimits {
    /// Limits from `[ingest]`, with `max_sessions_per_key` sessions per agent key.
    pub fn new(settings: IngestSettings, max_sessions_per_key: usize) -> AgentLimits {
        AgentLimits {
            settings,
            max_sessions_per_key: max_sessions_per_key.max(1),
            keys: DashMap::new(),
            orgs: DashMap::new(),
        }
    }

    fn key(&self, key_id: &str) -> Arc<KeyState> {
        if let Some(k) = self.keys.get(key_id) {
            return Arc::clone(&k);
        }
        let s = &self.settings;
        let entry = self.keys.entry(key_id.to_owned()).or_insert_with(|| {
            Arc::new(KeyState {
                hits: Rate::per_second(s.key_hits_per_sec, s.key_hits_per_sec * s.burst_factor),
                bytes: Rate::per_second(s.key_bytes_per_sec as f64, s.key_bytes_per_sec as f64 * s.burst_factor),
                sessions: Mutex::new(0),
                cooldown_until_ms: AtomicU64::new(0),
            })
        });
        Arc::clone(&entry)
    }

    fn org(&self, org: &str) -> Arc<OrgState> {
        if let Some(o) = self.orgs.get(org) {
            return Arc::clone(&o);
        }
        let s = &self.settings;
        let entry = self.orgs.entry(org.to_owned()).or_insert_with(|| {
            Arc::new(OrgState {
                hits: Rate::per_second(s.org_hits_per_sec, s.org_hits_per_sec * s.burst_factor),
                bytes: Rate::per_second(s.org_bytes_per_sec as f64, s.org_bytes_per_sec as f64 * s.burst_factor),
                cooldown_until_ms: AtomicU64::new(0),
                cooling_keys: Mutex::new(HashMap::new()),
            })
        });
        Arc::clone(&entry)
    }

    /// Opens a session of agent key `key_id` of `org`: its budgets, and one of the key's
    /// session slots. Refused (with the error frame to send) when the key already holds
    /// `agents.max_sessions_per_key`.
    pub fn open_session(&self, key_id: &str, org: &str) -> Result<SessionBudget, ProtocolErrorBody> {
        let key = self.key(key_id);
        {
            let mut n = key.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if *n >= self.max_sessions_per_key {
                return Err(error_body(
                    ProtocolErrorCode::RateLimited,
                    format!(
                        "this agent key already holds {} sessions, its limit (agents.max_sessions_per_key); retry \
                         when one ends",
                        *n
                    ),
                    true,
                ));
            }
            *n += 1;
        }
        Ok(SessionBudget {
            hits: self.settings.agent_hits(),
            bytes: self.settings.agent_bytes(),
            org: self.org(org),
            key,
            warnings_sent: 0,
            last_warning: None,
            last_drop: None,
            dropped_since_warning: 0,
        })
    }

    /// Sessions agent key `key_id` holds open.
    pub fn sessions_of(&self, key_id: &str) -> usize {
        self.keys.get(key_id).map_or(0, |k| *k.sessions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether registrations of `key_id` of `org` must wait: the key, or its whole
    /// organization, is cooling down after flooding.
    pub fn cooling_down(&self, key_id: &str, org: &str) -> Option<Cooling> {
        let now = now_ms();
        let until = self.keys.get(key_id).map_or(0, |k| k.cooldown_until_ms.load(Ordering::Relaxed));
        if until > now {
            return Some(Cooling::Key(until));
        }
        let until = self.orgs.get(org).map_or(0, |o| o.cooldown_until_ms.load(Ordering::Relaxed));
        (until > now).then_some(Cooling::Org(until))
    }

    /// A session of `key_id` of `org` was disconnected for flooding: the key cools down,
    /// and the organization too when `ingest.org_flood_keys` of its keys are cooling
    /// down at once. Returns whether the organization now cools down.
    pub fn flooded(&self, key_id: &str, org: &str) -> bool {
        let now = now_ms();
        let until = now + self.settings.flood_cooldown_secs * 1_000;
        self.key(key_id).cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        let org_state = self.org(org);
        let mut cooling = org_state.cooling_keys.lock().unwrap_or_else(|p| p.into_inner());
        cooling.retain(|_, t| *t > now);
        cooling.insert(key_id.to_owned(), until);
        if cooling.len() >= self.settings.org_flood_keys as usize {
            org_state.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Forgets the state of agent keys that no longer authenticate and hold nothing.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let now = now_ms();
        self.keys.retain(|k, s| {
            keep(k)
                || *s.sessions.lock().unwrap_or_else(|p| p.into_inner()) > 0
                || s.cooldown_until_ms.load(Ordering::Relaxed) > now
        });
    }

    /// The settings in force.
    pub fn settings(&self) -> &IngestSettings {
        &self.settings
    }
}

impl SessionBudget {
    /// Charges a frame of `size` bytes to the session, then its key, then its
    /// organization (before the frame is decoded); says whose budget it exceeded.
    pub fn charge_bytes(&self, size: u32) -> Result<(), Over> {
        if self.bytes.take(size).is_err() {
            Err(Over::Agent)
        } else if self.key.bytes.take(size).is_err() {
            Err(Over::Key)
        } else if self.org.bytes.take(size).is_err() {
            Err(Over::Org)
        } else {
            Ok(())
        }
    }

    /// Charges one snapshot hit the same way (once the frame decoded as a hit).
    pub fn charge_hit(&self) -> Result<(), Over> {
        if self.hits.take(1).is_err() {
            Err(Over::Agent)
        } else if self.key.hits.take(1).is_err() {
            Err(Over::Key)
        } else if self.org.hits.take(1).is_err() {
            Err(Over::Org)
        } else {
            Ok(())
        }
    }

    /// Notes a drop; at most once a second, a warning, and after `ingest.flood_warnings`
    /// warnings, the end of the session.
    pub fn dropped(&mut self, settings: &IngestSettings, over: Over, what: &str) -> Verdict {
        let now = tokio::time::Instant::now();
        if self.last_drop.is_some_and(|t| now.duration_since(t) > FLOOD_FORGET) {
            self.warnings_sent = 0;
        }
        self.last_drop = Some(now);
        self.dropped_since_warning += 1;
        if self.last_warning.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return Verdict::Quiet;
        }
        let i = settings;
        let budget = match over {
            Over::Agent => format!(
                "the broker's budget for one agent ({} hits/s, {} bytes/s, burst x{})",
                i.agent_hits_per_sec, i.agent_bytes_per_sec, i.burst_factor
            ),
            Over::Key => format!(
                "the budget of this agent key, all its agents together ({} hits/s, {} bytes/s, burst x{})",
                i.key_hits_per_sec, i.key_bytes_per_sec, i.burst_factor
            ),
            Over::Org => format!(
                "the budget of this organization, all its agents together ({} hits/s, {} bytes/s, burst x{})",
                i.org_hits_per_sec, i.org_bytes_per_sec, i.burst_factor
            ),
        };
        if self.warnings_sent >= i.flood_warnings {
            let msg = format!(
                "still sending more than {budget} after {} warnings; disconnected, and this agent key may not \
                 register again for {} s",
                self.warnings_sent, i.flood_cooldown_secs
            );
            return Verdict::Disconnect(error_body(ProtocolErrorCode::RateLimited, msg, true));
        }
        self.warnings_sent += 1;
        self.last_warning = Some(now);
        let msg = format!(
            "{} frame(s) dropped: {what} over {budget}; warning {} of {} before disconnection",
            self.dropped_since_warning, self.warnings_sent, i.flood_warnings
        );
        self.dropped_since_warning = 0;
        Verdict::Warn(error_body(ProtocolErrorCode::RateLimited, msg, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_of_one_key_are_bounded_and_freed_when_they_end() {
        let limits = AgentLimits::new(IngestSettings::default(), 2);
        let a = limits.open_session("key_a", "acme").unwrap();
        let _b = limits.open_session("key_a", "acme").unwrap();
        let refused = limits.open_session("key_a", "acme").unwrap_err();
        assert!(refused.message.contains("max_sessions_per_key"), "{}", refused.message);
        assert!(limits.open_session("key_b", "acme").is_ok(), "another key has its own slots");
        drop(a);
        assert_eq!(limits.sessions_of("key_a"), 1);
        assert!(limits.open_session("key_a", "acme").is_ok());
    }

    #[test]
    fn a_flood_cools_down_the_key_and_several_flooding_keys_the_organization() {
        let settings = IngestSettings { org_flood_keys: 2, ..IngestSettings::default() };
        let limits = AgentLimits::new(settings, 10);
        assert!(!limits.flooded("key_a", "acme"));
        assert!(matches!(limits.cooling_down("key_a", "acme"), Some(Cooling::Key(_))));
        assert_eq!(limits.cooling_down("key_b", "acme"), None, "one key's flood is its own");
        assert!(limits.flooded("key_b", "acme"));
        assert!(matches!(limits.cooling_down("key_c", "acme"), Some(Cooling::Org(_))));
        assert_eq!(limits.cooling_down("key_d", "other"), None);
    }

    #[test]
    fn a_sessions_budget_is_charged_before_its_keys_and_the_keys_before_the_organizations() {
        let settings = IngestSettings {
            agent_bytes_per_sec: 4_096,
            key_bytes_per_sec: 6_144,
            org_bytes_per_sec: 1_000_000,
            burst_factor: 1.0,
            ..IngestSettings::default()
        };
        let limits = AgentLimits::new(settings, 10);
        let one = limits.open_session("key_a", "acme").unwrap();
        let two = limits.open_session("key_a", "acme").unwrap();
        // Each refusal below asks for what takes a third of a second or more to refill,
        // so a slow machine between two lines does not turn it into a success.
        assert_eq!(one.charge_bytes(4_096), Ok(()));
        assert_eq!(one.charge_bytes(2_048), Err(Over::Agent), "its own budget first");
        assert_eq!(two.charge_bytes(2_048), Ok(()));
        assert_eq!(two.charge_bytes(2_048), Err(Over::Key), "the key's budget is shared by its sessions");
        let other = limits.open_session("key_b", "acme").unwrap();
        assert_eq!(other.charge_bytes(4_096), Ok(()), "another key is not affected");
    }
}
