//! The protocol decoder, both directions, and the broker's treatment of what decodes.
//!
//! Input: one frame's text. Checks: a frame that decodes re-encodes to a frame that
//! decodes to the same message (what one side sends, the other reads back unchanged);
//! an error gives a stable code and a bounded sentence; a decoded hit, put through the
//! broker's pipeline (redaction, then capture limits), comes out of a second pass
//! unchanged (the pipeline is a no-op for an honest agent that already applied it),
//! and within the limits; registration validation never panics.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use periscope_protocol::messages::{decode_agent_message, decode_broker_message, encode};
use periscope_protocol::{AgentMessage, CaptureLimits, ProtocolError};
use periscope_redaction::Redactor;

fn check_error(frame: &str, err: &ProtocolError) {
    let body = err.to_body(false);
    assert_eq!(body.code, err.code());
    // The sentence goes back to the agent in an error frame: it must fit one.
    assert!(
        body.message.len() <= 4 * 1024 + 256,
        "a {}-byte error for a {}-byte frame",
        body.message.len(),
        frame.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else { return };

    match decode_agent_message(frame) {
        Ok(message) => {
            let once = encode(&message);
            let back = decode_agent_message(&once).unwrap_or_else(|e| panic!("re-encoded frame fails: {e}\n{once}"));
            assert_eq!(encode(&back), once, "a decoded agent frame does not survive a round trip");
            match message {
                AgentMessage::Register(registration) => {
                    let _ = registration.validate();
                }
                AgentMessage::Hit(mut hit) => {
                    let redactor = Redactor::default_rules();
                    for limits in [
                        CaptureLimits::default(),
                        CaptureLimits {
                            max_depth: 1,
                            max_items: 2,
                            max_string_len: 4,
                            max_fields: 2,
                            max_hit_bytes: 512,
                            ..CaptureLimits::default()
                        },
                    ] {
                        redactor.redact_hit(&mut hit);
                        hit.enforce_limits(&limits);
                        let first = common::json(&hit);
                        redactor.redact_hit(&mut hit);
                        hit.enforce_limits(&limits);
                        assert_eq!(common::json(&hit), first, "the broker's hit pipeline is not idempotent");
                    }
                }
                _ => {}
            }
        }
        Err(err) => check_error(frame, &err),
    }

    match decode_broker_message(frame) {
        Ok(message) => {
            let once = encode(&message);
            let back = decode_broker_message(&once).unwrap_or_else(|e| panic!("re-encoded frame fails: {e}\n{once}"));
            assert_eq!(encode(&back), once, "a decoded broker frame does not survive a round trip");
        }
        Err(err) => check_error(frame, &err),
    }
});
