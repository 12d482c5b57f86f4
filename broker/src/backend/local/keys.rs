//! The key directory in the store's SQLite database, shared by the broker and the
//! `periscope keys` command (which may run against the same data directory while the
//! broker serves).
//!
//! Freshness is cheap: `PRAGMA data_version` on the directory's own connection (a few
//! microseconds, no I/O) tells whether any other connection committed; only then is the
//! `auth_epoch` counter read (every key, group or pool change bumps it in the same
//! transaction).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures_util::FutureExt as _;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use crate::audit::{self, AuditEntry};
use crate::backend::{AssignAudit, BackendError, BackendFuture, KeyBackend, KeyRefusal, KeyRow, KeyRows};
use crate::keys::{DEFAULT_GROUP, DEFAULT_ORG};
use crate::store::{StoreError, to_i64, to_u64};
use crate::time::now_ms;

struct Db {
    conn: Connection,
    data_version: i64,
    epoch: i64,
}

/// The single-node [`KeyBackend`].
pub struct SqliteKeys {
    dir: PathBuf,
    db: Mutex<Db>,
}

impl std::fmt::Debug for SqliteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteKeys").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn failed(e: rusqlite::Error) -> BackendError {
    BackendError::Unavailable(format!("key store: {e}"))
}

pub(crate) fn bump_epoch(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('auth_epoch', '1') ON CONFLICT(key) DO UPDATE SET \
         value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)",
        [],
    )?;
    Ok(())
}

fn read_epoch(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'auth_epoch'", [], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0))
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}

fn ensure_org_tx(tx: &rusqlite::Transaction<'_>, org: &str) -> rusqlite::Result<bool> {
    let now = to_i64(now_ms());
    let created = tx.execute("INSERT OR IGNORE INTO orgs (name, created_at_ms) VALUES (?1, ?2)", params![org, now])?;
    tx.execute(
        "INSERT OR IGNORE INTO groups (org, name, created_at_ms) VALUES (?1, ?2, ?3)",
        params![org, DEFAULT_GROUP, now],
    )?;
    Ok(created > 0)
}

fn ensure_group_tx(tx: &rusqlite::Transaction<'_>, org: &str, group: &str) -> rusqlite::Result<bool> {
    ensure_org_tx(tx, org)?;
    Ok(tx.execute(
        "INSERT OR IGNORE INTO groups (org, name, created_at_ms) VALUES (?1, ?2, ?3)",
        params![org, group, to_i64(now_ms())],
    )? > 0)
}

fn group_known(tx: &rusqlite::Transaction<'_>, org: &str, group: &str) -> rusqlite::Result<bool> {
    Ok(tx.query_row("SELECT COUNT(*) FROM groups WHERE org = ?1 AND name = ?2", params![org, group], |r| {
        r.get::<_, i64>(0)
    })? > 0)
}

fn ready<'a, T: Send + 'a>(r: rusqlite::Result<T>) -> BackendFuture<'a, T> {
    std::future::ready(r.map_err(failed)).boxed()
}

impl SqliteKeys {
    /// The key directory of the database in `dir` (created, with the `default`
    /// organization, when missing).
    pub fn open(dir: &Path) -> Result<SqliteKeys, StoreError> {
        let conn = crate::store::open_connection(dir)?;
        let path = crate::store::db_path(dir);
        let data_version = data_version(&conn).map_err(crate::store::sqlite(&path))?;
        let keys = SqliteKeys { dir: dir.to_owned(), db: Mutex::new(Db { conn, data_version, epoch: -1 }) };
        Ok(keys)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Holds the connection's lock (every database access goes through it).
    #[cfg(test)]
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, impl Sized> {
        self.db()
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let mut db = self.db();
        let tx = db.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        // A commit on this connection does not move its own data_version: read again.
        db.epoch = read_epoch(&db.conn)?;
        db.data_version = data_version(&db.conn)?;
        Ok(out)
    }
}

fn load(conn: &Connection) -> rusqlite::Result<KeyRows> {
    let tx = conn.unchecked_transaction()?;
    let mut rows = KeyRows { epoch: read_epoch(&tx)?, ..KeyRows::default() };
    {
        let mut stmt = tx.prepare("SELECT name FROM orgs")?;
        rows.orgs = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<_>>()?;
        let mut stmt = tx.prepare("SELECT org, name FROM groups")?;
        rows.groups = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        let mut stmt = tx.prepare("SELECT org, name, grp FROM pools")?;
        rows.pools = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?;
        let mut stmt = tx.prepare(
            "SELECT id, hash, kind, name, org, role, grp, scopes, pools, quotas, hint, created_at_ms, created_by, \
             expires_at_ms, revoked_at_ms, revoked_by, created_by_key FROM keys",
        )?;
        rows.keys = stmt
            .query_map([], |r| {
                Ok(KeyRow {
                    id: r.get(0)?,
                    hash: r.get(1)?,
                    kind: r.get(2)?,
                    name: r.get(3)?,
                    org: r.get(4)?,
                    role: r.get(5)?,
                    group: r.get(6)?,
                    scopes: r.get(7)?,
                    pools: r.get(8)?,
                    quotas: r.get(9)?,
                    hint: r.get(10)?,
                    created_at_ms: to_u64(r.get(11)?),
                    created_by: r.get(12)?,
                    expires_at_ms: r.get::<_, Option<i64>>(13)?.map(to_u64),
                    revoked_at_ms: r.get::<_, Option<i64>>(14)?.map(to_u64),
                    revoked_by: r.get(15)?,
                    created_by_key: r.get(16)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    tx.finish()?;
    Ok(rows)
}

impl KeyBackend for SqliteKeys {
    fn load(&self) -> BackendFuture<'_, KeyRows> {
        let mut db = self.db();
        let r = data_version(&db.conn).and_then(|v| {
            let rows = load(&db.conn)?;
            db.data_version = v;
            db.epoch = rows.epoch;
            Ok(rows)
        });
        ready(r)
    }

    fn epoch(&self) -> BackendFuture<'_, i64> {
        let mut db = self.db();
        let r = (|| {
            let version = data_version(&db.conn)?;
            if version == db.data_version && db.epoch >= 0 {
                return Ok(db.epoch);
            }
            let epoch = read_epoch(&db.conn)?;
            db.data_version = version;
            db.epoch = epoch;
            Ok(epoch)
        })();
        ready(r)
    }

    fn ensure(&self, orgs: Vec<(String, Option<String>)>) -> BackendFuture<'_, ()> {
        ready(self.write(|tx| {
            let mut changed = ensure_org_tx(tx, DEFAULT_ORG)?;
            for (org, group) in &orgs {
                changed |= ensure_org_tx(tx, org)?;
                if let Some(g) = group {
                    changed |= ensure_group_tx(tx, org, g)?;
                }
            }
            if changed {
                bump_epoch(tx)?;
            }
            Ok(())
        }))
    }

    fn insert(
        &self,
        row: KeyRow,
        audit: AuditEntry,
        create_missing: bool,
    ) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        ready(self.write(|tx| {
            let org_known: bool = tx
                .query_row("SELECT COUNT(*) FROM orgs WHERE name = ?1", params![row.org], |r| r.get::<_, i64>(0))?
                > 0;
            if !org_known && !create_missing {
                return Ok(Err(KeyRefusal::NoOrg(row.org.clone())));
            }
            ensure_org_tx(tx, &row.org)?;
            if let Some(g) = &row.group
                && !group_known(tx, &row.org, g)?
            {
                if !create_missing {
                    return Ok(Err(KeyRefusal::NoGroup(g.clone())));
                }
                ensure_group_tx(tx, &row.org, g)?;
            }
            tx.execute(
                "INSERT INTO keys (id, hash, kind, name, org, role, grp, scopes, pools, quotas, hint, created_at_ms, \
                 created_by, expires_at_ms, created_by_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
                 ?13, ?14, ?15)",
                params![
                    row.id,
                    row.hash,
                    row.kind,
                    row.name,
                    row.org,
                    row.role,
                    row.group,
                    row.scopes,
                    row.pools,
                    row.quotas,
                    row.hint,
                    to_i64(row.created_at_ms),
                    row.created_by,
                    row.expires_at_ms.map(to_i64),
                    row.created_by_key,
                ],
            )?;
            audit::insert(tx, &audit)?;
            bump_epoch(tx)?;
            Ok(Ok(()))
        }))
    }

    fn revoke(&self, keys: Vec<(String, AuditEntry)>, at_ms: u64, by: String) -> BackendFuture<'_, ()> {
        ready(self.write(|tx| {
            for (id, entry) in &keys {
                let changed = tx.execute(
                    "UPDATE keys SET revoked_at_ms = ?2, revoked_by = ?3 WHERE id = ?1 AND revoked_at_ms IS NULL",
                    params![id, to_i64(at_ms), by],
                )?;
                if changed > 0 {
                    audit::insert(tx, entry)?;
                }
            }
            bump_epoch(tx)
        }))
    }

    fn create_group(&self, org: String, group: String, audit: AuditEntry) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        ready(self.write(|tx| {
            if !ensure_group_tx(tx, &org, &group)? {
                return Ok(Err(KeyRefusal::GroupExists(group.clone())));
            }
            audit::insert(tx, &audit)?;
            bump_epoch(tx)?;
            Ok(Ok(()))
        }))
    }

    fn assign_pool(
        &self,
        org: String,
        pool: String,
        group: String,
        audit: AssignAudit,
    ) -> BackendFuture<'_, Result<(), KeyRefusal>> {
        ready(self.write(|tx| {
            if group != DEFAULT_GROUP && !group_known(tx, &org, &group)? {
                return Ok(Err(KeyRefusal::NoGroup(group.clone())));
            }
            let before: Option<String> = tx
                .query_row("SELECT grp FROM pools WHERE org = ?1 AND name = ?2", params![org, pool], |r| r.get(0))
                .optional()?;
            if group == DEFAULT_GROUP {
                tx.execute("DELETE FROM pools WHERE org = ?1 AND name = ?2", params![org, pool])?;
            } else {
                tx.execute(
                    "INSERT INTO pools (org, name, grp, updated_at_ms) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT(org, name) DO UPDATE SET grp = ?3, updated_at_ms = ?4",
                    params![org, pool, group, to_i64(now_ms())],
                )?;
            }
            audit::insert(tx, &audit(before.as_deref().unwrap_or(DEFAULT_GROUP)))?;
            bump_epoch(tx)?;
            Ok(Ok(()))
        }))
    }

    fn bootstrap_state(&self) -> BackendFuture<'_, (bool, usize)> {
        let db = self.db();
        let r = (|| {
            let issued: Option<String> = db
                .conn
                .query_row("SELECT value FROM meta WHERE key = 'bootstrap_issued_at_ms'", [], |r| r.get(0))
                .optional()?;
            let stored: i64 = db.conn.query_row("SELECT COUNT(*) FROM keys WHERE kind = 'api'", [], |r| r.get(0))?;
            Ok((issued.is_some(), usize::try_from(stored).unwrap_or(0)))
        })();
        ready(r)
    }

    fn mark_bootstrap(&self, at_ms: u64) -> BackendFuture<'_, ()> {
        let db = self.db();
        let r = db
            .conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('bootstrap_issued_at_ms', ?1)",
                params![at_ms.to_string()],
            )
            .map(|_| ());
        ready(r)
    }
}
