//! Cluster-wide limits against real redis-servers this file starts, kills, pauses
//! and restarts: exact admission across nodes, all-or-nothing windows, NOSCRIPT
//! recovery, a black-holed or dead Redis under each `on_failure`, the local shield,
//! and the same failures seen through an in-process gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai4free::config::{OnFailure, RedisSettings};
use ai4free::limits::breaker::Breaker;
use ai4free::limits::redis::RedisLimiter;
use ai4free::limits::{Checked, Decision, LocalLimiter, RequestLimits, Window};
use common::eventually;
use common::gateway::{Options, TestGateway};
use common::http::{self, RawResponse};
use common::redis::{away_from_window_edge, RedisServer};
use serde_json::json;

const HOUR: u64 = 3_600_000;
const MINUTE: u64 = 60_000;
/// Cool-down for limiters built here, so recovery tests stay short.
const COOLDOWN: Duration = Duration::from_millis(300);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A key id no other test (or earlier run against the same server) uses.
fn fresh_key(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}{nanos}x{}", N.fetch_add(1, Ordering::Relaxed))
}

fn limiter(
    redis: &RedisServer,
    timeout_ms: u64,
    on_failure: OnFailure,
    nodes: u32,
) -> RedisLimiter {
    let settings = RedisSettings {
        url: redis.url(),
        timeout: Duration::from_millis(timeout_ms),
        on_failure,
        nodes,
        lease_ttl: Duration::from_secs(30),
    };
    RedisLimiter::with_breaker(
        &settings,
        LocalLimiter::new(4096),
        Breaker::new(3, COOLDOWN),
    )
    .unwrap()
}

fn limits(w: Window, n: u64) -> RequestLimits {
    let mut l = RequestLimits::default();
    l.0[w.index()] = Some(n);
    l
}

fn is_allow(c: &Checked) -> bool {
    matches!(c.decision, Some(Decision::Allow(_)))
}

/// `n` of one window's hash in Redis (0 when absent).
fn redis_count(redis: &RedisServer, key_id: &str, suffix: &str) -> u64 {
    let v: Option<u64> = redis::cmd("HGET")
        .arg(format!("a4f:{{{key_id}}}:rq:{suffix}"))
        .arg("n")
        .query(&mut redis.connection())
        .unwrap();
    v.unwrap_or(0)
}

#[test]
fn nodes_sharing_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    // A generous timeout and fail-closed: a slow call shows up as a failure, never
    // as a local admission that would blur the count.
    let nodes: Vec<Arc<RedisLimiter>> = (0..3)
        .map(|_| Arc::new(limiter(&redis, 2_000, OnFailure::Deny, 3)))
        .collect();
    let key = fresh_key("exact");
    const L: u64 = 37;
    const OFFERED: usize = 240;
    away_from_window_edge(HOUR, 10_000);
    let rt = runtime();
    let results: Vec<Checked> = rt.block_on(async {
        let tasks: Vec<_> = (0..OFFERED)
            .map(|i| {
                let node = nodes[i % nodes.len()].clone();
                let key = key.clone();
                tokio::spawn(async move { node.check(&key, &limits(Window::Hour, L)).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let admitted = results.iter().filter(|c| is_allow(c)).count() as u64;
    assert_eq!(admitted, L, "exactly the limit, across three nodes");
    for c in &results {
        assert!(!c.degraded, "{c:?}");
        match c.decision {
            Some(Decision::Allow(i)) => assert!(i.remaining < L),
            Some(Decision::Deny(i)) => {
                assert_eq!(i.window, Window::Hour);
                assert_eq!(i.remaining, 0);
                assert!(i.reset <= Duration::from_millis(HOUR));
            }
            other => panic!("{other:?}"),
        }
    }
    // Remaining values of the admitted requests are all distinct: 0..L.
    let mut rem: Vec<u64> = results
        .iter()
        .filter_map(|c| match c.decision {
            Some(Decision::Allow(i)) => Some(i.remaining),
            _ => None,
        })
        .collect();
    rem.sort_unstable();
    assert_eq!(rem, (0..L).collect::<Vec<_>>());
    assert_eq!(redis_count(&redis, &key, "1h"), L);
    // The window's key expires by the end of the window.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("a4f:{{{key}}}:rq:1h"))
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0 && ttl <= HOUR as i64, "{ttl}");
}

#[test]
fn a_refused_request_counts_in_no_window() {
    let redis = RedisServer::start();
    let l = limiter(&redis, 2_000, OnFailure::Deny, 1);
    let rt = runtime();
    away_from_window_edge(HOUR, 10_000);

    // The hour refuses first: the day must not count the refusals. Fresh nodes
    // (whose shields know nothing) make every refusal come from Redis itself.
    let key = fresh_key("aon");
    let both = RequestLimits([None, None, Some(3), Some(100)]);
    let fresh_nodes: Vec<RedisLimiter> = (0..3)
        .map(|_| limiter(&redis, 2_000, OnFailure::Deny, 1))
        .collect();
    rt.block_on(async {
        for _ in 0..3 {
            assert!(is_allow(&l.check(&key, &both).await));
        }
        for node in std::iter::once(&l).chain(&fresh_nodes) {
            let c = node.check(&key, &both).await;
            assert!(
                matches!(c.decision, Some(Decision::Deny(i)) if i.window == Window::Hour),
                "{c:?}"
            );
        }
    });
    assert_eq!(redis_count(&redis, &key, "1h"), 3);
    assert_eq!(redis_count(&redis, &key, "1d"), 3);

    // The day refuses: the hour must not count the refusals either. A second node
    // (no shield knowledge) makes the refusal come from Redis itself.
    let key = fresh_key("aon");
    let both = RequestLimits([None, None, Some(100), Some(2)]);
    let other = limiter(&redis, 2_000, OnFailure::Deny, 1);
    rt.block_on(async {
        assert!(is_allow(&l.check(&key, &both).await));
        assert!(is_allow(&l.check(&key, &both).await));
        for node in [&l, &other, &other] {
            let c = node.check(&key, &both).await;
            let Some(Decision::Deny(i)) = c.decision else {
                panic!("{c:?}")
            };
            assert_eq!(i.window, Window::Day);
            assert!(i.reset > Duration::from_millis(0));
        }
    });
    assert_eq!(redis_count(&redis, &key, "1h"), 2);
    assert_eq!(redis_count(&redis, &key, "1d"), 2);
}

/// The script on its own: EVAL with hand-made keys and arguments.
#[test]
fn the_script_counts_every_window_or_none() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let lua = ai4free::limits::script::WINDOWS_LUA;
    let eval = |con: &mut redis::Connection, deadline: u64, windows: &[(&str, u64, u64, u64)]| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(lua).arg(windows.len());
        for w in windows {
            cmd.arg(w.0);
        }
        // No lease: the member is ''.
        cmd.arg(deadline).arg("");
        for w in windows {
            cmd.arg(w.1).arg(w.2).arg(w.3);
        }
        cmd.query::<Vec<i64>>(con)
    };
    away_from_window_edge(HOUR, 10_000);
    let (a, b) = ("a4f:{t}:rq:1h", "a4f:{t}:rq:1d");
    let w = |cost_a: u64, cost_b: u64| [(a, HOUR, 5, cost_a), (b, 86_400_000, 100, cost_b)];
    let r = eval(&mut con, 0, &w(2, 1)).unwrap();
    assert_eq!(r[0], 1);
    let (now_ms, start_a, start_b) = (r[1] as u64 / 1_000, r[2] as u64, r[4] as u64);
    assert_eq!(start_a % HOUR, 0);
    assert_eq!(start_b % 86_400_000, 0);
    assert!(start_a <= now_ms && now_ms < start_a + HOUR);
    assert_eq!((r[3], r[5]), (2, 1));
    let r = eval(&mut con, 0, &w(3, 1)).unwrap();
    assert_eq!((r[0], r[3], r[5]), (1, 5, 2));
    // Full: refused, and neither window moves.
    let r = eval(&mut con, 0, &w(1, 1)).unwrap();
    assert_eq!((r[0], r[3], r[5]), (0, 5, 2));
    let n = |con: &mut redis::Connection, k: &str| -> u64 {
        redis::cmd("HGET").arg(k).arg("n").query(con).unwrap()
    };
    assert_eq!((n(&mut con, a), n(&mut con, b)), (5, 2));
    // A deadline in the past: nothing counted, no windows in the reply.
    let r = eval(&mut con, 1, &[(b, 86_400_000, 100, 1)]).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0], -1);
    assert_eq!(n(&mut con, b), 2);
    // A stale hash (an older window's start) counts as empty.
    let _: () = redis::cmd("HSET")
        .arg(b)
        .arg("s")
        .arg(start_b - 86_400_000)
        .query(&mut con)
        .unwrap();
    let r = eval(&mut con, 0, &[(b, 86_400_000, 100, 1)]).unwrap();
    assert_eq!((r[0], r[3]), (1, 1));
    // Keys expire at their window's end.
    let ttl: i64 = redis::cmd("PTTL").arg(a).query(&mut con).unwrap();
    assert!(ttl > 0 && ttl <= HOUR as i64, "{ttl}");
    // Arguments that do not match the keys are an error, not a guess.
    let mut bad = redis::cmd("EVAL");
    bad.arg(lua).arg(1).arg(a).arg(0).arg("").arg(HOUR);
    assert!(bad.query::<Vec<i64>>(&mut con).is_err());
}

#[test]
fn noscript_after_script_flush_is_recovered_transparently() {
    let redis = RedisServer::start();
    let l = limiter(&redis, 2_000, OnFailure::Deny, 1);
    let key = fresh_key("noscript");
    let rt = runtime();
    away_from_window_edge(HOUR, 10_000);
    rt.block_on(async {
        assert!(is_allow(&l.check(&key, &limits(Window::Hour, 10)).await));
    });
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.connection())
        .unwrap();
    let loads_before = redis.command_calls("script|load");
    rt.block_on(async {
        for _ in 0..3 {
            let c = l.check(&key, &limits(Window::Hour, 10)).await;
            assert!(is_allow(&c) && !c.degraded, "{c:?}");
        }
    });
    assert_eq!(redis_count(&redis, &key, "1h"), 4);
    // Reloaded once, on the first NOSCRIPT; the later calls found it again.
    assert_eq!(redis.command_calls("script|load"), loads_before + 1);
    assert!(!l.is_degraded());
}

#[test]
fn a_paused_redis_times_out_opens_the_breaker_and_follows_on_failure() {
    let mut redis = RedisServer::start();
    const TIMEOUT_MS: u64 = 50;
    let share = limiter(&redis, TIMEOUT_MS, OnFailure::LocalShare, 3);
    let allow = limiter(&redis, TIMEOUT_MS, OnFailure::Allow, 3);
    let deny = limiter(&redis, TIMEOUT_MS, OnFailure::Deny, 3);
    let nodes = [&share, &allow, &deny];
    let rt = runtime();
    away_from_window_edge(HOUR, 10_000);
    let key = fresh_key("paused");
    let hour9 = limits(Window::Hour, 9);
    // Healthy: one request per node counted in Redis (and each clock synced).
    rt.block_on(async {
        for n in nodes {
            let c = n.check(&key, &hour9).await;
            assert!(is_allow(&c) && !c.degraded, "{c:?}");
        }
    });
    assert_eq!(redis_count(&redis, &key, "1h"), 3);

    redis.pause();
    let bound = Duration::from_millis(TIMEOUT_MS + 50);
    rt.block_on(async {
        for n in nodes {
            // Until the breaker opens, each call waits for the timeout, no longer.
            for _ in 0..3 {
                let t = Instant::now();
                let c = n.check(&key, &hour9).await;
                assert!(t.elapsed() < bound, "{:?}", t.elapsed());
                assert!(c.degraded, "{c:?}");
            }
            assert!(n.is_degraded());
            // Open: no wait at all.
            let t = Instant::now();
            let _ = n.check(&key, &hour9).await;
            assert!(
                t.elapsed() < Duration::from_millis(TIMEOUT_MS),
                "{:?}",
                t.elapsed()
            );
        }
        let gauge = ai4free::metrics::RATELIMIT_DEGRADED.get();
        assert!(gauge >= 3, "{gauge}");

        // local_share: ceil(9 / 3) = 3 per node in this window, on a fresh key.
        let k = fresh_key("share");
        let got: Vec<bool> = futures_all(&share, &k, &hour9, 5).await;
        assert_eq!(got, [true, true, true, false, false]);
        let c = share.check(&k, &hour9).await;
        assert!(
            matches!(c.decision, Some(Decision::Deny(i)) if i.limit == 3),
            "{c:?}"
        );
        // allow: everything passes.
        let got = futures_all(&allow, &fresh_key("allow"), &hour9, 20).await;
        assert!(got.iter().all(|a| *a));
        // deny: 503 material.
        let c = deny.check(&fresh_key("deny"), &hour9).await;
        assert_eq!(c.decision, Some(Decision::Unavailable));
        assert!(c.degraded);
    });

    redis.resume();
    for n in nodes {
        eventually(Duration::from_secs(5), "full service after resume", || {
            !n.is_degraded()
        });
        let c = rt.block_on(n.check(&key, &hour9));
        assert!(is_allow(&c) && !c.degraded, "{c:?}");
    }
    // The calls that timed out while Redis was paused reached it and ran after
    // their deadline: they counted nothing. Only the six answered calls count.
    assert_eq!(redis_count(&redis, &key, "1h"), 6);
}

/// Runs `n` checks in a row; whether each was admitted.
async fn futures_all(l: &RedisLimiter, key: &str, limits: &RequestLimits, n: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let c = l.check(key, limits).await;
        assert!(c.degraded, "{c:?}");
        out.push(is_allow(&c));
    }
    out
}

#[test]
fn redis_down_at_start_then_killed_and_restarted() {
    let mut redis = RedisServer::start();
    redis.kill();
    let t = Instant::now();
    let l = limiter(&redis, 50, OnFailure::LocalShare, 1);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "start waited {:?}",
        t.elapsed()
    );
    // Nothing to connect to: the background connector alone opens the breaker.
    eventually(Duration::from_secs(3), "degraded without traffic", || {
        l.is_degraded()
    });
    let rt = runtime();
    away_from_window_edge(HOUR, 10_000);
    let key = fresh_key("down");
    let hour = limits(Window::Hour, 100);
    let c = rt.block_on(l.check(&key, &hour));
    assert!(is_allow(&c) && c.degraded, "{c:?}");

    redis.restart();
    let took = eventually(Duration::from_secs(5), "recovery after start", || {
        !l.is_degraded()
    });
    assert!(took < Duration::from_secs(3), "{took:?}");
    let c = rt.block_on(l.check(&key, &hour));
    assert!(is_allow(&c) && !c.degraded, "{c:?}");

    // SIGKILL under the limiter: calls fail fast, never past the timeout.
    redis.kill();
    rt.block_on(async {
        for _ in 0..5 {
            let t = Instant::now();
            let c = l.check(&key, &hour).await;
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "{:?}",
                t.elapsed()
            );
            assert!(c.degraded);
        }
    });
    assert!(l.is_degraded());
    // A new, empty Redis on the same port (no scripts loaded, no counts).
    redis.restart();
    eventually(Duration::from_secs(5), "recovery after restart", || {
        !l.is_degraded()
    });
    let c = rt.block_on(l.check(&key, &hour));
    assert!(is_allow(&c) && !c.degraded, "{c:?}");
    assert_eq!(redis_count(&redis, &key, "1h"), 1);
}

#[test]
fn a_flood_from_one_key_does_not_become_a_flood_on_redis() {
    let redis = RedisServer::start();
    let l = Arc::new(limiter(&redis, 2_000, OnFailure::Deny, 1));
    let key = fresh_key("flood");
    const L: u64 = 10;
    const ATTEMPTS: usize = 2_000;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut redis.connection())
        .unwrap();
    away_from_window_edge(HOUR, 10_000);
    let rt = runtime();
    let admitted: usize = rt.block_on(async {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (l, key) = (l.clone(), key.clone());
                tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..ATTEMPTS / 20 {
                        if is_allow(&l.check(&key, &limits(Window::Hour, L)).await) {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    });
    assert_eq!(admitted as u64, L);
    let calls = redis.command_calls("evalsha");
    // L admissions, then at most one refusal per concurrent caller before the
    // shield knows the window is full.
    assert!(
        (L..=L + 20).contains(&calls),
        "{calls} Redis calls for {ATTEMPTS} attempts"
    );
}

// === Through the gateway ===

fn chat() -> serde_json::Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

fn post(gw: &TestGateway, key: &str) -> (RawResponse, Duration) {
    let t = Instant::now();
    let r = common::gateway::rt()
        .block_on(http::post_json(
            gw.addr,
            "/v1/chat/completions",
            Some(key),
            &chat(),
            &[],
        ))
        .unwrap();
    (r, t.elapsed())
}

fn degraded(r: &RawResponse) -> bool {
    r.header("x-ai4free-ratelimit").as_deref() == Some("degraded")
}

fn gauge(gw: &TestGateway) -> i64 {
    let r = common::gateway::rt()
        .block_on(http::get(gw.metrics_addr, "/metrics", None))
        .unwrap();
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix("ai4free_ratelimit_degraded "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn gateway_with_redis_paused_says_degraded_follows_on_failure_and_recovers() {
    let mut redis = RedisServer::start();
    const TIMEOUT_MS: u64 = 50;
    let gw_deny = TestGateway::with(Options {
        extra_yaml: format!(
            "redis: {{ url: \"{}\", timeout_ms: {TIMEOUT_MS}, on_failure: deny, nodes: 1 }}",
            redis.url()
        ),
        ..Default::default()
    });
    // The free tier allows 5 per minute: each of 5 nodes gets 1 while degraded.
    let gw_share = TestGateway::with(Options {
        extra_yaml: format!(
            "redis: {{ url: \"{}\", timeout_ms: {TIMEOUT_MS}, on_failure: local_share, nodes: 5 }}",
            redis.url()
        ),
        ..Default::default()
    });
    let (_, key_deny) = gw_deny.create_key("free", &[], None);
    let (_, key_share) = gw_share.create_key("free", &[], None);
    away_from_window_edge(MINUTE, 5_000);

    // Healthy: Redis decides, nothing says degraded.
    let (r, _) = post(&gw_deny, &key_deny);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!degraded(&r));
    assert_eq!(r.header("x-ratelimit-limit-requests").as_deref(), Some("5"));
    assert_eq!(
        r.header("x-ratelimit-remaining-requests").as_deref(),
        Some("4")
    );

    redis.pause();
    let bound = Duration::from_millis(TIMEOUT_MS + 300);
    for _ in 0..5 {
        let (r, took) = post(&gw_deny, &key_deny);
        assert!(took < bound, "{took:?}");
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(degraded(&r));
        assert_eq!(r.json()["error"]["code"], "rate_limiter_unavailable");
        assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    }
    // Every response says so while it lasts, even one that needs no limit.
    let h = common::gateway::rt()
        .block_on(http::get(gw_deny.addr, "/healthz", None))
        .unwrap();
    assert_eq!(h.status, 200);
    assert!(degraded(&h));
    assert!(gauge(&gw_deny) >= 1);

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (r, took) = post(&gw_share, &key_share);
        assert!(took < bound, "{took:?}");
        assert!(degraded(&r));
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 429, 429, 429]);

    redis.resume();
    eventually(Duration::from_secs(5), "degraded header disappears", || {
        let (r, _) = post(&gw_deny, &key_deny);
        !degraded(&r) && r.status == 200
    });
    let (r, _) = post(&gw_deny, &key_deny);
    assert_eq!(r.status, 200);
    assert!(!degraded(&r));
    // Only answered calls counted (one before, two since): the calls that timed out
    // while Redis was paused ran after their deadline and counted nothing.
    assert_eq!(
        r.header("x-ratelimit-remaining-requests").as_deref(),
        Some("2")
    );
    let rows = gw_deny.wait_rows(1);
    assert!(rows.iter().any(|r| r.status == 503));
}
