//! What an agent sends when an action fires.

use serde::{Deserialize, Serialize};

use crate::ids::ActionId;
use crate::limits::CaptureLimits;
use crate::value::{Field, TruncationSummary, Value, clip_printable, fields_as_object, fit_to_budget, truncate};

/// One firing of a snapshot action: the values at the location and how they were cut
/// and redacted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The action that fired.
    pub action_id: ActionId,
    /// Per-agent, per-action sequence number starting at 1, so gaps (drops) are visible.
    pub seq: u64,
    /// When the hit was captured, Unix time in milliseconds (agent clock).
    pub time_ms: u64,
    /// The callsite that fired.
    pub location: HitLocation,
    /// The thread the hit was captured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<ThreadInfo>,
    /// The event's (or span's) own fields: the "locals" at the location.
    #[serde(with = "fields_as_object", default)]
    pub fields: Vec<Field>,
    /// Active spans, innermost first: the logical call stack.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<SpanFrame>,
    /// Watch expressions and what they evaluated to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<WatchResult>,
    /// Native stack frames, innermost first, when the snapshot asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<Vec<String>>,
    /// What capture limits removed.
    #[serde(default)]
    pub truncation: TruncationSummary,
    /// Which redaction rules fired where (never the values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redactions: Vec<RedactionFinding>,
    /// Version of the redaction rules the agent applied.
    #[serde(default)]
    pub rules_version: u64,
    /// What failed, when the hit is an error capture's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::errors::HitError>,
    /// For a function probe: how the call ended and how long it took. Its arguments
    /// (span fields) are the hit's `fields`, beside `return` and the error (`error` in
    /// Rust, `exception` in Python) when the call produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallInfo>,
}

/// How one call of a probed function went: no captured value, so nothing to redact.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CallInfo {
    /// From entry to exit, in milliseconds (for a coroutine or generator: from its first
    /// run to its end, suspensions included).
    pub duration_ms: f64,
    /// How it ended.
    pub outcome: CallOutcome,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// It returned (the value is the field `return`, when the runtime shows it).
    Returned,
    /// It raised or returned an error (the field `exception` or `error`).
    Raised,
    /// The runtime does not say (a Rust span without `#[instrument(ret, err)]` events).
    #[serde(other)]
    Unknown,
}

/// The callsite a hit came from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HitLocation {
    /// Source file as compiled into the program.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// Module path or logger name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Callsite name (span name, or the event's generated name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A thread's identity at the time of a hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// Thread name, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Runtime-specific thread id, as text.
    pub id: String,
}

/// One active span (logical stack frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanFrame {
    /// Span name.
    pub name: String,
    /// Module path or target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where the span was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Line where the span was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// The span's recorded fields (only on the innermost `frames_with_values` frames).
    #[serde(with = "fields_as_object", default)]
    pub fields: Vec<Field>,
}

/// A watch expression's outcome at one hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchResult {
    /// The expression as placed.
    pub expression: String,
    /// Its value, when evaluation succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Why it has no value, when evaluation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One place where a redaction rule replaced (part of) a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RedactionFinding {
    /// Where in the hit: `fields.user.email`, `spans[0].token`, `watches[1]`.
    pub path: String,
    /// The rule's stable id (`email`, `credit_card`, `key:password`).
    pub rule: String,
}

/// Bytes reserved in a hit's budget for everything that is not a captured value.
const HIT_ENVELOPE_BYTES: usize = 2 * 1024;

/// Most findings kept per hit; beyond this they are summarized by count.
pub const MAX_FINDINGS_PER_HIT: usize = 256;

impl Hit {
    /// Takes every captured value out (an operator's `no_capture` rule covers the
    /// location): what is left says where and when it ran, on which thread, in which
    /// spans. Agents do it before sending, the broker again on receipt.
    pub fn strip_values(&mut self) {
        self.fields.clear();
        self.watches.clear();
        for span in &mut self.spans {
            span.fields.clear();
        }
    }

    /// Applies capture limits to every value of the hit and keeps the whole under
    /// `max_hit_bytes`. Both agents (before sending) and the broker (on receipt) call
    /// this; it is idempotent, so an honest agent's hit passes the broker unchanged.
    pub fn enforce_limits(&mut self, limits: &CaptureLimits) {
        let mut summary = TruncationSummary::default();
        let max_str = limits.max_string_len as usize;
        let keep_fields = limits.max_fields as usize;
        if self.fields.len() > keep_fields {
            summary.items_omitted += (self.fields.len() - keep_fields) as u64;
            self.fields.truncate(keep_fields);
        }
        for field in &mut self.fields {
            clip(&mut field.name, max_str);
            truncate(&mut field.value, limits, &mut summary);
        }
        if self.spans.len() > limits.max_frames as usize {
            self.spans.truncate(limits.max_frames as usize);
        }
        for (i, frame) in self.spans.iter_mut().enumerate() {
            clip(&mut frame.name, max_str);
            if let Some(t) = &mut frame.target {
                clip(t, max_str);
            }
            if let Some(f) = &mut frame.file {
                clip(f, max_str * 4);
            }
            if i >= limits.frames_with_values as usize {
                frame.fields.clear();
            }
            if frame.fields.len() > keep_fields {
                summary.items_omitted += (frame.fields.len() - keep_fields) as u64;
                frame.fields.truncate(keep_fields);
            }
            for field in &mut frame.fields {
                clip(&mut field.name, max_str);
                truncate(&mut field.value, limits, &mut summary);
            }
        }
        if self.watches.len() > crate::limits::action_bounds::MAX_WATCHES {
            self.watches.truncate(crate::limits::action_bounds::MAX_WATCHES);
        }
        for watch in &mut self.watches {
            clip(&mut watch.expression, crate::limits::action_bounds::MAX_EXPRESSION_LEN);
            if let Some(e) = &mut watch.error {
                clip(e, max_str);
            }
            if let Some(v) = &mut watch.value {
                truncate(v, limits, &mut summary);
            }
        }
        if let Some(bt) = &mut self.backtrace {
            bt.truncate(limits.max_frames as usize * 4);
            for frame in bt.iter_mut() {
                clip(frame, max_str * 2);
            }
        }
        clip(&mut self.location.file, max_str * 4);
        if let Some(m) = &mut self.location.module {
            clip(m, max_str);
        }
        if let Some(n) = &mut self.location.name {
            clip(n, max_str);
        }
        if let Some(t) = &mut self.thread {
            clip(&mut t.id, 64);
            if let Some(n) = &mut t.name {
                clip(n, max_str);
            }
        }
        if let Some(e) = &mut self.error {
            e.clip();
            clip(&mut e.message, max_str * 4);
        }
        self.redactions.truncate(MAX_FINDINGS_PER_HIT);
        for finding in &mut self.redactions {
            clip(&mut finding.path, max_str * 2);
            clip(&mut finding.rule, 64);
        }
        let budget = (limits.max_hit_bytes as usize).saturating_sub(HIT_ENVELOPE_BYTES);
        let values = self
            .fields
            .iter_mut()
            .map(|f| &mut f.value)
            .chain(self.watches.iter_mut().filter_map(|w| w.value.as_mut()))
            .chain(self.spans.iter_mut().flat_map(|s| s.fields.iter_mut().map(|f| &mut f.value)));
        fit_to_budget(values, budget, &mut summary);
        // Counts from earlier passes (the agent's) are kept: the summary is a union.
        self.truncation = TruncationSummary {
            depth_cuts: self.truncation.depth_cuts.max(summary.depth_cuts),
            items_omitted: self.truncation.items_omitted.max(summary.items_omitted),
            strings_shortened: self.truncation.strings_shortened.max(summary.strings_shortened),
            size_cuts: self.truncation.size_cuts.max(summary.size_cuts),
        };
    }
}

/// Cuts a name, path or message of the hit (never a captured value) to `max`
/// characters and makes it printable: they are shown on one line.
fn clip(s: &mut String, max: usize) {
    clip_printable(s, max);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{List, Object};

    fn hit_with(fields: Vec<Field>) -> Hit {
        Hit {
            action_id: ActionId::generate(),
            seq: 1,
            time_ms: 0,
            location: HitLocation { file: "src/main.rs".into(), line: 3, module: None, name: None },
            thread: None,
            fields,
            spans: vec![],
            watches: vec![],
            backtrace: None,
            truncation: TruncationSummary::default(),
            redactions: vec![],
            rules_version: 0,
            error: None,
            call: None,
        }
    }

    #[test]
    fn a_hit_never_exceeds_its_byte_budget() {
        let wide = |n: usize| {
            Value::Object(Object {
                type_name: "Blob".into(),
                fields: (0..20)
                    .map(|i| {
                        Field::new(
                            format!("f{i}"),
                            Value::List(List {
                                type_name: None,
                                items: (0..100).map(|_| Value::str("z".repeat(n))).collect(),
                                omitted: 0,
                            }),
                        )
                    })
                    .collect(),
                omitted: 0,
            })
        };
        let mut hit = hit_with((0..20).map(|i| Field::new(format!("v{i}"), wide(255))).collect());
        let limits = CaptureLimits::default();
        hit.enforce_limits(&limits);
        let bytes = serde_json::to_vec(&hit).unwrap().len();
        assert!(bytes <= limits.max_hit_bytes as usize, "{bytes}");
        assert!(hit.truncation.size_cuts > 0);
        // The first variable survives at least partly, in order.
        assert!(matches!(hit.fields[0].value, Value::Object(_)));
        let again = hit.clone();
        let sizes: Vec<usize> = hit.fields.iter().map(|f| f.value.encoded_len()).collect();
        hit.enforce_limits(&limits);
        let sizes2: Vec<usize> = hit.fields.iter().map(|f| f.value.encoded_len()).collect();
        assert!(hit == again, "enforcement is idempotent: {sizes:?} vs {sizes2:?}");
    }

    #[test]
    fn a_hit_round_trips_and_tolerates_unknown_fields() {
        let hit = hit_with(vec![Field::new("user_id", Value::Int(4))]);
        let mut json: serde_json::Value = serde_json::to_value(&hit).unwrap();
        json["from_the_future"] = serde_json::json!({"x": 1});
        let back: Hit = serde_json::from_value(json).unwrap();
        assert_eq!(back, hit);
    }
}
