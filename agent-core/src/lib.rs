//! The runtime-neutral core of Periscope's language agents.
//!
//! An agent is an adapter for one runtime (a `tracing` layer for Rust, a CPython
//! extension for Python) on top of this core, which holds everything that does not
//! depend on how code is observed: the broker session with registration, sync,
//! heartbeats and reconnects with backoff and jitter ([`connection`]), each installed
//! action's running state and the agent's budgets ([`state`], [`budget`]), the firing
//! logic every action kind shares (conditions, rate limits, hit slots, log budgets,
//! metric aggregates and duration clocks: [`fire`]), the one view of a captured value
//! that expressions read, redacted and cut ([`capture`]), and the bounded hit queue with
//! its drop counters. A fix here serves every language.
//!
//! An adapter implements [`Runtime`] (where actions are installed, what its catalog
//! holds, how a raw capture becomes a protocol hit) and [`fire::Site`] (what a firing
//! location lets expressions read, how it captures), and starts the agent's thread with
//! [`start`].
//!
//! # Layout
//!
//! - [`config`]: [`AgentBuilder`] and [`AgentConfig`], environment variables.
//! - [`state`]: [`Installed`] actions, [`Budgets`], [`Counters`], [`Core`].
//! - [`fire`]: what happens when a location with actions runs.
//! - [`errors`]: capture on error (groups, rates, budget, counts) and [`errors::fire_error`].
//! - [`capture`]: [`RawHit`], [`client_value`], [`client_hit`].
//! - [`guard`]: the code version, file hash and blocklist checks before an action runs.
//! - [`budget`]: lock-free rate and CPU budgets.
//! - `connection`: the agent thread (WebSocket session, sync, backoff).
//! - `tls`: rustls for `wss://` brokers (public roots plus an optional private CA).
//!
//! # Invariants
//!
//! The host's threads never block, await or allocate without bound in anything here;
//! no expression reads a value before redaction; the core never depends on a runtime.

pub mod budget;
pub mod capture;
pub mod config;
mod connection;
pub mod errors;
pub mod fire;
pub mod guard;
pub mod state;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use periscope_protocol::{ActionId, AgentId, CaptureLimits, CatalogEntry, FileLines, Hit, LogLevel};
use tokio::sync::{mpsc, watch};

pub use capture::{RawHit, client_hit, client_value, redaction_limits};
pub use config::{AgentBuilder, AgentConfig, BUILD_ENV_VARS, ConfigError, Launch};
pub use state::{Budgets, Core, Counters, Installed};

/// Who the agent is, beyond its configuration: sent at registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeIdentity {
    /// `rust`, `python`.
    pub language: String,
    /// The runtime and its version (`cpython 3.11.7 (linux x86_64)`).
    pub runtime: String,
    /// The agent library's version.
    pub agent_version: String,
    /// What the agent can do (`snapshot`, `log`, `metric`, `span_stack`, `locals`...).
    pub capabilities: Vec<String>,
}

/// Catalog changes an adapter publishes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogBatch {
    /// Locations, one per callsite.
    pub entries: Vec<CatalogEntry>,
    /// Whole files with their executable lines.
    pub files: Vec<FileLines>,
}

/// What one runtime adapter tells the core. Implemented by the `tracing` layer and by
/// the Python agent; the agent thread calls it, never a host thread.
pub trait Runtime: Send + Sync + 'static {
    /// What a probe captures on the host's thread (see [`RawHit`]).
    type Payload: Send + 'static;

    /// Registration details.
    fn identity(&self) -> RuntimeIdentity;

    /// Installs `actions` (the runnable ones, replacing whatever was installed) under
    /// `budgets` and `limits`. Returns how many locations each action matched, or `None`
    /// when the adapter installs later and reports each action's status itself (through
    /// [`Core::report`]). Runs on a blocking thread: it may take the runtime's locks.
    fn install(
        &self,
        actions: Vec<Arc<Installed>>,
        budgets: Arc<Budgets>,
        limits: CaptureLimits,
    ) -> Option<Vec<(Arc<Installed>, u32)>>;

    /// Catalog changes since the last call (everything when `full`).
    fn catalog(&self, full: bool) -> CatalogBatch;

    /// Turns a raw capture into a protocol hit within `limits` (the core redacts and cuts
    /// it afterwards).
    fn build_hit(&self, raw: &RawHit<Self::Payload>, limits: &CaptureLimits) -> Hit;

    /// Emits a dynamic log line through the host's own logging.
    fn emit_app_log(&self, level: LogLevel, action_id: &ActionId, text: &str);

    /// A broker session began or ended ([`Core::is_connected`] already says so). An
    /// adapter that does work for captures beyond the probed locations themselves (the
    /// Rust layer records every span's fields for span stacks) can stop asking for it
    /// while nothing could be delivered. Runs on a blocking thread, like `install`.
    fn connection_changed(&self, _connected: bool) {}
}

/// A running agent thread. Dropping it (or calling [`Running::stop`]) says goodbye to
/// the broker and stops the thread.
#[derive(Debug)]
pub struct Running {
    id: AgentId,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// This agent's id, as the broker lists it.
    pub fn id(&self) -> &AgentId {
        &self.id
    }

    /// Says goodbye to the broker and waits up to `timeout` for the agent thread to end.
    pub fn stop(&mut self, timeout: Duration) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + timeout;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop(Duration::from_millis(500));
    }
}

/// Starts the agent's thread (a single-threaded tokio runtime of its own) for `runtime`,
/// with a validated `config`. `on_thread_start` runs first on that thread (an adapter
/// marks the thread as its own, so it never captures itself).
pub fn start<R: Runtime>(
    config: AgentConfig,
    runtime: Arc<R>,
    core: Arc<Core<R::Payload>>,
    hits_rx: mpsc::Receiver<Box<RawHit<R::Payload>>>,
    on_thread_start: fn(),
) -> Result<Running, ConfigError> {
    let config = config.validate()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let id = AgentId::generate();
    let runner = connection::Runner::new(config, id.clone(), runtime, core, hits_rx, shutdown_rx);
    let thread = std::thread::Builder::new()
        .name("periscope-agent".into())
        .spawn(move || {
            on_thread_start();
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(target: "periscope_agent", error = %e, "periscope agent could not start its runtime");
                    return;
                }
            };
            runtime.block_on(runner.run());
        })
        .map_err(|e| ConfigError::Invalid { setting: "thread", reason: format!("cannot spawn the agent thread: {e}") })?;
    Ok(Running { id, shutdown: shutdown_tx, thread: Some(thread) })
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
