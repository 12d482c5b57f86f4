//! `capture_errors` and `list_errors`: capture on error. The first places an
//! error-capture action on a pool, tags or agents (no location: every ERROR event and
//! panic in Rust, every exception escaping the application's own code in Python); the
//! second answers "what is failing?" across the agents the caller sees.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema, render};
use crate::engine::{ErrorCaptureRequest, ErrorQuery, ErrorView};
use crate::error::ApiError;
use crate::time::now_ms;

/// Arguments of `capture_errors`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CaptureErrorsArgs {
    /// Target these agents (ids from list_agents). Give either this or `pool`/`tags`.
    #[serde(default)]
    agent_ids: Vec<String>,
    /// Target every agent in this pool.
    pool: Option<String>,
    /// Only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// Snapshots each agent may take over the action's life (later errors are still counted).
    #[schemars(range(min = 1, max = 200))]
    max_captures_per_agent: Option<u32>,
    /// At most one snapshot per location and error type in this many milliseconds.
    #[schemars(range(min = 1000, max = 3600000))]
    min_interval_ms: Option<u64>,
    /// A native backtrace with each Rust ERROR event too (panics always carry one).
    #[serde(default)]
    backtrace: bool,
    /// Seconds the capture stays live.
    #[schemars(range(min = 1, max = 86400))]
    expire_seconds: Option<u64>,
}

/// Arguments of `list_errors`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListErrorsArgs {
    /// Only agents of this pool.
    pool: Option<String>,
    /// Only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// Only agents of this service.
    service: Option<String>,
    /// Only errors seen at or after this time (Unix ms).
    since_ms: Option<u64>,
    /// Most errors returned.
    #[schemars(range(min = 1, max = 100))]
    limit: Option<usize>,
    /// Include each error's latest snapshot (default true).
    snapshots: Option<bool>,
}

#[tool_router(router = errors_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Capture errors where they happen, without naming a location: while it lives, agents snapshot \
                       every Rust ERROR event and panic (fields, span stack, backtrace) and every Python exception \
                       escaping the application's own code (locals of each app frame), at most one per location and \
                       error type per second (`min_interval_ms`) and `max_captures_per_agent` (default 20) per \
                       agent; every occurrence is counted. Charged as one live action; `expire_seconds` default \
                       3600. Then list_errors shows what fails. Example: {\"pool\": \"shop\", \"tags\": \
                       [\"region:eu\"]}.",
        input_schema = input_schema::<CaptureErrorsArgs>(),
        output_schema = super::schemas::action_only(),
        annotations(read_only_hint = false, destructive_hint = false, open_world_hint = false)
    )]
    async fn capture_errors(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.place_errors(&ctx, args).await).await
    }

    #[tool(
        description = "What is failing: the recent distinct errors (location, kind, type) across the agents you \
                       see, newest first, each with its latest message, how often it happened (`count`, \
                       `captured`, `uncaptured`), first and last seen, the agents and pools, and its latest \
                       snapshot (fields or locals, span stack or frames, backtrace). Errors are collected while a \
                       capture_errors action is live. Filter by `pool`, `tags`, `service`, `since_ms`; `limit` \
                       1-100 (default 20). Example: {\"pool\": \"shop\", \"tags\": [\"region:eu\"]}.",
        input_schema = input_schema::<ListErrorsArgs>(),
        output_schema = super::schemas::list_errors(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_errors(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.errors(&ctx, args).await).await
    }
}

impl PeriscopeMcp {
    async fn place_errors(
        &self,
        ctx: &RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "capture_errors")?;
        let a: CaptureErrorsArgs = parse_args("capture_errors", args)?;
        let req = ErrorCaptureRequest {
            agent_ids: a.agent_ids,
            pool: a.pool,
            tags: a.tags,
            max_captures_per_agent: a.max_captures_per_agent,
            min_interval_ms: a.min_interval_ms,
            backtrace: a.backtrace,
            expire_seconds: a.expire_seconds,
        };
        let view = self.state.engine.place_capture_errors(req, &principal).await?;
        let text = format!(
            "Capturing errors on {} agent(s) as action {} until {}. See what fails with list_errors {{}}; remove it \
             with remove_action {{\"action_id\": \"{}\"}}.\n{}",
            view.agents.len(),
            view.action_id,
            render::timestamp(view.expires_at_ms),
            view.action_id,
            render::action_summary(&view, now_ms())
        );
        Ok(success(text, serde_json::json!({ "action": view })))
    }

    async fn errors(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "list_errors")?;
        let a: ListErrorsArgs = parse_args("list_errors", args)?;
        let q = ErrorQuery {
            pool: a.pool,
            tags: a.tags,
            service: a.service,
            since_ms: a.since_ms,
            limit: a.limit,
            snapshots: a.snapshots,
        };
        let errors = self.state.engine.list_errors(&q, &principal).await?;
        let text = error_lines(&errors, now_ms());
        Ok(success(text, serde_json::json!({ "errors": errors, "count": errors.len() })))
    }
}

/// One paragraph per error: what, where, how often, when, where to read its snapshot.
fn error_lines(errors: &[ErrorView], now: u64) -> String {
    if errors.is_empty() {
        return "No errors recorded. Errors are collected while a capture_errors action is live on the agents."
            .to_owned();
    }
    let mut out = format!("{} distinct error(s), newest first:\n", errors.len());
    for (i, e) in errors.iter().enumerate() {
        let ago = now.saturating_sub(e.last_seen_ms) / 1_000;
        out.push_str(&format!(
            "{}. {} `{}` at {}:{}: {}\n   {} occurrence(s), {} captured, {} not captured; first {}, last {} s ago; \
             agents: {}{} (pools: {})\n",
            i + 1,
            e.kind.as_str(),
            e.error_type,
            e.file,
            e.line,
            e.message,
            e.count,
            e.captured,
            e.uncaptured,
            render::timestamp(e.first_seen_ms),
            ago,
            e.agents.join(", "),
            if e.agent_count > e.agents.len() {
                format!(" and {} more", e.agent_count - e.agents.len())
            } else {
                String::new()
            },
            e.pools.join(", "),
        ));
        if let Some(s) = &e.snapshot {
            out.push_str("   snapshot: ");
            out.push_str(&render::hit_line(s, 1_500));
            out.push('\n');
        } else if let Some(h) = &e.hit {
            out.push_str(&format!(
                "   snapshot: get_action {{\"action_id\": \"{}\", \"since\": {}}}\n",
                h.action_id,
                h.index.saturating_sub(1)
            ));
        }
    }
    out
}
