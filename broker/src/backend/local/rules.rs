//! Redaction rules changed at run time, in the database's `settings` table.

use futures_util::FutureExt as _;

use crate::backend::{BackendFuture, RuleStore};
use crate::store::StoreHandle;

/// The single-node [`RuleStore`]: written behind through the store's writer; read once,
/// at start, from what the database held.
#[derive(Debug)]
pub struct SqliteRules {
    store: Option<StoreHandle>,
    loaded: std::sync::Mutex<Vec<(String, String)>>,
    /// `None`: the redaction rules (keys `redaction`, `redaction:<org>`); else the
    /// namespace of other per-organization settings (keys `<namespace>:<org>`).
    namespace: Option<&'static str>,
}

impl SqliteRules {
    /// Rules written through `store`; `loaded` is the `settings` table as read at start.
    pub fn new(store: Option<StoreHandle>, loaded: Vec<(String, String)>) -> SqliteRules {
        SqliteRules { store, loaded: std::sync::Mutex::new(loaded), namespace: None }
    }

    /// Other per-organization settings (`namespace`, e.g. `safety`) kept the same way.
    pub fn namespaced(
        namespace: &'static str,
        store: Option<StoreHandle>,
        loaded: Vec<(String, String)>,
    ) -> SqliteRules {
        SqliteRules { store, loaded: std::sync::Mutex::new(loaded), namespace: Some(namespace) }
    }

    fn key(&self, org: &str) -> String {
        match self.namespace {
            None => crate::rules::setting_key(org),
            Some(ns) => format!("{ns}:{org}"),
        }
    }

    fn org_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        match self.namespace {
            None => crate::rules::org_of_setting(key),
            Some(ns) => key.strip_prefix(ns).and_then(|rest| rest.strip_prefix(':')),
        }
    }
}

impl RuleStore for SqliteRules {
    fn save<'a>(&'a self, org: &'a str, json: String) -> BackendFuture<'a, ()> {
        let key = self.key(org);
        if let Some(store) = &self.store {
            store.put_setting(&key, json.clone());
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.retain(|(k, _)| *k != key);
        loaded.push((key, json));
        std::future::ready(Ok(())).boxed()
    }

    fn load_all(&self) -> BackendFuture<'_, Vec<(String, String)>> {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let out = loaded.iter().filter_map(|(k, v)| self.org_of(k).map(|org| (org.to_owned(), v.clone()))).collect();
        std::future::ready(Ok(out)).boxed()
    }
}
