//! The MCP server: every Periscope capability as tools an AI assistant can drive by
//! itself, served over streamable HTTP at `/mcp` on the broker's listener (and over
//! stdio by `periscope mcp`, see [`proxy`]).
//!
//! The tools are thin: they parse arguments, check the caller's scope, call the same
//! engine and query functions as the REST API, and render the outcome twice, as a
//! short text for the model and as `structuredContent` with the full JSON (the views
//! REST returns). Nothing here re-implements placement, matching or paging.
//!
//! # Layout
//!
//! - this file: [`PeriscopeMcp`] (the handler), its tool and prompt routers, the
//!   per-call preamble (who is calling, may they), and [`service`] (the tower service
//!   mounted at `/mcp`, with host/origin checks, body limit and session timeout).
//! - `system.rs`: `system_health`.
//! - `agents.rs`: `list_agents`, `list_sources`.
//! - `actions.rs`: `place_snapshot`, `place_log`, `place_metric`, `get_action`,
//!   `list_actions`, `remove_action`.
//! - `kill_switch.rs`: `remove_all_actions`.
//! - `admin.rs`: `query_audit` (company admins).
//! - `schemas.rs`: every tool's `outputSchema`.
//! - `prompts.rs`: prompts that start an investigation.
//! - [`session`]: per-session state: resources and subscriptions, logging, completion.
//! - `tasks.rs`: a waiting `place_snapshot` as an MCP task (SEP-2663).
//! - `reply.rs`: the one place that turns an [`ApiError`] into an error tool result.
//! - [`sessions`]: every session bound to the key that created it; other keys get 404.
//! - `render.rs`: the short texts.
//! - [`proxy`]: `periscope mcp`, an MCP server on stdio forwarding to a remote `/mcp`.
//!
//! # Invariants
//!
//! - Every tool is usable without a session: state that spans calls travels as an
//!   `action_id` and a `since` cursor, so any broker node can answer any call. A
//!   cluster node serves `/mcp` statelessly (no `Mcp-Session-Id`, nothing to stick a
//!   client to); a single node keeps sessions, each bound to the key that made it.
//! - Authorization is evaluated on every tool call ([`crate::auth::authorize`]), never
//!   per connection; so are the caller's calls-per-minute budget (charged by the HTTP
//!   middleware, reported here as `quota_exceeded`) and, for blocking calls, its
//!   concurrent waits.
//! - Errors a model can act on are tool results with `isError: true` and a stable
//!   `code`; JSON-RPC errors are only for protocol faults.

mod actions;
mod admin;
mod agents;
mod errors;
mod kill_switch;
mod prompts;
pub mod proxy;
mod render;
mod reply;
mod safety;
mod schemas;
pub mod session;
pub mod sessions;
mod system;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::prompt::PromptRouter;
use rmcp::handler::server::tool::ToolRouter;
use rmcp::model::{CallToolResult, Implementation, JsonObject, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, prompt_handler, tool_handler};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::{CallCharge, Principal, Role, Scope, authorize, require_role};
use crate::error::{ApiError, ErrorCode};

/// What the server tells a client about itself when it connects; a model reads it
/// before any tool description.
const INSTRUCTIONS: &str = "Periscope inspects running services without code changes or redeploys. \
Typical flow: list_agents (what is connected) -> list_sources (find a file:line where the code you care about \
runs, with its field names and how often it is hit) -> place_snapshot (waits for the next hit and returns the \
captured values: fields, span stack, watches) -> get_action with `since` for more hits. Captured objects are cut \
at depth 3 and PII/secrets are redacted; markers say where. Every error carries a stable `code` and says what to \
do next. Each key has quotas (calls per minute, blocking calls at once, live actions; system_health shows what is \
left) and sees only the pools its key may reach; remove_action frees a live action.";

/// The MCP handler. One is made per session (cheaply: the routers are shared).
#[derive(Clone)]
pub struct PeriscopeMcp {
    state: AppState,
    tool_router: Arc<ToolRouter<PeriscopeMcp>>,
    prompt_router: Arc<PromptRouter<PeriscopeMcp>>,
    /// This session's log level, log follower and resource subscriptions.
    session: Arc<session::Session>,
}

impl std::fmt::Debug for PeriscopeMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeriscopeMcp").finish_non_exhaustive()
    }
}

impl PeriscopeMcp {
    /// A handler over the broker's state.
    pub fn new(state: AppState) -> Self {
        let tools = Self::system_router()
            + Self::agents_router()
            + Self::actions_router()
            + Self::kill_router()
            + Self::errors_router()
            + Self::admin_router()
            + Self::safety_router();
        PeriscopeMcp {
            state,
            tool_router: Arc::new(tools),
            prompt_router: Arc::new(Self::prompt_router()),
            session: Arc::default(),
        }
    }

    /// A handler for a new session: the routers shared, the session state its own.
    pub fn for_session(&self) -> Self {
        PeriscopeMcp { session: Arc::default(), ..self.clone() }
    }

    /// Every tool this server offers, as `tools/list` shows them.
    pub fn tools(&self) -> Vec<rmcp::model::Tool> {
        self.tool_router.list_all()
    }

    /// The per-call preamble: who is calling (from the HTTP request the bearer
    /// middleware authenticated) and whether they hold the scope `tool` needs
    /// ([`tool_scope`]).
    fn begin(&self, ctx: &RequestContext<RoleServer>, tool: &str) -> Result<Principal, ApiError> {
        let scope = tool_scope(tool).unwrap_or(Scope::Admin);
        let parts = ctx.extensions.get::<axum::http::request::Parts>();
        let principal = parts.and_then(|parts| parts.extensions.get::<Principal>()).cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "this MCP connection carries no authenticated caller; connect over HTTP with \
                     `Authorization: Bearer <API key>` (or through `periscope mcp --api-key`)",
            )
        })?;
        authorize(&principal, scope, tool)?;
        if let Some((_, role)) = TOOL_ROLES.iter().find(|(t, _)| *t == tool) {
            require_role(&principal, *role, tool)?;
        }
        if let Some(CallCharge(Err(e))) = parts.and_then(|p| p.extensions.get::<CallCharge>()) {
            return Err(e.clone());
        }
        tracing::info!(tool, caller = %principal.name, key = %principal.key_id, "mcp tool call");
        Ok(principal)
    }

    /// What this call left of the caller's calls-per-minute budget.
    fn charge<'c>(&self, ctx: &'c RequestContext<RoleServer>) -> Option<&'c CallCharge> {
        ctx.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<CallCharge>())
    }
}

/// The scope each tool needs: the one table the tools and the HTTP layer (which answers
/// a person's token that lacks it with 403 and a challenge naming it, so the client can
/// ask them for more) both read.
pub const TOOL_SCOPES: &[(&str, Scope)] = &[
    ("system_health", Scope::SystemRead),
    ("list_agents", Scope::AgentsRead),
    ("list_sources", Scope::AgentsRead),
    ("place_snapshot", Scope::ActionsWrite),
    ("place_log", Scope::ActionsWrite),
    ("place_metric", Scope::ActionsWrite),
    ("get_action", Scope::HitsRead),
    ("list_actions", Scope::HitsRead),
    ("remove_action", Scope::ActionsWrite),
    ("remove_all_actions", Scope::ActionsWrite),
    ("capture_errors", Scope::ActionsWrite),
    ("list_errors", Scope::HitsRead),
    ("query_audit", Scope::Admin),
    ("pause_actions", Scope::Admin),
    ("resume_actions", Scope::Admin),
    ("get_blocklist", Scope::Admin),
    ("set_blocklist", Scope::Admin),
];

/// The role a tool needs beyond its scope (tools not listed: any role). `begin` checks
/// it for every call, so no tool repeats the check in its body.
pub const TOOL_ROLES: &[(&str, Role)] = &[
    ("query_audit", Role::CompanyAdmin),
    ("pause_actions", Role::CompanyAdmin),
    ("resume_actions", Role::CompanyAdmin),
    ("get_blocklist", Role::CompanyAdmin),
    ("set_blocklist", Role::CompanyAdmin),
];

/// The scope a tool needs (`None` for a tool this server does not have).
pub fn tool_scope(tool: &str) -> Option<Scope> {
    TOOL_SCOPES.iter().find(|(t, _)| *t == tool).map(|(_, s)| *s)
}

/// A tool's input schema from its argument type (root `type: object`, ranges and
/// defaults from the type's attributes).
fn input_schema<T: schemars::JsonSchema + 'static>() -> Arc<JsonObject> {
    rmcp::handler::server::common::schema_for_input::<T>()
        .unwrap_or_else(|_| rmcp::handler::server::common::schema_for_empty_input())
}

impl PeriscopeMcp {
    /// The one exit of every tool: a body that may fail with an [`ApiError`] becomes a
    /// tool result once what it stored (or read) is committed, as over REST.
    async fn finish(&self, outcome: Result<CallToolResult, ApiError>) -> CallToolResult {
        self.state.engine.committed().await;
        reply::respond(outcome)
    }
}

#[tool_handler(router = self.tool_router)]
#[prompt_handler(router = self.prompt_router)]
impl ServerHandler for PeriscopeMcp {
    fn get_info(&self) -> ServerConfig {
        #[allow(deprecated)]
        let capabilities = ServerCapabilities::builder()
            .enable_logging()
            .enable_completions()
            .enable_prompts()
            .enable_resources()
            .enable_tools()
            .enable_resources_subscribe()
            .enable_tasks()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(
                Implementation::new("periscope", env!("CARGO_PKG_VERSION"))
                    .with_title("Periscope")
                    .with_description("Live inspection of running services: snapshots at code locations"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        if tasks::runs_as_task(&request, &context) {
            return self.snapshot_task(context, request).await;
        }
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        self.tool_router.call(tcc).await
    }

    async fn get_task(
        &self,
        request: rmcp::model::GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::GetTaskResult, rmcp::ErrorData> {
        Ok(rmcp::model::GetTaskResult::new(self.session.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(
        &self,
        request: rmcp::model::UpdateTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        self.session.tasks.update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(
        &self,
        request: rmcp::model::CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        self.session.tasks.cancel_task(&request.task_id)
    }

    async fn list_resources(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, rmcp::ErrorData> {
        self.resources(&context).await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, rmcp::ErrorData> {
        Ok(self.resource_templates())
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, rmcp::ErrorData> {
        self.read(&context, &request.uri).await.map(Into::into)
    }

    async fn subscribe(
        &self,
        request: rmcp::model::SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        PeriscopeMcp::subscribe(self, &context, &request.uri).await
    }

    async fn unsubscribe(
        &self,
        request: rmcp::model::UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        PeriscopeMcp::unsubscribe(self, &request.uri);
        Ok(())
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        PeriscopeMcp::set_level(self, &context, request.level)
    }

    async fn complete(
        &self,
        request: rmcp::model::CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CompleteResult, rmcp::ErrorData> {
        PeriscopeMcp::complete(self, &context, &request).await
    }
}

/// The tower service mounted at `/mcp`, configured from `[mcp]`: allowed hosts and
/// origins (DNS-rebinding protection), body limit, idle session timeout; sessions are
/// bound to their keys ([`sessions`]). `shutdown` ends every session and open stream
/// when cancelled.
pub fn service(
    state: AppState,
    shutdown: CancellationToken,
) -> StreamableHttpService<PeriscopeMcp, sessions::OwnedSessions> {
    let settings = &state.config.mcp;
    let mut session_config = SessionConfig::default();
    session_config.keep_alive = Some(Duration::from_secs(settings.session_idle_timeout_secs));
    let mut sessions = LocalSessionManager::default();
    sessions.session_config = session_config;

    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(settings.max_body_bytes);
    // A cluster serves MCP without sessions: any node answers any request (every tool
    // carries its state in its arguments: an action id and a cursor), so no load
    // balancer needs to stick a client to a node. One node keeps sessions, bound to
    // their keys ([`sessions`]).
    if state.config.cluster.enabled() {
        config = config.with_legacy_session_mode(false).with_json_response(true);
    }
    let hosts = state.config.mcp_allowed_hosts();
    config = if hosts.is_empty() { config.disable_allowed_hosts() } else { config.with_allowed_hosts(hosts) };
    config = if settings.allowed_origins.iter().any(|o| o == "*") {
        config.disable_allowed_origins()
    } else {
        config.with_allowed_origins(settings.allowed_origins.clone()).enforce_origin_validation()
    };
    let sessions = sessions::OwnedSessions::new(sessions, Arc::clone(&state.mcp_sessions));
    let prototype = PeriscopeMcp::new(state);
    StreamableHttpService::new(move || Ok(prototype.for_session()), Arc::new(sessions), config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A broker state without a listener, for unit tests.
    pub(crate) fn state(config: crate::BrokerConfig) -> AppState {
        state_with_keys(config).0
    }

    /// [`state`], and the key directory's database under it (tests that hold its lock).
    pub(crate) fn state_with_keys(config: crate::BrokerConfig) -> (AppState, Arc<crate::backend::local::SqliteKeys>) {
        let registry = Arc::new(crate::registry::Registry::new(100));
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let engine =
            crate::engine::Engine::new(Arc::clone(&registry), Default::default(), config.limits, 10, rx.clone());
        let scratch = crate::store::ScratchDir::new().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let backend = Arc::new(crate::backend::local::SqliteKeys::open(scratch.path()).unwrap());
        let keys = rt.block_on(crate::keys::KeyStore::open(
            Arc::clone(&backend) as Arc<dyn crate::backend::KeyBackend>,
            &[],
            &[],
            Default::default(),
        ));
        let keys = Arc::new(keys.unwrap());
        let state = Arc::new(crate::BrokerState {
            config,
            registry,
            engine,
            shutdown: rx,
            bound: "127.0.0.1:1".parse().unwrap(),
            cancel: CancellationToken::new(),
            keys,
            callers: Default::default(),
            mcp_sessions: Default::default(),
            agent_limits: crate::agent_limits::AgentLimits::new(Default::default(), 10),
            data_dir: scratch.path().to_owned(),
            audit: Arc::new(crate::backend::local::SqliteAudit::new(
                crate::store::Store::open(scratch.path()).unwrap().0.handle(),
                scratch.path().to_owned(),
            )),
            durable: None,
            directory: Arc::new(crate::backend::local::LocalDirectory::new("test")),
            redis: None,
            rule_store: None,
            safety_store: None,
            started_at_ms: 0,
            scratch: Some(scratch),
            oauth: None,
        });
        (state, backend)
    }

    fn server() -> PeriscopeMcp {
        PeriscopeMcp::new(state(crate::BrokerConfig::default()))
    }

    #[test]
    fn every_contract_tool_is_listed_with_an_object_schema_and_a_description() {
        let tools = server().tools();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        for name in [
            "system_health",
            "list_agents",
            "list_sources",
            "place_snapshot",
            "place_log",
            "place_metric",
            "get_action",
            "list_actions",
            "remove_action",
            "remove_all_actions",
            "capture_errors",
            "list_errors",
            "query_audit",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        for t in &tools {
            assert!(tool_scope(&t.name).is_some(), "{} has no entry in TOOL_SCOPES", t.name);
            assert_eq!(t.input_schema.get("type").and_then(|v| v.as_str()), Some("object"), "{}", t.name);
            let output = t.output_schema.as_ref().unwrap_or_else(|| panic!("{} has no outputSchema", t.name));
            assert_eq!(output.get("type").and_then(|v| v.as_str()), Some("object"), "{}", t.name);
            let d = t.description.as_deref().unwrap_or_default();
            assert!(d.len() > 80 && d.len() < 1_200, "{}: description of {} chars", t.name, d.len());
        }
    }

    #[test]
    fn the_endpoint_takes_its_guards_from_the_mcp_settings() {
        let mut config = crate::BrokerConfig::default();
        config.mcp.max_body_bytes = 65_536;
        config.mcp.allowed_origins = vec!["https://console.example.com:443".into()];
        config.public_url = Some("https://periscope.example.com".into());
        let svc = service(state(config), CancellationToken::new());
        assert_eq!(svc.config.max_request_body_bytes, 65_536);
        assert!(svc.config.allowed_hosts.contains(&"periscope.example.com".to_owned()));
        assert!(svc.config.allowed_hosts.contains(&"localhost".to_owned()));
        assert_eq!(svc.config.allowed_origins, ["https://console.example.com:443"]);
    }

    #[test]
    fn snapshot_limits_and_defaults_are_in_the_schema() {
        let tools = server().tools();
        let snap = tools.iter().find(|t| t.name == "place_snapshot").unwrap();
        let props = &snap.input_schema["properties"];
        assert_eq!(props["max_hits"]["minimum"], 1);
        assert_eq!(props["max_hits"]["maximum"], 50);
        assert_eq!(props["max_hits"]["default"], 1);
        assert_eq!(props["timeout_seconds"]["maximum"], 600);
        assert_eq!(props["timeout_seconds"]["default"], 60);
        assert_eq!(props["wait"]["default"], true);
        // `file` and `line`, or `function`: which one is checked at placement, with a
        // sentence saying what is missing.
        let required = snap.input_schema.get("required").and_then(|r| r.as_array()).cloned().unwrap_or_default();
        assert!(required.is_empty(), "{required:?}");
        assert_eq!(props["line"]["minimum"], 1);
        assert_eq!(props["min_duration_ms"]["maximum"], 3_600_000);
        assert!(props["function"]["description"].as_str().unwrap().contains("module:qualname"));
    }
}
