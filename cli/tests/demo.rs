//! `periscope demo` as a user runs it: a real process with real shop processes (and the
//! Python shop, when the test virtualenv has the Python agent). It prints where to
//! connect and an example; the examples work; SIGTERM stops it all.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "psk_demo_test_key_0123456789";

#[test]
fn the_demo_starts_prints_a_working_example_and_stops_cleanly() {
    let python = std::env::var("PERISCOPE_PYTHON")
        .ok()
        .filter(|p| Command::new(p).args(["-c", "import periscope_agent"]).status().is_ok_and(|s| s.success()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_periscope"))
        .args(["demo", "--listen", "127.0.0.1:0", "--instances", "2", "--rps", "20"])
        .env("PERISCOPE_API_KEY", KEY)
        // The Python shop runs with the test virtualenv's interpreter (scripts/test
        // installs the agent into it first); without one the demo runs without it.
        .env("PERISCOPE_DEMO_PYTHON", python.as_deref().unwrap_or("off"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("periscope demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !banner.iter().any(|l: &String| l.starts_with("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => banner.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no banner within 120 s; got: {banner:#?}");
            }
        }
    }
    let find = |prefix: &str| -> String {
        banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no `{prefix}` in {banner:#?}"))
    };
    let rest = find("REST API:");
    assert!(find("MCP endpoint:").ends_with("/mcp"));
    assert!(find("API key:").starts_with(KEY), "{banner:#?}");
    // The printed example, run as printed: place a snapshot, wait for its hit.
    let body = banner
        .iter()
        .find_map(|l| l.split("-d '").nth(1).and_then(|rest| rest.split('\'').next()))
        .expect("the example's JSON body")
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let hit = runtime.block_on(first_hit(&rest, body));
    assert_eq!(hit["fields"]["message"]["value"], "order placed", "{hit}");
    assert!(hit["fields"]["order_id"]["value"].is_i64(), "{hit}");
    assert!(hit["agent_name"].as_str().is_some_and(|n| n.contains("eu")), "the example targets the EU shops: {hit}");
    if python.is_some() {
        // The Python shop is listed, in its own pool, and its printed example works too.
        assert!(banner.iter().any(|l| l.contains("pyshop-eu-1 (pool pyshop")), "{banner:#?}");
        let body = banner
            .iter()
            .filter_map(|l| l.split("-d '").nth(1).and_then(|rest| rest.split('\'').next()))
            .find(|b| b.contains("pyshop"))
            .expect("the Python example's JSON body")
            .to_owned();
        let hit = runtime.block_on(first_hit(&rest, body));
        assert_eq!(hit["location"]["name"], "price_order", "{hit}");
        assert_eq!(hit["fields"]["customer"]["fields"]["email"]["value"], "[REDACTED:EMAIL]", "{hit}");
    } else {
        eprintln!("no Python with the agent (PERISCOPE_PYTHON): the demo's Python shop is not tested here");
    }

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}");
    let _ = reader.join();
    let rest_lines: Vec<String> = rx.try_iter().collect();
    assert!(rest_lines.iter().any(|l| l.contains("Stopped.")), "{rest_lines:#?}");
}

/// Runs a printed example as a user would: POSTs its body to place the snapshot, then
/// waits for the snapshot's first hit.
async fn first_hit(rest: &str, body: String) -> serde_json::Value {
    let client = reqwest::Client::new();
    let placed: serde_json::Value = client
        .post(format!("{rest}/actions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("JSON");
    let id = placed["action_id"].as_str().unwrap_or_else(|| panic!("{placed}")).to_owned();
    let page: serde_json::Value = client
        .get(format!("{rest}/actions/{id}/hits?wait_seconds=60"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    page["hits"][0].clone()
}
