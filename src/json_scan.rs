//! A cursor for reading the few JSON fields the request path acts on (the
//! request's `model` and `stream` flags, the response's `usage`) without
//! serde's visitor machinery, which cost more than the reading itself on
//! bodies of a few hundred bytes.
//!
//! The readers built on it decide only where they are sure to give serde's
//! answer and return `None` otherwise, so that the caller parses with serde,
//! which also words every error. So the cursor accepts a strict subset of
//! JSON: keys are printable ASCII without escapes (serde's UTF-8 check and
//! unescaping change nothing), values it skips are checked as serde checks an
//! ignored value (escapes well formed, no control characters, numbers in
//! JSON's grammar; like serde, bytes past 0x7f inside a string are not
//! validated), and nesting past [`MAX_DEPTH`] is left to serde.

/// Nesting a skipped value may have before the cursor gives up (serde's own
/// limit is 128).
const MAX_DEPTH: u8 = 32;

/// A position in a JSON text. Every method returns `None` (or `false`) on
/// anything outside the subset above; the position is then meaningless.
pub(crate) struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(s: &'a [u8]) -> Self {
        Cursor { s, i: 0 }
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    /// Consumes `want` as the next byte.
    pub(crate) fn expect(&mut self, want: u8) -> Option<()> {
        (self.byte()? == want).then_some(())
    }

    pub(crate) fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Whitespace and then the end of the text, as serde requires after a document.
    pub(crate) fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.s.len()
    }

    pub(crate) fn colon(&mut self) -> Option<()> {
        self.ws();
        self.expect(b':')?;
        self.ws();
        Some(())
    }

    /// Consumes `lit` if it comes next.
    pub(crate) fn literal(&mut self, lit: &[u8]) -> bool {
        let hit = self.s.get(self.i..).is_some_and(|r| r.starts_with(lit));
        if hit {
            self.i += lit.len();
        }
        hit
    }

    /// A key: printable ASCII without escapes, as bytes.
    pub(crate) fn key(&mut self) -> Option<&'a [u8]> {
        let s = self.s;
        self.expect(b'"')?;
        let start = self.i;
        self.i += run_len(s.get(start..)?, true);
        self.expect(b'"')?;
        s.get(start..self.i - 1)
    }

    /// A string value without escapes, as serde would borrow it: valid UTF-8.
    pub(crate) fn plain_str(&mut self) -> Option<&'a str> {
        let s = self.s;
        self.expect(b'"')?;
        let start = self.i;
        self.i += run_len(s.get(start..)?, false);
        self.expect(b'"')?;
        std::str::from_utf8(s.get(start..self.i - 1)?).ok()
    }

    /// A string serde ignores: escapes well formed, no control characters.
    fn skip_string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        loop {
            self.i += run_len(self.s.get(self.i..)?, false);
            match self.byte()? {
                b'"' => return Some(()),
                b'\\' => match self.byte()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        for _ in 0..4 {
                            self.byte()?.is_ascii_hexdigit().then_some(())?;
                        }
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    /// An object's members, each handed to `member` with the cursor on its value.
    pub(crate) fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.expect(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.colon()?;
            member(self, key)?;
            self.ws();
            match self.byte()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Any value, as serde checks one it ignores; `depth` is the nesting so far.
    pub(crate) fn skip_value(&mut self, depth: u8) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
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
                    match self.byte()? {
                        b',' => self.ws(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true").then_some(()),
            b'f' => self.literal(b"false").then_some(()),
            b'n' => self.literal(b"null").then_some(()),
            b'-' | b'0'..=b'9' => self.number().map(drop),
            _ => None,
        }
    }

    /// A JSON number, `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`;
    /// its value when it is a plain non-negative integer that fits a `u64`
    /// (what serde's `Value::as_u64` gives), else `Some(None)`.
    pub(crate) fn number(&mut self) -> Option<Option<u64>> {
        let negative = self.literal(b"-");
        let start = self.i;
        self.int_digits()?;
        let int = self.s.get(start..self.i)?;
        let mut plain = !negative;
        if self.literal(b".") {
            self.digit()?;
            self.digits();
            plain = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
            plain = false;
        }
        Some(plain.then(|| parse_u64(int)).flatten())
    }

    /// The integer part of a number, `0 | [1-9][0-9]*`; how many digits it has.
    pub(crate) fn int_digits(&mut self) -> Option<usize> {
        let start = self.i;
        match self.byte()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        Some(self.i - start)
    }

    fn digit(&mut self) -> Option<()> {
        self.byte()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// Marks a field as seen; `None` the second time. serde refuses a known field
/// twice (and a `Value` map keeps the last), so a reader leaves duplicates to serde.
pub(crate) fn once(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

/// Decimal digits as a `u64`; `None` past `u64::MAX` (serde reads those as floats).
fn parse_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d.wrapping_sub(b'0')))
    })
}

/// The length of `s`'s prefix free of `"`, `\`, control characters and, with
/// `ascii`, bytes past 0x7f; eight bytes a step (a byte at a time cost ~8
/// instructions each, and keys and short strings are most of these texts).
fn run_len(s: &[u8], ascii: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `x` that is zero; exact up to the first one.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let high = if ascii { HIGH } else { 0 };
    let mut words = s.chunks_exact(8);
    let mut done = 0;
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let x = u64::from_le_bytes(b);
        let stop = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            // bytes below 0x20, exact up to the first as `zero` is
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | (x & high);
        if stop != 0 {
            return done + (stop.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    let rest = words.remainder();
    done + rest
        .iter()
        .position(|&b| stops(b, ascii))
        .unwrap_or(rest.len())
}

fn stops(b: u8, ascii: bool) -> bool {
    matches!(b, b'"' | b'\\' | 0..=0x1f) || (ascii && b >= 0x80)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn run_len_stops_where_a_byte_loop_does(
            s in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => proptest::num::u8::ANY,
                ],
                0..40,
            ),
            ascii in proptest::bool::ANY,
        ) {
            let naive = s.iter().position(|&b| stops(b, ascii)).unwrap_or(s.len());
            proptest::prop_assert_eq!(run_len(&s, ascii), naive);
        }

        /// Wherever the cursor skips a value, serde reads it as JSON too, and
        /// a plain integer's value is what `Value::as_u64` says.
        #[test]
        fn skipped_values_are_json(text in "[ -~\\\\\"{}\\[\\],:0-9eE.+-]{0,24}|\"[^\\x00]{0,6}\"") {
            let mut c = Cursor::new(text.as_bytes());
            c.ws();
            let number = matches!(c.peek(), Some(b'-' | b'0'..=b'9'));
            let mut n = Cursor::new(text.as_bytes());
            n.ws();
            let value = n.number();
            if c.skip_value(0).is_some() && c.at_end() {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if number && n.at_end() {
                    proptest::prop_assert_eq!(value, Some(v.as_u64()));
                }
            }
        }
    }

    #[test]
    fn numbers_read_as_serde_reads_them() {
        for (text, want) in [
            ("0", Some(Some(0))),
            ("16", Some(Some(16))),
            ("18446744073709551615", Some(Some(u64::MAX))),
            ("18446744073709551616", Some(None)),
            ("-1", Some(None)),
            ("1.0", Some(None)),
            ("1e3", Some(None)),
            ("-", None),
            ("1.", None),
            ("1e", None),
        ] {
            let mut c = Cursor::new(text.as_bytes());
            assert_eq!(c.number(), want, "{text}");
        }
    }
}
