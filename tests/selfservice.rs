//! What a key holder can ask the proxy port about itself: `GET /v1/usage` (its
//! own numbers, never another key's) and `GET /v1/models` (only what it may
//! call), plus `last_used_at`, which every authenticated call moves lazily.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::gateway::{rt, TestGateway};
use common::http::{self, RawResponse};
use serde_json::{json, Value};

fn get(gw: &TestGateway, key: Option<&str>, path: &str) -> RawResponse {
    rt().block_on(http::get(gw.addr, path, key)).unwrap()
}

fn assert_error(r: &RawResponse, status: u16, code: &str, param: Option<&str>) {
    let v = http::assert_openai_error(r, status, code);
    assert_eq!(v["error"]["param"].as_str(), param, "{v}");
}

/// `GET /v1/usage` as JSON, with the gateway's flush lag absorbed: retries until
/// the total reaches `requests` (or 10 s pass).
fn usage_json(gw: &TestGateway, key: &str, query: &str, requests: u64) -> Value {
    let t = Instant::now();
    loop {
        let r = get(gw, Some(key), &format!("/v1/usage{query}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["total"]["requests"].as_u64() >= Some(requests)
            || t.elapsed() > Duration::from_secs(10)
        {
            return v;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn usage_shows_a_key_its_own_numbers_only() {
    let gw = TestGateway::start();
    let (a_id, a) = gw.create_key("pro", &[], None);
    let (b_id, b) = gw.create_key("pro", &[], None);
    for model in ["gpt-4o-mini", "gpt-4o-mini", "gpt-3.5-turbo"] {
        assert_eq!(gw.chat(&a, model).status, 200);
    }
    assert_eq!(gw.chat(&a, "no-such-model").status, 404);
    for _ in 0..2 {
        assert_eq!(gw.chat(&b, "gpt-4o-mini").status, 200);
    }

    let by_day = usage_json(&gw, &a, "", 4);
    assert_eq!(by_day["object"], "usage_report");
    assert_eq!(by_day["group_by"], "day");
    assert_eq!(by_day["filters"]["key_id"], a_id.as_str());
    assert_eq!(by_day["total"]["requests"], 4);
    assert_eq!(by_day["total"]["ok_requests"], 3);
    assert_eq!(by_day["total"]["failed_requests"], 1);
    assert_eq!(by_day["data"].as_array().unwrap().len(), 1);
    assert!(by_day["total"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(by_day["total"]["cost_usd"].as_f64().unwrap() > 0.0);

    let by_model = usage_json(&gw, &a, "?group_by=model", 4);
    let models: Vec<(String, u64)> = by_model["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap_or("").to_owned(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(models.contains(&("gpt-4o-mini".into(), 2)), "{models:?}");
    assert!(models.contains(&("gpt-3.5-turbo".into(), 1)), "{models:?}");
    let only = usage_json(&gw, &a, "?model=gpt-3.5-turbo&since=2000-01-01", 1);
    assert_eq!(only["total"]["requests"], 1);
    let future = get(&gw, Some(&a), "/v1/usage?since=2999-01-01").json();
    assert_eq!(future["total"]["requests"], 0);
    assert_eq!(future["data"], json!([]));

    // B sees exactly its own two requests, whatever A did.
    let theirs = usage_json(&gw, &b, "", 2);
    assert_eq!(theirs["total"]["requests"], 2);
    assert_eq!(theirs["filters"]["key_id"], b_id.as_str());

    // Asking for someone else's numbers is refused, not silently narrowed.
    for (query, param) in [
        (format!("?key_id={b_id}"), "key_id"),
        ("?owner=tester".into(), "owner"),
        ("?project=p".into(), "project"),
        ("?group_by=key".into(), "group_by"),
        ("?group_by=owner".into(), "group_by"),
        ("?group_by=week".into(), "group_by"),
        ("?since=yesterday".into(), "since"),
        ("?since=2026-02-01&until=2026-01-01".into(), "until"),
        ("?format=xml".into(), "format"),
        ("?model=a&model=b".into(), "model"),
        ("?colour=red".into(), "colour"),
    ] {
        let r = get(&gw, Some(&a), &format!("/v1/usage{query}"));
        assert_error(&r, 400, "invalid_parameter", Some(param));
        assert!(!r.text().contains(&b[17..]), "secret echoed");
    }

    let csv = get(&gw, Some(&a), "/v1/usage?group_by=model&format=csv");
    assert_eq!(csv.status, 200);
    assert_eq!(
        csv.header("content-type").as_deref(),
        Some("text/csv; charset=utf-8")
    );
    let text = csv.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "model,requests,ok_requests,failed_requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("gpt-4o-mini,2,2,0,")),
        "{text}"
    );
    assert_eq!(
        lines.len(),
        4,
        "header, two models, the 404's empty model: {text}"
    );

    // Key problems are the proxy's usual 401s.
    assert_error(&get(&gw, None, "/v1/usage"), 401, "missing_api_key", None);
    assert_error(
        &get(&gw, Some("a4f_nope"), "/v1/usage"),
        401,
        "invalid_api_key",
        None,
    );
    gw.revoke(&b_id);
    let t = Instant::now();
    loop {
        let r = get(&gw, Some(&b), "/v1/usage");
        if r.status == 401 {
            assert_error(&r, 401, "revoked_api_key", None);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "revocation not applied"
        );
        std::thread::sleep(Duration::from_millis(25));
    }

    // None of the /v1/usage calls became a usage row: one more chat is row 7 of 7.
    assert_eq!(gw.chat(&a, "gpt-4o-mini").status, 200);
    let rows = gw.wait_rows(7);
    std::thread::sleep(Duration::from_millis(200));
    let rows_after = gw.usage_rows();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows_after.len(), 7, "{rows_after:?}");
    assert!(rows_after
        .iter()
        .all(|r| r.endpoint == "/v1/chat/completions"));
}

#[test]
fn usage_is_503_while_the_store_cannot_answer() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    assert_eq!(get(&gw, Some(&key), "/v1/usage").status, 200);
    // Break the rollup table under the running gateway; the key stays cached.
    let db = rusqlite::Connection::open(&gw.db).unwrap();
    db.execute_batch("ALTER TABLE usage_daily RENAME TO usage_daily_away")
        .unwrap();
    let r = get(&gw, Some(&key), "/v1/usage");
    assert_error(&r, 503, "store_unavailable", None);
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert!(
        !r.text().contains("usage_daily"),
        "store detail leaked: {}",
        r.text()
    );
    // Chats do not depend on the report's table being readable.
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    db.execute_batch("ALTER TABLE usage_daily_away RENAME TO usage_daily")
        .unwrap();
    assert_eq!(get(&gw, Some(&key), "/v1/usage").status, 200);
}

#[test]
fn models_lists_exactly_what_the_key_may_call() {
    let gw = TestGateway::start();
    let ids = |key: &str| -> Vec<String> {
        let r = get(&gw, Some(key), "/v1/models");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, all) = gw.create_key("free", &[], None);
    assert_eq!(
        ids(&all),
        [
            "gpt-4o-mini",
            "gpt-3.5-turbo",
            "renamed",
            "other/gpt-4o-mini"
        ]
    );
    let (_, two) = gw.create_key("pro", &["renamed", "gpt-3.5-turbo"], None);
    assert_eq!(ids(&two), ["gpt-3.5-turbo", "renamed"]);
    // Allowed only the second provider's model: the bare name would route to the
    // first provider (403), so the listing must give the spelling that works.
    let (_, other) = gw.create_key("pro", &["other/gpt-4o-mini"], None);
    let listed = ids(&other);
    assert_eq!(listed, ["other/gpt-4o-mini"]);
    for id in &listed {
        assert_eq!(gw.chat(&other, id).status, 200, "listed {id} refused");
    }
    assert_eq!(gw.chat(&other, "gpt-4o-mini").status, 403);
    // Every listed model of every key can actually be called.
    for key in [&all, &two] {
        for id in ids(key) {
            let status = gw.chat(key, &id).status;
            assert!(status == 200 || status == 429, "{id}: {status}");
        }
    }
    // The tier does not matter to the listing (tiers carry no model list), and
    // listing is not a usage row.
    // 2 chats of `other`, 4 of `all`, 2 of `two`.
    assert_eq!(gw.wait_rows(8).len(), 8);
    assert_eq!(ids(&two).len(), 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.usage_rows().len(), 8);
}

#[test]
fn last_used_at_follows_use_without_a_write_per_request() {
    let gw = TestGateway::start();
    let (used_id, used) = gw.create_key("pro", &[], None);
    let (idle_id, _) = gw.create_key("pro", &[], None);
    let store = gw.store();
    let last_used = |id: &str| {
        rt().block_on(store.get_key(id))
            .unwrap()
            .unwrap()
            .last_used_at_ms
    };
    assert_eq!(last_used(&used_id), None);
    let before = ai4free::usage::now_ms();
    for _ in 0..20 {
        assert_eq!(gw.chat(&used, "gpt-4o-mini").status, 200);
    }
    // The test config flushes every 100 ms.
    let t = Instant::now();
    let first = loop {
        if let Some(at) = last_used(&used_id) {
            break at;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never flushed");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(first >= before - 1_000, "{first} < {before}");
    assert!(first <= ai4free::usage::now_ms());
    assert_eq!(last_used(&idle_id), None);
    // A later use moves it forward (uses within a second are one).
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(get(&gw, Some(&used), "/v1/models").status, 200);
    let t = Instant::now();
    while last_used(&used_id) == Some(first) {
        assert!(t.elapsed() < Duration::from_secs(10), "not moved");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(last_used(&used_id).unwrap() >= first + 1_000);
}
