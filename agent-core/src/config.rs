//! How an agent is configured: a builder for code, environment variables for
//! operators. Every default is an associated `DEFAULT_*` constant so that the docs and
//! the code cannot drift apart.

use std::marker::PhantomData;
use std::time::Duration;

use periscope_protocol::messages::{is_label, registration_bounds};

/// Why an agent could not be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting was given neither in code nor in the environment.
    #[error("{setting} is required (set it on the builder or in the {env} environment variable)")]
    Missing {
        /// The builder method / setting name.
        setting: &'static str,
        /// The environment variable that can provide it.
        env: &'static str,
    },
    /// A setting has a value the agent cannot use.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting name.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything an agent needs to know before it starts. Its `Debug` output leaves the
/// agent key out, so logging a configuration never logs a secret.
#[derive(Clone)]
pub struct AgentConfig {
    /// Broker WebSocket URL, e.g. `ws://127.0.0.1:7070/agents`. A URL without a path gets
    /// `/agents` appended. Several, comma-separated, are the nodes of a cluster: the agent
    /// connects to one and moves to the next when it goes away (one load-balanced URL
    /// does the same).
    pub broker_url: String,
    /// Secret that lets the agent register into its pool.
    pub agent_key: String,
    /// Pool to register into.
    pub pool: String,
    /// Tags to be targeted by.
    pub tags: Vec<String>,
    /// Logical service name.
    pub service: String,
    /// Service build or release version.
    pub service_version: String,
    /// The build the service runs (a git commit), empty when unknown. Actions placed
    /// with an `expected_version` run only where it (or `service_version`) matches.
    pub build: String,
    /// Name shown to users; defaults to `service@host#pid`.
    pub display_name: Option<String>,
    /// Hits waiting to be sent; when full, new hits are dropped and counted.
    pub queue_capacity: usize,
    /// First reconnect delay; doubles (with jitter) up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Give up a connection attempt (TCP + WebSocket handshake + registration) after this.
    pub connect_timeout: Duration,
    /// Extra certificate authorities (PEM) trusted for `wss://` brokers, beside the
    /// public web roots: for brokers behind a private CA.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("broker_url", &self.broker_url)
            .field("agent_key", &"<redacted>")
            .field("pool", &self.pool)
            .field("tags", &self.tags)
            .field("service", &self.service)
            .field("service_version", &self.service_version)
            .field("build", &self.build)
            .field("display_name", &self.display_name)
            .field("queue_capacity", &self.queue_capacity)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

impl AgentConfig {
    /// Outbound queue size: about 1 MiB of raw hits at typical sizes, and a few seconds
    /// of hits at the default 25 snapshots/s even with a stalled broker.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
    /// Sidekick starts reconnecting after 3 s.
    pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_secs(3);
    /// Upper bound of the reconnect backoff.
    pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
    /// Connection attempts that take longer than this are abandoned and retried.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Pool used when none is given.
    pub const DEFAULT_POOL: &'static str = "default";

    /// Reads the configuration from `PERISCOPE_*` environment variables:
    /// `PERISCOPE_BROKER_URL`, `PERISCOPE_AGENT_KEY`, `PERISCOPE_POOL`,
    /// `PERISCOPE_TAGS` (comma-separated), `PERISCOPE_SERVICE`,
    /// `PERISCOPE_SERVICE_VERSION`, `PERISCOPE_DISPLAY_NAME`,
    /// `PERISCOPE_QUEUE_CAPACITY`, `PERISCOPE_RECONNECT_INITIAL_MS`, `PERISCOPE_CA_CERT`.
    /// `PERISCOPE_BROKER_URL` may list a cluster's nodes, comma-separated.
    pub fn from_env() -> Result<AgentConfig, ConfigError> {
        AgentBuilder::<()>::new().env_defaults().build_config()
    }

    /// The broker URLs, in the order they are tried.
    pub fn broker_urls(&self) -> Vec<&str> {
        self.broker_url.split(',').collect()
    }

    /// Checks every setting and fills derived defaults.
    pub fn validate(mut self) -> Result<AgentConfig, ConfigError> {
        let mut urls = Vec::new();
        for url in self.broker_url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return Err(ConfigError::Invalid {
                    setting: "broker_url",
                    reason: format!("`{url}` must start with ws:// or wss://"),
                });
            }
            let after_scheme = url.split_once("://").map(|(_, rest)| rest).unwrap_or_default();
            urls.push(if after_scheme.contains('/') {
                url.to_owned()
            } else {
                format!("{url}{}", periscope_protocol::messages::AGENT_GATEWAY_PATH)
            });
        }
        if urls.is_empty() {
            return Err(ConfigError::Invalid { setting: "broker_url", reason: "no URL given".into() });
        }
        self.broker_url = urls.join(",");
        if self.agent_key.is_empty() {
            return Err(ConfigError::Missing { setting: "agent_key", env: "PERISCOPE_AGENT_KEY" });
        }
        if !is_label(&self.pool, registration_bounds::MAX_NAME_LEN) {
            return Err(ConfigError::Invalid {
                setting: "pool",
                reason: format!("`{}` must be 1 to 128 characters from A-Z a-z 0-9 . _ : = / -", self.pool),
            });
        }
        if self.tags.len() > registration_bounds::MAX_TAGS {
            return Err(ConfigError::Invalid {
                setting: "tags",
                reason: format!("at most {} tags are allowed", registration_bounds::MAX_TAGS),
            });
        }
        if let Some(bad) = self.tags.iter().find(|t| !is_label(t, registration_bounds::MAX_TAG_LEN)) {
            return Err(ConfigError::Invalid {
                setting: "tags",
                reason: format!("tag `{bad}` must be 1 to 64 characters from A-Z a-z 0-9 . _ : = / -"),
            });
        }
        if self.service.is_empty() || self.service.len() > registration_bounds::MAX_NAME_LEN {
            return Err(ConfigError::Invalid { setting: "service", reason: "must be 1 to 128 bytes".into() });
        }
        for (setting, value) in [
            ("display_name", self.display_name.as_deref().unwrap_or_default()),
            ("service_version", self.service_version.as_str()),
            ("build", self.build.as_str()),
        ] {
            if value.len() > registration_bounds::MAX_NAME_LEN || value.chars().any(char::is_control) {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: format!("must be at most {} bytes of printable text", registration_bounds::MAX_NAME_LEN),
                });
            }
        }
        if self.queue_capacity == 0 || self.queue_capacity > 1 << 16 {
            return Err(ConfigError::Invalid {
                setting: "queue_capacity",
                reason: format!("{} is outside 1..=65536", self.queue_capacity),
            });
        }
        if let Some(path) = &self.ca_cert {
            crate::tls::load_ca(path).map_err(|reason| ConfigError::Invalid { setting: "ca_cert", reason })?;
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return Err(ConfigError::Invalid {
                setting: "reconnect_initial",
                reason: "must be non-zero and not above reconnect_max".into(),
            });
        }
        Ok(self)
    }
}

/// How an adapter starts its agent from a validated configuration: what
/// [`AgentBuilder::start`] calls. The `tracing` adapter's builder is
/// `AgentBuilder<periscope_agent::Agent>`-flavoured through this trait.
pub trait Launch {
    /// The running agent.
    type Agent;
    /// Starts it.
    fn launch(config: AgentConfig) -> Result<Self::Agent, ConfigError>;
}

/// A builder that only builds configurations.
impl Launch for () {
    type Agent = AgentConfig;
    fn launch(config: AgentConfig) -> Result<AgentConfig, ConfigError> {
        Ok(config)
    }
}

/// Environment variables an agent reads its build (git commit) from, first set wins:
/// Periscope's own, then what common CI systems and platforms set (Jenkins, Heroku,
/// GitHub Actions, GitLab CI, Cloud Build, Vercel, Render).
pub const BUILD_ENV_VARS: &[&str] = &[
    "PERISCOPE_BUILD",
    "GIT_COMMIT",
    "SOURCE_VERSION",
    "GITHUB_SHA",
    "CI_COMMIT_SHA",
    "COMMIT_SHA",
    "VERCEL_GIT_COMMIT_SHA",
    "RENDER_GIT_COMMIT",
];

/// Builds an agent: set what you know in code, let the environment fill the rest with
/// [`AgentBuilder::env_defaults`], then [`AgentBuilder::start`] it. `L` is the adapter
/// that starts it.
pub struct AgentBuilder<L = ()> {
    broker_url: Option<String>,
    agent_key: Option<String>,
    pool: Option<String>,
    tags: Option<Vec<String>>,
    service: Option<String>,
    service_version: Option<String>,
    build: Option<String>,
    display_name: Option<String>,
    queue_capacity: Option<usize>,
    reconnect_initial: Option<Duration>,
    reconnect_max: Option<Duration>,
    connect_timeout: Option<Duration>,
    ca_cert: Option<std::path::PathBuf>,
    env_error: Option<ConfigError>,
    launch: PhantomData<fn() -> L>,
}

impl<L> Default for AgentBuilder<L> {
    fn default() -> Self {
        AgentBuilder {
            broker_url: None,
            agent_key: None,
            pool: None,
            tags: None,
            service: None,
            service_version: None,
            build: None,
            display_name: None,
            queue_capacity: None,
            reconnect_initial: None,
            reconnect_max: None,
            connect_timeout: None,
            ca_cert: None,
            env_error: None,
            launch: PhantomData,
        }
    }
}

impl<L> Clone for AgentBuilder<L> {
    fn clone(&self) -> Self {
        AgentBuilder {
            broker_url: self.broker_url.clone(),
            agent_key: self.agent_key.clone(),
            pool: self.pool.clone(),
            tags: self.tags.clone(),
            service: self.service.clone(),
            service_version: self.service_version.clone(),
            build: self.build.clone(),
            display_name: self.display_name.clone(),
            queue_capacity: self.queue_capacity,
            reconnect_initial: self.reconnect_initial,
            reconnect_max: self.reconnect_max,
            connect_timeout: self.connect_timeout,
            ca_cert: self.ca_cert.clone(),
            env_error: self.env_error.clone(),
            launch: PhantomData,
        }
    }
}

impl<L> std::fmt::Debug for AgentBuilder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("broker_url", &self.broker_url)
            .field("agent_key", &self.agent_key.as_ref().map(|_| "<redacted>"))
            .field("pool", &self.pool)
            .field("tags", &self.tags)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<L> AgentBuilder<L> {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Broker URL (`ws://host:7070` or `ws://host:7070/agents`). Required.
    pub fn broker_url(mut self, url: impl Into<String>) -> Self {
        self.broker_url = Some(url.into());
        self
    }

    /// Agent key for the pool. Required.
    pub fn agent_key(mut self, key: impl Into<String>) -> Self {
        self.agent_key = Some(key.into());
        self
    }

    /// Pool to register into (default `default`).
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Tags clients can target (default none).
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags = Some(tags.into_iter().map(Into::into).collect());
        self
    }

    /// Service name (default: the executable's name).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Service version (default empty).
    pub fn service_version(mut self, version: impl Into<String>) -> Self {
        self.service_version = Some(version.into());
        self
    }

    /// The build the service runs, usually the git commit it was built from (default:
    /// `PERISCOPE_BUILD`, else the first of the CI variables in [`BUILD_ENV_VARS`]
    /// that is set). A host that knows its commit at compile time passes it here, e.g.
    /// `.build_commit(option_env!("GIT_COMMIT").unwrap_or_default())`.
    pub fn build_commit(mut self, build: impl Into<String>) -> Self {
        self.build = Some(build.into());
        self
    }

    /// Display name (default `service@host#pid`).
    pub fn display_name(mut self, name: impl Into<String>) -> Self {
        self.display_name = Some(name.into());
        self
    }

    /// Outbound queue capacity (default [`AgentConfig::DEFAULT_QUEUE_CAPACITY`]); when
    /// full, new hits are dropped and counted, never blocking the host.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = Some(capacity);
        self
    }

    /// First reconnect delay (default [`AgentConfig::DEFAULT_RECONNECT_INITIAL`]).
    pub fn reconnect_initial(mut self, delay: Duration) -> Self {
        self.reconnect_initial = Some(delay);
        self
    }

    /// Longest reconnect delay (default [`AgentConfig::DEFAULT_RECONNECT_MAX`]).
    pub fn reconnect_max(mut self, delay: Duration) -> Self {
        self.reconnect_max = Some(delay);
        self
    }

    /// Connection attempt timeout (default [`AgentConfig::DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// A PEM file of certificate authorities to trust for a `wss://` broker, beside the
    /// public web roots (default none).
    pub fn ca_cert(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Fills every setting not yet set from its `PERISCOPE_*` environment variable
    /// (see [`AgentConfig::from_env`]).
    pub fn env_defaults(mut self) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if self.broker_url.is_none() {
            self.broker_url = var("PERISCOPE_BROKER_URL");
        }
        if self.agent_key.is_none() {
            self.agent_key = var("PERISCOPE_AGENT_KEY");
        }
        if self.pool.is_none() {
            self.pool = var("PERISCOPE_POOL");
        }
        if self.tags.is_none() {
            self.tags = var("PERISCOPE_TAGS")
                .map(|t| t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect());
        }
        if self.service.is_none() {
            self.service = var("PERISCOPE_SERVICE");
        }
        if self.service_version.is_none() {
            self.service_version = var("PERISCOPE_SERVICE_VERSION");
        }
        if self.build.is_none() {
            self.build = BUILD_ENV_VARS.iter().find_map(|name| var(name));
        }
        if self.display_name.is_none() {
            self.display_name = var("PERISCOPE_DISPLAY_NAME");
        }
        if self.ca_cert.is_none() {
            self.ca_cert = var("PERISCOPE_CA_CERT").map(Into::into);
        }
        if self.queue_capacity.is_none()
            && let Some(v) = var("PERISCOPE_QUEUE_CAPACITY")
        {
            match v.parse() {
                Ok(n) => self.queue_capacity = Some(n),
                Err(_) => {
                    self.env_error = Some(ConfigError::Invalid {
                        setting: "PERISCOPE_QUEUE_CAPACITY",
                        reason: format!("`{v}` is not a whole number"),
                    })
                }
            }
        }
        if self.reconnect_initial.is_none()
            && let Some(v) = var("PERISCOPE_RECONNECT_INITIAL_MS")
        {
            match v.parse() {
                Ok(n) => self.reconnect_initial = Some(Duration::from_millis(n)),
                Err(_) => {
                    self.env_error = Some(ConfigError::Invalid {
                        setting: "PERISCOPE_RECONNECT_INITIAL_MS",
                        reason: format!("`{v}` is not a whole number of milliseconds"),
                    })
                }
            }
        }
        self
    }

    /// The validated configuration, without starting anything.
    pub fn build_config(self) -> Result<AgentConfig, ConfigError> {
        if let Some(err) = self.env_error {
            return Err(err);
        }
        let service = self.service.unwrap_or_else(default_service_name);
        AgentConfig {
            broker_url: self
                .broker_url
                .ok_or(ConfigError::Missing { setting: "broker_url", env: "PERISCOPE_BROKER_URL" })?,
            agent_key: self
                .agent_key
                .ok_or(ConfigError::Missing { setting: "agent_key", env: "PERISCOPE_AGENT_KEY" })?,
            pool: self.pool.unwrap_or_else(|| AgentConfig::DEFAULT_POOL.to_owned()),
            tags: self.tags.unwrap_or_default(),
            service,
            service_version: self.service_version.unwrap_or_default(),
            build: self.build.unwrap_or_default().trim().to_owned(),
            display_name: self.display_name,
            queue_capacity: self.queue_capacity.unwrap_or(AgentConfig::DEFAULT_QUEUE_CAPACITY),
            reconnect_initial: self.reconnect_initial.unwrap_or(AgentConfig::DEFAULT_RECONNECT_INITIAL),
            reconnect_max: self.reconnect_max.unwrap_or(AgentConfig::DEFAULT_RECONNECT_MAX),
            connect_timeout: self.connect_timeout.unwrap_or(AgentConfig::DEFAULT_CONNECT_TIMEOUT),
            ca_cert: self.ca_cert,
        }
        .validate()
    }

    /// Whether a service name was given (in code or the environment); adapters whose
    /// executable name says little (an interpreter) supply a better default.
    pub fn has_service(&self) -> bool {
        self.service.is_some()
    }
}

impl<L: Launch> AgentBuilder<L> {
    /// Validates the configuration and starts the agent's background thread.
    pub fn start(self) -> Result<L::Agent, ConfigError> {
        L::launch(self.build_config()?)
    }
}

fn default_service_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "service".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_are_the_nodes_of_a_cluster_each_with_the_gateway_path() {
        let c = AgentBuilder::<()>::new()
            .broker_url("ws://a:7070, ws://b:7070/agents")
            .agent_key("k")
            .build_config()
            .unwrap();
        assert_eq!(c.broker_urls(), ["ws://a:7070/agents", "ws://b:7070/agents"]);
        assert!(AgentBuilder::<()>::new().broker_url("ws://a, http://b").agent_key("k").build_config().is_err());
    }

    #[test]
    fn a_url_without_a_path_gets_the_gateway_path() {
        let c = AgentBuilder::<()>::new().broker_url("ws://127.0.0.1:7070").agent_key("k").build_config().unwrap();
        assert_eq!(c.broker_url, "ws://127.0.0.1:7070/agents");
        assert_eq!(c.pool, "default");
    }

    #[test]
    fn debug_output_never_shows_the_agent_key() {
        let b = AgentBuilder::<()>::new().broker_url("ws://x").agent_key("pak_secret_value");
        assert!(!format!("{b:?}").contains("pak_secret_value"));
        let c = b.build_config().unwrap();
        assert!(!format!("{c:?}").contains("pak_secret_value"));
    }

    #[test]
    fn a_long_display_name_is_refused_by_name() {
        let err =
            AgentBuilder::<()>::new().broker_url("ws://x").agent_key("k").display_name("n".repeat(200)).build_config();
        assert!(err.unwrap_err().to_string().starts_with("display_name"));
    }

    #[test]
    fn a_missing_key_names_its_environment_variable() {
        let err = AgentBuilder::<()>::new().broker_url("ws://x").build_config().unwrap_err();
        assert!(err.to_string().contains("PERISCOPE_AGENT_KEY"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let base = || AgentBuilder::<()>::new().broker_url("ws://x").agent_key("k");
        assert!(base().broker_url("http://x").build_config().unwrap_err().to_string().contains("ws://"));
        assert!(base().pool("a pool").build_config().unwrap_err().to_string().starts_with("pool"));
        assert!(base().tags(["ok", "not ok"]).build_config().unwrap_err().to_string().contains("not ok"));
        assert!(base().queue_capacity(0).build_config().is_err());
    }
}
