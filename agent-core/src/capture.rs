//! What a probe hands the agent thread, and the one view of a captured value that every
//! expression reads.
//!
//! A probe (on the host's thread) copies what it must and nothing more into a
//! [`RawHit`]; the agent thread turns it into a protocol [`Hit`] through the adapter
//! ([`crate::Runtime::build_hit`]), redacts it and cuts it to the capture limits. An
//! expression never reads a value before redaction: conditions and metric values read
//! [`client_value`]s, watches and log templates read [`client_hit`]s.

use std::fmt;
use std::sync::Arc;

use periscope_protocol::value::truncate;
use periscope_protocol::{CaptureLimits, Hit, ThreadInfo, TruncationSummary, Value};
use periscope_redaction::{NameRule, Redactor};

use crate::state::Installed;

/// A hit as captured on the application's thread: the action, its sequence number, and
/// the adapter's own payload (`tracing` fields and spans, Python locals and frames).
pub struct RawHit<P> {
    /// The action that fired.
    pub action: Arc<Installed>,
    /// Its per-action sequence number.
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// The thread (or task) it fired on.
    pub thread: ThreadInfo,
    /// What the adapter captured.
    pub payload: P,
    /// For an error capture: what failed and where (the hit's location and error).
    pub error: Option<crate::errors::ErrorOccurrence>,
    /// For a function probe: how the call went.
    pub call: Option<periscope_protocol::CallInfo>,
}

impl<P> fmt::Debug for RawHit<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawHit").field("action", &self.action.spec.id).field("seq", &self.seq).finish_non_exhaustive()
    }
}

/// Limits for capture before redaction: strings up to four times longer, so redaction
/// sees secrets whole; the capture limits cut them after.
pub fn redaction_limits(limits: &CaptureLimits) -> CaptureLimits {
    CaptureLimits {
        max_string_len: (limits.max_string_len.saturating_mul(4)).min(CaptureLimits::HARD_MAX.max_string_len),
        ..*limits
    }
}

/// One captured value exactly as a client will see it: `value` was captured within
/// [`redaction_limits`] (room for redaction to see secrets whole); it is redacted under
/// its name by the rules in force (key-name rules for the name and every name inside,
/// value detectors, the organization's own rules), then cut to the capture limits. This
/// is what expressions read on the host's thread, built only for the values they read.
///
/// `rule` is what `redactor` makes of the value's name (`Redactor::name_rule`), worked
/// out once per location where the adapter can.
pub fn client_value(mut value: Value, limits: &CaptureLimits, redactor: &Redactor, rule: NameRule) -> Value {
    let mut summary = TruncationSummary::default();
    redactor.redact_named(rule, &mut value);
    truncate(&mut value, limits, &mut summary);
    value
}

/// A hit exactly as a client will see it (before watches are added): built by the
/// adapter with room for redaction, redacted, then cut to the capture limits. Watches
/// and log templates read this, as conditions read [`client_value`]s.
pub fn client_hit<R: crate::Runtime + ?Sized>(
    runtime: &R,
    raw: &RawHit<R::Payload>,
    limits: &CaptureLimits,
    redactor: &Redactor,
) -> Hit {
    let mut hit = runtime.build_hit(raw, &redaction_limits(limits));
    hit.call = raw.call;
    if raw.action.no_capture.load(std::sync::atomic::Ordering::Relaxed) {
        hit.strip_values();
    }
    redactor.redact_hit(&mut hit);
    hit.enforce_limits(limits);
    hit
}
