//! Callers' budgets in Redis, so that a key's calls per minute and blocking calls at
//! once are one budget whichever node it calls: GCRAs (a theoretical arrival time per
//! budget, on Redis's clock) and sorted sets of slots scored by their deadline, each
//! check-and-take one Lua script.

use std::time::Duration;

use futures_util::FutureExt as _;
use redis::Script;

use super::{Redis, strings};
use crate::backend::BackendFuture;
use crate::quota::{Budgets, Full, Whose};

const TAKE: &str = r#"
local key, per_minute, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = 60000000 / per_minute
local tat = tonumber(redis.call('GET', key)) or now
if tat < now then tat = now end
local new_tat = tat + emission
local over = new_tat - now - emission * burst
if over > 0 then return {'0', string.format('%.0f', over)} end
redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {'1', tostring(math.floor((emission * burst - (new_tat - now)) / emission))}
"#;

/// [`TAKE`] over several GCRAs (`key per_minute burst` each) in order, stopping at the
/// first one spent: `{'1', left...}` or `{'0', index (from 0), µs until a cell fits}`.
const TAKE_ALL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {'1'}
for i = 1, #ARGV, 3 do
  local key, per_minute, burst = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local emission = 60000000 / per_minute
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + emission
  local over = new_tat - now - emission * burst
  if over > 0 then return {'0', tostring((i - 1) / 3), string.format('%.0f', over)} end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  table.insert(out, tostring(math.floor((emission * burst - (new_tat - now)) / emission)))
end
return out
"#;

const HOLD: &str = r#"
local key, key_limit, org, org_limit, id, deadline, grace = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, set in ipairs({key, org}) do redis.call('ZREMRANGEBYSCORE', set, '-inf', now - grace) end
local function full(set, limit, whose)
  local n = redis.call('ZCARD', set)
  if n >= limit then
    local s = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
    return {whose, tostring(n), s[2] or ''}
  end
end
local r = full(key, key_limit, 'key') or full(org, org_limit, 'org')
if r then return r end
redis.call('ZADD', key, deadline, id)
redis.call('ZADD', org, deadline, id)
for _, set in ipairs({key, org}) do redis.call('PEXPIRE', set, math.max(1, tonumber(deadline) - now + grace)) end
return {'ok'}
"#;

/// The shared [`Budgets`]; see the module docs.
#[derive(Debug, Clone)]
pub struct RedisBudgets {
    redis: Redis,
    take: Script,
    take_all: Script,
    hold: Script,
}

impl RedisBudgets {
    /// Budgets in `redis`.
    pub fn new(redis: Redis) -> RedisBudgets {
        RedisBudgets { redis, take: Script::new(TAKE), take_all: Script::new(TAKE_ALL), hold: Script::new(HOLD) }
    }
}

impl Budgets for RedisBudgets {
    fn take(&self, name: String, per_minute: u32, burst: u32) -> BackendFuture<'_, Result<u32, Duration>> {
        async move {
            let mut inv = self.take.prepare_invoke();
            inv.arg(self.redis.key(&format!("gcra:{name}"))).arg(per_minute.max(1)).arg(burst.max(1));
            let reply = strings(self.redis.script(&inv).await?);
            let n: u64 = reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            Ok(if reply.first().map(String::as_str) == Some("1") {
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            } else {
                Err(Duration::from_micros(n))
            })
        }
        .boxed()
    }

    fn take_all(&self, cells: Vec<(String, u32, u32)>) -> BackendFuture<'_, Result<Vec<u32>, (usize, Duration)>> {
        async move {
            let mut inv = self.take_all.prepare_invoke();
            for (name, per_minute, burst) in &cells {
                inv.arg(self.redis.key(&format!("gcra:{name}"))).arg(per_minute.max(&1)).arg(burst.max(&1));
            }
            let reply = strings(self.redis.script(&inv).await?);
            let num = |i: usize| reply.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Ok(if reply.first().map(String::as_str) == Some("1") {
                Ok((1..reply.len()).map(|i| u32::try_from(num(i)).unwrap_or(u32::MAX)).collect())
            } else {
                Err((usize::try_from(num(1)).unwrap_or(0), Duration::from_micros(num(2))))
            })
        }
        .boxed()
    }

    fn hold(
        &self,
        key: String,
        key_limit: usize,
        org: String,
        org_limit: usize,
        id: String,
        deadline_ms: u64,
    ) -> BackendFuture<'_, Result<(), Full>> {
        async move {
            let mut inv = self.hold.prepare_invoke();
            inv.arg(self.redis.key(&format!("slots:{key}")))
                .arg(key_limit)
                .arg(self.redis.key(&format!("slots:{org}")))
                .arg(org_limit)
                .arg(id)
                .arg(deadline_ms)
                .arg(5_000);
            let reply = strings(self.redis.script(&inv).await?);
            let whose = match reply.first().map(String::as_str) {
                Some("ok") => return Ok(Ok(())),
                Some("key") => Whose::Key,
                _ => Whose::Org,
            };
            Ok(Err(Full {
                whose,
                held: reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
                soonest_ms: reply.get(2).and_then(|v| v.parse::<f64>().ok()).map(|v| v as u64),
            }))
        }
        .boxed()
    }

    fn release(&self, key: String, org: String, id: String) -> BackendFuture<'_, ()> {
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(self.redis.key(&format!("slots:{key}"))).arg(&id).ignore();
            pipe.cmd("ZREM").arg(self.redis.key(&format!("slots:{org}"))).arg(&id).ignore();
            let () = self.redis.pipe(&pipe).await?;
            Ok(())
        }
        .boxed()
    }

    fn held(&self, name: String) -> BackendFuture<'_, usize> {
        async move {
            let now = crate::time::now_ms();
            self.redis
                .query(
                    redis::cmd("ZCOUNT")
                        .arg(self.redis.key(&format!("slots:{name}")))
                        .arg(now.saturating_sub(5_000))
                        .arg("+inf"),
                )
                .await
        }
        .boxed()
    }

    fn retain(&self, _keep: &dyn Fn(&str) -> bool) {
        // Every key here expires by itself.
    }
}
