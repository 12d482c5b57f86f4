//! Periscope's wire protocol: the messages agents and the broker exchange, the
//! action specifications, the captured-value model with its truncation markers, and the
//! capture limits both sides apply.
//!
//! Every public type here is a compatibility promise between independently deployed
//! agents and brokers: fields are added as optional, unknown fields are ignored, and
//! unknown enum variants decode to an explicit "unsupported" case where that is safe.
//! This crate does no I/O and starts no tasks; it is plain data and pure functions.
//!
//! # Layout
//!
//! - [`ids`]: typed, prefixed identifiers (`agt_`, `act_`, `hit_`, `key_`).
//! - [`limits`]: [`CaptureLimits`], [`AgentQuotas`] and the bounds on actions.
//! - [`value`]: the captured-value model, truncation and byte budgets.
//! - [`action`]: what a client asks agents to do ([`ActionSpec`]) and action states.
//! - [`catalog`]: the inspectable locations an agent publishes.
//! - [`expr`]: the expression language of conditions, watches, log templates and metric
//!   values (parse, check, evaluate; side-effect free by construction).
//! - [`hit`]: what an agent sends when an action fires.
//! - [`telemetry`]: dynamic log lines and metric reports ([`telemetry::Histogram`]).
//! - [`messages`]: [`AgentMessage`], [`BrokerMessage`], framing and protocol errors.

pub mod action;
pub mod blocklist;
pub mod catalog;
pub mod errors;
pub mod expr;
pub mod hit;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod telemetry;
pub mod value;

pub use action::{
    ActionKind, ActionSpec, AgentActionState, CodeExpectation, ErrorCaptureSpec, FunctionTarget, Location,
    LogDestination, LogLevel, LogSpec, MetricKind, MetricSpec, PauseReason, SnapshotSpec,
};
pub use blocklist::{BlockEffect, BlockRule};
pub use catalog::{CatalogEntry, FileLines, FunctionLine, LineSet, LocationKind};
pub use errors::{ErrorCount, ErrorKind, HitError};
pub use expr::{Budget, EvalError, Expr, ParseError, Scope, SimpleScope, Template};
pub use hit::{CallInfo, CallOutcome, Hit, HitLocation, RedactionFinding, SpanFrame, ThreadInfo, WatchResult};
pub use ids::{ActionId, AgentId, HitId, IdError, KeyId};
pub use limits::{AgentQuotas, CaptureLimits, LimitError};
pub use messages::{
    ActionStatusUpdate, AgentMessage, BrokerMessage, CatalogUpdate, Heartbeat, MAX_FRAME_BYTES, PROTOCOL_VERSION,
    ProtocolError, ProtocolErrorBody, ProtocolErrorCode, Registered, Registration, SUPPORTED_VERSIONS,
};
pub use telemetry::{Histogram, LogLine, MetricReport};
pub use value::{Cut, CutReason, Field, List, Map, Object, Text, TruncationSummary, Value};
