//! `periscope host-bench` against a real `periscope serve`: five real shop processes (Rust,
//! and Python when the test virtualenv has the agent), four with the agent, three of them
//! behind proxies; after the outage the broker shows what the agent behind the dark proxy
//! dropped while it could not reach it, and every agent is back online.
//! No timing is asserted: the ratios are the bench's output, not a test's threshold.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;

mod support;

use support::{Served, periscope, temp_dir};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/loadtest/broker.toml");
const API_KEY: &str = "loadtest-api-key-0123456789abcdef";
const AGENT_KEY: &str = "loadtest-agent-key-0123456789abcdef";

#[test]
fn hits_an_agent_drops_while_its_broker_is_unreachable_are_counted_and_reported_when_it_returns() {
    host_bench_counts_and_reports_drops(&[]);
}

#[test]
fn the_python_agent_counts_what_it_drops_while_its_broker_is_unreachable_and_reports_it_when_it_returns() {
    // scripts/test installs the agent into the test virtualenv; without it there is no
    // Python agent to measure, and the run says so.
    let Some(python) = std::env::var("PERISCOPE_PYTHON").ok().filter(|p| {
        std::process::Command::new(p).args(["-c", "import periscope_agent"]).status().is_ok_and(|s| s.success())
    }) else {
        eprintln!("no Python with the agent (PERISCOPE_PYTHON): the Python host bench is not tested here");
        return;
    };
    host_bench_counts_and_reports_drops(&["--language", "python", "--python", &python]);
}

/// Runs a short host-bench with `extra` flags and checks what it must show whatever the
/// timings: every shop answered, the dark agent's drops were counted and reached the
/// broker once it was back, the healthy agent lost nothing.
fn host_bench_counts_and_reports_drops(extra: &[&str]) {
    let dir = temp_dir("host-bench");
    let served = Served::start_with(&[
        OsStr::new("--config"),
        OsStr::new(CONFIG),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--data-dir"),
        dir.as_os_str(),
    ]);
    let out = periscope()
        .args(["host-bench", "--broker", &served.base, "--api-key", API_KEY, "--agent-key", AGENT_KEY])
        .args(["--healthy-seconds", "1", "--duration", "3", "--rps", "25", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "host-bench {extra:?} failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shops = r["shops"].as_array().unwrap();
    let shop = |name: &str| shops.iter().find(|s| s["shop"] == name).unwrap_or_else(|| panic!("{name}: {r:#}"));
    // Every shop answered in both windows; the baseline has no agent.
    for s in shops {
        assert!(s["healthy_window"]["count"].as_u64().unwrap() > 0, "{r:#}");
        assert!(s["outage_window"]["count"].as_u64().unwrap() > 0, "{r:#}");
        assert!(s["rss_after_outage_kib"].as_u64().unwrap() > 0, "{r:#}");
    }
    assert_eq!(shops.len(), 5, "{r:#}");
    assert!(shop("baseline")["agent_id"].is_null(), "{r:#}");
    // The dark agent could not deliver: what it refused was counted, and shown by the
    // broker once the agent was back.
    let dark = shop("dark");
    assert_eq!(dark["reconnected"], true, "{r:#}");
    assert!(dark["dropped_disconnected"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["drops_reported_after_seconds"].as_f64().is_some(), "{r:#}");
    // The healthy agent delivered: nothing lost to a missing broker.
    assert_eq!(shop("healthy")["dropped_disconnected"], 0, "{r:#}");
    assert_eq!(shop("healthy")["reconnected"], true, "{r:#}");
    assert_eq!(shop("idle")["reconnected"], true, "{r:#}");
    served.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_host_bench_flags_are_refused_with_what_is_wrong() {
    let run = |args: &[&str]| {
        let out = periscope().arg("host-bench").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let base = ["--broker", "http://127.0.0.1:9", "--api-key", "k", "--agent-key", "a"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
    assert!(run(&with(&["--rps", "0"])).contains("--rps is 0"));
    assert!(run(&with(&["--duration", "0"])).contains("--duration"));
    assert!(run(&["--broker", "ftp://x", "--api-key", "k", "--agent-key", "a"]).contains("http:// or https://"));
    // An interpreter that is not there, or has no agent: said, before anything starts.
    let no_python = run(&with(&["--language", "python", "--python", "/nonexistent/python3"]));
    assert!(no_python.contains("/nonexistent/python3"), "{no_python}");
    let no_agent = run(&with(&["--language", "python", "--python", "/bin/sh"]));
    assert!(no_agent.contains("/bin/sh cannot import periscope_agent"), "{no_agent}");
    // A broker that is not there: a sentence, not a panic.
    assert!(run(&base).contains("reaching the broker before the run"));
}
