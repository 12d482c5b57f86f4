//! Quotas the broker enforces, whatever callers and agents do: the part of "nobody can
//! bypass a quota" that lives on this side of the wire.
//!
//! - Per caller (per API key): calls per minute (every REST request and every MCP
//!   message counts; tool calls report `quota_exceeded` as a tool result), concurrent
//!   waits (blocking `place_snapshot` calls and long polls), MCP sessions, and live
//!   actions (counted by the engine). Defaults come from `[callers]`, per-role
//!   overrides from `[callers.<role>]`, per-key overrides from the key
//!   ([`CallerQuotaOverrides`]).
//! - Per organization ([`OrgQuotas`], `[org_quotas]`): a ceiling above every key's own
//!   quotas for the same four, so minting keys never multiplies what an organization
//!   may do. A call is charged to its key first, then to its organization (a key over
//!   its own budget never spends its organization's); waits and sessions take both
//!   slots under one lock or neither.
//! - Per agent, in the gateway: hits and bytes per second accepted ([`AgentIngest`]);
//!   excess frames are dropped and counted, the agent is warned, and an agent that
//!   keeps flooding is disconnected and kept out for a cool-down.
//! - Per action, in the engine: snapshot hits per second per agent (the agent enforces
//!   the same rate; the broker checks again) and log lines and bytes per second.
//!
//! Every limit is a GCRA from the `governor` crate. Each has a floor and a ceiling in
//! configuration (a 0 or an absurd value is a configuration error): there is no value,
//! role, parameter or header that switches a quota off.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultDirectRateLimiter, Quota};
use serde::{Deserialize, Serialize};

use crate::access::Role;
use crate::error::{ApiError, ErrorCode};

/// Whom a call, a wait or a session is charged to: a key of an organization, with its
/// quotas (an authenticated [`crate::auth::Principal`]).
pub trait Charged {
    /// The key's id.
    fn key_id(&self) -> &str;
    /// Its organization.
    fn org(&self) -> &str;
    /// Its quotas.
    fn quotas(&self) -> CallerQuotas;
}

/// One GCRA: `per_second` cells per second with a burst of `burst` cells.
pub struct Rate {
    limiter: DefaultDirectRateLimiter<StateInformationMiddleware>,
    clock: DefaultClock,
    burst: u32,
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rate").field("burst", &self.burst).finish_non_exhaustive()
    }
}

impl Rate {
    /// A rate of `per_second` cells (any positive number; nonsense becomes one cell per
    /// hour rather than unlimited) with a burst of `burst` cells (at least 1).
    pub fn per_second(per_second: f64, burst: f64) -> Rate {
        let per_second = if per_second.is_finite() && per_second > 0.0 { per_second } else { 1.0 / 3_600.0 };
        let period = Duration::from_secs_f64((1.0 / per_second).min(86_400.0)).max(Duration::from_nanos(1));
        let burst = if burst.is_finite() { burst.clamp(1.0, f64::from(u32::MAX)) as u32 } else { 1 };
        Self::with_period(period, burst)
    }

    /// `per_minute` cells per minute with a burst of `burst`.
    pub fn per_minute(per_minute: u32, burst: u32) -> Rate {
        let period = Duration::from_secs(60) / per_minute.max(1);
        Self::with_period(period.max(Duration::from_nanos(1)), burst)
    }

    fn with_period(period: Duration, burst: u32) -> Rate {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX)).allow_burst(burst);
        let clock = DefaultClock::default();
        let limiter = governor::RateLimiter::direct_with_clock(quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Rate { limiter, clock, burst: burst.get() }
    }

    /// Takes `n` cells: `Ok(cells left in the burst)`, or `Err(how long until they
    /// would fit)`. More cells than the burst never fit (`Err(Duration::MAX)`).
    pub fn take(&self, n: u32) -> Result<u32, Duration> {
        let Some(n) = NonZeroU32::new(n) else { return Ok(self.burst) };
        match self.limiter.check_n(n) {
            Ok(Ok(snapshot)) => Ok(snapshot.remaining_burst_capacity()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            Err(_) => Err(Duration::MAX),
        }
    }

    /// The burst size.
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

/// Whole seconds to wait, for `retry_after_seconds` and `Retry-After` (at least 1).
pub fn retry_secs(wait: Duration) -> u64 {
    if wait == Duration::MAX { 3_600 } else { wait.as_secs() + u64::from(wait.subsec_nanos() > 0) }.max(1)
}

/// What one API key may do, resolved from the defaults, its role and the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallerQuotas {
    /// REST requests and MCP messages per minute.
    pub calls_per_minute: u32,
    /// Calls allowed at once above the steady rate.
    pub call_burst: u32,
    /// Blocking calls (waiting `place_snapshot`, long polls) at once.
    pub concurrent_waits: u32,
    /// Live actions at once.
    pub live_actions: u32,
    /// MCP sessions open at once.
    pub mcp_sessions: u32,
}

impl Default for CallerQuotas {
    fn default() -> Self {
        CallerQuotas {
            calls_per_minute: DEFAULT_CALLS_PER_MINUTE,
            call_burst: DEFAULT_CALL_BURST,
            concurrent_waits: DEFAULT_CONCURRENT_WAITS,
            live_actions: DEFAULT_LIVE_ACTIONS,
            mcp_sessions: DEFAULT_MCP_SESSIONS,
        }
    }
}

/// Calls per minute per caller (GitHub allows ~83/min per user; an assistant loops
/// faster than a person).
pub const DEFAULT_CALLS_PER_MINUTE: u32 = 120;
/// Burst of calls per caller.
pub const DEFAULT_CALL_BURST: u32 = 30;
/// Blocking calls per caller at once.
pub const DEFAULT_CONCURRENT_WAITS: u32 = 4;
/// Live actions per caller (keeps one runaway assistant from filling every agent).
pub const DEFAULT_LIVE_ACTIONS: u32 = 20;
/// MCP sessions per caller open at once (an assistant opens one per conversation).
pub const DEFAULT_MCP_SESSIONS: u32 = 16;

/// Allowed ranges of the caller quotas: a quota can be tightened or loosened, never
/// switched off.
pub const CALLER_BOUNDS: [(&str, u32, u32); 5] = [
    ("calls_per_minute", 1, 60_000),
    ("call_burst", 1, 10_000),
    ("concurrent_waits", 1, 1_000),
    ("live_actions", 1, 1_000),
    ("mcp_sessions", 1, 10_000),
];

/// Per-role or per-key overrides of [`CallerQuotas`]; absent fields inherit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallerQuotaOverrides {
    /// Overrides `calls_per_minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_per_minute: Option<u32>,
    /// Overrides `call_burst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_burst: Option<u32>,
    /// Overrides `concurrent_waits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent_waits: Option<u32>,
    /// Overrides `live_actions`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_actions: Option<u32>,
    /// Overrides `mcp_sessions`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_sessions: Option<u32>,
}

impl CallerQuotaOverrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: CallerQuotas) -> CallerQuotas {
        CallerQuotas {
            calls_per_minute: self.calls_per_minute.unwrap_or(base.calls_per_minute),
            call_burst: self.call_burst.unwrap_or(base.call_burst),
            concurrent_waits: self.concurrent_waits.unwrap_or(base.concurrent_waits),
            live_actions: self.live_actions.unwrap_or(base.live_actions),
            mcp_sessions: self.mcp_sessions.unwrap_or(base.mcp_sessions),
        }
    }

    /// Checks every value given is within [`CALLER_BOUNDS`]; the error names the field
    /// (under `prefix`) and the range.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let values =
            [self.calls_per_minute, self.call_burst, self.concurrent_waits, self.live_actions, self.mcp_sessions];
        for ((name, min, max), value) in CALLER_BOUNDS.iter().zip(values) {
            if let Some(v) = value
                && !(*min..=*max).contains(&v)
            {
                return Err((
                    format!("{prefix}{name}"),
                    format!("{v} is outside {min}..={max} (quotas can be changed, not switched off)"),
                ));
            }
        }
        Ok(())
    }
}

/// `[callers]`: the caller quotas, with per-role overrides in `[callers.<role>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallerSettings {
    /// Calls per minute per key (default 120).
    pub calls_per_minute: u32,
    /// Burst of calls per key (default 30).
    pub call_burst: u32,
    /// Blocking calls at once per key (default 4).
    pub concurrent_waits: u32,
    /// Live actions per key (default 20).
    pub live_actions: u32,
    /// MCP sessions open at once per key (default 16).
    pub mcp_sessions: u32,
    /// Overrides for `developer` keys.
    pub developer: CallerQuotaOverrides,
    /// Overrides for `group_admin` keys.
    pub group_admin: CallerQuotaOverrides,
    /// Overrides for `company_admin` keys.
    pub company_admin: CallerQuotaOverrides,
}

impl Default for CallerSettings {
    fn default() -> Self {
        let d = CallerQuotas::default();
        CallerSettings {
            calls_per_minute: d.calls_per_minute,
            call_burst: d.call_burst,
            concurrent_waits: d.concurrent_waits,
            live_actions: d.live_actions,
            mcp_sessions: d.mcp_sessions,
            developer: CallerQuotaOverrides::default(),
            group_admin: CallerQuotaOverrides::default(),
            company_admin: CallerQuotaOverrides::default(),
        }
    }
}

impl CallerSettings {
    /// The quotas of a key of `role`, with the key's own overrides.
    pub fn resolve(&self, role: Role, key: Option<&CallerQuotaOverrides>) -> CallerQuotas {
        let base = CallerQuotas {
            calls_per_minute: self.calls_per_minute,
            call_burst: self.call_burst,
            concurrent_waits: self.concurrent_waits,
            live_actions: self.live_actions,
            mcp_sessions: self.mcp_sessions,
        };
        let by_role = match role {
            Role::Developer => &self.developer,
            Role::GroupAdmin => &self.group_admin,
            Role::CompanyAdmin => &self.company_admin,
        };
        let q = by_role.apply(base);
        key.map_or(q, |k| k.apply(q))
    }

    /// Checks every value; the error names the key (`callers.…`) and the range.
    pub fn validate(&self) -> Result<(), (String, String)> {
        CallerQuotaOverrides {
            calls_per_minute: Some(self.calls_per_minute),
            call_burst: Some(self.call_burst),
            concurrent_waits: Some(self.concurrent_waits),
            live_actions: Some(self.live_actions),
            mcp_sessions: Some(self.mcp_sessions),
        }
        .validate("callers.")?;
        self.developer.validate("callers.developer.")?;
        self.group_admin.validate("callers.group_admin.")?;
        self.company_admin.validate("callers.company_admin.")
    }
}

/// `[org_quotas]`: ceilings per organization above every key's own quotas. However many
/// keys an organization mints, together they never exceed these. A value left out is ten
/// times the per-key quota of `[callers]` ([`OrgQuotas::resolve`]), so raising a key's
/// quota never makes a configuration invalid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrgQuotas {
    /// Calls per minute, all keys of the organization together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_per_minute: Option<u32>,
    /// Burst of calls, all keys together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_burst: Option<u32>,
    /// Blocking calls at once, all keys together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent_waits: Option<u32>,
    /// Live actions at once, all keys together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_actions: Option<u32>,
    /// MCP sessions open at once, all keys together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_sessions: Option<u32>,
}

/// The organization ceilings in force (every value resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OrgCeilings {
    /// Calls per minute, all keys together.
    pub calls_per_minute: u32,
    /// Burst of calls, all keys together.
    pub call_burst: u32,
    /// Blocking calls at once, all keys together.
    pub concurrent_waits: u32,
    /// Live actions at once, all keys together.
    pub live_actions: u32,
    /// MCP sessions open at once, all keys together.
    pub mcp_sessions: u32,
}

impl Default for OrgCeilings {
    fn default() -> Self {
        OrgQuotas::default().resolve(&CallerSettings::default())
    }
}

/// Allowed ranges of the organization ceilings.
pub const ORG_BOUNDS: [(&str, u32, u32); 5] = [
    ("calls_per_minute", 1, 600_000),
    ("call_burst", 1, 100_000),
    ("concurrent_waits", 1, 100_000),
    ("live_actions", 1, 100_000),
    ("mcp_sessions", 1, 100_000),
];

/// What a ceiling left out is, in multiples of the per-key quota.
pub const ORG_DEFAULT_FACTOR: u32 = 10;

fn per_key(callers: &CallerSettings) -> [u32; 5] {
    [callers.calls_per_minute, callers.call_burst, callers.concurrent_waits, callers.live_actions, callers.mcp_sessions]
}

impl OrgQuotas {
    fn values(&self) -> [Option<u32>; 5] {
        [self.calls_per_minute, self.call_burst, self.concurrent_waits, self.live_actions, self.mcp_sessions]
    }

    /// The ceilings in force: each value given, or ten times the per-key quota (within
    /// the bounds).
    pub fn resolve(&self, callers: &CallerSettings) -> OrgCeilings {
        let mut v = [0u32; 5];
        for (i, ((given, key), (_, _, max))) in
            self.values().into_iter().zip(per_key(callers)).zip(ORG_BOUNDS).enumerate()
        {
            v[i] = given.unwrap_or_else(|| key.saturating_mul(ORG_DEFAULT_FACTOR).min(max));
        }
        OrgCeilings {
            calls_per_minute: v[0],
            call_burst: v[1],
            concurrent_waits: v[2],
            live_actions: v[3],
            mcp_sessions: v[4],
        }
    }

    /// Checks every value given is within [`ORG_BOUNDS`] and at least the per-key quota
    /// of `[callers]` (a ceiling sits above what one key may do); the error names the
    /// key (`org_quotas.…`).
    pub fn validate(&self, callers: &CallerSettings) -> Result<(), (String, String)> {
        for (((name, min, max), v), key) in ORG_BOUNDS.iter().zip(self.values()).zip(per_key(callers)) {
            let Some(v) = v else { continue };
            if !(*min..=*max).contains(&v) {
                return Err((
                    format!("org_quotas.{name}"),
                    format!("{v} is outside {min}..={max} (quotas can be changed, not switched off)"),
                ));
            }
            if v < key {
                return Err((
                    format!("org_quotas.{name}"),
                    format!(
                        "{v} is below callers.{name} ({key}): the organization's ceiling must sit above one key's quota"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `[ingest]`: what the broker accepts from each agent and for each action, whatever the
/// agent does. The defaults sit above what an honest agent sends under its own budgets
/// (25 snapshot hits/s, 50 log lines/s and 20 KiB/s), so only a broken or hostile
/// agent meets them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Snapshot hits per second accepted from one agent.
    pub agent_hits_per_sec: f64,
    /// Bytes per second accepted from one agent (every frame counts).
    pub agent_bytes_per_sec: u64,
    /// Bursts allowed, as a multiple of one second's budget.
    pub burst_factor: f64,
    /// Snapshot hits per second accepted for one action from one agent (the agent's own
    /// limit is `quotas.snapshot_hits_per_sec_per_action`).
    pub action_hits_per_sec: f64,
    /// Log lines per second accepted for one log action (all agents together).
    pub action_log_lines_per_sec: f64,
    /// Log bytes per second accepted for one log action (all agents together).
    pub action_log_bytes_per_sec: u64,
    /// Warnings an agent gets (at most one per second) while its frames are dropped,
    /// before it is disconnected.
    pub flood_warnings: u32,
    /// How long an agent disconnected for flooding (and its agent key, under any agent
    /// id) is refused when it comes back.
    pub flood_cooldown_secs: u64,
    /// Snapshot hits per second accepted from all agents of one agent key together.
    pub key_hits_per_sec: f64,
    /// Bytes per second accepted from all agents of one agent key together.
    pub key_bytes_per_sec: u64,
    /// Snapshot hits per second accepted from all agents of one organization together.
    pub org_hits_per_sec: f64,
    /// Bytes per second accepted from all agents of one organization together.
    pub org_bytes_per_sec: u64,
    /// Agent keys of one organization cooling down at once that make the whole
    /// organization's new registrations wait the cool-down too.
    pub org_flood_keys: u32,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            agent_hits_per_sec: 50.0,
            agent_bytes_per_sec: 2 * 1024 * 1024,
            burst_factor: 2.0,
            action_hits_per_sec: 1.0,
            action_log_lines_per_sec: 100.0,
            action_log_bytes_per_sec: 40 * 1024,
            flood_warnings: 3,
            flood_cooldown_secs: 30,
            key_hits_per_sec: 1_000.0,
            key_bytes_per_sec: 32 * 1024 * 1024,
            org_hits_per_sec: 5_000.0,
            org_bytes_per_sec: 128 * 1024 * 1024,
            org_flood_keys: 3,
        }
    }
}

impl IngestSettings {
    /// Checks every value; the error names the key (`ingest.…`) and the range.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let frame = periscope_protocol::MAX_FRAME_BYTES as f64;
        let line = periscope_protocol::telemetry::MAX_LOG_LINE_BYTES as f64;
        for (key, v, min, max) in [
            ("ingest.agent_hits_per_sec", self.agent_hits_per_sec, 0.01, 100_000.0),
            ("ingest.agent_bytes_per_sec", self.agent_bytes_per_sec as f64, 1_024.0, 1024.0 * 1024.0 * 1024.0),
            ("ingest.burst_factor", self.burst_factor, 1.0, 100.0),
            ("ingest.action_hits_per_sec", self.action_hits_per_sec, 0.01, 10_000.0),
            ("ingest.action_log_lines_per_sec", self.action_log_lines_per_sec, 0.01, 1_000_000.0),
            ("ingest.action_log_bytes_per_sec", self.action_log_bytes_per_sec as f64, 64.0, 1024.0 * 1024.0 * 1024.0),
            ("ingest.flood_warnings", f64::from(self.flood_warnings), 1.0, 1_000.0),
            ("ingest.flood_cooldown_secs", self.flood_cooldown_secs as f64, 1.0, 86_400.0),
            ("ingest.key_hits_per_sec", self.key_hits_per_sec, 0.01, 1_000_000.0),
            ("ingest.key_bytes_per_sec", self.key_bytes_per_sec as f64, 1_024.0, 64.0 * 1024.0 * 1024.0 * 1024.0),
            ("ingest.org_hits_per_sec", self.org_hits_per_sec, 0.01, 10_000_000.0),
            ("ingest.org_bytes_per_sec", self.org_bytes_per_sec as f64, 1_024.0, 1024.0 * 1024.0 * 1024.0 * 1024.0),
            ("ingest.org_flood_keys", f64::from(self.org_flood_keys), 1.0, 100_000.0),
        ] {
            if !(v.is_finite() && v >= min && v <= max) {
                return Err((
                    key.into(),
                    format!("{v} is outside {min}..={max} (quotas can be changed, not switched off)"),
                ));
            }
        }
        if (self.agent_bytes_per_sec as f64) * self.burst_factor < frame {
            return Err((
                "ingest.agent_bytes_per_sec".into(),
                format!(
                    "{} B/s with burst_factor {} cannot take one {frame} B frame; raise one of them",
                    self.agent_bytes_per_sec, self.burst_factor
                ),
            ));
        }
        // Wider budgets sit above narrower ones: an agent's budget fits in its key's, a
        // key's in its organization's.
        for (key, wide, narrow, narrow_key) in [
            ("ingest.key_hits_per_sec", self.key_hits_per_sec, self.agent_hits_per_sec, "ingest.agent_hits_per_sec"),
            (
                "ingest.key_bytes_per_sec",
                self.key_bytes_per_sec as f64,
                self.agent_bytes_per_sec as f64,
                "ingest.agent_bytes_per_sec",
            ),
            ("ingest.org_hits_per_sec", self.org_hits_per_sec, self.key_hits_per_sec, "ingest.key_hits_per_sec"),
            (
                "ingest.org_bytes_per_sec",
                self.org_bytes_per_sec as f64,
                self.key_bytes_per_sec as f64,
                "ingest.key_bytes_per_sec",
            ),
        ] {
            if wide < narrow {
                return Err((key.into(), format!("{wide} is below {narrow_key} ({narrow}); it must sit above it")));
            }
        }
        if (self.action_log_bytes_per_sec as f64) * self.burst_factor < line {
            return Err((
                "ingest.action_log_bytes_per_sec".into(),
                format!("with burst_factor {} it cannot take one {line} B log line", self.burst_factor),
            ));
        }
        Ok(())
    }

    /// The per-agent hit limiter.
    pub fn agent_hits(&self) -> Rate {
        Rate::per_second(self.agent_hits_per_sec, self.agent_hits_per_sec * self.burst_factor)
    }

    /// The per-agent byte limiter.
    pub fn agent_bytes(&self) -> Rate {
        let rate = self.agent_bytes_per_sec as f64;
        Rate::per_second(rate, rate * self.burst_factor)
    }

    /// A per-action, per-agent snapshot hit limiter (a burst of at least 2 absorbs
    /// network jitter between hits an honest agent spaced out).
    pub fn action_hits(&self) -> Rate {
        Rate::per_second(self.action_hits_per_sec, (self.action_hits_per_sec * self.burst_factor).max(2.0))
    }

    /// A per-action log line limiter.
    pub fn action_lines(&self) -> Rate {
        Rate::per_second(self.action_log_lines_per_sec, self.action_log_lines_per_sec * self.burst_factor)
    }

    /// A per-action log byte limiter.
    pub fn action_log_bytes(&self) -> Rate {
        let rate = self.action_log_bytes_per_sec as f64;
        Rate::per_second(rate, rate * self.burst_factor)
    }
}

/// A caller's budget after a call was charged, for `system_health` and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CallBudget {
    /// Calls per minute allowed.
    pub limit_per_minute: u32,
    /// Burst allowed.
    pub burst: u32,
    /// Calls that may still be made right now.
    pub remaining: u32,
}

/// Open MCP sessions, counted per key and per organization.
type Sessions = Arc<Mutex<usize>>;

/// The per-caller limits: calls per minute and blocking calls at once, per key and per
/// organization, charged to a [`Budgets`] (this process's memory on a single node, Redis
/// in a cluster, where a key's budget is one whichever node it calls); MCP sessions,
/// which only a single node keeps, counted here.
#[derive(Debug)]
pub struct CallerLimits {
    org_quotas: OrgCeilings,
    budgets: Arc<dyn Budgets>,
    /// Charged instead while `budgets` cannot be reached (a cluster node cut off from
    /// Redis holds its callers to its own share of the budget meanwhile).
    fallback: Arc<LocalBudgets>,
    sessions: DashMap<String, Sessions>,
    org_sessions: DashMap<String, Sessions>,
    next_slot: std::sync::atomic::AtomicU64,
}

impl Default for CallerLimits {
    fn default() -> Self {
        CallerLimits::new(OrgCeilings::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whose slots a refused wait would have taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// The key's.
    Key,
    /// The organization's.
    Org,
}

/// A wait refused: whose limit, how many are held, when the soonest ends (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Whose limit.
    pub whose: Whose,
    /// Slots held now.
    pub held: usize,
    /// When the soonest of them ends (Unix ms).
    pub soonest_ms: Option<u64>,
}

/// Where callers' budgets are kept: GCRAs by name and sets of timed slots. Every
/// operation is atomic (concurrent callers on any node cannot both take the last cell or
/// slot).
pub trait Budgets: Send + Sync + std::fmt::Debug {
    /// Takes one cell of the GCRA `name` (`per_minute` cells a minute, `burst` at once):
    /// the cells left in the burst, or how long until one fits.
    fn take(
        &self,
        name: String,
        per_minute: u32,
        burst: u32,
    ) -> crate::backend::BackendFuture<'_, Result<u32, Duration>>;
    /// Takes one cell of each GCRA in `cells` (`(name, per_minute, burst)`), in order,
    /// stopping at the first one that is spent (those before it stay taken, as they
    /// would have with one [`Budgets::take`] after another): the cells left in each, or
    /// which one was spent and how long until a cell fits. A shared backend does it in
    /// one round trip.
    fn take_all(
        &self,
        cells: Vec<(String, u32, u32)>,
    ) -> crate::backend::BackendFuture<'_, Result<Vec<u32>, (usize, Duration)>> {
        use futures_util::FutureExt as _;
        async move {
            let mut left = Vec::with_capacity(cells.len());
            for (i, (name, per_minute, burst)) in cells.into_iter().enumerate() {
                match self.take(name, per_minute, burst).await? {
                    Ok(n) => left.push(n),
                    Err(wait) => return Ok(Err((i, wait))),
                }
            }
            Ok(Ok(left))
        }
        .boxed()
    }
    /// Takes slot `id` (until `deadline_ms`) in set `key` (at most `key_limit`) and set
    /// `org` (at most `org_limit`), both or neither; slots past their deadline (plus a
    /// grace) no longer count.
    fn hold(
        &self,
        key: String,
        key_limit: usize,
        org: String,
        org_limit: usize,
        id: String,
        deadline_ms: u64,
    ) -> crate::backend::BackendFuture<'_, Result<(), Full>>;
    /// Gives a slot back.
    fn release(&self, key: String, org: String, id: String) -> crate::backend::BackendFuture<'_, ()>;
    /// Slots held in set `name`.
    fn held(&self, name: String) -> crate::backend::BackendFuture<'_, usize>;
    /// Forgets what is kept for keys `keep` rejects (housekeeping; idle state only).
    fn retain(&self, keep: &dyn Fn(&str) -> bool);
}

/// How long past its deadline a slot still counts (a call that overran by a little).
const SLOT_GRACE_MS: u64 = 5_000;

/// The single-node [`Budgets`]: `governor` GCRAs and slot lists in memory.
#[derive(Debug, Default)]
pub struct LocalBudgets {
    rates: DashMap<String, Arc<(u32, u32, Rate)>>,
    slots: Mutex<std::collections::HashMap<String, Vec<(String, u64)>>>,
}

fn ready<'a, T: Send + 'a>(v: T) -> crate::backend::BackendFuture<'a, T> {
    use futures_util::FutureExt as _;
    std::future::ready(Ok(v)).boxed()
}

impl Budgets for LocalBudgets {
    fn take(
        &self,
        name: String,
        per_minute: u32,
        burst: u32,
    ) -> crate::backend::BackendFuture<'_, Result<u32, Duration>> {
        let rate = match self.rates.get(&name) {
            Some(r) if r.0 == per_minute && r.1 == burst => Arc::clone(&r),
            // New, or its quotas changed: a fresh rate.
            _ => {
                let r = Arc::new((per_minute, burst, Rate::per_minute(per_minute, burst)));
                self.rates.insert(name, Arc::clone(&r));
                r
            }
        };
        ready(rate.2.take(1))
    }

    fn hold(
        &self,
        key: String,
        key_limit: usize,
        org: String,
        org_limit: usize,
        id: String,
        deadline_ms: u64,
    ) -> crate::backend::BackendFuture<'_, Result<(), Full>> {
        let now = crate::time::now_ms();
        let mut slots = lock(&self.slots);
        let mut check = |name: &str, limit: usize, whose: Whose| -> Result<(), Full> {
            let list = slots.entry(name.to_owned()).or_default();
            list.retain(|(_, d)| d + SLOT_GRACE_MS > now);
            if list.len() >= limit {
                return Err(Full { whose, held: list.len(), soonest_ms: list.iter().map(|(_, d)| *d).min() });
            }
            Ok(())
        };
        if let Err(full) = check(&key, key_limit, Whose::Key).and_then(|()| check(&org, org_limit, Whose::Org)) {
            return ready(Err(full));
        }
        for name in [&key, &org] {
            slots.entry(name.clone()).or_default().push((id.clone(), deadline_ms));
        }
        ready(Ok(()))
    }

    fn release(&self, key: String, org: String, id: String) -> crate::backend::BackendFuture<'_, ()> {
        let mut slots = lock(&self.slots);
        for name in [key, org] {
            if let Some(list) = slots.get_mut(&name) {
                list.retain(|(s, _)| *s != id);
                if list.is_empty() {
                    slots.remove(&name);
                }
            }
        }
        ready(())
    }

    fn held(&self, name: String) -> crate::backend::BackendFuture<'_, usize> {
        let now = crate::time::now_ms();
        let slots = lock(&self.slots);
        ready(slots.get(&name).map_or(0, |l| l.iter().filter(|(_, d)| d + SLOT_GRACE_MS > now).count()))
    }

    fn retain(&self, keep: &dyn Fn(&str) -> bool) {
        self.rates.retain(|name, _| name.rsplit_once(':').is_none_or(|(_, k)| keep(k)) || name.starts_with("org:"));
    }
}

impl CallerLimits {
    /// Limits under these organization ceilings, in this process's memory.
    pub fn new(org_quotas: OrgCeilings) -> Self {
        Self::with_budgets(org_quotas, Arc::new(LocalBudgets::default()))
    }

    /// Limits under these organization ceilings, charged to `budgets`.
    pub fn with_budgets(org_quotas: OrgCeilings, budgets: Arc<dyn Budgets>) -> Self {
        CallerLimits {
            org_quotas,
            budgets,
            fallback: Arc::default(),
            sessions: DashMap::new(),
            org_sessions: DashMap::new(),
            next_slot: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The organization ceilings in force.
    pub fn org_quotas(&self) -> OrgCeilings {
        self.org_quotas
    }

    async fn take_all(&self, cells: Vec<(String, u32, u32)>) -> Result<Result<Vec<u32>, (usize, Duration)>, ApiError> {
        match self.budgets.take_all(cells.clone()).await {
            Err(crate::backend::BackendError::Unavailable(_)) => Ok(self.fallback.take_all(cells).await?),
            other => Ok(other?),
        }
    }

    /// Charges one call to the caller's key, then to its organization; `quota_exceeded`
    /// (with when to retry) when either budget is spent. The key is charged first, so a
    /// key over its own budget never spends its organization's.
    pub async fn charge_call(&self, caller: &impl Charged) -> Result<CallBudget, ApiError> {
        let quotas = caller.quotas();
        let q = self.org_quotas;
        let cells = vec![
            (format!("call:key:{}", caller.key_id()), quotas.calls_per_minute, quotas.call_burst),
            (format!("call:org:{}", caller.org()), q.calls_per_minute, q.call_burst),
        ];
        match self.take_all(cells).await? {
            Ok(left) => Ok(CallBudget {
                limit_per_minute: quotas.calls_per_minute,
                burst: quotas.call_burst,
                remaining: left.iter().copied().min().unwrap_or(0),
            }),
            Err((0, wait)) => {
                let retry = retry_secs(wait);
                Err(ApiError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this key made more than its {} calls per minute (burst {}); retry in {retry} s",
                        quotas.calls_per_minute, quotas.call_burst
                    ),
                )
                .with_details(serde_json::json!({
                    "quota": "calls_per_minute",
                    "limit": quotas.calls_per_minute,
                    "burst": quotas.call_burst,
                    "retry_after_seconds": retry,
                })))
            }
            Err((_, wait)) => {
                let retry = retry_secs(wait);
                Err(ApiError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "your organization's keys together made more than its {} calls per minute (burst {}, \
                         org_quotas.calls_per_minute); retry in {retry} s",
                        q.calls_per_minute, q.call_burst
                    ),
                )
                .with_details(serde_json::json!({
                    "quota": "org_calls_per_minute",
                    "limit": q.calls_per_minute,
                    "burst": q.call_burst,
                    "retry_after_seconds": retry,
                })))
            }
        }
    }

    /// Starts a blocking call that may last until `deadline`; `quota_exceeded` when the
    /// key already has `concurrent_waits` of them, or its organization has its ceiling
    /// (retry when the soonest one ends). Both slots are taken together or neither. The
    /// slots are freed when the returned guard drops.
    pub async fn begin_wait(
        &self,
        caller: &impl Charged,
        deadline: tokio::time::Instant,
    ) -> Result<WaitSlot, ApiError> {
        let quotas = caller.quotas();
        let now = crate::time::now_ms();
        let deadline_ms = now + deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64;
        let id =
            format!("{}-{}", std::process::id(), self.next_slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let (key, org) = (format!("wait:key:{}", caller.key_id()), format!("wait:org:{}", caller.org()));
        let (limit, org_limit) = (quotas.concurrent_waits as usize, self.org_quotas.concurrent_waits as usize);
        let mut budgets = Arc::clone(&self.budgets);
        let mut held = budgets.hold(key.clone(), limit, org.clone(), org_limit, id.clone(), deadline_ms).await;
        if let Err(crate::backend::BackendError::Unavailable(_)) = held {
            budgets = self.fallback.clone();
            held = budgets.hold(key.clone(), limit, org.clone(), org_limit, id.clone(), deadline_ms).await;
        }
        match held? {
            Ok(()) => Ok(WaitSlot { budgets, key, org, id }),
            Err(full) => {
                let (limit, quota, whose) = match full.whose {
                    Whose::Key => (limit, "concurrent_waits", "this key"),
                    Whose::Org => (org_limit, "org_concurrent_waits", "your organization"),
                };
                let retry = retry_secs(Duration::from_millis(full.soonest_ms.unwrap_or(now).saturating_sub(now)));
                Err(ApiError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{whose} already has {} blocking calls in progress (the limit is {limit}); call with \
                         wait=false (or wait_seconds=0) and poll, or retry in {retry} s when one ends",
                        full.held
                    ),
                )
                .with_details(serde_json::json!({ "quota": quota, "limit": limit, "retry_after_seconds": retry })))
            }
        }
    }

    /// Opens an MCP session for the caller; `quota_exceeded` when its key already has
    /// `mcp_sessions` open, or its organization has its ceiling. The slots are freed
    /// when the returned guard drops (the session ended or expired).
    pub fn begin_session(&self, caller: &impl Charged) -> Result<SessionSlot, ApiError> {
        let quotas = caller.quotas();
        let key = Arc::clone(&self.sessions.entry(caller.key_id().to_owned()).or_default());
        let org = Arc::clone(&self.org_sessions.entry(caller.org().to_owned()).or_default());
        let mut org_open = lock(&org);
        let mut open = lock(&key);
        let refusal = |n: usize, limit: u32, quota: &str, whose: &str| {
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "{whose} already has {n} MCP sessions open (the limit is {limit}); end one (HTTP DELETE with its \
                     Mcp-Session-Id) or let an idle one expire; every tool also works without a session"
                ),
            )
            .with_details(serde_json::json!({ "quota": quota, "limit": limit, "retry_after_seconds": 60 }))
        };
        if *open >= quotas.mcp_sessions as usize {
            return Err(refusal(*open, quotas.mcp_sessions, "mcp_sessions", "this key"));
        }
        if *org_open >= self.org_quotas.mcp_sessions as usize {
            return Err(refusal(*org_open, self.org_quotas.mcp_sessions, "org_mcp_sessions", "your organization"));
        }
        *open += 1;
        *org_open += 1;
        drop((open, org_open));
        Ok(SessionSlot { key, org })
    }

    /// Blocking calls `key_id` has in progress.
    pub async fn waits_in_use(&self, key_id: &str) -> usize {
        self.budgets.held(format!("wait:key:{key_id}")).await.unwrap_or(0)
    }

    /// Blocking calls an organization has in progress.
    pub async fn org_waits_in_use(&self, org: &str) -> usize {
        self.budgets.held(format!("wait:org:{org}")).await.unwrap_or(0)
    }

    /// MCP sessions `key_id` has open.
    pub fn sessions_open(&self, key_id: &str) -> usize {
        self.sessions.get(key_id).map_or(0, |s| *lock(&s))
    }

    /// Forgets callers whose keys no longer authenticate (unless they still hold slots).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.budgets.retain(&keep);
        self.sessions.retain(|k, s| keep(k) || *lock(s) > 0);
    }
}

/// A blocking call's slots (its key's and its organization's); dropping it frees them.
#[derive(Debug)]
pub struct WaitSlot {
    budgets: Arc<dyn Budgets>,
    key: String,
    org: String,
    id: String,
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        use futures_util::FutureExt as _;
        let budgets = Arc::clone(&self.budgets);
        let (key, org, id) =
            (std::mem::take(&mut self.key), std::mem::take(&mut self.org), std::mem::take(&mut self.id));
        let mut release = Box::pin(async move {
            let _ = budgets.release(key, org, id).await;
        });
        // In memory it is done at once; elsewhere it finishes on the runtime (and a slot
        // that could not be given back ends with its deadline anyway).
        if (&mut release).now_or_never().is_none()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(release);
        }
    }
}

/// An MCP session's slots (its key's and its organization's); dropping it frees them.
#[derive(Debug)]
pub struct SessionSlot {
    key: Sessions,
    org: Sessions,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut org = lock(&self.org);
        *org = org.saturating_sub(1);
        drop(org);
        let mut key = lock(&self.key);
        *key = key.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_allows_its_burst_then_says_when_to_retry() {
        let r = Rate::per_second(1.0, 2.0);
        assert_eq!(r.take(1), Ok(1));
        assert_eq!(r.take(1), Ok(0));
        let wait = r.take(1).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(r.take(3), Err(Duration::MAX), "more than the burst never fits");
        assert_eq!(retry_secs(Duration::from_millis(1_200)), 2);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }

    fn caller(key: &str, org: &str, quotas: CallerQuotas) -> crate::auth::Principal {
        crate::auth::Principal {
            key_id: key.into(),
            name: key.into(),
            role: Role::Developer,
            scopes: crate::access::Scope::DEFAULT.to_vec(),
            reach: crate::access::Reach::org(org),
            quotas,
            tenancy: Arc::default(),
            via: None,
        }
    }

    #[tokio::test]
    async fn calls_beyond_the_burst_are_quota_exceeded_with_a_retry_time() {
        let limits = CallerLimits::default();
        let q = CallerQuotas { calls_per_minute: 60, call_burst: 2, ..CallerQuotas::default() };
        let a = caller("key_a", "default", q);
        assert_eq!(limits.charge_call(&a).await.unwrap().remaining, 1);
        limits.charge_call(&a).await.unwrap();
        let err = limits.charge_call(&a).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert_eq!(err.details["retry_after_seconds"], 1);
        assert!(limits.charge_call(&caller("key_b", "default", q)).await.is_ok(), "keys have their own budgets");
    }

    #[tokio::test]
    async fn minted_keys_share_their_organizations_call_ceiling_and_other_organizations_do_not_notice() {
        let limits = CallerLimits::new(OrgCeilings { calls_per_minute: 60, call_burst: 3, ..OrgCeilings::default() });
        let q = CallerQuotas { calls_per_minute: 60, call_burst: 2, ..CallerQuotas::default() };
        limits.charge_call(&caller("key_a", "acme", q)).await.unwrap();
        limits.charge_call(&caller("key_b", "acme", q)).await.unwrap();
        limits.charge_call(&caller("key_c", "acme", q)).await.unwrap();
        let err = limits.charge_call(&caller("key_d", "acme", q)).await.unwrap_err();
        assert_eq!(err.details["quota"], "org_calls_per_minute", "{err:?}");
        assert!(err.details["retry_after_seconds"].as_u64().unwrap() >= 1);
        assert!(limits.charge_call(&caller("key_e", "other", q)).await.is_ok());
        // A key over its own budget does not spend its organization's.
        let solo = CallerLimits::new(OrgCeilings { calls_per_minute: 60, call_burst: 3, ..OrgCeilings::default() });
        let small = CallerQuotas { calls_per_minute: 60, call_burst: 1, ..CallerQuotas::default() };
        solo.charge_call(&caller("key_a", "acme", small)).await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                solo.charge_call(&caller("key_a", "acme", small)).await.unwrap_err().details["quota"],
                "calls_per_minute"
            );
        }
        solo.charge_call(&caller("key_b", "acme", q)).await.unwrap();
        solo.charge_call(&caller("key_b", "acme", q)).await.unwrap();
    }

    #[tokio::test]
    async fn waits_beyond_the_limit_are_refused_until_one_ends() {
        let limits = CallerLimits::default();
        let q = CallerQuotas { concurrent_waits: 1, ..CallerQuotas::default() };
        let a = caller("key_a", "default", q);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let slot = limits.begin_wait(&a, deadline).await.unwrap();
        let err = limits.begin_wait(&a, deadline).await.unwrap_err();
        assert_eq!(err.details["quota"], "concurrent_waits");
        assert!(err.details["retry_after_seconds"].as_u64().unwrap() >= 29);
        drop(slot);
        assert_eq!(limits.waits_in_use("key_a").await, 0);
        assert!(limits.begin_wait(&a, deadline).await.is_ok());
    }

    #[tokio::test]
    async fn waits_and_sessions_of_many_keys_stop_at_the_organizations_ceiling() {
        let limits = CallerLimits::new(OrgCeilings { concurrent_waits: 2, mcp_sessions: 2, ..OrgCeilings::default() });
        let q = CallerQuotas::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let w1 = limits.begin_wait(&caller("key_a", "acme", q), deadline).await.unwrap();
        let _w2 = limits.begin_wait(&caller("key_b", "acme", q), deadline).await.unwrap();
        let err = limits.begin_wait(&caller("key_c", "acme", q), deadline).await.unwrap_err();
        assert_eq!(err.details["quota"], "org_concurrent_waits");
        assert_eq!(limits.waits_in_use("key_c").await, 0, "a refused wait holds no slot of its key");
        drop(w1);
        assert_eq!(limits.org_waits_in_use("acme").await, 1);
        assert!(limits.begin_wait(&caller("key_c", "acme", q), deadline).await.is_ok());

        let s1 = limits.begin_session(&caller("key_a", "acme", q)).unwrap();
        let _s2 = limits.begin_session(&caller("key_b", "acme", q)).unwrap();
        assert_eq!(limits.begin_session(&caller("key_c", "acme", q)).unwrap_err().details["quota"], "org_mcp_sessions");
        assert!(limits.begin_session(&caller("key_c", "other", q)).is_ok());
        drop(s1);
        assert_eq!(limits.sessions_open("key_a"), 0);
        assert!(limits.begin_session(&caller("key_c", "acme", q)).is_ok());
        let one = CallerQuotas { mcp_sessions: 1, ..q };
        let _mine = limits.begin_session(&caller("key_z", "third", one)).unwrap();
        assert_eq!(limits.begin_session(&caller("key_z", "third", one)).unwrap_err().details["quota"], "mcp_sessions");
    }

    #[test]
    fn zero_and_absurd_quotas_are_configuration_errors() {
        let mut c = CallerSettings { calls_per_minute: 0, ..CallerSettings::default() };
        assert_eq!(c.validate().unwrap_err().0, "callers.calls_per_minute");
        c.calls_per_minute = 120;
        c.developer.concurrent_waits = Some(1_000_000);
        assert_eq!(c.validate().unwrap_err().0, "callers.developer.concurrent_waits");
        let i = IngestSettings { agent_hits_per_sec: f64::INFINITY, ..IngestSettings::default() };
        assert_eq!(i.validate().unwrap_err().0, "ingest.agent_hits_per_sec");
        IngestSettings::default().validate().unwrap();
        let callers = CallerSettings::default();
        OrgQuotas::default().validate(&callers).unwrap();
        let low = OrgQuotas { live_actions: Some(5), ..OrgQuotas::default() };
        assert_eq!(low.validate(&callers).unwrap_err().0, "org_quotas.live_actions");
        let zero = OrgQuotas { calls_per_minute: Some(0), ..OrgQuotas::default() };
        assert_eq!(zero.validate(&callers).unwrap_err().0, "org_quotas.calls_per_minute");
        // Left out, a ceiling follows the per-key quota: raising that never breaks a file.
        let busy = CallerSettings { calls_per_minute: 5_000, ..CallerSettings::default() };
        OrgQuotas::default().validate(&busy).unwrap();
        assert_eq!(OrgQuotas::default().resolve(&busy).calls_per_minute, 50_000);
        assert_eq!(OrgCeilings::default().live_actions, 200);
    }
}
