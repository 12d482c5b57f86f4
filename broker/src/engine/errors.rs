//! Capture on error in the engine: placing an error-capture action (a target and
//! budgets, no location), folding what agents report into error groups (each stored
//! error hit is a capture; each `error_counts` report adds occurrences), and
//! `list_errors`: the distinct errors across the agents a caller sees, newest first.
//!
//! An error-capture action never completes by collecting hits: it lives until it
//! expires or is removed. The broker stores at most [`MAX_ERROR_HITS`] of its hits
//! (beyond them hits are refused and counted, and occurrences are still counted).

use std::collections::{BTreeSet, HashMap};

use periscope_protocol::{ActionId, ActionKind, ErrorCount, ErrorKind, Hit};
use serde::{Deserialize, Serialize};

use super::model::StoredHit;
use super::requests::ErrorCaptureRequest;
use super::{ActionView, Engine, Sender};
use crate::auth::Principal;
use crate::backend::{ErrorGroup, ErrorHit, ErrorSource};
use crate::error::ApiError;

/// Most hits the broker stores for one error-capture action.
pub const MAX_ERROR_HITS: u32 = 200;

/// Default and largest page of `list_errors`.
pub const DEFAULT_ERROR_LIMIT: usize = 20;
/// Largest page of `list_errors`.
pub const MAX_ERROR_LIMIT: usize = 100;

/// What makes errors of different agents one error: location, kind and type.
type ErrorIdentity = (String, u32, ErrorKind, String);

/// Agents named per error in `list_errors` (the rest are counted).
const MAX_AGENTS_NAMED: usize = 10;

/// What `list_errors` filters on (REST query and MCP arguments alike).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErrorQuery {
    /// Only agents of this pool.
    pub pool: Option<String>,
    /// Only agents with every one of these tags.
    pub tags: Vec<String>,
    /// Only agents of this service.
    pub service: Option<String>,
    /// Only errors seen at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Most errors returned (default 20, 1 to 100).
    pub limit: Option<usize>,
    /// Include each error's latest snapshot (default true).
    pub snapshots: Option<bool>,
}

/// One distinct error (location, kind and type) across the agents it happened on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorView {
    /// Source file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// `panic`, `event` or `exception`.
    pub kind: ErrorKind,
    /// The error's type.
    pub error_type: String,
    /// The latest message (redacted).
    pub message: String,
    /// Occurrences, captured or not.
    pub count: u64,
    /// Snapshots stored.
    pub captured: u64,
    /// Occurrences not captured (one per location and type per interval, budgets).
    pub uncaptured: u64,
    /// First occurrence, Unix ms.
    pub first_seen_ms: u64,
    /// Latest occurrence, Unix ms.
    pub last_seen_ms: u64,
    /// Agents it happened on (display names, the first ten).
    pub agents: Vec<String>,
    /// How many agents it happened on.
    pub agent_count: usize,
    /// Their pools.
    pub pools: Vec<String>,
    /// Their services.
    pub services: Vec<String>,
    /// The latest snapshot's action and index (`get_action`'s hits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit: Option<ErrorHit>,
    /// The latest snapshot itself, when asked for and still stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<StoredHit>,
}

impl Engine {
    /// Validates and places an error-capture action on its target's agents.
    pub async fn place_capture_errors(
        &self,
        req: ErrorCaptureRequest,
        caller: &Principal,
    ) -> Result<ActionView, ApiError> {
        let (spec, p) = req.validate()?;
        let target = self.resolve_target(&p.agent_ids, p.pool.as_deref(), &p.tags, caller)?;
        let agents = self.matching_agents(&target, &caller.reach, &caller.tenancy);
        if agents.is_empty() {
            return Err(self.no_matching_agents(&target, caller));
        }
        self.insert(spec, target, caller, None, agents).await
    }

    /// The error of each hit, as its group update, before the hits are stored.
    pub(super) fn error_updates(&self, from: &Sender, hits: &[Hit]) -> Vec<Option<ErrorGroup>> {
        if hits.iter().all(|h| h.error.is_none()) {
            return vec![None; hits.len()];
        }
        let source = self.error_source(from);
        hits.iter()
            .map(|h| {
                let e = h.error.as_ref()?;
                Some(ErrorGroup {
                    source: source.clone(),
                    file: h.location.file.clone(),
                    line: h.location.line,
                    kind: e.kind,
                    error_type: e.error_type.clone(),
                    message: e.message.clone(),
                    count: 0,
                    uncaptured: 0,
                    captured: 1,
                    first_seen_ms: 0,
                    last_seen_ms: 0,
                    hit: Some(ErrorHit { action_id: h.action_id.clone(), index: 0, time_ms: h.time_ms }),
                })
            })
            .collect()
    }

    /// Records the captures among hits just stored (`stored`: each accepted hit's
    /// update with its index filled in).
    pub(super) async fn record_captures(&self, from: &Sender, stored: Vec<ErrorGroup>) {
        if stored.is_empty() {
            return;
        }
        if let Err(e) = self.errors.record(&from.org, stored).await {
            tracing::warn!(agent = %from.id, error = %e, "error captures could not be recorded");
        }
    }

    fn error_source(&self, from: &Sender) -> ErrorSource {
        let (service, tags) =
            self.registry.with(&from.id, |a| (a.info.service.clone(), a.info.tags.clone())).unwrap_or_default();
        ErrorSource { agent_id: from.id.clone(), agent_name: from.name.clone(), pool: from.pool.clone(), service, tags }
    }

    /// Folds an agent's `error_counts` into the error groups: only reports for live
    /// error-capture actions of its organization that target it count; texts are
    /// redacted with the organization's rules and bounded again. Returns how many
    /// were kept.
    pub async fn ingest_error_counts(&self, from: &Sender, reports: Vec<ErrorCount>) -> usize {
        let redactor = self.rules.redactor(&from.org);
        let mut allowed: HashMap<ActionId, bool> = HashMap::new();
        let mut updates = Vec::new();
        let source = self.error_source(from);
        for mut r in reports.into_iter().take(periscope_protocol::errors::MAX_ERROR_COUNTS_PER_FRAME) {
            let ok = match allowed.get(&r.action_id) {
                Some(ok) => *ok,
                None => {
                    let ok = match self.actions.load(&r.action_id).await {
                        Ok(Some((record, _))) => {
                            record.is_live()
                                && record.org == from.org
                                && matches!(record.spec.kind, ActionKind::CaptureErrors(_))
                                && record.agents.contains_key(&from.id)
                        }
                        Ok(None) => false,
                        Err(e) => {
                            tracing::warn!(agent = %from.id, error = %e, "error counts could not be checked");
                            false
                        }
                    };
                    allowed.insert(r.action_id.clone(), ok);
                    ok
                }
            };
            if !ok || r.count == 0 {
                continue;
            }
            let mut report = periscope_redaction::Report::new();
            r.message = redactor.redact_text(&r.message, "error.message", &mut report).into_owned();
            r.clip();
            updates.push(ErrorGroup {
                source: source.clone(),
                file: r.file,
                line: r.line,
                kind: r.kind,
                error_type: r.error_type,
                message: r.message,
                count: r.count,
                uncaptured: r.uncaptured,
                captured: 0,
                first_seen_ms: r.first_seen_ms,
                last_seen_ms: r.last_seen_ms,
                hit: None,
            });
        }
        let kept = updates.len();
        if kept > 0
            && let Err(e) = self.errors.record(&from.org, updates).await
        {
            tracing::warn!(agent = %from.id, error = %e, "error counts could not be recorded");
            return 0;
        }
        kept
    }

    /// The distinct errors across the agents `caller` sees (filtered by `q`), most
    /// recently seen first, each with its latest snapshot when asked for.
    pub async fn list_errors(&self, q: &ErrorQuery, caller: &Principal) -> Result<Vec<ErrorView>, ApiError> {
        let limit = q.limit.unwrap_or(DEFAULT_ERROR_LIMIT);
        super::requests::check_limit(limit, MAX_ERROR_LIMIT, DEFAULT_ERROR_LIMIT)?;
        if q.tags.len() > 32 {
            return Err(ApiError::invalid("at most 32 tags"));
        }
        let org = caller.org();
        let pool = q.pool.as_deref().map(str::trim).filter(|p| !p.is_empty());
        let service = q.service.as_deref().map(str::trim).filter(|s| !s.is_empty());
        let groups = self.errors.list(org).await?;
        // Merged per location, kind and type, in order of first appearance (newest).
        let mut order: Vec<ErrorIdentity> = Vec::new();
        let mut merged: HashMap<ErrorIdentity, (ErrorView, BTreeSet<String>)> = HashMap::new();
        for g in groups {
            let s = &g.source;
            if !caller.sees_pool(org, &s.pool)
                || pool.is_some_and(|p| p != s.pool)
                || service.is_some_and(|v| v != s.service)
                || !q.tags.iter().all(|t| s.tags.contains(t))
                || q.since_ms.is_some_and(|since| g.last_seen_ms < since)
            {
                continue;
            }
            let key = (g.file.clone(), g.line, g.kind, g.error_type.clone());
            match merged.get_mut(&key) {
                Some((view, agents)) => {
                    view.count += g.count;
                    view.captured += g.captured;
                    view.uncaptured += g.uncaptured;
                    if g.first_seen_ms != 0 && (view.first_seen_ms == 0 || g.first_seen_ms < view.first_seen_ms) {
                        view.first_seen_ms = g.first_seen_ms;
                    }
                    let newer_hit = match (&view.hit, &g.hit) {
                        (_, None) => false,
                        (None, Some(_)) => true,
                        (Some(a), Some(b)) => b.time_ms > a.time_ms,
                    };
                    if newer_hit {
                        view.hit = g.hit.clone();
                    }
                    agents.insert(s.agent_name.clone());
                    if !view.pools.contains(&s.pool) {
                        view.pools.push(s.pool.clone());
                    }
                    if !s.service.is_empty() && !view.services.contains(&s.service) {
                        view.services.push(s.service.clone());
                    }
                }
                None => {
                    order.push(key.clone());
                    let view = ErrorView {
                        file: g.file,
                        line: g.line,
                        kind: g.kind,
                        error_type: g.error_type,
                        message: g.message,
                        count: g.count,
                        captured: g.captured,
                        uncaptured: g.uncaptured,
                        first_seen_ms: g.first_seen_ms,
                        last_seen_ms: g.last_seen_ms,
                        agents: Vec::new(),
                        agent_count: 0,
                        pools: vec![s.pool.clone()],
                        services: if s.service.is_empty() { Vec::new() } else { vec![s.service.clone()] },
                        hit: g.hit,
                        snapshot: None,
                    };
                    merged.insert(key, (view, BTreeSet::from([s.agent_name.clone()])));
                }
            }
        }
        let mut out = Vec::with_capacity(limit.min(order.len()));
        for key in order.into_iter().take(limit) {
            let Some((mut view, agents)) = merged.remove(&key) else { continue };
            view.agent_count = agents.len();
            view.agents = agents.into_iter().take(MAX_AGENTS_NAMED).collect();
            view.pools.sort();
            view.services.sort();
            // A count can arrive before its capture: never fewer occurrences than captures.
            view.count = view.count.max(view.captured + view.uncaptured);
            if q.snapshots.unwrap_or(true) {
                view.snapshot = self.error_snapshot(view.hit.as_ref(), caller).await;
            }
            out.push(view);
        }
        Ok(out)
    }

    /// The stored hit `hit` points at, when its action is visible to `caller`.
    async fn error_snapshot(&self, hit: Option<&ErrorHit>, caller: &Principal) -> Option<StoredHit> {
        let hit = hit?;
        let (record, _) = self.actions.load(&hit.action_id).await.ok()??;
        if !record.visible_to(caller) {
            return None;
        }
        let page = self.actions.hits(&hit.action_id, hit.index.saturating_sub(1), 1).await.ok()?;
        page.hits.into_iter().find(|h| h.index == hit.index)
    }
}
