//! Usage records and their path to the store.
//!
//! Every proxied request with a valid key produces exactly one [`UsageRecord`]. The
//! proxy hands it to a [`UsageSink`] with a non-blocking `try_send`; the
//! [`writer`] drains the bounded queue in batches on its own thread and writes them
//! to the store. A full queue is counted (`ai4free_usage_records_dropped_total`),
//! never waited on: the request path must not block on storage.

pub mod spool;
pub mod writer;

pub use writer::{UsageSink, UsageWriter};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use once_cell::sync::Lazy;

/// Where a row's token numbers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// The provider reported usage and we recorded it as is.
    Provider,
    /// The gateway counted with the model's tokenizer.
    Counted,
    /// The stream was cut (client disconnect, upstream reset): tokens delivered so far.
    Partial,
    /// No tokens apply (the request never reached a provider).
    None,
}

impl TokenSource {
    /// The stored and exported spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Provider => "provider",
            TokenSource::Counted => "counted",
            TokenSource::Partial => "partial",
            TokenSource::None => "none",
        }
    }

    /// Inverse of [`TokenSource::as_str`].
    pub fn parse(s: &str) -> Option<TokenSource> {
        Some(match s {
            "provider" => TokenSource::Provider,
            "counted" => TokenSource::Counted,
            "partial" => TokenSource::Partial,
            "none" => TokenSource::None,
            _ => return None,
        })
    }
}

/// One proxied request, as billed.
///
/// The identifying strings are [`SharedStr`]s.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// Unique per request; also sent to the client as `x-request-id`.
    pub request_id: SharedStr,
    /// Public id of the key that made the request.
    pub key_id: SharedStr,
    /// The model as configured (empty when the request never resolved one).
    pub model: SharedStr,
    /// The provider's configured name (empty when none was chosen).
    pub provider: SharedStr,
    /// The API path, e.g. `/v1/chat/completions`.
    pub endpoint: SharedStr,
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Of the prompt tokens, those the provider served from its cache.
    pub cached_prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Exact cost in pico-USD (1e-12 USD): tokens × micro-USD per million tokens.
    pub cost_pusd: i64,
    /// Input price this row was charged at (micro-USD per million tokens).
    pub input_price_micros: i64,
    /// Output price this row was charged at (micro-USD per million tokens).
    pub output_price_micros: i64,
    /// HTTP status returned to the client (0 when the client went away first).
    pub status: u16,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Where the token numbers came from.
    pub token_source: TokenSource,
    /// Request start, Unix milliseconds.
    pub started_at_ms: i64,
    /// Total latency as seen by the gateway.
    pub latency_ms: u64,
    /// Time to the first response byte from the upstream, if any arrived.
    pub ttfb_ms: Option<u64>,
    /// A short machine-readable error code (never a secret), if the request failed.
    pub error: Option<String>,
}

/// An immutable string shared by reference count: a usage row's identifiers.
///
/// A row takes the request id, the key's id and the configured names the
/// gateway already holds by cloning a pointer, instead of allocating five
/// strings on the request path that the writer's thread then frees (~1.2k
/// instructions a row). It reads, compares, prints and serializes as a string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    /// The empty string, without an allocation of its own.
    pub fn empty() -> SharedStr {
        static EMPTY: Lazy<SharedStr> = Lazy::new(|| SharedStr(Arc::from("")));
        EMPTY.clone()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Arc<str>> for SharedStr {
    fn from(s: Arc<str>) -> SharedStr {
        SharedStr(s)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> SharedStr {
        SharedStr(Arc::from(s))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> SharedStr {
        SharedStr(Arc::from(s))
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> String {
        s.0.as_ref().to_owned()
    }
}

macro_rules! shared_str_eq {
    ($($other:ty),*) => {$(
        impl PartialEq<$other> for SharedStr {
            fn eq(&self, other: &$other) -> bool {
                *self.0 == **other
            }
        }
        impl PartialEq<SharedStr> for $other {
            fn eq(&self, other: &SharedStr) -> bool {
                **self == *other.0
            }
        }
    )*};
}
shared_str_eq!(&str, String);

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

/// Exact cost of a request in pico-USD.
///
/// A price of `p` micro-USD per million tokens is `p` pico-USD per token, so the
/// product is exact in integers; no float is ever summed.
pub fn cost_pusd(
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    completion_tokens: u64,
    input_micros: u64,
    cached_input_micros: Option<u64>,
    output_micros: u64,
) -> i64 {
    let cached = cached_prompt_tokens.min(prompt_tokens);
    let uncached = prompt_tokens - cached;
    let cached_price = cached_input_micros.unwrap_or(input_micros);
    let total = (uncached as u128) * (input_micros as u128)
        + (cached as u128) * (cached_price as u128)
        + (completion_tokens as u128) * (output_micros as u128);
    i64::try_from(total).unwrap_or(i64::MAX)
}

/// Formats pico-USD as an exact decimal string of USD (trailing zeros trimmed).
pub fn format_usd(pusd: impl Into<i128>) -> String {
    let pusd: i128 = pusd.into();
    let neg = pusd < 0;
    let v = pusd.unsigned_abs();
    let whole = v / 1_000_000_000_000;
    let frac = v % 1_000_000_000_000;
    let mut s = if frac == 0 {
        format!("{whole}")
    } else {
        let f = format!("{frac:012}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    if neg {
        s.insert(0, '-');
    }
    s
}

/// A JSON number holding the exact decimal of `pusd` USD.
pub fn usd_json(pusd: impl Into<i128>) -> serde_json::Value {
    // Parsing the exact decimal text yields the closest f64; the stored integer stays exact.
    format_usd(pusd)
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

impl UsageRecord {
    /// The JSON object `ai4free usage export` prints for this row.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.request_id,
            "key_id": self.key_id,
            "model": self.model,
            "provider": self.provider,
            "endpoint": self.endpoint,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": usd_json(self.cost_pusd),
            "cost_usd_exact": format_usd(self.cost_pusd),
            "input_price_per_mtok": format_usd(self.input_price_micros.saturating_mul(1_000_000)),
            "output_price_per_mtok": format_usd(self.output_price_micros.saturating_mul(1_000_000)),
            "status": self.status,
            "stream": self.stream,
            "token_source": self.token_source.as_str(),
            "started_at": rfc3339_ms(self.started_at_ms),
            "latency_ms": self.latency_ms,
            "ttfb_ms": self.ttfb_ms,
            "error": self.error,
        })
    }
}

/// Unix milliseconds → RFC 3339 in UTC with millisecond precision.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

static NODE_TAG: Lazy<u32> = Lazy::new(|| {
    let mut b = [0u8; 4];
    // A failed read only weakens uniqueness across nodes; the counter keeps ids unique here.
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
});
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique, roughly time-ordered request id: `req_` + ms timestamp + node tag + sequence,
/// all lowercase hex (11, 8 and 8 digits).
///
/// Cheap enough for every request: no syscall (the node tag is drawn once per
/// process) and one allocation, formatted on the stack.
pub fn new_request_id(now_ms: i64) -> Arc<str> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut id = *b"req_000000000000000000000000000";
    // 11 hex digits of milliseconds last until the year 2527.
    put_hex(&mut id[4..15], now_ms.max(0) as u64);
    put_hex(&mut id[15..23], u64::from(*NODE_TAG));
    put_hex(&mut id[23..31], u64::from(seq as u32));
    Arc::from(std::str::from_utf8(&id).unwrap_or("req_"))
}

/// Writes the low `out.len()` hex digits of `v` into `out`, most significant first.
fn put_hex(out: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_str_is_a_string_to_serde_and_to_comparisons() {
        let s = SharedStr::from("req-1");
        assert_eq!(serde_json::to_string(&s).unwrap(), r#""req-1""#);
        let back: SharedStr = serde_json::from_str(r#""req-1""#).unwrap();
        assert_eq!(back, s);
        let (text, owned) = ("req-1", String::from("req-1"));
        assert_eq!(s, text);
        assert_eq!(text, s);
        assert_eq!(s, *text);
        assert_eq!(s, owned);
        assert_eq!(owned, s);
        assert_ne!(s, "req-2");
        assert_eq!(format!("{s} {s:?}"), r#"req-1 "req-1""#);
        assert_eq!(String::from(s.clone()), "req-1");
        // The empty name is one allocation for every row that has no model.
        assert!(Arc::ptr_eq(&SharedStr::empty().0, &SharedStr::empty().0));
        assert_eq!(SharedStr::empty(), "");
    }

    #[test]
    fn a_spooled_row_keeps_its_json_shape() {
        // What a spool written before the identifiers were shared holds.
        let line = r#"{"request_id":"r1","key_id":"k1","model":"m","provider":"p","endpoint":"/v1/chat/completions","prompt_tokens":1,"cached_prompt_tokens":0,"completion_tokens":2,"cost_pusd":3,"input_price_micros":4,"output_price_micros":5,"status":200,"stream":false,"token_source":"provider","started_at_ms":6,"latency_ms":7,"ttfb_ms":null,"error":null}"#;
        let row: UsageRecord = serde_json::from_str(line).unwrap();
        assert_eq!((row.request_id.as_str(), row.key_id.as_str()), ("r1", "k1"));
        assert_eq!(serde_json::to_string(&row).unwrap(), line);
    }

    #[test]
    fn cost_is_exact() {
        // 1,000,000 tokens at 0.15 $/Mtok = 0.15 $
        let c = cost_pusd(1_000_000, 0, 0, 150_000, None, 600_000);
        assert_eq!(format_usd(c), "0.15");
        // 7 prompt + 3 completion tokens at 0.15/0.60
        let c = cost_pusd(7, 0, 3, 150_000, None, 600_000);
        assert_eq!(c, 7 * 150_000 + 3 * 600_000);
        assert_eq!(format_usd(c), "0.00000285");
        // cached tokens use their own price
        let c = cost_pusd(10, 4, 0, 1_000_000, Some(500_000), 0);
        assert_eq!(c, 6 * 1_000_000 + 4 * 500_000);
        assert_eq!(format_usd(0), "0");
        assert_eq!(format_usd(-1_500_000_000_000i64), "-1.5");
    }

    #[test]
    fn request_ids_are_unique() {
        let a = new_request_id(1);
        let b = new_request_id(1);
        assert_ne!(a, b);
        assert!(a.starts_with("req_"));
    }

    #[test]
    fn request_ids_spell_time_node_and_sequence_in_hex() {
        for ms in [0, 1, 0xabc, 1_764_000_000_000, 0x7ff_ffff_ffff, -5] {
            let id = new_request_id(ms);
            let seq = u32::from_str_radix(&id[23..], 16).unwrap();
            let expected = format!("req_{:011x}{:08x}{:08x}", ms.max(0), *NODE_TAG, seq);
            assert_eq!(&*id, expected);
            // Ids sort by time: the digits are fixed-width.
            assert_eq!(id.len(), 31);
        }
        let (a, b) = (new_request_id(1_000), new_request_id(1_001));
        assert!(a < b);
    }
}
