//! Cluster-wide request limits in Redis, and what happens when Redis cannot answer.
//!
//! [`RedisLimiter::check`] runs, for one request:
//!
//! 1. **Shield** (no round trip): this node's counters ([`LocalLimiter`]) hold what
//!    Redis told this node about the key in the current window (see below). If they
//!    show a window that cannot take the request, it is refused here.
//! 2. **Breaker** ([`Breaker`]): while open, no call is made; the request is decided
//!    by `on_failure` at once.
//! 3. **One `EVALSHA` of `lua/windows.lua`** checking and counting every window of
//!    the key atomically, bounded by `redis.timeout_ms` (`tokio::time::timeout`),
//!    with a deadline in Redis time so a call this node gave up on never counts
//!    later ([`ClusterClock`]). `NOSCRIPT` (Redis restarted, `SCRIPT FLUSH`) loads
//!    the script and retries once, within the same timeout.
//! 4. On error or timeout the breaker counts a failure and `on_failure` decides:
//!    `local_share` takes `ceil(limit / nodes)` from this node's counters, `allow`
//!    admits, `deny` answers 503. Such decisions are marked degraded.
//!
//! # The shield's rule and its error bound
//! The counters of this node get `+1` per request Redis admitted and `+limit` for
//! each window Redis reported full, in the window Redis reported (by Redis's
//! clock). For request windows a window's count only grows until it ends, so a
//! count this node has seen is a lower bound of Redis's count: the shield refuses
//! only what Redis would refuse too. A flood from one key therefore costs at most
//! one Redis call per window per node once the window is full (plus the calls in
//! flight at that moment). Documented edges where the shield refuses what Redis
//! would admit:
//! - for up to the estimate's lag (a reply's one-way latency) after a window turns,
//!   since the node's estimate of Redis's clock lags behind it;
//! - after Redis lost its data (restart without persistence) within a window, or
//!   when `local_share` admitted requests in the same window while Redis was
//!   unavailable (those count locally, not in Redis);
//! - sketch collisions ([`LocalLimiter`]'s bounds).
//!
//! # Failure handling
//! The connection is one multiplexed connection owned by a dedicated thread
//! (`ai4free-redis`) with its own small runtime, so it outlives whichever runtime
//! built the limiter and never depends on a request's runtime. That thread connects
//! (and loads the script) in the background with backoff, replaces the connection
//! when it drops or when the breaker opens (a black-holed connection never
//! recovers by itself), and probes Redis while the breaker is open, so full service
//! returns within about a second of Redis answering again, traffic or not. Redis
//! being down at start only starts the limiter degraded.
//!
//! Degradation is never silent: `ai4free_ratelimit_degraded` (the number of
//! degraded limiters in the process: 0 or 1 in a gateway), one `warn` line when the
//! breaker opens and one `info` line when it closes, and every response carries
//! `x-ai4free-ratelimit: degraded` meanwhile. A call that timed out may still have
//! been counted if Redis ran it before the deadline but its reply came late; at most
//! the breaker's threshold of calls per outage are in that state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{oneshot, Notify};

use super::breaker::{Admit, Breaker, Transition};
use super::clock::ClusterClock;
use super::local::window_states;
use super::policy::{
    judge, Amounts, ConcurrencyState, LimitState, LimitStates, Meter, Outcome, Policy, Verdict,
    LIMITS,
};
use super::script::{self, CounterKey, LeaseArg, Reply, ReplyError, SettleArg, Status, WindowArg};
use super::{
    decide, settle_deltas, Admission, Checked, Counted, Lease, LocalLimiter, RequestLimits, Ticket,
};
use crate::config::{OnFailure, RedisSettings};
use crate::metrics;

/// Bound on one background connection attempt (connect + `SCRIPT LOAD`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long start-up waits for the first connection attempt before serving degraded.
const FIRST_CONNECT_WAIT: Duration = Duration::from_millis(1_500);
/// Reconnect backoff bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often the background thread checks whether a probe is due.
const PROBE_TICK: Duration = Duration::from_millis(100);
/// Bound on one settlement, release or renewal call (off the request path).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the limiter could not be built (Redis being down is not one of them).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The client rejects the URL (e.g. `rediss://` in a build without TLS support).
    #[error("redis.url cannot be used: {0}")]
    Url(String),
    /// The background thread or its runtime could not be created.
    #[error("cannot start the Redis limiter thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The outcome of one Redis call, the `result` label of `ai4free_redis_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// Redis admitted the request (or a probe succeeded).
    Ok,
    /// Redis refused the request.
    Denied,
    /// Redis answered with an error, no connection, or an unexpected reply.
    Error,
    /// No answer within `timeout_ms` (or the script ran after the deadline).
    Timeout,
    /// Not called: the breaker is open.
    ShortCircuit,
    /// Not called: the local shield refused the request.
    Shielded,
}

impl CallResult {
    /// Every result, for exporting the series at zero.
    pub const ALL: [CallResult; 6] = [
        CallResult::Ok,
        CallResult::Denied,
        CallResult::Error,
        CallResult::Timeout,
        CallResult::ShortCircuit,
        CallResult::Shielded,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CallResult::Ok => "ok",
            CallResult::Denied => "denied",
            CallResult::Error => "error",
            CallResult::Timeout => "timeout",
            CallResult::ShortCircuit => "short_circuit",
            CallResult::Shielded => "shielded",
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("not connected")]
    NotConnected,
    #[error("no answer within the timeout")]
    Timeout,
    #[error("the script ran after the caller's deadline")]
    Stale,
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("SCRIPT LOAD returned an unexpected hash")]
    Hash,
}

/// A concurrency lease this node holds in Redis: renewed while it lives, released
/// (ZREM, fire-and-forget) when dropped unless a settlement released it already.
pub struct LeaseGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(l) = self.shared.leases.lock().remove(&self.id) {
            let s = self.shared.clone();
            self.shared.rt.spawn(async move {
                s.settle_call(&l.key_id, &[], Some(&l.member)).await;
            });
        }
    }
}

impl LeaseGuard {
    /// Stops renewing and hands back (key id, member) for a settlement to release.
    fn disarm(self) -> Option<LiveLease> {
        self.shared.leases.lock().remove(&self.id)
    }
}

/// A live lease, as the renewal task sees it.
struct LiveLease {
    key_id: String,
    member: String,
}

impl CallError {
    fn result(&self) -> CallResult {
        match self {
            CallError::Timeout | CallError::Stale => CallResult::Timeout,
            _ => CallResult::Error,
        }
    }
}

/// The Redis-backed limiter; see the module docs.
pub struct RedisLimiter {
    shared: Arc<Shared>,
    /// Dropping it stops the background thread.
    _stop: oneshot::Sender<()>,
}

struct Shared {
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    sha: String,
    timeout: Duration,
    on_failure: OnFailure,
    nodes: u32,
    local: LocalLimiter,
    clock: ClusterClock,
    breaker: Mutex<Breaker>,
    degraded: AtomicBool,
    wake: Notify,
    settle_sha: String,
    lease_ttl: Duration,
    /// Live leases of this node, renewed every third of `lease_ttl`.
    leases: Mutex<HashMap<u64, LiveLease>>,
    next_lease: AtomicU64,
    /// The `ai4free-redis` thread's runtime: settlements, releases and renewals
    /// run there, off the request path.
    rt: tokio::runtime::Handle,
}

// === impl RedisLimiter ===

impl RedisLimiter {
    /// Starts the background connection thread and returns after its first attempt
    /// (or [`FIRST_CONNECT_WAIT`]), connected or degraded.
    pub fn start(
        settings: &RedisSettings,
        local: LocalLimiter,
    ) -> Result<RedisLimiter, StartError> {
        RedisLimiter::with_breaker(settings, local, Breaker::default())
    }

    /// [`RedisLimiter::start`] with a given breaker (tests use shorter cool-downs).
    pub fn with_breaker(
        settings: &RedisSettings,
        local: LocalLimiter,
        breaker: Breaker,
    ) -> Result<RedisLimiter, StartError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| StartError::Url(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            client,
            conn: ArcSwapOption::empty(),
            sha: redis::Script::new(script::WINDOWS_LUA)
                .get_hash()
                .to_owned(),
            timeout: settings.timeout,
            on_failure: settings.on_failure,
            nodes: settings.nodes,
            local,
            clock: ClusterClock::new(),
            breaker: Mutex::new(breaker),
            degraded: AtomicBool::new(false),
            wake: Notify::new(),
            settle_sha: redis::Script::new(script::SETTLE_LUA).get_hash().to_owned(),
            lease_ttl: settings.lease_ttl,
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(0),
            rt: rt.handle().clone(),
        });
        rt.spawn(renew_leases(Arc::downgrade(&shared)));
        let (stop, stopped) = oneshot::channel();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("ai4free-redis".into())
            .spawn(move || rt.block_on(supervise(worker, stopped, first_tx)))?;
        // Requests right after start should find a connection; a Redis that is down
        // costs start-up this wait at most.
        let _ = first_rx.recv_timeout(FIRST_CONNECT_WAIT);
        Ok(RedisLimiter {
            shared,
            _stop: stop,
        })
    }

    /// Checks and counts one request of `key_id` in its request windows; waits at
    /// most `timeout_ms`.
    pub async fn check(&self, key_id: &str, limits: &RequestLimits) -> Checked {
        let a = self
            .admit(
                key_id,
                &Policy::from_requests(limits),
                &Amounts::REQUEST,
                "",
            )
            .await;
        let decision = match a.verdict.outcome {
            Outcome::Unavailable => Some(super::Decision::Unavailable),
            _ => decide(&window_states(&a.states)),
        };
        Checked {
            decision,
            degraded: a.degraded,
        }
    }

    /// Reserves `amounts` in every limit of `policy` for `key_id`, and a concurrency
    /// lease named `member`, all or nothing in one script call; waits at most
    /// `timeout_ms`. The ticket settles the reservation later.
    pub async fn admit(
        &self,
        key_id: &str,
        policy: &Policy,
        amounts: &Amounts,
        member: &str,
    ) -> Admission {
        let s = &self.shared;
        if policy.is_empty() {
            return Admission::none(s.is_degraded());
        }
        // The shield covers request windows only: token and spend counts shrink on
        // settlement, so what this node saw is no lower bound of Redis's count.
        let requests = Policy::from_requests(&policy.requests());
        if !requests.is_empty() {
            let states = s
                .local
                .peek_all(key_id, &requests, amounts, s.clock.now_ms());
            if states.iter().flatten().any(|st| st.refused) {
                count(CallResult::Shielded);
                return Admission {
                    verdict: judge(&states, None),
                    degraded: s.is_degraded(),
                    ticket: None,
                    states,
                };
            }
        }
        if s.breaker.lock().admit(Instant::now()) == Admit::ShortCircuit {
            count(CallResult::ShortCircuit);
            return s.fallback(key_id, policy, amounts);
        }
        let windows = policy.iter().map(|(limit, value)| WindowArg {
            key: CounterKey { key_id, limit },
            limit: value,
            cost: amounts.get(limit),
        });
        let lease = policy.max_concurrent.map(|max| LeaseArg {
            key_id,
            max: u64::from(max),
            ttl_ms: u64::try_from(s.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            member,
        });
        let n = policy.len() + usize::from(lease.is_some());
        let timeout_us = u64::try_from(s.timeout.as_micros()).unwrap_or(u64::MAX);
        let cmd = script::check_cmd(&s.sha, s.clock.deadline_us(timeout_us), windows, lease);
        match s.run(&cmd, n).await {
            Ok(reply) => {
                count(match reply.status {
                    Status::Refused => CallResult::Denied,
                    _ => CallResult::Ok,
                });
                self.apply(key_id, policy, amounts, &reply, member)
            }
            Err(e) => {
                count(e.result());
                s.fallback(key_id, policy, amounts)
            }
        }
    }

    /// Settles `ticket` to `actual`: local counters at once, Redis with one
    /// fire-and-forget call on the limiter's thread (failures counted in
    /// `ai4free_limit_settle_failures_total`).
    pub fn settle(&self, ticket: Ticket, actual: &Amounts) {
        let s = &self.shared;
        let Ticket {
            key_id,
            reserved,
            starts,
            counted,
            lease,
        } = ticket;
        let member = match lease {
            Some(Lease::Redis(g)) => g.disarm().map(|l| l.member),
            _ => None,
        };
        let deltas = settle_deltas(&starts, &reserved, actual);
        match counted {
            Counted::Local => {
                let now = s.clock.now_ms();
                for (limit, start, delta) in deltas.iter().flatten() {
                    s.local.adjust(&key_id, *limit, *start, *delta, now);
                }
            }
            Counted::Redis if deltas.iter().flatten().next().is_some() || member.is_some() => {
                let shared = s.clone();
                s.rt.spawn(async move {
                    let adjust: Vec<SettleArg<'_>> = deltas
                        .iter()
                        .flatten()
                        .map(|&(limit, start, delta)| SettleArg {
                            key: CounterKey {
                                key_id: &key_id,
                                limit,
                            },
                            start,
                            delta,
                        })
                        .collect();
                    shared
                        .settle_call(&key_id, &adjust, member.as_deref())
                        .await;
                });
            }
            Counted::Redis => {}
        }
    }

    /// Leases this node holds and renews.
    pub fn live_leases(&self) -> usize {
        self.shared.leases.lock().len()
    }

    /// The admission from a script reply; also teaches the shield what Redis said.
    fn apply(
        &self,
        key_id: &str,
        policy: &Policy,
        amounts: &Amounts,
        reply: &Reply,
        member: &str,
    ) -> Admission {
        let s = &self.shared;
        let now = reply.now_ms();
        let refused_call = reply.status == Status::Refused;
        let mut states: LimitStates = [None; LIMITS];
        let mut any_refused = false;
        for ((limit, value), &(start, used)) in policy.iter().zip(reply.windows()) {
            let cost = amounts.get(limit);
            let refused = refused_call && used.saturating_add(cost) > value;
            any_refused |= refused;
            states[limit.index()] = Some(LimitState {
                limit,
                value,
                used,
                cost,
                start,
                reset: limit.span().reset(now, start),
                refused,
            });
            if limit.meter() == Meter::Requests {
                match reply.status {
                    Status::Admitted => s.local.record_limit(key_id, limit, start, cost),
                    Status::Refused if refused => s.local.record_limit(key_id, limit, start, value),
                    _ => {}
                }
            }
        }
        let concurrency = policy.max_concurrent.map(|max| {
            let in_flight = reply.windows().get(policy.len()).map_or(0, |w| w.1);
            let max = u64::from(max);
            ConcurrencyState {
                value: max,
                in_flight,
                refused: refused_call && in_flight + 1 > max,
            }
        });
        if refused_call && !any_refused && !concurrency.is_some_and(|c| c.refused) {
            // Redis refused although nothing looks full (limits changed between the
            // call and now): refuse on the tightest window rather than admit.
            if let Some(st) = states
                .iter_mut()
                .flatten()
                .min_by_key(|st| st.value.saturating_sub(st.used))
            {
                st.refused = true;
            }
        }
        let verdict = judge(&states, concurrency);
        let settles = policy.needs_body() || policy.max_concurrent.is_some();
        let ticket = (verdict.allowed() && settles).then(|| Ticket {
            key_id: key_id.to_owned(),
            reserved: *amounts,
            starts: states.map(|st| st.map(|st| st.start)),
            counted: Counted::Redis,
            lease: policy
                .max_concurrent
                .map(|_| Lease::Redis(s.register_lease(key_id, member))),
        });
        Admission {
            verdict,
            degraded: false,
            ticket,
            states,
        }
    }

    /// Whether the breaker is open (limits decided by `on_failure`).
    pub fn is_degraded(&self) -> bool {
        self.shared.is_degraded()
    }
}

/// The counter of each result, resolved once: `count` runs on every limited request
/// and need not hash its label each time.
static CALL_COUNTERS: once_cell::sync::Lazy<[prometheus::IntCounter; 6]> =
    once_cell::sync::Lazy::new(|| {
        CallResult::ALL.map(|r| metrics::REDIS_CALLS.with_label_values(&[r.as_str()]))
    });

fn count(result: CallResult) {
    CALL_COUNTERS[result as usize].inc();
}

// === impl Shared ===

impl Shared {
    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// One script call with the timeout, the breaker and the clock updated.
    async fn run(&self, cmd: &Cmd, n: usize) -> Result<Reply, CallError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(
            self.timeout,
            self.call(cmd, script::WINDOWS_LUA, &self.sha),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        };
        let received = self.clock.local_us();
        if !matches!(result, Err(CallError::NotConnected)) {
            metrics::REDIS_LATENCY.observe(started.elapsed().as_secs_f64());
        }
        let reply = result.and_then(|v| Ok(script::parse_reply(&v, n)?));
        if let Ok(r) = &reply {
            // Even a stale reply carries Redis's time: learning from it is what
            // corrects an estimate that ran ahead.
            self.clock.observe(r.now_us, received);
        }
        match reply {
            Ok(r) if r.status != Status::Stale => {
                self.report(|b| b.on_success(), None);
                Ok(r)
            }
            Ok(_) => Err(self.failed(CallError::Stale)),
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn call(&self, cmd: &Cmd, lua: &str, sha: &str) -> Result<Value, CallError> {
        let conn = self.conn.load_full().ok_or(CallError::NotConnected)?;
        let mut c = (*conn).clone();
        let result = match cmd.query_async::<Value>(&mut c).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // Redis restarted or its scripts were flushed.
                match load_script(&mut c, lua, sha).await {
                    Ok(()) => cmd.query_async::<Value>(&mut c).await,
                    Err(CallError::Redis(e)) => Err(e),
                    Err(other) => return Err(other),
                }
            }
            r => r,
        };
        result.map_err(|e| {
            if e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error() {
                self.forget(&conn);
            }
            CallError::Redis(e)
        })
    }

    /// Drops `conn` (if still current) and wakes the background thread to reconnect.
    fn forget(&self, conn: &Arc<MultiplexedConnection>) {
        let current = self.conn.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            self.conn.compare_and_swap(&*current, None);
        }
        self.wake.notify_one();
    }

    fn failed(&self, e: CallError) -> CallError {
        self.report(|b| b.on_failure(Instant::now()), Some(&e));
        e
    }

    /// Applies a breaker event; a transition flips the degraded state, the gauge and
    /// logs one line, all under the breaker's lock so they never reorder.
    fn report(
        &self,
        event: impl FnOnce(&mut Breaker) -> Option<Transition>,
        why: Option<&CallError>,
    ) {
        let mut b = self.breaker.lock();
        match event(&mut b) {
            Some(Transition::Opened) => {
                self.degraded.store(true, Ordering::Relaxed);
                metrics::RATELIMIT_DEGRADED.inc();
                log::warn!(
                    "rate limits degraded: Redis is unavailable ({}); deciding with on_failure: {}",
                    why.map_or_else(|| "unknown".to_owned(), ToString::to_string),
                    self.on_failure.as_str()
                );
                // A black-holed connection never errors by itself: start afresh.
                self.conn.store(None);
                self.wake.notify_one();
            }
            Some(Transition::Closed) => {
                self.degraded.store(false, Ordering::Relaxed);
                metrics::RATELIMIT_DEGRADED.dec();
                log::info!("rate limits recovered: Redis answers again");
            }
            None => {}
        }
    }

    /// The admission while Redis cannot answer, per `on_failure`.
    fn fallback(&self, key_id: &str, policy: &Policy, amounts: &Amounts) -> Admission {
        let now = self.clock.now_ms();
        let mut a = match self.on_failure {
            OnFailure::LocalShare => super::admit_locally(
                &self.local,
                key_id,
                &policy.shared(self.nodes),
                amounts,
                now,
            ),
            OnFailure::Allow => {
                let states = self.local.peek_all(key_id, policy, amounts, now);
                let mut verdict = judge(&states, None);
                verdict.outcome = Outcome::Allow;
                Admission {
                    verdict,
                    degraded: true,
                    ticket: None,
                    states,
                }
            }
            OnFailure::Deny => Admission {
                verdict: Verdict {
                    outcome: Outcome::Unavailable,
                    ..Verdict::NONE
                },
                degraded: true,
                ticket: None,
                states: [None; LIMITS],
            },
        };
        a.degraded = true;
        a
    }

    fn register_lease(self: &Arc<Self>, key_id: &str, member: &str) -> LeaseGuard {
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        self.leases.lock().insert(
            id,
            LiveLease {
                key_id: key_id.to_owned(),
                member: member.to_owned(),
            },
        );
        LeaseGuard {
            shared: self.clone(),
            id,
        }
    }

    /// One settle.lua call; a failure is counted, never retried (the reservation
    /// then stays as reserved, and a lease expires within its TTL).
    async fn settle_call(&self, key_id: &str, adjust: &[SettleArg<'_>], member: Option<&str>) {
        let timeout_us = u64::try_from(SETTLE_TIMEOUT.as_micros()).unwrap_or(u64::MAX);
        let cmd = script::settle_cmd(
            &self.settle_sha,
            self.clock.deadline_us(timeout_us),
            adjust,
            member.map(|m| (key_id, m)),
        );
        let call = self.call(&cmd, script::SETTLE_LUA, &self.settle_sha);
        let ok = match tokio::time::timeout(SETTLE_TIMEOUT, call).await {
            Ok(Ok(Value::Array(v))) => matches!(v.first(), Some(Value::Int(1))),
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                log::debug!("settling a reservation failed: {e}");
                false
            }
            Err(_) => false,
        };
        if !ok {
            metrics::LIMIT_SETTLE_FAILURES
                .with_label_values(&[if adjust.is_empty() {
                    "release"
                } else {
                    "settle"
                }])
                .inc();
        }
    }

    /// Pushes every live lease's expiry one TTL ahead, in one pipeline.
    async fn renew(&self) {
        let ttl_ms = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let pipe = {
            let leases = self.leases.lock();
            if leases.is_empty() {
                return;
            }
            script::renew_pipe(
                leases
                    .values()
                    .map(|l| (l.key_id.as_str(), l.member.as_str())),
                self.clock.now_ms().saturating_add(ttl_ms),
                ttl_ms,
            )
        };
        let Some(conn) = self.conn.load_full() else {
            metrics::LIMIT_SETTLE_FAILURES
                .with_label_values(&["renew"])
                .inc();
            return;
        };
        let mut c = (*conn).clone();
        let r = tokio::time::timeout(SETTLE_TIMEOUT, pipe.query_async::<()>(&mut c)).await;
        if !matches!(r, Ok(Ok(()))) {
            metrics::LIMIT_SETTLE_FAILURES
                .with_label_values(&["renew"])
                .inc();
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, CallError> {
        // Requests time out on their own (tokio::time::timeout); no second timer.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        load_script(&mut conn, script::WINDOWS_LUA, &self.sha).await?;
        load_script(&mut conn, script::SETTLE_LUA, &self.settle_sha).await?;
        // Learn Redis's clock now, so even the first calls carry a deadline.
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let received = self.clock.local_us();
        self.clock.observe(
            secs.saturating_mul(1_000_000).saturating_add(micros),
            received,
        );
        Ok(conn)
    }

    /// While the breaker is open and a probe is due, runs the script with no
    /// windows (Redis answers, the script is loaded, the clock is learned).
    async fn probe_if_due(&self) {
        let admit = {
            let mut b = self.breaker.lock();
            if !b.is_open() {
                return;
            }
            b.admit(Instant::now())
        };
        if admit == Admit::Probe {
            let cmd = script::check_cmd(&self.sha, 0, std::iter::empty(), None);
            let result = self.run(&cmd, 0).await;
            count(match &result {
                Ok(_) => CallResult::Ok,
                Err(e) => e.result(),
            });
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Several limiters share the process-wide gauge (tests run many gateways).
        if self.degraded.load(Ordering::Relaxed) {
            metrics::RATELIMIT_DEGRADED.dec();
        }
    }
}

/// Every third of the lease TTL, renews this node's live leases; ends with the
/// limiter.
async fn renew_leases(shared: std::sync::Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(s) => s.lease_ttl / 3,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else {
            return;
        };
        s.renew().await;
    }
}

async fn load_script(
    conn: &mut MultiplexedConnection,
    lua: &str,
    sha: &str,
) -> Result<(), CallError> {
    let loaded: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(lua)
        .query_async(conn)
        .await?;
    if loaded.eq_ignore_ascii_case(sha) {
        Ok(())
    } else {
        Err(CallError::Hash)
    }
}

/// The background thread's loop: keep a connection, probe while the breaker is open.
async fn supervise(
    s: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
    first: std::sync::mpsc::Sender<()>,
) {
    let mut first = Some(first);
    let mut backoff = MIN_BACKOFF;
    loop {
        if s.conn.load().is_none() {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, s.connect());
            let result = tokio::select! {
                _ = &mut stopped => return,
                r = attempt => r.unwrap_or(Err(CallError::Timeout)),
            };
            let connected = match result {
                Ok(conn) => {
                    s.conn.store(Some(Arc::new(conn)));
                    // Forget connect failures counted while closed; an open breaker
                    // closes only on a probe within timeout_ms.
                    s.report(|b| if b.is_open() { None } else { b.on_success() }, None);
                    backoff = MIN_BACKOFF;
                    log::debug!("connected to Redis");
                    true
                }
                Err(e) => {
                    log::debug!("cannot connect to Redis: {e}");
                    s.report(|b| b.on_failure(Instant::now()), Some(&e));
                    false
                }
            };
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            if !connected {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = s.wake.notified() => {}
            _ = tokio::time::sleep(PROBE_TICK) => s.probe_if_due().await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn call_counters_are_indexed_by_discriminant() {
        for (i, r) in CallResult::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i);
        }
    }

    #[test]
    fn call_results_have_stable_labels() {
        let labels: Vec<&str> = CallResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ok",
                "denied",
                "error",
                "timeout",
                "short_circuit",
                "shielded"
            ]
        );
        assert_eq!(CallError::Stale.result(), CallResult::Timeout);
        assert_eq!(CallError::NotConnected.result(), CallResult::Error);
    }

    #[test]
    fn an_unusable_url_fails_start_without_showing_the_password() {
        let settings = RedisSettings {
            // This build has no TLS support in the Redis client.
            url: "rediss://:hunter2@127.0.0.1:1".into(),
            timeout: Duration::from_millis(20),
            on_failure: OnFailure::LocalShare,
            nodes: 1,
            lease_ttl: Duration::from_secs(30),
        };
        // Enabling the client's TLS feature would make this start (degraded).
        let Err(e) = RedisLimiter::start(&settings, LocalLimiter::new(64)) else {
            panic!("rediss:// needs the redis crate's TLS feature, which this build lacks")
        };
        let text = e.to_string();
        assert!(text.starts_with("redis.url cannot be used"), "{text}");
        assert!(text.contains("TLS"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
