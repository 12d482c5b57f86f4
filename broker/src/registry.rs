//! The registry of agents: who is connected, who went away and why, and what each one
//! can be inspected at (its catalog).
//!
//! Agents are keyed by their [`AgentId`]. An agent that disconnects stays listed as
//! offline for `offline_retention_secs`, so a user can see that it went away and why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use periscope_protocol::{AgentId, BrokerMessage, CatalogEntry, Heartbeat, LocationKind, Registration};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::time::now_ms;

/// Messages queued for one agent's socket. Bounded: an agent that cannot keep up is
/// disconnected (and resynced when it comes back) rather than buffered without end.
pub const AGENT_QUEUE: usize = 256;

/// The sending half of a live agent session.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Distinguishes sessions of the same agent id (reconnects).
    pub session: u64,
    /// Frames to the agent.
    pub tx: mpsc::Sender<BrokerMessage>,
}

/// What the broker knows about one agent.
#[derive(Debug)]
pub struct AgentRecord {
    /// The registration as received.
    pub info: Registration,
    /// The live session; `None` while offline.
    pub conn: Option<Connection>,
    /// When the current (or last) session registered.
    pub connected_at_ms: u64,
    /// Last frame received.
    pub last_seen_ms: u64,
    /// When the agent went offline.
    pub offline_since_ms: Option<u64>,
    /// Why it went offline.
    pub disconnect_reason: Option<String>,
    /// Inspectable locations by identity.
    pub catalog: HashMap<(String, u32, LocationKind, String), CatalogEntry>,
    /// Counters from the last heartbeat.
    pub stats: Heartbeat,
    /// Hits accepted from this agent.
    pub hits_accepted: u64,
    /// Hits refused from this agent (unknown action, over the hit count, malformed).
    pub hits_refused: u64,
}

/// A serializable view of an agent for API callers.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// The agent's id.
    pub agent_id: AgentId,
    /// Human-readable name.
    pub display_name: String,
    /// Pool.
    pub pool: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Service name.
    pub service: String,
    /// Service version.
    pub service_version: String,
    /// Language.
    pub language: String,
    /// Runtime.
    pub runtime: String,
    /// Host.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Agent library version.
    pub agent_version: String,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// `online` or `offline`.
    pub status: &'static str,
    /// When the current or last session started (Unix ms).
    pub connected_at_ms: u64,
    /// Last frame received (Unix ms).
    pub last_seen_ms: u64,
    /// When it went offline (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_since_ms: Option<u64>,
    /// Why it went offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    /// Inspectable locations known.
    pub locations: usize,
    /// The agent's own counters (hits sent and dropped, queue length).
    pub stats: Heartbeat,
    /// Hits the broker accepted from it.
    pub hits_accepted: u64,
    /// Hits the broker refused from it.
    pub hits_refused: u64,
}

impl AgentRecord {
    /// Whether a session is live.
    pub fn online(&self) -> bool {
        self.conn.is_some()
    }

    /// The API view.
    pub fn view(&self) -> AgentView {
        let i = &self.info;
        AgentView {
            agent_id: i.agent_id.clone(),
            display_name: i.display_name.clone(),
            pool: i.pool.clone(),
            tags: i.tags.clone(),
            service: i.service.clone(),
            service_version: i.service_version.clone(),
            language: i.language.clone(),
            runtime: i.runtime.clone(),
            host: i.host.clone(),
            pid: i.pid,
            agent_version: i.agent_version.clone(),
            capabilities: i.capabilities.clone(),
            status: if self.online() { "online" } else { "offline" },
            connected_at_ms: self.connected_at_ms,
            last_seen_ms: self.last_seen_ms,
            offline_since_ms: self.offline_since_ms,
            disconnect_reason: self.disconnect_reason.clone(),
            locations: self.catalog.len(),
            stats: self.stats.clone(),
            hits_accepted: self.hits_accepted,
            hits_refused: self.hits_refused,
        }
    }

    /// Whether the agent is in `pool` (when given) and carries every tag in `tags`.
    pub fn matches(&self, pool: Option<&str>, tags: &[String]) -> bool {
        pool.is_none_or(|p| self.info.pool == p) && tags.iter().all(|t| self.info.tags.contains(t))
    }
}

/// Why a registration was refused by the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterRefusal {
    /// Another live session holds the id and does not look like the same process.
    Duplicate,
}

/// All agents.
#[derive(Debug)]
pub struct Registry {
    agents: DashMap<AgentId, AgentRecord>,
    sessions: AtomicU64,
    max_catalog_entries: usize,
}

impl Registry {
    /// An empty registry.
    pub fn new(max_catalog_entries: usize) -> Self {
        Registry { agents: DashMap::new(), sessions: AtomicU64::new(1), max_catalog_entries }
    }

    /// Registers a session; returns its session number. A reconnect of the same process
    /// (same pool, host and pid) replaces a session the broker still thinks is live; any
    /// other claim on a live id is refused.
    pub fn register(&self, info: Registration, tx: mpsc::Sender<BrokerMessage>) -> Result<u64, RegisterRefusal> {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let conn = Connection { session, tx };
        match self.agents.entry(info.agent_id.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                let rec = e.get_mut();
                if rec.online()
                    && (rec.info.pool != info.pool || rec.info.host != info.host || rec.info.pid != info.pid)
                {
                    return Err(RegisterRefusal::Duplicate);
                }
                // Same process: keep the catalog (it will be resent in full anyway).
                rec.info = info;
                rec.conn = Some(conn);
                rec.connected_at_ms = now;
                rec.last_seen_ms = now;
                rec.offline_since_ms = None;
                rec.disconnect_reason = None;
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(AgentRecord {
                    info,
                    conn: Some(conn),
                    connected_at_ms: now,
                    last_seen_ms: now,
                    offline_since_ms: None,
                    disconnect_reason: None,
                    catalog: HashMap::new(),
                    stats: Heartbeat::default(),
                    hits_accepted: 0,
                    hits_refused: 0,
                });
            }
        }
        Ok(session)
    }

    /// Marks a session ended, if it is still the agent's current one.
    pub fn disconnect(&self, id: &AgentId, session: u64, reason: &str) {
        if let Some(mut rec) = self.agents.get_mut(id)
            && rec.conn.as_ref().is_some_and(|c| c.session == session)
        {
            rec.conn = None;
            rec.offline_since_ms = Some(now_ms());
            rec.disconnect_reason = Some(reason.to_owned());
        }
    }

    /// Notes a frame from the agent.
    pub fn touch(&self, id: &AgentId) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            rec.last_seen_ms = now_ms();
        }
    }

    /// Stores heartbeat counters.
    pub fn heartbeat(&self, id: &AgentId, stats: Heartbeat) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            rec.stats = stats;
        }
    }

    /// Merges catalog entries; a full update replaces the catalog. Entries beyond the
    /// per-agent cap are ignored and counted in the return value.
    pub fn update_catalog(&self, id: &AgentId, full: bool, entries: Vec<CatalogEntry>) -> usize {
        let Some(mut rec) = self.agents.get_mut(id) else { return entries.len() };
        if full {
            rec.catalog.clear();
        }
        let mut ignored = 0;
        for e in entries {
            let key = (e.file.clone(), e.line, e.kind, e.name.clone());
            if rec.catalog.len() >= self.max_catalog_entries && !rec.catalog.contains_key(&key) {
                ignored += 1;
                continue;
            }
            rec.catalog.insert(key, e);
        }
        ignored
    }

    /// Counts a hit as accepted or refused.
    pub fn count_hit(&self, id: &AgentId, accepted: bool) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            if accepted {
                rec.hits_accepted += 1;
            } else {
                rec.hits_refused += 1;
            }
        }
    }

    /// Runs `f` on one agent.
    pub fn with<R>(&self, id: &AgentId, f: impl FnOnce(&AgentRecord) -> R) -> Option<R> {
        self.agents.get(id).map(|r| f(&r))
    }

    /// Runs `f` on every agent (in no particular order).
    pub fn for_each(&self, mut f: impl FnMut(&AgentRecord)) {
        for r in self.agents.iter() {
            f(&r);
        }
    }

    /// Sends a message to an agent if it is online. An agent whose queue is full is
    /// disconnected: it will resync on reconnect.
    pub fn send(&self, id: &AgentId, msg: BrokerMessage) -> bool {
        let Some(tx) = self.agents.get(id).and_then(|r| r.conn.as_ref().map(|c| c.tx.clone())) else {
            return false;
        };
        match tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(agent = %id, "agent is not reading its queue; disconnecting it");
                if let Some(mut rec) = self.agents.get_mut(id) {
                    rec.conn = None;
                    rec.offline_since_ms = Some(now_ms());
                    rec.disconnect_reason = Some("too slow: its outbound queue filled up".into());
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Forgets agents offline for longer than `retention_ms`.
    pub fn expire_offline(&self, retention_ms: u64) {
        let now = now_ms();
        self.agents.retain(|_, r| r.offline_since_ms.is_none_or(|t| now.saturating_sub(t) < retention_ms));
    }

    /// Number of agents online.
    pub fn online_count(&self) -> usize {
        self.agents.iter().filter(|r| r.online()).count()
    }
}
