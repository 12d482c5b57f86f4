//! The error groups behind `list_errors`: how often each distinct error (agent,
//! location, kind and type) happened, when first and last, its latest message and its
//! latest snapshot. Agents' `error_counts` reports add occurrences; stored error hits
//! add captures and point at their snapshot.
//!
//! [`ErrorStore`] is the seam; [`crate::backend::local::MemoryErrors`] keeps groups in
//! this process (a single node: they are recent history, rebuilt as errors recur; the
//! snapshots themselves are stored hits), [`crate::backend::redis::RedisErrors`] in the
//! shared Redis, so every node of a cluster answers `list_errors` alike. Both keep at
//! most [`MAX_ERROR_GROUPS_PER_ORG`] groups per organization, forgetting the one seen
//! least recently.

use periscope_protocol::{ActionId, AgentId, ErrorKind};
use serde::{Deserialize, Serialize};

use super::BackendFuture;

/// Most error groups kept per organization (each is an agent, location, kind and type).
pub const MAX_ERROR_GROUPS_PER_ORG: usize = 2_000;

/// The agent an error group belongs to, as it was when the group last changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorSource {
    /// The agent.
    pub agent_id: AgentId,
    /// Its display name.
    pub agent_name: String,
    /// Its pool.
    pub pool: String,
    /// Its service.
    #[serde(default)]
    pub service: String,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The stored hit that captured an occurrence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorHit {
    /// The error-capture action that stored it.
    pub action_id: ActionId,
    /// Its 1-based index among that action's hits.
    pub index: u64,
    /// When it was captured (agent clock, Unix ms).
    pub time_ms: u64,
}

/// What is known of one distinct error on one agent (also the shape of an update:
/// counts are added, times widened, message and source taken from the newest, the hit
/// from the newest capture).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorGroup {
    /// Where it comes from.
    pub source: ErrorSource,
    /// Source file as the agent reports it.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// Panic, event or exception.
    pub kind: ErrorKind,
    /// Its type.
    pub error_type: String,
    /// The latest message (redacted).
    pub message: String,
    /// Occurrences, captured or not.
    pub count: u64,
    /// Occurrences the agent did not capture (rate, budget).
    pub uncaptured: u64,
    /// Snapshots stored.
    pub captured: u64,
    /// First occurrence, Unix ms.
    pub first_seen_ms: u64,
    /// Latest occurrence, Unix ms.
    pub last_seen_ms: u64,
    /// The latest snapshot, when one was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit: Option<ErrorHit>,
}

impl ErrorGroup {
    /// The group's identity within its organization: agent, kind, type, location.
    pub fn key(&self) -> String {
        format!("{}|{}|{}|{}:{}", self.source.agent_id, self.kind.as_str(), self.error_type, self.file, self.line)
    }

    /// Folds `update` (of the same key) into this group.
    pub fn absorb(&mut self, update: ErrorGroup) {
        self.count = self.count.saturating_add(update.count);
        self.uncaptured = self.uncaptured.saturating_add(update.uncaptured);
        self.captured = self.captured.saturating_add(update.captured);
        if self.first_seen_ms == 0 || (update.first_seen_ms != 0 && update.first_seen_ms < self.first_seen_ms) {
            self.first_seen_ms = update.first_seen_ms;
        }
        let newer_hit = match (&self.hit, &update.hit) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => new.time_ms >= old.time_ms,
        };
        if newer_hit {
            self.hit = update.hit;
        }
        if update.last_seen_ms >= self.last_seen_ms {
            self.last_seen_ms = update.last_seen_ms;
            self.message = update.message;
            self.source = update.source;
        }
    }
}

/// Where error groups are kept.
pub trait ErrorStore: Send + Sync + std::fmt::Debug {
    /// Folds each update into its organization's group of the same key (creating it,
    /// and forgetting the least recently seen group beyond the bound).
    fn record<'a>(&'a self, org: &'a str, updates: Vec<ErrorGroup>) -> BackendFuture<'a, ()>;

    /// The organization's groups, most recently seen first.
    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ErrorGroup>>;
}
