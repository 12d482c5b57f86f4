//! `periscope mcp`: an MCP server on stdio for clients that only speak stdio, forwarding
//! every request to a remote broker's `/mcp` over streamable HTTP.
//!
//! The surface is the remote one by construction: tools, prompts, resources (with
//! subscriptions), completion and `logging/setLevel` are forwarded as they are; progress
//! notifications the broker sends while a `place_snapshot` waits are relayed back under
//! the token the stdio client chose, and resource updates and log messages to the stdio
//! client. (Subscriptions and the log level belong to the broker session: after a
//! reconnection the client sets them again, as after any new session.) Standard output carries only JSON-RPC; logs go to
//! standard error. The key is checked when the proxy starts, so a wrong key or an
//! unreachable broker is a clear error before any client request, not a hang.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelledNotificationParam, ClientCapabilities,
    ClientConfig, ClientRequest, ErrorData, GetPromptRequestParams, GetPromptResponse, Implementation,
    ListPromptsResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken,
    ServerCapabilities, ServerConfig, ServerPeerInfo, ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, Peer, RoleClient, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::Mutex as AsyncMutex;

/// Progress notifications kept for a request whose route is not registered yet (the
/// broker can answer faster than the proxy records the request).
const EARLY_PROGRESS_KEPT: usize = 64;

/// Where and how to reach the remote broker.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The broker's base URL (`http://host:7070`) or its MCP endpoint (`…/mcp`).
    pub url: String,
    /// An API key of that broker.
    pub api_key: String,
}

impl ProxyOptions {
    /// The MCP endpoint URL.
    pub fn endpoint(&self) -> String {
        let base = self.url.trim().trim_end_matches('/');
        if base.ends_with("/mcp") { base.to_owned() } else { format!("{base}/mcp") }
    }
}

/// Runs the proxy on this process's stdin/stdout until the client closes stdin.
pub async fn run_stdio(options: ProxyOptions) -> anyhow::Result<()> {
    let upstream = Upstream::connect(options).await?;
    let info = upstream.server_info.clone();
    tracing::info!(
        endpoint = %upstream.endpoint,
        server = info.server_info.as_ref().map_or("?", |i| i.name.as_str()),
        version = info.server_info.as_ref().map_or("?", |i| i.version.as_str()),
        "connected to the broker; serving MCP on stdio"
    );
    let proxy = StdioProxy { upstream: Arc::new(upstream) };
    let running = proxy.serve(rmcp::transport::stdio()).await.context("starting the MCP server on stdio")?;
    let reason = running.waiting().await.context("the stdio MCP server stopped")?;
    tracing::info!(?reason, "stdio client went away");
    Ok(())
}

/// Routes from the broker's progress tokens to the stdio client's.
#[derive(Default)]
struct ProgressRoutes {
    inner: Mutex<RoutesInner>,
}

#[derive(Default)]
struct RoutesInner {
    routes: HashMap<ProgressToken, (Peer<RoleServer>, ProgressToken)>,
    early: VecDeque<ProgressNotificationParam>,
}

impl ProgressRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoutesInner> {
        // Short sections that cannot panic; a poisoned lock still holds usable routes.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn relay(&self, mut note: ProgressNotificationParam) {
        let route = {
            let mut inner = self.lock();
            match inner.routes.get(&note.progress_token) {
                Some(route) => Some(route.clone()),
                None => {
                    if inner.early.len() >= EARLY_PROGRESS_KEPT {
                        inner.early.pop_front();
                    }
                    inner.early.push_back(note.clone());
                    None
                }
            }
        };
        if let Some((peer, token)) = route {
            note.progress_token = token;
            let _ = peer.notify_progress(note).await;
        }
    }

    async fn register(&self, upstream: ProgressToken, peer: Peer<RoleServer>, downstream: ProgressToken) {
        let early: Vec<ProgressNotificationParam> = {
            let mut inner = self.lock();
            inner.routes.insert(upstream.clone(), (peer.clone(), downstream.clone()));
            let (mine, others): (Vec<_>, Vec<_>) = inner.early.drain(..).partition(|n| n.progress_token == upstream);
            inner.early = others.into();
            mine
        };
        for mut note in early {
            note.progress_token = downstream.clone();
            let _ = peer.notify_progress(note).await;
        }
    }

    fn unregister(&self, upstream: &ProgressToken) {
        self.lock().routes.remove(upstream);
    }
}

/// The broker side: an MCP client session, reopened when its transport closes.
struct Upstream {
    options: ProxyOptions,
    endpoint: String,
    server_info: ServerPeerInfo,
    routes: Arc<ProgressRoutes>,
    downstream: Arc<Mutex<Option<Peer<RoleServer>>>>,
    session: AsyncMutex<RunningService<RoleClient, UpstreamHandler>>,
}

/// Receives what the broker sends on its own: progress notifications, resource updates,
/// log messages.
#[derive(Clone)]
struct UpstreamHandler {
    routes: Arc<ProgressRoutes>,
    /// The stdio client, once it asked something (there is one).
    downstream: Arc<Mutex<Option<Peer<RoleServer>>>>,
}

impl UpstreamHandler {
    fn downstream(&self) -> Option<Peer<RoleServer>> {
        self.downstream.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientHandler for UpstreamHandler {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.routes.relay(params).await;
    }

    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_resource_updated(params).await;
        }
    }

    #[allow(deprecated)]
    async fn on_logging_message(
        &self,
        params: rmcp::model::LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_logging_message(params).await;
        }
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("periscope-mcp-stdio", env!("CARGO_PKG_VERSION")),
        )
    }
}

impl Upstream {
    async fn connect(options: ProxyOptions) -> anyhow::Result<Upstream> {
        let routes = Arc::new(ProgressRoutes::default());
        let downstream = Arc::default();
        let endpoint = options.endpoint();
        let session = open(&endpoint, &options.api_key, &routes, &downstream).await?;
        let server_info = session
            .peer_info()
            .map(|i| (*i).clone())
            .with_context(|| format!("the broker at {endpoint} did not describe itself"))?;
        Ok(Upstream { options, endpoint, server_info, routes, downstream, session: AsyncMutex::new(session) })
    }

    /// A live session's peer, reconnecting once if the last one closed.
    async fn peer(&self) -> Result<Peer<RoleClient>, ErrorData> {
        let mut session = self.session.lock().await;
        if session.is_closed() || session.peer().is_transport_closed() {
            tracing::warn!(endpoint = %self.endpoint, "the broker connection closed; reconnecting");
            *session = open(&self.endpoint, &self.options.api_key, &self.routes, &self.downstream)
                .await
                .map_err(|e| ErrorData::internal_error(format!("{e:#}"), None))?;
        }
        Ok(session.peer().clone())
    }

    fn failed(&self, e: rmcp::ServiceError) -> ErrorData {
        if e.is_authorization_required() {
            return ErrorData::internal_error(
                format!("the broker at {} no longer accepts the API key; check --api-key", self.endpoint),
                None,
            );
        }
        match e {
            rmcp::ServiceError::McpError(data) => data,
            other => ErrorData::internal_error(
                format!(
                    "the broker at {} could not be reached ({other}); the call may not have taken effect, so check \
                     with list_actions before placing again",
                    self.endpoint
                ),
                None,
            ),
        }
    }
}

async fn open(
    endpoint: &str,
    api_key: &str,
    routes: &Arc<ProgressRoutes>,
    downstream: &Arc<Mutex<Option<Peer<RoleServer>>>>,
) -> anyhow::Result<RunningService<RoleClient, UpstreamHandler>> {
    if endpoint.starts_with("https://") {
        anyhow::bail!(
            "{endpoint}: this build of periscope speaks plain HTTP only; reach the broker over http:// (for \
             example through an SSH tunnel or a local TLS-terminating proxy)"
        );
    }
    if !endpoint.starts_with("http://") {
        anyhow::bail!("{endpoint}: the broker URL must start with http://");
    }
    let config = StreamableHttpClientTransportConfig::with_uri(endpoint.to_owned()).auth_header(api_key.to_owned());
    let transport = StreamableHttpClientTransport::from_config(config);
    let handler = UpstreamHandler { routes: Arc::clone(routes), downstream: Arc::clone(downstream) };
    match handler.serve(transport).await {
        Ok(session) => Ok(session),
        Err(e) if e.is_authorization_required() => anyhow::bail!(
            "the broker at {endpoint} refused the API key (HTTP 401); pass a key it knows with --api-key or \
             PERISCOPE_API_KEY"
        ),
        Err(e) => Err(anyhow::anyhow!("cannot reach the Periscope broker at {endpoint}: {e}")),
    }
}

/// The stdio side: an MCP server whose every answer comes from the broker.
struct StdioProxy {
    upstream: Arc<Upstream>,
}

impl ServerHandler for StdioProxy {
    fn get_info(&self) -> ServerConfig {
        let remote = &self.upstream.server_info;
        let mut caps = ServerCapabilities::default();
        caps.tools = remote.capabilities.tools.clone();
        caps.prompts = remote.capabilities.prompts.clone();
        caps.resources = remote.capabilities.resources.clone();
        caps.completions = remote.capabilities.completions.clone();
        #[allow(deprecated)]
        {
            caps.logging = remote.capabilities.logging.clone();
        }
        let mut info = ServerConfig::new(caps);
        if let Some(implementation) = &remote.server_info {
            info = info.with_server_info(implementation.clone());
        }
        info.instructions = remote.instructions.clone();
        info
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.list_tools(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let peer = self.upstream.peer().await?;
        let handle = peer
            .send_request_with_option(
                ClientRequest::CallToolRequest(CallToolRequest::new(request)),
                PeerRequestOptions::no_options(),
            )
            .await
            .map_err(|e| self.upstream.failed(e))?;
        let upstream_token = handle.progress_token.clone();
        let request_id = handle.id.clone();
        let routes = &self.upstream.routes;
        if let Some(token) = context.meta.get_progress_token() {
            routes.register(upstream_token.clone(), context.peer.clone(), token).await;
        }
        let outcome = tokio::select! {
            r = handle.await_response() => Some(r),
            _ = context.ct.cancelled() => None,
        };
        routes.unregister(&upstream_token);
        match outcome {
            Some(Ok(ServerResult::CallToolResult(result))) => Ok(CallToolResponse::Complete(result)),
            Some(Ok(_)) => Err(ErrorData::internal_error("the broker answered tools/call with something else", None)),
            Some(Err(e)) => Err(self.upstream.failed(e)),
            None => {
                let note = CancelledNotificationParam::new(Some(request_id), Some("cancelled by the client".into()));
                let _ = peer.notify_cancelled(note).await;
                Err(ErrorData::internal_error("cancelled by the client", None))
            }
        }
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.list_prompts(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.get_prompt_once(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.list_resources(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.list_resource_templates(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.read_resource_once(request).await.map_err(|e| self.upstream.failed(e))
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: rmcp::model::SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.remember(&context);
        let peer = self.upstream.peer().await?;
        peer.subscribe(request).await.map_err(|e| self.upstream.failed(e))
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: rmcp::model::UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.unsubscribe(request).await.map_err(|e| self.upstream.failed(e))
    }

    async fn complete(
        &self,
        request: rmcp::model::CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CompleteResult, ErrorData> {
        let peer = self.upstream.peer().await?;
        peer.complete(request).await.map_err(|e| self.upstream.failed(e))
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.remember(&context);
        let peer = self.upstream.peer().await?;
        peer.set_level(request).await.map_err(|e| self.upstream.failed(e))
    }
}

impl StdioProxy {
    /// Keeps the stdio client's peer, where notifications from the broker go.
    fn remember(&self, context: &RequestContext<RoleServer>) {
        *self.upstream.downstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(context.peer.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_accepts_a_base_url_or_the_mcp_url() {
        let o = |url: &str| ProxyOptions { url: url.into(), api_key: String::new() }.endpoint();
        assert_eq!(o("http://127.0.0.1:7070"), "http://127.0.0.1:7070/mcp");
        assert_eq!(o("http://127.0.0.1:7070/"), "http://127.0.0.1:7070/mcp");
        assert_eq!(o("https://p.example.com/mcp"), "https://p.example.com/mcp");
    }
}
