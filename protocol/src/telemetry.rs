//! Dynamic logs and dynamic metrics as agents report them.
//!
//! Log lines travel in batches; metrics are aggregated in the agent and reported per
//! interval (count, sum, min, max and a mergeable histogram), never per hit, so a hot
//! location costs the network nothing more as it gets hotter. The broker merges
//! reports across agents and intervals with [`Histogram::merge`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::action::LogLevel;
use crate::hit::RedactionFinding;
use crate::ids::ActionId;

/// One dynamic log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The log action.
    pub action_id: ActionId,
    /// Per-agent, per-action sequence number starting at 1.
    pub seq: u64,
    /// When the location was hit, Unix milliseconds (agent clock).
    pub time_ms: u64,
    /// The line's level.
    pub level: LogLevel,
    /// The rendered, redacted text.
    pub text: String,
    /// Thread name or id, for a reader correlating with the service's own logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    /// Which redaction rules fired in the placeholders (never the values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redactions: Vec<RedactionFinding>,
    /// Version of the redaction rules applied.
    #[serde(default)]
    pub rules_version: u64,
}

/// Most lines per `log_lines` frame.
pub const MAX_LOG_LINES_PER_FRAME: usize = 200;

/// Longest thread name kept on a log line, in characters.
pub const MAX_THREAD_LEN: usize = 128;

/// Longest redaction finding path kept on a log line, in characters.
pub const MAX_FINDING_PATH_LEN: usize = 256;

/// Longest redaction rule id, in characters (the rule ids the engine writes are short).
pub const MAX_RULE_ID_LEN: usize = 64;

impl LogLine {
    /// Cuts the line's text, thread name and findings to their bounds, making the thread
    /// name and findings printable; returns whether anything changed. Which rule ids are
    /// real is for the receiver to check against its rules.
    pub fn sanitize(&mut self) -> bool {
        let keep = crate::value::truncate_chars(&self.text, MAX_LOG_LINE_BYTES).len();
        let mut changed = keep < self.text.len();
        self.text.truncate(keep);
        if let Some(t) = &mut self.thread {
            changed |= crate::value::clip_printable(t, MAX_THREAD_LEN);
        }
        if self.redactions.len() > crate::hit::MAX_FINDINGS_PER_HIT {
            self.redactions.truncate(crate::hit::MAX_FINDINGS_PER_HIT);
            changed = true;
        }
        for f in &mut self.redactions {
            changed |= crate::value::clip_printable(&mut f.path, MAX_FINDING_PATH_LEN);
            changed |= crate::value::clip_printable(&mut f.rule, MAX_RULE_ID_LEN);
        }
        changed
    }

    /// What the line costs a byte budget: its text, thread name and findings, and a
    /// fixed share for its envelope, so no field rides for free.
    pub fn cost(&self) -> usize {
        const ENVELOPE: usize = 16;
        ENVELOPE
            + self.text.len()
            + self.thread.as_deref().map_or(0, str::len)
            + self.redactions.iter().map(|f| f.path.len() + f.rule.len() + 16).sum::<usize>()
    }
}

/// Longest line accepted, in bytes (the template renderer stops at 4 KiB).
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024 + 16;

/// One interval's aggregate of a metric action on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    /// The metric action.
    pub action_id: ActionId,
    /// Start of the interval, Unix milliseconds.
    pub window_start_ms: u64,
    /// End of the interval, Unix milliseconds.
    pub window_end_ms: u64,
    /// Samples (hits for a counter) in the interval.
    pub count: u64,
    /// Sum of the samples (0 for counters).
    #[serde(default)]
    pub sum: f64,
    /// Smallest sample, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest sample, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Distribution of the samples (empty for counters).
    #[serde(default)]
    pub histogram: Histogram,
    /// Hits where the value could not be computed (expression errors, nulls).
    #[serde(default)]
    pub skipped: u64,
}

/// Most reports per `metrics` frame.
pub const MAX_METRIC_REPORTS_PER_FRAME: usize = 200;

/// A log-bucketed histogram with bounded relative error (the DDSketch scheme): a
/// positive value `v` falls in bucket `ceil(ln v / ln γ)`, so any quantile it reports
/// is within about 2% of the true value, and two histograms merge by adding counts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// Samples equal to zero (or too close to it to bucket).
    #[serde(default)]
    pub zero: u64,
    /// Positive samples: bucket index to count.
    #[serde(default, with = "buckets")]
    pub positive: BTreeMap<i32, u64>,
    /// Negative samples, by the bucket of their absolute value.
    #[serde(default, with = "buckets")]
    pub negative: BTreeMap<i32, u64>,
}

/// Bucket growth factor: 4% wide buckets, ~2% relative error.
pub const HISTOGRAM_GAMMA: f64 = 1.04;

/// Most buckets per sign; beyond, the lowest buckets are folded together.
pub const MAX_HISTOGRAM_BUCKETS: usize = 1_024;

/// Smallest magnitude bucketed; anything closer to zero counts as zero.
const MIN_MAGNITUDE: f64 = 1e-9;

mod buckets {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<i32, u64>, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<[i64; 2]> =
            map.iter().map(|(k, v)| [i64::from(*k), i64::try_from(*v).unwrap_or(i64::MAX)]).collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i32, u64>, D::Error> {
        let pairs: Vec<(i32, u64)> = Vec::deserialize(d)?;
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            *map.entry(k).or_insert(0u64) = map.get(&k).copied().unwrap_or(0).saturating_add(v);
        }
        Ok(map)
    }
}

impl Histogram {
    fn index(magnitude: f64) -> i32 {
        let i = (magnitude.ln() / HISTOGRAM_GAMMA.ln()).ceil();
        i.clamp(f64::from(i32::MIN / 2), f64::from(i32::MAX / 2)) as i32
    }

    fn representative(index: i32) -> f64 {
        // The midpoint that makes the relative error symmetric within the bucket.
        2.0 * HISTOGRAM_GAMMA.powi(index) / (HISTOGRAM_GAMMA + 1.0)
    }

    /// Adds one sample. Non-finite samples are ignored (the caller counts them).
    pub fn record(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let magnitude = v.abs();
        if magnitude < MIN_MAGNITUDE {
            self.zero = self.zero.saturating_add(1);
            return;
        }
        let side = if v > 0.0 { &mut self.positive } else { &mut self.negative };
        let e = side.entry(Self::index(magnitude)).or_insert(0);
        *e = e.saturating_add(1);
        Self::bound(side);
    }

    fn bound(side: &mut BTreeMap<i32, u64>) {
        // Fold the lowest buckets into their neighbour: keeps memory bounded and loses
        // precision only at the small end, where it matters least.
        while side.len() > MAX_HISTOGRAM_BUCKETS {
            let Some((&lowest, &count)) = side.iter().next() else { return };
            side.remove(&lowest);
            if let Some((_, next)) = side.iter_mut().next() {
                *next = next.saturating_add(count);
            }
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        self.zero = self.zero.saturating_add(other.zero);
        for (side, from) in [(&mut self.positive, &other.positive), (&mut self.negative, &other.negative)] {
            for (k, v) in from {
                let e = side.entry(*k).or_insert(0);
                *e = e.saturating_add(*v);
            }
            Self::bound(side);
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.positive.values().chain(self.negative.values()).fold(self.zero, |a, b| a.saturating_add(*b))
    }

    /// Whether it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The estimated `q`-quantile (`0.0..=1.0`), within about 2% of the true value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 || !q.is_finite() {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (total - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (k, v) in self.negative.iter().rev() {
            seen = seen.saturating_add(*v);
            if seen > rank {
                return Some(-Self::representative(*k));
            }
        }
        seen = seen.saturating_add(self.zero);
        if seen > rank {
            return Some(0.0);
        }
        for (k, v) in &self.positive {
            seen = seen.saturating_add(*v);
            if seen > rank {
                return Some(Self::representative(*k));
            }
        }
        self.positive.keys().next_back().map(|k| Self::representative(*k))
    }

    /// Bounds a histogram received from outside: at most [`MAX_HISTOGRAM_BUCKETS`] per sign.
    pub fn sanitize(&mut self) {
        Self::bound(&mut self.positive);
        Self::bound(&mut self.negative);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for i in 1..=10_000 {
            h.record(f64::from(i));
        }
        for (q, want) in [(0.5, 5_000.0), (0.9, 9_000.0), (0.99, 9_900.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got - want).abs() / want < 0.025, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (Histogram::default(), Histogram::default(), Histogram::default());
        for i in 0..500 {
            let v = f64::from(i) * 0.37 - 40.0;
            if i % 2 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert!(a.quantile(0.0).unwrap() < 0.0);
    }

    #[test]
    fn histograms_round_trip_and_stay_bounded() {
        let mut h = Histogram::default();
        for i in 0..5_000 {
            h.record(1.5f64.powi(i % 1_500 - 700));
        }
        assert!(h.positive.len() <= MAX_HISTOGRAM_BUCKETS);
        let json = serde_json::to_string(&h).unwrap();
        let back: Histogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        h.record(f64::NAN);
        assert_eq!(h.count(), 5_000);
    }
}
