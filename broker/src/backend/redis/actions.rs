//! Actions in Redis. Each action is a hash (`a:<id>`: its record as JSON in `rec`, and
//! beside it what changes often: `status`, `hits`, `refused`, `lines`, `v`ersion, …),
//! with a set of the agents it targets, a hash of the redaction rules that fired, a list
//! of hits and one of lines (each item `index|json`: the index every node shares), and a
//! hash of metric figures per agent (each agent is held by one node at a time, which
//! alone merges its reports). Live actions are sorted sets by expiry (all, per key, per
//! organization), ended ones by end time (all, per organization, per key, and keys per
//! organization by how many they hold). Every change is one Lua script: the check and
//! the write are atomic whichever node runs them.

use std::collections::BTreeMap;

use futures_util::FutureExt as _;
use periscope_protocol::{ActionId, ActionKind, Hit, HitId, LogLine, MetricReport};
use redis::Script;

use super::{Redis, strings};
use crate::backend::{
    ActionStore, BackendError, BackendFuture, Ended, HitOutcome, LinesOutcome, LiveLimits, LiveRefusal, RateSpec,
};
use crate::engine::{ActionRecord, ActionStatus, HitsPage, Sender, StoredHit};
use crate::telemetry::{LinesPage, MAX_STORED_LINES, MetricData, StoredLine};

/// Shared Lua: the clock (Redis's own, so every node agrees) and a GCRA.
const LIB: &str = r#"
local P = ARGV[1]
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function gcra(key, per_sec, burst, n, now)
  local emission = 1000000 / per_sec
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + emission * n
  if new_tat - now > emission * burst then return false end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  return true
end
local function forget(id, org, key)
  redis.call('ZREM', P .. 'ended', id)
  redis.call('ZREM', P .. 'ended:o:' .. org, id)
  redis.call('ZREM', P .. 'ended:k:' .. org .. ':' .. key, id)
  if tonumber(redis.call('ZINCRBY', P .. 'ended:n:' .. org, -1, key)) <= 0 then
    redis.call('ZREM', P .. 'ended:n:' .. org, key)
  end
  redis.call('SREM', P .. 'org:' .. org, id)
  local a = P .. 'a:' .. id
  redis.call('DEL', a, a .. ':ag', a .. ':rules', a .. ':h', a .. ':l', a .. ':m', a .. ':rl', a .. ':rb')
end
"#;

const INSERT: &str = r#"
local id, key, org, exp, per_key, per_org = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local n = redis.call('ZCARD', P .. 'live:k:' .. key)
if n >= per_key then
  local s = redis.call('ZRANGE', P .. 'live:k:' .. key, 0, 0, 'WITHSCORES')
  return {'key', tostring(n), s[2] or ''}
end
n = redis.call('ZCARD', P .. 'live:o:' .. org)
if n >= per_org then
  local s = redis.call('ZRANGE', P .. 'live:o:' .. org, 0, 0, 'WITHSCORES')
  return {'org', tostring(n), s[2] or ''}
end
local a = P .. 'a:' .. id
redis.call('HSET', a, 'rec', ARGV[8], 'v', 1, 'status', 'active', 'org', org, 'key', key, 'kind', ARGV[9],
  'max', ARGV[10], 'exp', exp, 'hits', 0, 'refused', 0, 'lines', 0, 'dpaused', 0)
for i = 11, #ARGV do redis.call('SADD', a .. ':ag', ARGV[i]) end
redis.call('ZADD', P .. 'live', exp, id)
redis.call('ZADD', P .. 'live:k:' .. key, exp, id)
redis.call('ZADD', P .. 'live:o:' .. org, exp, id)
redis.call('SADD', P .. 'org:' .. org, id)
return {'ok'}
"#;

const SWAP: &str = r#"
local a = P .. 'a:' .. ARGV[2]
if redis.call('HGET', a, 'v') ~= ARGV[3] then return 0 end
redis.call('HSET', a, 'rec', ARGV[4], 'dpaused', ARGV[5])
redis.call('HINCRBY', a, 'v', 1)
for i = 6, #ARGV do redis.call('SADD', a .. ':ag', ARGV[i]) end
return 1
"#;

const END: &str = r#"
local id, status, reason, now, max = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local a = P .. 'a:' .. id
local f = redis.call('HMGET', a, 'status', 'org', 'key')
if f[1] ~= 'active' then return {} end
local org, key = f[2], f[3]
redis.call('HSET', a, 'status', status, 'ended_at', now, 'end_reason', reason)
redis.call('HINCRBY', a, 'v', 1)
redis.call('ZREM', P .. 'live', id)
redis.call('ZREM', P .. 'live:k:' .. key, id)
redis.call('ZREM', P .. 'live:o:' .. org, id)
redis.call('ZADD', P .. 'ended', now, id)
redis.call('ZADD', P .. 'ended:o:' .. org, now, id)
redis.call('ZADD', P .. 'ended:k:' .. org .. ':' .. key, now, id)
redis.call('ZINCRBY', P .. 'ended:n:' .. org, 1, key)
local forgotten = {}
while redis.call('ZCARD', P .. 'ended:o:' .. org) > max do
  local top = redis.call('ZREVRANGE', P .. 'ended:n:' .. org, 0, 0)
  if not top[1] then break end
  local old = redis.call('ZRANGE', P .. 'ended:k:' .. org .. ':' .. top[1], 0, 0)[1]
  if not old then redis.call('ZREM', P .. 'ended:n:' .. org, top[1]) else
    forget(old, org, top[1])
    table.insert(forgotten, old)
  end
end
return {'ok', forgotten, redis.call('HGETALL', a), redis.call('HGETALL', a .. ':rules')}
"#;

const PURGE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', P .. 'ended', '-inf', '(' .. ARGV[2])
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'a:' .. id, 'org', 'key')
  if f[1] then forget(id, f[1], f[2]) else redis.call('ZREM', P .. 'ended', id) end
end
return ids
"#;

/// Appends hits of one agent (each `id json nrules rule...`), each checked and written
/// as if alone: `{outcome, index, complete}` per hit.
const APPEND_HITS: &str = r#"
local agent, org, epoch, per_sec, burst = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local fenced = false
if epoch ~= '0' then
  local lease = redis.call('GET', P .. 'lease:' .. agent)
  fenced = not lease or string.match(lease, '^(%d+)|') ~= epoch
end
local now = now_us()
local out = {}
local i = 7
while i <= #ARGV do
  local id, json, nrules = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first_rule = i + 3
  i = first_rule + nrules
  local a = P .. 'a:' .. id
  local f = redis.call('HMGET', a, 'status', 'org', 'max', 'hits')
  if not f[1] then
    table.insert(out, {'refused'})
  elseif fenced then
    table.insert(out, {'lease_lost'})
  elseif f[1] ~= 'active' or f[2] ~= org or redis.call('SISMEMBER', a .. ':ag', agent) == 0
     or tonumber(f[4]) >= tonumber(f[3]) then
    redis.call('HINCRBY', a, 'refused', 1)
    redis.call('HINCRBY', a, 'v', 1)
    table.insert(out, {'refused'})
  elseif not gcra(a .. ':r:' .. agent, per_sec, burst, 1, now) then
    table.insert(out, {'rate_limited'})
  else
    local n = redis.call('HINCRBY', a, 'hits', 1)
    redis.call('RPUSH', a .. ':h', n .. '|' .. json)
    for r = first_rule, i - 1 do redis.call('HINCRBY', a .. ':rules', ARGV[r], 1) end
    redis.call('HSET', a, 'dpaused', 0)
    redis.call('HINCRBY', a, 'v', 1)
    local complete = 0
    if n >= tonumber(f[3]) then complete = 1 end
    table.insert(out, {'accepted', tostring(n), tostring(complete)})
  end
end
return out
"#;

const ADMIT_LINES: &str = r#"
local id, agent, org = ARGV[2], ARGV[3], ARGV[4]
local a = P .. 'a:' .. id
local f = redis.call('HMGET', a, 'status', 'org', 'kind')
if f[1] ~= 'active' or f[2] ~= org or f[3] ~= 'log' or redis.call('SISMEMBER', a .. ':ag', agent) == 0 then
  return {'refused'}
end
local lps, lb, bps, bb = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_us()
local out = {'ok'}
for i = 9, #ARGV do
  local ok = gcra(a .. ':rl', lps, lb, 1, now) and gcra(a .. ':rb', bps, bb, tonumber(ARGV[i]), now)
  if ok then table.insert(out, '1') else table.insert(out, '0') end
end
return out
"#;

const APPEND_LINES: &str = r#"
local id, agent, org, keep = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local a = P .. 'a:' .. id
local f = redis.call('HMGET', a, 'status', 'org', 'max')
if f[1] ~= 'active' or f[2] ~= org or redis.call('SISMEMBER', a .. ':ag', agent) == 0 then
  return {'refused'}
end
local max = tonumber(f[3]) or 0
local kept, complete = 0, 0
local i = 6
while i < #ARGV do
  local idx = redis.call('HINCRBY', a, 'lines', 1)
  redis.call('RPUSH', a .. ':l', idx .. '|' .. ARGV[i])
  for rule in string.gmatch(ARGV[i + 1], '[^\31]+') do redis.call('HINCRBY', a .. ':rules', rule, 1) end
  kept = kept + 1
  i = i + 2
  if max > 0 and idx >= max then complete = 1 break end
end
redis.call('LTRIM', a .. ':l', -keep, -1)
redis.call('HSET', a, 'dpaused', 0)
redis.call('HINCRBY', a, 'v', 1)
return {'ok', tostring(kept), tostring(complete)}
"#;

const READ_LINES: &str = r#"
local a = P .. 'a:' .. ARGV[2]
local since, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local total = tonumber(redis.call('HGET', a, 'lines') or '0')
local first = redis.call('LINDEX', a .. ':l', 0)
local first_idx = total + 1
if first then first_idx = tonumber(string.match(first, '^(%d+)|')) end
local skip = since - (first_idx - 1)
if skip < 0 then skip = 0 end
local items = redis.call('LRANGE', a .. ':l', skip, skip + limit - 1)
local out = {tostring(total), tostring(first_idx - 1)}
for _, v in ipairs(items) do table.insert(out, v) end
return out
"#;

const METRIC_TARGET: &str = r#"
local a = P .. 'a:' .. ARGV[2]
local f = redis.call('HMGET', a, 'org', 'kind')
if f[1] ~= ARGV[4] or f[2] ~= 'metric' or redis.call('SISMEMBER', a .. ':ag', ARGV[3]) == 0 then return {'refused'} end
redis.call('HINCRBY', a, 'v', 1)
local cur = redis.call('HGET', a .. ':m', ARGV[3])
if cur then return {'ok', cur} end
return {'ok'}
"#;

/// The shared [`ActionStore`]; see the module docs.
#[derive(Debug, Clone)]
pub struct RedisActions {
    redis: Redis,
    max_ended: usize,
    insert: Script,
    swap: Script,
    end: Script,
    purge: Script,
    append_hits: Script,
    admit_lines: Script,
    append_lines: Script,
    read_lines: Script,
    metric_target: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Corrupt(format!("{what}: {e}"))
}

fn kind_name(record: &ActionRecord) -> &'static str {
    record.spec.kind.name()
}

/// The most an action collects: hits for a snapshot, lines for a capped log (0: no cap).
fn max_of(record: &ActionRecord) -> u64 {
    match &record.spec.kind {
        ActionKind::Snapshot(s) => u64::from(s.max_hits),
        ActionKind::CaptureErrors(_) => u64::from(crate::engine::errors::MAX_ERROR_HITS),
        ActionKind::Log(l) => l.max_lines.unwrap_or(0),
        _ => 0,
    }
}

/// Splits a stored `index|json` item.
fn indexed(item: &str) -> Option<(u64, &str)> {
    let (idx, json) = item.split_once('|')?;
    Some((idx.parse().ok()?, json))
}

/// An action's record from its hash's fields and the rules that fired (`None` when
/// the hash is gone), with its version.
fn decode(
    fields: &BTreeMap<String, String>,
    rules: BTreeMap<String, u64>,
) -> Result<Option<(ActionRecord, u64)>, BackendError> {
    let Some(json) = fields.get("rec") else { return Ok(None) };
    let mut record: ActionRecord = serde_json::from_str(json).map_err(|e| corrupt("action", e))?;
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    record.status = fields
        .get("status")
        .and_then(|s| ActionStatus::parse(s))
        .ok_or_else(|| corrupt("action status", format!("{:?}", fields.get("status"))))?;
    record.ended_at_ms = fields.get("ended_at").and_then(|v| v.parse().ok());
    record.end_reason = fields.get("end_reason").cloned();
    record.hits = num("hits");
    record.hits_refused = num("refused");
    record.lines = num("lines");
    record.rules_fired = rules;
    record.dropped.paused = num("dpaused") == 1;
    Ok(Some((record, num("v"))))
}

/// A page of hits from the stored items after `since` and how many there are.
fn hits_page(items: &[String], total: u64, since: u64) -> Result<HitsPage, BackendError> {
    let mut hits = Vec::with_capacity(items.len());
    for item in items {
        let (idx, json) = indexed(item).ok_or_else(|| corrupt("hit", "no index"))?;
        let mut hit: StoredHit = serde_json::from_str(json).map_err(|e| corrupt("hit", e))?;
        hit.index = idx;
        hits.push(hit);
    }
    let next = hits.last().map_or(since.min(total), |h| h.index);
    Ok(HitsPage { hits, next_cursor: next, has_more: next < total })
}

impl RedisActions {
    /// Actions in `redis`, keeping at most `max_ended` ended actions per organization.
    pub fn new(redis: Redis, max_ended: usize) -> RedisActions {
        RedisActions {
            redis,
            max_ended: max_ended.max(1),
            insert: script(INSERT),
            swap: script(SWAP),
            end: script(END),
            purge: script(PURGE),
            append_hits: script(APPEND_HITS),
            admit_lines: script(ADMIT_LINES),
            append_lines: script(APPEND_LINES),
            read_lines: script(READ_LINES),
            metric_target: script(METRIC_TARGET),
        }
    }

    fn a(&self, id: &ActionId) -> String {
        self.redis.key(&format!("a:{id}"))
    }

    /// Adds the reads of a page of hits (the items, then how many there are) to `pipe`.
    fn page_of_hits(&self, pipe: &mut redis::Pipeline, id: &ActionId, since: u64, limit: usize) {
        let list = format!("{}:h", self.a(id));
        let stop = since.saturating_add(limit.max(1) as u64).saturating_sub(1);
        pipe.cmd("LRANGE").arg(&list).arg(since).arg(stop).cmd("LLEN").arg(&list);
    }

    async fn read(&self, id: &ActionId) -> Result<Option<(ActionRecord, u64)>, BackendError> {
        let a = self.a(id);
        let mut pipe = redis::pipe();
        pipe.hgetall(&a).hgetall(format!("{a}:rules"));
        let (fields, rules): (BTreeMap<String, String>, BTreeMap<String, u64>) = self.redis.pipe(&pipe).await?;
        decode(&fields, rules)
    }

    async fn read_all(&self, ids: Vec<String>) -> Result<Vec<ActionRecord>, BackendError> {
        let mut out = Vec::with_capacity(ids.len());
        for raw in ids {
            let Ok(id) = ActionId::parse(&raw) else { continue };
            if let Some((r, _)) = self.read(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

impl ActionStore for RedisActions {
    fn insert(&self, record: ActionRecord, limits: LiveLimits) -> BackendFuture<'_, Result<(), LiveRefusal>> {
        async move {
            let json = serde_json::to_string(&record).map_err(|e| corrupt("action", e))?;
            let mut inv = self.insert.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(record.spec.id.as_str())
                .arg(&record.created_by_key)
                .arg(&record.org)
                .arg(record.spec.expires_at_ms)
                .arg(limits.per_key)
                .arg(limits.per_org)
                .arg(json)
                .arg(kind_name(&record))
                .arg(max_of(&record));
            for id in record.agents.keys() {
                inv.arg(id.as_str());
            }
            let reply = strings(self.redis.script(&inv).await?);
            let n = |i: usize| reply.get(i).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            let soonest = reply.get(2).and_then(|v| v.parse::<f64>().ok()).map(|t| t as u64);
            Ok(match reply.first().map(String::as_str) {
                Some("ok") => Ok(()),
                Some("key") => Err(LiveRefusal::Key { live: n(1), soonest_ms: soonest }),
                Some("org") => Err(LiveRefusal::Org { live: n(1), soonest_ms: soonest }),
                other => return Err(corrupt("insert", format!("{other:?}"))),
            })
        }
        .boxed()
    }

    fn load<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<(ActionRecord, u64)>> {
        self.read(id).boxed()
    }

    fn swap<'a>(&'a self, record: &'a ActionRecord, version: u64) -> BackendFuture<'a, bool> {
        async move {
            let json = serde_json::to_string(record).map_err(|e| corrupt("action", e))?;
            let mut inv = self.swap.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(record.spec.id.as_str())
                .arg(version)
                .arg(json)
                .arg(u8::from(record.dropped.paused));
            for id in record.agents.keys() {
                inv.arg(id.as_str());
            }
            let done: i64 = self.redis.script(&inv).await?;
            Ok(done == 1)
        }
        .boxed()
    }

    fn end<'a>(
        &'a self,
        id: &'a ActionId,
        status: ActionStatus,
        reason: &'a str,
        now_ms: u64,
    ) -> BackendFuture<'a, Option<Ended>> {
        async move {
            let mut inv = self.end.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(id.as_str())
                .arg(status.as_str())
                .arg(reason)
                .arg(now_ms)
                .arg(self.max_ended);
            // The record as it ended comes back with the change: no second round trip.
            let reply: redis::Value = self.redis.script(&inv).await?;
            let redis::Value::Array(mut parts) = reply else { return Err(corrupt("end", format!("{reply:?}"))) };
            if parts.len() != 4 || strings(parts[0].clone()).first().map(String::as_str) != Some("ok") {
                return Ok(None);
            }
            let rules = parts.pop().map(redis::from_redis_value::<BTreeMap<String, u64>>).transpose();
            let fields = parts.pop().map(redis::from_redis_value::<BTreeMap<String, String>>).transpose();
            let (Ok(Some(rules)), Ok(Some(fields))) = (rules, fields) else {
                return Err(corrupt("end", "the record does not decode"));
            };
            let forgotten: Vec<ActionId> = strings(parts.pop().unwrap_or(redis::Value::Nil))
                .iter()
                .filter_map(|s| ActionId::parse(s).ok())
                .collect();
            let record = match decode(&fields, rules)? {
                Some((r, _)) => r,
                // Its own retention bound forgot it at once.
                None => return Ok(None),
            };
            Ok(Some(Ended { record, forgotten }))
        }
        .boxed()
    }

    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>> {
        async move {
            let ids: Vec<String> =
                self.redis.query(redis::cmd("SMEMBERS").arg(self.redis.key(&format!("org:{org}")))).await?;
            self.read_all(ids).await
        }
        .boxed()
    }

    fn live<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>> {
        async move {
            let ids: Vec<String> = self
                .redis
                .query(redis::cmd("ZRANGE").arg(self.redis.key(&format!("live:o:{org}"))).arg(0).arg(-1))
                .await?;
            self.read_all(ids).await
        }
        .boxed()
    }

    fn due(&self, now_ms: u64) -> BackendFuture<'_, Vec<ActionId>> {
        async move {
            let ids: Vec<String> = self
                .redis
                .query(redis::cmd("ZRANGEBYSCORE").arg(self.redis.key("live")).arg("-inf").arg(now_ms))
                .await?;
            Ok(ids.iter().filter_map(|s| ActionId::parse(s).ok()).collect())
        }
        .boxed()
    }

    fn live_counts<'a>(&'a self, key_id: &'a str, org: &'a str) -> BackendFuture<'a, (usize, usize)> {
        async move {
            let mut pipe = redis::pipe();
            pipe.zcard(self.redis.key(&format!("live:k:{key_id}"))).zcard(self.redis.key(&format!("live:o:{org}")));
            self.redis.pipe(&pipe).await
        }
        .boxed()
    }

    fn ended_count<'a>(&'a self, org: &'a str) -> BackendFuture<'a, usize> {
        async move { self.redis.query(redis::cmd("ZCARD").arg(self.redis.key(&format!("ended:o:{org}")))).await }
            .boxed()
    }

    fn append_hit<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        mut hit: Hit,
        now_ms: u64,
        rate: RateSpec,
    ) -> BackendFuture<'a, HitOutcome> {
        async move {
            hit.action_id = id.clone();
            let mut out = self.append_hits(from, vec![hit], now_ms, rate).await?;
            out.pop().ok_or_else(|| corrupt("append_hit", "no outcome"))
        }
        .boxed()
    }

    fn append_hits<'a>(
        &'a self,
        from: &'a Sender,
        hits: Vec<Hit>,
        now_ms: u64,
        rate: RateSpec,
    ) -> BackendFuture<'a, Vec<HitOutcome>> {
        async move {
            let n = hits.len();
            if n == 0 {
                return Ok(Vec::new());
            }
            let mut inv = self.append_hits.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(from.id.as_str())
                .arg(&from.org)
                .arg(from.epoch)
                .arg(rate.per_sec)
                .arg(rate.burst);
            for hit in hits {
                let id = hit.action_id.clone();
                let rules: Vec<String> = hit.redactions.iter().map(|f| f.rule.clone()).collect();
                let stored = StoredHit {
                    hit_id: HitId::generate(),
                    index: 0,
                    agent_id: from.id.clone(),
                    agent_name: from.name.clone(),
                    received_at_ms: now_ms,
                    hit,
                };
                let json = serde_json::to_string(&stored).map_err(|e| corrupt("hit", e))?;
                inv.arg(id.as_str()).arg(json).arg(rules.len());
                for r in &rules {
                    inv.arg(r);
                }
            }
            let reply: redis::Value = self.redis.script(&inv).await?;
            let redis::Value::Array(items) = reply else { return Err(corrupt("append_hits", format!("{reply:?}"))) };
            if items.len() != n {
                return Err(corrupt("append_hits", format!("{} outcomes for {n} hits", items.len())));
            }
            Ok(items
                .into_iter()
                .map(|item| {
                    let reply = strings(item);
                    match reply.first().map(String::as_str) {
                        Some("accepted") => HitOutcome::Accepted {
                            index: reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
                            complete: reply.get(2).map(String::as_str) == Some("1"),
                        },
                        Some("rate_limited") => HitOutcome::RateLimited,
                        Some("lease_lost") => HitOutcome::LeaseLost,
                        _ => HitOutcome::Refused,
                    }
                })
                .collect())
        }
        .boxed()
    }

    fn hits<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, HitsPage> {
        async move {
            let mut pipe = redis::pipe();
            self.page_of_hits(&mut pipe, id, since, limit);
            let (items, total): (Vec<String>, u64) = self.redis.pipe(&pipe).await?;
            hits_page(&items, total, since)
        }
        .boxed()
    }

    fn load_with_hits<'a>(
        &'a self,
        id: &'a ActionId,
        since: u64,
        limit: usize,
    ) -> BackendFuture<'a, Option<(ActionRecord, HitsPage)>> {
        async move {
            let a = self.a(id);
            let mut pipe = redis::pipe();
            pipe.hgetall(&a).hgetall(format!("{a}:rules"));
            self.page_of_hits(&mut pipe, id, since, limit);
            type Reply = (BTreeMap<String, String>, BTreeMap<String, u64>, Vec<String>, u64);
            let (fields, rules, items, total): Reply = self.redis.pipe(&pipe).await?;
            let Some((record, _)) = decode(&fields, rules)? else { return Ok(None) };
            Ok(Some((record, hits_page(&items, total, since)?)))
        }
        .boxed()
    }

    fn admit_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        costs: &'a [u32],
        rates: (RateSpec, RateSpec),
    ) -> BackendFuture<'a, Option<Vec<bool>>> {
        async move {
            let mut inv = self.admit_lines.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(id.as_str())
                .arg(from.id.as_str())
                .arg(&from.org)
                .arg(rates.0.per_sec)
                .arg(rates.0.burst)
                .arg(rates.1.per_sec)
                .arg(rates.1.burst);
            for c in costs {
                inv.arg(*c);
            }
            let reply = strings(self.redis.script(&inv).await?);
            if reply.first().map(String::as_str) != Some("ok") {
                return Ok(None);
            }
            Ok(Some(reply[1..].iter().map(|v| v == "1").collect()))
        }
        .boxed()
    }

    fn append_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        lines: Vec<LogLine>,
        now_ms: u64,
    ) -> BackendFuture<'a, LinesOutcome> {
        async move {
            let n = lines.len();
            let mut inv = self.append_lines.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(id.as_str()).arg(from.id.as_str()).arg(&from.org).arg(MAX_STORED_LINES);
            for line in lines {
                let rules: Vec<String> = line.redactions.iter().map(|f| f.rule.clone()).collect();
                let stored = StoredLine {
                    index: 0,
                    agent_id: from.id.clone(),
                    agent_name: from.name.clone(),
                    received_at_ms: now_ms,
                    line,
                };
                inv.arg(serde_json::to_string(&stored).map_err(|e| corrupt("line", e))?).arg(rules.join("\u{1f}"));
            }
            let reply = strings(self.redis.script(&inv).await?);
            let mut out = LinesOutcome::default();
            if reply.first().map(String::as_str) != Some("ok") {
                out.refused = n;
                return Ok(out);
            }
            out.kept = reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            out.complete = reply.get(2).map(String::as_str) == Some("1");
            Ok(out)
        }
        .boxed()
    }

    fn lines<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, LinesPage> {
        async move {
            let mut inv = self.read_lines.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(id.as_str()).arg(since).arg(limit.max(1));
            let reply = strings(self.redis.script(&inv).await?);
            let total: u64 = reply.first().and_then(|v| v.parse().ok()).unwrap_or(0);
            let dropped: u64 = reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut lines = Vec::new();
            for item in reply.iter().skip(2) {
                let (idx, json) = indexed(item).ok_or_else(|| corrupt("line", "no index"))?;
                let mut line: StoredLine = serde_json::from_str(json).map_err(|e| corrupt("line", e))?;
                line.index = idx;
                lines.push(line);
            }
            let next_cursor = lines.last().map_or(since.max(dropped), |l| l.index);
            Ok(LinesPage { has_more: next_cursor < total, next_cursor, lines, dropped })
        }
        .boxed()
    }

    fn merge_metric<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        mut report: MetricReport,
    ) -> BackendFuture<'a, bool> {
        async move {
            let mut inv = self.metric_target.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(id.as_str()).arg(from.id.as_str()).arg(&from.org);
            let reply = strings(self.redis.script(&inv).await?);
            if reply.first().map(String::as_str) != Some("ok") {
                return Ok(false);
            }
            // This agent's own figures: only the node holding it merges them.
            let mut mine: MetricData = match reply.get(1) {
                Some(json) => serde_json::from_str(json).map_err(|e| corrupt("metric", e))?,
                None => MetricData::default(),
            };
            crate::telemetry::sanitize(&mut report);
            mine.merge(&from.id, &report);
            let json = serde_json::to_string(&mine).map_err(|e| corrupt("metric", e))?;
            let () = self
                .redis
                .query(redis::cmd("HSET").arg(format!("{}:m", self.a(id))).arg(from.id.as_str()).arg(json))
                .await?;
            Ok(true)
        }
        .boxed()
    }

    fn metric<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<MetricData>> {
        async move {
            let parts: BTreeMap<String, String> =
                self.redis.query(redis::cmd("HGETALL").arg(format!("{}:m", self.a(id)))).await?;
            let kind: Option<String> = self.redis.query(redis::cmd("HGET").arg(self.a(id)).arg("kind")).await?;
            if kind.as_deref() != Some("metric") {
                return Ok(None);
            }
            let mut total = MetricData::default();
            for json in parts.values() {
                let part: MetricData = serde_json::from_str(json).map_err(|e| corrupt("metric", e))?;
                total.absorb(&part);
            }
            Ok(Some(total))
        }
        .boxed()
    }

    fn purge_before(&self, cutoff_ms: u64) -> BackendFuture<'_, Vec<ActionId>> {
        async move {
            let mut inv = self.purge.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(cutoff_ms);
            let reply = strings(self.redis.script(&inv).await?);
            Ok(reply.iter().filter_map(|s| ActionId::parse(s).ok()).collect())
        }
        .boxed()
    }
}
