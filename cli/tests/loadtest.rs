//! `periscope loadtest` against a real `periscope serve` it does not know the inside of:
//! the report's figures agree with the broker's own counters, callers over REST and over
//! MCP both place, wait, poll and remove, and bad flags are refused with a sentence.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;

mod support;

use support::{Served, periscope, temp_dir};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/loadtest/broker.toml");
const API_KEY: &str = "loadtest-api-key-0123456789abcdef";
const AGENT_KEY: &str = "loadtest-agent-key-0123456789abcdef";

#[test]
fn a_short_load_test_reports_what_the_broker_counted_with_nothing_unaccounted_for() {
    let dir = temp_dir("loadtest");
    let served = Served::start_with(&[
        OsStr::new("--config"),
        OsStr::new(CONFIG),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--data-dir"),
        dir.as_os_str(),
    ]);
    let pid = served.child.id().to_string();
    let out = periscope()
        .args(["loadtest", "--broker", &served.base, "--api-key", API_KEY, "--agent-key", AGENT_KEY])
        .args(["--agents", "12", "--services", "3", "--locations", "40", "--callers", "4", "--pollers", "2"])
        .args(["--duration", "3", "--max-hits", "5", "--hit-rate", "100", "--log-rate", "200"])
        .args(["--metric-interval-ms", "500", "--broker-pid", &pid, "--json"])
        .args(["--mcp-callers", "2", "--mcp-pollers", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadtest failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing from {r:#}"));
    assert_eq!(n("agents_registered"), 12, "{r:#}");
    assert!(n("placed") > 0 && n("hits_accepted") > 0 && n("lines_accepted") > 0, "{r:#}");
    // Every hit and line sent is in one of the broker's counters, exactly.
    assert_eq!(r["hits_unaccounted"], 0, "{r:#}");
    assert_eq!(r["lines_unaccounted"], 0, "{r:#}");
    assert_eq!(n("hits_sent"), n("hits_accepted") + n("hits_refused") + n("hits_rate_limited"), "{r:#}");
    // A caller reads no more than was stored, and each snapshot at most `max_hits`.
    assert!(n("hits_read") <= n("hits_accepted"), "{r:#}");
    assert!(n("hits_accepted") <= 5 * n("placed"), "{r:#}");
    assert!(n("metric_reports_accepted") > 0 && n("metric_reports_accepted") <= n("metric_reports_sent"), "{r:#}");
    assert!(r["place_to_first_hit"]["count"].as_u64().unwrap() > 0, "{r:#}");
    // The MCP callers went through real MCP sessions: placed, got hits, removed.
    assert_eq!(n("mcp_sessions"), 3, "{r:#}");
    assert!(n("mcp_placed") > 0 && n("mcp_placed") <= n("placed"), "{r:#}");
    assert!(r["mcp_place_to_first_hit"]["count"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["mcp_place_call"]["count"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(n("place_errors"), 0, "{r:#}");
    assert!(!r["errors"].as_object().unwrap().keys().any(|k| k.contains("MCP")), "{r:#}");
    assert!(r["broker_rss_connected_kib"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["broker_cpu_cores"].as_f64().is_some(), "{r:#}");
    served.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn refused(args: &[&str]) -> String {
    let out = periscope().arg("loadtest").args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_loadtest_flags_are_refused_with_what_is_wrong() {
    let base = ["--broker", "http://127.0.0.1:9", "--api-key", "k", "--agent-key", "a"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
    assert!(refused(&with(&["--max-hits", "51"])).contains("--max-hits is 51"));
    assert!(refused(&with(&["--services", "0"])).contains("--services is 0"));
    assert!(refused(&with(&["--hit-rate", "NaN"])).contains("--hit-rate"));
    assert!(refused(&["--broker", "ftp://x", "--api-key", "k"]).contains("http:// or https://"));
    assert!(refused(&["--broker", "not a url", "--api-key", "k"]).contains("is not a URL"));
    // A broker that is not there: a sentence, not a panic.
    let err = refused(&with(&["--agents", "1", "--duration", "1"]));
    assert!(err.contains("reading the broker's counters before the run"), "{err}");
}
