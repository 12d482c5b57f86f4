//! What a node does to be one of several: publish the agents it holds, keep their
//! leases, carry messages to agents other nodes hold, apply what the other nodes
//! publish (agents, catalogs, redaction rules, key changes), say that it is alive, and
//! notice nodes that are not.
//!
//! The same tasks run on a single node over the local directory, where there is nobody
//! to tell: one code path.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::AppState;
use crate::backend::{AgentDirectory, ClusterEvent};
use crate::registry::Outbound;

/// How often changed agent records are published.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// How often leases are renewed (well within their lifetime).
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How often the whole directory is read again (agent records and rules lost in an
/// outage are repaired by this at the latest; actions for the agents held here are
/// repaired as soon as the node's subscription is back, by `ClusterEvent::Resync`).
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Starts the node's tasks; they end when the broker shuts down.
pub fn spawn(state: AppState, bus: mpsc::Receiver<Outbound>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(carry(Arc::clone(&state.directory), bus)),
        tokio::spawn(listen(Arc::clone(&state))),
        tokio::spawn(tick(state)),
    ]
}

/// Messages for agents other nodes hold, to those nodes.
async fn carry(directory: Arc<dyn AgentDirectory>, mut bus: mpsc::Receiver<Outbound>) {
    while let Some((node, agent, msg)) = bus.recv().await {
        if let Err(e) = directory.send(&node, &agent, &msg).await {
            tracing::warn!(%agent, %node, error = %e, "a message for an agent on another node was lost");
        }
    }
}

/// Applies what the other nodes say.
async fn listen(state: AppState) {
    let mut events = state.directory.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        let event = tokio::select! {
            e = events.recv() => match e { Some(e) => e, None => return },
            _ = shutdown.changed() => return,
        };
        match event {
            ClusterEvent::Agent(id) => match state.directory.get(&id).await {
                Ok(Some(snap)) => apply(&state, snap).await,
                Ok(None) => {}
                Err(e) => tracing::debug!(agent = %id, error = %e, "cannot read an agent's record"),
            },
            ClusterEvent::Message(agent, msg) => {
                state.registry.deliver(&agent, msg);
            }
            ClusterEvent::Rules(org) => reload_rules(&state, Some(&org)).await,
            ClusterEvent::Safety(org) => reload_safety(&state, Some(&org)).await,
            ClusterEvent::Keys => {
                if let Err(e) = state.keys.refresh().await {
                    tracing::warn!(error = %e, "cannot read the key directory");
                }
            }
            ClusterEvent::Resync => {
                resync(&state).await;
                state.engine.resync_held_agents().await;
            }
        }
    }
}

/// Applies another node's record of an agent, fetching its catalog when it changed.
async fn apply(state: &AppState, snap: crate::registry::AgentSnapshot) {
    if snap.node == state.directory.node() {
        return;
    }
    let Some(have) = state.registry.remote_news(&snap) else { return };
    let catalog = if have != snap.catalog_version {
        match state.directory.catalog(&snap.info.agent_id).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(agent = %snap.info.agent_id, error = %e, "cannot read an agent's catalog");
                None
            }
        }
    } else {
        None
    };
    state.registry.apply_remote(snap, catalog);
}

/// Reads every agent record and rule set again.
async fn resync(state: &AppState) {
    match state.directory.all().await {
        Ok(all) => {
            for snap in all {
                apply(state, snap).await;
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the agent directory"),
    }
    reload_rules(state, None).await;
    reload_safety(state, None).await;
    let _ = state.keys.refresh().await;
}

/// Takes an organization's blocklist and pauses (or every organization's) from the
/// store; what changed reaches the agents held here (a pause as their action sync).
pub(crate) async fn reload_safety(state: &AppState, org: Option<&str>) {
    let Some(store) = &state.safety_store else { return };
    match store.load_all().await {
        Ok(all) => {
            for (o, json) in all {
                if org.is_some_and(|want| want != o) {
                    continue;
                }
                match serde_json::from_str::<crate::safety::SafetySettings>(&json) {
                    Ok(settings) => state.engine.restore_safety(&o, settings).await,
                    Err(e) => {
                        tracing::warn!(org = %o, error = %e, "ignoring stored safety settings that do not decode")
                    }
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the safety settings"),
    }
}

/// Takes an organization's rules (or every organization's) from the rule store, and
/// pushes them to its agents held here.
async fn reload_rules(state: &AppState, org: Option<&str>) {
    let Some(store) = &state.rule_store else { return };
    match store.load_all().await {
        Ok(all) => {
            for (o, json) in all {
                if org.is_some_and(|want| want != o) {
                    continue;
                }
                match serde_json::from_str::<periscope_redaction::RedactionConfig>(&json) {
                    Ok(config) => {
                        if state.engine.rules.config(&o) != config {
                            state.engine.rules.restore(&o, config);
                            state.engine.push_rules(&o);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(org = %o, error = %e, "ignoring stored redaction rules that do not decode")
                    }
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the redaction rules"),
    }
}

/// Publishes changed agents, keeps leases, says the node is alive, notices gone nodes.
async fn tick(state: AppState) {
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut renew = tokio::time::interval(RENEW_EVERY);
    let mut resync_every = tokio::time::interval(RESYNC_EVERY);
    let mut shutdown = state.shutdown.clone();
    let mut was_up = true;
    loop {
        tokio::select! {
            _ = publish.tick() => {
                let changed = state.registry.take_changed();
                for (snap, catalog) in changed {
                    let id = snap.info.agent_id.clone();
                    if let Err(e) = state.directory.publish(snap, catalog).await {
                        tracing::debug!(agent = %id, error = %e, "cannot publish an agent's record; republishing all later");
                        was_up = false;
                    }
                }
            }
            _ = second.tick() => {
                let up = match &state.redis {
                    Some(r) => r.check().await,
                    None => true,
                };
                if up && !was_up {
                    // Back after an outage: what changed meanwhile is published again.
                    state.registry.mark_all_local();
                    resync(&state).await;
                }
                was_up = up;
                if !up {
                    continue;
                }
                let _ = state.directory.heartbeat(load(&state)).await;
                if let Ok(nodes) = state.directory.nodes().await {
                    let alive: HashSet<String> = nodes.into_iter().map(|(n, _)| n).collect();
                    state.registry.nodes_gone(&alive);
                }
            }
            _ = renew.tick() => {
                match state.directory.renew(state.registry.local_leases()).await {
                    Ok(moved) => for agent in moved {
                        state.registry.lease_lost(&agent);
                    },
                    Err(e) => tracing::debug!(error = %e, "cannot renew the agents' leases"),
                }
            }
            _ = resync_every.tick() => resync(&state).await,
            _ = shutdown.changed() => return,
        }
    }
}

/// What this node tells the others (and `GET /api/v1/cluster`) about its load.
pub fn load(state: &AppState) -> serde_json::Value {
    let mut held = 0usize;
    let mut pools = std::collections::BTreeMap::<String, usize>::new();
    state.registry.for_each(|a| {
        if a.local() {
            held += 1;
            *pools.entry(a.info.pool.clone()).or_default() += 1;
        }
    });
    let stats = state.engine.stats.totals();
    serde_json::json!({
        "node": state.directory.node(),
        "url": state.public_url(),
        "version": env!("CARGO_PKG_VERSION"),
        "started_at_ms": state.started_at_ms,
        "agents": held,
        "agents_by_pool": pools,
        "hits_accepted": stats.hits_accepted,
        "lines_accepted": stats.lines_accepted,
        "redis": state.redis.as_ref().map(|r| if r.is_up() { "up" } else { "unreachable" }),
    })
}
