//! The admin API end to end: a real in-process gateway with its admin listener
//! on a free port, the mock provider behind the proxy, a real SQLite file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ai4free::admin::api::{OPENAPI_JSON, ROUTES};
use ai4free::usage::{now_ms, rfc3339_ms};
use common::eventually;
use common::gateway::{rt, AdminOptions, Options, TestGateway};
use common::http::{self, RawResponse};
use serde_json::{json, Value};

const TOKEN: &str = "admin-token-for-tests-0123456789";
const RO_TOKEN: &str = "readonly-token-for-tests-0123456789";

fn start() -> TestGateway {
    TestGateway::with(Options {
        admin: Some(AdminOptions {
            token: TOKEN.into(),
            readonly_token: Some(RO_TOKEN.into()),
        }),
        ..Options::default()
    })
}

/// One admin call with `token` (None: no Authorization header).
fn call_as(
    gw: &TestGateway,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> RawResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let bytes = body.map(Value::to_string).unwrap_or_default();
    let raw = http::request(method, path, &headers, bytes.as_bytes());
    rt().block_on(http::send(gw.admin_addr.unwrap(), &raw))
        .unwrap()
}

fn call(gw: &TestGateway, method: &str, path: &str, body: Option<&Value>) -> RawResponse {
    call_as(gw, Some(TOKEN), method, path, body)
}

/// A call that must answer `status`; returns the JSON body.
fn ok(gw: &TestGateway, method: &str, path: &str, body: Option<&Value>, status: u16) -> Value {
    let r = call(gw, method, path, body);
    assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    r.json()
}

/// Creates a key through the API; returns (id, secret, view).
fn create(gw: &TestGateway, body: Value) -> (String, String, Value) {
    let v = ok(gw, "POST", "/admin/keys", Some(&body), 201);
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
        v,
    )
}

fn assert_error(r: &RawResponse, status: u16, code: &str, param: Option<&str>) {
    let v = http::assert_openai_error(r, status, code);
    assert_eq!(v["error"]["param"].as_str(), param, "{v}");
}

fn ids(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

fn sample_path(template: &str, id: &str) -> String {
    template.replace("{id}", id)
}

#[test]
fn auth_is_required_and_readonly_can_only_read() {
    let gw = start();
    let (id, secret, _) = create(&gw, json!({"tier": "pro", "owner": "alice"}));
    for r in ROUTES {
        let path = sample_path(r.path, &id);
        let body = (r.method != "GET").then(|| json!({"name": "x"}));
        let none = call_as(&gw, None, r.method, &path, body.as_ref());
        assert_error(&none, 401, "missing_admin_token", None);
        assert_eq!(none.header("www-authenticate").as_deref(), Some("Bearer"));
        let wrong = call_as(
            &gw,
            Some("not-the-admin-token-at-all"),
            r.method,
            &path,
            body.as_ref(),
        );
        assert_error(&wrong, 401, "invalid_admin_token", None);
        // A data-plane key opens nothing here.
        let data_plane = call_as(&gw, Some(&secret), r.method, &path, body.as_ref());
        assert_error(&data_plane, 401, "invalid_admin_token", None);
        let ro = call_as(&gw, Some(RO_TOKEN), r.method, &path, body.as_ref());
        if r.method == "GET" {
            assert_eq!(ro.status, 200, "{} {}: {}", r.method, r.path, ro.text());
        } else {
            assert_error(&ro, 403, "read_only_token", None);
        }
    }
    // Nothing above changed the key.
    let v = ok(&gw, "GET", &format!("/admin/keys/{id}"), None, 200);
    assert_eq!(v["name"], Value::Null);
    assert_eq!(v["status"], "active");
    // A basic-auth or bare token is not a bearer token.
    let raw = http::request("GET", "/admin/keys", &[("Authorization", TOKEN)], b"");
    let r = rt()
        .block_on(http::send(gw.admin_addr.unwrap(), &raw))
        .unwrap();
    assert_error(&r, 401, "missing_admin_token", None);
}

/// A client that sends `Expect: 100-continue` is told to go ahead once its
/// token is accepted, and is refused without it otherwise.
#[test]
fn expect_100_continue_is_answered() {
    let gw = start();
    let admin = gw.admin_addr.unwrap();
    let body = json!({"tier": "pro", "owner": "expect"}).to_string();
    let head = |token: &str| {
        format!(
            "POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
            body.len()
        )
    };
    let heads = http::heads_after_expect(admin, head(TOKEN).as_bytes(), body.as_bytes());
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].starts_with("HTTP/1.1 100 Continue\r\n"),
        "{heads:?}"
    );
    assert!(heads[1].starts_with("HTTP/1.1 201 "), "{heads:?}");
    let heads = http::heads_after_expect(admin, head("not-the-token").as_bytes(), body.as_bytes());
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0].starts_with("HTTP/1.1 401 "), "{heads:?}");
}

/// An HTTP/1.0 client that did not ask for keep-alive reads to the close: the
/// admin API closes after its answer instead of holding the connection open
/// until the idle timeout.
#[test]
fn an_http_1_0_call_is_answered_and_closed() {
    let gw = start();
    let admin = gw.admin_addr.unwrap();
    let raw =
        format!("GET /admin/keys HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
    let (status, closed) = http::status_and_close(admin, raw.as_bytes(), Duration::from_secs(3));
    assert!(status.contains(" 200 "), "{status}");
    assert!(closed, "the connection stayed open after the response");
    // HTTP/1.1 still keeps it.
    let raw =
        format!("GET /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
    let (status, closed) =
        http::status_and_close(admin, raw.as_bytes(), Duration::from_millis(500));
    assert!(status.contains(" 200 "), "{status}");
    assert!(!closed, "an HTTP/1.1 connection was closed");
}

#[test]
fn nothing_under_admin_answers_on_the_proxy_port() {
    let gw = start();
    let (_, secret, _) = create(&gw, json!({"tier": "pro"}));
    for (method, path) in [
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("GET", "/admin/openapi.json"),
    ] {
        for auth in [None, Some(TOKEN), Some(secret.as_str())] {
            let a = auth.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = a
                .as_deref()
                .map(|a| ("Authorization", a))
                .into_iter()
                .collect();
            let raw = http::request(method, path, &headers, b"");
            let r = rt().block_on(http::send(gw.addr, &raw)).unwrap();
            assert!(
                r.status == 404 || r.status == 401,
                "{method} {path} on the proxy port: {} {}",
                r.status,
                r.text()
            );
            assert!(!r.text().contains("\"object\":\"list\""), "{}", r.text());
        }
    }
    // With a valid data-plane key the proxy answers its usual 404.
    let r = rt()
        .block_on(http::get(gw.addr, "/admin/keys", Some(&secret)))
        .unwrap();
    assert_error(&r, 404, "not_found", None);
}

#[test]
fn bad_requests_name_the_field_and_unknown_things_are_404_405_413() {
    let gw = start();
    let r = call(&gw, "POST", "/admin/keys", Some(&json!({"tier": "gold"})));
    assert_error(&r, 400, "invalid_parameter", Some("tier"));
    let r = call(&gw, "POST", "/admin/keys", None);
    assert_error(&r, 400, "invalid_parameter", Some("body"));
    let raw = http::request(
        "POST",
        "/admin/keys",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"{\"tier\": ",
    );
    let r = rt()
        .block_on(http::send(gw.admin_addr.unwrap(), &raw))
        .unwrap();
    assert_error(&r, 400, "invalid_json", Some("body"));
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("status=sleeping", "status"),
        ("cursor=nonsense", "cursor"),
        ("colour=red", "colour"),
    ] {
        let r = call(&gw, "GET", &format!("/admin/keys?{q}"), None);
        assert_error(&r, 400, "invalid_parameter", Some(field));
    }
    let r = call(&gw, "GET", "/admin/audit?since=yesterday", None);
    assert_error(&r, 400, "invalid_parameter", Some("since"));
    let r = call(&gw, "GET", "/admin/usage?group_by=week", None);
    assert_error(&r, 400, "invalid_parameter", Some("group_by"));

    for (method, path) in [
        ("GET", "/admin/keys/nope"),
        ("PATCH", "/admin/keys/nope"),
        ("POST", "/admin/keys/nope/revoke"),
        ("POST", "/admin/keys/nope/rotate"),
    ] {
        let body = (method == "PATCH").then(|| json!({"name": "n"}));
        assert_error(
            &call(&gw, method, path, body.as_ref()),
            404,
            "key_not_found",
            None,
        );
    }
    assert_error(
        &call(&gw, "GET", "/admin/nothing", None),
        404,
        "not_found",
        None,
    );
    let r = call(&gw, "DELETE", "/admin/keys/abc", None);
    assert_error(&r, 405, "method_not_allowed", None);
    assert_eq!(r.header("allow").as_deref(), Some("GET, PATCH"));
    let r = call(&gw, "PUT", "/admin/keys", None);
    assert_eq!(r.header("allow").as_deref(), Some("POST, GET"));

    let big = json!({"tier": "pro", "metadata": {"x": "y".repeat(1024 * 1024)}});
    assert_error(
        &call(&gw, "POST", "/admin/keys", Some(&big)),
        413,
        "request_too_large",
        None,
    );
    // Chunked, no declared length: refused once it passes the limit.
    let mut raw = format!(
        "POST /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        raw.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        raw.extend(std::iter::repeat_n(b' ', 64 * 1024));
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = rt()
        .block_on(http::send(gw.admin_addr.unwrap(), &raw))
        .unwrap();
    assert_error(&r, 413, "request_too_large", None);
    // Nothing above created a key.
    assert_eq!(ids(&ok(&gw, "GET", "/admin/keys", None, 200)).len(), 0);
}

#[test]
fn keys_page_without_gaps_and_every_filter_selects() {
    let gw = start();
    let mut created = BTreeSet::new();
    for i in 0..250 {
        let tier = if i % 2 == 0 { "free" } else { "pro" };
        let (id, _, v) = create(
            &gw,
            json!({"tier": tier, "owner": format!("o{}", i % 3), "project": format!("p{}", i % 5),
                   "name": format!("batch-{i:03}")}),
        );
        assert_eq!(v["object"], "key");
        assert_eq!(v["status"], "active");
        assert!(v["key"].as_str().unwrap().starts_with("a4f_"));
        created.insert(id);
    }
    // Pages of 100: 100, 100, 50, in id order, no duplicate, no gap.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/keys?limit=100&cursor={c}"),
            None => "/admin/keys?limit=100".to_owned(),
        };
        let v = ok(&gw, "GET", &path, None, 200);
        assert_eq!(v["object"], "list");
        let page = ids(&v);
        sizes.push(page.len());
        for k in v["data"].as_array().unwrap() {
            assert!(k.get("key").is_none(), "a listing never shows a secret");
        }
        seen.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(sizes.len() <= 3, "too many pages: {sizes:?}");
    }
    assert_eq!(sizes, [100, 100, 50]);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are in id order without duplicates");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), created);
    // The default page is 100.
    assert_eq!(ids(&ok(&gw, "GET", "/admin/keys", None, 200)).len(), 100);

    let count = |q: &str| {
        ids(&ok(
            &gw,
            "GET",
            &format!("/admin/keys?limit=1000&{q}"),
            None,
            200,
        ))
        .len()
    };
    assert_eq!(count("owner=o1"), 83);
    assert_eq!(count("project=p2"), 50);
    assert_eq!(count("tier=free"), 125);
    assert_eq!(count("name=batch-01"), 10);
    assert_eq!(count("name=batch-2"), 50);
    assert_eq!(count("owner=o0&project=p0&tier=free"), 9);
    assert_eq!(count("owner=nobody"), 0);
    // Revoke three: the status filter splits them off.
    let some: Vec<String> = created.iter().take(3).cloned().collect();
    for id in &some {
        let v = ok(&gw, "POST", &format!("/admin/keys/{id}/revoke"), None, 200);
        assert_eq!(v["status"], "revoked");
    }
    let revoked = ids(&ok(&gw, "GET", "/admin/keys?status=revoked", None, 200));
    assert_eq!(revoked, some);
    assert_eq!(count("status=active"), 247);
    assert_eq!(count("status=expired"), 0);
    // One key by id.
    let v = ok(&gw, "GET", &format!("/admin/keys/{}", some[0]), None, 200);
    assert_eq!(v["id"], some[0].as_str());
    assert!(v["revoked_at"].is_string());
}

#[test]
fn patch_changes_each_field_and_the_proxy_follows() {
    let gw = start();
    let (id, secret, created) = create(
        &gw,
        json!({"tier": "free", "owner": "bob", "project": "web", "name": "first"}),
    );
    assert_eq!(created["tier"], "free");
    let path = format!("/admin/keys/{id}");
    // The free tier allows 5 requests a minute.
    for _ in 0..5 {
        assert_eq!(gw.chat(&secret, "gpt-4o-mini").status, 200);
    }
    assert_eq!(gw.chat(&secret, "gpt-4o-mini").status, 429);
    let v = ok(&gw, "PATCH", &path, Some(&json!({"tier": "pro"})), 200);
    assert_eq!(v["tier"], "pro");
    eventually(
        Duration::from_secs(1),
        "the tier change reaching the proxy",
        || gw.chat(&secret, "gpt-4o-mini").status == 200,
    );

    // models: other models are refused at once.
    let v = ok(
        &gw,
        "PATCH",
        &path,
        Some(&json!({"models": ["gpt-3.5-turbo"]})),
        200,
    );
    assert_eq!(v["models"], json!(["gpt-3.5-turbo"]));
    let r = gw.chat(&secret, "gpt-4o-mini");
    assert_error(&r, 403, "model_not_allowed", Some("model"));
    assert_eq!(gw.chat(&secret, "gpt-3.5-turbo").status, 200);
    let v = ok(&gw, "PATCH", &path, Some(&json!({"models": null})), 200);
    assert_eq!(v["models"], json!([]));
    assert_eq!(gw.chat(&secret, "gpt-4o-mini").status, 200);

    // name, metadata, limits, expiry.
    let v = ok(&gw, "PATCH", &path, Some(&json!({"name": "renamed"})), 200);
    assert_eq!(v["name"], "renamed");
    let v = ok(
        &gw,
        "PATCH",
        &path,
        Some(&json!({"metadata": {"team": "search", "n": 3}})),
        200,
    );
    assert_eq!(v["metadata"], json!({"team": "search", "n": 3}));
    let v = ok(
        &gw,
        "PATCH",
        &path,
        Some(&json!({"limits": {"requests_per_minute": 7, "spend_usd_per_month": "2.5"}})),
        200,
    );
    assert_eq!(
        v["limits"],
        json!({"requests_per_minute": 7, "spend_usd_per_month": 2.5})
    );
    let later = rfc3339_ms(now_ms() + 86_400_000);
    let v = ok(
        &gw,
        "PATCH",
        &path,
        Some(&json!({"expires_at": later})),
        200,
    );
    assert_eq!(v["expires_at"], later.as_str());
    let v = ok(
        &gw,
        "PATCH",
        &path,
        Some(&json!({"expires_at": null, "name": null})),
        200,
    );
    assert_eq!(v["expires_at"], Value::Null);
    assert_eq!(v["name"], Value::Null);
    // Every change is persisted, not just echoed.
    let v = ok(&gw, "GET", &path, None, 200);
    assert_eq!(v["tier"], "pro");
    assert_eq!(v["metadata"]["team"], "search");
    assert_eq!(v["limits"]["requests_per_minute"], 7);
    assert_eq!(v["owner"], "bob");
    // owner and project are fixed; an empty patch changes nothing.
    let r = call(&gw, "PATCH", &path, Some(&json!({"owner": "eve"})));
    assert_error(&r, 400, "invalid_parameter", Some("owner"));
    let r = call(&gw, "PATCH", &path, Some(&json!({})));
    assert_error(&r, 400, "invalid_parameter", Some("body"));
    let r = call(&gw, "PATCH", &path, Some(&json!({"models": ["nope"]})));
    assert_error(&r, 400, "invalid_parameter", Some("models[0]"));

    // Revocation applies at once and is idempotent.
    let v = ok(&gw, "POST", &format!("{path}/revoke"), None, 200);
    let at = v["revoked_at"].clone();
    assert!(at.is_string());
    assert_error(
        &gw.chat(&secret, "gpt-4o-mini"),
        401,
        "revoked_api_key",
        None,
    );
    let v = ok(&gw, "POST", &format!("{path}/revoke"), None, 200);
    assert_eq!(v["revoked_at"], at);
}

#[test]
fn rotation_with_and_without_grace() {
    let gw = start();
    let (id, first, _) = create(&gw, json!({"tier": "pro"}));
    assert_eq!(gw.chat(&first, "gpt-4o-mini").status, 200);

    // No grace: the old secret is refused at once, the new one works, same id.
    let v = ok(&gw, "POST", &format!("/admin/keys/{id}/rotate"), None, 200);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["previous_secret_valid_until"], Value::Null);
    let second = v["key"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert!(second.contains(&id));
    assert_error(
        &gw.chat(&first, "gpt-4o-mini"),
        401,
        "invalid_api_key",
        None,
    );
    assert_eq!(gw.chat(&second, "gpt-4o-mini").status, 200);

    // With grace: both work until the grace ends, then only the new one.
    let before = now_ms();
    let v = ok(
        &gw,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(&json!({"grace_seconds": 3})),
        200,
    );
    let third = v["key"].as_str().unwrap().to_owned();
    let until =
        chrono::DateTime::parse_from_rfc3339(v["previous_secret_valid_until"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
    assert!((before + 3_000..=now_ms() + 3_000).contains(&until), "{v}");
    assert_eq!(gw.chat(&second, "gpt-4o-mini").status, 200);
    assert_eq!(gw.chat(&third, "gpt-4o-mini").status, 200);
    assert!(
        now_ms() < until,
        "the checks above must run inside the grace period"
    );
    let wait = u64::try_from(until - now_ms()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(wait));
    eventually(
        Duration::from_secs(1),
        "the old secret refused after its grace ended",
        || gw.chat(&second, "gpt-4o-mini").status == 401,
    );
    assert_eq!(gw.chat(&third, "gpt-4o-mini").status, 200);
    // Usage stays on the one id.
    let rows = gw.wait_rows(5);
    assert!(rows
        .iter()
        .filter(|r| r.status == 200)
        .all(|r| r.key_id == id));

    let r = call(
        &gw,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(&json!({"grace_seconds": -1})),
    );
    assert_error(&r, 400, "invalid_parameter", Some("grace_seconds"));
    ok(&gw, "POST", &format!("/admin/keys/{id}/revoke"), None, 200);
    let r = call(&gw, "POST", &format!("/admin/keys/{id}/rotate"), None);
    assert_error(&r, 409, "conflict", None);
}

#[test]
fn expiry_is_enforced_within_a_second() {
    let gw = start();
    let expires = now_ms() + 1_500;
    let (id, secret, v) = create(
        &gw,
        json!({"tier": "pro", "expires_at": rfc3339_ms(expires)}),
    );
    assert_eq!(v["expires_at"], rfc3339_ms(expires).as_str());
    assert_eq!(gw.chat(&secret, "gpt-4o-mini").status, 200);
    assert!(now_ms() < expires, "the check above must run before expiry");
    let statuses = |s: &str| {
        ids(&ok(
            &gw,
            "GET",
            &format!("/admin/keys?status={s}"),
            None,
            200,
        ))
    };
    assert_eq!(statuses("active"), [id.as_str()]);
    std::thread::sleep(Duration::from_millis(
        u64::try_from(expires - now_ms()).unwrap_or(0),
    ));
    eventually(
        Duration::from_secs(1),
        "the key refused after expires_at",
        || gw.chat(&secret, "gpt-4o-mini").status == 401,
    );
    assert_error(
        &gw.chat(&secret, "gpt-4o-mini"),
        401,
        "expired_api_key",
        None,
    );
    assert_eq!(statuses("expired"), [id.as_str()]);
    assert!(statuses("active").is_empty());
    let v = ok(&gw, "GET", &format!("/admin/keys/{id}"), None, 200);
    assert_eq!(v["status"], "expired");
}

#[test]
fn usage_reports_group_filter_and_export_csv() {
    let gw = start();
    let (a, ka, _) = create(
        &gw,
        json!({"tier": "pro", "owner": "alice", "project": "search"}),
    );
    let (b, kb, _) = create(
        &gw,
        json!({"tier": "pro", "owner": "bob", "project": "chat"}),
    );
    for _ in 0..3 {
        assert_eq!(gw.chat(&ka, "gpt-4o-mini").status, 200);
    }
    assert_eq!(gw.chat(&ka, "gpt-3.5-turbo").status, 200);
    assert_eq!(gw.chat(&kb, "gpt-3.5-turbo").status, 200);
    assert_eq!(gw.wait_rows(5).len(), 5);
    let today = ai4free::store::day_of_ms(now_ms());

    let report = |q: &str| ok(&gw, "GET", &format!("/admin/usage?{q}"), None, 200);
    let groups = |v: &Value, col: &str| -> BTreeMap<String, u64> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[col].as_str().unwrap_or("").to_owned(),
                    r["requests"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let v = report("group_by=day");
    assert_eq!(v["object"], "usage_report");
    assert_eq!(groups(&v, "day"), BTreeMap::from([(today.clone(), 5)]));
    assert_eq!(v["total"]["requests"], 5);
    assert_eq!(v["total"]["ok_requests"], 5);
    assert!(v["total"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(v["total"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(v["total"]["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(
        groups(&report("group_by=model"), "model"),
        BTreeMap::from([("gpt-3.5-turbo".into(), 2), ("gpt-4o-mini".into(), 3)])
    );
    assert_eq!(
        groups(&report("group_by=key"), "key_id"),
        BTreeMap::from([(a.clone(), 4), (b.clone(), 1)])
    );
    assert_eq!(
        groups(&report("group_by=owner"), "owner"),
        BTreeMap::from([("alice".into(), 4), ("bob".into(), 1)])
    );
    assert_eq!(
        groups(&report("group_by=project"), "project"),
        BTreeMap::from([("chat".into(), 1), ("search".into(), 4)])
    );
    // Filters.
    assert_eq!(report(&format!("key_id={b}"))["total"]["requests"], 1);
    assert_eq!(
        report("owner=alice&model=gpt-4o-mini")["total"]["requests"],
        3
    );
    assert_eq!(report("project=chat")["total"]["requests"], 1);
    assert_eq!(
        report(&format!("since={today}&until={today}"))["total"]["requests"],
        5
    );
    assert_eq!(report("until=2000-01-01")["total"]["requests"], 0);
    assert_eq!(report("since=2999-01-01")["data"], json!([]));
    // CSV.
    let r = call(&gw, "GET", "/admin/usage?group_by=model&format=csv", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/csv; charset=utf-8")
    );
    assert_eq!(
        r.header("content-disposition").as_deref(),
        Some("attachment; filename=\"ai4free-usage-by-model.csv\"")
    );
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "model,requests,ok_requests,failed_requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
    );
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[1].starts_with("gpt-3.5-turbo,2,2,0,"), "{text}");
    assert!(lines[2].starts_with("gpt-4o-mini,3,3,0,"), "{text}");
}

#[test]
fn audit_lists_every_change_and_no_secret() {
    let gw = start();
    let (id, first, _) = create(&gw, json!({"tier": "free", "owner": "carol"}));
    ok(
        &gw,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(&json!({"tier": "pro", "name": "n"})),
        200,
    );
    let rotated = ok(
        &gw,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(&json!({"grace_seconds": 60})),
        200,
    );
    let second = rotated["key"].as_str().unwrap().to_owned();
    ok(&gw, "POST", &format!("/admin/keys/{id}/revoke"), None, 200);
    let (other, third, _) = create(&gw, json!({"tier": "pro"}));
    // Reads, refusals and read-only calls are not audited.
    ok(&gw, "GET", &format!("/admin/keys/{id}"), None, 200);
    call(
        &gw,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(&json!({"tier": "gold"})),
    );
    call_as(
        &gw,
        Some(RO_TOKEN),
        "POST",
        "/admin/keys",
        Some(&json!({"tier": "pro"})),
    );

    let v = ok(&gw, "GET", "/admin/audit", None, 200);
    assert_eq!(v["object"], "list");
    let entries = v["data"].as_array().unwrap();
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("key.create", other.as_str()),
            ("key.revoke", id.as_str()),
            ("key.rotate", id.as_str()),
            ("key.update", id.as_str()),
            ("key.create", id.as_str()),
        ],
        "newest first"
    );
    assert!(entries
        .iter()
        .all(|e| e["actor"] == "admin" && e["at"].is_string()));
    assert_eq!(entries[2]["detail"]["grace_seconds"], 60);
    assert_eq!(entries[3]["detail"]["fields"], json!(["name", "tier"]));
    assert_eq!(entries[3]["detail"]["tier"], "pro");
    assert_eq!(entries[4]["detail"]["owner"], "carol");
    let text = v.to_string();
    for secret in [&first, &second, &third] {
        let after_id = &secret[17..];
        assert!(
            !text.contains(after_id.get(..10).unwrap()),
            "a secret is in the audit log"
        );
    }
    assert!(!text.contains(TOKEN) && !text.contains(RO_TOKEN));
    // ...nor in the store's audit table, whatever the API shows.
    let raw = rusqlite::Connection::open(&gw.db).unwrap();
    let mut st = raw.prepare("SELECT * FROM audit_log").unwrap();
    let n = st.column_count();
    let dump: Vec<String> = st
        .query_map([], |row| {
            Ok((0..n)
                .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                .collect::<Vec<_>>()
                .join("|"))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(dump.len(), 5);
    for secret in [&first, &second, &third] {
        assert!(!dump.iter().any(|row| row.contains(&secret[17..27])));
    }

    // Filters and pages.
    let count = |q: &str| {
        ok(&gw, "GET", &format!("/admin/audit?{q}"), None, 200)["data"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count("action=key.create"), 2);
    assert_eq!(count(&format!("target={id}")), 4);
    assert_eq!(count("actor=admin"), 5);
    assert_eq!(count("actor=cli"), 0);
    assert_eq!(count("since=2999-01-01"), 0);
    assert_eq!(count("until=2000-01-01T00:00:00Z"), 0);
    assert_eq!(
        count(&format!("since={}", rfc3339_ms(now_ms() - 60_000))),
        5
    );
    let p1 = ok(&gw, "GET", "/admin/audit?limit=2", None, 200);
    let c = p1["next_cursor"].as_str().unwrap();
    let p2 = ok(
        &gw,
        "GET",
        &format!("/admin/audit?limit=2&cursor={c}"),
        None,
        200,
    );
    let c = p2["next_cursor"].as_str().unwrap();
    let p3 = ok(
        &gw,
        "GET",
        &format!("/admin/audit?limit=2&cursor={c}"),
        None,
        200,
    );
    assert_eq!(p3["next_cursor"], Value::Null);
    let all: Vec<i64> = [&p1, &p2, &p3]
        .iter()
        .flat_map(|p| {
            p["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_i64().unwrap())
        })
        .collect();
    let expected: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(all, expected);
}

#[test]
fn openapi_document_matches_the_routes_and_every_route_answers_as_documented() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(documented, routed);

    let gw = start();
    // The served document is this one.
    assert_eq!(ok(&gw, "GET", "/admin/openapi.json", None, 200), doc);
    let (id, _, _) = create(&gw, json!({"tier": "pro"}));
    let happy_body = |path: &str, method: &str| -> Option<Value> {
        match (method, path) {
            ("POST", "/admin/keys") => Some(json!({"tier": "free", "name": "doc"})),
            ("PATCH", _) => Some(json!({"name": "patched"})),
            ("POST", p) if p.ends_with("/rotate") => Some(json!({"grace_seconds": 0})),
            _ => None,
        }
    };
    // Revoke last: rotating a revoked key is a documented 409, not the happy path.
    let mut order: Vec<_> = ROUTES.iter().collect();
    order.sort_by_key(|r| r.path.ends_with("/revoke"));
    for r in order {
        let path = sample_path(r.path, &id);
        let resp = call(&gw, r.method, &path, happy_body(r.path, r.method).as_ref());
        let op = &doc["paths"][r.path][r.method.to_lowercase()];
        let responses = op["responses"].as_object().unwrap();
        let status = resp.status.to_string();
        assert!(
            resp.status < 300 && responses.contains_key(&status),
            "{} {}: answered {status}, documented {:?}: {}",
            r.method,
            r.path,
            responses.keys().collect::<Vec<_>>(),
            resp.text()
        );
        assert!(
            responses.contains_key("401"),
            "{} {} must document 401",
            r.method,
            r.path
        );
        if r.op.mutates() {
            assert!(
                responses.contains_key("403"),
                "{} {} must document 403",
                r.method,
                r.path
            );
        }
        let ct = resp.header("content-type").unwrap();
        let ct = ct.split(';').next().unwrap();
        assert!(
            responses[&status]["content"].get(ct).is_some(),
            "{} {}: {ct} not documented",
            r.method,
            r.path
        );
        // Every documented $ref resolves.
        for_each_ref(op, &mut |reference| {
            let pointer = reference.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "dangling {reference}");
        });
    }
}

fn for_each_ref(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("$ref", Value::String(s)) => f(s),
                    _ => for_each_ref(x, f),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| for_each_ref(x, f)),
        _ => {}
    }
}

#[test]
fn a_store_that_cannot_answer_is_a_503() {
    let gw = start();
    let (id, _, _) = create(&gw, json!({"tier": "pro"}));
    let raw = rusqlite::Connection::open(&gw.db).unwrap();
    raw.execute_batch("ALTER TABLE api_keys RENAME TO api_keys_away")
        .unwrap();
    let r = call(&gw, "GET", "/admin/keys", None);
    assert_error(&r, 503, "store_unavailable", None);
    let r = call(&gw, "GET", &format!("/admin/keys/{id}"), None);
    assert_error(&r, 503, "store_unavailable", None);
    let r = call(&gw, "POST", "/admin/keys", Some(&json!({"tier": "pro"})));
    assert_error(&r, 503, "store_unavailable", None);
    raw.execute_batch("ALTER TABLE api_keys_away RENAME TO api_keys")
        .unwrap();
    assert_eq!(ids(&ok(&gw, "GET", "/admin/keys", None, 200)), [id]);
}

/// The same handlers over PostgreSQL (shared server at `AI4FREE_TEST_PG_URL`, in a
/// schema of its own), called in-process: the HTTP shell is the one tested above.
#[test]
fn smoke_on_postgresql() {
    use ai4free::admin::api::{AdminApi, AdminTokens};
    use ai4free::config::{Config, Storage};
    use ai4free::keys::cache::KeyCache;
    use std::sync::Arc;

    let base = std::env::var("AI4FREE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned());
    let schema = format!("t_admin_{:016x}", getrandom::u64().unwrap());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    let exec = |sql: String| {
        let base = base.clone();
        rt().block_on(async move {
            let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL must be reachable: {e}"));
            tokio::spawn(conn);
            client.batch_execute(&sql).await.unwrap();
        })
    };
    exec(format!("CREATE SCHEMA {schema}"));
    /// Drops the schema also when the test panics.
    struct OnDrop<F: FnMut()>(F);
    impl<F: FnMut()> Drop for OnDrop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _cleanup = OnDrop(|| exec(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")));

    let config = Config::from_yaml_str(
        "providers:\n  - name: p\n    base_url: http://127.0.0.1:9/v1\n    models:\n      - name: gpt-4o-mini\ntiers:\n  free: {}\n  pro: {}\n",
    )
    .unwrap();
    let tokens = AdminTokens::from_env(&config.admin, |n| {
        (n == config.admin.token_env).then(|| TOKEN.to_owned())
    })
    .unwrap()
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = ai4free::store::open(&Storage::Postgres { url })
            .await
            .unwrap();
        let keys = Arc::new(KeyCache::new(store.clone(), Duration::from_millis(100)));
        keys.prime().await.unwrap();
        let api = AdminApi::new(Arc::new(config.clone()), store, keys.clone(), tokens);
        let auth = format!("Bearer {TOKEN}");
        let call = |method: &'static str, path: String, query: &'static str, body: Value| {
            let api = &api;
            let auth = auth.clone();
            async move {
                let (op, id) = api.admit(method, &path, Some(auth.as_bytes())).unwrap();
                let body = if body.is_null() {
                    Vec::new()
                } else {
                    body.to_string().into_bytes()
                };
                let r = api.call(op, id, query, &body).await.unwrap();
                (
                    r.status,
                    serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null),
                )
            }
        };
        let (s, v) = call(
            "POST",
            "/admin/keys".into(),
            "",
            json!({"tier": "free", "owner": "pg"}),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let secret = v["key"].as_str().unwrap().to_owned();
        // The cache knows the new key at once.
        assert!(keys
            .authenticate(Some(secret.as_bytes()), now_ms())
            .await
            .is_ok());
        let (s, v) = call(
            "GET",
            "/admin/keys".into(),
            "owner=pg&status=active",
            Value::Null,
        )
        .await;
        assert_eq!((s, ids(&v)), (200, vec![id.clone()]));
        let (s, v) = call(
            "PATCH",
            format!("/admin/keys/{id}"),
            "",
            json!({"tier": "pro"}),
        )
        .await;
        assert_eq!((s, v["tier"].as_str()), (200, Some("pro")));
        let (s, v) = call("POST", format!("/admin/keys/{id}/rotate"), "", Value::Null).await;
        assert_eq!(s, 200, "{v}");
        let rotated = v["key"].as_str().unwrap().to_owned();
        assert!(keys
            .authenticate(Some(secret.as_bytes()), now_ms())
            .await
            .is_err());
        assert!(keys
            .authenticate(Some(rotated.as_bytes()), now_ms())
            .await
            .is_ok());
        let (s, v) = call("POST", format!("/admin/keys/{id}/revoke"), "", Value::Null).await;
        assert_eq!((s, v["status"].as_str()), (200, Some("revoked")));
        let (s, v) = call("GET", "/admin/audit".into(), "", Value::Null).await;
        assert_eq!(s, 200);
        let actions: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["key.revoke", "key.rotate", "key.update", "key.create"]
        );
        let (s, v) = call("GET", "/admin/usage".into(), "group_by=owner", Value::Null).await;
        assert_eq!((s, &v["total"]["requests"]), (200, &json!(0)));
        let (op, id) = api
            .admit("GET", "/admin/keys/nope", Some(auth.as_bytes()))
            .unwrap();
        assert_eq!(api.call(op, id, "", b"").await.unwrap_err().status(), 404);
    });
}
