//! `system_health`: is Periscope reachable, does the key work, what may the caller
//! still do. The first call a model makes when something fails unexpectedly.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema};
use crate::error::ApiError;

/// `system_health` takes no arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct HealthArgs {}

#[tool_router(router = system_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Check that Periscope is reachable and your API key works. Returns the broker version, agents \
                       online, live actions, your identity (key, role, organization, scopes) and your remaining \
                       quotas (calls per minute, blocking calls, live actions), actions paused by a quota and why \
                       (quota_cpu, quota_log, rate_limited, expired), plus the limits tools enforce. Call it first, and whenever a call \
                       fails unexpectedly. Example: {}.",
        input_schema = input_schema::<HealthArgs>(),
        output_schema = super::schemas::system_health(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn system_health(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.health(&ctx, args).await).await
    }
}

impl PeriscopeMcp {
    async fn health(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "system_health")?;
        let HealthArgs {} = parse_args("system_health", args)?;
        let body = crate::api::health_body(&self.state, &principal, self.charge(ctx)).await?;
        let q = &body["quotas"];
        let paused = body["paused_actions"].as_array().map_or(0, Vec::len);
        let text = format!(
            "Periscope {} is {}. You are `{}` ({} of organization `{}`; scopes: {}). {} agent(s) online, {} live \
             action(s) within your reach; you hold {} of your {} live actions. Calls left right now: {} (of {} \
             per minute); blocking calls in progress: {} of {}.{}",
            env!("CARGO_PKG_VERSION"),
            match body["cluster"]["redis"].as_str() {
                Some("unreachable") =>
                    "degraded: this node cannot reach the cluster's Redis, so placements are refused",
                _ => "up",
            },
            principal.name,
            principal.role.as_str(),
            principal.org(),
            principal.scope_names().join(", "),
            body["agents_online"],
            body["actions_live"],
            q["live_actions"]["used"],
            q["live_actions"]["limit"],
            q["calls_per_minute"]["remaining"],
            q["calls_per_minute"]["limit_per_minute"],
            q["concurrent_waits"]["in_use"],
            q["concurrent_waits"]["limit"],
            if paused > 0 { format!(" {paused} pause(s) in force: see paused_actions.") } else { String::new() },
        );
        Ok(success(text, body))
    }
}
