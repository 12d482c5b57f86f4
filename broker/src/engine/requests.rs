//! What callers ask for, validated once for REST and MCP alike: the bounds of every
//! argument, the location, the expressions (parsed, with positions), each kind's own
//! parameters. A request that passes becomes an [`ActionSpec`] and a [`Placement`];
//! nothing reaches an agent before that.

use periscope_protocol::limits::action_bounds;
use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, CodeExpectation, Location, LogDestination, LogLevel, LogSpec, MetricKind,
    MetricSpec, SnapshotSpec,
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
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
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
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
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
    /// File path or suffix.
    pub file: String,
    /// Line.
    pub line: u32,
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
    file: &str,
    line: u32,
    condition: Option<&str>,
    expire_seconds: Option<u64>,
    kind: ActionKind,
) -> Result<ActionSpec, ApiError> {
    let expire = expire_seconds.unwrap_or(action_bounds::DEFAULT_EXPIRE_SECS);
    in_range("expire_seconds", expire, 1, action_bounds::MAX_EXPIRE_SECS, action_bounds::DEFAULT_EXPIRE_SECS)?;
    let location = validate_location(file, line)?;
    let condition = condition.map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned);
    let spec = ActionSpec {
        id: ActionId::generate(),
        location,
        condition,
        expires_at_ms: now_ms() + expire * 1_000,
        kind,
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
        let spec = spec(&self.file, self.line, self.condition.as_deref(), self.expire_seconds, kind)?;
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
        let spec = spec(&self.file, self.line, self.condition.as_deref(), self.expire_seconds, kind)?;
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
        let kind = ActionKind::Metric(MetricSpec { metric, expression, end_location, report_interval_ms });
        let spec = spec(&self.file, self.line, self.condition.as_deref(), self.expire_seconds, kind)?;
        let spec = ActionSpec {
            expect: expectation(self.expected_version.as_deref(), self.file_hash.as_deref())?.map(Box::new),
            ..spec
        };
        Ok((spec, placement(&self.agent_ids, &self.pool, &self.tags, self.allow_pending)))
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
        let req = SnapshotRequest { file: "a.rs".into(), line: 1, max_hits: Some(100), ..Default::default() };
        let err = req.validate().unwrap_err();
        assert_eq!(err.message, "max_hits is 100; allowed range is 1..=50 (default 1)");
        let req = SnapshotRequest { file: "a.rs".into(), line: 1, expire_seconds: Some(0), ..Default::default() };
        assert!(req.validate().unwrap_err().message.starts_with("expire_seconds is 0; allowed range is 1..=86400"));
        assert!(check_wait_seconds("wait_seconds", 601).is_err() && check_wait_seconds("wait_seconds", 0).is_ok());
        let req =
            LogRequest { file: "a.rs".into(), line: 1, template: "x".into(), max_lines: Some(0), ..Default::default() };
        assert!(req.validate().unwrap_err().message.contains("max_lines"));
    }

    #[test]
    fn a_bad_expression_is_refused_with_its_position() {
        let req =
            SnapshotRequest { file: "a.rs".into(), line: 3, condition: Some("a ==".into()), ..Default::default() };
        let err = req.validate().unwrap_err();
        assert!(err.message.starts_with("condition:"), "{err}");
        assert!(err.details["position"].is_number());
    }
}
