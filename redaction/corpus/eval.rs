//! Scoring a [`Redactor`] against the labelled corpus written by `generate.py`.
//!
//! Shared by the accuracy test (`tests/it/accuracy.rs`) and the `corpus_eval` example
//! that `benches/presidio_compare.py` runs, so both report the same numbers.

use std::collections::BTreeMap;
use std::time::Instant;

use periscope_redaction::{Redactor, Report};

/// One labelled sample.
#[derive(Debug, serde::Deserialize)]
pub struct Sample {
    /// `positive` or `negative`.
    pub label: String,
    /// What it holds (`email`, `uuid`, ...).
    pub kind: String,
    /// `text` or `json`.
    pub shape: String,
    /// The text or JSON document.
    pub input: String,
    /// For positives: what must not survive.
    #[serde(default)]
    pub secret: Option<String>,
    /// For positives: rule ids that may take credit; absent means any `key:` rule.
    #[serde(default)]
    pub rules: Option<Vec<String>>,
}

/// Reads a JSON-lines corpus.
pub fn load(path: &std::path::Path) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}

/// Per-kind counts for positives.
#[derive(Debug, Default, Clone, Copy)]
pub struct KindScore {
    /// Samples of this kind.
    pub total: usize,
    /// Samples whose secret did not survive.
    pub redacted: usize,
    /// Samples where an expected rule fired.
    pub attributed: usize,
}

/// Everything measured in one run.
#[derive(Debug, Default)]
pub struct Scores {
    /// Positives by kind.
    pub positives: BTreeMap<String, KindScore>,
    /// Negatives by category: (total, touched).
    pub negatives: BTreeMap<String, (usize, usize)>,
    /// Which rules touched negatives, and how often.
    pub negative_rules: BTreeMap<String, usize>,
    /// Examples of misses and of touched negatives: (kind, input, output).
    pub misses: Vec<(String, String, String)>,
    /// See `misses`.
    pub touched: Vec<(String, String, String)>,
    /// Input bytes and seconds spent redacting (parsing JSON excluded).
    pub bytes: usize,
    /// See `bytes`.
    pub seconds: f64,
}

/// Whether any window of six characters of `secret` (or all of it, when shorter)
/// appears in `output`.
pub fn survives(secret: &str, output: &str) -> bool {
    let chars: Vec<char> = secret.chars().collect();
    let w = chars.len().min(6);
    if w == 0 {
        return false;
    }
    chars.windows(w).any(|win| output.contains(&win.iter().collect::<String>()))
}

fn run(redactor: &Redactor, sample: &Sample, report: &mut Report, seconds: &mut f64) -> String {
    if sample.shape == "json" {
        let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(&sample.input) else {
            return sample.input.clone();
        };
        let t = Instant::now();
        redactor.redact_json(&mut doc, report);
        *seconds += t.elapsed().as_secs_f64();
        doc.to_string()
    } else {
        let t = Instant::now();
        let out = redactor.redact_text(&sample.input, "sample", report).into_owned();
        *seconds += t.elapsed().as_secs_f64();
        out
    }
}

/// Runs every sample through `redactor`.
pub fn score(redactor: &Redactor, samples: &[Sample]) -> Scores {
    let mut s = Scores::default();
    let mut report = Report::new();
    for sample in samples {
        report.clear();
        s.bytes += sample.input.len();
        let output = run(redactor, sample, &mut report, &mut s.seconds);
        if sample.label == "positive" {
            let entry = s.positives.entry(sample.kind.clone()).or_default();
            entry.total += 1;
            let secret = sample.secret.as_deref().unwrap_or("");
            if survives(secret, &output) {
                if s.misses.iter().filter(|m| m.0 == sample.kind).count() < 4 {
                    s.misses.push((sample.kind.clone(), sample.input.clone(), output));
                }
            } else {
                entry.redacted += 1;
            }
            let credited = report.findings().iter().any(|f| match &sample.rules {
                Some(rules) => rules.contains(&f.rule),
                None => f.rule.starts_with("key:"),
            });
            if credited {
                entry.attributed += 1;
            }
        } else {
            let normalized_input = if sample.shape == "json" {
                serde_json::from_str::<serde_json::Value>(&sample.input).map(|v| v.to_string()).unwrap_or_default()
            } else {
                sample.input.clone()
            };
            let entry = s.negatives.entry(sample.kind.clone()).or_default();
            entry.0 += 1;
            if output != normalized_input || !report.is_empty() {
                entry.1 += 1;
                for f in report.findings() {
                    *s.negative_rules.entry(f.rule.clone()).or_default() += 1;
                }
                if s.touched.len() < 40 {
                    s.touched.push((sample.kind.clone(), sample.input.clone(), output));
                }
            }
        }
    }
    s
}

impl Scores {
    /// Share of hard negatives that were changed at all.
    pub fn touched_rate(&self) -> f64 {
        let (total, touched) = self.negatives.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        touched as f64 / total.max(1) as f64
    }

    /// The per-kind table, as printed by the test.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("{:<22} {:>6} {:>9} {:>11}\n", "positive kind", "n", "recall", "attributed"));
        for (kind, k) in &self.positives {
            out.push_str(&format!(
                "{:<22} {:>6} {:>8.2}% {:>10.2}%\n",
                kind,
                k.total,
                100.0 * k.redacted as f64 / k.total.max(1) as f64,
                100.0 * k.attributed as f64 / k.total.max(1) as f64
            ));
        }
        out.push_str(&format!("\n{:<22} {:>6} {:>9}\n", "hard negative", "n", "touched"));
        for (kind, (total, touched)) in &self.negatives {
            out.push_str(&format!(
                "{:<22} {:>6} {:>8.2}%\n",
                kind,
                total,
                100.0 * *touched as f64 / (*total).max(1) as f64
            ));
        }
        let total_neg: usize = self.negatives.values().map(|v| v.0).sum();
        out.push_str(&format!("{:<22} {:>6} {:>8.2}%\n", "all hard negatives", total_neg, 100.0 * self.touched_rate()));
        if !self.negative_rules.is_empty() {
            out.push_str("\nfalse positives by rule (share of all hard negatives):\n");
            for (rule, n) in &self.negative_rules {
                out.push_str(&format!(
                    "  {:<20} {:>5} {:>7.2}%\n",
                    rule,
                    n,
                    100.0 * *n as f64 / total_neg.max(1) as f64
                ));
            }
        }
        out.push_str(&format!(
            "\n{} bytes redacted in {:.3} s ({:.1} MB/s, this build)\n",
            self.bytes,
            self.seconds,
            self.bytes as f64 / self.seconds.max(1e-9) / 1e6
        ));
        out
    }
}
