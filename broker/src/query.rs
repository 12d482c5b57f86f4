//! Read-only queries over agents and their catalogs, shared by REST and MCP:
//! filtering, free-text search and stateless pagination (the cursor is an offset, so
//! any broker node can answer a follow-up call).

use std::collections::BTreeMap;

use periscope_protocol::{AgentId, CatalogEntry, LocationKind};
use serde::Serialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::registry::{AgentView, Registry};

/// Most items per page.
pub const MAX_PAGE: usize = 200;
/// Items per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 50;

/// A page of results.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Whether there is a next page.
    pub has_more: bool,
    /// How many items match in all.
    pub total: usize,
    /// `list_agents` only: the code each pool of the matching agents runs (all of them,
    /// not only this page), so a pool running several versions shows at a glance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<PoolVersions>>,
}

/// The versions one pool runs.
#[derive(Debug, Clone, Serialize)]
pub struct PoolVersions {
    /// The pool.
    pub pool: String,
    /// Whether its agents run more than one version or build.
    pub mixed: bool,
    /// Each version and build, with how many agents run it.
    pub versions: Vec<VersionCount>,
}

/// Agents running one version and build.
#[derive(Debug, Clone, Serialize)]
pub struct VersionCount {
    /// The service version (empty: not reported).
    pub service_version: String,
    /// The build (empty: not reported).
    pub build: String,
    /// Agents running it.
    pub agents: usize,
}

/// The versions summary of `agents`, per pool.
fn versions_of(agents: &[AgentView]) -> Vec<PoolVersions> {
    let mut pools: BTreeMap<&str, BTreeMap<(&str, &str), usize>> = BTreeMap::new();
    for a in agents {
        *pools.entry(&a.pool).or_default().entry((&a.service_version, &a.build)).or_default() += 1;
    }
    pools
        .into_iter()
        .map(|(pool, versions)| PoolVersions {
            pool: pool.to_owned(),
            mixed: versions.len() > 1,
            versions: versions
                .into_iter()
                .map(|((v, b), n)| VersionCount { service_version: v.to_owned(), build: b.to_owned(), agents: n })
                .collect(),
        })
        .collect()
}

/// Parses a cursor and a limit.
pub fn paging(cursor: Option<&str>, limit: Option<usize>) -> Result<(usize, usize), ApiError> {
    let offset = match cursor.map(str::trim).filter(|c| !c.is_empty()) {
        None => 0,
        Some(c) => c.parse::<usize>().map_err(|_| {
            ApiError::invalid(format!("cursor `{}` is not one this server issued; omit it to start over", truncate(c)))
        })?,
    };
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit is {limit}; allowed range is 1..={MAX_PAGE}")));
    }
    Ok((offset, limit))
}

fn paginate<T>(items: Vec<T>, offset: usize, limit: usize) -> Page<T> {
    let total = items.len();
    let end = offset.saturating_add(limit).min(total);
    let items: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
    Page { has_more: end < total, next_cursor: (end < total).then(|| end.to_string()), total, items, versions: None }
}

fn truncate(s: &str) -> &str {
    periscope_protocol::value::truncate_chars(s, 64)
}

/// One agent, if the caller may see it (`not_found` otherwise, as for an unknown id).
pub fn get_agent(registry: &Registry, raw: &str, caller: &Principal) -> Result<AgentView, ApiError> {
    let id = AgentId::parse(raw.trim()).map_err(|e| ApiError::invalid(format!("agent_id: {e}")))?;
    registry
        .with(&id, |a| caller.sees_pool(&a.org, &a.info.pool).then(|| view(registry, a)))
        .flatten()
        .ok_or_else(|| ApiError::not_found(format!("no agent `{id}`; list_agents shows the agents")))
}

/// An agent's view, naming the node that holds it (in a cluster).
fn view(registry: &Registry, a: &crate::registry::AgentRecord) -> AgentView {
    let mut v = a.view();
    if v.node.is_none() && a.local() {
        v.node = registry.node().map(str::to_owned);
    }
    v
}

/// A pool of the caller's organization within its reach.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    /// The pool.
    pub pool: String,
    /// The group it belongs to.
    pub group: String,
    /// Agents online in it.
    pub agents_online: usize,
    /// Agents listed in it (online or recently offline).
    pub agents_known: usize,
}

/// The pools the caller may see: assigned ones and those with agents.
pub fn list_pools(registry: &Registry, caller: &Principal) -> Vec<PoolView> {
    let org = caller.org();
    let mut pools: BTreeMap<String, PoolView> = BTreeMap::new();
    let view = |pool: &str| PoolView {
        pool: pool.to_owned(),
        group: caller.tenancy.group_of(org, pool).to_owned(),
        agents_online: 0,
        agents_known: 0,
    };
    for pool in caller.tenancy.assigned_pools(org).keys() {
        pools.entry(pool.clone()).or_insert_with(|| view(pool));
    }
    registry.for_each(|a| {
        if a.org == org {
            let v = pools.entry(a.info.pool.clone()).or_insert_with(|| view(&a.info.pool));
            v.agents_known += 1;
            v.agents_online += usize::from(a.online());
        }
    });
    pools.into_values().filter(|p| caller.sees_pool(org, &p.pool)).collect()
}

/// Filters for listing agents.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    /// Only this pool.
    pub pool: Option<String>,
    /// Only agents carrying every one of these tags.
    pub tags: Vec<String>,
    /// Only this service.
    pub service: Option<String>,
    /// Only this language.
    pub language: Option<String>,
    /// `online` or `offline`.
    pub status: Option<String>,
    /// Free text matched against name, service, host, pool, tags and id.
    pub text: Option<String>,
}

/// Agents the caller may see matching a filter, sorted by pool, service, name.
pub fn list_agents(
    registry: &Registry,
    filter: &AgentFilter,
    cursor: Option<&str>,
    limit: Option<usize>,
    caller: &Principal,
) -> Result<Page<AgentView>, ApiError> {
    let (offset, limit) = paging(cursor, limit)?;
    if let Some(s) = filter.status.as_deref()
        && s != "online"
        && s != "offline"
    {
        return Err(ApiError::invalid(format!("status `{}` must be `online` or `offline`", truncate(s))));
    }
    let text = filter.text.as_deref().map(str::to_lowercase);
    let mut agents = Vec::new();
    registry.for_each(|a| {
        let i = &a.info;
        let ok = caller.sees_pool(&a.org, &i.pool)
            && filter.pool.as_deref().is_none_or(|p| i.pool == p)
            && filter.tags.iter().all(|t| i.tags.contains(t))
            && filter.service.as_deref().is_none_or(|s| i.service == s)
            && filter.language.as_deref().is_none_or(|l| i.language.eq_ignore_ascii_case(l))
            && filter.status.as_deref().is_none_or(|s| (s == "online") == a.online())
            && text.as_deref().is_none_or(|t| {
                [&i.display_name, &i.service, &i.host, &i.pool, i.agent_id.as_str()]
                    .iter()
                    .any(|f| f.to_lowercase().contains(t))
                    || i.tags.iter().any(|tag| tag.to_lowercase().contains(t))
            });
        if ok {
            agents.push(view(registry, a));
        }
    });
    agents.sort_by(|a, b| {
        (a.status != "online", &a.pool, &a.service, &a.display_name, &a.agent_id).cmp(&(
            b.status != "online",
            &b.pool,
            &b.service,
            &b.display_name,
            &b.agent_id,
        ))
    });
    let versions = versions_of(&agents);
    let mut page = paginate(agents, offset, limit);
    page.versions = Some(versions);
    Ok(page)
}

/// Filters for listing inspectable locations.
#[derive(Debug, Clone, Default)]
pub struct SourceFilter {
    /// Only this agent's locations.
    pub agent_id: Option<String>,
    /// Only locations of agents in this pool.
    pub pool: Option<String>,
    /// Only agents with all these tags.
    pub tags: Vec<String>,
    /// File path substring.
    pub file: Option<String>,
    /// Span or event name substring (function names for `#[instrument]` spans).
    pub name: Option<String>,
    /// Free text over file, name, module and field names.
    pub text: Option<String>,
    /// Only agents online (default true).
    pub include_offline: bool,
}

/// One inspectable location, merged over the agents that report it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    /// Source file.
    pub file: String,
    /// Line.
    pub line: u32,
    /// `span` or `event`.
    pub kind: LocationKind,
    /// Callsite name.
    pub name: String,
    /// Module path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Values available there.
    pub fields: Vec<String>,
    /// For a span or function: what to pass as `function` to probe it whole (arguments
    /// at entry, return value or error and duration at exit): `module:qualname` for
    /// Python, `module::path::span_name` for Rust.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Last line of a function (whole-file catalogs: Python).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_line: Option<u32>,
    /// The lines that hold code in this function or file (`3-7,9`), for languages
    /// where every such line is a location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines: Option<String>,
    /// The file's content hash as the agent loaded it (or read it, for Rust).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Other content hashes of this file among the agents reporting it: they run
    /// different code here (up to 5).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_hashes: Vec<String>,
    /// Times it fired while observed, summed over agents.
    pub hits: u64,
    /// Agents that report it.
    pub agents: usize,
    /// Up to 5 of those agents' ids, to target one directly.
    pub agent_ids: Vec<AgentId>,
}

/// Inspectable locations of agents the caller may see, matching a filter, sorted by
/// file and line.
pub fn list_sources(
    registry: &Registry,
    filter: &SourceFilter,
    cursor: Option<&str>,
    limit: Option<usize>,
    caller: &Principal,
) -> Result<Page<SourceView>, ApiError> {
    let (offset, limit) = paging(cursor, limit)?;
    let agent_id = match filter.agent_id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(raw) => {
            let id = AgentId::parse(raw).map_err(|e| ApiError::invalid(format!("agent_id: {e}")))?;
            if registry.with(&id, |a| caller.sees_pool(&a.org, &a.info.pool)) != Some(true) {
                return Err(ApiError::not_found(format!("no agent `{id}`; list_agents shows the agents")));
            }
            Some(id)
        }
        None => None,
    };
    let file = filter.file.as_deref().map(str::to_lowercase);
    let name = filter.name.as_deref().map(str::to_lowercase);
    let text = filter.text.as_deref().map(str::to_lowercase);
    let mut merged: BTreeMap<(String, u32, LocationKind, String), SourceView> = BTreeMap::new();
    registry.for_each(|a| {
        if agent_id.as_ref().is_some_and(|id| *id != a.info.agent_id) || !caller.sees_pool(&a.org, &a.info.pool) {
            return;
        }
        if !a.matches(filter.pool.as_deref(), &filter.tags) || (!filter.include_offline && !a.online()) {
            return;
        }
        for (e, hits) in a.catalog.iter() {
            if !source_matches(e, file.as_deref(), name.as_deref(), text.as_deref()) {
                continue;
            }
            let view = merged.entry((e.file.clone(), e.line, e.kind, e.name.clone())).or_insert_with(|| SourceView {
                file: e.file.clone(),
                line: e.line,
                kind: e.kind,
                name: e.name.clone(),
                module: e.module.clone(),
                level: e.level.clone(),
                fields: e.fields.clone(),
                function: function_name(e.kind, &e.name, e.module.as_deref()),
                end_line: None,
                lines: None,
                hash: e.hash.clone(),
                other_hashes: Vec::new(),
                hits: 0,
                agents: 0,
                agent_ids: Vec::new(),
            });
            note_hash(view, e.hash.as_ref());
            view.hits += hits;
            view.agents += 1;
            if view.agent_ids.len() < 5 {
                view.agent_ids.push(a.info.agent_id.clone());
            }
        }
        for f in a.catalog.files() {
            for view in file_sources(f) {
                let e = CatalogEntry {
                    file: view.file.clone(),
                    line: view.line,
                    kind: view.kind,
                    name: view.name.clone(),
                    module: view.module.clone(),
                    level: None,
                    fields: Vec::new(),
                    hits: 0,
                    hash: None,
                };
                if !source_matches(&e, file.as_deref(), name.as_deref(), text.as_deref()) {
                    continue;
                }
                let hash = view.hash.clone();
                let merged = merged.entry((view.file.clone(), view.line, view.kind, view.name.clone())).or_insert(view);
                note_hash(merged, hash.as_ref());
                merged.agents += 1;
                if merged.agent_ids.len() < 5 {
                    merged.agent_ids.push(a.info.agent_id.clone());
                }
            }
        }
    });
    Ok(paginate(merged.into_values().collect(), offset, limit))
}

/// Records that an agent reports `hash` for a location's file: a hash other than the
/// first one seen is listed (bounded), so different code shows.
fn note_hash(view: &mut SourceView, hash: Option<&String>) {
    let Some(h) = hash else { return };
    if view.hash.is_none() {
        view.hash = Some(h.clone());
    } else if view.hash.as_ref() != Some(h) && !view.other_hashes.contains(h) && view.other_hashes.len() < 5 {
        view.other_hashes.push(h.clone());
    }
}

/// A whole-file catalog entry as sources: the module (every line that holds code, the
/// content hash) and each function (its definition line, a span, with its lines).
fn file_sources(f: &periscope_protocol::FileLines) -> Vec<SourceView> {
    let view = |line: u32, kind: LocationKind, name: String, end_line: Option<u32>, lines: String| SourceView {
        file: f.file.clone(),
        line,
        kind,
        module: f.module.clone(),
        level: None,
        fields: Vec::new(),
        function: function_name(kind, &name, f.module.as_deref()),
        name,
        end_line,
        lines: Some(lines),
        hash: f.hash.clone(),
        other_hashes: Vec::new(),
        hits: 0,
        agents: 0,
        agent_ids: Vec::new(),
    };
    let first = f.lines.ranges().first().map_or(1, |(a, _)| *a);
    let mut out = vec![view(first, LocationKind::Event, "<module>".into(), None, f.lines.to_string())];
    for func in &f.functions {
        let end = func.end_line.unwrap_or(u32::MAX);
        let inside = f
            .lines
            .ranges()
            .iter()
            .filter(|(a, b)| *b >= func.line && *a <= end)
            .flat_map(|(a, b)| (*a).max(func.line)..=(*b).min(end));
        let lines = periscope_protocol::LineSet::from_lines(inside).to_string();
        out.push(view(func.line, LocationKind::Span, func.name.clone(), func.end_line, lines));
    }
    out
}

/// How a caller names a span or function for a function probe.
fn function_name(kind: LocationKind, name: &str, module: Option<&str>) -> Option<String> {
    (kind == LocationKind::Span && name != "<module>").then(|| {
        let target = periscope_protocol::FunctionTarget {
            name: name.to_owned(),
            module: module.map(str::to_owned),
            min_duration_ms: None,
        };
        target.to_string()
    })
}

fn source_matches(e: &CatalogEntry, file: Option<&str>, name: Option<&str>, text: Option<&str>) -> bool {
    file.is_none_or(|f| e.file.to_lowercase().contains(f))
        && name.is_none_or(|n| e.name.to_lowercase().contains(n))
        && text.is_none_or(|t| {
            e.file.to_lowercase().contains(t)
                || e.name.to_lowercase().contains(t)
                || e.module.as_deref().is_some_and(|m| m.to_lowercase().contains(t))
                || e.fields.iter().any(|f| f.to_lowercase().contains(t))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_carry_a_cursor_until_the_end() {
        let p = paginate((0..5).collect::<Vec<_>>(), 0, 2);
        assert_eq!((p.items.clone(), p.next_cursor.clone(), p.has_more), (vec![0, 1], Some("2".into()), true));
        let p = paginate((0..5).collect::<Vec<_>>(), 4, 2);
        assert_eq!((p.items, p.next_cursor, p.has_more), (vec![4], None, false));
    }

    #[test]
    fn foreign_cursors_and_limits_are_invalid_input() {
        assert!(paging(Some("abc"), None).is_err());
        assert!(paging(None, Some(0)).is_err());
        assert!(paging(None, Some(MAX_PAGE + 1)).is_err());
        assert_eq!(paging(Some("10"), Some(5)).unwrap(), (10, 5));
    }
}
