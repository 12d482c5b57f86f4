//! Waiting for an action: for a hit or a line after a cursor, for a condition on the
//! action, or for its end, until a deadline or the broker's shutdown. A waiter
//! subscribes to the action's events before it reads the action, so no change between
//! the read and the wait is missed; every wake re-reads the action from the store (on
//! any node, the same answer).

use std::time::Duration;

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
        self.wait_until(action_id, deadline, caller, |a| a.hits > since).await?;
        self.hits(action_id, since, limit, caller).await
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
        self.wait_until(action_id, deadline, caller, |a| a.lines > since).await?;
        self.lines(action_id, since, limit, caller).await
    }

    /// Waits until `done(action)` holds, the action ends, or `deadline` passes.
    pub async fn wait_until(
        &self,
        action_id: &str,
        deadline: tokio::time::Instant,
        caller: &Principal,
        done: impl Fn(&ActionRecord) -> bool,
    ) -> Result<(), ApiError> {
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
        mut progress: impl FnMut(u64, u32),
    ) -> Result<(), ApiError> {
        let id = parse_action_id(action_id)?;
        let mut last_hits = u64::MAX;
        let mut shutdown = self.shutdown.clone();
        let mut rx = self.events.subscribe(&id);
        loop {
            rx.borrow_and_update();
            let action = self.visible(&id, caller).await?;
            if action.hits != last_hits {
                progress(action.hits, action.max_hits());
                last_hits = action.hits;
            }
            if done(&action) || !action.is_live() {
                return Ok(());
            }
            let recheck = (tokio::time::Instant::now() + RECHECK).min(deadline);
            tokio::select! {
                changed = tokio::time::timeout_at(recheck, rx.changed()) => match changed {
                    Ok(Ok(())) => {}
                    // The events lost this action's channel: take a new one.
                    Ok(Err(_)) => rx = self.events.subscribe(&id),
                    Err(_) if tokio::time::Instant::now() >= deadline => return Ok(()),
                    Err(_) => {}
                },
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}
