//! The redaction engine over text, JSON documents, captured-value trees and hits.
//!
//! Input: one byte that chooses the shape and the rules (built-in, strict, or custom
//! patterns that match inside multibyte characters), then the text. Checks the crate's
//! promises: no panic, a second pass changes nothing and finds nothing new, and output
//! is at most `MAX_MARKER_LEN` times the input (per string, and for whole trees as
//! JSON).

#![no_main]

mod common;

use std::sync::LazyLock;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use periscope_protocol::Hit;
use periscope_redaction::{CustomPattern, MAX_MARKER_LEN, RedactionConfig, Redactor, Report};

static RULES: LazyLock<[Redactor; 3]> = LazyLock::new(|| {
    let custom = RedactionConfig {
        patterns: vec![
            CustomPattern { name: "half_char".into(), regex: r"\xA9|\x97".into(), kind: None },
            CustomPattern { name: "wide".into(), regex: r"[^a-z]{3}".into(), kind: None },
        ],
        key_names: vec!["order".into()],
        ..Default::default()
    };
    let build = |c: &RedactionConfig| Redactor::new(c).unwrap_or_else(|e| panic!("fuzz rules: {e}"));
    [Redactor::default_rules(), build(&RedactionConfig { strict: true, ..Default::default() }), build(&custom)]
});

fn bounded(before: usize, after: usize, what: &str) {
    assert!(after <= MAX_MARKER_LEN * before.max(1), "{what}: {before} bytes became {after}");
}

fn text(r: &Redactor, text: &str) {
    let mut report = Report::new();
    let once = r.redact_text(text, "t", &mut report).into_owned();
    bounded(text.len(), once.len(), "text");
    let mut again = Report::new();
    let twice = r.redact_text(&once, "t", &mut again);
    assert_eq!(twice, once, "a second pass changed the redaction of {text:?}");
    assert!(again.is_empty(), "a second pass found {:?} in {once:?}", again.findings());
}

fn json(r: &Redactor, input: &str) {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(input) else { return };
    let before = common::json(&doc).len();
    let mut report = Report::new();
    r.redact_json(&mut doc, &mut report);
    let once = common::json(&doc);
    bounded(before, once.len(), "json");
    let mut again = Report::new();
    r.redact_json(&mut doc, &mut again);
    assert_eq!(common::json(&doc), once, "a second pass changed a JSON document");
    assert!(again.is_empty(), "a second pass found {:?} in {once}", again.findings());
}

fn tree(r: &Redactor, bytes: &[u8]) {
    let mut u = Unstructured::new(bytes);
    let (Ok(name), Ok(mut value)) = (common::name(&mut u), common::value(&mut u, 5)) else { return };
    let before = common::json(&value).len();
    let mut report = Report::new();
    r.redact_field(&name, &mut value, "fields.x", &mut report);
    let once = common::json(&value);
    bounded(before, once.len(), "value tree");
    let mut again = Report::new();
    r.redact_field(&name, &mut value, "fields.x", &mut again);
    assert_eq!(common::json(&value), once, "a second pass changed a value named {name:?}");
    assert!(again.is_empty(), "a second pass found {:?} in {once}", again.findings());
}

fn hit(r: &Redactor, input: &str) {
    let Ok(mut hit) = serde_json::from_str::<Hit>(input) else { return };
    r.redact_hit(&mut hit);
    let once = common::json(&hit);
    r.redact_hit(&mut hit);
    assert_eq!(common::json(&hit), once, "a second pass changed a hit");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let r = &RULES[usize::from(mode % 3)];
    if mode / 3 % 4 == 2 {
        return tree(r, rest);
    }
    let Ok(input) = std::str::from_utf8(rest) else { return };
    match mode / 3 % 4 {
        0 => text(r, input),
        1 => json(r, input),
        _ => hit(r, input),
    }
});
