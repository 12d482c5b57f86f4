//! The `periscope` binary as an operator runs it: the bootstrap key on a fresh data
//! directory (once), `periscope keys` against a running broker's data directory (a
//! revocation takes effect on the broker's next call), `periscope audit export`,
//! `periscope config check`, and environment variables named in errors.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod support;

use support::{Served, periscope, temp_dir};

fn get(base: &str, path: &str, key: &str) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new().get(format!("{base}/api/v1{path}")).bearer_auth(key).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    })
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("periscope runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_fresh_broker_prints_a_bootstrap_key_once_and_never_again() {
    let dir = temp_dir("bootstrap");
    let first = Served::start(&dir);
    assert!(first.startup.contains("PERISCOPE BOOTSTRAP KEY"), "{}", first.startup);
    let secret = first
        .startup
        .split_whitespace()
        .find(|w| w.starts_with("psk_"))
        .unwrap_or_else(|| panic!("a key in {}", first.startup))
        .to_owned();
    let (status, health) = get(&first.base, "/health", &secret);
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        (health["caller"]["role"].as_str(), health["caller"]["org"].as_str()),
        (Some("company_admin"), Some("default"))
    );
    first.stop();

    let second = Served::start(&dir);
    assert!(!second.startup.contains("BOOTSTRAP"), "{}", second.startup);
    assert!(!second.startup.contains("psk_"), "{}", second.startup);
    assert_eq!(get(&second.base, "/health", &secret).0, 200, "the bootstrap key outlives the restart");
    second.stop();
    // The secret itself was never written down.
    let db = std::fs::read(dir.join("periscope.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains(&secret));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keys_made_and_revoked_on_the_command_line_take_effect_on_a_running_broker() {
    let dir = temp_dir("keys");
    let (ok, out, err) = run(periscope()
        .args(["keys", "create", "--name", "ops", "--role", "company_admin", "--json", "--data-dir"])
        .arg(&dir));
    assert!(ok, "{err}");
    let ops: Value = serde_json::from_str(&out).unwrap();
    let ops_secret = ops["secret"].as_str().unwrap().to_owned();
    assert_eq!(ops["key"]["role"], "company_admin");

    let broker = Served::start(&dir);
    assert!(!broker.startup.contains("BOOTSTRAP"), "a store with keys gets no bootstrap key: {}", broker.startup);
    assert_eq!(get(&broker.base, "/health", &ops_secret).0, 200);

    // Created while the broker runs: works as soon as the broker next looks (within a
    // quarter second; a key it does not know never makes it read the database).
    let (ok, out, err) = run(periscope()
        .args(["keys", "create", "--name", "ci", "--scopes", "mcp:agents:read", "--expires-in", "30d", "--data-dir"])
        .arg(&dir));
    assert!(ok, "{err}");
    assert!(out.contains("Secret (shown once"), "{out}");
    let ci_secret = out.split_whitespace().find(|w| w.starts_with("psk_")).unwrap().to_owned();
    let ci_id = out.split(['(', ')']).find(|w| w.starts_with("key_")).unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(&broker.base, "/agents", &ci_secret).0 != 200 {
        assert!(std::time::Instant::now() < deadline, "a key created on the command line works within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, err) = get(&broker.base, "/health", &ci_secret);
    assert_eq!((status, err["error"]["details"]["required_scope"].as_str()), (403, Some("mcp:system:read")));

    // Listed without secrets.
    let (ok, table, _) = run(periscope().args(["keys", "list", "--data-dir"]).arg(&dir));
    assert!(ok && table.contains(&ci_id) && table.contains("ops"), "{table}");
    assert!(!table.contains(&ci_secret) && !table.contains(&ops_secret), "{table}");

    // Revoked from the command line: the running broker refuses it on the next call.
    let (ok, out, err) = run(periscope().args(["keys", "revoke", &ci_id, "--data-dir"]).arg(&dir));
    assert!(ok, "{err}");
    assert!(out.contains("Revoked"), "{out}");
    let (status, body) = get(&broker.base, "/agents", &ci_secret);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    let (ok, all, _) = run(periscope().args(["keys", "list", "--all", "--json", "--data-dir"]).arg(&dir));
    assert!(ok && all.lines().any(|l| l.contains(&ci_id) && l.contains("\"status\":\"revoked\"")), "{all}");

    // The trail, from the command line, as JSON lines.
    let (ok, export, err) = run(periscope().args(["audit", "export", "--data-dir"]).arg(&dir));
    assert!(ok, "{err}");
    let entries: Vec<Value> = export.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(entries.iter().any(|e| e["kind"] == "key_created" && e["actor"]["type"] == "cli"), "{export}");
    assert!(entries.iter().any(|e| e["kind"] == "key_revoked" && e["target"]["key_id"] == ci_id.as_str()), "{export}");
    assert!(!export.contains(&ci_secret));
    let (ok, only, _) = run(periscope().args(["audit", "export", "--kind", "key_revoked", "--data-dir"]).arg(&dir));
    assert!(ok && only.lines().count() == 1, "{only}");
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_check_accepts_a_good_file_and_names_the_key_of_a_bad_one() {
    let dir = temp_dir("config");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let good = file(
        "good.toml",
        r#"listen = "127.0.0.1:7071"

[[api_keys]]
name = "lead"
key = "lead-key-0123456789abcdef"
role = "group_admin"
group = "payments"

[[agent_keys]]
key = "agent-key-0123456789abcdef"
pools = ["pay"]

[callers]
calls_per_minute = 600

[ingest]
agent_hits_per_sec = 100
"#,
    );
    let (ok, out, err) = run(periscope().args(["config", "check"]).arg(&good));
    assert!(ok, "{err}");
    assert!(out.contains("good.toml: ok") && out.contains("600 calls/min"), "{out}");

    for (name, text, names) in [
        ("zero.toml", "[callers]\ncalls_per_minute = 0\n", "callers.calls_per_minute"),
        ("typo.toml", "lisen = \"127.0.0.1:1\"\n", "lisen"),
        (
            "role.toml",
            "[[api_keys]]\nname = \"x\"\nkey = \"0123456789abcdef\"\nrole = \"group_admin\"\n",
            "api_keys[0].group",
        ),
        ("flood.toml", "[ingest]\nflood_warnings = 0\n", "ingest.flood_warnings"),
    ] {
        let (ok, _, err) = run(periscope().args(["config", "check"]).arg(file(name, text)));
        assert!(!ok, "{name} should be refused");
        assert!(err.contains(names), "{name}: {err}");
    }
    let (ok, _, err) = run(periscope().args(["config", "check"]).arg(dir.join("missing.toml")));
    assert!(!ok && err.contains("missing.toml"), "{err}");

    // Environment variables are named in their errors.
    let (ok, _, err) = run(periscope().arg("serve").env("PERISCOPE_LISTEN", "not-an-address"));
    assert!(!ok && err.contains("PERISCOPE_LISTEN"), "{err}");
    let (ok, _, err) = run(periscope().arg("serve").env("PERISCOPE_CONFIG", dir.join("zero.toml")));
    assert!(!ok && err.contains("PERISCOPE_CONFIG") && err.contains("callers.calls_per_minute"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn people_who_sign_in_are_created_listed_disabled_and_enabled_on_the_command_line() {
    use std::io::Write as _;
    let dir = temp_dir("users");
    let mut create = periscope()
        .args(["users", "create", "--name", "ada@example.com", "--group", "payments", "--password-stdin", "--json"])
        .arg("--data-dir")
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    create.stdin.take().unwrap().write_all(b"a long passphrase\n").unwrap();
    let out = create.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ada: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((ada["role"].as_str(), ada["group"].as_str()), (Some("developer"), Some("payments")), "{ada}");

    let (ok, out, err) = run(periscope().args(["users", "list", "--data-dir"]).arg(&dir));
    assert!(ok, "{err}");
    assert!(out.contains("ada@example.com") && out.contains("active"), "{out}");

    let (ok, out, err) = run(periscope().args(["users", "disable", "--data-dir"]).arg(&dir).arg("ada@example.com"));
    assert!(ok && out.contains("disabled since"), "{out}{err}");
    let (ok, out, _) = run(periscope().args(["users", "list", "--json", "--data-dir"]).arg(&dir));
    let listed: Value = serde_json::from_str(out.lines().next().unwrap_or("null")).unwrap();
    assert!(ok && listed["disabled_at_ms"].is_u64(), "{out}");
    let (ok, out, err) =
        run(periscope().args(["users", "enable", "--data-dir"]).arg(&dir).arg(ada["user_id"].as_str().unwrap()));
    assert!(ok && out.contains("active"), "{out}{err}");

    // Mistakes are named.
    let (ok, _, err) = run(periscope().args(["users", "disable", "--data-dir"]).arg(&dir).arg("nobody"));
    assert!(!ok && err.contains("no user `nobody`"), "{err}");
    let (ok, _, err) = run(periscope().args(["users", "create", "--name", "bob", "--data-dir"]).arg(&dir));
    assert!(!ok && err.contains("--password-stdin"), "{err}");
    let (ok, _, err) = run(periscope()
        .args(["users", "create", "--name", "bob", "--role", "boss", "--no-password", "--data-dir"])
        .arg(&dir));
    assert!(!ok && err.contains("--role `boss`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_check_summarises_sign_in_and_refuses_it_on_a_cluster() {
    let dir = temp_dir("oauth-config");
    let on = dir.join("on.toml");
    std::fs::write(&on, "[oauth]\nenabled = true\n").unwrap();
    let (ok, out, err) = run(periscope().args(["config", "check"]).arg(&on));
    assert!(ok, "{err}");
    assert!(out.contains("sign-in (OAuth): on"), "{out}");
    let cluster = dir.join("cluster.toml");
    std::fs::write(&cluster, "[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\n[oauth]\nenabled = true\n").unwrap();
    let (ok, _, err) = run(periscope().args(["config", "check"]).arg(&cluster));
    assert!(!ok && err.contains("not available on a cluster"), "{err}");
    // The same through `serve --redis` (refused before anything connects).
    let (ok, _, err) = run(periscope()
        .args(["serve", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1/0", "--config"])
        .arg(&on));
    assert!(!ok && err.contains("not available on a cluster"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
