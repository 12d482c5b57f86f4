//! The shared backend: the broker's state in one Redis (a primary; not Redis Cluster),
//! so that any number of broker nodes serve one system.
//!
//! - [`Redis`]: the connection (a reconnecting manager, every call bounded in time),
//!   whether Redis answers now, and the key names (all under one prefix).
//! - [`actions`]: [`RedisActions`], the [`crate::backend::ActionStore`]: records in
//!   hashes, hits and lines in lists whose index every node shares, live and ended
//!   actions in sorted sets, each change one Lua script (atomic).
//! - [`budgets`]: [`RedisBudgets`], callers' calls per minute and blocking calls at
//!   once, one budget per key and organization across nodes.
//! - [`cluster`]: [`RedisDirectory`], which node holds each agent (leases with an
//!   epoch), what every node knows of each agent, the bus between nodes, the nodes.
//! - [`errors`]: [`RedisErrors`], error groups (a hash and a sorted set per
//!   organization, each update one Lua script).
//! - [`events`]: [`RedisEvents`], action events over pub/sub to every node's waiters.
//! - [`keys`]: [`RedisKeys`], the key directory (keys, organizations, groups, pools).
//! - [`shared`]: [`RedisAudit`] (the audit trail) and [`RedisRules`] (redaction rules
//!   changed at run time, announced to every node).
//! - [`server`]: a private `redis-server` for tests and benches.
//!
//! Every write a caller is told about is acknowledged by Redis first; with
//! `appendonly yes` a Redis restart loses none of them.

pub mod actions;
pub mod budgets;
pub mod cluster;
pub mod errors;
pub mod events;
pub mod keys;
pub mod server;
pub mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use actions::RedisActions;
pub use budgets::RedisBudgets;
pub use cluster::RedisDirectory;
pub use errors::RedisErrors;
pub use events::RedisEvents;
pub use keys::RedisKeys;
pub use shared::{RedisAudit, RedisRules};

use crate::backend::BackendError;

/// How long one call to Redis may take before it counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How often each node checks that Redis answers.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// One connection to the shared Redis; cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
    up: Arc<AtomicBool>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("prefix", &self.prefix).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`); keys are named under `prefix`. The
    /// first connection must succeed; later outages are ridden out (calls fail with
    /// [`BackendError::Unavailable`] until Redis answers again).
    pub async fn connect(url: &str, prefix: &str) -> Result<Redis, BackendError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(CALL_TIMEOUT * 2, ConnectionManager::new_with_config(client.clone(), config))
            .await
            .map_err(|_| unavailable(format!("no answer from {} within {:?}", redact_url(url), CALL_TIMEOUT * 2)))?
            .map_err(unavailable)?;
        Ok(Redis { client, conn, prefix: Arc::from(prefix), up: Arc::new(AtomicBool::new(true)) })
    }

    /// The key named `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether Redis answered the last health check.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A new connection of its own, for pub/sub.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, BackendError> {
        tokio::time::timeout(CALL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| unavailable("no answer when subscribing"))?
            .map_err(unavailable)
    }

    /// Runs a command (or a pipeline, or a script invocation) with the time bound; an
    /// error marks Redis as down until the next health check says otherwise.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BackendError> {
        let mut conn = self.conn.clone();
        let r = tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
        self.settle(r)
    }

    /// Runs a pipeline with the time bound.
    pub async fn pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, BackendError> {
        let mut conn = self.conn.clone();
        let r = tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<T>(&mut conn)).await;
        self.settle(r)
    }

    /// Runs a Lua script with the time bound (loaded on first use, by its hash after).
    pub async fn script<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, BackendError> {
        let mut conn = self.conn.clone();
        let r = tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async::<T>(&mut conn)).await;
        self.settle(r)
    }

    fn settle<T>(&self, r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Result<T, BackendError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if !e.is_io_error() && !e.is_connection_dropped() && !e.is_timeout() => {
                Err(BackendError::Corrupt(format!("redis refused a command: {e}")))
            }
            Ok(Err(e)) => {
                self.up.store(false, Ordering::Relaxed);
                Err(unavailable(e))
            }
            Err(_) => {
                self.up.store(false, Ordering::Relaxed);
                Err(unavailable(format!("no answer within {CALL_TIMEOUT:?}")))
            }
        }
    }

    /// Checks that Redis answers (`PING`), and records it.
    pub async fn check(&self) -> bool {
        let mut conn = self.conn.clone();
        let ok = matches!(
            tokio::time::timeout(CALL_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut conn)).await,
            Ok(Ok(_))
        );
        let was = self.up.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("redis answers again");
            } else {
                tracing::warn!("redis does not answer; placements are refused until it does");
            }
        }
        ok
    }
}

/// A Redis URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Reads a reply of strings, whatever Redis typed them as.
pub(crate) fn strings(v: redis::Value) -> Vec<String> {
    match v {
        redis::Value::Array(items) => items.into_iter().flat_map(strings).collect(),
        redis::Value::BulkString(b) => vec![String::from_utf8_lossy(&b).into_owned()],
        redis::Value::SimpleString(s) => vec![s],
        redis::Value::Int(i) => vec![i.to_string()],
        redis::Value::Okay => vec!["OK".into()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod conformance {
    use std::sync::Arc;

    use crate::backend::conformance::{Backend, conformance_suite};

    /// A server of its own for each test (they start in milliseconds), stopped with it.
    async fn shared() -> Backend {
        let server = super::server::RedisServer::start().expect("redis-server starts");
        let redis = super::Redis::connect(&server.url(), "periscope:").await.expect("redis answers");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        Backend {
            actions: Arc::new(super::RedisActions::new(redis.clone(), 3)),
            events: super::RedisEvents::start(redis.clone(), stop.clone()),
            keys: Arc::new(super::RedisKeys::new(redis.clone(), "n1")),
            budgets: Arc::new(super::RedisBudgets::new(redis.clone())),
            errors: Arc::new(super::RedisErrors::new(redis.clone())),
            rule_stores: [
                Arc::new(super::RedisRules::new(redis.clone(), "n1".into())),
                Arc::new(super::RedisRules::namespaced(crate::safety::NAMESPACE, redis.clone(), "n1".into())),
            ],
            directory: super::RedisDirectory::start(redis, "n1".into(), stop),
            _keep: Box::new((server, stop_tx)),
        }
    }

    conformance_suite!(shared);
}

#[cfg(test)]
mod fencing {
    use std::sync::Arc;

    use periscope_protocol::AgentId;

    use crate::backend::{ActionStore, AgentDirectory, HitOutcome, LiveLimits, RateSpec};

    #[tokio::test]
    async fn a_node_whose_lease_moved_cannot_write_hits_for_the_agent() {
        let server = super::server::RedisServer::start().expect("redis-server starts");
        let redis = super::Redis::connect(&server.url(), "periscope:").await.unwrap();
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let actions = super::RedisActions::new(redis.clone(), 3);
        let (a, b) = (
            super::RedisDirectory::start(redis.clone(), "a".into(), stop.clone()),
            super::RedisDirectory::start(redis.clone(), "b".into(), stop),
        );
        let agent = AgentId::generate();
        let on_a = a.acquire(&agent, "host", 7).await.unwrap().unwrap();
        let mut from = crate::engine::Sender {
            id: agent.clone(),
            name: "x".into(),
            org: "acme".into(),
            pool: "shop".into(),
            epoch: on_a,
        };
        let record = crate::backend::conformance::record_for(&from, 5);
        let id = record.spec.id.clone();
        actions.insert(record, LiveLimits { per_key: 9, per_org: 9 }).await.unwrap().unwrap();
        let rate = RateSpec { per_sec: 100.0, burst: 100.0 };
        let hit = crate::backend::conformance::hit_for(&id, 1);
        assert!(matches!(
            actions.append_hit(&id, &from, hit.clone(), 1, rate).await.unwrap(),
            HitOutcome::Accepted { .. }
        ));
        // The agent reconnects to node B: B takes the lease over.
        let on_b = b.acquire(&agent, "host", 7).await.unwrap().unwrap();
        assert_eq!(actions.append_hit(&id, &from, hit.clone(), 2, rate).await.unwrap(), HitOutcome::LeaseLost);
        assert_eq!(
            actions.append_hits(&from, vec![hit.clone(), hit.clone()], 2, rate).await.unwrap(),
            [HitOutcome::LeaseLost, HitOutcome::LeaseLost],
            "hits stored together are fenced the same"
        );
        from.epoch = on_b;
        assert!(matches!(
            actions.append_hit(&id, &from, hit, 3, rate).await.unwrap(),
            HitOutcome::Accepted { index: 2, .. }
        ));
        assert_eq!(a.renew(vec![(agent.clone(), on_a)]).await.unwrap(), vec![agent], "A learns it lost the lease");
        let _ = Arc::new(());
    }

    fn record(agent: &AgentId, node: &str, online: bool) -> crate::registry::AgentSnapshot {
        serde_json::from_value(serde_json::json!({
            "info": {"protocol_version": 1, "agent_id": agent.as_str(), "display_name": "x", "pool": "shop",
                     "service": "s", "language": "rust", "agent_version": "0"},
            "org": "acme", "key_id": "k", "node": node, "epoch": 1, "online": online, "connected_at_ms": 1,
            "last_seen_ms": 1, "offline_since_ms": null, "disconnect_reason": null, "stats": {},
            "hits_accepted": 0, "hits_refused": 0, "catalog_version": 0
        }))
        .expect("a record")
    }

    #[tokio::test]
    async fn a_node_forgets_only_agents_no_node_holds_and_whose_record_it_published_last() {
        let server = super::server::RedisServer::start().expect("redis-server starts");
        let redis = super::Redis::connect(&server.url(), "periscope:").await.unwrap();
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let (a, b) = (
            super::RedisDirectory::start(redis.clone(), "a".into(), stop.clone()),
            super::RedisDirectory::start(redis.clone(), "b".into(), stop),
        );
        // The agent left A (its record there went stale) and is online on B.
        let agent = AgentId::generate();
        let epoch = b.acquire(&agent, "host", 7).await.unwrap().unwrap();
        b.publish(record(&agent, "b", true), Some(crate::registry::PublishedCatalog::default())).await.unwrap();
        a.forget(&agent).await.unwrap();
        assert!(a.get(&agent).await.unwrap().is_some(), "B holds its lease: A's forgetting is a no-op");
        // Gone from B too, B's record: A still leaves it to B.
        b.release(&agent, epoch).await.unwrap();
        b.publish(record(&agent, "b", false), None).await.unwrap();
        a.forget(&agent).await.unwrap();
        assert!(a.get(&agent).await.unwrap().is_some(), "B published it last");
        b.forget(&agent).await.unwrap();
        assert!(a.get(&agent).await.unwrap().is_none(), "B forgets its own offline agent");
    }
}
