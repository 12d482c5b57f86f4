//! Lock-free budgets used on the application's threads: a GCRA rate limiter for hit
//! rates and a leaky bucket for CPU time.
//!
//! Both are a single `AtomicU64` updated with compare-and-swap, so a hot callsite on
//! many threads pays an uncontended atomic at best and a short CAS loop at worst, and
//! nothing ever blocks. Time is nanoseconds since the agent's start ([`Clock`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Monotonic nanoseconds since the agent started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    /// Unix time (ms) at `epoch`, so a probe reads one clock, not two.
    epoch_unix_ms: u64,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Clock { epoch: Instant::now(), epoch_unix_ms: crate::unix_ms() }
    }

    /// Unix time in milliseconds at clock time `now` (monotonic since the agent
    /// started; a wall-clock step after that does not move it).
    pub fn unix_ms(&self, now: u64) -> u64 {
        self.epoch_unix_ms.saturating_add(now / 1_000_000)
    }

    /// Nanoseconds since the clock was made.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Generic cell rate algorithm: allows `rate` events per second with a burst of
/// `burst` events.
#[derive(Debug)]
pub struct RateLimiter {
    /// Theoretical arrival time of the next conforming event.
    tat: AtomicU64,
    /// Nanoseconds per event.
    interval: u64,
    /// How far ahead of real time `tat` may run.
    tolerance: u64,
}

impl RateLimiter {
    /// `per_second` events with bursts of `burst`.
    pub fn new(per_second: f64, burst: f64) -> Self {
        let per_second = if per_second.is_finite() && per_second > 0.0 { per_second } else { 1e-9 };
        let interval = (1e9 / per_second).clamp(1.0, u64::MAX as f64 / 4.0) as u64;
        let burst = if burst.is_finite() && burst >= 1.0 { burst } else { 1.0 };
        let tolerance = ((burst - 1.0) * interval as f64).min(u64::MAX as f64 / 4.0) as u64;
        RateLimiter { tat: AtomicU64::new(0), interval, tolerance }
    }

    /// Takes `cost` units if they conform; returns false (taking nothing) otherwise.
    pub fn try_take(&self, now: u64, cost: u64) -> bool {
        let increment = self.interval.saturating_mul(cost.max(1));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base.saturating_sub(now) > self.tolerance {
                return false;
            }
            let next = base.saturating_add(increment);
            match self.tat.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => tat = actual,
            }
        }
    }
}

/// A leaky bucket of CPU time: work adds its measured duration, the bucket drains at
/// `fraction` of wall time, and while it holds more than `burst` the budget is spent.
#[derive(Debug)]
pub struct CpuBudget {
    /// Debt expressed as the clock time at which the bucket will be empty.
    empty_at: AtomicU64,
    /// Wall nanoseconds needed to drain one nanosecond of CPU.
    drain_factor: f64,
    /// Debt (in drain time) tolerated before refusing.
    burst_drain: u64,
}

impl CpuBudget {
    /// `fraction` of one core, with `burst` of work allowed at once.
    pub fn new(fraction: f64, burst: Duration) -> Self {
        let fraction = if fraction.is_finite() && fraction > 0.0 { fraction.min(1.0) } else { 0.01 };
        let drain_factor = 1.0 / fraction;
        let burst_drain = (burst.as_nanos() as f64 * drain_factor).min(u64::MAX as f64 / 4.0) as u64;
        CpuBudget { empty_at: AtomicU64::new(0), drain_factor, burst_drain }
    }

    /// Whether work may start now.
    pub fn available(&self, now: u64) -> bool {
        self.empty_at.load(Ordering::Relaxed).saturating_sub(now) <= self.burst_drain
    }

    /// Charges `spent` nanoseconds of work measured around a capture.
    pub fn charge(&self, now: u64, spent: u64) {
        let add = (spent as f64 * self.drain_factor).min(u64::MAX as f64 / 4.0) as u64;
        let mut cur = self.empty_at.load(Ordering::Relaxed);
        loop {
            let next = cur.max(now).saturating_add(add);
            match self.empty_at.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// When, in clock nanoseconds, work may start again.
    pub fn recovers_at(&self, now: u64) -> u64 {
        self.empty_at.load(Ordering::Relaxed).saturating_sub(self.burst_drain).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn the_rate_limiter_allows_the_burst_then_the_rate() {
        let l = RateLimiter::new(1.0, 2.0);
        let t0 = 10 * SEC;
        assert!(l.try_take(t0, 1));
        assert!(l.try_take(t0, 1));
        assert!(!l.try_take(t0, 1));
        assert!(!l.try_take(t0 + SEC / 2, 1));
        assert!(l.try_take(t0 + SEC, 1));
    }

    #[test]
    fn the_cpu_budget_refuses_after_its_burst_and_recovers() {
        // 1% of a core, 1 ms burst: 2 ms of work needs ~100 ms of wall time to drain.
        let b = CpuBudget::new(0.01, Duration::from_millis(1));
        let t0 = SEC;
        assert!(b.available(t0));
        b.charge(t0, 2_000_000);
        assert!(!b.available(t0));
        let back = b.recovers_at(t0);
        assert!(back > t0 && back <= t0 + 200_000_000, "{back}");
        assert!(b.available(back));
    }
}
