//! Short texts for a model: one line per agent, location, action or hit, with captured
//! values rendered compactly (`Order{id: 7, items: [1, 2, …+98 more]}`) and every cut
//! and redaction said out loud. The full data always travels beside the text as
//! `structuredContent`; the text is what a model reads first, so it stays small: each
//! hit line has a character budget, and running past it ends the line with `…`.

use std::fmt::Write as _;

use periscope_protocol::value::truncate_chars;
use periscope_protocol::{Field, Value};

use crate::engine::{ActionView, AgentActionView, StoredHit};
use crate::query::SourceView;
use crate::registry::AgentView;

/// Characters of text all hits of one answer share (each gets at least
/// [`MIN_HIT_CHARS`], at most [`MAX_HIT_CHARS`]).
const HITS_TEXT_BUDGET: usize = 6_000;
const MIN_HIT_CHARS: usize = 300;
const MAX_HIT_CHARS: usize = 1_500;
/// Characters of one string value shown in text (the full value is in the JSON).
const TEXT_STRING_CHARS: usize = 120;

/// One line per agent.
pub(crate) fn agent_line(a: &AgentView) -> String {
    let tags = if a.tags.is_empty() { String::new() } else { format!(" tags=[{}]", a.tags.join(", ")) };
    let version = if a.service_version.is_empty() { String::new() } else { format!(" version={}", a.service_version) };
    let build = if a.build.is_empty() { String::new() } else { format!(" build={}", truncate_chars(&a.build, 12)) };
    format!(
        "{} {} pool={}{} service={}{version}{build} {} {} ({} locations)",
        a.agent_id, a.display_name, a.pool, tags, a.service, a.language, a.status, a.locations
    )
}

/// One line per inspectable location.
pub(crate) fn source_line(s: &SourceView) -> String {
    let kind = match s.kind {
        periscope_protocol::LocationKind::Span => "span",
        periscope_protocol::LocationKind::Event => "event",
    };
    if let Some(lines) = &s.lines {
        // A whole-file catalog (Python): a function or module and the lines with code.
        let what = if s.kind == periscope_protocol::LocationKind::Span { "function" } else { "module" };
        let end = s.end_line.map(|e| format!("-{e}")).unwrap_or_default();
        return format!(
            "{}:{}{end} {what} `{}`{} lines with code [{}] agents={}{}",
            s.file,
            s.line,
            truncate_chars(&s.name, 80),
            probe_as(s),
            truncate_chars(lines, 200),
            s.agents,
            hash_note(s)
        );
    }
    format!(
        "{}:{} {kind} `{}`{} fields [{}] observed_hits={} agents={}{}",
        s.file,
        s.line,
        truncate_chars(&s.name, 80),
        probe_as(s),
        s.fields.join(", "),
        s.hits,
        s.agents,
        hash_note(s)
    )
}

/// How to probe a span or function whole (` function=...`), or nothing.
fn probe_as(s: &SourceView) -> String {
    s.function.as_deref().map(|f| format!(" function={}", truncate_chars(f, 160))).unwrap_or_default()
}

/// The file's hash, and a warning when agents run different copies of it.
fn hash_note(s: &SourceView) -> String {
    match (&s.hash, s.other_hashes.len()) {
        (None, _) => String::new(),
        (Some(h), 0) => format!(" hash={}", truncate_chars(h, 19)),
        (Some(h), n) => {
            format!(" hash={} (and {n} other hash(es): agents run different code here)", truncate_chars(h, 19))
        }
    }
}

/// One action in a line or two: where, state, hits, and each agent's state.
pub(crate) fn action_summary(a: &ActionView, now_ms: u64) -> String {
    let at = match &a.function {
        Some(f) => {
            let slow = f.min_duration_ms.map(|ms| format!(", calls of {ms} ms or more")).unwrap_or_default();
            format!("function {f} ({}{slow})", a.location)
        }
        None => a.location.to_string(),
    };
    let mut out = format!("{} {} at {at} is {}", a.action_id, a.kind, a.status.as_str());
    if a.kind == "snapshot" {
        let _ = write!(out, ", {}/{} hits", a.hits, a.max_hits);
    }
    if a.kind == "log" {
        let _ = write!(out, ", {} line(s)", a.lines);
    }
    match a.ended_at_ms {
        Some(_) => {
            if let Some(reason) = &a.end_reason {
                let _ = write!(out, " ({reason})");
            }
        }
        None => {
            let _ = write!(out, ", expires in {} s", a.expires_at_ms.saturating_sub(now_ms).div_ceil(1_000));
        }
    }
    if !a.agents.is_empty() {
        let agents: Vec<String> = a.agents.iter().map(agent_state).collect();
        let _ = write!(out, "; agents: {}", agents.join("; "));
    }
    if let Some(note) = &a.pending_note {
        let _ = write!(out, "; note: {note}");
    }
    out
}

/// A metric's figures: totals, then per agent, then the recent series in one line.
pub(crate) fn figures(a: &ActionView) -> String {
    let Some(view) = &a.figures else { return String::new() };
    let unit = if view.unit.is_empty() { String::new() } else { format!(" {}", view.unit) };
    let one = |f: &crate::telemetry::Figures| {
        let mut s = format!("count={}", f.count);
        for (name, v) in
            [("min", f.min), ("mean", f.mean), ("p50", f.p50), ("p90", f.p90), ("p99", f.p99), ("max", f.max)]
        {
            if let Some(v) = v {
                let _ = write!(s, " {name}={v:.3}{unit}");
            }
        }
        if f.skipped > 0 {
            let _ = write!(s, " skipped={}", f.skipped);
        }
        s
    };
    let mut out = format!("total: {}", one(&view.total));
    for agent in &view.per_agent {
        let _ = write!(out, "\n  {}: {}", agent.display_name, one(&agent.figures));
    }
    if !view.series.is_empty() {
        let counts: Vec<String> = view.series.iter().map(|p| p.figures.count.to_string()).collect();
        let _ = write!(out, "\nlast {} x 10 s counts: {}", view.series.len(), counts.join(" "));
    }
    if view.total.count == 0 && view.per_agent.is_empty() {
        out.push_str(" (no report yet: agents report every 5 s)");
    }
    out
}

/// One line per dynamic log line.
pub(crate) fn log_lines(lines: &[crate::telemetry::StoredLine]) -> String {
    let mut out = String::new();
    for l in lines.iter().take(200) {
        let _ = writeln!(
            out,
            "#{} {} {} {:?}: {}",
            l.index,
            timestamp(l.line.time_ms),
            l.agent_name,
            l.line.level,
            truncate_chars(&l.line.text, 400)
        );
    }
    out
}

fn agent_state(a: &AgentActionView) -> String {
    match &a.detail {
        Some(d) => format!("{} {} ({})", a.display_name, a.state, truncate_chars(d, 160)),
        None => format!("{} {}", a.display_name, a.state),
    }
}

/// One line per hit, sharing a budget so that 50 hits stay readable.
pub(crate) fn hit_lines(hits: &[StoredHit]) -> String {
    let per_hit = (HITS_TEXT_BUDGET / hits.len().max(1)).clamp(MIN_HIT_CHARS, MAX_HIT_CHARS);
    let mut out = String::new();
    for hit in hits {
        out.push_str(&hit_line(hit, per_hit));
        out.push('\n');
    }
    out
}

/// A hit: index, time, agent, location, fields, spans, watches, then what was cut and
/// which redaction rules fired where. Cut to `budget` characters.
pub(crate) fn hit_line(h: &StoredHit, budget: usize) -> String {
    let hit = &h.hit;
    let mut out = format!(
        "#{} {} {} ({}) {}:{}",
        h.index,
        timestamp(hit.time_ms),
        h.agent_name,
        h.agent_id,
        hit.location.file,
        hit.location.line
    );
    if let Some(call) = &hit.call {
        let outcome = match call.outcome {
            periscope_protocol::CallOutcome::Returned => "returned",
            periscope_protocol::CallOutcome::Raised => "raised",
            periscope_protocol::CallOutcome::Unknown => "ended",
        };
        let _ = write!(out, " call {outcome} after {:.1} ms", call.duration_ms);
    }
    if !hit.fields.is_empty() {
        out.push_str(" fields: ");
        fields(&hit.fields, &mut out);
    }
    if !hit.watches.is_empty() {
        out.push_str(" | watch: ");
        for (i, w) in hit.watches.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&w.expression);
            out.push('=');
            match (&w.value, &w.error) {
                (Some(v), _) => value(v, &mut out),
                (None, Some(e)) => {
                    let _ = write!(out, "<error: {e}>");
                }
                (None, None) => out.push_str("<none>"),
            }
        }
    }
    if !hit.spans.is_empty() {
        out.push_str(" | spans: ");
        for (i, s) in hit.spans.iter().enumerate() {
            if i > 0 {
                out.push_str(" < ");
            }
            out.push_str(&s.name);
            if !s.fields.is_empty() {
                out.push('{');
                fields(&s.fields, &mut out);
                out.push('}');
            }
        }
    }
    let mut notes = Vec::new();
    let t = &hit.truncation;
    if !t.is_empty() {
        let mut cut = Vec::new();
        for (n, what) in [
            (t.depth_cuts, "depth cuts"),
            (t.items_omitted, "items omitted"),
            (t.strings_shortened, "strings shortened"),
            (t.size_cuts, "size cuts"),
        ] {
            if n > 0 {
                cut.push(format!("{n} {what}"));
            }
        }
        notes.push(format!("truncated: {}", cut.join(", ")));
    }
    if !hit.redactions.is_empty() {
        let fired: Vec<String> = hit.redactions.iter().map(|r| format!("{} ({})", r.path, r.rule)).collect();
        notes.push(format!("redacted: {}", fired.join(", ")));
    }
    // The notes matter more than the tail of a long value: keep room for them.
    let notes = if notes.is_empty() { String::new() } else { format!(" [{}]", notes.join("; ")) };
    let notes = truncate_chars(&notes, budget / 2).to_owned();
    let room = budget.saturating_sub(notes.chars().count());
    if out.chars().count() > room {
        let keep = truncate_chars(&out, room.saturating_sub(1)).len();
        out.truncate(keep);
        out.push('…');
    }
    out.push_str(&notes);
    out
}

fn fields(fields: &[Field], out: &mut String) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&f.name);
        out.push('=');
        value(&f.value, out);
    }
}

/// A captured value, compactly; markers stay visible (`…+3 more`, `<cut: depth Geo, 2>`).
fn value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Str(t) => {
            let shown = truncate_chars(&t.value, TEXT_STRING_CHARS);
            out.push_str(&serde_json::to_string(shown).unwrap_or_default());
            let shortened_here = shown.len() < t.value.len();
            match t.original_len {
                Some(n) => {
                    let _ = write!(out, "…({n} chars)");
                }
                None if shortened_here => {
                    let _ = write!(out, "…({} chars)", t.value.chars().count());
                }
                None => {}
            }
        }
        Value::List(l) => {
            out.push('[');
            for (i, item) in l.items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                value(item, out);
            }
            more(l.omitted, !l.items.is_empty(), out);
            out.push(']');
        }
        Value::Map(m) => {
            out.push('{');
            for (i, (k, v)) in m.entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                value(k, out);
                out.push_str(": ");
                value(v, out);
            }
            more(m.omitted, !m.entries.is_empty(), out);
            out.push('}');
        }
        Value::Object(o) => {
            out.push_str(&o.type_name);
            out.push('{');
            for (i, f) in o.fields.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&f.name);
                out.push_str(": ");
                value(&f.value, out);
            }
            more(o.omitted, !o.fields.is_empty(), out);
            out.push('}');
        }
        Value::Cut(c) => {
            let _ = write!(out, "<cut: {}", c.reason);
            if let Some(t) = &c.type_name {
                let _ = write!(out, " {t}");
            }
            if let Some(n) = c.size {
                let _ = write!(out, ", {n}");
            }
            out.push('>');
        }
    }
}

fn more(omitted: u64, any_before: bool, out: &mut String) {
    if omitted > 0 {
        if any_before {
            out.push_str(", ");
        }
        let _ = write!(out, "…+{omitted} more");
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp (`2026-11-05T12:34:56.789Z`).
pub(crate) fn timestamp(ms: u64) -> String {
    let secs = ms / 1_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3_600, rem % 3_600 / 60, rem % 60, ms % 1_000)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use periscope_protocol::{
        ActionId, AgentId, Cut, CutReason, Hit, HitId, HitLocation, List, Object, RedactionFinding, SpanFrame, Text,
        TruncationSummary,
    };

    use super::*;

    fn hit(fields: Vec<Field>) -> StoredHit {
        StoredHit {
            hit_id: HitId::generate(),
            index: 1,
            agent_id: AgentId::generate(),
            agent_name: "shop-eu-1".into(),
            received_at_ms: 0,
            hit: Hit {
                action_id: ActionId::generate(),
                seq: 1,
                time_ms: 1_700_000_000_123,
                location: HitLocation { file: "src/orders.rs".into(), line: 42, module: None, name: None },
                thread: None,
                fields,
                spans: vec![SpanFrame {
                    name: "checkout".into(),
                    target: None,
                    file: None,
                    line: None,
                    fields: vec![Field::new("order_id", Value::Int(7))],
                }],
                watches: vec![],
                backtrace: None,
                truncation: TruncationSummary { depth_cuts: 1, ..Default::default() },
                redactions: vec![RedactionFinding { path: "fields.order.email".into(), rule: "email".into() }],
                rules_version: 1,
                error: None,
                call: None,
            },
        }
    }

    #[test]
    fn a_hit_line_shows_values_markers_and_redactions() {
        let order = Value::Object(Object {
            type_name: "Order".into(),
            fields: vec![
                Field::new("id", Value::Int(7)),
                Field::new("email", Value::Str(Text { value: "[REDACTED:email]".into(), original_len: None })),
                Field::new(
                    "items",
                    Value::List(List { type_name: None, items: vec![Value::UInt(1), Value::UInt(2)], omitted: 98 }),
                ),
                Field::new(
                    "geo",
                    Value::Cut(Cut { reason: CutReason::Depth, type_name: Some("Geo".into()), size: Some(2) }),
                ),
            ],
            omitted: 0,
        });
        let line = hit_line(&hit(vec![Field::new("order", order)]), 1_000);
        assert!(line.starts_with("#1 2023-11-14T22:13:20.123Z shop-eu-1 (agt_"), "{line}");
        assert!(line.contains("src/orders.rs:42"), "{line}");
        assert!(
            line.contains(
                r#"order=Order{id: 7, email: "[REDACTED:email]", items: [1, 2, …+98 more], geo: <cut: depth Geo, 2>}"#
            ),
            "{line}"
        );
        assert!(line.contains("spans: checkout{order_id=7}"), "{line}");
        assert!(line.contains("truncated: 1 depth cuts"), "{line}");
        assert!(line.contains("redacted: fields.order.email (email)"), "{line}");
    }

    #[test]
    fn a_long_hit_line_is_cut_but_keeps_its_notes() {
        let long = Value::Str(Text { value: "x".repeat(5_000), original_len: None });
        let line = hit_line(&hit(vec![Field::new("blob", long)]), 400);
        assert!(line.chars().count() <= 400, "{}", line.chars().count());
        assert!(line.contains('…') && line.ends_with("(email)]"), "{line}");
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
