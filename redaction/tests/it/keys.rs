//! The key-name rule's documented decisions, name by name.

use periscope_protocol::Value;
use periscope_redaction::{RedactionConfig, Redactor, Report};

fn rule_for(redactor: &Redactor, name: &str) -> Option<String> {
    let mut value = Value::str("looks harmless");
    let mut report = Report::new();
    redactor.redact_field(name, &mut value, "f", &mut report);
    report.findings().first().map(|f| f.rule.clone())
}

#[test]
fn names_that_end_in_a_secret_or_a_continuation_are_redacted_whatever_the_value() {
    let r = Redactor::default_rules();
    for (name, rule) in [
        ("password", "key:password"),
        ("dbPassword", "key:password"),
        ("DB_PASSWORD", "key:password"),
        ("X-Api-Key", "key:api_key"),
        ("apikey", "key:api_key"),
        ("xapikey", "key:api_key"),
        ("accessToken", "key:token"),
        ("csrftoken", "key:token"),
        ("client_secret", "key:secret"),
        ("passwordHash", "key:password"),
        ("password_digest", "key:password"),
        ("sessionId", "key:session"),
        ("JSESSIONID", "key:session"),
        ("connect.sid", "key:session"),
        ("apiKeyValue", "key:api_key"),
        ("token2", "key:token"),
        ("cvv2", "key:cvv"),
        ("Authorization", "key:authorization"),
        ("Set-Cookie", "key:cookie"),
        ("privateKeyPem", "key:private_key"),
        ("credit_card_number", "key:card_number"),
        ("pwd", "key:password"),
        ("ssn", "key:ssn"),
    ] {
        assert_eq!(rule_for(&r, name).as_deref(), Some(rule), "{name}");
    }
}

#[test]
fn names_about_a_secret_or_merely_containing_its_letters_are_left_alone() {
    let r = Redactor::default_rules();
    for name in [
        "author",
        "authority",
        "authenticated",
        "tokenizer",
        "tokens",
        "max_tokens",
        "passwordPolicy",
        "password_min_length",
        "tokenExpiry",
        "secretName",
        "sessionTimeout",
        "TokenService",
        "tokenStore",
        "credentialsProvider",
        "secretary",
        "possession",
        "pinned",
        "private_key_path",
        "password_file",
        "key",
        "cache_key",
        "monkey",
    ] {
        assert_eq!(rule_for(&r, name), None, "{name}");
    }
}

#[test]
fn custom_key_names_are_split_and_matched_like_the_built_in_ones() {
    let config = RedactionConfig { key_names: vec!["mothers_maiden_name".into()], ..Default::default() };
    let r = Redactor::new(&config).unwrap();
    assert_eq!(rule_for(&r, "mothersMaidenName").as_deref(), Some("key:mothers_maiden_name"));
    assert_eq!(rule_for(&r, "customer.mothers-maiden-name").as_deref(), Some("key:mothers_maiden_name"));
    assert_eq!(rule_for(&r, "maiden_name"), None);
}

#[test]
fn excluded_key_names_are_not_redacted_by_name_but_their_values_are_still_scanned() {
    let config = RedactionConfig {
        exclusions: periscope_redaction::Exclusions { key_names: vec!["csrf_token".into()], values: vec![] },
        ..Default::default()
    };
    let r = Redactor::new(&config).unwrap();
    assert_eq!(rule_for(&r, "csrfToken"), None);
    let mut value = Value::str("mail jane@example.com");
    let mut report = Report::new();
    r.redact_field("CSRF-Token", &mut value, "f", &mut report);
    assert_eq!(value, Value::str("mail [REDACTED:EMAIL]"));
}

#[test]
fn disabling_built_in_key_names_keeps_value_detectors_and_custom_names() {
    let mut config = RedactionConfig { key_names: vec!["pin".into()], ..Default::default() };
    config.builtins.key_names = false;
    let r = Redactor::new(&config).unwrap();
    assert_eq!(rule_for(&r, "password"), None);
    assert_eq!(rule_for(&r, "pin").as_deref(), Some("key:pin"));
    let mut report = Report::new();
    assert_eq!(r.redact_text("pin=1234 password=x", "t", &mut report), "pin=[REDACTED:PIN] password=x");
}
