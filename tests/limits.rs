//! Token, spend and concurrency limits end to end: reservations and settlements in
//! Redis (windows.lua / settle.lua), concurrency leases that outlive a dead node by
//! at most their TTL, and the same limits through in-process gateways with and
//! without Redis (headers, 429 bodies, budgets, the over-admission bound).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai4free::config::{OnFailure, RedisSettings, UsdAmount};
use ai4free::keys::{self, KeyLimits, KeyRecord};
use ai4free::limits::breaker::Breaker;
use ai4free::limits::policy::{Hit, Span};
use ai4free::limits::redis::RedisLimiter;
use ai4free::limits::{Amounts, Limit, LocalLimiter, Outcome, Policy};
use ai4free::tokens::count::{count_chat_prompt, Tokenizer};
use ai4free::usage::TokenSource;
use common::eventually;
use common::gateway::{rt, Options, TestGateway};
use common::http::{self, RawResponse};
use common::redis::{away_from_window_edge, RedisServer};
use serde_json::{json, Value};

const DAY: u64 = 86_400_000;

fn fresh_key(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}{nanos}x{}", N.fetch_add(1, Ordering::Relaxed))
}

fn unix_ms() -> u64 {
    ai4free::usage::now_ms() as u64
}

fn limiter(redis: &RedisServer, lease_ttl_ms: u64) -> RedisLimiter {
    let settings = RedisSettings {
        url: redis.url(),
        timeout: Duration::from_millis(2_000),
        on_failure: OnFailure::Deny,
        nodes: 1,
        lease_ttl: Duration::from_millis(lease_ttl_ms),
    };
    RedisLimiter::with_breaker(
        &settings,
        LocalLimiter::new(4096),
        Breaker::new(3, Duration::from_millis(300)),
    )
    .unwrap()
}

fn redis_n(redis: &RedisServer, key: &str) -> (Option<u64>, u64) {
    let v: (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("s")
        .arg("n")
        .query(&mut redis.connection())
        .unwrap();
    (v.0, v.1.unwrap_or(0))
}

#[test]
fn tokens_and_spend_reserve_and_settle_exactly_in_redis() {
    let redis = RedisServer::start();
    let l = limiter(&redis, 30_000);
    let key = fresh_key("settle");
    let mut p = Policy::default();
    p.limits[Limit::RequestsPerMinute.index()] = Some(100);
    p.limits[Limit::TokensPerMinute.index()] = Some(1_000);
    p.limits[Limit::SpendPerMonth.index()] = Some(100_000);
    away_from_window_edge(60_000, 10_000);
    let rt = rt();
    let first = rt.block_on(l.admit(&key, &p, &Amounts::billed(600, 60_000), "req_a"));
    assert!(first.verdict.allowed(), "{:?}", first.verdict);
    let tokens = first.verdict.tokens.unwrap();
    assert_eq!((tokens.limit, tokens.remaining), (1_000, 400));
    let tk = format!("a4f:{{{key}}}:tk:1m");
    let usd = format!("a4f:{{{key}}}:usd:mo");
    let rq = format!("a4f:{{{key}}}:rq:1m");
    assert_eq!(redis_n(&redis, &tk).1, 600);
    // The month window starts where the Rust calendar math says (Lua ≡ Rust).
    let (start, n) = redis_n(&redis, &usd);
    assert_eq!(n, 60_000);
    assert_eq!(start, Some(Span::Month.start(unix_ms())));
    // 600 more tokens do not fit: refused, named, nothing counted anywhere.
    let second = rt.block_on(l.admit(&key, &p, &Amounts::billed(600, 1), "req_b"));
    let Outcome::Deny(r) = second.verdict.outcome else {
        panic!("{:?}", second.verdict)
    };
    assert_eq!(r.hit, Hit::Limit(Limit::TokensPerMinute));
    assert_eq!((r.value, r.used, r.requested), (1_000, 600, 600));
    assert!(second.ticket.is_none());
    assert_eq!(redis_n(&redis, &tk).1, 600);
    assert_eq!(redis_n(&redis, &rq).1, 1);
    // The first request used 100 tokens costing 10,000 nano-USD: settle refunds
    // the difference in exactly the windows it was counted in.
    l.settle(first.ticket.unwrap(), &Amounts::billed(100, 10_000));
    eventually(Duration::from_secs(5), "settled", || {
        redis_n(&redis, &tk).1 == 100
    });
    assert_eq!(redis_n(&redis, &usd).1, 10_000);
    assert_eq!(
        redis_n(&redis, &rq).1,
        1,
        "the request itself stays counted"
    );
    let third = rt.block_on(l.admit(&key, &p, &Amounts::billed(600, 1), "req_c"));
    assert!(third.verdict.allowed());
    // A top-up past the limit is recorded (the bound), and later requests wait.
    l.settle(third.ticket.unwrap(), &Amounts::billed(1_500, 1));
    eventually(Duration::from_secs(5), "topped up", || {
        redis_n(&redis, &tk).1 == 1_600
    });
    let fourth = rt.block_on(l.admit(&key, &p, &Amounts::billed(1, 1), "req_d"));
    assert!(!fourth.verdict.allowed());
    assert_eq!(fourth.verdict.tokens.unwrap().remaining, 0);
    // A reservation into a window that has since rolled over is not adjusted.
    let stale_key = fresh_key("stale");
    let t = rt.block_on(l.admit(&stale_key, &p, &Amounts::billed(50, 1), "req_e"));
    let stk = format!("a4f:{{{stale_key}}}:tk:1m");
    let _: () = redis::cmd("HSET")
        .arg(&stk)
        .arg("s")
        .arg(0)
        .query(&mut redis.connection())
        .unwrap();
    l.settle(t.ticket.unwrap(), &Amounts::billed(0, 0));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(redis_n(&redis, &stk).1, 50);
}

#[test]
fn a_dead_nodes_leases_expire_within_the_ttl_and_live_ones_are_renewed() {
    const TTL_MS: u64 = 600;
    let redis = RedisServer::start();
    let a = limiter(&redis, TTL_MS);
    let b = limiter(&redis, TTL_MS);
    let key = fresh_key("lease");
    let p = Policy {
        max_concurrent: Some(2),
        ..Policy::default()
    };
    let rt = rt();
    let admit =
        |l: &RedisLimiter, member: &str| rt.block_on(l.admit(&key, &p, &Amounts::REQUEST, member));
    let t1 = admit(&a, "a1");
    let t2 = admit(&a, "a2");
    assert!(t1.verdict.allowed() && t2.verdict.allowed());
    let refused = admit(&b, "b1");
    let Outcome::Deny(r) = refused.verdict.outcome else {
        panic!("{:?}", refused.verdict)
    };
    assert_eq!((r.hit, r.value, r.used), (Hit::Concurrency, 2, 2));
    // Live leases are renewed: still held after three TTLs.
    std::thread::sleep(Duration::from_millis(3 * TTL_MS));
    assert!(!admit(&b, "b2").verdict.allowed());
    assert_eq!(a.live_leases(), 2);
    // A release frees its slot at once.
    let (t1, t2) = (t1.ticket.unwrap(), t2.ticket.unwrap());
    a.settle(t1, &Amounts::REQUEST);
    eventually(Duration::from_secs(2), "released", || {
        admit(&b, "b3").ticket.is_some_and(|t| {
            b.settle(t, &Amounts::REQUEST);
            true
        })
    });
    // Node a takes the second slot again, then dies holding both: no release, no
    // renewal.
    let mut t3 = None;
    eventually(Duration::from_secs(2), "b3 released", || {
        t3 = admit(&a, "a3").ticket;
        t3.is_some()
    });
    std::mem::forget((t2, t3));
    drop(a);
    let killed = Instant::now();
    assert!(
        !admit(&b, "b4").verdict.allowed(),
        "still held right after the kill"
    );
    let mut held = Vec::new();
    eventually(
        Duration::from_millis(TTL_MS + 2_000),
        "dead node's slots freed",
        || {
            // Members are request ids: unique.
            let member = format!("b5-{}", held.len());
            if let Some(t) = admit(&b, &member).ticket {
                held.push(t);
            }
            held.len() == 2
        },
    );
    let freed_after = killed.elapsed();
    assert!(
        freed_after <= Duration::from_millis(TTL_MS + 2_000),
        "{freed_after:?}"
    );
    assert!(!admit(&b, "b6").verdict.allowed(), "full again");
    assert_eq!(b.live_leases(), 2);
}

// === through a gateway ===

fn key_with_limits(gw: &TestGateway, limits: KeyLimits) -> (String, String) {
    key_in_tier(gw, "pro", limits)
}

fn key_in_tier(gw: &TestGateway, tier: &str, limits: KeyLimits) -> (String, String) {
    let k = keys::generate().unwrap();
    let rec = KeyRecord {
        limits,
        ..KeyRecord::new(
            k.id.clone(),
            tier.into(),
            k.secret_hash,
            ai4free::usage::now_ms(),
        )
    };
    rt().block_on(gw.store().insert_key(&rec)).unwrap();
    (k.id, k.key)
}

fn gateway(with_redis: bool) -> TestGateway {
    gateway_with_tiers(with_redis, &[])
}

fn gateway_with_tiers(with_redis: bool, tiers: &[&str]) -> TestGateway {
    TestGateway::with(Options {
        extra_tiers: tiers.iter().map(|t| t.to_string()).collect(),
        extra_yaml: if with_redis {
            "redis: { url: \"redis://127.0.0.1:6379\", timeout_ms: 2000, on_failure: deny }\n"
                .into()
        } else {
            String::new()
        },
        ..Default::default()
    })
}

fn chat(words: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]})
}

fn post(gw: &TestGateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> RawResponse {
    rt().block_on(http::post_json(
        gw.addr,
        "/v1/chat/completions",
        Some(key),
        body,
        headers,
    ))
    .unwrap()
}

fn prompt_tokens(body: &Value) -> u64 {
    count_chat_prompt(Tokenizer::O200kBase, &serde_json::to_vec(body).unwrap()).unwrap()
}

#[test]
fn every_header_is_present_and_right_on_allowed_and_refused_responses() {
    for with_redis in [false, true] {
        let gw = gateway(with_redis);
        let (_, key) = key_with_limits(
            &gw,
            KeyLimits {
                requests_per_minute: Some(10),
                requests_per_day: Some(1_000),
                tokens_per_minute: Some(200),
                tokens_per_day: Some(100_000),
                ..KeyLimits::default()
            },
        );
        away_from_window_edge(60_000, 10_000);
        let mut body = chat("Count me exactly.");
        body["max_tokens"] = json!(40);
        let p = prompt_tokens(&body);
        let mock = [
            ("x-mock-prompt-tokens", p.to_string()),
            ("x-mock-completion-tokens", "40".to_string()),
        ];
        let mock: Vec<(&str, &str)> = mock.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut used = 0;
        loop {
            let r = post(&gw, &key, &body, &mock);
            let h = |n: &str| {
                r.header(n)
                    .unwrap_or_else(|| panic!("{n} missing ({with_redis})"))
            };
            assert_eq!(h("x-ratelimit-limit-requests"), "10");
            assert_eq!(h("x-ratelimit-limit-tokens"), "200");
            let reset = h("x-ratelimit-reset-tokens");
            assert!(reset.ends_with('s') && !reset.contains('h'), "{reset}");
            assert!(h("x-ratelimit-reset-requests").ends_with('s'));
            if r.status == 200 {
                used += 1;
                // Reserved and settled at the same numbers: remaining is exact.
                assert_eq!(h("x-ratelimit-remaining-requests"), (10 - used).to_string());
                assert_eq!(
                    h("x-ratelimit-remaining-tokens"),
                    (200 - used * (p + 40)).to_string()
                );
                assert!(r.header("retry-after").is_none());
                // Settlement is asynchronous with Redis.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            assert_eq!(r.status, 429, "{}", r.text());
            assert_eq!(used, 200 / (p + 40), "admitted exactly what fits");
            let v = r.json();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
            assert_eq!(v["error"]["type"], "tokens");
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains("tokens_per_minute: limit 200"), "{m}");
            assert!(m.contains("resets in"), "{m}");
            let retry: u64 = h("retry-after").parse().unwrap();
            assert!((1..=60).contains(&retry), "{retry}");
            assert_eq!(
                h("x-ratelimit-remaining-tokens"),
                (200 - used * (p + 40)).to_string()
            );
            break;
        }
        // A request whose reservation alone exceeds the limit: 400, not a retry loop.
        let mut big = chat("x");
        big["max_tokens"] = json!(500);
        let r = post(&gw, &key, &big, &[]);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "request_exceeds_limit");
        assert!(r.header("retry-after").is_none());
        // It reserved nothing but still reports the limits as they stand.
        assert_eq!(r.header("x-ratelimit-limit-tokens").as_deref(), Some("200"));
        assert_eq!(
            r.header("x-ratelimit-remaining-tokens"),
            Some((200 - used * (p + 40)).to_string()),
            "{with_redis}"
        );
        assert_eq!(
            r.header("x-ratelimit-limit-requests").as_deref(),
            Some("10")
        );
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some((10 - used).to_string())
        );
        assert_eq!(gw.mock.request_count(), used as usize);
    }
}

#[test]
fn a_spend_budget_stops_a_key_at_the_price_tables_numbers() {
    for with_redis in [false, true] {
        let gw = gateway(with_redis);
        // gpt-4o-mini: 0.15 USD in, 0.60 USD out per million tokens. A prompt of a
        // multiple of 20 tokens and 5 completion tokens costs a whole micro-USD.
        let mut words = String::from("Spend");
        let mut body = chat(&words);
        while !prompt_tokens(&body).is_multiple_of(20) {
            words.push_str(" more");
            body = chat(&words);
        }
        body["max_tokens"] = json!(5);
        let p = prompt_tokens(&body);
        let cost_micros = (p * 150_000 + 5 * 600_000) / 1_000_000;
        assert_eq!((p * 150_000 + 5 * 600_000) % 1_000_000, 0);
        let headers = [
            ("x-mock-prompt-tokens", p.to_string()),
            ("x-mock-completion-tokens", "5".to_string()),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (budget, admitted) in [(3 * cost_micros, 3), (3 * cost_micros - 1, 2)] {
            let (id, key) = key_with_limits(
                &gw,
                KeyLimits {
                    spend_usd_per_day: Some(UsdAmount { micros: budget }),
                    ..KeyLimits::default()
                },
            );
            away_from_window_edge(DAY, 10_000);
            let mut ok = 0;
            for _ in 0..admitted + 2 {
                let r = post(&gw, &key, &body, &headers);
                if r.status == 200 {
                    ok += 1;
                    std::thread::sleep(Duration::from_millis(100));
                } else {
                    assert_eq!(r.status, 429, "{}", r.text());
                    let m = r.json()["error"]["message"].as_str().unwrap().to_owned();
                    assert!(m.contains("spend_usd_per_day"), "{m}");
                }
            }
            assert_eq!(
                ok, admitted,
                "budget {budget} µUSD, cost {cost_micros} µUSD ({with_redis})"
            );
            if with_redis {
                let (_, n) = redis_n_shared(&format!("a4f:{{{id}}}:usd:1d"));
                assert_eq!(n, admitted * cost_micros * 1_000, "nano-USD settled");
            }
        }
    }
}

fn redis_n_shared(key: &str) -> (Option<u64>, u64) {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut con = client.get_connection().unwrap();
    let v: (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("s")
        .arg("n")
        .query(&mut con)
        .unwrap();
    (v.0, v.1.unwrap_or(0))
}

/// 200 concurrent streams against one key's token budget. Each reserves its exact
/// prompt plus `default_max_tokens` (5) but uses 20 completion tokens, so each
/// admitted stream tops up 15 after the fact. The documented bound: the settled
/// total exceeds the limit by at most the top-ups of requests in flight at the
/// last admission, itself at most the sum of all admitted requests' top-ups.
#[test]
fn concurrent_streams_against_a_token_budget_stay_within_the_bound() {
    let gw = gateway(true);
    const LIMIT: u64 = 2_000;
    const STREAMS: usize = 200;
    let (id, key) = key_with_limits(
        &gw,
        KeyLimits {
            tokens_per_day: Some(LIMIT),
            default_max_tokens: Some(5),
            ..KeyLimits::default()
        },
    );
    away_from_window_edge(DAY, 60_000);
    let mut body = chat("Stream to the budget");
    body["stream"] = json!(true);
    let p = prompt_tokens(&body);
    let req = http::json_request(
        "/v1/chat/completions",
        Some(&key),
        &body,
        &[
            ("x-mock-prompt-tokens", &p.to_string()),
            ("x-mock-completion-tokens", "20"),
            ("x-mock-chunk-delay-ms", "20"),
        ],
    );
    let req = Arc::new(req);
    let statuses: Vec<u16> = rt().block_on(async {
        let tasks: Vec<_> = (0..STREAMS)
            .map(|_| {
                let req = req.clone();
                let addr = gw.addr;
                tokio::spawn(async move {
                    let s = http::stream(addr, &req).await.unwrap();
                    let status = s.status;
                    s.read_to_end().await.unwrap();
                    status
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(admitted + refused, STREAMS as u64, "{statuses:?}");
    assert!(admitted > 0 && refused > 0, "{admitted} admitted");
    let (reserved, actual) = (p + 5, p + 20);
    // Reservations alone never pass the limit.
    assert!(admitted * reserved <= LIMIT, "{admitted} × {reserved}");
    let settled = admitted * actual;
    let bound = LIMIT + admitted * (actual - reserved);
    let tk = format!("a4f:{{{id}}}:tk:1d");
    eventually(Duration::from_secs(10), "all settled", || {
        redis_n_shared(&tk).1 == settled
    });
    assert!(settled <= bound, "settled {settled} > bound {bound}");
    let rows = gw.wait_rows(STREAMS);
    let billed: u64 = rows
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    assert_eq!(billed, settled, "Redis holds exactly what was billed");
    // The budget is now spent: the next stream is refused.
    let r = rt().block_on(http::send(gw.addr, &req)).unwrap();
    assert_eq!(r.status, 429);
}

#[test]
fn concurrency_slots_are_held_while_streaming_and_freed_after() {
    for with_redis in [false, true] {
        let gw = gateway(with_redis);
        let (_, key) = key_with_limits(
            &gw,
            KeyLimits {
                max_concurrent: Some(1),
                ..KeyLimits::default()
            },
        );
        let mut body = chat("Hold a slot");
        body["stream"] = json!(true);
        let req = http::json_request(
            "/v1/chat/completions",
            Some(&key),
            &body,
            &[("x-mock-chunk-delay-ms", "50"), ("x-mock-words", "10")],
        );
        rt().block_on(async {
            let mut s = http::stream(gw.addr, &req).await.unwrap();
            assert_eq!(s.status, 200);
            s.next_chunk().await.unwrap();
            let r = http::send(gw.addr, &req).await.unwrap();
            assert_eq!(r.status, 429, "{with_redis}");
            let m = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(m.contains("max_concurrent: limit 1"), "{m}");
            assert_eq!(r.header("retry-after").as_deref(), Some("1"));
            // A client that disconnects frees its slot too.
            drop(s);
        });
        eventually(Duration::from_secs(3), "slot freed", || {
            rt().block_on(http::send(gw.addr, &req)).unwrap().status == 200
        });
    }
}

// === cut streams ===

fn delivered_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The key's settled `tokens_per_minute` count, read from the headers of a probe
/// whose reservation can never fit (a 400 that counts nothing), so it works for
/// the local limiter and Redis alike.
fn settled_tokens(gw: &TestGateway, key: &str, limit: u64) -> u64 {
    let mut probe = chat("probe");
    probe["max_tokens"] = json!(limit + 1);
    let r = post(gw, key, &probe, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    limit - remaining
}

/// Waits until the settled count is `want` (Redis settles off the request path).
fn settles_to(gw: &TestGateway, key: &str, limit: u64, want: u64, what: &str) {
    let mut last = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        last = settled_tokens(gw, key, limit);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: settled {last}, want {want}");
}

/// The proxied call's usage row of key `id` (probes' 400 rows are skipped).
fn row_of(gw: &TestGateway, id: &str) -> ai4free::usage::UsageRecord {
    let mut found = None;
    eventually(Duration::from_secs(10), "the usage row", || {
        found = gw
            .usage_rows()
            .into_iter()
            .find(|r| r.key_id == id && r.status != 400);
        found.is_some()
    });
    found.unwrap()
}

/// The most tokens one of the mock's first `n` completion pieces counts.
fn largest_piece(n: usize) -> u64 {
    (0..n)
        .map(|i| {
            let (a, b) = (
                ai4free::mock::completion_text(i),
                ai4free::mock::completion_text(i + 1),
            );
            Tokenizer::O200kBase.count(&b[a.len()..])
        })
        .max()
        .unwrap()
}

#[test]
fn enforce_mid_stream_ends_the_stream_at_the_allowance_and_bills_what_was_delivered() {
    const ALLOWANCE: u64 = 60;
    for with_redis in [false, true] {
        let mut body = chat("Tell me a long story");
        body["stream"] = json!(true);
        let p = prompt_tokens(&body);
        // The request reserves p + 5 (default_max_tokens); the window leaves it
        // p + ALLOWANCE, so the completion may take ALLOWANCE tokens.
        let limit = p + ALLOWANCE;
        let tiers = [
            format!("cut: {{ tokens_per_minute: {limit}, default_max_tokens: 5, enforce_mid_stream: true }}"),
            format!("overrun: {{ tokens_per_minute: {limit}, default_max_tokens: 5 }}"),
        ];
        let tiers: Vec<&str> = tiers.iter().map(String::as_str).collect();
        let gw = gateway_with_tiers(with_redis, &tiers);
        away_from_window_edge(60_000, 15_000);
        let p_header = p.to_string();
        let headers = [
            ("x-mock-words", "200"),
            ("x-mock-prompt-tokens", p_header.as_str()),
        ];

        // With enforce_mid_stream: the stream stops before it passes the limit.
        let (id, key) = key_in_tier(&gw, "cut", KeyLimits::default());
        let r = post(&gw, &key, &body, &headers);
        assert_eq!(r.status, 200, "{}", r.text());
        let events = http::sse_data(&r.body);
        let text = r.text();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], "rate_limit_exceeded", "{text}");
        assert_eq!(err["error"]["type"], "tokens");
        let m = err["error"]["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("tokens_per_minute: limit {limit}")),
            "{m}"
        );
        assert!(
            !text.contains("finish_reason\":\"stop"),
            "a cut stream must not look finished"
        );
        assert_eq!(events.iter().filter(|e| e.contains("\"error\"")).count(), 1);
        let delivered = delivered_text(&events);
        let counted = Tokenizer::O200kBase.count(&delivered);
        // The cut rule: the running sum of each delta's own count stays within
        // the allowance, and the next piece would have passed it. The exact
        // count of the whole text is at most that sum (merges across deltas).
        let running: u64 = events
            .iter()
            .map(|e| Tokenizer::O200kBase.count(&delivered_text(std::slice::from_ref(e))))
            .sum();
        assert!(running <= ALLOWANCE, "{running} delivered ({with_redis})");
        assert!(
            running + largest_piece(200) > ALLOWANCE,
            "stopped early: {running} of {ALLOWANCE} ({with_redis})"
        );
        assert!(counted <= running && counted > 0);
        let row = row_of(&gw, &id);
        assert_eq!(row.token_source, TokenSource::Partial);
        assert_eq!(row.error.as_deref(), Some("rate_limit_exceeded"));
        assert_eq!((row.prompt_tokens, row.completion_tokens), (p, counted));
        // The window settles to what was delivered, not to the 200 pieces.
        settles_to(&gw, &key, limit, p + counted, "cut stream");

        // Without it: the stream runs to its end, over the limit, and the key
        // is refused afterwards.
        let (id, key) = key_in_tier(&gw, "overrun", KeyLimits::default());
        let r = post(&gw, &key, &body, &headers);
        assert_eq!(r.status, 200);
        let events = http::sse_data(&r.body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert!(r.text().contains("finish_reason\":\"stop"));
        assert!(!r.text().contains("\"error\""));
        assert_eq!(delivered_text(&events), ai4free::mock::completion_text(200));
        let row = row_of(&gw, &id);
        assert_eq!(row.token_source, TokenSource::Provider);
        assert_eq!(row.completion_tokens, 200);
        // Headers report no room left (remaining never goes below 0); Redis
        // holds the exact top-up.
        settles_to(&gw, &key, limit, limit, "overrun");
        if with_redis {
            let tk = format!("a4f:{{{id}}}:tk:1m");
            eventually(Duration::from_secs(5), "overrun settled", || {
                redis_n_shared(&tk).1 == p + 200
            });
        }
        let r = post(&gw, &key, &body, &headers);
        assert_eq!(r.status, 429, "{with_redis}: {}", r.text());
        assert!(r.text().contains("tokens_per_minute"));
    }
}

#[test]
fn cut_streams_settle_to_what_was_delivered() {
    const LIMIT: u64 = 100_000;
    for with_redis in [false, true] {
        let gw = gateway(with_redis);
        away_from_window_edge(60_000, 15_000);
        let mut body = chat("Stream and be cut");
        body["stream"] = json!(true);
        let limits = KeyLimits {
            tokens_per_minute: Some(LIMIT),
            default_max_tokens: Some(500),
            ..KeyLimits::default()
        };

        // A client that reads 3 chunks and hangs up pays for what was delivered.
        let (id, key) = key_with_limits(&gw, limits.clone());
        let req = http::json_request(
            "/v1/chat/completions",
            Some(&key),
            &body,
            &[("x-mock-chunk-delay-ms", "50"), ("x-mock-words", "100")],
        );
        rt().block_on(async {
            let mut s = http::stream(gw.addr, &req).await.unwrap();
            assert_eq!(s.status, 200);
            for _ in 0..3 {
                s.next_chunk().await.unwrap().unwrap();
            }
        });
        let row = row_of(&gw, &id);
        assert_eq!(row.token_source, TokenSource::Partial, "{with_redis}");
        assert!(row.completion_tokens > 0 && row.completion_tokens < 100);
        assert_eq!(row.prompt_tokens, prompt_tokens(&body));
        settles_to(
            &gw,
            &key,
            LIMIT,
            row.prompt_tokens + row.completion_tokens,
            "client disconnect",
        );

        // An upstream reset after 5 events: in-band error, partial row, settled
        // to the row.
        let (id, key) = key_with_limits(&gw, limits.clone());
        let r = post(&gw, &key, &body, &[("x-mock-reset-after", "5")]);
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"error\""), "{}", r.text());
        let row = row_of(&gw, &id);
        assert_eq!(row.token_source, TokenSource::Partial);
        let delivered = Tokenizer::O200kBase.count(&delivered_text(&http::sse_data(&r.body)));
        assert_eq!(row.completion_tokens, delivered);
        assert!(delivered > 0);
        settles_to(
            &gw,
            &key,
            LIMIT,
            row.prompt_tokens + row.completion_tokens,
            "upstream reset",
        );

        // The provider fails before any output: every reserved token is refunded.
        let (id, key) = key_with_limits(&gw, limits);
        let r = post(&gw, &key, &body, &[("x-mock-status", "500")]);
        assert_eq!(r.status, 500);
        assert_eq!(row_of(&gw, &id).completion_tokens, 0);
        settles_to(&gw, &key, LIMIT, 0, "failed before output");
    }
}
