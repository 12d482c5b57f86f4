//! Operator safety settings per organization: the blocklist (where no action may run,
//! or no value be captured) and the pause switch (every action of a pool, or of the
//! whole organization, stopped at once and kept).
//!
//! Like the redaction rules (`rules.rs`), the settings are held in memory per
//! organization, swapped whole, persisted through a [`crate::backend::RuleStore`] (the
//! `safety` namespace: SQLite settings on a single node, a Redis hash on a cluster, with
//! an announcement every node applies), and pushed to agents: the blocklist as a
//! `blocklist` frame, a pause as an `action_sync` without the paused actions. The
//! configuration file's `[[blocklist]]` rules apply to every organization, before its
//! own.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use periscope_protocol::BrokerMessage;
use periscope_protocol::blocklist::{BlockRule, MAX_RULES};
use serde::{Deserialize, Serialize};

/// The `RuleStore` namespace safety settings are kept under.
pub const NAMESPACE: &str = "safety";

/// One pause: of a pool, or (no pool) of the whole organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The pool paused; absent: every pool of the organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Who paused it (the key or person's name).
    pub by: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// Why, as they said it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Pause {
    /// A sentence for statuses and refusals.
    pub fn describe(&self) -> String {
        let what = self.pool.as_ref().map_or_else(|| "the organization".to_owned(), |p| format!("pool `{p}`"));
        let why = if self.reason.is_empty() { String::new() } else { format!(": {}", self.reason) };
        format!("paused by an operator ({} paused {what}{why})", self.by)
    }
}

/// An organization's safety settings as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetySettings {
    /// Bumped on every change; agents ignore an older blocklist.
    #[serde(default)]
    pub version: u64,
    /// The organization's own rules (the file's apply too).
    #[serde(default)]
    pub blocklist: Vec<BlockRule>,
    /// Pools (or the organization) paused now.
    #[serde(default)]
    pub pauses: Vec<Pause>,
}

impl SafetySettings {
    /// The pause covering `pool`, if any (the organization's first).
    pub fn pause_of(&self, pool: &str) -> Option<&Pause> {
        self.pauses
            .iter()
            .find(|p| p.pool.is_none())
            .or_else(|| self.pauses.iter().find(|p| p.pool.as_deref() == Some(pool)))
    }
}

/// Checks a blocklist: each rule valid, names unique, bounded.
pub fn validate_rules(rules: &[BlockRule]) -> Result<(), String> {
    if rules.len() > MAX_RULES {
        return Err(format!("at most {MAX_RULES} blocklist rules, got {}", rules.len()));
    }
    for (i, r) in rules.iter().enumerate() {
        r.validate()?;
        if rules[..i].iter().any(|o| o.name == r.name) {
            return Err(format!("two blocklist rules are named `{}`; names must be unique", r.name));
        }
    }
    Ok(())
}

/// Every organization's settings in memory.
#[derive(Debug, Default)]
pub struct Safety {
    /// The configuration file's rules, for every organization.
    base: Vec<BlockRule>,
    orgs: RwLock<HashMap<String, Arc<SafetySettings>>>,
}

impl Safety {
    /// Settings over the file's `base` rules.
    pub fn new(base: Vec<BlockRule>) -> Safety {
        Safety { base, orgs: RwLock::default() }
    }

    /// An organization's settings now.
    pub fn settings(&self, org: &str) -> Arc<SafetySettings> {
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        orgs.get(org).cloned().unwrap_or_default()
    }

    /// The configuration file's rules.
    pub fn base_rules(&self) -> &[BlockRule] {
        &self.base
    }

    /// Every rule in force for an organization: the file's, then its own.
    pub fn rules(&self, org: &str) -> Vec<BlockRule> {
        let mut all = self.base.clone();
        all.extend(self.settings(org).blocklist.iter().cloned());
        all
    }

    /// The pause covering an organization's pool, if any.
    pub fn paused(&self, org: &str, pool: &str) -> Option<Pause> {
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        orgs.get(org).and_then(|s| s.pause_of(pool).cloned())
    }

    /// Whether anything of the organization is paused (a cheap check on hot paths).
    pub fn any_paused(&self, org: &str) -> bool {
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        orgs.get(org).is_some_and(|s| !s.pauses.is_empty())
    }

    /// Puts in settings read from the store (at start, or announced by another node);
    /// returns whether they differ from what was held.
    pub fn restore(&self, org: &str, settings: SafetySettings) -> bool {
        let mut orgs = self.orgs.write().unwrap_or_else(|p| p.into_inner());
        let same = orgs.get(org).is_some_and(|s| **s == settings);
        if !same {
            orgs.insert(org.to_owned(), Arc::new(settings));
        }
        !same
    }

    /// Changes an organization's settings with `f` (the version bumped); returns the
    /// new settings, or `f`'s error with nothing changed.
    pub fn change<E>(
        &self,
        org: &str,
        f: impl FnOnce(&mut SafetySettings) -> Result<(), E>,
    ) -> Result<Arc<SafetySettings>, E> {
        let mut orgs = self.orgs.write().unwrap_or_else(|p| p.into_inner());
        let mut next = orgs.get(org).map(|s| (**s).clone()).unwrap_or_default();
        f(&mut next)?;
        next.version += 1;
        let next = Arc::new(next);
        orgs.insert(org.to_owned(), Arc::clone(&next));
        Ok(next)
    }

    /// The frame telling an agent of `org` in `pool` which rules hold for it (the ones
    /// naming another pool left out).
    pub fn message(&self, org: &str, pool: &str) -> BrokerMessage {
        let settings = self.settings(org);
        let rules = self
            .base
            .iter()
            .chain(settings.blocklist.iter())
            .filter(|r| r.pool.as_deref().is_none_or(|p| p == pool))
            .cloned()
            .collect();
        BrokerMessage::Blocklist { version: settings.version, rules }
    }
}

#[cfg(test)]
mod tests {
    use periscope_protocol::BlockEffect;

    use super::*;

    fn rule(name: &str, pool: Option<&str>) -> BlockRule {
        BlockRule {
            name: name.into(),
            effect: BlockEffect::NoActions,
            pool: pool.map(Into::into),
            file: Some("crypto.rs".into()),
            module: None,
            function: None,
            reason: String::new(),
        }
    }

    #[test]
    fn an_organization_pause_covers_every_pool_and_a_pool_pause_only_its_own() {
        let safety = Safety::default();
        let pause = |pool: Option<&str>| Pause {
            pool: pool.map(Into::into),
            by: "ops".into(),
            at_ms: 1,
            reason: String::new(),
        };
        safety
            .change::<()>("acme", |s| {
                s.pauses.push(pause(Some("shop")));
                Ok(())
            })
            .unwrap();
        assert!(safety.paused("acme", "shop").is_some());
        assert!(safety.paused("acme", "billing").is_none());
        assert!(safety.paused("other", "shop").is_none());
        let s = safety
            .change::<()>("acme", |s| {
                s.pauses.push(pause(None));
                Ok(())
            })
            .unwrap();
        assert_eq!(s.version, 2);
        assert!(safety.paused("acme", "billing").unwrap().describe().contains("the organization"));
    }

    #[test]
    fn agents_get_the_files_rules_and_their_organizations_for_their_pool() {
        let safety = Safety::new(vec![rule("base", None)]);
        safety
            .change::<()>("acme", |s| {
                s.blocklist = vec![rule("shop-only", Some("shop")), rule("all", None)];
                Ok(())
            })
            .unwrap();
        let BrokerMessage::Blocklist { version, rules } = safety.message("acme", "billing") else { panic!() };
        assert_eq!(version, 1);
        assert_eq!(rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["base", "all"]);
        assert!(validate_rules(&[rule("a", None), rule("a", None)]).unwrap_err().contains("unique"));
    }
}
