//! A sans-IO HTTP/1.1 response reader for the load generator.
//!
//! [`Parser::advance`] takes whatever bytes have arrived, consumes as much as it can
//! and reports what it saw (status, body bytes, how many body chunks began), so the
//! connection loop never assumes one read is one response: a head split across reads,
//! a chunk-size line cut in half and two responses' worth of chunks in one read all
//! work. Body bytes are counted and skipped, never copied. The head is parsed with
//! `httparse`; bodies are delimited by `content-length`, `transfer-encoding: chunked`
//! (de-chunked, trailers skipped) or, failing both, the connection closing.

use std::io;

/// Headers beyond this many make the response an error.
const MAX_HEADERS: usize = 64;

/// Where the reader is inside the current response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a complete status line and headers.
    Head,
    /// `content-length` body with this many bytes still to come.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk with this many data bytes still to come.
    ChunkData(u64),
    /// Expecting the CRLF that ends a chunk's data.
    ChunkEnd,
    /// After the last (zero-size) chunk: trailer lines until an empty line.
    Trailers,
    /// No length: the body ends when the server closes the connection.
    UntilClose,
    /// The response is complete.
    Done,
}

/// What one [`Parser::advance`] call observed; the caller resets it per read.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Seen {
    /// At least one body byte arrived.
    pub body_bytes: bool,
    /// Body chunks whose first data byte arrived: HTTP chunks of a chunked body,
    /// otherwise 1 for a read that carried body bytes.
    pub chunks: u32,
}

/// Reads one response at a time; [`Parser::start`] readies it for the next.
#[derive(Debug)]
pub(super) struct Parser {
    state: State,
    /// The request was `HEAD`: responses have no body whatever their headers say.
    head_request: bool,
    /// Status of the final (non-1xx) response head.
    status: u16,
    /// The server will close the connection after this response.
    close: bool,
    /// The current chunk's first data byte has not arrived yet.
    fresh_chunk: bool,
    /// Body bytes received for the current response.
    body_len: u64,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Parser {
    pub(super) fn new(head_request: bool) -> Self {
        Self {
            state: State::Head,
            head_request,
            status: 0,
            close: false,
            fresh_chunk: false,
            body_len: 0,
        }
    }

    /// Forget the previous response and expect a new one.
    pub(super) fn start(&mut self) {
        self.state = State::Head;
        self.status = 0;
        self.close = false;
        self.fresh_chunk = false;
        self.body_len = 0;
    }

    pub(super) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The final status; 0 until the head has been parsed.
    pub(super) fn status(&self) -> u16 {
        self.status
    }

    /// The connection cannot carry another request after this response.
    pub(super) fn must_close(&self) -> bool {
        self.close
    }

    /// Body bytes received so far (after de-chunking).
    pub(super) fn body_len(&self) -> u64 {
        self.body_len
    }

    /// The server closed the connection: fine only for a body delimited by the close.
    pub(super) fn eof(&mut self) -> io::Result<()> {
        match self.state {
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            State::Done => Ok(()),
            State::Head if self.status == 0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            )),
        }
    }

    /// Consume what can be consumed of `input` (the unread bytes received so far) and
    /// return how many bytes that was. Stops at the end of the response: bytes after it
    /// are left unconsumed.
    pub(super) fn advance(&mut self, input: &[u8], seen: &mut Seen) -> io::Result<usize> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::Done => return Ok(pos),
                State::Head => match self.parse_head(rest)? {
                    Some(n) => pos += n,
                    None => return Ok(pos),
                },
                State::Length(left) => {
                    let take = left.min(rest.len() as u64);
                    if take == 0 {
                        return Ok(pos);
                    }
                    self.body(seen, take, true);
                    pos += take as usize;
                    self.state = if take == left {
                        State::Done
                    } else {
                        State::Length(left - take)
                    };
                }
                State::UntilClose => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    self.body(seen, rest.len() as u64, true);
                    pos += rest.len();
                }
                State::ChunkSize => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, size))) => {
                        pos += n;
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            self.fresh_chunk = true;
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => return Ok(pos),
                    Err(_) => return Err(invalid("invalid chunk size line")),
                },
                State::ChunkData(left) => {
                    let take = left.min(rest.len() as u64);
                    if take == 0 {
                        return Ok(pos);
                    }
                    let fresh = std::mem::replace(&mut self.fresh_chunk, false);
                    self.body(seen, take, fresh);
                    pos += take as usize;
                    self.state = if take == left {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        if rest.first().is_some_and(|&b| b != b'\r') {
                            return Err(invalid("chunk data not followed by CRLF"));
                        }
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    pos += 2;
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        return Ok(pos);
                    };
                    pos += nl + 1;
                    // An empty line ("\r\n", or a bare "\n") ends the trailers.
                    if nl == 0 || (nl == 1 && rest[0] == b'\r') {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    fn body(&mut self, seen: &mut Seen, len: u64, new_chunk: bool) {
        self.body_len += len;
        seen.body_bytes = true;
        if new_chunk {
            seen.chunks += 1;
        }
    }

    /// Parse a complete head from `input`; `None` if it has not all arrived.
    fn parse_head(&mut self, input: &[u8]) -> io::Result<Option<usize>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(invalid("invalid response head")),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) {
            if status == 101 {
                return Err(invalid("unexpected 101 Switching Protocols"));
            }
            // Interim response (100 Continue, 103 Early Hints): the real one follows.
            return Ok(Some(len));
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut close = resp.version == Some(0);
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| invalid("invalid content-length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(invalid("conflicting content-length headers"));
                }
                length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked must be the last coding; anything else is read until close.
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if !chunked {
                    close = true;
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        self.status = status;
        self.close = close;
        self.state = if self.head_request || status == 204 || status == 304 {
            State::Done
        } else if chunked {
            State::ChunkSize
        } else if let Some(len) = length {
            if len == 0 {
                State::Done
            } else {
                State::Length(len)
            }
        } else {
            self.close = true;
            State::UntilClose
        };
        Ok(Some(len))
    }
}

/// A connection's reusable read buffer: unread bytes live in `buf[start..end]`.
#[derive(Debug)]
pub(super) struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The unread bytes.
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }

    /// Free space to read into, compacting first; an error if the unread bytes (an
    /// unfinished head or chunk-size line) already fill the buffer.
    pub(super) fn spare(&mut self) -> io::Result<&mut [u8]> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(invalid("response head larger than the read buffer"));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        Ok(&mut self.buf[self.end..])
    }

    /// `n` bytes were read into [`ReadBuf::spare`].
    pub(super) fn filled(&mut self, n: usize) {
        self.end += n;
    }
}
