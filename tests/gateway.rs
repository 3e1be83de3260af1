//! End-to-end tests of the gateway slice: a real Pingora server on loopback, the
//! mock provider behind it, a real SQLite file underneath.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use ai4free::mock::{MockConfig, UsageMode};
use ai4free::tokens::count::Tokenizer;
use ai4free::usage::TokenSource;
use common::gateway::{rt, Options, TestGateway, PROVIDER_KEY};
use common::http::{self, assert_openai_error, RawResponse};
use serde_json::{json, Value};

fn post(
    gw: &TestGateway,
    key: Option<&str>,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> RawResponse {
    rt().block_on(http::post_json(gw.addr, path, key, body, headers))
        .unwrap()
}

fn get(gw: &TestGateway, key: Option<&str>, path: &str) -> RawResponse {
    rt().block_on(http::get(gw.addr, path, key)).unwrap()
}

fn raw(gw: &TestGateway, bytes: &[u8]) -> RawResponse {
    rt().block_on(http::send(gw.addr, bytes)).unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "Say hello to the gateway 👋"}]})
}

#[test]
fn health_and_models() {
    let gw = TestGateway::start();
    let r = get(&gw, None, "/healthz");
    assert_eq!(r.status, 200);
    let (_, all) = gw.create_key("pro", &[], None);
    let (_, one) = gw.create_key("pro", &["gpt-3.5-turbo"], None);
    let ids = |r: RawResponse| -> Vec<String> {
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let listed = ids(get(&gw, Some(&all), "/v1/models"));
    assert_eq!(
        listed,
        vec![
            "gpt-4o-mini",
            "gpt-3.5-turbo",
            "renamed",
            "other/gpt-4o-mini"
        ]
    );
    assert_eq!(
        ids(get(&gw, Some(&one), "/v1/models")),
        vec!["gpt-3.5-turbo"]
    );
    assert_openai_error(&get(&gw, None, "/v1/models"), 401, "missing_api_key");
}

#[test]
fn non_streaming_is_byte_exact_and_recorded() {
    let gw = TestGateway::with(Options {
        mock: MockConfig {
            reproducible: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let (id, key) = gw.create_key("pro", &[], None);
    let body = chat(false);
    let via = post(&gw, Some(&key), "/v1/chat/completions", &body, &[]);
    assert_eq!(via.status, 200);
    assert!(via.header("x-request-id").unwrap().starts_with("req_"));
    assert_eq!(
        via.header("x-ratelimit-limit-requests").as_deref(),
        Some("100000")
    );
    assert_eq!(
        via.header("x-ratelimit-remaining-requests").as_deref(),
        Some("99999")
    );
    assert!(via.header("x-ratelimit-reset-requests").is_some());
    // The same request straight to the mock gives the same bytes.
    let direct = rt()
        .block_on(http::post_json(
            gw.mock.addr,
            "/v1/chat/completions",
            Some(PROVIDER_KEY),
            &body,
            &[],
        ))
        .unwrap();
    assert_eq!(via.body, direct.body);
    // The provider saw its own key, never ours.
    let seen = gw.mock.requests();
    let first = &seen[0];
    assert_eq!(
        first.header_str("authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    for r in &seen {
        for (_, v) in &r.headers {
            assert!(
                !String::from_utf8_lossy(v).contains(&key[17..]),
                "gateway key leaked upstream"
            );
        }
    }
    let usage = via.json()["usage"].clone();
    let rows = gw.wait_rows(1);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.key_id, id);
    assert_eq!(row.model, "gpt-4o-mini");
    assert_eq!(row.provider, "mock");
    assert_eq!(row.status, 200);
    assert_eq!(row.token_source, TokenSource::Provider);
    assert_eq!(row.prompt_tokens, usage["prompt_tokens"].as_u64().unwrap());
    assert_eq!(
        row.completion_tokens,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        row.cost_pusd,
        (row.prompt_tokens * 150_000 + row.completion_tokens * 600_000) as i64
    );
    assert_eq!(row.request_id, via.header("x-request-id").unwrap());
}

#[test]
fn client_credentials_and_framing_never_reach_the_provider() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    // The key in every header an OpenAI-style SDK might put it in, plus the
    // client's OpenAI account scoping, in mixed case.
    let extra = [
        ("Api-Key", key.as_str()),
        ("X-API-Key", key.as_str()),
        ("OpenAI-Organization", "org-client"),
        ("OpenAI-Project", "proj_client"),
        ("x-trace", "kept"),
    ];
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(false),
        &extra,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = gw.mock.last_request().unwrap();
    for gone in [
        "api-key",
        "x-api-key",
        "openai-organization",
        "openai-project",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} went upstream");
    }
    assert_eq!(
        seen.header_str("authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(seen.header_str("x-trace").as_deref(), Some("kept"));
    let secret = &key[17..];
    for (name, v) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(v).contains(secret),
            "gateway key leaked upstream in {name}"
        );
    }
}

#[test]
fn the_provider_accounts_headers_never_reach_the_client() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    for stream in [false, true] {
        let r = post(
            &gw,
            Some(&key),
            "/v1/chat/completions",
            &chat(stream),
            &[("x-mock-account-headers", "1")],
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // The operator's organization and project, and the provider account's
        // token limits (the pro tier limits requests only), are gone.
        for gone in [
            "openai-organization",
            "openai-project",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ] {
            assert_eq!(r.header(gone), None, "{gone} reached the client");
        }
        // The request limits and the request id are the key's, not the account's.
        assert_eq!(
            r.header("x-ratelimit-limit-requests").as_deref(),
            Some("100000")
        );
        let id = r.header("x-request-id").unwrap();
        assert!(id.starts_with("req_") && id != "req_mock_provider", "{id}");
        // What says nothing about the account passes.
        assert_eq!(r.header("openai-processing-ms").as_deref(), Some("12"));
    }
}

#[test]
fn provider_usage_of_zero_is_kept() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(false),
        &[
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "0"),
        ],
    );
    assert_eq!(r.status, 200);
    let row = &gw.wait_rows(1)[0];
    assert_eq!(row.token_source, TokenSource::Provider);
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.cost_pusd),
        (0, 0, 0)
    );
}

#[test]
fn counts_when_provider_reports_nothing() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(false),
        &[("x-mock-no-usage", "1")],
    );
    assert_eq!(r.status, 200);
    let text = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let row = &gw.wait_rows(1)[0];
    assert_eq!(row.token_source, TokenSource::Counted);
    assert_eq!(row.completion_tokens, Tokenizer::O200kBase.count(&text));
    let prompt = ai4free::tokens::count::count_chat_prompt(
        Tokenizer::O200kBase,
        &serde_json::to_vec(&chat(false)).unwrap(),
    )
    .unwrap();
    assert_eq!(row.prompt_tokens, prompt);
    assert!(prompt > 5);
}

fn sse_payloads(body: &[u8]) -> Vec<Value> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[test]
fn streaming_hides_the_usage_chunk_it_asked_for() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(true),
        &[("x-mock-split", "7")],
    );
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_payloads(&r.body);
    assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));
    assert!(
        events.iter().all(|e| e["usage"].is_null()),
        "client got a usage chunk it did not ask for"
    );
    // The upstream was asked for usage on the client's behalf.
    let up = gw.mock.last_request().unwrap().json().unwrap();
    assert_eq!(up["stream_options"]["include_usage"], true);
    let row = &gw.wait_rows(1)[0];
    assert_eq!(row.token_source, TokenSource::Provider);
    assert!(row.stream);
    assert!(row.completion_tokens > 0);

    // A client that asks for usage gets it, untouched.
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&gw, Some(&key), "/v1/chat/completions", &body, &[]);
    let events = sse_payloads(&r.body);
    assert!(
        events.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn streaming_is_byte_exact_when_nothing_is_injected() {
    let gw = TestGateway::with(Options {
        stream_usage: false,
        mock: MockConfig {
            reproducible: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let body = chat(true);
    let via = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &body,
        &[("x-mock-split", "5")],
    );
    let direct = rt()
        .block_on(http::post_json(
            gw.mock.addr,
            "/v1/chat/completions",
            Some(PROVIDER_KEY),
            &body,
            &[],
        ))
        .unwrap();
    assert_eq!(via.status, 200);
    assert_eq!(via.body, direct.body);
}

#[test]
fn streamed_counts_do_not_depend_on_chunk_boundaries() {
    let gw = TestGateway::with(Options {
        stream_usage: false,
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let mut texts = Vec::new();
    let splits = ["1", "2", "3", "5", "7", "13", "64", "4096"];
    for s in splits {
        let r = post(
            &gw,
            Some(&key),
            "/v1/chat/completions",
            &chat(true),
            &[("x-mock-split", s), ("x-mock-words", "60")],
        );
        assert_eq!(r.status, 200);
        texts.push(streamed_text(&sse_payloads(&r.body)));
    }
    let expected = Tokenizer::O200kBase.count(&texts[0]);
    assert!(texts.iter().all(|t| *t == texts[0]));
    let rows = gw.wait_rows(splits.len());
    assert_eq!(rows.len(), splits.len());
    for row in rows {
        assert_eq!(row.token_source, TokenSource::Counted);
        assert_eq!(row.completion_tokens, expected, "split changed the count");
    }
}

#[test]
fn large_body_with_model_last_reaches_the_provider_whole() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let filler = "lorem ipsum ".repeat(2 * 1024 * 1024 / 12);
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"max_tokens":5,"model":"gpt-4o-mini"}}"#
    );
    assert!(body.len() > 2 * 1024 * 1024 - 64);
    let req = http::request(
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    let r = raw(&gw, &req);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = gw.mock.last_request().unwrap();
    assert_eq!(seen.body.len(), body.len());
    assert_eq!(seen.body, body.as_bytes());
    let row = &gw.wait_rows(1)[0];
    assert_eq!(row.status, 200);
    // Streaming large bodies go through the same path.
    let sbody = body.replacen(r#""max_tokens":5"#, r#""max_tokens":5,"stream":true"#, 1);
    let req = http::request(
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {key}"))],
        sbody.as_bytes(),
    );
    let r = raw(&gw, &req);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));
    let rows = gw.wait_rows(2);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.token_source == TokenSource::Provider));
}

/// The body is gathered from its chunks (one chunk is kept as it came, more
/// are joined): what the provider receives is the client's body, byte for byte.
#[test]
fn a_chunked_request_body_reaches_the_provider_whole() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let small = serde_json::to_vec(&chat(false)).unwrap();
    // Past Pingora's 64 KB replay buffer, found only while reading: the
    // request then goes through a subrequest.
    let large = serde_json::to_vec(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word ".repeat(20_000)}]})).unwrap();
    for (n, (body, piece)) in [(&small, 7), (&large, 4096)].into_iter().enumerate() {
        let mut req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes();
        req.extend_from_slice(&http::chunked(body, piece));
        let r = raw(&gw, &req);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let sent = gw.mock.last_request().expect("the provider was called");
        assert_eq!(&sent.body, body, "body {n}");
        let rows = gw.wait_rows(n + 1);
        assert!(rows
            .iter()
            .all(|r| r.token_source == TokenSource::Provider && r.prompt_tokens > 0));
    }
    assert_eq!(gw.mock.request_count(), 2);
}

/// An HTTP/1.0 client reads the answer to the close, which comes at once.
#[test]
fn an_http_1_0_request_is_answered_and_closed() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let body = serde_json::to_vec(&chat(false)).unwrap();
    let mut req = format!("POST /v1/chat/completions HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    let (status, closed) = http::status_and_close(gw.addr, &req, Duration::from_secs(3));
    assert!(status.contains(" 200 "), "{status}");
    assert!(closed, "the connection stayed open after the response");
    assert_eq!(gw.wait_rows(1).len(), 1);
}

/// A client that sends `Expect: 100-continue` gets the go-ahead from the
/// gateway, not after its own timeout; one the gateway refuses gets the refusal
/// instead and never uploads; the provider is not asked to expect anything.
#[test]
fn expect_100_continue_is_answered_by_the_gateway() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let body = serde_json::to_vec(&chat(false)).unwrap();
    let head = |auth: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
            body.len()
        )
    };
    let heads = http::heads_after_expect(gw.addr, head(&key).as_bytes(), &body);
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].starts_with("HTTP/1.1 100 Continue\r\n"),
        "{heads:?}"
    );
    assert!(heads[1].starts_with("HTTP/1.1 200 "), "{heads:?}");
    let sent = gw.mock.last_request().expect("the provider was called");
    assert_eq!(sent.body, body);
    assert_eq!(sent.header("expect"), None);

    // Refused before the body is wanted: no 100, the 401 at once.
    let heads = http::heads_after_expect(gw.addr, head("sk-not-ours").as_bytes(), &body);
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0].starts_with("HTTP/1.1 401 "), "{heads:?}");
    assert_eq!(gw.mock.request_count(), 1);
}

#[test]
fn body_limit_is_enforced_before_any_upstream_connection() {
    let gw = TestGateway::with(Options {
        max_body_bytes: 4096,
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let big = format!(r#"{{"model":"gpt-4o-mini","x":"{}"}}"#, "a".repeat(5000));
    let auth = format!("Bearer {key}");
    let r = raw(
        &gw,
        &http::request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &auth)],
            big.as_bytes(),
        ),
    );
    assert_openai_error(&r, 413, "request_too_large");
    // Chunked, no content-length: refused once the limit is passed.
    let mut req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes();
    req.extend_from_slice(&http::chunked(big.as_bytes(), 1000));
    assert_openai_error(&raw(&gw, &req), 413, "request_too_large");
    assert_eq!(gw.mock.request_count(), 0);
    let rows = gw.wait_rows(2);
    assert!(rows.iter().all(|r| r.status == 413));
}

#[test]
fn auth_failures_are_401_with_openai_shape() {
    let gw = TestGateway::start();
    let (id, key) = gw.create_key("pro", &[], None);
    let (_, expired) = gw.create_key("pro", &[], Some(ai4free::usage::now_ms() - 1));
    let b = chat(false);
    assert_openai_error(
        &post(&gw, None, "/v1/chat/completions", &b, &[]),
        401,
        "missing_api_key",
    );
    assert_openai_error(
        &post(&gw, Some("sk-not-ours"), "/v1/chat/completions", &b, &[]),
        401,
        "invalid_api_key",
    );
    let mut typo = key.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    assert_openai_error(
        &post(&gw, Some(&typo), "/v1/chat/completions", &b, &[]),
        401,
        "invalid_api_key",
    );
    let other = ai4free::keys::generate().unwrap();
    assert_openai_error(
        &post(&gw, Some(&other.key), "/v1/chat/completions", &b, &[]),
        401,
        "invalid_api_key",
    );
    assert_openai_error(
        &post(&gw, Some(&expired), "/v1/chat/completions", &b, &[]),
        401,
        "expired_api_key",
    );
    let ok = post(&gw, Some(&key), "/v1/chat/completions", &b, &[]);
    assert_eq!(ok.status, 200);
    // Revocation through the store reaches this node within a second.
    gw.revoke(&id);
    let t = std::time::Instant::now();
    loop {
        let r = post(&gw, Some(&key), "/v1/chat/completions", &b, &[]);
        if r.status == 401 {
            assert_openai_error(&r, 401, "revoked_api_key");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "revoked key still accepted after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(r_has_www_authenticate(&post(
        &gw,
        None,
        "/v1/chat/completions",
        &b,
        &[]
    )));
    // No valid key, no row; every request with a known key has one.
    let upstream_calls = gw.mock.request_count();
    let store = gw.store();
    gw.stop();
    let rows = rt()
        .block_on(store.query_usage(&Default::default()))
        .unwrap();
    // Refused keys (revoked, expired, unknown) are not billed: only the good key's calls are.
    assert!(rows.iter().all(|r| r.key_id == id && r.status == 200));
    assert_eq!(upstream_calls, rows.len());
}

fn r_has_www_authenticate(r: &RawResponse) -> bool {
    r.header("www-authenticate").as_deref() == Some("Bearer")
}

#[test]
fn model_routing_permissions_and_unknown_models() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &["gpt-4o-mini", "renamed"], None);
    let mut b = chat(false);
    b["model"] = json!("gpt-3.5-turbo");
    assert_openai_error(
        &post(&gw, Some(&key), "/v1/chat/completions", &b, &[]),
        403,
        "model_not_allowed",
    );
    b["model"] = json!("no-such-model");
    assert_openai_error(
        &post(&gw, Some(&key), "/v1/chat/completions", &b, &[]),
        404,
        "model_not_found",
    );
    b["model"] = json!("renamed");
    assert_eq!(
        post(&gw, Some(&key), "/v1/chat/completions", &b, &[]).status,
        200
    );
    assert_eq!(
        gw.mock.last_request().unwrap().json().unwrap()["model"],
        "real-upstream-name"
    );
    // provider/model picks the provider explicitly.
    let (_, all) = gw.create_key("pro", &[], None);
    b["model"] = json!("other/gpt-4o-mini");
    assert_eq!(
        post(&gw, Some(&all), "/v1/chat/completions", &b, &[]).status,
        200
    );
    let rows = gw.wait_rows(4);
    let last = rows.iter().find(|r| r.provider == "other").unwrap();
    assert_eq!(last.input_price_micros, 1_000_000);
    assert_eq!(gw.mock.last_request().unwrap().path, "/v1/chat/completions");
}

#[test]
fn rate_limit_429_carries_openai_headers() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("free", &[], None);
    // Minute windows turn at whole UTC minutes: keep the six requests in one.
    common::redis::away_from_window_edge(60_000, 5_000);
    for i in 0..5 {
        let r = post(&gw, Some(&key), "/v1/chat/completions", &chat(false), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-ratelimit-remaining-requests").unwrap(),
            (4 - i).to_string()
        );
    }
    let r = post(&gw, Some(&key), "/v1/chat/completions", &chat(false), &[]);
    assert_openai_error(&r, 429, "rate_limit_exceeded");
    assert_eq!(r.header("x-ratelimit-limit-requests").as_deref(), Some("5"));
    assert_eq!(
        r.header("x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let reset = r.header("x-ratelimit-reset-requests").unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(gw.mock.request_count(), 5);
    let rows = gw.wait_rows(6);
    assert_eq!(rows.iter().filter(|r| r.status == 429).count(), 1);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_gateway_keeps_serving() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let auth = format!("Bearer {key}");
    let send = |body: &[u8]| {
        raw(
            &gw,
            &http::request(
                "POST",
                "/v1/chat/completions",
                &[("authorization", &auth)],
                body,
            ),
        )
    };
    assert_openai_error(&send(b"{not json"), 400, "invalid_json");
    assert_openai_error(&send(b""), 400, "empty_body");
    assert_openai_error(&send(b"[1,2,3]"), 400, "invalid_json");
    assert_openai_error(&send(b"\xff\xfe\x00"), 400, "invalid_json");
    assert_openai_error(&send(br#"{"messages":[]}"#), 400, "missing_model");
    assert_openai_error(&send(br#"{"model":42}"#), 400, "invalid_field");
    assert_openai_error(
        &send(br#"{"model":"gpt-4o-mini","stream":"yes"}"#),
        400,
        "invalid_field",
    );
    assert_openai_error(
        &send(br#"{"model":"gpt-4o-mini","stream":true,"stream_options":5}"#),
        400,
        "invalid_field",
    );
    // Non-UTF-8 and huge header values.
    let mut req = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \xff\xfe\xfd\r\ncontent-length: 2\r\n\r\n{}".to_vec();
    assert_openai_error(&raw(&gw, &req), 401, "missing_api_key");
    req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 2\r\n\r\n{{}}", "a".repeat(60_000)).into_bytes();
    let r = rt().block_on(http::send(gw.addr, &req));
    if let Ok(r) = r {
        assert!(
            (400..500).contains(&r.status),
            "huge header got {}",
            r.status
        );
    }
    let r = raw(&gw, b"GET /admin/keys HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_openai_error(&r, 404, "not_found");
    let r = raw(
        &gw,
        b"DELETE /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n",
    );
    assert_openai_error(&r, 405, "method_not_allowed");
    // Still alive and serving.
    assert_eq!(
        post(&gw, Some(&key), "/v1/chat/completions", &chat(false), &[]).status,
        200
    );
    assert_eq!(get(&gw, None, "/healthz").status, 200);
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    let dead = common::gateway::free_port();
    let gw = TestGateway::with(Options {
        base_url: Some(format!("http://127.0.0.1:{dead}/v1")),
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(&gw, Some(&key), "/v1/chat/completions", &chat(false), &[]);
    assert_openai_error(&r, 502, "upstream_unreachable");
    drop(gw);
    let gw = TestGateway::with(Options {
        first_byte_timeout_ms: 300,
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(false),
        &[("x-mock-delay-ms", "2000")],
    );
    assert_openai_error(&r, 504, "upstream_timeout");
    // Provider errors pass through with their status and are recorded.
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(false),
        &[("x-mock-status", "503")],
    );
    assert_eq!(r.status, 503);
    let rows = gw.wait_rows(2);
    assert!(rows
        .iter()
        .any(|r| r.status == 504 && r.error.as_deref() == Some("upstream_timeout")));
    assert!(rows.iter().any(|r| r.status == 503));
}

#[test]
fn upstream_reset_mid_stream_gives_in_band_error_and_partial_row() {
    let gw = TestGateway::with(Options {
        stream_usage: false,
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/chat/completions",
        &chat(true),
        &[("x-mock-reset-after", "5")],
    );
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(!text.contains("[DONE]"));
    assert!(
        !text.contains(r#""finish_reason":"stop""#),
        "a cut stream must not look finished"
    );
    let last = sse_payloads(&r.body).pop().unwrap();
    assert!(
        last["error"]["code"].is_string(),
        "no in-band error event: {text}"
    );
    let row = &gw.wait_rows(1)[0];
    assert_eq!(row.token_source, TokenSource::Partial);
    let delivered = streamed_text(&sse_payloads(&r.body));
    assert_eq!(
        row.completion_tokens,
        Tokenizer::O200kBase.count(&delivered)
    );
}

#[test]
fn client_disconnect_bills_what_was_delivered() {
    let gw = TestGateway::with(Options {
        stream_usage: false,
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let body = serde_json::to_vec(&chat(true)).unwrap();
    let req = http::request(
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {key}")),
            ("x-mock-chunk-delay-ms", "50"),
            ("x-mock-words", "100"),
        ],
        &body,
    );
    rt().block_on(async {
        let mut s = http::stream(gw.addr, &req).await.unwrap();
        assert_eq!(s.status, 200);
        for _ in 0..3 {
            s.next_chunk().await.unwrap().unwrap();
        }
        drop(s);
    });
    let rows = gw.wait_rows(1);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.token_source, TokenSource::Partial);
    assert!(
        row.completion_tokens > 0 && row.completion_tokens < 100,
        "{}",
        row.completion_tokens
    );
    assert!(row.prompt_tokens > 0);
}

#[test]
fn completions_and_embeddings() {
    let gw = TestGateway::with(Options {
        mock: MockConfig {
            usage_in_stream: UsageMode::WhenAsked,
            ..Default::default()
        },
        ..Default::default()
    });
    let (_, key) = gw.create_key("pro", &[], None);
    let r = post(
        &gw,
        Some(&key),
        "/v1/completions",
        &json!({"model": "gpt-3.5-turbo", "prompt": "Once upon"}),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "text_completion");
    let r = post(
        &gw,
        Some(&key),
        "/v1/embeddings",
        &json!({"model": "gpt-4o-mini", "input": ["a", "b"]}),
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post(
        &gw,
        Some(&key),
        "/v1/completions",
        &json!({"model": "gpt-3.5-turbo", "prompt": "Once", "stream": true}),
        &[("x-mock-no-usage", "1")],
    );
    assert_eq!(r.status, 200);
    let rows = gw.wait_rows(3);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().any(|r| r.endpoint == "/v1/embeddings"
        && r.completion_tokens == 0
        && r.token_source == TokenSource::Provider));
    assert!(rows.iter().any(|r| r.endpoint == "/v1/completions"
        && r.stream
        && r.token_source == TokenSource::Counted
        && r.completion_tokens > 0));
}

#[test]
fn usage_rows_equal_requests_and_shutdown_flushes() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let n = 40;
    rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..n {
            let addr = gw.addr;
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let stream = i % 2 == 0;
                http::post_json(addr, "/v1/chat/completions", Some(&key), &chat(stream), &[])
                    .await
                    .unwrap()
                    .status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
    });
    let store = gw.store();
    let stats = gw.stop();
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.spool_bytes_left, 0);
    let rows = rt()
        .block_on(store.query_usage(&Default::default()))
        .unwrap();
    assert_eq!(rows.len(), n);
    let ids: std::collections::HashSet<_> = rows.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(ids.len(), n);
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    assert_eq!(
        post(&gw, Some(&key), "/v1/chat/completions", &chat(false), &[]).status,
        200
    );
    let _ = post(&gw, Some("bad"), "/v1/chat/completions", &chat(false), &[]);
    gw.wait_rows(1);
    let r = rt()
        .block_on(http::get(gw.metrics_addr, "/metrics", None))
        .unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.clone()).unwrap();
    let mut samples = 0;
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = name_labels.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = name_labels.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        samples += 1;
    }
    assert!(samples > 10);
    for m in [
        "ai4free_requests_total{model=\"gpt-4o-mini\",status=\"200\"}",
        "ai4free_tokens_total{kind=\"prompt\",model=\"gpt-4o-mini\"}",
        "ai4free_cost_usd_total{model=\"gpt-4o-mini\"}",
        "ai4free_request_duration_seconds_bucket",
        "ai4free_time_to_first_token_seconds_bucket",
        "ai4free_usage_queue_depth",
        "ai4free_usage_records_dropped_total 0",
        "ai4free_rate_limited_total",
    ] {
        assert!(text.contains(m), "missing {m} in\n{text}");
    }
    assert!(!text.contains(&key[17..]), "key material in metrics");
    // The proxy port does not serve metrics.
    assert_eq!(get(&gw, None, "/metrics").status, 404);
}

/// The official OpenAI Python SDK, unchanged, against the gateway. `scripts/test.sh`
/// installs the SDK into a venv and points `AI4FREE_TEST_PYTHON` at it; a plain
/// `cargo test` without it says so and skips.
#[test]
fn openai_python_sdk_works_unchanged() {
    let Ok(python) = std::env::var("AI4FREE_TEST_PYTHON") else {
        eprintln!(
            "AI4FREE_TEST_PYTHON not set (scripts/test.sh sets it): skipping the OpenAI SDK check"
        );
        return;
    };
    let gw = TestGateway::start();
    let (_, key) = gw.create_key("pro", &[], None);
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/openai_sdk.py"
        ))
        .arg(format!("http://{}/v1", gw.addr))
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // chat ×3, embeddings, completions, the unknown model; the bad key has no row.
    let store = gw.store();
    gw.stop();
    let rows = rt()
        .block_on(store.query_usage(&Default::default()))
        .unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
}

#[test]
fn bench_ablations_switch_capabilities_off() {
    let gw = TestGateway::with(Options {
        extra_yaml: "bench_ablate: [auth, limits, usage, counting, metrics]".into(),
        ..Default::default()
    });
    // No key needed, no limit headers, and nothing recorded: the benchmark's ablated gateway.
    let r = post(&gw, None, "/v1/chat/completions", &chat(true), &[]);
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit-requests").is_none());
    let up = gw.mock.last_request().unwrap().json().unwrap();
    assert!(
        up.get("stream_options").is_none(),
        "counting off must not ask for usage"
    );
    let store = gw.store();
    gw.stop();
    assert!(rt()
        .block_on(store.query_usage(&Default::default()))
        .unwrap()
        .is_empty());
}
