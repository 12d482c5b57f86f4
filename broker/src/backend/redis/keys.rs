//! The key directory in Redis: hash `keys` (id → the stored key, JSON), hash
//! `keys:revoked` (id → `at|by`), set `orgs`, set `groups` (`org<TAB>group`), hash
//! `pools` (`org<TAB>pool` → group), counter `auth_epoch` (bumped by every change, read
//! by every node on every authenticated call), and the audit entries of each change
//! written by the same script. A change is also announced to every node, which re-reads
//! the directory at once (the epoch check would catch it at the next call anyway).

use futures_util::FutureExt as _;
use redis::Script;

use super::{Redis, strings};
use crate::audit::AuditEntry;
use crate::backend::{AssignAudit, BackendError, BackendFuture, KeyBackend, KeyRefusal, KeyRow, KeyRows};
use crate::keys::{DEFAULT_GROUP, DEFAULT_ORG};

/// Appends an audit entry (ARGV at `i`: organization, JSON) and bumps the epoch.
const LIB: &str = r#"
local P = ARGV[1]
local function audit(org, json)
  local seq = redis.call('INCR', P .. 'audit:seq')
  redis.call('ZADD', P .. 'audit:o:' .. org, seq, seq .. '|' .. json)
  redis.call('SADD', P .. 'audit:orgs', org)
end
local function ensure_org(org)
  local n = redis.call('SADD', P .. 'orgs', org)
  redis.call('SADD', P .. 'groups', org .. '\t' .. 'default')
  return n == 1
end
"#;

const ENSURE: &str = r#"
local changed = false
local i = 2
while i <= #ARGV do
  if ensure_org(ARGV[i]) then changed = true end
  if ARGV[i + 1] ~= '' and redis.call('SADD', P .. 'groups', ARGV[i] .. '\t' .. ARGV[i + 1]) == 1 then changed = true end
  i = i + 2
end
if changed then redis.call('INCR', P .. 'auth_epoch') end
return 1
"#;

const INSERT: &str = r#"
local id, json, org, group, create = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('SISMEMBER', P .. 'orgs', org) == 0 then
  if create ~= '1' then return {'no_org'} end
  ensure_org(org)
end
if group ~= '' and redis.call('SISMEMBER', P .. 'groups', org .. '\t' .. group) == 0 then
  if create ~= '1' then return {'no_group'} end
  redis.call('SADD', P .. 'groups', org .. '\t' .. group)
end
redis.call('HSET', P .. 'keys', id, json)
audit(ARGV[7], ARGV[8])
redis.call('INCR', P .. 'auth_epoch')
return {'ok'}
"#;

const REVOKE: &str = r#"
local at_by = ARGV[2]
local i = 3
while i <= #ARGV do
  if redis.call('HEXISTS', P .. 'keys', ARGV[i]) == 1 and redis.call('HSETNX', P .. 'keys:revoked', ARGV[i], at_by) == 1 then
    audit(ARGV[i + 1], ARGV[i + 2])
  end
  i = i + 3
end
redis.call('INCR', P .. 'auth_epoch')
return 1
"#;

const GROUP: &str = r#"
ensure_org(ARGV[2])
if redis.call('SADD', P .. 'groups', ARGV[2] .. '\t' .. ARGV[3]) == 0 then return {'exists'} end
audit(ARGV[2], ARGV[4])
redis.call('INCR', P .. 'auth_epoch')
return {'ok'}
"#;

const ASSIGN: &str = r#"
local org, pool, group, expected = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if group ~= 'default' and redis.call('SISMEMBER', P .. 'groups', org .. '\t' .. group) == 0 then return {'no_group'} end
local field = org .. '\t' .. pool
local from = redis.call('HGET', P .. 'pools', field) or 'default'
if from ~= expected then return {'moved', from} end
if group == 'default' then redis.call('HDEL', P .. 'pools', field) else redis.call('HSET', P .. 'pools', field, group) end
audit(org, ARGV[6])
redis.call('INCR', P .. 'auth_epoch')
return {'ok'}
"#;

/// The shared [`KeyBackend`]; see the module docs.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    redis: Redis,
    node: String,
    ensure: Script,
    insert: Script,
    revoke: Script,
    group: Script,
    assign: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

fn json(e: &AuditEntry) -> Result<String, BackendError> {
    serde_json::to_string(e).map_err(|e| BackendError::Corrupt(format!("audit entry: {e}")))
}

impl RedisKeys {
    /// The key directory in `redis`, changed by node `node` (or the command line).
    pub fn new(redis: Redis, node: impl Into<String>) -> RedisKeys {
        RedisKeys {
            redis,
            node: node.into(),
            ensure: script(ENSURE),
            insert: script(INSERT),
            revoke: script(REVOKE),
            group: script(GROUP),
            assign: script(ASSIGN),
        }
    }

    /// Tells every node the directory changed.
    async fn announce(&self) {
        let _ = self
            .redis
            .query::<i64>(redis::cmd("PUBLISH").arg(self.redis.key("c:bcast")).arg(format!("{}|keys", self.node)))
            .await;
    }
}

impl KeyBackend for RedisKeys {
    fn load(&self) -> BackendFuture<'_, KeyRows> {
        async move {
            let r = &self.redis;
            let mut pipe = redis::pipe();
            pipe.cmd("GET")
                .arg(r.key("auth_epoch"))
                .cmd("HGETALL")
                .arg(r.key("keys"))
                .cmd("HGETALL")
                .arg(r.key("keys:revoked"))
                .cmd("SMEMBERS")
                .arg(r.key("orgs"))
                .cmd("SMEMBERS")
                .arg(r.key("groups"))
                .cmd("HGETALL")
                .arg(r.key("pools"));
            type Reply = (
                Option<i64>,
                std::collections::BTreeMap<String, String>,
                std::collections::BTreeMap<String, String>,
                Vec<String>,
                Vec<String>,
                std::collections::BTreeMap<String, String>,
            );
            let (epoch, keys, revoked, orgs, groups, pools): Reply = r.pipe(&pipe).await?;
            let mut rows = KeyRows { epoch: epoch.unwrap_or(0), orgs, ..KeyRows::default() };
            for (id, json) in keys {
                match serde_json::from_str::<KeyRow>(&json) {
                    Ok(mut row) => {
                        if let Some((at, by)) = revoked.get(&id).and_then(|v| v.split_once('|')) {
                            row.revoked_at_ms = at.parse().ok();
                            row.revoked_by = Some(by.to_owned());
                        }
                        rows.keys.push(row);
                    }
                    Err(e) => tracing::error!(key = %id, error = %e, "skipping a stored key that does not decode"),
                }
            }
            rows.groups = groups.iter().filter_map(|g| g.split_once('\t')).map(|(o, g)| (o.into(), g.into())).collect();
            rows.pools = pools
                .iter()
                .filter_map(|(k, g)| k.split_once('\t').map(|(o, p)| (o.to_owned(), p.to_owned(), g.clone())))
                .collect();
            Ok(rows)
        }
        .boxed()
    }

    fn epoch(&self) -> BackendFuture<'_, i64> {
        async move {
            let e: Option<i64> = self.redis.query(redis::cmd("GET").arg(self.redis.key("auth_epoch"))).await?;
            Ok(e.unwrap_or(0))
        }
        .boxed()
    }

    fn ensure(&self, orgs: Vec<(String, Option<String>)>) -> BackendFuture<'_, ()> {
        async move {
            let mut inv = self.ensure.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(DEFAULT_ORG).arg("");
            for (org, group) in &orgs {
                inv.arg(org).arg(group.as_deref().unwrap_or(""));
            }
            let _: i64 = self.redis.script(&inv).await?;
            Ok(())
        }
        .boxed()
    }

    fn insert(
        &self,
        row: KeyRow,
        audit: AuditEntry,
        create_missing: bool,
    ) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        async move {
            let body = serde_json::to_string(&row).map_err(|e| BackendError::Corrupt(e.to_string()))?;
            let mut inv = self.insert.prepare_invoke();
            inv.arg(self.redis.prefix())
                .arg(&row.id)
                .arg(body)
                .arg(&row.org)
                .arg(row.group.as_deref().unwrap_or(""))
                .arg(if create_missing { "1" } else { "0" })
                .arg(&audit.org)
                .arg(json(&audit)?);
            let reply = strings(self.redis.script(&inv).await?);
            let out = match reply.first().map(String::as_str) {
                Some("ok") => Ok(()),
                Some("no_org") => Err(KeyRefusal::NoOrg(row.org.clone())),
                _ => Err(KeyRefusal::NoGroup(row.group.clone().unwrap_or_default())),
            };
            self.announce().await;
            Ok(out)
        }
        .boxed()
    }

    fn revoke(&self, keys: Vec<(String, AuditEntry)>, at_ms: u64, by: String) -> BackendFuture<'_, ()> {
        async move {
            let mut inv = self.revoke.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(format!("{at_ms}|{by}"));
            for (id, entry) in &keys {
                inv.arg(id).arg(&entry.org).arg(json(entry)?);
            }
            let _: i64 = self.redis.script(&inv).await?;
            self.announce().await;
            Ok(())
        }
        .boxed()
    }

    fn create_group(&self, org: String, group: String, audit: AuditEntry) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        async move {
            let mut inv = self.group.prepare_invoke();
            inv.arg(self.redis.prefix()).arg(&org).arg(&group).arg(json(&audit)?);
            let reply = strings(self.redis.script(&inv).await?);
            if reply.first().map(String::as_str) != Some("ok") {
                return Ok(Err(KeyRefusal::GroupExists(group)));
            }
            self.announce().await;
            Ok(Ok(()))
        }
        .boxed()
    }

    fn assign_pool(
        &self,
        org: String,
        pool: String,
        group: String,
        audit: AssignAudit,
    ) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        async move {
            // The entry names the group the pool leaves: read it, then write only if it
            // is still the same (another node may have moved the pool meanwhile).
            let field = format!("{org}\t{pool}");
            let mut from: String = self
                .redis
                .query::<Option<String>>(redis::cmd("HGET").arg(self.redis.key("pools")).arg(&field))
                .await?
                .unwrap_or_else(|| DEFAULT_GROUP.to_owned());
            for _ in 0..8 {
                let mut inv = self.assign.prepare_invoke();
                inv.arg(self.redis.prefix()).arg(&org).arg(&pool).arg(&group).arg(&from).arg(json(&audit(&from))?);
                let reply = strings(self.redis.script(&inv).await?);
                match reply.first().map(String::as_str) {
                    Some("ok") => {
                        self.announce().await;
                        return Ok(Ok(()));
                    }
                    Some("moved") => from = reply.get(1).cloned().unwrap_or_else(|| DEFAULT_GROUP.to_owned()),
                    _ => return Ok(Err(KeyRefusal::NoGroup(group))),
                }
            }
            Err(BackendError::Contended(format!("pool {pool}")))
        }
        .boxed()
    }

    fn bootstrap_state(&self) -> BackendFuture<'_, (bool, usize)> {
        async move {
            let issued: Option<String> = self.redis.query(redis::cmd("GET").arg(self.redis.key("bootstrap"))).await?;
            let rows = self.load().await?;
            Ok((issued.is_some(), rows.keys.iter().filter(|k| k.kind == "api").count()))
        }
        .boxed()
    }

    fn mark_bootstrap(&self, at_ms: u64) -> BackendFuture<'_, ()> {
        async move {
            let () = self.redis.query(redis::cmd("SET").arg(self.redis.key("bootstrap")).arg(at_ms)).await?;
            Ok(())
        }
        .boxed()
    }
}
