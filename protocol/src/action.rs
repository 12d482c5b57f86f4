//! What a client asks agents to do at a code location.
//!
//! An [`ActionSpec`] is the full, self-contained description the broker sends to an
//! agent: agents keep no other state about an action, so a reconnecting agent can be
//! brought up to date by re-sending the live specs ([`BrokerMessage::ActionSync`]).
//!
//! [`BrokerMessage::ActionSync`]: crate::BrokerMessage::ActionSync

use serde::{Deserialize, Serialize};

use crate::ids::ActionId;

/// A code location as a client names it: a file (or a path suffix of it) and a line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    /// Source file path as the agent reports it, or a suffix of it on a `/` boundary.
    pub file: String,
    /// 1-based line number.
    pub line: u32,
}

impl Location {
    /// Whether `reported` (a path from an agent's catalog) is this location's file:
    /// equal, or ending with it on a path-component boundary. `shop.rs` matches
    /// `demo/src/shop.rs`; `op.rs` does not.
    pub fn file_matches(&self, reported: &str) -> bool {
        file_matches(&self.file, reported)
    }
}

/// Path-suffix match on component boundaries, tolerant of `\` separators and `./`.
pub fn file_matches(wanted: &str, reported: &str) -> bool {
    let wanted = normalize_path(wanted);
    let reported = normalize_path(reported);
    if wanted.is_empty() {
        return false;
    }
    if reported == wanted {
        return true;
    }
    reported.len() > wanted.len()
        && reported.ends_with(wanted.as_str())
        && reported.as_bytes()[reported.len() - wanted.len() - 1] == b'/'
}

fn normalize_path(p: &str) -> String {
    let p = p.replace('\\', "/");
    let mut p = p.as_str();
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    p.to_owned()
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Everything an agent needs to run one action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// The action's id; hits and statuses refer to it.
    pub id: ActionId,
    /// Where to act.
    pub location: Location,
    /// Only act when this expression is true (expression language source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// When the action stops by itself, Unix time in milliseconds. Agents stop at this
    /// time even if the broker's removal never arrives.
    pub expires_at_ms: u64,
    /// What to do when the location is hit.
    pub kind: ActionKind,
    /// The code the action was written against; an agent running other code refuses
    /// the action (a snapshot on the wrong version of a file is worse than none).
    /// Boxed: most actions name none, and specs travel in every sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Box<CodeExpectation>>,
}

/// Which code an action may run on: a service version (or build), a file's content
/// hash, or both. Agents compare them with what they run and refuse on a difference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CodeExpectation {
    /// The service version or build (git commit) the agent must report. A build given
    /// as a prefix of at least 7 characters matches the full commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The content hash (`sha256:<hex>`) the location's file must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_hash: Option<String>,
}

impl CodeExpectation {
    /// Why an agent running `service_version` and `build` may not run the action, or
    /// `None` when the version matches (or none is expected).
    pub fn version_mismatch(&self, service_version: &str, build: &str) -> Option<String> {
        let want = self.version.as_deref()?;
        if version_matches(want, service_version, build) {
            return None;
        }
        let running = match (service_version.is_empty(), build.is_empty()) {
            (true, true) => "no version (the agent reports none)".to_owned(),
            (false, true) => format!("version `{service_version}`"),
            (true, false) => format!("build `{build}`"),
            (false, false) => format!("version `{service_version}` build `{build}`"),
        };
        Some(format!("code version differs: the action expects `{want}`, this agent runs {running}"))
    }

    /// Why the file with content hash `actual` (`None`: unknown to the agent) does not
    /// match, or `None` when it does (or no hash is expected).
    pub fn hash_mismatch(&self, file: &str, actual: Option<&str>) -> Option<String> {
        let want = self.file_hash.as_deref()?;
        match actual {
            Some(h) if hash_matches(want, h) => None,
            Some(h) => Some(format!("file hash differs: the action expects `{want}` for {file}, this agent has `{h}`")),
            None => Some(format!(
                "file hash unknown: the action expects `{want}` for {file}, and this agent cannot read that file's \
                 source to hash it"
            )),
        }
    }
}

/// Whether an expected version names the running code: the service version exactly, or
/// the build exactly or as a commit prefix of at least 7 characters.
pub fn version_matches(want: &str, service_version: &str, build: &str) -> bool {
    let want = want.trim();
    if want.is_empty() {
        return true;
    }
    (!service_version.is_empty() && want == service_version)
        || (!build.is_empty() && (want == build || (want.len() >= 7 && build.starts_with(want))))
}

/// Whether two content hashes are the same; the `sha256:` prefix is optional and hex
/// digits compare without case.
pub fn hash_matches(want: &str, actual: &str) -> bool {
    let strip = |h: &str| h.trim().strip_prefix("sha256:").unwrap_or(h.trim()).to_ascii_lowercase();
    let w = strip(want);
    !w.is_empty() && w == strip(actual)
}

/// The three things an action can do at a location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionKind {
    /// Capture the fields, span stack and watches at the location.
    Snapshot(SnapshotSpec),
    /// Emit a formatted line every time the location is hit.
    Log(LogSpec),
    /// Aggregate a count, duration or value at the location.
    Metric(MetricSpec),
    /// A kind this side does not know (sent by a newer peer); agents answer it with
    /// an error status instead of dropping the whole message.
    #[serde(other)]
    Unsupported,
}

impl ActionKind {
    /// The kind's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::Snapshot(_) => "snapshot",
            ActionKind::Log(_) => "log",
            ActionKind::Metric(_) => "metric",
            ActionKind::Unsupported => "unsupported",
        }
    }
}

/// A snapshot's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// Hits to collect before the action completes.
    pub max_hits: u32,
    /// Expressions evaluated at each hit and reported beside the fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// Capture a native backtrace too (costly: only when asked).
    #[serde(default)]
    pub backtrace: bool,
}

/// A dynamic log's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSpec {
    /// Text with `{expression}` placeholders.
    pub template: String,
    /// Level of the emitted line.
    #[serde(default)]
    pub level: LogLevel,
    /// Where lines go.
    #[serde(default)]
    pub destination: LogDestination,
    /// Stop after this many lines, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lines: Option<u64>,
}

/// Severity of a dynamic log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

/// Where a dynamic log line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogDestination {
    /// Sent to the broker, stored and readable through `get_action`.
    #[default]
    Broker,
    /// Emitted through the service's own logging, wherever its logs go.
    App,
    /// Both.
    Both,
}

/// A dynamic metric's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricSpec {
    /// What is measured.
    pub metric: MetricKind,
    /// For `value` metrics: the numeric expression sampled at each hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    /// For tic-toc durations: where the clock stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_location: Option<Location>,
    /// How often the agent reports its aggregate, in milliseconds.
    #[serde(default = "default_report_interval")]
    pub report_interval_ms: u64,
}

fn default_report_interval() -> u64 {
    5_000
}

/// The kinds of dynamic metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Times the location was hit (under the condition, when there is one).
    Counter,
    /// How long a span stays open, or time between two locations.
    Duration,
    /// A numeric expression sampled at each hit.
    Value,
}

/// What an agent reports about one of its actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentActionState {
    /// Installed on at least one known callsite.
    Installed {
        /// How many callsites matched the location.
        callsites: u32,
    },
    /// Accepted, but no callsite at that location has run yet; it will be armed as soon
    /// as one registers.
    Pending,
    /// The agent cannot run this action.
    Error {
        /// Why, in a sentence.
        reason: String,
    },
    /// A budget ran out; the action resumes by itself.
    Paused {
        /// Which budget.
        reason: PauseReason,
        /// Details for a reader.
        #[serde(default)]
        message: String,
    },
    /// Running again after a pause.
    Resumed,
    /// Done on this agent (hit count or line cap reached).
    Completed,
    /// Expression evaluation failed at run time (reported once per action and kind).
    EvalError {
        /// What went wrong, e.g. a type mismatch.
        reason: String,
        /// The error's stable code (`type_mismatch`, `redacted`, ...; see
        /// `expr::EvalError::code`); absent from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
}

/// Why an action stopped producing for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PauseReason {
    /// The agent's CPU budget for conditions and captures ran out.
    QuotaCpu,
    /// The dynamic log line or byte budget ran out.
    QuotaLog,
    /// The hit rate limit for the action or agent was reached.
    RateLimited,
    /// The action passed its expiry.
    Expired,
    /// A reason this side does not know.
    #[serde(other)]
    Other,
}

impl PauseReason {
    /// The stable wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            PauseReason::QuotaCpu => "quota_cpu",
            PauseReason::QuotaLog => "quota_log",
            PauseReason::RateLimited => "rate_limited",
            PauseReason::Expired => "expired",
            PauseReason::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_suffix_matches_on_component_boundaries_only() {
        assert!(file_matches("shop.rs", "demo/src/shop.rs"));
        assert!(file_matches("src/shop.rs", "demo/src/shop.rs"));
        assert!(file_matches("./demo/src/shop.rs", "demo/src/shop.rs"));
        assert!(file_matches("src/shop.rs", r"demo\src\shop.rs"));
        assert!(!file_matches("op.rs", "demo/src/shop.rs"));
        assert!(!file_matches("", "demo/src/shop.rs"));
        assert!(!file_matches("demo/src/shop.rs", "shop.rs"));
    }

    #[test]
    fn an_eval_error_status_carries_its_code_and_older_ones_without_it_still_decode() {
        let old: AgentActionState = serde_json::from_str(r#"{"state":"eval_error","reason":"x"}"#).unwrap();
        assert_eq!(old, AgentActionState::EvalError { reason: "x".into(), code: None });
        let new = AgentActionState::EvalError { reason: "y".into(), code: Some("redacted".into()) };
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(text, r#"{"state":"eval_error","reason":"y","code":"redacted"}"#);
        assert_eq!(serde_json::from_str::<AgentActionState>(&text).unwrap(), new);
    }

    #[test]
    fn an_unknown_action_kind_decodes_as_unsupported() {
        let spec: ActionSpec = serde_json::from_str(
            r#"{"id":"act_1","location":{"file":"a.rs","line":3},"expires_at_ms":1,
                "kind":{"type":"profile","hz":99}}"#,
        )
        .unwrap();
        assert_eq!(spec.kind, ActionKind::Unsupported);
    }
}
