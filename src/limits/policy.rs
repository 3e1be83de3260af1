//! What one key may use and what one request reserves: the pure math of tiered
//! limits (no IO, no clock — callers pass `now_ms`).
//!
//! - [`Policy::effective`]: the tier's limits with the key's overrides on top (the
//!   key's value wins), for every limit including the request windows.
//! - [`Limit`]: the eight counted limits (four request windows, two token windows,
//!   two spend windows) in one fixed order, so a reservation is a plain array
//!   ([`Amounts`]) and one engine call handles them all.
//! - [`Span`]: where a window starts and ends — epoch-aligned fixed windows, and the
//!   calendar month in UTC for `spend_usd_per_month`.
//! - [`reservation`] / [`Amounts::billed`]: what admission reserves (prompt + expected
//!   completion, and its cost at the model's prices) and what settlement counts.
//! - [`judge`]: turns the counters' states into a [`Verdict`] (allow or the limit that
//!   refused, and the `x-ratelimit-*` values for requests and tokens).
//!
//! Money is counted in nano-USD: integers that stay exact in Redis's Lua doubles up
//! to about 9 million USD per window. Reservations round their cost *up* to the
//! nano-USD, and so does settlement, so rounding never lets a key spend past a budget.

use std::time::Duration;

use super::{RequestLimits, Window};
use crate::config::{Tier, DEFAULT_MAX_TOKENS};
use crate::keys::KeyLimits;

/// Number of counted limits.
pub const LIMITS: usize = 8;

/// One counted limit of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `requests_per_second`.
    RequestsPerSecond,
    /// `requests_per_minute`.
    RequestsPerMinute,
    /// `requests_per_hour`.
    RequestsPerHour,
    /// `requests_per_day`.
    RequestsPerDay,
    /// `tokens_per_minute` (prompt + completion).
    TokensPerMinute,
    /// `tokens_per_day` (UTC day).
    TokensPerDay,
    /// `spend_usd_per_day` (UTC day), counted in nano-USD.
    SpendPerDay,
    /// `spend_usd_per_month` (UTC calendar month), counted in nano-USD.
    SpendPerMonth,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// Requests, 1 each.
    Requests,
    /// Prompt + completion tokens.
    Tokens,
    /// Cost in nano-USD.
    Spend,
}

/// Where a window starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Fixed windows of this many ms, aligned to the Unix epoch.
    Fixed(u64),
    /// The calendar month in UTC.
    Month,
}

const DAY_MS: u64 = 86_400_000;

// === impl Limit ===

impl Limit {
    /// Every limit, in index order.
    pub const ALL: [Limit; LIMITS] = [
        Limit::RequestsPerSecond,
        Limit::RequestsPerMinute,
        Limit::RequestsPerHour,
        Limit::RequestsPerDay,
        Limit::TokensPerMinute,
        Limit::TokensPerDay,
        Limit::SpendPerDay,
        Limit::SpendPerMonth,
    ];

    /// Position in [`Limit::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The config key (also the metric label and what a 429 names).
    pub const fn name(self) -> &'static str {
        match self {
            Limit::RequestsPerSecond => "requests_per_second",
            Limit::RequestsPerMinute => "requests_per_minute",
            Limit::RequestsPerHour => "requests_per_hour",
            Limit::RequestsPerDay => "requests_per_day",
            Limit::TokensPerMinute => "tokens_per_minute",
            Limit::TokensPerDay => "tokens_per_day",
            Limit::SpendPerDay => "spend_usd_per_day",
            Limit::SpendPerMonth => "spend_usd_per_month",
        }
    }

    /// What it counts.
    pub const fn meter(self) -> Meter {
        match self {
            Limit::RequestsPerSecond
            | Limit::RequestsPerMinute
            | Limit::RequestsPerHour
            | Limit::RequestsPerDay => Meter::Requests,
            Limit::TokensPerMinute | Limit::TokensPerDay => Meter::Tokens,
            Limit::SpendPerDay | Limit::SpendPerMonth => Meter::Spend,
        }
    }

    /// Its windows.
    pub const fn span(self) -> Span {
        match self {
            Limit::RequestsPerSecond => Span::Fixed(1_000),
            Limit::RequestsPerMinute | Limit::TokensPerMinute => Span::Fixed(60_000),
            Limit::RequestsPerHour => Span::Fixed(3_600_000),
            Limit::RequestsPerDay | Limit::TokensPerDay | Limit::SpendPerDay => Span::Fixed(DAY_MS),
            Limit::SpendPerMonth => Span::Month,
        }
    }

    /// The request window this limit is, if it is one.
    pub const fn window(self) -> Option<Window> {
        match self {
            Limit::RequestsPerSecond => Some(Window::Second),
            Limit::RequestsPerMinute => Some(Window::Minute),
            Limit::RequestsPerHour => Some(Window::Hour),
            Limit::RequestsPerDay => Some(Window::Day),
            _ => None,
        }
    }

    /// The limit of request window `w`.
    pub const fn of_window(w: Window) -> Limit {
        match w {
            Window::Second => Limit::RequestsPerSecond,
            Window::Minute => Limit::RequestsPerMinute,
            Window::Hour => Limit::RequestsPerHour,
            Window::Day => Limit::RequestsPerDay,
        }
    }

    /// Kind and period in the Redis key name (`rq:1m`, `tk:1d`, `usd:mo`); a stable
    /// API: renaming one forgets every live count.
    pub const fn key_tag(self) -> &'static str {
        match self {
            Limit::RequestsPerSecond => "rq:1s",
            Limit::RequestsPerMinute => "rq:1m",
            Limit::RequestsPerHour => "rq:1h",
            Limit::RequestsPerDay => "rq:1d",
            Limit::TokensPerMinute => "tk:1m",
            Limit::TokensPerDay => "tk:1d",
            Limit::SpendPerDay => "usd:1d",
            Limit::SpendPerMonth => "usd:mo",
        }
    }
}

// === impl Span ===

impl Span {
    /// The number of the window containing `now_ms` (fixed: `now / period`; month:
    /// months since January 1970).
    pub fn number(self, now_ms: u64) -> u64 {
        match self {
            Span::Fixed(p) => now_ms / p,
            Span::Month => {
                let (y, m, _) = civil_from_days(now_ms / DAY_MS);
                (y - 1970) * 12 + (m - 1)
            }
        }
    }

    /// Start (Unix ms) of window `number`.
    pub fn start_of(self, number: u64) -> u64 {
        match self {
            Span::Fixed(p) => number * p,
            Span::Month => days_from_civil(1970 + number / 12, number % 12 + 1) * DAY_MS,
        }
    }

    /// Start (Unix ms) of the window containing `now_ms`.
    pub fn start(self, now_ms: u64) -> u64 {
        self.start_of(self.number(now_ms))
    }

    /// End (exclusive, Unix ms) of the window that starts at `start_ms`.
    pub fn end(self, start_ms: u64) -> u64 {
        match self {
            Span::Fixed(p) => start_ms + p,
            Span::Month => self.start_of(self.number(start_ms) + 1),
        }
    }

    /// Time from `now_ms` until the window that started at `start_ms` ends.
    pub fn reset(self, now_ms: u64, start_ms: u64) -> Duration {
        Duration::from_millis(self.end(start_ms).saturating_sub(now_ms))
    }
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, restricted to dates from 1970 on). `lua/windows.lua`
/// carries the same arithmetic.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of the first day of `month` (1..=12) of `year` (≥ 1970).
pub fn days_from_civil(year: u64, month: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Nano-USD from pico-USD, rounded up.
pub fn nusd_ceil(pusd: u128) -> u64 {
    u64::try_from(pusd.div_ceil(1_000)).unwrap_or(u64::MAX)
}

/// A key's effective limits: every counted limit (spend in nano-USD), concurrency,
/// and the completion reserved when a request names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Per [`Limit::index`]; `None` = unlimited.
    pub limits: [Option<u64>; LIMITS],
    /// `max_concurrent`.
    pub max_concurrent: Option<u32>,
    /// `default_max_tokens`, or [`DEFAULT_MAX_TOKENS`].
    pub default_max_tokens: u32,
    /// `enforce_mid_stream`.
    pub enforce_mid_stream: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            limits: [None; LIMITS],
            max_concurrent: None,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            enforce_mid_stream: false,
        }
    }
}

// === impl Policy ===

impl Policy {
    /// The tier's limits with `key`'s overrides on top: a value the key sets wins.
    /// A key whose tier is gone keeps only its own overrides.
    pub fn effective(tier: Option<&Tier>, key: &KeyLimits) -> Policy {
        let default = Tier::default();
        let t = tier.unwrap_or(&default);
        let u = |k: Option<u32>, t: Option<u32>| k.or(t).map(u64::from);
        let usd = |k: Option<crate::config::UsdAmount>, t: Option<crate::config::UsdAmount>| {
            k.or(t).map(|a| a.micros.saturating_mul(1_000))
        };
        Policy {
            limits: [
                u(key.requests_per_second, t.requests_per_second),
                u(key.requests_per_minute, t.requests_per_minute),
                u(key.requests_per_hour, t.requests_per_hour),
                u(key.requests_per_day, t.requests_per_day),
                key.tokens_per_minute.or(t.tokens_per_minute),
                key.tokens_per_day.or(t.tokens_per_day),
                usd(key.spend_usd_per_day, t.spend_usd_per_day),
                usd(key.spend_usd_per_month, t.spend_usd_per_month),
            ],
            max_concurrent: key.max_concurrent.or(t.max_concurrent),
            default_max_tokens: key
                .default_max_tokens
                .or(t.default_max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            enforce_mid_stream: t.enforce_mid_stream,
        }
    }

    /// Only request windows (what [`super::Limiter::check`] enforces).
    pub fn from_requests(r: &RequestLimits) -> Policy {
        let mut p = Policy::default();
        for (w, l) in r.iter() {
            p.limits[Limit::of_window(w).index()] = Some(l);
        }
        p
    }

    /// The request windows.
    pub fn requests(&self) -> RequestLimits {
        RequestLimits(Window::ALL.map(|w| self.get(Limit::of_window(w))))
    }

    /// The limit's value.
    pub fn get(&self, l: Limit) -> Option<u64> {
        self.limits[l.index()]
    }

    /// The set limits, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Limit, u64)> + Clone + '_ {
        Limit::ALL
            .iter()
            .zip(self.limits.iter())
            .filter_map(|(l, v)| v.map(|v| (*l, v)))
    }

    /// How many counted limits are set.
    pub fn len(&self) -> usize {
        self.limits.iter().flatten().count()
    }

    /// Whether nothing at all is limited (no counter, no concurrency).
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.max_concurrent.is_none()
    }

    /// Whether admission needs the prompt (a token or spend limit is set), and so
    /// must wait for the body.
    pub fn needs_body(&self) -> bool {
        self.iter().any(|(l, _)| l.meter() != Meter::Requests)
    }

    /// Each node's share when `nodes` nodes decide without coordination:
    /// `ceil(limit / nodes)`, at least 1.
    pub fn shared(&self, nodes: u32) -> Policy {
        let n = u64::from(nodes.max(1));
        Policy {
            limits: self.limits.map(|l| l.map(|l| l.div_ceil(n).max(1))),
            max_concurrent: self.max_concurrent.map(|c| c.div_ceil(nodes.max(1)).max(1)),
            ..*self
        }
    }

    /// The first limit the reservation alone exceeds (it could never be admitted).
    pub fn too_large(&self, amounts: &Amounts) -> Option<Refusal> {
        self.iter()
            .find(|(l, v)| amounts.get(*l) > *v)
            .map(|(l, v)| Refusal {
                hit: Hit::Limit(l),
                value: v,
                used: 0,
                requested: amounts.get(l),
                reset: Duration::ZERO,
            })
    }
}

/// An amount per limit: what a request reserves or what it turned out to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts(pub [u64; LIMITS]);

impl Amounts {
    /// One request and nothing else (the request windows' cost).
    pub const REQUEST: Amounts = Amounts([1, 1, 1, 1, 0, 0, 0, 0]);

    /// One request using `tokens` tokens that cost `nusd` nano-USD.
    pub fn billed(tokens: u64, nusd: u64) -> Amounts {
        Amounts([1, 1, 1, 1, tokens, tokens, nusd, nusd])
    }

    /// The amount of limit `l`.
    pub fn get(&self, l: Limit) -> u64 {
        self.0[l.index()]
    }
}

/// The completion a request reserves: `max_completion_tokens`, else `max_tokens`,
/// else the policy's default.
pub fn expected_completion(
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    default: u32,
) -> u64 {
    max_completion_tokens
        .or(max_tokens)
        .unwrap_or(u64::from(default))
}

/// What admission reserves: one request, `prompt + completion` tokens, and their
/// cost at the model's prices (micro-USD per million tokens), rounded up to the
/// nano-USD. Cached-input discounts are unknown before the response, so the full
/// input price is reserved.
pub fn reservation(
    prompt_tokens: u64,
    completion_tokens: u64,
    input_micros_per_mtok: u64,
    output_micros_per_mtok: u64,
) -> Amounts {
    let pusd = u128::from(prompt_tokens) * u128::from(input_micros_per_mtok)
        + u128::from(completion_tokens) * u128::from(output_micros_per_mtok);
    Amounts::billed(
        prompt_tokens.saturating_add(completion_tokens),
        nusd_ceil(pusd),
    )
}

/// How far one admitted stream may go before it crosses a token or spend limit
/// (`enforce_mid_stream`): the completion tokens left, after the prompt, in the
/// tightest token or spend window, as counted at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAllowance {
    /// Completion tokens the stream may deliver.
    pub completion_tokens: u64,
    /// The limit that binds (what the in-band error names).
    pub limit: Limit,
    /// Its value (tokens, or nano-USD for spend).
    pub value: u64,
    /// Time until its window resets, at admission.
    pub reset: Duration,
}

/// The [`StreamAllowance`] of an admitted request whose states are `states`
/// (`used` includes this request's reservation, `cost`): the room a window had
/// for this request is `value − (used − cost)`; the prompt takes its share first
/// (its tokens, or its cost at `input_micros_per_mtok`), and spend room converts to
/// completion tokens at `output_micros_per_mtok`, rounded down. `None` when no
/// token or spend limit is set (or every spend limit is on free output).
pub fn stream_allowance(
    states: &LimitStates,
    prompt_tokens: u64,
    input_micros_per_mtok: u64,
    output_micros_per_mtok: u64,
) -> Option<StreamAllowance> {
    // micro-USD per million tokens = pico-USD per token.
    let prompt_nusd = nusd_ceil(u128::from(prompt_tokens) * u128::from(input_micros_per_mtok));
    states
        .iter()
        .flatten()
        .filter_map(|s| {
            let room = s.value.saturating_sub(s.used.saturating_sub(s.cost));
            let completion_tokens = match s.limit.meter() {
                Meter::Requests => return None,
                Meter::Tokens => room.saturating_sub(prompt_tokens),
                Meter::Spend if output_micros_per_mtok == 0 => return None,
                Meter::Spend => {
                    let pusd = u128::from(room.saturating_sub(prompt_nusd)) * 1_000;
                    u64::try_from(pusd / u128::from(output_micros_per_mtok)).unwrap_or(u64::MAX)
                }
            };
            Some(StreamAllowance {
                completion_tokens,
                limit: s.limit,
                value: s.value,
                reset: s.reset,
            })
        })
        // Ties: the lowest index (tokens before spend, shorter windows first).
        .min_by_key(|a| a.completion_tokens)
}

/// The adjustment settlement makes to a window a reservation was counted in:
/// `actual − reserved` (a refund when negative, a top-up when positive).
pub fn settle_delta(reserved: u64, actual: u64) -> i64 {
    let d = i128::from(actual) - i128::from(reserved);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// A counted limit.
    Limit(Limit),
    /// `max_concurrent`.
    Concurrency,
}

impl Hit {
    /// The config key.
    pub const fn name(self) -> &'static str {
        match self {
            Hit::Limit(l) => l.name(),
            Hit::Concurrency => "max_concurrent",
        }
    }

    /// What it counts (concurrency counts requests).
    pub const fn meter(self) -> Meter {
        match self {
            Hit::Limit(l) => l.meter(),
            Hit::Concurrency => Meter::Requests,
        }
    }
}

/// Why a request was refused, for the 429 (or 400) body and `retry-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit.
    pub hit: Hit,
    /// Its value (requests, tokens, nano-USD, or concurrent requests).
    pub value: u64,
    /// Already used in the current window (in flight, for concurrency).
    pub used: u64,
    /// What this request asked for.
    pub requested: u64,
    /// Time until the window resets (for concurrency: a short retry hint).
    pub reset: Duration,
}

/// One limit's state after an admission attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Which limit.
    pub limit: Limit,
    /// Its value.
    pub value: u64,
    /// Counted in the current window (this request's cost included when admitted).
    pub used: u64,
    /// This request's cost.
    pub cost: u64,
    /// Start of the window (Unix ms): settlement adjusts only this window.
    pub start: u64,
    /// Time until the window resets.
    pub reset: Duration,
    /// This limit refused the request.
    pub refused: bool,
}

/// States indexed by [`Limit::index`]; `None` for unlimited limits.
pub type LimitStates = [Option<LimitState>; LIMITS];

/// The values behind one kind of `x-ratelimit-*` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// The binding limit's value.
    pub limit: u64,
    /// Left in its window.
    pub remaining: u64,
    /// Time until its window resets.
    pub reset: Duration,
}

/// The outcome of an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted (reserved in every limited window).
    Allow,
    /// Refused with 429.
    Deny(Refusal),
    /// The reservation alone exceeds a limit: 400, retrying cannot help.
    TooLarge(Refusal),
    /// 503: Redis is unavailable and `on_failure: deny`.
    Unavailable,
}

/// An admission's outcome and the header values, whichever way it went.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Allow or why not.
    pub outcome: Outcome,
    /// `x-ratelimit-*-requests`: the request window with the least remaining.
    pub requests: Option<HeaderInfo>,
    /// `x-ratelimit-*-tokens`: the token window with the least remaining.
    pub tokens: Option<HeaderInfo>,
}

impl Verdict {
    /// Nothing limited.
    pub const NONE: Verdict = Verdict {
        outcome: Outcome::Allow,
        requests: None,
        tokens: None,
    };

    /// Whether the request may go ahead.
    pub fn allowed(&self) -> bool {
        self.outcome == Outcome::Allow
    }
}

/// The concurrency side of an admission: in flight (this one included when
/// admitted) against the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyState {
    /// `max_concurrent`.
    pub value: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Refused for want of a slot.
    pub refused: bool,
}

/// How soon a client refused for concurrency should try again.
pub const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// The verdict over limit states and the concurrency state.
///
/// A refusal names the refused window that resets last (ties: lowest index, i.e.
/// requests before tokens before spend, shorter before longer), so `retry-after`
/// never sends a client back before it can succeed; concurrency is named only when
/// no window refused. Headers report, per meter, the window with the least
/// remaining (ties: the shorter window).
pub fn judge(states: &LimitStates, concurrency: Option<ConcurrencyState>) -> Verdict {
    let mut refused: Option<&LimitState> = None;
    let mut requests: Option<HeaderInfo> = None;
    let mut tokens: Option<HeaderInfo> = None;
    for s in states.iter().flatten() {
        if s.refused && refused.is_none_or(|r| s.reset > r.reset) {
            refused = Some(s);
        }
        let info = HeaderInfo {
            limit: s.value,
            remaining: s.value.saturating_sub(s.used),
            reset: s.reset,
        };
        let slot = match s.limit.meter() {
            Meter::Requests => &mut requests,
            Meter::Tokens => &mut tokens,
            Meter::Spend => continue,
        };
        if slot.is_none_or(|h| info.remaining < h.remaining) {
            *slot = Some(info);
        }
    }
    let outcome = match (refused, concurrency) {
        (Some(s), _) => Outcome::Deny(Refusal {
            hit: Hit::Limit(s.limit),
            value: s.value,
            used: s.used,
            requested: s.cost,
            reset: s.reset,
        }),
        (None, Some(c)) if c.refused => Outcome::Deny(Refusal {
            hit: Hit::Concurrency,
            value: c.value,
            used: c.in_flight,
            requested: 1,
            reset: CONCURRENCY_RETRY,
        }),
        _ => Outcome::Allow,
    };
    Verdict {
        outcome,
        requests,
        tokens,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::UsdAmount;

    fn ymd_ms(y: u64, m: u64, d: u64) -> u64 {
        (days_from_civil(y, m) + d - 1) * DAY_MS
    }

    #[test]
    fn civil_dates_round_trip_over_two_centuries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(1970, 1), 0);
        assert_eq!(days_from_civil(2000, 3), 11_017);
        // Every day from 1970 to 2170 maps to a date whose month starts where the
        // inverse says, and days within a month are consecutive.
        let mut prev = civil_from_days(0);
        for days in 1..73_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m) + d - 1, days);
            if d == 1 {
                assert!(prev.2 >= 28 && (prev.1 % 12) + 1 == m, "{prev:?} {y}-{m}");
            } else {
                assert_eq!((prev.0, prev.1, prev.2 + 1), (y, m, d));
            }
            prev = (y, m, d);
        }
    }

    #[test]
    fn month_windows_are_calendar_months_in_utc() {
        let m = Span::Month;
        // 2024 is a leap year: February has 29 days.
        let t = ymd_ms(2024, 2, 29) + 23 * 3_600_000 + 59 * 60_000;
        assert_eq!(m.start(t), ymd_ms(2024, 2, 1));
        assert_eq!(m.end(m.start(t)), ymd_ms(2024, 3, 1));
        assert_eq!(m.reset(t, m.start(t)), Duration::from_millis(60_000));
        // The last millisecond of December and the first of January.
        let nye = ymd_ms(2025, 1, 1) - 1;
        assert_eq!(m.start(nye), ymd_ms(2024, 12, 1));
        assert_eq!(m.end(m.start(nye)), ymd_ms(2025, 1, 1));
        assert_eq!(m.start(nye + 1), ymd_ms(2025, 1, 1));
        assert_eq!(m.number(nye + 1), m.number(nye) + 1);
        assert_eq!(m.start_of(0), 0);
        assert_eq!(m.start_of(m.number(nye)), m.start(nye));
        // Fixed windows align to the epoch.
        let f = Span::Fixed(60_000);
        assert_eq!(f.start(1_700_000_123_456), 1_700_000_100_000);
        assert_eq!(f.end(1_700_000_100_000), 1_700_000_160_000);
        assert_eq!(
            f.reset(1_700_000_170_000, 1_700_000_100_000),
            Duration::ZERO
        );
    }

    #[test]
    fn key_overrides_win_over_the_tier() {
        let tier = Tier {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1_000),
            spend_usd_per_day: Some(UsdAmount { micros: 5_000_000 }),
            max_concurrent: Some(4),
            default_max_tokens: Some(256),
            enforce_mid_stream: true,
            ..Tier::default()
        };
        let p = Policy::effective(Some(&tier), &KeyLimits::default());
        assert_eq!(p.get(Limit::RequestsPerMinute), Some(10));
        assert_eq!(p.get(Limit::TokensPerMinute), Some(1_000));
        assert_eq!(p.get(Limit::SpendPerDay), Some(5_000_000_000));
        assert_eq!(p.get(Limit::SpendPerMonth), None);
        assert_eq!((p.max_concurrent, p.default_max_tokens), (Some(4), 256));
        assert!(p.enforce_mid_stream && p.needs_body());
        let key = KeyLimits {
            requests_per_minute: Some(2),
            requests_per_day: Some(50),
            tokens_per_minute: Some(5),
            spend_usd_per_month: Some(UsdAmount { micros: 1 }),
            max_concurrent: Some(1),
            default_max_tokens: Some(16),
            ..KeyLimits::default()
        };
        let p = Policy::effective(Some(&tier), &key);
        assert_eq!(
            p.limits,
            [
                None,
                Some(2),
                None,
                Some(50),
                Some(5),
                None,
                Some(5_000_000_000),
                Some(1_000)
            ]
        );
        assert_eq!((p.max_concurrent, p.default_max_tokens), (Some(1), 16));
        assert_eq!(p.requests().0, [None, Some(2), None, Some(50)]);
        // No tier (deleted): the key's own overrides still apply; default reservation.
        let p = Policy::effective(None, &KeyLimits::default());
        assert!(p.is_empty() && !p.needs_body());
        assert_eq!(p.default_max_tokens, DEFAULT_MAX_TOKENS);
        // Only requests and concurrency: admission can happen before the body.
        let rq = Tier {
            requests_per_second: Some(1),
            max_concurrent: Some(2),
            ..Tier::default()
        };
        let p = Policy::effective(Some(&rq), &KeyLimits::default());
        assert!(!p.is_empty() && !p.needs_body());
        assert_eq!(Policy::from_requests(&p.requests()).limits, p.limits);
    }

    #[test]
    fn shares_round_up_and_never_reach_zero() {
        let mut p = Policy::default();
        p.limits[Limit::TokensPerMinute.index()] = Some(1_000);
        p.limits[Limit::RequestsPerSecond.index()] = Some(1);
        p.max_concurrent = Some(5);
        let s = p.shared(3);
        assert_eq!(s.get(Limit::TokensPerMinute), Some(334));
        assert_eq!(s.get(Limit::RequestsPerSecond), Some(1));
        assert_eq!(s.max_concurrent, Some(2));
        assert_eq!(p.shared(0), p);
    }

    #[test]
    fn reservations_cost_prompt_plus_completion_rounded_up() {
        assert_eq!(expected_completion(Some(10), Some(20), 99), 10);
        assert_eq!(expected_completion(None, Some(20), 99), 20);
        assert_eq!(expected_completion(None, None, 99), 99);
        // 0.15 USD / Mtok in, 0.60 out: 100 prompt + 50 completion tokens cost
        // 15,000,000 + 30,000,000 pico-USD = 45,000 nano-USD exactly.
        let a = reservation(100, 50, 150_000, 600_000);
        assert_eq!(a.get(Limit::TokensPerMinute), 150);
        assert_eq!(a.get(Limit::TokensPerDay), 150);
        assert_eq!(a.get(Limit::SpendPerDay), 45_000);
        assert_eq!(a.get(Limit::RequestsPerHour), 1);
        // 1 token at 1 micro-USD/Mtok is 1 pico-USD: reserved as a whole nano-USD.
        assert_eq!(reservation(1, 0, 1, 0).get(Limit::SpendPerMonth), 1);
        assert_eq!(nusd_ceil(1_000), 1);
        assert_eq!(nusd_ceil(1_001), 2);
        assert_eq!(nusd_ceil(0), 0);
    }

    #[test]
    fn stream_allowance_is_the_tightest_room_after_the_prompt() {
        let s = |limit, value, used, cost| LimitState {
            limit,
            value,
            used,
            cost,
            start: 0,
            reset: Duration::from_secs(limit as u64 + 1),
            refused: false,
        };
        // Nothing but request windows: nothing to enforce mid-stream.
        let only_rq = states(&[s(Limit::RequestsPerMinute, 10, 1, 1)]);
        assert_eq!(stream_allowance(&only_rq, 10, 1, 1), None);
        // tokens_per_minute 1,000 with 700 used by others and 150 reserved here
        // (prompt 100 + 50): the request may use 300, the completion 200. The day
        // window (10,000, 9,000 + 150 used) leaves 1,000 − 100 = 900.
        let st = states(&[
            s(Limit::TokensPerMinute, 1_000, 850, 150),
            s(Limit::TokensPerDay, 10_000, 9_150, 150),
        ]);
        let a = stream_allowance(&st, 100, 0, 0).unwrap();
        assert_eq!(
            (a.limit, a.completion_tokens, a.value),
            (Limit::TokensPerMinute, 200, 1_000)
        );
        assert_eq!(a.reset, Duration::from_secs(5));
        // Spend: 100,000 nano-USD of room; the prompt (100 tokens at 0.15 USD/Mtok
        // = 15,000 nano-USD) leaves 85,000, i.e. 141 tokens at 0.60 USD/Mtok
        // (600 nano-USD each, rounded down). Tighter than the tokens' 200.
        let st = states(&[
            s(Limit::TokensPerMinute, 1_000, 850, 150),
            s(Limit::SpendPerDay, 150_000, 95_000, 45_000),
        ]);
        let a = stream_allowance(&st, 100, 150_000, 600_000).unwrap();
        assert_eq!((a.limit, a.completion_tokens), (Limit::SpendPerDay, 141));
        // Free output: a spend limit cannot bind on the completion.
        assert_eq!(
            stream_allowance(&st, 100, 150_000, 0).unwrap().limit,
            Limit::TokensPerMinute
        );
        // A window already over (top-ups) leaves nothing, never wraps.
        let over = states(&[s(Limit::TokensPerDay, 100, 500, 10)]);
        assert_eq!(
            stream_allowance(&over, 5, 0, 0).unwrap().completion_tokens,
            0
        );
    }

    #[test]
    fn settle_deltas_refund_and_top_up() {
        assert_eq!(settle_delta(150, 40), -110);
        assert_eq!(settle_delta(150, 200), 50);
        assert_eq!(settle_delta(0, 0), 0);
        assert_eq!(settle_delta(u64::MAX, 0), i64::MIN);
        assert_eq!(settle_delta(0, u64::MAX), i64::MAX);
    }

    #[test]
    fn too_large_names_the_first_limit_a_reservation_cannot_fit() {
        let mut p = Policy::default();
        p.limits[Limit::RequestsPerMinute.index()] = Some(5);
        p.limits[Limit::TokensPerMinute.index()] = Some(100);
        assert_eq!(p.too_large(&reservation(50, 50, 0, 0)), None);
        let r = p.too_large(&reservation(50, 51, 0, 0)).unwrap();
        assert_eq!(r.hit, Hit::Limit(Limit::TokensPerMinute));
        assert_eq!((r.value, r.requested), (100, 101));
    }

    fn st(
        limit: Limit,
        value: u64,
        used: u64,
        cost: u64,
        reset_ms: u64,
        refused: bool,
    ) -> LimitState {
        LimitState {
            limit,
            value,
            used,
            cost,
            start: 0,
            reset: Duration::from_millis(reset_ms),
            refused,
        }
    }

    fn states(list: &[LimitState]) -> LimitStates {
        let mut s = [None; LIMITS];
        for x in list {
            s[x.limit.index()] = Some(*x);
        }
        s
    }

    #[test]
    fn verdicts_report_each_meter_and_name_the_refusal() {
        assert_eq!(judge(&[None; LIMITS], None), Verdict::NONE);
        let v = judge(
            &states(&[
                st(Limit::RequestsPerSecond, 10, 3, 1, 500, false),
                st(Limit::RequestsPerMinute, 100, 98, 1, 30_000, false),
                st(Limit::TokensPerMinute, 1_000, 900, 300, 30_000, false),
                st(Limit::TokensPerDay, 10_000, 9_950, 300, 3_600_000, false),
                st(Limit::SpendPerDay, 1, 1, 1, 3_600_000, false),
            ]),
            None,
        );
        assert!(v.allowed());
        assert_eq!(
            v.requests,
            Some(HeaderInfo {
                limit: 100,
                remaining: 2,
                reset: Duration::from_secs(30)
            })
        );
        assert_eq!(
            v.tokens,
            Some(HeaderInfo {
                limit: 10_000,
                remaining: 50,
                reset: Duration::from_secs(3_600)
            })
        );
        // Two windows refuse: the one that resets last is named.
        let v = judge(
            &states(&[
                st(Limit::TokensPerMinute, 1_000, 900, 300, 30_000, true),
                st(Limit::SpendPerMonth, 5, 4, 2, 9_000_000, true),
            ]),
            Some(ConcurrencyState {
                value: 1,
                in_flight: 1,
                refused: true,
            }),
        );
        let Outcome::Deny(r) = v.outcome else {
            panic!("{v:?}")
        };
        assert_eq!(r.hit, Hit::Limit(Limit::SpendPerMonth));
        assert_eq!((r.value, r.used, r.requested), (5, 4, 2));
        assert_eq!(r.hit.name(), "spend_usd_per_month");
        // Concurrency alone.
        let v = judge(
            &states(&[st(Limit::RequestsPerMinute, 10, 1, 1, 1_000, false)]),
            Some(ConcurrencyState {
                value: 2,
                in_flight: 2,
                refused: true,
            }),
        );
        let Outcome::Deny(r) = v.outcome else {
            panic!("{v:?}")
        };
        assert_eq!(
            (r.hit, r.value, r.reset),
            (Hit::Concurrency, 2, CONCURRENCY_RETRY)
        );
        assert!(v.requests.is_some() && v.tokens.is_none());
    }

    #[test]
    fn limit_tables_are_consistent() {
        for (i, l) in Limit::ALL.into_iter().enumerate() {
            assert_eq!(l.index(), i);
            if let Some(w) = l.window() {
                assert_eq!(Limit::of_window(w), l);
                assert_eq!(w.limit_name(), l.name());
                assert_eq!(Span::Fixed(w.period_ms()), l.span());
                assert_eq!(format!("rq:{}", w.key_suffix()), l.key_tag());
            }
        }
    }
}
