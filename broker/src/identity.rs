//! Agent identities: an agent id belongs to the agent key (and the pool) that first
//! registered it.
//!
//! Live actions are aimed at agent ids, hits are accepted from them, catalogs are kept
//! under them; so whoever could register an id could read what is aimed at it and
//! write into what it collects. A binding is made on an id's first registration and
//! held for `agents.identity_retention_secs` after the id was last connected (longer
//! than any action can live, and across broker restarts: bindings are stored). While
//! it is held, a registration of that id with another agent key, into another pool or
//! from another organization is refused (and audited by the gateway).
//!
//! Memory is bounded: at most `agents.max_identities_per_org` bindings per
//! organization. Over it, the agent key holding the most bindings in the organization
//! gives up its binding offline the longest, so one key minting fresh ids forgets its
//! own, never another key's (and an online agent's binding is never forgotten). Nothing
//! scans: offline bindings are ordered by when they were last seen, overall (age) and
//! per key (eviction).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use periscope_protocol::AgentId;

use crate::store::{IdentityRow, StoreHandle};
use crate::time::now_ms;

/// Who an agent id belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The organization of the agent key.
    pub org: String,
    /// The agent key that registered the id first.
    pub key_id: String,
    /// The pool it registered into.
    pub pool: String,
    /// When the binding was made (Unix ms).
    pub bound_at_ms: u64,
    /// When a session of the id last ended, or began (Unix ms).
    pub last_seen_ms: u64,
    /// Sessions holding the id now (a reconnect may overlap the old session briefly).
    sessions: u32,
}

/// Why a registration may not use an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Another organization's agent key registered it; names that organization (for its
    /// own audit trail, never for the caller).
    OtherOrg(String),
    /// Another agent key of the same organization registered it.
    OtherKey,
    /// The same key registered it into another pool; names that pool.
    OtherPool(String),
}

impl Mismatch {
    /// A stable short name, for audit data and aggregation.
    pub fn reason(&self) -> &'static str {
        match self {
            Mismatch::OtherOrg(_) => "other_organization",
            Mismatch::OtherKey => "other_agent_key",
            Mismatch::OtherPool(_) => "other_pool",
        }
    }
}

/// Whether a registration by a key of (organization, key id, pool) `wants` may use an
/// id bound to `bound`: the one rule, applied by the bindings and by the registry's
/// own list.
pub fn check_binding(bound: (&str, &str, &str), wants: (&str, &str, &str)) -> Result<(), Mismatch> {
    let ((org, key, pool), (w_org, w_key, w_pool)) = (bound, wants);
    if org != w_org {
        Err(Mismatch::OtherOrg(org.to_owned()))
    } else if key != w_key {
        Err(Mismatch::OtherKey)
    } else if pool != w_pool {
        Err(Mismatch::OtherPool(pool.to_owned()))
    } else {
        Ok(())
    }
}

impl Binding {
    /// Whether a registration by `key_id` of `org` into `pool` may use this id.
    pub fn admits(&self, org: &str, key_id: &str, pool: &str) -> Result<(), Mismatch> {
        check_binding((&self.org, &self.key_id, &self.pool), (org, key_id, pool))
    }
}

#[derive(Debug, Default)]
struct KeyIds {
    total: usize,
    /// Offline bindings of the key, longest offline first.
    offline: BTreeSet<(u64, AgentId)>,
}

#[derive(Debug, Default)]
struct OrgIds {
    total: usize,
    keys: HashMap<String, KeyIds>,
}

#[derive(Debug, Default)]
struct Inner {
    bindings: HashMap<AgentId, Binding>,
    /// Offline bindings, longest offline first (age expiry).
    offline: BTreeSet<(u64, AgentId)>,
    orgs: HashMap<String, OrgIds>,
}

impl Inner {
    fn file_offline(&mut self, id: &AgentId, b: &Binding) {
        self.offline.insert((b.last_seen_ms, id.clone()));
        if let Some(k) = self.orgs.get_mut(&b.org).and_then(|o| o.keys.get_mut(&b.key_id)) {
            k.offline.insert((b.last_seen_ms, id.clone()));
        }
    }

    fn unfile_offline(&mut self, id: &AgentId, b: &Binding) {
        self.offline.remove(&(b.last_seen_ms, id.clone()));
        if let Some(k) = self.orgs.get_mut(&b.org).and_then(|o| o.keys.get_mut(&b.key_id)) {
            k.offline.remove(&(b.last_seen_ms, id.clone()));
        }
    }

    fn insert(&mut self, id: AgentId, b: Binding) {
        let org = self.orgs.entry(b.org.clone()).or_default();
        org.total += 1;
        org.keys.entry(b.key_id.clone()).or_default().total += 1;
        if b.sessions == 0 {
            self.file_offline(&id, &b);
        }
        self.bindings.insert(id, b);
    }

    fn remove(&mut self, id: &AgentId) -> Option<Binding> {
        let b = self.bindings.remove(id)?;
        if b.sessions == 0 {
            self.unfile_offline(id, &b);
        }
        if let Some(org) = self.orgs.get_mut(&b.org) {
            org.total -= 1;
            if let Some(k) = org.keys.get_mut(&b.key_id) {
                k.total -= 1;
                if k.total == 0 {
                    org.keys.remove(&b.key_id);
                }
            }
            if org.total == 0 {
                self.orgs.remove(&b.org);
            }
        }
        Some(b)
    }

    /// The offline binding to forget when `org` is full: the one offline the longest of
    /// the key holding the most bindings (among keys that have one offline).
    fn eviction_candidate(&self, org: &str) -> Option<AgentId> {
        let o = self.orgs.get(org)?;
        let (_, k) = o.keys.iter().filter(|(_, k)| !k.offline.is_empty()).max_by(|a, b| {
            a.1.total.cmp(&b.1.total).then_with(|| b.0.cmp(a.0)) // ties: the smaller key id
        })?;
        k.offline.first().map(|(_, id)| id.clone())
    }
}

/// The identity bindings; see the module docs.
#[derive(Debug)]
pub struct Identities {
    inner: Mutex<Inner>,
    retention_ms: u64,
    max_per_org: usize,
    store: OnceLock<StoreHandle>,
}

/// A session's hold on its id: taken by [`Identities::claim`], released (the binding
/// goes offline, or is withdrawn if this claim made it and the registration failed)
/// when dropped.
#[derive(Debug)]
pub struct Claim {
    identities: Arc<Identities>,
    id: AgentId,
    new: bool,
    registered: bool,
}

impl Claim {
    /// The registration went through: from now on the binding outlives this session,
    /// and is stored.
    pub fn registered(&mut self) {
        self.registered = true;
        self.identities.persist_current(&self.id);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.identities.release(&self.id, self.new && !self.registered);
    }
}

impl Identities {
    /// Bindings held `retention_ms` after an id was last connected, at most `max_per_org`
    /// per organization.
    pub fn new(retention_ms: u64, max_per_org: usize) -> Identities {
        Identities { inner: Mutex::default(), retention_ms, max_per_org: max_per_org.max(1), store: OnceLock::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only short, panic-free sections run under it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the bindings durable: puts back what the store holds (dropping what is
    /// past its retention) and writes every change from now on.
    pub fn restore(&self, rows: Vec<IdentityRow>, store: StoreHandle) {
        let now = now_ms();
        let mut inner = self.lock();
        for row in rows {
            let Ok(id) = AgentId::parse(&row.agent_id) else { continue };
            if now.saturating_sub(row.last_seen_ms) >= self.retention_ms {
                store.delete_identity(&row.agent_id);
                continue;
            }
            let b = Binding {
                org: row.org,
                key_id: row.key_id,
                pool: row.pool,
                bound_at_ms: row.bound_at_ms,
                last_seen_ms: row.last_seen_ms,
                sessions: 0,
            };
            inner.insert(id, b);
        }
        tracing::info!(bindings = inner.bindings.len(), "restored agent identities");
        drop(inner);
        let _ = self.store.set(store);
    }

    fn persist(&self, id: &AgentId, b: &Binding) {
        if let Some(store) = self.store.get() {
            store.put_identity(IdentityRow {
                agent_id: id.to_string(),
                org: b.org.clone(),
                key_id: b.key_id.clone(),
                pool: b.pool.clone(),
                bound_at_ms: b.bound_at_ms,
                last_seen_ms: b.last_seen_ms,
            });
        }
    }

    fn forget(&self, id: &AgentId) {
        if let Some(store) = self.store.get() {
            store.delete_identity(id.as_str());
        }
    }

    /// Claims `id` for a session of agent key `key_id` of `org` registering into
    /// `pool`: binds it on first use, refuses it when it is bound to another
    /// organization, key or pool.
    pub fn claim(self: &Arc<Self>, id: &AgentId, org: &str, key_id: &str, pool: &str) -> Result<Claim, Mismatch> {
        let now = now_ms();
        let mut inner = self.lock();
        let new = match inner.bindings.get(id) {
            Some(b) => {
                b.admits(org, key_id, pool)?;
                let b = b.clone();
                if b.sessions == 0 {
                    inner.unfile_offline(id, &b);
                }
                if let Some(b) = inner.bindings.get_mut(id) {
                    b.sessions += 1;
                    b.last_seen_ms = now;
                }
                false
            }
            None => {
                let mut evicted = Vec::new();
                while inner.orgs.get(org).is_some_and(|o| o.total >= self.max_per_org) {
                    let Some(old) = inner.eviction_candidate(org) else { break };
                    inner.remove(&old);
                    evicted.push(old);
                }
                let b = Binding {
                    org: org.to_owned(),
                    key_id: key_id.to_owned(),
                    pool: pool.to_owned(),
                    bound_at_ms: now,
                    last_seen_ms: now,
                    sessions: 1,
                };
                inner.insert(id.clone(), b);
                drop(inner);
                for old in &evicted {
                    self.forget(old);
                }
                if !evicted.is_empty() {
                    tracing::info!(org, forgotten = evicted.len(), "identity bindings over the organization's bound");
                }
                return Ok(Claim { identities: Arc::clone(self), id: id.clone(), new: true, registered: false });
            }
        };
        drop(inner);
        Ok(Claim { identities: Arc::clone(self), id: id.clone(), new, registered: false })
    }

    /// A session ended: the binding goes offline (kept for the retention), or, for a
    /// registration that never went through, is withdrawn if it made the binding.
    fn release(&self, id: &AgentId, withdraw: bool) {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(b) = inner.bindings.get_mut(id) else { return };
        b.sessions = b.sessions.saturating_sub(1);
        if b.sessions > 0 {
            return;
        }
        if withdraw {
            inner.remove(id);
            drop(inner);
            self.forget(id);
            return;
        }
        b.last_seen_ms = now;
        let b = b.clone();
        inner.file_offline(id, &b);
        drop(inner);
        self.persist(id, &b);
    }

    /// The binding of an id, if it is held.
    pub fn get(&self, id: &AgentId) -> Option<Binding> {
        self.lock().bindings.get(id).cloned()
    }

    /// Forgets bindings offline for longer than the retention; returns how many.
    pub fn expire(&self) -> usize {
        let cutoff = now_ms().saturating_sub(self.retention_ms);
        let mut inner = self.lock();
        let mut gone = Vec::new();
        while let Some((seen, id)) = inner.offline.first().cloned() {
            if seen >= cutoff {
                break;
            }
            inner.remove(&id);
            gone.push(id);
        }
        drop(inner);
        for id in &gone {
            self.forget(id);
        }
        gone.len()
    }

    /// Bindings held for an organization.
    pub fn count_in(&self, org: &str) -> usize {
        self.lock().orgs.get(org).map_or(0, |o| o.total)
    }

    /// Writes a binding to the store (once its registration went through, so refused
    /// attempts write nothing).
    fn persist_current(&self, id: &AgentId) {
        let b = self.lock().bindings.get(id).cloned();
        if let Some(b) = b {
            self.persist(id, &b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Arc<Identities> {
        Arc::new(Identities::new(3_600_000, 3))
    }

    #[test]
    fn an_id_stays_with_the_key_and_pool_that_registered_it_first() {
        let ids = ids();
        let a = AgentId::generate();
        let mut first = ids.claim(&a, "acme", "key_1", "shop").unwrap();
        first.registered();
        drop(first);
        assert_eq!(ids.claim(&a, "acme", "key_2", "shop").unwrap_err(), Mismatch::OtherKey);
        assert_eq!(ids.claim(&a, "acme", "key_1", "admin").unwrap_err(), Mismatch::OtherPool("shop".into()));
        assert_eq!(ids.claim(&a, "evil", "key_9", "shop").unwrap_err(), Mismatch::OtherOrg("acme".into()));
        assert!(ids.claim(&a, "acme", "key_1", "shop").is_ok(), "the owner comes back");
    }

    #[test]
    fn a_refused_registration_leaves_no_binding_behind() {
        let ids = ids();
        let a = AgentId::generate();
        drop(ids.claim(&a, "acme", "key_1", "shop").unwrap());
        assert!(ids.get(&a).is_none());
        assert!(ids.claim(&a, "acme", "key_2", "shop").is_ok());
    }

    #[test]
    fn a_key_minting_fresh_ids_forgets_its_own_bindings_never_another_keys_or_an_online_one() {
        let ids = ids();
        let victim = AgentId::generate();
        let mut v = ids.claim(&victim, "acme", "key_victim", "shop").unwrap();
        v.registered();
        drop(v);
        let online = AgentId::generate();
        let mut live = ids.claim(&online, "acme", "key_mallory", "shop").unwrap();
        live.registered();
        for _ in 0..50 {
            let mut c = ids.claim(&AgentId::generate(), "acme", "key_mallory", "shop").unwrap();
            c.registered();
        }
        assert_eq!(ids.count_in("acme"), 3);
        assert!(ids.get(&victim).is_some(), "the victim's binding outlived mallory's churn");
        assert!(ids.get(&online).is_some(), "an online binding is never forgotten");
        assert_eq!(ids.claim(&victim, "acme", "key_mallory", "shop").unwrap_err(), Mismatch::OtherKey);
    }
}
