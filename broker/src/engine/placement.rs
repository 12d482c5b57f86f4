//! Placing an action: whom it targets (within the caller's reach), which online agents
//! that is, whether they know the location (or the caller accepts a pending one), and
//! its insertion under the key's and the organization's live-action budgets. Then the
//! agents are told, the placement audited.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use periscope_protocol::{
    ActionKind, ActionSpec, AgentId, BrokerMessage, CatalogEntry, FunctionTarget, Location, LocationKind, MetricKind,
};

use super::Engine;
use super::model::{ActionRecord, ActionStatus, ActionView, AgentActionView, Target};
use super::requests::{LogRequest, MetricRequest, Placement, SnapshotRequest};
use crate::audit::AuditKind;
use crate::auth::{Principal, Reach};
use crate::backend::{LiveLimits, LiveRefusal};
use crate::error::{ApiError, ErrorCode};
use crate::keys::Tenancy;
use crate::time::now_ms;

/// An online agent an action is sent to: id, display name, pool.
type Aimed = (AgentId, String, String);

/// What a location lookup over a set of agents found.
enum LocationMatch {
    /// At least one callsite at this file and line, of these kinds.
    Found(Vec<LocationKind>),
    /// The file is known but not the line; nearest known locations in it.
    Nearest(Vec<CatalogEntry>),
    /// No target agent has reported the file; some known files that look alike.
    UnknownFile(Vec<String>),
    /// The suffix matches several different files.
    Ambiguous(Vec<String>),
}

fn truncate(s: &str) -> String {
    periscope_protocol::value::truncate_chars(s, 512).to_owned()
}

impl Engine {
    /// Validates and places a snapshot; returns its view.
    pub async fn place_snapshot(&self, req: SnapshotRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        let (spec, placement) = req.validate()?;
        self.place(spec, placement, caller).await
    }

    /// Validates and places a dynamic log; returns its view.
    pub async fn place_log(&self, req: LogRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        let (spec, placement) = req.validate()?;
        self.place(spec, placement, caller).await
    }

    /// Validates and places a dynamic metric; returns its view.
    pub async fn place_metric(&self, req: MetricRequest, caller: &Principal) -> Result<ActionView, ApiError> {
        let (spec, placement) = req.validate(self.metric_interval_ms)?;
        self.place(spec, placement, caller).await
    }

    /// What every kind shares: target, location, then insertion.
    async fn place(&self, mut spec: ActionSpec, p: Placement, caller: &Principal) -> Result<ActionView, ApiError> {
        let target = self.resolve_target(&p.agent_ids, p.pool.as_deref(), &p.tags, caller)?;
        let agents = self.matching_agents(&target, &caller.reach, &caller.tenancy);
        if agents.is_empty() {
            return Err(self.no_matching_agents(&target, caller));
        }
        let what = spec.kind.name();
        if spec.function.is_some() {
            let pending_note = self.check_function(&agents, &mut spec, p.allow_pending, what)?;
            return self.insert(spec, target, caller, pending_note, agents).await;
        }
        let mut pending_note = self.check_location(&agents, &spec.location, p.allow_pending, what)?;
        if let ActionKind::Metric(m) = &spec.kind {
            if let Some(end) = &m.end_location {
                if let Some(note) = self.check_location(&agents, end, p.allow_pending, what)? {
                    pending_note = Some(note);
                }
            } else if m.metric == MetricKind::Duration
                && let LocationMatch::Found(kinds) = self.find_location(&agents, &spec.location)
                && !kinds.contains(&LocationKind::Span)
            {
                return Err(ApiError::invalid(format!(
                    "{} is an event, which has no duration; place the duration on a span location (see \
                     list_sources, kind span), or give end_file and end_line to time from this event to another \
                     location",
                    spec.location
                )));
            }
        }
        let mut pools: Vec<&str> = agents.iter().map(|(_, _, pool)| pool.as_str()).collect();
        pools.extend(target.pool.as_deref());
        self.check_not_paused(caller.org(), &pools)?;
        self.check_blocklist(&spec, &agents, caller)?;
        let code_check = match &spec.expect {
            Some(expect) => Some(self.check_code(expect, &spec.location, &agents)?),
            None => None,
        };
        let mut view = self.insert(spec, target, caller, pending_note, agents).await?;
        view.code_check = code_check;
        Ok(view)
    }

    /// Checks a location against the target agents' catalogs: `Ok(None)` when known,
    /// `Ok(Some(note))` when accepted as pending, the specific error otherwise.
    fn check_location(
        &self,
        agents: &[Aimed],
        location: &Location,
        allow_pending: bool,
        what: &str,
    ) -> Result<Option<String>, ApiError> {
        match self.find_location(agents, location) {
            LocationMatch::Found(_) => Ok(None),
            LocationMatch::Ambiguous(files) => Err(ApiError::invalid(format!(
                "file `{}` matches several files: {}; give more of the path",
                location.file,
                files.join(", ")
            ))
            .with_details(serde_json::json!({ "candidates": files }))),
            LocationMatch::Nearest(nearest) if !allow_pending => Err(no_such_location(location, nearest)),
            LocationMatch::UnknownFile(files) if !allow_pending => Err(ApiError::new(
                ErrorCode::NoSuchLocation,
                format!(
                    "no target agent has reported any location in a file matching `{}`; use list_sources to \
                     find inspectable locations, or pass allow_pending=true if that code has simply not run yet",
                    location.file
                ),
            )
            .with_details(serde_json::json!({ "similar_files": files, "nearest": [] }))),
            LocationMatch::Nearest(_) | LocationMatch::UnknownFile(_) => Ok(Some(format!(
                "no target agent has seen code run at {location} yet; the {what} is armed and will start once a \
                 callsite there registers"
            ))),
        }
    }

    /// Checks a function probe's target against the target agents' catalogs (spans of
    /// `tracing` agents, functions of whole-file catalogs), and completes it: `location`
    /// becomes where the function is, and a name found in one module only gets that
    /// module, so agents match exactly what the caller was shown. `Ok(Some(note))` when
    /// accepted as pending; unknown or ambiguous names are refused with the candidates.
    fn check_function(
        &self,
        agents: &[Aimed],
        spec: &mut ActionSpec,
        allow_pending: bool,
        what: &str,
    ) -> Result<Option<String>, ApiError> {
        let Some(function) = spec.function.clone() else { return Ok(None) };
        let found = self.find_function(agents, &function);
        let mut modules: Vec<&str> = found.iter().filter_map(|f| f.module.as_deref()).collect();
        modules.sort_unstable();
        modules.dedup();
        if found.is_empty() {
            let similar = self.similar_functions(agents, &function);
            if allow_pending && (function.module.is_some() || similar.is_empty()) {
                return Ok(Some(format!(
                    "no target agent has loaded function {function} yet; the {what} is armed and will start once it \
                     loads"
                )));
            }
            let hint = if similar.is_empty() {
                "list_sources shows the functions and spans agents know".to_owned()
            } else {
                format!("similar names: {}", similar.iter().map(|f| f.label()).collect::<Vec<_>>().join(", "))
            };
            return Err(ApiError::new(
                ErrorCode::NoSuchLocation,
                format!(
                    "no target agent knows a function or span `{}`; {hint}. Pass allow_pending=true (with the \
                     module) if that code has simply not loaded yet",
                    truncate(&function.to_string())
                ),
            )
            .with_details(serde_json::json!({
                "suggestions": similar.iter().map(FoundFunction::json).collect::<Vec<_>>(),
            })));
        }
        if function.module.is_none() && modules.len() > 1 {
            let candidates: Vec<String> = modules
                .iter()
                .map(|m| format!("{}", FunctionTarget { module: Some((*m).to_owned()), ..(*function).clone() }))
                .collect();
            return Err(ApiError::invalid(format!(
                "`{}` names functions in several modules: {}; say which",
                truncate(&function.name),
                candidates.join(", ")
            ))
            .with_details(serde_json::json!({ "candidates": candidates })));
        }
        let first = &found[0];
        if let Some(f) = &mut spec.function
            && f.module.is_none()
            && let [module] = modules.as_slice()
        {
            f.module = Some((*module).to_owned());
        }
        spec.location = Location { file: first.file.clone(), line: first.line };
        Ok(None)
    }

    /// The spans and functions of the agents' catalogs that `function` names.
    fn find_function(&self, agents: &[Aimed], function: &FunctionTarget) -> Vec<FoundFunction> {
        let mut out = Vec::new();
        self.each_function(agents, |f| {
            if function.matches(&f.name, f.module.as_deref()) && out.len() < 100 {
                out.push(f);
            }
        });
        out.sort_by(|a, b| (&a.module, &a.file, a.line).cmp(&(&b.module, &b.file, b.line)));
        out.dedup_by(|a, b| a.module == b.module && a.file == b.file && a.line == b.line);
        out
    }

    /// Up to five known functions whose names look like `function`'s, nearest first.
    fn similar_functions(&self, agents: &[Aimed], function: &FunctionTarget) -> Vec<FoundFunction> {
        let wanted = function.name.to_ascii_lowercase();
        let short = wanted.rsplit('.').next().unwrap_or(&wanted).to_owned();
        let mut scored: Vec<(usize, FoundFunction)> = Vec::new();
        let mut seen = 0usize;
        self.each_function(agents, |f| {
            seen += 1;
            if seen > 50_000 {
                return;
            }
            let name = f.name.to_ascii_lowercase();
            let last = name.rsplit('.').next().unwrap_or(&name);
            let score = if name.contains(&short) || short.contains(last) { 0 } else { edit_distance(last, &short) };
            if score <= (short.len() / 3).max(2) {
                scored.push((score, f));
            }
        });
        scored.sort_by(|a, b| (a.0, &a.1.name, &a.1.module).cmp(&(b.0, &b.1.name, &b.1.module)));
        scored.dedup_by(|a, b| a.1.name == b.1.name && a.1.module == b.1.module);
        scored.into_iter().take(5).map(|(_, f)| f).collect()
    }

    /// Calls `f` with every span callsite and every function the agents' catalogs hold.
    fn each_function(&self, agents: &[Aimed], mut f: impl FnMut(FoundFunction)) {
        for (id, _, _) in agents {
            self.registry.with(id, |rec| {
                for (e, _) in rec.catalog.iter().filter(|(e, _)| e.kind == LocationKind::Span) {
                    f(FoundFunction {
                        name: e.name.clone(),
                        module: e.module.clone(),
                        file: e.file.clone(),
                        line: e.line,
                    });
                }
                for file in rec.catalog.files() {
                    for func in &file.functions {
                        f(FoundFunction {
                            name: func.name.clone(),
                            module: file.module.clone(),
                            file: file.file.clone(),
                            line: func.line,
                        });
                    }
                }
            });
        }
    }

    /// Inserts the action under the key's quota and its organization's ceiling (checked
    /// together by the store: concurrent placements cannot both take the last slot),
    /// then tells the agents.
    pub(super) async fn insert(
        &self,
        spec: ActionSpec,
        target: Target,
        caller: &Principal,
        pending_note: Option<String>,
        agents: Vec<Aimed>,
    ) -> Result<ActionView, ApiError> {
        let now = now_ms();
        let mut statuses = BTreeMap::new();
        let mut pools: BTreeSet<String> = target.pool.iter().cloned().collect();
        for (agent_id, name, pool) in &agents {
            pools.insert(pool.clone());
            statuses
                .insert(agent_id.clone(), AgentActionView::pending(agent_id.clone(), name.clone(), pool.clone(), now));
        }
        let record = ActionRecord {
            spec: spec.clone(),
            target,
            org: caller.org().to_owned(),
            reach: caller.reach.clone(),
            pools,
            created_by: caller.name.clone(),
            created_by_key: caller.key_id.clone(),
            created_at_ms: now,
            pending_note,
            status: ActionStatus::Active,
            ended_at_ms: None,
            end_reason: None,
            agents: statuses,
            hits: 0,
            hits_refused: 0,
            lines: 0,
            rules_fired: BTreeMap::new(),
            pauses: BTreeMap::new(),
            pause_last_ms: BTreeMap::new(),
            dropped: Default::default(),
            redacted_reads: 0,
        };
        let limits =
            LiveLimits { per_key: caller.quotas.live_actions as usize, per_org: self.org_quotas.live_actions as usize };
        let mut view = record.view();
        if matches!(spec.kind, ActionKind::Metric(_)) {
            view.figures = Some(crate::telemetry::MetricData::default().view(
                match &spec.kind {
                    ActionKind::Metric(m) => m.metric,
                    _ => MetricKind::Counter,
                },
                &record.agent_names(),
            ));
        }
        let mut entry = record.audit(caller.actor(), AuditKind::ActionPlaced);
        entry.hits = None;
        entry.lines = None;
        entry.detail = format!("placed a {} at {}", spec.kind.name(), spec.target_label());
        entry.data = serde_json::json!({
            "agents": agents.iter().map(|(id, _, _)| id).collect::<Vec<_>>(),
            "expires_at_ms": spec.expires_at_ms,
            "max_hits": record.max_hits(),
            "pending": record.pending_note.is_some(),
        });
        if let Err(refusal) = self.actions.insert(record, limits).await? {
            return Err(quota_refusal(refusal, limits, now));
        }
        self.audit(entry);
        for (agent_id, _, _) in agents {
            self.registry.send(&agent_id, BrokerMessage::ActionAdd { action: spec.clone() });
        }
        tracing::info!(action = %spec.id, location = %spec.target_label(), caller = %caller.name, "action placed");
        Ok(view)
    }

    pub(super) fn resolve_target(
        &self,
        agent_ids: &[String],
        pool: Option<&str>,
        tags: &[String],
        caller: &Principal,
    ) -> Result<Target, ApiError> {
        let pool = pool.map(str::trim).filter(|p| !p.is_empty());
        if agent_ids.is_empty() && pool.is_none() && tags.is_empty() {
            return Err(ApiError::invalid(
                "say which agents to target: `agent_ids`, or `pool` (optionally with `tags`), or `tags`; \
                 list_agents shows what is connected",
            ));
        }
        if !agent_ids.is_empty() && (pool.is_some() || !tags.is_empty()) {
            return Err(ApiError::invalid("give either `agent_ids` or `pool`/`tags`, not both"));
        }
        if agent_ids.len() > 100 || tags.len() > 32 {
            return Err(ApiError::invalid("at most 100 agent ids and 32 tags per target"));
        }
        let mut ids = Vec::with_capacity(agent_ids.len());
        for raw in agent_ids {
            let id = AgentId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("agent_ids: {e}")))?;
            // An agent out of the caller's reach answers exactly like one that does not exist.
            let visible = self.registry.with(&id, |a| caller.sees_pool(&a.org, &a.info.pool)).unwrap_or(false);
            if !visible {
                return Err(ApiError::not_found(format!("no agent `{id}` is known; list_agents shows the agents")));
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if let Some(p) = pool {
            let mut known = caller.tenancy.assigned_pools(caller.org()).contains_key(p);
            if !known {
                self.registry.for_each(|a| known |= a.org == caller.org() && a.info.pool == p);
            }
            if !known || !caller.sees_pool(caller.org(), p) {
                return Err(ApiError::not_found(format!(
                    "no pool `{}` is known to your key; list_agents shows the pools you can use",
                    truncate(p)
                ))
                .with_details(serde_json::json!({ "online_pools": self.online_pools(caller) })));
            }
        }
        Ok(Target { agent_ids: ids, pool: pool.map(str::to_owned), tags: tags.to_vec() })
    }

    /// Online agents of the caller's organization the target includes within `reach`,
    /// with display names and pools.
    pub(super) fn matching_agents(&self, target: &Target, reach: &Reach, tenancy: &Tenancy) -> Vec<Aimed> {
        let mut out = Vec::new();
        let mut consider = |a: &crate::registry::AgentRecord| {
            if a.online() && target.includes(a) && reach.allows(&a.org, &a.info.pool, tenancy) {
                out.push((a.info.agent_id.clone(), a.info.display_name.clone(), a.info.pool.clone()));
            }
        };
        if target.agent_ids.is_empty() {
            self.registry.for_each(consider);
        } else {
            // Named agents are looked up, not searched for among every connected agent.
            for id in &target.agent_ids {
                self.registry.with(id, &mut consider);
            }
        }
        out.sort();
        out
    }

    /// Pools with agents online that the caller can see, with their tags.
    fn online_pools(&self, caller: &Principal) -> Vec<serde_json::Value> {
        let mut pools: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        self.registry.for_each(|a| {
            if a.online() && caller.sees_pool(&a.org, &a.info.pool) {
                pools.entry(a.info.pool.clone()).or_default().extend(a.info.tags.iter().cloned());
            }
        });
        pools
            .into_iter()
            .map(|(pool, tags)| {
                let mut tags: Vec<String> = tags.into_iter().collect();
                tags.sort();
                serde_json::json!({ "pool": pool, "tags": tags })
            })
            .collect()
    }

    pub(super) fn no_matching_agents(&self, target: &Target, caller: &Principal) -> ApiError {
        let available = self.online_pools(caller);
        let what = if !target.agent_ids.is_empty() {
            "none of the given agents is online".to_owned()
        } else {
            format!(
                "no online agent is in pool {} with tags [{}]",
                target.pool.as_deref().unwrap_or("(any)"),
                target.tags.join(", ")
            )
        };
        ApiError::new(ErrorCode::NoMatchingAgents, format!("{what}; list_agents shows who is connected"))
            .with_details(serde_json::json!({ "online_pools": available }))
    }

    fn find_location(&self, agents: &[Aimed], location: &Location) -> LocationMatch {
        let mut files: HashSet<String> = HashSet::new();
        let mut in_file: Vec<CatalogEntry> = Vec::new();
        let mut all_files: HashSet<String> = HashSet::new();
        for (id, _, _) in agents {
            self.registry.with(id, |rec| {
                for (e, _) in rec.catalog.iter() {
                    if all_files.len() < 10_000 {
                        all_files.insert(e.file.clone());
                    }
                    if location.file_matches(&e.file) {
                        files.insert(e.file.clone());
                        in_file.push(e.clone());
                    }
                }
                for f in rec.catalog.files() {
                    if all_files.len() < 10_000 {
                        all_files.insert(f.file.clone());
                    }
                    if location.file_matches(&f.file) {
                        files.insert(f.file.clone());
                        in_file.extend(file_locations_near(f, location.line));
                    }
                }
            });
        }
        if files.len() > 1 {
            let mut files: Vec<String> = files.into_iter().collect();
            files.sort();
            return LocationMatch::Ambiguous(files);
        }
        let mut kinds: Vec<LocationKind> = in_file.iter().filter(|e| e.line == location.line).map(|e| e.kind).collect();
        if !kinds.is_empty() {
            kinds.sort();
            kinds.dedup();
            return LocationMatch::Found(kinds);
        }
        if !in_file.is_empty() {
            in_file.sort_by_key(|e| (e.line.abs_diff(location.line), e.line, e.kind));
            in_file.dedup_by(|a, b| a.line == b.line && a.kind == b.kind && a.name == b.name);
            in_file.truncate(5);
            return LocationMatch::Nearest(in_file);
        }
        let base = location.file.rsplit(['/', '\\']).next().unwrap_or(&location.file).to_ascii_lowercase();
        let stem = base.split('.').next().unwrap_or(&base).to_owned();
        let mut similar: Vec<String> = all_files
            .into_iter()
            .filter(|f| {
                let f = f.to_ascii_lowercase();
                !stem.is_empty() && f.contains(&stem)
            })
            .collect();
        similar.sort();
        similar.truncate(10);
        LocationMatch::UnknownFile(similar)
    }
}

/// A function or span as a catalog holds it.
struct FoundFunction {
    name: String,
    module: Option<String>,
    file: String,
    line: u32,
}

impl FoundFunction {
    fn label(&self) -> String {
        let target = FunctionTarget { name: self.name.clone(), module: self.module.clone(), min_duration_ms: None };
        format!("{target} ({}:{})", self.file, self.line)
    }

    fn json(&self) -> serde_json::Value {
        let target = FunctionTarget { name: self.name.clone(), module: self.module.clone(), min_duration_ms: None };
        serde_json::json!({ "function": target.to_string(), "file": self.file, "line": self.line })
    }
}

/// Levenshtein distance over bytes (names are short: at most 255 characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut row = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            row[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(row[j] + 1);
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

/// The `quota_exceeded` answer to a refused insertion: whose budget, its limit, and when
/// the soonest live action frees a slot by expiring.
fn quota_refusal(refusal: LiveRefusal, limits: LiveLimits, now: u64) -> ApiError {
    let retry = |soonest: Option<u64>| soonest.unwrap_or(now).saturating_sub(now).div_ceil(1_000).max(1);
    match refusal {
        LiveRefusal::Key { live, soonest_ms } => {
            let (limit, retry_after) = (limits.per_key, retry(soonest_ms));
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "you already have {live} live actions (the limit is {limit}); remove one with remove_action \
                     (list_actions with status=active shows them), or retry in {retry_after} s when the soonest one \
                     expires"
                ),
            )
            .with_details(serde_json::json!({
                "quota": "live_actions",
                "limit": limit,
                "retry_after_seconds": retry_after,
            }))
        }
        LiveRefusal::Org { live, soonest_ms } => {
            let (limit, retry_after) = (limits.per_org, retry(soonest_ms));
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "your organization already has {live} live actions, its ceiling over all keys \
                     (org_quotas.live_actions); remove one, or retry in {retry_after} s when the soonest one expires"
                ),
            )
            .with_details(serde_json::json!({
                "quota": "org_live_actions",
                "limit": limit,
                "retry_after_seconds": retry_after,
            }))
        }
    }
}

fn no_such_location(location: &Location, nearest: Vec<CatalogEntry>) -> ApiError {
    let list: Vec<String> =
        nearest.iter().map(|e| format!("{}:{} ({} `{}`)", e.file, e.line, kind_word(e.kind), e.name)).collect();
    ApiError::new(
        ErrorCode::NoSuchLocation,
        format!(
            "no target agent has an inspectable location at {location}; nearest known: {}. Pick one of those, or pass \
             allow_pending=true if code at that line has simply not run yet",
            list.join("; ")
        ),
    )
    .with_details(serde_json::json!({ "nearest": nearest }))
}

fn kind_word(kind: LocationKind) -> &'static str {
    match kind {
        LocationKind::Span => "span",
        LocationKind::Event => "event",
    }
}

/// The locations of a whole-file catalog entry that matter for a placement at `line`:
/// the line itself when it holds code (an event) or a function's definition (a span),
/// and otherwise the nearest lines that hold code, each named after the function around
/// it.
fn file_locations_near(f: &periscope_protocol::FileLines, line: u32) -> Vec<CatalogEntry> {
    let entry = |line: u32, kind: LocationKind, name: String| CatalogEntry {
        file: f.file.clone(),
        line,
        kind,
        name,
        module: f.module.clone(),
        level: None,
        fields: Vec::new(),
        hits: 0,
        hash: f.hash.clone(),
    };
    let around = |line: u32| f.function_around(line).map_or_else(|| "<module>".to_owned(), |func| func.name.clone());
    let mut out = Vec::new();
    if let Some(func) = f.function_at(line) {
        out.push(entry(line, LocationKind::Span, func.name.clone()));
    }
    if f.lines.contains(line) {
        out.push(entry(line, LocationKind::Event, around(line)));
    }
    if out.is_empty() {
        out.extend(f.lines.nearest(line, 5).into_iter().map(|l| entry(l, LocationKind::Event, around(l))));
    }
    out
}
