//! The mock provider's fixed completion corpus and every OpenAI-shaped body it renders.
//!
//! Bodies are built by string concatenation from pre-escaped pieces rather than through
//! `serde_json::Value`: the mock is the upstream of our benchmarks, so it must never be
//! the bottleneck, and the shapes are fixed anyway. The unit tests parse every shape back
//! with `serde_json` so the hand-written JSON cannot silently go invalid.

use std::fmt::Write as _;
use std::sync::OnceLock;

use bytes::Bytes;

/// The completion text, one entry per streamed content chunk ("piece").
///
/// Deliberately hostile for the gateway's SSE/JSON/token handling: multi-byte CJK,
/// emoji with skin-tone modifiers, ZWJ families and flags (so byte-level splits land
/// mid-character), quotes, backslashes, tabs and newlines that need JSON escaping, RTL
/// text, a combining accent, and text that looks like SSE framing (`data: [DONE]`) but is
/// only ever inside a JSON string. The default length (40 pieces) covers all of it.
const CORPUS: &[&str] = &[
    "Hello",
    ",",
    " world",
    "!",
    " The",
    " quick",
    " brown",
    " fox",
    " said",
    " \"hi\"",
    ".\n\n",
    "```rust\n",
    "fn main() {",
    "\n    println!(\"{}\", 42);",
    "\n}\n```\n",
    "你好",
    "，世界",
    "！",
    " こんにちは",
    " 👍🏽",
    " 👨‍👩‍👧",
    " café",
    " naïve",
    " —",
    " a\ttab",
    " C:\\path\\to",
    " <b>&amp;</b>",
    " 🇯🇵",
    " Ünïcödé",
    " 'single'",
    " {\"json\": [1, 2]}",
    " \\u0041 literal",
    " 100%",
    " data: [DONE]",
    " مرحبا",
    " Привет",
    " e\u{301}",
    " end",
    ".",
    "\n",
];

/// `CORPUS` JSON-escaped once per process, without the surrounding quotes, so that the
/// escaped form of a concatenation is the concatenation of the escaped pieces.
fn escaped_corpus() -> &'static [String] {
    static ESCAPED: OnceLock<Vec<String>> = OnceLock::new();
    ESCAPED.get_or_init(|| CORPUS.iter().map(|piece| escape_inner(piece)).collect())
}

/// JSON string escaping without the quotes.
fn escape_inner(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or_default()
        .to_owned()
}

/// A JSON string literal (with quotes) for arbitrary text such as the echoed model.
pub(super) fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Piece `i` of the completion, JSON-escaped; the corpus repeats past its end.
fn escaped_piece(i: usize) -> &'static str {
    let corpus = escaped_corpus();
    corpus.get(i % corpus.len()).map_or("", String::as_str)
}

/// The raw (unescaped) completion text of `pieces` pieces, as a client would reassemble it.
pub fn completion_text(pieces: usize) -> String {
    (0..pieces).map(|i| CORPUS[i % CORPUS.len()]).collect()
}

/// Token counts the mock reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    /// Chat shape, including the detail objects OpenAI sends today.
    fn write_chat(&self, out: &mut String) {
        let _ = write!(
            out,
            "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{},\
             \"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\
             \"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\
             \"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}",
            self.prompt,
            self.completion,
            self.prompt.saturating_add(self.completion)
        );
    }

    /// Legacy completions shape: just the three numbers.
    fn write_plain(&self, out: &mut String) {
        let _ = write!(
            out,
            "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}",
            self.prompt,
            self.completion,
            self.prompt.saturating_add(self.completion)
        );
    }

    fn write(&self, kind: Kind, out: &mut String) {
        match kind {
            Kind::Chat => self.write_chat(out),
            Kind::Completion => self.write_plain(out),
        }
    }
}

/// Which text endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// Per-response identity: `id`, `created` and the echoed model (already a JSON literal).
pub(super) struct Meta {
    pub id: String,
    pub created: u64,
    pub model_json: String,
}

/// A non-streaming `chat.completion` or `text_completion` body.
pub(super) fn completion_json(
    kind: Kind,
    meta: &Meta,
    pieces: usize,
    usage: Option<Usage>,
) -> Bytes {
    let mut out = String::with_capacity(512 + pieces * 12);
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let _ = write!(
        out,
        "{{\"id\":\"{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":[",
        meta.id, meta.created, meta.model_json
    );
    match kind {
        Kind::Chat => {
            out.push_str("{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"")
        }
        Kind::Completion => out.push_str("{\"text\":\""),
    }
    for i in 0..pieces {
        out.push_str(escaped_piece(i));
    }
    match kind {
        Kind::Chat => {
            out.push_str("\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"stop\"}]")
        }
        Kind::Completion => {
            out.push_str("\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}]")
        }
    }
    if let Some(usage) = usage {
        out.push_str(",\"usage\":");
        usage.write(kind, &mut out);
    }
    match kind {
        Kind::Chat => {
            out.push_str(",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\"}")
        }
        Kind::Completion => out.push_str(",\"system_fingerprint\":null}"),
    }
    Bytes::from(out)
}

/// A complete SSE stream plus the end offset of every event in it (for per-event framing
/// and `x-mock-reset-after`).
///
/// `usage_chunk` adds the final usage-only chunk; `usage_null` adds `"usage":null` to
/// every other chunk, which is what OpenAI does whenever it will send a usage chunk.
pub(super) fn completion_sse(
    kind: Kind,
    meta: &Meta,
    pieces: usize,
    usage_chunk: Option<Usage>,
    usage_null: bool,
) -> (Bytes, Vec<usize>) {
    let mut out = String::with_capacity(256 * (pieces + 4));
    let mut bounds = Vec::with_capacity(pieces + 4);
    let mut prefix = String::with_capacity(192);
    let (object, fingerprint) = match kind {
        Kind::Chat => ("chat.completion.chunk", "\"fp_mock\""),
        Kind::Completion => ("text_completion", "null"),
    };
    let _ = write!(
        prefix,
        "data: {{\"id\":\"{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\
         \"system_fingerprint\":{fingerprint},\"choices\":[",
        meta.id, meta.created, meta.model_json
    );
    let tail = if usage_null {
        ",\"usage\":null}\n\n"
    } else {
        "}\n\n"
    };
    match kind {
        Kind::Chat => {
            out.push_str(&prefix);
            out.push_str(
                "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\
                 \"logprobs\":null,\"finish_reason\":null}]",
            );
            out.push_str(tail);
            bounds.push(out.len());
            for i in 0..pieces {
                out.push_str(&prefix);
                out.push_str("{\"index\":0,\"delta\":{\"content\":\"");
                out.push_str(escaped_piece(i));
                out.push_str("\"},\"logprobs\":null,\"finish_reason\":null}]");
                out.push_str(tail);
                bounds.push(out.len());
            }
            out.push_str(&prefix);
            out.push_str(
                "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]",
            );
            out.push_str(tail);
            bounds.push(out.len());
        }
        Kind::Completion => {
            // The legacy endpoint has no role chunk: text starts with the first event.
            for i in 0..pieces {
                out.push_str(&prefix);
                out.push_str("{\"text\":\"");
                out.push_str(escaped_piece(i));
                out.push_str("\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]");
                out.push_str(tail);
                bounds.push(out.len());
            }
            out.push_str(&prefix);
            out.push_str(
                "{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}]",
            );
            out.push_str(tail);
            bounds.push(out.len());
        }
    }
    if let Some(usage) = usage_chunk {
        out.push_str(&prefix);
        out.push_str("],\"usage\":");
        usage.write(kind, &mut out);
        out.push_str("}\n\n");
        bounds.push(out.len());
    }
    out.push_str("data: [DONE]\n\n");
    bounds.push(out.len());
    (Bytes::from(out), bounds)
}

/// An `embeddings` list with one deterministic `dims`-long vector per input.
pub(super) fn embeddings_json(
    model_json: &str,
    inputs: usize,
    dims: usize,
    usage: Option<Usage>,
) -> Bytes {
    let mut out = String::with_capacity(128 + inputs * (64 + dims * 7));
    out.push_str("{\"object\":\"list\",\"data\":[");
    for idx in 0..inputs {
        if idx > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"object\":\"embedding\",\"index\":{idx},\"embedding\":["
        );
        for d in 0..dims {
            if d > 0 {
                out.push(',');
            }
            // Values in [-1, 1) with three decimals, rendered from integers so they are
            // exact and identical across platforms.
            let milli = ((idx.wrapping_mul(7919) + d.wrapping_mul(104_729)) % 2000) as i64 - 1000;
            let sign = if milli < 0 { "-" } else { "" };
            let abs = milli.unsigned_abs();
            let _ = write!(out, "{sign}{}.{:03}", abs / 1000, abs % 1000);
        }
        out.push_str("]}");
    }
    let _ = write!(out, "],\"model\":{model_json}");
    if let Some(usage) = usage {
        let _ = write!(
            out,
            ",\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{}}}",
            usage.prompt, usage.prompt
        );
    }
    out.push('}');
    Bytes::from(out)
}

/// The `GET /v1/models` body.
pub(super) fn models_json(models: &[String]) -> Bytes {
    let mut out = String::from("{\"object\":\"list\",\"data\":[");
    for (i, model) in models.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":{},\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"ai4free-mock\"}}",
            json_string(model)
        );
    }
    out.push_str("]}");
    Bytes::from(out)
}

/// An OpenAI error body: `{"error":{"message","type","param","code"}}`.
pub(super) fn error_json(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Bytes {
    let value = serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    });
    Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
}
