//! Several gateway nodes (separate processes of the real binary) sharing one
//! PostgreSQL and one Redis, both private to the test so they can be killed:
//! revocation across nodes, a database outage under load, cluster-wide limits and a
//! Redis outage under load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ai4free::mock::{self, MockConfig, MockHandle};
use common::gateway::rt;
use common::http;
use common::node::{cluster_yaml, Node};
use common::pg::PgServer;
use common::redis::{away_from_window_edge, RedisServer};
use serde_json::{json, Value};

/// The tests here each run several gateway processes and servers; on two cores,
/// running them one at a time keeps their latency bounds about the gateway, not
/// about the machine being oversubscribed.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn mock() -> MockHandle {
    mock::start_in_thread("127.0.0.1:0".parse().unwrap(), MockConfig::default()).unwrap()
}

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

/// One chat request through the gateway at `addr`.
fn chat_response(addr: SocketAddr, key: &str) -> http::RawResponse {
    rt().block_on(http::post_json(
        addr,
        "/v1/chat/completions",
        Some(key),
        &chat(),
        &[],
    ))
    .unwrap()
}

/// One chat request; returns (status, x-request-id, elapsed).
fn call(addr: SocketAddr, key: &str) -> (u16, Option<String>, Duration) {
    let t = Instant::now();
    let r = chat_response(addr, key);
    (r.status, r.header("x-request-id"), t.elapsed())
}

/// Creates a key through `node`'s CLI (the same store every node reads).
fn create_key(node: &Node, tier: &str) -> (String, String) {
    let o = node.cli(&["keys", "create", "--tier", tier, "--json"]);
    assert!(
        o.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

fn three_nodes(dir: &std::path::Path, shared: &str) -> Vec<Node> {
    ["a", "b", "c"]
        .iter()
        .map(|n| Node::spawn(n, dir, shared))
        .collect()
}

#[test]
fn a_key_revoked_through_one_node_is_refused_by_the_others_within_a_second() {
    let _serial = serial();
    let pg = PgServer::start();
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let shared = cluster_yaml(
        &pg.url(),
        &mock.base_url(),
        "  pro: { requests_per_minute: 100000 }",
        "",
    );
    let nodes = three_nodes(dir.path(), &shared);
    // A key created after the nodes started reaches all of them within a second.
    let created = Instant::now();
    let (id, key) = create_key(&nodes[0], "pro");
    for n in &nodes {
        loop {
            let (status, _, _) = call(n.addr, &key);
            if status == 200 {
                break;
            }
            assert_eq!(status, 401, "node {}", n.name);
            assert!(
                created.elapsed() < Duration::from_secs(2),
                "node {} did not see the new key",
                n.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let o = nodes[0].cli(&["keys", "revoke", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let revoked = Instant::now();
    let mut refused_after = Vec::new();
    for n in &nodes[1..] {
        loop {
            let (status, _, _) = call(n.addr, &key);
            if status == 401 {
                refused_after.push(revoked.elapsed());
                break;
            }
            assert_eq!(status, 200, "node {}", n.name);
            assert!(
                revoked.elapsed() < Duration::from_secs(3),
                "node {} still serves a revoked key",
                n.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    eprintln!("revoked key refused by nodes b, c after {refused_after:?}");
    for (n, after) in nodes[1..].iter().zip(&refused_after) {
        assert!(
            *after < Duration::from_secs(1),
            "node {} refused the revoked key only after {after:?}",
            n.name
        );
    }
}

/// Steady load from `threads` clients spread over `nodes` until `stop` is set.
struct Load {
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    ids: Arc<Mutex<Vec<String>>>,
    slowest: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addrs: Vec<SocketAddr>, key: String, threads: usize, pause: Duration) -> Load {
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let slowest = Arc::new(Mutex::new(Duration::ZERO));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let (sent, failures, ids, slowest, stop, key, addrs) = (
                    sent.clone(),
                    failures.clone(),
                    ids.clone(),
                    slowest.clone(),
                    stop.clone(),
                    key.clone(),
                    addrs.clone(),
                );
                std::thread::spawn(move || {
                    let rt = rt();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let addr = addrs[i % addrs.len()];
                        i += 1;
                        let t0 = Instant::now();
                        let r = rt.block_on(http::post_json(
                            addr,
                            "/v1/chat/completions",
                            Some(&key),
                            &chat(),
                            &[],
                        ));
                        let took = t0.elapsed();
                        sent.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut s = slowest.lock().unwrap();
                            *s = (*s).max(took);
                        }
                        match r {
                            Ok(r) if r.status == 200 => {
                                ids.lock().unwrap().push(r.header("x-request-id").unwrap())
                            }
                            Ok(r) => failures.lock().unwrap().push(format!(
                                "{addr}: {} {}",
                                r.status,
                                r.text()
                            )),
                            Err(e) => failures.lock().unwrap().push(format!("{addr}: {e}")),
                        }
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load {
            sent,
            failures,
            ids,
            slowest,
            stop,
            threads: handles,
        }
    }

    fn finish(self) -> (u64, Vec<String>, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let ids = self.ids.lock().unwrap().clone();
        let slowest = *self.slowest.lock().unwrap();
        (self.sent.load(Ordering::Relaxed), failures, ids, slowest)
    }
}

#[test]
fn a_30_second_database_outage_under_load_loses_no_usage_row_and_fails_no_request() {
    let _serial = serial();
    let pg = PgServer::start();
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let shared = cluster_yaml(
        &pg.url(),
        &mock.base_url(),
        "  pro: { requests_per_minute: 1000000 }",
        "",
    );
    let nodes = three_nodes(dir.path(), &shared);
    let (_, key) = create_key(&nodes[0], "pro");
    // Every node has the key cached before the outage.
    for n in &nodes {
        let t = Instant::now();
        while call(n.addr, &key).0 != 200 {
            assert!(t.elapsed() < Duration::from_secs(3));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let warmup = 3;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let load = Load::start(addrs, key.clone(), 3, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(2));

    pg.kill();
    let outage = Instant::now();
    // While the database is down: an unknown (well-formed) key is refused with 503,
    // never let through, and rows pile up in the spools, not in memory.
    std::thread::sleep(Duration::from_secs(2));
    let unknown = ai4free::keys::generate().unwrap().key;
    let (status, _, took) = call(nodes[1].addr, &unknown);
    assert_eq!(status, 503, "unknown key during a database outage");
    assert!(took < Duration::from_secs(4), "unknown key waited {took:?}");
    let mut spooled = false;
    while outage.elapsed() < Duration::from_secs(30) {
        spooled |= nodes
            .iter()
            .any(|n| n.metric("ai4free_usage_spool_bytes") > 0.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(spooled, "no node spooled usage during the outage");
    pg.start_again();
    std::thread::sleep(Duration::from_secs(2));
    let (sent, failures, ids, slowest) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    // Cached keys never waited on the dead database.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    assert!(sent > 300, "only {sent} requests sent");
    eprintln!("database outage: {sent} requests, 0 failed, slowest {slowest:?}");
    let expected: HashSet<&String> = ids.iter().collect();
    assert_eq!(expected.len(), ids.len());

    // Every row arrives, exactly once, once the spools are replayed.
    let total = sent + warmup;
    let t = Instant::now();
    loop {
        let counts = pg.psql("SELECT count(*) || ' ' || count(DISTINCT request_id) FROM usage");
        if counts == format!("{total} {total}") {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let stored: HashSet<String> = pg
                .psql("SELECT request_id FROM usage")
                .lines()
                .map(str::to_string)
                .collect();
            let missing: Vec<&String> = ids.iter().filter(|id| !stored.contains(*id)).collect();
            for n in &nodes {
                eprintln!(
                    "node {}: spool {} bytes, dropped {}, log:\n{}",
                    n.name,
                    n.metric("ai4free_usage_spool_bytes"),
                    n.metric("ai4free_usage_records_dropped_total"),
                    n.log_text()
                );
            }
            panic!(
                "usage rows after the outage: {counts} (count, distinct), expected {total}; missing {}: {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored: HashSet<String> = pg
        .psql("SELECT request_id FROM usage")
        .lines()
        .map(str::to_string)
        .collect();
    for id in &ids {
        assert!(stored.contains(id), "request {id} has no usage row");
    }
    for n in &nodes {
        assert_eq!(
            n.metric("ai4free_usage_records_dropped_total"),
            0.0,
            "{}",
            n.name
        );
        let t = Instant::now();
        while n.metric("ai4free_usage_spool_bytes") > 0.0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} spool not drained",
                n.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until every node answers without the degraded header (at most 10 s).
fn wait_until_recovered(nodes: &[Node], key: &str) {
    let back = Instant::now();
    for n in nodes {
        loop {
            let r = chat_response(n.addr, key);
            if r.header("x-ai4free-ratelimit").is_none() {
                break;
            }
            assert!(
                back.elapsed() < Duration::from_secs(10),
                "node {} still degraded 10 s after Redis came back",
                n.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            n.metric("ai4free_ratelimit_degraded"),
            0.0,
            "node {}",
            n.name
        );
    }
}

fn redis_yaml(url: &str, on_failure: &str) -> String {
    format!("redis: {{ url: \"{url}\", timeout_ms: 20, on_failure: {on_failure}, nodes: 3 }}")
}

#[test]
fn three_nodes_offered_three_times_the_limit_let_exactly_the_limit_through() {
    let _serial = serial();
    let pg = PgServer::start();
    let redis = RedisServer::start();
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let limit = 30;
    let shared = cluster_yaml(
        &pg.url(),
        &mock.base_url(),
        &format!("  limited: {{ requests_per_minute: {limit} }}"),
        &redis_yaml(&redis.url(), "local_share"),
    );
    let nodes = three_nodes(dir.path(), &shared);
    let (_, key) = create_key(&nodes[0], "limited");
    std::thread::sleep(Duration::from_millis(600));
    away_from_window_edge(60_000, 15_000);
    mock.clear();
    // 3L requests, 3 concurrent clients per node.
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..9)
        .map(|t| {
            let addr = nodes[t % 3].addr;
            let (key, statuses) = (key.clone(), statuses.clone());
            std::thread::spawn(move || {
                for _ in 0..limit / 3 {
                    let (status, _, _) = call(addr, &key);
                    statuses.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    assert_eq!(statuses.len(), 3 * limit);
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    // Counted at the provider, not by the gateway.
    assert_eq!(mock.request_count(), limit, "statuses: {statuses:?}");
    assert_eq!((ok, limited), (limit, 2 * limit));
    for n in &nodes {
        assert_eq!(n.metric("ai4free_ratelimit_degraded"), 0.0);
    }
}

#[test]
fn a_redis_outage_degrades_to_local_shares_within_the_timeout_and_recovers_by_itself() {
    let _serial = serial();
    let pg = PgServer::start();
    let mut redis = RedisServer::start();
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let shared = cluster_yaml(
        &pg.url(),
        &mock.base_url(),
        "  pro: { requests_per_minute: 1000000 }\n  limited: { requests_per_minute: 30 }",
        &redis_yaml(&redis.url(), "local_share"),
    );
    let nodes = three_nodes(dir.path(), &shared);
    let (_, key) = create_key(&nodes[0], "pro");
    let (_, limited_key) = create_key(&nodes[0], "limited");
    std::thread::sleep(Duration::from_millis(600));
    for n in &nodes {
        let r = chat_response(n.addr, &key);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ai4free-ratelimit"), None);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let load = Load::start(addrs, key.clone(), 3, Duration::from_millis(10));
    std::thread::sleep(Duration::from_secs(1));

    // A blackholed Redis (stopped, not closed: connections hang) is the hard case.
    redis.pause();
    std::thread::sleep(Duration::from_secs(2));
    for n in &nodes {
        let r = chat_response(n.addr, &key);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-ai4free-ratelimit").as_deref(),
            Some("degraded"),
            "node {}",
            n.name
        );
        assert_eq!(
            n.metric("ai4free_ratelimit_degraded"),
            1.0,
            "node {}",
            n.name
        );
    }
    // local_share: each node now enforces ceil(30 / 3) = 10 per minute on its own.
    away_from_window_edge(60_000, 15_000);
    let admitted = (0..15)
        .filter(|_| call(nodes[1].addr, &limited_key).0 == 200)
        .count();
    assert_eq!(admitted, 10);
    redis.resume();
    wait_until_recovered(&nodes, &key);

    // A Redis that dies outright (connections refused) degrades and recovers the same way.
    redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    for n in &nodes {
        let r = chat_response(n.addr, &key);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-ai4free-ratelimit").as_deref(),
            Some("degraded"),
            "node {}",
            n.name
        );
    }
    redis.restart();
    wait_until_recovered(&nodes, &key);
    let (sent, failures, _, slowest) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        failures.first()
    );
    // No request waited on the stopped Redis past its 20 ms budget (plus scheduling
    // slack on a loaded two-core machine).
    assert!(
        slowest < Duration::from_millis(270),
        "slowest request {slowest:?}"
    );
    for n in &nodes {
        let log = n.log_text();
        assert!(
            log.contains("rate limits degraded") && log.contains("rate limits recovered"),
            "node {} did not log both transitions:\n{log}",
            n.name
        );
    }
}
