//! `periscope redact`: the real binary on sample data, as a user tries their rules.

use std::io::Write as _;
use std::process::{Command, Stdio};

fn redact(args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_periscope"))
        .arg("redact")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("periscope starts");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("input written");
    let out = child.wait_with_output().expect("periscope ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn text_is_redacted_line_by_line_and_the_report_names_rules_not_values() {
    let (ok, out, err) = redact(
        &["--report"],
        "paid with 4111 1111 1111 1111 from 10.1.2.3\nnothing here: 550e8400-e29b-41d4-a716-446655440000 v1.2.3 at 2026-11-23T10:00:00Z\n",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "paid with [REDACTED:CREDIT_CARD] from [REDACTED:IP_ADDRESS]\nnothing here: 550e8400-e29b-41d4-a716-446655440000 v1.2.3 at 2026-11-23T10:00:00Z\n"
    );
    assert!(err.contains(r#"{"path":"line 1","rule":"credit_card"}"#), "{err}");
    assert!(!err.contains("4111"), "{err}");
}

#[test]
fn json_documents_are_redacted_structurally_with_member_names_known() {
    let input = "{\"user\": {\"id\": 7, \"dbPassword\": \"x\", \"email\": \"a@b.example\"}}\n{\"note\": \"plain\"}\n";
    let (ok, out, err) = redact(&["--json"], input);
    assert!(ok, "{err}");
    let docs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON out")).collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["user"]["id"], 7);
    assert_eq!(docs[0]["user"]["dbPassword"], "[REDACTED:PASSWORD]");
    assert_eq!(docs[0]["user"]["email"], "[REDACTED:EMAIL]");
    assert_eq!(docs[1]["note"], "plain");
}

#[test]
fn custom_rules_from_a_file_apply_and_a_bad_rule_is_named() {
    let dir = std::env::temp_dir().join(format!("periscope-redact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[patterns]]\nname = \"ticket\"\nregex = 'TCK-[0-9]+'\nkind = \"TICKET\"\n").expect("write");
    let (ok, out, err) = redact(&["--config", good.to_str().expect("utf-8 path")], "see TCK-42\n");
    assert!(ok, "{err}");
    assert_eq!(out, "see [REDACTED:TICKET]\n");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[patterns]]\nname = \"oops\"\nregex = '(['\n").expect("write");
    let (ok, _, err) = redact(&["--config", bad.to_str().expect("utf-8 path")], "x\n");
    assert!(!ok);
    assert!(err.contains("oops"), "{err}");
    let (ok, _, err) = redact(&["--json"], "{not json");
    assert!(!ok);
    assert!(err.contains("JSON document 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
