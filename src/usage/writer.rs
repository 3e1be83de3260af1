//! The bounded usage queue and the thread that drains it into the store.
//!
//! The writer runs on its own OS thread with its own single-threaded runtime, not
//! on a Pingora runtime: Pingora drops its runtimes' tasks at shutdown, and the last
//! records must still be flushed after the proxy has stopped. Shutdown is "drop every
//! sink, then [`UsageWriter::shutdown`]": the writer drains what is queued, writes it
//! and exits.
//!
//! Failure policy: a failed batch is retried with capped exponential backoff and is
//! never split or reordered; rows are keyed by `request_id`, so a batch replayed
//! after an uncertain commit cannot duplicate. While a batch is being retried the
//! queue keeps filling; when it is full new records are dropped and counted. At
//! shutdown retries stop after `shutdown_retry` and what is left is reported.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use super::UsageRecord;
use crate::config::UsageSettings;
use crate::metrics;
use crate::store::Store;

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
    /// Rows handed to the store successfully.
    pub written: u64,
    /// Batches that failed at least once.
    pub failed_batches: u64,
    /// Rows given up on at shutdown because the store stayed unavailable.
    pub abandoned: u64,
}

impl UsageWriter {
    /// Starts the writer thread and returns the sink the proxy records into.
    pub fn spawn(
        store: Arc<dyn Store>,
        settings: &UsageSettings,
    ) -> std::io::Result<(UsageSink, UsageWriter)> {
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let batch = settings.batch_size.max(1);
        let interval = settings.flush_interval;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("ai4free-usage".into())
            .spawn(move || rt.block_on(run(store, rx, close_rx, batch, interval)))?;
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

const SHUTDOWN_RETRY: Duration = Duration::from_secs(5);

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut close: tokio::sync::oneshot::Receiver<()>,
    batch: usize,
    interval: Duration,
) -> WriterStats {
    let mut stats = WriterStats::default();
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
        loop {
            while buf.len() < batch {
                match rx.try_recv() {
                    Ok(r) => buf.push(r),
                    Err(_) => break,
                }
            }
            metrics::USAGE_QUEUE_DEPTH.set(rx.len() as i64);
            if buf.is_empty() {
                break;
            }
            write_with_retry(store.as_ref(), &buf, &rx, &mut stats).await;
            buf.clear();
        }
        // Also stop once every sink is gone and nothing is left.
        if closing || (rx.is_closed() && rx.is_empty()) {
            break;
        }
    }
    metrics::USAGE_QUEUE_DEPTH.set(0);
    stats
}

async fn write_with_retry(
    store: &dyn Store,
    rows: &[UsageRecord],
    rx: &mpsc::Receiver<UsageRecord>,
    stats: &mut WriterStats,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failed_once = false;
    let mut closed_since: Option<tokio::time::Instant> = None;
    loop {
        let started = std::time::Instant::now();
        match store.insert_usage(rows).await {
            Ok(()) => {
                metrics::USAGE_FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
                metrics::USAGE_RECORDS_WRITTEN.inc_by(rows.len() as u64);
                stats.written += rows.len() as u64;
                return;
            }
            Err(e) => {
                metrics::USAGE_WRITE_ERRORS.inc();
                if !failed_once {
                    failed_once = true;
                    stats.failed_batches += 1;
                    log::warn!("usage write of {} rows failed, retrying: {e}", rows.len());
                }
            }
        }
        if rx.is_closed() {
            let since = *closed_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= SHUTDOWN_RETRY {
                stats.abandoned += rows.len() as u64;
                metrics::USAGE_RECORDS_DROPPED.inc_by(rows.len() as u64);
                log::error!(
                    "store unavailable at shutdown: {} usage rows not written",
                    rows.len()
                );
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
