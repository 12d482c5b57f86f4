//! `system_health`: is Periscope reachable, does the key work, what may the caller
//! still do. The first call a model makes when something fails unexpectedly.

use periscope_protocol::limits::action_bounds;
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, finish, input_schema};
use crate::auth::Scope;
use crate::engine::{ActionFilter, ActionStatus, MAX_LIVE_ACTIONS_PER_CALLER};
use crate::error::ApiError;

/// `system_health` takes no arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct HealthArgs {}

#[tool_router(router = system_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Check that Periscope is reachable and your API key works. Returns the broker version, agents \
                       online, live actions, your identity and scopes, and your remaining quotas (each caller may \
                       hold 20 live actions), plus the limits tools enforce. Call it first, and whenever a call \
                       fails unexpectedly. Example: {}.",
        input_schema = input_schema::<HealthArgs>(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn system_health(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        finish(self.health(&ctx, args))
    }
}

impl PeriscopeMcp {
    fn health(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, Scope::SystemRead, "system_health")?;
        let HealthArgs {} = parse_args("system_health", args)?;
        let state = &self.state;
        let mine = state
            .engine
            .list(&ActionFilter {
                status: Some(ActionStatus::Active),
                target: None,
                created_by: Some(principal.name.clone()),
            })
            .len();
        let remaining = MAX_LIVE_ACTIONS_PER_CALLER.saturating_sub(mine);
        let agents_online = state.registry.online_count();
        let actions_live = state.engine.live_count();
        let body = serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "authenticated": true,
            "caller": { "name": principal.name, "scopes": principal.scope_names() },
            "agents_online": agents_online,
            "actions_live": actions_live,
            "quotas": {
                "live_actions": { "used": mine, "limit": MAX_LIVE_ACTIONS_PER_CALLER, "remaining": remaining },
                "calls_per_minute": { "enforced": false, "note": "per-caller call rate limits arrive in a later version" },
            },
            "limits": {
                "max_hits": { "min": 1, "max": action_bounds::MAX_MAX_HITS, "default": action_bounds::DEFAULT_MAX_HITS },
                "timeout_seconds": { "min": 1, "max": action_bounds::MAX_WAIT_SECS, "default": action_bounds::DEFAULT_WAIT_SECS },
                "capture": state.engine.limits(),
            },
        });
        let text = format!(
            "Periscope {} is up. You are `{}` (scopes: {}). {agents_online} agent(s) online, {actions_live} live \
             action(s) in all; you hold {mine} of your {MAX_LIVE_ACTIONS_PER_CALLER} live actions ({remaining} left).",
            env!("CARGO_PKG_VERSION"),
            principal.name,
            principal.scope_names().join(", "),
        );
        Ok(success(text, body))
    }
}
