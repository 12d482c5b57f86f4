//! Live actions ordered by expiry, overall, per placing key and per organization, kept
//! in step with the single-node action store's map under its lock.
//!
//! What it answers without a scan: which actions are due to expire (the housekeeping
//! tick), how many live actions a key and an organization hold (the live-action quota
//! and its organization ceiling, checked together under the book lock), and when the
//! soonest of them frees a slot (the `retry_after_seconds` of a refusal).

use std::collections::{BTreeSet, HashMap};

use periscope_protocol::ActionId;

type ByExpiry = BTreeSet<(u64, ActionId)>;

/// The live actions' index; see the module docs.
#[derive(Debug, Default)]
pub struct LiveIndex {
    by_expiry: ByExpiry,
    by_key: HashMap<String, ByExpiry>,
    by_org: HashMap<String, ByExpiry>,
}

fn add(map: &mut HashMap<String, ByExpiry>, name: &str, entry: (u64, ActionId)) {
    map.entry(name.to_owned()).or_default().insert(entry);
}

fn take(map: &mut HashMap<String, ByExpiry>, name: &str, entry: &(u64, ActionId)) {
    if let Some(set) = map.get_mut(name) {
        set.remove(entry);
        if set.is_empty() {
            map.remove(name);
        }
    }
}

impl LiveIndex {
    /// Notes a live action of `org`, placed by `key`, expiring at `expires_at_ms`.
    pub fn insert(&mut self, org: &str, key: &str, expires_at_ms: u64, id: ActionId) {
        let entry = (expires_at_ms, id);
        add(&mut self.by_key, key, entry.clone());
        add(&mut self.by_org, org, entry.clone());
        self.by_expiry.insert(entry);
    }

    /// Forgets a live action (it ended).
    pub fn remove(&mut self, org: &str, key: &str, expires_at_ms: u64, id: &ActionId) {
        let entry = (expires_at_ms, id.clone());
        take(&mut self.by_key, key, &entry);
        take(&mut self.by_org, org, &entry);
        self.by_expiry.remove(&entry);
    }

    /// Live actions whose expiry is at or before `now_ms`, soonest first.
    pub fn due(&self, now_ms: u64) -> Vec<ActionId> {
        self.by_expiry.iter().take_while(|(t, _)| *t <= now_ms).map(|(_, id)| id.clone()).collect()
    }

    /// Live actions placed by `key`.
    pub fn count_key(&self, key: &str) -> usize {
        self.by_key.get(key).map_or(0, BTreeSet::len)
    }

    /// Live actions of `org`.
    pub fn count_org(&self, org: &str) -> usize {
        self.by_org.get(org).map_or(0, BTreeSet::len)
    }

    /// The live actions of `org`, soonest expiry first.
    pub fn ids_in_org(&self, org: &str) -> impl Iterator<Item = &ActionId> {
        self.by_org.get(org).into_iter().flatten().map(|(_, id)| id)
    }

    /// When the soonest live action of `key` expires.
    pub fn soonest_key(&self, key: &str) -> Option<u64> {
        self.by_key.get(key).and_then(|s| s.first()).map(|(t, _)| *t)
    }

    /// When the soonest live action of `org` expires.
    pub fn soonest_org(&self, org: &str) -> Option<u64> {
        self.by_org.get(org).and_then(|s| s.first()).map(|(t, _)| *t)
    }

    /// Live actions in all.
    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }

    /// Whether no action is live.
    pub fn is_empty(&self) -> bool {
        self.by_expiry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_the_soonest_expiry_follow_insertions_and_removals() {
        let mut live = LiveIndex::default();
        let (a, b, c) = (ActionId::generate(), ActionId::generate(), ActionId::generate());
        live.insert("acme", "k1", 30, a.clone());
        live.insert("acme", "k2", 10, b.clone());
        live.insert("other", "k3", 20, c.clone());
        assert_eq!((live.count_key("k1"), live.count_org("acme"), live.len()), (1, 2, 3));
        assert_eq!(live.soonest_org("acme"), Some(10));
        assert_eq!(live.due(20), vec![b.clone(), c.clone()]);
        live.remove("acme", "k2", 10, &b);
        assert_eq!(live.soonest_org("acme"), Some(30));
        assert_eq!(live.count_key("k2"), 0);
        live.remove("acme", "k1", 30, &a);
        live.remove("other", "k3", 20, &c);
        assert!(live.is_empty() && live.by_key.is_empty() && live.by_org.is_empty());
    }
}
