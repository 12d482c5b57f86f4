//! What an MCP session holds beyond its principal, and the capabilities that need it:
//!
//! - **resources**: every action within the caller's reach is `periscope://actions/{id}`
//!   (the action: state, counts, metric figures) with `periscope://actions/{id}/hits`
//!   (its hits, log lines or figures); `resources/subscribe` to either sends
//!   `notifications/resources/updated` as hits, lines or figures arrive and when the
//!   action ends, so a client follows an action without polling.
//! - **logging**: after `logging/setLevel`, the session receives `notifications/message`
//!   about what the caller's own actions do (hits and lines arriving, agents refusing,
//!   pauses, endings), at or above the level set.
//! - **completion**: `completion/complete` for what people type: pools, tags, files and
//!   lines of the prompts, action ids of prompts and resource templates.
//!
//! Everything is authorized with the principal of the request that asks (per call, as
//! tools are), and the followers re-check it before each notification: a revoked key or
//! grant stops them. Followers end with their session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CompleteRequestParams, CompleteResult, CompletionInfo, ListResourceTemplatesResult, ListResourcesResult,
    ReadResourceResult, Reference, Resource, ResourceContents, ResourceTemplate,
};
#[allow(deprecated)]
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam};
use rmcp::service::{Peer, RequestContext};
use rmcp::{ErrorData as McpError, RoleServer};
use tokio::task::AbortHandle;

use super::PeriscopeMcp;
use crate::auth::{Principal, Scope, authorize};
use crate::engine::{ActionFilter, ActionStatus, ActionView, AgentState};
use crate::error::ApiError;
use crate::query::{self, AgentFilter, SourceFilter};

/// The URI scheme and prefix of action resources.
pub const ACTION_PREFIX: &str = "periscope://actions/";
/// Subscriptions one session may hold.
const MAX_SUBSCRIPTIONS: usize = 32;
/// Resources listed (newest actions first).
const MAX_LISTED: usize = 100;
/// Hits or lines a `…/hits` resource returns (the newest).
const MAX_READ: usize = 200;
/// How often the log follower looks at the caller's actions.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Messages one look may send; beyond, one message says how many were left out.
const MAX_MESSAGES_PER_LOOK: usize = 20;

/// Per-session state: log level and follower, subscriptions, tasks.
#[derive(Default)]
pub struct Session {
    #[allow(deprecated)]
    level: Mutex<Option<LoggingLevel>>,
    follower: Mutex<Option<AbortHandle>>,
    subscriptions: Mutex<HashMap<String, AbortHandle>>,
    /// `place_snapshot` calls running as tasks (`tasks.rs`).
    pub(super) tasks: rmcp::task_manager::TaskManager,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("tasks", &self.tasks.running_task_count()).finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.tasks.shutdown();
        if let Some(f) = lock(&self.follower).take() {
            f.abort();
        }
        for (_, s) in lock(&self.subscriptions).drain() {
            s.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mcp_error(e: ApiError) -> McpError {
    let data = Some(e.body());
    match e.code {
        crate::error::ErrorCode::NotFound | crate::error::ErrorCode::InvalidInput => {
            McpError::resource_not_found(e.message, data)
        }
        _ => McpError::invalid_request(e.message, data),
    }
}

/// What a resource URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionResource {
    /// `periscope://actions/{id}`.
    Action(String),
    /// `periscope://actions/{id}/hits`.
    Hits(String),
}

impl ActionResource {
    /// Parses a URI of this server.
    pub fn parse(uri: &str) -> Option<ActionResource> {
        let rest = uri.strip_prefix(ACTION_PREFIX)?;
        let (id, tail) = rest.split_once('/').map_or((rest, None), |(a, b)| (a, Some(b)));
        if !id.starts_with("act_") || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        match tail {
            None => Some(ActionResource::Action(id.to_owned())),
            Some("hits") => Some(ActionResource::Hits(id.to_owned())),
            Some(_) => None,
        }
    }

    fn id(&self) -> &str {
        match self {
            ActionResource::Action(id) | ActionResource::Hits(id) => id,
        }
    }
}

/// What changes when an action does (hits, lines, figures, status).
fn fingerprint(v: &ActionView) -> String {
    format!(
        "{}:{}:{}:{}",
        v.hits,
        v.lines,
        v.status.as_str(),
        v.figures.as_ref().map(|f| serde_json::to_string(f).unwrap_or_default()).unwrap_or_default()
    )
}

#[allow(deprecated)]
fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

impl PeriscopeMcp {
    /// The principal of a request (resources, logging, completion), with `scope`.
    fn caller(&self, ctx: &RequestContext<RoleServer>, scope: Scope, what: &str) -> Result<Principal, McpError> {
        let parts = ctx.extensions.get::<axum::http::request::Parts>();
        let principal = parts
            .and_then(|p| p.extensions.get::<Principal>())
            .cloned()
            .ok_or_else(|| McpError::invalid_request("this MCP connection carries no authenticated caller", None))?;
        authorize(&principal, scope, what).map_err(|e| McpError::invalid_request(e.message.clone(), Some(e.body())))?;
        Ok(principal)
    }

    /// `resources/list`: the newest actions within reach, each with its hits.
    pub(super) async fn resources(&self, ctx: &RequestContext<RoleServer>) -> Result<ListResourcesResult, McpError> {
        let principal = self.caller(ctx, Scope::HitsRead, "resources/list")?;
        let views = self.state.engine.list(&ActionFilter::default(), &principal).await.map_err(mcp_error)?;
        let mut out = Vec::new();
        for v in views.into_iter().take(MAX_LISTED) {
            let id = v.action_id.to_string();
            let at = format!("{}:{}", v.location.file, v.location.line);
            out.push(
                Resource::new(format!("{ACTION_PREFIX}{id}"), id.clone())
                    .with_title(format!("{} at {at} ({})", v.kind, v.status.as_str()))
                    .with_description(format!("The {} action {id}: its state, counts and figures.", v.kind))
                    .with_mime_type("application/json"),
            );
            let what = match v.kind {
                "log" => "log lines",
                "metric" => "metric figures",
                _ => "hits",
            };
            out.push(
                Resource::new(format!("{ACTION_PREFIX}{id}/hits"), format!("{id}/hits"))
                    .with_title(format!("{what} of {id} at {at}"))
                    .with_description(format!("The newest {what} of {id} (subscribe to follow new ones)."))
                    .with_mime_type("application/json"),
            );
        }
        Ok(ListResourcesResult::with_all_items(out))
    }

    /// `resources/templates/list`.
    pub(super) fn resource_templates(&self) -> ListResourceTemplatesResult {
        ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(format!("{ACTION_PREFIX}{{action_id}}"), "action")
                .with_title("An action")
                .with_description("A snapshot, log or metric action: state, counts, metric figures.")
                .with_mime_type("application/json"),
            ResourceTemplate::new(format!("{ACTION_PREFIX}{{action_id}}/hits"), "action_hits")
                .with_title("An action's hits, log lines or figures")
                .with_description("What the action collected, newest last; subscribe to follow new ones.")
                .with_mime_type("application/json"),
        ])
    }

    /// `resources/read`.
    pub(super) async fn read(
        &self,
        ctx: &RequestContext<RoleServer>,
        uri: &str,
    ) -> Result<ReadResourceResult, McpError> {
        let principal = self.caller(ctx, Scope::HitsRead, "resources/read")?;
        let what = ActionResource::parse(uri)
            .ok_or_else(|| McpError::resource_not_found(format!("no resource `{}`", short(uri)), None))?;
        let engine = &self.state.engine;
        let view = engine.get(what.id(), &principal).await.map_err(mcp_error)?;
        let body = match what {
            ActionResource::Action(_) => serde_json::json!({ "action": view }),
            ActionResource::Hits(ref id) => match view.kind {
                "log" => {
                    let since = view.lines.saturating_sub(MAX_READ as u64);
                    let page = engine.lines(id, since, MAX_READ, &principal).await.map_err(mcp_error)?;
                    serde_json::json!({ "action_id": id, "lines": page.lines, "next_cursor": page.next_cursor })
                }
                "metric" => serde_json::json!({ "action_id": id, "figures": view.figures }),
                _ => {
                    let since = view.hits.saturating_sub(MAX_READ as u64);
                    let page = engine.hits(id, since, MAX_READ, &principal).await.map_err(mcp_error)?;
                    serde_json::json!({ "action_id": id, "hits": page.hits, "next_cursor": page.next_cursor })
                }
            },
        };
        let text = serde_json::to_string_pretty(&body).unwrap_or_default();
        Ok(ReadResourceResult::new(vec![ResourceContents::TextResourceContents {
            uri: uri.to_owned(),
            mime_type: Some("application/json".into()),
            text,
            meta: None,
        }]))
    }

    /// `resources/subscribe`: a follower that notifies the session when the action
    /// changes, until it ends, the session ends, the caller unsubscribes or loses access.
    pub(super) async fn subscribe(&self, ctx: &RequestContext<RoleServer>, uri: &str) -> Result<(), McpError> {
        let principal = self.caller(ctx, Scope::HitsRead, "resources/subscribe")?;
        let what = ActionResource::parse(uri)
            .ok_or_else(|| McpError::resource_not_found(format!("no resource `{}`", short(uri)), None))?;
        let view = self.state.engine.get(what.id(), &principal).await.map_err(mcp_error)?;
        let mut subs = lock(&self.session.subscriptions);
        subs.retain(|_, h| !h.is_finished());
        if subs.contains_key(uri) {
            return Ok(());
        }
        if subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(McpError::invalid_request(
                format!("a session follows at most {MAX_SUBSCRIPTIONS} resources; unsubscribe from one first"),
                None,
            ));
        }
        let (state, peer, uri_owned, id) = (self.state.clone(), ctx.peer.clone(), uri.to_owned(), what.id().to_owned());
        let mut last = fingerprint(&view);
        let task = tokio::spawn(async move {
            loop {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                let seen = last.clone();
                let waited =
                    state.engine.wait_until(&id, deadline, &principal, |a| fingerprint(&a.view()) != seen).await;
                if waited.is_err() || state.recheck(&principal).await.is_err() {
                    return;
                }
                let Ok(now) = state.engine.get(&id, &principal).await else { return };
                let fp = fingerprint(&now);
                if fp != last {
                    last = fp;
                    if peer
                        .notify_resource_updated(rmcp::model::ResourceUpdatedNotificationParam::new(uri_owned.clone()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if now.status != ActionStatus::Active {
                    return;
                }
            }
        });
        subs.insert(uri.to_owned(), task.abort_handle());
        Ok(())
    }

    /// `resources/unsubscribe`.
    pub(super) fn unsubscribe(&self, uri: &str) {
        if let Some(h) = lock(&self.session.subscriptions).remove(uri) {
            h.abort();
        }
    }

    /// `logging/setLevel`: sets the level and starts following the caller's actions.
    #[allow(deprecated)]
    pub(super) fn set_level(&self, ctx: &RequestContext<RoleServer>, level: LoggingLevel) -> Result<(), McpError> {
        let principal = self.caller(ctx, Scope::HitsRead, "logging/setLevel")?;
        *lock(&self.session.level) = Some(level);
        let mut follower = lock(&self.session.follower);
        if follower.as_ref().is_some_and(|f| !f.is_finished()) {
            return Ok(());
        }
        let (state, peer, session) = (self.state.clone(), ctx.peer.clone(), Arc::downgrade(&self.session));
        let task = tokio::spawn(async move { follow(state, peer, session, principal).await });
        *follower = Some(task.abort_handle());
        Ok(())
    }

    /// `completion/complete`.
    pub(super) async fn complete(
        &self,
        ctx: &RequestContext<RoleServer>,
        request: &CompleteRequestParams,
    ) -> Result<CompleteResult, McpError> {
        let arg = request.argument.name.as_str();
        let typed = request.argument.value.trim().to_lowercase();
        let context: BTreeMap<String, String> = request
            .context
            .as_ref()
            .and_then(|c| c.arguments.clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        let candidates: Vec<String> = match (&request.r#ref, arg) {
            (Reference::Prompt(_), "pool" | "service") => self.pools(ctx)?,
            (Reference::Prompt(_), "tags") => self.tags(ctx, context.get("pool"))?,
            (Reference::Prompt(_), "file") => self.files(ctx, context.get("pool"))?,
            (Reference::Prompt(_), "line") => match context.get("file") {
                Some(file) => self.lines(ctx, context.get("pool"), file)?,
                None => Vec::new(),
            },
            (Reference::Prompt(_), "action_id") | (Reference::Resource(_), "action_id") => self.action_ids(ctx).await?,
            _ => Vec::new(),
        };
        let matching: Vec<String> = candidates.into_iter().filter(|c| c.to_lowercase().starts_with(&typed)).collect();
        let total = matching.len();
        let values: Vec<String> = matching.into_iter().take(CompletionInfo::MAX_VALUES).collect();
        let info = CompletionInfo::with_pagination(
            values.clone(),
            Some(u32::try_from(total).unwrap_or(u32::MAX)),
            total > values.len(),
        )
        .map_err(|e| McpError::internal_error(e, None))?;
        Ok(CompleteResult::new(info))
    }

    fn pools(&self, ctx: &RequestContext<RoleServer>) -> Result<Vec<String>, McpError> {
        let principal = self.caller(ctx, Scope::AgentsRead, "completion/complete")?;
        Ok(query::list_pools(&self.state.registry, &principal).into_iter().map(|p| p.pool).collect())
    }

    fn tags(&self, ctx: &RequestContext<RoleServer>, pool: Option<&String>) -> Result<Vec<String>, McpError> {
        let principal = self.caller(ctx, Scope::AgentsRead, "completion/complete")?;
        let filter = AgentFilter { pool: pool.cloned(), ..Default::default() };
        let page = query::list_agents(&self.state.registry, &filter, None, Some(query::MAX_PAGE), &principal)
            .map_err(mcp_error)?;
        let tags: BTreeSet<String> = page.items.into_iter().flat_map(|a| a.tags).collect();
        Ok(tags.into_iter().collect())
    }

    fn catalog(
        &self,
        ctx: &RequestContext<RoleServer>,
        pool: Option<&String>,
        file: Option<&String>,
    ) -> Result<Vec<query::SourceView>, McpError> {
        let principal = self.caller(ctx, Scope::AgentsRead, "completion/complete")?;
        let filter = SourceFilter { pool: pool.cloned(), file: file.cloned(), ..Default::default() };
        let page = query::list_sources(&self.state.registry, &filter, None, Some(query::MAX_PAGE), &principal)
            .map_err(mcp_error)?;
        Ok(page.items)
    }

    fn files(&self, ctx: &RequestContext<RoleServer>, pool: Option<&String>) -> Result<Vec<String>, McpError> {
        let files: BTreeSet<String> = self.catalog(ctx, pool, None)?.into_iter().map(|s| s.file).collect();
        Ok(files.into_iter().collect())
    }

    fn lines(
        &self,
        ctx: &RequestContext<RoleServer>,
        pool: Option<&String>,
        file: &String,
    ) -> Result<Vec<String>, McpError> {
        let lines: BTreeSet<u32> =
            self.catalog(ctx, pool, Some(file))?.into_iter().filter(|s| &s.file == file).map(|s| s.line).collect();
        Ok(lines.into_iter().map(|l| l.to_string()).collect())
    }

    async fn action_ids(&self, ctx: &RequestContext<RoleServer>) -> Result<Vec<String>, McpError> {
        let principal = self.caller(ctx, Scope::HitsRead, "completion/complete")?;
        Ok(self
            .state
            .engine
            .list(&ActionFilter::default(), &principal)
            .await
            .map_err(mcp_error)?
            .into_iter()
            .map(|v| v.action_id.to_string())
            .collect())
    }
}

fn short(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 120).to_owned()
}

/// What the log follower last saw of one action.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    hits: u64,
    lines: u64,
    status: ActionStatus,
    errors: BTreeSet<String>,
    paused: bool,
}

fn seen(v: &ActionView) -> Seen {
    Seen {
        hits: v.hits,
        lines: v.lines,
        status: v.status,
        errors: v.agents.iter().filter(|a| a.state == AgentState::Error).map(|a| a.agent_id.to_string()).collect(),
        paused: v.agents.iter().any(|a| a.pause_reason.is_some()),
    }
}

/// Follows the caller's own actions and sends what they do as log messages, at or
/// above the session's level.
#[allow(deprecated)]
async fn follow(
    state: crate::AppState,
    peer: Peer<RoleServer>,
    session: std::sync::Weak<Session>,
    principal: Principal,
) {
    let mut known: HashMap<String, Seen> = HashMap::new();
    let mut first = true;
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    loop {
        tick.tick().await;
        let Some(session) = session.upgrade() else { return };
        let Some(level) = *lock(&session.level) else { return };
        drop(session);
        if state.recheck(&principal).await.is_err() {
            return;
        }
        // Out of reach for now (a store that cannot answer): try again on the next tick.
        let Ok(all) = state.engine.list(&ActionFilter::default(), &principal).await else { continue };
        let mine: Vec<ActionView> = all.into_iter().filter(|v| v.created_by_key == principal.key_id).collect();
        let mut messages: Vec<(LoggingLevel, serde_json::Value)> = Vec::new();
        for v in &mine {
            let id = v.action_id.to_string();
            let now = seen(v);
            let at = format!("{}:{}", v.location.file, v.location.line);
            let before = known.insert(id.clone(), now.clone());
            let Some(before) = before else {
                if !first && now.status == ActionStatus::Active {
                    messages.push((
                        LoggingLevel::Info,
                        serde_json::json!({
                            "action_id": id, "event": "placed", "message": format!("{} placed at {at}", v.kind)
                        }),
                    ));
                }
                continue;
            };
            if now.hits > before.hits {
                messages.push((
                    LoggingLevel::Info,
                    serde_json::json!({
                        "action_id": id, "event": "hits", "new": now.hits - before.hits, "total": now.hits,
                        "message": format!("{} new hit(s) at {at} ({} in all)", now.hits - before.hits, now.hits)
                    }),
                ));
            }
            if now.lines > before.lines {
                messages.push((
                    LoggingLevel::Debug,
                    serde_json::json!({
                        "action_id": id, "event": "lines", "new": now.lines - before.lines, "total": now.lines,
                        "message": format!("{} new log line(s) at {at}", now.lines - before.lines)
                    }),
                ));
            }
            for agent in now.errors.difference(&before.errors) {
                let detail = v.agents.iter().find(|a| &a.agent_id.to_string() == agent).and_then(|a| a.detail.clone());
                messages.push((
                    LoggingLevel::Error,
                    serde_json::json!({
                        "action_id": id, "event": "agent_error", "agent_id": agent,
                        "message": format!("agent {agent} cannot run it: {}", detail.unwrap_or_default())
                    }),
                ));
            }
            if now.paused && !before.paused {
                messages.push((
                    LoggingLevel::Warning,
                    serde_json::json!({
                        "action_id": id, "event": "paused", "message": format!("paused by a quota at {at}")
                    }),
                ));
            }
            if now.status != before.status && now.status != ActionStatus::Active {
                messages.push((LoggingLevel::Notice, serde_json::json!({
                    "action_id": id, "event": "ended", "status": now.status.as_str(),
                    "message": format!("ended ({}): {}", now.status.as_str(), v.end_reason.clone().unwrap_or_default())
                })));
            }
        }
        first = false;
        let live: BTreeSet<String> = mine.iter().map(|v| v.action_id.to_string()).collect();
        known.retain(|k, _| live.contains(k));
        let wanted: Vec<_> = messages.into_iter().filter(|(l, _)| rank(*l) >= rank(level)).collect();
        let extra = wanted.len().saturating_sub(MAX_MESSAGES_PER_LOOK);
        for (l, data) in wanted.into_iter().take(MAX_MESSAGES_PER_LOOK) {
            let param = LoggingMessageNotificationParam::new(l, data).with_logger("periscope.actions");
            if peer.notify_logging_message(param).await.is_err() {
                return;
            }
        }
        if extra > 0 {
            let param = LoggingMessageNotificationParam::new(
                LoggingLevel::Notice,
                serde_json::json!({ "event": "more", "message": format!("{extra} more event(s) left out") }),
            )
            .with_logger("periscope.actions");
            if peer.notify_logging_message(param).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uris_name_an_action_or_its_hits_and_nothing_else() {
        assert_eq!(
            ActionResource::parse("periscope://actions/act_abc123"),
            Some(ActionResource::Action("act_abc123".into()))
        );
        assert_eq!(
            ActionResource::parse("periscope://actions/act_abc123/hits"),
            Some(ActionResource::Hits("act_abc123".into()))
        );
        for bad in [
            "periscope://actions/",
            "periscope://actions/agt_x",
            "periscope://actions/act_x/other",
            "file:///etc/passwd",
            "periscope://actions/act_../x",
        ] {
            assert_eq!(ActionResource::parse(bad), None, "{bad}");
        }
    }
}
