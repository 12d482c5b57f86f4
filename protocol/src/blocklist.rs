//! Where operators forbid actions, or the capture of values: cryptographic code,
//! credential handling, a whole pool.
//!
//! The broker checks a placement against these rules and refuses it naming the rule;
//! agents receive the rules of their organization ([`crate::BrokerMessage::Blocklist`])
//! and check them again, so a rule added after placement drops the action (or stops
//! its values) without waiting on the broker. Both sides match with [`BlockRule::matches`].

use serde::{Deserialize, Serialize};

use crate::action::file_matches;

/// Most rules per organization.
pub const MAX_RULES: usize = 256;
/// Longest selector or reason.
pub const MAX_FIELD_LEN: usize = 256;

/// What a rule forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockEffect {
    /// No action may be placed or run there.
    NoActions,
    /// Actions may run (counts, durations, hits), but no value is captured: hits carry
    /// no fields, locals, watches or backtraces, and log placeholders render nothing.
    NoCapture,
    /// An effect this side does not know (from a newer peer): treated as `no_actions`,
    /// the safe reading.
    #[serde(other)]
    Unknown,
}

impl BlockEffect {
    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            BlockEffect::NoActions => "no_actions",
            BlockEffect::NoCapture => "no_capture",
            BlockEffect::Unknown => "unknown",
        }
    }

    /// Whether the effect forbids running actions.
    pub fn blocks_actions(&self) -> bool {
        !matches!(self, BlockEffect::NoCapture)
    }
}

/// One rule: every selector it gives must match (a rule with only `pool` covers the
/// whole pool).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockRule {
    /// The rule's name, quoted in refusals, statuses and the audit trail.
    pub name: String,
    /// What it forbids.
    pub effect: BlockEffect,
    /// Only agents of this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// A file, as a path suffix on a `/` boundary (`src/crypto.rs`); a value ending in
    /// `/` names every file under that directory (`src/crypto/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A module (Rust module path or Python module) and everything inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// A function (Python qualified name, or its last part) or a Rust span name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Why, for whoever is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A place an action would run, as much as the matching side knows of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Site<'a> {
    /// The agent's pool.
    pub pool: &'a str,
    /// The file, as the agent reports it (or as the caller named it).
    pub file: &'a str,
    /// The module at the location, when known.
    pub module: Option<&'a str>,
    /// The functions or spans at the location, when known.
    pub functions: &'a [&'a str],
}

impl BlockRule {
    /// Checks the rule is usable: a name, at least one selector, bounded sizes.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::messages::is_label(&self.name, 64) {
            return Err("a blocklist rule needs a `name` of 1 to 64 characters from A-Z a-z 0-9 . _ : = / -".into());
        }
        let selectors = [&self.pool, &self.file, &self.module, &self.function];
        if selectors.iter().all(|s| s.as_deref().is_none_or(|v| v.trim().is_empty())) {
            return Err(format!(
                "blocklist rule `{}` names no place: give a `pool`, `file`, `module` or `function`",
                self.name
            ));
        }
        for (field, value) in [
            ("pool", self.pool.as_deref()),
            ("file", self.file.as_deref()),
            ("module", self.module.as_deref()),
            ("function", self.function.as_deref()),
            ("reason", Some(self.reason.as_str())),
        ] {
            if let Some(v) = value
                && (v.len() > MAX_FIELD_LEN || v.chars().any(char::is_control))
            {
                return Err(format!(
                    "blocklist rule `{}`: `{field}` must be at most {MAX_FIELD_LEN} bytes of printable text",
                    self.name
                ));
            }
        }
        if self.effect == BlockEffect::Unknown {
            return Err(format!("blocklist rule `{}`: `effect` must be `no_actions` or `no_capture`", self.name));
        }
        Ok(())
    }

    /// Whether the rule covers `site`. A selector the site cannot answer (no module or
    /// function known there) does not match: the broker, which knows the catalogs,
    /// checks those at placement.
    pub fn matches(&self, site: &Site<'_>) -> bool {
        if let Some(pool) = non_empty(&self.pool)
            && pool != site.pool
        {
            return false;
        }
        if let Some(file) = non_empty(&self.file)
            && !file_covers(file, site.file)
        {
            return false;
        }
        if let Some(module) = non_empty(&self.module)
            && !site.module.is_some_and(|m| module_covers(module, m))
        {
            return false;
        }
        if let Some(function) = non_empty(&self.function)
            && !site.functions.iter().any(|f| function_is(function, f))
        {
            return false;
        }
        true
    }

    /// A sentence naming the rule, for refusals and statuses.
    pub fn describe(&self) -> String {
        let mut what = Vec::new();
        if let Some(p) = non_empty(&self.pool) {
            what.push(format!("pool `{p}`"));
        }
        if let Some(f) = non_empty(&self.file) {
            what.push(format!("file `{f}`"));
        }
        if let Some(m) = non_empty(&self.module) {
            what.push(format!("module `{m}`"));
        }
        if let Some(f) = non_empty(&self.function) {
            what.push(format!("function `{f}`"));
        }
        let effect = match self.effect {
            BlockEffect::NoCapture => "no value may be captured",
            _ => "no action may run",
        };
        let reason = if self.reason.is_empty() { String::new() } else { format!(" ({})", self.reason) };
        format!("blocklist rule `{}`: {effect} in {}{reason}", self.name, what.join(", "))
    }
}

/// The first rule of `effect`'s kind (`blocks_actions` or not) covering `site`.
pub fn first_match<'r>(rules: &'r [BlockRule], site: &Site<'_>, actions: bool) -> Option<&'r BlockRule> {
    rules.iter().find(|r| r.effect.blocks_actions() == actions && r.matches(site))
}

/// Whether an action reads values at its location (a condition, watches, a log
/// template's placeholders, a metric's value expression): what a `no_capture` rule
/// forbids. Counting and timing read none.
pub fn reads_values(spec: &crate::ActionSpec) -> bool {
    use crate::ActionKind;
    spec.condition.is_some()
        || match &spec.kind {
            ActionKind::Snapshot(s) => !s.watch.is_empty(),
            ActionKind::Log(l) => l.template.contains('{'),
            ActionKind::Metric(m) => m.expression.is_some(),
            // Snapshots of failures, wherever they happen: every local is a value.
            ActionKind::CaptureErrors(_) => true,
            ActionKind::Unsupported => false,
        }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn file_covers(rule: &str, file: &str) -> bool {
    let Some(dir) = rule.strip_suffix('/') else { return file_matches(rule, file) };
    let file = file.replace('\\', "/");
    let dir = dir.trim_start_matches("./");
    !dir.is_empty() && (file.starts_with(&format!("{dir}/")) || file.contains(&format!("/{dir}/")))
}

fn module_covers(rule: &str, module: &str) -> bool {
    module == rule || module.strip_prefix(rule).is_some_and(|rest| rest.starts_with("::") || rest.starts_with('.'))
}

fn function_is(rule: &str, name: &str) -> bool {
    let name = name.rsplit_once(':').filter(|(m, _)| !m.ends_with(':')).map_or(name, |(_, q)| q);
    name == rule || name.ends_with(&format!(".{rule}")) || name.ends_with(&format!("::{rule}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(file: Option<&str>, module: Option<&str>, function: Option<&str>) -> BlockRule {
        BlockRule {
            name: "r".into(),
            effect: BlockEffect::NoActions,
            pool: None,
            file: file.map(Into::into),
            module: module.map(Into::into),
            function: function.map(Into::into),
            reason: String::new(),
        }
    }

    #[test]
    fn files_match_by_suffix_and_directories_by_component() {
        let site = Site { pool: "p", file: "app/src/crypto/keys.rs", ..Site::default() };
        assert!(rule(Some("keys.rs"), None, None).matches(&site));
        assert!(rule(Some("crypto/"), None, None).matches(&site));
        assert!(rule(Some("app/src/crypto/"), None, None).matches(&site));
        assert!(!rule(Some("ypto/"), None, None).matches(&site));
        assert!(!rule(Some("eys.rs"), None, None).matches(&site));
    }

    #[test]
    fn modules_cover_their_children_and_functions_match_their_last_part() {
        let fns = ["Vault.decrypt"];
        let site = Site { pool: "p", file: "vault.py", module: Some("shop.vault"), functions: &fns };
        assert!(rule(None, Some("shop.vault"), None).matches(&site));
        assert!(rule(None, Some("shop"), None).matches(&site));
        assert!(!rule(None, Some("sho"), None).matches(&site));
        assert!(rule(None, None, Some("decrypt")).matches(&site));
        assert!(rule(None, None, Some("Vault.decrypt")).matches(&site));
        assert!(!rule(None, None, Some("crypt")).matches(&site));
        // A selector the site cannot answer does not match.
        assert!(!rule(None, Some("shop"), None).matches(&Site { pool: "p", file: "vault.py", ..Site::default() }));
    }

    #[test]
    fn a_rule_naming_no_place_is_refused() {
        assert!(rule(None, None, None).validate().unwrap_err().contains("names no place"));
        let mut pool_only = rule(None, None, None);
        pool_only.pool = Some("payments".into());
        assert!(pool_only.validate().is_ok());
        assert!(pool_only.matches(&Site { pool: "payments", file: "x.rs", ..Site::default() }));
        assert!(!pool_only.matches(&Site { pool: "shop", file: "x.rs", ..Site::default() }));
    }
}
