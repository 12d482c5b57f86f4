//! The registry of agents: who is connected, who went away and why, and what each one
//! can be inspected at (its catalog).
//!
//! Agents are keyed by their [`AgentId`]. An agent that disconnects stays listed as
//! offline for `offline_retention_secs`, so a user can see that it went away and why.
//! Each agent belongs to the organization of the agent key it registered with, and its
//! id to that key and pool ([`crate::identity`], which remembers the binding longer
//! than this list and across restarts); a live id cannot be taken over by another
//! process either. Catalogs are bounded in entries and in bytes, every entry cut to
//! the protocol's bounds on receipt.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use periscope_protocol::{AgentId, BrokerMessage, CatalogEntry, FileLines, Heartbeat, LocationKind, Registration};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::identity::{Identities, Mismatch, check_binding};
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
    /// Source files with their executable lines (languages where every line is a
    /// location), by path.
    pub files: HashMap<String, FileLines>,
    /// The memory the catalog holds ([`CatalogEntry::footprint`], [`FileLines::footprint`]).
    pub catalog_bytes: usize,
    /// Counters from the last heartbeat.
    pub stats: Heartbeat,
    /// Hits accepted from this agent.
    pub hits_accepted: u64,
    /// Hits refused from this agent (unknown action, over the hit count, malformed).
    pub hits_refused: u64,
    /// The organization (of the agent key it registered with).
    pub org: String,
    /// The agent key it registered with.
    pub key_id: String,
    /// What the broker dropped from this agent for exceeding its budgets.
    pub dropped: IngestDrops,
    /// Refused until then (Unix ms) after being disconnected for flooding.
    pub cooldown_until_ms: Option<u64>,
}

/// What the broker dropped from one agent, by reason (the agent's own drops are in its
/// heartbeat [`stats`](AgentView::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IngestDrops {
    /// Hit frames over the agent's hits-per-second budget.
    pub hits_rate: u64,
    /// Frames over the agent's bytes-per-second budget.
    pub bytes_rate: u64,
    /// Hits over an action's per-agent rate.
    pub action_rate: u64,
    /// Log lines over an action's line or byte budget.
    pub log_rate: u64,
    /// Frames over its agent key's budget (all the key's agents together).
    pub key_rate: u64,
    /// Frames over its organization's budget (all the organization's agents together).
    pub org_rate: u64,
    /// Redaction findings naming a rule the broker does not know (dropped).
    pub unknown_rules: u64,
    /// Catalog entries ignored (over the entry or byte bound) or cut to their bounds.
    pub catalog: u64,
    /// Warnings sent to the agent about it.
    pub warnings: u64,
}

/// Why the broker dropped something an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The agent's hits per second.
    HitsRate,
    /// The agent's bytes per second.
    BytesRate,
    /// An action's per-agent hit rate.
    ActionRate,
    /// An action's log line or byte rate.
    LogRate,
    /// The agent key's budget.
    KeyRate,
    /// The organization's budget.
    OrgRate,
    /// A redaction finding naming an unknown rule.
    UnknownRule,
    /// A catalog entry over its bounds.
    Catalog,
}

impl DropReason {
    /// The label on `/metrics`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::HitsRate => "hits_rate",
            DropReason::BytesRate => "bytes_rate",
            DropReason::ActionRate => "action_rate",
            DropReason::LogRate => "log_rate",
            DropReason::KeyRate => "key_rate",
            DropReason::OrgRate => "org_rate",
            DropReason::UnknownRule => "unknown_redaction_rule",
            DropReason::Catalog => "catalog",
        }
    }
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
    /// What the broker dropped from it for exceeding its budgets.
    pub broker_dropped: IngestDrops,
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
            locations: self.catalog.len() + self.files.values().map(|f| f.lines.len() as usize).sum::<usize>(),
            stats: self.stats.clone(),
            hits_accepted: self.hits_accepted,
            hits_refused: self.hits_refused,
            broker_dropped: self.dropped,
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
    /// The id is listed under another organization, agent key or pool.
    Bound(Mismatch),
    /// The agent was disconnected for flooding; refused until this time (Unix ms).
    CoolingDown(u64),
    /// The organization has this many agents listed, all online.
    Full(usize),
}

/// What became of a catalog update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogOutcome {
    /// Entries not kept (over the entry or byte bound, or beyond one frame's share).
    pub ignored: usize,
    /// Entries kept but cut to their bounds.
    pub cut: usize,
}

/// All agents.
#[derive(Debug)]
pub struct Registry {
    agents: DashMap<AgentId, AgentRecord>,
    sessions: AtomicU64,
    max_catalog_entries: usize,
    max_catalog_bytes: usize,
    max_per_org: usize,
    identities: Arc<Identities>,
}

impl Registry {
    /// An empty registry (identity bindings held a week, 100,000 per organization).
    pub fn new(max_catalog_entries: usize) -> Self {
        Registry {
            agents: DashMap::new(),
            sessions: AtomicU64::new(1),
            max_catalog_entries,
            max_catalog_bytes: 4 * 1024 * 1024,
            max_per_org: 10_000,
            identities: Arc::new(Identities::new(7 * 86_400_000, 100_000)),
        }
    }

    /// Sets how much memory one agent's catalog may hold.
    pub fn with_max_catalog_bytes(mut self, max: u64) -> Self {
        self.max_catalog_bytes = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        self
    }

    /// Sets how long and how many agent identity bindings are kept.
    pub fn with_identities(mut self, identities: Identities) -> Self {
        self.identities = Arc::new(identities);
        self
    }

    /// Which agent key and pool each agent id belongs to.
    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }

    /// Sets how many agents one organization may have listed.
    pub fn with_max_per_org(mut self, max: u64) -> Self {
        self.max_per_org = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        self
    }

    /// Makes room for a new agent of `org`: when the organization is at its limit,
    /// forgets the agent offline the longest of the agent key listing the most agents
    /// (so one key registering fresh ids forgets its own, not another key's); false
    /// when every listed agent is online.
    fn make_room(&self, org: &str) -> bool {
        let mut count = 0usize;
        // Per key: agents listed, and its agent offline the longest.
        let mut keys: HashMap<String, (usize, Option<(u64, AgentId)>)> = HashMap::new();
        for r in self.agents.iter().filter(|r| r.org == org) {
            count += 1;
            let k = keys.entry(r.key_id.clone()).or_default();
            k.0 += 1;
            if let Some(since) = r.offline_since_ms
                && k.1.as_ref().is_none_or(|(t, _)| since < *t)
            {
                k.1 = Some((since, r.info.agent_id.clone()));
            }
        }
        if count < self.max_per_org {
            return true;
        }
        let victim = keys
            .into_iter()
            .filter_map(|(key, (n, oldest))| oldest.map(|o| (n, key, o)))
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.2.0.cmp(&a.2.0)))
            .map(|(_, _, (_, id))| id);
        match victim {
            Some(id) => {
                self.agents.remove(&id);
                true
            }
            None => false,
        }
    }

    /// Registers a session of an agent of `org` authenticated by the agent key `key_id`;
    /// returns its session number. A listed id is only ever taken up again by the
    /// organization, key and pool it was listed under; a reconnect of the same process
    /// (same host and pid too) replaces a session the broker still thinks is live, and
    /// any other claim on a live id is refused.
    pub fn register(
        &self,
        info: Registration,
        org: &str,
        key_id: &str,
        tx: mpsc::Sender<BrokerMessage>,
    ) -> Result<u64, RegisterRefusal> {
        // Counted before taking the entry: iterating while holding a shard lock would
        // deadlock. A race can overshoot the limit by the registrations in flight.
        if !self.agents.contains_key(&info.agent_id) && !self.make_room(org) {
            return Err(RegisterRefusal::Full(self.max_per_org));
        }
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let conn = Connection { session, tx };
        match self.agents.entry(info.agent_id.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                let rec = e.get_mut();
                check_binding((&rec.org, &rec.key_id, &rec.info.pool), (org, key_id, &info.pool))
                    .map_err(RegisterRefusal::Bound)?;
                if let Some(until) = rec.cooldown_until_ms.filter(|t| *t > now) {
                    return Err(RegisterRefusal::CoolingDown(until));
                }
                if rec.online() && (rec.info.host != info.host || rec.info.pid != info.pid) {
                    return Err(RegisterRefusal::Duplicate);
                }
                // Same key and pool: keep the catalog (it will be resent in full anyway).
                rec.cooldown_until_ms = None;
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
                    files: HashMap::new(),
                    catalog_bytes: 0,
                    stats: Heartbeat::default(),
                    hits_accepted: 0,
                    hits_refused: 0,
                    org: org.to_owned(),
                    key_id: key_id.to_owned(),
                    dropped: IngestDrops::default(),
                    cooldown_until_ms: None,
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

    /// Merges catalog entries; a full update replaces the catalog. Each entry is cut
    /// to the protocol's bounds first; entries beyond the per-agent caps (entries,
    /// bytes) or beyond one frame's share are ignored. Returns how many entries were
    /// ignored and how many cut (both also counted as the agent's `catalog` drops).
    ///
    /// A source file ([`FileLines`]) counts as one entry and its footprint in bytes; a
    /// later copy of a file replaces the earlier one.
    pub fn update_catalog(
        &self,
        id: &AgentId,
        full: bool,
        entries: Vec<CatalogEntry>,
        files: Vec<FileLines>,
    ) -> CatalogOutcome {
        let Some(mut rec) = self.agents.get_mut(id) else {
            return CatalogOutcome { ignored: entries.len() + files.len(), cut: 0 };
        };
        let rec = &mut *rec;
        if full {
            rec.catalog.clear();
            rec.files.clear();
            rec.catalog_bytes = 0;
        }
        let mut out = CatalogOutcome::default();
        let per_frame = periscope_protocol::messages::MAX_CATALOG_ENTRIES_PER_FRAME;
        out.ignored += entries.len().saturating_sub(per_frame);
        for mut e in entries.into_iter().take(per_frame) {
            if e.sanitize() {
                out.cut += 1;
            }
            let key = (e.file.clone(), e.line, e.kind, e.name.clone());
            let size = e.footprint();
            let replaced = rec.catalog.get(&key).map_or(0, CatalogEntry::footprint);
            let bytes_after = rec.catalog_bytes - replaced + size;
            let full_entries = rec.catalog.len() >= self.max_catalog_entries && replaced == 0;
            if full_entries || bytes_after > self.max_catalog_bytes {
                out.ignored += 1;
                continue;
            }
            rec.catalog_bytes = bytes_after;
            rec.catalog.insert(key, e);
        }
        let per_frame = periscope_protocol::messages::MAX_CATALOG_FILES_PER_FRAME;
        out.ignored += files.len().saturating_sub(per_frame);
        for mut f in files.into_iter().take(per_frame) {
            if f.sanitize() {
                out.cut += 1;
            }
            let size = f.footprint();
            let replaced = rec.files.get(&f.file).map_or(0, FileLines::footprint);
            let bytes_after = rec.catalog_bytes - replaced + size;
            let entries_now = rec.catalog.len() + rec.files.len();
            if (entries_now >= self.max_catalog_entries && replaced == 0) || bytes_after > self.max_catalog_bytes {
                out.ignored += 1;
                continue;
            }
            rec.catalog_bytes = bytes_after;
            rec.files.insert(f.file.clone(), f);
        }
        rec.dropped.catalog += (out.ignored + out.cut) as u64;
        out
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

    /// Counts something the broker dropped from an agent.
    pub fn count_drop(&self, id: &AgentId, reason: DropReason, n: u64) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            let d = &mut rec.dropped;
            match reason {
                DropReason::HitsRate => d.hits_rate += n,
                DropReason::BytesRate => d.bytes_rate += n,
                DropReason::ActionRate => d.action_rate += n,
                DropReason::LogRate => d.log_rate += n,
                DropReason::KeyRate => d.key_rate += n,
                DropReason::OrgRate => d.org_rate += n,
                DropReason::UnknownRule => d.unknown_rules += n,
                DropReason::Catalog => d.catalog += n,
            }
        }
    }

    /// Counts a warning sent to an agent.
    pub fn count_warning(&self, id: &AgentId) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            rec.dropped.warnings += 1;
        }
    }

    /// Refuses the agent's registrations until `until_ms` (after flooding).
    pub fn cool_down(&self, id: &AgentId, until_ms: u64) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            rec.cooldown_until_ms = Some(until_ms);
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

    /// Forgets agents offline for longer than `retention_ms` (and out of any cool-down).
    pub fn expire_offline(&self, retention_ms: u64) {
        let now = now_ms();
        self.agents.retain(|_, r| {
            r.offline_since_ms.is_none_or(|t| now.saturating_sub(t) < retention_ms)
                || r.cooldown_until_ms.is_some_and(|t| t > now)
        });
    }

    /// Number of agents online.
    pub fn online_count(&self) -> usize {
        self.count(AgentRecord::online)
    }

    /// Number of agents for which `f` holds.
    pub fn count(&self, f: impl Fn(&AgentRecord) -> bool) -> usize {
        self.agents.iter().filter(|r| f(r)).count()
    }
}
