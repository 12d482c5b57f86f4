//! What the broker spends on one hit frame before the action book, so that
//! `benches/ingest_instructions.sh` can count its instructions under callgrind (a measure
//! that, unlike time, does not move with the load of a shared machine).
//!
//! `after` is what the gateway and engine do now: charge the frame's bytes to the
//! session's, its agent key's and its organization's budgets, decode it, charge the hit
//! the same way, take the organization's rules, keep the agent's findings that name a
//! rule the broker knows, redact, enforce the capture limits. `before` is what they did
//! before issue 9: one byte and one hit budget (the session's), and the rules found by
//! copying the organization's whole rule set (the old `Rules::redactor`). Both take the
//! same 8.4 KB hit (`periscope_benches::hit(40)`) carrying two findings from its agent.
//!
//! Run: `cargo run --release -p periscope-benches --example ingest_cost -- <before|after> <frames>`

use std::hint::black_box;

use periscope_benches::hit;
use periscope_broker::agent_limits::AgentLimits;
use periscope_broker::engine::keep_known_findings;
use periscope_broker::quota::IngestSettings;
use periscope_broker::rules::Rules;
use periscope_protocol::messages::{decode_agent_message, encode};
use periscope_protocol::{AgentMessage, CaptureLimits, RedactionFinding};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "after".into());
    let frames: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let limits = CaptureLimits::default();
    let mut sample = hit(40);
    sample.enforce_limits(&limits);
    sample.redactions = vec![
        RedactionFinding { path: "fields.order.customer.email".into(), rule: "email".into() },
        RedactionFinding { path: "spans[0].user_token".into(), rule: "key:token".into() },
    ];
    let frame = encode(&AgentMessage::Hit(Box::new(sample)));
    let size = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    // Budgets wide enough never to refuse: the cost of charging them is what counts.
    let settings = IngestSettings {
        agent_hits_per_sec: 1e9,
        agent_bytes_per_sec: 1 << 50,
        key_hits_per_sec: 1e9,
        key_bytes_per_sec: 1 << 50,
        org_hits_per_sec: 1e9,
        org_bytes_per_sec: 1 << 50,
        ..IngestSettings::default()
    };
    let rules = Rules::default();
    match mode.as_str() {
        "before" => {
            let (bytes, hits) = (settings.agent_bytes(), settings.agent_hits());
            for _ in 0..frames {
                let _ = black_box(bytes.take(size));
                if let Ok(AgentMessage::Hit(mut hit)) = decode_agent_message(black_box(&frame)) {
                    let _ = black_box(hits.take(1));
                    // The old lookup copied the rule set along with the compiled rules.
                    let (redactor, config) = (rules.redactor("default"), rules.config("default"));
                    black_box(&config);
                    redactor.redact_hit(&mut hit);
                    hit.enforce_limits(&limits);
                    black_box(hit);
                }
            }
        }
        _ => {
            let agents = AgentLimits::new(settings, 1);
            let session = agents.open_session("key_bench", "default").unwrap_or_else(|e| panic!("{}", e.message));
            for _ in 0..frames {
                let _ = black_box(session.charge_bytes(size));
                if let Ok(AgentMessage::Hit(mut hit)) = decode_agent_message(black_box(&frame)) {
                    let _ = black_box(session.charge_hit());
                    let redactor = rules.redactor("default");
                    black_box(keep_known_findings(&redactor, &mut hit.redactions));
                    redactor.redact_hit(&mut hit);
                    hit.enforce_limits(&limits);
                    black_box(hit);
                }
            }
        }
    }
}
