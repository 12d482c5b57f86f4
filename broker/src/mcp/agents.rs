//! `list_agents` and `list_sources`: what is connected, and where it can be inspected.
//! Both are [`crate::query`] with the REST API's filters and stateless cursors.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema, render};
use crate::error::ApiError;
use crate::query::{self, AgentFilter, Page, SourceFilter};

/// Whether an agent has a live connection.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum AgentStatus {
    /// Connected now.
    Online,
    /// Went away recently (listed for an hour by default, with the reason).
    Offline,
}

impl AgentStatus {
    fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Offline => "offline",
        }
    }
}

/// Arguments of `list_agents`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListAgentsArgs {
    /// Only agents in this pool (exact name), e.g. `shop`.
    pool: Option<String>,
    /// Only agents carrying every one of these tags, e.g. `["env:prod", "region:eu"]`.
    #[serde(default)]
    tags: Vec<String>,
    /// Only agents of this service (exact name).
    service: Option<String>,
    /// Only agents of this language, e.g. `rust`.
    language: Option<String>,
    /// `online` or `offline`; both when absent.
    status: Option<AgentStatus>,
    /// Free text matched against name, service, host, pool, tags and id.
    query: Option<String>,
    /// `next_cursor` from the previous page; absent for the first page.
    cursor: Option<String>,
    /// Agents per page.
    #[serde(default = "default_page")]
    #[schemars(range(min = 1, max = 200))]
    limit: usize,
}

/// Arguments of `list_sources`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListSourcesArgs {
    /// Only this agent's locations (an `agt_…` id from list_agents).
    agent_id: Option<String>,
    /// Only locations of agents in this pool.
    pool: Option<String>,
    /// Only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// Source file path substring, e.g. `orders.rs` or `src/checkout/`.
    file: Option<String>,
    /// Function, span or event name substring, e.g. `checkout`.
    name: Option<String>,
    /// Free text matched against file, name, module and field names, e.g. `user_id`.
    query: Option<String>,
    /// Also list locations of agents that are offline.
    #[serde(default)]
    include_offline: bool,
    /// `next_cursor` from the previous page; absent for the first page.
    cursor: Option<String>,
    /// Locations per page.
    #[serde(default = "default_page")]
    #[schemars(range(min = 1, max = 200))]
    limit: usize,
}

fn default_page() -> usize {
    query::DEFAULT_PAGE
}

/// A page's text: a header with counts and paging, then one line per item.
fn page_text<T>(what: &str, page: &Page<T>, line: impl Fn(&T) -> String, empty_hint: &str) -> String {
    if page.items.is_empty() {
        return format!("No {what} match. {empty_hint}");
    }
    let mut out = format!("{} of {} {what}", page.items.len(), page.total);
    match &page.next_cursor {
        Some(c) => out.push_str(&format!(" (more: pass cursor=\"{c}\")")),
        None => out.push_str(" (last page)"),
    }
    out.push_str(":\n");
    for item in &page.items {
        out.push_str(&line(item));
        out.push('\n');
    }
    out
}

#[tool_router(router = agents_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "List the agents (instrumented service processes) connected to Periscope, to see what you can \
                       inspect. Filter by `pool`, `tags` (all must match), `service`, `language`, `status` \
                       (online/offline) or free-text `query`. Returns each agent's id (agt_…), name, pool, tags, \
                       service, status and how many inspectable locations it reported; 50 per page (`limit` up to \
                       200), pass `next_cursor` as `cursor` while `has_more`. Example: {\"pool\": \"shop\", \"tags\": \
                       [\"env:prod\"]}.",
        input_schema = input_schema::<ListAgentsArgs>(),
        output_schema = super::schemas::list_agents(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_agents(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.agents(&ctx, args)).await
    }

    #[tool(
        description = "Find code locations you can snapshot: the inspectable locations (file, line, function/span or \
                       event name, the field names available there) of online agents. Every listed location has run \
                       at least once since its agent started (code registers when it first runs); `hits` counts the \
                       runs seen while an action observed it (to measure how often a location runs, place_metric \
                       kind counter on it). Filter by `agent_id` or `pool`/`tags`, `file` (path substring), `name` \
                       (function/span/event name substring) and free-text `query` (also matches field names). Use it \
                       before place_snapshot. Paginated like list_agents. Example: {\"pool\": \"shop\", \"query\": \
                       \"checkout\"}.",
        input_schema = input_schema::<ListSourcesArgs>(),
        output_schema = super::schemas::list_sources(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_sources(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.sources(&ctx, args)).await
    }
}

impl PeriscopeMcp {
    fn agents(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "list_agents")?;
        let a: ListAgentsArgs = parse_args("list_agents", args)?;
        let filter = AgentFilter {
            pool: a.pool,
            tags: a.tags,
            service: a.service,
            language: a.language,
            status: a.status.map(|s| s.as_str().to_owned()),
            text: a.query,
        };
        let page = query::list_agents(&self.state.registry, &filter, a.cursor.as_deref(), Some(a.limit), &principal)?;
        let mut text = page_text("agents", &page, render::agent_line, "Loosen the filters, or check system_health.");
        for pool in page.versions.iter().flatten().filter(|p| p.mixed) {
            let versions: Vec<String> = pool
                .versions
                .iter()
                .map(|v| {
                    let name = match (v.service_version.as_str(), v.build.as_str()) {
                        ("", "") => "unknown".to_owned(),
                        (v, "") => v.to_owned(),
                        ("", b) => format!("build {b}"),
                        (v, b) => format!("{v} ({b})"),
                    };
                    format!("{name} on {} agent(s)", v.agents)
                })
                .collect();
            text.push_str(&format!(
                "Pool `{}` runs several versions: {}. Pass expected_version to place_* to act on one only.\n",
                pool.pool,
                versions.join(", ")
            ));
        }
        Ok(success(text, serde_json::to_value(&page).unwrap_or_default()))
    }

    fn sources(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "list_sources")?;
        let a: ListSourcesArgs = parse_args("list_sources", args)?;
        let filter = SourceFilter {
            agent_id: a.agent_id,
            pool: a.pool,
            tags: a.tags,
            file: a.file,
            name: a.name,
            text: a.query,
            include_offline: a.include_offline,
        };
        let page = query::list_sources(&self.state.registry, &filter, a.cursor.as_deref(), Some(a.limit), &principal)?;
        let text = page_text(
            "inspectable locations",
            &page,
            render::source_line,
            "Locations appear once their code has run at least once; try a broader `query` or `file`, or \
             list_agents to check the target is online.",
        );
        Ok(success(text, serde_json::to_value(&page).unwrap_or_default()))
    }
}
