//! Each built-in detector on values it must catch and look-alikes it must leave.

use periscope_redaction::{Redactor, Report};

fn redact(text: &str) -> (String, Vec<String>) {
    let mut report = Report::new();
    let out = Redactor::default_rules().redact_text(text, "t", &mut report).into_owned();
    (out, report.findings().iter().map(|f| f.rule.clone()).collect())
}

#[track_caller]
fn caught(text: &str, secret: &str, rule: &str) {
    let (out, rules) = redact(text);
    assert!(!out.contains(secret), "{rule}: `{secret}` survived in `{out}`");
    assert!(rules.iter().any(|r| r == rule), "{rule} did not fire on `{text}`: {rules:?} -> `{out}`");
}

#[track_caller]
fn left_alone(text: &str) {
    let (out, rules) = redact(text);
    assert_eq!(out, text, "touched by {rules:?}");
    assert!(rules.is_empty());
}

/// A GitHub-style token with a valid CRC32 checksum, built at run time so no
/// token-shaped literal sits in the source.
fn github_token(prefix: &str, random: &str) -> String {
    let crc = periscope_redaction::validate::crc32(random.as_bytes());
    let check = periscope_redaction::validate::base62_checksum(crc);
    format!("{prefix}_{random}{}", String::from_utf8_lossy(&check))
}

#[test]
fn card_numbers_are_caught_with_and_without_separators_and_only_when_luhn_agrees() {
    caught("card 4111 1111 1111 1111 ok", "1111 1111", "credit_card");
    caught("amex 3782-822463-10005", "822463", "credit_card");
    caught("pan=5555555555554444", "5555555555554444", "credit_card");
    caught("visa19 4111-1111-1111-1111-003", "1111-003", "credit_card");
    left_alone("order 4111111111111112 shipped");
    left_alone("epoch ms 1700000000123");
    left_alone("id 9111111111111111");
}

#[test]
fn ibans_need_their_country_length_and_mod_97() {
    caught("pay to GB82 WEST 1234 5698 7654 32 today", "5698", "iban");
    caught("DE89370400440532013000", "0532013000", "iban");
    left_alone("GB82WEST12345698765433");
}

#[test]
fn ssns_follow_the_ssa_rules_and_bare_nine_digits_need_the_word_ssn() {
    caught("ssn 123-45-6789", "6789", "us_ssn");
    caught("SSN 123456789", "123456789", "us_ssn");
    caught("ssn: 123456789", "123456789", "key:ssn");
    left_alone("id 000-12-3456");
    left_alone("id 666-12-3456");
    left_alone("id 923-12-3456");
    left_alone("customer 123456789");
}

#[test]
fn emails_are_caught_but_asset_names_and_package_specs_are_not() {
    caught("from <jane.doe+tag@mail.example.co.uk>", "jane.doe", "email");
    left_alone("GET /static/icon@2x.png");
    left_alone("npm i lodash@4.17.21");
    left_alone("@Override public void run()");
}

#[test]
fn phone_numbers_in_international_and_national_formats_are_caught() {
    for (text, secret) in [
        ("call +1-780-563-6083x7783 now", "563-6083"),
        ("(591)341-7776", "341-7776"),
        ("206.269.0743x9150", "269.0743"),
        ("+44(0)115 4960914", "4960914"),
        ("+33 (0)1 41 63 60 83", "63 60 83"),
        ("tel 080-9141-7776", "9141-7776"),
        ("phone: 4155551234", "4155551234"),
    ] {
        caught(text, secret, "phone");
    }
}

#[test]
fn dates_versions_decimals_and_bare_numbers_are_not_phone_numbers() {
    for text in [
        "2024-01-15 10:30:00",
        "15.01.2024",
        "version 10.0.19041.1",
        "took 1234.5678 ms",
        "order 4829301758",
        "ORD-2024-000123",
        "12 items",
        "v1.22.333",
    ] {
        left_alone(text);
    }
}

#[test]
fn ip_addresses_are_caught_except_loopback_unspecified_and_netmasks() {
    caught("from 203.0.113.42:443", "203.0.113.42", "ip_address");
    caught("peer [2001:db8::8a2e:370:7334]:443", "8a2e:370", "ip_address");
    caught("fe80::1ff:fe23:4567:890a%eth0 up", "4567:890a", "ip_address");
    left_alone("listening on 0.0.0.0:8080 and 127.0.0.1:6379");
    left_alone("bind [::]:80 and ::1");
    left_alone("netmask 255.255.255.0");
    left_alone("oid 1.3.6.1.4.1.311");
    left_alone("version 1.0.0.0");
    left_alone("10:30:00 std::collections::HashMap");
}

#[test]
fn mac_addresses_are_caught() {
    caught("device 00:1A:2B:3C:4D:5E joined", "2B:3C", "mac_address");
    caught("mac=00-1a-2b-3c-4d-5e", "2b-3c", "mac_address");
    left_alone("00:00:00:00:00:00");
}

#[test]
fn jwts_need_a_json_header_with_alg() {
    let jwt =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    caught(&format!("token {jwt}"), "eyJzdWIi", "jwt");
    // Header {"typ":"JWT"} has no alg.
    left_alone("eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc");
}

#[test]
fn pem_private_keys_are_redacted_through_their_end_line_or_to_the_end_of_a_cut_value() {
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\nAbCdEf==\n-----END RSA PRIVATE KEY-----";
    let (out, _) = redact(&format!("key:\n{pem}\nafter"));
    assert_eq!(out, "key:\n[REDACTED:PRIVATE_KEY]\nafter");
    caught("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "MIIEvQ", "pem_private_key");
    left_alone("-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqh");
}

#[test]
fn credentials_in_headers_and_urls_are_caught_leaving_the_user_and_host() {
    caught("curl -H 'X: Bearer abcDEF123456ghiJKL' url", "abcDEF123456", "bearer_token");
    caught("sending Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpw", "basic_auth");
    let (out, rules) = redact("postgres://app:s3cr3t@db.internal:5432/orders");
    assert_eq!(out, "postgres://app:[REDACTED:URL_CREDENTIALS]@db.internal:5432/orders");
    assert_eq!(rules, ["url_credentials"]);
    left_alone("basic authentication is enabled");
    left_alone("the Bearer scheme");
}

#[test]
fn cloud_and_saas_keys_are_caught_by_format() {
    let github = github_token("ghp", "abcdefghijABCDEFGHIJ0123456789");
    caught(&format!("token {github}"), &github, "github_token");
    let aws = format!("AKIA{}", "Q".repeat(16));
    caught(&format!("id={aws}"), &aws, "aws_access_key");
    let cases = [
        (format!("glpat-{}", "a1B2c3D4e5F6g7H8i9J0"), "gitlab_token"),
        (format!("xoxb-123456789012-1234567890123-{}", "a".repeat(24)), "slack_token"),
        (format!("sk_live_{}", "4eC39HqLyjWDarjtT1zdp7dc"), "stripe_key"),
        (format!("AIza{}", "SyA1234567890abcdefghijklmnopqrstuv"), "google_api_key"),
        (format!("sk-{}T3BlbkFJ{}", "a".repeat(20), "b".repeat(20)), "openai_api_key"),
        (format!("sk-ant-api03-{}AA", "x".repeat(93)), "anthropic_api_key"),
        (format!("SG.{}.{}", "a".repeat(22), "b".repeat(43)), "sendgrid_key"),
        (format!("hf_{}", "abcdefghijABCDEFGHIJabcdefghijABCD"), "huggingface_token"),
    ];
    for (token, rule) in &cases {
        caught(&format!("using {token} here"), token, rule);
    }
}

#[test]
fn documentation_keys_and_failed_checksums_are_left_alone() {
    left_alone("AKIAIOSFODNN7EXAMPLE");
    let mut github = github_token("ghp", "abcdefghijABCDEFGHIJ0123456789");
    github.replace_range(5..6, "z");
    left_alone(&github);
    // The right prefix but too short to be the token.
    left_alone("AIzaShort");
}

#[test]
fn key_value_pairs_in_text_are_caught_by_their_key_name() {
    for (text, secret, rule) in [
        ("dbPassword=hunter2 next=1", "hunter2", "key:password"),
        (r#"{"api_key": "abc 123"}"#, "abc 123", "key:api_key"),
        ("X-Api-Key: zzyzx-77", "zzyzx-77", "key:api_key"),
        ("Config { token: Some(\"t0k3n\"), name: \"svc\" }", "t0k3n", "key:token"),
        ("$password = 'p4ss(word)';", "p4ss(word)", "key:password"),
        ("Cookie: sid=abc; theme=dark", "theme=dark", "key:cookie"),
        ("signature=8f3a9c1d2e4b5a6f7c8d9e0f1a2b3c4d", "8f3a9c1d", "generic_secret"),
    ] {
        caught(text, secret, rule);
    }
}

/// Issue 9: a value under a sensitive name is hidden in every common text shape, for
/// every name rule (phone field names included), not only in `key: value`.
#[test]
fn a_value_under_a_sensitive_name_is_redacted_in_every_common_text_shape() {
    type Shape = fn(&str, &str) -> String;
    let shapes: [Shape; 19] = [
        |k, v| format!("{k}: {v}"),
        |k, v| format!("{k}={v}"),
        |k, v| format!("{k} = '{v}'"),
        |k, v| format!("{k}='{v}'"),
        |k, v| format!("{k}=\"{v}\""),
        |k, v| format!("login failed {{\"user\": \"ada\", \"{k}\": \"{v}\", \"n\": 3}}"),
        |k, v| format!("{{\"message\": \"payload {{\\\"{k}\\\":\\\"{v}\\\"}}\"}}"),
        |k, v| format!("User {{ id: 7, {k}: \"{v}\", name: \"Ada\" }}"),
        |k, v| format!("User {{ id: 7, {k}: Some(\"{v}\") }}"),
        |k, v| format!("User(id=7, {k}='{v}', name='Ada')"),
        |k, v| format!("User(id=7, {k}=b'{v}')"),
        |k, v| format!("{{'id': 7, '{k}': '{v}'}}"),
        |k, v| format!("User{{id=7, {k}='{v}', name='Ada'}}"),
        |k, v| format!("User(id=7, {k}={v}, name=Ada)"),
        |k, v| format!("{k} => '{v}'"),
        |k, v| format!("{{:{k} => \"{v}\"}}"),
        |k, v| format!("[{k}] => {v}"),
        |k, v| format!("{{Id:7 {k}:{v} Name:Ada}}"),
        |k, v| format!("<user><{k}>{v}</{k}></user>"),
    ];
    let names = [
        ("phone", "4874100930", "phone"),
        ("mobile", "4874100930", "phone"),
        ("contactPhone", "4874100930", "phone"),
        ("phone_number", "6853.8387", "phone"),
        ("password", "hunter2-x", "key:password"),
        ("api_key", "zq81-k3y", "key:api_key"),
        ("sessionId", "s3ss10n", "key:session"),
        ("cvv", "8141", "key:cvv"),
    ];
    for shape in shapes {
        for (key, value, rule) in names {
            caught(&shape(key, value), value, rule);
        }
    }
}

/// The shapes above must not make lookalikes sensitive: a name that only contains a
/// phone word, a generic type parameter, a comparison, a closing tag.
#[test]
fn sensitive_names_in_code_and_markup_that_hold_no_value_are_left_alone() {
    for text in [
        "telemetry=12345678 hotel_id: 48741009 cell_count=12 phone_verified=true",
        "phone: unknown, mobile='n/a'",
        "Option<Token> value",
        "a->password->x",
        "if password > 5 {",
        "<token_type>Bearer</token_type>",
        "<password>",
        "</password> done",
    ] {
        left_alone(text);
    }
}

#[test]
fn key_value_lookalikes_are_left_alone() {
    for text in [
        "tokenizer=bert-base author=jane passwordPolicy=strict max_tokens=512",
        "TokenService: started",
        "auth::session_cache: warmed",
        "if password == input",
        "password: null, token: ********",
        "cache_key=user:42",
    ] {
        left_alone(text);
    }
}

#[test]
fn uuids_hashes_timestamps_and_class_names_are_left_alone() {
    for text in [
        "550e8400-e29b-41d4-a716-446655440000",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "2024-01-15T10:30:00.123Z epoch=1700000000",
        "org.springframework.security.oauth2.provider.token.TokenStore",
        "at com.shop.api.UserController.login(UserController.java:88)",
    ] {
        left_alone(text);
    }
}
