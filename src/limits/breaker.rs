//! The circuit breaker in front of Redis: a pure state machine, clock passed in.
//!
//! ```text
//!            `threshold` consecutive failures
//!   Closed ─────────────────────────────────────► Open { until }
//!     ▲                                            │ now ≥ until: one caller probes
//!     │ probe succeeds                             ▼
//!     └─────────────────────────────────────── HalfOpen ──► Open (probe failed)
//! ```
//!
//! While open, calls are short-circuited: no request waits for a Redis that just
//! failed. Only one probe is in flight at a time; if its caller vanishes (the
//! request was dropped mid-call), another probe is allowed after one more
//! cool-down. Any success closes the breaker.

use std::time::{Duration, Instant};

/// Consecutive failures that open the breaker.
pub const DEFAULT_THRESHOLD: u32 = 3;
/// How long the breaker stays open before a probe.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// Circuit breaker state.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// What a caller may do now.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: call Redis.
    Call,
    /// Half-open: call Redis as the one probe; report the outcome.
    Probe,
    /// Open: do not call.
    ShortCircuit,
}

/// A change between healthy and degraded, reported exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open: limits are now decided without Redis.
    Opened,
    /// Back to closed: Redis decides again.
    Closed,
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker opening after `threshold` (at least 1) consecutive failures
    /// and probing `cooldown` after opening.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// May a caller use Redis at `now`?
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Call,
            State::Open { until } if now < until => Admit::ShortCircuit,
            State::HalfOpen { since } if now < since + self.cooldown => Admit::ShortCircuit,
            State::Open { .. } | State::HalfOpen { .. } => {
                self.state = State::HalfOpen { since: now };
                Admit::Probe
            }
        }
    }

    /// Redis answered.
    pub fn on_success(&mut self) -> Option<Transition> {
        self.failures = 0;
        let was_closed = self.state == State::Closed;
        self.state = State::Closed;
        (!was_closed).then_some(Transition::Closed)
    }

    /// Redis failed (error, timeout, or no connection) at `now`.
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < self.threshold {
                    return None;
                }
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                Some(Transition::Opened)
            }
            State::HalfOpen { .. } => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                None
            }
            // Late failures of calls started before opening do not extend it.
            State::Open { .. } => None,
        }
    }

    /// Whether limits are decided without Redis (open or half-open).
    pub fn is_open(&self) -> bool {
        self.state != State::Closed
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new(DEFAULT_THRESHOLD, DEFAULT_COOLDOWN)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOL);
        assert_eq!(b.admit(t0), Admit::Call);
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), None);
        // A success in between resets the count.
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), None);
        assert!(!b.is_open());
        assert_eq!(b.on_failure(t0 + ms(5)), Some(Transition::Opened));
        assert!(b.is_open());
        // Open: short-circuit, and more failures neither re-report nor extend.
        assert_eq!(b.admit(t0 + ms(500)), Admit::ShortCircuit);
        assert_eq!(b.on_failure(t0 + ms(900)), None);
        assert_eq!(b.admit(t0 + ms(1004)), Admit::ShortCircuit);
        assert_eq!(b.admit(t0 + ms(1005)), Admit::Probe);
    }

    #[test]
    fn one_probe_at_a_time_and_it_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        assert_eq!(b.on_failure(t0), Some(Transition::Opened));
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::ShortCircuit);
        assert_eq!(b.admit(t1 + ms(999)), Admit::ShortCircuit);
        // A failed probe re-opens for a full cool-down, silently (still degraded).
        assert_eq!(b.on_failure(t1 + ms(20)), None);
        assert!(b.is_open());
        assert_eq!(b.admit(t1 + ms(1019)), Admit::ShortCircuit);
        assert_eq!(b.admit(t1 + ms(1020)), Admit::Probe);
        // A successful probe closes, once.
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.on_success(), None);
        assert!(!b.is_open());
        assert_eq!(b.admit(t1 + ms(1021)), Admit::Call);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_a_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        let _ = b.on_failure(t0);
        assert_eq!(b.admit(t0 + COOL), Admit::Probe);
        // The probe's caller never reports back.
        assert_eq!(b.admit(t0 + COOL + ms(999)), Admit::ShortCircuit);
        assert_eq!(b.admit(t0 + COOL * 2), Admit::Probe);
    }

    #[test]
    fn threshold_is_at_least_one() {
        let mut b = Breaker::new(0, COOL);
        assert_eq!(b.on_failure(Instant::now()), Some(Transition::Opened));
        assert!(Breaker::default().admit(Instant::now()) == Admit::Call);
    }
}
