//! A direct reader for the common shape of a response body's tail from its
//! `"usage"` key on: what serde makes of `{` + that tail, without serde's
//! visitor machinery (which cost ~5.4k instructions on the mock's 330-byte
//! tail, most of a non-streamed request's accounting).
//!
//! It answers only where it is sure to give serde's answer (see
//! [`crate::json_scan`]); token counts must be integers or `null`, and a
//! duplicate field is left to serde, which refuses it.

use super::usage::Usage;
use crate::json_scan::{once, Cursor};

/// The answer serde gives for the document `{` + `tail`, where `tail` starts
/// with `"usage"`: `Some(Some(usage))`, `Some(None)` for `"usage": null`, or
/// `None` when this reader cannot be sure (or serde would fail).
pub(super) fn usage_from_common_tail(tail: &[u8]) -> Option<Option<Usage>> {
    let mut c = Cursor::new(tail);
    (c.key()? == b"usage").then_some(())?;
    c.colon()?;
    let usage = if c.literal(b"null") {
        None
    } else {
        Some(usage_object(&mut c)?)
    };
    // The members after `usage` up to the document's closing brace.
    loop {
        c.ws();
        match c.byte()? {
            b'}' => break,
            b',' => {
                c.ws();
                if c.key()? == b"usage" {
                    // A duplicate: serde refuses the document.
                    return None;
                }
                c.colon()?;
                c.skip_value(1)?;
            }
            _ => return None,
        }
    }
    c.at_end().then_some(usage)
}

/// `{ ... }` after `"usage":`, as `RawUsage` reads it.
fn usage_object(c: &mut Cursor<'_>) -> Option<Usage> {
    let mut u = Usage::default();
    let (mut prompt, mut completion, mut details) = (false, false, false);
    c.members(|c, key| {
        match key {
            b"prompt_tokens" => {
                once(&mut prompt)?;
                u.prompt_tokens = count(c)?;
            }
            b"completion_tokens" => {
                once(&mut completion)?;
                u.completion_tokens = count(c)?;
            }
            b"prompt_tokens_details" => {
                once(&mut details)?;
                if !c.literal(b"null") {
                    u.cached_prompt_tokens = details_object(c)?;
                }
            }
            _ => c.skip_value(2)?,
        }
        Some(())
    })?;
    Some(u)
}

/// `prompt_tokens_details`' object: its `cached_tokens`.
fn details_object(c: &mut Cursor<'_>) -> Option<u64> {
    let (mut cached, mut seen) = (0, false);
    c.members(|c, key| {
        if key == b"cached_tokens" {
            once(&mut seen)?;
            cached = count(c)?;
        } else {
            c.skip_value(3)?;
        }
        Some(())
    })?;
    Some(cached)
}

/// A token count as `Lenient` reads it, for the shapes read here: `null` is 0,
/// a negative integer 0, a non-negative one itself (up to `u64::MAX`); a
/// fraction, an exponent or a longer integer is left to serde (which reads
/// some as floats and refuses exponents past f64's range).
fn count(c: &mut Cursor<'_>) -> Option<u64> {
    if c.literal(b"null") {
        return Some(0);
    }
    if c.literal(b"-") {
        let digits = c.int_digits()?;
        return (digits <= 19 && !matches!(c.peek(), Some(b'.' | b'e' | b'E'))).then_some(0);
    }
    c.number()?
}
