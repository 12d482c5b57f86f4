//! Which ended actions (with their hits, lines and figures) the broker keeps.
//!
//! Ended actions are kept for `store.hit_retention_days` after they end, and at most
//! `store.max_ended_actions_per_org` per organization. When an organization is over its
//! bound, the key holding the most ended actions of that organization gives up its
//! oldest one: a key that places and removes actions fast only ever evicts its own
//! results, never another key's (until they hold as many), and never another
//! organization's. Nothing here scans: ended actions are ordered by end time overall
//! (for age) and per key (for eviction), and keys per organization by how many they
//! hold.
//!
//! The single-node action store calls [`Retention`] under its lock and deletes what it returns from
//! memory and from the store in the same step, so both always hold the same actions.

use std::collections::{BTreeSet, HashMap};

use periscope_protocol::ActionId;

/// Ended actions of one organization.
#[derive(Debug, Default)]
struct OrgEnded {
    /// How many it holds in all.
    total: usize,
    /// Per placing key: its ended actions, oldest first.
    keys: HashMap<String, BTreeSet<(u64, ActionId)>>,
    /// Keys by how many ended actions they hold (the last holds the most).
    by_size: BTreeSet<(usize, String)>,
}

impl OrgEnded {
    fn resize(&mut self, key: &str, before: usize, after: usize) {
        if before > 0 {
            self.by_size.remove(&(before, key.to_owned()));
        }
        if after > 0 {
            self.by_size.insert((after, key.to_owned()));
        }
    }

    fn insert(&mut self, key: &str, ended_at_ms: u64, id: ActionId) {
        let set = self.keys.entry(key.to_owned()).or_default();
        if set.insert((ended_at_ms, id)) {
            let n = set.len();
            self.total += 1;
            self.resize(key, n - 1, n);
        }
    }

    fn remove(&mut self, key: &str, ended_at_ms: u64, id: &ActionId) {
        let Some(set) = self.keys.get_mut(key) else { return };
        if set.remove(&(ended_at_ms, id.clone())) {
            let n = set.len();
            if n == 0 {
                self.keys.remove(key);
            }
            self.total -= 1;
            self.resize(key, n + 1, n);
        }
    }

    /// The oldest ended action of the key holding the most.
    fn eviction_candidate(&self) -> Option<(String, u64, ActionId)> {
        let (_, key) = self.by_size.last()?;
        let (ended, id) = self.keys.get(key)?.first()?;
        Some((key.clone(), *ended, id.clone()))
    }
}

/// Where an ended action is filed.
#[derive(Debug, Clone)]
struct Filed {
    org: String,
    key: String,
}

/// The retention policy's bookkeeping: see the module docs.
#[derive(Debug)]
pub struct Retention {
    per_org: usize,
    by_age: BTreeSet<(u64, ActionId)>,
    filed: HashMap<ActionId, Filed>,
    orgs: HashMap<String, OrgEnded>,
}

impl Retention {
    /// Keeps at most `per_org` ended actions per organization (at least one).
    pub fn new(per_org: usize) -> Retention {
        Retention { per_org: per_org.max(1), by_age: BTreeSet::new(), filed: HashMap::new(), orgs: HashMap::new() }
    }

    /// Files an action that ended at `ended_at_ms`, placed by `key` in `org`; returns
    /// the ended actions to forget to keep `org` within its bound (possibly none, never
    /// one of another organization).
    pub fn keep(&mut self, org: &str, key: &str, ended_at_ms: u64, id: ActionId) -> Vec<ActionId> {
        if self.filed.contains_key(&id) {
            return Vec::new();
        }
        self.by_age.insert((ended_at_ms, id.clone()));
        self.filed.insert(id.clone(), Filed { org: org.to_owned(), key: key.to_owned() });
        let book = self.orgs.entry(org.to_owned()).or_default();
        book.insert(key, ended_at_ms, id);
        let mut evicted = Vec::new();
        while book.total > self.per_org {
            let Some((key, ended, id)) = book.eviction_candidate() else { break };
            book.remove(&key, ended, &id);
            self.by_age.remove(&(ended, id.clone()));
            self.filed.remove(&id);
            evicted.push(id);
        }
        evicted
    }

    /// Forgets every action that ended before `cutoff_ms`; returns them.
    pub fn expire_before(&mut self, cutoff_ms: u64) -> Vec<ActionId> {
        let mut out = Vec::new();
        while let Some((ended, _)) = self.by_age.first() {
            if *ended >= cutoff_ms {
                break;
            }
            let Some((ended, id)) = self.by_age.pop_first() else { break };
            if let Some(f) = self.filed.remove(&id)
                && let Some(book) = self.orgs.get_mut(&f.org)
            {
                book.remove(&f.key, ended, &id);
                if book.total == 0 {
                    self.orgs.remove(&f.org);
                }
            }
            out.push(id);
        }
        out
    }

    /// Ended actions kept for an organization.
    pub fn count_in(&self, org: &str) -> usize {
        self.orgs.get(org).map_or(0, |b| b.total)
    }

    /// Ended actions kept in all.
    pub fn len(&self) -> usize {
        self.filed.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.filed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<ActionId> {
        (0..n).map(|_| ActionId::generate()).collect()
    }

    #[test]
    fn a_churning_key_evicts_its_own_oldest_results_never_another_keys_or_organizations() {
        let mut r = Retention::new(10);
        let alice = ids(4);
        for (i, id) in alice.iter().enumerate() {
            assert!(r.keep("acme", "key_alice", i as u64, id.clone()).is_empty());
        }
        let bob = ids(4);
        for (i, id) in bob.iter().enumerate() {
            assert!(r.keep("other", "key_bob", i as u64, id.clone()).is_empty());
        }
        // Mallory places and removes a thousand actions in acme.
        let mut evicted = Vec::new();
        for (i, id) in ids(1_000).into_iter().enumerate() {
            evicted.extend(r.keep("acme", "key_mallory", 100 + i as u64, id));
        }
        assert_eq!(evicted.len(), 994, "acme is held to 10");
        assert!(alice.iter().all(|a| !evicted.contains(a)), "alice holds fewer than mallory: hers stay");
        assert_eq!(r.count_in("acme"), 10);
        assert_eq!(r.count_in("other"), 4, "another organization never pays");
        // When alice holds the most, she gives up her own oldest.
        let mut r = Retention::new(3);
        r.keep("acme", "key_mallory", 1, ActionId::generate());
        let first = ActionId::generate();
        r.keep("acme", "key_alice", 2, first.clone());
        r.keep("acme", "key_alice", 3, ActionId::generate());
        assert_eq!(r.keep("acme", "key_alice", 4, ActionId::generate()), vec![first]);
    }

    #[test]
    fn age_expiry_takes_the_oldest_first_whatever_their_organization() {
        let mut r = Retention::new(100);
        let old = ActionId::generate();
        let newer = ActionId::generate();
        r.keep("a", "k1", 10, old.clone());
        r.keep("b", "k2", 20, newer.clone());
        assert_eq!(r.expire_before(15), vec![old]);
        assert_eq!((r.count_in("a"), r.count_in("b"), r.len()), (0, 1, 1));
        assert!(r.expire_before(20).is_empty());
        assert_eq!(r.expire_before(21), vec![newer]);
        assert!(r.is_empty());
    }
}
