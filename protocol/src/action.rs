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
    /// When set, the action is a function probe: it targets a function (Python) or a
    /// span (Rust) by name rather than a line, and `location` is only where the broker
    /// last saw that function (agents match by name). Absent for line actions, and
    /// ignored by agents older than function probes (they act at `location`). Boxed: a
    /// spec travels inside every `action_add`, most without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<Box<FunctionTarget>>,
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

impl ActionSpec {
    /// What the action targets, for people: `file:line`, or `function name` for a
    /// function probe.
    pub fn target_label(&self) -> String {
        match &self.function {
            Some(f) => format!("function {f}"),
            None => self.location.to_string(),
        }
    }
}

/// A function or span an action targets by name: arguments (span fields) at entry, the
/// return value or error and the duration at exit, in one hit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FunctionTarget {
    /// Python: the function's qualified name (`Shop.checkout`); Rust: the span's name.
    pub name: String,
    /// Python: the module (`shop.orders`); Rust: the span's module path or target, or
    /// a `::`-suffix of it. `None` matches the name in any module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Only calls that last at least this long produce a hit (snapshots); faster ones
    /// cost their entry capture and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration_ms: Option<u64>,
}

impl FunctionTarget {
    /// Reads a function as a caller names it: `module:qualname` (Python),
    /// `module::path::span_name` (Rust), or a bare name. Never fails: a name without a
    /// module separator is a bare name.
    pub fn parse(text: &str) -> FunctionTarget {
        let text = text.trim();
        let split = match text.rfind("::") {
            Some(i) => Some((&text[..i], &text[i + 2..])),
            None => text.rfind(':').map(|i| (&text[..i], &text[i + 1..])),
        };
        match split {
            Some((module, name)) if !module.trim().is_empty() && !name.trim().is_empty() => FunctionTarget {
                name: name.trim().to_owned(),
                module: Some(module.trim().to_owned()),
                min_duration_ms: None,
            },
            _ => FunctionTarget { name: text.to_owned(), module: None, min_duration_ms: None },
        }
    }

    /// Whether a function or span called `name` in `module` (a Python module, a Rust
    /// module path or target) is this one: the same name, and the same module or one
    /// ending with this one on a `::` or `.` boundary.
    pub fn matches(&self, name: &str, module: Option<&str>) -> bool {
        if name != self.name {
            return false;
        }
        let Some(wanted) = &self.module else { return true };
        let Some(module) = module else { return false };
        module == wanted
            || (module.len() > wanted.len()
                && module.ends_with(wanted.as_str())
                && (module[..module.len() - wanted.len()].ends_with("::")
                    || module[..module.len() - wanted.len()].ends_with('.')))
    }

    /// The minimum duration in clock nanoseconds (0 when every call counts).
    pub fn min_duration_nanos(&self) -> u64 {
        self.min_duration_ms.unwrap_or(0).saturating_mul(1_000_000)
    }
}

impl std::fmt::Display for FunctionTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.module {
            Some(m) if m.contains("::") => write!(f, "{m}::{}", self.name),
            Some(m) => write!(f, "{m}:{}", self.name),
            None => f.write_str(&self.name),
        }
    }
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
    /// Snapshot errors wherever they happen (no single location; see
    /// [`ErrorCaptureSpec`] for how the spec's `location` reads).
    CaptureErrors(ErrorCaptureSpec),
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
            ActionKind::CaptureErrors(_) => "capture_errors",
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

/// An error-capture action's parameters.
///
/// Such an action has no single location: it fires wherever the service fails (an
/// ERROR-level `tracing` event or a panic in Rust, an exception escaping the
/// application's own code in Python). Its [`ActionSpec::location`] is
/// [`ErrorCaptureSpec::location`] (file `*`, line 0), which no code location matches
/// (lines are 1-based), so an agent that does not know this kind can neither install it
/// anywhere nor mistake it for a line action: it answers `unsupported`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCaptureSpec {
    /// Snapshots each agent may take for this action over its life (the per-agent
    /// budget); later occurrences are still counted.
    #[serde(default = "ErrorCaptureSpec::default_per_agent")]
    pub max_captures_per_agent: u32,
    /// At most one snapshot per location and error type in this many milliseconds;
    /// occurrences in between are counted.
    #[serde(default = "ErrorCaptureSpec::default_interval")]
    pub min_interval_ms: u64,
    /// Capture a native backtrace with each ERROR event too (panics always carry one).
    #[serde(default)]
    pub backtrace: bool,
}

impl ErrorCaptureSpec {
    /// The file an error-capture action's location names: everywhere.
    pub const LOCATION_FILE: &'static str = "*";
    /// Default of `max_captures_per_agent`.
    pub const DEFAULT_PER_AGENT: u32 = 20;
    /// Most `max_captures_per_agent` may be.
    pub const MAX_PER_AGENT: u32 = 200;
    /// Default (and least) `min_interval_ms`: one capture per location per second.
    pub const DEFAULT_INTERVAL_MS: u64 = 1_000;

    fn default_per_agent() -> u32 {
        Self::DEFAULT_PER_AGENT
    }

    fn default_interval() -> u64 {
        Self::DEFAULT_INTERVAL_MS
    }

    /// The location an error-capture action carries (file `*`, line 0): it matches no
    /// code location.
    pub fn location() -> Location {
        Location { file: Self::LOCATION_FILE.to_owned(), line: 0 }
    }
}

impl Default for ErrorCaptureSpec {
    fn default() -> Self {
        ErrorCaptureSpec {
            max_captures_per_agent: Self::DEFAULT_PER_AGENT,
            min_interval_ms: Self::DEFAULT_INTERVAL_MS,
            backtrace: false,
        }
    }
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
    fn a_function_is_read_in_either_language_s_notation_and_matched_on_module_boundaries() {
        let py = FunctionTarget::parse("shop.orders:Shop.checkout");
        assert_eq!((py.module.as_deref(), py.name.as_str()), (Some("shop.orders"), "Shop.checkout"));
        assert!(py.matches("Shop.checkout", Some("shop.orders")));
        assert!(py.matches("Shop.checkout", Some("app.shop.orders")));
        assert!(!py.matches("Shop.checkout", Some("xshop.orders")));
        assert!(!py.matches("Shop.refund", Some("shop.orders")));
        assert_eq!(py.to_string(), "shop.orders:Shop.checkout");
        let rs = FunctionTarget::parse("demo::shop::checkout");
        assert_eq!((rs.module.as_deref(), rs.name.as_str()), (Some("demo::shop"), "checkout"));
        assert!(rs.matches("checkout", Some("demo::shop")) && rs.matches("checkout", Some("x::demo::shop")));
        assert_eq!(rs.to_string(), "demo::shop::checkout");
        let bare = FunctionTarget::parse(" checkout ");
        assert_eq!((bare.module, bare.name.as_str()), (None, "checkout"));
        assert!(FunctionTarget::parse("checkout").matches("checkout", None));
        assert_eq!(FunctionTarget::parse(":x").module, None);
    }

    #[test]
    fn a_spec_without_a_function_decodes_and_one_with_it_round_trips() {
        let old: ActionSpec = serde_json::from_str(
            r#"{"id":"act_1","location":{"file":"a.rs","line":3},"expires_at_ms":1,
                "kind":{"type":"snapshot","max_hits":1}}"#,
        )
        .unwrap();
        assert_eq!(old.function, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("function"));
        let mut new = old.clone();
        new.function = Some(Box::new(FunctionTarget { min_duration_ms: Some(250), ..FunctionTarget::parse("m:f") }));
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""function":{"name":"f","module":"m","min_duration_ms":250}"#), "{text}");
        assert_eq!(serde_json::from_str::<ActionSpec>(&text).unwrap(), new);
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

    #[test]
    fn an_error_capture_spec_round_trips_and_its_location_matches_no_code() {
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: ErrorCaptureSpec::location(),
            condition: None,
            expires_at_ms: 1,
            kind: ActionKind::CaptureErrors(ErrorCaptureSpec::default()),
            function: None,
            expect: None,
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains(r#""type":"capture_errors""#), "{text}");
        assert_eq!(serde_json::from_str::<ActionSpec>(&text).unwrap(), spec);
        assert!(!spec.location.file_matches("src/main.rs") && !spec.location.file_matches("*/x"));
        let bare: ActionKind = serde_json::from_str(r#"{"type":"capture_errors"}"#).unwrap();
        assert_eq!(bare, ActionKind::CaptureErrors(ErrorCaptureSpec::default()));
    }
}
