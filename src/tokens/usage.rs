//! Provider-reported usage extraction and streamed-completion accounting.
//!
//! This module owns:
//! - [`Usage`] and [`usage_from_response_body`] for non-streaming bodies.
//! - [`StreamAccounting`]: the per-response state that watches an OpenAI
//!   style SSE stream, captures its `usage`, accumulates the completion text
//!   (to count it when the provider reports no usage) and, in rewrite mode,
//!   drops the usage-only chunk the gateway requested on the client's behalf.
//!
//! Event payloads are parsed with small borrowing visitors that read only the
//! fields below and append strings straight into one reusable `String`, so a
//! typical delta costs no allocation.

use std::fmt;

use once_cell::sync::Lazy;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::count::Tokenizer;
use super::sse::{SseEvent, SseEventSplitter, SseScanner};
use super::usage_scan::usage_from_common_tail;

/// Token usage as reported by a provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`; 0 when absent (embeddings).
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`; 0 when absent.
    pub cached_prompt_tokens: u64,
}

/// Extracts `usage` from a non-streaming JSON response body (chat,
/// completions or embeddings).
///
/// `None` when the body is not a JSON object, has no `usage`, or `usage` is
/// null or malformed. An explicit usage of zeros is `Some` with zeros: a
/// reported figure is never replaced by an estimate.
///
/// Providers write `usage` after `choices`, near the end of the body, so it is
/// read from the tail ([`usage_from_tail`]): the completion in front of it is
/// scanned (SIMD) for one byte string but never parsed, which halved the read
/// on the mock's 883-byte body (12.0k to 6.2k instructions) and keeps it
/// nearly flat as completions grow. The tail itself, in its common shape, is
/// read directly ([`usage_from_common_tail`]; 6.1k to 3.7k), serde otherwise.
/// Bodies the tail cannot settle get the whole-document parse. On a
/// well-formed document both give the same answer (tested differentially).
pub fn usage_from_response_body(body: &[u8]) -> Option<Usage> {
    usage_from_tail(body).unwrap_or_else(|| usage_from_whole_body(body))
}

/// The whole-document parse: every byte is validated.
fn usage_from_whole_body(body: &[u8]) -> Option<Usage> {
    // serde would also fill the struct from an array, taking `usage` from its
    // first element: an array body has no usage.
    if body.get(skip_ws(body, 0)) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Body>(body)
        .ok()?
        .usage
        .map(Usage::from)
}

/// `Some(answer)` when the body is an object whose only `"usage"` token is a
/// member closed by the body's final `}`; `None` (undecided) otherwise.
///
/// Why that is enough: inside a JSON string a `"` is always escaped, so the
/// bytes `"usage"` with an unescaped first quote can only be the string token
/// `usage`, and followed by `:` only a key. If `{` followed by the body from
/// that key on parses as one object ending the body, the key sits in the
/// object the body closes last: the top-level one. One `"usage"` anywhere else
/// (a duplicate key, a nested object, a string value) leaves the decision to
/// the whole-document parse, which rejects duplicates. What is not checked is
/// the part in front of `usage`: a body malformed only there still yields the
/// provider's figure, where the whole parse would have given up and counted
/// tokens instead.
fn usage_from_tail(body: &[u8]) -> Option<Option<Usage>> {
    /// Tails up to this size are rebuilt on the stack (the usage object and the
    /// members after it are a few hundred bytes).
    const STACK_TAIL: usize = 1024;
    static KEY: Lazy<memchr::memmem::Finder<'static>> =
        Lazy::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    if body.get(skip_ws(body, 0)) != Some(&b'{') {
        return None;
    }
    // One forward pass (SIMD) finds the first occurrence and proves it the only one.
    let at = KEY.find(body)?;
    if KEY.find(&body[at + 1..]).is_some() {
        return None;
    }
    let escapes = body[..at].iter().rev().take_while(|&&b| b == b'\\').count();
    if escapes % 2 == 1 {
        return None;
    }
    let tail = &body[at..];
    if let Some(answer) = usage_from_common_tail(tail) {
        return Some(answer);
    }
    let mut stack = [0u8; STACK_TAIL];
    let heap: Vec<u8>;
    let doc: &[u8] = if tail.len() < STACK_TAIL {
        stack[0] = b'{';
        stack[1..=tail.len()].copy_from_slice(tail);
        &stack[..=tail.len()]
    } else {
        heap = [&b"{"[..], tail].concat();
        &heap
    };
    serde_json::from_slice::<Body>(doc)
        .ok()
        .map(|b| b.usage.map(Usage::from))
}

/// The top-level object, of which only `usage` is read.
#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    usage: Option<RawUsage>,
}

fn skip_ws(body: &[u8], mut pos: usize) -> usize {
    while body
        .get(pos)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        pos += 1;
    }
    pos
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Lenient,
    #[serde(default)]
    completion_tokens: Lenient,
    #[serde(default)]
    prompt_tokens_details: Option<RawDetails>,
}

#[derive(Deserialize)]
struct RawDetails {
    #[serde(default)]
    cached_tokens: Lenient,
}

impl From<RawUsage> for Usage {
    fn from(raw: RawUsage) -> Self {
        Usage {
            prompt_tokens: raw.prompt_tokens.0,
            completion_tokens: raw.completion_tokens.0,
            cached_prompt_tokens: raw.prompt_tokens_details.map_or(0, |d| d.cached_tokens.0),
        }
    }
}

/// A token count that tolerates the shapes OpenAI-compatible servers emit
/// (`12`, `12.0`, `null`); anything else non-negative-integral reads as 0
/// rather than failing the whole usage object.
#[derive(Default)]
struct Lenient(u64);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
                Ok(Lenient(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
                Ok(Lenient(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Lenient, E> {
                let ok = v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64;
                Ok(Lenient(if ok { v as u64 } else { 0 }))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(0))
            }
            fn visit_none<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// Accounting state for one streamed response (lives in the per-request
/// context).
///
/// Feed every body chunk to [`StreamAccounting::observe`] (the caller
/// forwards the chunk unchanged) or to [`StreamAccounting::observe_filtering`]
/// (the caller forwards what it writes to `out`), then call
/// [`StreamAccounting::finish`] once at end of stream. Never mix the two modes
/// on one stream.
#[derive(Debug)]
pub struct StreamAccounting {
    scanner: SseScanner,
    splitter: SseEventSplitter,
    tally: Tally,
    cap: Option<Cap>,
}

/// A limit on the completion a stream may deliver, checked event by event
/// (see [`StreamAccounting::capped`]).
#[derive(Debug)]
struct Cap {
    tokenizer: Tokenizer,
    allowed: u64,
    /// Running sum of each forwarded event's own count.
    delivered: u64,
    cut: bool,
}

/// What an event may change in the tally, so an event held back at the cap
/// leaves no trace.
struct Mark {
    text_len: usize,
    usage: Option<Usage>,
    saw_done: bool,
    saw_finish_reason: bool,
    saw_error: bool,
}

#[derive(Debug, Default)]
struct Tally {
    text: String,
    usage: Option<Usage>,
    saw_done: bool,
    saw_finish_reason: bool,
    saw_error: bool,
    events: u64,
    unparsed_events: u64,
}

impl StreamAccounting {
    /// New accounting state; `max_event_bytes` bounds the memory held for
    /// one SSE event (see [`SseScanner::new`]).
    pub fn new(max_event_bytes: usize) -> Self {
        StreamAccounting {
            scanner: SseScanner::new(max_event_bytes),
            splitter: SseEventSplitter::new(max_event_bytes),
            tally: Tally::default(),
            cap: None,
        }
    }

    /// Caps the completion this stream may deliver at `allowed_tokens`, for
    /// `enforce_mid_stream`. Only the rewrite modes ([`StreamAccounting::observe_rewriting`],
    /// [`StreamAccounting::observe_filtering`]) honour it: each complete event's
    /// delta text is counted on its own as it passes (O(event), so O(chunk) per
    /// chunk), and the first event that would take the running sum past the cap
    /// is held back with everything after it ([`StreamAccounting::is_cut`]). The
    /// running sum of per-event counts is an upper-bound-ish estimate of the
    /// exact count of the delivered text (tokens rarely merge across deltas, and
    /// a merge only lowers the exact count), so what was delivered stays within
    /// the cap; the exact count is still [`StreamAccounting::counted_completion_tokens`].
    /// Events larger than the scanner's bound pass uncounted, as they always do.
    pub fn capped(mut self, tokenizer: Tokenizer, allowed_tokens: u64) -> Self {
        self.cap = Some(Cap {
            tokenizer,
            allowed: allowed_tokens,
            delivered: 0,
            cut: false,
        });
        self
    }

    /// Whether a cap is set.
    pub fn is_capped(&self) -> bool {
        self.cap.is_some()
    }

    /// Whether the cap was reached: nothing is forwarded any more.
    pub fn is_cut(&self) -> bool {
        self.cap.as_ref().is_some_and(|c| c.cut)
    }

    /// The running count of the completion forwarded under a cap (0 without one).
    pub fn delivered_estimate(&self) -> u64 {
        self.cap.as_ref().map_or(0, |c| c.delivered)
    }

    /// Pass-through mode: accounts for `chunk`, which the caller forwards
    /// unchanged.
    pub fn observe(&mut self, chunk: &[u8]) {
        let tally = &mut self.tally;
        self.scanner.feed(chunk, |ev| {
            tally.on_event(ev);
        });
    }

    /// Rewrite mode: accounts for `chunk` and appends to `out` the bytes to
    /// forward: every complete event byte-exact, except usage-only chunks
    /// (`"choices": []` with a non-null `usage`), which are consumed here.
    /// Bytes of an incomplete trailing event are held until it completes
    /// (events larger than the bound are forwarded as they arrive).
    pub fn observe_filtering(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.observe_rewriting(chunk, out, true);
    }

    /// Rewrite mode: accounts for `chunk` and appends to `out` what the client
    /// gets. Usage-only chunks are dropped when `strip_usage`; under a cap,
    /// nothing from the event that reaches it on is forwarded (or accounted).
    /// Bytes of an incomplete trailing event are held until it completes.
    /// Returns [`StreamAccounting::is_cut`].
    pub fn observe_rewriting(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        strip_usage: bool,
    ) -> bool {
        let Self {
            scanner,
            splitter,
            tally,
            cap,
        } = self;
        splitter.feed(chunk, |piece| {
            if cap.as_ref().is_some_and(|c| c.cut) {
                return;
            }
            // A complete piece ends with exactly one blank line, so feeding it
            // dispatches at most one event, at its end.
            let mark = tally.mark();
            let mut usage_only = false;
            scanner.feed(piece.bytes, |ev| usage_only |= tally.on_event(ev));
            if !tally.admit(mark, cap.as_mut()) {
                return;
            }
            if !(strip_usage && piece.complete && usage_only) {
                out.extend_from_slice(piece.bytes);
            }
        });
        self.is_cut()
    }

    /// End of stream. Dispatches a final event that lacked its blank line
    /// (see [`SseScanner::finish`]). In rewrite mode pass `Some(out)`: it
    /// receives the held trailing bytes, unless they form a usage-only chunk.
    pub fn finish(&mut self, out: Option<&mut Vec<u8>>) {
        if self.is_cut() {
            // Whatever came after the cap was neither forwarded nor accounted.
            self.splitter.flush_remaining();
            return;
        }
        let tally = &mut self.tally;
        let mark = tally.mark();
        let mut usage_only = false;
        let rest = self.splitter.flush_remaining();
        self.scanner
            .feed(&rest, |ev| usage_only |= tally.on_event(ev));
        self.scanner.finish(|ev| usage_only |= tally.on_event(ev));
        let admitted = tally.admit(mark, self.cap.as_mut());
        if let Some(out) = out {
            if admitted && !usage_only {
                out.extend_from_slice(&rest);
            }
        }
    }

    /// The last non-null `usage` object seen in the stream.
    pub fn usage(&self) -> Option<Usage> {
        self.tally.usage
    }

    /// Every delta's content, refusal, tool-call name and arguments (and
    /// `/v1/completions` text), concatenated in arrival order.
    pub fn completion_text(&self) -> &str {
        &self.tally.text
    }

    /// Counts [`StreamAccounting::completion_text`] once as a whole: token
    /// merges across delta boundaries make per-delta sums wrong, so the
    /// result is the same whatever the chunking.
    ///
    /// Approximate where fields are joined (several choices, tool calls):
    /// tokens may merge across the joins. Prefer [`StreamAccounting::usage`].
    pub fn counted_completion_tokens(&self, tok: Tokenizer) -> u64 {
        tok.count(&self.tally.text)
    }

    /// Whether `data: [DONE]` was seen.
    pub fn saw_done(&self) -> bool {
        self.tally.saw_done
    }

    /// Whether any choice carried a non-null `finish_reason`.
    pub fn saw_finish_reason(&self) -> bool {
        self.tally.saw_finish_reason
    }

    /// Whether an in-band error was seen (`{"error": ...}` payload or an
    /// `event: error` event).
    pub fn saw_error(&self) -> bool {
        self.tally.saw_error
    }

    /// Number of events dispatched, `[DONE]` and unparseable ones included.
    pub fn events(&self) -> u64 {
        self.tally.events
    }

    /// Number of events whose data was neither `[DONE]` nor a valid JSON
    /// object of the expected shape.
    pub fn unparsed_events(&self) -> u64 {
        self.tally.unparsed_events
    }

    /// Number of events discarded for exceeding the size bound.
    pub fn oversized_events(&self) -> u64 {
        self.scanner.oversized_events()
    }
}

impl Tally {
    fn mark(&self) -> Mark {
        Mark {
            text_len: self.text.len(),
            usage: self.usage,
            saw_done: self.saw_done,
            saw_finish_reason: self.saw_finish_reason,
            saw_error: self.saw_error,
        }
    }

    /// Under a cap, counts the text added since `mark` and keeps it if it fits;
    /// otherwise rolls the tally back to `mark` and cuts. True when kept.
    fn admit(&mut self, mark: Mark, cap: Option<&mut Cap>) -> bool {
        let Some(cap) = cap else { return true };
        let added = cap
            .tokenizer
            .count(self.text.get(mark.text_len..).unwrap_or_default());
        let total = cap.delivered.saturating_add(added);
        if total <= cap.allowed {
            cap.delivered = total;
            return true;
        }
        cap.cut = true;
        self.text.truncate(mark.text_len);
        self.usage = mark.usage;
        self.saw_done = mark.saw_done;
        self.saw_finish_reason = mark.saw_finish_reason;
        self.saw_error = mark.saw_error;
        false
    }

    /// Records one event; returns true when it is a usage-only chunk.
    fn on_event(&mut self, ev: SseEvent<'_>) -> bool {
        self.events += 1;
        if ev.event == Some(b"error") {
            self.saw_error = true;
        }
        let data = ev.data.trim_ascii();
        if data == b"[DONE]" {
            self.saw_done = true;
            return false;
        }
        // Only a JSON object can carry choices, usage or an error: skip the
        // parser for keep-alives and other non-JSON payloads.
        if data.first() != Some(&b'{') {
            self.unparsed_events += 1;
            return false;
        }
        let text_len = self.text.len();
        let mut facts = Facts::default();
        let mut de = serde_json::Deserializer::from_slice(data);
        let parsed = ChunkSeed {
            text: &mut self.text,
            facts: &mut facts,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if parsed.is_err() {
            // Text appended before the error point is not trusted.
            self.text.truncate(text_len);
            self.unparsed_events += 1;
            return false;
        }
        self.saw_finish_reason |= facts.finish_reason;
        self.saw_error |= facts.error;
        if facts.usage.is_some() {
            self.usage = facts.usage;
        }
        facts.choices_empty && facts.usage.is_some()
    }
}

/// What one chunk said besides its text.
#[derive(Default)]
struct Facts {
    choices_empty: bool,
    usage: Option<Usage>,
    finish_reason: bool,
    error: bool,
}

// Field identifiers deserialize without allocating; unknown keys fall into
// `Other` and their values are skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ChunkField {
    Choices,
    Usage,
    Error,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ChoiceField {
    Delta,
    Text,
    FinishReason,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DeltaField {
    Content,
    Refusal,
    ToolCalls,
    FunctionCall,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ToolCallField {
    Function,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum FunctionField {
    Name,
    Arguments,
    #[serde(other)]
    Other,
}

/// The top-level chunk object.
struct ChunkSeed<'s> {
    text: &'s mut String,
    facts: &'s mut Facts,
}

impl<'de> DeserializeSeed<'de> for ChunkSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ChunkSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat.completion.chunk object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<ChunkField>()? {
            match key {
                ChunkField::Choices => {
                    let n = map.next_value_seed(ChoicesSeed {
                        text: &mut *self.text,
                        facts: &mut *self.facts,
                    })?;
                    self.facts.choices_empty = n == Some(0);
                }
                ChunkField::Usage => {
                    self.facts.usage = map.next_value::<Option<RawUsage>>()?.map(Usage::from);
                }
                ChunkField::Error => {
                    self.facts.error |= map.next_value::<Option<IgnoredAny>>()?.is_some();
                }
                ChunkField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// `choices`: an array (its length is returned) or null.
struct ChoicesSeed<'s> {
    text: &'s mut String,
    facts: &'s mut Facts,
}

impl<'de> DeserializeSeed<'de> for ChoicesSeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ChoicesSeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of choices")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<usize>, A::Error> {
        let mut n = 0;
        while seq
            .next_element_seed(ObjectSeed(ChoiceFields {
                text: &mut *self.text,
                facts: &mut *self.facts,
            }))?
            .is_some()
        {
            n += 1;
        }
        Ok(Some(n))
    }
}

/// Reads the fields of one JSON object; implemented per object kind.
trait Fields<'de> {
    fn field<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<bool, A::Error>;
}

/// A JSON object (or null) whose keys are handled by `F`.
struct ObjectSeed<F>(F);

impl<'de, F: Fields<'de>> DeserializeSeed<'de> for ObjectSeed<F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: Fields<'de>> Visitor<'de> for ObjectSeed<F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or null")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while self.0.field(&mut map)? {}
        Ok(())
    }
}

struct ChoiceFields<'s> {
    text: &'s mut String,
    facts: &'s mut Facts,
}

impl<'de> Fields<'de> for ChoiceFields<'_> {
    fn field<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<bool, A::Error> {
        let Some(key) = map.next_key::<ChoiceField>()? else {
            return Ok(false);
        };
        match key {
            ChoiceField::Delta => map.next_value_seed(ObjectSeed(DeltaFields(&mut *self.text)))?,
            // /v1/completions streams carry their text here.
            ChoiceField::Text => map.next_value_seed(AppendStr(&mut *self.text))?,
            ChoiceField::FinishReason => {
                self.facts.finish_reason |= map.next_value::<Option<IgnoredAny>>()?.is_some();
            }
            ChoiceField::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(true)
    }
}

struct DeltaFields<'s>(&'s mut String);

impl<'de> Fields<'de> for DeltaFields<'_> {
    fn field<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<bool, A::Error> {
        let Some(key) = map.next_key::<DeltaField>()? else {
            return Ok(false);
        };
        match key {
            DeltaField::Content | DeltaField::Refusal => {
                map.next_value_seed(AppendStr(&mut *self.0))?;
            }
            DeltaField::ToolCalls => map.next_value_seed(ToolCallsSeed(&mut *self.0))?,
            DeltaField::FunctionCall => {
                map.next_value_seed(ObjectSeed(FunctionFields(&mut *self.0)))?;
            }
            DeltaField::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(true)
    }
}

/// `tool_calls`: an array of tool-call deltas, or null.
struct ToolCallsSeed<'s>(&'s mut String);

impl<'de> DeserializeSeed<'de> for ToolCallsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ToolCallsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tool calls")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(ObjectSeed(ToolCallFields(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }
}

struct ToolCallFields<'s>(&'s mut String);

impl<'de> Fields<'de> for ToolCallFields<'_> {
    fn field<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<bool, A::Error> {
        let Some(key) = map.next_key::<ToolCallField>()? else {
            return Ok(false);
        };
        match key {
            ToolCallField::Function => {
                map.next_value_seed(ObjectSeed(FunctionFields(&mut *self.0)))?;
            }
            ToolCallField::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(true)
    }
}

struct FunctionFields<'s>(&'s mut String);

impl<'de> Fields<'de> for FunctionFields<'_> {
    fn field<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<bool, A::Error> {
        let Some(key) = map.next_key::<FunctionField>()? else {
            return Ok(false);
        };
        match key {
            FunctionField::Name | FunctionField::Arguments => {
                map.next_value_seed(AppendStr(&mut *self.0))?;
            }
            FunctionField::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(true)
    }
}

/// Appends a JSON string (borrowed or unescaped into serde_json's scratch
/// buffer, never separately allocated) to the text; null appends nothing.
struct AppendStr<'s>(&'s mut String);

impl<'de> DeserializeSeed<'de> for AppendStr<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AppendStr<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::tokens::count::{count_chat_completion_response, Tokenizer};
    use serde_json::{json, Value};

    const MAX: usize = 64 * 1024;

    fn chunk(choices: Value, usage: Value) -> Value {
        json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "gpt-4o-mini", "system_fingerprint": "fp_1",
               "choices": choices, "usage": usage})
    }

    fn delta(d: Value) -> Value {
        chunk(
            json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": null}]),
            Value::Null,
        )
    }

    fn usage_chunk() -> Value {
        chunk(
            json!([]),
            json!({"prompt_tokens": 31, "completion_tokens": 57, "total_tokens": 88,
                   "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": 0},
                   "completion_tokens_details": {"reasoning_tokens": 0}}),
        )
    }

    /// (payload of each event, in order); the usage-only event is index `USAGE_AT`.
    fn payloads() -> Vec<String> {
        let mut p: Vec<Value> = vec![
            delta(json!({"role": "assistant", "content": "", "refusal": null})),
            delta(json!({"content": "Hello, world! "})),
            delta(json!({"content": "你好，世界。"})),
            delta(json!({"content": "Nice 👍🏽 "})),
            delta(json!({"content": "He said \"hi\"\nthen left.\t"})),
            delta(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]}),
            ),
            delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"loc"}}]})),
            delta(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "ation\": \"Par"}}]}),
            ),
            delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "is 🗼\"}"}}]})),
            chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]),
                Value::Null,
            ),
            usage_chunk(),
        ];
        let mut out: Vec<String> = p.drain(..).map(|v| v.to_string()).collect();
        out.push("[DONE]".to_string());
        out
    }

    const USAGE_AT: usize = 10;

    fn expected_text() -> &'static str {
        "Hello, world! 你好，世界。Nice 👍🏽 He said \"hi\"\nthen left.\tget_weather{\"location\": \"Paris 🗼\"}"
    }

    fn expected_usage() -> Usage {
        Usage {
            prompt_tokens: 31,
            completion_tokens: 57,
            cached_prompt_tokens: 12,
        }
    }

    /// The stream bytes with `eol` line endings, and the byte range of the usage event.
    fn stream(eol: &str) -> (Vec<u8>, std::ops::Range<usize>) {
        let mut out = String::new();
        let mut range = 0..0;
        for (i, p) in payloads().iter().enumerate() {
            let start = out.len();
            out.push_str(&format!("data: {p}{eol}{eol}"));
            if i == USAGE_AT {
                range = start..out.len();
            }
        }
        (out.into_bytes(), range)
    }

    struct Outcome {
        text: String,
        tokens: (u64, u64),
        usage: Option<Usage>,
        done: bool,
        finish: bool,
        error: bool,
        events: u64,
        filtered: Option<Vec<u8>>,
    }

    fn run(chunks: &[&[u8]], filtering: bool) -> Outcome {
        let mut acc = StreamAccounting::new(MAX);
        let mut out = Vec::new();
        for c in chunks {
            if filtering {
                acc.observe_filtering(c, &mut out);
            } else {
                acc.observe(c);
            }
        }
        acc.finish(filtering.then_some(&mut out));
        Outcome {
            text: acc.completion_text().to_string(),
            tokens: (
                acc.counted_completion_tokens(Tokenizer::O200kBase),
                acc.counted_completion_tokens(Tokenizer::Cl100kBase),
            ),
            usage: acc.usage(),
            done: acc.saw_done(),
            finish: acc.saw_finish_reason(),
            error: acc.saw_error(),
            events: acc.events(),
            filtered: filtering.then_some(out),
        }
    }

    fn check(input: &[u8], usage_range: &std::ops::Range<usize>, chunks: &[&[u8]]) {
        let tokens = (
            Tokenizer::O200kBase.count(expected_text()),
            Tokenizer::Cl100kBase.count(expected_text()),
        );
        let mut without_usage = input[..usage_range.start].to_vec();
        without_usage.extend_from_slice(&input[usage_range.end..]);
        for filtering in [false, true] {
            let o = run(chunks, filtering);
            assert_eq!(o.text, expected_text());
            assert_eq!(o.tokens, tokens);
            assert_eq!(o.usage, Some(expected_usage()));
            assert!(o.done && o.finish && !o.error);
            assert_eq!(o.events, payloads().len() as u64);
            if let Some(out) = o.filtered {
                assert_eq!(out, without_usage);
            }
        }
    }

    #[test]
    fn every_two_way_split_gives_identical_accounting() {
        for eol in ["\n", "\r\n", "\r"] {
            let (input, usage_range) = stream(eol);
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                check(&input, &usage_range, &[a, b]);
            }
        }
    }

    #[test]
    fn one_byte_chunks_give_identical_accounting() {
        for eol in ["\n", "\r\n", "\r"] {
            let (input, usage_range) = stream(eol);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            check(&input, &usage_range, &bytes);
        }
    }

    proptest::proptest! {
        #[test]
        fn random_chunkings_give_identical_accounting(
            mut cuts in proptest::collection::vec(0usize..4000, 0..12),
            eol in proptest::sample::select(vec!["\n", "\r\n", "\r"]),
        ) {
            let (input, usage_range) = stream(eol);
            for c in cuts.iter_mut() {
                *c %= input.len() + 1;
            }
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts {
                chunks.push(&input[prev..c]);
                prev = c;
            }
            chunks.push(&input[prev..]);
            check(&input, &usage_range, &chunks);
        }
    }

    #[test]
    fn streamed_and_non_streamed_counts_agree() {
        let body = json!({"choices": [{"index": 0, "message": {"role": "assistant",
            "content": "Hello, world! 你好，世界。Nice 👍🏽 He said \"hi\"\nthen left.\t",
            "refusal": null,
            "tool_calls": [{"id": "call_1", "type": "function", "function":
                {"name": "get_weather", "arguments": "{\"location\": \"Paris 🗼\"}"}}]}}]});
        let (input, _) = stream("\n");
        let o = run(&[&input], false);
        let n = count_chat_completion_response(Tokenizer::O200kBase, body.to_string().as_bytes());
        assert_eq!(n.unwrap(), o.tokens.0);
    }

    #[test]
    fn comments_garbage_and_errors() {
        let input = concat!(
            ": keep-alive\n\n",
            "event: message\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: not json\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"LOST\"}}], oops}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":7}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}trailing\n\n",
            "data: [1,2]\n\n",
            "data: {\"choices\":[{\"text\":\"c\",\"finish_reason\":null}]}\n\n",
            "data: {\"error\":{\"message\":\"upstream overloaded\",\"type\":\"server_error\"}}\n\n",
        );
        let o = run(&[input.as_bytes()], false);
        assert_eq!(o.text, "ac");
        assert!(o.error && !o.done && !o.finish);
        assert_eq!(o.usage, None);
        assert_eq!(o.events, 8);
        let mut acc = StreamAccounting::new(MAX);
        acc.observe(input.as_bytes());
        assert_eq!(acc.unparsed_events(), 5);
        // `event: error` alone also flags the stream.
        let mut acc = StreamAccounting::new(MAX);
        acc.observe(b"event: error\ndata: boom\n\n");
        assert!(acc.saw_error());
        // An explicit null error is not an error.
        let mut acc = StreamAccounting::new(MAX);
        acc.observe(b"data: {\"error\":null,\"choices\":[]}\n\n");
        assert!(!acc.saw_error());
    }

    #[test]
    fn truncated_stream_keeps_text_so_far() {
        let (input, _) = stream("\n");
        // Cut inside the 5th content event: the first four events count.
        let fifth = input.windows(8).position(|w| w == b"He said ").unwrap();
        for filtering in [false, true] {
            let o = run(&[&input[..fifth]], filtering);
            assert_eq!(o.text, "Hello, world! 你好，世界。Nice 👍🏽 ");
            assert!(!o.done && !o.finish && o.usage.is_none());
            if let Some(out) = o.filtered {
                assert_eq!(out, &input[..fifth], "held bytes are flushed at finish");
            }
        }
        // A last event without its blank line still counts at finish.
        let o = run(
            &[b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}"],
            false,
        );
        assert_eq!(o.text, "x");
    }

    #[test]
    fn usage_only_chunk_without_blank_line_is_dropped_at_finish() {
        let usage = format!("data: {}", usage_chunk());
        let input = format!("data: {}\n\n{usage}", delta(json!({"content": "hi"})));
        let o = run(&[input.as_bytes()], true);
        assert_eq!(o.usage, Some(expected_usage()));
        assert_eq!(
            o.filtered.unwrap(),
            &input.as_bytes()[..input.len() - usage.len()]
        );
    }

    #[test]
    fn usage_with_choices_is_forwarded_and_captured() {
        let ev = chunk(
            json!([{"index": 0, "delta": {"content": "z"}, "finish_reason": "stop"}]),
            json!({"prompt_tokens": 0, "completion_tokens": 0}),
        );
        let input = format!("data: {ev}\n\ndata: {}\n\n", chunk(json!([]), Value::Null));
        let o = run(&[input.as_bytes()], true);
        assert_eq!(o.usage, Some(Usage::default()));
        assert_eq!(o.filtered.unwrap(), input.as_bytes());
        assert!(o.finish);
    }

    #[test]
    fn last_non_null_usage_wins() {
        let a = chunk(
            json!([]),
            json!({"prompt_tokens": 1, "completion_tokens": 2}),
        );
        let b = chunk(json!([]), Value::Null);
        let input = format!("data: {a}\n\ndata: {b}\n\n");
        let o = run(&[input.as_bytes()], false);
        assert_eq!(
            o.usage,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cached_prompt_tokens: 0
            })
        );
    }

    #[test]
    fn oversized_event_is_bounded_and_forwarded() {
        let big = "w".repeat(5000);
        let input = format!(
            "data: {}\n\ndata: {}\n\ndata: {}\n\n",
            delta(json!({"content": "a"})),
            delta(json!({"content": big})),
            delta(json!({"content": "b"}))
        );
        for cut in [0, 100, 300, 2000, input.len()] {
            let (x, y) = input.as_bytes().split_at(cut);
            let mut acc = StreamAccounting::new(1024);
            let mut out = Vec::new();
            acc.observe_filtering(x, &mut out);
            acc.observe_filtering(y, &mut out);
            acc.finish(Some(&mut out));
            assert_eq!(acc.completion_text(), "ab");
            assert_eq!(acc.oversized_events(), 1);
            assert_eq!(out, input.as_bytes());
        }
    }

    #[test]
    fn garbage_bytes_never_panic() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut bytes = Vec::new();
        let alphabet = b"data: {}[]\",:\\\r\n\x00\xff\xf0\x9fchoices delta content usage";
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        for filtering in [false, true] {
            let chunks: Vec<&[u8]> = bytes.chunks(97).collect();
            let o = run(&chunks, filtering);
            if let Some(out) = o.filtered {
                assert!(out.len() <= bytes.len());
            }
        }
    }

    #[test]
    fn usage_from_bodies() {
        let chat = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        assert_eq!(
            usage_from_response_body(chat),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_prompt_tokens: 4
            })
        );
        let embeddings =
            br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage_from_response_body(embeddings),
            Some(Usage {
                prompt_tokens: 8,
                ..Usage::default()
            })
        );
        let zeros = br#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#;
        assert_eq!(usage_from_response_body(zeros), Some(Usage::default()));
        let floats = br#"{"usage":{"prompt_tokens":3.0,"completion_tokens":null,"prompt_tokens_details":null}}"#;
        assert_eq!(
            usage_from_response_body(floats),
            Some(Usage {
                prompt_tokens: 3,
                ..Usage::default()
            })
        );
        for none in [
            &br#"{"usage":null}"#[..],
            br#"{"choices":[]}"#,
            b"",
            b"{",
            b"\xff",
            b"[]",
            br#"{"usage":"lots"}"#,
        ] {
            assert_eq!(usage_from_response_body(none), None);
        }
    }

    #[test]
    fn usage_is_read_from_the_tail_only_where_the_tail_settles_it() {
        let five = Some(Usage {
            prompt_tokens: 5,
            ..Usage::default()
        });
        let cases: [(&[u8], Option<Usage>); 9] = [
            // A quoted `"usage"` inside the completion is escaped: not a key.
            (
                br#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}"}}],"usage":{"prompt_tokens":5}}"#,
                five,
            ),
            (br#" {"usage" : {"prompt_tokens":5} , "x" : [1,{"y":"}"}] } "#, five),
            // The key `"usage` (with a quote in it), not `usage`.
            (br#"{"\"usage":{"prompt_tokens":5},"x":1}"#, None),
            (br#"{"a":{"usage":{"prompt_tokens":5}},"b":1}"#, None),
            (br#"{"usage":{"prompt_tokens":6},"usage":{"prompt_tokens":5}}"#, None),
            (br#"{"object":"usage","usage":{"prompt_tokens":5}}"#, five),
            (br#"[{"usage":{"prompt_tokens":5}}]"#, None),
            (br#"{"usage":{"prompt_tokens":5}} x"#, None),
            (br#"{"usage":{"prompt_tokens":5},"x":1"#, None),
        ];
        for (body, want) in cases {
            let text = String::from_utf8_lossy(body);
            assert_eq!(usage_from_whole_body(body), want, "whole: {text}");
            assert_eq!(usage_from_response_body(body), want, "tail: {text}");
        }
        // The documented difference: a body malformed only in front of `usage`.
        let bad_head = br#"{"id": oops, "usage":{"prompt_tokens":5}}"#;
        assert_eq!(usage_from_whole_body(bad_head), None);
        assert_eq!(usage_from_response_body(bad_head), five);
    }

    /// A JSON value of bounded depth whose strings and keys like to say `usage`.
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let word = prop::sample::select(vec![
            "usage",
            "\"usage\"",
            "usage\\",
            "\\",
            "x",
            "prompt_tokens",
            "}",
            "{\"usage\":1}",
            "é",
        ]);
        let leaf = prop_oneof![
            Just("null".to_owned()),
            (0u64..1000).prop_map(|n| n.to_string()),
            Just("-1.5e3".to_owned()),
            Just("true".to_owned()),
            prop::collection::vec(word.clone(), 0..3)
                .prop_map(|w| serde_json::to_string(&w.concat()).unwrap_or_default()),
        ];
        leaf.prop_recursive(4, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((word.clone(), inner), 0..4).prop_map(|m| {
                    let members: Vec<String> = m
                        .into_iter()
                        .map(|(k, v)| {
                            format!("{}:{v}", serde_json::to_string(k).unwrap_or_default())
                        })
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// On every well-formed object the tail and the whole-document parse
        /// agree; on a damaged one they differ only where the damage makes the
        /// document malformed, and never when the whole parse found usage.
        #[test]
        fn tail_agrees_with_the_whole_document(
            members in proptest::collection::vec(
                (proptest::sample::select(vec!["usage", "choices", "id", "usage_", "x_usage"]), json_text()),
                0..5,
            ),
            usage in proptest::option::of((0u64..100, 0u64..100, proptest::bool::ANY)),
            at in 0usize..6,
            pretty in proptest::bool::ANY,
            damage in proptest::option::of((0usize..4000, 0u8..=255)),
        ) {
            let mut parts: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            if let Some((p, c, details)) = usage {
                let extra = if details { r#","prompt_tokens_details":{"cached_tokens":2,"x":[1]}"# } else { "" };
                let member = format!(r#""usage":{{"prompt_tokens":{p},"completion_tokens":{c}{extra}}}"#);
                parts.insert(at.min(parts.len()), member);
            }
            let mut body = format!("{{{}}}", parts.join(","));
            if pretty {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                    // Re-render with whitespace everywhere (key order may change).
                    body = serde_json::to_string_pretty(&v).unwrap_or(body);
                }
            }
            let mut bytes = body.into_bytes();
            proptest::prop_assert!(serde_json::from_slice::<Value>(&bytes).is_ok());
            proptest::prop_assert_eq!(usage_from_response_body(&bytes), usage_from_whole_body(&bytes));
            if let Some((i, b)) = damage {
                if !bytes.is_empty() {
                    let i = i % bytes.len();
                    if b % 3 == 0 { bytes.truncate(i) } else { bytes[i] = b }
                }
                let (tail, whole) = (usage_from_response_body(&bytes), usage_from_whole_body(&bytes));
                if tail != whole {
                    proptest::prop_assert!(whole.is_none());
                    // Malformed: bad syntax, or bytes that are not UTF-8.
                    proptest::prop_assert!(serde_json::from_slice::<Value>(&bytes).is_err());
                }
            }
        }
    }

    /// What the serde path of [`usage_from_tail`] makes of `{` + `tail`.
    fn serde_tail(tail: &[u8]) -> Option<Option<Usage>> {
        serde_json::from_slice::<Body>(&[&b"{"[..], tail].concat())
            .ok()
            .map(|b| b.usage.map(Usage::from))
    }

    #[test]
    fn the_common_tail_is_decided_without_serde() {
        // The mock's tail, OpenAI's (pretty-printed), an embedding's, a null.
        let tails: [&[u8]; 6] = [
            br#""usage":{"prompt_tokens":1,"completion_tokens":40,"total_tokens":41,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#,
            br#""usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}, "service_tier": "default", "system_fingerprint": null}"#,
            br#""usage":{"prompt_tokens":8,"total_tokens":8},"model":"text-embedding-3-small"}"#,
            b"\"usage\"\r\n:\tnull\n}\n",
            br#""usage":{"prompt_tokens":-3},"x":"caf\u00e9 \"q\" \\ \n","y":[1.5e-3,{}]}"#,
            "\"usage\":{\"prompt_tokens\":2},\"x\":\"é\"}".as_bytes(),
        ];
        for tail in tails {
            let fast = usage_from_common_tail(tail);
            assert!(
                fast.is_some(),
                "undecided: {}",
                String::from_utf8_lossy(tail)
            );
            assert_eq!(fast, serde_tail(tail), "{}", String::from_utf8_lossy(tail));
        }
        // Shapes it leaves to serde (which reads some of them, refuses others).
        for tail in [
            &br#""usage":{"prompt_tokens":3.0}}"#[..],
            br#""usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            br#""usage":{"prompt\u005ftokens":1}}"#,
            br#""usage":{"prompt_tokens":01}}"#,
            br#""usage":{"prompt_tokens":"7"}}"#,
            br#""usage":{"prompt_tokens":18446744073709551616}}"#,
            br#""usage":{"prompt_tokens":1}} trailing"#,
            br#""usage":{"prompt_tokens":1},"usage":null}"#,
            br#""usage":{"prompt_tokens":-1e400}}"#,
            br#""usage":{"prompt_tokens":-12345678901234567890}}"#,
        ] {
            assert_eq!(
                usage_from_common_tail(tail),
                None,
                "{}",
                String::from_utf8_lossy(tail)
            );
        }
    }

    /// A token count in one of the shapes providers send, or one they should not.
    fn count_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            (0u64..100_000).prop_map(|n| n.to_string()),
            proptest::num::u64::ANY.prop_map(|n| n.to_string()),
            (0u64..1000).prop_map(|n| format!("-{n}")),
            Just("9223372036854775808".to_owned()),
            Just("-9223372036854775809".to_owned()),
            Just("99999999999999999999".to_owned()),
            Just("00".to_owned()),
            Just("-".to_owned()),
            Just("3.0".to_owned()),
            Just("2.5".to_owned()),
            Just("1e2".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("\"5\"".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ]
    }

    /// An object whose keys come from `keys` (repeats allowed) and values from `value`.
    fn object_text(
        keys: Vec<&'static str>,
        value: impl proptest::strategy::Strategy<Value = String>,
    ) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let ws = prop::sample::select(vec!["", " ", "\n  ", "\t"]);
        prop::collection::vec((prop::sample::select(keys), value, ws), 0..6).prop_map(|m| {
            let members: Vec<String> = m
                .into_iter()
                .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                .collect();
            format!("{{{}}}", members.join(","))
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Wherever the direct reader decides, serde decides the same; damage
        /// anywhere never makes it decide otherwise.
        #[test]
        fn the_common_tail_reader_agrees_with_serde(
            usage in proptest::prop_oneof![
                proptest::strategy::Just("null".to_owned()),
                object_text(
                    vec!["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details", "x"],
                    proptest::prop_oneof![
                        count_text(),
                        object_text(vec!["cached_tokens", "audio_tokens"], count_text()),
                        json_text(),
                    ],
                ),
            ],
            rest in proptest::collection::vec(
                (proptest::sample::select(vec!["service_tier", "system_fingerprint", "id", "usage", "x\\u0041", "é"]), json_text()),
                0..3,
            ),
            end in proptest::sample::select(vec!["}", "} ", "}\n", "", "}x", "},", "}}"]),
            damage in proptest::option::of((0usize..2000, 0u8..=255)),
        ) {
            let mut tail = format!("\"usage\":{usage}");
            for (k, v) in rest {
                tail.push_str(&format!(",\"{k}\":{v}"));
            }
            tail.push_str(end);
            let mut bytes = tail.into_bytes();
            if let Some((i, b)) = damage {
                let i = i % bytes.len();
                if b % 4 == 0 { bytes.truncate(i) } else { bytes[i] = b }
            }
            if let Some(fast) = usage_from_common_tail(&bytes) {
                proptest::prop_assert_eq!(Some(fast), serde_tail(&bytes), "{}", String::from_utf8_lossy(&bytes));
            }
        }
    }

    /// Per-event counts of the sample stream's text, in order.
    fn event_counts(tok: Tokenizer) -> Vec<u64> {
        payloads()
            .iter()
            .map(|p| {
                let mut acc = StreamAccounting::new(MAX);
                acc.observe(format!("data: {p}\n\n").as_bytes());
                tok.count(acc.completion_text())
            })
            .collect()
    }

    #[test]
    fn a_cap_forwards_whole_events_up_to_the_allowance_at_any_chunking() {
        let tok = Tokenizer::O200kBase;
        let (input, usage) = stream("\n");
        let counts = event_counts(tok);
        let total: u64 = counts.iter().sum();
        // Every allowance from 0 to the whole: the forwarded prefix is the longest
        // run of events whose counts fit, identical for every split of the input.
        for allowed in 0..=total {
            let fits = counts
                .iter()
                .scan(0, |sum, c| {
                    *sum += c;
                    Some(*sum <= allowed)
                })
                .take_while(|f| *f)
                .count();
            let mut expected = Vec::new();
            let mut text = String::new();
            for (i, p) in payloads().iter().enumerate().take(fits) {
                expected.extend_from_slice(format!("data: {p}\n\n").as_bytes());
                if i < USAGE_AT {
                    let mut one = StreamAccounting::new(MAX);
                    one.observe(format!("data: {p}\n\n").as_bytes());
                    text.push_str(one.completion_text());
                }
            }
            for split in [1, 7, 64, input.len()] {
                let mut acc = StreamAccounting::new(MAX).capped(tok, allowed);
                assert!(acc.is_capped());
                let mut out = Vec::new();
                let mut cut = false;
                for c in input.chunks(split) {
                    cut = acc.observe_rewriting(c, &mut out, false);
                }
                acc.finish(Some(&mut out));
                assert_eq!(cut, fits < payloads().len(), "allowed {allowed}");
                assert_eq!(out, expected, "allowed {allowed}, split {split}");
                assert_eq!(acc.completion_text(), text);
                assert!(acc.delivered_estimate() <= allowed);
                assert!(acc.counted_completion_tokens(tok) <= acc.delivered_estimate());
                if cut {
                    // Nothing of what was held back counts: no done, no usage.
                    assert!(!acc.saw_done());
                    assert_eq!(acc.usage().is_some(), fits > USAGE_AT);
                }
            }
        }
        // The usage-only chunk is zero tokens: dropped only when asked to.
        let mut acc = StreamAccounting::new(MAX).capped(tok, total);
        let mut out = Vec::new();
        assert!(!acc.observe_rewriting(&input, &mut out, true));
        acc.finish(Some(&mut out));
        let mut without = input[..usage.start].to_vec();
        without.extend_from_slice(&input[usage.end..]);
        assert_eq!(out, without);
        assert_eq!(acc.usage(), Some(expected_usage()));
    }

    #[test]
    fn a_cap_checks_an_unterminated_last_event_too() {
        let tok = Tokenizer::O200kBase;
        let ev = delta(json!({"content": "one two three four five"})).to_string();
        let bytes = format!("data: {ev}");
        let n = tok.count("one two three four five");
        for (allowed, forwarded) in [(n, true), (n - 1, false)] {
            let mut acc = StreamAccounting::new(MAX).capped(tok, allowed);
            let mut out = Vec::new();
            assert!(!acc.observe_rewriting(bytes.as_bytes(), &mut out, true));
            acc.finish(Some(&mut out));
            assert_eq!(!out.is_empty(), forwarded);
            assert_eq!(acc.is_cut(), !forwarded);
        }
    }

    /// Per-chunk work under a cap does not grow with what was already delivered:
    /// 20,000 events cost about 20 times 1,000 (the bound is loose on purpose: a
    /// busy 2-core box is noisy; quadratic work would be ~20 times over it).
    #[test]
    fn capped_accounting_is_linear_in_the_stream() {
        let tok = Tokenizer::O200kBase;
        tok.warm_up();
        let ev = format!(
            "data: {}\n\n",
            delta(json!({"content": "a few words of text "}))
        );
        let time = |events: usize| {
            let mut acc = StreamAccounting::new(MAX).capped(tok, u64::MAX);
            let mut out = Vec::new();
            let t = std::time::Instant::now();
            for _ in 0..events {
                out.clear();
                acc.observe_rewriting(ev.as_bytes(), &mut out, true);
            }
            t.elapsed()
        };
        time(1_000);
        let small = (0..3).map(|_| time(1_000)).min().unwrap();
        let large = (0..3).map(|_| time(20_000)).min().unwrap();
        eprintln!("capped accounting: 1,000 events {small:?}, 20,000 events {large:?}");
        assert!(
            large < small * 20 * 5,
            "1,000 events: {small:?}; 20,000 events: {large:?}"
        );
    }
}
