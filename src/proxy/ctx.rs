//! The per-request context Pingora threads through every phase.
//!
//! It holds what the phases learn (key, route, limits) and the response-side
//! accounting buffers. It is created empty by `new_ctx` and dropped after `logging`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::request::{Endpoint, RequestHead};
use crate::error::ProxyError;
use crate::keys::cache::KeyEntry;
use crate::limits::{StreamAllowance, Ticket, Verdict};
use crate::tokens::usage::StreamAccounting;

/// What `request_filter` established about a proxied call; handed to a subrequest
/// unchanged when the body is too large for Pingora's replay buffer.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Request id (also `x-request-id`).
    pub request_id: Arc<str>,
    /// The authenticated key.
    pub key: Arc<KeyEntry>,
    /// The API called.
    pub endpoint: Endpoint,
    /// Provider index in the config.
    pub provider: usize,
    /// Model index within the provider.
    pub model: usize,
    /// What the body asked for.
    pub head: RequestHead,
    /// The client's body (kept for prompt counting).
    pub client_body: Bytes,
    /// The body the provider receives.
    pub upstream_body: Bytes,
    /// The limit verdict, for the response headers.
    pub verdict: Option<Verdict>,
    /// Limits were decided without Redis: `x-ai4free-ratelimit: degraded`.
    pub ratelimit_degraded: bool,
    /// Whether the gateway asked for the usage chunk the client did not ask for.
    pub strip_usage_chunk: bool,
    /// The prompt's count made for admission, reused by `logging` when the
    /// provider reports no usage (`None` when no token or spend limit needed it).
    pub prompt_tokens: Option<u64>,
    /// `enforce_mid_stream` on a streamed call: where the stream must stop.
    pub mid_stream: Option<MidStream>,
    /// Arrival time.
    pub started: Instant,
    /// Arrival time, Unix ms.
    pub started_at_ms: i64,
}

/// Where an `enforce_mid_stream` stream stops, fixed at admission.
#[derive(Debug, Clone, Copy)]
pub struct MidStream {
    /// The completion tokens left in the tightest token or spend window.
    pub allowance: StreamAllowance,
    /// When that window resets (for the in-band error's message).
    pub resets_at: Instant,
}

/// A body gathered from the chunks Pingora hands over. Pingora gives each
/// chunk as bytes of its own (it copies out of its read buffer), and most
/// request and non-streamed response bodies come in one: that chunk is kept
/// as it is, and only a second one starts a copy.
#[derive(Debug, Default)]
pub struct Gathered {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Gathered {
    /// Adds `chunk`. The copy a second chunk starts is sized for `capacity`
    /// bytes (the declared length, when known), so later chunks do not grow it.
    pub fn push(&mut self, chunk: &Bytes, capacity: usize) {
        match &mut self.more {
            Some(m) => m.extend_from_slice(chunk),
            None if self.first.is_empty() => self.first = chunk.clone(),
            None => {
                let mut m = BytesMut::with_capacity(capacity.max(self.first.len() + chunk.len()));
                m.extend_from_slice(&self.first);
                m.extend_from_slice(chunk);
                self.first = Bytes::new();
                self.more = Some(m);
            }
        }
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.more.as_ref().map_or(self.first.len(), |m| m.len())
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body so far.
    pub fn as_slice(&self) -> &[u8] {
        self.more.as_deref().unwrap_or(&self.first)
    }

    /// The body, without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.more.map_or(self.first, BytesMut::freeze)
    }
}

/// How the response body is being accounted.
#[derive(Default)]
pub enum ResponseAccounting {
    /// Nothing to account (not proxied, or an error from the gateway itself).
    #[default]
    None,
    /// A JSON body, gathered (up to a bound) to read its `usage`; `None` once
    /// past the bound.
    Json(Option<Gathered>),
    /// An SSE stream.
    Stream(Box<StreamAccounting>),
}

/// Per-request state.
pub struct Ctx {
    /// Arrival time.
    pub started: Instant,
    /// Arrival time, Unix ms.
    pub started_at_ms: i64,
    /// Request id, once assigned.
    pub request_id: Option<Arc<str>>,
    /// The key, once authenticated.
    pub key: Option<Arc<KeyEntry>>,
    /// The endpoint, when the path is a proxied API.
    pub endpoint: Option<Endpoint>,
    /// Everything needed to go upstream.
    pub prepared: Option<Prepared>,
    /// Limit verdict (headers on every response).
    pub verdict: Option<Verdict>,
    /// The admitted request's reservation, settled in `logging`; dropping it
    /// releases the concurrency slot on every path.
    pub ticket: Option<Ticket>,
    /// Limits are decided without Redis: `x-ai4free-ratelimit: degraded` on the response.
    pub ratelimit_degraded: bool,
    /// The refusal the gateway produced itself, if any.
    pub refusal: Option<ProxyError>,
    /// The request was handed to a subrequest, which records usage itself.
    pub delegated: bool,
    /// Upstream response status.
    pub upstream_status: Option<u16>,
    /// Time the provider's response header arrived.
    pub first_byte: Option<Instant>,
    /// Response accounting.
    pub response: ResponseAccounting,
    /// The response body reached its end.
    pub response_complete: bool,
    /// An in-band error event was sent on a broken stream.
    pub stream_error_sent: bool,
    /// `enforce_mid_stream` reached the allowance: the events of the last chunk
    /// that still fit, which `fail_to_proxy` writes before the error event.
    pub cut_tail: Option<Bytes>,
    /// The stream was ended at the allowance (expected: no error log line).
    pub cut_mid_stream: bool,
    /// Under `enforce_mid_stream`: body bytes released so far.
    pub released: u64,
    /// Under `enforce_mid_stream`: released bodies the client may not have been
    /// written yet, with the `released` offset each ends at.
    pub unwritten: VecDeque<(u64, Bytes)>,
    /// A short code for the failure, for the usage row.
    pub failure: Option<&'static str>,
}

impl Ctx {
    /// An empty context at arrival.
    pub fn new() -> Ctx {
        Ctx {
            started: Instant::now(),
            started_at_ms: crate::usage::now_ms(),
            request_id: None,
            key: None,
            endpoint: None,
            prepared: None,
            verdict: None,
            ticket: None,
            ratelimit_degraded: false,
            refusal: None,
            delegated: false,
            upstream_status: None,
            first_byte: None,
            response: ResponseAccounting::None,
            response_complete: false,
            stream_error_sent: false,
            cut_tail: None,
            cut_mid_stream: false,
            released: 0,
            unwritten: VecDeque::new(),
            failure: None,
        }
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_single_chunk_is_kept_without_a_copy_and_more_are_joined_in_order() {
        let one = Bytes::from_static(b"{\"usage\":{}}");
        let mut g = Gathered::default();
        assert!(g.is_empty());
        g.push(&Bytes::new(), 0);
        g.push(&one, 0);
        assert_eq!(g.as_slice(), &one[..]);
        assert_eq!(
            g.into_bytes().as_ptr(),
            one.as_ptr(),
            "no copy of one chunk"
        );

        let mut g = Gathered::default();
        for part in [&b"ab"[..], b"", b"cde", b"f"] {
            g.push(&Bytes::copy_from_slice(part), 16);
            assert_eq!(g.len(), g.as_slice().len());
        }
        assert_eq!(g.as_slice(), b"abcdef");
        assert_eq!(g.len(), 6);
        assert_eq!(&g.into_bytes()[..], b"abcdef");
    }

    #[test]
    fn the_capacity_hint_is_taken_when_a_second_chunk_comes() {
        let mut g = Gathered::default();
        g.push(&Bytes::from_static(b"ab"), 1024);
        g.push(&Bytes::from_static(b"cd"), 1024);
        assert!(g.more.as_ref().unwrap().capacity() >= 1024);
        // A hint below what is already there never truncates.
        let mut g = Gathered::default();
        g.push(&Bytes::from_static(b"abcdef"), 0);
        g.push(&Bytes::from_static(b"gh"), 2);
        assert_eq!(g.as_slice(), b"abcdefgh");
    }
}
