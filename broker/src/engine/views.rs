//! Reading actions within a caller's reach: one action with its budgets, its hits or
//! lines after a cursor, lists and counts. An action the caller may not see answers
//! `not_found`, exactly like one that does not exist.

use periscope_protocol::{ActionId, ActionKind};

use super::model::{ActionFilter, ActionRecord, ActionView, HitsPage};
use super::{Engine, MetricExport, parse_action_id};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::telemetry::LinesPage;
use crate::time::now_ms;

/// What a caller asking for an action it may not see (or that does not exist) is told.
pub(super) fn no_such_action(id: &ActionId) -> ApiError {
    ApiError::not_found(format!("no action `{id}`; list_actions shows the actions"))
}

impl Engine {
    /// The action `id` names, if the caller may see it.
    pub(super) async fn visible(&self, id: &ActionId, caller: &Principal) -> Result<ActionRecord, ApiError> {
        self.actions
            .load(id)
            .await?
            .map(|(record, _)| record)
            .filter(|a| a.visible_to(caller))
            .ok_or_else(|| no_such_action(id))
    }

    /// The view of a record, with a metric's figures read from the store.
    pub(super) async fn view_of(&self, record: ActionRecord) -> Result<ActionView, ApiError> {
        let mut view = record.view();
        self.show_pause(&record, &mut view);
        if let ActionKind::Metric(m) = &record.spec.kind {
            let data = self.actions.metric(&record.spec.id).await?.unwrap_or_default();
            view.figures = Some(data.view(m.metric, &record.agent_names()));
        }
        Ok(view)
    }

    /// Marks what an operator's pause holds: the action, and each agent of a paused
    /// pool (`paused`, reason `operator`). Nothing is written: resuming shows the
    /// agents' own states again.
    pub(super) fn show_pause(&self, record: &ActionRecord, view: &mut ActionView) {
        if !record.is_live() || !self.safety.any_paused(&record.org) {
            return;
        }
        for agent in &mut view.agents {
            if let Some(p) = self.safety.paused(&record.org, &agent.pool) {
                agent.state = super::model::AgentState::Paused;
                agent.pause_reason = Some("operator".into());
                agent.detail = Some(p.describe());
                if view.paused_by_operator.is_none() {
                    view.paused_by_operator = Some(p);
                }
            }
        }
        if view.paused_by_operator.is_none() {
            view.paused_by_operator = record.pools.iter().find_map(|pool| self.safety.paused(&record.org, pool));
        }
    }

    /// One action's view, with its budgets.
    pub async fn get(&self, action_id: &str, caller: &Principal) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        let record = self.visible(&id, caller).await?;
        let quota = record.quota_view(now_ms(), &self.ingest);
        let mut view = self.view_of(record).await?;
        view.quota = Some(quota);
        Ok(view)
    }

    /// Hits after `since`, at most `limit`.
    pub async fn hits(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        caller: &Principal,
    ) -> Result<HitsPage, ApiError> {
        let id = parse_action_id(action_id)?;
        self.visible(&id, caller).await?;
        Ok(self.actions.hits(&id, since, limit).await?)
    }

    /// Log lines after `since`, at most `limit`.
    pub async fn lines(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        caller: &Principal,
    ) -> Result<LinesPage, ApiError> {
        let id = parse_action_id(action_id)?;
        self.visible(&id, caller).await?;
        Ok(self.actions.lines(&id, since, limit).await?)
    }

    /// Actions the caller may see matching a filter, newest first.
    pub async fn list(&self, filter: &ActionFilter, caller: &Principal) -> Result<Vec<ActionView>, ApiError> {
        let mut out = Vec::new();
        for a in self.actions.list(caller.org()).await? {
            if a.visible_to(caller) && filter.admits(&a) {
                out.push(self.view_of(a).await?);
            }
        }
        out.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| b.action_id.cmp(&a.action_id)));
        Ok(out)
    }

    /// Live actions placed by one key (its live-action quota in use).
    pub async fn live_count_by_key(&self, caller: &Principal) -> Result<usize, ApiError> {
        Ok(self.actions.live_counts(&caller.key_id, caller.org()).await?.0)
    }

    /// Live actions the caller may see: its organization's, within its reach (a
    /// pool-restricted key counts only what it could list).
    pub async fn live_count_visible(&self, caller: &Principal) -> Result<usize, ApiError> {
        Ok(self.actions.live(caller.org()).await?.iter().filter(|a| a.visible_to(caller)).count())
    }

    /// Ended actions kept for an organization (bounded by
    /// `store.max_ended_actions_per_org`).
    pub async fn ended_count_in(&self, org: &str) -> Result<usize, ApiError> {
        Ok(self.actions.ended_count(org).await?)
    }

    /// Live actions of the caller's that some agent (or the broker) is pausing now, with
    /// the reasons.
    pub async fn paused_for(&self, caller: &Principal) -> Result<Vec<serde_json::Value>, ApiError> {
        let now = now_ms();
        let mut out = Vec::new();
        for a in self.actions.live(caller.org()).await? {
            if !a.visible_to(caller) {
                continue;
            }
            for p in a.quota_view(now, &self.ingest).paused {
                out.push(serde_json::json!({ "action_id": a.spec.id, "pause": p }));
            }
        }
        Ok(out)
    }

    /// The live metric actions of an organization with their figures, for `/metrics`.
    pub async fn metric_snapshot(&self, org: &str) -> Result<Vec<MetricExport>, ApiError> {
        let mut out = Vec::new();
        for a in self.actions.live(org).await? {
            let ActionKind::Metric(m) = &a.spec.kind else { continue };
            let data = self.actions.metric(&a.spec.id).await?.unwrap_or_default();
            out.push(MetricExport { action_id: a.spec.id.clone(), kind: m.metric, data, org: a.org, pools: a.pools });
        }
        Ok(out)
    }
}
