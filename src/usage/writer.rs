//! The bounded usage queue and the thread that drains it into the store.
//!
//! The writer runs on its own OS thread with its own single-threaded runtime, not
//! on a Pingora runtime: Pingora drops its runtimes' tasks at shutdown, and the last
//! records must still be flushed after the proxy has stopped. Shutdown is "drop every
//! sink, then [`UsageWriter::shutdown`]": the writer drains what is queued, writes it
//! and exits.
//!
//! Failure policy: a batch the store refuses (or does not answer within
//! `STORE_CALL_TIMEOUT`) goes to the disk [`Spool`] at once, so the memory queue
//! keeps draining while the database is away. While the store is failing, new
//! batches go straight to the spool and one replay attempt probes the store per
//! backoff step (50 ms doubling to 5 s); the first success marks it healthy and the
//! spool is replayed in the background of normal writes. Rows are keyed by
//! `request_id`, so a batch replayed after an uncertain commit cannot duplicate.
//! Records are lost only when the queue is full or the spool is at its bound, and
//! each is counted in `ai4free_usage_records_dropped_total`. What is still spooled
//! at shutdown stays on disk and is replayed by the next start.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::spool::{Spool, SpoolError};
use super::UsageRecord;
use crate::config::UsageSettings;
use crate::metrics;
use crate::store::{Store, StoreError};

/// The producer side, cloned into the proxy. `record` never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
}

impl UsageSink {
    /// Queues a record; returns false (and counts a drop) when the queue is full or closed.
    pub fn record(&self, record: UsageRecord) -> bool {
        let ok = self.tx.try_send(record).is_ok();
        if !ok {
            metrics::USAGE_RECORDS_DROPPED.inc();
        }
        metrics::USAGE_QUEUE_DEPTH.set(self.depth() as i64);
        ok
    }

    /// Records currently queued.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Handle to the writer thread.
pub struct UsageWriter {
    thread: Option<JoinHandle<WriterStats>>,
    close: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What the writer did over its lifetime (returned at shutdown, used by tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Rows the store committed (directly or replayed from the spool).
    pub written: u64,
    /// Times the store went from healthy to failing.
    pub outages: u64,
    /// Rows put in the spool.
    pub spooled: u64,
    /// Rows replayed from the spool into the store.
    pub replayed: u64,
    /// Rows lost because the spool refused them (full or failing).
    pub dropped: u64,
    /// Bytes still spooled at exit (replayed by the next start).
    pub spool_bytes_left: u64,
}

impl UsageWriter {
    /// Starts the writer thread and returns the sink the proxy records into.
    /// Rows left in the spool by an earlier run are replayed first.
    pub fn spawn(
        store: Arc<dyn Store>,
        settings: &UsageSettings,
        spool_dir: &Path,
    ) -> Result<(UsageSink, UsageWriter), SpoolError> {
        let spool = Spool::open(
            spool_dir,
            settings.spool_max_bytes,
            settings.spool_fsync_interval,
        )?;
        if !spool.is_empty() {
            log::info!(
                "usage spool holds {} bytes from an earlier run; replaying",
                spool.pending_bytes()
            );
        }
        let io_err = |source| SpoolError::Io {
            dir: spool_dir.display().to_string(),
            source,
        };
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let batch = settings.batch_size.max(1);
        let interval = settings.flush_interval;
        let nice = settings.writer_nice;
        // The runtime's blocking threads run the SQLite calls: they get the
        // writer's priority too.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(move || lower_priority(nice))
            .build()
            .map_err(io_err)?;
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let writer = Writer::new(store, spool);
        let thread = std::thread::Builder::new()
            .name("ai4free-usage".into())
            .spawn(move || {
                lower_priority(nice);
                rt.block_on(run(writer, rx, close_rx, batch, interval))
            })
            .map_err(io_err)?;
        Ok((
            UsageSink { tx },
            UsageWriter {
                thread: Some(thread),
                close: Some(close_tx),
            },
        ))
    }

    /// Closes the queue (later `record` calls fail and are counted), writes what is
    /// queued, and waits for the writer to exit.
    pub fn shutdown(mut self) -> WriterStats {
        if let Some(c) = self.close.take() {
            // An error means the writer already exited; joining below still works.
            let _ = c.send(());
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// How long replay may run at shutdown before leaving the rest for the next start.
const SHUTDOWN_REPLAY: Duration = Duration::from_secs(5);
/// A safety net over the store's own timeouts: a call that has not returned by then
/// is treated as failed (the batch is spooled; a late commit is deduplicated).
const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

async fn run(
    mut w: Writer,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut close: tokio::sync::oneshot::Receiver<()>,
    batch: usize,
    interval: Duration,
) -> WriterStats {
    let mut buf: Vec<UsageRecord> = Vec::with_capacity(batch);
    let mut closing = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The writer drains on a timer instead of waiting on the channel: a receiver
        // parked in `recv` is woken (an eventfd write and a context switch) by every
        // single send, which under load cost more than the inserts themselves.
        if !closing {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut close => {
                    // Closing the receiver refuses new sends but keeps what is queued.
                    closing = true;
                    rx.close();
                }
            }
        }
        // Write what was queued when the tick fired, and no more: draining until
        // the queue is empty would chase the rows that arrive during each write,
        // turning one batch per tick into a stream of small transactions, each
        // rewriting the same B-tree pages, under load. At shutdown, everything.
        let mut due = if closing { usize::MAX } else { rx.len() };
        loop {
            while buf.len() < batch && due > 0 {
                match rx.try_recv() {
                    Ok(r) => {
                        buf.push(r);
                        due -= 1;
                    }
                    Err(_) => break,
                }
            }
            metrics::USAGE_QUEUE_DEPTH.set(rx.len() as i64);
            if buf.is_empty() {
                break;
            }
            w.store
                .set_yield_between_statements(keeping_up(rx.len(), rx.max_capacity()));
            // Moved, not cloned, into the shared batch the store takes.
            w.store_batch(buf.drain(..).collect()).await;
        }
        w.replay(interval).await;
        w.sync_spool(false);
        // Also stop once every sink is gone and nothing is left.
        if closing || (rx.is_closed() && rx.is_empty()) {
            break;
        }
    }
    w.finish().await
}

/// Whether the writer is keeping up: fewer than an eighth of the queue's
/// capacity still waiting. While it is, its SQLite batches yield the core
/// between statements so that the proxy threads waking on it do not wait out
/// the writer's slice; once the queue backs up they stop yielding, since a
/// yield also costs the writer the rest of its slice and, under saturation,
/// the share it needs (yielding always, a saturated gateway dropped 155,303 of
/// 1.09M rows). A tick's rows at ~30k req/s are ~6k, so a writer that keeps up
/// stays under the default 65,536 / 8.
fn keeping_up(queued: usize, capacity: usize) -> bool {
    queued < capacity / 8
}

/// Gives the calling thread the scheduling priority `nice`. The writer's work
/// comes in bursts (a tick's rows in one transaction); at the proxy's own
/// priority a burst holds a core the proxy threads then queue behind, which is
/// what set the gateway's p99. Niced (10 by default), it gets about a tenth of
/// a busy core against one proxy thread, and still the whole of an idle one.
/// Nice does not shorten the slice the scheduler lets it finish once picked,
/// hence [`keeping_up`]. Linux applies the value to the thread alone.
fn lower_priority(nice: u8) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), i32::from(nice)) {
            log::warn!("usage writer: cannot set nice {nice}: {e}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// The writer thread's state: the store, the spool and the store's health.
struct Writer {
    store: Arc<dyn Store>,
    spool: Spool,
    stats: WriterStats,
    healthy: bool,
    retry_at: Instant,
    backoff: Duration,
    spool_failing: bool,
}

impl Writer {
    fn new(store: Arc<dyn Store>, spool: Spool) -> Writer {
        metrics::USAGE_SPOOL_BYTES.set(spool.pending_bytes() as i64);
        Writer {
            store,
            spool,
            stats: WriterStats::default(),
            healthy: true,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            spool_failing: false,
        }
    }

    async fn insert(&self, rows: Arc<[UsageRecord]>) -> Result<(), StoreError> {
        let started = Instant::now();
        let n = rows.len() as u64;
        let res =
            match tokio::time::timeout(STORE_CALL_TIMEOUT, self.store.insert_usage(rows)).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Database("usage insert timed out".into())),
            };
        match &res {
            Ok(()) => {
                metrics::USAGE_FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
                metrics::USAGE_RECORDS_WRITTEN.inc_by(n);
            }
            Err(_) => metrics::USAGE_WRITE_ERRORS.inc(),
        }
        res
    }

    /// Writes a fresh batch, or spools it when the store is failing.
    async fn store_batch(&mut self, rows: Arc<[UsageRecord]>) {
        if self.healthy {
            match self.insert(rows.clone()).await {
                Ok(()) => {
                    self.stats.written += rows.len() as u64;
                    return;
                }
                Err(e) => self.failed(&e),
            }
        }
        self.spool_rows(&rows);
    }

    fn spool_rows(&mut self, rows: &[UsageRecord]) {
        match self.spool.append(rows) {
            Ok(()) => {
                self.stats.spooled += rows.len() as u64;
                metrics::USAGE_RECORDS_SPOOLED.inc_by(rows.len() as u64);
                if self.spool_failing {
                    self.spool_failing = false;
                    log::info!("usage spool accepts rows again");
                }
            }
            Err(e) => {
                self.stats.dropped += rows.len() as u64;
                metrics::USAGE_RECORDS_DROPPED.inc_by(rows.len() as u64);
                if !self.spool_failing {
                    self.spool_failing = true;
                    log::error!(
                        "usage rows LOST: the store is failing and the spool refused them: {e}"
                    );
                }
            }
        }
        metrics::USAGE_SPOOL_BYTES.set(self.spool.pending_bytes() as i64);
    }

    fn failed(&mut self, e: &StoreError) {
        if self.healthy {
            self.healthy = false;
            self.stats.outages += 1;
            log::warn!("usage store failing, spooling rows to disk: {e}");
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Replays spooled batches for up to `budget` once a retry is due.
    async fn replay(&mut self, budget: Duration) {
        if self.spool.is_empty() || Instant::now() < self.retry_at {
            return;
        }
        let started = Instant::now();
        loop {
            let mut batch = match self.spool.peek() {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    log::error!("usage spool unreadable: {e}");
                    self.retry_at = Instant::now() + BACKOFF_MAX;
                    break;
                }
            };
            let n = batch.rows.len() as u64;
            match self.insert(std::mem::take(&mut batch.rows).into()).await {
                Ok(()) => {
                    self.stats.written += n;
                    self.stats.replayed += n;
                    metrics::USAGE_RECORDS_REPLAYED.inc_by(n);
                    if let Err(e) = self.spool.ack(&batch) {
                        log::error!("usage spool: cannot retire a replayed batch: {e}");
                    }
                    if !self.healthy {
                        self.healthy = true;
                        log::info!(
                            "usage store is back; replaying {} spooled bytes",
                            self.spool.pending_bytes()
                        );
                    }
                    self.backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    self.failed(&e);
                    break;
                }
            }
            metrics::USAGE_SPOOL_BYTES.set(self.spool.pending_bytes() as i64);
            if started.elapsed() >= budget {
                break;
            }
        }
        metrics::USAGE_SPOOL_BYTES.set(self.spool.pending_bytes() as i64);
    }

    fn sync_spool(&mut self, now: bool) {
        let res = if now {
            self.spool.sync()
        } else {
            self.spool.sync_if_due()
        };
        if let Err(e) = res {
            log::error!("usage spool fsync failed: {e}");
        }
    }

    /// At shutdown: one last replay if the store answers, then make the spool durable.
    async fn finish(mut self) -> WriterStats {
        if !self.spool.is_empty() {
            self.retry_at = Instant::now();
            self.replay(SHUTDOWN_REPLAY).await;
        }
        self.sync_spool(true);
        self.stats.spool_bytes_left = self.spool.pending_bytes();
        if self.stats.spool_bytes_left > 0 {
            log::warn!(
                "usage store unavailable at shutdown: {} bytes of rows stay spooled for the next start",
                self.stats.spool_bytes_left
            );
        }
        metrics::USAGE_QUEUE_DEPTH.set(0);
        self.stats
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::keys::KeyRecord;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{
        AuditEntry, AuditPage, AuditQuery, KeyFilter, KeyPage, KeyPatch, ReportRow, RollupQuery,
        RollupRow, UsageQuery,
    };
    use crate::usage::TokenSource;

    /// An in-memory SQLite store whose usage inserts fail while `down` is set.
    struct Flaky {
        inner: SqliteStore,
        down: AtomicBool,
        calls: AtomicU64,
        /// How long each usage insert takes, in ms.
        delay_ms: AtomicU64,
        /// The yield switch as the writer last set it before each insert.
        yields: parking_lot::Mutex<Vec<bool>>,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn migrate(&self) -> Result<(), StoreError> {
            self.inner.migrate().await
        }
        async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
            self.inner.insert_key(key).await
        }
        async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.get_key(id).await
        }
        async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
            self.inner.list_keys().await
        }
        async fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
            self.inner.revoke_key(id, at_ms).await
        }
        async fn keys_changed_since(&self, rev: i64) -> Result<Vec<KeyRecord>, StoreError> {
            self.inner.keys_changed_since(rev).await
        }
        async fn max_key_rev(&self) -> Result<i64, StoreError> {
            self.inner.max_key_rev().await
        }
        fn set_yield_between_statements(&self, on: bool) {
            self.yields.lock().push(on);
            self.inner.set_yield_between_statements(on);
        }
        async fn insert_usage(&self, rows: Arc<[UsageRecord]>) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let delay = self.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::Database("connection refused".into()));
            }
            self.inner.insert_usage(rows).await
        }
        async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError> {
            self.inner.query_usage(q).await
        }
        async fn usage_report(&self, q: &UsageQuery) -> Result<Vec<ReportRow>, StoreError> {
            self.inner.usage_report(q).await
        }
        async fn update_key(
            &self,
            id: &str,
            patch: &KeyPatch,
        ) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.update_key(id, patch).await
        }
        async fn rotate_key(
            &self,
            id: &str,
            new_hash: &[u8; 32],
            grace_until_ms: Option<i64>,
        ) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.rotate_key(id, new_hash, grace_until_ms).await
        }
        async fn touch_keys(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
            self.inner.touch_keys(uses).await
        }
        async fn find_keys(
            &self,
            filter: &KeyFilter,
            limit: usize,
            cursor: Option<&str>,
        ) -> Result<KeyPage, StoreError> {
            self.inner.find_keys(filter, limit, cursor).await
        }
        async fn insert_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
            self.inner.insert_audit(entry).await
        }
        async fn list_audit(
            &self,
            q: &AuditQuery,
            limit: usize,
            cursor: Option<&str>,
        ) -> Result<AuditPage, StoreError> {
            self.inner.list_audit(q, limit, cursor).await
        }
        async fn usage_rollup(&self, q: &RollupQuery) -> Result<Vec<RollupRow>, StoreError> {
            self.inner.usage_rollup(q).await
        }
    }

    fn flaky(down: bool) -> Arc<Flaky> {
        let inner = SqliteStore::open(Path::new(":memory:")).unwrap();
        let s = Arc::new(Flaky {
            inner,
            down: AtomicBool::new(down),
            calls: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            yields: parking_lot::Mutex::new(Vec::new()),
        });
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(s.migrate())
            .unwrap();
        s
    }

    fn settings(max_bytes: u64) -> UsageSettings {
        UsageSettings {
            queue_capacity: 10_000,
            batch_size: 50,
            flush_interval: Duration::from_millis(5),
            spool_dir: None,
            spool_max_bytes: max_bytes,
            spool_fsync_interval: Duration::from_millis(20),
            writer_nice: 0,
        }
    }

    fn rec(i: usize) -> UsageRecord {
        UsageRecord {
            request_id: format!("r{i:06}").into(),
            key_id: "k".into(),
            model: "m".into(),
            provider: "p".into(),
            endpoint: "chat".into(),
            prompt_tokens: 1,
            cached_prompt_tokens: 0,
            completion_tokens: 2,
            cost_pusd: 3,
            input_price_micros: 1,
            output_price_micros: 1,
            status: 200,
            stream: false,
            token_source: TokenSource::Provider,
            started_at_ms: i as i64,
            latency_ms: 1,
            ttfb_ms: None,
            error: None,
        }
    }

    fn stored(s: &Flaky) -> Vec<String> {
        let rows = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(s.inner.query_usage(&UsageQuery::default()))
            .unwrap();
        rows.into_iter().map(|r| r.request_id.into()).collect()
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "condition never held"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Under steady load the writer makes one write per tick. Draining until
    /// the queue is empty would chase the rows that arrive during each write:
    /// here, a write after every 20 ms insert, ~30 instead of ~7.
    #[test]
    fn one_write_per_tick_under_steady_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(false);
        store.delay_ms.store(20, Ordering::Relaxed);
        let settings = UsageSettings {
            batch_size: 10_000,
            flush_interval: Duration::from_millis(100),
            ..settings(1 << 30)
        };
        let (sink, writer) = UsageWriter::spawn(store.clone(), &settings, dir.path()).unwrap();
        let started = Instant::now();
        for i in 0..600 {
            assert!(sink.record(rec(i)));
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_until(|| stored(&store).len() == 600);
        let ticks = started.elapsed().as_millis() / 100 + 1;
        let writes = u128::from(store.calls.load(Ordering::Relaxed));
        assert!(writes <= ticks + 1, "{writes} writes in {ticks} ticks");
        drop(sink);
        assert_eq!(writer.shutdown().written, 600);
    }

    /// The SQLite batches yield between statements while the writer keeps up,
    /// and stop once its queue backs up past an eighth of its capacity.
    #[test]
    fn batches_yield_the_core_only_while_the_queue_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(false);
        let settings = UsageSettings {
            queue_capacity: 800,
            batch_size: 10,
            flush_interval: Duration::from_millis(20),
            ..settings(1 << 30)
        };
        let (sink, writer) = UsageWriter::spawn(store.clone(), &settings, dir.path()).unwrap();
        // A few rows at a time: the queue never holds 100 (800 / 8).
        for i in 0..30 {
            assert!(sink.record(rec(i)));
        }
        wait_until(|| stored(&store).len() == 30);
        let yields = store.yields.lock().clone();
        assert!(yields.iter().all(|&y| y), "{yields:?}");
        // 500 rows queued at once: the tick's first batches are written with
        // more than 100 still waiting, its last ones with fewer.
        store.yields.lock().clear();
        for i in 30..530 {
            assert!(sink.record(rec(i)));
        }
        wait_until(|| stored(&store).len() == 530);
        let yields = store.yields.lock().clone();
        assert!(yields.contains(&false), "{yields:?}");
        assert_eq!(yields.last(), Some(&true), "{yields:?}");
        drop(sink);
        assert_eq!(writer.shutdown().dropped, 0);
    }

    #[test]
    fn outage_spools_and_replays_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(false);
        let (sink, writer) =
            UsageWriter::spawn(store.clone(), &settings(1 << 30), dir.path()).unwrap();
        for i in 0..100 {
            assert!(sink.record(rec(i)));
        }
        wait_until(|| stored(&store).len() == 100);
        store.down.store(true, Ordering::Relaxed);
        for i in 100..600 {
            assert!(sink.record(rec(i)));
        }
        // The queue keeps draining into the spool while the store is down, and the
        // store is probed with backoff rather than once per batch.
        wait_until(|| sink.depth() == 0);
        std::thread::sleep(Duration::from_millis(200));
        let probes = store.calls.load(Ordering::Relaxed);
        assert!(probes < 30, "{probes} store calls during a 200 ms outage");
        assert_eq!(stored(&store).len(), 100);
        store.down.store(false, Ordering::Relaxed);
        for i in 600..700 {
            assert!(sink.record(rec(i)));
        }
        wait_until(|| stored(&store).len() == 700);
        drop(sink);
        let stats = writer.shutdown();
        let mut ids = stored(&store);
        ids.dedup();
        assert_eq!(ids.len(), 700);
        assert_eq!(stats.written, 700);
        assert!(stats.spooled >= 500, "{stats:?}");
        assert_eq!(stats.replayed, stats.spooled);
        assert_eq!(stats.dropped, 0);
        assert_eq!(stats.spool_bytes_left, 0);
        assert!(stats.outages >= 1);
    }

    #[test]
    fn rows_spooled_at_shutdown_are_replayed_by_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(true);
        let (sink, writer) =
            UsageWriter::spawn(store.clone(), &settings(1 << 30), dir.path()).unwrap();
        for i in 0..250 {
            assert!(sink.record(rec(i)));
        }
        drop(sink);
        let stats = writer.shutdown();
        assert_eq!(stats.written, 0);
        assert_eq!(stats.spooled, 250);
        assert_eq!(stats.dropped, 0);
        assert!(stats.spool_bytes_left > 0);
        // The next run (the database is back) replays before anything else.
        store.down.store(false, Ordering::Relaxed);
        let (sink, writer) =
            UsageWriter::spawn(store.clone(), &settings(1 << 30), dir.path()).unwrap();
        wait_until(|| stored(&store).len() == 250);
        drop(sink);
        let stats = writer.shutdown();
        assert_eq!(stats.replayed, 250);
        assert_eq!(stats.spool_bytes_left, 0);
    }

    /// `(name, nice)` of every thread of this process.
    #[cfg(target_os = "linux")]
    fn thread_nices() -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let (Ok(comm), Ok(stat)) = (
                std::fs::read_to_string(task.path().join("comm")),
                std::fs::read_to_string(task.path().join("stat")),
            ) else {
                continue; // the thread exited meanwhile
            };
            // Fields after the parenthesized name start at field 3; nice is field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let nice = rest.split(' ').nth(16).unwrap().parse().unwrap();
            out.push((comm.trim().to_owned(), nice));
        }
        out
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_and_its_store_threads_run_niced() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(false);
        // No other test uses this value, so every thread at 7 is this writer's.
        let settings = UsageSettings {
            writer_nice: 7,
            ..settings(1 << 30)
        };
        let (sink, writer) = UsageWriter::spawn(store.clone(), &settings, dir.path()).unwrap();
        for i in 0..20 {
            assert!(sink.record(rec(i)));
        }
        wait_until(|| stored(&store).len() == 20);
        // SQLite ran on the runtime's blocking pool, whose threads idle for 10 s
        // before they exit: both kinds of thread are there to look at.
        let niced: Vec<_> = thread_nices().into_iter().filter(|t| t.1 == 7).collect();
        assert!(niced.iter().any(|t| t.0 == "ai4free-usage"), "{niced:?}");
        assert!(niced.iter().any(|t| t.0 != "ai4free-usage"), "{niced:?}");
        drop(sink);
        writer.shutdown();
    }

    #[test]
    fn a_full_spool_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(true);
        let before = metrics::USAGE_RECORDS_DROPPED.get();
        // 1 MiB holds a few thousand rows; offer more than fit.
        let (sink, writer) =
            UsageWriter::spawn(store.clone(), &settings(1 << 20), dir.path()).unwrap();
        let offered = 8_000;
        for i in 0..offered {
            assert!(sink.record(rec(i)));
            if (i + 1).is_multiple_of(1000) {
                wait_until(|| sink.depth() == 0);
            }
        }
        drop(sink);
        let stats = writer.shutdown();
        assert!(stats.dropped > 0, "{stats:?}");
        assert_eq!(stats.spooled + stats.dropped, offered as u64);
        assert!(stats.spool_bytes_left <= 1 << 20);
        assert!(metrics::USAGE_RECORDS_DROPPED.get() - before >= stats.dropped);
    }
}
