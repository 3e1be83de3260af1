//! A direct reader for the common shape of a response body's tail from its
//! `"usage"` key on: what serde makes of `{` + that tail, without serde's
//! visitor machinery (which cost ~5.4k instructions on the mock's 330-byte
//! tail, most of a non-streamed request's accounting).
//!
//! It answers only where it is sure to give serde's answer: plain integer or
//! `null` token counts, keys without escapes, ignored values that are ASCII
//! strings without escapes, JSON numbers, literals, and arrays or objects of
//! those up to a small depth. Anything else (a float count, a duplicate field,
//! an escape, a non-ASCII ignored string, a number serde would read as a float
//! past `u64`) is `None`: undecided, and the caller parses with serde.

use super::usage::Usage;

/// Nesting allowed inside an ignored value before the reader gives up.
const MAX_DEPTH: u8 = 8;

/// The answer serde gives for the document `{` + `tail`, where `tail` starts
/// with `"usage"`: `Some(Some(usage))`, `Some(None)` for `"usage": null`, or
/// `None` when this reader cannot be sure (or serde would fail).
pub(super) fn usage_from_common_tail(tail: &[u8]) -> Option<Option<Usage>> {
    let mut c = Cursor { s: tail, i: 0 };
    c.key_is(b"usage")?;
    c.colon()?;
    let usage = if c.literal(b"null") {
        None
    } else {
        Some(c.usage_object()?)
    };
    // The members after `usage` up to the document's closing brace.
    loop {
        c.ws();
        match c.next()? {
            b'}' => break,
            b',' => {
                c.ws();
                if c.plain_key()? == b"usage" {
                    // A duplicate: serde refuses the document.
                    return None;
                }
                c.colon()?;
                c.skip_value(0)?;
            }
            _ => return None,
        }
    }
    c.ws();
    (c.i == c.s.len()).then_some(usage)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn colon(&mut self) -> Option<()> {
        self.ws();
        (self.next()? == b':').then_some(())?;
        self.ws();
        Some(())
    }

    /// Consumes `lit` if it comes next.
    fn literal(&mut self, lit: &[u8]) -> bool {
        let hit = self.s[self.i..].starts_with(lit);
        if hit {
            self.i += lit.len();
        }
        hit
    }

    /// A string of printable ASCII without escapes, as bytes: what serde reads
    /// as the same text whether it parses (keys) or ignores (values) it.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        let s = self.s;
        (self.next()? == b'"').then_some(())?;
        let start = self.i;
        self.i += plain_len(s.get(start..)?);
        (self.next()? == b'"').then_some(&s[start..self.i - 1])
    }

    fn plain_key(&mut self) -> Option<&'a [u8]> {
        self.plain_string()
    }

    fn key_is(&mut self, want: &[u8]) -> Option<()> {
        (self.plain_key()? == want).then_some(())
    }

    /// `{ ... }` after `"usage":`, as `RawUsage` reads it.
    fn usage_object(&mut self) -> Option<Usage> {
        let mut u = Usage::default();
        let (mut prompt, mut completion, mut details) = (false, false, false);
        self.members(|c, key| {
            match key {
                b"prompt_tokens" => {
                    once(&mut prompt)?;
                    u.prompt_tokens = c.count()?;
                }
                b"completion_tokens" => {
                    once(&mut completion)?;
                    u.completion_tokens = c.count()?;
                }
                b"prompt_tokens_details" => {
                    once(&mut details)?;
                    if !c.literal(b"null") {
                        u.cached_prompt_tokens = c.details_object()?;
                    }
                }
                _ => c.skip_value(1)?,
            }
            Some(())
        })?;
        Some(u)
    }

    /// `prompt_tokens_details`' object: its `cached_tokens`.
    fn details_object(&mut self) -> Option<u64> {
        let (mut cached, mut seen) = (0, false);
        self.members(|c, key| {
            if key == b"cached_tokens" {
                once(&mut seen)?;
                cached = c.count()?;
            } else {
                c.skip_value(2)?;
            }
            Some(())
        })?;
        Some(cached)
    }

    /// An object's members, each handed to `member` with the cursor on its value.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        (self.next()? == b'{').then_some(())?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.plain_key()?;
            self.colon()?;
            member(self, key)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A token count as `Lenient` reads it, for the shapes read here: `null` is
    /// 0, a negative integer 0, a non-negative one itself; a fraction, an
    /// exponent or more than 19 digits is left to serde.
    fn count(&mut self) -> Option<u64> {
        if self.literal(b"null") {
            return Some(0);
        }
        let negative = self.literal(b"-");
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        let digits = &self.s[start..self.i];
        let simple = match digits {
            [] => false,
            [b'0', _, ..] => false,
            d => d.len() <= 19,
        };
        if !simple || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        if negative {
            return Some(0);
        }
        // At most 19 digits: below u64::MAX, so no overflow.
        Some(
            digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
        )
    }

    /// Any JSON value serde ignores, restricted as the module says.
    fn skip_value(&mut self, depth: u8) -> Option<()> {
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'{' if depth < MAX_DEPTH => self.members(|c, _| c.skip_value(depth + 1)),
            b'[' if depth < MAX_DEPTH => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true").then_some(()),
            b'f' => self.literal(b"false").then_some(()),
            b'n' => self.literal(b"null").then_some(()),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A JSON number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        self.literal(b"-");
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.literal(b".") {
            self.digit()?;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
        }
        Some(())
    }

    fn digit(&mut self) -> Option<()> {
        self.next()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// The length of `s`'s prefix free of `"`, `\\`, control characters and bytes
/// past 0x7f, eight bytes a step: keys and short values are most of a tail, and
/// a byte at a time cost ~8 instructions each.
fn plain_len(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `x` that is zero; exact up to the first one.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut words = s.chunks_exact(8);
    let mut done = 0;
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let x = u64::from_le_bytes(b);
        let stop = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            // bytes below 0x20 (exact up to the first, as `zero`), and past 0x7f
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | (x & HIGH);
        if stop != 0 {
            return done + (stop.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    done + words
        .remainder()
        .iter()
        .position(|&b| matches!(b, b'"' | b'\\' | 0..=0x1f | 0x80..))
        .unwrap_or(words.remainder().len())
}

/// A field may come once: serde refuses a duplicate, so the reader leaves it to serde.
fn once(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn plain_len_stops_where_a_byte_loop_does(
            s in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => proptest::num::u8::ANY,
                ],
                0..40,
            ),
        ) {
            let naive = s
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))
                .unwrap_or(s.len());
            proptest::prop_assert_eq!(plain_len(&s), naive);
        }
    }
}
