//! This node's request counters: one pingora-limits count-min sketch per window
//! length, aligned to the Unix epoch. No IO, no clock: callers pass `now_ms`.
//!
//! The same counters serve three roles: the whole limiter on a single node; in
//! front of Redis, the shield that refuses a key this node already knows to be over
//! a limit; and the `local_share` fallback while Redis is unavailable.
//!
//! # Error bounds
//! - The sketch only over-estimates: with more active keys than it has slots, a key
//!   can be refused early, never late. [`DEFAULT_SLOTS`] keeps collisions across all
//!   four rows below one in a thousand keys with ten thousand keys active in a window.
//! - Two sketches per window length alternate; the one for the next window is
//!   cleared during the current one, so the turn of a window does not race with
//!   counting. After a whole window with no traffic at all the sketch is cleared on
//!   first use, and requests counted concurrently with that clear may be lost (at
//!   most a few requests at the first instant after an idle window).
//! - [`LocalLimiter::check`] counts first and rolls back a refusal, so concurrent
//!   requests never over-admit; a request that is being rolled back can make a
//!   concurrent one see the window full for an instant (a spurious refusal, never a
//!   spurious admission).

use std::sync::atomic::{AtomicU64, Ordering};

use pingora_limits::estimator::Estimator;

use super::{
    decide, window_reset, window_start, Decision, RequestLimits, Window, WindowState, WindowStates,
    WINDOWS,
};
use crate::config::Tier;

/// Counters per hash row; 4 rows of 65,536 × 8 bytes = 2 MiB per sketch, two
/// sketches per window length in use.
pub const DEFAULT_SLOTS: usize = 65_536;
const HASHES: usize = 4;

/// Epoch-aligned request counters for every window length in use.
pub struct LocalLimiter {
    periods: [Option<Counters>; WINDOWS],
}

/// Two alternating sketches for one window length.
struct Counters {
    period_ms: u64,
    sketches: [Estimator; 2],
    /// Window number + 1 each sketch currently counts (0: not yet used).
    holds: [AtomicU64; 2],
}

// === impl LocalLimiter ===

impl LocalLimiter {
    /// Counters for every window length, `slots` counters per hash row.
    pub fn new(slots: usize) -> LocalLimiter {
        LocalLimiter::with_windows([true; WINDOWS], slots)
    }

    /// Counters only for the window lengths some tier limits, so an unused window
    /// costs no memory.
    pub fn for_tiers<'a>(tiers: impl IntoIterator<Item = &'a Tier>, slots: usize) -> LocalLimiter {
        let mut used = [false; WINDOWS];
        for t in tiers {
            for (w, _) in RequestLimits::from_tier(t).iter() {
                used[w.index()] = true;
            }
        }
        LocalLimiter::with_windows(used, slots)
    }

    fn with_windows(used: [bool; WINDOWS], slots: usize) -> LocalLimiter {
        let slots = slots.max(64);
        LocalLimiter {
            periods: Window::ALL.map(|w| {
                used[w.index()].then(|| Counters {
                    period_ms: w.period_ms(),
                    sketches: [Estimator::new(HASHES, slots), Estimator::new(HASHES, slots)],
                    holds: [AtomicU64::new(0), AtomicU64::new(0)],
                })
            }),
        }
    }

    /// Counts one request of `key` in every limited window, all or nothing, and
    /// decides. `None` when the key has no limit.
    pub fn check(&self, key: &str, limits: &RequestLimits, now_ms: u64) -> Option<Decision> {
        decide(&self.take(key, limits, 1, now_ms))
    }

    /// Adds `cost` to every limited window of `key` unless one would exceed its
    /// limit, in which case nothing stays counted. States report counts after the
    /// request when admitted, without it when refused.
    pub fn take(&self, key: &str, limits: &RequestLimits, cost: u64, now_ms: u64) -> WindowStates {
        let mut states: WindowStates = [None; WINDOWS];
        let mut refused = false;
        let amount = to_isize(cost);
        for (w, limit) in limits.iter() {
            let Some((c, number)) = self.current(w, now_ms) else {
                continue;
            };
            let Some(sketch) = c.sketch(number) else {
                continue;
            };
            let used = to_u64(sketch.incr(key, amount));
            let over = used > limit;
            refused |= over;
            states[w.index()] = Some(WindowState {
                window: w,
                limit,
                used,
                reset: window_reset(now_ms, number * c.period_ms, c.period_ms),
                refused: over,
            });
        }
        if refused {
            for s in states.iter_mut().flatten() {
                if let Some((c, number)) = self.current(s.window, now_ms) {
                    if let Some(sketch) = c.sketch(number) {
                        sketch.decr(key, amount);
                    }
                }
                s.used = s.used.saturating_sub(cost);
            }
        }
        states
    }

    /// The shield: the states of `key`'s windows as this node knows them, if one of
    /// them cannot take `cost` more. Counts nothing.
    pub fn over(
        &self,
        key: &str,
        limits: &RequestLimits,
        cost: u64,
        now_ms: u64,
    ) -> Option<WindowStates> {
        let states = self.peek(key, limits, cost, now_ms);
        states.iter().flatten().any(|s| s.refused).then_some(states)
    }

    /// The states of `key`'s windows without counting (`refused` marks windows that
    /// could not take `cost` more).
    pub fn peek(&self, key: &str, limits: &RequestLimits, cost: u64, now_ms: u64) -> WindowStates {
        let mut states: WindowStates = [None; WINDOWS];
        for (w, limit) in limits.iter() {
            let Some((c, number)) = self.current(w, now_ms) else {
                continue;
            };
            let used = c.sketch(number).map_or(0, |s| to_u64(s.get(key)));
            states[w.index()] = Some(WindowState {
                window: w,
                limit,
                used,
                reset: window_reset(now_ms, number * c.period_ms, c.period_ms),
                refused: used.saturating_add(cost) > limit,
            });
        }
        states
    }

    /// Adds `amount` to `key` in window `w` starting at `start_ms` (what Redis
    /// reported). Ignored when this node has already moved past that window.
    pub fn record(&self, key: &str, w: Window, start_ms: u64, amount: u64) {
        let Some(c) = &self.periods[w.index()] else {
            return;
        };
        if let Some(sketch) = c.sketch(start_ms / c.period_ms) {
            sketch.incr(key, to_isize(amount));
        }
    }

    fn current(&self, w: Window, now_ms: u64) -> Option<(&Counters, u64)> {
        let c = self.periods[w.index()].as_ref()?;
        Some((c, window_start(now_ms, c.period_ms) / c.period_ms))
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::new(DEFAULT_SLOTS)
    }
}

// === impl Counters ===

impl Counters {
    /// The sketch counting window `number`, cleared first if it still holds an
    /// older window; `None` if it already counts a newer one (a late caller).
    /// Also clears the other sketch ahead of the next window.
    fn sketch(&self, number: u64) -> Option<&Estimator> {
        let tag = number + 1;
        let i = (number % 2) as usize;
        let held = self.holds[i].load(Ordering::Acquire);
        if held > tag {
            return None;
        }
        if held < tag
            && self.holds[i]
                .compare_exchange(held, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.sketches[i].reset();
        }
        // Prepare the next window's sketch now, while no one counts in it.
        let next = 1 - i;
        let held_next = self.holds[next].load(Ordering::Acquire);
        if held_next < tag + 1
            && self.holds[next]
                .compare_exchange(held_next, tag + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.sketches[next].reset();
        }
        Some(&self.sketches[i])
    }
}

fn to_isize(n: u64) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// Sketch values are never negative except after an overflow, which reads as full.
fn to_u64(n: isize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const T0: u64 = 1_699_920_000_000; // a whole UTC day (so a whole second, minute, hour)

    fn rpm(n: u64) -> RequestLimits {
        RequestLimits([None, Some(n), None, None])
    }

    #[test]
    fn counts_per_key_and_refuses_over_the_limit() {
        let l = LocalLimiter::new(1024);
        for i in 0..3 {
            let d = l.check("a", &rpm(3), T0 + i).unwrap();
            assert!(
                matches!(d, Decision::Allow(r) if r.remaining == 2 - i),
                "{d:?}"
            );
        }
        let d = l.check("a", &rpm(3), T0 + 10).unwrap();
        let Decision::Deny(info) = d else {
            panic!("{d:?}")
        };
        assert_eq!(info.window, Window::Minute);
        assert_eq!(info.remaining, 0);
        assert_eq!(info.reset.as_millis(), 59_990);
        assert!(matches!(
            l.check("b", &rpm(3), T0),
            Some(Decision::Allow(_))
        ));
        assert_eq!(l.check("c", &RequestLimits::default(), T0), None);
    }

    #[test]
    fn windows_turn_at_epoch_boundaries() {
        let l = LocalLimiter::new(1024);
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 59_999),
            Some(Decision::Allow(_))
        ));
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 59_999),
            Some(Decision::Deny(_))
        ));
        // The next minute starts empty, and the one after (the first sketch again).
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 60_000),
            Some(Decision::Allow(_))
        ));
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 120_000),
            Some(Decision::Allow(_))
        ));
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 120_001),
            Some(Decision::Deny(_))
        ));
        // After idle windows, too.
        assert!(matches!(
            l.check("a", &rpm(1), T0 + 600_000),
            Some(Decision::Allow(_))
        ));
    }

    #[test]
    fn a_refusal_counts_in_no_window() {
        let l = LocalLimiter::new(1024);
        let limits = RequestLimits([Some(100), Some(2), Some(1000), None]);
        for _ in 0..2 {
            assert!(matches!(
                l.check("k", &limits, T0),
                Some(Decision::Allow(_))
            ));
        }
        for _ in 0..5 {
            assert!(
                matches!(l.check("k", &limits, T0), Some(Decision::Deny(i)) if i.window == Window::Minute)
            );
        }
        let s = l.peek("k", &limits, 0, T0);
        assert_eq!(s[0].unwrap().used, 2);
        assert_eq!(s[1].unwrap().used, 2);
        assert_eq!(s[2].unwrap().used, 2);
        // The second turns: still refused by the minute, still counted nowhere.
        assert!(matches!(
            l.check("k", &limits, T0 + 1_000),
            Some(Decision::Deny(_))
        ));
        assert_eq!(l.peek("k", &limits, 0, T0 + 1_000)[0].unwrap().used, 0);
        assert_eq!(l.peek("k", &limits, 0, T0 + 1_000)[2].unwrap().used, 2);
    }

    #[test]
    fn take_reports_counts_without_a_refused_request() {
        let l = LocalLimiter::new(1024);
        let limits = RequestLimits([Some(5), None, None, Some(5)]);
        let s = l.take("k", &limits, 5, T0);
        assert!(s.iter().flatten().all(|s| !s.refused && s.used == 5));
        let s = l.take("k", &limits, 1, T0);
        assert!(
            s.iter().flatten().all(|s| s.refused && s.used == 5),
            "{s:?}"
        );
    }

    #[test]
    fn shield_knows_what_redis_reported() {
        let l = LocalLimiter::new(1024);
        let limits = rpm(10);
        assert!(l.over("k", &limits, 1, T0).is_none());
        // Redis admitted 9 of this node's requests in this minute: one more fits.
        l.record("k", Window::Minute, T0, 9);
        assert!(l.over("k", &limits, 1, T0 + 5).is_none());
        // Redis refused one: the window is full until it ends.
        l.record("k", Window::Minute, T0, 10);
        let s = l.over("k", &limits, 1, T0 + 5).unwrap();
        assert!(s[1].unwrap().refused);
        assert!(l.over("k", &limits, 1, T0 + 60_000).is_none());
        // A late report for a window this node has left is dropped.
        l.record("k", Window::Minute, T0, 10);
        assert!(l.over("k", &limits, 1, T0 + 60_000).is_none());
        // Windows no tier uses are not counted, and do not limit.
        let only_minute = LocalLimiter::for_tiers(
            [&Tier {
                requests_per_minute: Some(1),
                ..Tier::default()
            }],
            1024,
        );
        let s = only_minute.take("k", &RequestLimits([Some(1), Some(1), None, None]), 1, T0);
        assert!(s[0].is_none() && s[1].is_some());
    }

    #[test]
    fn concurrent_requests_never_over_admit() {
        let l = std::sync::Arc::new(LocalLimiter::new(1024));
        let admitted = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, admitted) = (l.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if matches!(l.check("k", &rpm(500), T0), Some(Decision::Allow(_))) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = admitted.load(Ordering::Relaxed);
        assert!(n <= 500 && n > 490, "{n}");
    }
}
