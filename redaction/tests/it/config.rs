//! Configs from TOML and JSON, their validation, and what each setting does.

use periscope_redaction::{ConfigError, CustomPattern, RedactionConfig, Redactor, Report};

const FULL: &str = r#"
version = 7
strict = false
key_names = ["mothers_maiden_name"]

[builtins]
detectors = true
key_names = true
disabled = ["phone", "key:session"]

[[patterns]]
name = "employee_id"
regex = 'EMP-[0-9]{6}'

[[patterns]]
name = "ticket"
regex = 'TCK[A-Z]{3}[0-9]{4}'
kind = "TICKET_REF"

[exclusions]
key_names = ["csrf_token"]
values = ['[a-z.]+@example\.com', '4111111111111111']
"#;

#[test]
fn a_full_toml_config_parses_validates_and_round_trips_through_json() {
    let config = RedactionConfig::from_toml_str(FULL).unwrap();
    assert_eq!(config.version, 7);
    assert_eq!(config.patterns.len(), 2);
    assert_eq!(config.builtins.disabled, ["phone", "key:session"]);
    let json = serde_json::to_string(&config).unwrap();
    let back: RedactionConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    assert_eq!(Redactor::new(&back).unwrap().version(), 7);
}

#[test]
fn an_empty_config_means_every_built_in_rule_on() {
    let config = RedactionConfig::from_toml_str("").unwrap();
    assert_eq!(config, RedactionConfig::default());
    assert!(config.builtins.detectors && config.builtins.key_names);
    let json: RedactionConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(json, config);
}

#[test]
fn json_from_a_newer_broker_with_unknown_settings_is_accepted() {
    let config: RedactionConfig = serde_json::from_str(r#"{"version":3,"future_knob":true}"#).unwrap();
    assert_eq!(config.version, 3);
}

#[test]
fn custom_patterns_exclusions_and_disabled_rules_take_effect() {
    let r = Redactor::new(&RedactionConfig::from_toml_str(FULL).unwrap()).unwrap();
    let mut report = Report::new();
    let out = r.redact_text(
        "EMP-123456 TCKABC1234 jane@example.com bob@corp.io 4111111111111111 call 555-123-4567 session=abc",
        "log",
        &mut report,
    );
    assert_eq!(
        out,
        "[REDACTED:EMPLOYEE_ID] [REDACTED:TICKET_REF] jane@example.com [REDACTED:EMAIL] 4111111111111111 call \
         555-123-4567 session=abc"
    );
    let rules: Vec<&str> = report.findings().iter().map(|f| f.rule.as_str()).collect();
    assert_eq!(rules, ["custom:employee_id", "custom:ticket", "email"]);
}

#[test]
fn a_bad_custom_regex_is_refused_naming_the_rule_and_the_problem() {
    let err = RedactionConfig::from_toml_str("[[patterns]]\nname = \"order\"\nregex = 'ORD-[0-9'\n").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Pattern { ref name, .. } if name == "order"), "{err:?}");
    assert!(msg.contains("custom pattern `order`"), "{msg}");
    assert!(msg.contains("unclosed character class"), "{msg}");
}

#[test]
fn a_custom_regex_that_matches_the_empty_string_is_refused() {
    let config = RedactionConfig {
        patterns: vec![CustomPattern { name: "maybe".into(), regex: "x*".into(), kind: None }],
        ..Default::default()
    };
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("empty string"), "{err}");
}

#[test]
fn typos_and_wrong_types_in_toml_are_errors_with_the_setting_named() {
    let err = RedactionConfig::from_toml_str("strcit = true").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "strcit"), "{err:?}");
    let err = RedactionConfig::from_toml_str("[builtins]\ndisable = [\"phone\"]").unwrap_err();
    assert!(err.to_string().contains("builtins.disable"), "{err}");
    let err = RedactionConfig::from_toml_str("version = \"two\"").unwrap_err();
    assert!(matches!(err, ConfigError::Shape { .. }), "{err:?}");
    let err = RedactionConfig::from_toml_str("version = ").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
}

#[test]
fn unknown_disabled_rules_duplicate_names_and_bad_kinds_are_refused() {
    let err = RedactionConfig::from_toml_str("[builtins]\ndisabled = [\"phones\"]").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownRule { ref rule, .. } if rule == "phones"), "{err:?}");
    assert!(err.to_string().contains("phone"), "lists the known rules: {err}");
    let dup = "[[patterns]]\nname = \"a\"\nregex = 'x'\n[[patterns]]\nname = \"a\"\nregex = 'y'\n";
    assert!(RedactionConfig::from_toml_str(dup).unwrap_err().to_string().contains("same name"));
    let kind = "[[patterns]]\nname = \"a\"\nregex = 'x'\nkind = \"not ok!\"\n";
    assert!(RedactionConfig::from_toml_str(kind).unwrap_err().to_string().contains("kind"));
    let bad_exclusion = "[exclusions]\nvalues = ['(']\n";
    assert!(matches!(RedactionConfig::from_toml_str(bad_exclusion), Err(ConfigError::Exclusion { .. })));
}

#[test]
fn strict_mode_keeps_only_numbers_and_booleans() {
    let r = Redactor::new(&RedactionConfig { strict: true, ..Default::default() }).unwrap();
    let mut doc = serde_json::json!({
        "name": "Jane", "age": 41, "ratio": 0.5, "ok": true, "none": null, "count": "12",
        "card": "4111111111111111", "tags": ["a", "b"], "empty": ""
    });
    let mut report = Report::new();
    r.redact_json(&mut doc, &mut report);
    assert_eq!(
        doc,
        serde_json::json!({
            "name": "[REDACTED:STRICT]", "age": 41, "ratio": 0.5, "ok": true, "none": null, "count": "12",
            "card": "[REDACTED:CREDIT_CARD]", "tags": ["[REDACTED:STRICT]", "[REDACTED:STRICT]"], "empty": ""
        })
    );
    assert!(report.fired("strict"));
    let mut report = Report::new();
    assert_eq!(r.redact_text("hello world", "t", &mut report), "[REDACTED:STRICT]");
    assert_eq!(r.redact_text("42", "t", &mut report), "42");
}

#[test]
fn turning_the_detectors_off_leaves_values_but_key_names_still_apply() {
    let mut config = RedactionConfig::default();
    config.builtins.detectors = false;
    let r = Redactor::new(&config).unwrap();
    let mut report = Report::new();
    assert_eq!(
        r.redact_text("jane@example.com password=hunter2", "t", &mut report),
        "jane@example.com password=[REDACTED:PASSWORD]"
    );
}
