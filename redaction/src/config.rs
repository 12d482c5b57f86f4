//! Redaction configuration: what operators write (TOML), what the broker pushes to
//! agents (JSON), and the validation both go through before anything is compiled.
//!
//! ```toml
//! version = 3          # bumped by the broker on every change; hits carry it
//! strict = false       # true: only numbers and booleans survive
//! key_names = ["mothers_maiden_name"]
//!
//! [builtins]
//! detectors = true     # the built-in value detectors
//! key_names = true     # the built-in sensitive key names
//! disabled = ["phone"] # rule ids to switch off
//!
//! [[patterns]]
//! name = "employee_id"
//! regex = 'EMP-[0-9]{6}'
//! kind = "EMPLOYEE_ID" # optional: [REDACTED:EMPLOYEE_ID]
//!
//! [exclusions]
//! key_names = ["csrf_token"]           # never redacted by name
//! values = ['[a-z.]+@example\.com']   # never redacted when a finding is exactly this
//! ```
//!
//! Every field is optional and defaults to the built-in rules on. Unknown settings in
//! TOML are errors (a typo must not silently disable a rule); in JSON from a newer
//! broker they are ignored, like everywhere else in the protocol.

use serde::{Deserialize, Serialize};

use crate::detectors;
use crate::engine::{self, MAX_KIND_LEN};
use crate::keys;

/// What a [`Redactor`](crate::Redactor) is built from; see the [module docs](self).
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct RedactionConfig {
    /// Rules version: the broker bumps it on every change and stamps hits with it, so a
    /// reader knows which rules redacted a hit.
    pub version: u64,
    /// Keep only numbers and booleans: every other string becomes `[REDACTED:STRICT]`
    /// (card numbers are still caught in numbers). For services whose data is too
    /// sensitive for detectors to be trusted.
    pub strict: bool,
    /// Which built-in rules run.
    pub builtins: Builtins,
    /// The operator's own value patterns.
    pub patterns: Vec<CustomPattern>,
    /// Extra sensitive names, matched like the built-in ones (split into words, per
    /// segment, case-insensitively).
    pub key_names: Vec<String>,
    /// What must never be redacted.
    pub exclusions: Exclusions,
}

/// Switches for the built-in rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct Builtins {
    /// The built-in value detectors (cards, IBANs, emails, tokens, ...).
    pub detectors: bool,
    /// The built-in sensitive key names (password, token, api_key, ...).
    pub key_names: bool,
    /// Rule ids switched off individually (`phone`, `ip_address`, `key:session`).
    pub disabled: Vec<String>,
}

impl Default for Builtins {
    fn default() -> Self {
        Builtins { detectors: true, key_names: true, disabled: Vec::new() }
    }
}

/// An operator-defined value pattern, reported as `custom:<name>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CustomPattern {
    /// Rule name: letters, digits, `_` and `-`.
    pub name: String,
    /// The pattern, in the `regex` crate's syntax, ASCII mode (`\d`, `\w`, `\b` are
    /// ASCII; write non-ASCII text literally).
    pub regex: String,
    /// What the marker says; defaults to the name in capitals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// What is never redacted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct Exclusions {
    /// Names the key-name rules leave alone, compared after normalization
    /// (`csrfToken` = `csrf-token` = `csrf_token`). Value detectors still run on them.
    pub key_names: Vec<String>,
    /// Patterns of values left alone: a finding whose text matches one of them
    /// entirely is dropped (a test card number, the company's own domain).
    pub values: Vec<String>,
}

/// Most custom patterns, key names and exclusions one config may carry.
pub const MAX_PATTERNS: usize = 256;
/// See [`MAX_PATTERNS`].
pub const MAX_KEY_NAMES: usize = 1024;
/// Longest custom pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML did not parse.
    #[error("redaction config is not valid TOML: {message}")]
    Syntax {
        /// The parser's message, with line and column.
        message: String,
    },
    /// A setting this version does not know (probably a typo).
    #[error("unknown setting `{key}` in redaction config; expected one of: {expected}")]
    UnknownKey {
        /// Dotted path of the setting.
        key: String,
        /// The settings allowed there.
        expected: String,
    },
    /// A setting has the wrong type.
    #[error("redaction config: {message}")]
    Shape {
        /// What was wrong, from the deserializer.
        message: String,
    },
    /// A custom pattern is invalid.
    #[error("custom pattern `{name}`: {problem}")]
    Pattern {
        /// The pattern's name (or its position when it has none).
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A custom key name is invalid.
    #[error("custom key name `{name}`: {problem}")]
    KeyName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An exclusion pattern is invalid.
    #[error("exclusion value pattern `{pattern}`: {problem}")]
    Exclusion {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `builtins.disabled` names a rule that does not exist.
    #[error("unknown rule `{rule}` in builtins.disabled; built-in rules are: {known}")]
    UnknownRule {
        /// The id as given.
        rule: String,
        /// Every built-in rule id.
        known: String,
    },
    /// A list is longer than allowed.
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The rules together exceed the automaton's size limits.
    #[error("the combined redaction rules are too large to compile: {message}")]
    TooLarge {
        /// The compiler's message.
        message: String,
    },
}

const TOP_KEYS: &[&str] = &["version", "strict", "builtins", "patterns", "key_names", "exclusions"];
const BUILTIN_KEYS: &[&str] = &["detectors", "key_names", "disabled"];
const PATTERN_KEYS: &[&str] = &["name", "regex", "kind"];
const EXCLUSION_KEYS: &[&str] = &["key_names", "values"];

fn check_keys(table: &toml::Table, prefix: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    for key in table.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey { key: format!("{prefix}{key}"), expected: allowed.join(", ") });
        }
    }
    Ok(())
}

/// Every rule id `builtins.disabled` accepts.
pub fn builtin_rule_ids() -> Vec<&'static str> {
    let mut ids: Vec<&'static str> = detectors::builtin_ids().filter(|id| *id != "key_value").collect();
    ids.push(detectors::GENERIC_SECRET);
    // `key = value` in text (the key-name rules applied to free text).
    ids.push("key_value");
    ids.extend(keys::BUILTIN_KEY_RULES.iter().map(|(id, _, _)| *id));
    ids
}

impl RedactionConfig {
    /// Parses and validates a TOML config.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(s).map_err(|e| ConfigError::Syntax { message: e.to_string() })?;
        check_keys(&table, "", TOP_KEYS)?;
        if let Some(toml::Value::Table(t)) = table.get("builtins") {
            check_keys(t, "builtins.", BUILTIN_KEYS)?;
        }
        if let Some(toml::Value::Table(t)) = table.get("exclusions") {
            check_keys(t, "exclusions.", EXCLUSION_KEYS)?;
        }
        if let Some(toml::Value::Array(items)) = table.get("patterns") {
            for (i, item) in items.iter().enumerate() {
                if let toml::Value::Table(t) = item {
                    check_keys(t, &format!("patterns[{i}]."), PATTERN_KEYS)?;
                }
            }
        }
        let config: RedactionConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Shape { message: e.to_string().trim().to_owned() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule compiles and every name is well formed; a bad rule is named
    /// with its problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let too_many = |what, count, max| {
            if count > max { Err(ConfigError::TooMany { what, count, max }) } else { Ok(()) }
        };
        too_many("custom patterns", self.patterns.len(), MAX_PATTERNS)?;
        too_many("custom key names", self.key_names.len(), MAX_KEY_NAMES)?;
        too_many("excluded key names", self.exclusions.key_names.len(), MAX_KEY_NAMES)?;
        too_many("excluded value patterns", self.exclusions.values.len(), MAX_PATTERNS)?;

        let known = builtin_rule_ids();
        for rule in &self.builtins.disabled {
            if !known.contains(&rule.as_str()) {
                return Err(ConfigError::UnknownRule { rule: rule.clone(), known: known.join(", ") });
            }
        }

        let mut names: Vec<&str> = Vec::new();
        for (i, p) in self.patterns.iter().enumerate() {
            let label = if p.name.is_empty() { format!("#{}", i + 1) } else { p.name.clone() };
            let bad = |problem: String| ConfigError::Pattern { name: label.clone(), problem };
            if p.name.is_empty() || p.name.len() > 48 {
                return Err(bad("a name of 1 to 48 characters is required".into()));
            }
            if !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(bad("the name may only hold letters, digits, `_` and `-`".into()));
            }
            if names.contains(&p.name.as_str()) {
                return Err(bad("another pattern has the same name".into()));
            }
            names.push(&p.name);
            if let Some(kind) = &p.kind
                && (kind.is_empty()
                    || kind.len() > MAX_KIND_LEN
                    || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            {
                return Err(bad(format!("kind `{kind}` must be 1 to {MAX_KIND_LEN} letters, digits or `_`")));
            }
            if p.regex.is_empty() {
                return Err(bad("the regex is empty".into()));
            }
            if p.regex.len() > MAX_PATTERN_LEN {
                return Err(bad(format!("the regex is {} bytes long (at most {MAX_PATTERN_LEN})", p.regex.len())));
            }
            engine::check_user_pattern(&p.regex).map_err(bad)?;
        }

        for name in &self.key_names {
            let bad = |problem: &str| ConfigError::KeyName { name: name.clone(), problem: problem.to_owned() };
            if name.len() > 64 {
                return Err(bad("names are at most 64 characters"));
            }
            if keys::segments(name).next().is_none() {
                return Err(bad("the name has no letters or digits to match on"));
            }
        }

        for pattern in &self.exclusions.values {
            if pattern.len() > MAX_PATTERN_LEN {
                return Err(ConfigError::Exclusion {
                    pattern: pattern.chars().take(40).collect(),
                    problem: format!("at most {MAX_PATTERN_LEN} bytes"),
                });
            }
            engine::check_user_pattern(pattern)
                .map_err(|problem| ConfigError::Exclusion { pattern: pattern.clone(), problem })?;
        }
        Ok(())
    }
}
