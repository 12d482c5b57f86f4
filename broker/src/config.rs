//! Broker configuration: one TOML file plus command-line flags, validated on start with
//! errors that name the key and the problem.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use periscope_protocol::{AgentQuotas, CaptureLimits};
use serde::{Deserialize, Serialize};

use crate::access::{MAX_KEY_NAME, MAX_ORG_NAME, Role, Scope, plausible_secret, valid_name};
use crate::quota::{CallerQuotaOverrides, CallerSettings, IngestSettings, OrgQuotas};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: String,
        /// The parser's message, which names the key and position.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("`{key}`: {message}")]
    Invalid {
        /// Dotted key path, e.g. `limits.max_depth`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Sign-in (`[oauth] enabled`) on a cluster node (`[cluster] redis_url`): the
    /// authorization server keeps its users, clients and grants in one node's SQLite
    /// database, which the other nodes cannot see.
    #[error(
        "sign-in (OAuth) is not available on a cluster yet: its users, clients and grants live in one node's \
         SQLite; use API keys on a cluster, or run one node"
    )]
    OAuthOnCluster,
}

/// An API key accepted on the REST API and the MCP endpoint, defined in the file (keys
/// made with `periscope keys create` live in the data directory instead). Its secret
/// is hashed at start; it cannot be revoked except by removing it here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who uses the key; shown as the creator of actions and in the audit trail.
    pub name: String,
    /// The secret.
    pub key: String,
    /// `developer` (the default), `group_admin` (needs `group`) or `company_admin`.
    /// A key that names no role but lists `mcp:admin` among its scopes is a
    /// `company_admin`, as before roles existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Narrower scopes than the role's (`mcp:system:read`, `mcp:agents:read`,
    /// `mcp:actions:write`, `mcp:hits:read`, `mcp:admin`); absent means all of the
    /// role's. Checked on every tool call and REST request, so a read-only key for
    /// dashboards is one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// The organization (default `default`; created when missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The group: the one a `group_admin` administers, and the pools a `developer` of a
    /// group may reach (created when missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only these pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<String>>,
    /// Quota overrides for this key (`calls_per_minute`, `call_burst`,
    /// `concurrent_waits`, `live_actions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<CallerQuotaOverrides>,
}

impl ApiKeyConfig {
    /// A `developer` key of the `default` organization.
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        ApiKeyConfig {
            name: name.into(),
            key: key.into(),
            role: None,
            scopes: None,
            org: None,
            group: None,
            pools: None,
            quotas: None,
        }
    }

    /// The same key with another role.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = Some(role);
        self
    }

    /// The key's role: the one it names, else `company_admin` when its scopes list
    /// `mcp:admin` (configurations from before roles), else `developer`.
    pub fn role_or_default(&self) -> Role {
        match self.role {
            Some(r) => r,
            None if self.scopes.iter().flatten().any(|s| s.trim() == Scope::Admin.as_str()) => Role::CompanyAdmin,
            None => Role::Developer,
        }
    }
}

/// A key agents register with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentKeyConfig {
    /// The secret.
    pub key: String,
    /// Pools the key may register into; `["*"]` (the default) for any.
    #[serde(default = "any_pool")]
    pub pools: Vec<String>,
    /// The organization its agents join (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

fn any_pool() -> Vec<String> {
    vec!["*".into()]
}

impl AgentKeyConfig {
    /// A key for any pool of the `default` organization.
    pub fn any_pool(key: impl Into<String>) -> Self {
        AgentKeyConfig { key: key.into(), pools: any_pool(), org: None }
    }

    /// Whether the key lets an agent register into `pool`.
    pub fn allows_pool(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p == "*" || p == pool)
    }
}

/// Agent connection settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// How often agents send heartbeats.
    pub heartbeat_interval_secs: u64,
    /// How often the broker pings each agent socket (Sidekick: 60 s).
    pub ping_interval_secs: u64,
    /// How long a ping may go unanswered before the socket is closed (Sidekick: 10 s).
    pub ping_timeout_secs: u64,
    /// How long a new socket may take to register (Sidekick: 5 s).
    pub registration_timeout_secs: u64,
    /// How long agents that went away stay listed as offline.
    pub offline_retention_secs: u64,
    /// Catalog entries kept per agent; beyond this, new locations are ignored.
    pub max_catalog_entries: usize,
    /// How often agents report dynamic metric aggregates, in milliseconds.
    pub metric_report_interval_ms: u64,
    /// Agents one organization may have listed (online or recently offline); when full,
    /// the one offline the longest is forgotten, and with none offline a new one is
    /// refused. Bounds the memory one agent key can claim.
    pub max_agents_per_org: u64,
    /// Bytes one agent's catalog may hold (strings counted with their overhead); beyond
    /// it new locations are ignored and counted, like beyond `max_catalog_entries`.
    pub max_catalog_bytes: u64,
    /// Sessions one agent key may hold open at once (counted from the upgrade, so
    /// sockets that never register count too).
    pub max_sessions_per_key: u64,
    /// How long an agent id stays bound to the agent key and pool that registered it
    /// first, after it was last connected (across restarts). At least a day, the
    /// longest an action can live, and at least `offline_retention_secs`.
    pub identity_retention_secs: u64,
    /// Identity bindings kept per organization; over it, the agent key holding the most
    /// gives up its binding offline the longest. At least `max_agents_per_org`.
    pub max_identities_per_org: u64,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            heartbeat_interval_secs: 30,
            ping_interval_secs: 60,
            ping_timeout_secs: 10,
            registration_timeout_secs: 5,
            offline_retention_secs: 3_600,
            max_catalog_entries: 20_000,
            metric_report_interval_ms: 5_000,
            max_agents_per_org: 10_000,
            max_catalog_bytes: 4 * 1024 * 1024,
            max_sessions_per_key: 1_000,
            identity_retention_secs: 7 * 86_400,
            max_identities_per_org: 100_000,
        }
    }
}

/// Limits on what the broker keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Ended actions kept (with their hits, lines and figures) per organization. Over
    /// it, the key of the organization holding the most ended actions gives up its
    /// oldest: one key's churn never deletes another key's or another organization's
    /// results. (`max_ended_actions`, its name before it was per organization, is read
    /// too.)
    #[serde(alias = "max_ended_actions")]
    pub max_ended_actions_per_org: usize,
    /// How long an ended action (with its hits, lines and figures) is kept after it
    /// ended, in days.
    pub hit_retention_days: u64,
    /// How long audit entries are kept, in days (an audit trail usually outlives the
    /// data it describes).
    pub audit_retention_days: u64,
    /// Bytes of agents' hits, lines and metric figures that may wait for the database
    /// writer. When it is full, agents' sessions wait for the writer to commit (and TCP
    /// pushes back to the agents) rather than queuing without bound. (A single frame
    /// larger than this still goes in, alone.)
    pub max_queued_bytes: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            max_ended_actions_per_org: 1_000,
            hit_retention_days: 10,
            audit_retention_days: 90,
            max_queued_bytes: crate::store::DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

/// The MCP endpoint (`/mcp`): who may reach it and how long idle sessions live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct McpSettings {
    /// `Host` header values `/mcp` answers (`name` or `name:port`; `"*"` for any). The
    /// default, loopback names, blocks DNS-rebinding attacks from web pages against a
    /// broker on a developer's machine; the host of `public_url` is always added.
    pub allowed_hosts: Vec<String>,
    /// Browser `Origin`s allowed to call `/mcp` (`scheme://host:port`, `:*` for any
    /// port; `"*"` for any origin). Requests without an `Origin` (every non-browser MCP
    /// client) are not affected; the default allows pages served from loopback only.
    pub allowed_origins: Vec<String>,
    /// Largest JSON-RPC request body accepted, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// An MCP session with no traffic for this long is closed; clients reinitialize.
    /// At least 660 s, so a `place_snapshot` that waits its longest (600 s) is never
    /// cut off.
    pub session_idle_timeout_secs: u64,
}

impl Default for McpSettings {
    fn default() -> Self {
        McpSettings {
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: vec!["http://localhost:*".into(), "http://127.0.0.1:*".into(), "http://[::1]:*".into()],
            max_body_bytes: 256 * 1024,
            session_idle_timeout_secs: 900,
        }
    }
}

/// `[http]`: what one connection may hold of the listener, for every client (REST, MCP
/// and the agents' WebSockets alike). Slow or silent peers are closed on a deadline,
/// and no address can take more than its share of the connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// A request's head (request line and headers) must arrive whole within this many
    /// seconds of its first byte (for a new connection, of its opening). Trickling a
    /// header byte at a time does not extend it.
    pub header_read_timeout_secs: u64,
    /// A request's body must arrive whole within this many seconds of its head; the
    /// request then fails with a clear error.
    pub body_read_timeout_secs: u64,
    /// A connection with no request in progress and no byte moving for this long is
    /// closed, and so is one whose writes make no progress for this long (the client
    /// stopped reading). Calls that wait (`place_snapshot`, long polls) are requests in
    /// progress and are not cut off; upgraded WebSockets are governed by the gateway's
    /// registration timeout and pings instead.
    pub idle_timeout_secs: u64,
    /// Connections open at once (agents' WebSockets included); beyond it a new one is
    /// answered 503 and closed.
    pub max_connections: u32,
    /// Connections open at once from one client address (IPv6: one /64); beyond it a
    /// new one is answered 429 and closed. Behind a reverse proxy or NAT every client
    /// shares one address: raise it up to `max_connections`.
    pub max_connections_per_ip: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 4_096,
            max_connections_per_ip: 512,
        }
    }
}

impl HttpSettings {
    /// Checks every key against its floor and ceiling.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, min, max) in [
            ("http.header_read_timeout_secs", self.header_read_timeout_secs, 1, 300),
            ("http.body_read_timeout_secs", self.body_read_timeout_secs, 1, 3_600),
            ("http.idle_timeout_secs", self.idle_timeout_secs, 1, 3_600),
            ("http.max_connections", u64::from(self.max_connections), 16, 1_000_000),
            ("http.max_connections_per_ip", u64::from(self.max_connections_per_ip), 1, 1_000_000),
        ] {
            if v < min || v > max {
                return Err(ConfigError::Invalid { key: key.into(), message: format!("{v} is outside {min}..={max}") });
            }
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(ConfigError::Invalid {
                key: "http.max_connections_per_ip".into(),
                message: format!(
                    "{} is above http.max_connections ({})",
                    self.max_connections_per_ip, self.max_connections
                ),
            });
        }
        Ok(())
    }
}
/// Shortest identity retention: an action aimed at an agent id lives at most this long,
/// so no live action can outlast the binding of an id it names.
pub const MIN_IDENTITY_RETENTION_SECS: u64 = periscope_protocol::limits::action_bounds::MAX_EXPIRE_SECS;

/// Fewest ended actions an organization keeps.
pub const MIN_ENDED_PER_ORG: usize = 10;

/// Shortest idle timeout accepted for MCP sessions: the longest wait plus a minute.
pub const MIN_MCP_SESSION_IDLE_SECS: u64 = periscope_protocol::limits::action_bounds::MAX_WAIT_SECS + 60;

/// The whole broker configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Base URL clients use to reach the broker (for links and OAuth metadata);
    /// defaults to `http://<listen>`.
    pub public_url: Option<String>,
    /// API keys for REST and MCP callers.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Keys agents register with.
    pub agent_keys: Vec<AgentKeyConfig>,
    /// Capture limits applied by agents and re-applied by the broker.
    pub limits: CaptureLimits,
    /// Budgets sent to agents.
    pub quotas: AgentQuotas,
    /// Per-caller (per API key) quotas.
    pub callers: CallerSettings,
    /// Ceilings per organization, above every key's own quotas.
    pub org_quotas: OrgQuotas,
    /// What the broker accepts from each agent and for each action.
    pub ingest: IngestSettings,
    /// Agent connection settings.
    pub agents: AgentSettings,
    /// Retention.
    pub store: StoreSettings,
    /// The MCP endpoint.
    pub mcp: McpSettings,
    /// Connection caps and timeouts of the listener.
    pub http: HttpSettings,
    /// Directory holding the database; without it nothing survives a restart.
    pub data_dir: Option<std::path::PathBuf>,
    /// Redaction rules (built-ins on by default); changeable at run time through the API.
    pub redaction: periscope_redaction::RedactionConfig,
    /// Cluster mode: several nodes sharing one Redis.
    pub cluster: ClusterSettings,
    /// Sign-in of people through OAuth clients (the broker as authorization server).
    pub oauth: crate::oauth::OAuthSettings,
    /// `[[blocklist]]`: where no action may run, or no value be captured, in every
    /// organization (each organization adds its own through the admin API).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocklist: Vec<periscope_protocol::BlockRule>,
}

/// `[cluster]`: run this broker as one node of several that share their state in one
/// Redis (`redis_url`); without it the broker is a single node keeping its state in
/// SQLite under `data_dir`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// `redis://[user:password@]host:port/db` of the shared Redis (a primary, with
    /// `appendonly yes` and `maxmemory-policy noeviction`).
    pub redis_url: Option<String>,
    /// This node's name, unique in the cluster (default: the host name and the port it
    /// listens on).
    pub node_name: Option<String>,
    /// Prefix of every key this deployment keeps in Redis (several may share one).
    pub key_prefix: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { redis_url: None, node_name: None, key_prefix: "periscope:".into() }
    }
}

impl ClusterSettings {
    /// Whether the broker runs as a cluster node.
    pub fn enabled(&self) -> bool {
        self.redis_url.is_some()
    }

    /// This node's name: the configured one, or `<host name>:<port>`.
    pub fn node_name(&self, bound: SocketAddr) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| crate::access::valid_name(h, 64))
                .unwrap_or_else(|| "node".into());
            format!("{host}:{}", bound.port())
        })
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            public_url: None,
            api_keys: Vec::new(),
            agent_keys: Vec::new(),
            limits: CaptureLimits::default(),
            quotas: AgentQuotas::default(),
            callers: CallerSettings::default(),
            org_quotas: OrgQuotas::default(),
            ingest: IngestSettings::default(),
            agents: AgentSettings::default(),
            store: StoreSettings::default(),
            mcp: McpSettings::default(),
            http: HttpSettings::default(),
            data_dir: None,
            redaction: periscope_redaction::RedactionConfig::default(),
            cluster: ClusterSettings::default(),
            oauth: crate::oauth::OAuthSettings::default(),
            blocklist: Vec::new(),
        }
    }
}

impl BrokerConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let config = Self::from_toml(&text, &path.display().to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML (without validating); `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<BrokerConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::safety::validate_rules(&self.blocklist)
            .map_err(|message| ConfigError::Invalid { key: "blocklist".into(), message })?;
        self.limits
            .validate()
            .map_err(|e| ConfigError::Invalid { key: format!("limits.{}", e.name), message: e.to_string() })?;
        let q = &self.quotas;
        for (key, v) in [
            ("quotas.snapshot_hits_per_sec_per_action", q.snapshot_hits_per_sec_per_action),
            ("quotas.snapshot_hits_per_sec", q.snapshot_hits_per_sec),
            ("quotas.log_lines_per_sec", q.log_lines_per_sec),
            ("quotas.log_bytes_per_sec", q.log_bytes_per_sec),
            ("quotas.log_burst_factor", q.log_burst_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!("{v} must be a positive number"),
                });
            }
        }
        if !(q.cpu_fraction.is_finite() && q.cpu_fraction > 0.0 && q.cpu_fraction <= 0.5) {
            return Err(ConfigError::Invalid {
                key: "quotas.cpu_fraction".into(),
                message: format!("{} must be in (0, 0.5]", q.cpu_fraction),
            });
        }
        let a = &self.agents;
        for (key, v, min, max) in [
            ("agents.heartbeat_interval_secs", a.heartbeat_interval_secs, 1, 300),
            ("agents.ping_interval_secs", a.ping_interval_secs, 1, 600),
            ("agents.ping_timeout_secs", a.ping_timeout_secs, 1, 120),
            ("agents.registration_timeout_secs", a.registration_timeout_secs, 1, 60),
            ("agents.offline_retention_secs", a.offline_retention_secs, 0, 30 * 86_400),
            ("agents.metric_report_interval_ms", a.metric_report_interval_ms, 1_000, 3_600_000),
            ("agents.max_agents_per_org", a.max_agents_per_org, 1, 1_000_000),
            ("agents.max_catalog_entries", a.max_catalog_entries as u64, 100, 1_000_000),
            ("agents.max_catalog_bytes", a.max_catalog_bytes, 64 * 1024, 256 * 1024 * 1024),
            ("agents.max_sessions_per_key", a.max_sessions_per_key, 1, 1_000_000),
            (
                "agents.identity_retention_secs",
                a.identity_retention_secs,
                MIN_IDENTITY_RETENTION_SECS.max(a.offline_retention_secs),
                365 * 86_400,
            ),
            ("agents.max_identities_per_org", a.max_identities_per_org, a.max_agents_per_org, 10_000_000),
        ] {
            if v < min || v > max {
                return Err(ConfigError::Invalid { key: key.into(), message: format!("{v} is outside {min}..={max}") });
            }
        }
        self.redaction
            .validate()
            .map_err(|e| ConfigError::Invalid { key: "redaction".into(), message: e.to_string() })?;
        for (key, range) in [
            ("store.hit_retention_days", self.store.hit_retention_days),
            ("store.audit_retention_days", self.store.audit_retention_days),
        ] {
            if !(1..=3_650).contains(&range) {
                return Err(ConfigError::Invalid { key: key.into(), message: format!("{range} is outside 1..=3650") });
            }
        }
        let (min, max) = (64 * 1024, 4 * 1024 * 1024 * 1024 - 1);
        if !(min..=max).contains(&self.store.max_queued_bytes) {
            return Err(ConfigError::Invalid {
                key: "store.max_queued_bytes".into(),
                message: format!("{} is outside {min}..={max}", self.store.max_queued_bytes),
            });
        }
        if !(MIN_ENDED_PER_ORG..=1_000_000).contains(&self.store.max_ended_actions_per_org) {
            return Err(ConfigError::Invalid {
                key: "store.max_ended_actions_per_org".into(),
                message: format!(
                    "{} is outside {MIN_ENDED_PER_ORG}..=1000000 (results must stay long enough to be read)",
                    self.store.max_ended_actions_per_org
                ),
            });
        }
        self.callers.validate().map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.org_quotas.validate(&self.callers).map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.ingest.validate().map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        // The broker's copies of the agents' budgets must let an honest agent through.
        for (key, broker, agent, agent_key) in [
            (
                "ingest.agent_hits_per_sec",
                self.ingest.agent_hits_per_sec,
                self.quotas.snapshot_hits_per_sec,
                "quotas.snapshot_hits_per_sec",
            ),
            (
                "ingest.action_hits_per_sec",
                self.ingest.action_hits_per_sec,
                self.quotas.snapshot_hits_per_sec_per_action,
                "quotas.snapshot_hits_per_sec_per_action",
            ),
        ] {
            if broker < agent {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!(
                        "{broker} is below {agent_key} ({agent}): the broker would drop what honest agents send"
                    ),
                });
            }
        }
        let mut secrets: Vec<(String, &str)> = Vec::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let at = format!("api_keys[{i}]");
            check_secret(&format!("{at}.key"), &k.key)?;
            if k.name.trim().is_empty() || k.name.len() > MAX_KEY_NAME {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.name"),
                    message: format!("must be 1 to {} characters", MAX_KEY_NAME),
                });
            }
            let role = k.role_or_default();
            for scope in k.scopes.iter().flatten() {
                let Some(parsed) = Scope::parse(scope) else {
                    return Err(ConfigError::Invalid {
                        key: format!("{at}.scopes"),
                        message: format!(
                            "unknown scope `{scope}`; known scopes: {}",
                            Scope::KNOWN.map(|s| s.as_str()).join(", ")
                        ),
                    });
                };
                if !role.scopes().contains(&parsed) {
                    return Err(ConfigError::Invalid {
                        key: format!("{at}.scopes"),
                        message: format!("`{scope}` is beyond the role `{}`", role.as_str()),
                    });
                }
            }
            if k.scopes.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.scopes"),
                    message: "must list at least one scope (or be left out for the role's)".into(),
                });
            }
            check_tenancy_names(&at, k.org.as_deref(), k.group.as_deref(), k.pools.as_deref())?;
            if role == Role::GroupAdmin && k.group.is_none() {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.group"),
                    message: "a group_admin key needs the group it administers".into(),
                });
            }
            if k.pools.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.pools"),
                    message: "must list at least one pool (or be left out for no restriction)".into(),
                });
            }
            if let Some(q) = &k.quotas {
                q.validate(&format!("{at}.quotas.")).map_err(|(key, message)| ConfigError::Invalid { key, message })?;
            }
            secrets.push((at, &k.key));
        }
        for (i, k) in self.agent_keys.iter().enumerate() {
            let at = format!("agent_keys[{i}]");
            check_secret(&format!("{at}.key"), &k.key)?;
            if k.pools.is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.pools"),
                    message: "must list at least one pool (or \"*\")".into(),
                });
            }
            let named: Vec<String> = k.pools.iter().filter(|p| *p != "*").cloned().collect();
            check_tenancy_names(&at, k.org.as_deref(), None, Some(&named))?;
            secrets.push((at, &k.key));
        }
        for (i, (at, secret)) in secrets.iter().enumerate() {
            if let Some((first, _)) = secrets.iter().take(i).find(|(_, s)| s == secret) {
                return Err(ConfigError::Invalid {
                    key: format!("{at}.key"),
                    message: format!("repeats the secret of {first}; every key needs its own"),
                });
            }
        }
        self.http.validate()?;
        self.oauth.validate()?;
        if self.oauth.enabled && self.cluster.enabled() {
            return Err(ConfigError::OAuthOnCluster);
        }
        if self.oauth.enabled {
            crate::oauth::config::check_public_url(self.public_url.as_deref(), self.listen)?;
        }
        let m = &self.mcp;
        if !(4_096..=16 * 1024 * 1024).contains(&m.max_body_bytes) {
            return Err(ConfigError::Invalid {
                key: "mcp.max_body_bytes".into(),
                message: format!("{} is outside 4096..=16777216", m.max_body_bytes),
            });
        }
        if !(MIN_MCP_SESSION_IDLE_SECS..=7 * 86_400).contains(&m.session_idle_timeout_secs) {
            return Err(ConfigError::Invalid {
                key: "mcp.session_idle_timeout_secs".into(),
                message: format!(
                    "{} is outside {MIN_MCP_SESSION_IDLE_SECS}..=604800 (a waiting place_snapshot may take 600 s)",
                    m.session_idle_timeout_secs
                ),
            });
        }
        for (key, list) in [("mcp.allowed_hosts", &m.allowed_hosts), ("mcp.allowed_origins", &m.allowed_origins)] {
            if list.iter().any(|h| h.trim().is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control())) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: "entries must be non-empty, without spaces".into(),
                });
            }
        }
        for origin in m.allowed_origins.iter().filter(|o| *o != "*" && *o != "null") {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: "mcp.allowed_origins".into(),
                    message: format!("`{origin}` must start with http:// or https:// (or be \"*\" or \"null\")"),
                });
            }
        }
        if let Some(url) = &self.cluster.redis_url
            && !url.starts_with("redis://")
        {
            return Err(ConfigError::Invalid {
                key: "cluster.redis_url".into(),
                message: format!(
                    "`{}` must start with redis:// (redis://host:6379/0; TLS is not supported)",
                    crate::backend::redis::redact_url(url)
                ),
            });
        }
        if let Some(name) = &self.cluster.node_name
            && !valid_name(name, 64)
        {
            return Err(ConfigError::Invalid {
                key: "cluster.node_name".into(),
                message: format!("`{name}` must be 1 to 64 characters from A-Z a-z 0-9 . _ : -"),
            });
        }
        let prefix = &self.cluster.key_prefix;
        if prefix.is_empty() || prefix.len() > 64 || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::Invalid {
                key: "cluster.key_prefix".into(),
                message: "must be 1 to 64 characters without spaces".into(),
            });
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                key: "public_url".into(),
                message: format!("`{url}` must start with http:// or https://"),
            });
        }
        Ok(())
    }

    /// The URL clients reach the broker at.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        self.public_url.clone().unwrap_or_else(|| format!("http://{bound}")).trim_end_matches('/').to_owned()
    }

    /// `Host` values `/mcp` answers: `mcp.allowed_hosts` plus the authority of
    /// `public_url`, since clients told to use that URL must not be refused. Empty means
    /// any host (`"*"` was configured).
    pub fn mcp_allowed_hosts(&self) -> Vec<String> {
        if self.mcp.allowed_hosts.iter().any(|h| h == "*") {
            return Vec::new();
        }
        let mut hosts = self.mcp.allowed_hosts.clone();
        if let Some(url) = &self.public_url {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
            if !authority.is_empty() && !hosts.iter().any(|h| h == authority) {
                hosts.push(authority.to_owned());
            }
        }
        hosts
    }

    /// Ping interval as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.agents.ping_interval_secs)
    }
}

fn check_tenancy_names(
    at: &str,
    org: Option<&str>,
    group: Option<&str>,
    pools: Option<&[String]>,
) -> Result<(), ConfigError> {
    let max = MAX_ORG_NAME;
    let pool_max = periscope_protocol::messages::registration_bounds::MAX_NAME_LEN;
    for (field, value, max) in [("org", org, max), ("group", group, max)] {
        if let Some(v) = value
            && !valid_name(v, max)
        {
            return Err(ConfigError::Invalid {
                key: format!("{at}.{field}"),
                message: format!("`{v}` must be 1 to {max} characters from A-Z a-z 0-9 . _ : -"),
            });
        }
    }
    if let Some(p) = pools.into_iter().flatten().find(|p| !valid_name(p, pool_max)) {
        return Err(ConfigError::Invalid {
            key: format!("{at}.pools"),
            message: format!("`{p}` must be 1 to {pool_max} characters from A-Z a-z 0-9 . _ : -"),
        });
    }
    Ok(())
}

fn check_secret(key: &str, secret: &str) -> Result<(), ConfigError> {
    if !plausible_secret(secret) {
        return Err(ConfigError::Invalid {
            key: key.into(),
            message: "must be 16 to 256 printable ASCII characters without spaces".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_on_a_cluster_is_refused_with_what_to_do_instead() {
        let c = BrokerConfig::from_toml(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\n[oauth]\nenabled = true\n",
            "x",
        )
        .unwrap();
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::OAuthOnCluster), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("not available on a cluster") && text.contains("use API keys"), "{text}");
        // Either alone is fine.
        let one_node = BrokerConfig::from_toml("[oauth]\nenabled = true\n", "x").unwrap();
        one_node.validate().unwrap();
        let cluster = BrokerConfig::from_toml("[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\n", "x").unwrap();
        cluster.validate().unwrap();
    }

    #[test]
    fn an_unknown_key_is_named_with_its_position() {
        let err = BrokerConfig::from_toml("listen = \"127.0.0.1:1\"\nlisen = 3\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn out_of_range_limits_name_their_key() {
        let c = BrokerConfig::from_toml("[limits]\nmax_depth = 40\n", "x").unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().starts_with("`limits.max_depth`"), "{err}");
    }

    #[test]
    fn short_secrets_are_refused() {
        let c = BrokerConfig::from_toml("[[api_keys]]\nname = \"a\"\nkey = \"short\"\n", "x").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("api_keys[0].key"));
    }

    #[test]
    fn unknown_scopes_are_refused_with_the_known_ones() {
        let c = BrokerConfig::from_toml(
            "[[api_keys]]\nname = \"a\"\nkey = \"0123456789abcdef\"\nscopes = [\"mcp:hits:write\"]\n",
            "x",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api_keys[0].scopes") && err.contains("mcp:hits:read"), "{err}");
    }

    #[test]
    fn an_idle_timeout_shorter_than_the_longest_wait_is_refused() {
        let c = BrokerConfig::from_toml("[mcp]\nsession_idle_timeout_secs = 300\n", "x").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mcp.session_idle_timeout_secs"));
    }

    #[test]
    fn the_public_url_host_is_always_an_allowed_mcp_host() {
        let mut c =
            BrokerConfig { public_url: Some("https://periscope.example.com:8443/base".into()), ..Default::default() };
        let hosts = c.mcp_allowed_hosts();
        assert!(hosts.contains(&"periscope.example.com:8443".to_owned()), "{hosts:?}");
        assert!(hosts.contains(&"localhost".to_owned()));
        c.mcp.allowed_hosts = vec!["*".into()];
        assert!(c.mcp_allowed_hosts().is_empty());
    }

    #[test]
    fn http_timeouts_and_caps_have_floors_and_ceilings() {
        for (toml, key) in [
            ("[http]\nheader_read_timeout_secs = 0\n", "http.header_read_timeout_secs"),
            ("[http]\nidle_timeout_secs = 100000\n", "http.idle_timeout_secs"),
            ("[http]\nbody_read_timeout_secs = 0\n", "http.body_read_timeout_secs"),
            ("[http]\nmax_connections = 2\n", "http.max_connections"),
            ("[http]\nmax_connections = 100\nmax_connections_per_ip = 200\n", "http.max_connections_per_ip"),
        ] {
            let err = BrokerConfig::from_toml(toml, "x").unwrap().validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("`{key}`")), "{toml}: {err}");
        }
        let c = BrokerConfig::from_toml("[http]\nmax_connections = 64\nmax_connections_per_ip = 64\n", "x").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn the_default_config_is_valid() {
        BrokerConfig::default().validate().unwrap();
    }
}
