//! Capturing values on the application's thread, and turning them into protocol hits
//! on the agent's thread.
//!
//! The split is the point: on the application's thread we only copy what `tracing`
//! hands us (numbers, strings, and `Debug` text written into a bounded buffer) and
//! enqueue it. Parsing `Debug` text into structure, truncation, redaction and
//! serialization all happen later, off the hot path.

use std::backtrace::Backtrace;
use std::fmt::{self, Write as _};

use periscope_agent_core::{RawHit, redaction_limits};
use periscope_protocol::value::{Text, truncate_chars};
use periscope_protocol::{CaptureLimits, Field, Hit, HitLocation, SpanFrame, TruncationSummary, Value};
use periscope_redaction::{NameRule, Redactor};
use tracing_core::Metadata;
use tracing_core::field::{Field as TracingField, Visit};

/// Bytes of `Debug` or string text copied per value on the application's thread.
/// Generous compared to the 255 characters kept, so that parsing can still see the
/// structure (and count the omitted items) of a large value, but bounded so one huge
/// value cannot cost the host more than a few tens of microseconds.
pub(crate) const RAW_TEXT_CAP: usize = 16 * 1024;

/// A value as `tracing` handed it over.
#[derive(Debug, Clone)]
pub(crate) enum Raw {
    Bool(bool),
    I64(i64),
    U64(u64),
    I128(i128),
    U128(u128),
    F64(f64),
    /// A `&str` field, with its full length when it was longer than the cap.
    Str(String, Option<usize>),
    /// `Debug` text; `true` when it was cut at [`RAW_TEXT_CAP`].
    Debug(String, bool),
}

/// A named raw value.
#[derive(Debug, Clone)]
pub(crate) struct RawField {
    pub(crate) name: &'static str,
    pub(crate) value: Raw,
}

/// Collects the fields of an event or span.
#[derive(Debug, Default)]
pub(crate) struct FieldCollector {
    pub(crate) fields: Vec<RawField>,
}

impl FieldCollector {
    fn set(&mut self, field: &TracingField, value: Raw) {
        let name = field.name();
        // `span.record` may overwrite a field declared empty at creation.
        if let Some(existing) = self.fields.iter_mut().find(|f| f.name == name) {
            existing.value = value;
        } else {
            self.fields.push(RawField { name, value });
        }
    }
}

/// A `fmt::Write` that stops (with an error, which ends the `Debug` call early) once
/// it holds [`RAW_TEXT_CAP`] bytes.
struct Bounded<'a> {
    out: &'a mut String,
    cut: bool,
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = RAW_TEXT_CAP.saturating_sub(self.out.len());
        if s.len() <= room {
            self.out.push_str(s);
            Ok(())
        } else {
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.out.push_str(&s[..end]);
            self.cut = true;
            Err(fmt::Error)
        }
    }
}

impl Visit for FieldCollector {
    fn record_bool(&mut self, field: &TracingField, value: bool) {
        self.set(field, Raw::Bool(value));
    }
    fn record_i64(&mut self, field: &TracingField, value: i64) {
        self.set(field, Raw::I64(value));
    }
    fn record_u64(&mut self, field: &TracingField, value: u64) {
        self.set(field, Raw::U64(value));
    }
    fn record_i128(&mut self, field: &TracingField, value: i128) {
        self.set(field, Raw::I128(value));
    }
    fn record_u128(&mut self, field: &TracingField, value: u128) {
        self.set(field, Raw::U128(value));
    }
    fn record_f64(&mut self, field: &TracingField, value: f64) {
        self.set(field, Raw::F64(value));
    }
    fn record_str(&mut self, field: &TracingField, value: &str) {
        if value.len() <= RAW_TEXT_CAP {
            self.set(field, Raw::Str(value.to_owned(), None));
        } else {
            let kept = truncate_chars(value, RAW_TEXT_CAP / 4);
            self.set(field, Raw::Str(kept.to_owned(), Some(value.chars().count())));
        }
    }
    fn record_error(&mut self, field: &TracingField, value: &(dyn std::error::Error + 'static)) {
        let mut text = String::new();
        let mut w = Bounded { out: &mut text, cut: false };
        let _ = write!(w, "{value}");
        let cut = w.cut;
        self.set(field, Raw::Str(text, cut.then_some(RAW_TEXT_CAP)));
    }
    fn record_debug(&mut self, field: &TracingField, value: &dyn fmt::Debug) {
        let mut text = String::new();
        let mut w = Bounded { out: &mut text, cut: false };
        let _ = write!(w, "{value:?}");
        let cut = w.cut;
        // `message` and `%display` fields arrive here as Debug of `fmt::Arguments` /
        // `DisplayValue`, which print plain text: keep them as strings.
        if field.name() == "message" {
            self.set(field, Raw::Str(text, cut.then_some(RAW_TEXT_CAP)));
        } else {
            self.set(field, Raw::Debug(text, cut));
        }
    }
}

/// The span fields the layer stores in each recorded span's extensions.
#[derive(Debug, Default)]
pub(crate) struct SpanValues(pub(crate) FieldCollector);

/// One frame of the span stack as captured on the application's thread.
#[derive(Debug)]
pub(crate) struct RawSpan {
    pub(crate) meta: &'static Metadata<'static>,
    pub(crate) fields: Vec<RawField>,
}

/// What the layer captures for a hit on the application's thread.
#[derive(Debug)]
pub(crate) struct Payload {
    /// The callsite that fired; none for a panic (its hit is located by the panic's
    /// own location).
    pub(crate) meta: Option<&'static Metadata<'static>>,
    pub(crate) fields: Vec<RawField>,
    pub(crate) spans: Vec<RawSpan>,
    pub(crate) backtrace: Option<Backtrace>,
}

/// Converts one raw value into the captured-value model, parsing `Debug` text.
pub(crate) fn to_value(raw: &Raw, limits: &CaptureLimits, summary: &mut TruncationSummary) -> Value {
    match raw {
        Raw::Bool(b) => Value::Bool(*b),
        Raw::I64(i) => Value::Int(*i),
        Raw::U64(u) => Value::from(*u),
        Raw::I128(i) => match i64::try_from(*i) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::str(i.to_string()),
        },
        Raw::U128(u) => match u64::try_from(*u) {
            Ok(u) => Value::from(u),
            Err(_) => Value::str(u.to_string()),
        },
        Raw::F64(f) => Value::Float(*f),
        Raw::Str(s, original) => {
            // Cut here as `Debug` text is cut while parsing; counted once, when the hit's
            // limits are enforced.
            let kept = truncate_chars(s, limits.max_string_len as usize);
            // The full length is known when the text was cut on the host's thread.
            let full = original.map(|n| n as u64);
            let original_len = if kept.len() < s.len() {
                Some(full.unwrap_or_else(|| s.chars().count() as u64))
            } else {
                full.filter(|n| *n > s.chars().count() as u64)
            };
            Value::Str(Text { value: kept.to_owned(), original_len })
        }
        Raw::Debug(text, cut) => {
            let mut value = crate::debug_parse::parse_debug_with_summary(text, limits, summary);
            if *cut {
                // The text was cut on the application's thread: say so where it shows.
                if let Value::Str(t) = &mut value {
                    t.original_len = Some(t.original_len.unwrap_or(0).max(RAW_TEXT_CAP as u64 + 1));
                }
            }
            value
        }
    }
}

fn to_fields(raw: &[RawField], limits: &CaptureLimits, summary: &mut TruncationSummary) -> Vec<Field> {
    raw.iter().map(|f| Field::new(f.name, to_value(&f.value, limits, summary))).collect()
}

/// One field exactly as a client will see it (the core's
/// [`client_value`](periscope_agent_core::client_value)): parsed with room for redaction
/// to see secrets whole, redacted under its name, then cut to the capture limits.
///
/// `rule` is what `redactor` makes of the field's name (`Redactor::name_rule`), worked
/// out once per callsite.
pub(crate) fn client_value(field: &RawField, limits: &CaptureLimits, redactor: &Redactor, rule: NameRule) -> Value {
    let mut summary = TruncationSummary::default();
    let value = to_value(&field.value, &redaction_limits(limits), &mut summary);
    periscope_agent_core::client_value(value, limits, redactor, rule)
}

/// Builds the protocol hit from a raw hit (agent thread). Redaction and limit
/// enforcement are applied by the core.
pub(crate) fn build_hit(raw: &RawHit<Payload>, limits: &CaptureLimits) -> Hit {
    let mut summary = TruncationSummary::default();
    let payload = &raw.payload;
    let spans = payload
        .spans
        .iter()
        .take(limits.max_frames as usize)
        .enumerate()
        .map(|(i, s)| SpanFrame {
            name: s.meta.name().to_owned(),
            target: Some(s.meta.target().to_owned()),
            file: s.meta.file().map(str::to_owned),
            line: s.meta.line(),
            fields: if i < limits.frames_with_values as usize {
                to_fields(&s.fields, limits, &mut summary)
            } else {
                Vec::new()
            },
        })
        .collect();
    Hit {
        action_id: raw.action.spec.id.clone(),
        seq: raw.seq,
        time_ms: raw.time_ms,
        location: payload.meta.map_or_else(HitLocation::default, |meta| HitLocation {
            file: meta.file().unwrap_or_default().to_owned(),
            line: meta.line().unwrap_or(0),
            module: meta.module_path().map(str::to_owned),
            name: Some(meta.name().to_owned()),
        }),
        thread: Some(raw.thread.clone()),
        fields: to_fields(&payload.fields, limits, &mut summary),
        spans,
        watches: Vec::new(),
        backtrace: payload.backtrace.as_ref().map(backtrace_lines),
        truncation: summary,
        redactions: Vec::new(),
        rules_version: 0,
        error: None,
        call: None,
    }
}

/// Formats a backtrace as one line per frame, innermost first, skipping the agent's
/// and tracing's own frames so the first line is the application's.
fn backtrace_lines(bt: &Backtrace) -> Vec<String> {
    let text = bt.to_string();
    let mut frames: Vec<String> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim();
        let Some((_, symbol)) = line.split_once(": ") else { continue };
        let location = match lines.peek() {
            Some(next) if next.trim_start().starts_with("at ") => {
                let at = next.trim().trim_start_matches("at ").to_owned();
                lines.next();
                Some(at)
            }
            _ => None,
        };
        frames.push(match location {
            Some(at) => format!("{symbol} at {at}"),
            None => symbol.to_owned(),
        });
    }
    let skip = frames.iter().position(|f| !is_machinery(f)).unwrap_or(0);
    frames.into_iter().skip(skip).collect()
}

/// Frames of the capture itself: the agent, tracing's dispatch, std and core glue, and
/// the closures tracing's macros expand to (located in tracing's own sources).
fn is_machinery(frame: &str) -> bool {
    let (symbol, location) = frame.split_once(" at ").unwrap_or((frame, ""));
    let symbol = symbol.trim_start_matches('<');
    const CRATES: [&str; 9] = [
        "periscope_agent::",
        "periscope_agent_core::",
        "tracing_core::",
        "tracing_subscriber::",
        "tracing::",
        "std::",
        "core::",
        "alloc::",
        "__rust",
    ];
    CRATES.iter().any(|c| symbol.starts_with(c))
        || ["/tracing-0.", "/tracing-core-", "/tracing-subscriber-"].iter().any(|c| location.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &'static str, value: Raw) -> RawField {
        RawField { name, value }
    }

    fn client_value(field: &RawField, limits: &CaptureLimits, r: &Redactor) -> Value {
        super::client_value(field, limits, r, r.name_rule(field.name))
    }

    #[test]
    fn a_value_an_expression_reads_is_redacted_by_its_name_by_the_names_inside_and_by_its_shape() {
        let limits = CaptureLimits::default();
        let r = Redactor::default_rules();
        let v = client_value(&field("api_token", Raw::Str("a1b2c3".into(), None)), &limits, &r);
        assert_eq!(v, Value::str("[REDACTED:TOKEN]"));
        let v = client_value(&field("cvv", Raw::U64(737)), &limits, &r);
        assert_eq!(v, Value::str("[REDACTED:CVV]"), "an integer under a sensitive name too");
        let v = client_value(&field("user.password", Raw::Str("hunter2".into(), None)), &limits, &r);
        assert_eq!(v, Value::str("[REDACTED:PASSWORD]"), "a dotted name is judged by its parts");
        let account = r#"Account { name: "Ada", password: "hunter2", email: "ada@example.com" }"#;
        let v = client_value(&field("account", Raw::Debug(account.into(), false)), &limits, &r);
        assert_eq!(v.field("name"), Some(&Value::str("Ada")));
        assert_eq!(v.field("password"), Some(&Value::str("[REDACTED:PASSWORD]")));
        assert_eq!(v.field("email"), Some(&Value::str("[REDACTED:EMAIL]")));
        let v = client_value(&field("amount", Raw::I64(1500)), &limits, &r);
        assert_eq!(v, Value::Int(1500));
    }

    #[test]
    fn a_secret_across_the_string_limit_is_redacted_before_the_cut() {
        let limits = CaptureLimits::default();
        let r = Redactor::default_rules();
        // A card number straddling character 255: cut first, its visible half would
        // pass every detector.
        let text = format!("{}4111 1111 1111 1111 tail", "x ".repeat(123));
        let v = client_value(&field("note", Raw::Str(text.clone(), None)), &limits, &r);
        let Value::Str(t) = v else { panic!("{v:?}") };
        assert!(!t.value.contains("4111"), "{}", t.value);
        assert!(t.value.ends_with(" [REDACTED"), "cut after redaction: {}", t.value);
        assert!(t.original_len.is_some());
    }
}
