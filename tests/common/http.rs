//! A raw HTTP/1.1 client for integration tests: it writes exactly the bytes it is given
//! (malformed requests, non-UTF-8 header bytes, huge headers) and parses responses with
//! `httparse`, de-chunking bodies itself so tests see framing at the byte level, and can
//! read a stream chunk by chunk and walk away mid-body to simulate a client disconnect.

// Each test binary uses a different subset; tests may panic on broken invariants.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Checks an answer in OpenAI's error shape: the status, a JSON content type,
/// `error.code`, a non-empty message and a type. Returns the body for more checks.
pub fn assert_openai_error(r: &RawResponse, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    v
}

/// Limit for [`send`] as a whole and for each step of a [`StreamingResponse`].
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Most response headers accepted.
const MAX_HEADERS: usize = 256;

/// A complete response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// In arrival order, names as sent, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive), as lossy UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        find_header(&self.headers, name)
    }

    /// The body as JSON; panics with the body text if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as lossy UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find_header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// The `data:` payloads of an SSE body, in order (`[DONE]` included).
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split('\n')
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data).to_owned())
        .collect()
}

/// A well-formed request. Adds `Host: localhost` and `Content-Length` unless `headers`
/// already has them.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\n").as_bytes());
    if !has("host") {
        out.extend_from_slice(b"Host: localhost\r\n");
    }
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !has("content-length") && !has("transfer-encoding") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Send `raw_request` verbatim on a new connection and read the whole response.
pub async fn send(addr: SocketAddr, raw_request: &[u8]) -> io::Result<RawResponse> {
    with_timeout(async {
        let response = open(addr, raw_request).await?;
        let (status, headers) = (response.status, response.headers.clone());
        let body = response.read_to_end_inner().await?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    })
    .await
}

/// `POST` a JSON body, with `Authorization: Bearer <bearer>` if given.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: &serde_json::Value,
    extra_headers: &[(&str, &str)],
) -> io::Result<RawResponse> {
    let raw = json_request(path, bearer, body, extra_headers);
    send(addr, &raw).await
}

/// The request [`post_json`] sends, for use with [`stream`].
pub fn json_request(
    path: &str,
    bearer: Option<&str>,
    body: &serde_json::Value,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    headers.extend_from_slice(extra_headers);
    request("POST", path, &headers, body.to_string().as_bytes())
}

/// `GET path`, with `Authorization: Bearer <bearer>` if given.
pub async fn get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> io::Result<RawResponse> {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    send(addr, &request("GET", path, &headers, b"")).await
}

/// Send `raw_request` verbatim and return once the response head has arrived; the body
/// is then read with [`StreamingResponse::next_chunk`]. Dropping the value closes the
/// connection (a client disconnect).
pub async fn stream(addr: SocketAddr, raw_request: &[u8]) -> io::Result<StreamingResponse> {
    with_timeout(open(addr, raw_request)).await
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`: bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Delimited by the server closing the connection.
    Close,
    /// Finished (or no body at all).
    Done,
}

/// A response whose body is read incrementally.
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: u16,
    /// In arrival order, names as sent, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    conn: TcpStream,
    /// Received but not yet consumed bytes.
    buf: BytesMut,
    framing: Framing,
}

impl StreamingResponse {
    /// The first value of header `name` (case-insensitive), as lossy UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        find_header(&self.headers, name)
    }

    /// The next piece of body: one whole HTTP chunk for chunked bodies, whatever has
    /// arrived otherwise. `None` at the proper end of the body; an error on a reset, a
    /// premature EOF, bad framing or a 10 s stall.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        with_timeout(self.next_chunk_inner()).await
    }

    /// The rest of the body, de-chunked (each read step under the 10 s limit).
    pub async fn read_to_end(mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn read_to_end_inner(mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk_inner().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Read more bytes into `buf`; `Ok(false)` on EOF.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(16 * 1024);
        Ok(self.conn.read_buf(&mut self.buf).await? > 0)
    }

    /// Make sure `buf` holds at least `n` bytes; EOF first is an error.
    async fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(eof("connection closed in the middle of a chunk"));
            }
        }
        Ok(())
    }

    async fn next_chunk_inner(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.framing {
            Framing::Done => Ok(None),
            Framing::Length(remaining) => {
                if self.buf.is_empty() && !self.fill().await? {
                    return Err(eof("connection closed before Content-Length bytes"));
                }
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                let data = self.buf.split_to(n).to_vec();
                let left = remaining - n as u64;
                self.framing = if left == 0 {
                    Framing::Done
                } else {
                    Framing::Length(left)
                };
                Ok(Some(data))
            }
            Framing::Close => {
                if self.buf.is_empty() && !self.fill().await? {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Ok(Some(self.buf.split().to_vec()))
            }
            Framing::Chunked => loop {
                let (consumed, size) = match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete(parsed)) => parsed,
                    Ok(httparse::Status::Partial) => {
                        if !self.fill().await? {
                            return Err(eof("connection closed before the terminating chunk"));
                        }
                        continue;
                    }
                    Err(_) => return Err(invalid("bad chunk size line")),
                };
                if size == 0 {
                    self.buf.advance(consumed);
                    self.skip_trailers().await?;
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                let size = usize::try_from(size).map_err(|_| invalid("chunk too large"))?;
                self.fill_to(consumed + size + 2).await?;
                self.buf.advance(consumed);
                let data = self.buf.split_to(size).to_vec();
                if &self.buf[..2] != b"\r\n" {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                self.buf.advance(2);
                if !data.is_empty() {
                    return Ok(Some(data));
                }
            },
        }
    }

    /// Consume trailer fields up to and including the final empty line.
    async fn skip_trailers(&mut self) -> io::Result<()> {
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.buf.advance(2);
                    return Ok(());
                }
                Some(end) => self.buf.advance(end + 2),
                None => {
                    if !self.fill().await? {
                        return Err(eof("connection closed in the chunked trailer"));
                    }
                }
            }
        }
    }
}

/// Connect, write the request, and parse the response head (skipping `1xx` heads).
async fn open(addr: SocketAddr, raw_request: &[u8]) -> io::Result<StreamingResponse> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    if let Err(e) = conn.write_all(raw_request).await {
        // A server may answer before it has read the whole request (a 413 on
        // the declared length) and close; the answer is still readable, and
        // the write then fails with EPIPE or a reset, depending on timing.
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e);
        }
    }
    let is_head = raw_request.starts_with(b"HEAD ");
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let parsed = {
            let mut slots = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut slots);
            match response.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => Some((
                    len,
                    response.code.unwrap_or(0),
                    response
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect::<Vec<_>>(),
                )),
                Ok(httparse::Status::Partial) => None,
                Err(e) => return Err(invalid(&format!("bad response head: {e}"))),
            }
        };
        let Some((len, status, headers)) = parsed else {
            buf.reserve(16 * 1024);
            if conn.read_buf(&mut buf).await? == 0 {
                return Err(eof("connection closed before a complete response head"));
            }
            continue;
        };
        buf.advance(len);
        if (100..200).contains(&status) && status != 101 {
            // Interim response (e.g. 100 Continue); the real one follows.
            continue;
        }
        let framing = framing(status, is_head, &headers)?;
        return Ok(StreamingResponse {
            status,
            headers,
            conn,
            buf,
            framing,
        });
    }
}

/// RFC 9112 §6.3 message-body length, response side.
fn framing(status: u16, is_head: bool, headers: &[(String, Vec<u8>)]) -> io::Result<Framing> {
    if is_head || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Framing::Done);
    }
    if let Some(te) = find_header(headers, "transfer-encoding") {
        let last = te.rsplit(',').next().unwrap_or("").trim();
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let lengths: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| String::from_utf8_lossy(v).trim().to_owned())
        .collect();
    match lengths.first() {
        None => Ok(Framing::Close),
        Some(first) => {
            if lengths.iter().any(|l| l != first) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            let n: u64 = first
                .parse()
                .map_err(|_| invalid("invalid Content-Length"))?;
            Ok(if n == 0 {
                Framing::Done
            } else {
                Framing::Length(n)
            })
        }
    }
}

async fn with_timeout<T>(fut: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no response within 10 s",
            ))
        })
}

fn eof(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, message.to_owned())
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// `body` in HTTP/1.1 chunked framing, `piece` bytes a chunk, with the last chunk.
pub fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Plays a client that sends `Expect: 100-continue`: writes the request head
/// `head` (which carries that header and `connection: close`), reads a response
/// head and, only when it is `100 Continue`, writes `body` and reads the next.
/// Returns the response heads read, in order (bodies are left unread).
pub fn heads_after_expect(addr: SocketAddr, head: &[u8], body: &[u8]) -> Vec<String> {
    use std::io::Write;
    let mut s = blocking_send(addr, head, TIMEOUT);
    let first = read_head(&mut s);
    if !first.starts_with("HTTP/1.1 100 ") {
        return vec![first];
    }
    s.write_all(body).unwrap();
    let last = read_head(&mut s);
    vec![first, last]
}

/// Sends `raw` on a fresh connection and reads until the server closes it:
/// the response's status line and whether the close came within `within`
/// (a server that keeps the connection alive leaves the read waiting).
pub fn status_and_close(addr: SocketAddr, raw: &[u8], within: Duration) -> (String, bool) {
    use std::io::Read;
    let mut s = blocking_send(addr, raw, within);
    let mut got = Vec::new();
    let closed = s.read_to_end(&mut got).is_ok();
    let text = String::from_utf8_lossy(&got);
    let status = text.lines().next().unwrap_or_default().to_owned();
    (status, closed)
}

/// A fresh blocking connection to `addr` that has sent `raw` and whose reads
/// give up after `timeout`.
fn blocking_send(addr: SocketAddr, raw: &[u8], timeout: Duration) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(raw).unwrap();
    s
}

/// One response head off a blocking socket, a byte at a time so that nothing
/// after it is consumed.
fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s
            .read(&mut byte)
            .expect("a response head before the timeout");
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    String::from_utf8(got).unwrap()
}
