//! An open-loop HTTP/1.1 load generator, for comparing the gateway with a bare proxy
//! and with the upstream directly on loopback.
//!
//! Open loop, so that a slow system cannot slow the load down (coordinated omission):
//! request `i` is due at `t0 + i / rate` whatever the responses do. A dispatcher
//! releases due tickets; a fixed pool of persistent keep-alive connections (one tokio
//! task each, `TCP_NODELAY`) claims them. When every connection is busy a ticket waits,
//! and its latency includes the wait: latency runs from the ticket's *scheduled*
//! instant to the last byte of its response, never from the moment it was written.
//!
//! The dispatcher is a task woken by a Linux `timerfd` (nanosecond resolution, in the
//! runtime's own epoll set) rather than by `tokio::time::sleep_until`, whose 1 ms
//! wheel would add up to 1 ms — 0.5 ms on average — of the generator's own delay to
//! every latency. Each wake releases every ticket whose time has passed, so high
//! rates go out in batches, each ticket still measured from its own instant.
//! [`RunResult::send_lag`] shows how late tickets were written, i.e. how much of the
//! latency is the generator's. (Elsewhere than Linux a thread with
//! `std::thread::sleep` keeps the schedule.) Per request the generator allocates
//! nothing: the request is one shared `Bytes`, read buffers and timers are reused.
//!
//! The connections run on whatever runtime calls [`run`]; [`runtime`] builds a
//! current-thread one (enough for ~10k req/s) or one with a few workers.
//!
//! [`self_check`] tests the generator against a tiny in-process server; call it first.

// The bench programs that include this module need not use every item.
#![allow(dead_code)]

mod check;
mod parse;

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

pub use check::self_check;
use parse::{Parser, ReadBuf, Seen};

/// Largest value the histograms track, in µs; larger values are clamped to it.
const HIST_MAX_US: u64 = 60_000_000;
/// A ticket written this much after its scheduled instant counts as a late send.
pub const LATE_AFTER: Duration = Duration::from_millis(1);
/// Per-connection read buffer; a response head must fit in it.
const READ_BUF: usize = 32 * 1024;

/// What to load: an address and one complete HTTP/1.1 request, sent again and again.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect (plain TCP; no TLS).
    pub addr: SocketAddr,
    /// Complete raw request bytes (head and body), keep-alive; see [`raw_request`].
    pub request: Bytes,
}

/// One run at a fixed arrival rate.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Requests per second, scheduled evenly.
    pub rate_per_sec: f64,
    /// Measured period, after the warm-up.
    pub duration: Duration,
    /// Period before the measured one whose requests are sent but not counted.
    pub warmup: Duration,
    /// Persistent connections, opened before the first request.
    pub connections: usize,
    /// Record gaps between body chunks (time to first byte is always recorded).
    pub streaming: bool,
    /// A request not complete this long after its *scheduled* instant is an error (and
    /// one still unsent by then is dropped as an error); bounds the drain of a backlog.
    pub timeout: Duration,
}

impl RunSpec {
    /// `rate` for `duration` after a warm-up of a fifth of it (at most 1 s), on 64
    /// connections, non-streaming, with a 2 s timeout.
    pub fn new(rate_per_sec: f64, duration: Duration) -> Self {
        Self {
            rate_per_sec,
            duration,
            warmup: (duration / 5).min(Duration::from_secs(1)),
            connections: 64,
            streaming: false,
            timeout: Duration::from_secs(2),
        }
    }
}

/// What a run measured; counts and histograms cover only requests scheduled in the
/// measured period. Every such request is exactly one of `ok`, `non_2xx`, `errors`.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The requested rate.
    pub rate: f64,
    /// Requests scheduled in the measured period.
    pub sent: u64,
    /// Complete 2xx responses.
    pub ok: u64,
    /// Connect, write, parse or read errors, timeouts, and requests dropped unsent
    /// because their timeout had passed.
    pub errors: u64,
    /// Complete responses with a status other than 2xx.
    pub non_2xx: u64,
    /// `ok` responses per second, between the first and the last to complete (at most
    /// the requested rate; less when a backlog drained slower than the schedule).
    pub achieved_rate: f64,
    /// µs from the scheduled instant to the last byte of each `ok` response.
    pub latency: Histogram<u64>,
    /// µs from the scheduled instant to the first body byte of each `ok` response.
    pub ttfb: Histogram<u64>,
    /// µs between the arrivals of successive body chunks of `ok` responses (streaming
    /// only): HTTP chunks of chunked bodies, reads otherwise. Chunks arriving in the
    /// same read are 0 apart.
    pub chunk_gap: Histogram<u64>,
    /// µs from the scheduled instant to the moment the request was written.
    pub send_lag: Histogram<u64>,
    /// Requests written more than [`LATE_AFTER`] after their scheduled instant: every
    /// connection was busy (or the generator itself fell behind).
    pub late_sends: u64,
}

fn histogram() -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).map_err(|e| io::Error::other(format!("{e:?}")))
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl RunResult {
    fn empty(rate: f64) -> io::Result<Self> {
        Ok(Self {
            rate,
            sent: 0,
            ok: 0,
            errors: 0,
            non_2xx: 0,
            achieved_rate: 0.0,
            latency: histogram()?,
            ttfb: histogram()?,
            chunk_gap: histogram()?,
            send_lag: histogram()?,
            late_sends: 0,
        })
    }

    /// Latency at quantile `q` (0.0..=1.0), in µs; 0 with no `ok` response.
    pub fn p(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64
    }

    /// Whether every request got a complete 2xx response with p99 latency ≤ `limit`.
    pub fn passes(&self, p99_limit: Duration) -> bool {
        self.ok > 0 && self.errors == 0 && self.non_2xx == 0 && self.p(0.99) <= us(p99_limit) as f64
    }

    /// One line: counts, rates and quantiles (ms); TTFB and gaps when recorded.
    pub fn summary(&self) -> String {
        fn q(h: &Histogram<u64>, out: &mut String, name: &str) {
            let ms = |v: u64| v as f64 / 1000.0;
            let _ = write!(
                out,
                " | {name} ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
            );
        }
        let mut out = format!(
            "rate {:.0}/s achieved {:.1}/s sent {} ok {} non2xx {} errors {} late {}",
            self.rate,
            self.achieved_rate,
            self.sent,
            self.ok,
            self.non_2xx,
            self.errors,
            self.late_sends
        );
        q(&self.latency, &mut out, "latency");
        if !self.chunk_gap.is_empty() {
            q(&self.ttfb, &mut out, "ttfb");
            q(&self.chunk_gap, &mut out, "gap");
        }
        let _ = write!(
            out,
            " | send lag ms p99 {:.3}",
            self.send_lag.value_at_quantile(0.99) as f64 / 1000.0
        );
        out
    }
}

/// A complete HTTP/1.1 request. Adds `host: localhost`, `content-length` (when there is
/// a body or the method normally has one) and `connection: keep-alive`, each unless
/// `headers` already has it.
pub fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Bytes {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str("host: localhost\r\n");
    }
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let wants_length = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if wants_length && !has("content-length") && !has("transfer-encoding") {
        let _ = write!(head, "content-length: {}\r\n", body.len());
    }
    if !has("connection") {
        head.push_str("connection: keep-alive\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The benchmarks' chat completion body: the small prompt, or one of about
/// `prompt_bytes` when that is not 0, a 16-token answer, streamed or not.
pub fn chat_body(stream: bool, prompt_bytes: usize) -> Vec<u8> {
    let content = if prompt_bytes > 0 {
        "The quick brown fox jumps over the lazy dog. ".repeat(prompt_bytes / 45 + 1)
    } else {
        "Say hello to the benchmark.".to_owned()
    };
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}],
        "max_tokens": 16,
        "stream": stream,
    }))
    .unwrap_or_default()
}

/// `POST /v1/chat/completions` of `body` to `addr`, with `key` as the bearer
/// token when given and `extra` headers.
pub fn chat_target(
    addr: SocketAddr,
    key: Option<&str>,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Target {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    headers.extend_from_slice(extra);
    Target {
        addr,
        request: raw_request("POST", "/v1/chat/completions", &headers, body),
    }
}

/// A runtime for [`run`]: `worker_threads == 0` gives a current-thread runtime (the
/// frugal choice, enough for ~10k req/s), otherwise a multi-thread one with that many
/// workers.
pub fn runtime(worker_threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if worker_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .thread_name("loadgen")
            .enable_all()
            .build()
    }
}

/// The schedule shared by the dispatcher and the connections.
struct Schedule {
    t0: Instant,
    /// Nanoseconds between tickets.
    interval_ns: f64,
    /// Tickets in the whole run (warm-up and measured).
    total: u64,
    /// The first measured ticket.
    first_measured: u64,
}

impl Schedule {
    fn due(&self, i: u64) -> Instant {
        self.t0 + Duration::from_nanos((i as f64 * self.interval_ns) as u64)
    }
}

struct Shared {
    sched: Schedule,
    spec: RunSpec,
    /// Tickets `0..released` are due.
    released: AtomicU64,
    /// Tickets `0..claimed` have been taken by a connection.
    claimed: AtomicU64,
    /// Every ticket has been released (or the run was abandoned).
    done: AtomicBool,
    /// Set when [`run`] returns or is dropped: the timer thread (non-Linux) stops.
    stop: AtomicBool,
    /// Wakes idle connections when tickets are released.
    ready: Notify,
    stats: Mutex<Stats>,
}

struct Stats {
    result: RunResult,
    /// When the first and the last measured `ok` responses completed.
    ok_span: Option<(Instant, Instant)>,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_claim(&self) -> Option<u64> {
        let mut c = self.claimed.load(Ordering::Relaxed);
        loop {
            if c >= self.released.load(Ordering::Acquire) {
                return None;
            }
            match self
                .claimed
                .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(c),
                Err(now) => c = now,
            }
        }
    }

    /// The next due ticket, waiting for one; `None` once all have been taken.
    async fn claim(&self) -> Option<u64> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Register before checking, so a release in between is not missed.
            notified.as_mut().enable();
            if let Some(i) = self.try_claim() {
                return Some(i);
            }
            if self.done.load(Ordering::Acquire) {
                return self.try_claim();
            }
            notified.await;
        }
    }

    /// Release every ticket from `next` on that is due at `now`; returns the new `next`.
    fn release_due(&self, next: u64, now: Instant) -> u64 {
        let mut upto = next + 1;
        while upto < self.sched.total && self.sched.due(upto) <= now {
            upto += 1;
        }
        self.released.store(upto, Ordering::Release);
        for _ in 0..(upto - next).min(self.spec.connections as u64) {
            self.ready.notify_one();
        }
        upto
    }

    /// Every ticket is out (or the run is over): idle connections may exit.
    fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }
}

/// The dispatcher: a task on the run's own runtime, woken by a `timerfd` in its epoll
/// set, so a ticket costs no thread switch and fires within microseconds of its time.
#[cfg(target_os = "linux")]
async fn dispatch(shared: Arc<Shared>) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    use std::os::fd::AsFd;

    struct Finish<'a>(&'a Shared);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.finish();
        }
    }
    let _finish = Finish(&shared);
    let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags)?;
    // Tokio reads the timer through a duplicate of its descriptor: a pipe receiver is
    // just a non-blocking readable descriptor in the epoll set, which a timerfd is (and
    // unlike `AsyncFd` this needs no `unsafe`). Reads return 8 bytes once it expires.
    let mut expired = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(
        timer.as_fd().try_clone_to_owned()?,
    )?;
    let mut count = [0u8; 8];
    let mut next = 0;
    while next < shared.sched.total {
        let due = shared.sched.due(next);
        let now = Instant::now();
        if due <= now {
            next = shared.release_due(next, now);
            continue;
        }
        let wait = Expiration::OneShot(TimeSpec::from_duration(due - now));
        timer.set(wait, TimerSetTimeFlags::empty())?;
        expired.read_exact(&mut count).await?;
    }
    Ok(())
}

/// The dispatcher where there is no `timerfd`: a thread sleeping with
/// `std::thread::sleep`, waking the connections across threads.
#[cfg(not(target_os = "linux"))]
async fn dispatch(shared: Arc<Shared>) -> io::Result<()> {
    let thread = std::thread::Builder::new().name("loadgen-timer".to_owned());
    let timer = Arc::clone(&shared);
    let spawned = thread.spawn(move || {
        let mut next = 0;
        while next < timer.sched.total && !timer.stop.load(Ordering::Relaxed) {
            let due = timer.sched.due(next);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                next = timer.release_due(next, now);
            }
        }
        timer.finish();
    });
    if let Err(e) = spawned {
        shared.finish();
        return Err(e);
    }
    Ok(())
}

/// Stops the timer thread and the connections if [`run`] ends early (or is dropped).
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
        self.0.done.store(true, Ordering::Release);
        self.0.ready.notify_waiters();
    }
}

/// How one exchange ended.
struct Exchange {
    status: u16,
    first_byte: Option<Instant>,
    end: Instant,
}

/// One persistent connection and its reusable buffers.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: ReadBuf,
    parser: Parser,
    /// Arrival instants of body chunks of the current response (streaming only).
    chunks: Vec<Instant>,
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Conn {
    /// A connection that sends `request` (a `HEAD` has no body to read back).
    fn new(addr: SocketAddr, stream: TcpStream, request: &[u8]) -> Conn {
        Conn {
            addr,
            stream: Some(stream),
            buf: ReadBuf::new(READ_BUF),
            parser: Parser::new(request.starts_with(b"HEAD ")),
            chunks: Vec::new(),
        }
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// Write the request and read its whole response.
    async fn exchange(&mut self, request: &[u8], streaming: bool) -> io::Result<Exchange> {
        let stream = match self.stream.take() {
            Some(s) => s,
            None => connect(self.addr).await?,
        };
        let stream = self.stream.insert(stream);
        stream.write_all(request).await?;
        self.parser.start();
        self.chunks.clear();
        let mut first_byte = None;
        loop {
            let n = stream.read(self.buf.spare()?).await?;
            let now = Instant::now();
            if n == 0 {
                self.parser.eof()?;
            } else {
                self.buf.filled(n);
                let mut seen = Seen::default();
                let used = self.parser.advance(self.buf.data(), &mut seen)?;
                self.buf.consume(used);
                if seen.body_bytes && first_byte.is_none() {
                    first_byte = Some(now);
                }
                if streaming {
                    for _ in 0..seen.chunks {
                        self.chunks.push(now);
                    }
                }
            }
            if self.parser.is_done() {
                if self.parser.must_close() || !self.buf.is_empty() || n == 0 {
                    // Bytes after the response answer nothing we sent: start afresh.
                    self.drop_stream();
                }
                return Ok(Exchange {
                    status: self.parser.status(),
                    first_byte,
                    end: now,
                });
            }
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    request: Bytes,
    addr: SocketAddr,
    stream: TcpStream,
) -> io::Result<()> {
    let spec = &shared.spec;
    let mut conn = Conn::new(addr, stream, &request);
    // One timer per connection, moved to each request's deadline: a fresh
    // `timeout_at` per request would often be the earliest timer and make tokio wake
    // its driver (an eventfd write) on every request.
    let deadline_timer = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline_timer);
    while let Some(i) = shared.claim().await {
        let due = shared.sched.due(i);
        let deadline = due + spec.timeout;
        let measured = i >= shared.sched.first_measured;
        let sent_at = Instant::now();
        let outcome = if sent_at >= deadline {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "dropped: past its timeout unsent",
            ))
        } else {
            deadline_timer.as_mut().reset(deadline.into());
            tokio::select! {
                biased;
                r = conn.exchange(&request, spec.streaming) => r,
                () = &mut deadline_timer => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
            }
        };
        if outcome.is_err() {
            conn.drop_stream();
        }
        if !measured {
            continue;
        }
        let mut stats = shared.stats();
        let Stats { result, ok_span } = &mut *stats;
        result.sent += 1;
        let lag = sent_at.saturating_duration_since(due);
        result.send_lag.saturating_record(us(lag));
        if lag > LATE_AFTER {
            result.late_sends += 1;
        }
        match outcome {
            Err(_) => result.errors += 1,
            Ok(x) if !(200..300).contains(&x.status) => result.non_2xx += 1,
            Ok(x) => {
                result.ok += 1;
                *ok_span =
                    Some(ok_span.map_or((x.end, x.end), |(a, b)| (a.min(x.end), b.max(x.end))));
                result.latency.saturating_record(us(x.end - due));
                if let Some(fb) = x.first_byte {
                    result.ttfb.saturating_record(us(fb - due));
                }
                for pair in conn.chunks.windows(2) {
                    result.chunk_gap.saturating_record(us(pair[1] - pair[0]));
                }
            }
        }
    }
    Ok(())
}

/// Load `target` at `spec.rate_per_sec` for `spec.warmup + spec.duration` and measure.
/// Opens `spec.connections` connections first (an error if that fails); afterwards
/// failures are counted, the connection re-opened and the run goes on.
pub async fn run(target: &Target, spec: &RunSpec) -> io::Result<RunResult> {
    if !(spec.rate_per_sec > 0.0 && spec.rate_per_sec.is_finite()) || spec.connections == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rate must be positive and connections at least 1",
        ));
    }
    let mut streams = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        streams.push(connect(target.addr).await?);
    }
    let rate = spec.rate_per_sec;
    let tickets = |d: Duration| (d.as_secs_f64() * rate).ceil() as u64;
    let t0 = Instant::now() + Duration::from_millis(1);
    let shared = Arc::new(Shared {
        sched: Schedule {
            t0,
            interval_ns: 1e9 / rate,
            total: tickets(spec.warmup + spec.duration),
            first_measured: tickets(spec.warmup),
        },
        spec: spec.clone(),
        released: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ready: Notify::new(),
        stats: Mutex::new(Stats {
            result: RunResult::empty(rate)?,
            ok_span: None,
        }),
    });
    let guard = StopGuard(Arc::clone(&shared));
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        tasks.spawn(connection(
            Arc::clone(&shared),
            target.request.clone(),
            target.addr,
            stream,
        ));
    }
    tasks.spawn(dispatch(Arc::clone(&shared)));
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(io::Error::other)??;
    }
    drop(guard);
    let mut stats = shared.stats();
    let mut result = std::mem::replace(&mut stats.result, RunResult::empty(rate)?);
    if let Some((first, last)) = stats.ok_span.filter(|_| result.ok > 1) {
        let scheduled = Duration::from_secs_f64((result.sent - 1) as f64 / rate);
        let span = (last - first).max(scheduled);
        if !span.is_zero() {
            result.achieved_rate = (result.ok - 1) as f64 / span.as_secs_f64();
        }
    }
    Ok(result)
}

/// What a closed-loop run measured: counts cover responses completed in the
/// measured period only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Saturation {
    /// Complete 2xx responses per second of the measured period.
    pub rate: f64,
    /// Complete 2xx responses.
    pub ok: u64,
    /// Complete responses with a status other than 2xx.
    pub non_2xx: u64,
    /// Connect, write, parse or read errors and timeouts.
    pub errors: u64,
}

/// Closed loop: each of `connections` connections sends its next request as soon
/// as the previous response is complete, for `warmup` and then `duration`, and the
/// exchanges completed in `duration` are counted. This measures capacity, the rate
/// at which the system drains a standing queue, whatever the latency: unlike
/// [`run`] it has no schedule, so its latencies would hide queueing (coordinated
/// omission) and none are reported. A request not answered within `timeout` is an
/// error and its connection is re-opened.
pub async fn saturate(
    target: &Target,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
) -> io::Result<Saturation> {
    if connections == 0 || duration.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "connections and duration must be positive",
        ));
    }
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect(target.addr).await?);
    }
    let from = Instant::now() + warmup;
    let until = from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        let request = target.request.clone();
        let mut conn = Conn::new(target.addr, stream, &request);
        tasks.spawn(async move {
            let mut own = Saturation::default();
            let timer = tokio::time::sleep(timeout);
            tokio::pin!(timer);
            while Instant::now() < until {
                timer.as_mut().reset((Instant::now() + timeout).into());
                let outcome = tokio::select! {
                    biased;
                    r = conn.exchange(&request, false) => r,
                    () = &mut timer => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
                };
                if outcome.is_err() {
                    conn.drop_stream();
                }
                let end = Instant::now();
                if end < from || end >= until {
                    continue;
                }
                match outcome {
                    Err(_) => own.errors += 1,
                    Ok(x) if !(200..300).contains(&x.status) => own.non_2xx += 1,
                    Ok(_) => own.ok += 1,
                }
            }
            own
        });
    }
    let mut total = Saturation::default();
    while let Some(joined) = tasks.join_next().await {
        let own = joined.map_err(io::Error::other)?;
        total.ok += own.ok;
        total.non_2xx += own.non_2xx;
        total.errors += own.errors;
    }
    total.rate = total.ok as f64 / duration.as_secs_f64();
    Ok(total)
}

/// The highest rate (req/s) whose run passes [`RunResult::passes`] (p99 ≤ `p99_limit`,
/// no errors, no non-2xx): doubles from `start` (or halves, if `start` fails) until a
/// passing and a failing rate are found, then bisects until they are within
/// `precision` (a fraction of the passing rate). Each probe measures for `probe` after
/// a warm-up of a fifth of it (at most 1 s), on `connections` connections.
pub async fn find_max_rate(
    target: &Target,
    start: f64,
    p99_limit: Duration,
    precision: f64,
    probe: Duration,
    connections: usize,
) -> io::Result<(f64, RunResult)> {
    const MAX_RATE: f64 = 1e7;
    const MIN_RATE: f64 = 1.0;
    let spec = |rate: f64| RunSpec {
        connections,
        timeout: (p99_limit * 50).clamp(Duration::from_secs(1), Duration::from_secs(10)),
        ..RunSpec::new(rate, probe)
    };
    let mut pass: Option<(f64, RunResult)> = None;
    let mut fail: Option<f64> = None;
    let mut rate = start.max(MIN_RATE);
    loop {
        let result = probe_twice(target, &spec(rate), p99_limit).await?;
        if result.passes(p99_limit) {
            pass = Some((rate, result));
            if fail.is_some() || rate * 2.0 > MAX_RATE {
                break;
            }
            rate *= 2.0;
        } else {
            fail = Some(rate);
            if pass.is_some() {
                break;
            }
            rate /= 2.0;
            if rate < MIN_RATE {
                return Err(io::Error::other(format!(
                    "no rate down to {MIN_RATE}/s has p99 <= {p99_limit:?} without errors: {}",
                    result.summary()
                )));
            }
        }
    }
    let Some(mut best) = pass else {
        return Err(io::Error::other("no passing rate"));
    };
    if let Some(mut hi) = fail {
        while (hi - best.0) / best.0 > precision {
            let mid = (best.0 + hi) / 2.0;
            let result = probe_twice(target, &spec(mid), p99_limit).await?;
            if result.passes(p99_limit) {
                best = (mid, result);
            } else {
                hi = mid;
            }
        }
    }
    Ok(best)
}

/// A rate fails only if two probes in a row fail: on a shared 2-core machine one
/// stray p99 spike would otherwise end the search far below the real maximum.
async fn probe_twice(
    target: &Target,
    spec: &RunSpec,
    p99_limit: Duration,
) -> io::Result<RunResult> {
    let first = probe_run(target, spec).await?;
    if first.passes(p99_limit) {
        return Ok(first);
    }
    probe_run(target, spec).await
}

/// One probe of [`find_max_rate`], then a pause for the system to settle (sockets of
/// the probe closing, queues draining).
async fn probe_run(target: &Target, spec: &RunSpec) -> io::Result<RunResult> {
    let result = run(target, spec).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(result)
}
