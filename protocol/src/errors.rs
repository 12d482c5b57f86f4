//! Error capture on the wire: what an error-capture hit says about the failure
//! ([`HitError`]), and how agents report how often each distinct error happened
//! ([`ErrorCount`]), captured or not.
//!
//! An agent snapshots at most one occurrence per location and error type per interval
//! and within a per-agent budget (see [`crate::ErrorCaptureSpec`]); every occurrence
//! is counted all the same and the counts are reported every second or so in
//! [`crate::AgentMessage::ErrorCounts`], so "how often" stays true when "what" was
//! only captured once.

use serde::{Deserialize, Serialize};

use crate::ids::ActionId;
use crate::value::clip_printable;

/// Most reports in one `error_counts` frame.
pub const MAX_ERROR_COUNTS_PER_FRAME: usize = 256;

/// Longest error type kept, in characters.
pub const MAX_ERROR_TYPE_LEN: usize = 256;

/// Longest error message kept, in characters (before the capture limits of the hit).
pub const MAX_ERROR_MESSAGE_LEN: usize = 1_024;

/// How the failure showed itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A Rust panic.
    Panic,
    /// An ERROR-level `tracing` event.
    Event,
    /// A Python exception escaping a function of the application's own code.
    Exception,
    /// A kind this side does not know.
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The stable wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Panic => "panic",
            ErrorKind::Event => "event",
            ErrorKind::Exception => "exception",
            ErrorKind::Other => "other",
        }
    }
}

/// What an error-capture hit caught (its location is the hit's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitError {
    /// Panic, event or exception.
    pub kind: ErrorKind,
    /// The error's type: the exception class (`module.Class`), `panic`, or for an event
    /// its `error` field's type when known, else the event's target.
    pub error_type: String,
    /// The panic payload, the event's message or the exception's text (redacted).
    pub message: String,
}

impl HitError {
    /// Cuts type and message to their bounds, printable on one line.
    pub fn clip(&mut self) {
        clip_printable(&mut self.error_type, MAX_ERROR_TYPE_LEN);
        clip_printable(&mut self.message, MAX_ERROR_MESSAGE_LEN);
    }
}

/// How often one distinct error (location and type) happened on an agent since its last
/// report, captured or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCount {
    /// The error-capture action that counted it.
    pub action_id: ActionId,
    /// Where it happened: source file as the agent reports it.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// Panic, event or exception.
    pub kind: ErrorKind,
    /// The error's type (see [`HitError::error_type`]).
    pub error_type: String,
    /// The latest occurrence's message (redacted).
    pub message: String,
    /// Occurrences since the last report (at least 1).
    pub count: u64,
    /// Occurrences since the last report that were not captured (rate or budget).
    #[serde(default)]
    pub uncaptured: u64,
    /// First occurrence in this report's window, Unix ms.
    pub first_seen_ms: u64,
    /// Latest occurrence, Unix ms.
    pub last_seen_ms: u64,
}

impl ErrorCount {
    /// Cuts the texts to their bounds (the broker calls it again on receipt).
    pub fn clip(&mut self) {
        clip_printable(&mut self.file, 4 * 1_024);
        clip_printable(&mut self.error_type, MAX_ERROR_TYPE_LEN);
        clip_printable(&mut self.message, MAX_ERROR_MESSAGE_LEN);
        self.uncaptured = self.uncaptured.min(self.count);
        self.first_seen_ms = self.first_seen_ms.min(self.last_seen_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_error_kind_decodes_as_other_and_clip_bounds_the_texts() {
        assert_eq!(serde_json::from_str::<ErrorKind>(r#""segfault""#).unwrap(), ErrorKind::Other);
        let mut e = ErrorCount {
            action_id: ActionId::generate(),
            file: "a.rs".into(),
            line: 1,
            kind: ErrorKind::Event,
            error_type: "x".repeat(1_000),
            message: "line\nbreak".into(),
            count: 2,
            uncaptured: 5,
            first_seen_ms: 9,
            last_seen_ms: 3,
        };
        e.clip();
        assert!(e.error_type.chars().count() <= MAX_ERROR_TYPE_LEN);
        assert!(!e.message.contains('\n'));
        assert_eq!((e.uncaptured, e.first_seen_ms), (2, 3));
    }
}
