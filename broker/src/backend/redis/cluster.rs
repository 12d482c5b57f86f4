//! The agent directory and bus of a cluster, in Redis.
//!
//! - Leases: `lease:<agent>` holds `epoch|pid|node|host` and expires unless its node
//!   renews it ([`LEASE_TTL`]); epochs come from one counter, so a lease taken over is
//!   always newer. The hit script checks the epoch (fencing).
//! - Records: hash `agents` (agent id → what its node published, JSON), catalogs in
//!   `catalog:<agent>`; a change is announced on channel `c:agents`.
//! - Bus: each node listens on `c:node:<name>` for messages to its agents; `c:bcast`
//!   carries rules and key-directory changes.
//! - Nodes: sorted set `nodes` (name → when its heartbeat lapses), `node:<name>` its
//!   load, both refreshed every second.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use periscope_protocol::messages::{decode_broker_message, encode};
use periscope_protocol::{AgentId, BrokerMessage};
use redis::Script;
use tokio::sync::{mpsc, watch};

use super::{Redis, strings};
use crate::backend::{AgentDirectory, BackendError, BackendFuture, ClusterEvent, LeaseHeld};
use crate::registry::{AgentSnapshot, PublishedCatalog};
use crate::time::now_ms;

/// How long a lease lives without renewal: a node that stops answering loses its agents'
/// leases this long after (an agent that reconnects elsewhere takes its lease at once).
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// How long a node counts as alive after its last heartbeat.
pub const NODE_TTL: Duration = Duration::from_secs(4);

const ACQUIRE: &str = r#"
local P, agent, node, host, pid, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local cur = redis.call('GET', P .. 'lease:' .. agent)
if cur then
  local e, p, n, h = string.match(cur, '^(%d+)|(%d+)|([^|]*)|(.*)$')
  if h ~= host or p ~= pid then return {'held', n or ''} end
end
local e = redis.call('INCR', P .. 'epoch')
redis.call('SET', P .. 'lease:' .. agent, e .. '|' .. pid .. '|' .. node .. '|' .. host, 'PX', ttl)
return {'ok', tostring(e)}
"#;

const RENEW: &str = r#"
local P, ttl = ARGV[1], ARGV[2]
local moved = {}
local i = 3
while i < #ARGV do
  local key = P .. 'lease:' .. ARGV[i]
  local cur = redis.call('GET', key)
  if cur and string.match(cur, '^(%d+)|') == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ttl)
  else
    table.insert(moved, ARGV[i])
  end
  i = i + 2
end
return moved
"#;

const RELEASE: &str = r#"
local key = ARGV[1] .. 'lease:' .. ARGV[2]
local cur = redis.call('GET', key)
if cur and string.match(cur, '^(%d+)|') == ARGV[3] then redis.call('DEL', key) end
return 1
"#;

/// Forgets an agent only when no node holds its lease and this node published its record
/// last: a node whose own copy went stale (the agent moved on) must not erase the record
/// of the node that holds or last held it.
const FORGET: &str = r#"
local P, agent, node = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', P .. 'lease:' .. agent) == 1 then return 0 end
local rec = redis.call('HGET', P .. 'agents', agent)
if rec then
  local ok, r = pcall(cjson.decode, rec)
  if ok and type(r) == 'table' and r.node ~= nil and r.node ~= node then return 0 end
end
redis.call('HDEL', P .. 'agents', agent)
redis.call('DEL', P .. 'catalog:' .. agent)
return 1
"#;

/// The shared [`AgentDirectory`]; see the module docs.
#[derive(Debug)]
pub struct RedisDirectory {
    redis: Redis,
    node: String,
    acquire: Script,
    renew: Script,
    release: Script,
    forget: Script,
    subscribers: std::sync::Mutex<Vec<Subscriber>>,
}

/// Events a subscriber may have waiting; beyond it, it misses them and is told to
/// resync.
const SUBSCRIBER_QUEUE: usize = 4_096;

/// One listener to the node's events, and whether it missed one.
#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<ClusterEvent>,
    behind: bool,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Corrupt(format!("{what}: {e}"))
}

impl RedisDirectory {
    /// The directory of node `node` (a name unique in the cluster) on `redis`; listens on
    /// the node's channels until `stop`.
    pub fn start(redis: Redis, node: String, stop: watch::Receiver<bool>) -> std::sync::Arc<RedisDirectory> {
        let dir = std::sync::Arc::new(RedisDirectory {
            redis,
            node,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            forget: Script::new(FORGET),
            subscribers: std::sync::Mutex::default(),
        });
        tokio::spawn(listen(std::sync::Arc::clone(&dir), stop));
        dir
    }

    /// Hands `event` to every subscriber without waiting. One that is full misses it
    /// and is marked behind; the next time it has room it is sent a `Resync` first,
    /// which reads everything again (agents, rules, keys, its agents' actions), so what
    /// it missed (a message for an agent it holds among them) is repaired.
    fn deliver(&self, event: ClusterEvent) {
        use mpsc::error::TrySendError;
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain_mut(|sub| {
            if sub.behind {
                match sub.tx.try_send(ClusterEvent::Resync) {
                    Ok(()) => sub.behind = false,
                    Err(TrySendError::Full(_)) => return true,
                    Err(TrySendError::Closed(_)) => return false,
                }
            }
            match sub.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    sub.behind = true;
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// Forwards what arrives on the node's channels to its subscribers; resubscribes after
/// any loss, and then asks them to resync.
async fn listen(dir: std::sync::Arc<RedisDirectory>, mut stop: watch::Receiver<bool>) {
    let channels =
        [dir.redis.key(&format!("c:node:{}", dir.node)), dir.redis.key("c:agents"), dir.redis.key("c:bcast")];
    loop {
        if *stop.borrow() {
            return;
        }
        if let Ok(mut sub) = dir.redis.pubsub().await {
            let mut ok = true;
            for c in &channels {
                ok &= sub.subscribe(c).await.is_ok();
            }
            if ok {
                dir.deliver(ClusterEvent::Resync);
                let mut messages = sub.on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(m) => {
                                let channel = m.get_channel_name().to_owned();
                                let payload: String = m.get_payload().unwrap_or_default();
                                if let Some(event) = decode_event(&dir, &channels, &channel, &payload) {
                                    dir.deliver(event);
                                }
                            }
                            None => break,
                        },
                        _ = stop.changed() => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn decode_event(dir: &RedisDirectory, channels: &[String; 3], channel: &str, payload: &str) -> Option<ClusterEvent> {
    if channel == channels[0] {
        let (agent, frame) = payload.split_once('\n')?;
        let agent = AgentId::parse(agent).ok()?;
        return decode_broker_message(frame).ok().map(|m| ClusterEvent::Message(agent, m));
    }
    let (origin, rest) = payload.split_once('|')?;
    if origin == dir.node {
        // What this node did, it already applied.
        return None;
    }
    if channel == channels[1] {
        return AgentId::parse(rest).ok().map(ClusterEvent::Agent);
    }
    match rest.split_once('|') {
        Some(("rules", org)) => Some(ClusterEvent::Rules(org.to_owned())),
        Some((crate::safety::NAMESPACE, org)) => Some(ClusterEvent::Safety(org.to_owned())),
        _ if rest == "keys" => Some(ClusterEvent::Keys),
        _ => None,
    }
}

impl AgentDirectory for RedisDirectory {
    fn node(&self) -> &str {
        &self.node
    }

    fn acquire<'a>(&'a self, agent: &'a AgentId, host: &'a str, pid: u32) -> BackendFuture<'a, Result<u64, LeaseHeld>> {
        async move {
            let mut inv = self.acquire.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(agent.as_str())
                .arg(&self.node)
                .arg(host)
                .arg(pid)
                .arg(LEASE_TTL.as_millis() as u64);
            let reply = strings(self.redis.script(&inv).await?);
            match reply.first().map(String::as_str) {
                Some("ok") => Ok(Ok(reply.get(1).and_then(|e| e.parse().ok()).unwrap_or(0))),
                _ => Ok(Err(LeaseHeld { node: reply.get(1).cloned().unwrap_or_default() })),
            }
        }
        .boxed()
    }

    fn renew(&self, leases: Vec<(AgentId, u64)>) -> BackendFuture<'_, Vec<AgentId>> {
        async move {
            if leases.is_empty() {
                return Ok(Vec::new());
            }
            let mut inv = self.renew.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(LEASE_TTL.as_millis() as u64);
            for (agent, epoch) in &leases {
                inv.arg(agent.as_str()).arg(*epoch);
            }
            let moved = strings(self.redis.script(&inv).await?);
            Ok(moved.iter().filter_map(|a| AgentId::parse(a).ok()).collect())
        }
        .boxed()
    }

    fn release<'a>(&'a self, agent: &'a AgentId, epoch: u64) -> BackendFuture<'a, ()> {
        async move {
            let mut inv = self.release.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(agent.as_str()).arg(epoch);
            let _: i64 = self.redis.script(&inv).await?;
            Ok(())
        }
        .boxed()
    }

    fn lease<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, Option<u64>> {
        async move {
            let cur: Option<String> =
                self.redis.query(redis::cmd("GET").arg(self.redis.key(&format!("lease:{agent}")))).await?;
            Ok(cur.and_then(|c| c.split('|').next().and_then(|e| e.parse().ok())))
        }
        .boxed()
    }

    fn publish(&self, record: AgentSnapshot, catalog: Option<PublishedCatalog>) -> BackendFuture<'_, ()> {
        async move {
            let id = record.info.agent_id.clone();
            let json = serde_json::to_string(&record).map_err(|e| corrupt("agent", e))?;
            let mut pipe = redis::pipe();
            pipe.cmd("HSET").arg(self.redis.key("agents")).arg(id.as_str()).arg(json).ignore();
            if let Some(c) = catalog {
                let json = serde_json::to_string(&c).map_err(|e| corrupt("catalog", e))?;
                pipe.cmd("SET").arg(self.redis.key(&format!("catalog:{id}"))).arg(json).ignore();
            }
            pipe.cmd("PUBLISH").arg(self.redis.key("c:agents")).arg(format!("{}|{id}", self.node)).ignore();
            let () = self.redis.pipe(&pipe).await?;
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, Option<AgentSnapshot>> {
        async move {
            let json: Option<String> =
                self.redis.query(redis::cmd("HGET").arg(self.redis.key("agents")).arg(agent.as_str())).await?;
            json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt("agent", e))).transpose()
        }
        .boxed()
    }

    fn all(&self) -> BackendFuture<'_, Vec<AgentSnapshot>> {
        async move {
            let all: BTreeMap<String, String> =
                self.redis.query(redis::cmd("HGETALL").arg(self.redis.key("agents"))).await?;
            Ok(all.values().filter_map(|j| serde_json::from_str(j).ok()).collect())
        }
        .boxed()
    }

    fn catalog<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, PublishedCatalog> {
        async move {
            let json: Option<String> =
                self.redis.query(redis::cmd("GET").arg(self.redis.key(&format!("catalog:{agent}")))).await?;
            Ok(json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default())
        }
        .boxed()
    }

    fn forget<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, ()> {
        async move {
            let mut inv = self.forget.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(agent.as_str()).arg(&self.node);
            let _: i64 = self.redis.script(&inv).await?;
            Ok(())
        }
        .boxed()
    }

    fn send<'a>(&'a self, node: &'a str, agent: &'a AgentId, msg: &'a BrokerMessage) -> BackendFuture<'a, ()> {
        async move {
            let payload = format!("{agent}\n{}", encode(msg));
            let _: i64 = self
                .redis
                .query(redis::cmd("PUBLISH").arg(self.redis.key(&format!("c:node:{node}"))).arg(payload))
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn broadcast(&self, event: ClusterEvent) -> BackendFuture<'_, ()> {
        async move {
            let what = match event {
                ClusterEvent::Rules(org) => format!("rules|{org}"),
                ClusterEvent::Keys => "keys".to_owned(),
                _ => return Ok(()),
            };
            let _: i64 = self
                .redis
                .query(redis::cmd("PUBLISH").arg(self.redis.key("c:bcast")).arg(format!("{}|{what}", self.node)))
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn heartbeat(&self, load: serde_json::Value) -> BackendFuture<'_, ()> {
        async move {
            let ttl = NODE_TTL.as_millis() as u64;
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD").arg(self.redis.key("nodes")).arg(now_ms() + ttl).arg(&self.node).ignore();
            pipe.cmd("SET")
                .arg(self.redis.key(&format!("node:{}", self.node)))
                .arg(load.to_string())
                .arg("PX")
                .arg(ttl)
                .ignore();
            let () = self.redis.pipe(&pipe).await?;
            Ok(())
        }
        .boxed()
    }

    fn nodes(&self) -> BackendFuture<'_, Vec<(String, serde_json::Value)>> {
        async move {
            let names: Vec<String> = self
                .redis
                .query(redis::cmd("ZRANGEBYSCORE").arg(self.redis.key("nodes")).arg(now_ms()).arg("+inf"))
                .await?;
            let mut out = Vec::new();
            for name in names {
                let load: Option<String> =
                    self.redis.query(redis::cmd("GET").arg(self.redis.key(&format!("node:{name}")))).await?;
                let load = load.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or(serde_json::Value::Null);
                out.push((name, load));
            }
            Ok(out)
        }
        .boxed()
    }

    fn subscribe(&self) -> mpsc::Receiver<ClusterEvent> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(Subscriber { tx, behind: false });
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use periscope_protocol::AgentId;

    use super::{ClusterEvent, RedisDirectory, SUBSCRIBER_QUEUE};
    use crate::backend::AgentDirectory as _;

    #[tokio::test]
    async fn a_subscriber_that_missed_events_is_told_to_resync_before_the_next_one() {
        let server = crate::backend::redis::server::RedisServer::start().expect("redis-server starts");
        let redis = super::Redis::connect(&server.url(), "periscope:").await.expect("redis answers");
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let dir = RedisDirectory::start(redis, "a".into(), stop);
        let mut rx = dir.subscribe();
        // Subscribing to Redis tells every subscriber to resync once.
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the first resync");
        assert_eq!(first, Some(ClusterEvent::Resync));
        let agent = AgentId::generate();
        for _ in 0..=SUBSCRIBER_QUEUE {
            dir.deliver(ClusterEvent::Agent(agent.clone()));
        }
        for _ in 0..SUBSCRIBER_QUEUE {
            assert_eq!(rx.try_recv().ok(), Some(ClusterEvent::Agent(agent.clone())));
        }
        assert!(rx.try_recv().is_err(), "the event past the queue was missed");
        dir.deliver(ClusterEvent::Keys);
        assert_eq!(rx.try_recv().ok(), Some(ClusterEvent::Resync), "told to resync first");
        assert_eq!(rx.try_recv().ok(), Some(ClusterEvent::Keys));
        dir.deliver(ClusterEvent::Keys);
        assert_eq!(rx.try_recv().ok(), Some(ClusterEvent::Keys), "and only once");
    }
}
