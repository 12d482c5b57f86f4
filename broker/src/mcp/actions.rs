//! Placing, reading and removing actions: `place_snapshot` (which can wait for its
//! hits and report progress), `place_log`, `place_metric`, `get_action`,
//! `list_actions`, `remove_action`.
//!
//! A snapshot's `timeout_seconds` is both its expiry and how long a waiting call waits,
//! so a model never leaves a snapshot armed behind a call that already gave up.

use std::time::Duration;

use periscope_protocol::limits::action_bounds;
use rmcp::model::{CallToolResult, JsonObject, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::reply::{parse_args, success};
use super::{PeriscopeMcp, input_schema, render};
use crate::auth::Principal;
use crate::engine::requests::{check_limit, check_wait_seconds, in_range};
use crate::engine::{
    ActionFilter, ActionRecord, ActionStatus, ActionView, AgentState, HitsPage, LogRequest, MetricRequest,
    SnapshotRequest,
};
use crate::error::{ApiError, ErrorCode};
use crate::query;
use crate::time::now_ms;

/// Arguments of `place_snapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PlaceSnapshotArgs {
    /// Target these agents (ids `agt_…` from list_agents). Give either this or `pool`/`tags`.
    #[serde(default)]
    agent_ids: Vec<String>,
    /// Target every online agent in this pool (and agents joining it while the snapshot lives).
    pool: Option<String>,
    /// With `pool` (or alone): only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// Source file, as list_sources shows it, or a path suffix of it, e.g. `src/orders.rs`.
    /// Give `file` and `line`, or `function`.
    file: Option<String>,
    /// 1-based line of an inspectable location in `file` (from list_sources).
    #[schemars(range(min = 1))]
    line: Option<u32>,
    /// Instead of `file` and `line`: a function (Python `module:qualname`, e.g.
    /// `shop.orders:Shop.checkout`) or a span (Rust: its name, optionally after its module
    /// path, e.g. `shop::orders::checkout`). A hit then holds the arguments (span fields)
    /// at entry, `return` and the error or exception at exit, and `call.duration_ms`.
    function: Option<String>,
    /// With `function`: capture only calls lasting at least this many milliseconds
    /// (faster calls produce nothing), e.g. 250 to catch the one slow checkout.
    #[schemars(range(min = 0, max = 3_600_000))]
    min_duration_ms: Option<u64>,
    /// Capture only when this expression is true, e.g. `user_id == 42`.
    condition: Option<String>,
    /// Expressions to evaluate at each hit and report beside the fields.
    #[serde(default)]
    #[schemars(length(max = 20))]
    watch: Vec<String>,
    /// Hits to collect before the snapshot completes.
    #[serde(default = "default_max_hits")]
    #[schemars(range(min = 1, max = 50))]
    max_hits: u32,
    /// Seconds the snapshot stays live, and how long the call waits when `wait` is true.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 600))]
    timeout_seconds: u64,
    /// Wait for the hits (true) or return the action_id at once (false; then use get_action).
    #[serde(default = "yes")]
    wait: bool,
    /// Run only where the service runs this version or build (git commit, or a prefix of
    /// at least 7 characters), as list_agents shows it; other agents refuse the action and
    /// the answer counts both.
    expected_version: Option<String>,
    /// Run only where the file's content hash is this (`sha256:<hex>`, as list_sources
    /// shows it, or as `sha256sum` prints it for your checkout).
    file_hash: Option<String>,
    /// Accept a line no agent has reported yet (code that has not run since the agent started).
    #[serde(default)]
    allow_pending: bool,
    /// Also capture the native call stack (function names and source lines) at each hit.
    /// Costs more on the service's thread: ask only when the span stack is not enough.
    #[serde(default)]
    backtrace: bool,
}

fn default_max_hits() -> u32 {
    action_bounds::DEFAULT_MAX_HITS
}

fn default_timeout() -> u64 {
    action_bounds::DEFAULT_WAIT_SECS
}

fn yes() -> bool {
    true
}

/// Severity of a dynamic log line.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

/// Where dynamic log lines go.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum LogDestination {
    /// Stored by the broker, read with get_action.
    #[default]
    Broker,
    /// The service's own log output.
    App,
    /// Both.
    Both,
}

/// Arguments of `place_log` (the logs-and-metrics contract).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PlaceLogArgs {
    /// Target these agents (ids from list_agents). Give either this or `pool`/`tags`.
    #[serde(default)]
    agent_ids: Vec<String>,
    /// Target every agent in this pool.
    pool: Option<String>,
    /// Only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// Source file or path suffix (with `line`; or give `function`).
    file: Option<String>,
    /// 1-based line.
    #[schemars(range(min = 1))]
    line: Option<u32>,
    /// Instead of `file` and `line`: a function (Python `module:qualname`) or span (Rust
    /// span name): one line per call, written when it ends, whose template may read the
    /// arguments, `return` and `duration_ms`.
    function: Option<String>,
    /// The line to emit, with `{expression}` placeholders, e.g. `order {order.id} total {total_cents}`.
    template: String,
    /// Level of the emitted line.
    #[serde(default)]
    level: LogLevel,
    /// Emit only when this expression is true.
    condition: Option<String>,
    /// Where the lines go.
    #[serde(default)]
    destination: LogDestination,
    /// Seconds the log stays live.
    #[serde(default = "default_expire")]
    #[schemars(range(min = 1, max = 86400))]
    expire_seconds: u64,
    /// Stop after this many lines.
    #[schemars(range(min = 1, max = 1000000))]
    max_lines: Option<u64>,
    /// Run only where the service runs this version or build (git commit, or a prefix of
    /// at least 7 characters), as list_agents shows it; other agents refuse the action and
    /// the answer counts both.
    expected_version: Option<String>,
    /// Run only where the file's content hash is this (`sha256:<hex>`, as list_sources
    /// shows it, or as `sha256sum` prints it for your checkout).
    file_hash: Option<String>,
    /// Accept a line no agent has reported yet (code that has not run since the agent started).
    #[serde(default)]
    allow_pending: bool,
}

fn default_expire() -> u64 {
    action_bounds::DEFAULT_EXPIRE_SECS
}

/// What a dynamic metric measures.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum MetricKind {
    /// Times the location is hit.
    Counter,
    /// Time from `file:line` to `end_file:end_line` (or a span's duration).
    Duration,
    /// A numeric `expression` sampled at each hit.
    Value,
}

/// Arguments of `place_metric` (the logs-and-metrics contract).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PlaceMetricArgs {
    /// Target these agents (ids from list_agents). Give either this or `pool`/`tags`.
    #[serde(default)]
    agent_ids: Vec<String>,
    /// Target every agent in this pool.
    pool: Option<String>,
    /// Only agents carrying every one of these tags.
    #[serde(default)]
    tags: Vec<String>,
    /// What to measure.
    kind: MetricKind,
    /// Source file or path suffix (with `line`; or give `function`).
    file: Option<String>,
    /// 1-based line.
    #[schemars(range(min = 1))]
    line: Option<u32>,
    /// Instead of `file` and `line`: a function (Python `module:qualname`) or span (Rust
    /// span name, optionally after its module path); a `duration` then times each call.
    function: Option<String>,
    /// For `duration`: where the clock stops (file).
    end_file: Option<String>,
    /// For `duration`: where the clock stops (line).
    end_line: Option<u32>,
    /// For `value`: the numeric expression to sample.
    expression: Option<String>,
    /// Count or sample only when this expression is true.
    condition: Option<String>,
    /// Seconds the metric stays live.
    #[serde(default = "default_expire")]
    #[schemars(range(min = 1, max = 86400))]
    expire_seconds: u64,
    /// Run only where the service runs this version or build (git commit, or a prefix of
    /// at least 7 characters), as list_agents shows it; other agents refuse the action and
    /// the answer counts both.
    expected_version: Option<String>,
    /// Run only where the file's content hash is this (`sha256:<hex>`, as list_sources
    /// shows it, or as `sha256sum` prints it for your checkout).
    file_hash: Option<String>,
    /// Accept a line no agent has reported yet (code that has not run since the agent started).
    #[serde(default)]
    allow_pending: bool,
}

impl LogLevel {
    fn name(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl LogDestination {
    fn name(self) -> &'static str {
        match self {
            LogDestination::Broker => "broker",
            LogDestination::App => "app",
            LogDestination::Both => "both",
        }
    }
}

impl MetricKind {
    fn name(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Duration => "duration",
            MetricKind::Value => "value",
        }
    }
}

/// Arguments of `get_action`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetActionArgs {
    /// The action's id (`act_…`), from place_snapshot or list_actions.
    action_id: String,
    /// Return only hits after this cursor: 0 for all, or the `next_cursor` of the previous call.
    #[serde(default)]
    since: u64,
    /// Most hits to return.
    #[serde(default = "default_hits_page")]
    #[schemars(range(min = 1, max = 200))]
    limit: usize,
    /// Wait up to this many seconds for a hit after `since` before answering (0: answer at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 600))]
    wait_seconds: u64,
}

fn default_hits_page() -> usize {
    action_bounds::MAX_MAX_HITS as usize
}

/// An action's overall state.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum StatusArg {
    /// Live, collecting hits.
    Active,
    /// Collected all its hits.
    Completed,
    /// Reached its expiry.
    Expired,
    /// Removed by a caller.
    Removed,
}

impl From<StatusArg> for ActionStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Active => ActionStatus::Active,
            StatusArg::Completed => ActionStatus::Completed,
            StatusArg::Expired => ActionStatus::Expired,
            StatusArg::Removed => ActionStatus::Removed,
        }
    }
}

/// Arguments of `list_actions`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListActionsArgs {
    /// Only actions in this state.
    status: Option<StatusArg>,
    /// Only actions aimed at this agent id, pool or tag.
    target: Option<String>,
    /// Only actions placed by this key name (yours is in system_health).
    created_by: Option<String>,
    /// `next_cursor` from the previous page.
    cursor: Option<String>,
    /// Actions per page.
    #[serde(default = "default_actions_page")]
    #[schemars(range(min = 1, max = 200))]
    limit: usize,
}

fn default_actions_page() -> usize {
    query::DEFAULT_PAGE
}

/// Arguments of `remove_action`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RemoveActionArgs {
    /// The action's id (`act_…`).
    action_id: String,
}

#[tool_router(router = actions_router, vis = "pub(super)")]
impl PeriscopeMcp {
    #[tool(
        description = "Capture the values at a code location the next time it runs: the event or span fields (the \
                       locals there), the span stack with its fields, and watch values; objects are cut at depth 3 \
                       and PII/secrets redacted, with markers. Target `agent_ids`, or `pool` (+ `tags`); `file` and \
                       `line` come from list_sources. `max_hits` 1-50 (default 1). `timeout_seconds` 1-600 (default \
                       60) is how long the snapshot lives and how long the call waits. With `wait` (default true) \
                       the call returns the hits, or an `expired` error if none came; with wait=false it returns the \
                       action_id at once, then read hits with get_action. Example: {\"pool\": \"shop\", \"file\": \
                       \"src/orders.rs\", \"line\": 42, \"max_hits\": 3}. Instead of `file` and `line`, \
                       `function` probes whole calls of a function (Python `module:qualname`) or span (Rust span \
                       name; list_sources shows it as function=...): one hit per call with the arguments at entry, \
                       `return` or the error/exception, and `call.duration_ms`; `min_duration_ms` keeps only calls at \
                       least that slow, e.g. {\"pool\": \"shop\", \"function\": \"checkout\", \"min_duration_ms\": 250}.",
        input_schema = input_schema::<PlaceSnapshotArgs>(),
        output_schema = super::schemas::action_with_hits(),
        annotations(read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = false)
    )]
    async fn place_snapshot(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.snapshot(&ctx, args).await).await
    }

    #[tool(
        description = "Emit a log line every time a code location runs, without redeploying: `template` with \
                       {expression} placeholders (values are redacted like snapshot values), `level` (default info), \
                       optional `condition`, `destination` broker (default; read the lines with get_action), app \
                       (the service's own log output) or both, `expire_seconds` (default 3600, max 86400), optional \
                       `max_lines`. Rate-limited per agent (50 lines/s, 20 KiB/s); when the budget is spent the log \
                       pauses and resumes by itself. Returns the action_id at once. Example: {\"pool\": \"shop\", \
                       \"file\": \"src/shop.rs\", \"line\": 120, \"template\": \"order {order_id} total \
                       {total_cents}\"}.",
        input_schema = input_schema::<PlaceLogArgs>(),
        output_schema = super::schemas::action_with_lines(),
        annotations(read_only_hint = false, destructive_hint = false, open_world_hint = false)
    )]
    async fn place_log(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.log(&ctx, args).await).await
    }

    #[tool(
        description = "Measure a code location over time, without redeploying: `kind` counter (how often it runs), \
                       duration (how long a span at file:line stays open, each call of a `function` (Python \
                       `module:qualname`, Rust span name) instead of file and line, or the time from file:line to \
                       end_file:end_line) or value (a numeric `expression` sampled each time it runs), optional \
                       `condition`, `expire_seconds` (default 3600, max 86400). Agents aggregate locally and report \
                       every few seconds; get_action returns count, sum, min, max, p50/p90/p99 (durations in ms), \
                       per agent and in total, with a short time series; the broker's /metrics endpoint exports them \
                       to Prometheus. Returns the action_id at once. Example: {\"pool\": \"shop\", \"kind\": \
                       \"duration\", \"file\": \"src/shop.rs\", \"line\": 400}.",
        input_schema = input_schema::<PlaceMetricArgs>(),
        output_schema = super::schemas::action_only(),
        annotations(read_only_hint = false, destructive_hint = false, open_world_hint = false)
    )]
    async fn place_metric(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.metric(&ctx, args).await).await
    }

    #[tool(
        description = "Read one action: its status, each agent's state (pending, installed, error, offline, \
                       completed, or paused with a reason: quota_cpu, quota_log, rate_limited, expired), its remaining \
                       budgets (`quota`), and its hits after `since` (0 for all). Pass the returned `next_cursor` \
                       as `since` next time to get only new hits; `wait_seconds` (0-600, default 0) waits for a new \
                       hit before answering. Hits carry agent, time, location, fields, span stack, watches, \
                       truncation markers and which redaction rules fired where. Example: {\"action_id\": \
                       \"act_…\", \"since\": 0}.",
        input_schema = input_schema::<GetActionArgs>(),
        output_schema = super::schemas::get_action(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_action(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.action(&ctx, args).await).await
    }

    #[tool(
        description = "List actions, newest first, filtered by `status` (active, completed, expired, removed), \
                       `target` (an agent id, pool or tag) and `created_by` (a key name; yours is in \
                       system_health). Use it to find an action_id again, or to see what holds your live-action quota \
                       (20 per key by default). Paginated: pass `next_cursor` as `cursor` while `has_more`. Example: \
                       {\"status\": \"active\"}.",
        input_schema = input_schema::<ListActionsArgs>(),
        output_schema = super::schemas::list_actions(),
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_actions(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.actions(&ctx, args).await).await
    }

    #[tool(
        description = "Stop an action now, on every agent, and free its quota slot; its hits stay readable with \
                       get_action. Removing an action that already ended changes nothing and returns it. Example: \
                       {\"action_id\": \"act_…\"}.",
        input_schema = input_schema::<RemoveActionArgs>(),
        output_schema = super::schemas::action_only(),
        annotations(read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn remove_action(&self, ctx: RequestContext<RoleServer>, args: JsonObject) -> CallToolResult {
        self.finish(self.remove(&ctx, args).await).await
    }
}

impl PeriscopeMcp {
    pub(super) async fn snapshot(
        &self,
        ctx: &RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "place_snapshot")?;
        let a: PlaceSnapshotArgs = parse_args("place_snapshot", args)?;
        // Limits first, before anything is placed (or a wait slot taken); never clamped.
        // The request checks its own bounds again; the wait's is this tool's.
        in_range(
            "timeout_seconds",
            a.timeout_seconds,
            1,
            action_bounds::MAX_WAIT_SECS,
            action_bounds::DEFAULT_WAIT_SECS,
        )?;
        let req = SnapshotRequest {
            agent_ids: a.agent_ids,
            pool: a.pool,
            tags: a.tags,
            file: a.file,
            line: a.line,
            function: a.function,
            min_duration_ms: a.min_duration_ms,
            condition: a.condition,
            watch: a.watch,
            max_hits: Some(a.max_hits),
            expire_seconds: Some(a.timeout_seconds),
            backtrace: a.backtrace,
            allow_pending: a.allow_pending,
            expected_version: a.expected_version,
            file_hash: a.file_hash,
        };
        let engine = &self.state.engine;
        // A blocking call holds one of the key's wait slots from before placement (a
        // refusal places nothing) until it answers.
        let wait_for = Duration::from_secs(a.timeout_seconds);
        let _slot = if a.wait {
            Some(self.state.callers.begin_wait(&principal, tokio::time::Instant::now() + wait_for).await?)
        } else {
            None
        };
        let placed = engine.place_snapshot(req, &principal).await?;
        let id = placed.action_id.to_string();
        if !a.wait {
            let text = format!(
                "Placed {}. Read its hits with get_action {{\"action_id\": \"{id}\", \"since\": 0}} (add \
                 \"wait_seconds\" to wait for one); it expires in {} s.\n{}",
                placed.action_id,
                a.timeout_seconds,
                render::action_summary(&placed, now_ms())
            );
            return Ok(success(
                text,
                serde_json::json!({ "action": placed, "hits": [], "next_cursor": 0, "has_more": false }),
            ));
        }

        let deadline = tokio::time::Instant::now() + wait_for;
        let max_hits = u64::from(a.max_hits);
        let done = move |act: &ActionRecord| act.hits >= max_hits || act.all_agents_failed();
        let waited = match ctx.meta.get_progress_token() {
            None => {
                tokio::select! {
                    r = engine.wait_until(&id, deadline, &principal, done) => r,
                    _ = ctx.ct.cancelled() => return Err(cancelled()),
                }
            }
            Some(token) => {
                // The engine reports progress synchronously, under no lock we may await in;
                // a small channel carries it to the task that sends notifications.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, u32)>(action_bounds::MAX_MAX_HITS as usize + 2);
                let wait = engine.wait_with_progress(&id, deadline, &principal, done, move |hits, max| {
                    let _ = tx.try_send((hits, max));
                });
                let peer = ctx.peer.clone();
                let forward = async move {
                    while let Some((hits, max)) = rx.recv().await {
                        let note = ProgressNotificationParam::new(token.clone(), hits as f64)
                            .with_total(f64::from(max))
                            .with_message(format!("{hits} of {max} hit(s) collected"));
                        if peer.notify_progress(note).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    (r, ()) = async { tokio::join!(wait, forward) } => r,
                    _ = ctx.ct.cancelled() => return Err(cancelled()),
                }
            }
        };
        waited?;
        self.state.recheck(&principal).await?;
        self.after_wait(&id, a.max_hits, a.timeout_seconds, &principal).await
    }

    /// What a waiting `place_snapshot` answers once its wait ends.
    pub(super) async fn after_wait(
        &self,
        id: &str,
        max_hits: u32,
        timeout: u64,
        principal: &Principal,
    ) -> Result<CallToolResult, ApiError> {
        let engine = &self.state.engine;
        // The wait ends when the snapshot's life does: end it now rather than at the next
        // housekeeping tick, so the answer and the caller's quota agree.
        engine.expire_due().await;
        let view = engine.get(id, principal).await?;
        let page = engine.hits(id, 0, action_bounds::MAX_MAX_HITS as usize, principal).await?;
        let got = page.hits.len();
        if got == 0 {
            let failed: Vec<serde_json::Value> = view
                .agents
                .iter()
                .filter(|s| s.state == AgentState::Error)
                .map(|s| serde_json::json!({ "agent_id": s.agent_id, "display_name": s.display_name, "reason": s.detail }))
                .collect();
            if !view.agents.is_empty() && failed.len() == view.agents.len() {
                let reasons: Vec<String> = view
                    .agents
                    .iter()
                    .map(|s| format!("{}: {}", s.display_name, s.detail.as_deref().unwrap_or("no reason given")))
                    .collect();
                let view = engine.remove(id, principal).await.unwrap_or(view);
                return Err(ApiError::new(
                    ErrorCode::AgentError,
                    format!(
                        "every targeted agent refused the snapshot at {} ({}); it was removed. Pick another \
                         location with list_sources, or target other agents",
                        view.location,
                        reasons.join("; ")
                    ),
                )
                .with_details(serde_json::json!({ "action_id": view.action_id, "agents": failed })));
            }
            if *self.state.shutdown.borrow() {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("the broker is shutting down; call get_action {{\"action_id\": \"{id}\"}} once it is back"),
                ));
            }
            if view.status == ActionStatus::Removed {
                let text = format!("{id} was removed (by remove_action) before any hit arrived; no hits.");
                return Ok(success(text, action_body(&view, &page)));
            }
            return Err(ApiError::new(
                ErrorCode::Expired,
                format!(
                    "no hit arrived at {} within {timeout} s, so the snapshot expired. The code there may not \
                     have run: check list_sources for how often that location is hit, drop or loosen the \
                     condition, pick a line that runs more often, or place it again with a longer \
                     timeout_seconds (max 600) or wait=false and poll get_action",
                    view.location
                ),
            )
            .with_details(serde_json::json!({ "action": view })));
        }
        let mut text = if (got as u32) < max_hits {
            format!(
                "{got} of {max_hits} hit(s) arrived at {} before the snapshot {} after {timeout} s:\n",
                view.location,
                if view.status == ActionStatus::Removed { "was removed" } else { "expired" }
            )
        } else {
            format!("{got} hit(s) at {}:\n", view.location)
        };
        text.push_str(&render::hit_lines(&page.hits));
        text.push_str(&format!(
            "Full values are in structuredContent; get_action {{\"action_id\": \"{id}\", \"since\": {}}} returns \
             later hits.",
            page.next_cursor
        ));
        Ok(success(text, action_body(&view, &page)))
    }

    async fn log(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "place_log")?;
        let a: PlaceLogArgs = parse_args("place_log", args)?;
        let req = LogRequest {
            agent_ids: a.agent_ids,
            pool: a.pool,
            tags: a.tags,
            file: a.file,
            line: a.line,
            function: a.function,
            template: a.template,
            level: Some(a.level.name().to_owned()),
            condition: a.condition,
            destination: Some(a.destination.name().to_owned()),
            expire_seconds: Some(a.expire_seconds),
            max_lines: a.max_lines,
            allow_pending: a.allow_pending,
            expected_version: a.expected_version,
            file_hash: a.file_hash,
        };
        let view = self.state.engine.place_log(req, &principal).await?;
        let text = format!(
            "Placed log {} at {}; it lives {} s. Read its lines with get_action {{\"action_id\": \"{}\", \
             \"since\": 0, \"wait_seconds\": 10}}.\n{}",
            view.action_id,
            view.location,
            a.expire_seconds,
            view.action_id,
            render::action_summary(&view, now_ms())
        );
        Ok(success(text, serde_json::json!({ "action": view, "lines": [], "next_cursor": 0, "has_more": false })))
    }

    async fn metric(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "place_metric")?;
        let a: PlaceMetricArgs = parse_args("place_metric", args)?;
        let req = MetricRequest {
            agent_ids: a.agent_ids,
            pool: a.pool,
            tags: a.tags,
            kind: a.kind.name().to_owned(),
            file: a.file,
            line: a.line,
            function: a.function,
            end_file: a.end_file,
            end_line: a.end_line,
            expression: a.expression,
            condition: a.condition,
            expire_seconds: Some(a.expire_seconds),
            allow_pending: a.allow_pending,
            expected_version: a.expected_version,
            file_hash: a.file_hash,
        };
        let view = self.state.engine.place_metric(req, &principal).await?;
        let text = format!(
            "Placed {} metric {} at {}; agents report every 5 s. Read its figures with get_action \
             {{\"action_id\": \"{}\"}}.\n{}",
            a.kind.name(),
            view.action_id,
            view.location,
            view.action_id,
            render::action_summary(&view, now_ms())
        );
        Ok(success(text, serde_json::json!({ "action": view })))
    }

    async fn action(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "get_action")?;
        let a: GetActionArgs = parse_args("get_action", args)?;
        check_limit(a.limit, query::MAX_PAGE, action_bounds::MAX_MAX_HITS as usize)?;
        check_wait_seconds("wait_seconds", a.wait_seconds)?;
        let engine = &self.state.engine;
        // The view first: its `not_found` says where to find action ids.
        let first = engine.get(&a.action_id, &principal).await?;
        let _slot = if a.wait_seconds > 0 && first.kind != "metric" {
            Some(
                self.state
                    .callers
                    .begin_wait(&principal, tokio::time::Instant::now() + Duration::from_secs(a.wait_seconds))
                    .await?,
            )
        } else {
            None
        };
        if first.kind == "log" {
            return self.log_lines(ctx, &a, &principal).await;
        }
        if first.kind == "metric" {
            let text = format!("{}\n{}", render::action_summary(&first, now_ms()), render::figures(&first));
            return Ok(success(text, serde_json::json!({ "action": first })));
        }
        let page = if a.wait_seconds == 0 {
            engine.hits(&a.action_id, a.since, a.limit, &principal).await?
        } else {
            let wait = Duration::from_secs(a.wait_seconds);
            let page = tokio::select! {
                r = engine.wait_hits(&a.action_id, a.since, a.limit, wait, &principal) => r?,
                _ = ctx.ct.cancelled() => return Err(cancelled()),
            };
            self.state.recheck(&principal).await?;
            page
        };
        let view = engine.get(&a.action_id, &principal).await?;
        let mut text = render::action_summary(&view, now_ms());
        text.push('\n');
        if page.hits.is_empty() {
            text.push_str(&format!("No hits after cursor {}.", a.since));
        } else {
            text.push_str(&format!("{} hit(s) after cursor {}:\n", page.hits.len(), a.since));
            text.push_str(&render::hit_lines(&page.hits));
        }
        text.push_str(&format!(
            "\nnext_cursor={}{}",
            page.next_cursor,
            if page.has_more { " (more hits stored: call again with since=next_cursor)" } else { "" }
        ));
        Ok(success(text, action_body(&view, &page)))
    }

    /// `get_action` for a dynamic log: its lines after `since`.
    async fn log_lines(
        &self,
        ctx: &RequestContext<RoleServer>,
        a: &GetActionArgs,
        principal: &Principal,
    ) -> Result<CallToolResult, ApiError> {
        let engine = &self.state.engine;
        let page = if a.wait_seconds == 0 {
            engine.lines(&a.action_id, a.since, a.limit, principal).await?
        } else {
            let wait = Duration::from_secs(a.wait_seconds);
            let page = tokio::select! {
                r = engine.wait_lines(&a.action_id, a.since, a.limit, wait, principal) => r?,
                _ = ctx.ct.cancelled() => return Err(cancelled()),
            };
            self.state.recheck(principal).await?;
            page
        };
        let view = engine.get(&a.action_id, principal).await?;
        let mut text = render::action_summary(&view, now_ms());
        text.push('\n');
        if page.lines.is_empty() {
            text.push_str(&format!("No lines after cursor {}.", a.since));
        } else {
            text.push_str(&format!("{} line(s) after cursor {}:\n", page.lines.len(), a.since));
            text.push_str(&render::log_lines(&page.lines));
        }
        text.push_str(&format!(
            "\nnext_cursor={}{}",
            page.next_cursor,
            if page.has_more { " (more lines stored: call again with since=next_cursor)" } else { "" }
        ));
        let body = serde_json::json!({
            "action": view,
            "lines": page.lines,
            "next_cursor": page.next_cursor,
            "has_more": page.has_more,
            "dropped": page.dropped,
        });
        Ok(success(text, body))
    }

    async fn actions(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "list_actions")?;
        let a: ListActionsArgs = parse_args("list_actions", args)?;
        let (offset, limit) = query::paging(a.cursor.as_deref(), Some(a.limit))?;
        let filter =
            ActionFilter { status: a.status.map(ActionStatus::from), target: a.target, created_by: a.created_by };
        let all = self.state.engine.list(&filter, &principal).await?;
        let total = all.len();
        let end = offset.saturating_add(limit).min(total);
        let items: Vec<ActionView> = all.into_iter().skip(offset).take(limit).collect();
        let next_cursor = (end < total).then(|| end.to_string());
        let now = now_ms();
        let mut text = if items.is_empty() {
            "No actions match.".to_owned()
        } else {
            format!(
                "{} of {total} action(s){}:\n",
                items.len(),
                match &next_cursor {
                    Some(c) => format!(" (more: pass cursor=\"{c}\")"),
                    None => String::new(),
                }
            )
        };
        for v in &items {
            text.push_str(&render::action_summary(v, now));
            text.push('\n');
        }
        let body = serde_json::json!({
            "items": items,
            "next_cursor": next_cursor,
            "has_more": end < total,
            "total": total,
        });
        Ok(success(text, body))
    }

    async fn remove(&self, ctx: &RequestContext<RoleServer>, args: JsonObject) -> Result<CallToolResult, ApiError> {
        let principal = self.begin(ctx, "remove_action")?;
        let a: RemoveActionArgs = parse_args("remove_action", args)?;
        let view = self.state.engine.remove(&a.action_id, &principal).await?;
        let text = format!("Removed. {}", render::action_summary(&view, now_ms()));
        Ok(success(text, serde_json::json!({ "action": view })))
    }
}

/// The structured answer for an action and a page of its hits.
fn action_body(view: &ActionView, page: &HitsPage) -> serde_json::Value {
    serde_json::json!({
        "action": view,
        "hits": page.hits,
        "next_cursor": page.next_cursor,
        "has_more": page.has_more,
    })
}

fn cancelled() -> ApiError {
    ApiError::new(ErrorCode::Internal, "the call was cancelled by the client")
}
