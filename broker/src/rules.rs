//! The redaction rules in force: built once, swapped whole when an operator changes
//! them, pushed to every connected agent with a version number, and persisted so a
//! restart keeps them.

use std::sync::{Arc, RwLock};

use periscope_protocol::BrokerMessage;
use periscope_redaction::{ConfigError, RedactionConfig, Redactor};

/// Key of the redaction rules in the store's settings.
pub const SETTING_KEY: &str = "redaction";

/// The compiled rules and the configuration they came from.
#[derive(Debug)]
pub struct Rules {
    current: RwLock<(Arc<Redactor>, RedactionConfig)>,
}

impl Default for Rules {
    /// The built-in rules, version 0.
    fn default() -> Self {
        Rules { current: RwLock::new((Arc::new(Redactor::default_rules()), RedactionConfig::default())) }
    }
}

impl Rules {
    /// Compiles `config`.
    pub fn new(config: RedactionConfig) -> Result<Rules, ConfigError> {
        let redactor = Redactor::new(&config)?;
        Ok(Rules { current: RwLock::new((Arc::new(redactor), config)) })
    }

    /// The compiled rules, to redact with.
    pub fn redactor(&self) -> Arc<Redactor> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c.0),
            Err(p) => Arc::clone(&p.into_inner().0),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> RedactionConfig {
        match self.current.read() {
            Ok(c) => c.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Replaces the rules; the new version is one more than the current one. The old
    /// rules stay in force when the new ones do not compile.
    pub fn replace(&self, mut config: RedactionConfig) -> Result<RedactionConfig, ConfigError> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        config.version = current.1.version + 1;
        let redactor = Redactor::new(&config)?;
        *current = (Arc::new(redactor), config.clone());
        Ok(config)
    }

    /// The frame that tells an agent to use these rules.
    pub fn message(&self) -> BrokerMessage {
        let config = self.config();
        BrokerMessage::RedactionRules {
            version: config.version,
            config: serde_json::to_value(&config).unwrap_or(serde_json::Value::Null),
        }
    }
}
