//! [`RedisErrors`]: the cluster's [`ErrorStore`]. Per organization, a hash of groups
//! (`errors:<org>`, each group's JSON under its key) and a sorted set of their keys by
//! last occurrence (`errors:<org>:seen`). An update is one Lua script: read the group,
//! fold the update in (the same rules as [`ErrorGroup::absorb`], done here in Rust
//! between a read and a compare-and-set would race between nodes, so the script gets
//! both JSONs and keeps the merge in Lua), then trim the oldest beyond the bound.

use futures_util::FutureExt as _;
use redis::Script;

use super::Redis;
use crate::backend::errors::{ErrorGroup, ErrorStore, MAX_ERROR_GROUPS_PER_ORG};
use crate::backend::{BackendError, BackendFuture};

/// Folds ARGV[2] (an update's numbers: count, uncaptured, captured, first, last, hit
/// time, or -1 without a hit) and ARGV[3] (its JSON) into the group ARGV[1]. Numbers
/// are kept in hash fields of their own (`<key>#n`, as `count,uncaptured,captured,
/// first,last,hit_at`) so that Lua never re-encodes the group's JSON; the JSON of the
/// newest occurrence and of the newest hit are stored as given.
const RECORD: &str = r#"
local h, z, key = KEYS[1], KEYS[2], ARGV[1]
local u = {}
for n in string.gmatch(ARGV[2], '[^,]+') do table.insert(u, tonumber(n)) end
local cur = redis.call('HGET', h, key .. '#n')
local c = {0, 0, 0, 0, 0, -1}
if cur then
  local i = 1
  for n in string.gmatch(cur, '[^,]+') do c[i] = tonumber(n) i = i + 1 end
end
c[1] = c[1] + u[1]
c[2] = c[2] + u[2]
c[3] = c[3] + u[3]
if c[4] == 0 or (u[4] ~= 0 and u[4] < c[4]) then c[4] = u[4] end
if u[5] >= c[5] then
  c[5] = u[5]
  redis.call('HSET', h, key .. '#j', ARGV[3])
  redis.call('ZADD', z, c[5], key)
end
if u[6] >= 0 and u[6] >= c[6] then
  c[6] = u[6]
  redis.call('HSET', h, key .. '#h', ARGV[4])
end
redis.call('HSET', h, key .. '#n', string.format('%d,%d,%d,%d,%d,%d', c[1], c[2], c[3], c[4], c[5], c[6]))
local over = redis.call('ZCARD', z) - tonumber(ARGV[5])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', z, 0, over - 1)) do
    redis.call('HDEL', h, old .. '#n', old .. '#j', old .. '#h')
  end
  redis.call('ZREMRANGEBYRANK', z, 0, over - 1)
end
return 1
"#;

/// Error groups in the shared Redis.
pub struct RedisErrors {
    redis: Redis,
    record: Script,
}

impl std::fmt::Debug for RedisErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisErrors").finish_non_exhaustive()
    }
}

impl RedisErrors {
    /// Groups in `redis`.
    pub fn new(redis: Redis) -> RedisErrors {
        RedisErrors { redis, record: Script::new(RECORD) }
    }

    fn keys(&self, org: &str) -> (String, String) {
        (self.redis.key(&format!("errors:{org}")), self.redis.key(&format!("errors:{org}:seen")))
    }
}

fn corrupt(e: impl std::fmt::Display) -> BackendError {
    BackendError::Corrupt(format!("error group: {e}"))
}

impl ErrorStore for RedisErrors {
    fn record<'a>(&'a self, org: &'a str, updates: Vec<ErrorGroup>) -> BackendFuture<'a, ()> {
        async move {
            let (hash, seen) = self.keys(org);
            for update in updates {
                let key = update.key();
                let hit_at = update.hit.as_ref().map_or(-1, |h| i64::try_from(h.time_ms).unwrap_or(i64::MAX));
                let numbers = format!(
                    "{},{},{},{},{},{}",
                    update.count.min(i64::MAX as u64),
                    update.uncaptured.min(i64::MAX as u64),
                    update.captured.min(i64::MAX as u64),
                    update.first_seen_ms,
                    update.last_seen_ms,
                    hit_at
                );
                let hit = update.hit.as_ref().map(serde_json::to_string).transpose().map_err(corrupt)?;
                let json = serde_json::to_string(&update).map_err(corrupt)?;
                let mut inv = self.record.key(&hash);
                inv.key(&seen)
                    .arg(&key)
                    .arg(numbers)
                    .arg(json)
                    .arg(hit.unwrap_or_default())
                    .arg(MAX_ERROR_GROUPS_PER_ORG);
                let _: i64 = self.redis.script(&inv).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ErrorGroup>> {
        async move {
            let (hash, seen) = self.keys(org);
            let keys: Vec<String> = self.redis.query(redis::cmd("ZREVRANGE").arg(&seen).arg(0).arg(-1)).await?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&hash);
            for k in &keys {
                cmd.arg(format!("{k}#n")).arg(format!("{k}#j")).arg(format!("{k}#h"));
            }
            let values: Vec<Option<String>> = self.redis.query(&cmd).await?;
            let mut out = Vec::with_capacity(keys.len());
            for chunk in values.chunks(3) {
                let [Some(numbers), Some(json), hit] = chunk else { continue };
                let mut group: ErrorGroup = serde_json::from_str(json).map_err(corrupt)?;
                let n: Vec<u64> = numbers.split(',').map(|x| x.parse::<i64>().unwrap_or(0).max(0) as u64).collect();
                if let [count, uncaptured, captured, first, last, _] = n[..] {
                    group.count = count;
                    group.uncaptured = uncaptured;
                    group.captured = captured;
                    group.first_seen_ms = first;
                    group.last_seen_ms = last;
                }
                group.hit = match hit {
                    Some(h) if !h.is_empty() => Some(serde_json::from_str(h).map_err(corrupt)?),
                    _ => None,
                };
                out.push(group);
            }
            Ok(out)
        }
        .boxed()
    }
}
