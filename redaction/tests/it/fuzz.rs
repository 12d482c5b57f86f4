//! Property tests: no panic on any input (multibyte text included), bounded output,
//! and a second pass that changes nothing.

use periscope_protocol::{Field, List, Map, Object, Text, Value};
use periscope_redaction::{CustomPattern, MAX_MARKER_LEN, RedactionConfig, Redactor, Report};
use proptest::prelude::*;

/// Text built from fragments that trip detectors, separators and multibyte characters.
fn tricky_text() -> impl Strategy<Value = String> {
    let fragments = prop::sample::select(vec![
        "4111",
        "1111",
        " ",
        "-",
        ".",
        ":",
        "::",
        "@",
        "example.com",
        "password",
        "=",
        "\"",
        "'",
        "key",
        "token",
        "Bearer ",
        "Basic ",
        "eyJhbGciOiJIUzI1NiJ9",
        "ghp_",
        "AKIA",
        "sk-",
        "://",
        "user",
        "[REDACTED:EMAIL]",
        "[REDACTED:",
        "]",
        "+1",
        "(555)",
        "123",
        "45",
        "6789",
        "GB82",
        "WEST",
        "é",
        "日本",
        "🦀",
        "\u{0301}",
        "\n",
        "-----BEGIN PRIVATE KEY-----",
        "-----END",
        "ff:ee",
        "0",
        "192.168.",
        "{",
        "}",
        "Some(",
        ")",
        "&",
        "x",
    ]);
    prop::collection::vec(fragments, 0..40).prop_map(|v| v.concat())
}

fn check_text(r: &Redactor, text: &str) -> Result<(), TestCaseError> {
    let mut report = Report::new();
    let once = r.redact_text(text, "t", &mut report).into_owned();
    prop_assert!(once.len() <= MAX_MARKER_LEN * text.len().max(1), "{} -> {}", text.len(), once.len());
    let mut report2 = Report::new();
    let twice = r.redact_text(&once, "t", &mut report2).into_owned();
    prop_assert_eq!(&twice, &once, "second pass changed the text of {:?}", text);
    prop_assert!(report2.is_empty(), "second pass found {:?} in {:?}", report2.findings(), once);
    Ok(())
}

fn value_tree() -> impl Strategy<Value = Value> {
    let name = prop::sample::select(vec!["password", "user", "token", "email", "phone", "data", "apiKey", "x"]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        Just(Value::UInt(4111111111111111)),
        tricky_text().prop_map(|s| Value::Str(Text { value: s, original_len: None })),
        ".*".prop_map(Value::str),
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| Value::List(List {
                type_name: None,
                items,
                omitted: 0
            })),
            prop::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(|entries| Value::Map(Map {
                type_name: None,
                entries,
                omitted: 0
            })),
            prop::collection::vec((name.clone(), inner), 0..6).prop_map(|fields| {
                Value::Object(Object {
                    type_name: "T".into(),
                    fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
                    omitted: 0,
                })
            }),
        ]
    })
}

fn json_doc() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        tricky_text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::vec((tricky_text(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    // 512 cases per property by default; PROPTEST_CASES raises it for a long soak.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_unicode_text_is_redacted_without_panic_within_bounds_and_idempotently(text in ".*") {
        check_text(&Redactor::default_rules(), &text)?;
    }

    #[test]
    fn detector_heavy_text_is_redacted_within_bounds_and_idempotently(text in tricky_text()) {
        check_text(&Redactor::default_rules(), &text)?;
    }

    #[test]
    fn strict_mode_and_byte_level_custom_patterns_never_split_a_character(text in tricky_text()) {
        let config = RedactionConfig {
            strict: false,
            patterns: vec![
                CustomPattern { name: "half_char".into(), regex: r"\xA9|\x97".into(), kind: None },
                CustomPattern { name: "wide".into(), regex: r"[^a-z]{3}".into(), kind: None },
            ],
            ..Default::default()
        };
        let r = Redactor::new(&config).unwrap();
        let mut report = Report::new();
        let out = r.redact_text(&text, "t", &mut report);
        prop_assert!(out.len() <= MAX_MARKER_LEN * text.len().max(1));
        let strict = Redactor::new(&RedactionConfig { strict: true, ..Default::default() }).unwrap();
        check_text(&strict, &text)?;
    }

    #[test]
    fn value_trees_are_redacted_without_panic_and_idempotently(mut v in value_tree()) {
        let r = Redactor::default_rules();
        let mut report = Report::new();
        r.redact_field("root", &mut v, "fields.root", &mut report);
        let once = v.clone();
        r.redact_field("root", &mut v, "fields.root", &mut report);
        prop_assert_eq!(v, once);
    }

    #[test]
    fn json_documents_are_redacted_without_panic_and_idempotently(mut doc in json_doc()) {
        let r = Redactor::default_rules();
        let mut report = Report::new();
        r.redact_json(&mut doc, &mut report);
        let once = doc.clone();
        let mut report2 = Report::new();
        r.redact_json(&mut doc, &mut report2);
        prop_assert_eq!(doc, once);
    }
}

/// Found by the `redaction` fuzz target: `-8c::` became `-[REDACTED:IP_ADDRESS]`, and a
/// second pass let a custom pattern (`[^a-z]{3}`) match `-[R`, from the text before the
/// marker into it, and cut the marker apart.
#[test]
fn a_custom_pattern_that_runs_into_a_marker_leaves_it_alone() {
    let config = RedactionConfig {
        patterns: vec![CustomPattern { name: "wide".into(), regex: r"[^a-z]{3}".into(), kind: None }],
        ..Default::default()
    };
    let r = Redactor::new(&config).unwrap();
    let mut report = Report::new();
    let once = r.redact_text("-8c::", "t", &mut report).into_owned();
    assert_eq!(once, "-[REDACTED:IP_ADDRESS]");
    let mut again = Report::new();
    assert_eq!(r.redact_text(&once, "t", &mut again), once);
    assert!(again.is_empty(), "{:?}", again.findings());
    // Any run of the pattern's characters up to a marker, and one that ends inside it.
    for text in ["x--[REDACTED:EMAIL]", "--[REDACTED:EMAIL]y", "12[REDACTED:IP_ADDRESS]9", "é-[REDACTED:SSN]"] {
        let mut report = Report::new();
        let out = r.redact_text(text, "t", &mut report);
        assert!(
            out.contains("[REDACTED:EMAIL]") || out.contains("[REDACTED:IP_ADDRESS]") || out.contains("[REDACTED:SSN]"),
            "{text} -> {out}"
        );
        check_text(&r, text).unwrap();
    }
}

/// Found by the `redaction` fuzz target: in `::Eotp:E` a custom pattern took `::E`, and
/// the key was read as `Eotp` (not sensitive), but after the first pass it reads `otp`
/// (after the marker), so a second pass redacted the value. A key now starts after any
/// region already found, as it will after that region becomes a marker.
#[test]
fn a_key_never_reaches_back_into_a_region_already_redacted() {
    let config = RedactionConfig {
        patterns: vec![CustomPattern { name: "wide".into(), regex: r"[^a-z]{3}".into(), kind: None }],
        ..Default::default()
    };
    let r = Redactor::new(&config).unwrap();
    let mut report = Report::new();
    let once = r.redact_text("::Eotp:E", "t", &mut report).into_owned();
    assert_eq!(once, "[REDACTED:WIDE]otp:[REDACTED:OTP]");
    check_text(&r, "::Eotp:E").unwrap();
    check_text(&r, "::Xpassword=hunter2").unwrap();
}

/// Found by the `redaction` fuzz target: `[0.s].[REDACTED:` (text that only starts like
/// a marker) sheltered `[0.` from a custom pattern in the first pass, was itself
/// redacted, and so no longer sheltered it in the second.
#[test]
fn text_that_only_starts_like_a_marker_shelters_nothing() {
    let config = RedactionConfig {
        patterns: vec![CustomPattern { name: "wide".into(), regex: r"[^a-z]{3}".into(), kind: None }],
        ..Default::default()
    };
    let r = Redactor::new(&config).unwrap();
    for text in ["[0.s].[REDACTED:", "[0.s].[REDACTED:EMAIL", "12.[REDACTED:x]"] {
        check_text(&r, text).unwrap();
    }
}

/// Found by the property above: the URL-credentials marker ended the token an address
/// was part of, so a second pass saw a phone number that the first had not.
#[test]
fn a_marker_that_changes_its_neighbours_is_followed_by_their_redaction_in_the_same_pass() {
    let r = Redactor::default_rules();
    let mut doc = serde_json::json!({ "": { "eyJhbGciOiJIUzI1NiJ9://192.168.123=ff:ee@": null } });
    r.redact_json(&mut doc, &mut Report::new());
    let once = doc.clone();
    r.redact_json(&mut doc, &mut Report::new());
    assert_eq!(doc, once);
}
