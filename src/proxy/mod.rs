//! The Pingora `ProxyHttp` glue: each phase extracts plain data from the `Session`,
//! calls the pure cores, and applies the result.
//!
//! ```text
//!  client ──► request_filter ─────────────────────────────────────────────┐
//!             │ route (request::route)                                     │ refusals: 401 403 404
//!             │ authenticate (keys::cache)                                 │ 405 413 429 400 → JSON,
//!             │ GET /v1/models, GET /v1/usage: answered here, not proxied │
//!             │ limit (limits::Limiter: local, or Redis Lua)               │ Ok(true), logging()
//!             │ read body ≤ max_body_bytes, parse (request::parse_head)    │
//!             │ resolve model (config), build upstream body               ◄┘
//!             │   body ≤ 64 KiB: Pingora replays it from its retry buffer
//!             │   body > 64 KiB: handed to a subrequest with a preset body
//!             ▼
//!           upstream_peer           pre-resolved SocketAddr, TLS + SNI, timeouts
//!           upstream_request_filter path, Host, provider key replaces the client's
//!           request_body_filter     swaps in the upstream body at end of stream
//!           response_filter         drops the provider account's headers; x-request-id,
//!                                   x-ratelimit-*, framing
//!           response_body_filter    SSE / JSON accounting (tokens::usage), O(chunk)
//!           fail_to_proxy           upstream failures → 502/504 JSON or in-band SSE error
//!           logging                 tokens, cost, metrics, one usage row (try_send)
//! ```

pub mod ctx;
pub mod request;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, Session};
use pingora::protocols::http::v1::common::is_expect_continue_req;
use pingora::protocols::TcpKeepalive;
use pingora::proxy::subrequest::pipe::{pipe_subrequest, InputBody, InputBodyType};
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::proxy::{FailToProxy, ProxyHttp};
use pingora::{Error, ErrorSource, ErrorType, Result};

pub use ctx::{Ctx, Gathered, MidStream, Prepared, ResponseAccounting};
use request::{Endpoint, Route};

use crate::admin::report::{report_csv, report_json, Format};
use crate::config::{Config, Model, Provider, UpstreamTimeouts};
use crate::error::ProxyError;
use crate::keys::cache::{AuthError, KeyCache, KeyEntry};
use crate::limits::policy::{
    expected_completion, nusd_ceil, reservation, stream_allowance, Hit, Refusal,
};
use crate::limits::{self, Amounts, Limiter, Outcome, Policy, Ticket, Verdict};
use crate::metrics;
use crate::store::Store;
use crate::tokens::count::Tokenizer;
use crate::tokens::usage::{usage_from_response_body, StreamAccounting, Usage};
use crate::usage::{self as usage_mod, SharedStr, TokenSource, UsageRecord, UsageSink};

/// Pingora replays a body read in `request_filter` only from its 64 KiB retry buffer.
const REPLAY_LIMIT: usize = 64 * 1024;
/// A non-streamed response larger than this is passed through without reading its usage.
const JSON_ACCOUNTING_LIMIT: usize = 32 * 1024 * 1024;
/// An SSE event larger than this is passed through without being parsed.
const SSE_EVENT_LIMIT: usize = 4 * 1024 * 1024;
/// Prompts above this size are counted on the blocking pool, off the proxy threads.
const INLINE_COUNT_LIMIT: usize = 256 * 1024;
/// The longest `GET /v1/usage` waits for the store before answering 503.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on provider connections (see [`provider_peer`]): probes start
/// after a minute of silence, and three unanswered ten seconds apart end it.
const UPSTREAM_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const UPSTREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const UPSTREAM_KEEPALIVE_PROBES: usize = 3;

/// A provider as the proxy dials it.
pub struct Upstream {
    /// HTTPS.
    pub tls: bool,
    /// TLS server name (also verified against the certificate).
    pub sni: String,
    /// Host header value.
    pub host: HeaderValue,
    /// The path each endpoint is sent to (base path + suffix, e.g.
    /// `/v1/chat/completions`), parsed once instead of per request.
    uris: [http::Uri; 3],
    /// Resolved addresses, refreshed off the request path.
    pub addrs: ArcSwap<Vec<SocketAddr>>,
    next: AtomicUsize,
    /// `Authorization` for the provider (marked sensitive).
    pub auth: Option<HeaderValue>,
    /// Extra static headers.
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl Upstream {
    /// Builds the dialing view of a configured provider, reading its key from the environment.
    pub fn from_config(p: &Provider) -> std::result::Result<Upstream, String> {
        let host = HeaderValue::from_str(&p.base_url.authority())
            .map_err(|_| format!("provider {}: invalid host", p.name))?;
        let auth = match &p.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => {
                    let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                        format!("provider {}: ${var} is not a valid header value", p.name)
                    })?;
                    v.set_sensitive(true);
                    Some(v)
                }
                _ => {
                    log::warn!(
                        "provider {}: ${var} is not set; requests go out without a provider key",
                        p.name
                    );
                    None
                }
            },
            None => None,
        };
        let mut headers = Vec::with_capacity(p.headers.len());
        for (k, v) in &p.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("provider {}: invalid header name {k}", p.name))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("provider {}: invalid value for header {k}", p.name))?;
            headers.push((name, value));
        }
        let addrs = match p
            .base_url
            .host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
        {
            Ok(ip) => vec![SocketAddr::new(ip, p.base_url.port)],
            Err(_) => Vec::new(),
        };
        let uri = |ep: Endpoint| {
            http::Uri::try_from(format!(
                "{}{}",
                p.base_url.path_prefix,
                ep.upstream_suffix()
            ))
            .map_err(|_| format!("provider {}: invalid base_url path", p.name))
        };
        let uris = [
            uri(Endpoint::ChatCompletions)?,
            uri(Endpoint::Completions)?,
            uri(Endpoint::Embeddings)?,
        ];
        Ok(Upstream {
            tls: p.base_url.tls,
            sni: p.base_url.host.trim_matches(['[', ']']).to_owned(),
            host,
            uris,
            addrs: ArcSwap::from_pointee(addrs),
            next: AtomicUsize::new(0),
            auth,
            headers,
        })
    }

    /// Where `ep` goes on this provider (a clone shares the parsed bytes).
    fn uri(&self, ep: Endpoint) -> http::Uri {
        let [chat, completions, embeddings] = &self.uris;
        match ep {
            Endpoint::ChatCompletions => chat.clone(),
            Endpoint::Completions => completions.clone(),
            Endpoint::Embeddings => embeddings.clone(),
        }
    }

    fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len();
        addrs.get(i).copied()
    }
}

/// The gateway's shared state; one per server, cheap to clone into subrequests.
pub struct Gateway {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Key validation cache.
    pub keys: Arc<KeyCache>,
    /// Request limiter (local counters, or Redis with local fallbacks).
    pub limiter: Arc<Limiter>,
    /// Usage queue.
    pub usage: UsageSink,
    /// Dialing view of each provider, in config order.
    pub upstreams: Arc<Vec<Upstream>>,
    /// The store, read by `GET /v1/usage` (never on the proxied path).
    pub store: Arc<dyn Store>,
    /// With `bench_ablate: [auth]`, the one key every request runs as.
    pub bench_key: Option<Arc<KeyEntry>>,
    /// What the gateway keeps per configured provider and model, indexed like
    /// `config.providers` and each provider's `models`.
    slots: Vec<ProviderSlot>,
}

/// A configured provider's name as its usage rows carry it, and its models.
struct ProviderSlot {
    name: SharedStr,
    models: Vec<ModelSlot>,
}

/// A configured model's metric series and its name as usage rows carry it.
struct ModelSlot {
    name: SharedStr,
    counters: metrics::ModelCounters,
}

impl Gateway {
    /// The gateway over `config`'s shared state.
    pub fn new(
        config: Arc<Config>,
        keys: Arc<KeyCache>,
        usage: UsageSink,
        upstreams: Arc<Vec<Upstream>>,
        limiter: Arc<Limiter>,
        store: Arc<dyn Store>,
    ) -> Gateway {
        let bench_key = config.ablate.auth.then(|| {
            Arc::new(KeyEntry::new(crate::keys::KeyRecord::new(
                "bench-ablate-auth".into(),
                config.tiers.keys().next().cloned().unwrap_or_default(),
                [0; 32],
                0,
            )))
        });
        for name in config.ablate.names() {
            log::warn!("bench_ablate: {name} is OFF; this configuration is for benchmarks only");
        }
        let slots = config
            .providers
            .iter()
            .map(|p| ProviderSlot {
                name: p.name.as_str().into(),
                models: p
                    .models
                    .iter()
                    .map(|m| ModelSlot {
                        name: m.name.as_str().into(),
                        counters: metrics::ModelCounters::new(&m.name),
                    })
                    .collect(),
            })
            .collect();
        Gateway {
            slots,
            config,
            keys,
            limiter,
            usage,
            upstreams,
            store,
            bench_key,
        }
    }
}

/// Writes a complete JSON response; used for every refusal and the local endpoints.
async fn respond_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    ctx: &Ctx,
    retry_after: Option<u64>,
) -> Result<()> {
    respond(session, status, "application/json", body, ctx, retry_after).await
}

/// Writes a complete response with the gateway's headers.
async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &'static str,
    body: Bytes,
    ctx: &Ctx,
    retry_after: Option<u64>,
) -> Result<()> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid response status"))?;
    let h = &mut parts.headers;
    put(
        h,
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    )?;
    put(
        h,
        http::header::CONTENT_LENGTH,
        HeaderValue::from(body.len()),
    )?;
    if status == 401 {
        put(
            h,
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        )?;
    }
    if let Some(s) = retry_after {
        put(h, http::header::RETRY_AFTER, HeaderValue::from(s))?;
    }
    gateway_headers(h, ctx)?;
    session
        .write_response_header(Box::new(ResponseHeader::from(parts)), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// Inserts into a header map without `HeaderMap::insert`'s panic at its size limit.
fn put(h: &mut http::HeaderMap, name: HeaderName, value: HeaderValue) -> Result<()> {
    h.try_insert(name, value)
        .map(drop)
        .map_err(|_| too_many_headers())
}

fn too_many_headers() -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, "too many headers")
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const DEGRADED_HEADER: HeaderName = HeaderName::from_static("x-ai4free-ratelimit");

/// The gateway's own response headers: the request id, the key's `x-ratelimit-*`
/// and, while limits are decided without Redis, `x-ai4free-ratelimit: degraded`.
///
/// They go into the `http` map directly, not through Pingora's `insert_header`:
/// that parses each name and copies it twice to keep a second map of original
/// case, hashes it into both maps, and both maps, sized for the upstream's
/// headers, grow (four headers cost ~8k instructions a request). Here the names
/// are constants and one reserve makes room; a header without a case map is
/// written in each name's standard case, as every header Pingora builds is.
fn gateway_headers(h: &mut http::HeaderMap, ctx: &Ctx) -> Result<()> {
    h.try_reserve(8).map_err(|_| too_many_headers())?;
    if let Some(id) = &ctx.request_id {
        let id = HeaderValue::from_str(id).map_err(|_| {
            Error::explain(ErrorType::InternalError, "request id not a header value")
        })?;
        put(h, X_REQUEST_ID, id)?;
    }
    if let Some(v) = &ctx.verdict {
        rate_headers(h, v)?;
    }
    if ctx.ratelimit_degraded {
        put(h, DEGRADED_HEADER, HeaderValue::from_static("degraded"))?;
    }
    Ok(())
}

/// Request headers that never go upstream: the client's credentials for the
/// gateway (any of the spellings OpenAI-style SDKs use), its OpenAI account
/// scoping, and its framing (the gateway sends its own body, with a length and
/// at once: the client's `Expect` was answered by the gateway).
const CLIENT_ONLY_HEADERS: [&str; 7] = [
    "authorization",
    "api-key",
    "x-api-key",
    "openai-organization",
    "openai-project",
    "transfer-encoding",
    "expect",
];

/// Response headers that describe the provider account behind the gateway, not
/// the client's key: its organization and project, and its rate limits (which a
/// client would read as its own, and which the gateway's `x-ratelimit-*`
/// replace). None of them reach the client.
const PROVIDER_ACCOUNT_HEADERS: [&str; 2] = ["openai-organization", "openai-project"];
const PROVIDER_LIMIT_PREFIX: &str = "x-ratelimit-";

/// The names of the provider-account headers among `headers` (usually none),
/// collected so that they can be removed after the pass over the map.
fn provider_account_headers(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.starts_with(PROVIDER_LIMIT_PREFIX) || PROVIDER_ACCOUNT_HEADERS.contains(&n)
        })
        .cloned()
        .collect()
}

fn rate_headers(h: &mut http::HeaderMap, v: &Verdict) -> Result<()> {
    const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    const REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
    const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
    let reset = |d| {
        HeaderValue::try_from(limits::format_reset(d))
            .map_err(|_| Error::explain(ErrorType::InternalError, "reset not a header value"))
    };
    if let Some(i) = &v.requests {
        put(h, LIMIT_REQUESTS, HeaderValue::from(i.limit))?;
        put(h, REMAINING_REQUESTS, HeaderValue::from(i.remaining))?;
        put(h, RESET_REQUESTS, reset(i.reset)?)?;
    }
    if let Some(i) = &v.tokens {
        put(h, LIMIT_TOKENS, HeaderValue::from(i.limit))?;
        put(h, REMAINING_TOKENS, HeaderValue::from(i.remaining))?;
        put(h, RESET_TOKENS, reset(i.reset)?)?;
    }
    Ok(())
}

/// The ticket and verdict of an admission go into the context; a refusal comes back.
fn admitted(ctx: &mut Ctx, a: limits::Admission) -> std::result::Result<(), ProxyError> {
    ctx.verdict = Some(a.verdict);
    ctx.ratelimit_degraded = a.degraded;
    ctx.ticket = a.ticket;
    match a.verdict.outcome {
        Outcome::Allow => Ok(()),
        Outcome::Deny(r) => {
            metrics::RATE_LIMITED
                .with_label_values(&[r.hit.name()])
                .inc();
            Err(ProxyError::RateLimited(r))
        }
        Outcome::TooLarge(r) => Err(ProxyError::ExceedsLimit(r)),
        Outcome::Unavailable => Err(ProxyError::RateLimiterUnavailable),
    }
}

/// The prompt's token count as the model's tokenizer sees it (0 if unparsable).
fn count_prompt(tok: Tokenizer, ep: Endpoint, body: &[u8]) -> u64 {
    use crate::tokens::count;
    let r = match ep {
        Endpoint::ChatCompletions => count::count_chat_prompt(tok, body),
        Endpoint::Completions => count::count_completion_prompt(tok, body),
        Endpoint::Embeddings => count::count_embedding_input(tok, body),
    };
    r.unwrap_or(0)
}

impl Gateway {
    /// The provider and model a prepared call resolved to.
    fn model_of(&self, p: &Prepared) -> Option<(&Provider, &Model)> {
        let provider = self.config.providers.get(p.provider)?;
        Some((provider, provider.models.get(p.model)?))
    }

    /// The prepared call's provider and model slots.
    fn slots_of(&self, p: &Prepared) -> Option<(&ProviderSlot, &ModelSlot)> {
        let provider = self.slots.get(p.provider)?;
        Some((provider, provider.models.get(p.model)?))
    }

    /// The prepared call and the provider it goes to; every upstream phase needs both.
    fn target<'a>(&'a self, ctx: &'a Ctx) -> Result<(&'a Prepared, &'a Upstream)> {
        let p = ctx
            .prepared
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no prepared request"))?;
        let up = self
            .upstreams
            .get(p.provider)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "unknown provider"))?;
        Ok((p, up))
    }

    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, err: ProxyError) -> Result<bool> {
        // The body may be large and unread: closing beats draining megabytes.
        session.set_keepalive(None);
        let retry = match &err {
            ProxyError::RateLimited(r) => Some(limits::retry_after_secs(r.reset)),
            // The breaker probes Redis again within a second.
            ProxyError::RateLimiterUnavailable => Some(1),
            _ => None,
        };
        if let ProxyError::Auth(a) = &err {
            metrics::AUTH_FAILURES
                .with_label_values(&[match a {
                    AuthError::Missing => "missing",
                    AuthError::Malformed(_) => "malformed",
                    AuthError::Unknown => "unknown",
                    AuthError::Revoked => "revoked",
                    AuthError::Expired => "expired",
                    AuthError::Unavailable => "unavailable",
                }])
                .inc();
        }
        let body = err.body();
        let status = err.status();
        ctx.refusal = Some(err);
        respond_json(session, status, body, ctx, retry).await?;
        Ok(true)
    }

    /// Reads the whole body, refusing with 413 as soon as it passes the limit.
    async fn read_body(&self, session: &mut Session) -> std::result::Result<Bytes, ProxyError> {
        let max = self.config.max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(ProxyError::PayloadTooLarge(max));
        }
        // A client that waits to be told to send its body (curl does for large
        // ones) would otherwise wait out its own timeout (1 s for curl): the
        // body is read here, before any provider is asked, so the gateway
        // gives the go-ahead itself: after the key is accepted, the declared
        // length fits and (when no limit needs the prompt) the request is
        // admitted, so a refusal still spares the client its upload.
        if is_expect_continue_req(session.req_header()) {
            if let Err(e) = session.as_downstream_mut().write_continue_response().await {
                log::debug!("writing 100 Continue: {e}");
                return Err(body_unreadable());
            }
        }
        // The body is read here, before Pingora's proxy loop, which then has
        // nothing left to read: it sends the upstream body only by replaying its
        // retry buffer. So every body that may fit the buffer is buffered, a
        // chunked one (no declared length) included, or the provider would
        // wait for a body that never comes. A larger one (declared, or found
        // while reading: the buffer is then marked truncated) goes through a
        // subrequest, so buffering it here would be waste.
        if declared.is_none_or(|n| n as usize <= REPLAY_LIMIT) {
            session.enable_retry_buffering();
        }
        let capacity = declared.unwrap_or(0).min(max as u64) as usize;
        let mut buf = Gathered::default();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > max {
                        return Err(ProxyError::PayloadTooLarge(max));
                    }
                    buf.push(&chunk, capacity);
                }
                Ok(None) => break,
                Err(e) => {
                    log::debug!("reading request body: {e}");
                    return Err(body_unreadable());
                }
            }
        }
        Ok(buf.into_bytes())
    }

    async fn prepare(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        endpoint: Endpoint,
    ) -> std::result::Result<Prepared, ProxyError> {
        let key = ctx.key.clone().ok_or(ProxyError::Internal)?;
        let body = self.read_body(session).await?;
        let head = request::parse_head(&body)?;
        let (pi, mi) = self
            .config
            .resolve_model(&head.model)
            .ok_or_else(|| ProxyError::ModelNotFound(head.model.clone()))?;
        let provider = self.config.providers.get(pi).ok_or(ProxyError::Internal)?;
        let model = provider.models.get(mi).ok_or(ProxyError::Internal)?;
        if !key.record.models.is_empty() {
            // Only restricted keys pay for the `provider/model` spelling.
            let canonical = format!("{}/{}", provider.name, model.name);
            if !key.record.allows_model(&head.model, &canonical)
                && !key.record.allows_model(&model.name, &canonical)
            {
                return Err(ProxyError::ModelNotAllowed(head.model.clone()));
            }
        }
        let upstream_model = model.upstream_model();
        let force_usage = head.stream
            && provider.stream_usage
            && endpoint != Endpoint::Embeddings
            && !self.config.ablate.counting;
        let upstream_body =
            request::upstream_body(&body, &head, Some(upstream_model), force_usage)?;
        Ok(Prepared {
            request_id: ctx.request_id.clone().unwrap_or_else(|| Arc::from("")),
            key,
            endpoint,
            provider: pi,
            model: mi,
            strip_usage_chunk: force_usage && !head.include_usage,
            prompt_tokens: None,
            mid_stream: None,
            head,
            client_body: body,
            upstream_body,
            verdict: ctx.verdict,
            ratelimit_degraded: ctx.ratelimit_degraded,
            started: ctx.started,
            started_at_ms: ctx.started_at_ms,
        })
    }

    /// What admission reserves for a prepared call: one request, the prompt's exact
    /// count plus the expected completion, and their cost at the model's prices;
    /// and that prompt count (`None` for an unknown model).
    async fn reservation(&self, p: &Prepared, policy: &Policy) -> (Amounts, Option<u64>) {
        let Some((_, model)) = self.model_of(p) else {
            return (Amounts::REQUEST, None);
        };
        let (tok, ep) = (model.tokenizer, p.endpoint);
        let prompt = if p.client_body.len() > INLINE_COUNT_LIMIT {
            let body = p.client_body.clone();
            tokio::task::spawn_blocking(move || count_prompt(tok, ep, &body))
                .await
                .unwrap_or(0)
        } else {
            count_prompt(tok, ep, &p.client_body)
        };
        let completion = match ep {
            Endpoint::Embeddings => 0,
            _ => expected_completion(
                p.head.max_completion_tokens,
                p.head.max_tokens,
                policy.default_max_tokens,
            ),
        };
        let amounts = reservation(
            prompt,
            completion,
            model.input_price.micros_per_mtok,
            model.output_price.micros_per_mtok,
        );
        (amounts, Some(prompt))
    }

    /// `enforce_mid_stream`: the allowance of an admitted streamed call, from
    /// the states its admission left (none for non-streamed calls, embeddings,
    /// or keys without a token or spend limit).
    fn mid_stream(
        &self,
        p: &Prepared,
        policy: &Policy,
        states: &limits::policy::LimitStates,
    ) -> Option<MidStream> {
        if !policy.enforce_mid_stream || !p.head.stream || p.endpoint == Endpoint::Embeddings {
            return None;
        }
        let (_, model) = self.model_of(p)?;
        let allowance = stream_allowance(
            states,
            p.prompt_tokens?,
            model.input_price.micros_per_mtok,
            model.output_price.micros_per_mtok,
        )?;
        Some(MidStream {
            allowance,
            resets_at: std::time::Instant::now() + allowance.reset,
        })
    }

    fn models_body(&self, ctx: &Ctx) -> Bytes {
        let mut data = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in &self.config.providers {
            for m in &p.models {
                let canonical = format!("{}/{}", p.name, m.name);
                // The first provider offering a name serves the bare name; others
                // stay reachable by their explicit provider/model form. Decided
                // before the key's filter: a key allowed only `other/m` must be
                // shown `other/m`, since the bare `m` routes to another provider.
                let first = seen.insert(m.name.clone());
                let allowed = ctx
                    .key
                    .as_ref()
                    .is_none_or(|k| k.record.allows_model(&m.name, &canonical));
                if !allowed {
                    continue;
                }
                let id = if first { m.name.clone() } else { canonical };
                data.push(serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": p.name}));
            }
        }
        Bytes::from(
            serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
                .unwrap_or_default(),
        )
    }

    /// `GET /v1/usage`: the calling key's own report from the daily rollup, as JSON
    /// or CSV. Answered here: not proxied, not a usage row.
    async fn usage_report(
        &self,
        session: &Session,
        key_id: &str,
    ) -> std::result::Result<(&'static str, Bytes), ProxyError> {
        let params = request::usage_params(session.req_header().uri.query(), key_id)?;
        let rows = match tokio::time::timeout(
            REPORT_TIMEOUT,
            self.store.usage_rollup(&params.query),
        )
        .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                // Debug, not warn: a client polling during an outage must not flood the log.
                log::debug!("usage report: {e}");
                return Err(ProxyError::StoreUnavailable);
            }
            Err(_) => return Err(ProxyError::StoreUnavailable),
        };
        Ok(match params.format {
            Format::Json => (
                "application/json",
                Bytes::from(serde_json::to_vec(&report_json(&rows, &params)).unwrap_or_default()),
            ),
            Format::Csv => (
                "text/csv; charset=utf-8",
                Bytes::from(report_csv(&rows, &params)),
            ),
        })
    }

    /// Hands a call whose body exceeds the replay buffer to a subrequest that reads
    /// the prepared body from memory; the subrequest runs every upstream phase.
    async fn delegate(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        prepared: Prepared,
    ) -> Result<bool> {
        let Some(spawner) = session.subrequest_spawner.as_ref() else {
            return self.refuse(session, ctx, ProxyError::Internal).await;
        };
        let body = prepared.upstream_body.clone();
        // The subrequest records usage, so it settles the reservation too.
        let handoff: Handoff = (prepared, ctx.ticket.take());
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(BodyMode::ExpectBody)
            .user_ctx(Box::new(parking_lot::Mutex::new(Some(handoff))))
            .build();
        let (sub, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
        ctx.delegated = true;
        match pipe_subrequest(
            session,
            sub,
            handle,
            |t| Ok(Some(t)),
            InputBodyType::Preset(InputBody::Bytes(vec![body])),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                if !e.state.header_received && session.response_written().is_none() {
                    let err = map_upstream_error(&e.error);
                    respond_json(session, err.status(), err.body(), ctx, None).await?;
                }
                log::debug!("subrequest ended with {}", e.error);
                Ok(true)
            }
        }
    }

    /// Ends a stream cut by `enforce_mid_stream`: the events that still fit, one
    /// error event in the 429's vocabulary, `[DONE]`, and the end of the body.
    async fn end_cut_stream(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        tail: Bytes,
    ) -> FailToProxy {
        let refusal = ctx
            .prepared
            .as_ref()
            .and_then(|p| p.mid_stream)
            .map(|ms| Refusal {
                hit: Hit::Limit(ms.allowance.limit),
                value: ms.allowance.value,
                used: 0,
                requested: 0,
                reset: ms
                    .resets_at
                    .saturating_duration_since(std::time::Instant::now()),
            });
        let err = refusal.map_or(ProxyError::Internal, ProxyError::LimitReachedMidStream);
        if let ProxyError::LimitReachedMidStream(r) = &err {
            metrics::RATE_LIMITED
                .with_label_values(&[r.hit.name()])
                .inc();
        }
        ctx.failure = Some(err.code());
        ctx.stream_error_sent = true;
        let event = err.sse_event();
        let mut out = bytes::BytesMut::with_capacity(tail.len() + event.len() + 14);
        out.extend_from_slice(&tail);
        out.extend_from_slice(&event);
        out.extend_from_slice(b"data: [DONE]\n\n");
        if let Err(we) = session.write_response_body(Some(out.freeze()), true).await {
            log::debug!("could not end a cut stream: {we}");
        }
        FailToProxy {
            error_code: 200,
            can_reuse_downstream: false,
        }
    }

    fn build_usage(
        &self,
        ctx: &mut Ctx,
        status: u16,
        latency: Duration,
    ) -> Option<(UsageRecord, Option<CountJob>)> {
        let key = ctx.key.as_ref()?;
        let endpoint = ctx.endpoint?;
        let latency_ms = latency.as_millis() as u64;
        let ttfb_ms = ctx
            .first_byte
            .map(|t| t.saturating_duration_since(ctx.started).as_millis() as u64);
        let mut row = UsageRecord {
            request_id: ctx
                .request_id
                .clone()
                .map_or_else(SharedStr::empty, SharedStr::from),
            key_id: key.id.clone(),
            model: SharedStr::empty(),
            provider: SharedStr::empty(),
            endpoint: endpoint.shared_path(),
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            cost_pusd: 0,
            input_price_micros: 0,
            output_price_micros: 0,
            status,
            stream: false,
            token_source: TokenSource::None,
            started_at_ms: ctx.started_at_ms,
            latency_ms,
            ttfb_ms,
            error: ctx
                .refusal
                .as_ref()
                .map(|e| e.code())
                .or(ctx.failure)
                .map(str::to_owned),
        };
        let Some(p) = ctx.prepared.as_ref() else {
            return Some((row, None));
        };
        let (_, model) = self.model_of(p)?;
        let (provider_slot, model_slot) = self.slots_of(p)?;
        row.model = model_slot.name.clone();
        row.provider = provider_slot.name.clone();
        row.stream = p.head.stream;
        row.input_price_micros = model.input_price.micros_per_mtok as i64;
        row.output_price_micros = model.output_price.micros_per_mtok as i64;
        if ctx.upstream_status.is_none() {
            // Never reached the provider: nothing to bill.
            return Some((row, None));
        }
        let upstream_ok = ctx.upstream_status.is_some_and(|s| (200..300).contains(&s));
        let tok = model.tokenizer;
        let job = match std::mem::take(&mut ctx.response) {
            ResponseAccounting::Stream(mut acc) => {
                acc.finish(None);
                let cut = !ctx.response_complete || ctx.failure.is_some();
                match acc.usage() {
                    Some(u) if !cut || acc.saw_done() => {
                        apply_provider_usage(&mut row, u);
                        None
                    }
                    _ if !upstream_ok => None,
                    _ => {
                        row.token_source = if cut {
                            TokenSource::Partial
                        } else {
                            TokenSource::Counted
                        };
                        row.completion_tokens = acc.counted_completion_tokens(tok);
                        CountJob::new(p, tok, None, &mut row)
                    }
                }
            }
            ResponseAccounting::Json(None) => None,
            ResponseAccounting::Json(Some(body)) => {
                match usage_from_response_body(body.as_slice()) {
                    Some(u) => {
                        apply_provider_usage(&mut row, u);
                        None
                    }
                    None if !upstream_ok => None,
                    None => {
                        row.token_source = if ctx.response_complete {
                            TokenSource::Counted
                        } else {
                            TokenSource::Partial
                        };
                        CountJob::new(p, tok, Some(body.into_bytes()), &mut row)
                    }
                }
            }
            ResponseAccounting::None => None,
        };
        Some((row, job))
    }
}

/// What a parent hands its large-body subrequest.
type Handoff = (Prepared, Option<Ticket>);

/// The client's body could not be read to its end (nor the go-ahead for it written).
fn body_unreadable() -> ProxyError {
    ProxyError::InvalidJson("the request body could not be read".into())
}

/// The peer a call to provider `up` at `addr` goes to, with its timeouts.
fn provider_peer(addr: SocketAddr, up: &Upstream, stream: bool, t: &UpstreamTimeouts) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, up.tls, up.sni.clone());
    peer.options.connection_timeout = Some(t.connect);
    peer.options.total_connection_timeout = Some(t.connect * 2);
    // Pingora times each upstream read separately. For a non-streamed call the one
    // long wait is for the response header (the whole generation); for a stream,
    // reads are the header and then the gaps between chunks.
    peer.options.read_timeout = Some(if stream {
        t.first_byte.max(t.idle)
    } else {
        t.first_byte
    });
    peer.options.write_timeout = Some(t.idle);
    // Pooled provider connections have no idle timeout: Pingora would arm a
    // timer for it on every release to the pool (a timer registration and two
    // clock reads a request, ~1.3k instructions). A connection the provider
    // closes is dropped as soon as its FIN arrives, the pool's size bounds how
    // many stay open, and TCP keepalive ends those whose peer vanished without
    // a word (~90 s idle). Data left unacknowledged for `idle` also ends the
    // connection (TCP_USER_TIMEOUT), so a request sent into a dead pooled
    // connection fails within `idle` rather than the first-byte timeout, as an
    // OS error on a reused connection, which Pingora retries on a fresh one.
    peer.options.idle_timeout = None;
    peer.options.tcp_keepalive = Some(TcpKeepalive {
        idle: UPSTREAM_KEEPALIVE_IDLE,
        interval: UPSTREAM_KEEPALIVE_INTERVAL,
        count: UPSTREAM_KEEPALIVE_PROBES,
        #[cfg(target_os = "linux")]
        user_timeout: t.idle,
    });
    peer
}

/// Prices a row at the model's configured prices (exact, integer pico-USD).
fn price_row(model: &Model, row: &mut UsageRecord) {
    row.cost_pusd = usage_mod::cost_pusd(
        row.prompt_tokens,
        row.cached_prompt_tokens,
        row.completion_tokens,
        model.input_price.micros_per_mtok,
        model.cached_input_price.map(|c| c.micros_per_mtok),
        model.output_price.micros_per_mtok,
    );
}

/// Counting work deferred to `logging` (it may be large; it never runs in a body
/// filter): the prompt unless admission already counted it, and a non-streamed
/// response body without usage.
struct CountJob {
    tok: Tokenizer,
    ep: Endpoint,
    prompt: Option<Bytes>,
    response: Option<Bytes>,
}

impl CountJob {
    /// The job for `p`, or none when admission's prompt count (written to `row`
    /// here) leaves nothing to count.
    fn new(
        p: &Prepared,
        tok: Tokenizer,
        response: Option<Bytes>,
        row: &mut UsageRecord,
    ) -> Option<CountJob> {
        let prompt = match p.prompt_tokens {
            Some(n) => {
                row.prompt_tokens = n;
                None
            }
            None => Some(p.client_body.clone()),
        };
        (prompt.is_some() || response.is_some()).then_some(CountJob {
            tok,
            ep: p.endpoint,
            prompt,
            response,
        })
    }

    /// (prompt, completion), each when it was to be counted.
    fn run(self) -> (Option<u64>, Option<u64>) {
        use crate::tokens::count;
        let (tok, ep) = (self.tok, self.ep);
        let completion = self.response.map(|resp| match ep {
            Endpoint::ChatCompletions => {
                count::count_chat_completion_response(tok, &resp).unwrap_or(0)
            }
            Endpoint::Completions => count::count_text_completion_response(tok, &resp).unwrap_or(0),
            Endpoint::Embeddings => 0,
        });
        (self.prompt.map(|b| count_prompt(tok, ep, &b)), completion)
    }

    fn size(&self) -> usize {
        self.prompt.as_ref().map_or(0, Bytes::len) + self.response.as_ref().map_or(0, Bytes::len)
    }
}

fn apply_provider_usage(row: &mut UsageRecord, u: Usage) {
    row.token_source = TokenSource::Provider;
    row.prompt_tokens = u.prompt_tokens;
    row.cached_prompt_tokens = u.cached_prompt_tokens;
    row.completion_tokens = u.completion_tokens;
}

/// Maps a Pingora error from the upstream side to the client-facing error.
fn map_upstream_error(e: &Error) -> ProxyError {
    match e.etype() {
        ErrorType::HTTPStatus(413) => ProxyError::PayloadTooLarge(0),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            ProxyError::UpstreamTimeout
        }
        _ => match e.esource() {
            ErrorSource::Upstream => ProxyError::UpstreamUnreachable,
            _ => ProxyError::Internal,
        },
    }
}

fn upstream_error_kind(e: &Error) -> &'static str {
    match e.etype() {
        ErrorType::ConnectTimedout => "connect_timeout",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            "connect"
        }
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::TLSWantX509Lookup => {
            "tls"
        }
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => "reset",
        _ => "other",
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &Ctx) -> bool {
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // A subrequest carries everything the parent established; it only goes upstream.
        if let Some(sub) = session.subrequest_ctx.as_mut() {
            let prepared = sub
                .user_ctx_mut()
                .and_then(|u| u.downcast_mut::<parking_lot::Mutex<Option<Handoff>>>())
                .and_then(|m| m.lock().take());
            let Some((p, ticket)) = prepared else {
                return self.refuse(session, ctx, ProxyError::Internal).await;
            };
            ctx.started = p.started;
            ctx.started_at_ms = p.started_at_ms;
            ctx.request_id = Some(p.request_id.clone());
            ctx.key = Some(p.key.clone());
            ctx.endpoint = Some(p.endpoint);
            ctx.verdict = p.verdict;
            ctx.ticket = ticket;
            ctx.ratelimit_degraded = p.ratelimit_degraded;
            ctx.prepared = Some(p);
            return Ok(false);
        }

        ctx.request_id = Some(usage_mod::new_request_id(ctx.started_at_ms));
        ctx.ratelimit_degraded = self.limiter.is_degraded();
        let route = {
            let req = session.req_header();
            request::route(req.method.as_str(), req.uri.path())
        };
        let route = match route {
            Ok(r) => r,
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        if route == Route::Health {
            respond_json(
                session,
                200,
                Bytes::from_static(br#"{"status":"ok"}"#),
                ctx,
                None,
            )
            .await?;
            return Ok(true);
        }
        let auth = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let authenticated = match &self.bench_key {
            Some(k) => Ok(k.clone()),
            // The request's own start time: one clock read serves the whole request.
            None => self.keys.authenticate(auth, ctx.started_at_ms).await,
        };
        let key = match authenticated {
            Ok(k) => k,
            Err(AuthError::Unavailable) => {
                return self
                    .refuse(session, ctx, ProxyError::KeyStoreUnavailable)
                    .await
            }
            Err(e) => return self.refuse(session, ctx, ProxyError::Auth(e)).await,
        };
        let endpoint = match route {
            Route::Proxy(endpoint) => endpoint,
            Route::Usage => {
                let answer = self.usage_report(session, &key.record.id).await;
                ctx.key = Some(key);
                return match answer {
                    Ok((content_type, body)) => {
                        respond(session, 200, content_type, body, ctx, None).await?;
                        Ok(true)
                    }
                    Err(e) => self.refuse(session, ctx, e).await,
                };
            }
            Route::Models | Route::Health => {
                ctx.key = Some(key);
                let body = self.models_body(ctx);
                respond_json(session, 200, body, ctx, None).await?;
                return Ok(true);
            }
        };
        let policy = Policy::effective(self.config.tier(&key.record.tier), &key.record.limits);
        ctx.key = Some(key);
        ctx.endpoint = Some(endpoint);
        let limited = !self.config.ablate.limits && !policy.is_empty();
        // Without a token or spend limit nothing depends on the prompt: admit before
        // reading the body (a refused request costs no body read).
        if limited && !policy.needs_body() {
            let a = self
                .limiter
                .admit(
                    key_id_of(ctx),
                    &policy,
                    &Amounts::REQUEST,
                    request_id_of(ctx),
                )
                .await;
            if let Err(e) = admitted(ctx, a) {
                return self.refuse(session, ctx, e).await;
            }
        }
        let mut prepared = match self.prepare(session, ctx, endpoint).await {
            Ok(p) => p,
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        if limited && policy.needs_body() {
            let (amounts, prompt) = self.reservation(&prepared, &policy).await;
            prepared.prompt_tokens = prompt;
            let a = match policy.too_large(&amounts) {
                Some(r) => {
                    // Nothing is reserved, but the 400 still reports the limits.
                    let now = self.limiter.peek(key_id_of(ctx), &policy).await;
                    limits::Admission {
                        verdict: Verdict {
                            outcome: Outcome::TooLarge(r),
                            ..now.unwrap_or(Verdict::NONE)
                        },
                        ..limits::Admission::none(ctx.ratelimit_degraded)
                    }
                }
                None => {
                    self.limiter
                        .admit(key_id_of(ctx), &policy, &amounts, request_id_of(ctx))
                        .await
                }
            };
            let states = a.states;
            if let Err(e) = admitted(ctx, a) {
                return self.refuse(session, ctx, e).await;
            }
            prepared.mid_stream = self.mid_stream(&prepared, &policy, &states);
            prepared.verdict = ctx.verdict;
            prepared.ratelimit_degraded = ctx.ratelimit_degraded;
        }
        if prepared.client_body.len() > REPLAY_LIMIT || session.retry_buffer_truncated() {
            ctx.prepared = Some(prepared.clone());
            return self.delegate(session, ctx, prepared).await;
        }
        ctx.prepared = Some(prepared);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (p, up) = self.target(ctx)?;
        let addr = up.pick().ok_or_else(|| {
            Error::explain(ErrorType::ConnectNoRoute, "provider address not resolved").into_up()
        })?;
        Ok(Box::new(provider_peer(
            addr,
            up,
            p.head.stream,
            &self.config.upstream,
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (p, up) = self.target(ctx)?;
        // Rewritten in the `http` map, without Pingora's case map (as the
        // response's headers are, see `gateway_headers`): `insert_header` parses
        // each name and keeps a second copy of it. `req` is Pingora's per-attempt
        // clone of the client's header, so a retry starts again from the
        // original. The placeholder (`Request::new`'s parts) allocates nothing.
        let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
        let mut parts = http::request::Parts::from(std::mem::replace(req, placeholder));
        parts.uri = up.uri(p.endpoint);
        let h = &mut parts.headers;
        // The client's gateway key must never leave the gateway, and the provider
        // frames the body we send. One pass finds which of these came: most are
        // absent, and a removal hashes and probes.
        let mut present = [false; CLIENT_ONLY_HEADERS.len()];
        for name in h.keys() {
            if let Some(i) = CLIENT_ONLY_HEADERS.iter().position(|c| name == c) {
                present[i] = true;
            }
        }
        for (name, _) in CLIENT_ONLY_HEADERS.iter().zip(present).filter(|(_, p)| *p) {
            h.remove(*name);
        }
        // No reserve: the client's map usually has room for the one header
        // this adds (`accept-encoding`), and a reserve that does grow rehashes
        // every entry (~850 instructions here).
        put(h, http::header::HOST, up.host.clone())?;
        if let Some(a) = &up.auth {
            put(h, http::header::AUTHORIZATION, a.clone())?;
        }
        for (k, v) in &up.headers {
            put(h, k.clone(), v.clone())?;
        }
        // We read usage out of the response; a compressed one would be opaque.
        put(
            h,
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        )?;
        put(
            h,
            http::header::CONTENT_LENGTH,
            HeaderValue::from(p.upstream_body.len()),
        )?;
        *req = RequestHeader::from(parts);
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The client's body was read (and possibly rewritten) in request_filter;
        // whatever Pingora replays is replaced by the prepared upstream body.
        if let Some(p) = ctx.prepared.as_ref() {
            *body = Some(if end_of_stream {
                p.upstream_body.clone()
            } else {
                Bytes::new()
            });
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.first_byte.get_or_insert_with(std::time::Instant::now);
        ctx.upstream_status = Some(resp.status.as_u16());
        let is_sse = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let strip = ctx.prepared.as_ref().is_some_and(|p| p.strip_usage_chunk);
        if self.config.ablate.counting {
            ctx.response = ResponseAccounting::None;
        } else if is_sse {
            let mut acc = StreamAccounting::new(SSE_EVENT_LIMIT);
            let cap = ctx.prepared.as_ref().and_then(|p| {
                let ms = p.mid_stream?;
                Some((
                    self.model_of(p)?.1.tokenizer,
                    ms.allowance.completion_tokens,
                ))
            });
            if strip || cap.is_some() {
                // The body is rewritten: the usage event the client did not ask
                // for is dropped, or the stream may end early at a cap.
                resp.remove_header("content-length");
            }
            if let Some((tok, allowed)) = cap {
                acc = acc.capped(tok, allowed);
            }
            ctx.response = ResponseAccounting::Stream(Box::new(acc));
        } else {
            ctx.response = ResponseAccounting::Json(Some(Gathered::default()));
        }
        // The header's parts without Pingora's case map (see `gateway_headers`);
        // the placeholder allocates nothing.
        let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
        let upstream = std::mem::replace(resp, placeholder);
        let mut parts = http::response::Parts::from(upstream);
        for name in provider_account_headers(&parts.headers) {
            parts.headers.remove(&name);
        }
        gateway_headers(&mut parts.headers, ctx)?;
        *resp = ResponseHeader::from(parts);
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        let strip = ctx.prepared.as_ref().is_some_and(|p| p.strip_usage_chunk);
        let (mut cut, mut capped) = (false, false);
        match &mut ctx.response {
            ResponseAccounting::Stream(acc) => {
                capped = acc.is_capped();
                if strip || capped {
                    let mut out = Vec::new();
                    if let Some(chunk) = body.as_ref() {
                        acc.observe_rewriting(chunk, &mut out, strip);
                    }
                    if end_of_stream {
                        acc.finish(Some(&mut out));
                    }
                    cut = acc.is_cut();
                    *body = Some(Bytes::from(out));
                } else if let Some(chunk) = body.as_ref() {
                    acc.observe(chunk);
                }
            }
            ResponseAccounting::Json(gathered) => {
                if let (Some(chunk), Some(g)) = (body.as_ref(), gathered.as_mut()) {
                    if g.len() + chunk.len() <= JSON_ACCOUNTING_LIMIT {
                        g.push(chunk, 0);
                    } else {
                        // Past the bound: the usage is not read, the memory is freed.
                        *gathered = None;
                    }
                }
            }
            ResponseAccounting::None => {}
        }
        if capped {
            // Pingora filters a batch of upstream chunks before writing any, and
            // an error drops the whole batch: keep what was released but not yet
            // written, so a cut can still deliver every event it accounted for.
            let sent = session.as_downstream().body_bytes_sent() as u64;
            let pending = &mut ctx.unwritten;
            while pending.front().is_some_and(|(end, _)| *end <= sent) {
                pending.pop_front();
            }
            let out = body.take().unwrap_or_default();
            if cut {
                let mut tail = bytes::BytesMut::new();
                for (end, b) in pending.drain(..) {
                    let start = end - b.len() as u64;
                    let skip = usize::try_from(sent.saturating_sub(start)).unwrap_or(usize::MAX);
                    tail.extend_from_slice(b.get(skip..).unwrap_or_default());
                }
                tail.extend_from_slice(&out);
                ctx.cut_tail = Some(tail.freeze());
            } else if !out.is_empty() {
                ctx.released += out.len() as u64;
                pending.push_back((ctx.released, out.clone()));
            }
            *body = Some(out);
        }
        if cut {
            // The allowance is reached: what still fit goes out with the in-band
            // error from fail_to_proxy, and the error drops the upstream.
            ctx.cut_mid_stream = true;
            return Err(Error::explain(
                ErrorType::Custom("mid_stream_limit"),
                "stream ended at the key's token or spend limit",
            ));
        }
        if end_of_stream {
            ctx.response_complete = true;
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        // An expected outcome of enforce_mid_stream, not a fault: no log line per request.
        ctx.cut_mid_stream
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(tail) = ctx.cut_tail.take() {
            return self.end_cut_stream(session, ctx, tail).await;
        }
        let client_gone = e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if client_gone {
            ctx.failure = Some("client_closed");
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let err = match e.etype() {
            ErrorType::HTTPStatus(code) => {
                // Produced by us; the response (if any) was already written.
                ctx.failure = Some("refused");
                return FailToProxy {
                    error_code: *code,
                    can_reuse_downstream: false,
                };
            }
            _ => map_upstream_error(e),
        };
        if e.esource() == &ErrorSource::Upstream {
            metrics::UPSTREAM_ERRORS
                .with_label_values(&[upstream_error_kind(e)])
                .inc();
        }
        ctx.failure = Some(err.code());
        let code = err.status();
        if session.response_written().is_none() {
            if let Err(we) = respond_json(session, code, err.body(), ctx, None).await {
                log::debug!("could not send error response: {we}");
            }
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // Headers are out. For a stream, say so in-band rather than end silently,
        // which a client would take for a complete answer.
        if matches!(ctx.response, ResponseAccounting::Stream(_)) && !ctx.stream_error_sent {
            ctx.stream_error_sent = true;
            if let Err(we) = session
                .write_response_body(Some(err.sse_event()), true)
                .await
            {
                log::debug!("could not send in-band error: {we}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if ctx.delegated {
            return;
        }
        let status = session
            .response_written()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        if let Some(err) = e {
            if ctx.failure.is_none() {
                ctx.failure = Some(if err.esource() == &ErrorSource::Downstream {
                    "client_closed"
                } else {
                    "upstream_error"
                });
            }
        }
        if self.config.ablate.usage && self.config.ablate.metrics {
            return;
        }
        let target = ctx.prepared.as_ref().and_then(|p| {
            let (_, model) = self.model_of(p)?;
            Some((model, &self.slots_of(p)?.1.counters))
        });
        let model = target.map(|(m, _)| m);
        let counters = target.map(|(_, c)| c);
        let with_metrics = !self.config.ablate.metrics;
        let latency = ctx.started.elapsed();
        if with_metrics {
            match counters {
                Some(c) => c.request(status),
                None => metrics::REQUESTS
                    .with_label_values(&["unknown", metrics::status_label(status)])
                    .inc(),
            }
            metrics::REQUEST_DURATION.observe(latency.as_secs_f64());
            if let Some(fb) = ctx.first_byte {
                metrics::TTFT.observe(fb.saturating_duration_since(ctx.started).as_secs_f64());
            }
        }
        if self.config.ablate.usage {
            return;
        }
        let Some((mut row, job)) = self.build_usage(ctx, status, latency) else {
            return;
        };
        if let Some(job) = job {
            let (prompt, completion) = if job.size() > INLINE_COUNT_LIMIT {
                tokio::task::spawn_blocking(move || job.run())
                    .await
                    .unwrap_or((Some(0), None))
            } else {
                job.run()
            };
            if let Some(p) = prompt {
                row.prompt_tokens = p;
            }
            if let Some(c) = completion {
                row.completion_tokens = c;
            }
        }
        if let Some(m) = model {
            price_row(m, &mut row);
        }
        if let Some(t) = ctx.ticket.take() {
            // What was billed is what counts: an upstream failure before any output
            // bills nothing and so refunds every token and cent reserved.
            let actual = Amounts::billed(
                row.prompt_tokens.saturating_add(row.completion_tokens),
                nusd_ceil(u128::try_from(row.cost_pusd).unwrap_or(0)),
            );
            self.limiter.settle(t, &actual);
        }
        let billed = row.token_source != TokenSource::None;
        if let Some(c) = counters.filter(|_| with_metrics && billed) {
            c.billed(
                row.prompt_tokens,
                row.completion_tokens,
                row.cost_pusd as f64 / 1e12,
            );
        }
        self.usage.record(row);
    }
}

fn key_id_of(ctx: &Ctx) -> &str {
    ctx.key.as_ref().map_or("", |k| k.record.id.as_str())
}

fn request_id_of(ctx: &Ctx) -> &str {
    ctx.request_id.as_deref().unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    fn config() -> Config {
        Config::from_yaml_str(
            r#"
upstream: { connect_timeout_ms: 2000, first_byte_timeout_ms: 20000, idle_timeout_ms: 30000 }
providers:
  - name: p
    base_url: "https://api.example.com/v1"
    models: [{ name: m }]
tiers: { free: { requests_per_minute: 10 } }
"#,
        )
        .unwrap()
    }

    #[test]
    fn provider_peers_are_timed_and_kept_alive_by_tcp_not_by_a_pool_timer() {
        let cfg = config();
        let up = Upstream::from_config(&cfg.providers[0]).unwrap();
        let addr: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let t = &cfg.upstream;
        for stream in [false, true] {
            let peer = provider_peer(addr, &up, stream, t);
            let o = &peer.options;
            assert_eq!(o.connection_timeout, Some(Duration::from_secs(2)));
            assert_eq!(o.total_connection_timeout, Some(Duration::from_secs(4)));
            // A stream's reads include the gaps between chunks.
            let read = if stream { 30 } else { 20 };
            assert_eq!(o.read_timeout, Some(Duration::from_secs(read)));
            assert_eq!(o.write_timeout, Some(Duration::from_secs(30)));
            assert_eq!(peer.idle_timeout(), None, "a pool timer per request");
            let ka = peer.tcp_keepalive().expect("TCP keepalive on");
            assert_eq!(ka.idle, UPSTREAM_KEEPALIVE_IDLE);
            assert_eq!(ka.interval, UPSTREAM_KEEPALIVE_INTERVAL);
            assert_eq!(ka.count, UPSTREAM_KEEPALIVE_PROBES);
            #[cfg(target_os = "linux")]
            assert_eq!(ka.user_timeout, Duration::from_secs(30));
            assert_eq!(peer.sni(), "api.example.com");
            assert!(peer.is_tls());
        }
    }
}
