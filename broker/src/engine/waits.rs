//! Waiting for an action: for a hit or a line after a cursor, for a condition on the
//! action, or for its end, until a deadline or the broker's shutdown. A waiter
//! subscribes to the action's events before it reads the action, so no change between
//! the read and the wait is missed; every wake re-reads the action from the store (on
//! any node, the same answer).

use std::time::Duration;

use periscope_protocol::ActionId;

use super::model::{ActionRecord, HitsPage};
use super::{Engine, parse_action_id};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::telemetry::LinesPage;

/// The longest a waiter goes without reading the action again, even without an event
/// (an event lost with a connection to another node delays an answer by this much).
const RECHECK: Duration = Duration::from_secs(2);

impl Engine {
    /// Waits until the action has a hit after `since`, has ended, or `timeout` passes;
    /// then returns the page.
    pub async fn wait_hits(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
        caller: &Principal,
    ) -> Result<HitsPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let id = parse_action_id(action_id)?;
        // Each wake reads the action and its hits after `since` together.
        let read = |id: &ActionId| {
            let id = id.clone();
            async move { Ok(self.actions.load_with_hits(&id, since, limit).await?) }
        };
        let (_, page) = self.wait_reading(&id, deadline, caller, |a| a.hits > since, |_, _| {}, read).await?;
        Ok(page)
    }

    /// Waits until the action has a line after `since`, has ended, or `timeout` passes.
    pub async fn wait_lines(
        &self,
        action_id: &str,
        since: u64,
        limit: usize,
        timeout: Duration,
        caller: &Principal,
    ) -> Result<LinesPage, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let action = self.wait_until(action_id, deadline, caller, |a| a.lines > since).await?;
        Ok(self.actions.lines(&action.spec.id, since, limit).await?)
    }

    /// Waits until `done(action)` holds, the action ends, or `deadline` passes; returns
    /// the action as last read (visible to the caller).
    pub async fn wait_until(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&ActionRecord) -> bool,
    ) -> Result<ActionRecord, ApiError> {
        self.wait_with_progress(action_id, deadline, caller, done, |_, _| {}).await
    }

    /// [`Engine::wait_until`] with a progress callback, called with `(hits, max_hits)`
    /// whenever the action changes.
    pub async fn wait_with_progress(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&ActionRecord) -> bool,
        progress: impl FnMut(u64, u32),
    ) -> Result<ActionRecord, ApiError> {
        let id = parse_action_id(action_id)?;
        let read = |id: &ActionId| {
            let id = id.clone();
            async move { Ok(self.actions.load(&id).await?.map(|(record, _)| (record, ()))) }
        };
        Ok(self.wait_reading(&id, deadline, caller, done, progress, read).await?.0)
    }

    /// The wait itself: `read` reads the action (with whatever else the waiter wants
    /// read with it, in the same round trip) at the start and on every wake; returns
    /// the last read.
    async fn wait_reading<T, F>(
        &self,
        id: &ActionId,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&ActionRecord) -> bool,
        mut progress: impl FnMut(u64, u32),
        read: impl Fn(&ActionId) -> F,
    ) -> Result<(ActionRecord, T), ApiError>
    where
        F: std::future::Future<Output = Result<Option<(ActionRecord, T)>, ApiError>>,
    {
        let mut last_hits = u64::MAX;
        let mut shutdown = self.shutdown.clone();
        let mut rx = self.events.subscribe(id);
        loop {
            rx.borrow_and_update();
            let (action, extra) = read(id)
                .await?
                .filter(|(a, _)| a.visible_to(caller))
                .ok_or_else(|| super::views::no_such_action(id))?;
            if action.hits != last_hits {
                progress(action.hits, action.max_hits());
                last_hits = action.hits;
            }
            if done(&action) || !action.is_live() {
                return Ok((action, extra));
            }
            let recheck = (tokio::time::Instant::now() + RECHECK).min(deadline);
            tokio::select! {
                changed = tokio::time::timeout_at(recheck, rx.changed()) => match changed {
                    Ok(Ok(())) => {}
                    // The events lost this action's channel: take a new one.
                    Ok(Err(_)) => rx = self.events.subscribe(id),
                    Err(_) if tokio::time::Instant::now() >= deadline => return Ok((action, extra)),
                    Err(_) => {}
                },
                _ = shutdown.wait_for(|s| *s) => return Ok((action, extra)),
            }
        }
    }
}
