//! Redacting captured values, whole hits and JSON documents: key names all the way
//! down, containers replaced whole, integers, paths, and idempotence.

use periscope_protocol::hit::MAX_FINDINGS_PER_HIT;
use periscope_protocol::{
    ActionId, Field, Hit, HitLocation, List, Map, Object, RedactionFinding, SpanFrame, Text, TruncationSummary, Value,
    WatchResult,
};
use periscope_redaction::{FINDINGS_TRUNCATED_RULE, RedactionConfig, Redactor, Report};

fn obj(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.into(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

fn map(entries: Vec<(Value, Value)>) -> Value {
    Value::Map(Map { type_name: Some("HashMap".into()), entries, omitted: 0 })
}

fn hit(fields: Vec<Field>) -> Hit {
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

fn paths(report: &Report) -> Vec<(String, String)> {
    report.findings().iter().map(|f| (f.path.clone(), f.rule.clone())).collect()
}

#[test]
fn key_names_apply_to_fields_and_string_map_keys_all_the_way_down() {
    let r = Redactor::default_rules();
    let mut v = obj(
        "Request",
        vec![
            ("user", obj("User", vec![("name", Value::str("jane")), ("dbPassword", Value::str("blue-horse"))])),
            (
                "headers",
                map(vec![
                    (Value::str("Authorization"), Value::str("Basic whatever")),
                    (Value::str("accept"), Value::str("*/*")),
                ]),
            ),
        ],
    );
    let mut report = Report::new();
    r.redact_field("req", &mut v, "fields.req", &mut report);
    assert_eq!(v.field("user").and_then(|u| u.field("dbPassword")), Some(&Value::str("[REDACTED:PASSWORD]")));
    assert_eq!(v.field("user").and_then(|u| u.field("name")), Some(&Value::str("jane")));
    match v.field("headers") {
        Some(Value::Map(m)) => {
            assert_eq!(m.entries[0].1, Value::str("[REDACTED:AUTHORIZATION]"));
            assert_eq!(m.entries[1].1, Value::str("*/*"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        paths(&report),
        [
            ("fields.req.user.dbPassword".to_owned(), "key:password".to_owned()),
            ("fields.req.headers.Authorization".to_owned(), "key:authorization".to_owned())
        ]
    );
}

#[test]
fn a_container_under_a_sensitive_name_is_replaced_whole_and_empty_or_null_values_are_kept() {
    let r = Redactor::default_rules();
    let mut creds = obj("Creds", vec![("user", Value::str("a")), ("key", Value::str("b"))]);
    let mut report = Report::new();
    r.redact_field("credentials", &mut creds, "fields.credentials", &mut report);
    assert_eq!(creds, Value::str("[REDACTED:CREDENTIALS]"));
    for mut keep in [Value::Null, Value::Bool(true), Value::str("")] {
        let before = keep.clone();
        r.redact_field("password", &mut keep, "p", &mut report);
        assert_eq!(keep, before);
    }
    // A truncated password does not keep its original length.
    let mut cut = Value::Str(Text { value: "abc".into(), original_len: Some(900) });
    r.redact_field("password", &mut cut, "p", &mut report);
    assert_eq!(cut, Value::Str(Text { value: "[REDACTED:PASSWORD]".into(), original_len: None }));
}

#[test]
fn card_numbers_captured_as_integers_are_caught_but_other_integers_are_not() {
    let r = Redactor::default_rules();
    let mut report = Report::new();
    let mut card = Value::UInt(4111111111111111);
    r.redact_field("n", &mut card, "n", &mut report);
    assert_eq!(card, Value::str("[REDACTED:CREDIT_CARD]"));
    for mut n in [Value::Int(4111111111111112), Value::Int(1700000000123), Value::Int(123456789), Value::Int(-4)] {
        let before = n.clone();
        r.redact_field("n", &mut n, "n", &mut report);
        assert_eq!(n, before);
    }
    let mut ssn_as_int = Value::Int(123456789);
    r.redact_field("ssn", &mut ssn_as_int, "n", &mut report);
    assert_eq!(ssn_as_int, Value::str("[REDACTED:SSN]"));
}

#[test]
fn bare_digits_are_a_phone_number_only_under_a_phone_name() {
    let r = Redactor::default_rules();
    let mut report = Report::new();
    let mut phones = Value::List(List {
        type_name: None,
        items: vec![Value::str("4155551234"), Value::str("+44 20 7946 0958")],
        omitted: 0,
    });
    r.redact_field("mobilePhones", &mut phones, "p", &mut report);
    match &phones {
        Value::List(l) => assert!(l.items.iter().all(|i| *i == Value::str("[REDACTED:PHONE]")), "{l:?}"),
        other => panic!("{other:?}"),
    }
    let mut id = Value::str("4155551234");
    r.redact_field("order_id", &mut id, "p", &mut report);
    assert_eq!(id, Value::str("4155551234"));
}

#[test]
fn an_integer_under_a_phone_name_is_a_phone_number_in_values_and_json() {
    let r = Redactor::default_rules();
    let mut report = Report::new();
    let mut v = obj(
        "User",
        vec![("phone", Value::Int(4874100930)), ("mobile", Value::UInt(4874100930)), ("age", Value::Int(36))],
    );
    r.redact_field("user", &mut v, "fields.user", &mut report);
    assert_eq!(v.field("phone"), Some(&Value::str("[REDACTED:PHONE]")));
    assert_eq!(v.field("mobile"), Some(&Value::str("[REDACTED:PHONE]")));
    assert_eq!(v.field("age"), Some(&Value::Int(36)));
    let mut short = Value::Int(12);
    r.redact_field("phone_count", &mut short, "n", &mut report);
    assert_eq!(short, Value::Int(12), "too short to be a phone number");
    let mut doc: serde_json::Value = serde_json::json!({"phone": 4874100930_u64, "order_id": 4874100930_u64});
    r.redact_json(&mut doc, &mut report);
    assert_eq!(doc, serde_json::json!({"phone": "[REDACTED:PHONE]", "order_id": 4874100930_u64}));
}

#[test]
fn map_keys_that_are_values_are_scanned_too() {
    let r = Redactor::default_rules();
    let mut v = map(vec![(Value::str("jane@example.com"), Value::Int(3))]);
    let mut report = Report::new();
    r.redact_field("visits", &mut v, "fields.visits", &mut report);
    match &v {
        Value::Map(m) => assert_eq!(m.entries[0].0, Value::str("[REDACTED:EMAIL]")),
        other => panic!("{other:?}"),
    }
    assert_eq!(paths(&report), [("fields.visits[0]".to_owned(), "email".to_owned())]);
}

#[test]
fn a_whole_hit_is_redacted_with_paths_watch_names_and_the_rules_version() {
    let config = RedactionConfig { version: 9, ..Default::default() };
    let r = Redactor::new(&config).unwrap();
    let mut h = hit(vec![
        Field::new("message", Value::str("login for jane@example.com")),
        Field::new("password", Value::str("hunter2")),
    ]);
    h.spans = vec![SpanFrame {
        name: "handle".into(),
        target: None,
        file: None,
        line: None,
        fields: vec![Field::new("api_key", Value::str("abc"))],
    }];
    h.watches = vec![
        WatchResult { expression: "user.password".into(), value: Some(Value::str("looks-harmless")), error: None },
        WatchResult { expression: "user.email".into(), value: None, error: Some("no field on bob@x.io".into()) },
    ];
    h.backtrace = Some(vec!["at auth::login (token=abc123)".into()]);
    r.redact_hit(&mut h);
    assert_eq!(h.rules_version, 9);
    assert_eq!(h.fields[0].value, Value::str("login for [REDACTED:EMAIL]"));
    assert_eq!(h.fields[1].value, Value::str("[REDACTED:PASSWORD]"));
    assert_eq!(h.spans[0].fields[0].value, Value::str("[REDACTED:API_KEY]"));
    assert_eq!(h.watches[0].value, Some(Value::str("[REDACTED:PASSWORD]")));
    assert_eq!(h.watches[1].error.as_deref(), Some("no field on [REDACTED:EMAIL]"));
    assert_eq!(h.backtrace.as_ref().unwrap()[0], "at auth::login (token=[REDACTED:TOKEN])");
    let found: Vec<(&str, &str)> = h.redactions.iter().map(|f| (f.path.as_str(), f.rule.as_str())).collect();
    assert_eq!(
        found,
        [
            ("fields.message", "email"),
            ("fields.password", "key:password"),
            ("spans[0].api_key", "key:api_key"),
            ("watches[0]", "key:password"),
            ("watches[1].error", "email"),
            ("backtrace[0]", "key:token"),
        ]
    );
}

#[test]
fn redacting_a_hit_twice_changes_nothing_the_second_time() {
    let r = Redactor::default_rules();
    let mut h = hit(vec![
        Field::new("message", Value::str("card 4111 1111 1111 1111 for jane@example.com, password=x")),
        Field::new("cfg", obj("Cfg", vec![("token", Value::str("t")), ("host", Value::str("10.1.2.3"))])),
    ]);
    r.redact_hit(&mut h);
    let once = h.clone();
    r.redact_hit(&mut h);
    assert_eq!(h, once);
}

#[test]
fn findings_are_capped_per_hit_with_a_count_of_the_rest_that_survives_a_second_pass() {
    let r = Redactor::default_rules();
    let fields = (0..300).map(|i| Field::new(format!("password{i}"), Value::str("x"))).collect();
    let mut h = hit(fields);
    r.redact_hit(&mut h);
    assert_eq!(h.redactions.len(), MAX_FINDINGS_PER_HIT);
    let last = h.redactions.last().unwrap();
    assert_eq!(last.rule, FINDINGS_TRUNCATED_RULE);
    assert_eq!(last.path, "+45 more");
    let once = h.clone();
    r.redact_hit(&mut h);
    assert_eq!(h, once);
}

#[test]
fn findings_from_an_agent_are_kept_only_when_well_formed() {
    let r = Redactor::default_rules();
    let mut h = hit(vec![]);
    h.redactions = vec![
        RedactionFinding { path: "fields.a".into(), rule: "email".into() },
        RedactionFinding { path: "fields.b".into(), rule: "hunter2 is the password!".into() },
    ];
    r.redact_hit(&mut h);
    assert_eq!(h.redactions, [RedactionFinding { path: "fields.a".into(), rule: "email".into() }]);
}

#[test]
fn json_documents_are_redacted_structurally_with_dotted_paths() {
    let r = Redactor::default_rules();
    let mut doc = serde_json::json!({
        "user": {"email": "jane@example.com", "password": {"old": "a", "new": "b"}, "age": 41},
        "cards": [4111111111111111u64, "5555 5555 5555 4444"],
        "jane@example.com": true,
        "note": "nothing here"
    });
    let mut report = Report::new();
    r.redact_json(&mut doc, &mut report);
    assert_eq!(
        doc,
        serde_json::json!({
            "user": {"email": "[REDACTED:EMAIL]", "password": "[REDACTED:PASSWORD]", "age": 41},
            "cards": ["[REDACTED:CREDIT_CARD]", "[REDACTED:CREDIT_CARD]"],
            "[REDACTED:EMAIL]": true,
            "note": "nothing here"
        })
    );
    let mut found: Vec<(String, String)> = paths(&report);
    found.sort();
    assert_eq!(
        found,
        [
            ("".to_owned(), "email".to_owned()),
            ("cards[0]".to_owned(), "credit_card".to_owned()),
            ("cards[1]".to_owned(), "credit_card".to_owned()),
            ("user.email".to_owned(), "email".to_owned()),
            ("user.password".to_owned(), "key:password".to_owned()),
        ]
    );
}

#[test]
fn findings_never_hold_the_redacted_value() {
    let r = Redactor::default_rules();
    let mut report = Report::new();
    let secret = "jane.doe@example.com";
    let _ = r.redact_text(&format!("user {secret} password=hunter2"), "log", &mut report);
    let mut doc = serde_json::json!({ secret: 1, "password": "hunter2" });
    r.redact_json(&mut doc, &mut report);
    let dump = format!("{report:?}");
    assert!(!dump.contains(secret) && !dump.contains("hunter2"), "{dump}");
}
