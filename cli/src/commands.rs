//! The administrative commands of `periscope`, working directly on a data directory
//! (the broker may be running on it; its next call sees the change): `keys create`,
//! `keys list`, `keys revoke`, `audit export`; `config check`, which validates a
//! configuration file without starting anything; and the environment variables `serve`
//! reads, with errors that name the variable.
//!
//! The binary parses arguments and prints; everything else is here, so it is tested
//! like the rest of the library.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;

use periscope_broker::BrokerConfig;
use periscope_broker::audit::{self, Actor, AuditKind, AuditQuery};
use periscope_broker::auth::{Role, Scope};
use periscope_broker::backend::AuditReader as _;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use periscope_broker::keys::{DEFAULT_ORG, IssuedKey, KeyKind, KeyStatus, KeyStore, NewKey};
use periscope_broker::time::{format_datetime, now_ms, parse_datetime, parse_duration};

/// What `periscope keys create` was asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateKey {
    /// Who or what uses it.
    pub name: Option<String>,
    /// An agent key instead of an API key.
    pub agent: bool,
    /// `developer`, `group_admin`, `company_admin`.
    pub role: Option<String>,
    /// Narrower scopes.
    pub scopes: Vec<String>,
    /// Pools (the ones an agent key may register into).
    pub pools: Vec<String>,
    /// The group.
    pub group: Option<String>,
    /// The organization (default `default`; created when missing).
    pub org: Option<String>,
    /// `30d`, `12h`, ...
    pub expires_in: Option<String>,
    /// `2026-12-31` or an RFC 3339 time.
    pub expires_at: Option<String>,
}

impl CreateKey {
    /// The key request, with every argument checked.
    pub fn request(&self) -> anyhow::Result<NewKey> {
        let kind = if self.agent { KeyKind::Agent } else { KeyKind::Api };
        let role = match (&self.role, kind) {
            (Some(_), KeyKind::Agent) => anyhow::bail!("--role is for API keys; agent keys take --pools"),
            (Some(r), KeyKind::Api) => Some(Role::parse(r).with_context(|| {
                format!("--role `{r}` must be one of {}", Role::ALL.map(|r| r.as_str()).join(", "))
            })?),
            (None, KeyKind::Api) => Some(Role::Developer),
            (None, KeyKind::Agent) => None,
        };
        let scopes = if self.scopes.is_empty() {
            None
        } else {
            let mut out = Vec::new();
            for s in &self.scopes {
                out.push(Scope::parse(s).with_context(|| {
                    format!("--scopes: unknown scope `{s}`; known: {}", Scope::KNOWN.map(|s| s.as_str()).join(", "))
                })?);
            }
            Some(out)
        };
        let expires_at_ms = match (&self.expires_in, &self.expires_at) {
            (Some(_), Some(_)) => anyhow::bail!("give --expires-in or --expires-at, not both"),
            (Some(d), None) => {
                let d = parse_duration(d).map_err(|e| anyhow::anyhow!("--expires-in: {e}"))?;
                Some(now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            }
            (None, Some(t)) => Some(parse_datetime(t).map_err(|e| anyhow::anyhow!("--expires-at: {e}"))?),
            (None, None) => None,
        };
        let name = match (&self.name, kind) {
            (Some(n), _) => n.clone(),
            (None, KeyKind::Agent) => format!("agents of {}", self.pools.join(", ")),
            (None, KeyKind::Api) => anyhow::bail!("--name is required: who or what will use the key"),
        };
        Ok(NewKey {
            kind,
            name,
            org: self.org.clone().unwrap_or_else(|| DEFAULT_ORG.into()),
            role,
            group: self.group.clone(),
            scopes,
            pools: (!self.pools.is_empty()).then(|| self.pools.clone()),
            quotas: None,
            expires_at_ms,
        })
    }
}

/// Where the administrative commands find the broker's state: a single node's data
/// directory, or a cluster's Redis.
#[derive(Debug, Clone)]
pub enum Target {
    /// `--data-dir`.
    DataDir(std::path::PathBuf),
    /// `--redis` (with the cluster's key prefix).
    Redis {
        /// `redis://host:port/db`.
        url: String,
        /// The deployment's key prefix.
        prefix: String,
    },
}

impl Target {
    /// The target the flags name: `--redis` (or `PERISCOPE_REDIS_URL`) wins over
    /// `--data-dir` (or `PERISCOPE_DATA_DIR`); one of them is required.
    pub fn from_flags(
        data_dir: Option<std::path::PathBuf>,
        redis: Option<String>,
        prefix: String,
    ) -> anyhow::Result<Target> {
        match (redis, data_dir) {
            (Some(url), _) => Ok(Target::Redis { url, prefix }),
            (None, Some(dir)) => Ok(Target::DataDir(dir)),
            (None, None) => anyhow::bail!(
                "say where the broker keeps its state: --data-dir DIR (a single node) or --redis URL (a cluster)"
            ),
        }
    }

    async fn redis(url: &str, prefix: &str) -> anyhow::Result<periscope_broker::backend::redis::Redis> {
        periscope_broker::backend::redis::Redis::connect(url, prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", periscope_broker::backend::redis::redact_url(url)))
    }

    /// The key directory there.
    pub async fn keys(&self) -> anyhow::Result<KeyStore> {
        match self {
            Target::DataDir(dir) => KeyStore::open_cli(dir).await.with_context(|| format!("opening {}", dir.display())),
            Target::Redis { url, prefix } => {
                let redis = Self::redis(url, prefix).await?;
                let backend = periscope_broker::backend::redis::RedisKeys::new(redis, "cli");
                Ok(KeyStore::open(std::sync::Arc::new(backend), &[], &[], Default::default()).await?)
            }
        }
    }
}

/// `periscope keys create`: makes the key; returns it (the secret is in it, once).
pub async fn create_key(target: &Target, args: &CreateKey) -> anyhow::Result<IssuedKey> {
    let request = args.request()?;
    let keys = target.keys().await?;
    Ok(keys.create(request, &Actor::cli()).await?)
}

/// How `keys create` shows a new key to a person.
pub fn describe_issued(issued: &IssuedKey) -> String {
    let k = &issued.key;
    let what = match (k.kind, k.role) {
        (KeyKind::Agent, _) => format!("agent key for pools {}", k.pools.clone().unwrap_or_default().join(", ")),
        (KeyKind::Api, Some(r)) => format!("API key, role {}", r.as_str()),
        (KeyKind::Api, None) => "API key".into(),
    };
    let mut out = format!("Created {what}: `{}` ({}), organization {}", k.name, k.key_id, k.org);
    if let Some(g) = &k.group {
        out.push_str(&format!(", group {g}"));
    }
    if let Some(t) = k.expires_at_ms {
        out.push_str(&format!(", expires {}", format_datetime(t)));
    }
    out.push_str(".\nSecret (shown once; only its hash is stored):\n\n  ");
    out.push_str(&issued.secret);
    out.push('\n');
    out
}

/// `periscope keys list`: every key of the data directory (of one organization, when
/// given), never a secret.
pub async fn list_keys(
    target: &Target,
    org: Option<&str>,
    include_revoked: bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let keys = target.keys().await?;
    let now = now_ms();
    Ok(keys
        .refresh()
        .await?
        .keys()
        .filter(|k| org.is_none_or(|o| k.org == o))
        .filter(|k| include_revoked || k.status(now) == KeyStatus::Active)
        .map(|k| k.view(now))
        .collect())
}

/// The keys as a table for people.
pub fn key_table(items: &[serde_json::Value]) -> String {
    let mut rows = vec![
        ["ID", "KIND", "NAME", "ORG", "ROLE", "GROUP", "POOLS", "STATUS", "CREATED", "EXPIRES"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for k in items {
        let s = |f: &str| k[f].as_str().unwrap_or("-").to_owned();
        let time = |f: &str| k[f].as_u64().map_or("-".to_owned(), format_datetime);
        let pools = k["pools"]
            .as_array()
            .map_or("-".to_owned(), |p| p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","));
        rows.push(vec![
            s("key_id"),
            s("kind"),
            s("name"),
            s("org"),
            s("role"),
            s("group"),
            pools,
            s("status"),
            time("created_at_ms"),
            time("expires_at_ms"),
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `periscope keys revoke`: revokes a key in the data directory (a running broker
/// refuses it from its next call).
pub async fn revoke_key(target: &Target, key_id: &str) -> anyhow::Result<serde_json::Value> {
    let keys = target.keys().await?;
    Ok(keys.revoke(key_id, &Actor::cli()).await?.view(now_ms()))
}

/// Filters of `periscope audit export`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this organization.
    pub org: Option<String>,
    /// Entries at or after this time (a date or RFC 3339 time).
    pub since: Option<String>,
    /// Entries before this time.
    pub until: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this action.
    pub action_id: Option<String>,
}

/// `periscope audit export`: every matching entry as JSON lines on `out`; returns how
/// many.
pub async fn export_audit(target: &Target, f: &AuditFilter, out: &mut impl Write) -> anyhow::Result<u64> {
    let time = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<u64>> {
        v.as_deref()
            .map(|t| {
                t.trim().parse::<u64>().or_else(|_| parse_datetime(t)).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            })
            .transpose()
    };
    let kind = f
        .kind
        .as_deref()
        .map(|k| {
            AuditKind::parse(k).with_context(|| {
                format!("--kind `{k}` must be one of {}", AuditKind::ALL.map(|k| k.as_str()).join(", "))
            })
        })
        .transpose()?;
    let q = AuditQuery {
        org: f.org.clone(),
        since_ms: time("since", &f.since)?,
        until_ms: time("until", &f.until)?,
        actor: f.actor.clone(),
        kind,
        action_id: f.action_id.clone(),
        after_seq: 0,
        limit: audit::MAX_PAGE,
    };
    let data_dir = match target {
        Target::DataDir(dir) => dir.as_path(),
        Target::Redis { url, prefix } => {
            let redis = Target::redis(url, prefix).await?;
            let audit = periscope_broker::backend::redis::RedisAudit::start(redis);
            let orgs = match &q.org {
                Some(o) => vec![o.clone()],
                None => audit.orgs().await?,
            };
            let mut n = 0;
            for org in orgs {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
                let q = AuditQuery { org: Some(org), ..q.clone() };
                let reader = audit.clone();
                let task = tokio::spawn(async move { reader.export(q, tx).await });
                while let Some(chunk) = rx.recv().await {
                    out.write_all(&chunk)?;
                }
                n += task.await??;
            }
            out.flush()?;
            return Ok(n);
        }
    };
    anyhow::ensure!(
        periscope_broker::store::db_path(data_dir).exists(),
        "{} holds no Periscope database (is it the broker's --data-dir?)",
        data_dir.display()
    );
    let conn = periscope_broker::store::open_reader(data_dir)?;
    let n = audit::export(&conn, &q, |line| out.write_all(line.as_bytes())).map_err(|e| match e {
        audit::ExportError::Sqlite(e) => anyhow::anyhow!("reading the audit trail: {e}"),
        audit::ExportError::Sink(e) => anyhow::anyhow!("writing the export: {e}"),
        _ => anyhow::anyhow!("exporting the audit trail failed"),
    })?;
    out.flush()?;
    Ok(n)
}

/// `periscope config check FILE`: loads and validates the file; returns a summary.
pub fn check_config(path: &Path) -> anyhow::Result<String> {
    let c = BrokerConfig::load(path)?;
    let roles: Vec<String> = c
        .api_keys
        .iter()
        .map(|k| {
            format!("{} ({}, org {})", k.name, k.role_or_default().as_str(), k.org.as_deref().unwrap_or(DEFAULT_ORG))
        })
        .collect();
    let org = c.org_quotas.resolve(&c.callers);
    let mut summary = format!(
        "{}: ok\n  listen {}\n  data_dir {}\n  {} API key(s){}\n  {} agent key(s)\n  callers: {} calls/min (burst {}), {} \
         concurrent waits, {} live actions\n  organization ceilings: {} calls/min, {} concurrent waits, {} live \
         actions, {} MCP sessions\n  ingest per agent: {} hits/s, {} bytes/s (burst x{})\n  retention: ended actions \
         {} days (at most {} per organization), audit {} days\n",
        path.display(),
        c.listen,
        c.data_dir.as_ref().map_or("(none: nothing survives a restart)".to_owned(), |d| d.display().to_string()),
        c.api_keys.len(),
        if roles.is_empty() { String::new() } else { format!(": {}", roles.join(", ")) },
        c.agent_keys.len(),
        c.callers.calls_per_minute,
        c.callers.call_burst,
        c.callers.concurrent_waits,
        c.callers.live_actions,
        org.calls_per_minute,
        org.concurrent_waits,
        org.live_actions,
        org.mcp_sessions,
        c.ingest.agent_hits_per_sec,
        c.ingest.agent_bytes_per_sec,
        c.ingest.burst_factor,
        c.store.hit_retention_days,
        c.store.max_ended_actions_per_org,
        c.store.audit_retention_days,
    );
    let h = &c.http;
    summary.push_str(&format!(
        "  connections: {} ({} per address); request head within {} s, body within {} s; idle closed after {} s\n",
        h.max_connections,
        h.max_connections_per_ip,
        h.header_read_timeout_secs,
        h.body_read_timeout_secs,
        h.idle_timeout_secs
    ));
    let o = &c.oauth;
    summary.push_str(&if o.enabled {
        format!(
            "  sign-in (OAuth): on; access tokens {} s, refresh tokens {} days, sign-in {} per minute per user{}\n",
            o.access_token_ttl_secs,
            o.refresh_token_ttl_secs / 86_400,
            o.sign_in_per_minute_per_user,
            o.oidc.as_ref().map(|p| format!("; OpenID provider {}", p.issuer)).unwrap_or_default()
        )
    } else {
        "  sign-in (OAuth): off (API keys only)\n".to_owned()
    });
    Ok(summary)
}

/// Settings given as flags to `periscope serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeFlags {
    /// `--config`.
    pub config: Option<std::path::PathBuf>,
    /// `--listen`.
    pub listen: Option<std::net::SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<std::path::PathBuf>,
    /// `--api-key` (repeatable).
    pub api_keys: Vec<String>,
    /// `--agent-key` (repeatable).
    pub agent_keys: Vec<String>,
    /// `--redis`: run as a node of the cluster sharing this Redis.
    pub redis: Option<String>,
    /// `--node-name`.
    pub node_name: Option<String>,
}

/// The broker's configuration from flags, environment (`env` looks a variable up) and
/// the configuration file, in that order of precedence, validated. Errors name the
/// flag, the variable, or the file's key.
pub fn serve_config(flags: &ServeFlags, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<BrokerConfig> {
    let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let config_path = flags.config.clone().or_else(|| var("PERISCOPE_CONFIG").map(Into::into));
    let mut config = match &config_path {
        Some(path) => BrokerConfig::load(path).map_err(|e| {
            let from = if flags.config.is_some() { "--config" } else { "PERISCOPE_CONFIG" };
            anyhow::anyhow!("{from}: {e}")
        })?,
        None => BrokerConfig::default(),
    };
    if let Some(v) = var("PERISCOPE_LISTEN") {
        config.listen =
            v.parse().map_err(|_| anyhow::anyhow!("PERISCOPE_LISTEN: `{v}` is not an address like 0.0.0.0:7070"))?;
    }
    if let Some(v) = var("PERISCOPE_PUBLIC_URL") {
        anyhow::ensure!(
            v.starts_with("http://") || v.starts_with("https://"),
            "PERISCOPE_PUBLIC_URL: `{v}` must start with http:// or https://"
        );
        config.public_url = Some(v);
    }
    if let Some(v) = var("PERISCOPE_DATA_DIR") {
        config.data_dir = Some(v.into());
    }
    if let Some(v) = var("PERISCOPE_REDIS_URL") {
        config.cluster.redis_url = Some(v);
    }
    if let Some(v) = var("PERISCOPE_NODE_NAME") {
        config.cluster.node_name = Some(v);
    }
    if let Some(url) = &flags.redis {
        config.cluster.redis_url = Some(url.clone());
    }
    if let Some(name) = &flags.node_name {
        config.cluster.node_name = Some(name.clone());
    }
    for (name, slot) in [
        ("PERISCOPE_HIT_RETENTION_DAYS", &mut config.store.hit_retention_days),
        ("PERISCOPE_AUDIT_RETENTION_DAYS", &mut config.store.audit_retention_days),
    ] {
        if let Some(v) = var(name) {
            let days: u64 = v.parse().map_err(|_| anyhow::anyhow!("{name}: `{v}` is not a number of days"))?;
            anyhow::ensure!((1..=3_650).contains(&days), "{name}: {days} is outside 1..=3650");
            *slot = days;
        }
    }
    let split = |v: String| v.split(',').map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect::<Vec<_>>();
    let (api, api_from) = if flags.api_keys.is_empty() {
        (var("PERISCOPE_API_KEY").map(split).unwrap_or_default(), "PERISCOPE_API_KEY")
    } else {
        (flags.api_keys.clone(), "--api-key")
    };
    let (agent, agent_from) = if flags.agent_keys.is_empty() {
        (var("PERISCOPE_AGENT_KEY").map(split).unwrap_or_default(), "PERISCOPE_AGENT_KEY")
    } else {
        (flags.agent_keys.clone(), "--agent-key")
    };
    if let Some(listen) = flags.listen {
        config.listen = listen;
    }
    if let Some(dir) = &flags.data_dir {
        config.data_dir = Some(dir.clone());
    }
    let first_api = config.api_keys.len();
    for key in api {
        config.api_keys.push(ApiKeyConfig::new("cli", key).with_role(Role::CompanyAdmin));
    }
    let first_agent = config.agent_keys.len();
    for key in agent {
        config.agent_keys.push(AgentKeyConfig::any_pool(key));
    }
    config.validate().map_err(|e| {
        // Name what the operator typed rather than the position it took in the list.
        let text = e.to_string();
        if (first_api..config.api_keys.len()).any(|i| text.contains(&format!("api_keys[{i}]"))) {
            anyhow::anyhow!("{api_from}: {text}")
        } else if (first_agent..config.agent_keys.len()).any(|i| text.contains(&format!("agent_keys[{i}]"))) {
            anyhow::anyhow!("{agent_from}: {text}")
        } else {
            let from = config_path.as_ref().map_or("configuration".to_owned(), |p| p.display().to_string());
            anyhow::anyhow!("{from}: {text}")
        }
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn environment_variables_set_the_main_settings_and_errors_name_them() {
        let c = serve_config(
            &ServeFlags::default(),
            env(&[("PERISCOPE_LISTEN", "0.0.0.0:9000"), ("PERISCOPE_AUDIT_RETENTION_DAYS", "365")]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.store.audit_retention_days, 365);
        let err = serve_config(&ServeFlags::default(), env(&[("PERISCOPE_LISTEN", "nine thousand")])).unwrap_err();
        assert!(err.to_string().starts_with("PERISCOPE_LISTEN:"), "{err}");
        let err = serve_config(&ServeFlags::default(), env(&[("PERISCOPE_HIT_RETENTION_DAYS", "0")])).unwrap_err();
        assert!(err.to_string().starts_with("PERISCOPE_HIT_RETENTION_DAYS:"), "{err}");
        let err = serve_config(&ServeFlags::default(), env(&[("PERISCOPE_API_KEY", "short")])).unwrap_err();
        assert!(err.to_string().starts_with("PERISCOPE_API_KEY:"), "{err}");
        let flags = ServeFlags { listen: Some("127.0.0.1:1".parse().unwrap()), ..ServeFlags::default() };
        assert_eq!(serve_config(&flags, env(&[("PERISCOPE_LISTEN", "0.0.0.0:9000")])).unwrap().listen.port(), 1);
    }

    #[test]
    fn key_arguments_are_checked_before_anything_is_written() {
        let ok = CreateKey { name: Some("ci".into()), expires_in: Some("30d".into()), ..CreateKey::default() };
        let req = ok.request().unwrap();
        assert_eq!(req.role, Some(Role::Developer));
        assert!(req.expires_at_ms.unwrap() > now_ms());
        let bad = CreateKey { name: Some("x".into()), role: Some("root".into()), ..CreateKey::default() };
        assert!(bad.request().unwrap_err().to_string().contains("--role"));
        let bad = CreateKey { agent: true, role: Some("developer".into()), ..CreateKey::default() };
        assert!(bad.request().is_err());
        let agent = CreateKey { agent: true, pools: vec!["shop".into()], ..CreateKey::default() };
        assert_eq!(agent.request().unwrap().kind, KeyKind::Agent);
    }
}
