//! Tier limits (requests, tokens, spend, concurrency): the pure math ([`policy`],
//! window decisions), the per-node counters, and the cluster-wide limiter in Redis
//! behind one facade, [`Limiter`].
//!
//! # Flow
//! `request_filter` computes the key's effective [`Policy`] (tier ⊕ key overrides)
//! and calls [`Limiter::admit`] once per proxied request: before the body is read
//! when only request windows and concurrency are limited, after it (the reservation
//! needs the exact prompt count) when a token or spend limit is set. Admission
//! reserves in every limit at once, all or nothing, and returns a [`Ticket`];
//! `logging` hands it to [`Limiter::settle`], which adjusts each window by
//! `actual − reserved` while that window is still current and releases the
//! concurrency slot.
//!
//! # The bound
//! A request is admitted only if every window can take its whole reservation, so
//! reservations alone never pass a limit. Settlement can top a window up after the
//! fact (a provider that reports more than was reserved, e.g. a completion longer
//! than `default_max_tokens` when the request named no `max_tokens`): the settled
//! total exceeds a limit by at most the top-ups (`actual − reserved` > 0) of the
//! requests in flight when the last request was admitted; later requests are
//! refused until the window has room. With `max_tokens` honoured and the exact
//! prompt count, top-ups are zero and the limit holds exactly.
//!
//! - **No `redis:` section** ([`Limiter::Local`]): [`LocalLimiter`] counts the request in
//!   every window of the key, all or nothing, and [`decide`] turns the window states
//!   into an allow/deny [`Decision`].
//! - **With Redis** ([`Limiter::Redis`], see [`redis`]): the local counters first act as
//!   a shield (a key this node knows to be over a limit is refused with no round trip);
//!   then one Lua script call (`lua/windows.lua`) checks and counts every window
//!   atomically in Redis, with Redis's clock. When Redis cannot answer within
//!   `redis.timeout_ms`, or the circuit breaker ([`breaker`]) is open, the decision
//!   follows `redis.on_failure` and is marked degraded.
//!
//! # Windows
//! Fixed windows aligned to the Unix epoch (a minute window starts at every whole
//! UTC minute), so every node and Redis agree on where a window starts. A client
//! can therefore send up to twice a limit across one window boundary, as with any
//! fixed window. A refused request counts in no window (all or nothing), so a
//! client that keeps retrying is admitted again as soon as the window turns.
//!
//! # Headers
//! `x-ratelimit-{limit,remaining,reset}-requests` report one binding window: for an
//! admitted request the one with the least remaining (ties → the shortest period);
//! for a refusal the refused window that resets last (ties → the shortest period),
//! so `retry-after` never sends a client back before it can succeed.

pub mod breaker;
pub mod clock;
pub mod local;
pub mod policy;
pub mod redis;
pub mod script;

use std::sync::Arc;
use std::time::Duration;

pub use local::LocalLimiter;
pub use policy::{Amounts, Limit, Outcome, Policy, StreamAllowance, Verdict};

use policy::{judge, settle_delta, ConcurrencyState, LimitStates, LIMITS};

use crate::config::{Config, Tier};

/// A fixed request window, aligned to the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// `requests_per_second`.
    Second,
    /// `requests_per_minute`.
    Minute,
    /// `requests_per_hour`.
    Hour,
    /// `requests_per_day` (UTC days).
    Day,
}

/// Number of request windows.
pub const WINDOWS: usize = 4;

impl Window {
    /// Every window, shortest first (the index order of [`RequestLimits`]).
    pub const ALL: [Window; WINDOWS] = [Window::Second, Window::Minute, Window::Hour, Window::Day];

    /// Length in milliseconds.
    pub const fn period_ms(self) -> u64 {
        match self {
            Window::Second => 1_000,
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
        }
    }

    /// Position in [`Window::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Window::Second => 0,
            Window::Minute => 1,
            Window::Hour => 2,
            Window::Day => 3,
        }
    }

    /// The config key, also the `limit` label of `ai4free_rate_limited_total`.
    pub const fn limit_name(self) -> &'static str {
        match self {
            Window::Second => "requests_per_second",
            Window::Minute => "requests_per_minute",
            Window::Hour => "requests_per_hour",
            Window::Day => "requests_per_day",
        }
    }

    /// The limit in words, for the 429 message.
    pub const fn describe(self) -> &'static str {
        match self {
            Window::Second => "requests per second",
            Window::Minute => "requests per minute",
            Window::Hour => "requests per hour",
            Window::Day => "requests per day",
        }
    }

    /// The period as it appears in Redis key names (`1s`, `1m`, `1h`, `1d`).
    pub const fn key_suffix(self) -> &'static str {
        match self {
            Window::Second => "1s",
            Window::Minute => "1m",
            Window::Hour => "1h",
            Window::Day => "1d",
        }
    }
}

/// Start (Unix ms) of the window of length `period_ms` that contains `now_ms`.
pub const fn window_start(now_ms: u64, period_ms: u64) -> u64 {
    now_ms - now_ms % period_ms
}

/// Time from `now_ms` until the window that started at `start_ms` ends.
pub fn window_reset(now_ms: u64, start_ms: u64, period_ms: u64) -> Duration {
    Duration::from_millis((start_ms + period_ms).saturating_sub(now_ms))
}

/// A key's request limits, one per window (`None` = unlimited), in [`Window::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestLimits(pub [Option<u64>; WINDOWS]);

impl RequestLimits {
    /// The tier's `requests_per_*` limits.
    pub fn from_tier(t: &Tier) -> RequestLimits {
        let l = |v: Option<u32>| v.map(u64::from);
        RequestLimits([
            l(t.requests_per_second),
            l(t.requests_per_minute),
            l(t.requests_per_hour),
            l(t.requests_per_day),
        ])
    }

    /// The limit of window `w`.
    pub fn get(&self, w: Window) -> Option<u64> {
        self.0[w.index()]
    }

    /// Whether no window is limited.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// How many windows are limited.
    pub fn len(&self) -> usize {
        self.0.iter().flatten().count()
    }

    /// The limited windows and their limits, shortest window first.
    pub fn iter(&self) -> impl Iterator<Item = (Window, u64)> + Clone + '_ {
        Window::ALL
            .iter()
            .zip(self.0.iter())
            .filter_map(|(w, l)| l.map(|l| (*w, l)))
    }

    /// Each node's share when `nodes` nodes split the limits without coordination:
    /// `ceil(limit / nodes)`, at least 1, so the cluster total stays within
    /// `limit + nodes - 1` and no key is locked out entirely.
    pub fn shared(&self, nodes: u32) -> RequestLimits {
        let nodes = u64::from(nodes.max(1));
        RequestLimits(self.0.map(|l| l.map(|l| l.div_ceil(nodes).max(1))))
    }
}

/// One window's state after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Which window.
    pub window: Window,
    /// Its limit.
    pub limit: u64,
    /// Requests counted in the current window (this one included when admitted).
    pub used: u64,
    /// Time until the window resets.
    pub reset: Duration,
    /// This window refused the request.
    pub refused: bool,
}

/// Window states indexed by [`Window::index`]; `None` for unlimited windows.
pub type WindowStates = [Option<WindowState>; WINDOWS];

/// The values behind the `x-ratelimit-*-requests` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The binding window.
    pub window: Window,
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
    /// Refuse with 429, naming `RateInfo::window`; `RateInfo::reset` is the retry-after.
    Deny(RateInfo),
    /// Refuse with 503: Redis is unavailable and `on_failure: deny`.
    Unavailable,
}

impl Decision {
    /// The header values, whichever way the decision went (none when unavailable).
    pub fn info(&self) -> Option<&RateInfo> {
        match self {
            Decision::Allow(i) | Decision::Deny(i) => Some(i),
            Decision::Unavailable => None,
        }
    }
}

/// What [`Limiter::check`] found.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// `None` when the key has no request limit.
    pub decision: Option<Decision>,
    /// Decided without Redis (or Redis is unavailable): the response says so.
    pub degraded: bool,
}

/// Pure decision over a key's window states; `None` when no window is limited.
pub fn decide(states: &WindowStates) -> Option<Decision> {
    let info = |s: &WindowState| RateInfo {
        window: s.window,
        limit: s.limit,
        remaining: s.limit.saturating_sub(s.used),
        reset: s.reset,
    };
    // States are shortest window first, so keeping the first of equals is the
    // "ties → shortest period" rule.
    let mut refused: Option<&WindowState> = None;
    let mut tightest: Option<&WindowState> = None;
    for s in states.iter().flatten() {
        if s.refused && refused.is_none_or(|r| s.reset > r.reset) {
            refused = Some(s);
        }
        let remaining = s.limit.saturating_sub(s.used);
        if tightest.is_none_or(|t| remaining < t.limit.saturating_sub(t.used)) {
            tightest = Some(s);
        }
    }
    match (refused, tightest) {
        (Some(r), _) => Some(Decision::Deny(info(r))),
        (None, Some(t)) => Some(Decision::Allow(info(t))),
        (None, None) => None,
    }
}

/// What admission reserved, kept in the request's context until the response
/// ends: [`Limiter::settle`] adjusts exactly the windows it was counted in.
/// Dropping it unsettled keeps the reservation and releases the concurrency slot.
pub struct Ticket {
    key_id: String,
    reserved: Amounts,
    /// Per limit: the start of the window the reservation was counted in.
    starts: [Option<u64>; LIMITS],
    counted: Counted,
    lease: Option<Lease>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("reserved", &self.reserved)
            .field("counted", &self.counted)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// What was reserved.
    pub fn reserved(&self) -> &Amounts {
        &self.reserved
    }
}

/// Where a reservation was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// In this node's counters (no Redis, or `on_failure: local_share`).
    Local,
    /// In Redis.
    Redis,
}

/// A held concurrency slot; released when dropped.
enum Lease {
    /// This node's in-flight counter.
    Local(#[allow(dead_code)] pingora_limits::inflight::Guard),
    /// A lease in Redis, renewed by this node while held.
    Redis(redis::LeaseGuard),
}

/// The result of [`Limiter::admit`].
#[must_use]
pub struct Admission {
    /// Allow or why not, and the header values.
    pub verdict: Verdict,
    /// Decided without Redis (or Redis is unavailable).
    pub degraded: bool,
    /// Present when admitted with something to settle or release.
    pub ticket: Option<Ticket>,
    /// Each limit's state (for callers that report request windows the old way).
    pub states: LimitStates,
}

impl Admission {
    /// Nothing is limited.
    pub fn none(degraded: bool) -> Admission {
        Admission {
            verdict: Verdict::NONE,
            degraded,
            ticket: None,
            states: [None; LIMITS],
        }
    }
}

/// `(limit, start, actual − reserved)` for every window a reservation was counted
/// in whose amount changes.
fn settle_deltas(
    starts: &[Option<u64>; LIMITS],
    reserved: &Amounts,
    actual: &Amounts,
) -> [Option<(Limit, u64, i64)>; LIMITS] {
    Limit::ALL.map(|l| {
        let start = starts[l.index()]?;
        let delta = settle_delta(reserved.get(l), actual.get(l));
        (delta != 0).then_some((l, start, delta))
    })
}

/// Admission against this node's counters: a concurrency slot first (cheap, and
/// a refusal then reserves nothing), then every window, all or nothing.
fn admit_locally(
    local: &LocalLimiter,
    key_id: &str,
    policy: &Policy,
    amounts: &Amounts,
    now_ms: u64,
) -> Admission {
    let mut lease = None;
    if let Some(max) = policy.max_concurrent {
        let max = u64::from(max);
        let (guard, in_flight) = local.acquire(key_id, max);
        match guard {
            Some(g) => lease = Some(Lease::Local(g)),
            None => {
                let states = local.peek_all(key_id, policy, &Amounts::default(), now_ms);
                return Admission {
                    verdict: judge(
                        &states,
                        Some(ConcurrencyState {
                            value: max,
                            in_flight,
                            refused: true,
                        }),
                    ),
                    degraded: false,
                    ticket: None,
                    states,
                };
            }
        }
    }
    let states = local.reserve(key_id, policy, amounts, now_ms);
    let verdict = judge(&states, None);
    // Request windows settle at what they reserved (1): with nothing else to
    // settle or release, the fast path allocates no ticket.
    let ticket = (verdict.allowed() && (policy.needs_body() || lease.is_some())).then(|| Ticket {
        key_id: key_id.to_owned(),
        reserved: *amounts,
        starts: states.map(|s| s.map(|s| s.start)),
        counted: Counted::Local,
        lease,
    });
    Admission {
        verdict,
        degraded: false,
        ticket,
        states,
    }
}

/// The gateway's limiter: local counters only, or Redis with local fallbacks.
// One per process, behind an Arc: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Limiter {
    /// Single node: every limit enforced by this node's counters.
    Local {
        /// The counters.
        counters: LocalLimiter,
        /// Wall time at start plus monotonic time since: windows never run
        /// backwards when the system clock is stepped.
        clock: clock::ClusterClock,
    },
    /// Cluster-wide limits in Redis.
    Redis(redis::RedisLimiter),
}

impl Limiter {
    /// The limiter `config` asks for. With Redis this returns at once (after at most
    /// a short wait for the first connection); a Redis that is down only makes the
    /// limiter start degraded. Fails only on a URL the client cannot use.
    pub fn from_config(config: &Config) -> Result<Arc<Limiter>, redis::StartError> {
        let local = LocalLimiter::for_tiers(config.tiers.values(), local::DEFAULT_SLOTS);
        Ok(Arc::new(match &config.redis {
            None => Limiter::Local {
                counters: local,
                clock: clock::ClusterClock::new(),
            },
            Some(settings) => Limiter::Redis(redis::RedisLimiter::start(settings, local)?),
        }))
    }

    /// Checks (and, when admitted, counts) one request of `key_id` against `limits`.
    /// Waits at most `redis.timeout_ms`; never logs per request.
    pub async fn check(&self, key_id: &str, limits: &RequestLimits) -> Checked {
        match self {
            Limiter::Local { counters, clock } => Checked {
                decision: counters.check(key_id, limits, clock.now_ms()),
                degraded: false,
            },
            Limiter::Redis(r) => r.check(key_id, limits).await,
        }
    }

    /// Reserves `amounts` in every limit of `policy` for `key_id` (and a
    /// concurrency slot named `member`), all or nothing. Waits at most
    /// `redis.timeout_ms`; never logs per request.
    pub async fn admit(
        &self,
        key_id: &str,
        policy: &Policy,
        amounts: &Amounts,
        member: &str,
    ) -> Admission {
        match self {
            Limiter::Local { counters, clock } => {
                if policy.is_empty() {
                    return Admission::none(false);
                }
                admit_locally(counters, key_id, policy, amounts, clock.now_ms())
            }
            Limiter::Redis(r) => r.admit(key_id, policy, amounts, member).await,
        }
    }

    /// The header values of `key_id`'s limits, counting nothing: for a request
    /// refused before admission (its reservation alone exceeds a limit), whose
    /// 400 still carries `x-ratelimit-*`. With Redis this is one script call
    /// reserving zero in every window (no concurrency slot); `None` when Redis
    /// cannot answer and `on_failure: deny`.
    pub async fn peek(&self, key_id: &str, policy: &Policy) -> Option<Verdict> {
        let policy = Policy {
            max_concurrent: None,
            ..*policy
        };
        let nothing = Amounts::default();
        let a = match self {
            Limiter::Local { counters, clock } => {
                let states = counters.peek_all(key_id, &policy, &nothing, clock.now_ms());
                return Some(judge(&states, None));
            }
            // A zero reservation leaves every count as it was, and its ticket
            // (no lease) settles nothing when dropped.
            Limiter::Redis(r) => r.admit(key_id, &policy, &nothing, "").await,
        };
        (a.verdict.outcome != Outcome::Unavailable).then_some(a.verdict)
    }

    /// Adjusts a reservation to what the request used (`actual`), and releases
    /// its concurrency slot. Never blocks: Redis settlements run on the limiter's
    /// own thread.
    pub fn settle(&self, ticket: Ticket, actual: &Amounts) {
        match self {
            Limiter::Local { counters, clock } => {
                let now = clock.now_ms();
                for (limit, start, delta) in settle_deltas(&ticket.starts, &ticket.reserved, actual)
                    .iter()
                    .flatten()
                {
                    counters.adjust(&ticket.key_id, *limit, *start, *delta, now);
                }
            }
            Limiter::Redis(r) => r.settle(ticket, actual),
        }
    }

    /// Whether limits are currently decided without Redis (never, for a local limiter).
    pub fn is_degraded(&self) -> bool {
        match self {
            Limiter::Local { .. } => false,
            Limiter::Redis(r) => r.is_degraded(),
        }
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

    fn state(window: Window, limit: u64, used: u64, reset_ms: u64, refused: bool) -> WindowState {
        WindowState {
            window,
            limit,
            used,
            reset: Duration::from_millis(reset_ms),
            refused,
        }
    }

    fn states(list: &[WindowState]) -> WindowStates {
        let mut out = [None; WINDOWS];
        for s in list {
            out[s.window.index()] = Some(*s);
        }
        out
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let now = 1_700_000_123_456;
        assert_eq!(window_start(now, 1_000), 1_700_000_123_000);
        assert_eq!(window_start(now, 60_000), 1_700_000_100_000);
        assert_eq!(window_start(now, 86_400_000), 1_699_920_000_000);
        assert_eq!(window_start(0, 1_000), 0);
        let s = window_start(now, 60_000);
        assert_eq!(window_reset(now, s, 60_000), Duration::from_millis(36_544));
        // A start from another node's (later) clock never gives a negative reset.
        assert_eq!(window_reset(s + 70_000, s, 60_000), Duration::ZERO);
        for w in Window::ALL {
            assert_eq!(Window::ALL[w.index()], w);
            assert_eq!(w.period_ms() % 1_000, 0);
        }
    }

    #[test]
    fn limits_from_a_tier_and_shares() {
        let t = Tier {
            requests_per_second: Some(1),
            requests_per_hour: Some(100),
            ..Tier::default()
        };
        let l = RequestLimits::from_tier(&t);
        assert_eq!(l.0, [Some(1), None, Some(100), None]);
        assert_eq!(l.len(), 2);
        assert!(!l.is_empty());
        assert!(RequestLimits::default().is_empty());
        let v: Vec<_> = l.iter().collect();
        assert_eq!(v, [(Window::Second, 1), (Window::Hour, 100)]);
        // ceil(limit / nodes), at least 1; nodes = 0 is treated as 1.
        assert_eq!(l.shared(3).0, [Some(1), None, Some(34), None]);
        assert_eq!(l.shared(1), l);
        assert_eq!(l.shared(0), l);
        assert_eq!(l.shared(1000).0, [Some(1), None, Some(1), None]);
        let even = RequestLimits([None, Some(99), None, None]);
        assert_eq!(even.shared(3).0[1], Some(33));
    }

    #[test]
    fn admitted_requests_report_the_least_remaining_window() {
        assert_eq!(decide(&[None; WINDOWS]), None);
        let d = decide(&states(&[
            state(Window::Second, 10, 3, 500, false),
            state(Window::Minute, 100, 98, 30_000, false),
            state(Window::Day, 1000, 998, 3_600_000, false),
        ]))
        .unwrap();
        // Minute and day both have 2 left: the shorter period binds.
        assert_eq!(
            d,
            Decision::Allow(RateInfo {
                window: Window::Minute,
                limit: 100,
                remaining: 2,
                reset: Duration::from_secs(30),
            })
        );
    }

    #[test]
    fn refusals_report_the_refused_window_that_resets_last() {
        let d = decide(&states(&[
            state(Window::Second, 10, 10, 500, true),
            state(Window::Minute, 100, 50, 30_000, false),
            state(Window::Hour, 200, 200, 600_000, true),
        ]))
        .unwrap();
        let Decision::Deny(i) = d else {
            panic!("{d:?}")
        };
        assert_eq!(i.window, Window::Hour);
        assert_eq!(i.remaining, 0);
        assert_eq!(i.reset, Duration::from_secs(600));
        // Equal resets: the shortest refused window is named.
        let d = decide(&states(&[
            state(Window::Minute, 1, 1, 1_000, true),
            state(Window::Hour, 1, 1, 1_000, true),
        ]))
        .unwrap();
        assert!(matches!(d, Decision::Deny(i) if i.window == Window::Minute));
        assert_eq!(Decision::Unavailable.info(), None);
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
