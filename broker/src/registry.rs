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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use periscope_protocol::{AgentId, BrokerMessage, CatalogEntry, FileLines, Heartbeat, Registration};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::catalog::{AgentCatalog, Bounds, Interner, InternerStats};
pub use crate::catalog::{CatalogOutcome, PublishedCatalog};
use crate::identity::{Identities, Mismatch, check_binding};
use crate::time::now_ms;

/// Messages queued for one agent's socket. Bounded: an agent that cannot keep up is
/// disconnected (and resynced when it comes back) rather than buffered without end.
pub const AGENT_QUEUE: usize = 256;

/// A message queued for an agent: boxed, so that an idle session's queue (allocated a
/// block of slots at a time) costs a pointer per slot rather than a whole message.
pub type Queued = Box<BrokerMessage>;

/// The sending half of a live agent session.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Distinguishes sessions of the same agent id (reconnects).
    pub session: u64,
    /// Frames to the agent.
    pub tx: mpsc::Sender<Queued>,
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
    /// Inspectable locations: callsites and, for languages where every line is a
    /// location, whole source files; shared with every agent that published the same
    /// ([`crate::catalog`]).
    pub catalog: AgentCatalog,
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
    /// The lease epoch this node holds the agent under (0 without leases).
    pub epoch: u64,
    /// The node holding the agent, when it is another one (a record published there).
    pub remote: Option<Remote>,
    /// Bumped each time the catalog changes (other nodes fetch it again).
    pub catalog_version: u64,
}

/// An agent held by another node, as that node published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The node.
    pub node: String,
    /// Whether it is connected there (and the node alive).
    pub online: bool,
}

/// What the node holding an agent tells the others about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSnapshot {
    /// The registration.
    pub info: Registration,
    /// Its organization.
    pub org: String,
    /// Its agent key.
    pub key_id: String,
    /// The node holding it.
    pub node: String,
    /// The lease epoch it is held under.
    pub epoch: u64,
    /// Whether it is connected.
    pub online: bool,
    /// When the session started (Unix ms).
    pub connected_at_ms: u64,
    /// Last frame received (Unix ms).
    pub last_seen_ms: u64,
    /// When it went offline (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since_ms: Option<u64>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    /// Its heartbeat counters.
    #[serde(default)]
    pub stats: Heartbeat,
    /// Hits accepted from it.
    #[serde(default)]
    pub hits_accepted: u64,
    /// Hits refused from it.
    #[serde(default)]
    pub hits_refused: u64,
    /// What the broker dropped from it.
    #[serde(default)]
    pub dropped: IngestDrops,
    /// The version of its catalog.
    #[serde(default)]
    pub catalog_version: u64,
}

/// What the broker dropped from one agent, by reason (the agent's own drops are in its
/// heartbeat [`stats`](AgentView::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Hits and lines that could not be stored because the shared state was unreachable.
    pub unavailable: u64,
    /// Hits refused because the agent's lease had moved to another node.
    pub lease_lost: u64,
    /// Warnings sent to the agent about it.
    pub warnings: u64,
    /// Frames that were not a message of the protocol (malformed JSON, unknown types,
    /// binary frames), each answered with an error frame.
    pub bad_frames: u64,
    /// Sessions that ended on a broken frame (the agent vanished mid-frame, sent half
    /// a frame or an invalid one at the WebSocket level).
    pub protocol_errors: u64,
    /// Sessions closed because the agent stopped answering pings.
    pub ping_timeouts: u64,
    /// Sessions closed because the agent read none of the messages queued for it
    /// ([`AGENT_QUEUE`]) and the queue filled up.
    pub queue_full: u64,
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
    /// A frame that is not a protocol message.
    BadFrame,
    /// A session ended on a broken WebSocket frame.
    ProtocolError,
    /// A session closed for not answering pings.
    PingTimeout,
    /// A session closed because the agent did not read its queue.
    QueueFull,
    /// The shared state could not be reached to store it.
    Unavailable,
    /// The agent's lease moved to another node.
    LeaseLost,
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
            DropReason::BadFrame => "bad_frame",
            DropReason::ProtocolError => "protocol_error",
            DropReason::PingTimeout => "ping_timeout",
            DropReason::QueueFull => "outbound_queue_full",
            DropReason::Unavailable => "unavailable",
            DropReason::LeaseLost => "lease_lost",
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
    /// The build (git commit) the service runs, when the agent knows it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub build: String,
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
    /// The broker node it is connected to (in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AgentRecord {
    /// Whether a session is live, here or on another node.
    pub fn online(&self) -> bool {
        self.conn.is_some() || self.remote.as_ref().is_some_and(|r| r.online)
    }

    /// Whether this node holds the agent's session.
    pub fn local(&self) -> bool {
        self.conn.is_some()
    }

    /// The API view.
    pub fn view(&self) -> AgentView {
        let mut v = self.view_here();
        v.node = self.remote.as_ref().map(|r| r.node.clone());
        v
    }

    fn view_here(&self) -> AgentView {
        let i = &self.info;
        AgentView {
            agent_id: i.agent_id.clone(),
            display_name: i.display_name.clone(),
            pool: i.pool.clone(),
            tags: i.tags.clone(),
            service: i.service.clone(),
            service_version: i.service_version.clone(),
            build: i.build.clone(),
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
            locations: self.catalog.locations(),
            stats: self.stats.clone(),
            hits_accepted: self.hits_accepted,
            hits_refused: self.hits_refused,
            broker_dropped: self.dropped,
            node: None,
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

/// A message for an agent another node holds: the node, the agent, the message.
pub type Outbound = (String, AgentId, BrokerMessage);

/// All agents.
#[derive(Debug)]
pub struct Registry {
    agents: DashMap<AgentId, AgentRecord>,
    /// This node's name in a cluster.
    node: Option<String>,
    /// Messages for agents held by other nodes, to the bus.
    bus: Option<mpsc::Sender<Outbound>>,
    /// Agents held here whose record changed since it was last published (and whether
    /// their catalog did).
    dirty: Mutex<HashMap<AgentId, bool>>,
    sessions: AtomicU64,
    max_catalog_entries: usize,
    max_catalog_bytes: usize,
    max_per_org: usize,
    identities: Arc<Identities>,
    /// Every distinct catalog, once.
    catalogs: Interner,
}

impl Registry {
    /// An empty registry (identity bindings held a week, 100,000 per organization).
    pub fn new(max_catalog_entries: usize) -> Self {
        Registry {
            agents: DashMap::new(),
            node: None,
            bus: None,
            dirty: Mutex::default(),
            sessions: AtomicU64::new(1),
            max_catalog_entries,
            max_catalog_bytes: 4 * 1024 * 1024,
            max_per_org: 10_000,
            identities: Arc::new(Identities::new(7 * 86_400_000, 100_000)),
            catalogs: Interner::default(),
        }
    }

    /// Makes this registry node `node` of a cluster: messages for agents other nodes hold
    /// go to `bus`.
    pub fn with_cluster(mut self, node: String, bus: mpsc::Sender<Outbound>) -> Self {
        self.node = Some(node);
        self.bus = Some(bus);
        self
    }

    fn mark(&self, id: &AgentId, catalog: bool) {
        if self.node.is_none() {
            return;
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        *dirty.entry(id.clone()).or_insert(false) |= catalog;
    }

    /// The records of agents held here that changed since the last call, with their
    /// catalogs when those changed, to publish to the other nodes.
    pub fn take_changed(&self) -> Vec<(AgentSnapshot, Option<PublishedCatalog>)> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let node = self.node.clone().unwrap_or_default();
        let mut out = Vec::new();
        for (id, catalog) in dirty {
            let Some(r) = self.agents.get(&id) else { continue };
            if r.remote.is_some() {
                continue;
            }
            let snap = AgentSnapshot {
                info: r.info.clone(),
                org: r.org.clone(),
                key_id: r.key_id.clone(),
                node: node.clone(),
                epoch: r.epoch,
                online: r.conn.is_some(),
                connected_at_ms: r.connected_at_ms,
                last_seen_ms: r.last_seen_ms,
                offline_since_ms: r.offline_since_ms,
                disconnect_reason: r.disconnect_reason.clone(),
                stats: r.stats.clone(),
                hits_accepted: r.hits_accepted,
                hits_refused: r.hits_refused,
                dropped: r.dropped,
                catalog_version: r.catalog_version,
            };
            let catalog = catalog.then(|| r.catalog.published());
            out.push((snap, catalog));
        }
        out
    }

    /// Every agent held here whose record is published (all of them, for a full
    /// republish after Redis came back).
    pub fn mark_all_local(&self) {
        let ids: Vec<AgentId> = self.agents.iter().filter(|r| r.remote.is_none()).map(|r| r.key().clone()).collect();
        for id in ids {
            self.mark(&id, true);
        }
    }

    /// Whether `snap` (published by another node) is news: the agent is not held here
    /// under a newer lease. Returns the catalog version this node has for it, to fetch
    /// the catalog again when the published one is newer.
    pub fn remote_news(&self, snap: &AgentSnapshot) -> Option<u64> {
        match self.agents.get(&snap.info.agent_id) {
            Some(r) if r.remote.is_none() && r.conn.is_some() && r.epoch >= snap.epoch => None,
            Some(r) => Some(if r.remote.is_some() { r.catalog_version } else { u64::MAX }),
            None => Some(u64::MAX),
        }
    }

    /// Applies what another node published of an agent (with its catalog when fetched).
    /// An agent held here under an older lease has moved: its session here is dropped.
    pub fn apply_remote(&self, snap: AgentSnapshot, catalog: Option<PublishedCatalog>) {
        let id = snap.info.agent_id.clone();
        let remote = Remote { node: snap.node.clone(), online: snap.online };
        let mut entry = self.agents.entry(id).or_insert_with(|| AgentRecord {
            info: snap.info.clone(),
            conn: None,
            connected_at_ms: snap.connected_at_ms,
            last_seen_ms: snap.last_seen_ms,
            offline_since_ms: snap.offline_since_ms,
            disconnect_reason: None,
            catalog: AgentCatalog::empty(&self.catalogs),
            stats: Heartbeat::default(),
            hits_accepted: 0,
            hits_refused: 0,
            org: snap.org.clone(),
            key_id: snap.key_id.clone(),
            dropped: IngestDrops::default(),
            cooldown_until_ms: None,
            epoch: 0,
            remote: Some(remote.clone()),
            catalog_version: 0,
        });
        let rec = &mut *entry;
        if rec.conn.is_some() && rec.epoch >= snap.epoch {
            return;
        }
        if rec.conn.take().is_some() {
            tracing::info!(agent = %snap.info.agent_id, node = %snap.node, "agent moved to another node");
        }
        rec.info = snap.info;
        rec.org = snap.org;
        rec.key_id = snap.key_id;
        rec.epoch = snap.epoch;
        rec.remote = Some(remote);
        rec.connected_at_ms = snap.connected_at_ms;
        rec.last_seen_ms = snap.last_seen_ms;
        rec.offline_since_ms = snap.offline_since_ms;
        rec.disconnect_reason = snap.disconnect_reason;
        rec.stats = snap.stats;
        rec.hits_accepted = snap.hits_accepted;
        rec.hits_refused = snap.hits_refused;
        rec.dropped = snap.dropped;
        if let Some(published) = catalog {
            rec.catalog = AgentCatalog::from_published(&self.catalogs, published);
            rec.catalog_version = snap.catalog_version;
        }
    }

    /// Marks offline the agents that nodes no longer alive held.
    pub fn nodes_gone(&self, alive: &HashSet<String>) {
        let now = now_ms();
        for mut r in self.agents.iter_mut() {
            if let Some(remote) = r.remote.as_mut().filter(|x| x.online && !alive.contains(&x.node)) {
                remote.online = false;
                r.offline_since_ms = Some(now);
                r.disconnect_reason = Some("its broker node stopped answering; it reconnects to another one".into());
            }
        }
    }

    /// The leases held here: (agent, epoch).
    pub fn local_leases(&self) -> Vec<(AgentId, u64)> {
        self.agents.iter().filter(|r| r.conn.is_some() && r.epoch > 0).map(|r| (r.key().clone(), r.epoch)).collect()
    }

    /// Ends the session here of an agent whose lease moved to another node.
    pub fn lease_lost(&self, id: &AgentId) {
        if let Some(mut rec) = self.agents.get_mut(id)
            && rec.conn.take().is_some()
        {
            tracing::warn!(agent = %id, "the agent's lease moved to another node; its session here ends");
        }
    }

    /// Sets the lease epoch of a session registered here.
    pub fn set_epoch(&self, id: &AgentId, session: u64, epoch: u64) {
        if let Some(mut rec) = self.agents.get_mut(id)
            && rec.conn.as_ref().is_some_and(|c| c.session == session)
        {
            rec.epoch = epoch;
        }
        self.mark(id, true);
    }

    /// This node's name in a cluster.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
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
        tx: mpsc::Sender<Queued>,
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
                rec.remote = None;
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
                    catalog: AgentCatalog::empty(&self.catalogs),
                    stats: Heartbeat::default(),
                    hits_accepted: 0,
                    hits_refused: 0,
                    org: org.to_owned(),
                    key_id: key_id.to_owned(),
                    dropped: IngestDrops::default(),
                    cooldown_until_ms: None,
                    epoch: 0,
                    remote: None,
                    catalog_version: 0,
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
            drop(rec);
            self.mark(id, false);
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
        self.mark(id, false);
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
        let bounds = Bounds { max_entries: self.max_catalog_entries, max_bytes: self.max_catalog_bytes };
        let out = rec.catalog.update(bounds, full, entries, files);
        rec.dropped.catalog += (out.ignored + out.cut) as u64;
        rec.catalog_version += 1;
        self.mark(id, true);
        out
    }

    /// Shares the agent's catalog with the agents holding an equal one, once its catalog
    /// frames stop coming ([`AgentCatalog::settle`]).
    pub fn settle_catalog(&self, id: &AgentId) {
        if let Some(mut rec) = self.agents.get_mut(id) {
            rec.catalog.settle(&self.catalogs);
        }
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
                DropReason::BadFrame => d.bad_frames += n,
                DropReason::ProtocolError => d.protocol_errors += n,
                DropReason::PingTimeout => d.ping_timeouts += n,
                DropReason::QueueFull => d.queue_full += n,
                DropReason::Unavailable => d.unavailable += n,
                DropReason::LeaseLost => d.lease_lost += n,
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
        let (tx, remote) = match self.agents.get(id) {
            Some(r) => (r.conn.as_ref().map(|c| c.tx.clone()), r.remote.clone().filter(|x| x.online)),
            None => return false,
        };
        let Some(tx) = tx else {
            // Held by another node: to it through the bus (bounded; a full bus drops,
            // and the agent resyncs when it next registers).
            return match (remote, &self.bus) {
                (Some(r), Some(bus)) => bus.try_send((r.node, id.clone(), msg)).is_ok(),
                _ => false,
            };
        };
        match tx.try_send(Box::new(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(mut rec) = self.agents.get_mut(id)
                    && rec.conn.as_ref().is_some_and(|c| c.tx.same_channel(&tx))
                {
                    rec.conn = None;
                    rec.offline_since_ms = Some(now_ms());
                    rec.disconnect_reason = Some("too slow: its outbound queue filled up".into());
                    rec.dropped.queue_full += 1;
                    tracing::warn!(agent = %id, "agent is not reading its queue; disconnecting it");
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Forgets agents offline for longer than `retention_ms` (and out of any cool-down).
    pub fn expire_offline(&self, retention_ms: u64) -> Vec<AgentId> {
        let now = now_ms();
        let mut gone = Vec::new();
        self.agents.retain(|id, r| {
            let keep = r.online()
                || r.offline_since_ms.is_none_or(|t| now.saturating_sub(t) < retention_ms)
                || r.cooldown_until_ms.is_some_and(|t| t > now);
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        gone
    }

    /// Delivers a message from another node to an agent held here.
    pub fn deliver(&self, id: &AgentId, msg: BrokerMessage) -> bool {
        if self.agents.get(id).is_some_and(|r| r.conn.is_some()) { self.send(id, msg) } else { false }
    }

    /// Distinct catalogs held and their bytes (each counted once, however many agents
    /// share it).
    pub fn catalog_stats(&self) -> InternerStats {
        self.catalogs.stats()
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
