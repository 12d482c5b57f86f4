//! `place_snapshot` as an MCP task (the Tasks extension, SEP-2663, as rmcp 3.11
//! implements it): a client that declares the extension gets, for a waiting
//! `place_snapshot`, a task at once instead of a call held open for up to ten minutes.
//! It polls `tasks/get` for the result (the same result the blocking call gives) or
//! cancels with `tasks/cancel`, which removes the snapshot.
//!
//! The snapshot is placed before the task exists, so every refusal (bad arguments, no
//! such location, quota) is an ordinary tool result, and the task holds one of the
//! caller's wait slots for its whole wait, like a blocking call. Tasks belong to the
//! session (and so to the key or grant that opened it, see `sessions.rs`); the caller's
//! access is checked again when the wait ends, as for a blocking call. Clients that do
//! not declare the extension get the blocking call, unchanged.

use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResponse, CreateTaskResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::task_manager::{TaskExit, TaskOptions};
use rmcp::{ErrorData as McpError, RoleServer};

use super::PeriscopeMcp;
use super::reply;
use crate::engine::ActionRecord;
use crate::error::ApiError;

/// How long a finished task's result stays readable beyond the wait.
const RESULT_TTL: Duration = Duration::from_secs(600);

/// Whether this call runs as a task: `place_snapshot` that waits (the default), from
/// a client that declared the tasks extension.
pub(super) fn runs_as_task(request: &CallToolRequestParams, ctx: &RequestContext<RoleServer>) -> bool {
    request.name == "place_snapshot"
        && ctx.client_capabilities().is_some_and(|c| c.supports_tasks())
        && request.arguments.as_ref().and_then(|a| a.get("wait")).and_then(serde_json::Value::as_bool) != Some(false)
}

fn number(args: &JsonObject, name: &str, default: u64) -> u64 {
    args.get(name).and_then(serde_json::Value::as_u64).unwrap_or(default)
}

impl PeriscopeMcp {
    /// Places the snapshot now and waits for its hits in a task.
    pub(super) async fn snapshot_task(
        &self,
        ctx: RequestContext<RoleServer>,
        request: CallToolRequestParams,
    ) -> Result<CallToolResponse, McpError> {
        let mut args = request.arguments.unwrap_or_default();
        let defaults = periscope_protocol::limits::action_bounds::DEFAULT_WAIT_SECS;
        let timeout = number(&args, "timeout_seconds", defaults);
        let max_hits =
            number(&args, "max_hits", u64::from(periscope_protocol::limits::action_bounds::DEFAULT_MAX_HITS));
        args.insert("wait".into(), serde_json::Value::Bool(false));
        let placed = self.snapshot(&ctx, args).await;
        // The placement is committed before the caller hears of it, as for every tool.
        self.state.engine.committed().await;
        let placed = match placed {
            Ok(r) => r,
            Err(e) => return Ok(CallToolResponse::Complete(reply::failure(&e))),
        };
        let id = placed
            .structured_content
            .as_ref()
            .and_then(|s| s["action"]["action_id"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| McpError::internal_error("the placed snapshot has no id", None))?;
        let principal = match self.begin(&ctx, "place_snapshot") {
            Ok(p) => p,
            Err(e) => return Ok(CallToolResponse::Complete(reply::failure(&e))),
        };
        let wait_for = Duration::from_secs(timeout);
        let slot = match self.state.callers.begin_wait(&principal, tokio::time::Instant::now() + wait_for).await {
            Ok(slot) => slot,
            Err(e) => {
                // No slot: the call cannot wait, so nothing should stay placed for it.
                let _ = self.state.engine.remove(&id, &principal).await;
                return Ok(CallToolResponse::Complete(reply::failure(&e)));
            }
        };
        let this = self.clone();
        let options = TaskOptions::new()
            .with_ttl_ms(u64::try_from((wait_for + RESULT_TTL).as_millis()).unwrap_or(u64::MAX))
            .with_poll_interval_ms(1_000)
            .with_status_message(format!("waiting up to {timeout} s for {max_hits} hit(s) of {id}"));
        let task = self.session.tasks.spawn(options, move |task_ctx| {
            Box::pin(async move {
                let _slot = slot;
                let engine = &this.state.engine;
                let deadline = tokio::time::Instant::now() + wait_for;
                let done = move |a: &ActionRecord| a.hits >= max_hits || a.all_agents_failed();
                tokio::select! {
                    waited = engine.wait_until(&id, deadline, &principal, done) => {
                        if let Err(e) = waited {
                            return Ok(reply::failure(&e));
                        }
                    }
                    () = task_ctx.cancelled() => {
                        let _ = engine.remove(&id, &principal).await;
                        return Err(TaskExit::Cancelled);
                    }
                }
                let outcome: Result<_, ApiError> = async {
                    this.state.recheck(&principal).await?;
                    this.after_wait(&id, u32::try_from(max_hits).unwrap_or(u32::MAX), timeout, &principal).await
                }
                .await;
                // What the wait read is committed before the result is handed over, as
                // for every tool.
                this.state.engine.committed().await;
                Ok(reply::respond(outcome))
            })
        });
        Ok(CallToolResponse::Task(CreateTaskResult::new(task)))
    }
}
