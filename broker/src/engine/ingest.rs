//! What agents send: hits, log lines, metric reports and action status updates.
//!
//! Never trust an agent: every hit and line is redacted again with its organization's
//! rules and cut to the capture limits, findings must name rules the broker knows, and
//! the per-action rates agents enforce are enforced again (snapshot hits per agent; log
//! lines and bytes per action, all agents together). A hit or line is redacted before
//! it reaches the store; what the store refuses is counted, per organization and pool.

use std::collections::HashMap;

use periscope_protocol::{ActionId, AgentActionState, Hit, LogLine, MetricReport};

use super::model::{ActionRecord, AgentState};
use super::{Engine, Ingested, LinesIngested, Sender};
use crate::audit::{Actor, AuditKind};
use crate::backend::{HitOutcome, RateSpec};
use crate::time::now_ms;

/// Keeps the findings an agent reported under rule ids its organization's rules have
/// (anything else would be shown in `redaction_rules_fired` and the audit trail);
/// returns how many it dropped. Public for the ingest instruction count
/// (`benches/examples/ingest_cost.rs`).
pub fn keep_known_findings(
    redactor: &periscope_redaction::Redactor,
    findings: &mut Vec<periscope_protocol::RedactionFinding>,
) -> usize {
    if findings.is_empty() {
        return 0;
    }
    let before = findings.len();
    findings.retain(|f| redactor.has_rule(&f.rule));
    before - findings.len()
}

/// Text an agent sent that callers are shown (a status reason): bounded, one line.
fn agent_text(s: &str) -> String {
    let mut out = periscope_protocol::value::truncate_chars(s, 512).to_owned();
    periscope_protocol::value::clip_printable(&mut out, 512);
    out
}

impl Engine {
    /// Accepts a hit from an agent: re-applies redaction and capture limits, enforces
    /// the action's per-agent rate, stores it, and completes the action when it has its
    /// hits.
    pub async fn ingest_hit(&self, from: &Sender, hit: Hit) -> Ingested {
        self.ingest_hits(from, vec![hit]).await.pop().unwrap_or(Ingested::Unavailable)
    }

    /// [`Engine::ingest_hit`] for hits an agent sent together (of any actions), stored
    /// in one call to the store; one outcome per hit, in order.
    pub async fn ingest_hits(&self, from: &Sender, mut hits: Vec<Hit>) -> Vec<Ingested> {
        // Never trust an agent: its findings must name rules the broker knows, and
        // redaction and the same limits again (a no-op for honest agents). Keys are
        // known here too, so a `password` field is caught by name.
        // An operator's pause holds everything of the pool: hits in flight when it
        // began are not kept.
        if self.safety.paused(&from.org, &from.pool).is_some() {
            self.stats.add(from, |s| s.hits_refused += hits.len() as u64);
            return vec![Ingested::Refused; hits.len()];
        }
        let redactor = self.rules.redactor(&from.org);
        let blocklist = self.safety.rules(&from.org);
        let mut unknown = 0;
        // Where a `no_actions` rule holds, nothing is kept, whatever the agent sent:
        // hits in flight when the rule came (the agent drops the action on its side)
        // are refused as a placement there would be.
        let mut blocked = vec![false; hits.len()];
        for (hit, blocked) in hits.iter_mut().zip(blocked.iter_mut()) {
            // No value leaves where a `no_capture` rule holds, whatever the agent sent.
            if !blocklist.is_empty() {
                let names: Vec<&str> = hit.location.name.as_deref().into_iter().collect();
                let site = periscope_protocol::blocklist::Site {
                    pool: &from.pool,
                    file: &hit.location.file,
                    module: hit.location.module.as_deref(),
                    functions: &names,
                };
                if periscope_protocol::blocklist::first_match(&blocklist, &site, true).is_some() {
                    *blocked = true;
                    continue;
                }
                if periscope_protocol::blocklist::first_match(&blocklist, &site, false).is_some() {
                    hit.strip_values();
                }
            }
            unknown += keep_known_findings(&redactor, &mut hit.redactions);
            redactor.redact_hit(hit);
            if let Some(error) = &mut hit.error {
                // What failed is text the agent chose: redacted like every value.
                let mut report = periscope_redaction::Report::new();
                error.message = redactor.redact_text(&error.message, "error.message", &mut report).into_owned();
            }
            hit.enforce_limits(&self.limits);
        }
        self.count_unknown_rules(from, unknown);
        let refused = blocked.iter().filter(|b| **b).count();
        if refused == 0 {
            return self.store_hits(from, hits).await;
        }
        self.stats.add(from, |s| s.hits_refused += refused as u64);
        let mut keep = blocked.iter().map(|b| !b);
        hits.retain(|_| keep.next().unwrap_or(true));
        let mut stored = self.store_hits(from, hits).await.into_iter();
        blocked
            .iter()
            .map(|b| if *b { Ingested::Refused } else { stored.next().unwrap_or(Ingested::Refused) })
            .collect()
    }

    /// Stores hits that passed the checks of [`Engine::ingest_hits`] (and were
    /// redacted); one outcome per hit, in order.
    async fn store_hits(&self, from: &Sender, hits: Vec<Hit>) -> Vec<Ingested> {
        if hits.is_empty() {
            return Vec::new();
        }
        let now = now_ms();
        let ids: Vec<ActionId> = hits.iter().map(|h| h.action_id.clone()).collect();
        // Error captures also update their error group once stored.
        let mut errors = self.error_updates(from, &hits);
        let mut captures = Vec::new();
        let i = &self.ingest;
        let rate =
            RateSpec { per_sec: i.action_hits_per_sec, burst: (i.action_hits_per_sec * i.burst_factor).max(2.0) };
        let outcomes = match self.actions.append_hits(from, hits, now, rate).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(agent = %from.id, hits = ids.len(), error = %e, "hits could not be stored");
                return vec![Ingested::Unavailable; ids.len()];
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        // Waiters hear of each action once per batch, before any completion.
        let mut changed: Vec<&ActionId> = Vec::new();
        let mut complete: Vec<&ActionId> = Vec::new();
        for ((id, outcome), error) in ids.iter().zip(outcomes).zip(errors.iter_mut()) {
            out.push(match outcome {
                HitOutcome::Refused => {
                    self.stats.add(from, |s| s.hits_refused += 1);
                    Ingested::Refused
                }
                HitOutcome::RateLimited => {
                    self.stats.add(from, |s| s.hits_rate_limited += 1);
                    let message = format!(
                        "the broker dropped hits above {}/s for this action from this agent",
                        self.ingest.action_hits_per_sec
                    );
                    self.broker_pause(id, from, "rate_limited", message, now, |r| r.dropped.snapshot_rate += 1).await;
                    Ingested::RateLimited
                }
                HitOutcome::LeaseLost => Ingested::LeaseLost,
                HitOutcome::Accepted { complete: done, index } => {
                    self.stats.add(from, |s| s.hits_accepted += 1);
                    if !changed.contains(&id) {
                        changed.push(id);
                    }
                    // An error capture lives until it expires: its hit ceiling only
                    // stops storing (occurrences are still counted).
                    let capture = error.take().map(|mut g| {
                        if let Some(h) = &mut g.hit {
                            h.index = index;
                        }
                        g
                    });
                    let is_capture = capture.is_some();
                    captures.extend(capture);
                    if done && !is_capture {
                        complete.push(id);
                    }
                    Ingested::Accepted
                }
            });
        }
        self.record_captures(from, captures).await;
        for id in changed {
            self.events.changed(id);
        }
        for id in complete {
            self.complete(id, "collected all its hits").await;
        }
        out
    }

    /// Records that the broker dropped something of an action over its rates (a drop
    /// counted on the action, the action shown paused by the broker) and audits the
    /// first pause of an episode.
    async fn broker_pause(
        &self,
        id: &ActionId,
        from: &Sender,
        reason: &'static str,
        message: String,
        now: u64,
        count: impl Fn(&mut ActionRecord),
    ) {
        let data = serde_json::json!({ "reason": reason, "agent_id": from.id, "by": "broker", "message": message });
        let changed = self
            .change(id, |r| {
                count(r);
                r.dropped.last_drop_ms = Some(now);
                r.dropped.paused = true;
                Some(r.pause_episode(reason, now, data.clone()))
            })
            .await;
        match changed {
            Ok(Some((_, Some(entry)))) => self.audit(entry),
            Ok(_) => {}
            Err(e) => tracing::warn!(action = %id, error = %e, "a dropped hit could not be counted"),
        }
    }

    /// Counts findings dropped for naming unknown rules as the agent's
    /// `unknown_redaction_rule` drops.
    fn count_unknown_rules(&self, from: &Sender, unknown: usize) {
        if unknown > 0 {
            self.registry.count_drop(&from.id, crate::registry::DropReason::UnknownRule, unknown as u64);
            tracing::debug!(agent = %from.id, unknown, "dropped findings naming unknown redaction rules");
        }
    }

    /// Accepts dynamic log lines from an agent; returns how many were kept. Lines for
    /// actions that are not this agent's live logs are refused.
    pub async fn ingest_lines(&self, from: &Sender, lines: Vec<LogLine>) -> LinesIngested {
        let now = now_ms();
        let mut out = LinesIngested::default();
        // Lines in flight when an operator paused the pool are not kept.
        if self.safety.paused(&from.org, &from.pool).is_some() {
            return out;
        }
        // One frame may carry lines of several actions: each action is asked once.
        let mut by_action: HashMap<ActionId, Vec<LogLine>> = HashMap::new();
        for mut line in lines.into_iter().take(periscope_protocol::telemetry::MAX_LOG_LINES_PER_FRAME) {
            // Every field bounded; every byte of it charged (thread name and findings
            // included), whatever the agents' budgets let through.
            line.sanitize();
            by_action.entry(line.action_id.clone()).or_default().push(line);
        }
        let i = &self.ingest;
        let rates = (
            RateSpec { per_sec: i.action_log_lines_per_sec, burst: i.action_log_lines_per_sec * i.burst_factor },
            RateSpec {
                per_sec: i.action_log_bytes_per_sec as f64,
                burst: i.action_log_bytes_per_sec as f64 * i.burst_factor,
            },
        );
        let redactor = self.rules.redactor(&from.org);
        let blocklist = self.safety.rules(&from.org);
        let blocks_actions = blocklist.iter().any(|r| r.effect.blocks_actions());
        let mut unknown_rules = 0;
        for (id, lines) in by_action {
            let costs: Vec<u32> = lines.iter().map(|l| u32::try_from(l.cost()).unwrap_or(u32::MAX)).collect();
            let admitted = match self.actions.admit_lines(&id, from, &costs, rates).await {
                Ok(Some(mask)) => mask,
                Ok(None) => {
                    self.stats.add(from, |s| s.lines_refused += lines.len() as u64);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(agent = %from.id, action = %id, error = %e, "log lines could not be stored");
                    continue;
                }
            };
            // Lines in flight when a `no_actions` rule came to cover their log are
            // refused, as hits there are. Asked only of a live action this agent runs
            // (admitted above), so made-up action ids cost no extra read.
            if blocks_actions && self.blocked_at_ingest(&id, from, &blocklist).await {
                self.stats.add(from, |s| s.lines_refused += lines.len() as u64);
                continue;
            }
            let mut keep = Vec::with_capacity(lines.len());
            let mut dropped = 0u64;
            for (mut line, ok) in lines.into_iter().zip(admitted) {
                if !ok {
                    dropped += 1;
                    continue;
                }
                // The agent redacted each placeholder by name (its findings must name
                // rules the broker knows); the broker redacts the text again.
                unknown_rules += keep_known_findings(&redactor, &mut line.redactions);
                let mut report = periscope_redaction::Report::new();
                if let std::borrow::Cow::Owned(clean) = redactor.redact_text(&line.text, "text", &mut report) {
                    line.text = clean;
                }
                line.redactions.extend(report.into_findings().into_iter().map(Into::into));
                line.redactions.truncate(periscope_protocol::hit::MAX_FINDINGS_PER_HIT);
                line.rules_version = line.rules_version.max(redactor.version());
                keep.push(line);
            }
            if dropped > 0 {
                out.rate_limited += dropped as usize;
                self.stats.add(from, |s| s.lines_rate_limited += dropped);
                let message = format!(
                    "the broker dropped lines above {} lines/s or {} B/s for this log",
                    self.ingest.action_log_lines_per_sec, self.ingest.action_log_bytes_per_sec
                );
                self.broker_pause(&id, from, "quota_log", message, now, |r| r.dropped.log_rate += dropped).await;
            }
            if keep.is_empty() {
                continue;
            }
            match self.actions.append_lines(&id, from, keep, now).await {
                Ok(o) => {
                    out.kept += o.kept;
                    self.stats.add(from, |s| {
                        s.lines_accepted += o.kept as u64;
                        s.lines_refused += o.refused as u64;
                    });
                    if o.kept > 0 {
                        self.events.changed(&id);
                    }
                    if o.complete {
                        self.complete(&id, "reached its max_lines").await;
                    }
                }
                Err(e) => tracing::warn!(agent = %from.id, action = %id, error = %e, "log lines could not be stored"),
            }
        }
        self.count_unknown_rules(from, unknown_rules);
        out
    }

    /// Merges metric reports from an agent; returns how many were kept. Reports for a
    /// metric that ended recently are still merged (an agent's last interval arrives
    /// after the removal).
    pub async fn ingest_metrics(&self, from: &Sender, reports: Vec<MetricReport>) -> usize {
        let mut kept = 0;
        if self.safety.paused(&from.org, &from.pool).is_some() {
            return kept;
        }
        for report in reports.into_iter().take(periscope_protocol::telemetry::MAX_METRIC_REPORTS_PER_FRAME) {
            let id = report.action_id.clone();
            match self.actions.merge_metric(&id, from, report).await {
                Ok(true) => {
                    kept += 1;
                    self.stats.add(from, |s| s.metric_reports += 1);
                    self.events.changed(&id);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(agent = %from.id, action = %id, error = %e, "a metric report could not be stored")
                }
            }
        }
        kept
    }

    /// Records an action state reported by an agent (of the action's organization, and
    /// one the action runs on; anything else is ignored). A quota pause is counted, and
    /// the first pause of an episode (per action and reason) goes to the audit trail, as
    /// does the first expression refused a read of a redacted value (per action).
    pub async fn on_status(&self, from: &Sender, action_id: &ActionId, state: AgentActionState) {
        let now = now_ms();
        let agent_id = &from.id;
        let (label, detail, pause, eval_error, redacted_read) = match &state {
            AgentActionState::Installed { callsites } => {
                (AgentState::Installed, Some(format!("armed on {callsites} callsite(s)")), None, None, None)
            }
            AgentActionState::Pending => (
                AgentState::Pending,
                Some("armed; waiting for code at the location to run for the first time".into()),
                None,
                None,
                None,
            ),
            AgentActionState::Error { reason } => (AgentState::Error, Some(agent_text(reason)), None, None, None),
            AgentActionState::Paused { reason, message } => {
                let reason = reason.as_str().to_owned();
                (AgentState::Paused, Some(agent_text(message)), Some(reason), None, None)
            }
            AgentActionState::Resumed => (AgentState::Installed, Some("resumed".into()), None, None, None),
            AgentActionState::Completed => (AgentState::Completed, None, None, None, None),
            AgentActionState::EvalError { reason, code } => {
                let text = agent_text(reason);
                let redacted = (code.as_deref() == Some("redacted")).then(|| text.clone());
                (AgentState::EvalError, Some(text.clone()), None, Some(text), redacted)
            }
        };
        let changed = self
            .change(action_id, |action| {
                if action.org != from.org {
                    return None;
                }
                let entry = action.agents.get_mut(agent_id)?;
                entry.state = label;
                entry.detail = detail.clone();
                entry.pause_reason = pause.clone();
                entry.updated_at_ms = now;
                if let Some(e) = &eval_error {
                    entry.eval_error = Some(e.clone());
                }
                let mut audits = Vec::new();
                if let Some(reason) = &pause {
                    let data = serde_json::json!({ "reason": reason, "agent_id": agent_id, "by": "agent",
                                                   "message": detail });
                    audits.extend(action.pause_episode(reason, now, data));
                }
                if let Some(reason) = &redacted_read {
                    action.redacted_reads += 1;
                    if action.redacted_reads == 1 {
                        // Whoever placed the action wrote the expression.
                        let actor = Actor::Key { id: action.created_by_key.clone(), name: action.created_by.clone() };
                        let mut entry = action.audit(actor, AuditKind::RedactedReadRefused);
                        entry.detail = "an expression of the action tried to read a value that redaction hides; \
                                        the agent refused it"
                            .into();
                        entry.data = serde_json::json!({ "agent_id": agent_id, "reason": reason });
                        audits.push(entry);
                    }
                }
                Some(audits)
            })
            .await;
        match changed {
            Ok(Some((_, audits))) => {
                if let Some(reason) = &pause {
                    self.stats.add(from, |s| *s.quota_pauses.entry(reason.clone()).or_insert(0) += 1);
                }
                for entry in audits {
                    self.audit(entry);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(action = %action_id, error = %e, "an action status could not be stored"),
        }
    }
}
