//! The operator safety tools, for company administrators (scope `mcp:admin`, role
//! `company_admin`: both checked by `begin` from `TOOL_SCOPES` and `TOOL_ROLES`):
//! `pause_actions` and `resume_actions` (the pause switch: every action of a pool or of
//! the organization stopped at once and kept, unlike `remove_all_actions`), and
//! `get_blocklist` and `set_blocklist` (where no action may run or no value be
//! captured). The same bodies as `/api/v1/pause`, `/resume` and `/blocklist`.

use periscope_protocol::{BlockEffect, BlockRule};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema};
use crate::error::ApiError;
use crate::safety_api::{PauseBody, blocklist_body, pause_or_resume};

/// Arguments of `pause_actions`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PauseArgs {
    /// The pool to pause; absent: every pool of your organization.
    pool: Option<String>,
    /// Why, shown in every paused action's status and in the audit trail.
    reason: Option<String>,
}

/// Arguments of `resume_actions`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ResumeArgs {
    /// The pool to resume; absent: lift every pause of your organization.
    pool: Option<String>,
}

/// What a rule forbids.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Effect {
    /// No action may be placed or run there.
    NoActions,
    /// Actions may count and time the place, but no value is captured there.
    NoCapture,
}

/// One blocklist rule: every selector given must match.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleArg {
    /// A unique name, quoted in refusals and statuses, e.g. `crypto`.
    name: String,
    /// `no_actions` or `no_capture`.
    effect: Effect,
    /// Only agents of this pool (alone: the whole pool).
    pool: Option<String>,
    /// A file as a path suffix (`src/crypto.rs`), or a directory ending in `/`.
    file: Option<String>,
    /// A module and everything in it (`shop::vault`, `shop.vault`).
    module: Option<String>,
    /// A function (Python qualified name or its last part) or a Rust span name.
    function: Option<String>,
    /// Why, for whoever is refused.
    reason: Option<String>,
}

/// Arguments of `set_blocklist`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetBlocklistArgs {
    /// The whole list (it replaces your organization's rules; `[]` clears them).
    #[schemars(length(max = 256))]
    rules: Vec<RuleArg>,
}

/// Arguments of `get_blocklist` (none).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[tool_router(router = safety_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Pause switch (company admins): stop every action of a pool, or of your whole organization, at \
                       once without removing them; agents stop running them, their status shows `paused` by an \
                       operator, and new placements there are refused until resume_actions. Audited. Example: \
                       {\"pool\": \"shop\", \"reason\": \"incident 4711: leave checkout alone\"}.",
        input_schema = input_schema::<PauseArgs>(),
        output_schema = super::schemas::pause_outcome(),
        annotations(read_only_hint = false, destructive_hint = false, idempotent_hint = true, open_world_hint = false)
    )]
    async fn pause_actions(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.pause_resume(&ctx, "pause_actions", args).await).await
    }

    #[tool(
        description = "Resume what pause_actions stopped (company admins): {\"pool\": \"shop\"} lifts that pool's \
                       pause; {} lifts every pause of your organization. The actions run again where they live. \
                       Audited.",
        input_schema = input_schema::<ResumeArgs>(),
        output_schema = super::schemas::pause_outcome(),
        annotations(read_only_hint = false, destructive_hint = false, idempotent_hint = true, open_world_hint = false)
    )]
    async fn resume_actions(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.pause_resume(&ctx, "resume_actions", args).await).await
    }

    #[tool(
        description = "Read the blocklist (company admins): where no action may be placed (`no_actions`) or no \
                       value captured (`no_capture`), your organization's rules and the configuration file's.",
        input_schema = input_schema::<NoArgs>(),
        output_schema = super::schemas::blocklist(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_blocklist(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.blocklist(&ctx, "get_blocklist", args).await).await
    }

    #[tool(
        description = "Replace your organization's blocklist (company admins). Placements a rule covers are \
                       refused naming it; agents drop running actions a new rule covers (or stop capturing values \
                       there). Audited. Example: {\"rules\": [{\"name\": \"crypto\", \"effect\": \"no_actions\", \
                       \"file\": \"src/crypto/\"}, {\"name\": \"login\", \"effect\": \"no_capture\", \"function\": \
                       \"check_password\"}]}.",
        input_schema = input_schema::<SetBlocklistArgs>(),
        output_schema = super::schemas::blocklist(),
        annotations(read_only_hint = false, destructive_hint = false, idempotent_hint = true, open_world_hint = false)
    )]
    async fn set_blocklist(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.blocklist(&ctx, "set_blocklist", args).await).await
    }
}

impl PeriscopeMcp {
    async fn pause_resume(
        &self,
        ctx: &RequestContext<RoleServer>,
        tool: &str,
        args: JsonObject,
    ) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, tool)?;
        let pause = tool == "pause_actions";
        let body = if pause {
            let a: PauseArgs = parse_args(tool, args)?;
            PauseBody { pool: a.pool, reason: a.reason }
        } else {
            let a: ResumeArgs = parse_args(tool, args)?;
            PauseBody { pool: a.pool, reason: None }
        };
        let out = pause_or_resume(&self.state, &principal, &body, pause).await?;
        let what = body.pool.as_deref().map_or_else(|| "your organization".to_owned(), |p| format!("pool `{p}`"));
        let text = match (pause, out.changed) {
            (true, true) => format!(
                "Paused {what}: {} live action(s) stopped on {} agent(s) here; they stay listed as paused by an \
                 operator until resume_actions.",
                out.actions, out.agents
            ),
            (true, false) => format!("{what} was already paused; nothing changed."),
            (false, true) => format!("Resumed {what}: the actions run again."),
            (false, false) => format!("Nothing to resume: {what} was not paused."),
        };
        let still: Vec<String> = out
            .pauses
            .iter()
            .map(|p| p.pool.as_deref().map_or_else(|| "the organization".to_owned(), |x| format!("pool `{x}`")))
            .collect();
        let text = if still.is_empty() { text } else { format!("{text}\nStill paused: {}.", still.join(", ")) };
        Ok(success(text, serde_json::to_value(&out).unwrap_or_default()))
    }

    async fn blocklist(
        &self,
        ctx: &RequestContext<RoleServer>,
        tool: &str,
        args: JsonObject,
    ) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, tool)?;
        if tool == "set_blocklist" {
            let a: SetBlocklistArgs = parse_args(tool, args)?;
            let rules = a.rules.into_iter().map(RuleArg::into_rule).collect();
            self.state.engine.set_blocklist(principal.org(), rules, principal.actor()).await?;
        } else {
            let _: NoArgs = parse_args(tool, args)?;
        }
        let body = blocklist_body(&self.state, principal.org());
        let mut text = format!("Blocklist version {}:", body["version"]);
        let settings = self.state.engine.safety.rules(principal.org());
        if settings.is_empty() {
            text.push_str(" no rules.");
        }
        for r in &settings {
            text.push_str("\n- ");
            text.push_str(&r.describe());
        }
        Ok(success(text, body))
    }
}

impl RuleArg {
    fn into_rule(self) -> BlockRule {
        BlockRule {
            name: self.name,
            effect: match self.effect {
                Effect::NoActions => BlockEffect::NoActions,
                Effect::NoCapture => BlockEffect::NoCapture,
            },
            pool: self.pool,
            file: self.file,
            module: self.module,
            function: self.function,
            reason: self.reason.unwrap_or_default(),
        }
    }
}
