//! The browser flow, end to end: the official MCP Python SDK's OAuth client against a
//! real broker, its authorization step driven in headless Chromium (Debian's, through
//! Playwright; `scripts/test` installs both), through sign-in, consent with a scope
//! removed, tool calls, `insufficient_scope` and step-up, refresh, and revocation.

use std::time::Duration;

use serde_json::{Value, json};

use crate::oauth::{PASSWORD, create_user, oauth_broker};

/// Debian's Chromium (never a browser a tool downloads).
const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_from_the_official_mcp_client_in_a_real_browser() {
    let python = std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PERISCOPE_PYTHON is not set: run the tests through scripts/test, which creates .venv from \
             requirements-dev.txt (the `mcp` SDK, Playwright) and installs Chromium"
        )
    });
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/test installs Debian's chromium (apt-get install chromium)"
    );
    let broker = oauth_broker().await;
    create_user(&broker, "grace@example.com", json!({})).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/it/oauth_browser.py");
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(&python)
            .arg(script)
            .arg(format!("{}/mcp", broker.http()))
            .arg("grace@example.com")
            .arg(PASSWORD)
            .arg(CHROMIUM)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser flow finishes within 180 s")
    .expect("the Python interpreter runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser flow failed:\n{stdout}\n{}", stderr.chars().take(6_000).collect::<String>());
    let steps: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!(step("token")["scope"], json!(["mcp:agents:read", "mcp:hits:read", "mcp:system:read"]));
    assert_eq!(step("system_health")["caller"], "grace@example.com");
    assert!(step("insufficient_scope")["challenge"].as_str().unwrap_or_default().contains("mcp:actions:write"));
    assert_eq!(step("revoked")["status"], 401);
    assert_eq!(steps.last().map(|s| s["step"].clone()), Some(json!("done")), "{stdout}");

    // The audit trail names the person and the client for what they did.
    let admin = broker.api_with(crate::support::ADMIN_KEY);
    let entries = crate::support::audit(&admin, "&kind=oauth_client_authorized").await;
    assert_eq!(entries.len(), 2, "the first consent and the step-up: {entries:?}");
    assert!(entries.iter().all(|e| e["actor"]["client_name"] == "Periscope browser test"));
    broker.stop().await;
}
