//! What a redaction pass found: where, and by which rule, never the value.
//!
//! A [`Report`] is filled by every redaction call and read by whoever needs to say
//! what was hidden (a hit's `redactions`, `periscope redact --report`). It holds paths
//! and rule ids only, so it can be logged, stored and returned to any client.

use serde::{Deserialize, Serialize};

/// One place a rule replaced (part of) a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Finding {
    /// Where: the path given by the caller, extended with field names, `[i]` for list
    /// items and `.key` for map entries (`fields.user.email`, `spans[0].token`).
    pub path: String,
    /// The rule's stable id (`email`, `credit_card`, `key:password`, `custom:<name>`).
    pub rule: String,
}

impl From<Finding> for periscope_protocol::RedactionFinding {
    fn from(f: Finding) -> Self {
        periscope_protocol::RedactionFinding { path: f.path, rule: f.rule }
    }
}

/// Findings of one or more redaction calls; cheap to create (no allocation until the
/// first finding) and to [`clear`](Report::clear) for reuse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    findings: Vec<Finding>,
    omitted: u64,
    /// Record nothing: for a pass whose findings nobody reads.
    discard: bool,
}

impl Report {
    /// Findings kept per report; past this they are only counted, so that redacting a
    /// huge document cannot grow the report without bound.
    pub const MAX_FINDINGS: usize = 10_000;

    /// How many recent findings are compared against to skip repeats (five emails in
    /// one log line are one finding).
    const DEDUP_WINDOW: usize = 16;

    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// A report that keeps nothing, so a pass whose findings nobody reads (a value an
    /// expression reads) allocates nothing for them.
    pub(crate) fn discarding() -> Report {
        Report { discard: true, ..Report::default() }
    }

    /// Forgets every finding, keeping the allocation.
    pub fn clear(&mut self) {
        self.findings.clear();
        self.omitted = 0;
    }

    /// The findings, in the order they were made, without close repeats.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Takes the findings out.
    pub fn into_findings(self) -> Vec<Finding> {
        self.findings
    }

    /// Number of findings kept.
    pub fn len(&self) -> usize {
        self.findings.len()
    }

    /// Whether nothing was redacted.
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty() && self.omitted == 0
    }

    /// Findings dropped past [`Report::MAX_FINDINGS`].
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    /// Whether `rule` fired anywhere.
    pub fn fired(&self, rule: &str) -> bool {
        self.findings.iter().any(|f| f.rule == rule)
    }

    pub(crate) fn record(&mut self, path: &str, rule: &str) {
        if self.discard {
            return;
        }
        let recent = self.findings.len().saturating_sub(Self::DEDUP_WINDOW);
        if self.findings.get(recent..).is_some_and(|w| w.iter().any(|f| f.path == path && f.rule == rule)) {
            return;
        }
        if self.findings.len() >= Self::MAX_FINDINGS {
            self.omitted += 1;
            return;
        }
        self.findings.push(Finding { path: path.to_owned(), rule: rule.to_owned() });
    }
}
