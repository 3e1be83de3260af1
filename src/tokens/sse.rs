//! Incremental Server-Sent Events parsing for streamed responses.
//!
//! This module owns two byte-level state machines that accept chunks with
//! arbitrary boundaries (mid-line, between `\r` and `\n`, mid-UTF-8):
//! - [`SseScanner`]: parses events following the WHATWG `text/event-stream`
//!   rules and hands each complete event to a callback.
//! - [`SseEventSplitter`]: cuts the raw byte stream into complete events,
//!   byte-exact as received, so a caller can forward or drop each one.
//!
//! Both are bounded in memory and never panic on any input bytes. Per chunk
//! they do O(chunk) work and reuse their buffers.

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, `None` when absent or empty (the default type,
    /// `message`).
    pub event: Option<&'a [u8]>,
    /// The `data:` lines joined with `\n`, without the final newline.
    pub data: &'a [u8],
}

/// Incremental WHATWG `text/event-stream` parser.
///
/// Lines end with `\n`, `\r\n` or `\r`; a blank line dispatches the event;
/// `data:` values (one optional leading space removed) are joined with `\n`;
/// lines starting with `:` are comments; `event:` sets the event type; `id`
/// and `retry` are ignored (the gateway does not reconnect). A leading UTF-8
/// BOM is skipped. Events with an empty data buffer are not dispatched.
#[derive(Debug)]
pub struct SseScanner {
    max_event_bytes: usize,
    // Bytes of a line that started in an earlier chunk. Lines wholly inside
    // one chunk are parsed in place and never copied here.
    line: Vec<u8>,
    line_overflow: bool,
    // The previous chunk ended with '\r': a leading '\n' in the next chunk is
    // the second half of the same "\r\n" terminator, not a blank line.
    pending_cr: bool,
    data: Vec<u8>,
    event: Vec<u8>,
    event_oversized: bool,
    seen_first_line: bool,
    oversized: u64,
}

impl SseScanner {
    /// A scanner whose event data, event type and line buffers each hold at
    /// most `max_event_bytes`; larger events are discarded and counted in
    /// [`SseScanner::oversized_events`].
    pub fn new(max_event_bytes: usize) -> Self {
        SseScanner {
            max_event_bytes,
            line: Vec::new(),
            line_overflow: false,
            pending_cr: false,
            data: Vec::new(),
            event: Vec::new(),
            event_oversized: false,
            seen_first_line: false,
            oversized: 0,
        }
    }

    /// Number of events discarded because a line or the event exceeded the bound.
    pub fn oversized_events(&self) -> u64 {
        self.oversized
    }

    /// Feeds the next chunk; `on_event` is called for every event the chunk
    /// completes, in order.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut i = 0;
        if self.pending_cr && !chunk.is_empty() {
            self.pending_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
        }
        while i < chunk.len() {
            let rest = &chunk[i..];
            let Some(off) = memchr2(b'\n', b'\r', rest) else {
                self.buffer_partial(rest);
                break;
            };
            let line = &rest[..off];
            if self.line.is_empty() && !self.line_overflow {
                // Same bound as for buffered lines, so the outcome does not
                // depend on where the chunk boundaries fall.
                let overflow = line.len() > self.max_event_bytes;
                self.process_line(line, overflow, &mut on_event);
            } else {
                self.buffer_partial(line);
                let buffered = std::mem::take(&mut self.line);
                let overflow = std::mem::replace(&mut self.line_overflow, false);
                self.process_line(&buffered, overflow, &mut on_event);
                self.line = buffered;
                self.line.clear();
            }
            let terminator = rest[off];
            i += off + 1;
            if terminator == b'\r' {
                match chunk.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
        }
    }

    /// Ends the stream: a final line without terminator is processed and an
    /// event that lacked its closing blank line is dispatched.
    ///
    /// WHATWG discards such an event; we dispatch it on purpose because a
    /// provider that closes the connection right after its last `data:` line
    /// still generated (and bills) that output. A truncated JSON payload is
    /// rejected by the consumer anyway. The scanner is reset for reuse.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        if !self.line.is_empty() || self.line_overflow {
            let buffered = std::mem::take(&mut self.line);
            let overflow = std::mem::replace(&mut self.line_overflow, false);
            self.process_line(&buffered, overflow, &mut on_event);
            self.line = buffered;
            self.line.clear();
        }
        self.dispatch(&mut on_event);
        self.pending_cr = false;
        self.seen_first_line = false;
    }

    fn buffer_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        if self.line.len() + bytes.len() > self.max_event_bytes {
            self.line_overflow = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn process_line(
        &mut self,
        mut line: &[u8],
        overflow: bool,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        if !self.seen_first_line {
            self.seen_first_line = true;
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if overflow {
            self.event_oversized = true;
            return;
        }
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' || self.event_oversized {
            return;
        }
        let (field, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max_event_bytes {
                    self.event_oversized = true;
                    self.data.clear();
                } else {
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                }
            }
            b"event" => {
                self.event.clear();
                if value.len() > self.max_event_bytes {
                    self.event_oversized = true;
                } else {
                    self.event.extend_from_slice(value);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.event_oversized {
            self.oversized += 1;
        } else if !self.data.is_empty() {
            let data = &self.data[..self.data.len() - 1];
            let event = (!self.event.is_empty()).then_some(&self.event[..]);
            on_event(SseEvent { event, data });
        }
        self.event_oversized = false;
        self.data.clear();
        self.event.clear();
    }
}

/// A run of raw stream bytes released by [`SseEventSplitter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsePiece<'a> {
    /// The bytes, exactly as received.
    pub bytes: &'a [u8],
    /// True when `bytes` is one whole event through its terminating blank
    /// line. False for parts of an event larger than the bound, which are
    /// released as they arrive and must be forwarded as they are.
    pub complete: bool,
}

/// Cuts a raw SSE byte stream into complete events, byte-exact.
///
/// An event piece runs from the end of the previous piece through the
/// terminator of the next blank line (so a stray blank line is a piece of
/// its own). Concatenating every released piece, then
/// [`SseEventSplitter::flush_remaining`], reproduces the input exactly.
///
/// An event ending in a lone `\r` (CR-only framing) is released when the
/// next byte shows whether a `\n` belongs to it, so the cut is the same
/// whatever the chunking; for CR-only streams that delays each event until
/// the next one starts.
#[derive(Debug)]
pub struct SseEventSplitter {
    max_event_bytes: usize,
    held: Vec<u8>,
    line_has_content: bool,
    pending_cr: bool,
    complete_after_cr: bool,
    // The current event outgrew the bound: its bytes are being released as
    // partial pieces until its blank line.
    passthrough: bool,
}

impl SseEventSplitter {
    /// A splitter holding at most `max_event_bytes` of an incomplete event;
    /// beyond that the event is released in partial pieces.
    pub fn new(max_event_bytes: usize) -> Self {
        SseEventSplitter {
            max_event_bytes,
            held: Vec::new(),
            line_has_content: false,
            pending_cr: false,
            complete_after_cr: false,
            passthrough: false,
        }
    }

    /// Feeds the next chunk; `on_piece` receives, in order, every piece the
    /// chunk completes. Bytes of an incomplete trailing event are held.
    pub fn feed(&mut self, chunk: &[u8], mut on_piece: impl FnMut(SsePiece<'_>)) {
        let mut start = 0;
        let mut i = 0;
        loop {
            if self.pending_cr {
                let Some(&next) = chunk.get(i) else { break };
                if next == b'\n' {
                    i += 1;
                }
                self.pending_cr = false;
                if std::mem::replace(&mut self.complete_after_cr, false) {
                    self.emit(&chunk[start..i], &mut on_piece);
                    start = i;
                }
                continue;
            }
            let Some(off) = memchr2(b'\n', b'\r', &chunk[i..]) else {
                if i < chunk.len() {
                    self.line_has_content = true;
                }
                break;
            };
            let end = i + off;
            let blank = off == 0 && !self.line_has_content;
            self.line_has_content = false;
            i = end + 1;
            if chunk[end] == b'\r' {
                self.pending_cr = true;
                self.complete_after_cr = blank;
            } else if blank {
                self.emit(&chunk[start..i], &mut on_piece);
                start = i;
            }
        }
        self.hold(&chunk[start..], &mut on_piece);
    }

    /// Ends the stream: returns the held bytes of an incomplete trailing
    /// event (or of a CR-terminated event still waiting for its next byte)
    /// and resets the splitter.
    pub fn flush_remaining(&mut self) -> Vec<u8> {
        self.line_has_content = false;
        self.pending_cr = false;
        self.complete_after_cr = false;
        self.passthrough = false;
        std::mem::take(&mut self.held)
    }

    fn emit(&mut self, tail: &[u8], on_piece: &mut impl FnMut(SsePiece<'_>)) {
        if self.passthrough {
            self.passthrough = false;
            if !tail.is_empty() {
                on_piece(SsePiece {
                    bytes: tail,
                    complete: false,
                });
            }
        } else if self.held.is_empty() {
            on_piece(SsePiece {
                bytes: tail,
                complete: true,
            });
        } else {
            self.held.extend_from_slice(tail);
            on_piece(SsePiece {
                bytes: &self.held,
                complete: true,
            });
            self.held.clear();
        }
    }

    fn hold(&mut self, rest: &[u8], on_piece: &mut impl FnMut(SsePiece<'_>)) {
        if rest.is_empty() {
            return;
        }
        if self.passthrough {
            on_piece(SsePiece {
                bytes: rest,
                complete: false,
            });
        } else if self.held.len() + rest.len() > self.max_event_bytes {
            self.passthrough = true;
            if !self.held.is_empty() {
                on_piece(SsePiece {
                    bytes: &self.held,
                    complete: false,
                });
                self.held.clear();
            }
            on_piece(SsePiece {
                bytes: rest,
                complete: false,
            });
        } else {
            self.held.extend_from_slice(rest);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Ev {
        event: Option<Vec<u8>>,
        data: Vec<u8>,
    }

    fn scan_chunks(max: usize, chunks: &[&[u8]]) -> (Vec<Ev>, u64) {
        let mut s = SseScanner::new(max);
        let mut out = Vec::new();
        let mut push = |e: SseEvent<'_>| {
            out.push(Ev {
                event: e.event.map(<[u8]>::to_vec),
                data: e.data.to_vec(),
            })
        };
        for c in chunks {
            s.feed(c, &mut push);
        }
        s.finish(&mut push);
        (out, s.oversized_events())
    }

    fn ev(event: Option<&str>, data: &str) -> Ev {
        Ev {
            event: event.map(|e| e.as_bytes().to_vec()),
            data: data.as_bytes().to_vec(),
        }
    }

    /// Every 2-way split and 1-byte chunks give the same events as one chunk.
    fn assert_split_invariant(max: usize, input: &[u8]) -> Vec<Ev> {
        let whole = scan_chunks(max, &[input]);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(scan_chunks(max, &[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(scan_chunks(max, &bytes), whole);
        whole.0
    }

    #[test]
    fn whatwg_fields_and_line_endings() {
        let input = b"\xEF\xBB\xBF: comment\ndata: one\n\nevent: upd\ndata:two\r\ndata:  three\r\n\r\nid: 7\nretry: 10\nfoo\ndata\n\ndata: x\rdata: y\r\r\n\n\nevent: only\n\ndata: \xF0\x9F\x91\x8D\xFF\n\n";
        let events = assert_split_invariant(1024, input);
        assert_eq!(
            events,
            vec![
                ev(None, "one"),
                ev(Some("upd"), "two\n three"),
                ev(None, ""),
                ev(None, "x\ny"),
                Ev {
                    event: None,
                    data: b"\xF0\x9F\x91\x8D\xFF".to_vec()
                },
            ]
        );
    }

    #[test]
    fn finish_dispatches_unterminated_event() {
        assert_eq!(
            assert_split_invariant(64, b"data: a\n\ndata: b"),
            vec![ev(None, "a"), ev(None, "b")]
        );
        assert_eq!(
            assert_split_invariant(64, b"data: a\ndata: b\n"),
            vec![ev(None, "a\nb")]
        );
        assert_eq!(assert_split_invariant(64, b": only a comment"), vec![]);
    }

    #[test]
    fn oversized_events_are_dropped_and_counted() {
        let big = "x".repeat(100);
        let input = format!("data: a\n\ndata: {big}\n\ndata: b\n\n: {big}\ndata: c\n\ndata: d\n\n");
        let events = assert_split_invariant(32, input.as_bytes());
        assert_eq!(events, vec![ev(None, "a"), ev(None, "b"), ev(None, "d")]);
        assert_eq!(scan_chunks(32, &[input.as_bytes()]).1, 2);
        // Many small data lines that add up past the bound.
        let many = "data: 0123456789\n".repeat(10) + "\ndata: ok\n\n";
        let (events, oversized) = scan_chunks(32, &[many.as_bytes()]);
        assert_eq!((events, oversized), (vec![ev(None, "ok")], 1));
    }

    #[test]
    fn buffers_stay_bounded() {
        let mut s = SseScanner::new(64);
        let junk = vec![b'z'; 10_000];
        for _ in 0..100 {
            s.feed(&junk, |_| panic!("no event expected"));
        }
        assert!(s.line.capacity() <= 64 && s.data.capacity() <= 64);
        let mut got = Vec::new();
        s.feed(b"\n\ndata: fine\n\n", |e| got.push(e.data.to_vec()));
        assert_eq!(got, vec![b"fine".to_vec()]);
        assert_eq!(s.oversized_events(), 1);
    }

    fn split_chunks(max: usize, chunks: &[&[u8]]) -> (Vec<(Vec<u8>, bool)>, Vec<u8>) {
        let mut s = SseEventSplitter::new(max);
        let mut pieces: Vec<(Vec<u8>, bool)> = Vec::new();
        for c in chunks {
            s.feed(c, |p| pieces.push((p.bytes.to_vec(), p.complete)));
        }
        (pieces, s.flush_remaining())
    }

    #[test]
    fn splitter_cuts_byte_exact_events() {
        let input: &[u8] = b"\ndata: a\n\n: c\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n\ndata: tail";
        let expected: Vec<(Vec<u8>, bool)> = [
            &b"\n"[..],
            b"data: a\n\n",
            b": c\r\ndata: b\r\n\r\n",
            b"data: c\r\r",
            b"data: d\n\n",
            b"\n",
        ]
        .iter()
        .map(|p| (p.to_vec(), true))
        .collect();
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let (pieces, rest) = split_chunks(1024, &[a, b]);
            assert_eq!(pieces, expected, "cut at {cut}");
            assert_eq!(rest, b"data: tail");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            split_chunks(1024, &bytes),
            (expected, b"data: tail".to_vec())
        );
    }

    #[test]
    fn splitter_waits_for_byte_after_cr() {
        let (pieces, rest) = split_chunks(64, &[b"data: a\r\n\r"]);
        assert!(pieces.is_empty());
        assert_eq!(rest, b"data: a\r\n\r");
        let (pieces, rest) = split_chunks(64, &[b"data: a\r\n\r", b"\ndata: b"]);
        assert_eq!(pieces, vec![(b"data: a\r\n\r\n".to_vec(), true)]);
        assert_eq!(rest, b"data: b");
    }

    #[test]
    fn splitter_releases_oversized_events_in_order() {
        let big = "y".repeat(200);
        let input = format!("data: a\n\ndata: {big}\n\ndata: b\n\n");
        for cut in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(cut);
            let mut s = SseEventSplitter::new(32);
            let mut out = Vec::new();
            let mut complete = Vec::new();
            for c in [a, b, b"data: c\n".as_slice()] {
                s.feed(c, |p| {
                    out.extend_from_slice(p.bytes);
                    if p.complete {
                        complete.push(p.bytes.to_vec());
                    }
                });
                assert!(s.held.len() <= 32);
            }
            out.extend(s.flush_remaining());
            assert_eq!(out, format!("{input}data: c\n").into_bytes());
            assert_eq!(complete.first().unwrap(), b"data: a\n\n");
            assert_eq!(complete.last().unwrap(), b"data: b\n\n");
        }
    }
}
