//! The node's estimate of Redis's clock, learned from script replies.
//!
//! Windows in Redis are cut by Redis's `TIME`, never by the node's clock. The node
//! still needs that time in two places: the local shield must know which Redis
//! window a request falls in, and each call carries a deadline in Redis time
//! (`deadline = estimate + timeout`) so that a call the node gave up on counts in
//! no window if Redis runs it late (a paused Redis replaying its backlog).
//!
//! Every reply carries Redis's time. A sample `redis_now − local_now_at_receipt`
//! can only under-estimate the true offset (the reply spent time in flight), so the
//! estimate keeps the largest sample: it lags Redis by at most the fastest reply's
//! one-way latency. A sample more than [`JUMP_US`] below the estimate means Redis's
//! clock went back (or another Redis answers) and replaces it. Until the first
//! reply the node's own clock stands in, and calls carry no deadline.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A sample this far (µs) below the estimate replaces it.
pub const JUMP_US: i64 = 1_000_000;

/// The node's wall clock, Unix ms (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The estimate of Redis's clock.
#[derive(Debug)]
pub struct ClusterClock {
    origin: Instant,
    /// Redis time minus local monotonic time, µs.
    offset_us: AtomicI64,
    synced: AtomicBool,
}

/// The next offset given the current one and a new sample (pure).
pub fn next_offset(current: i64, sample: i64, synced: bool) -> i64 {
    if !synced || sample > current || sample < current.saturating_sub(JUMP_US) {
        sample
    } else {
        current
    }
}

// === impl ClusterClock ===

impl ClusterClock {
    /// Starts on the node's wall clock.
    pub fn new() -> ClusterClock {
        let origin = Instant::now();
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        ClusterClock {
            origin,
            offset_us: AtomicI64::new(wall_us),
            synced: AtomicBool::new(false),
        }
    }

    /// Microseconds on the local monotonic clock.
    pub fn local_us(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// Estimated Redis time, Unix µs.
    pub fn now_us(&self) -> u64 {
        let est = self
            .local_us()
            .saturating_add(self.offset_us.load(Ordering::Relaxed));
        u64::try_from(est).unwrap_or(0)
    }

    /// Estimated Redis time, Unix ms.
    pub fn now_ms(&self) -> u64 {
        self.now_us() / 1_000
    }

    /// The deadline for a call made now that waits `timeout_us`: 0 (none) until the
    /// first reply has synced the clock.
    pub fn deadline_us(&self, timeout_us: u64) -> u64 {
        if self.synced.load(Ordering::Relaxed) {
            self.now_us().saturating_add(timeout_us)
        } else {
            0
        }
    }

    /// Learns from a reply: Redis said `redis_now_us`; it arrived at `local_us`.
    pub fn observe(&self, redis_now_us: u64, local_us: i64) {
        let sample = i64::try_from(redis_now_us)
            .unwrap_or(i64::MAX)
            .saturating_sub(local_us);
        let synced = self.synced.load(Ordering::Relaxed);
        // A lost race only keeps a slightly older sample; the next reply corrects it.
        let current = self.offset_us.load(Ordering::Relaxed);
        let next = next_offset(current, sample, synced);
        if next != current {
            let _ = self.offset_us.compare_exchange(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if !synced {
            self.synced.store(true, Ordering::Relaxed);
        }
    }
}

impl Default for ClusterClock {
    fn default() -> Self {
        ClusterClock::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn offset_keeps_the_tightest_sample() {
        // The first sample always wins, even below the node's clock.
        assert_eq!(next_offset(1_000_000_000, 900_000_000, false), 900_000_000);
        // Then the largest sample is the tightest lower bound.
        assert_eq!(next_offset(100, 150, true), 150);
        assert_eq!(next_offset(150, 120, true), 150);
        // Unless Redis's clock went back by more than JUMP_US.
        assert_eq!(next_offset(5_000_000, 3_000_000, true), 3_000_000);
        assert_eq!(next_offset(5_000_000, 4_000_000, true), 5_000_000);
    }

    #[test]
    fn estimate_follows_redis_not_the_node() {
        let c = ClusterClock::new();
        let wall = unix_ms();
        assert!(c.now_ms().abs_diff(wall) < 1_000);
        assert_eq!(c.deadline_us(20_000), 0);
        // Redis is an hour behind this node.
        let redis_now = (wall - 3_600_000) * 1_000;
        c.observe(redis_now, c.local_us());
        assert!(c.now_ms().abs_diff(wall - 3_600_000) < 1_000);
        let d = c.deadline_us(20_000);
        assert!(d >= redis_now + 20_000 && d < redis_now + 1_020_000, "{d}");
    }
}
