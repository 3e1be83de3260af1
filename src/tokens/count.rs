//! Exact token counting with OpenAI's BPE encodings (tiktoken), and the
//! prompt/response counting rules built on it.
//!
//! This module owns:
//! - [`Tokenizer`]: the two supported encodings, loaded once per process, and
//!   the counting engine behind [`Tokenizer::count`].
//! - Prompt counting for `/v1/chat/completions`, `/v1/completions` and
//!   `/v1/embeddings` request bodies, following OpenAI's published method
//!   (openai-cookbook, "How to count tokens with tiktoken").
//! - Completion counting for non-streaming responses that carry no `usage`.
//!
//! Counts made here are a fallback: a provider-reported `usage` always wins
//! (see [`crate::tokens::usage`]).
//!
//! ## The counting engine
//!
//! Counts are identical to tiktoken's `encode_ordinary(text).len()` (the
//! reference, checked by `tests/tokenizer_diff.rs` over ~27k inputs) but
//! several times faster (`benches/tokens.rs`) in a fraction of the memory.
//! Like tiktoken, a text is first split into pieces by the encoding's
//! pre-tokenizer regex, then each piece is BPE-encoded. What differs:
//! - Pre-tokenization: a hand-written ASCII scanner ([`ascii_piece_end`])
//!   produces the same pieces as the regex whenever every byte it has to look
//!   at is ASCII; at any other piece it defers to the regex, anchored at the
//!   same position, so Unicode semantics stay the regex's own.
//! - A piece that is itself a token counts 1 through a hash lookup, as in
//!   tiktoken, without allocating.
//! - Other pieces are counted by a backtracking encoder over compact tables
//!   (the `ai4free-bpe` crate, `crates/bpe`), which yields tiktoken's tokenization without its merge
//!   loop.

use once_cell::sync::Lazy;
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};
use serde_json::{Map, Value};

use ai4free_bpe::Bpe;

/// One of the BPE encodings the gateway can count with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// `o200k_base`: gpt-4o, gpt-4.1, o-series and later models.
    O200kBase,
    /// `cl100k_base`: gpt-4, gpt-3.5-turbo and the text-embedding-3 models.
    Cl100kBase,
}

/// The pre-tokenizer rules that differ between the two encodings' regexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    /// o200k_base: letters split at a lower→upper case change, contractions
    /// attach to the preceding word, `/` trails punctuation like newlines.
    O200k,
    /// cl100k_base: any letters form one run, a contraction is its own piece.
    Cl100k,
}

impl Pattern {
    /// The encoding's tiktoken regex with its one look-ahead, `\s+(?!\S)`,
    /// rewritten as a pattern that matches one character more (`\s+\s`)
    /// and gives it back: the regex crate has no look-around, and this is
    /// several times faster than emulating it with captures. Alternatives are
    /// tried leftmost-first, in tiktoken's order. This is the rewrite
    /// bpe-openai ships; `tests/tokenizer_diff.rs` holds it to tiktoken's own
    /// regex through the counts.
    fn regexes(self) -> [(&'static str, bool); 3] {
        let first = match self {
            Pattern::Cl100k => concat!(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+$"
            ),
            Pattern::O200k => concat!(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+$"
            ),
        };
        [(first, false), (r"\s+\s", true), (r"\s+", false)]
    }
}

/// The pre-tokenizer regex of one encoding, for the pieces the ASCII scanner
/// leaves to it.
struct Pretokenizer {
    regex: Regex,
    /// Per pattern: whether its last character is a look-ahead to give back.
    lookahead: [bool; 3],
}

impl Pretokenizer {
    fn new(pattern: Pattern) -> Result<Pretokenizer, Box<regex_automata::meta::BuildError>> {
        let patterns = pattern.regexes();
        Ok(Pretokenizer {
            regex: Regex::new_many(&patterns.map(|(p, _)| p)).map_err(Box::new)?,
            lookahead: patterns.map(|(_, l)| l),
        })
    }

    /// End of the regex's piece starting at `pos`.
    fn piece_end(&self, text: &str, pos: usize) -> Option<usize> {
        let rest = text.get(pos..)?;
        let found = self.regex.find(Input::new(rest).anchored(Anchored::Yes))?;
        let mut end = found.end();
        if self.lookahead.get(found.pattern().as_usize()).copied() == Some(true) {
            end -= rest.get(..end)?.chars().next_back()?.len_utf8();
        }
        (end > 0).then_some(pos + end)
    }
}

/// One loaded encoding: its BPE tables and pre-tokenizer.
struct Encoding {
    bpe: Bpe,
    pre: Pretokenizer,
    pattern: Pattern,
}

// One lazily-loaded encoding each: the BPE tables are read in place from the
// binary (free), but the pre-tokenizer's regex is compiled, so loading must
// happen once per process, never per call. A load failure is stored as `None`
// (and logged) instead of panicking; startup calls `warm_up` + `is_available`
// and refuses to start when an encoding is missing.
static O200K_BASE: Lazy<Option<Encoding>> =
    Lazy::new(|| load("o200k_base", ai4free_bpe::O200K_BASE, Pattern::O200k));
static CL100K_BASE: Lazy<Option<Encoding>> =
    Lazy::new(|| load("cl100k_base", ai4free_bpe::CL100K_BASE, Pattern::Cl100k));

fn load(name: &str, tables: &'static [u8], pattern: Pattern) -> Option<Encoding> {
    let bpe = Bpe::from_blob(tables)
        .map_err(|e| log::error!("failed to load the {name} tokenizer: {e}"))
        .ok()?;
    let pre = Pretokenizer::new(pattern)
        .map_err(|e| log::error!("failed to build the {name} pre-tokenizer: {e}"))
        .ok()?;
    Some(Encoding { bpe, pre, pattern })
}

impl Encoding {
    fn count(&self, text: &str) -> u64 {
        let bytes = text.as_bytes();
        let mut pos = 0;
        let mut total = 0;
        while let Some(end) = self.piece_end(text, pos) {
            let Some(piece) = bytes.get(pos..end) else {
                break;
            };
            total += self.bpe.count(piece) as u64;
            pos = end;
        }
        total
    }

    /// End of the pre-tokenizer piece that starts at `pos`; `None` at the end.
    fn piece_end(&self, text: &str, pos: usize) -> Option<usize> {
        if pos >= text.len() {
            return None;
        }
        if let Some(end) = ascii_piece_end(text.as_bytes(), pos, self.pattern) {
            return Some(end);
        }
        if let Some(end) = cjk_piece_end(text, pos) {
            return Some(end);
        }
        // `None` is unreachable (every character matches some alternative);
        // stopping there, rather than looping, is the safe answer.
        self.pre.piece_end(text, pos)
    }
}

/// Han, kana and Hangul letters whose category (`Lo`, or `Lm` for the
/// prolonged sound mark) puts them in every letter class of both patterns:
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]` and `[\p{Ll}\p{Lm}\p{Lo}\p{M}]` (o200k),
/// `\p{L}` (cl100k). A test checks every code point against the regex.
fn is_cjk_letter(c: char) -> bool {
    matches!(c,
        '\u{3041}'..='\u{3096}' // hiragana
        | '\u{30A1}'..='\u{30FA}' // katakana
        | '\u{30FC}' // prolonged sound mark (Lm)
        | '\u{3400}'..='\u{4DBF}' // CJK extension A
        | '\u{4E00}'..='\u{9FFF}' // CJK unified ideographs
        | '\u{AC00}'..='\u{D7A3}' // Hangul syllables
    )
}

/// Common CJK and typographic punctuation and the ideographic space: none is a
/// letter, mark or number, nor `\r`/`\n` (checked by a test against the regex),
/// so each may lead a letter piece (`[^\r\n\p{L}\p{N}]?`) and ends one.
fn is_cjk_punct(c: char) -> bool {
    matches!(c,
        '\u{3000}'..='\u{3003}' // ideographic space, 、 。 〃
        | '\u{3008}'..='\u{3011}' // 〈〉《》「」『』【】
        | '\u{FF01}' | '\u{FF08}' | '\u{FF09}' | '\u{FF0C}' | '\u{FF1A}' | '\u{FF1B}' | '\u{FF1F}'
        | '\u{2018}' | '\u{2019}' | '\u{201C}' | '\u{201D}' | '\u{2026}' | '\u{00B7}'
    )
}

/// The piece at `p` when it is a run of CJK letters, alone or after one
/// leading character that is neither letter, number nor `\r`/`\n` (the
/// letter alternative of both patterns), so that CJK text does not pay a
/// regex search per piece. The run's letters are in both of o200k's letter
/// classes, so its greedy match is the whole run; `None` (the regex decides)
/// unless what ends the run is surely no letter, mark or apostrophe, which
/// could extend the piece.
fn cjk_piece_end(text: &str, p: usize) -> Option<usize> {
    let rest = text.get(p..)?;
    let mut chars = rest.chars();
    let c0 = chars.next()?;
    if !is_cjk_letter(c0) {
        let leads = if c0.is_ascii() {
            class(c0 as u8) & (LETTER | DIGIT | NEWLINE) == 0
        } else {
            is_cjk_punct(c0)
        };
        if !leads || !chars.next().is_some_and(is_cjk_letter) {
            return None;
        }
    }
    // The first character after the run (the leading one, if any, is no letter).
    match rest
        .char_indices()
        .skip(1)
        .find(|&(_, c)| !is_cjk_letter(c))
    {
        None => Some(p + rest.len()),
        Some((end, e)) if e.is_ascii() && e != '\'' && class(e as u8) & LETTER == 0 => {
            Some(p + end)
        }
        Some((end, e)) if is_cjk_punct(e) => Some(p + end),
        Some(_) => None,
    }
}

// ASCII character classes of the pre-tokenizer regexes. `\s` is Unicode
// White_Space: in ASCII exactly \t \n \v \f \r and space (not 0x1C..0x1F).
const LOWER: u8 = 1;
const UPPER: u8 = 2;
const DIGIT: u8 = 4;
const SPACE: u8 = 8;
const NEWLINE: u8 = 16;
/// `[^\s\p{L}\p{N}]`: punctuation, symbols and controls.
const PUNCT: u8 = 32;
const LETTER: u8 = LOWER | UPPER;

const ASCII_CLASS: [u8; 128] = {
    let mut table = [PUNCT; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        table[i] = if c.is_ascii_lowercase() {
            LOWER
        } else if c.is_ascii_uppercase() {
            UPPER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'\r' || c == b'\n' {
            SPACE | NEWLINE
        } else if c == b' ' || (c >= 0x09 && c <= 0x0d) {
            SPACE
        } else {
            PUNCT
        };
        i += 1;
    }
    table
};

/// The class of an ASCII byte; 0 for a non-ASCII byte (unknown here).
fn class(byte: u8) -> u8 {
    ASCII_CLASS.get(usize::from(byte)).copied().unwrap_or(0)
}

/// End of the run of bytes from `i` whose class intersects `mask`.
fn run(bytes: &[u8], mut i: usize, mask: u8) -> usize {
    while bytes.get(i).is_some_and(|&b| class(b) & mask != 0) {
        i += 1;
    }
    i
}

fn non_ascii_at(bytes: &[u8], i: usize) -> bool {
    bytes.get(i).is_some_and(|&b| !b.is_ascii())
}

/// The regexes' `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: `Some(Some(end))` if it
/// matches, `Some(None)` if not, `None` if a non-ASCII byte must be judged
/// (case folding maps U+017F `ſ` to `s`).
fn contraction(bytes: &[u8], i: usize) -> Option<Option<usize>> {
    if bytes.get(i) != Some(&b'\'') {
        return Some(None);
    }
    let Some(&c1) = bytes.get(i + 1) else {
        return Some(None);
    };
    if !c1.is_ascii() {
        return None;
    }
    let second = match c1.to_ascii_lowercase() {
        b's' | b't' | b'm' | b'd' => return Some(Some(i + 2)),
        b'r' | b'v' => b'e',
        b'l' => b'l',
        _ => return Some(None),
    };
    let Some(&c2) = bytes.get(i + 2) else {
        return Some(None);
    };
    if !c2.is_ascii() {
        return None;
    }
    Some((c2.to_ascii_lowercase() == second).then_some(i + 3))
}

/// End of the pre-tokenizer piece starting at `p`, decided on ASCII alone, or
/// `None` when a non-ASCII byte takes part in the decision (the caller then
/// runs the real regex). The regexes, in leftmost-first priority order:
///
/// ```text
/// o200k:  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
///        |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
///        |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
/// cl100k: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
///        | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
/// ```
fn ascii_piece_end(bytes: &[u8], p: usize, pattern: Pattern) -> Option<usize> {
    let c0 = *bytes.get(p)?;
    let k0 = class(c0);
    if k0 == 0 {
        return None;
    }
    // cl100k: a contraction is a piece of its own, before anything else.
    if pattern == Pattern::Cl100k && c0 == b'\'' {
        if let Some(end) = contraction(bytes, p)? {
            return Some(end);
        }
    }
    // Letters, with an optional leading `[^\r\n\p{L}\p{N}]`.
    let letters = if k0 & LETTER != 0 {
        Some(p)
    } else if k0 & (NEWLINE | DIGIT) == 0 {
        match bytes.get(p + 1) {
            Some(&c1) if !c1.is_ascii() => return None,
            Some(&c1) if class(c1) & LETTER != 0 => Some(p + 1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(start) = letters {
        let end = match pattern {
            // [upper]*[lower]+ or else [upper]+[lower]*: both end after the
            // upper-case run and the lower-case run that follows it.
            Pattern::O200k => run(bytes, run(bytes, start, UPPER), LOWER),
            Pattern::Cl100k => run(bytes, start, LETTER),
        };
        if non_ascii_at(bytes, end) {
            return None;
        }
        if pattern == Pattern::O200k {
            if let Some(end) = contraction(bytes, end)? {
                return Some(end);
            }
        }
        return Some(end);
    }
    // \p{N}{1,3}
    if k0 & DIGIT != 0 {
        // Bounded: scanning the whole digit run per piece would be quadratic.
        let mut end = p + 1;
        while end < p + 3 && bytes.get(end).is_some_and(|&b| class(b) & DIGIT != 0) {
            end += 1;
        }
        if end < p + 3 && non_ascii_at(bytes, end) {
            return None;
        }
        return Some(end);
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n/]*  (cl100k: [\r\n]*)
    let punct = if c0 == b' ' {
        match bytes.get(p + 1) {
            Some(&c1) if !c1.is_ascii() => return None,
            Some(&c1) if class(c1) & PUNCT != 0 => Some(p + 1),
            _ => None,
        }
    } else if k0 & PUNCT != 0 {
        Some(p)
    } else {
        None
    };
    if let Some(start) = punct {
        let mut end = run(bytes, start, PUNCT);
        if non_ascii_at(bytes, end) {
            return None;
        }
        while let Some(&c) = bytes.get(end) {
            if c == b'\r' || c == b'\n' || (c == b'/' && pattern == Pattern::O200k) {
                end += 1;
            } else {
                break;
            }
        }
        return Some(end);
    }
    // Whitespace: c0 is \s here. The whole run decides.
    let run_end = run(bytes, p, SPACE);
    if non_ascii_at(bytes, run_end) {
        return None;
    }
    // \s*[\r\n]+ : up to the run's last newline.
    if let Some(last) = (p..run_end)
        .rev()
        .find(|&i| bytes.get(i).is_some_and(|&b| class(b) & NEWLINE != 0))
    {
        return Some(last + 1);
    }
    // \s+(?!\S) : the whole run at the end of text, else all but its last
    // character; a lone space before text falls through to \s+.
    if run_end == bytes.len() || run_end - p == 1 {
        Some(run_end)
    } else {
        Some(run_end - 1)
    }
}

impl Tokenizer {
    /// Parses an encoding name as used in configuration (`"o200k_base"`,
    /// `"cl100k_base"`).
    pub fn from_name(name: &str) -> Option<Tokenizer> {
        match name {
            "o200k_base" => Some(Tokenizer::O200kBase),
            "cl100k_base" => Some(Tokenizer::Cl100kBase),
            _ => None,
        }
    }

    /// The encoding's canonical name, the inverse of [`Tokenizer::from_name`].
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
        }
    }

    fn encoding(self) -> Option<&'static Encoding> {
        match self {
            Tokenizer::O200kBase => O200K_BASE.as_ref(),
            Tokenizer::Cl100kBase => CL100K_BASE.as_ref(),
        }
    }

    /// Forces the lazily-loaded encoding so that the first request does not
    /// pay the (tens of milliseconds) load. Called once at startup.
    pub fn warm_up(self) {
        let _ = self.encoding();
    }

    /// Whether the encoding loaded. Startup calls [`Tokenizer::warm_up`] and
    /// refuses to start when this is false, so at request time it is true.
    pub fn is_available(self) -> bool {
        self.encoding().is_some()
    }

    /// Number of tokens in `text`, encoded as ordinary text: special-token
    /// strings such as `<|endoftext|>` inside user text are counted as the
    /// plain text they are, as OpenAI does for API input. Identical to
    /// tiktoken's `encode_ordinary(text).len()`; linear in `text`.
    ///
    /// Returns 0 if the encoding failed to load; see [`Tokenizer::is_available`].
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self.encoding() {
            Some(encoding) => encoding.count(text),
            None => 0,
        }
    }
}

/// Why a body could not be counted.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    /// The body is not valid JSON.
    #[error("invalid JSON body: {0}")]
    InvalidJson(#[from] serde_json::Error),
    /// The JSON is valid but a field the count needs is missing or has the
    /// wrong type; the message names it.
    #[error("unexpected body shape: {0}")]
    UnexpectedShape(&'static str),
    /// The encoding failed to load (startup should have refused to start).
    #[error("tokenizer {0} is not available")]
    TokenizerUnavailable(&'static str),
}

fn parse_object(tok: Tokenizer, body: &[u8]) -> Result<Map<String, Value>, CountError> {
    if !tok.is_available() {
        return Err(CountError::TokenizerUnavailable(tok.name()));
    }
    match serde_json::from_slice::<Value>(body)? {
        Value::Object(map) => Ok(map),
        _ => Err(CountError::UnexpectedShape("body is not a JSON object")),
    }
}

// Cookbook constants for gpt-3.5-turbo-0613 and later, gpt-4, gpt-4o: every
// message is framed as <|start|>{role/name}\n{content}<|end|>\n (3 tokens),
// a `name` costs one more, and every reply is primed with
// <|start|>assistant<|message|> (3 tokens).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// Counts the prompt tokens of a `/v1/chat/completions` request body.
///
/// Per message: 3 framing tokens, plus every top-level string value (role,
/// content, name, tool_call_id, refusal, ...) encoded as text, plus 1 per
/// `name`; then 3 tokens for the reply priming. Beyond the cookbook (which
/// only handles string values) this also counts:
/// - array content: the `text` of `text` parts and the `refusal` of
///   `refusal` parts. Image, audio and file parts count 0: OpenAI bills
///   images by tiles and audio by duration, and we do not estimate those.
/// - `tool_calls[].function.name` / `.arguments` and the legacy
///   `function_call.name` / `.arguments`, as plain strings.
/// - `tools` / `functions` definitions, with the cookbook's
///   `num_tokens_for_tools` approximation (see [`count_tool_definitions`]).
pub fn count_chat_prompt(tok: Tokenizer, body: &[u8]) -> Result<u64, CountError> {
    let req = parse_object(tok, body)?;
    let messages = match req.get("messages") {
        Some(Value::Array(messages)) => messages,
        _ => return Err(CountError::UnexpectedShape("`messages` is not an array")),
    };
    let mut total = REPLY_PRIMING;
    for message in messages {
        total += count_message(tok, message)?;
    }
    total += count_tool_definitions(tok, &req);
    Ok(total)
}

fn count_message(tok: Tokenizer, message: &Value) -> Result<u64, CountError> {
    let Value::Object(fields) = message else {
        return Err(CountError::UnexpectedShape("a message is not an object"));
    };
    let mut total = TOKENS_PER_MESSAGE;
    for (key, value) in fields {
        match (key.as_str(), value) {
            (_, Value::String(s)) => {
                total += tok.count(s);
                if key == "name" {
                    total += TOKENS_PER_NAME;
                }
            }
            ("content", Value::Array(parts)) => {
                for part in parts {
                    total += count_content_part(tok, part);
                }
            }
            ("tool_calls", Value::Array(calls)) => {
                for call in calls {
                    total += count_function_call(tok, call.get("function"));
                }
            }
            ("function_call", call) => total += count_function_call(tok, Some(call)),
            // null content, audio references, etc. carry no countable text.
            _ => {}
        }
    }
    Ok(total)
}

fn count_content_part(tok: Tokenizer, part: &Value) -> u64 {
    let field = match part.get("type").and_then(Value::as_str) {
        Some("text") => "text",
        Some("refusal") => "refusal",
        // image_url, input_audio, file: billed by OpenAI outside the text
        // encoding (image tiles, audio duration); we do not estimate them.
        _ => return 0,
    };
    part.get(field)
        .and_then(Value::as_str)
        .map_or(0, |s| tok.count(s))
}

fn count_function_call(tok: Tokenizer, function: Option<&Value>) -> u64 {
    let Some(function) = function else { return 0 };
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let args = function
        .get("arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    tok.count(name) + tok.count(args)
}

/// Approximate token cost of the `tools` (and legacy `functions`)
/// definitions of a chat request.
///
/// APPROXIMATE: OpenAI renders tool definitions into an undocumented
/// TypeScript-like system message; this is the cookbook's widely used
/// `num_tokens_for_tools` estimate: per function a fixed start cost, the
/// count of `"{name}:{description}"`, and per top-level parameter property a
/// fixed cost plus the count of `"{key}:{type}:{description}"` (and its enum
/// values); a fixed end cost once. Nested object schemas beyond the first
/// level are only represented by their type name. Issue 5 will make this exact.
pub fn count_tool_definitions(tok: Tokenizer, request: &Map<String, Value>) -> u64 {
    // (func_init, prop_init, prop_key, enum_init, enum_item, func_end) from the
    // cookbook: the gpt-4o family (o200k) and the gpt-4 / 3.5 family (cl100k).
    let (func_init, prop_init, prop_key, enum_init, enum_item, func_end): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = match tok {
        Tokenizer::O200kBase => (7, 3, 3, -3, 3, 12),
        Tokenizer::Cl100kBase => (10, 3, 3, -3, 3, 12),
    };
    let tools = request.get("tools").and_then(Value::as_array);
    let functions = request.get("functions").and_then(Value::as_array);
    let defs = tools
        .into_iter()
        .flatten()
        .filter_map(|tool| tool.get("function"))
        .chain(functions.into_iter().flatten());

    let count = |s: &str| tok.count(s) as i64;
    let mut total: i64 = 0;
    let mut any = false;
    let mut line = String::new();
    for def in defs {
        any = true;
        total += func_init;
        line.clear();
        line.push_str(def.get("name").and_then(Value::as_str).unwrap_or(""));
        line.push(':');
        line.push_str(strip_period(
            def.get("description").and_then(Value::as_str).unwrap_or(""),
        ));
        total += count(&line);
        let props = def
            .get("parameters")
            .and_then(|p| p.get("properties"))
            .and_then(Value::as_object);
        let Some(props) = props.filter(|p| !p.is_empty()) else {
            continue;
        };
        total += prop_init;
        for (key, prop) in props {
            total += prop_key;
            if let Some(items) = prop.get("enum").and_then(Value::as_array) {
                total += enum_init;
                for item in items {
                    total += enum_item;
                    total += match item {
                        Value::String(s) => count(s),
                        other => count(&other.to_string()),
                    };
                }
            }
            line.clear();
            line.push_str(key);
            line.push(':');
            match prop.get("type") {
                Some(Value::String(t)) => line.push_str(t),
                Some(other) => line.push_str(&other.to_string()),
                None => {}
            }
            line.push(':');
            line.push_str(strip_period(
                prop.get("description")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ));
            total += count(&line);
        }
    }
    if any {
        total += func_end;
    }
    total.max(0) as u64
}

fn strip_period(s: &str) -> &str {
    s.strip_suffix('.').unwrap_or(s)
}

/// Counts the prompt tokens of a `/v1/completions` request body. `prompt` may
/// be a string, an array of strings, an array of token ids (counted by
/// length) or an array of arrays of token ids.
pub fn count_completion_prompt(tok: Tokenizer, body: &[u8]) -> Result<u64, CountError> {
    let req = parse_object(tok, body)?;
    match req.get("prompt") {
        Some(prompt) => count_text_or_tokens(tok, prompt),
        None => Err(CountError::UnexpectedShape("`prompt` is missing")),
    }
}

/// Counts the input tokens of a `/v1/embeddings` request body. `input` has
/// the same shapes as a completions `prompt`.
pub fn count_embedding_input(tok: Tokenizer, body: &[u8]) -> Result<u64, CountError> {
    let req = parse_object(tok, body)?;
    match req.get("input") {
        Some(input) => count_text_or_tokens(tok, input),
        None => Err(CountError::UnexpectedShape("`input` is missing")),
    }
}

fn count_text_or_tokens(tok: Tokenizer, value: &Value) -> Result<u64, CountError> {
    const SHAPE: &str = "expected a string, an array of strings, token ids, or arrays of token ids";
    match value {
        Value::String(s) => Ok(tok.count(s)),
        Value::Array(items) => {
            let mut total = 0;
            for item in items {
                total += match item {
                    Value::String(s) => tok.count(s),
                    Value::Number(n) if n.is_u64() => 1,
                    Value::Array(ids) if ids.iter().all(|id| id.is_u64()) => ids.len() as u64,
                    _ => return Err(CountError::UnexpectedShape(SHAPE)),
                };
            }
            Ok(total)
        }
        _ => Err(CountError::UnexpectedShape(SHAPE)),
    }
}

/// Counts the completion tokens of a non-streaming `/v1/chat/completions`
/// response that carries no `usage`.
///
/// Per choice, `message.content`, `message.refusal`, then for each tool call
/// its `function.name` and `function.arguments` (and the legacy
/// `function_call`) are concatenated, in the order a stream delivers them,
/// and the whole is counted once: the same text and the same count as
/// [`crate::tokens::usage::StreamAccounting`] produces for the streamed form.
pub fn count_chat_completion_response(tok: Tokenizer, body: &[u8]) -> Result<u64, CountError> {
    let resp = parse_object(tok, body)?;
    let mut text = String::new();
    for choice in choices(&resp)? {
        let Some(message) = choice.get("message") else {
            continue;
        };
        push_str_field(&mut text, message, "content");
        push_str_field(&mut text, message, "refusal");
        let calls = message.get("tool_calls").and_then(Value::as_array);
        let legacy = message.get("function_call");
        let functions = calls
            .into_iter()
            .flatten()
            .filter_map(|call| call.get("function"))
            .chain(legacy);
        for function in functions {
            push_str_field(&mut text, function, "name");
            push_str_field(&mut text, function, "arguments");
        }
    }
    Ok(tok.count(&text))
}

/// Counts the completion tokens of a non-streaming `/v1/completions` response
/// that carries no `usage`: the concatenated `choices[].text`, counted once.
pub fn count_text_completion_response(tok: Tokenizer, body: &[u8]) -> Result<u64, CountError> {
    let resp = parse_object(tok, body)?;
    let mut text = String::new();
    for choice in choices(&resp)? {
        push_str_field(&mut text, choice, "text");
    }
    Ok(tok.count(&text))
}

fn choices(resp: &Map<String, Value>) -> Result<&[Value], CountError> {
    match resp.get("choices") {
        Some(Value::Array(choices)) => Ok(choices),
        _ => Err(CountError::UnexpectedShape("`choices` is not an array")),
    }
}

fn push_str_field(text: &mut String, object: &Value, field: &str) {
    if let Some(s) = object.get(field).and_then(Value::as_str) {
        text.push_str(s);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOTH: [Tokenizer; 2] = [Tokenizer::O200kBase, Tokenizer::Cl100kBase];

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for tok in BOTH {
            assert_eq!(Tokenizer::from_name(tok.name()), Some(tok));
            tok.warm_up();
            assert!(tok.is_available());
        }
        assert_eq!(Tokenizer::from_name("p50k_base"), None);
    }

    #[test]
    fn known_counts() {
        for tok in BOTH {
            assert_eq!(tok.count("hello world"), 2);
            assert_eq!(tok.count(""), 0);
        }
        // Special-token text in user input is ordinary text, never one token.
        assert!(Tokenizer::O200kBase.count("<|endoftext|>") > 1);
        assert!(Tokenizer::Cl100kBase.count("<|endoftext|>") > 1);
    }

    /// The pieces of `text` by our splitter.
    fn pieces(tok: Tokenizer, text: &str) -> Vec<&str> {
        let encoding = tok.encoding().unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(end) = encoding.piece_end(text, pos) {
            out.push(&text[pos..end]);
            pos = end;
        }
        assert_eq!(pos, text.len(), "splitting stopped early in {text:?}");
        out
    }

    /// The regex splitter alone, the reference for the ASCII scanner.
    fn regex_pieces(tok: Tokenizer, text: &str) -> Vec<&str> {
        let pre = &tok.encoding().unwrap().pre;
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(end) = pre.piece_end(text, pos) {
            out.push(&text[pos..end]);
            pos = end;
        }
        out
    }

    /// Checks that both encodings split `samples` and every concatenation of
    /// up to 4 symbols of `alphabet` exactly as the regex alone does; returns
    /// how many inputs the CJK fast path took at their start.
    fn splits_like_the_regex<'a>(
        samples: impl Iterator<Item = &'a str>,
        alphabet: &[&str],
    ) -> usize {
        let mut inputs: Vec<String> = samples.map(str::to_owned).collect();
        inputs.extend(all_strings(alphabet, 4));
        let mut fast = 0;
        for text in &inputs {
            for tok in BOTH {
                assert_eq!(
                    pieces(tok, text),
                    regex_pieces(tok, text),
                    "{tok:?} {text:?}"
                );
            }
            fast += usize::from(cjk_piece_end(text, 0).is_some());
        }
        fast
    }

    /// Every concatenation of 1 to `max_len` symbols of `alphabet`.
    fn all_strings(alphabet: &[&str], max_len: u32) -> Vec<String> {
        let n = alphabet.len();
        let mut out = Vec::new();
        for len in 1..=max_len {
            for mut i in 0..n.pow(len) {
                let mut s = String::new();
                for _ in 0..len {
                    s.push_str(alphabet[i % n]);
                    i /= n;
                }
                out.push(s);
            }
        }
        out
    }

    #[test]
    fn ascii_scanner_splits_like_the_regex() {
        let samples = [
            "Hello, world! HTTPServer helloWorld I'M we'LL don't 'sand' x'Ve",
            "  \n\n\t  x  \r\n  y   \u{b}\u{c}\u{1c} z \t\n",
            "a/b//c\n/\n...!!!\r\n$1,234.56 12345 (x) [\"q\"] <|endoftext|>",
            "fn main() {\n    let x = 42;   \n}\n \n   ",
            "caf\u{e9} na\u{ef}ve e\u{301} 'ſ ABC\u{e9} 12\u{663} x\u{a0}\u{a0}y ,\u{201c}",
        ];
        // Every string of up to 4 characters over the scanner's classes, and
        // each next to a non-ASCII character of each relevant kind.
        let alphabet = [
            " ", "\n", "\r", "\t", "\u{b}", "\u{1f}", "a", "s", "l", "e", "A", "S", "L", "1", "'",
            ".", "/", "\u{e9}", "\u{a0}", "\u{301}", "\u{663}", "\u{4f60}",
        ];
        splits_like_the_regex(samples.iter().copied(), &alphabet);
    }

    #[test]
    fn cjk_classes_are_what_the_fast_path_assumes() {
        use regex_automata::meta::Regex;
        let letter = Regex::new(r"\A[\p{Lo}\p{Lm}]\z").unwrap();
        let neither = Regex::new(r"\A[^\r\n\p{L}\p{N}\p{M}]\z").unwrap();
        let mut letters = 0;
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let mut buf = [0u8; 4];
            let s: &str = c.encode_utf8(&mut buf);
            if is_cjk_letter(c) {
                assert!(letter.is_match(s), "{c:?} U+{:04X} is not Lo/Lm", c as u32);
                letters += 1;
            }
            if is_cjk_punct(c) {
                assert!(
                    neither.is_match(s),
                    "{c:?} U+{:04X} is a letter, number or mark",
                    c as u32
                );
            }
        }
        assert!(letters > 30_000);
    }

    #[test]
    fn cjk_fast_path_splits_like_the_regex() {
        let samples = [
            "你好，世界！我们今天去公园。「こんにちは」と言った。안녕하세요 세계",
            "日本語のテキスト、カタカナ：コーヒー。 漢字abc 漢字'sで 123漢字 漢字\n\n漢",
            "中文 English 混合 text。（括号）【标题】“引号”‘单’…・ 다음",
        ];
        // Every string of up to 4 symbols mixing CJK letters with what can lead
        // or end their pieces: CJK and ASCII punctuation, spaces, newlines,
        // digits, ASCII letters, apostrophes, marks and other letters.
        let alphabet = [
            "\u{4f60}", "\u{3042}", "\u{30fc}", "\u{ac00}", "\u{3002}", "\u{ff0c}", "\u{3000}",
            "\u{2019}", " ", "\n", "\r", ".", "'", "s", "A", "1", "\u{301}", "\u{e9}", "\u{30fb}",
        ];
        let fast = splits_like_the_regex(samples.iter().copied(), &alphabet);
        assert!(fast > 5_000, "the fast path took only {fast} inputs");
    }

    #[test]
    fn pathological_text_does_not_panic() {
        for tok in BOTH {
            let spaces = " ".repeat(200_000);
            assert!(tok.count(&spaces) > 0);
            let letters = "a".repeat(200_000);
            assert!(tok.count(&letters) > 0);
            let mixed = "\u{1F44D}\u{1F3FD}\r\n\t\u{0}".repeat(20_000);
            assert!(tok.count(&mixed) > 0);
        }
    }

    fn cookbook_messages() -> Value {
        json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ])
    }

    #[test]
    fn cookbook_example_matches_published_counts() {
        // The cookbook reports 129 prompt tokens for gpt-4-0613 / gpt-3.5
        // (cl100k) and 124 for gpt-4o (o200k), each confirmed there against
        // the API's usage.
        let b = body(json!({"model": "m", "messages": cookbook_messages()}));
        assert_eq!(count_chat_prompt(Tokenizer::Cl100kBase, &b).unwrap(), 129);
        assert_eq!(count_chat_prompt(Tokenizer::O200kBase, &b).unwrap(), 124);
    }

    #[test]
    fn cookbook_tools_example_matches_published_counts() {
        // The cookbook's function-calling example, with the prompt_tokens the API
        // reported for it: 105 on gpt-3.5-turbo-0125 and gpt-4-0613 (cl100k),
        // 101 on gpt-4o-2024-08-06 and gpt-4o-mini (o200k).
        let b = body(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return",
                             "enum": ["celsius", "fahrenheit"]}
                }, "required": ["location"]}
            }}]
        }));
        assert_eq!(count_chat_prompt(Tokenizer::Cl100kBase, &b).unwrap(), 105);
        assert_eq!(count_chat_prompt(Tokenizer::O200kBase, &b).unwrap(), 101);
    }

    #[test]
    fn chat_prompt_formula() {
        for tok in BOTH {
            let messages = cookbook_messages();
            let mut expected = REPLY_PRIMING;
            for m in messages.as_array().unwrap() {
                expected += TOKENS_PER_MESSAGE;
                for (k, v) in m.as_object().unwrap() {
                    expected += tok.count(v.as_str().unwrap());
                    if k == "name" {
                        expected += TOKENS_PER_NAME;
                    }
                }
            }
            let b = body(json!({"messages": messages}));
            assert_eq!(count_chat_prompt(tok, &b).unwrap(), expected);
        }
    }

    #[test]
    fn chat_prompt_parts_tool_calls_and_nulls() {
        for tok in BOTH {
            let b = body(json!({"messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "text", "text": " 你好 👍🏽"}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
            ]}));
            let c = |s: &str| tok.count(s);
            let expected = REPLY_PRIMING
                + (3 + c("user") + c("What is in this image?") + c(" 你好 👍🏽"))
                + (3 + c("assistant") + c("get_weather") + c("{\"city\":\"Paris\"}"))
                + (3 + c("tool") + c("call_1") + c("sunny"));
            assert_eq!(count_chat_prompt(tok, &b).unwrap(), expected);
        }
    }

    #[test]
    fn tool_definitions_follow_cookbook_formula() {
        let tok = Tokenizer::O200kBase;
        let req = json!({"messages": [], "tools": [{"type": "function", "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location.",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["location"]}
        }}]});
        let c = |s: &str| tok.count(s);
        let expected = 7
            + c("get_current_weather:Get the current weather in a given location")
            + 3
            + (3 + c("location:string:The city and state"))
            // prop_key 3, enum_init -3, then enum_item 3 per value.
            + (3 + 3 + c("celsius") + 3 + c("fahrenheit") - 3 + c("unit:string:"))
            + 12;
        assert_eq!(
            count_tool_definitions(tok, req.as_object().unwrap()),
            expected
        );
        let total = count_chat_prompt(tok, &body(req)).unwrap();
        assert_eq!(total, REPLY_PRIMING + expected);
        // No tools: nothing added, not even the end marker.
        let none = json!({"messages": []});
        assert_eq!(count_tool_definitions(tok, none.as_object().unwrap()), 0);
    }

    #[test]
    fn completion_prompt_shapes() {
        for tok in BOTH {
            let c = |v: Value| count_completion_prompt(tok, &body(json!({"prompt": v})));
            assert_eq!(c(json!("hello world")).unwrap(), 2);
            assert_eq!(c(json!(["hello world", "hello world"])).unwrap(), 4);
            assert_eq!(c(json!([1, 2, 3])).unwrap(), 3);
            assert_eq!(c(json!([[1, 2], [3], []])).unwrap(), 3);
            assert_eq!(c(json!([])).unwrap(), 0);
            assert!(matches!(c(json!(5)), Err(CountError::UnexpectedShape(_))));
            assert!(matches!(
                c(json!([-1])),
                Err(CountError::UnexpectedShape(_))
            ));
            assert!(matches!(
                c(json!([[1.5]])),
                Err(CountError::UnexpectedShape(_))
            ));
            assert!(matches!(
                c(json!([{}])),
                Err(CountError::UnexpectedShape(_))
            ));
            let e = |v: Value| count_embedding_input(tok, &body(json!({"input": v})));
            assert_eq!(e(json!("hello world")).unwrap(), 2);
            assert_eq!(e(json!([[5, 6, 7]])).unwrap(), 3);
        }
    }

    #[test]
    fn invalid_bodies_are_errors_not_panics() {
        let tok = Tokenizer::O200kBase;
        let bad: [&[u8]; 6] = [
            b"",
            b"{",
            b"\xff\xfe",
            b"[1,2]",
            b"null",
            b"{\"messages\":{}}",
        ];
        for b in bad {
            assert!(count_chat_prompt(tok, b).is_err());
            assert!(count_completion_prompt(tok, b).is_err());
            assert!(count_embedding_input(tok, b).is_err());
            assert!(count_chat_completion_response(tok, b).is_err());
            assert!(count_text_completion_response(tok, b).is_err());
        }
        assert!(matches!(
            count_chat_prompt(tok, b"{\"messages\":"),
            Err(CountError::InvalidJson(_))
        ));
        assert!(matches!(
            count_chat_prompt(tok, b"{\"messages\":[1]}"),
            Err(CountError::UnexpectedShape(_))
        ));
    }

    #[test]
    fn chat_response_counts_concatenation_once() {
        for tok in BOTH {
            let b = body(json!({"choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hello! 你好 👍🏽", "refusal": null}},
                {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}
                ]}}
            ]}));
            let expected = tok.count("Hello! 你好 👍🏽f{\"a\": 1}");
            assert_eq!(count_chat_completion_response(tok, &b).unwrap(), expected);
            let t = body(json!({"choices": [{"text": "hello"}, {"text": " world"}]}));
            assert_eq!(count_text_completion_response(tok, &t).unwrap(), 2);
        }
    }
}
