//! [`MemoryErrors`]: the single node's [`ErrorStore`], in memory under one short mutex.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::FutureExt as _;

use crate::backend::BackendFuture;
use crate::backend::errors::{ErrorGroup, ErrorStore, MAX_ERROR_GROUPS_PER_ORG};

/// Error groups per organization, by key.
#[derive(Debug, Default)]
pub struct MemoryErrors {
    orgs: Mutex<HashMap<String, HashMap<String, ErrorGroup>>>,
}

impl ErrorStore for MemoryErrors {
    fn record<'a>(&'a self, org: &'a str, updates: Vec<ErrorGroup>) -> BackendFuture<'a, ()> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let groups = orgs.entry(org.to_owned()).or_default();
        for update in updates {
            let key = update.key();
            match groups.get_mut(&key) {
                Some(g) => g.absorb(update),
                None => {
                    if groups.len() >= MAX_ERROR_GROUPS_PER_ORG
                        && let Some(oldest) = groups.iter().min_by_key(|(_, g)| g.last_seen_ms).map(|(k, _)| k.clone())
                    {
                        groups.remove(&oldest);
                    }
                    groups.insert(key, update);
                }
            }
        }
        drop(orgs);
        async { Ok(()) }.boxed()
    }

    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ErrorGroup>> {
        let orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ErrorGroup> = orgs.get(org).map(|g| g.values().cloned().collect()).unwrap_or_default();
        drop(orgs);
        out.sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then_with(|| a.key().cmp(&b.key())));
        async { Ok(out) }.boxed()
    }
}
