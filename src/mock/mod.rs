//! An in-process, OpenAI-compatible mock provider: the upstream for integration tests,
//! benchmarks and the offline quick start (`cargo run --example mock_provider`).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`
//! and `GET /v1/models`; everything else is a 404 with an OpenAI error body. Responses
//! echo the request's `model` and are shaped like OpenAI's, streaming included.
//!
//! The completion is a fixed, deterministic corpus (see `render.rs`): English, code,
//! CJK, emoji with modifiers, escapes and newlines, one piece per content chunk; 40 pieces
//! by default, fewer if `max_tokens`/`max_completion_tokens` is smaller.
//!
//! Reported usage, unless overridden by header:
//! - `prompt_tokens` = ceil(bytes of prompt text / 4), at least 1. Prompt text is the
//!   string content (and `text` parts) of every chat message, the completions `prompt`,
//!   or the embeddings `input` strings (token-array inputs count one per token).
//! - `completion_tokens` = the number of corpus pieces returned.
//!
//! Request headers steer it (the gateway forwards client headers, so tests set them on
//! the request they send to the gateway):
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-status: N` | respond N (400..=599) with an OpenAI error body |
//! | `x-mock-delay-ms: N` | sleep before sending the response headers |
//! | `x-mock-chunk-delay-ms: N` | sleep between frames (stream events) |
//! | `x-mock-split: N` | write the body in N-byte frames, one HTTP chunk and one socket write each, ignoring event/line/UTF-8 boundaries |
//! | `x-mock-reset-after: K` | after K stream events, abort the connection with a TCP RST (no terminating chunk); non-streaming: after half the body |
//! | `x-mock-no-usage: 1` | omit usage everywhere, streaming or not |
//! | `x-mock-words: N` | completion length in pieces (still capped by `max_tokens`) |
//! | `x-mock-prompt-tokens: N` | report exactly N prompt tokens (0 allowed) |
//! | `x-mock-completion-tokens: N` | report exactly N completion tokens (0 allowed) |
//! | `x-mock-account-headers: 1` | add the headers OpenAI sends about the account billed (`openai-organization`, `openai-project`, its `x-ratelimit-*`, `x-request-id`) |
//!
//! Invalid values for these headers get a 400 so a typo in a test fails loudly.

mod body;
mod render;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use body::{ConnState, Framing, MockBody, MockIo};
use render::{Kind, Meta, Usage};

pub use render::completion_text;

/// Completion length in pieces when neither `x-mock-words` nor `max_tokens` says otherwise.
pub const DEFAULT_WORDS: usize = 40;

/// Upper bound on the completion length, so a stray header cannot exhaust memory.
pub const MAX_WORDS: usize = 1_000_000;

/// Embedding length when the request has no `dimensions`.
pub const DEFAULT_EMBEDDING_DIMS: usize = 16;

const MAX_EMBEDDING_DIMS: usize = 16_384;

/// `created` of every response when [`MockConfig::reproducible`] is set.
pub const REPRODUCIBLE_CREATED: u64 = 1_700_000_000;

/// When a streamed response ends with a usage-only chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageMode {
    /// Like OpenAI: only if the request set `stream_options.include_usage: true`.
    #[default]
    WhenAsked,
    /// Always, as some OpenAI-compatible providers do.
    Always,
    /// Never; non-streaming responses then also omit `usage`.
    Never,
}

/// How the mock behaves; `Default` is OpenAI-like and records requests.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// When streams carry a usage chunk (and whether non-streaming bodies carry `usage`).
    pub usage_in_stream: UsageMode,
    /// Record every request for [`MockHandle::requests`]; turn off for benchmarks.
    pub record: bool,
    /// Completion length in pieces when the request does not choose one.
    pub default_words: usize,
    /// Pause between stream events unless `x-mock-chunk-delay-ms` overrides it; lets
    /// the quick start look like a real model typing.
    pub chunk_delay: Duration,
    /// Model ids listed by `GET /v1/models` (requests may use any model).
    pub models: Vec<String>,
    /// Fixed `id` and `created` in every response, making identical requests produce
    /// byte-identical bodies (for comparing what the gateway relays with the source).
    pub reproducible: bool,
    /// Worker threads of the runtime [`start_in_thread`] creates; `None` means
    /// `min(available CPUs, 4)`. Benchmarks that saturate the mock should raise it.
    pub worker_threads: Option<usize>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            usage_in_stream: UsageMode::WhenAsked,
            record: true,
            default_words: DEFAULT_WORDS,
            chunk_delay: Duration::ZERO,
            models: vec![
                "gpt-4o-mini".to_owned(),
                "gpt-4o".to_owned(),
                "text-embedding-3-small".to_owned(),
            ],
            reproducible: false,
            worker_threads: None,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// e.g. `POST`.
    pub method: String,
    /// The request target as received: path plus `?query` if any.
    pub path: String,
    /// Every header in arrival order, names lowercased, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The request body.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive), as raw bytes.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of header `name` as (lossy) UTF-8.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// State shared by the accept loop, every connection and the handle.
struct Shared {
    cfg: MockConfig,
    models_body: Bytes,
    count: AtomicUsize,
    next_id: AtomicU64,
    recorded: Mutex<Vec<RecordedRequest>>,
}

impl Shared {
    fn new(cfg: MockConfig) -> Self {
        Self {
            models_body: render::models_json(&cfg.models),
            cfg,
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            recorded: Mutex::new(Vec::new()),
        }
    }

    /// The recording lock; a panicking test thread must not poison every later assertion.
    fn recorded(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running mock; dropping it (or [`MockHandle::shutdown`]) stops it.
pub struct MockHandle {
    /// The bound address (the real port when started on port 0).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockHandle {
    /// `http://ADDR/v1`, the base URL to configure as the provider endpoint.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received since start (or the last [`clear`](Self::clear)), oldest
    /// first. Empty when recording is off.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorded().clone()
    }

    /// The most recent request, if any was recorded.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.recorded().last().cloned()
    }

    /// Requests received since start (or the last clear); counted even when recording
    /// is off.
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// Forget recorded requests and reset the count.
    pub fn clear(&self) {
        let mut recorded = self.shared.recorded();
        recorded.clear();
        self.shared.count.store(0, Ordering::Relaxed);
    }

    /// Stop accepting, drop every open connection and, for [`start_in_thread`], wait for
    /// the mock's thread to exit (its port is free once this returns).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Start the mock on the current tokio runtime (accept loop and connections are
/// spawned tasks) and return once it is listening.
pub async fn start(addr: SocketAddr, cfg: MockConfig) -> io::Result<MockHandle> {
    let listener = bind(addr)?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(cfg));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, Arc::clone(&shared), stopped));
    Ok(MockHandle {
        addr,
        shared,
        stop: Some(stop),
        thread: None,
    })
}

/// Start the mock on its own multi-thread runtime in a dedicated std thread, so it keeps
/// serving whatever the caller's runtimes do. Blocks briefly until it is listening.
pub fn start_in_thread(addr: SocketAddr, cfg: MockConfig) -> io::Result<MockHandle> {
    let workers = cfg
        .worker_threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4)
        })
        .max(1);
    let shared = Arc::new(Shared::new(cfg));
    let (stop, stopped) = watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
    let thread_shared = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("ai4free-mock".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("ai4free-mock-worker")
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match bind(addr).and_then(|l| Ok((l.local_addr()?, l))) {
                    Ok((local, listener)) => {
                        let _ = ready_tx.send(Ok(local));
                        listener
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(listener, thread_shared, stopped).await;
            });
            // Dropping the runtime here cancels every connection task still running.
        })?;
    match ready_rx.recv() {
        Ok(Ok(addr)) => Ok(MockHandle {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other(
                "mock provider thread exited before listening",
            ))
        }
    }
}

/// Bind with a deep backlog: benchmark clients open many connections at once.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            // Err means the handle is gone, which also means stop.
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&shared), stopped.clone()));
                }
                // Out of fds or similar: back off instead of spinning on the error.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    // Stream events are small; Nagle would only add latency to them.
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(ConnState::default());
    let io = TokioIo::new(MockIo::new(stream, Arc::clone(&conn)));
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(handle(req, &shared, conn).await) }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        // No timer is configured; say so explicitly instead of relying on the default.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        _ = stopped.changed() => {}
    }
}

/// Per-request steering parsed from `x-mock-*` headers.
#[derive(Debug, Default)]
struct Steering {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    chunk_delay: Option<Duration>,
    split: Option<usize>,
    reset_after: Option<usize>,
    no_usage: bool,
    words: Option<usize>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Steering {
    fn parse(headers: &HeaderMap) -> Result<Self, String> {
        let status = match number::<u16>(headers, "x-mock-status")? {
            None => None,
            Some(code @ 400..=599) => StatusCode::from_u16(code).ok(),
            Some(code) => return Err(format!("x-mock-status must be 400..=599, got {code}")),
        };
        let split = number::<usize>(headers, "x-mock-split")?;
        if split == Some(0) {
            return Err("x-mock-split must be at least 1".to_owned());
        }
        let no_usage = flag(headers, "x-mock-no-usage");
        Ok(Self {
            status,
            delay: number(headers, "x-mock-delay-ms")?.map(Duration::from_millis),
            chunk_delay: number(headers, "x-mock-chunk-delay-ms")?.map(Duration::from_millis),
            split,
            reset_after: number(headers, "x-mock-reset-after")?,
            no_usage,
            words: number::<usize>(headers, "x-mock-words")?.map(|n| n.min(MAX_WORDS)),
            prompt_tokens: number(headers, "x-mock-prompt-tokens")?,
            completion_tokens: number(headers, "x-mock-completion-tokens")?,
        })
    }
}

/// A steering switch: on unless absent, empty, `0` or `false`.
fn flag(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| !matches!(v.as_bytes(), b"0" | b"false" | b""))
}

fn number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Result<Option<T>, String> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| format!("invalid {name} header: expected a non-negative integer"))
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    conn: Arc<ConnState>,
) -> Response<MockBody> {
    let account = flag(req.headers(), "x-mock-account-headers");
    let mut response = respond(req, shared, conn).await;
    if account {
        // What OpenAI sends about the account a request was billed to.
        let headers = response.headers_mut();
        for (name, value) in [
            ("openai-organization", "org-mock-operator"),
            ("openai-project", "proj_mock_operator"),
            ("openai-processing-ms", "12"),
            ("openai-version", "2020-10-01"),
            ("x-request-id", "req_mock_provider"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "29999990"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-reset-tokens", "0s"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

async fn respond(
    req: Request<Incoming>,
    shared: &Shared,
    conn: Arc<ConnState>,
) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
                None,
            )
        }
    };
    shared.count.fetch_add(1, Ordering::Relaxed);
    if shared.cfg.record {
        let recorded = RecordedRequest {
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect(),
            body: body.to_vec(),
        };
        shared.recorded().push(recorded);
    }

    let steering = match Steering::parse(&parts.headers) {
        Ok(steering) => steering,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message, None),
    };
    if let Some(delay) = steering.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = steering.status {
        return injected(status);
    }

    let kind = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/chat/completions") => Endpoint::Text(Kind::Chat),
        (&Method::POST, "/v1/completions") => Endpoint::Text(Kind::Completion),
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (&Method::GET, "/v1/models") => {
            return json_response(
                StatusCode::OK,
                shared.models_body.clone(),
                Framing::default(),
                None,
            )
        }
        _ => {
            let message = format!("Unknown request URL: {} {}", parts.method, parts.uri.path());
            return error(StatusCode::NOT_FOUND, &message, Some("not_found"));
        }
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "We could not parse the JSON body of your request. (HINT: This likely means \
                 you aren't using your HTTP library correctly. The OpenAI API expects a JSON \
                 payload, but what was sent was not valid JSON.)",
                None,
            )
        }
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            None,
        );
    };
    let framing = Framing {
        split: steering.split,
        delay: steering.chunk_delay.unwrap_or(shared.cfg.chunk_delay),
        reset_at: None,
    };
    match kind {
        Endpoint::Text(kind) => text(kind, &request, model, &steering, framing, shared, conn),
        Endpoint::Embeddings => embeddings(&request, model, &steering, framing, shared, conn),
    }
}

enum Endpoint {
    Text(Kind),
    Embeddings,
}

/// `/v1/chat/completions` and `/v1/completions`, streaming or not.
fn text(
    kind: Kind,
    request: &Value,
    model: &str,
    steering: &Steering,
    mut framing: Framing,
    shared: &Shared,
    conn: Arc<ConnState>,
) -> Response<MockBody> {
    let limit = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|key| request.get(*key).and_then(Value::as_u64))
        .min()
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let pieces = steering
        .words
        .unwrap_or(shared.cfg.default_words)
        .min(limit)
        .min(MAX_WORDS);
    let prompt_bytes = match kind {
        Kind::Chat => request
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, |messages| {
                messages
                    .iter()
                    .map(|m| m.get("content").map_or(0, content_bytes))
                    .sum()
            }),
        Kind::Completion => request.get("prompt").map_or(0, content_bytes),
    };
    let usage = Usage {
        prompt: steering
            .prompt_tokens
            .unwrap_or_else(|| approx_tokens(prompt_bytes)),
        completion: steering
            .completion_tokens
            .unwrap_or(u64::try_from(pieces).unwrap_or(u64::MAX)),
    };
    let meta = meta(kind, model, shared);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !stream {
        let usage =
            (!steering.no_usage && shared.cfg.usage_in_stream != UsageMode::Never).then_some(usage);
        let data = render::completion_json(kind, &meta, pieces, usage);
        framing.reset_at = steering.reset_after.map(|_| data.len() / 2);
        return json_response(StatusCode::OK, data, framing, Some(conn));
    }
    let asked = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let send_usage = !steering.no_usage
        && match shared.cfg.usage_in_stream {
            UsageMode::WhenAsked => asked,
            UsageMode::Always => true,
            UsageMode::Never => false,
        };
    let (data, bounds) =
        render::completion_sse(kind, &meta, pieces, send_usage.then_some(usage), send_usage);
    framing.reset_at = steering.reset_after.map(|k| match k.checked_sub(1) {
        None => 0,
        Some(i) => bounds.get(i).copied().unwrap_or(data.len()),
    });
    let mut response = Response::new(MockBody::chunked(data, bounds, framing, Some(conn)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn embeddings(
    request: &Value,
    model: &str,
    steering: &Steering,
    mut framing: Framing,
    shared: &Shared,
    conn: Arc<ConnState>,
) -> Response<MockBody> {
    let (inputs, prompt_tokens) = match request.get("input") {
        Some(Value::String(s)) => (1, approx_tokens(s.len())),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            (1, u64::try_from(items.len()).unwrap_or(u64::MAX))
        }
        Some(Value::Array(items)) => {
            let tokens = items
                .iter()
                .map(|item| match item {
                    Value::String(s) => approx_tokens(s.len()),
                    Value::Array(tokens) => u64::try_from(tokens.len()).unwrap_or(u64::MAX),
                    _ => 0,
                })
                .fold(0u64, u64::saturating_add);
            (items.len(), tokens.max(1))
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "'input' is a required property",
                None,
            );
        }
    };
    let dims = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(DEFAULT_EMBEDDING_DIMS, |d| {
            usize::try_from(d).unwrap_or(MAX_EMBEDDING_DIMS)
        })
        .clamp(1, MAX_EMBEDDING_DIMS);
    let usage = Usage {
        prompt: steering.prompt_tokens.unwrap_or(prompt_tokens),
        completion: 0,
    };
    let usage =
        (!steering.no_usage && shared.cfg.usage_in_stream != UsageMode::Never).then_some(usage);
    let data = render::embeddings_json(&render::json_string(model), inputs, dims, usage);
    framing.reset_at = steering.reset_after.map(|_| data.len() / 2);
    json_response(StatusCode::OK, data, framing, Some(conn))
}

/// Bytes of prompt text in a message `content` or a `prompt`: strings, `text` parts of
/// content arrays, and arrays of strings.
fn content_bytes(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.len(),
                Value::Object(part) => part.get("text").and_then(Value::as_str).map_or(0, str::len),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The documented prompt-token estimate: ceil(bytes / 4), at least 1.
fn approx_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX).max(1)
}

fn meta(kind: Kind, model: &str, shared: &Shared) -> Meta {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let (n, created) = if shared.cfg.reproducible {
        (0, REPRODUCIBLE_CREATED)
    } else {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        (shared.next_id.fetch_add(1, Ordering::Relaxed), created)
    };
    Meta {
        id: format!("{prefix}-mock{n:016x}"),
        created,
        model_json: render::json_string(model),
    }
}

fn json_response(
    status: StatusCode,
    data: Bytes,
    framing: Framing,
    conn: Option<Arc<ConnState>>,
) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(data, framing, conn));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An `invalid_request_error` response.
fn error(status: StatusCode, message: &str, code: Option<&str>) -> Response<MockBody> {
    let body = render::error_json(message, "invalid_request_error", None, code);
    json_response(status, body, Framing::default(), None)
}

/// The `x-mock-status` response, typed the way OpenAI types that status.
fn injected(status: StatusCode) -> Response<MockBody> {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        404 => ("invalid_request_error", Some("not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let message = format!(
        "mock provider: injected status {} (x-mock-status)",
        status.as_u16()
    );
    let body = render::error_json(&message, kind, None, code);
    json_response(status, body, Framing::default(), None)
}
