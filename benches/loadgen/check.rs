//! [`self_check`]: the generator against a tiny in-process HTTP/1.1 server whose
//! behaviour is known, so a benchmark can trust its numbers before it starts.
//!
//! First the response parser is fed canned responses split at every byte; then short
//! runs check counts, rates, the latency floor of a delayed response, streaming TTFB
//! and chunk gaps, error and reconnect handling, and that an overloaded connection
//! pool shows up as queueing latency (the open loop) instead of a slower load.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::parse::{Parser, Seen};
use super::{raw_request, run, saturate, RunResult, RunSpec, Target};

/// The server's per-request delay for `/delay` and between `/chunked` chunks.
const DELAY: Duration = Duration::from_millis(5);

fn fail(msg: String) -> io::Error {
    io::Error::other(format!("loadgen self-check: {msg}"))
}

fn ensure(cond: bool, what: &str, result: Option<&RunResult>) -> io::Result<()> {
    if cond {
        return Ok(());
    }
    Err(fail(match result {
        Some(r) => format!("{what}: {}", r.summary()),
        None => what.to_owned(),
    }))
}

/// Responses the server sends, by request path.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// 200 with a 5-byte content-length body.
    Length,
    /// The same after [`DELAY`].
    Delay,
    /// Chunked: four 5-byte chunks, [`DELAY`] apart.
    Chunked,
    /// A chunked body with extensions and a trailer, written a few bytes at a time.
    Split,
    /// 500 with an empty body.
    Status500,
    /// A head promising 100 bytes, 10 of them, then the connection closes.
    Truncated,
    /// `connection: close` after a complete response.
    Close,
    /// No length: the body ends with the connection.
    Eof,
}

impl Route {
    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/cl" => Self::Length,
            "/delay" => Self::Delay,
            "/chunked" => Self::Chunked,
            "/split" => Self::Split,
            "/500" => Self::Status500,
            "/truncated" => Self::Truncated,
            "/close" => Self::Close,
            "/eof" => Self::Eof,
            _ => return None,
        })
    }
}

const SPLIT_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";

/// Serve one connection; `Ok` when the peer closes or the route closes.
async fn serve_conn(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    loop {
        let (route, used) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(head) = req
                .parse(&buf[..len])
                .map_err(|e| fail(format!("server: bad request: {e}")))?
            {
                let body = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                if len >= head + body {
                    let route = Route::from_path(req.path.unwrap_or(""))
                        .ok_or_else(|| fail(format!("server: unknown path {:?}", req.path)))?;
                    break (route, head + body);
                }
            }
            if len == buf.len() {
                return Err(fail("server: request too large".to_owned()));
            }
            let n = s.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok(());
            }
            len += n;
        };
        buf.copy_within(used..len, 0);
        len -= used;
        match route {
            Route::Length => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                    .await?
            }
            Route::Delay => {
                tokio::time::sleep(DELAY).await;
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                    .await?;
            }
            Route::Chunked => {
                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nchunk\r\n")
                    .await?;
                for _ in 0..3 {
                    tokio::time::sleep(DELAY).await;
                    s.write_all(b"5\r\nchunk\r\n").await?;
                }
                s.write_all(b"0\r\n\r\n").await?;
            }
            Route::Split => {
                for piece in SPLIT_RESPONSE.chunks(7) {
                    s.write_all(piece).await?;
                    tokio::task::yield_now().await;
                }
            }
            Route::Status500 => {
                s.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            }
            Route::Truncated => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await?;
                return Ok(());
            }
            Route::Close => {
                s.write_all(
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
                )
                .await?;
                return Ok(());
            }
            Route::Eof => {
                s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await?;
                return Ok(());
            }
        }
    }
}

/// Feed `input` to a parser in the given pieces; returns (status, body bytes, chunks,
/// unconsumed bytes at the end).
fn parse_in_pieces(input: &[u8], cuts: &[usize], eof: bool) -> io::Result<(u16, u64, u32, usize)> {
    let mut parser = Parser::new(false);
    let mut pending: Vec<u8> = Vec::new();
    let mut chunks = 0;
    let mut last = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        pending.extend_from_slice(&input[last..cut]);
        last = cut;
        let mut seen = Seen::default();
        let used = parser.advance(&pending, &mut seen)?;
        pending.drain(..used);
        chunks += seen.chunks;
        if parser.is_done() {
            break;
        }
    }
    if eof && !parser.is_done() {
        parser.eof()?;
    }
    if !parser.is_done() {
        return Err(fail("parser: response not complete".to_owned()));
    }
    Ok((
        parser.status(),
        parser.body_len(),
        chunks,
        pending.len() + input.len() - last,
    ))
}

/// A canned response and what the parser must make of it.
#[derive(Clone, Copy)]
struct ParseCase {
    input: &'static [u8],
    /// The body ends with the connection.
    eof: bool,
    status: u16,
    body: u64,
    /// Body chunks seen; `None` where that depends on how the input is cut.
    chunks: Option<u32>,
}

/// The parser on canned responses cut at every position (two pieces) and byte by byte.
fn check_parser() -> io::Result<()> {
    let case = |input: &'static [u8], eof, status, body, chunks| ParseCase {
        input,
        eof,
        status,
        body,
        chunks,
    };
    let cases = [
        case(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false, 200, 5, None),
        case(SPLIT_RESPONSE, false, 200, 15, Some(2)),
        case(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
            201,
            3,
            Some(1),
        ),
        case(b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", false, 204, 0, Some(0)),
        case(b"HTTP/1.0 200 OK\r\n\r\nuntil close", true, 200, 11, None),
    ];
    for (i, c) in cases.iter().enumerate() {
        let ParseCase {
            input,
            eof,
            status,
            body,
            chunks,
        } = *c;
        let mut splits: Vec<Vec<usize>> = (0..=input.len()).map(|c| vec![c]).collect();
        splits.push((1..input.len()).collect());
        for cuts in &splits {
            let (s, b, c, left) = parse_in_pieces(input, cuts, eof)
                .map_err(|e| fail(format!("parser case {i} cut at {cuts:?}: {e}")))?;
            let chunks_ok = chunks.is_none_or(|want| want == c);
            ensure(
                s == status && b == body && chunks_ok && left == 0,
                &format!(
                    "parser case {i} cut at {cuts:?}: status {s} body {b} chunks {c} left {left}"
                ),
                None,
            )?;
        }
    }
    // Two responses in one read: the first stops at its end.
    let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let mut parser = Parser::new(false);
    let used = parser.advance(two, &mut Seen::default())?;
    ensure(
        parser.is_done() && used == two.len() / 2,
        "parser: pipelined responses",
        None,
    )?;
    // Garbage is an error, not a hang.
    let bad: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ];
    for input in bad {
        let mut parser = Parser::new(false);
        ensure(
            parser.advance(input, &mut Seen::default()).is_err(),
            &format!("parser accepted {:?}", String::from_utf8_lossy(input)),
            None,
        )?;
    }
    Ok(())
}

async fn load(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    secs: f64,
    connections: usize,
    streaming: bool,
) -> io::Result<RunResult> {
    let target = Target {
        addr,
        request: raw_request("GET", path, &[], b""),
    };
    let spec = RunSpec {
        rate_per_sec: rate,
        duration: Duration::from_secs_f64(secs),
        warmup: Duration::from_millis(100),
        connections,
        streaming,
        timeout: Duration::from_secs(10),
    };
    let result = run(&target, &spec).await?;
    let expected = (spec.warmup + spec.duration).as_secs_f64() * rate;
    let expected = expected.ceil() as u64 - (spec.warmup.as_secs_f64() * rate).ceil() as u64;
    ensure(
        result.sent == expected && result.sent == result.ok + result.non_2xx + result.errors,
        &format!("{path}: {expected} requests scheduled, each counted once"),
        Some(&result),
    )?;
    Ok(result)
}

/// Check the generator against a tiny in-process server (takes about 6 s). Returns
/// an error describing the first check that failed.
pub async fn self_check() -> io::Result<()> {
    check_parser()?;

    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_conn(stream));
        }
    });
    let outcome = checks(addr).await;
    server.abort();
    outcome
}

async fn checks(addr: SocketAddr) -> io::Result<()> {
    let ms = |v: f64| v * 1000.0;

    let r = load(addr, "/cl", 1000.0, 1.0, 4, false).await?;
    ensure(
        r.ok == r.sent && r.sent == 1000,
        "/cl: every request ok",
        Some(&r),
    )?;
    ensure(
        (r.achieved_rate - 1000.0).abs() < 100.0,
        "/cl: achieved rate ~1000/s",
        Some(&r),
    )?;
    ensure(r.p(0.5) < ms(5.0), "/cl: p50 under 5 ms", Some(&r))?;

    let r = load(addr, "/delay", 100.0, 0.5, 4, false).await?;
    ensure(r.ok == r.sent, "/delay: every request ok", Some(&r))?;
    ensure(
        r.p(0.0) >= ms(5.0),
        "/delay: no latency below the server's 5 ms",
        Some(&r),
    )?;
    ensure(r.p(0.5) < ms(50.0), "/delay: p50 under 50 ms", Some(&r))?;

    let r = load(addr, "/chunked", 50.0, 0.5, 4, true).await?;
    ensure(r.ok == r.sent, "/chunked: every request ok", Some(&r))?;
    ensure(
        r.ttfb.len() == r.ok && r.ttfb.value_at_quantile(0.5) < 4000,
        "/chunked: TTFB under 4 ms",
        Some(&r),
    )?;
    ensure(
        r.chunk_gap.len() == 3 * r.ok,
        "/chunked: 3 gaps per response",
        Some(&r),
    )?;
    ensure(
        r.chunk_gap.value_at_quantile(0.5) >= 4000,
        "/chunked: gaps ~5 ms",
        Some(&r),
    )?;
    ensure(
        r.p(0.0) >= ms(15.0),
        "/chunked: latency at least 3 gaps",
        Some(&r),
    )?;

    // One connection, 5 ms per request, 400/s offered: the pool is overloaded, and an
    // open loop must show the queue in the latency (a closed one would not).
    let r = load(addr, "/delay", 400.0, 0.5, 1, false).await?;
    ensure(
        r.ok == r.sent,
        "overload: every request ok eventually",
        Some(&r),
    )?;
    ensure(
        r.late_sends > r.sent / 2,
        "overload: most requests sent late",
        Some(&r),
    )?;
    ensure(
        r.p(0.99) >= ms(100.0),
        "overload: queueing in the latency",
        Some(&r),
    )?;
    ensure(
        r.achieved_rate < 250.0,
        "overload: achieved rate is the server's",
        Some(&r),
    )?;

    // Closed loop against the same 5 ms server: 4 connections can complete at
    // most 800 exchanges a second, and do nearly that.
    let closed = |path: &'static str, connections: usize| {
        let t = Target {
            addr,
            request: raw_request("GET", path, &[], b""),
        };
        let (warmup, measured) = (Duration::from_millis(100), Duration::from_millis(500));
        async move { saturate(&t, connections, warmup, measured, Duration::from_secs(1)).await }
    };
    let s = closed("/delay", 4).await?;
    ensure(
        s.errors == 0 && s.non_2xx == 0 && (500.0..=820.0).contains(&s.rate),
        &format!("closed loop /delay: ~800/s from 4 connections, got {s:?}"),
        None,
    )?;
    let s = closed("/500", 2).await?;
    ensure(
        s.ok == 0 && s.non_2xx > 0 && s.errors == 0,
        &format!("closed loop /500: all non-2xx, got {s:?}"),
        None,
    )?;
    let s = closed("/truncated", 2).await?;
    ensure(
        s.ok == 0 && s.errors > 0,
        &format!("closed loop /truncated: all errors, got {s:?}"),
        None,
    )?;

    let r = load(addr, "/500", 200.0, 0.3, 4, false).await?;
    ensure(
        r.non_2xx == r.sent && r.latency.is_empty(),
        "/500: all non-2xx",
        Some(&r),
    )?;

    let r = load(addr, "/truncated", 200.0, 0.3, 4, false).await?;
    ensure(r.errors == r.sent, "/truncated: all errors", Some(&r))?;

    for path in ["/close", "/eof", "/split"] {
        let r = load(addr, path, 200.0, 0.3, 4, true).await?;
        ensure(
            r.ok == r.sent,
            &format!("{path}: every request ok"),
            Some(&r),
        )?;
    }
    Ok(())
}
