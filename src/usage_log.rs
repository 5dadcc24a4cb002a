//! The usage writer: request tasks hand [`UsageRecord`]s to a bounded queue; one background
//! task writes them to the store in batches, off the request path.
//!
//! [`UsageWriter::record`] never blocks and never fails its caller: it is a `try_send` on a
//! tokio channel, which works from any thread or runtime (every worker thread runs its own).
//! When the queue is full the record is dropped and counted ([`UsageWriter::dropped`],
//! `portcullis_usage_records_dropped_total{reason="queue_full"}`); the writer task logs a
//! warning about drops at most once per flush interval, so request threads never log.
//!
//! The task takes what is queued every 5 ms (polling: a task parked on the queue would cost
//! every request a cross-thread wake-up, which measured about a fifth of the gateway's CPU
//! per request at 64 connections), and writes a batch when it holds `batch_size` records, or
//! at each `flush_interval` tick when it holds any. A batch is one transaction ([`UsageStore::insert_usage`]); a
//! failed insert is retried `max_retries` times with doubling backoff, then the batch is
//! dropped with one log line and counted (`reason="store_error"`). Records hold no prompt
//! text, so nothing secret is logged either way. A transaction whose commit succeeded but
//! whose answer was lost is retried too: in that rare case a batch is stored twice.
//!
//! [`UsageWriter::flush_and_stop`] (graceful shutdown) closes the queue and writes
//! everything in it. If the store fails during that drain, the failing batch gets its
//! retries and the rest is dropped at once, so shutdown waits for one batch's retries at
//! most.
//!
//! **Worst-case loss on a crash** (the process killed, no `flush_and_stop`): everything
//! queued plus the batch being assembled or in flight — at most `capacity + batch_size`
//! records; in steady state, when the store keeps up, about `flush_interval` × request
//! rate (the records since the last write). A batch cut off mid-transaction is rolled
//! back whole, never half-written.
//!
//! Start the writer on the runtime that runs the gateway's background tasks (the one
//! `app::start` runs on, where the API-key poller lives), never on a worker's runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::metrics::{Metrics, UsageDropLabels};
use crate::store::{UsageRecord, UsageStore};

/// How often the task moves queued records into its batch (or the flush interval, if shorter).
const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// Longest wait between two attempts at one batch.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How the writer queues and batches.
#[derive(Debug, Clone)]
pub struct UsageWriterOptions {
    /// Records the queue holds (at least 1); more are dropped. Default 10,000.
    pub capacity: usize,
    /// Records per insert (at least 1). Default 1,000.
    pub batch_size: usize,
    /// A partial batch is written at every tick of this interval (at least 1 ms), and drops
    /// are logged at most this often. Default 1 s.
    pub flush_interval: Duration,
    /// Attempts after the first before a batch is dropped. Default 4.
    pub max_retries: u32,
    /// Wait before the first retry, doubled for each next one (at most 10 s). Default 250 ms.
    pub retry_backoff: Duration,
}

impl Default for UsageWriterOptions {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            batch_size: 1_000,
            flush_interval: Duration::from_secs(1),
            max_retries: 4,
            retry_backoff: Duration::from_millis(250),
        }
    }
}

/// Prometheus counters the writer keeps up to date (handles to shared series).
#[derive(Debug, Clone, Default)]
pub struct UsageCounters {
    /// `portcullis_usage_records_written_total`.
    pub written: Counter,
    /// `portcullis_usage_records_dropped_total{reason="queue_full"}`.
    pub dropped_queue_full: Counter,
    /// `portcullis_usage_records_dropped_total{reason="store_error"}`.
    pub dropped_store_error: Counter,
}

impl UsageCounters {
    /// The gateway's series (created now, so they read 0 before the first record).
    pub fn from_metrics(metrics: &Metrics) -> Self {
        let dropped = |reason| {
            metrics
                .usage_dropped
                .get_or_create(&UsageDropLabels { reason })
                .clone()
        };
        Self {
            written: metrics.usage_written.clone(),
            dropped_queue_full: dropped("queue_full"),
            dropped_store_error: dropped("store_error"),
        }
    }
}

/// What the writer counted, shared by the handle and the task.
#[derive(Default)]
struct Tally {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    counters: Option<UsageCounters>,
}

/// The handle request tasks record through; share it in an `Arc`.
pub struct UsageWriter {
    tx: mpsc::Sender<UsageRecord>,
    tally: Arc<Tally>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UsageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWriter")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .field("failed", &self.failed())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UsageWriter {
    /// Spawn the writer task on `runtime`. Dropping the handle without
    /// [`flush_and_stop`](Self::flush_and_stop) also ends the task once it has written
    /// what was queued, but nobody waits for it.
    pub fn start(
        store: Arc<dyn UsageStore>,
        options: UsageWriterOptions,
        counters: Option<UsageCounters>,
        runtime: &tokio::runtime::Handle,
    ) -> UsageWriter {
        let options = UsageWriterOptions {
            capacity: options.capacity.max(1),
            batch_size: options.batch_size.max(1),
            flush_interval: options.flush_interval.max(Duration::from_millis(1)),
            ..options
        };
        let (tx, rx) = mpsc::channel(options.capacity);
        let (stop_tx, stop_rx) = oneshot::channel();
        let tally = Arc::new(Tally {
            counters,
            ..Tally::default()
        });
        let task = Task {
            store,
            batch: Vec::with_capacity(options.batch_size),
            options,
            tally: tally.clone(),
            logged_drops: 0,
            store_down: false,
        };
        let task = runtime.spawn(task.run(rx, stop_rx));
        UsageWriter {
            tx,
            tally,
            stop: Mutex::new(Some(stop_tx)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Queue `record` for writing. Never waits: a full (or stopped) queue drops it and
    /// counts it.
    pub fn record(&self, record: UsageRecord) {
        if self.tx.try_send(record).is_err() {
            self.tally.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.tally.counters {
                c.dropped_queue_full.inc();
            }
        }
    }

    /// Records dropped because the queue was full (or the writer had stopped).
    pub fn dropped(&self) -> u64 {
        self.tally.dropped.load(Ordering::Relaxed)
    }

    /// Records dropped because the store refused their batch after every retry.
    pub fn failed(&self) -> u64 {
        self.tally.failed.load(Ordering::Relaxed)
    }

    /// Records committed to the store.
    pub fn written(&self) -> u64 {
        self.tally.written.load(Ordering::Relaxed)
    }

    /// Close the queue, write everything in it and wait for the task to end. Records
    /// offered afterwards are dropped (and counted). A second call returns at once.
    pub async fn flush_and_stop(&self) {
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the usage writer task failed");
            }
        }
    }
}

/// The background task's state.
struct Task {
    store: Arc<dyn UsageStore>,
    options: UsageWriterOptions,
    batch: Vec<UsageRecord>,
    tally: Arc<Tally>,
    /// Queue-full drops already logged.
    logged_drops: u64,
    /// Set when a batch failed during the final drain: the rest is dropped untried.
    store_down: bool,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<UsageRecord>, mut stop: oneshot::Receiver<()>) {
        let period = self.options.flush_interval;
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(start + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let every = DRAIN_EVERY.min(period);
        let mut drain = tokio::time::interval_at(start + every, every);
        drain.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let flush = tokio::select! {
                // The tick before the drain: a busy queue must not starve the partial-batch
                // write and the drop report.
                biased;
                // A stop, or the handle dropped.
                _ = &mut stop => break,
                _ = tick.tick() => true,
                _ = drain.tick() => false,
            };
            if self.drain(&mut rx).await {
                break;
            }
            if flush {
                self.write(false).await;
                self.report_drops();
            }
        }
        rx.close();
        while let Some(record) = rx.recv().await {
            self.batch.push(record);
            if self.batch.len() >= self.options.batch_size {
                self.write(true).await;
            }
        }
        self.write(true).await;
        self.report_drops();
    }

    /// Move what is queued into the batch, writing each batch that fills. Polled, never
    /// waited on: a receiver parked on the queue would be woken (a cross-thread wake, a
    /// futex call on each side) by every request's record; polled every [`DRAIN_EVERY`],
    /// a record costs its sender one atomic operation. True when every handle is gone.
    async fn drain(&mut self, rx: &mut mpsc::Receiver<UsageRecord>) -> bool {
        loop {
            while self.batch.len() < self.options.batch_size {
                match rx.try_recv() {
                    Ok(record) => self.batch.push(record),
                    Err(mpsc::error::TryRecvError::Empty) => return false,
                    Err(mpsc::error::TryRecvError::Disconnected) => return true,
                }
            }
            self.write(false).await;
        }
    }

    /// Write the batch (if any), retrying; afterwards it is empty either way.
    async fn write(&mut self, draining: bool) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        if self.store_down {
            self.lost(n);
            return;
        }
        let mut delay = self.options.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.store.insert_usage(&self.batch).await {
                Ok(()) => {
                    self.tally.written.fetch_add(n, Ordering::Relaxed);
                    if let Some(c) = &self.tally.counters {
                        c.written.inc_by(n);
                    }
                    break;
                }
                Err(e) if attempt >= self.options.max_retries => {
                    tracing::error!(
                        records = n,
                        attempts = attempt + 1,
                        error = %e,
                        "usage records dropped: the store refused their batch"
                    );
                    self.lost(n);
                    self.store_down = draining;
                    break;
                }
                Err(e) => {
                    if attempt == 0 {
                        tracing::warn!(
                            records = n,
                            error = %e,
                            retries = self.options.max_retries,
                            "could not write usage records; retrying"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
        self.batch.clear();
    }

    /// Count the batch's `n` records as lost to the store.
    fn lost(&mut self, n: u64) {
        if self.store_down {
            tracing::error!(
                records = n,
                "usage records dropped at shutdown: the store is unavailable"
            );
        }
        self.tally.failed.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = &self.tally.counters {
            c.dropped_store_error.inc_by(n);
        }
        self.batch.clear();
    }

    /// Log the queue-full drops since the last report, if any.
    fn report_drops(&mut self) {
        let dropped = self.tally.dropped.load(Ordering::Relaxed);
        if dropped > self.logged_drops {
            tracing::warn!(
                dropped = dropped - self.logged_drops,
                total = dropped,
                capacity = self.options.capacity,
                "usage records dropped: the queue was full (the store is slower than requests arrive)"
            );
            self.logged_drops = dropped;
        }
    }
}

#[cfg(test)]
mod tests;
