//! Tier limits, decided locally with pingora-limits.
//!
//! Flow: `request_filter` asks [`LocalLimiter::check_requests`] for the key's
//! requests-per-minute decision before reading the body. The limiter counts the
//! request in a pingora-limits [`Rate`] (a count-min sketch over two alternating
//! fixed windows) and the pure [`decide`] turns the window count into an
//! allow/deny [`Decision`] with OpenAI's `x-ratelimit-*` header values.
//!
//! # Error bounds
//! - The sketch only over-estimates: with more active keys than it has slots, a key
//!   can be refused slightly early, never late. The sketch is sized by
//!   `LocalLimiter::new(slots)`; 65,536 slots keep the error at zero for thousands
//!   of active keys (see the pingora notes' accuracy table).
//! - Windows are fixed and anchored to the limiter's first use, not to wall-clock
//!   minutes, so a client can burst up to twice its limit across a window boundary.
//! - Refused requests count too: a client that keeps hammering stays refused until
//!   the window turns, as with OpenAI.

use std::time::Duration;

use pingora_limits::rate::Rate;

/// The values behind the `x-ratelimit-*-requests` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The limit for the window.
    pub limit: u64,
    /// Requests left in the current window.
    pub remaining: u64,
    /// Time until the window resets.
    pub reset: Duration,
}

/// The outcome of a limit check.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow(RateInfo),
    /// Refuse with 429; `RateInfo::reset` is the retry-after.
    Deny(RateInfo),
}

impl Decision {
    /// The header values, whichever way the decision went.
    pub fn info(&self) -> &RateInfo {
        match self {
            Decision::Allow(i) | Decision::Deny(i) => i,
        }
    }
}

/// Pure decision from a window count (this request included).
pub fn decide(count: u64, limit: u64, window: Duration, window_fraction: f64) -> Decision {
    let frac = if window_fraction.is_finite() {
        window_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let reset = window.mul_f64(1.0 - frac);
    let info = RateInfo {
        limit,
        remaining: limit.saturating_sub(count),
        reset,
    };
    if count > limit {
        Decision::Deny(info)
    } else {
        Decision::Allow(info)
    }
}

/// Per-node request limiter.
pub struct LocalLimiter {
    per_minute: Rate,
}

const MINUTE: Duration = Duration::from_secs(60);

impl LocalLimiter {
    /// A limiter whose sketch has `slots` counters per hash row (4 rows).
    pub fn new(slots: usize) -> LocalLimiter {
        LocalLimiter {
            per_minute: Rate::new_with_estimator_config(MINUTE, 4, slots.max(64)),
        }
    }

    /// Counts one request for `key_id` and decides against `limit` per minute.
    /// `None` when the key's tier sets no per-minute limit.
    pub fn check_requests(&self, key_id: &str, limit: Option<u32>) -> Option<Decision> {
        let limit = limit? as u64;
        let count = self.per_minute.observe(&key_id, 1).max(0) as u64;
        let frac = self
            .per_minute
            .rate_with(&key_id, |c| c.current_interval_fraction);
        Some(decide(count, limit, MINUTE, frac))
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::new(65_536)
    }
}

/// Formats a duration the way OpenAI's reset headers do: `6m0s`, `1s`, `20ms`, `1h2m3s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    // Round up to whole seconds: telling a client to come back early only earns a 429.
    let secs = ms.div_ceil(1000) as u64;
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `retry-after` in whole seconds, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn decide_edges() {
        let d = decide(1, 2, MINUTE, 0.5);
        assert_eq!(
            d,
            Decision::Allow(RateInfo {
                limit: 2,
                remaining: 1,
                reset: Duration::from_secs(30)
            })
        );
        assert!(matches!(decide(2, 2, MINUTE, 0.0), Decision::Allow(i) if i.remaining == 0));
        assert!(matches!(decide(3, 2, MINUTE, 0.0), Decision::Deny(i) if i.remaining == 0));
        assert_eq!(decide(1, 1, MINUTE, f64::NAN).info().reset, MINUTE);
        assert_eq!(decide(1, 1, MINUTE, 7.0).info().reset, Duration::ZERO);
    }

    #[test]
    fn limiter_counts_per_key() {
        let l = LocalLimiter::new(1024);
        for i in 0..3 {
            let d = l.check_requests("a", Some(3)).unwrap();
            assert!(matches!(d, Decision::Allow(r) if r.remaining == 2 - i));
        }
        assert!(matches!(
            l.check_requests("a", Some(3)),
            Some(Decision::Deny(_))
        ));
        assert!(matches!(
            l.check_requests("b", Some(3)),
            Some(Decision::Allow(_))
        ));
        assert_eq!(l.check_requests("c", None), None);
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1000)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1001)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(59_001)), 60);
    }
}
