//! Writes the seed corpora of the fuzz targets (`fuzz/`) from the inputs the benches
//! and tests already use: the realistic hit and its `Debug` text, the redaction bench's
//! log lines and snapshots, frames of every message kind, expressions and templates
//! from the docs' examples, and the broker's own default configuration.
//!
//! Run: `cargo run -p periscope-benches --example fuzz_seeds -- fuzz/seeds`

use std::path::{Path, PathBuf};

use periscope_benches::{hit, order, redaction_snapshots, redaction_text_cases};
use periscope_protocol::AgentMessage;
use periscope_protocol::messages::{decode_agent_message, decode_broker_message, encode};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)?;
    Ok(())
}

/// Frames of every kind, both directions, as the protocol's unit tests spell them.
const FRAMES: &[&str] = &[
    r#"{"type":"register","protocol_version":1,"agent_id":"agt_0123456789abcdef","display_name":"shop@host","pool":"shop","tags":["env:prod","canary"],"service":"shop","service_version":"1.2.3","language":"rust","runtime":"rustc 1.95","agent_version":"0.1.0","host":"host","pid":42,"capabilities":["snapshot","log","metric"]}"#,
    r#"{"type":"heartbeat","hits_sent":3,"hits_dropped_queue_full":1,"hits_dropped_rate":0,"hits_dropped_disconnected":0,"queue_len":0,"actions":2}"#,
    r#"{"type":"catalog","full":true,"entries":[{"file":"src/shop.rs","line":501,"kind":"event","name":"event src/shop.rs:501","module":"shop","level":"INFO","fields":["message","order_id"]}]}"#,
    r#"{"type":"action_status","action_id":"act_0123456789abcdef","state":"paused","reason":"quota_cpu","message":"spent"}"#,
    r#"{"type":"action_status","action_id":"act_0123456789abcdef","state":"eval_error","reason":"condition: string > int","code":"type_mismatch"}"#,
    r#"{"type":"log_lines","lines":[{"action_id":"act_0123456789abcdef","seq":1,"time_ms":1,"level":"warn","text":"order 1 for [REDACTED:EMAIL] done","redactions":[{"path":"template[1]","rule":"email"}]}]}"#,
    r#"{"type":"metrics","reports":[{"action_id":"act_0123456789abcdef","window_start_ms":1,"window_end_ms":5001,"count":3,"sum":6.5,"min":1.0,"max":3.5,"histogram":{"zero":1,"positive":[[3,2]]}}]}"#,
    r#"{"type":"goodbye","reason":"host shutting down"}"#,
    r#"{"type":"registered","agent_id":"agt_0123456789abcdef","protocol_version":1,"broker_version":"0.1.0","heartbeat_interval_ms":30000,"limits":{"max_depth":3,"max_items":100,"max_string_len":255,"max_fields":20,"max_hit_bytes":65536,"max_frames":20,"frames_with_values":5},"quotas":{"snapshot_hits_per_sec_per_action":1.0,"snapshot_hits_per_sec":25.0,"log_lines_per_sec":50.0,"log_bytes_per_sec":20480,"log_burst_factor":2.0,"cpu_fraction":0.01,"cpu_burst_micros":1000}}"#,
    r#"{"type":"action_sync","actions":[{"id":"act_0123456789abcdef","location":{"file":"src/shop.rs","line":501},"condition":"order.total > 100 && user.id != 3","expires_at_ms":99999999999999,"kind":{"type":"snapshot","watch":["order.items.len()"],"max_hits":1,"backtrace":false}}]}"#,
    r#"{"type":"action_add","action":{"id":"act_0123456789abcdef","location":{"file":"src/shop.rs","line":501},"expires_at_ms":1,"kind":{"type":"log","template":"order {order_id} for {email}","level":"warn","destination":"both","max_lines":5}}}"#,
    r#"{"type":"action_remove","action_id":"act_0123456789abcdef","reason":"completed"}"#,
    r#"{"type":"redaction_rules","version":3,"config":{"strict":false,"key_names":["order"]}}"#,
    r#"{"type":"error","code":"rate_limited","message":"slow down","fatal":true,"supported_versions":[1]}"#,
];

/// Expressions and templates as `docs/expressions.md` writes them.
const EXPRESSIONS: &[&str] = &[
    "order.total > 100 && user.id != 3",
    "status == \"Pending\" || status == 'Paid'",
    "len(order.items) >= 2 and not user.admin",
    "contains(lower(user.email), \"@example.com\")",
    "order.items[0].sku in [\"A-1\", \"B-2\"]",
    "span.request.method == \"GET\"",
    "span.user_id % 10 == 0",
    "order?.items?.len() > 0",
    "-amount * 2.5e3 / (count + 1)",
    "starts_with(path, '/api') && !ends_with(path, \".json\")",
    "order {order_id} for {email} done",
    "total {amount + 1} in {span.request.id}: {order.items}",
    "{{literal}} {a.b[0][\"k\"]}",
    "x == 18446744073709551615 || y == -9223372036854775808",
];

/// Configuration files as README shows them, and the defaults as the broker writes them.
const CONFIGS: &[&str] = &[
    "[[api_keys]]\nname = \"grafana\"\nkey = \"0123456789abcdef0123\"\nscopes = [\"mcp:agents:read\", \"mcp:hits:read\"]\n\n[mcp]\nallowed_hosts = [\"localhost\", \"127.0.0.1\", \"::1\"]\nallowed_origins = [\"http://localhost:*\"]\nmax_body_bytes = 262144\nsession_idle_timeout_secs = 900\n",
    "data_dir = \"/var/lib/periscope\"\n[limits]\nmax_depth = 3\nmax_items = 100\n[quotas]\nlog_lines_per_sec = 50.0\n[redaction]\nstrict = false\nkey_names = [\"order\"]\n[[redaction.patterns]]\nname = \"ticket\"\nregex = \"TKT-[0-9]{6}\"\n",
    "[[agent_keys]]\nkey = \"agent-key-0123456789\"\npools = [\"shop\"]\n[agents]\nheartbeat_interval_secs = 30\nmax_sessions_per_key = 100\n[org_quotas]\ncalls_per_minute = 1200\n",
];

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));

    let mut bad = 0;
    for (i, frame) in FRAMES.iter().enumerate() {
        // Seeds that decode reach past the decoder; keep them true to the protocol.
        if decode_agent_message(frame).is_err() && decode_broker_message(frame).is_err() {
            eprintln!(
                "seed frame {i} does not decode: {:?} / {:?}",
                decode_agent_message(frame).err(),
                decode_broker_message(frame).err()
            );
            bad += 1;
        }
        write(&dir, "protocol_decode", &format!("frame-{i:02}"), frame.as_bytes())?;
    }
    anyhow::ensure!(bad == 0, "{bad} seed frames do not decode");
    for lines in [1, 3] {
        let frame = encode(&AgentMessage::Hit(Box::new(hit(lines))));
        write(&dir, "protocol_decode", &format!("hit-{lines}"), frame.as_bytes())?;
    }

    for (i, src) in EXPRESSIONS.iter().enumerate() {
        write(&dir, "expr", &format!("expr-{i:02}"), src.as_bytes())?;
    }

    let sample = hit(2);
    for (name, text) in [
        ("hit-compact", format!("{sample:?}")),
        ("hit-pretty", format!("{sample:#?}")),
        ("order-compact", format!("{:?}", order(2))),
        (
            "vec-tuple-map",
            format!("{:?}", (vec![1u8, 2], Some("a\n\"b\""), std::collections::BTreeMap::from([(1, 'c')]))),
        ),
    ] {
        write(&dir, "debug_parse", name, text.as_bytes())?;
    }

    // The redaction target's first byte picks the shape (0 text, 3 JSON, 6 value tree,
    // 9 hit) and the rules (+0 built-in, +1 strict, +2 custom).
    for (name, text) in redaction_text_cases() {
        for (i, line) in text.lines().take(12).enumerate() {
            write(&dir, "redaction", &format!("{name}-{i:02}"), &[&[0u8][..], line.as_bytes()].concat())?;
        }
    }
    for (i, snapshot) in redaction_snapshots().iter().take(4).enumerate() {
        let json = serde_json::to_string(snapshot)?;
        write(&dir, "redaction", &format!("snapshot-json-{i}"), &[&[3u8][..], json.as_bytes()].concat())?;
    }
    let hit_json = serde_json::to_string(&hit(2))?;
    write(&dir, "redaction", "hit", &[&[9u8][..], hit_json.as_bytes()].concat())?;

    for (i, config) in CONFIGS.iter().enumerate() {
        write(&dir, "broker_config", &format!("config-{i}"), config.as_bytes())?;
    }
    let defaults = toml::to_string(&periscope_broker::BrokerConfig::default())?;
    write(&dir, "broker_config", "defaults", defaults.as_bytes())?;
    Ok(())
}
