//! The redaction rules in force, per organization: built once, swapped whole when an
//! organization's company admin changes them, pushed to that organization's agents with
//! a version number, and persisted so a restart keeps them.
//!
//! Every organization starts from the configuration file's `[redaction]` rules; an
//! organization that changes its rules gets its own compiled set. Agents receive, and
//! the broker redacts with, the rules of the agent's organization, so one tenant's
//! change never weakens (or reveals) another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use periscope_protocol::BrokerMessage;
use periscope_redaction::{ConfigError, RedactionConfig, Redactor};

/// Key of the default organization's redaction rules in the store's settings (other
/// organizations use `redaction:<org>`).
pub const SETTING_KEY: &str = "redaction";

/// The settings key an organization's rules are stored under.
pub fn setting_key(org: &str) -> String {
    if org == crate::keys::DEFAULT_ORG { SETTING_KEY.to_owned() } else { format!("{SETTING_KEY}:{org}") }
}

/// The organization a settings key belongs to, if it holds redaction rules.
pub fn org_of_setting(key: &str) -> Option<&str> {
    if key == SETTING_KEY { Some(crate::keys::DEFAULT_ORG) } else { key.strip_prefix("redaction:") }
}

type Compiled = (Arc<Redactor>, RedactionConfig);

/// The compiled rules of every organization.
#[derive(Debug)]
pub struct Rules {
    base: Compiled,
    orgs: RwLock<HashMap<String, Compiled>>,
    /// Serializes replacements (versions stay consecutive) without blocking readers.
    writer: Mutex<()>,
}

impl Default for Rules {
    /// The built-in rules, version 0, for everyone.
    fn default() -> Self {
        Rules {
            base: (Arc::new(Redactor::default_rules()), RedactionConfig::default()),
            orgs: RwLock::default(),
            writer: Mutex::new(()),
        }
    }
}

impl Rules {
    /// Compiles `config`, the rules of every organization that has not changed its own.
    pub fn new(config: RedactionConfig) -> Result<Rules, ConfigError> {
        let redactor = Redactor::new(&config)?;
        Ok(Rules { base: (Arc::new(redactor), config), orgs: RwLock::default(), writer: Mutex::new(()) })
    }

    fn get(&self, org: &str) -> Compiled {
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        orgs.get(org).cloned().unwrap_or_else(|| self.base.clone())
    }

    /// The compiled rules of an organization, to redact with.
    pub fn redactor(&self, org: &str) -> Arc<Redactor> {
        // Only the pointer is copied: this runs for every hit and log frame.
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(orgs.get(org).map_or(&self.base.0, |c| &c.0))
    }

    /// The configuration in force for an organization.
    pub fn config(&self, org: &str) -> RedactionConfig {
        self.get(org).1
    }

    /// Puts back rules an organization stored earlier, unless the file's rules are
    /// newer (their version is higher). Rules that no longer compile are ignored with a
    /// warning.
    pub fn restore(&self, org: &str, config: RedactionConfig) {
        if config.version < self.base.1.version {
            return;
        }
        match Redactor::new(&config) {
            Ok(r) => {
                let mut orgs = self.orgs.write().unwrap_or_else(|p| p.into_inner());
                orgs.insert(org.to_owned(), (Arc::new(r), config));
            }
            Err(e) => tracing::warn!(org, error = %e, "ignoring stored redaction rules that no longer compile"),
        }
    }

    /// Replaces an organization's rules; the new version is one more than its current
    /// one. The old rules stay in force when the new ones do not compile.
    ///
    /// User patterns are compiled before any lock is taken (a large set takes long
    /// enough to stall ingest if readers had to wait): replacements are serialized by a
    /// lock of their own, which readers never touch, and the swap under the readers'
    /// lock is a pointer store.
    pub fn replace(&self, org: &str, config: RedactionConfig) -> Result<RedactionConfig, ConfigError> {
        self.replace_with(org, config, Redactor::new)
    }

    /// [`Rules::replace`] with the compile step given (tests observe what is locked
    /// while it runs).
    fn replace_with(
        &self,
        org: &str,
        mut config: RedactionConfig,
        compile: impl FnOnce(&RedactionConfig) -> Result<Redactor, ConfigError>,
    ) -> Result<RedactionConfig, ConfigError> {
        let _one_writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        config.version = self.get(org).1.version + 1;
        let redactor = Arc::new(compile(&config)?);
        let mut orgs = self.orgs.write().unwrap_or_else(|p| p.into_inner());
        orgs.insert(org.to_owned(), (redactor, config.clone()));
        Ok(config)
    }

    /// The frame that tells an agent of `org` to use its rules.
    pub fn message(&self, org: &str) -> BrokerMessage {
        let config = self.config(org);
        BrokerMessage::RedactionRules {
            version: config.version,
            config: serde_json::to_value(&config).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_organization_changing_its_rules_leaves_the_others_alone() {
        let rules = Rules::default();
        let mut weaker = RedactionConfig::default();
        weaker.builtins.disabled = vec!["email".into()];
        let v = rules.replace("acme", weaker).unwrap();
        assert_eq!(v.version, 1);
        assert_eq!(rules.config("acme").builtins.disabled, ["email"]);
        assert!(rules.config("default").builtins.disabled.is_empty());
        assert_eq!(setting_key("acme"), "redaction:acme");
        assert_eq!(org_of_setting("redaction"), Some("default"));
        assert_eq!(org_of_setting("redaction:acme"), Some("acme"));
    }

    #[test]
    fn compiling_one_organizations_rules_never_holds_the_lock_every_ingest_reads() {
        let rules = Arc::new(Rules::default());
        let reader = Arc::clone(&rules);
        let config = rules
            .replace_with("acme", RedactionConfig::default(), move |c| {
                // While the new rules compile, another organization's ingest reads its
                // rules (and even acme's current ones) on another thread. Were the lock
                // held here, that thread could not finish and the receive would time out.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send((reader.redactor("other").version(), reader.config("acme").version));
                });
                let seen = rx.recv_timeout(std::time::Duration::from_secs(30));
                assert_eq!(seen, Ok((0, 0)), "readers were blocked while the rules compiled");
                Redactor::new(c)
            })
            .unwrap();
        assert_eq!(config.version, 1);
        assert_eq!(rules.redactor("acme").version(), 1);
    }
}
