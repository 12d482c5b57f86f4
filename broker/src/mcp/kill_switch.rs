//! `remove_all_actions`: the kill switch. Without arguments it ends every live action
//! the caller placed (a model that lost track, a person who wants everything off now);
//! with `pool`, the caller's own actions in that pool, or, for a group or company
//! administrator (with `mcp:admin`), every live action in that pool within their reach.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema, render};
use crate::auth::{Role, Scope};
use crate::engine::{ActionFilter, ActionStatus};
use crate::error::ApiError;
use crate::time::now_ms;

/// Most actions one call removes (a caller holds at most its live-action quota; an
/// organization's pool more): call again while `has_more`.
const MAX_PER_CALL: usize = 1_000;

/// Arguments of `remove_all_actions`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RemoveAllArgs {
    /// Only actions aimed at this pool; administrators then remove everyone's actions in
    /// it, others their own. Absent: every live action you placed, in any pool.
    pool: Option<String>,
}

#[tool_router(router = kill_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Kill switch: stop every live action you placed, at once, on every agent (their hits stay \
                       readable with get_action). With {\"pool\": \"shop\"}: only your actions aimed at that pool; \
                       a group or company administrator removes every live action in that pool. Returns the \
                       removed actions and their count. Use it when actions you no longer track may still be \
                       running, or when a service must be left alone now.",
        input_schema = input_schema::<RemoveAllArgs>(),
        output_schema = super::schemas::remove_all_actions(),
        annotations(read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn remove_all_actions(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.remove_all(&ctx, args).await).await
    }
}

impl PeriscopeMcp {
    async fn remove_all(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "remove_all_actions")?;
        let a: RemoveAllArgs = parse_args("remove_all_actions", args)?;
        let pool = a.pool.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
        if let Some(p) = &pool
            && !principal.sees_pool(principal.org(), p)
        {
            return Err(ApiError::not_found(format!("no pool `{p}` within your reach; list_agents shows your pools")));
        }
        let everyone = pool.is_some() && principal.role >= Role::GroupAdmin && principal.has(Scope::Admin);
        let engine = &self.state.engine;
        let live = engine
            .list(
                &ActionFilter { status: Some(ActionStatus::Active), target: pool.clone(), created_by: None },
                &principal,
            )
            .await?;
        let mine: Vec<_> = live.into_iter().filter(|v| everyone || v.created_by_key == principal.key_id).collect();
        let has_more = mine.len() > MAX_PER_CALL;
        let mut removed = Vec::new();
        for v in mine.into_iter().take(MAX_PER_CALL) {
            // One that ended meanwhile is returned as it ended; one that vanished is skipped.
            if let Ok(view) = engine.remove(v.action_id.as_ref(), &principal).await {
                removed.push(view);
            }
        }
        let now = now_ms();
        let whose = if everyone { "every live action" } else { "your live actions" };
        let mut text = match (&pool, removed.len()) {
            (_, 0) => "Nothing to remove: no live action matched.".to_owned(),
            (Some(p), n) => format!("Removed {n} action(s): {whose} in pool `{p}`.\n"),
            (None, n) => format!("Removed {n} action(s): {whose}.\n"),
        };
        for v in &removed {
            text.push_str(&render::action_summary(v, now));
            text.push('\n');
        }
        if has_more {
            text.push_str("More remain: call remove_all_actions again.");
        }
        let mut body = serde_json::json!({
            "removed": removed,
            "count": removed.len(),
            "scope": if everyone { "pool" } else { "mine" },
            "has_more": has_more,
        });
        if let Some(p) = pool {
            body["pool"] = serde_json::json!(p);
        }
        Ok(success(text.trim_end().to_owned(), body))
    }
}
