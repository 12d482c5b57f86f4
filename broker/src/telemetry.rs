//! What the broker keeps of dynamic logs and dynamic metrics: bounded per-action line
//! buffers, metric totals merged across agents and intervals, a short time series, and
//! the Prometheus text rendering of it all.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use periscope_protocol::{AgentId, Histogram, LogLine, MetricKind, MetricReport};
use serde::{Deserialize, Serialize};

/// Lines kept per log action; older ones are dropped (and counted) beyond it.
pub const MAX_STORED_LINES: usize = 10_000;

/// Points kept in a metric's time series.
pub const MAX_SERIES_POINTS: usize = 60;

/// Width of one time-series point.
pub const SERIES_STEP_MS: u64 = 10_000;

/// A log line as stored and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredLine {
    /// 1-based position in the action's lines; `since` cursors refer to it.
    pub index: u64,
    /// The agent that sent it.
    pub agent_id: AgentId,
    /// That agent's display name.
    pub agent_name: String,
    /// When the broker accepted it (Unix ms).
    pub received_at_ms: u64,
    /// The line.
    #[serde(flatten)]
    pub line: LogLine,
}

/// A page of log lines after a cursor.
#[derive(Debug, Clone, Serialize)]
pub struct LinesPage {
    /// Lines with `index > since`, oldest first.
    pub lines: Vec<StoredLine>,
    /// Pass as `since` to get only newer lines.
    pub next_cursor: u64,
    /// More lines are stored after this page.
    pub has_more: bool,
    /// Lines no longer kept (beyond the per-action buffer).
    pub dropped: u64,
}

/// A log action's lines.
#[derive(Debug, Default)]
pub struct LineBook {
    /// Kept lines, oldest first.
    pub lines: VecDeque<StoredLine>,
    /// Lines accepted in all (the index of the newest).
    pub total: u64,
}

impl LineBook {
    /// Appends a line; returns its index.
    pub fn push(&mut self, mut line: StoredLine) -> u64 {
        self.total += 1;
        line.index = self.total;
        self.lines.push_back(line);
        while self.lines.len() > MAX_STORED_LINES {
            self.lines.pop_front();
        }
        self.total
    }

    /// Puts back a line loaded from the store (in index order).
    pub fn restore(&mut self, line: StoredLine) {
        self.total = self.total.max(line.index);
        self.lines.push_back(line);
        while self.lines.len() > MAX_STORED_LINES {
            self.lines.pop_front();
        }
    }

    /// Lines dropped from the buffer.
    pub fn dropped(&self) -> u64 {
        self.lines.front().map_or(self.total, |l| l.index.saturating_sub(1))
    }

    /// A page after `since`.
    pub fn page(&self, since: u64, limit: usize) -> LinesPage {
        let first = self.dropped();
        let skip = usize::try_from(since.saturating_sub(first)).unwrap_or(usize::MAX).min(self.lines.len());
        let lines: Vec<StoredLine> = self.lines.iter().skip(skip).take(limit.max(1)).cloned().collect();
        let next_cursor = lines.last().map_or(since.max(first), |l| l.index);
        LinesPage { has_more: next_cursor < self.total, next_cursor, lines, dropped: first }
    }
}

/// Merged figures of a metric.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Samples (hits for counters).
    pub count: u64,
    /// Sum of samples.
    pub sum: f64,
    /// Smallest sample.
    pub min: Option<f64>,
    /// Largest sample.
    pub max: Option<f64>,
    /// Distribution.
    pub histogram: Histogram,
    /// Hits without a usable value.
    pub skipped: u64,
    /// End of the newest interval merged (Unix ms).
    pub last_report_ms: u64,
}

impl Totals {
    /// Adds another agent's (or node's) totals to these.
    pub fn absorb(&mut self, o: &Totals) {
        self.count = self.count.saturating_add(o.count);
        if o.sum.is_finite() {
            self.sum += o.sum;
        }
        if let Some(m) = o.min {
            self.min = Some(self.min.map_or(m, |x| x.min(m)));
        }
        if let Some(m) = o.max {
            self.max = Some(self.max.map_or(m, |x| x.max(m)));
        }
        self.histogram.merge(&o.histogram);
        self.skipped = self.skipped.saturating_add(o.skipped);
        self.last_report_ms = self.last_report_ms.max(o.last_report_ms);
    }

    fn merge(&mut self, r: &MetricReport) {
        self.count = self.count.saturating_add(r.count);
        if r.sum.is_finite() {
            self.sum += r.sum;
        }
        if let Some(m) = r.min.filter(|m| m.is_finite()) {
            self.min = Some(self.min.map_or(m, |x| x.min(m)));
        }
        if let Some(m) = r.max.filter(|m| m.is_finite()) {
            self.max = Some(self.max.map_or(m, |x| x.max(m)));
        }
        self.histogram.merge(&r.histogram);
        self.skipped = self.skipped.saturating_add(r.skipped);
        self.last_report_ms = self.last_report_ms.max(r.window_end_ms);
    }

    /// The figures a reader wants.
    pub fn figures(&self, kind: MetricKind) -> Figures {
        let distribution = kind != MetricKind::Counter && self.count > 0;
        Figures {
            count: self.count,
            sum: distribution.then_some(self.sum),
            mean: distribution.then(|| self.sum / self.count as f64),
            min: if distribution { self.min } else { None },
            max: if distribution { self.max } else { None },
            p50: if distribution { self.histogram.quantile(0.5) } else { None },
            p90: if distribution { self.histogram.quantile(0.9) } else { None },
            p99: if distribution { self.histogram.quantile(0.99) } else { None },
            skipped: self.skipped,
        }
    }
}

/// A metric's figures (durations in milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Samples, or hits for a counter.
    pub count: u64,
    /// Sum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
    /// Mean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Smallest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Median estimate (within ~2%).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    /// 90th percentile estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90: Option<f64>,
    /// 99th percentile estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// Hits without a usable value.
    pub skipped: u64,
}

/// One point of a metric's time series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Start of the step (Unix ms).
    pub start_ms: u64,
    /// Merged figures over the step.
    pub totals: Totals,
}

/// Everything the broker knows of one metric action.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetricData {
    /// Over all agents.
    pub total: Totals,
    /// Per agent.
    pub per_agent: BTreeMap<AgentId, Totals>,
    /// Recent steps, oldest first.
    pub series: VecDeque<SeriesPoint>,
}

impl MetricData {
    /// Merges one agent's report.
    pub fn merge(&mut self, agent: &AgentId, report: &MetricReport) {
        self.total.merge(report);
        self.per_agent.entry(agent.clone()).or_default().merge(report);
        let start = report.window_end_ms / SERIES_STEP_MS * SERIES_STEP_MS;
        match self.series.iter_mut().find(|p| p.start_ms == start) {
            Some(point) => point.totals.merge(report),
            None => {
                let mut totals = Totals::default();
                totals.merge(report);
                let at = self.series.iter().position(|p| p.start_ms > start).unwrap_or(self.series.len());
                self.series.insert(at, SeriesPoint { start_ms: start, totals });
                while self.series.len() > MAX_SERIES_POINTS {
                    self.series.pop_front();
                }
            }
        }
    }

    /// Adds figures kept elsewhere (another agent's, merged by another node) to these.
    pub fn absorb(&mut self, other: &MetricData) {
        self.total.absorb(&other.total);
        for (agent, t) in &other.per_agent {
            self.per_agent.entry(agent.clone()).or_default().absorb(t);
        }
        for p in &other.series {
            match self.series.iter_mut().find(|q| q.start_ms == p.start_ms) {
                Some(q) => q.totals.absorb(&p.totals),
                None => {
                    let at = self.series.iter().position(|q| q.start_ms > p.start_ms).unwrap_or(self.series.len());
                    self.series.insert(at, p.clone());
                }
            }
        }
        while self.series.len() > MAX_SERIES_POINTS {
            self.series.pop_front();
        }
    }

    /// The view returned by `get_action`.
    pub fn view(&self, kind: MetricKind, names: &BTreeMap<AgentId, String>) -> MetricView {
        MetricView {
            unit: if kind == MetricKind::Duration { "ms" } else { "" },
            total: self.total.figures(kind),
            per_agent: self
                .per_agent
                .iter()
                .map(|(id, t)| AgentFigures {
                    agent_id: id.clone(),
                    display_name: names.get(id).cloned().unwrap_or_default(),
                    figures: t.figures(kind),
                })
                .collect(),
            series: self
                .series
                .iter()
                .map(|p| SeriesView { start_ms: p.start_ms, figures: p.totals.figures(kind) })
                .collect(),
        }
    }
}

/// A metric's figures for readers.
#[derive(Debug, Clone, Serialize)]
pub struct MetricView {
    /// `ms` for durations, empty otherwise.
    pub unit: &'static str,
    /// Over all agents, since placement.
    pub total: Figures,
    /// Per agent.
    pub per_agent: Vec<AgentFigures>,
    /// The last ten minutes in 10-second steps.
    pub series: Vec<SeriesView>,
}

/// One agent's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AgentFigures {
    /// The agent.
    pub agent_id: AgentId,
    /// Its display name.
    pub display_name: String,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// One step of the series.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesView {
    /// Start of the step (Unix ms).
    pub start_ms: u64,
    /// Figures over the step.
    #[serde(flatten)]
    pub figures: Figures,
}

/// Bounds a report from an agent: finite numbers, bounded histogram.
pub fn sanitize(report: &mut MetricReport) {
    if !report.sum.is_finite() {
        report.sum = 0.0;
    }
    report.min = report.min.filter(|v| v.is_finite());
    report.max = report.max.filter(|v| v.is_finite());
    report.histogram.sanitize();
}

/// Escapes a Prometheus label value.
pub fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Formats a float the way the exposition format expects.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        let mut s = String::new();
        let _ = write!(s, "{v}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(count: u64, values: &[f64], end: u64) -> MetricReport {
        let mut histogram = Histogram::default();
        for v in values {
            histogram.record(*v);
        }
        MetricReport {
            action_id: periscope_protocol::ActionId::generate(),
            window_start_ms: end - 5_000,
            window_end_ms: end,
            count,
            sum: values.iter().sum(),
            min: values.iter().copied().reduce(f64::min),
            max: values.iter().copied().reduce(f64::max),
            histogram,
            skipped: 0,
        }
    }

    #[test]
    fn reports_from_several_agents_merge_into_totals_per_agent_and_a_series() {
        let (a, b) = (AgentId::generate(), AgentId::generate());
        let mut data = MetricData::default();
        data.merge(&a, &report(2, &[10.0, 20.0], 100_000));
        data.merge(&b, &report(1, &[30.0], 104_000));
        data.merge(&a, &report(1, &[40.0], 125_000));
        assert_eq!(data.total.count, 4);
        assert_eq!(data.per_agent[&a].count, 3);
        assert_eq!(data.total.min, Some(10.0));
        assert_eq!(data.total.max, Some(40.0));
        assert_eq!(data.series.len(), 2);
        let f = data.total.figures(MetricKind::Value);
        assert_eq!(f.mean, Some(25.0));
    }

    #[test]
    fn the_line_book_keeps_a_bounded_window_with_stable_cursors() {
        let mut book = LineBook::default();
        for i in 0..(MAX_STORED_LINES + 5) {
            book.push(StoredLine {
                index: 0,
                agent_id: AgentId::generate(),
                agent_name: "a".into(),
                received_at_ms: i as u64,
                line: LogLine {
                    action_id: periscope_protocol::ActionId::generate(),
                    seq: i as u64,
                    time_ms: 0,
                    level: periscope_protocol::LogLevel::Info,
                    text: format!("line {i}"),
                    thread: None,
                    redactions: vec![],
                    rules_version: 0,
                },
            });
        }
        assert_eq!(book.dropped(), 5);
        let page = book.page(0, 2);
        assert_eq!(page.lines[0].index, 6);
        let page = book.page(MAX_STORED_LINES as u64 + 3, 10);
        assert_eq!(page.lines.len(), 2);
        assert!(!page.has_more);
        assert_eq!(page.next_cursor, MAX_STORED_LINES as u64 + 5);
    }
}
