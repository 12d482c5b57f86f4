//! The engine's side of the operator safety settings (`crate::safety`): changing the
//! blocklist and the pauses (stored, pushed to the agents held here, audited), what a
//! placement may not do because of them, what a paused agent is sent, and the code
//! version a placement expects, checked against what each agent reported.

use std::sync::Arc;

use periscope_protocol::blocklist::{BlockRule, Site, first_match, reads_values};
use periscope_protocol::{ActionKind, ActionSpec, AgentId, BrokerMessage, CodeExpectation, Location};
use serde::Serialize;

use super::Engine;
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::Principal;
use crate::error::{ApiError, ErrorCode};
use crate::registry::AgentRecord;
use crate::safety::{Pause, SafetySettings, validate_rules};
use crate::time::now_ms;

/// How a placement's `expected_version`/`file_hash` compares with the target agents,
/// as the broker knows them (each agent checks again and refuses on a difference).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct CodeCheck {
    /// The version or build asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<String>,
    /// The file hash asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_hash: Option<String>,
    /// Target agents running the expected code.
    pub matched: usize,
    /// Target agents running other code: they refuse the action.
    pub mismatched: usize,
    /// Target agents that have not reported the file yet (they check once they do).
    pub unknown: usize,
    /// Each mismatched or unknown agent and why.
    pub agents: Vec<CodeCheckAgent>,
}

/// One agent whose code does not (or may not) match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct CodeCheckAgent {
    /// The agent.
    pub agent_id: String,
    /// Its display name.
    pub display_name: String,
    /// `mismatched` or `unknown`.
    pub verdict: String,
    /// Why.
    pub reason: String,
}

/// What a pause or resume did.
#[derive(Debug, Clone, Serialize)]
pub struct PauseOutcome {
    /// Pauses in force after the call.
    pub pauses: Vec<Pause>,
    /// Live actions now stopped (pause) or running again (resume).
    pub actions: usize,
    /// Online agents told.
    pub agents: usize,
    /// Whether the call changed anything (pausing what is paused does not).
    pub changed: bool,
}

impl Engine {
    /// Replaces an organization's blocklist: validated, stored, pushed to its agents
    /// (which drop actions a rule now covers), audited.
    pub async fn set_blocklist(
        &self,
        org: &str,
        rules: Vec<BlockRule>,
        actor: Actor,
    ) -> Result<Arc<SafetySettings>, ApiError> {
        validate_rules(&rules).map_err(ApiError::invalid)?;
        let names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
        let settings = self.safety.change::<ApiError>(org, |s| {
            s.blocklist = rules;
            Ok(())
        })?;
        self.save_safety(org, &settings).await?;
        self.push_blocklist(org);
        self.audit(
            AuditEntry::new(org, actor, AuditKind::BlocklistChanged)
                .detail(format!("replaced the blocklist (version {}, {} rule(s))", settings.version, names.len()))
                .data(serde_json::json!({ "version": settings.version, "rules": settings.blocklist })),
        );
        tracing::info!(org, version = settings.version, "blocklist replaced");
        Ok(settings)
    }

    /// Pauses every action of `pool` (or of the organization): agents here stop them at
    /// once (an `action_sync` without them), other nodes when the store announces it.
    pub async fn pause(
        &self,
        org: &str,
        pool: Option<String>,
        reason: String,
        caller: &Principal,
    ) -> Result<PauseOutcome, ApiError> {
        let pause = Pause { pool: pool.clone(), by: caller.name.clone(), at_ms: now_ms(), reason };
        let mut changed = false;
        let settings = self.safety.change::<ApiError>(org, |s| {
            if !s.pauses.iter().any(|p| p.pool == pool) {
                s.pauses.push(pause.clone());
                changed = true;
            }
            Ok(())
        })?;
        self.save_safety(org, &settings).await?;
        let (actions, agents) = self.resync_org(org).await;
        if changed {
            self.audit(
                AuditEntry::new(org, caller.actor(), AuditKind::ActionsPausedByOperator)
                    .target(serde_json::json!({ "pool": pool }))
                    .detail(format!(
                        "paused {} ({actions} live action(s), {agents} agent(s) here)",
                        pool.as_ref().map_or_else(|| "the organization".to_owned(), |p| format!("pool `{p}`"))
                    ))
                    .data(serde_json::json!({ "reason": pause.reason, "actions": actions })),
            );
            tracing::info!(org, pool = pool.as_deref().unwrap_or("*"), by = %caller.name, "actions paused");
        }
        Ok(PauseOutcome { pauses: settings.pauses.clone(), actions, agents, changed })
    }

    /// Lifts the pause of `pool` (or, without one, every pause of the organization).
    pub async fn resume(&self, org: &str, pool: Option<String>, caller: &Principal) -> Result<PauseOutcome, ApiError> {
        let mut changed = false;
        let settings = self.safety.change::<ApiError>(org, |s| {
            let before = s.pauses.len();
            s.pauses.retain(|p| pool.is_some() && p.pool != pool);
            changed = s.pauses.len() != before;
            Ok(())
        })?;
        self.save_safety(org, &settings).await?;
        let (actions, agents) = self.resync_org(org).await;
        if changed {
            let what =
                pool.as_ref().map_or_else(|| "every pause of the organization".to_owned(), |p| format!("pool `{p}`"));
            let still = settings.pauses.iter().any(|p| p.pool.is_none());
            self.audit(
                AuditEntry::new(org, caller.actor(), AuditKind::ActionsResumedByOperator)
                    .target(serde_json::json!({ "pool": pool }))
                    .detail(format!("resumed {what} ({actions} live action(s) running again)"))
                    .data(serde_json::json!({ "actions": actions, "organization_still_paused": still })),
            );
            tracing::info!(org, pool = pool.as_deref().unwrap_or("*"), by = %caller.name, "actions resumed");
        }
        Ok(PauseOutcome { pauses: settings.pauses.clone(), actions, agents, changed })
    }

    async fn save_safety(&self, org: &str, settings: &SafetySettings) -> Result<(), ApiError> {
        if let Some(store) = &self.safety_store {
            store.save(org, serde_json::to_string(settings).unwrap_or_default()).await?;
        }
        Ok(())
    }

    /// Takes in settings another node (or an earlier run) stored; when they differ,
    /// the agents held here are told.
    pub async fn restore_safety(&self, org: &str, settings: SafetySettings) {
        if self.safety.restore(org, settings) {
            self.push_blocklist(org);
            self.resync_org(org).await;
        }
    }

    /// Online agents of `org` held by this node, with their pools.
    fn local_agents(&self, org: &str) -> Vec<(AgentId, String)> {
        let mut out = Vec::new();
        self.registry.for_each(|a| {
            if a.online() && a.org == org && a.remote.is_none() {
                out.push((a.info.agent_id.clone(), a.info.pool.clone()));
            }
        });
        out
    }

    /// Sends each agent of `org` held here its blocklist.
    pub fn push_blocklist(&self, org: &str) {
        for (agent, pool) in self.local_agents(org) {
            self.registry.send(&agent, self.safety.message(org, &pool));
        }
    }

    /// Sends every agent held here the actions it should run now. Placements and
    /// removals reach the node holding an agent over pub/sub, which keeps nothing for
    /// a node that was not listening: a node that subscribes again calls this, so what
    /// other nodes did in the gap reaches its agents (agents keep the running state of
    /// actions that did not change).
    pub async fn resync_held_agents(&self) {
        let mut orgs = std::collections::BTreeSet::new();
        self.registry.for_each(|a| {
            if a.online() && a.remote.is_none() {
                orgs.insert(a.org.clone());
            }
        });
        for org in orgs {
            self.resync_org(&org).await;
        }
    }

    /// Sends each agent of `org` held here the actions it should run now (none while
    /// its pool is paused); returns the live actions a pause holds and the agents told.
    async fn resync_org(&self, org: &str) -> (usize, usize) {
        let live = match self.actions.live(org).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(org, error = %e, "cannot read the live actions to apply a pause");
                return (0, 0);
            }
        };
        let held = live.iter().filter(|a| a.pools.iter().any(|p| self.safety.paused(org, p).is_some())).count();
        let tenancy = self.tenancy();
        let agents = self.local_agents(org);
        for (agent, pool) in &agents {
            let Some(tags) = self.registry.with(agent, |r| r.info.tags.clone()) else { continue };
            let paused = self.safety.paused(org, pool).is_some();
            let actions = live
                .iter()
                .filter(|a| {
                    !paused && a.target.includes_parts(agent, pool, &tags) && a.reach.allows(org, pool, &tenancy)
                })
                .map(|a| a.spec.clone())
                .collect();
            self.registry.send(agent, BrokerMessage::ActionSync { actions });
        }
        (held, agents.len())
    }

    /// Refuses a placement into a paused pool (or organization), naming who paused it.
    pub(super) fn check_not_paused(&self, org: &str, pools: &[&str]) -> Result<(), ApiError> {
        for pool in pools {
            if let Some(p) = self.safety.paused(org, pool) {
                return Err(ApiError::new(
                    ErrorCode::Paused,
                    format!(
                        "pool `{pool}` is {}; nothing can be placed there until a company administrator resumes \
                         it (resume_actions)",
                        p.describe()
                    ),
                )
                .with_details(serde_json::json!({ "pause": p })));
            }
        }
        Ok(())
    }

    /// Refuses a placement a blocklist rule covers on any target agent (as its catalog
    /// describes the location), naming the rule; audited.
    pub(super) fn check_blocklist(
        &self,
        spec: &ActionSpec,
        agents: &[(AgentId, String, String)],
        caller: &Principal,
    ) -> Result<(), ApiError> {
        let rules = self.safety.rules(caller.org());
        if rules.is_empty() {
            return Ok(());
        }
        let mut locations = vec![&spec.location];
        if let ActionKind::Metric(m) = &spec.kind
            && let Some(end) = &m.end_location
        {
            locations.push(end);
        }
        for (id, _, pool) in agents {
            for location in &locations {
                let refusal = self
                    .registry
                    .with(id, |rec| site_check(rec, pool, location, |site| blocked(&rules, site, spec)))
                    .flatten();
                if let Some((rule, why)) = refusal {
                    self.audit(
                        AuditEntry::new(caller.org(), caller.actor(), AuditKind::PlacementBlocked)
                            .target(serde_json::json!({ "pool": pool, "location": location.to_string() }))
                            .detail(format!("refused a {} at {location}: {why}", spec.kind.name()))
                            .data(serde_json::json!({ "rule": rule.name })),
                    );
                    return Err(ApiError::new(ErrorCode::Blocked, format!("cannot place at {location}: {why}"))
                        .with_details(serde_json::json!({ "rule": rule })));
                }
            }
        }
        Ok(())
    }

    /// Whether a `no_actions` rule covers action `id`'s location on the agent `from`
    /// (as its catalog describes it): what the agent still sends for it is refused.
    pub(super) async fn blocked_at_ingest(
        &self,
        id: &periscope_protocol::ActionId,
        from: &super::Sender,
        rules: &[BlockRule],
    ) -> bool {
        let Ok(Some((record, _))) = self.actions.load(id).await else { return false };
        let location = &record.spec.location;
        let check = |site: &Site<'_>| first_match(rules, site, true).is_some();
        self.registry
            .with(&from.id, |rec| site_check(rec, &from.pool, location, check))
            .unwrap_or_else(|| check(&Site { pool: &from.pool, file: &location.file, module: None, functions: &[] }))
    }

    /// Compares the placement's expectation with each target agent's version and the
    /// file hash its catalog reported. Refused when no agent matches.
    pub(super) fn check_code(
        &self,
        expect: &CodeExpectation,
        location: &Location,
        agents: &[(AgentId, String, String)],
    ) -> Result<CodeCheck, ApiError> {
        let mut check = CodeCheck {
            expected_version: expect.version.clone(),
            file_hash: expect.file_hash.clone(),
            ..CodeCheck::default()
        };
        for (id, name, _) in agents {
            let verdict = self.registry.with(id, |rec| {
                if let Some(why) = expect.version_mismatch(&rec.info.service_version, &rec.info.build) {
                    return Some(("mismatched", why));
                }
                expect.file_hash.as_ref()?;
                match reported_hash(rec, &location.file) {
                    None => Some((
                        "unknown",
                        format!("has not reported {} yet; it checks the hash once the file loads", location.file),
                    )),
                    Some((file, hash)) => expect.hash_mismatch(&file, hash.as_deref()).map(|why| ("mismatched", why)),
                }
            });
            match verdict.flatten() {
                None => check.matched += 1,
                Some((verdict, reason)) => {
                    if verdict == "unknown" {
                        check.unknown += 1;
                    } else {
                        check.mismatched += 1;
                    }
                    check.agents.push(CodeCheckAgent {
                        agent_id: id.to_string(),
                        display_name: name.clone(),
                        verdict: verdict.into(),
                        reason,
                    });
                }
            }
        }
        if check.matched == 0 && check.unknown == 0 {
            let reasons: Vec<String> =
                check.agents.iter().take(5).map(|a| format!("{}: {}", a.display_name, a.reason)).collect();
            return Err(ApiError::new(
                ErrorCode::NoMatchingAgents,
                format!(
                    "no target agent runs the expected code ({}); list_agents shows each agent's version and build",
                    reasons.join("; ")
                ),
            )
            .with_details(serde_json::json!({ "code_check": check })));
        }
        Ok(check)
    }
}

/// The file a location names in an agent's catalog, with the hash it reported.
fn reported_hash(rec: &AgentRecord, wanted: &str) -> Option<(String, Option<String>)> {
    if let Some(f) = rec.catalog.files().iter().find(|f| periscope_protocol::action::file_matches(wanted, &f.file)) {
        return Some((f.file.clone(), f.hash.clone()));
    }
    let mut with_hash = None;
    for (e, _) in rec.catalog.iter().filter(|(e, _)| periscope_protocol::action::file_matches(wanted, &e.file)) {
        if e.hash.is_some() {
            return Some((e.file.clone(), e.hash.clone()));
        }
        with_hash = Some((e.file.clone(), None));
    }
    with_hash
}

/// Runs `check` over the site a location is on an agent, as its catalog describes it.
fn site_check<R>(rec: &AgentRecord, pool: &str, location: &Location, check: impl Fn(&Site<'_>) -> R) -> R {
    if let Some(f) = rec.catalog.files().iter().find(|f| location.file_matches(&f.file)) {
        let functions: Vec<&str> =
            f.function_around(location.line).map(|func| func.name.as_str()).into_iter().collect();
        return check(&Site { pool, file: &f.file, module: f.module.as_deref(), functions: &functions });
    }
    let entries: Vec<_> = rec.catalog.iter().map(|(e, _)| e).filter(|e| location.file_matches(&e.file)).collect();
    let spans: Vec<&str> = entries
        .iter()
        .filter(|e| e.line == location.line && e.kind == periscope_protocol::LocationKind::Span)
        .map(|e| e.name.as_str())
        .collect();
    let file = entries.first().map_or(location.file.as_str(), |e| e.file.as_str());
    let module = entries.first().and_then(|e| e.module.as_deref());
    check(&Site { pool, file, module, functions: &spans })
}

/// The rule (and sentence) refusing `spec` at `site`: a `no_actions` rule, or a
/// `no_capture` rule when the action reads values.
fn blocked(rules: &[BlockRule], site: &Site<'_>, spec: &ActionSpec) -> Option<(BlockRule, String)> {
    if let Some(rule) = first_match(rules, site, true) {
        return Some((rule.clone(), rule.describe()));
    }
    let rule = first_match(rules, site, false)?;
    reads_values(spec).then(|| {
        (
            rule.clone(),
            format!(
                "{}; this action reads values (a condition, watches, placeholders or a value expression): place it \
                 without them to count or time the location",
                rule.describe()
            ),
        )
    })
}
