//! The agent's parser of `Debug` text (`periscope_agent::debug_parse`).
//!
//! Input: the text, then (after the first 0xFF byte) the bytes that choose the capture
//! limits (none: the defaults). Checks the module's promises: parsing never fails or
//! panics, the result already obeys the limits exactly as `truncate` defines them (a
//! second truncation cuts nothing and changes nothing), and the summary counts what the
//! limits removed the same way whichever entry point is used.

#![no_main]

mod common;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use periscope_agent::debug_parse::{parse_debug, parse_debug_with_summary};
use periscope_protocol::value::truncate;
use periscope_protocol::{CaptureLimits, TruncationSummary};

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let limits = if rest.is_empty() {
        CaptureLimits::default()
    } else {
        common::limits(&mut Unstructured::new(rest)).unwrap_or_default()
    };

    let mut summary = TruncationSummary::default();
    let value = parse_debug_with_summary(text, &limits, &mut summary);
    let plain = parse_debug(text, &limits);
    assert_eq!(common::json(&value), common::json(&plain), "the two entry points disagree on {text:?}");

    let mut again = value.clone();
    let mut cut = TruncationSummary::default();
    truncate(&mut again, &limits, &mut cut);
    assert!(cut.is_empty(), "truncate still cut {cut:?} from the parse of {text:?}");
    assert_eq!(common::json(&again), common::json(&value), "truncate changed the parse of {text:?}");
});
