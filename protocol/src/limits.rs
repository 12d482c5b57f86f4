//! Capture limits and agent quotas: one definition used by both sides.
//!
//! The broker sends the limits an agent must apply in
//! [`Registered`](crate::BrokerMessage::Registered), and re-applies the same limits to
//! every hit it receives, because an agent cannot be trusted to have done so. The
//! defaults come from the public behaviour of the products Periscope is measured
//! against (see `docs/design.md`); the hard maxima are what no configuration may exceed.

use serde::{Deserialize, Serialize};

/// How much of a captured value survives: depth, breadth, string length and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureLimits {
    /// Container nesting kept below a captured variable (the variable itself is level 1).
    pub max_depth: u32,
    /// Items kept per list, set or map; the rest are counted as omitted.
    pub max_items: u32,
    /// Characters kept per string; the original length is recorded when cut.
    pub max_string_len: u32,
    /// Fields kept per object (struct); the rest are counted as omitted.
    pub max_fields: u32,
    /// Serialized bytes one hit may carry; larger values are replaced by size markers.
    pub max_hit_bytes: u32,
    /// Span (stack) frames reported per hit.
    pub max_frames: u32,
    /// Frames, from the innermost, whose field values are captured.
    pub frames_with_values: u32,
}

impl CaptureLimits {
    /// Lightrun's MCP rule; Datadog, Sidekick, Rookout and AWS also stop at 3.
    pub const DEFAULT_MAX_DEPTH: u32 = 3;
    /// Datadog and Sidekick keep 100 collection items.
    pub const DEFAULT_MAX_ITEMS: u32 = 100;
    /// Datadog keeps 255 characters.
    pub const DEFAULT_MAX_STRING_LEN: u32 = 255;
    /// Datadog keeps 20 fields per object.
    pub const DEFAULT_MAX_FIELDS: u32 = 20;
    /// Sidekick and Google's Java agent cap a hit at 64 KiB.
    pub const DEFAULT_MAX_HIT_BYTES: u32 = 64 * 1024;
    /// Google Cloud Debugger reports 20 frames...
    pub const DEFAULT_MAX_FRAMES: u32 = 20;
    /// ...with values on the top 5.
    pub const DEFAULT_FRAMES_WITH_VALUES: u32 = 5;

    /// The ceiling no configuration can raise a limit above.
    pub const HARD_MAX: CaptureLimits = CaptureLimits {
        max_depth: 8,
        max_items: 1_000,
        max_string_len: 8 * 1024,
        max_fields: 200,
        max_hit_bytes: 1024 * 1024 - 16 * 1024,
        max_frames: 100,
        frames_with_values: 100,
    };

    /// Checks every limit is at least 1 and at most [`CaptureLimits::HARD_MAX`].
    pub fn validate(&self) -> Result<(), LimitError> {
        let max = Self::HARD_MAX;
        let checks: [(&'static str, u32, u32); 7] = [
            ("max_depth", self.max_depth, max.max_depth),
            ("max_items", self.max_items, max.max_items),
            ("max_string_len", self.max_string_len, max.max_string_len),
            ("max_fields", self.max_fields, max.max_fields),
            ("max_hit_bytes", self.max_hit_bytes, max.max_hit_bytes),
            ("max_frames", self.max_frames, max.max_frames),
            ("frames_with_values", self.frames_with_values, max.frames_with_values),
        ];
        for (name, value, hard_max) in checks {
            if value == 0 || value > hard_max {
                return Err(LimitError { name, value: u64::from(value), min: 1, max: u64::from(hard_max) });
            }
        }
        if self.max_hit_bytes < 1024 {
            return Err(LimitError {
                name: "max_hit_bytes",
                value: u64::from(self.max_hit_bytes),
                min: 1024,
                max: u64::from(max.max_hit_bytes),
            });
        }
        Ok(())
    }

    /// The tighter of two sets of limits, field by field: what an agent applies when
    /// its own configuration is stricter than the broker's.
    pub fn min(&self, other: &CaptureLimits) -> CaptureLimits {
        CaptureLimits {
            max_depth: self.max_depth.min(other.max_depth),
            max_items: self.max_items.min(other.max_items),
            max_string_len: self.max_string_len.min(other.max_string_len),
            max_fields: self.max_fields.min(other.max_fields),
            max_hit_bytes: self.max_hit_bytes.min(other.max_hit_bytes),
            max_frames: self.max_frames.min(other.max_frames),
            frames_with_values: self.frames_with_values.min(other.frames_with_values),
        }
    }
}

impl Default for CaptureLimits {
    fn default() -> Self {
        CaptureLimits {
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_items: Self::DEFAULT_MAX_ITEMS,
            max_string_len: Self::DEFAULT_MAX_STRING_LEN,
            max_fields: Self::DEFAULT_MAX_FIELDS,
            max_hit_bytes: Self::DEFAULT_MAX_HIT_BYTES,
            max_frames: Self::DEFAULT_MAX_FRAMES,
            frames_with_values: Self::DEFAULT_FRAMES_WITH_VALUES,
        }
    }
}

/// A limit outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is {value}; allowed range is {min}..={max}")]
pub struct LimitError {
    /// The limit's name as it appears in configuration.
    pub name: &'static str,
    /// The value that was given.
    pub value: u64,
    /// Smallest accepted value.
    pub min: u64,
    /// Largest accepted value.
    pub max: u64,
}

/// Budgets an agent enforces on itself, sent by the broker at registration.
///
/// The broker enforces its own copies of the per-agent budgets on what arrives, so an
/// agent that ignores these only gets its hits dropped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentQuotas {
    /// Snapshot hits per second per action (Datadog: 1/s).
    pub snapshot_hits_per_sec_per_action: f64,
    /// Snapshot hits per second across all actions of the agent (Datadog: 25/s).
    pub snapshot_hits_per_sec: f64,
    /// Dynamic log lines per second per agent (Google's agents: 50/s).
    pub log_lines_per_sec: f64,
    /// Dynamic log bytes per second per agent (Google's agents: 20 KiB/s).
    pub log_bytes_per_sec: f64,
    /// Burst allowed on the log budgets, as a multiple of one second's budget.
    pub log_burst_factor: f64,
    /// Share of one core the agent may spend on conditions and captures (0.01 = 1%).
    pub cpu_fraction: f64,
    /// Burst of CPU time, in microseconds, before the leaky bucket starts refusing.
    pub cpu_burst_micros: u64,
    /// How long an action stays paused once a budget is exhausted, in milliseconds.
    pub pause_millis: u64,
}

impl Default for AgentQuotas {
    fn default() -> Self {
        AgentQuotas {
            snapshot_hits_per_sec_per_action: 1.0,
            snapshot_hits_per_sec: 25.0,
            log_lines_per_sec: 50.0,
            log_bytes_per_sec: 20.0 * 1024.0,
            log_burst_factor: 2.0,
            cpu_fraction: 0.01,
            cpu_burst_micros: 1_000,
            pause_millis: 500,
        }
    }
}

/// Bounds on the actions a client may place; checked by the broker before anything
/// reaches an agent. Values outside these are refused, never clamped.
pub mod action_bounds {
    /// Hits a snapshot collects when the caller does not say (Lightrun MCP: 1).
    pub const DEFAULT_MAX_HITS: u32 = 1;
    /// Most hits one snapshot may collect (Lightrun MCP: 50).
    pub const MAX_MAX_HITS: u32 = 50;
    /// Default life of an action, in seconds (Lightrun: 1 h).
    pub const DEFAULT_EXPIRE_SECS: u64 = 3_600;
    /// Longest life of an action, in seconds (Google and AWS: 24 h).
    pub const MAX_EXPIRE_SECS: u64 = 86_400;
    /// Default wait for a blocking snapshot call, in seconds (Lightrun MCP: 60 s).
    pub const DEFAULT_WAIT_SECS: u64 = 60;
    /// Longest wait for a blocking snapshot call, in seconds (Lightrun MCP: 10 min).
    pub const MAX_WAIT_SECS: u64 = 600;
    /// Most watch expressions per snapshot.
    pub const MAX_WATCHES: usize = 20;
    /// Longest expression or template source, in bytes.
    pub const MAX_EXPRESSION_LEN: usize = 1_024;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let l = CaptureLimits::default();
        l.validate().unwrap();
        assert_eq!((l.max_depth, l.max_items, l.max_string_len, l.max_fields), (3, 100, 255, 20));
        assert_eq!(l.max_hit_bytes, 65_536);
    }

    #[test]
    fn a_limit_over_the_hard_max_is_refused_by_name() {
        let l = CaptureLimits { max_depth: 50, ..Default::default() };
        let err = l.validate().unwrap_err();
        assert_eq!(err.name, "max_depth");
        assert!(err.to_string().contains("1..=8"), "{err}");
    }

    #[test]
    fn missing_fields_take_defaults_so_old_peers_interoperate() {
        let l: CaptureLimits = serde_json::from_str(r#"{"max_depth":2,"future_knob":1}"#).unwrap();
        assert_eq!(l.max_depth, 2);
        assert_eq!(l.max_items, 100);
    }
}
