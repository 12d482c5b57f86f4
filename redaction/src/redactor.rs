//! [`Redactor`]: the compiled rules, applied to text, captured values, whole hits and
//! JSON documents.
//!
//! Structured input is walked once. At every named place (a hit's field, an object
//! field, a string map key, a JSON member, a watch expression's last identifier) the
//! key-name rules decide first: a sensitive name replaces its value whole, containers
//! included. Everything else that is a string goes through the value detectors, and
//! integers are checked for card numbers. Paths are built in one reused buffer and only
//! copied into the report when something fired.

use std::borrow::Cow;
use std::collections::HashSet;

use periscope_protocol::hit::MAX_FINDINGS_PER_HIT;
use periscope_protocol::value::truncate_chars;
use periscope_protocol::{Hit, RedactionFinding, Text, Value};

use crate::config::{ConfigError, RedactionConfig};
use crate::engine::{Engine, MARKER_PREFIX, STRICT_RULE};
use crate::keys::{self, RuleIx};
use crate::report::Report;

/// Most extra scans of a text after its first redaction (each shortens or keeps it;
/// in practice one finds nothing).
const MAX_RESCANS: usize = 3;

/// Longest name or map key copied into a finding's path.
const MAX_PATH_SEGMENT: usize = 64;

/// Rule id of the summary finding that stands for findings beyond the per-hit cap.
pub const FINDINGS_TRUNCATED_RULE: &str = "findings_truncated";

/// The compiled redaction rules; see the crate docs for what they catch.
///
/// `Send + Sync` and immutable: the broker and agents share one in an `Arc` and swap
/// in a new one when the rules change. Every method is pure and never panics.
#[derive(Debug)]
pub struct Redactor {
    engine: Engine,
    version: u64,
}

/// What a [`Redactor`]'s rules make of a name (see [`Redactor::name_rule`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameRule(KeyCtx);

/// What the name of a value says about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeyCtx {
    /// A key-name rule that replaces the value whole.
    rule: Option<RuleIx>,
    /// The name is a phone field's, so a bare run of digits is a phone number.
    phone: bool,
}

impl Redactor {
    /// Validates and compiles a config.
    pub fn new(config: &RedactionConfig) -> Result<Redactor, ConfigError> {
        config.validate()?;
        Ok(Redactor { engine: Engine::build(config)?, version: config.version })
    }

    /// The built-in rules, no custom ones.
    pub fn default_rules() -> Redactor {
        // The default config is a constant that the test suite compiles; failing here
        // would be a bug in this crate's own patterns, not a runtime condition.
        #[allow(clippy::expect_used)]
        Redactor::new(&RedactionConfig::default()).expect("the built-in redaction rules compile")
    }

    /// The version of the config this was built from (the broker bumps it).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether `rule` is the id of one of these rules (or of the summary finding that
    /// stands for findings beyond the per-hit cap): what a receiver keeps of the rule
    /// ids a peer reports.
    pub fn has_rule(&self, rule: &str) -> bool {
        rule == FINDINGS_TRUNCATED_RULE || self.engine.rules.iter().any(|r| &*r.id == rule)
    }

    /// Redacts a plain string (a log line, a `Debug` dump); findings are recorded under
    /// `path`. Returns the input unchanged, without copying, when nothing fired.
    pub fn redact_text<'a>(&self, text: &'a str, path: &str, report: &mut Report) -> Cow<'a, str> {
        self.redact_str(text, KeyCtx::default(), path, report)
    }

    /// Redacts a named captured value in place (see the crate docs).
    pub fn redact_field(&self, name: &str, value: &mut Value, path: &str, report: &mut Report) {
        let mut buf = String::with_capacity(path.len() + 32);
        buf.push_str(path);
        self.walk(self.key_ctx(name), value, &mut buf, report);
    }

    /// What these rules make of a name, computed once for a name whose values are
    /// redacted often (a callsite's field names) and handed to [`Redactor::redact_named`].
    /// Only meaningful with the redactor that made it.
    pub fn name_rule(&self, name: &str) -> NameRule {
        NameRule(self.key_ctx(name))
    }

    /// Redacts a captured value named by `rule` in place without recording findings: for
    /// a value an expression is about to read, where only the result matters. Allocates
    /// nothing for a scalar that nothing fires on.
    pub fn redact_named(&self, rule: NameRule, value: &mut Value) {
        let mut path = String::new();
        self.walk(rule.0, value, &mut path, &mut Report::discarding());
    }

    /// Redacts a whole hit in place: fields, span fields, watch values and errors,
    /// backtrace lines. Sets `redactions` (the agent's findings, sanitized, plus this
    /// pass's, deduplicated and capped) and `rules_version`. Redacting an already
    /// redacted hit changes nothing but the version.
    pub fn redact_hit(&self, hit: &mut Hit) {
        let mut report = Report::new();
        let mut path = String::with_capacity(64);
        for field in &mut hit.fields {
            path.clear();
            path.push_str("fields.");
            path.push_str(truncate_chars(&field.name, MAX_PATH_SEGMENT));
            self.walk(self.key_ctx(&field.name), &mut field.value, &mut path, &mut report);
        }
        for (i, span) in hit.spans.iter_mut().enumerate() {
            for field in &mut span.fields {
                path.clear();
                path.push_str(&format!("spans[{i}]."));
                path.push_str(truncate_chars(&field.name, MAX_PATH_SEGMENT));
                self.walk(self.key_ctx(&field.name), &mut field.value, &mut path, &mut report);
            }
        }
        for (i, watch) in hit.watches.iter_mut().enumerate() {
            path.clear();
            path.push_str(&format!("watches[{i}]"));
            if let Some(value) = &mut watch.value {
                let ctx = keys::last_identifier(&watch.expression).map(|n| self.key_ctx(n)).unwrap_or_default();
                self.walk(ctx, value, &mut path, &mut report);
            }
            if let Some(error) = &mut watch.error {
                path.push_str(".error");
                replace_if_changed(error, |e| self.redact_str(e, KeyCtx::default(), &path, &mut report));
            }
        }
        if let Some(lines) = &mut hit.backtrace {
            for (i, line) in lines.iter_mut().enumerate() {
                path.clear();
                path.push_str(&format!("backtrace[{i}]"));
                replace_if_changed(line, |l| self.redact_str(l, KeyCtx::default(), &path, &mut report));
            }
        }
        hit.redactions = merge_findings(std::mem::take(&mut hit.redactions), report);
        hit.rules_version = self.version;
    }

    /// Redacts a JSON document structurally: object member names are key names (and
    /// are themselves scanned for values such as emails, but kept in strict mode: they
    /// are structure), strings are scanned, and integers are checked for card numbers.
    /// Paths are dotted member names from the root, `[i]` for array items.
    pub fn redact_json(&self, doc: &mut serde_json::Value, report: &mut Report) {
        let mut path = String::new();
        self.walk_json(KeyCtx::default(), doc, &mut path, report);
    }

    fn key_ctx(&self, name: &str) -> KeyCtx {
        // A key that is (or holds) a marker was data redacted by an earlier pass; its
        // value was judged under the original key then, so it says nothing now.
        if name.contains(MARKER_PREFIX) {
            return KeyCtx::default();
        }
        let info = self.engine.describe_name(name);
        KeyCtx { rule: info.rule, phone: info.phone }
    }

    fn marker(&self, rule: RuleIx) -> &str {
        self.engine.marker(rule)
    }

    fn record(&self, report: &mut Report, path: &str, rule: RuleIx) {
        report.record(path, self.engine.rule_id(rule));
    }

    fn redact_str<'a>(&self, text: &'a str, ctx: KeyCtx, path: &str, report: &mut Report) -> Cow<'a, str> {
        if text.is_empty() || is_marker(text) {
            return Cow::Borrowed(text);
        }
        if self.engine.strict && !is_number_or_bool(text) {
            self.record(report, path, STRICT_RULE);
            return Cow::Owned(self.marker(STRICT_RULE).to_owned());
        }
        if ctx.phone
            && let Some(rule) = self.engine.phone_rule
            && crate::detectors::is_bare_phone(text)
        {
            self.record(report, path, rule);
            return Cow::Owned(self.marker(rule).to_owned());
        }
        self.detect(text, path, report)
    }

    /// Runs the detectors over `text` and replaces what they find.
    fn detect<'a>(&self, text: &'a str, path: &str, report: &mut Report) -> Cow<'a, str> {
        let mut regions = Vec::new();
        self.engine.scan(text, &mut regions);
        let mut out = match self.engine.apply(text, &mut regions, path, report) {
            Cow::Borrowed(b) => return Cow::Borrowed(b),
            Cow::Owned(o) => o,
        };
        // A marker can change what its neighbours look like (it ends a token that ran
        // on before, so an address nearby now reads as a phone number): scan the result
        // again until nothing more fires, so that redacting twice is redacting once.
        // Only text that something fired on pays the extra scan.
        for _ in 0..MAX_RESCANS {
            regions.clear();
            self.engine.scan(&out, &mut regions);
            let next = match self.engine.apply(&out, &mut regions, path, report) {
                Cow::Borrowed(_) => None,
                Cow::Owned(o) => Some(o),
            };
            match next {
                Some(next) => out = next,
                None => break,
            }
        }
        Cow::Owned(out)
    }

    /// The rule that hides an integer: a valid card number anywhere, or a number of 7 to
    /// 15 digits under a phone field's name (as its text would be).
    fn integer_rule(&self, ctx: KeyCtx, n: u64) -> Option<RuleIx> {
        if ctx.phone && (1_000_000..1_000_000_000_000_000).contains(&n) {
            return self.engine.phone_rule.or_else(|| self.card_in_integer(n));
        }
        self.card_in_integer(n)
    }

    /// The card rule, when an integer is a valid card number.
    fn card_in_integer(&self, n: u64) -> Option<RuleIx> {
        let rule = self.engine.card_rule?;
        if n < 100_000_000_000 {
            return None;
        }
        let digits = n.to_string();
        let d = digits.as_bytes();
        (crate::validate::card_network(d) && crate::validate::luhn(d)).then_some(rule)
    }

    fn walk(&self, ctx: KeyCtx, value: &mut Value, path: &mut String, report: &mut Report) {
        if let Some(rule) = ctx.rule {
            if replace_whole(value, self.marker(rule)) {
                self.record(report, path, rule);
            }
            return;
        }
        match value {
            Value::Str(text) => {
                let changed = match self.redact_str(&text.value, ctx, path, report) {
                    Cow::Owned(s) => Some(s),
                    Cow::Borrowed(_) => None,
                };
                if let Some(s) = changed {
                    text.value = s;
                }
            }
            Value::Int(i) => {
                if let Some(rule) = u64::try_from(*i).ok().and_then(|n| self.integer_rule(ctx, n)) {
                    *value = Value::str(self.marker(rule));
                    self.record(report, path, rule);
                }
            }
            Value::UInt(n) => {
                if let Some(rule) = self.integer_rule(ctx, *n) {
                    *value = Value::str(self.marker(rule));
                    self.record(report, path, rule);
                }
            }
            Value::List(list) => {
                let item_ctx = KeyCtx { rule: None, phone: ctx.phone };
                for (i, item) in list.items.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.walk(item_ctx, item, path, report);
                    path.truncate(len);
                }
            }
            Value::Map(map) => {
                for (i, (key, item)) in map.entries.iter_mut().enumerate() {
                    let item_ctx = match key {
                        Value::Str(t) => self.key_ctx(&t.value),
                        _ => KeyCtx::default(),
                    };
                    let len = path.len();
                    // The key is data too: scan it (its findings sit at the entry's index).
                    path.push_str(&format!("[{i}]"));
                    self.walk(KeyCtx::default(), key, path, report);
                    path.truncate(len);
                    match key {
                        Value::Str(t) => push_segment(path, &t.value),
                        _ => path.push_str(&format!("[{i}]")),
                    }
                    self.walk(item_ctx, item, path, report);
                    path.truncate(len);
                }
            }
            Value::Object(object) => {
                for field in &mut object.fields {
                    let len = path.len();
                    push_segment(path, &field.name);
                    self.walk(self.key_ctx(&field.name), &mut field.value, path, report);
                    path.truncate(len);
                }
            }
            Value::Null | Value::Bool(_) | Value::Float(_) | Value::Cut(_) => {}
        }
    }

    fn walk_json(&self, ctx: KeyCtx, value: &mut serde_json::Value, path: &mut String, report: &mut Report) {
        use serde_json::Value as J;
        if let Some(rule) = ctx.rule {
            let replace = match value {
                J::Null | J::Bool(_) => false,
                J::String(s) => !s.is_empty() && !is_marker(s),
                _ => true,
            };
            if replace {
                *value = J::String(self.marker(rule).to_owned());
                self.record(report, path, rule);
            }
            return;
        }
        match value {
            J::String(s) => {
                let changed = match self.redact_str(s, ctx, path, report) {
                    Cow::Owned(s) => Some(s),
                    Cow::Borrowed(_) => None,
                };
                if let Some(new) = changed {
                    *s = new;
                }
            }
            J::Number(n) => {
                if let Some(rule) = n.as_u64().and_then(|n| self.integer_rule(ctx, n)) {
                    *value = J::String(self.marker(rule).to_owned());
                    self.record(report, path, rule);
                }
            }
            J::Array(items) => {
                let item_ctx = KeyCtx { rule: None, phone: ctx.phone };
                for (i, item) in items.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.walk_json(item_ctx, item, path, report);
                    path.truncate(len);
                }
            }
            J::Object(members) => {
                let mut renames: Vec<(String, String)> = Vec::new();
                for (name, item) in members.iter_mut() {
                    let len = path.len();
                    // Member names are structure, but an email used as a key is still an
                    // email: scan names with the detectors (not strict mode).
                    let shown = self.redact_member_name(name, path, report);
                    push_segment(path, &shown);
                    self.walk_json(self.key_ctx(name), item, path, report);
                    path.truncate(len);
                    if let Cow::Owned(new) = shown {
                        renames.push((name.clone(), new));
                    }
                }
                for (old, new) in renames {
                    if let Some(item) = members.remove(&old) {
                        let mut key = new.clone();
                        let mut n = 2;
                        while members.contains_key(&key) {
                            key = format!("{new}#{n}");
                            n += 1;
                        }
                        members.insert(key, item);
                    }
                }
            }
            J::Null | J::Bool(_) => {}
        }
    }

    fn redact_member_name<'a>(&self, name: &'a str, path: &str, report: &mut Report) -> Cow<'a, str> {
        if name.is_empty() || is_marker(name) {
            return Cow::Borrowed(name);
        }
        self.detect(name, path, report)
    }
}

fn replace_if_changed(s: &mut String, f: impl FnOnce(&str) -> Cow<'_, str>) {
    let changed = match f(s) {
        Cow::Owned(new) => Some(new),
        Cow::Borrowed(_) => None,
    };
    if let Some(new) = changed {
        *s = new;
    }
}

fn push_segment(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(truncate_chars(name, MAX_PATH_SEGMENT));
}

/// Replaces a value named by a sensitive key with its marker; `false` when there is
/// nothing to hide (null, a boolean, an empty string, a cut, an existing marker).
fn replace_whole(value: &mut Value, marker: &str) -> bool {
    match value {
        Value::Null | Value::Bool(_) | Value::Cut(_) => false,
        Value::Str(t) if t.value.is_empty() || is_marker(&t.value) => false,
        _ => {
            // The original length would tell a password's length: drop it.
            *value = Value::Str(Text { value: marker.to_owned(), original_len: None });
            true
        }
    }
}

/// Whether a whole string is one marker (the protocol's definition, which expressions
/// use to treat a redacted value as opaque).
pub(crate) fn is_marker(s: &str) -> bool {
    periscope_protocol::value::is_redaction_marker(s)
}

/// What strict mode keeps: a number or a boolean written as text.
fn is_number_or_bool(s: &str) -> bool {
    let t = s.trim();
    t.eq_ignore_ascii_case("true") || t.eq_ignore_ascii_case("false") || (t.len() <= 64 && t.parse::<f64>().is_ok())
}

/// Merges an earlier pass's findings (sanitized: well-formed rule ids only) with this
/// pass's, deduplicated in order, capped at [`MAX_FINDINGS_PER_HIT`] with a summary.
fn merge_findings(existing: Vec<RedactionFinding>, report: Report) -> Vec<RedactionFinding> {
    let mut prior_more = 0u64;
    let mut seen: HashSet<RedactionFinding> = HashSet::new();
    let mut merged: Vec<RedactionFinding> = Vec::new();
    let mut overflow = report.omitted();
    let candidates = existing.into_iter().chain(report.into_findings().into_iter().map(RedactionFinding::from));
    for f in candidates {
        if f.rule == FINDINGS_TRUNCATED_RULE {
            prior_more += f.path.trim_start_matches('+').trim_end_matches(" more").parse::<u64>().unwrap_or(0);
            continue;
        }
        let well_formed = !f.rule.is_empty()
            && f.rule.len() <= 64
            && f.rule.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.'));
        if !well_formed || seen.contains(&f) {
            continue;
        }
        if merged.len() >= MAX_FINDINGS_PER_HIT - 1 {
            overflow += 1;
            continue;
        }
        seen.insert(f.clone());
        merged.push(f);
    }
    let more = prior_more + overflow;
    if more > 0 {
        merged.push(RedactionFinding { path: format!("+{more} more"), rule: FINDINGS_TRUNCATED_RULE.into() });
    }
    merged
}

#[cfg(test)]
mod known_rules_tests {
    use super::*;

    #[test]
    fn the_rules_it_knows_are_the_ones_it_reports() {
        let r = Redactor::default_rules();
        assert!(r.has_rule("email") && r.has_rule("key:password") && r.has_rule(FINDINGS_TRUNCATED_RULE));
        assert!(!r.has_rule("made-up") && !r.has_rule("") && !r.has_rule("custom:nope"));
    }
}
