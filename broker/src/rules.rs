//! The redaction rules in force, per organization: built once, swapped whole when an
//! organization's company admin changes them, pushed to that organization's agents with
//! a version number, and persisted so a restart keeps them.
//!
//! Every organization starts from the configuration file's `[redaction]` rules; an
//! organization that changes its rules gets its own compiled set. Agents receive, and
//! the broker redacts with, the rules of the agent's organization, so one tenant's
//! change never weakens (or reveals) another's.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

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
}

impl Default for Rules {
    /// The built-in rules, version 0, for everyone.
    fn default() -> Self {
        Rules { base: (Arc::new(Redactor::default_rules()), RedactionConfig::default()), orgs: RwLock::default() }
    }
}

impl Rules {
    /// Compiles `config`, the rules of every organization that has not changed its own.
    pub fn new(config: RedactionConfig) -> Result<Rules, ConfigError> {
        let redactor = Redactor::new(&config)?;
        Ok(Rules { base: (Arc::new(redactor), config), orgs: RwLock::default() })
    }

    fn get(&self, org: &str) -> Compiled {
        let orgs = self.orgs.read().unwrap_or_else(|p| p.into_inner());
        orgs.get(org).cloned().unwrap_or_else(|| self.base.clone())
    }

    /// The compiled rules of an organization, to redact with.
    pub fn redactor(&self, org: &str) -> Arc<Redactor> {
        self.get(org).0
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
    pub fn replace(&self, org: &str, mut config: RedactionConfig) -> Result<RedactionConfig, ConfigError> {
        let mut orgs = self.orgs.write().unwrap_or_else(|p| p.into_inner());
        let current = orgs.get(org).map_or(self.base.1.version, |c| c.1.version);
        config.version = current + 1;
        let redactor = Redactor::new(&config)?;
        orgs.insert(org.to_owned(), (Arc::new(redactor), config.clone()));
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
}
