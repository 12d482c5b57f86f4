//! How actions end (their hits collected, their expiry reached, removed by a caller),
//! what is kept of them afterwards, and how live actions follow agents that come and
//! go.
//!
//! Ending is one atomic step of the store (off the live counts, into the retention of
//! its organization, which may forget the oldest ended action of the key holding the
//! most); then the waiters are woken, the agents told, the end audited. Expiry needs no
//! scan: the store keeps live actions ordered by expiry.

use periscope_protocol::{ActionId, BrokerMessage};

use super::model::{ActionStatus, ActionView, AgentActionView, AgentState};
use super::{Engine, Sender, parse_action_id};
use crate::audit::{Actor, AuditKind};
use crate::auth::Principal;
use crate::backend::Ended;
use crate::error::ApiError;
use crate::time::now_ms;

impl Engine {
    /// Ends an action that collected what it had to.
    pub(super) async fn complete(&self, id: &ActionId, reason: &str) {
        if let Err(e) = self.end(id, ActionStatus::Completed, reason, Actor::System).await {
            tracing::warn!(action = %id, error = %e, "a completed action could not be ended");
        }
    }

    /// Ends a live action; wakes its waiters, tells its agents, audits it. `None` when it
    /// was not live.
    async fn end(
        &self,
        id: &ActionId,
        status: ActionStatus,
        reason: &str,
        actor: Actor,
    ) -> Result<Option<Ended>, ApiError> {
        let Some(ended) = self.actions.end(id, status, reason, now_ms()).await? else { return Ok(None) };
        self.events.changed(id);
        let action = &ended.record;
        let kind = match status {
            ActionStatus::Completed => AuditKind::ActionCompleted,
            ActionStatus::Expired => AuditKind::ActionExpired,
            _ => AuditKind::ActionRemoved,
        };
        let mut entry = action.audit(actor, kind);
        entry.detail = format!("the {} at {} {reason}", action.spec.kind.name(), action.spec.location);
        entry.data = serde_json::json!({
            "created_by": action.created_by,
            "created_by_key": action.created_by_key,
            "created_at_ms": action.created_at_ms,
            "agents": action.agents.len(),
            "pauses": action.pauses,
            "broker_dropped": action.dropped,
            "hits_refused": action.hits_refused,
        });
        self.audit(entry);
        let why = match status {
            ActionStatus::Completed => "completed",
            ActionStatus::Expired => "expired",
            _ => "removed",
        };
        for agent in action.agents.keys() {
            self.registry.send(agent, BrokerMessage::ActionRemove { action_id: id.clone(), reason: why.into() });
        }
        Ok(Some(ended))
    }

    /// Removes an action on a caller's request.
    pub async fn remove(&self, action_id: &str, caller: &Principal) -> Result<ActionView, ApiError> {
        let id = parse_action_id(action_id)?;
        let before = self.visible(&id, caller).await?;
        if !before.is_live() {
            return self.view_of(before).await;
        }
        match self.end(&id, ActionStatus::Removed, "removed by a caller", caller.actor()).await? {
            // Its own retention bound may forget it at once (one ended action per key of a
            // crowded organization): answer with what it was.
            Some(ended) => self.view_of(ended.record).await,
            None => self.view_of(self.visible(&id, caller).await?).await,
        }
    }

    /// Ends actions past their expiry; run periodically (and by a waiting call whose
    /// wait ended with the action's life).
    pub async fn expire_due(&self) {
        let due = match self.actions.due(now_ms()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read which actions expire");
                return;
            }
        };
        for id in due {
            if let Err(e) = self.end(&id, ActionStatus::Expired, "reached its expiry", Actor::System).await {
                tracing::warn!(action = %id, error = %e, "an expired action could not be ended");
            }
        }
    }

    /// Forgets ended actions (with their hits, lines and figures) that ended before
    /// `cutoff_ms` (`store.hit_retention_days`).
    pub async fn purge_before(&self, cutoff_ms: u64) {
        match self.actions.purge_before(cutoff_ms).await {
            Ok(old) if !old.is_empty() => {
                tracing::info!(actions = old.len(), "forgot ended actions past their retention")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot forget ended actions past their retention"),
        }
    }

    /// Live actions an agent should run: sent as an `ActionSync` when it registers. Pool
    /// and tag targets reach agents that joined after the action was placed, within the
    /// action's organization and reach.
    pub async fn on_agent_registered(
        &self,
        agent_id: &periscope_protocol::AgentId,
    ) -> Vec<periscope_protocol::ActionSpec> {
        let Some((pool, tags, name, org)) = self
            .registry
            .with(agent_id, |r| (r.info.pool.clone(), r.info.tags.clone(), r.info.display_name.clone(), r.org.clone()))
        else {
            return Vec::new();
        };
        let tenancy = self.tenancy();
        let live = match self.actions.live(&org).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %e, "cannot read the live actions for an agent");
                return Vec::new();
            }
        };
        let mut specs = Vec::new();
        // A paused pool's agent runs nothing until it resumes; its actions still list it.
        let paused = self.safety.paused(&org, &pool).is_some();
        for action in live {
            if !action.target.includes_parts(agent_id, &pool, &tags) || !action.reach.allows(&org, &pool, &tenancy) {
                continue;
            }
            let now = now_ms();
            let changed = self
                .change(&action.spec.id, |a| {
                    if !a.is_live() || a.org != org {
                        return None;
                    }
                    let entry = a
                        .agents
                        .entry(agent_id.clone())
                        .or_insert_with(|| AgentActionView::pending(agent_id.clone(), name.clone(), pool.clone(), now));
                    if entry.state == AgentState::Offline {
                        entry.state = AgentState::Pending;
                        entry.detail = None;
                        entry.updated_at_ms = now;
                    }
                    a.pools.insert(pool.clone());
                    Some(())
                })
                .await;
            match changed {
                Ok(Some((a, ()))) if !paused => specs.push(a.spec),
                Ok(Some(_)) => {}
                Ok(None) => {}
                Err(e) => tracing::warn!(action = %action.spec.id, error = %e, "cannot add an agent to an action"),
            }
        }
        specs
    }

    /// Marks the agent offline in the live actions of its organization it runs.
    pub async fn on_agent_disconnected(&self, from: &Sender) {
        let live = match self.actions.live(&from.org).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(agent = %from.id, error = %e, "cannot mark an agent offline in its actions");
                return;
            }
        };
        for action in live.into_iter().filter(|a| a.agents.contains_key(&from.id)) {
            let now = now_ms();
            let changed = self
                .change(&action.spec.id, |a| {
                    if !a.is_live() {
                        return None;
                    }
                    let entry = a.agents.get_mut(&from.id)?;
                    entry.state = AgentState::Offline;
                    entry.detail = Some("the agent disconnected; the action resumes when it reconnects".into());
                    entry.updated_at_ms = now;
                    Some(())
                })
                .await;
            if let Err(e) = changed {
                tracing::warn!(action = %action.spec.id, error = %e, "cannot mark an agent offline");
            }
        }
    }
}
