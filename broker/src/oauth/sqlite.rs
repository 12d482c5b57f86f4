//! [`OAuthStore`] on the broker's SQLite database (`periscope.db`, tables `oauth_*`),
//! shared with `periscope users` running in another process: every change to users
//! bumps the key directory's `auth_epoch`, so the broker reloads them on its next
//! call ([`crate::keys`] explains the freshness check).

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::store::{
    AccessRecord, BrowserSession, ClientAuth, ClientRecord, CodeRecord, Digest, GrantRecord, OAuthStore,
    OAuthStoreError, PendingRequest, Rotation, UserRecord,
};
use crate::audit::{self, AuditEntry};
use crate::auth::{Role, Scope};
use crate::backend::local::keys::bump_epoch;
use crate::keys::{hex, unhex};
use crate::store::{to_i64, to_u64};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS oauth_users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    org TEXT NOT NULL,
    role TEXT NOT NULL,
    grp TEXT,
    pools TEXT,
    quotas TEXT,
    password_hash TEXT,
    external_id TEXT UNIQUE,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    disabled_at_ms INTEGER,
    disabled_by TEXT
);
CREATE TABLE IF NOT EXISTS oauth_clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    auth TEXT NOT NULL,
    secret_hash TEXT,
    client_uri TEXT,
    created_at_ms INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL,
    registered_from TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_clients_used ON oauth_clients (last_used_ms);
CREATE TABLE IF NOT EXISTS oauth_requests (
    id TEXT PRIMARY KEY,
    upstream_state TEXT,
    expires_at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_requests_upstream ON oauth_requests (upstream_state);
CREATE TABLE IF NOT EXISTS oauth_sessions (
    cookie TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    method TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_consents (
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    scopes TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, client_id, redirect_uri)
);
CREATE TABLE IF NOT EXISTS oauth_codes (
    code TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    grant_id TEXT
);
CREATE TABLE IF NOT EXISTS oauth_grants (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    max_expires_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER,
    revoked_reason TEXT
);
CREATE INDEX IF NOT EXISTS oauth_grants_user ON oauth_grants (user_id);
CREATE TABLE IF NOT EXISTS oauth_refresh (
    token TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    superseded_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS oauth_refresh_grant ON oauth_refresh (grant_id);
CREATE TABLE IF NOT EXISTS oauth_access (
    token TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    scopes TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_access_grant ON oauth_access (grant_id);
";

/// The SQLite implementation: one connection, each call on the blocking pool.
#[derive(Debug, Clone)]
pub struct SqliteOAuthStore {
    conn: Arc<Mutex<Connection>>,
}

fn scopes_json(scopes: &[Scope]) -> String {
    serde_json::to_string(scopes).unwrap_or_else(|_| "[]".into())
}

fn scopes_of(raw: &str) -> Result<Vec<Scope>, OAuthStoreError> {
    serde_json::from_str(raw).map_err(|e| OAuthStoreError::Backend(format!("stored scopes do not decode: {e}")))
}

fn digest_of(raw: &str) -> Result<Digest, OAuthStoreError> {
    unhex(raw).ok_or_else(|| OAuthStoreError::Backend("a stored hash is malformed".into()))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, OAuthStoreError> {
    serde_json::to_string(v).map_err(|e| OAuthStoreError::Backend(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, OAuthStoreError> {
    serde_json::from_str(raw).map_err(|e| OAuthStoreError::Backend(format!("a stored record does not decode: {e}")))
}

fn opt_json<T: serde::de::DeserializeOwned>(raw: Option<String>) -> Result<Option<T>, OAuthStoreError> {
    raw.map(|r| decode(&r)).transpose()
}

impl SqliteOAuthStore {
    /// Opens the tables in the data directory's database (creating them).
    pub fn open(dir: &Path) -> Result<SqliteOAuthStore, OAuthStoreError> {
        let conn = crate::store::open_connection(dir).map_err(|e| OAuthStoreError::Backend(e.to_string()))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteOAuthStore { conn: Arc::new(Mutex::new(conn)) })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, OAuthStoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, OAuthStoreError>> {
        let conn = Arc::clone(&self.conn);
        Box::pin(async move {
            let work = move || {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut c)
            };
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::spawn_blocking(work)
                    .await
                    .map_err(|e| OAuthStoreError::Backend(format!("store task failed: {e}")))?,
                Err(_) => work(),
            }
        })
    }
}

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(UserRecord, Option<String>, Option<String>, String)> {
    Ok((
        UserRecord {
            user_id: r.get(0)?,
            name: r.get(1)?,
            org: r.get(2)?,
            role: Role::Developer,
            group: r.get(4)?,
            pools: None,
            quotas: None,
            password_hash: r.get(7)?,
            external_id: r.get(8)?,
            created_at_ms: to_u64(r.get(9)?),
            created_by: r.get(10)?,
            disabled_at_ms: r.get::<_, Option<i64>>(11)?.map(to_u64),
            disabled_by: r.get(12)?,
        },
        r.get(5)?,
        r.get(6)?,
        r.get(3)?,
    ))
}

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(GrantRecord, String)> {
    let revoked_at: Option<i64> = r.get(8)?;
    let reason: Option<String> = r.get(9)?;
    Ok((
        GrantRecord {
            grant_id: r.get(0)?,
            user_id: r.get(1)?,
            client_id: r.get(2)?,
            client_name: r.get(3)?,
            scopes: Vec::new(),
            resource: r.get(5)?,
            created_at_ms: to_u64(r.get(6)?),
            max_expires_at_ms: to_u64(r.get(7)?),
            revoked: revoked_at.map(|t| (to_u64(t), reason.unwrap_or_default())),
        },
        r.get(4)?,
    ))
}

const GRANT_COLUMNS: &str = "id, user_id, client_id, client_name, scopes, resource, created_at_ms, \
                             max_expires_at_ms, revoked_at_ms, revoked_reason";

fn load_grant(c: &Connection, id: &str) -> Result<Option<GrantRecord>, OAuthStoreError> {
    let row = c
        .query_row(&format!("SELECT {GRANT_COLUMNS} FROM oauth_grants WHERE id = ?1"), params![id], grant_row)
        .optional()?;
    row.map(|(mut g, scopes)| {
        g.scopes = scopes_of(&scopes)?;
        Ok(g)
    })
    .transpose()
}

fn revoke_grant_tx(tx: &rusqlite::Transaction<'_>, id: &str, reason: &str, now: u64) -> rusqlite::Result<bool> {
    let changed = tx.execute(
        "UPDATE oauth_grants SET revoked_at_ms = ?2, revoked_reason = ?3 WHERE id = ?1 AND revoked_at_ms IS NULL",
        params![id, to_i64(now), reason],
    )?;
    tx.execute("DELETE FROM oauth_access WHERE grant_id = ?1", params![id])?;
    tx.execute("DELETE FROM oauth_refresh WHERE grant_id = ?1", params![id])?;
    Ok(changed > 0)
}

fn user_to_params(u: &UserRecord) -> Result<(Option<String>, Option<String>), OAuthStoreError> {
    let pools = u.pools.as_ref().map(json).transpose()?;
    let quotas = u.quotas.as_ref().map(json).transpose()?;
    Ok((pools, quotas))
}

impl OAuthStore for SqliteOAuthStore {
    fn users(&self) -> BoxFuture<'_, Result<Vec<UserRecord>, OAuthStoreError>> {
        self.run(|c| {
            let mut stmt = c.prepare(
                "SELECT id, name, org, role, grp, pools, quotas, password_hash, external_id, created_at_ms, \
                 created_by, disabled_at_ms, disabled_by FROM oauth_users ORDER BY name",
            )?;
            let rows = stmt.query_map([], user_row)?;
            let mut out = Vec::new();
            for row in rows {
                let (mut u, pools, quotas, role) = row?;
                // A record whose restrictions do not decode is left out: it does not
                // sign in rather than getting its role's whole reach.
                let (Some(r), Ok(p), Ok(q)) = (Role::parse(&role), opt_json(pools), opt_json(quotas)) else {
                    tracing::error!(user = %u.user_id, "skipping a stored user whose role, pools or quotas do not decode");
                    continue;
                };
                u.role = r;
                u.pools = p;
                u.quotas = q;
                out.push(u);
            }
            Ok(out)
        })
    }

    fn create_user(&self, user: UserRecord, entry: AuditEntry) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            let (pools, quotas) = user_to_params(&user)?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let taken: i64 =
                tx.query_row("SELECT COUNT(*) FROM oauth_users WHERE name = ?1", params![user.name], |r| r.get(0))?;
            if taken > 0 {
                return Err(OAuthStoreError::Conflict(format!("a user named `{}` exists", user.name)));
            }
            tx.execute(
                "INSERT OR IGNORE INTO orgs (name, created_at_ms) VALUES (?1, ?2)",
                params![user.org, to_i64(user.created_at_ms)],
            )?;
            tx.execute(
                "INSERT INTO oauth_users (id, name, org, role, grp, pools, quotas, password_hash, external_id, \
                 created_at_ms, created_by, disabled_at_ms, disabled_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    user.user_id,
                    user.name,
                    user.org,
                    user.role.as_str(),
                    user.group,
                    pools,
                    quotas,
                    user.password_hash,
                    user.external_id,
                    to_i64(user.created_at_ms),
                    user.created_by,
                    user.disabled_at_ms.map(to_i64),
                    user.disabled_by,
                ],
            )?;
            audit::insert(&tx, &entry)?;
            bump_epoch(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn update_user(&self, user: UserRecord, entry: Option<AuditEntry>) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            let (pools, quotas) = user_to_params(&user)?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = tx.execute(
                "UPDATE oauth_users SET org = ?2, role = ?3, grp = ?4, pools = ?5, quotas = ?6, password_hash = ?7, \
                 external_id = ?8, disabled_at_ms = ?9, disabled_by = ?10 WHERE id = ?1",
                params![
                    user.user_id,
                    user.org,
                    user.role.as_str(),
                    user.group,
                    pools,
                    quotas,
                    user.password_hash,
                    user.external_id,
                    user.disabled_at_ms.map(to_i64),
                    user.disabled_by,
                ],
            )?;
            if changed == 0 {
                return Err(OAuthStoreError::NotFound(format!("no user `{}`", user.user_id)));
            }
            if let Some(t) = user.disabled_at_ms {
                let ids: Vec<String> = {
                    let mut stmt =
                        tx.prepare("SELECT id FROM oauth_grants WHERE user_id = ?1 AND revoked_at_ms IS NULL")?;
                    stmt.query_map(params![user.user_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
                };
                for id in ids {
                    revoke_grant_tx(&tx, &id, "user disabled", t)?;
                }
                tx.execute("DELETE FROM oauth_sessions WHERE user_id = ?1", params![user.user_id])?;
            }
            if let Some(e) = &entry {
                audit::insert(&tx, e)?;
            }
            bump_epoch(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn client(&self, client_id: &str) -> BoxFuture<'_, Result<Option<ClientRecord>, OAuthStoreError>> {
        let id = client_id.to_owned();
        self.run(move |c| {
            let row = c
                .query_row(
                    "SELECT id, name, redirect_uris, auth, secret_hash, client_uri, created_at_ms, last_used_ms, \
                     registered_from FROM oauth_clients WHERE id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, Option<String>>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, i64>(7)?,
                            r.get::<_, String>(8)?,
                        ))
                    },
                )
                .optional()?;
            let Some((client_id, name, uris, auth, secret, client_uri, created, used, from)) = row else {
                return Ok(None);
            };
            Ok(Some(ClientRecord {
                client_id,
                name,
                redirect_uris: decode(&uris)?,
                auth: ClientAuth::parse(&auth)
                    .ok_or_else(|| OAuthStoreError::Backend(format!("unknown client auth `{auth}`")))?,
                secret_hash: secret.as_deref().map(digest_of).transpose()?,
                client_uri,
                created_at_ms: to_u64(created),
                last_used_ms: to_u64(used),
                registered_from: from,
            }))
        })
    }

    fn register_client(&self, client: ClientRecord, max_clients: u32) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            let uris = json(&client.redirect_uris)?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let count: i64 = tx.query_row("SELECT COUNT(*) FROM oauth_clients", [], |r| r.get(0))?;
            if count >= i64::from(max_clients) {
                // The least recently used client that no live grant holds makes room.
                tx.execute(
                    "DELETE FROM oauth_clients WHERE id IN (SELECT id FROM oauth_clients c WHERE NOT EXISTS \
                     (SELECT 1 FROM oauth_grants g WHERE g.client_id = c.id AND g.revoked_at_ms IS NULL) \
                     ORDER BY last_used_ms LIMIT ?1)",
                    params![count - i64::from(max_clients) + 1],
                )?;
                let left: i64 = tx.query_row("SELECT COUNT(*) FROM oauth_clients", [], |r| r.get(0))?;
                if left >= i64::from(max_clients) {
                    return Err(OAuthStoreError::Conflict(
                        "the broker holds as many registered clients as it may (oauth.max_clients), all in use".into(),
                    ));
                }
            }
            tx.execute(
                "INSERT INTO oauth_clients (id, name, redirect_uris, auth, secret_hash, client_uri, created_at_ms, \
                 last_used_ms, registered_from) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    client.client_id,
                    client.name,
                    uris,
                    client.auth.as_str(),
                    client.secret_hash.map(|h| hex(&h)),
                    client.client_uri,
                    to_i64(client.created_at_ms),
                    to_i64(client.last_used_ms),
                    client.registered_from,
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn touch_client(&self, client_id: &str, at_ms: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        let id = client_id.to_owned();
        self.run(move |c| {
            c.execute("UPDATE oauth_clients SET last_used_ms = ?2 WHERE id = ?1", params![id, to_i64(at_ms)])?;
            Ok(())
        })
    }

    fn put_request(&self, request: PendingRequest) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            let body = json(&request)?;
            c.execute(
                "INSERT OR REPLACE INTO oauth_requests (id, upstream_state, expires_at_ms, body) VALUES (?1, ?2, ?3, ?4)",
                params![
                    request.request_id,
                    request.upstream.as_ref().map(|u| hex(&u.state)),
                    to_i64(request.expires_at_ms),
                    body
                ],
            )?;
            Ok(())
        })
    }

    fn request(&self, request_id: &str, now_ms: u64) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>> {
        let id = request_id.to_owned();
        self.run(move |c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM oauth_requests WHERE id = ?1 AND expires_at_ms > ?2",
                    params![id, to_i64(now_ms)],
                    |r| r.get(0),
                )
                .optional()?;
            body.map(|b| decode(&b)).transpose()
        })
    }

    fn request_by_upstream_state(
        &self,
        state: Digest,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<PendingRequest>, OAuthStoreError>> {
        self.run(move |c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM oauth_requests WHERE upstream_state = ?1 AND expires_at_ms > ?2",
                    params![hex(&state), to_i64(now_ms)],
                    |r| r.get(0),
                )
                .optional()?;
            body.map(|b| decode(&b)).transpose()
        })
    }

    fn delete_request(&self, request_id: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        let id = request_id.to_owned();
        self.run(move |c| {
            c.execute("DELETE FROM oauth_requests WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    fn put_session(&self, session: BrowserSession) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO oauth_sessions (cookie, user_id, method, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![hex(&session.cookie), session.user_id, session.method, to_i64(session.expires_at_ms)],
            )?;
            Ok(())
        })
    }

    fn session(&self, cookie: Digest, now_ms: u64) -> BoxFuture<'_, Result<Option<BrowserSession>, OAuthStoreError>> {
        self.run(move |c| {
            Ok(c.query_row(
                "SELECT user_id, method, expires_at_ms FROM oauth_sessions WHERE cookie = ?1 AND expires_at_ms > ?2",
                params![hex(&cookie), to_i64(now_ms)],
                |r| {
                    Ok(BrowserSession {
                        cookie,
                        user_id: r.get(0)?,
                        method: r.get(1)?,
                        expires_at_ms: to_u64(r.get(2)?),
                    })
                },
            )
            .optional()?)
        })
    }

    fn delete_session(&self, cookie: Digest) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            c.execute("DELETE FROM oauth_sessions WHERE cookie = ?1", params![hex(&cookie)])?;
            Ok(())
        })
    }

    fn consent(
        &self,
        user_id: &str,
        client_id: &str,
        redirect_uri: &str,
    ) -> BoxFuture<'_, Result<Option<Vec<Scope>>, OAuthStoreError>> {
        let (u, cl, r) = (user_id.to_owned(), client_id.to_owned(), redirect_uri.to_owned());
        self.run(move |c| {
            let raw: Option<String> = c
                .query_row(
                    "SELECT scopes FROM oauth_consents WHERE user_id = ?1 AND client_id = ?2 AND redirect_uri = ?3",
                    params![u, cl, r],
                    |row| row.get(0),
                )
                .optional()?;
            raw.map(|s| scopes_of(&s)).transpose()
        })
    }

    fn put_consent(
        &self,
        user_id: &str,
        client_id: &str,
        redirect_uri: &str,
        scopes: Vec<Scope>,
    ) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        let (u, cl, r) = (user_id.to_owned(), client_id.to_owned(), redirect_uri.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO oauth_consents (user_id, client_id, redirect_uri, scopes, at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![u, cl, r, scopes_json(&scopes), to_i64(crate::time::now_ms())],
            )?;
            Ok(())
        })
    }

    fn put_code(&self, code: CodeRecord) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO oauth_codes (code, body, expires_at_ms, grant_id) VALUES (?1, ?2, ?3, NULL)",
                params![hex(&code.code), json(&code)?, to_i64(code.expires_at_ms)],
            )?;
            Ok(())
        })
    }

    fn take_code(&self, code: Digest, now_ms: u64) -> BoxFuture<'_, Result<Option<CodeRecord>, OAuthStoreError>> {
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(String, i64, Option<String>)> = tx
                .query_row(
                    "SELECT body, expires_at_ms, grant_id FROM oauth_codes WHERE code = ?1",
                    params![hex(&code)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((body, expires, grant)) = row else { return Ok(None) };
            let mut record: CodeRecord = decode(&body)?;
            match grant {
                // Taken before: returned with its grant, for the caller to revoke.
                Some(g) => record.grant_id = Some(g),
                None if to_u64(expires) <= now_ms => return Ok(None),
                None => {
                    // Marked taken now, so a concurrent exchange sees it as reused.
                    tx.execute("UPDATE oauth_codes SET grant_id = '' WHERE code = ?1", params![hex(&code)])?;
                    record.grant_id = None;
                }
            }
            tx.commit()?;
            Ok(Some(record))
        })
    }

    fn set_code_grant(&self, code: Digest, grant_id: &str) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        let g = grant_id.to_owned();
        self.run(move |c| {
            c.execute("UPDATE oauth_codes SET grant_id = ?2 WHERE code = ?1", params![hex(&code), g])?;
            Ok(())
        })
    }

    fn create_grant(
        &self,
        grant: GrantRecord,
        refresh: Digest,
        refresh_expires_at_ms: u64,
        access: AccessRecord,
        max_per_user: u32,
        entry: AuditEntry,
    ) -> BoxFuture<'_, Result<Vec<String>, OAuthStoreError>> {
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let live: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM oauth_grants WHERE user_id = ?1 AND revoked_at_ms IS NULL ORDER BY created_at_ms",
                )?;
                stmt.query_map(params![grant.user_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
            };
            let excess = (live.len() + 1).saturating_sub(max_per_user as usize);
            let evicted: Vec<String> = live.into_iter().take(excess).collect();
            for id in &evicted {
                revoke_grant_tx(
                    &tx,
                    id,
                    "too many grants for one user (oauth.max_grants_per_user)",
                    grant.created_at_ms,
                )?;
            }
            tx.execute(
                "INSERT INTO oauth_grants (id, user_id, client_id, client_name, scopes, resource, created_at_ms, \
                 max_expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    grant.grant_id,
                    grant.user_id,
                    grant.client_id,
                    grant.client_name,
                    scopes_json(&grant.scopes),
                    grant.resource,
                    to_i64(grant.created_at_ms),
                    to_i64(grant.max_expires_at_ms),
                ],
            )?;
            tx.execute(
                "INSERT INTO oauth_refresh (token, grant_id, expires_at_ms) VALUES (?1, ?2, ?3)",
                params![hex(&refresh), grant.grant_id, to_i64(refresh_expires_at_ms)],
            )?;
            tx.execute(
                "INSERT INTO oauth_access (token, grant_id, scopes, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![hex(&access.token), grant.grant_id, scopes_json(&access.scopes), to_i64(access.expires_at_ms)],
            )?;
            audit::insert(&tx, &entry)?;
            tx.commit()?;
            Ok(evicted)
        })
    }

    fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        new_expires_at_ms: u64,
        access: AccessRecord,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Rotation, OAuthStoreError>> {
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(String, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT grant_id, expires_at_ms, superseded_at_ms FROM oauth_refresh WHERE token = ?1",
                    params![hex(&old)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((grant_id, expires, superseded)) = row else { return Ok(Rotation::Invalid) };
            let Some(grant) = load_grant(&tx, &grant_id)? else { return Ok(Rotation::Invalid) };
            if grant.revoked.is_some() {
                return Ok(Rotation::Invalid);
            }
            if superseded.is_some() {
                revoke_grant_tx(&tx, &grant_id, "a rotated refresh token was used again", now_ms)?;
                tx.commit()?;
                return Ok(Rotation::Reused(grant));
            }
            if to_u64(expires) <= now_ms || grant.max_expires_at_ms <= now_ms {
                return Ok(Rotation::Invalid);
            }
            tx.execute(
                "UPDATE oauth_refresh SET superseded_at_ms = ?2 WHERE token = ?1",
                params![hex(&old), to_i64(now_ms)],
            )?;
            tx.execute(
                "INSERT INTO oauth_refresh (token, grant_id, expires_at_ms) VALUES (?1, ?2, ?3)",
                params![hex(&new), grant_id, to_i64(new_expires_at_ms.min(grant.max_expires_at_ms))],
            )?;
            tx.execute("DELETE FROM oauth_access WHERE grant_id = ?1", params![grant_id])?;
            tx.execute(
                "INSERT INTO oauth_access (token, grant_id, scopes, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![hex(&access.token), grant_id, scopes_json(&access.scopes), to_i64(access.expires_at_ms)],
            )?;
            tx.commit()?;
            Ok(Rotation::Rotated(grant))
        })
    }

    fn grant_of_refresh(&self, refresh: Digest) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>> {
        self.run(move |c| {
            let id: Option<String> = c
                .query_row("SELECT grant_id FROM oauth_refresh WHERE token = ?1", params![hex(&refresh)], |r| r.get(0))
                .optional()?;
            match id {
                Some(id) => load_grant(c, &id),
                None => Ok(None),
            }
        })
    }

    fn revoke_grant(
        &self,
        grant_id: &str,
        reason: &str,
        entry: Option<AuditEntry>,
    ) -> BoxFuture<'_, Result<bool, OAuthStoreError>> {
        let (id, reason) = (grant_id.to_owned(), reason.to_owned());
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = revoke_grant_tx(&tx, &id, &reason, crate::time::now_ms())?;
            if changed && let Some(e) = &entry {
                audit::insert(&tx, e)?;
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    fn grant(&self, grant_id: &str) -> BoxFuture<'_, Result<Option<GrantRecord>, OAuthStoreError>> {
        let id = grant_id.to_owned();
        self.run(move |c| load_grant(c, &id))
    }

    fn grants_of(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<GrantRecord>, OAuthStoreError>> {
        let id = user_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {GRANT_COLUMNS} FROM oauth_grants WHERE user_id = ?1 AND revoked_at_ms IS NULL \
                 ORDER BY created_at_ms"
            ))?;
            let rows = stmt.query_map(params![id], grant_row)?;
            let mut out = Vec::new();
            for row in rows {
                let (mut g, scopes) = row?;
                g.scopes = scopes_of(&scopes)?;
                out.push(g);
            }
            Ok(out)
        })
    }

    fn live_access_tokens(
        &self,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Vec<(AccessRecord, GrantRecord)>, OAuthStoreError>> {
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT a.token, a.grant_id, a.scopes, a.expires_at_ms FROM oauth_access a JOIN oauth_grants g \
                 ON g.id = a.grant_id WHERE a.expires_at_ms > ?1 AND g.revoked_at_ms IS NULL",
            )?;
            let rows: Vec<(String, String, String, i64)> = stmt
                .query_map(params![to_i64(now_ms)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for (token, grant_id, scopes, expires) in rows {
                let Some(grant) = load_grant(c, &grant_id)? else { continue };
                out.push((
                    AccessRecord {
                        token: digest_of(&token)?,
                        grant_id,
                        scopes: scopes_of(&scopes)?,
                        expires_at_ms: to_u64(expires),
                    },
                    grant,
                ));
            }
            Ok(out)
        })
    }

    fn purge(&self, now_ms: u64) -> BoxFuture<'_, Result<(), OAuthStoreError>> {
        self.run(move |c| {
            let now = to_i64(now_ms);
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM oauth_requests WHERE expires_at_ms <= ?1", params![now])?;
            tx.execute("DELETE FROM oauth_sessions WHERE expires_at_ms <= ?1", params![now])?;
            // Codes are kept a while past expiry so that a late replay still revokes.
            tx.execute("DELETE FROM oauth_codes WHERE expires_at_ms <= ?1", params![now - 3_600_000])?;
            tx.execute("DELETE FROM oauth_access WHERE expires_at_ms <= ?1", params![now])?;
            tx.execute(
                "UPDATE oauth_grants SET revoked_at_ms = ?1, revoked_reason = 'expired' WHERE revoked_at_ms IS NULL \
                 AND max_expires_at_ms <= ?1",
                params![now],
            )?;
            tx.execute(
                "DELETE FROM oauth_refresh WHERE grant_id IN (SELECT id FROM oauth_grants WHERE revoked_at_ms IS NOT \
                 NULL)",
                [],
            )?;
            // Revoked grants are kept 30 days, for the audit trail's references.
            tx.execute(
                "DELETE FROM oauth_grants WHERE revoked_at_ms IS NOT NULL AND revoked_at_ms <= ?1",
                params![now - 30 * 86_400_000],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}
