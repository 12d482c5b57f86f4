//! `query_audit`: the audit trail, for company admins, the same entries as
//! `GET /api/v1/audit` (who placed, removed or paused what, key and rules changes,
//! agent-key misuse), oldest first with a cursor.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema};
use crate::admin::{AuditParams, audit_page};
use crate::error::ApiError;

/// Arguments of `query_audit`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct QueryAuditArgs {
    /// Entries at or after this time (Unix ms).
    since: Option<u64>,
    /// Entries before this time (Unix ms).
    until: Option<u64>,
    /// Only this actor: a key id (`key_…`), a key name, `agent:<id>`, `system` or `cli`.
    actor: Option<String>,
    /// Only this kind, e.g. `action_placed`, `action_paused`, `key_revoked`, `agent_refused`.
    kind: Option<String>,
    /// Only entries about this action (`act_…`).
    action_id: Option<String>,
    /// `next_cursor` from the previous page.
    cursor: Option<String>,
    /// Entries per page.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 500))]
    limit: usize,
}

fn default_limit() -> usize {
    crate::audit::DEFAULT_PAGE
}

#[tool_router(router = admin_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Read your organization's audit trail (company admins; scope mcp:admin): who placed, removed or \
                       completed which action (location, expressions, hit counts, which redaction rules fired, never \
                       values), quota pauses, key and redaction-rule changes, agent-key misuse. Filter by `since`/`until` \
                       (Unix ms), `actor`, `kind`, `action_id`; oldest first, pass `next_cursor` as `cursor` while \
                       `has_more`. Example: {\"kind\": \"action_placed\", \"limit\": 20}.",
        input_schema = input_schema::<QueryAuditArgs>(),
        output_schema = super::schemas::query_audit(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn query_audit(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.audit(&ctx, args).await).await
    }
}

impl PeriscopeMcp {
    async fn audit(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "query_audit")?;
        let a: QueryAuditArgs = parse_args("query_audit", args)?;
        let params = AuditParams {
            since: a.since,
            until: a.until,
            actor: a.actor,
            kind: a.kind,
            action_id: a.action_id,
            cursor: a.cursor,
            limit: Some(a.limit),
        };
        let page = audit_page(&self.state, params.query(principal.org())?).await?;
        let mut text = if page.items.is_empty() {
            "No audit entries match.".to_owned()
        } else {
            format!("{} audit entr{}:\n", page.items.len(), if page.items.len() == 1 { "y" } else { "ies" })
        };
        for e in &page.items {
            text.push_str(&format!("#{} {} {} by {}: {}\n", e.seq, e.at_ms, e.kind.as_str(), e.actor.name(), e.detail));
        }
        if let Some(c) = &page.next_cursor {
            text.push_str(&format!("More: pass cursor=\"{c}\"."));
        }
        Ok(success(text, serde_json::to_value(&page).unwrap_or_default()))
    }
}
