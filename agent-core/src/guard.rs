//! What an agent checks before it runs an action, beside what the broker checked at
//! placement: that the code is the version the action was written against, and that no
//! operator rule forbids the place (or the capture of values there).
//!
//! The agent knows its own code from the catalog it publishes ([`CodeIndex`]: per file,
//! its content hash, module and the functions or spans in it) and its rules from the
//! broker ([`periscope_protocol::BrokerMessage::Blocklist`]), so a rule added after
//! placement takes effect here without the broker touching the action.

use std::collections::HashMap;

use periscope_protocol::blocklist::{BlockRule, Site, first_match, reads_values};
use periscope_protocol::{ActionKind, ActionSpec, CatalogEntry, FileLines, LocationKind};

use crate::CatalogBatch;

/// What the agent makes of an action before installing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Install it.
    Run,
    /// Not yet: the file it expects a hash of has not been seen (its code has not been
    /// loaded); checked again when the catalog grows.
    Wait,
    /// Never on this agent, for this reason (reported as the action's error status).
    Refuse(String),
}

/// What the agent knows of one source file from its own catalog.
#[derive(Debug, Default)]
struct FileFacts {
    hash: Option<String>,
    module: Option<String>,
    /// Named locations: Rust spans (line, name); Python functions (line, end, qualname).
    names: Vec<(u32, Option<u32>, String)>,
}

/// The agent's own code as its catalog describes it.
#[derive(Debug, Default)]
pub struct CodeIndex {
    files: HashMap<String, FileFacts>,
}

impl CodeIndex {
    /// Takes in what a catalog batch says (everything when `full`); returns whether a
    /// file appeared or its hash changed.
    pub fn learn(&mut self, batch: &CatalogBatch, full: bool) -> bool {
        if full {
            self.files.clear();
        }
        let mut grew = false;
        for e in &batch.entries {
            grew |= self.learn_entry(e);
        }
        for f in &batch.files {
            grew |= self.learn_file(f);
        }
        grew
    }

    fn learn_entry(&mut self, e: &CatalogEntry) -> bool {
        let grew = !self.files.contains_key(&e.file);
        let facts = self.files.entry(e.file.clone()).or_default();
        let rehashed = e.hash.is_some() && facts.hash != e.hash;
        if rehashed {
            facts.hash = e.hash.clone();
        }
        if facts.module.is_none() {
            facts.module = e.module.clone();
        }
        if e.kind == LocationKind::Span && !facts.names.iter().any(|(l, _, n)| *l == e.line && *n == e.name) {
            facts.names.push((e.line, Some(e.line), e.name.clone()));
        }
        grew || rehashed
    }

    fn learn_file(&mut self, f: &FileLines) -> bool {
        let before = self.files.get(&f.file).map(|x| x.hash.clone());
        let facts = FileFacts {
            hash: f.hash.clone(),
            module: f.module.clone(),
            names: f.functions.iter().map(|func| (func.line, func.end_line, func.name.clone())).collect(),
        };
        self.files.insert(f.file.clone(), facts);
        before != Some(f.hash.clone())
    }

    /// The file a location names (a path suffix), when exactly one is known.
    fn file(&self, wanted: &str) -> Option<(&str, &FileFacts)> {
        let mut found = self.files.iter().filter(|(f, _)| periscope_protocol::action::file_matches(wanted, f));
        let first = found.next()?;
        found.next().is_none().then_some((first.0.as_str(), first.1))
    }
}

/// The checks, with what they read: the agent's version and build, its pool, the
/// operator's rules.
#[derive(Debug, Default)]
pub struct Guard {
    /// The service version the agent reports.
    pub service_version: String,
    /// The build (git commit) the agent reports.
    pub build: String,
    /// The agent's pool.
    pub pool: String,
    /// The blocklist in force (from the broker).
    pub rules: Vec<BlockRule>,
    /// Its version.
    pub rules_version: u64,
}

impl Guard {
    /// Whether `spec` may run here, given what the agent knows of its code.
    pub fn verdict(&self, spec: &ActionSpec, index: &CodeIndex) -> Verdict {
        if let Some(expect) = &spec.expect {
            if let Some(why) = expect.version_mismatch(&self.service_version, &self.build) {
                return Verdict::Refuse(why);
            }
            if expect.file_hash.is_some() {
                match index.file(&spec.location.file) {
                    None => return Verdict::Wait,
                    Some((file, facts)) => {
                        if let Some(why) = expect.hash_mismatch(file, facts.hash.as_deref()) {
                            return Verdict::Refuse(why);
                        }
                    }
                }
            }
        }
        let mut locations = vec![&spec.location];
        if let ActionKind::Metric(m) = &spec.kind
            && let Some(end) = &m.end_location
        {
            locations.push(end);
        }
        for location in locations {
            let blocked = self.at(index, &location.file, location.line, |site| first_match(&self.rules, site, true));
            if let Some(rule) = blocked {
                return Verdict::Refuse(format!("{}; this agent dropped the action", rule.describe()));
            }
            let no_capture =
                self.at(index, &location.file, location.line, |site| first_match(&self.rules, site, false));
            if let Some(rule) = no_capture
                && reads_values(spec)
            {
                return Verdict::Refuse(format!(
                    "{}; this action reads values there (a condition, watches, placeholders or a value \
                     expression), so this agent dropped it",
                    rule.describe()
                ));
            }
        }
        Verdict::Run
    }

    /// Whether values may not be captured at the action's location.
    pub fn no_capture(&self, spec: &ActionSpec, index: &CodeIndex) -> bool {
        let (file, line) = (&spec.location.file, spec.location.line);
        self.at(index, file, line, |site| first_match(&self.rules, site, false)).is_some()
    }

    /// Runs `check` over the site at `file:line` as the index describes it.
    fn at<'r>(
        &'r self,
        index: &CodeIndex,
        file: &str,
        line: u32,
        check: impl Fn(&Site<'_>) -> Option<&'r BlockRule>,
    ) -> Option<&'r BlockRule> {
        let known = index.file(file);
        let names: Vec<&str> = known
            .map(|(_, f)| {
                f.names
                    .iter()
                    .filter(|(start, end, _)| *start <= line && end.is_none_or(|e| line <= e))
                    .map(|(_, _, n)| n.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let site = Site {
            pool: &self.pool,
            file: known.map_or(file, |(f, _)| f),
            module: known.and_then(|(_, f)| f.module.as_deref()),
            functions: &names,
        };
        check(&site)
    }
}

#[cfg(test)]
mod tests {
    use periscope_protocol::{ActionId, BlockEffect, CodeExpectation, Location, SnapshotSpec};

    use super::*;

    fn spec(file: &str, expect: Option<CodeExpectation>) -> ActionSpec {
        ActionSpec {
            id: ActionId::generate(),
            location: Location { file: file.into(), line: 3 },
            condition: None,
            expires_at_ms: u64::MAX,
            kind: ActionKind::Snapshot(SnapshotSpec { max_hits: 1, watch: Vec::new(), backtrace: false }),
            expect: expect.map(Box::new),
            function: None,
        }
    }

    fn entry(file: &str, hash: Option<&str>) -> CatalogEntry {
        CatalogEntry {
            file: file.into(),
            line: 3,
            kind: LocationKind::Span,
            name: "checkout".into(),
            module: Some("shop::orders".into()),
            level: None,
            fields: Vec::new(),
            hits: 0,
            hash: hash.map(Into::into),
        }
    }

    #[test]
    fn a_version_or_hash_that_differs_is_refused_and_an_unseen_file_waits() {
        let guard = Guard { service_version: "1.4.0".into(), build: "0123456789abcdef".into(), ..Guard::default() };
        let mut index = CodeIndex::default();
        let v = |version: &str| Some(CodeExpectation { version: Some(version.into()), file_hash: None });
        assert_eq!(guard.verdict(&spec("src/a.rs", v("1.4.0")), &index), Verdict::Run);
        assert_eq!(guard.verdict(&spec("src/a.rs", v("0123456")), &index), Verdict::Run);
        let Verdict::Refuse(why) = guard.verdict(&spec("src/a.rs", v("1.3.9")), &index) else { panic!() };
        assert!(why.contains("expects `1.3.9`") && why.contains("1.4.0"), "{why}");
        let h = |hash: &str| Some(CodeExpectation { version: None, file_hash: Some(hash.into()) });
        assert_eq!(guard.verdict(&spec("a.rs", h("sha256:aa")), &index), Verdict::Wait);
        let batch = CatalogBatch { entries: vec![entry("src/a.rs", Some("sha256:aa"))], files: Vec::new() };
        assert!(index.learn(&batch, true));
        assert_eq!(guard.verdict(&spec("a.rs", h("sha256:AA")), &index), Verdict::Run);
        assert!(matches!(guard.verdict(&spec("a.rs", h("sha256:bb")), &index), Verdict::Refuse(_)));
        let unreadable = CatalogBatch { entries: vec![entry("src/b.rs", None)], files: Vec::new() };
        index.learn(&unreadable, false);
        let Verdict::Refuse(why) = guard.verdict(&spec("b.rs", h("sha256:bb")), &index) else { panic!() };
        assert!(why.contains("cannot read"), "{why}");
    }

    #[test]
    fn blocklist_rules_match_the_module_and_span_the_catalog_reports() {
        let rule = |module: Option<&str>, function: Option<&str>, effect| BlockRule {
            name: "crypto".into(),
            effect,
            pool: None,
            file: None,
            module: module.map(Into::into),
            function: function.map(Into::into),
            reason: String::new(),
        };
        let mut index = CodeIndex::default();
        index.learn(&CatalogBatch { entries: vec![entry("src/orders.rs", None)], files: Vec::new() }, true);
        let mut guard =
            Guard { rules: vec![rule(Some("shop::orders"), None, BlockEffect::NoActions)], ..Guard::default() };
        assert!(
            matches!(guard.verdict(&spec("orders.rs", None), &index), Verdict::Refuse(r) if r.contains("`crypto`"))
        );
        guard.rules = vec![rule(None, Some("checkout"), BlockEffect::NoCapture)];
        assert_eq!(guard.verdict(&spec("orders.rs", None), &index), Verdict::Run);
        assert!(guard.no_capture(&spec("orders.rs", None), &index));
        let mut watching = spec("orders.rs", None);
        watching.condition = Some("a > 1".into());
        assert!(matches!(guard.verdict(&watching, &index), Verdict::Refuse(_)));
    }
}
