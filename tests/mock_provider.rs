//! The raw test client (`tests/common/http.rs`) against the mock provider: de-chunking,
//! split-frame reassembly, resets, the other body framings, and client disconnects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use ai4free::mock::{self, MockConfig, MockHandle};
use common::http;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn reproducible_mock() -> MockHandle {
    let cfg = MockConfig {
        reproducible: true,
        ..MockConfig::default()
    };
    mock::start_in_thread(any_port(), cfg).unwrap()
}

fn chat_stream() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test]
async fn stream_is_read_one_event_per_chunk() {
    let mock = reproducible_mock();
    let raw = http::json_request(CHAT, Some("sk-provider"), &chat_stream(), &[]);
    let mut resp = http::stream(mock.addr, &raw).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("Content-Type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(resp.header("transfer-encoding").as_deref(), Some("chunked"));
    let mut chunks = Vec::new();
    while let Some(chunk) = resp.next_chunk().await.unwrap() {
        chunks.push(chunk);
    }
    // role + 40 pieces + finish + usage + [DONE]
    assert_eq!(chunks.len(), mock::DEFAULT_WORDS + 4);
    for chunk in &chunks {
        assert!(chunk.starts_with(b"data: ") && chunk.ends_with(b"\n\n"));
    }
    let body = chunks.concat();
    let data = http::sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], mock::DEFAULT_WORDS);
    let text: String = data[..data.len() - 2]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, mock::completion_text(mock::DEFAULT_WORDS));
    let recorded = mock.last_request().unwrap();
    assert_eq!(
        recorded.header_str("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
}

#[tokio::test]
async fn split_frames_reassemble_to_the_unsplit_bytes() {
    let mock = reproducible_mock();
    let whole = http::post_json(mock.addr, CHAT, None, &chat_stream(), &[])
        .await
        .unwrap();
    for split in ["1", "3", "64"] {
        let raw = http::json_request(CHAT, None, &chat_stream(), &[("x-mock-split", split)]);
        let mut resp = http::stream(mock.addr, &raw).await.unwrap();
        let limit: usize = split.parse().unwrap();
        let mut body = Vec::new();
        while let Some(chunk) = resp.next_chunk().await.unwrap() {
            assert!(chunk.len() <= limit);
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, whole.body, "x-mock-split: {split}");
    }
}

#[tokio::test]
async fn reset_after_is_an_error_not_a_clean_end() {
    let mock = reproducible_mock();
    let raw = http::json_request(CHAT, None, &chat_stream(), &[("x-mock-reset-after", "2")]);
    let mut resp = http::stream(mock.addr, &raw).await.unwrap();
    assert_eq!(resp.status, 200);
    let mut events = 0;
    let err = loop {
        match resp.next_chunk().await {
            Ok(Some(_)) => events += 1,
            Ok(None) => panic!("a reset stream must not end cleanly"),
            Err(e) => break e,
        }
    };
    assert!(events <= 2);
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{err:?}"
    );
    assert!(http::send(mock.addr, &raw).await.is_err());
}

#[tokio::test]
async fn content_length_bodies_errors_and_get() {
    let mock = reproducible_mock();
    let resp = http::get(mock.addr, "/v1/models", Some("sk-x"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string())
    );
    assert_eq!(resp.json()["object"], "list");

    let body = json!({"model": "m", "messages": []});
    let resp = http::post_json(mock.addr, CHAT, None, &body, &[("x-mock-status", "503")])
        .await
        .unwrap();
    assert_eq!(resp.status, 503);
    assert_eq!(resp.json()["error"]["type"], "server_error");

    let resp = http::post_json(mock.addr, "/v2/nothing", None, &body, &[])
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json()["error"]["code"], "not_found");

    // Bytes that are not HTTP still get a response (hyper's own 400).
    let resp = http::send(mock.addr, b"NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(resp.status, 400);
}

#[tokio::test]
async fn close_delimited_and_trailer_bodies() {
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let replies: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
        ];
        for reply in replies {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await.unwrap();
            conn.write_all(reply).await.unwrap();
        }
    });
    let req = http::request("GET", "/", &[], b"");
    let resp = http::send(addr, &req).await.unwrap();
    assert_eq!(resp.body, b"until close");
    let resp = http::send(addr, &req).await.unwrap();
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"abc"[..]));
}

#[tokio::test]
async fn client_disconnect_mid_stream_leaves_the_mock_serving() {
    let mock = reproducible_mock();
    let raw = http::json_request(
        CHAT,
        None,
        &chat_stream(),
        &[("x-mock-chunk-delay-ms", "20")],
    );
    let mut resp = http::stream(mock.addr, &raw).await.unwrap();
    for _ in 0..2 {
        assert!(resp.next_chunk().await.unwrap().is_some());
    }
    drop(resp);
    let resp = http::post_json(mock.addr, CHAT, None, &chat_stream(), &[])
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(mock.request_count(), 2);
}
