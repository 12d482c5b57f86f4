//! The audit trail and the redaction rules, shared through Redis.
//!
//! Audit entries of each organization are a sorted set scored by a sequence every node
//! draws from one counter (the `cursor` of queries), each member `seq|json`. They are
//! written by a task of their own through a bounded queue (never on the request path),
//! retried while Redis is away; what overflows the queue is logged and counted.
//! Rules changed at run time are a hash (organization → JSON); a change is announced to
//! every node, which compiles the new rules and pushes them to the agents it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use redis::Script;
use tokio::sync::mpsc;

use super::Redis;
use crate::audit::{AuditEntry, AuditPage, AuditQuery, MAX_PAGE};
use crate::backend::{AuditReader, AuditSink, BackendError, BackendFuture, RuleStore};

/// Audit entries waiting for Redis; beyond this, new ones are dropped (and counted).
const AUDIT_QUEUE: usize = 10_000;

/// Entries read per round trip while scanning for matches.
const SCAN_BATCH: usize = 500;

/// Most entries one page scans for matches before it answers with what it found
/// (`has_more` then says the scan goes on from `next_cursor`).
const SCAN_LIMIT: usize = 20_000;

const APPEND: &str = r#"
local P, org = ARGV[1], ARGV[2]
local seq = redis.call('INCR', P .. 'audit:seq')
redis.call('ZADD', P .. 'audit:o:' .. org, seq, seq .. '|' .. ARGV[3])
redis.call('SADD', P .. 'audit:orgs', org)
return seq
"#;

/// The shared [`AuditSink`] and [`AuditReader`].
#[derive(Debug, Clone)]
pub struct RedisAudit {
    redis: Redis,
    queue: mpsc::Sender<AuditEntry>,
    dropped: Arc<AtomicU64>,
}

impl RedisAudit {
    /// The audit trail in `redis`, with its writer task.
    pub fn start(redis: Redis) -> RedisAudit {
        let (tx, mut rx) = mpsc::channel::<AuditEntry>(AUDIT_QUEUE);
        let writer = redis.clone();
        tokio::spawn(async move {
            let script = Script::new(APPEND);
            while let Some(entry) = rx.recv().await {
                let Ok(json) = serde_json::to_string(&entry) else { continue };
                loop {
                    let mut inv = script.prepare_invoke();
                    inv.arg(writer.prefix()).arg(&entry.org).arg(&json);
                    match writer.script::<i64>(&inv).await {
                        Ok(_) => break,
                        Err(BackendError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(500)).await,
                        Err(e) => {
                            tracing::error!(error = %e, "an audit entry could not be written");
                            break;
                        }
                    }
                }
            }
        });
        RedisAudit { redis, queue: tx, dropped: Arc::default() }
    }

    /// The organizations that have audit entries.
    pub async fn orgs(&self) -> Result<Vec<String>, BackendError> {
        self.redis.query(redis::cmd("SMEMBERS").arg(self.redis.key("audit:orgs"))).await
    }

    /// Entries dropped because the queue to Redis was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Entries of `org` after `after`, in order, decoded, a batch at a time.
    async fn batch(&self, org: &str, after: u64) -> Result<Vec<AuditEntry>, BackendError> {
        let items: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.redis.key(&format!("audit:o:{org}")))
                    .arg(format!("({after}"))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SCAN_BATCH),
            )
            .await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Some((seq, json)) = item.split_once('|') else { continue };
            let Ok(seq) = seq.parse::<u64>() else { continue };
            match serde_json::from_str::<AuditEntry>(json) {
                Ok(mut e) => {
                    e.seq = seq;
                    out.push(e);
                }
                Err(e) => tracing::warn!(seq, error = %e, "skipping an audit entry that does not decode"),
            }
        }
        Ok(out)
    }
}

/// Whether an entry passes a query's filters (its organization is the key's).
fn admits(q: &AuditQuery, e: &AuditEntry) -> bool {
    q.since_ms.is_none_or(|t| e.at_ms >= t)
        && q.until_ms.is_none_or(|t| e.at_ms < t)
        && q.actor.as_deref().is_none_or(|a| e.actor.column() == a || e.actor.name() == a)
        && q.kind.is_none_or(|k| e.kind == k)
        && q.action_id.as_deref().is_none_or(|a| e.action_id.as_deref() == Some(a))
}

impl AuditSink for RedisAudit {
    fn append(&self, entry: AuditEntry) {
        if self.queue.try_send(entry).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(dropped = n, "the audit queue to redis is full; an entry was dropped");
        }
    }

    fn purge_before(&self, cutoff_ms: u64) {
        let redis = self.redis.clone();
        let audit = self.clone();
        tokio::spawn(async move {
            let Ok(orgs) = redis.query::<Vec<String>>(redis::cmd("SMEMBERS").arg(redis.key("audit:orgs"))).await else {
                return;
            };
            for org in orgs {
                // Entries are in the order they were written, which is their time order
                // within a clock's precision: remove from the front while old.
                loop {
                    let Ok(batch) = audit.batch(&org, 0).await else { return };
                    let old: Vec<u64> = batch.iter().take_while(|e| e.at_ms < cutoff_ms).map(|e| e.seq).collect();
                    let Some(last) = old.last() else { break };
                    let key = redis.key(&format!("audit:o:{org}"));
                    if redis
                        .query::<i64>(redis::cmd("ZREMRANGEBYSCORE").arg(&key).arg("-inf").arg(*last))
                        .await
                        .is_err()
                        || old.len() < batch.len()
                    {
                        break;
                    }
                }
            }
        });
    }
}

impl AuditReader for RedisAudit {
    fn page(&self, q: AuditQuery) -> BackendFuture<'_, AuditPage> {
        async move {
            let org = q.org.clone().unwrap_or_default();
            let limit = q.limit.clamp(1, MAX_PAGE);
            let mut items = Vec::new();
            let mut after = q.after_seq;
            let mut scanned = 0usize;
            loop {
                let batch = self.batch(&org, after).await?;
                let Some(last) = batch.last().map(|e| e.seq) else {
                    return Ok(AuditPage { items, next_cursor: None, has_more: false });
                };
                scanned += batch.len();
                for e in batch {
                    if admits(&q, &e) {
                        if items.len() == limit {
                            let cursor = items.last().map(|x: &AuditEntry| x.seq.to_string());
                            return Ok(AuditPage { items, next_cursor: cursor, has_more: true });
                        }
                        items.push(e);
                    }
                }
                after = last;
                if scanned >= SCAN_LIMIT {
                    // Sparse matches: say where the scan stopped rather than read on.
                    return Ok(AuditPage { items, next_cursor: Some(last.to_string()), has_more: true });
                }
            }
        }
        .boxed()
    }

    fn export(&self, q: AuditQuery, out: mpsc::Sender<Vec<u8>>) -> BackendFuture<'_, u64> {
        async move {
            let org = q.org.clone().unwrap_or_default();
            let mut after = q.after_seq;
            let mut n = 0u64;
            loop {
                let batch = self.batch(&org, after).await?;
                let Some(last) = batch.last().map(|e| e.seq) else { return Ok(n) };
                let mut chunk = Vec::new();
                for e in batch.iter().filter(|e| admits(&q, e)) {
                    let mut text = serde_json::to_string(e).unwrap_or_default();
                    text.push('\n');
                    chunk.extend_from_slice(text.as_bytes());
                    n += 1;
                }
                if !chunk.is_empty() && out.send(chunk).await.is_err() {
                    return Ok(n);
                }
                after = last;
            }
        }
        .boxed()
    }
}

/// The shared [`RuleStore`]: a hash of organization → rules, and an announcement to
/// every other node.
#[derive(Debug, Clone)]
pub struct RedisRules {
    redis: Redis,
    node: String,
    /// The hash the settings live in, and the word other nodes hear (`rules` for the
    /// redaction rules).
    namespace: &'static str,
}

impl RedisRules {
    /// Rules in `redis`, changed by node `node`.
    pub fn new(redis: Redis, node: String) -> RedisRules {
        RedisRules { redis, node, namespace: "rules" }
    }

    /// Other per-organization settings (`namespace`, e.g. `safety`) kept the same way;
    /// other nodes hear `<node>|<namespace>|<org>`.
    pub fn namespaced(namespace: &'static str, redis: Redis, node: String) -> RedisRules {
        RedisRules { redis, node, namespace }
    }
}

impl RuleStore for RedisRules {
    fn save<'a>(&'a self, org: &'a str, json: String) -> BackendFuture<'a, ()> {
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("HSET").arg(self.redis.key(self.namespace)).arg(org).arg(json).ignore();
            let announcement = format!("{}|{}|{org}", self.node, self.namespace);
            pipe.cmd("PUBLISH").arg(self.redis.key("c:bcast")).arg(announcement).ignore();
            let () = self.redis.pipe(&pipe).await?;
            Ok(())
        }
        .boxed()
    }

    fn load_all(&self) -> BackendFuture<'_, Vec<(String, String)>> {
        async move {
            let all: std::collections::BTreeMap<String, String> =
                self.redis.query(redis::cmd("HGETALL").arg(self.redis.key(self.namespace))).await?;
            Ok(all.into_iter().collect())
        }
        .boxed()
    }
}
