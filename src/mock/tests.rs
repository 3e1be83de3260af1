//! Unit tests for the mock provider, driven over plain TCP so framing is checked byte
//! for byte (the richer client lives in `tests/common/http.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A parsed response; `chunks` is `Some` for chunked bodies.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunks: Option<Vec<Vec<u8>>>,
    /// Chunked body ended with the terminating zero chunk.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        let text = std::str::from_utf8(&self.body).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
            .collect()
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Send one `connection: close` request and read until the server closes.
async fn raw(addr: SocketAddr, req: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn parse(bytes: &[u8]) -> Resp {
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = std::str::from_utf8(&bytes[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let rest = &bytes[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
    if !chunked {
        return Resp {
            status,
            headers,
            body: rest.to_vec(),
            chunks: None,
            complete: true,
        };
    }
    let (mut chunks, mut pos, mut complete) = (Vec::new(), 0, false);
    while let Some(eol) = rest[pos..].windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[pos..pos + eol]).unwrap(), 16).unwrap();
        pos += eol + 2;
        if size == 0 {
            complete = rest[pos..] == *b"\r\n";
            break;
        }
        if rest.len() < pos + size + 2 {
            break;
        }
        chunks.push(rest[pos..pos + size].to_vec());
        assert_eq!(&rest[pos + size..pos + size + 2], b"\r\n");
        pos += size + 2;
    }
    Resp {
        status,
        headers,
        body: chunks.concat(),
        chunks: Some(chunks),
        complete,
    }
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
    let (bytes, err) = raw(
        addr,
        &request("POST", path, headers, body.to_string().as_bytes()),
    )
    .await;
    assert!(err.is_none(), "unexpected read error {err:?}");
    parse(&bytes)
}

fn chat(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": "Say hello, twelve+ bytes"}],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn mock_non_stream_chat_is_openai_shaped() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-provider")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    let v = resp.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "test-model");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["refusal"], Value::Null);
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content, completion_text(DEFAULT_WORDS));
    for needle in ["你好", "👍🏽", "👨‍👩‍👧", "\"hi\"", "\n", "\\"] {
        assert!(content.contains(needle), "corpus lacks {needle:?}");
    }
    // "Say hello, twelve+ bytes" is 24 bytes -> 6 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], DEFAULT_WORDS);
    assert_eq!(v["usage"]["total_tokens"], 6 + DEFAULT_WORDS);

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(mock.request_count(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(
        recorded[0].header("Authorization"),
        Some(&b"Bearer sk-provider"[..])
    );
    assert_eq!(recorded[0].json().unwrap()["model"], "test-model");
    mock.clear();
    assert!(mock.requests().is_empty());
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn mock_stream_without_include_usage() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let resp = post(mock.addr, "/v1/chat/completions", &[], &chat(true, false)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.complete);
    let chunks = resp.chunks.as_ref().unwrap();
    let events = resp.events();
    // role + pieces + finish + [DONE], one HTTP chunk per event.
    assert_eq!(events.len(), DEFAULT_WORDS + 3);
    assert_eq!(chunks.len(), events.len());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(
        parsed[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let mut text = String::new();
    for chunk in &parsed {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "test-model");
        assert_eq!(chunk["id"], parsed[0]["id"]);
        assert!(chunk.get("usage").is_none());
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    assert_eq!(text, completion_text(DEFAULT_WORDS));
    let last = parsed.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn mock_stream_with_include_usage() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let resp = post(mock.addr, "/v1/chat/completions", &[], &chat(true, true)).await;
    let events = resp.events();
    assert_eq!(events.len(), DEFAULT_WORDS + 4);
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (usage_chunk, others) = parsed.split_last().unwrap();
    for chunk in others {
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"));
    }
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["object"], "chat.completion.chunk");
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 6);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], DEFAULT_WORDS);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 6 + DEFAULT_WORDS);
}

#[tokio::test]
async fn mock_usage_modes_overrides_and_lengths() {
    let always = start(
        any_port(),
        MockConfig {
            usage_in_stream: UsageMode::Always,
            ..MockConfig::default()
        },
    )
    .await
    .unwrap();
    let resp = post(
        always.addr,
        "/v1/chat/completions",
        &[("x-mock-words", "3")],
        &chat(true, false),
    )
    .await;
    let events = resp.events();
    assert_eq!(events.len(), 3 + 4);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    let never = start(
        any_port(),
        MockConfig {
            usage_in_stream: UsageMode::Never,
            ..MockConfig::default()
        },
    )
    .await
    .unwrap();
    let resp = post(never.addr, "/v1/chat/completions", &[], &chat(true, true)).await;
    assert_eq!(resp.events().len(), DEFAULT_WORDS + 3);
    assert!(!String::from_utf8(resp.body).unwrap().contains("usage"));
    let resp = post(never.addr, "/v1/chat/completions", &[], &chat(false, false)).await;
    assert!(resp.json().get("usage").is_none());

    // Default mode: x-mock-no-usage wins over include_usage and non-streaming.
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-no-usage", "1")],
        &chat(true, true),
    )
    .await;
    assert!(!String::from_utf8(resp.body).unwrap().contains("usage"));
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-no-usage", "1")],
        &chat(false, false),
    )
    .await;
    assert!(resp.json().get("usage").is_none());

    // Explicit overrides, zeros included.
    let headers = [
        ("x-mock-prompt-tokens", "0"),
        ("x-mock-completion-tokens", "77"),
    ];
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &headers,
        &chat(false, false),
    )
    .await;
    assert_eq!(
        resp.json()["usage"],
        json!({
            "prompt_tokens": 0, "completion_tokens": 77, "total_tokens": 77,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    );

    // max_tokens caps the length; x-mock-words chooses it.
    let mut body = chat(false, false);
    body["max_tokens"] = json!(5);
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-words", "100")],
        &body,
    )
    .await;
    assert_eq!(
        resp.json()["choices"][0]["message"]["content"],
        completion_text(5)
    );
    assert_eq!(resp.json()["usage"]["completion_tokens"], 5);
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-words", "100")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.json()["usage"]["completion_tokens"], 100);
}

#[tokio::test]
async fn mock_completions_embeddings_models() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let body = json!({"model": "instruct", "prompt": "abcdefgh", "stream": true,
        "stream_options": {"include_usage": true}, "max_tokens": 2});
    let resp = post(mock.addr, "/v1/completions", &[], &body).await;
    let events = resp.events();
    assert_eq!(events.len(), 2 + 3);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["text"], "Hello");
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
    let usage: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})
    );

    let body = json!({"model": "instruct", "prompt": "abcdefgh"});
    let v = post(mock.addr, "/v1/completions", &[], &body).await.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], completion_text(DEFAULT_WORDS));

    let body = json!({"model": "emb", "input": ["a", "bcdefghij"], "dimensions": 4});
    let v = post(mock.addr, "/v1/embeddings", &[], &body).await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    assert_eq!(v["data"][1]["object"], "embedding");
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));

    let (bytes, _) = raw(mock.addr, &request("GET", "/v1/models", &[], b"")).await;
    let v = parse(&bytes).json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
}

#[tokio::test]
async fn mock_split_frames_are_separate_chunks() {
    let mock = start(
        any_port(),
        MockConfig {
            reproducible: true,
            ..MockConfig::default()
        },
    )
    .await
    .unwrap();
    let whole = post(mock.addr, "/v1/chat/completions", &[], &chat(true, true)).await;
    let split = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-split", "7")],
        &chat(true, true),
    )
    .await;
    assert!(split.complete);
    assert_eq!(split.body, whole.body);
    let chunks = split.chunks.unwrap();
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c.len() == 7));
    assert!(!last.is_empty() && last.len() <= 7);
    // Some frame must end inside a multi-byte character.
    assert!(chunks.iter().any(|c| std::str::from_utf8(c).is_err()));

    // Non-streaming bodies split too, keeping Content-Length.
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-split", "5")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.json()["usage"]["completion_tokens"], DEFAULT_WORDS);
}

#[tokio::test]
async fn mock_reset_after_aborts_connection() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let body = chat(true, false).to_string();
    let req = request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock-reset-after", "3")],
        body.as_bytes(),
    );
    let (bytes, err) = raw(mock.addr, &req).await;
    let resp = parse(&bytes);
    assert_eq!(resp.status, 200);
    assert!(
        !resp.complete,
        "a reset stream must not end with the zero chunk"
    );
    assert_eq!(resp.events().len(), 3);
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset),
        "expected an RST, not a clean close"
    );

    // Zero events: headers, then the reset.
    let req = request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock-reset-after", "0")],
        body.as_bytes(),
    );
    let (bytes, err) = raw(mock.addr, &req).await;
    assert_eq!(parse(&bytes).events().len(), 0);
    assert!(err.is_some());

    // Non-streaming: half the Content-Length body, then the reset.
    let body = chat(false, false).to_string();
    let req = request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock-reset-after", "1")],
        body.as_bytes(),
    );
    let (bytes, err) = raw(mock.addr, &req).await;
    let resp = parse(&bytes);
    let declared: usize = resp.header("content-length").unwrap().parse().unwrap();
    assert_eq!(resp.body.len(), declared / 2);
    assert!(err.is_some());
}

#[tokio::test]
async fn mock_errors_404_400_and_injected_status() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let (bytes, _) = raw(mock.addr, &request("GET", "/v1/nope", &[], b"")).await;
    let resp = parse(&bytes);
    assert_eq!(resp.status, 404);
    let v = resp.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "not_found");
    assert_eq!(v["error"]["param"], Value::Null);
    assert!(v["error"]["message"].is_string());

    let (bytes, _) = raw(
        mock.addr,
        &request("POST", "/v1/chat/completions", &[], b"{nope"),
    )
    .await;
    let resp = parse(&bytes);
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");

    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-status", "429")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["error"]["code"], "rate_limit_exceeded");
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-status", "500")],
        &chat(true, false),
    )
    .await;
    assert_eq!(resp.status, 500);
    assert_eq!(resp.json()["error"]["type"], "server_error");

    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-split", "zero")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert!(resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-mock-split"));
}

#[tokio::test]
async fn mock_delays_and_keep_alive() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let started = Instant::now();
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &[("x-mock-delay-ms", "150")],
        &chat(false, false),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let started = Instant::now();
    let headers = [("x-mock-chunk-delay-ms", "20"), ("x-mock-words", "4")];
    let resp = post(
        mock.addr,
        "/v1/chat/completions",
        &headers,
        &chat(true, false),
    )
    .await;
    // 4 pieces -> 7 events -> 6 pauses.
    assert_eq!(resp.events().len(), 7);
    assert!(started.elapsed() >= Duration::from_millis(120));

    // Two requests on one connection.
    let mut stream = TcpStream::connect(mock.addr).await.unwrap();
    let one = b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n";
    let mut buf = vec![0u8; 65536];
    for _ in 0..2 {
        stream.write_all(one).await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
    assert_eq!(mock.request_count(), 4);
}

#[tokio::test]
async fn mock_recording_off_still_counts() {
    let mock = start(
        any_port(),
        MockConfig {
            record: false,
            ..MockConfig::default()
        },
    )
    .await
    .unwrap();
    post(mock.addr, "/v1/chat/completions", &[], &chat(false, false)).await;
    assert_eq!(mock.request_count(), 1);
    assert!(mock.requests().is_empty());
}

#[test]
fn mock_in_thread_serves_and_shuts_down() {
    let mock = start_in_thread(any_port(), MockConfig::default()).unwrap();
    let addr = mock.addr;
    assert_eq!(mock.base_url(), format!("http://{addr}/v1"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resp = runtime.block_on(post(addr, "/v1/chat/completions", &[], &chat(false, false)));
    assert_eq!(resp.status, 200);
    mock.shutdown();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn mock_shutdown_closes_open_connections() {
    let mock = start(any_port(), MockConfig::default()).await.unwrap();
    let mut stream = TcpStream::connect(mock.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
    mock.shutdown();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}
