//! What callers ask for, validated once for REST and MCP alike: the bounds of every
//! argument, the location, the expressions (parsed, with positions), each kind's own
//! parameters. A request that passes becomes an [`ActionSpec`] and a [`Placement`];
//! nothing reaches an agent before that.

use periscope_protocol::limits::action_bounds;
use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, CodeExpectation, ErrorCaptureSpec, FunctionTarget, Location, LogDestination,
    LogLevel, LogSpec, MetricKind, MetricSpec, SnapshotSpec,
};
use serde::Deserialize;

use crate::error::ApiError;
use crate::time::now_ms;

/// Most lines a log action may be capped at.
pub const MAX_MAX_LINES: u64 = 1_000_000;

/// Longest file argument accepted.
const MAX_FILE_LEN: usize = 1_024;

/// A snapshot as a caller asks for it (REST and MCP both build one).
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Agents by id (strings from the caller, validated here).
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// File path or suffix (with `line`; or `function` instead).
    pub file: Option<String>,
    /// Line.
    pub line: Option<u32>,
    /// A function (Python `module:qualname`) or span (Rust: its name, optionally after
    /// its module path and `::`), instead of `file` and `line`.
    pub function: Option<String>,
    /// For a function: capture only calls lasting at least this long.
    pub min_duration_ms: Option<u64>,
    /// Condition expression.
    pub condition: Option<String>,
    /// Watch expressions.
    pub watch: Vec<String>,
    /// Hits to collect (default 1, max 50).
    pub max_hits: Option<u32>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Capture a native backtrace too.
    pub backtrace: bool,
    /// Run only on agents whose service version or build (git commit, or a prefix of
    /// at least 7 characters) is this.
    pub expected_version: Option<String>,
    /// Run only on agents whose copy of `file` has this content hash (`sha256:<hex>`,
    /// as list_sources shows it).
    pub file_hash: Option<String>,
    /// Accept a location no target agent has reported yet (code that has not run).
    pub allow_pending: bool,
}

/// A dynamic log as a caller asks for it; also the body of `POST /api/v1/logs` (the
/// `place_log` tool's arguments).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogRequest {
    /// Agents by id.
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// File path or suffix (with `line`; or `function` instead).
    pub file: Option<String>,
    /// Line.
    pub line: Option<u32>,
    /// A function or span instead of `file` and `line`: one line per call, at its end,
    /// with `{duration_ms}`, `{return}` and the arguments to read.
    pub function: Option<String>,
    /// Text with `{expression}` placeholders.
    pub template: String,
    /// `trace`, `debug`, `info` (default), `warn`, `error`.
    pub level: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// `broker` (default), `app`, `both`.
    pub destination: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Stop after this many lines.
    pub max_lines: Option<u64>,
    /// Run only on agents whose service version or build (git commit, or a prefix of
    /// at least 7 characters) is this.
    pub expected_version: Option<String>,
    /// Run only on agents whose copy of `file` has this content hash (`sha256:<hex>`,
    /// as list_sources shows it).
    pub file_hash: Option<String>,
    /// Accept a location no agent has reported yet.
    pub allow_pending: bool,
}

/// A dynamic metric as a caller asks for it; also the body of `POST /api/v1/metrics`
/// (the `place_metric` tool's arguments).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricRequest {
    /// Agents by id.
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// `counter`, `duration`, `value`.
    pub kind: String,
    /// File path or suffix (with `line`; or `function` instead).
    pub file: Option<String>,
    /// Line.
    pub line: Option<u32>,
    /// A function or span instead of `file` and `line` (as in [`SnapshotRequest`]).
    pub function: Option<String>,
    /// For tic-toc durations: where the clock stops.
    pub end_file: Option<String>,
    /// For tic-toc durations: the line where the clock stops.
    pub end_line: Option<u32>,
    /// For `value`: the numeric expression.
    pub expression: Option<String>,
    /// Condition expression.
    pub condition: Option<String>,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
    /// Run only on agents whose service version or build (git commit, or a prefix of
    /// at least 7 characters) is this.
    pub expected_version: Option<String>,
    /// Run only on agents whose copy of `file` has this content hash (`sha256:<hex>`,
    /// as list_sources shows it).
    pub file_hash: Option<String>,
    /// Accept a location no agent has reported yet.
    pub allow_pending: bool,
}

/// What every placement shares once validated: whom it targets (still as the caller
/// named them: resolved against the agents by the placement) and whether an unknown
/// location is accepted.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Agents by id, as given.
    pub agent_ids: Vec<String>,
    /// Pool, as given.
    pub pool: Option<String>,
    /// Tags, as given.
    pub tags: Vec<String>,
    /// Accept a location no target agent has reported yet.
    pub allow_pending: bool,
}

/// Checks an argument against an inclusive range (never clamps); the error names the
/// argument, the range and the default. Used for every bounded argument of REST and MCP.
pub fn in_range(name: &str, value: u64, min: u64, max: u64, default: u64) -> Result<(), ApiError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ApiError::invalid(format!("{name} is {value}; allowed range is {min}..={max} (default {default})"))
        .with_details(serde_json::json!({ "field": name, "min": min, "max": max, "default": default })))
}

/// A wait in seconds (`wait_seconds` of long polls and `get_action`, 0 for none).
pub fn check_wait_seconds(name: &str, value: u64) -> Result<(), ApiError> {
    in_range(name, value, 0, action_bounds::MAX_WAIT_SECS, 0)
}

/// A page size (`limit`), 1 to `max`.
pub fn check_limit(value: usize, max: usize, default: usize) -> Result<(), ApiError> {
    in_range("limit", value as u64, 1, max as u64, default as u64)
}

fn truncate(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 512).to_owned()
}

/// A file and line as given: a path (or suffix) of 1 to 1,024 characters without
/// control characters, and a 1-based line.
pub fn validate_location(file: &str, line: u32) -> Result<Location, ApiError> {
    let file = file.trim();
    if file.is_empty() || file.len() > MAX_FILE_LEN || file.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "file must be a source path (or a suffix of one, like `src/orders.rs`) of 1 to {MAX_FILE_LEN} characters"
        )));
    }
    if line == 0 {
        return Err(ApiError::invalid("line must be 1 or more (lines are 1-based)"));
    }
    Ok(Location { file: file.to_owned(), line })
}

/// Longest function argument accepted.
const MAX_FUNCTION_LEN: usize = 512;

/// Slowest `min_duration_ms` accepted (an hour).
pub const MAX_MIN_DURATION_MS: u64 = 3_600_000;

/// Where an action goes, as given: a file and line, or a function. Exactly one of the
/// two; `min_duration_ms` only with a function.
pub fn validate_target(
    file: Option<&str>,
    line: Option<u32>,
    function: Option<&str>,
    min_duration_ms: Option<u64>,
) -> Result<(Location, Option<FunctionTarget>), ApiError> {
    let function = function.map(str::trim).filter(|f| !f.is_empty());
    match (function, file.map(str::trim).filter(|f| !f.is_empty()), line) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(ApiError::invalid(
            "give either `function` or `file` and `line`, not both (a function is found by name; list_sources \
             shows its file)",
        )),
        (Some(text), None, None) => {
            if text.len() > MAX_FUNCTION_LEN || text.chars().any(char::is_control) {
                return Err(ApiError::invalid(format!(
                    "function must be a name of 1 to {MAX_FUNCTION_LEN} characters: Python `module:qualname` \
                     (`shop.orders:Shop.checkout`), Rust a span name, optionally after its module path \
                     (`shop::orders::checkout`)"
                )));
            }
            if let Some(ms) = min_duration_ms {
                in_range("min_duration_ms", ms, 0, MAX_MIN_DURATION_MS, 0)?;
            }
            let target =
                FunctionTarget { min_duration_ms: min_duration_ms.filter(|ms| *ms > 0), ..FunctionTarget::parse(text) };
            // Where the function is gets filled in from the agents' catalogs at placement.
            Ok((Location { file: target.to_string(), line: 1 }, Some(target)))
        }
        (None, file, line) => {
            if min_duration_ms.is_some() {
                return Err(ApiError::invalid(
                    "min_duration_ms applies to a function (a call has a duration; a line does not): give \
                     `function` instead of `file` and `line`",
                ));
            }
            match (file, line) {
                (Some(file), Some(line)) => Ok((validate_location(file, line)?, None)),
                (None, None) => Err(ApiError::invalid(
                    "say where: `file` and `line` (list_sources shows inspectable lines), or `function` (a Python \
                     `module:qualname` or a Rust span name)",
                )),
                (Some(_), None) => Err(ApiError::invalid("`line` is missing: give `file` and `line`, or `function`")),
                (None, Some(_)) => Err(ApiError::invalid("`file` is missing: give `file` and `line`, or `function`")),
            }
        }
    }
}

/// Parses every expression of the action (condition, watches, template, metric
/// expression) so a bad one is refused at placement, with its position, before any agent
/// sees it.
pub fn check_expressions(spec: &ActionSpec) -> Result<(), ApiError> {
    let Err(e) = periscope_protocol::expr::ActionExprs::compile(spec) else { return Ok(()) };
    let source = match (e.field.as_str(), &spec.kind) {
        ("condition", _) => spec.condition.clone().unwrap_or_default(),
        ("template", ActionKind::Log(l)) => l.template.clone(),
        ("expression", ActionKind::Metric(m)) => m.expression.clone().unwrap_or_default(),
        (field, ActionKind::Snapshot(s)) => field
            .strip_prefix("watch[")
            .and_then(|i| i.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| s.watch.get(i).cloned())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let pe = &e.error;
    Err(ApiError::invalid(format!("{}: {}", e.field, pe)).with_details(serde_json::json!({
        "field": e.field,
        "position": pe.position,
        "line": pe.line,
        "column": pe.column,
        "expected": pe.expected,
        "found": pe.found,
        "source": pe.render(&source),
    })))
}

/// The code a placement expects (`expected_version`, `file_hash`), checked: printable,
/// bounded, a hash as `sha256:` and 64 hex digits (or the digits alone).
fn expectation(version: Option<&str>, file_hash: Option<&str>) -> Result<Option<CodeExpectation>, ApiError> {
    let version = version.map(str::trim).filter(|v| !v.is_empty());
    let file_hash = file_hash.map(str::trim).filter(|h| !h.is_empty());
    if let Some(v) = version
        && (v.len() > 128 || v.chars().any(char::is_control))
    {
        return Err(ApiError::invalid("expected_version must be at most 128 bytes of printable text"));
    }
    let file_hash = match file_hash {
        None => None,
        Some(h) => {
            let hex = h.strip_prefix("sha256:").unwrap_or(h);
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::invalid(format!(
                    "file_hash `{}` must be `sha256:` and 64 hex digits, as list_sources shows it (or `sha256sum` \
                     prints it)",
                    truncate(h)
                )));
            }
            Some(format!("sha256:{}", hex.to_ascii_lowercase()))
        }
    };
    if version.is_none() && file_hash.is_none() {
        return Ok(None);
    }
    Ok(Some(CodeExpectation { version: version.map(str::to_owned), file_hash }))
}

/// The spec every kind shares (a fresh id, the location, the condition, the expiry),
/// checked, with its expressions parsed.
fn spec(
    (location, function): (Location, Option<FunctionTarget>),
    condition: Option<&str>,
    expire_seconds: Option<u64>,
    kind: ActionKind,
) -> Result<ActionSpec, ApiError> {
    let expire = expire_seconds.unwrap_or(action_bounds::DEFAULT_EXPIRE_SECS);
    in_range("expire_seconds", expire, 1, action_bounds::MAX_EXPIRE_SECS, action_bounds::DEFAULT_EXPIRE_SECS)?;
    let condition = condition.map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned);
    let spec = ActionSpec {
        id: ActionId::generate(),
        location,
        condition,
        expires_at_ms: now_ms() + expire * 1_000,
        kind,
        function: function.map(Box::new),
        expect: None,
    };
    check_expressions(&spec)?;
    Ok(spec)
}

impl SnapshotRequest {
    /// The spec and placement this request asks for, or what is wrong with it.
    pub fn validate(&self) -> Result<(ActionSpec, Placement), ApiError> {
        let max_hits = self.max_hits.unwrap_or(action_bounds::DEFAULT_MAX_HITS);
        in_range(
            "max_hits",
            u64::from(max_hits),
            1,
            u64::from(action_bounds::MAX_MAX_HITS),
            u64::from(action_bounds::DEFAULT_MAX_HITS),
        )?;
        if self.watch.len() > action_bounds::MAX_WATCHES {
            return Err(ApiError::invalid(format!(
                "{} watch expressions given; at most {} are allowed",
                self.watch.len(),
                action_bounds::MAX_WATCHES
            )));
        }
        let watch: Vec<String> = self.watch.iter().map(|w| w.trim().to_owned()).collect();
        let kind = ActionKind::Snapshot(SnapshotSpec { max_hits, watch, backtrace: self.backtrace });
        let target = validate_target(self.file.as_deref(), self.line, self.function.as_deref(), self.min_duration_ms)?;
        let spec = spec(target, self.condition.as_deref(), self.expire_seconds, kind)?;
        let spec = ActionSpec {
            expect: expectation(self.expected_version.as_deref(), self.file_hash.as_deref())?.map(Box::new),
            ..spec
        };
        Ok((spec, placement(&self.agent_ids, &self.pool, &self.tags, self.allow_pending)))
    }
}

impl LogRequest {
    /// The spec and placement this request asks for, or what is wrong with it.
    pub fn validate(&self) -> Result<(ActionSpec, Placement), ApiError> {
        if self.template.trim().is_empty() {
            return Err(ApiError::invalid(
                "template must not be empty; write text with {expression} placeholders, e.g. \"user {user.id} paid {amount}\"",
            ));
        }
        let level = match self.level.as_deref().map(str::trim).unwrap_or("info") {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" => LogLevel::Error,
            other => {
                return Err(ApiError::invalid(format!(
                    "level `{}` must be one of trace, debug, info, warn, error",
                    truncate(other)
                )));
            }
        };
        let destination = match self.destination.as_deref().map(str::trim).unwrap_or("broker") {
            "broker" => LogDestination::Broker,
            "app" => LogDestination::App,
            "both" => LogDestination::Both,
            other => {
                return Err(ApiError::invalid(format!(
                    "destination `{}` must be broker (stored here), app (the service's own log) or both",
                    truncate(other)
                )));
            }
        };
        if let Some(n) = self.max_lines
            && !(1..=MAX_MAX_LINES).contains(&n)
        {
            return Err(ApiError::invalid(format!("max_lines is {n}; allowed range is 1..={MAX_MAX_LINES}")));
        }
        let kind =
            ActionKind::Log(LogSpec { template: self.template.clone(), level, destination, max_lines: self.max_lines });
        let target = validate_target(self.file.as_deref(), self.line, self.function.as_deref(), None)?;
        let spec = spec(target, self.condition.as_deref(), self.expire_seconds, kind)?;
        let spec = ActionSpec {
            expect: expectation(self.expected_version.as_deref(), self.file_hash.as_deref())?.map(Box::new),
            ..spec
        };
        Ok((spec, placement(&self.agent_ids, &self.pool, &self.tags, self.allow_pending)))
    }
}

impl MetricRequest {
    /// The spec and placement this request asks for (agents report every
    /// `report_interval_ms`), or what is wrong with it.
    pub fn validate(&self, report_interval_ms: u64) -> Result<(ActionSpec, Placement), ApiError> {
        let metric = match self.kind.trim() {
            "counter" => MetricKind::Counter,
            "duration" => MetricKind::Duration,
            "value" => MetricKind::Value,
            other => {
                return Err(ApiError::invalid(format!(
                    "kind `{}` must be counter (hits at the location), duration (a span's open time, or from \
                     file:line to end_file:end_line) or value (a numeric expression sampled at the location)",
                    truncate(other)
                )));
            }
        };
        let end_location = match (&self.end_file, self.end_line) {
            (None, None) => None,
            (Some(file), Some(line)) => {
                if metric != MetricKind::Duration {
                    return Err(ApiError::invalid("end_file and end_line are only used by duration metrics"));
                }
                Some(validate_location(file, line)?)
            }
            _ => return Err(ApiError::invalid("give both end_file and end_line (or neither)")),
        };
        let expression = self.expression.as_deref().map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned);
        match (metric, &expression) {
            (MetricKind::Value, None) => {
                return Err(ApiError::invalid(
                    "a value metric needs an `expression`: the number to sample, e.g. `order.total_cents / 100`",
                ));
            }
            (MetricKind::Counter | MetricKind::Duration, Some(_)) => {
                return Err(ApiError::invalid("`expression` is only used by value metrics"));
            }
            _ => {}
        }
        let target = validate_target(self.file.as_deref(), self.line, self.function.as_deref(), None)?;
        if target.1.is_some() && end_location.is_some() {
            return Err(ApiError::invalid(
                "a function's duration runs from its entry to its exit: end_file and end_line are for line metrics",
            ));
        }
        let kind = ActionKind::Metric(MetricSpec { metric, expression, end_location, report_interval_ms });
        let spec = spec(target, self.condition.as_deref(), self.expire_seconds, kind)?;
        let spec = ActionSpec {
            expect: expectation(self.expected_version.as_deref(), self.file_hash.as_deref())?.map(Box::new),
            ..spec
        };
        Ok((spec, placement(&self.agent_ids, &self.pool, &self.tags, self.allow_pending)))
    }
}

/// An error-capture action as a caller asks for it; also the body of
/// `POST /api/v1/errors/capture` (the `capture_errors` tool's arguments).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErrorCaptureRequest {
    /// Agents by id.
    pub agent_ids: Vec<String>,
    /// Pool to target.
    pub pool: Option<String>,
    /// Tags to target.
    pub tags: Vec<String>,
    /// Snapshots per agent over the action's life (default 20, 1 to 200).
    pub max_captures_per_agent: Option<u32>,
    /// At most one snapshot per location and error type in this many milliseconds
    /// (default and least 1000, at most 3,600,000).
    pub min_interval_ms: Option<u64>,
    /// A native backtrace with each ERROR event too (panics always carry one).
    pub backtrace: bool,
    /// Seconds the action stays live (default 3600, max 86400).
    pub expire_seconds: Option<u64>,
}

impl ErrorCaptureRequest {
    /// The spec and placement this request asks for, or what is wrong with it. The
    /// spec's location is [`ErrorCaptureSpec::location`]: everywhere.
    pub fn validate(&self) -> Result<(ActionSpec, Placement), ApiError> {
        let per_agent = self.max_captures_per_agent.unwrap_or(ErrorCaptureSpec::DEFAULT_PER_AGENT);
        in_range(
            "max_captures_per_agent",
            u64::from(per_agent),
            1,
            u64::from(ErrorCaptureSpec::MAX_PER_AGENT),
            u64::from(ErrorCaptureSpec::DEFAULT_PER_AGENT),
        )?;
        let interval = self.min_interval_ms.unwrap_or(ErrorCaptureSpec::DEFAULT_INTERVAL_MS);
        in_range(
            "min_interval_ms",
            interval,
            ErrorCaptureSpec::DEFAULT_INTERVAL_MS,
            3_600_000,
            ErrorCaptureSpec::DEFAULT_INTERVAL_MS,
        )?;
        let expire = self.expire_seconds.unwrap_or(action_bounds::DEFAULT_EXPIRE_SECS);
        in_range("expire_seconds", expire, 1, action_bounds::MAX_EXPIRE_SECS, action_bounds::DEFAULT_EXPIRE_SECS)?;
        let kind = ActionKind::CaptureErrors(ErrorCaptureSpec {
            max_captures_per_agent: per_agent,
            min_interval_ms: interval,
            backtrace: self.backtrace,
        });
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: ErrorCaptureSpec::location(),
            condition: None,
            expires_at_ms: now_ms() + expire * 1_000,
            kind,
            function: None,
            expect: None,
        };
        Ok((spec, placement(&self.agent_ids, &self.pool, &self.tags, true)))
    }
}

fn placement(agent_ids: &[String], pool: &Option<String>, tags: &[String], allow_pending: bool) -> Placement {
    Placement { agent_ids: agent_ids.to_vec(), pool: pool.clone(), tags: tags.to_vec(), allow_pending }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_with_their_range_and_default_whoever_asks() {
        let req =
            SnapshotRequest { file: Some("a.rs".into()), line: Some(1), max_hits: Some(100), ..Default::default() };
        let err = req.validate().unwrap_err();
        assert_eq!(err.message, "max_hits is 100; allowed range is 1..=50 (default 1)");
        let req =
            SnapshotRequest { file: Some("a.rs".into()), line: Some(1), expire_seconds: Some(0), ..Default::default() };
        assert!(req.validate().unwrap_err().message.starts_with("expire_seconds is 0; allowed range is 1..=86400"));
        assert!(check_wait_seconds("wait_seconds", 601).is_err() && check_wait_seconds("wait_seconds", 0).is_ok());
        let req = LogRequest {
            file: Some("a.rs".into()),
            line: Some(1),
            template: "x".into(),
            max_lines: Some(0),
            ..Default::default()
        };
        assert!(req.validate().unwrap_err().message.contains("max_lines"));
    }

    #[test]
    fn a_bad_expression_is_refused_with_its_position() {
        let req = SnapshotRequest {
            file: Some("a.rs".into()),
            line: Some(3),
            condition: Some("a ==".into()),
            ..Default::default()
        };
        let err = req.validate().unwrap_err();
        assert!(err.message.starts_with("condition:"), "{err}");
        assert!(err.details["position"].is_number());
    }

    #[test]
    fn a_target_is_a_file_and_line_or_a_function_never_both_and_min_duration_only_with_a_function() {
        let (location, function) = validate_target(None, None, Some(" shop.orders:Shop.checkout "), Some(250)).unwrap();
        let function = function.unwrap();
        assert_eq!((function.module.as_deref(), function.name.as_str()), (Some("shop.orders"), "Shop.checkout"));
        assert_eq!(function.min_duration_ms, Some(250));
        assert_eq!(location.line, 1, "filled in from the catalogs at placement");
        let (_, zero) = validate_target(None, None, Some("checkout"), Some(0)).unwrap();
        assert_eq!(zero.unwrap().min_duration_ms, None, "0 keeps every call");
        let (location, none) = validate_target(Some("a.rs"), Some(3), None, None).unwrap();
        assert_eq!((location.file.as_str(), location.line, none), ("a.rs", 3, None));
        let both = validate_target(Some("a.rs"), Some(3), Some("checkout"), None).unwrap_err();
        assert!(both.message.contains("not both"), "{}", both.message);
        let half = validate_target(None, Some(3), Some("checkout"), None).unwrap_err();
        assert!(half.message.contains("not both"), "{}", half.message);
        let slow_line = validate_target(Some("a.rs"), Some(3), None, Some(5)).unwrap_err();
        assert!(slow_line.message.contains("min_duration_ms applies to a function"), "{}", slow_line.message);
        let neither = validate_target(None, None, Some("  "), None).unwrap_err();
        assert!(neither.message.contains("`function`"), "{}", neither.message);
        assert!(validate_target(Some("a.rs"), None, None, None).unwrap_err().message.contains("`line` is missing"));
        assert!(validate_target(None, Some(3), None, None).unwrap_err().message.contains("`file` is missing"));
        let too_slow = validate_target(None, None, Some("f"), Some(MAX_MIN_DURATION_MS + 1)).unwrap_err();
        assert!(too_slow.message.contains("min_duration_ms"), "{}", too_slow.message);
        assert!(validate_target(None, None, Some("bad\nname"), None).is_err());
        let metric = MetricRequest {
            kind: "duration".into(),
            function: Some("checkout".into()),
            end_file: Some("a.rs".into()),
            end_line: Some(9),
            ..Default::default()
        };
        assert!(metric.validate(5_000).unwrap_err().message.contains("entry to its exit"));
    }
}
