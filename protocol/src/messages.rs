//! Messages between agents and the broker.
//!
//! One JSON object per WebSocket text frame, tagged by `type`. Messages are named by
//! direction: [`AgentMessage`] flows agent → broker, [`BrokerMessage`] broker → agent.
//!
//! # Session
//!
//! 1. The agent opens `GET /agents` with its agent key in the `Authorization: Bearer`
//!    header (refused with HTTP 401 before the upgrade when missing or wrong).
//! 2. Its first frame is [`AgentMessage::Register`], carrying [`PROTOCOL_VERSION`].
//!    The broker answers [`BrokerMessage::Registered`] (limits and quotas to apply) and
//!    then [`BrokerMessage::ActionSync`] with every live action aimed at the agent; or
//!    [`BrokerMessage::Error`] with `fatal: true` and closes.
//! 3. Then, in any order: catalog updates, hits, statuses and heartbeats from the agent;
//!    action additions and removals from the broker.
//! 4. Either side may send `Goodbye` before closing.
//!
//! Unknown fields are ignored everywhere, so either side may add optional fields
//! without a version bump; a new message type or a changed meaning bumps the version.

use serde::{Deserialize, Serialize};

use crate::action::{ActionSpec, AgentActionState};
use crate::catalog::{CatalogEntry, FileLines};
use crate::hit::Hit;
use crate::ids::{ActionId, AgentId};
use crate::limits::{AgentQuotas, CaptureLimits};
use crate::telemetry::{LogLine, MetricReport};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every version this crate can speak, newest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// Largest frame either side accepts (Sidekick uses 1 MiB).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// HTTP path of the agent gateway.
pub const AGENT_GATEWAY_PATH: &str = "/agents";

/// Messages from an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame: who the agent is.
    Register(Box<Registration>),
    /// Liveness plus counters, at the interval the broker asked for.
    Heartbeat(Heartbeat),
    /// New or changed inspectable locations.
    Catalog(CatalogUpdate),
    /// An action changed state on this agent.
    ActionStatus(ActionStatusUpdate),
    /// An action fired.
    Hit(Box<Hit>),
    /// Dynamic log lines, batched.
    LogLines {
        /// The lines, oldest first (at most [`crate::telemetry::MAX_LOG_LINES_PER_FRAME`]).
        lines: Vec<LogLine>,
    },
    /// Metric aggregates for the last interval.
    Metrics {
        /// One report per metric action (at most [`crate::telemetry::MAX_METRIC_REPORTS_PER_FRAME`]).
        reports: Vec<MetricReport>,
    },
    /// How often each distinct error happened since the last report (error-capture
    /// actions only; sent about once a second while errors happen).
    ErrorCounts {
        /// One per action, location and error type (at most
        /// [`crate::errors::MAX_ERROR_COUNTS_PER_FRAME`]).
        reports: Vec<crate::errors::ErrorCount>,
    },
    /// The agent is closing on purpose (the host is shutting down).
    Goodbye {
        /// Why, for the broker's records.
        reason: String,
    },
}

impl AgentMessage {
    /// The message's wire name, for logs and errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            AgentMessage::Register(_) => "register",
            AgentMessage::Heartbeat(_) => "heartbeat",
            AgentMessage::Catalog(_) => "catalog",
            AgentMessage::ActionStatus(_) => "action_status",
            AgentMessage::Hit(_) => "hit",
            AgentMessage::LogLines { .. } => "log_lines",
            AgentMessage::Metrics { .. } => "metrics",
            AgentMessage::ErrorCounts { .. } => "error_counts",
            AgentMessage::Goodbye { .. } => "goodbye",
        }
    }
}

/// Messages from the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BrokerMessage {
    /// Registration accepted.
    Registered(Registered),
    /// The complete set of live actions for this agent; anything else the agent runs
    /// must be removed. Sent after registration and whenever the broker resyncs.
    ActionSync {
        /// Every live action aimed at the agent.
        actions: Vec<ActionSpec>,
    },
    /// One more action.
    ActionAdd {
        /// The action to install.
        action: ActionSpec,
    },
    /// Stop running an action.
    ActionRemove {
        /// Which one.
        action_id: ActionId,
        /// Why (completed, removed, expired, quota), for the agent's logs.
        reason: String,
    },
    /// The redaction rules to apply from now on (sent after registration and whenever
    /// an operator changes them). Hits and lines say which version redacted them.
    RedactionRules {
        /// Monotonic rules version.
        version: u64,
        /// The rules (a `periscope_redaction::RedactionConfig` as JSON; kept opaque here
        /// so the protocol crate does not depend on the engine).
        config: serde_json::Value,
    },
    /// Where no action may run or no value may be captured (sent after registration and
    /// whenever an operator changes the blocklist). Replaces the previous rules whole.
    Blocklist {
        /// Monotonic version of the organization's safety settings.
        version: u64,
        /// The rules in force for this agent.
        rules: Vec<crate::blocklist::BlockRule>,
    },
    /// Something the agent sent was refused. When `fatal`, the broker closes next.
    Error(ProtocolErrorBody),
    /// The broker is closing on purpose (shutdown); reconnect later.
    Goodbye {
        /// Why.
        reason: String,
    },
}

/// Who an agent is; the first frame of every session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Version of this protocol the agent speaks.
    pub protocol_version: u32,
    /// Stable for the life of the process, across reconnects.
    pub agent_id: AgentId,
    /// Human-readable name (defaults to service@host).
    pub display_name: String,
    /// Group of agents placed together; agent keys are per pool.
    pub pool: String,
    /// Labels to target by (`env:prod`, `canary`, `region:eu`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Logical service name.
    pub service: String,
    /// Service build or release version.
    #[serde(default)]
    pub service_version: String,
    /// Language of the instrumented program (`rust`, `python`).
    pub language: String,
    /// Runtime and its version (`rustc 1.95`, `cpython 3.11`).
    #[serde(default)]
    pub runtime: String,
    /// Host name.
    #[serde(default)]
    pub host: String,
    /// Process id.
    #[serde(default)]
    pub pid: u32,
    /// The build the service runs (a git commit, from `PERISCOPE_BUILD`, common CI
    /// variables, or set by the host at build time); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build: String,
    /// Version of the agent library.
    pub agent_version: String,
    /// What the agent can do (`snapshot`, `log`, `metric`, `conditions`, `backtrace`).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// Bounds on registration fields; they become labels and index keys at the broker.
pub mod registration_bounds {
    /// Longest pool, service, host or version string.
    pub const MAX_NAME_LEN: usize = 128;
    /// Most tags per agent.
    pub const MAX_TAGS: usize = 32;
    /// Longest tag.
    pub const MAX_TAG_LEN: usize = 64;
    /// Most capabilities listed.
    pub const MAX_CAPABILITIES: usize = 32;
}

impl Registration {
    /// Checks the registration is usable: known version, non-empty names, bounded sizes,
    /// tags and pool drawn from a safe alphabet.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        use registration_bounds::*;
        if !SUPPORTED_VERSIONS.contains(&self.protocol_version) {
            return Err(ProtocolError::UnsupportedVersion { got: self.protocol_version });
        }
        let invalid = |detail: String| Err(ProtocolError::InvalidRegistration { detail });
        for (name, value) in [("pool", &self.pool), ("service", &self.service), ("language", &self.language)] {
            if value.is_empty() {
                return invalid(format!("`{name}` must not be empty"));
            }
        }
        if !is_label(&self.pool, MAX_NAME_LEN) {
            return invalid(format!("`pool` must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ : -"));
        }
        for (name, value) in [
            ("display_name", &self.display_name),
            ("service", &self.service),
            ("service_version", &self.service_version),
            ("language", &self.language),
            ("runtime", &self.runtime),
            ("host", &self.host),
            ("agent_version", &self.agent_version),
            ("build", &self.build),
        ] {
            if value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
                return invalid(format!("`{name}` must be at most {MAX_NAME_LEN} bytes of printable text"));
            }
        }
        if self.tags.len() > MAX_TAGS {
            return invalid(format!("at most {MAX_TAGS} tags are allowed, got {}", self.tags.len()));
        }
        if let Some(bad) = self.tags.iter().find(|t| !is_label(t, MAX_TAG_LEN)) {
            return invalid(format!(
                "tag `{}` must be 1 to {MAX_TAG_LEN} characters from A-Z a-z 0-9 . _ : = / -",
                crate::value::truncate_chars(bad, 80)
            ));
        }
        if self.capabilities.len() > MAX_CAPABILITIES || self.capabilities.iter().any(|c| !is_label(c, MAX_TAG_LEN)) {
            return invalid(format!("at most {MAX_CAPABILITIES} capabilities of simple names are allowed"));
        }
        Ok(())
    }
}

/// Whether `s` is a non-empty label of at most `max` bytes from `[A-Za-z0-9._:=/-]`.
pub fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'=' | b'/' | b'-'))
}

/// The broker's answer to a good registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The agent id, echoed.
    pub agent_id: AgentId,
    /// The protocol version the session will use.
    pub protocol_version: u32,
    /// Broker build version, for diagnostics.
    #[serde(default)]
    pub broker_version: String,
    /// Limits to apply to every capture.
    #[serde(default)]
    pub limits: CaptureLimits,
    /// Budgets to enforce on itself.
    #[serde(default)]
    pub quotas: AgentQuotas,
    /// How often to send a heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
}

/// Liveness and counters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    /// Hits sent since the agent started.
    pub hits_sent: u64,
    /// Hits dropped because the outbound queue was full.
    pub hits_dropped_queue_full: u64,
    /// Hits dropped by the agent's own rate limits.
    pub hits_dropped_rate: u64,
    /// Hits dropped because the broker was unreachable.
    pub hits_dropped_disconnected: u64,
    /// Items waiting in the outbound queue.
    pub queue_len: u64,
    /// Actions currently installed.
    pub actions: u64,
    /// Function probe calls not held because their action's table of calls in flight
    /// was full (calls that never end, such as spans never closed, fill it).
    pub calls_dropped_open: u64,
}

/// New or changed catalog entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogUpdate {
    /// When true, these entries are the whole catalog (sent after each registration).
    #[serde(default)]
    pub full: bool,
    /// The entries.
    #[serde(default)]
    pub entries: Vec<CatalogEntry>,
    /// Whole source files with their executable lines (languages where every line is a
    /// location); a later copy of a file replaces the earlier one. Brokers that predate
    /// it ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileLines>,
}

/// Most catalog entries per update frame; larger catalogs are split over frames.
pub const MAX_CATALOG_ENTRIES_PER_FRAME: usize = 500;

/// Most source files per update frame (a large module's entry is tens of kilobytes).
pub const MAX_CATALOG_FILES_PER_FRAME: usize = 20;

/// What a catalog frame should hold at most, in bytes (a single larger entry goes alone).
/// A WebSocket peer's read buffer grows to the largest frame it has read and keeps that
/// size: a broker holding ten thousand sessions keeps each one's buffer at the size of
/// a few hits only if catalogs come in frames this small.
pub const CATALOG_FRAME_BYTES: usize = 3 * 1024;

impl CatalogUpdate {
    /// A catalog as update frames of at most [`CATALOG_FRAME_BYTES`] (an entry larger than
    /// that alone in its frame), [`MAX_CATALOG_ENTRIES_PER_FRAME`] entries and
    /// [`MAX_CATALOG_FILES_PER_FRAME`] files; the first marked `full` when it is the
    /// whole catalog (then there is always at least one frame, even for an empty one).
    pub fn frames(entries: Vec<CatalogEntry>, files: Vec<FileLines>, full: bool) -> Vec<CatalogUpdate> {
        let mut frames: Vec<CatalogUpdate> = Vec::new();
        let mut current = CatalogUpdate { full, entries: Vec::new(), files: Vec::new() };
        let mut bytes = 0;
        let push = |current: &mut CatalogUpdate, bytes: &mut usize, frames: &mut Vec<CatalogUpdate>| {
            let next = CatalogUpdate { full: false, entries: Vec::new(), files: Vec::new() };
            frames.push(std::mem::replace(current, next));
            *bytes = 0;
        };
        for e in entries {
            let n = json_len(&e);
            if !current.entries.is_empty()
                && (bytes + n > CATALOG_FRAME_BYTES || current.entries.len() >= MAX_CATALOG_ENTRIES_PER_FRAME)
            {
                push(&mut current, &mut bytes, &mut frames);
            }
            bytes += n;
            current.entries.push(e);
        }
        for f in files {
            let n = json_len(&f);
            let occupied = !current.entries.is_empty() || !current.files.is_empty();
            if occupied && (bytes + n > CATALOG_FRAME_BYTES || current.files.len() >= MAX_CATALOG_FILES_PER_FRAME) {
                push(&mut current, &mut bytes, &mut frames);
            }
            bytes += n;
            current.files.push(f);
        }
        if !current.entries.is_empty() || !current.files.is_empty() || (full && frames.is_empty()) {
            frames.push(current);
        }
        frames
    }
}

/// The length of a value's JSON, without building it.
fn json_len<T: Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    // And the comma between elements.
    c.0 + 1
}

/// An action's state on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionStatusUpdate {
    /// Which action.
    pub action_id: ActionId,
    /// Its state now.
    #[serde(flatten)]
    pub state: AgentActionState,
}

/// Stable error codes on the agent protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProtocolErrorCode {
    /// The frame is not a message this side understands.
    MalformedFrame,
    /// The frame exceeds [`MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// The agent speaks a protocol version the broker does not.
    UnsupportedVersion,
    /// Registration fields are missing or out of bounds.
    InvalidRegistration,
    /// The agent key does not allow this (wrong pool, revoked).
    Unauthorized,
    /// Another live session already holds this agent id.
    DuplicateAgent,
    /// The agent id belongs to another agent key or pool: the one that registered it
    /// first, which it stays bound to while the broker remembers it.
    IdentityBound,
    /// A message arrived out of order (anything before `register`, or a second `register`).
    UnexpectedMessage,
    /// The agent exceeded its budgets too often.
    RateLimited,
    /// No registration arrived in time.
    RegistrationTimeout,
    /// A code this side does not know.
    #[serde(other)]
    Other,
}

/// The body of [`BrokerMessage::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolErrorBody {
    /// Stable code.
    pub code: ProtocolErrorCode,
    /// What was wrong, in a sentence that names the field or limit.
    pub message: String,
    /// When true the broker closes the connection after this frame.
    #[serde(default)]
    pub fatal: bool,
    /// Protocol versions the broker speaks (set for `unsupported_version`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_versions: Vec<u32>,
}

/// A frame that cannot be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not valid JSON, or not a known message shape.
    #[error("malformed frame: {detail}")]
    Malformed {
        /// The decoder's explanation: what was expected, at which line and column.
        detail: String,
    },
    /// Larger than the frame limit.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Size of the frame.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A version the broker does not speak.
    #[error("protocol version {got} is not supported; this broker speaks {}", versions_list())]
    UnsupportedVersion {
        /// The version the agent asked for.
        got: u32,
    },
    /// Registration fields out of bounds.
    #[error("invalid registration: {detail}")]
    InvalidRegistration {
        /// Which field and what is wrong.
        detail: String,
    },
    /// Binary frames are not part of the protocol.
    #[error("binary frames are not part of the protocol; send JSON text frames")]
    BinaryFrame,
}

fn versions_list() -> String {
    SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

impl ProtocolError {
    /// The stable code for this error.
    pub fn code(&self) -> ProtocolErrorCode {
        match self {
            ProtocolError::Malformed { .. } | ProtocolError::BinaryFrame => ProtocolErrorCode::MalformedFrame,
            ProtocolError::TooLarge { .. } => ProtocolErrorCode::FrameTooLarge,
            ProtocolError::UnsupportedVersion { .. } => ProtocolErrorCode::UnsupportedVersion,
            ProtocolError::InvalidRegistration { .. } => ProtocolErrorCode::InvalidRegistration,
        }
    }

    /// The frame that reports this error to the peer.
    pub fn to_body(&self, fatal: bool) -> ProtocolErrorBody {
        ProtocolErrorBody {
            code: self.code(),
            message: self.to_string(),
            fatal,
            supported_versions: match self {
                ProtocolError::UnsupportedVersion { .. } => SUPPORTED_VERSIONS.to_vec(),
                _ => Vec::new(),
            },
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(frame: &str) -> Result<T, ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge { size: frame.len(), max: MAX_FRAME_BYTES });
    }
    serde_json::from_str(frame).map_err(|e| ProtocolError::Malformed { detail: e.to_string() })
}

/// Decodes one frame from an agent.
///
/// The frames agents send by the thousand (hits, log lines, metric reports) are read
/// straight into their payload when the frame starts with their `type`, as every agent
/// writes it: serde's internally tagged enums first copy the whole frame into an
/// intermediate tree to find the tag, which costs more than the parse itself (about 2.8×
/// for a 2 KB hit; BENCHMARKS.md, "Decoding agent frames"). Any other frame, and any
/// frame the direct read refuses, takes the enum's own path, so errors are unchanged.
pub fn decode_agent_message(frame: &str) -> Result<AgentMessage, ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge { size: frame.len(), max: MAX_FRAME_BYTES });
    }
    decode_frequent(frame).map_or_else(|| decode(frame), Ok)
}

/// [`decode_agent_message`]'s direct read of a hit, log-lines or metrics frame whose
/// first key is its `type` (the payload types ignore the `type` key as unknown).
fn decode_frequent(frame: &str) -> Option<AgentMessage> {
    #[derive(Deserialize)]
    struct Lines {
        lines: Vec<LogLine>,
    }
    #[derive(Deserialize)]
    struct Reports {
        reports: Vec<MetricReport>,
    }
    let rest = frame.trim_start().strip_prefix('{')?.trim_start().strip_prefix("\"type\"")?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    if rest.starts_with("\"hit\"") {
        serde_json::from_str::<Hit>(frame).ok().map(|h| AgentMessage::Hit(Box::new(h)))
    } else if rest.starts_with("\"log_lines\"") {
        serde_json::from_str::<Lines>(frame).ok().map(|l| AgentMessage::LogLines { lines: l.lines })
    } else if rest.starts_with("\"metrics\"") {
        serde_json::from_str::<Reports>(frame).ok().map(|r| AgentMessage::Metrics { reports: r.reports })
    } else {
        None
    }
}

/// Decodes one frame from the broker.
pub fn decode_broker_message(frame: &str) -> Result<BrokerMessage, ProtocolError> {
    decode(frame)
}

/// Encodes a message as one frame's text.
pub fn encode<T: Serialize>(message: &T) -> String {
    // Our message types hold only strings, numbers and maps with string keys, and
    // floats serialized through `Value` are always finite or strings: encoding cannot fail.
    serde_json::to_string(message)
        .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"other","message":"encoding failed: {e}"}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_goes_in_small_frames_and_a_large_entry_alone() {
        use crate::{CatalogEntry, FileLines, LineSet, LocationKind};
        let entry = |i: u32| CatalogEntry {
            file: format!("src/handlers/module_{}.rs", i / 20),
            line: i,
            kind: LocationKind::Event,
            name: format!("event src/handlers/module_{}.rs:{i}", i / 20),
            module: Some("shop::handlers".into()),
            level: Some("info".into()),
            fields: vec!["user_id".into(), "order_id".into()],
            hash: None,
            hits: 0,
        };
        let big = FileLines {
            file: "app/big.py".into(),
            module: None,
            hash: None,
            lines: LineSet::from_lines((1..40_000).step_by(2)),
            functions: Vec::new(),
        };
        let frames = CatalogUpdate::frames((0..200).map(entry).collect(), vec![big], true);
        assert!(frames[0].full && frames[1..].iter().all(|f| !f.full));
        assert_eq!(frames.iter().map(|f| f.entries.len()).sum::<usize>(), 200);
        let last = frames.last().unwrap();
        assert_eq!((last.entries.len(), last.files.len()), (0, 1), "the large file goes alone");
        for f in &frames[..frames.len() - 1] {
            let text = encode(&AgentMessage::Catalog(f.clone()));
            assert!(text.len() <= CATALOG_FRAME_BYTES + 64, "{} bytes", text.len());
        }
        assert!(frames.len() > 5, "{} frames", frames.len());
        let empty = CatalogUpdate::frames(Vec::new(), Vec::new(), true);
        assert_eq!(empty.len(), 1, "a full empty catalog is still said");
        assert!(CatalogUpdate::frames(Vec::new(), Vec::new(), false).is_empty());
    }
    use crate::action::{ActionKind, Location, SnapshotSpec};

    #[test]
    fn frequent_frames_read_directly_decode_exactly_as_the_enum_does() {
        let id = ActionId::generate();
        let hit: Hit = serde_json::from_value(serde_json::json!({
            "action_id": id, "seq": 3, "time_ms": 5,
            "location": {"file": "src/a.rs", "line": 7}, "fields": {}, "rules_version": 2,
        }))
        .expect("a hit");
        let line = LogLine {
            action_id: id.clone(),
            seq: 1,
            time_ms: 2,
            level: crate::action::LogLevel::Info,
            text: "x \"y\"".into(),
            thread: None,
            redactions: Vec::new(),
            rules_version: 1,
        };
        let mut report: MetricReport = serde_json::from_value(serde_json::json!({
            "action_id": id, "window_start_ms": 1, "window_end_ms": 2, "count": 3,
        }))
        .expect("a report");
        report.sum = 4.5;
        for m in [
            AgentMessage::Hit(Box::new(hit)),
            AgentMessage::LogLines { lines: vec![line] },
            AgentMessage::Metrics { reports: vec![report] },
        ] {
            let frame = encode(&m);
            assert!(decode_frequent(&frame).is_some(), "{frame}");
            assert_eq!(decode_agent_message(&frame).expect("decodes"), m);
            assert_eq!(
                decode_agent_message(&frame).expect("decodes"),
                decode::<AgentMessage>(&frame).expect("decodes")
            );
            // The tag elsewhere, or spaced out: the enum's own path, the same message.
            let moved = frame.replacen(&format!("\"type\":\"{}\",", m.type_name()), "", 1);
            let moved = format!("{}, \"type\" : \"{}\"}}", &moved[..moved.len() - 1], m.type_name());
            assert!(decode_frequent(&moved).is_none(), "{moved}");
            assert_eq!(decode_agent_message(&moved).expect("decodes"), m);
        }
        // A broken hit is refused with the enum's own error, not a different one.
        let broken = r#"{"type":"hit","action_id":"nope"}"#;
        assert_eq!(
            decode_agent_message(broken).unwrap_err().to_string(),
            decode::<AgentMessage>(broken).unwrap_err().to_string()
        );
    }

    fn registration() -> Registration {
        Registration {
            protocol_version: PROTOCOL_VERSION,
            agent_id: AgentId::generate(),
            display_name: "shop@host".into(),
            pool: "shop".into(),
            tags: vec!["env:prod".into(), "canary".into()],
            service: "shop".into(),
            service_version: "1.2.3".into(),
            language: "rust".into(),
            runtime: "rustc 1.95".into(),
            host: "host".into(),
            pid: 42,
            build: "abc1234".into(),
            agent_version: "0.1.0".into(),
            capabilities: vec!["snapshot".into()],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: Location { file: "shop.rs".into(), line: 10 },
            condition: None,
            expires_at_ms: 99,
            kind: ActionKind::Snapshot(SnapshotSpec { max_hits: 1, watch: vec!["a.b".into()], backtrace: false }),
            function: None,
            expect: None,
        };
        let agent = [
            AgentMessage::Register(Box::new(registration())),
            AgentMessage::Heartbeat(Heartbeat { hits_sent: 3, ..Default::default() }),
            AgentMessage::Catalog(CatalogUpdate { full: true, entries: vec![], files: vec![] }),
            AgentMessage::ActionStatus(ActionStatusUpdate {
                action_id: spec.id.clone(),
                state: AgentActionState::Error { reason: "nope".into() },
            }),
            AgentMessage::Goodbye { reason: "bye".into() },
        ];
        for m in agent {
            assert_eq!(decode_agent_message(&encode(&m)).unwrap(), m);
        }
        let broker = [
            BrokerMessage::Registered(Registered {
                agent_id: AgentId::generate(),
                protocol_version: 1,
                broker_version: "x".into(),
                limits: CaptureLimits::default(),
                quotas: AgentQuotas::default(),
                heartbeat_interval_ms: 1000,
            }),
            BrokerMessage::ActionSync { actions: vec![spec.clone()] },
            BrokerMessage::ActionAdd { action: spec.clone() },
            BrokerMessage::ActionRemove { action_id: spec.id.clone(), reason: "done".into() },
            BrokerMessage::Error(ProtocolError::UnsupportedVersion { got: 9 }.to_body(true)),
            BrokerMessage::Goodbye { reason: "shutdown".into() },
        ];
        for m in broker {
            assert_eq!(decode_broker_message(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn malformed_frames_name_what_was_wrong() {
        let err = decode_agent_message("{\"type\":\"register\",\"agent_id\":\"agt_x\"}").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let err = decode_agent_message("{\"type\":\"teleport\"}").unwrap_err();
        assert!(err.to_string().contains("unknown variant `teleport`"), "{err}");
        let err = decode_agent_message("not json").unwrap_err();
        assert_eq!(err.code(), ProtocolErrorCode::MalformedFrame);
        let err = decode_agent_message(&"x".repeat(MAX_FRAME_BYTES + 1)).unwrap_err();
        assert_eq!(err.code(), ProtocolErrorCode::FrameTooLarge);
        let err = decode_agent_message(r#"{"type":"hit","action_id":"agt_x"}"#).unwrap_err();
        assert!(err.to_string().contains("act_"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut json = serde_json::to_value(AgentMessage::Register(Box::new(registration()))).unwrap();
        json["quantum"] = serde_json::json!(true);
        let m = decode_agent_message(&json.to_string()).unwrap();
        assert!(matches!(m, AgentMessage::Register(_)));
    }

    #[test]
    fn an_unsupported_version_says_which_versions_are_spoken() {
        let mut r = registration();
        r.protocol_version = 7;
        let err = r.validate().unwrap_err();
        assert_eq!(err.to_string(), "protocol version 7 is not supported; this broker speaks 1");
        assert_eq!(err.to_body(true).supported_versions, vec![1]);
    }

    #[test]
    fn registration_bounds_are_checked() {
        let mut r = registration();
        r.pool = "bad pool".into();
        assert!(r.validate().unwrap_err().to_string().contains("`pool`"));
        let mut r = registration();
        r.tags = vec!["ok".into(), "no spaces".into()];
        assert!(r.validate().unwrap_err().to_string().contains("tag `no spaces`"));
        let mut r = registration();
        r.tags = (0..40).map(|i| format!("t{i}")).collect();
        assert!(r.validate().is_err());
        registration().validate().unwrap();
    }
}
