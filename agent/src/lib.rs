//! Periscope's Rust agent: attach it to a service and a Periscope broker can place
//! snapshots on the service's `tracing` callsites, without code changes or redeploys.
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let agent = periscope_agent::Agent::builder()
//!     .broker_url("ws://127.0.0.1:7070")
//!     .agent_key("dev-agent-key")
//!     .pool("shop")
//!     .tags(["env:dev", "region:eu"])
//!     .service("shop")
//!     .start()?;
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(agent.layer())
//!     .init();
//! # Ok(()) }
//! ```
//!
//! Or configure it entirely from `PERISCOPE_*` environment variables with
//! [`Agent::from_env`] (see [`AgentConfig::from_env`] for the list).
//!
//! Every span and event callsite of the service is an inspectable location; the agent
//! publishes them to the broker as they register (the first time their code runs).
//!
//! # Guarantees to the host
//!
//! - Idle cost: with no action installed, callsites the host does not log cost
//!   nothing, and callsites it does log cost about 130 instructions more per event
//!   (under 1% of formatting the line; see `BENCHMARKS.md`).
//! - The host's own logging is unchanged: the agent is a per-layer filter that never
//!   vetoes another layer's events.
//! - Capture never blocks or awaits on the host's thread: hits go into a bounded queue;
//!   when it is full they are dropped and counted (reported in heartbeats).
//! - A missing or slow broker costs the host nothing: the agent's own thread reconnects
//!   with exponential backoff and jitter.
//! - Spans are recorded for the span stack only while a snapshot is live.
//! - Limitations: a global filter installed *in front of* all layers (e.g.
//!   `registry().with(EnvFilter)` as a plain layer) hides callsites from the agent too;
//!   use `fmt::layer().with_filter(EnvFilter)` instead. Levels removed at compile time
//!   (`tracing`'s `max_level_*` features) cannot be inspected.
//!
//! # Layout
//!
//! The runtime-neutral part (broker session, backoff, budgets, redacted expression
//! views, hit queue) is `periscope-agent-core`; this crate is its `tracing` adapter.
//!
//! - [`config`]: [`AgentBuilder`] and [`AgentConfig`] (from the core).
//! - `layer`: the per-layer filter and the capturing layer (the hot path).
//! - `state`: the callsite table, the catalog and the dispatchers.
//! - `capture`: raw captures on the host's thread, protocol hits on the agent's.

pub use periscope_agent_core::config;

mod capture;
pub mod debug_parse;
mod layer;
mod panic;
mod source_hash;
mod state;

use std::sync::Arc;
use std::time::Duration;

use periscope_agent_core::{Core, Running};
use periscope_protocol::AgentId;
use tracing_subscriber::filter::Filtered;

pub use config::{AgentConfig, ConfigError};
pub use layer::{ProbeFilter, ProbeLayer};

use crate::state::Shared;

/// Builds an [`Agent`]: set what you know in code, let the environment fill the rest
/// with [`AgentBuilder::env_defaults`], then [`AgentBuilder::start`].
pub type AgentBuilder = periscope_agent_core::AgentBuilder<Agent>;

/// A running agent. Dropping it (or calling [`Agent::shutdown`]) says goodbye to the
/// broker and stops the agent's thread; the layer it handed out then does nothing.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    running: Running,
}

/// The layer to add to the host's subscriber (see the [crate docs](crate)).
pub type PeriscopeLayer<S> = Filtered<ProbeLayer, ProbeFilter, S>;

impl periscope_agent_core::Launch for Agent {
    type Agent = Agent;
    fn launch(config: AgentConfig) -> Result<Agent, ConfigError> {
        Agent::start(config)
    }
}

impl Agent {
    /// A builder; see [`AgentBuilder`].
    pub fn builder() -> AgentBuilder {
        AgentBuilder::new()
    }

    /// Starts an agent configured only by `PERISCOPE_*` environment variables.
    pub fn from_env() -> Result<Agent, ConfigError> {
        AgentBuilder::new().env_defaults().start()
    }

    /// Starts the agent's thread with a validated configuration.
    pub fn start(config: AgentConfig) -> Result<Agent, ConfigError> {
        let config = config.validate()?;
        let (core, hits_rx) = Core::new(config.queue_capacity);
        let core = Arc::new(core);
        let shared = Arc::new(Shared::new(Arc::clone(&core)));
        let running = periscope_agent_core::start(config, Arc::clone(&shared), core, hits_rx, || {
            layer::IN_AGENT.with(|a| a.set(true));
        })?;
        Ok(Agent { shared, running })
    }

    /// The layer to add to the host's `tracing` subscriber. Can be called more than
    /// once (e.g. for several subscribers); all copies feed this agent.
    pub fn layer<S>(&self) -> PeriscopeLayer<S>
    where
        S: tracing_core::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let (layer, filter) = layer::new(Arc::clone(&self.shared));
        layer.with_filter(filter)
    }

    /// This agent's id, as the broker lists it.
    pub fn id(&self) -> &AgentId {
        self.running.id()
    }

    /// Hits dropped so far because the outbound queue was full.
    pub fn dropped_hits(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let c = &self.shared.core.counters;
        c.dropped_queue_full.load(Ordering::Relaxed) + c.dropped_disconnected.load(Ordering::Relaxed)
    }

    /// Benchmarks only: installs a snapshot at `file:line` directly, with `quotas` and
    /// an optional `condition`, bypassing the broker and its bounds (so a bench can
    /// measure the capture path, or a condition's cost, on an unbounded number of
    /// events). Real deployments receive actions from a broker.
    #[doc(hidden)]
    pub fn install_for_bench(
        &self,
        file: &str,
        line: u32,
        condition: Option<&str>,
        quotas: periscope_protocol::AgentQuotas,
    ) {
        use periscope_agent_core::{Budgets, Installed};
        use periscope_protocol::{ActionId, ActionKind, ActionSpec, CaptureLimits, Location, SnapshotSpec};
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: Location { file: file.into(), line },
            condition: condition.map(str::to_owned),
            expires_at_ms: u64::MAX,
            kind: ActionKind::Snapshot(SnapshotSpec { max_hits: u32::MAX, watch: Vec::new(), backtrace: false }),
            function: None,
            expect: None,
        };
        let installed = Arc::new(Installed::new(spec, &quotas));
        self.shared.core.assume_connected_for_bench();
        self.shared.install(vec![installed], Arc::new(Budgets::new(quotas)), CaptureLimits::default());
        self.shared.rebuild_interest();
    }

    /// Benchmarks only: installs a function probe (a snapshot of whole calls) on the
    /// span `function` (`module::path::name` or a bare name) keeping calls of at least
    /// `min_duration_ms`, bypassing the broker as [`Agent::install_for_bench`] does.
    #[doc(hidden)]
    pub fn install_function_for_bench(
        &self,
        function: &str,
        min_duration_ms: u64,
        quotas: periscope_protocol::AgentQuotas,
    ) {
        use periscope_agent_core::{Budgets, Installed};
        use periscope_protocol::{
            ActionId, ActionKind, ActionSpec, CaptureLimits, FunctionTarget, Location, SnapshotSpec,
        };
        let function = FunctionTarget { min_duration_ms: Some(min_duration_ms), ..FunctionTarget::parse(function) };
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: Location { file: function.to_string(), line: 1 },
            condition: None,
            expires_at_ms: u64::MAX,
            kind: ActionKind::Snapshot(SnapshotSpec { max_hits: u32::MAX, watch: Vec::new(), backtrace: false }),
            function: Some(Box::new(function)),
            expect: None,
        };
        let installed = Arc::new(Installed::new(spec, &quotas));
        self.shared.core.assume_connected_for_bench();
        self.shared.install(vec![installed], Arc::new(Budgets::new(quotas)), CaptureLimits::default());
        self.shared.rebuild_interest();
    }

    /// Installs a live error-capture action directly, without a broker (benchmarks of
    /// what error capture costs while no error happens).
    #[doc(hidden)]
    pub fn install_errors_for_bench(&self, quotas: periscope_protocol::AgentQuotas) {
        use periscope_agent_core::{Budgets, Installed};
        use periscope_protocol::{ActionId, ActionKind, ActionSpec, CaptureLimits, ErrorCaptureSpec};
        let spec = ActionSpec {
            id: ActionId::generate(),
            location: ErrorCaptureSpec::location(),
            condition: None,
            expires_at_ms: u64::MAX,
            kind: ActionKind::CaptureErrors(ErrorCaptureSpec::default()),
            function: None,
            expect: None,
        };
        let installed = Arc::new(Installed::new(spec, &quotas));
        self.shared.core.assume_connected_for_bench();
        self.shared.install(vec![installed], Arc::new(Budgets::new(quotas)), CaptureLimits::default());
        self.shared.rebuild_interest();
    }

    /// Says goodbye to the broker and waits up to `timeout` for the agent thread to end.
    pub fn shutdown(mut self, timeout: Duration) {
        self.running.stop(timeout);
    }
}
