//! The writer against an in-memory store whose inserts can be held back or made to fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::AtomicU32;
use std::time::Instant;

use tokio::sync::watch;

use super::*;
use crate::store::usage::{SeriesPoint, SeriesQuery};
use crate::store::{BoxFuture, StoreError, UsageQuery, UsageRow};

/// Keeps every committed batch; `fail` makes the next inserts fail, `gate` holds them.
struct FakeStore {
    batches: Mutex<Vec<Vec<UsageRecord>>>,
    calls: AtomicU64,
    fail: AtomicU32,
    gate: watch::Receiver<bool>,
}

impl FakeStore {
    /// An open store and the sender that closes (`false`) or opens (`true`) its gate.
    fn new() -> (Arc<FakeStore>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(true);
        let store = Arc::new(FakeStore {
            batches: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
            fail: AtomicU32::new(0),
            gate: rx,
        });
        (store, tx)
    }

    fn sizes(&self) -> Vec<usize> {
        lock(&self.batches).iter().map(Vec::len).collect()
    }

    fn ids(&self) -> Vec<String> {
        lock(&self.batches)
            .iter()
            .flatten()
            .map(|r| r.request_id.clone())
            .collect()
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl UsageStore for FakeStore {
    fn insert_usage<'a>(
        &'a self,
        records: &'a [UsageRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open).await.unwrap();
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            lock(&self.batches).push(records.to_vec());
            Ok(())
        })
    }

    fn usage_report<'a>(
        &'a self,
        _query: &'a UsageQuery,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn usage_series<'a>(
        &'a self,
        _query: &'a SeriesQuery,
    ) -> BoxFuture<'a, Result<Vec<SeriesPoint>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

fn record(i: usize) -> UsageRecord {
    UsageRecord {
        time_ms: 1_796_083_200_000 + i as i64,
        request_id: format!("req-{i}"),
        client: "team-a".into(),
        subject: None,
        key_id: None,
        operation: "chat".into(),
        deployment: Some("gpt-4o".into()),
        backend: Some("ptu".into()),
        prompt_tokens: 10,
        cached_tokens: 0,
        completion_tokens: 5,
        reasoning_tokens: 0,
        estimated_tokens: Some(20),
        usage_source: "reported".into(),
        cost_usd: 0.001,
        status: 200,
        stream: false,
    }
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("req-{i}")).collect()
}

fn options(batch_size: usize, flush_interval: Duration) -> UsageWriterOptions {
    UsageWriterOptions {
        batch_size,
        flush_interval,
        ..UsageWriterOptions::default()
    }
}

fn start(store: &Arc<FakeStore>, options: UsageWriterOptions) -> UsageWriter {
    start_counted(store, options, None)
}

fn start_counted(
    store: &Arc<FakeStore>,
    options: UsageWriterOptions,
    counters: Option<UsageCounters>,
) -> UsageWriter {
    UsageWriter::start(
        store.clone(),
        options,
        counters,
        &tokio::runtime::Handle::current(),
    )
}

/// Wait (yielding to the writer) until `cond` holds; fail after `within`.
async fn wait_until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn full_batches_are_written_at_once_and_stop_writes_the_rest() {
    let (store, _gate) = FakeStore::new();
    let metrics = Metrics::new();
    let w = start_counted(
        &store,
        options(4, HOUR),
        Some(UsageCounters::from_metrics(&metrics)),
    );
    for i in 0..10 {
        w.record(record(i));
    }
    // No tick for an hour: only full batches can have been written.
    wait_until("two full batches", Duration::from_secs(5), || {
        store.sizes().len() == 2
    })
    .await;
    assert_eq!(store.sizes(), [4, 4]);
    w.flush_and_stop().await;
    assert_eq!(store.sizes(), [4, 4, 2]);
    assert_eq!(store.ids(), ids(0..10), "every record, in order");
    assert_eq!((w.written(), w.dropped(), w.failed()), (10, 0, 0));
    let text = metrics.render();
    for line in [
        "portcullis_usage_records_written_total 10",
        r#"portcullis_usage_records_dropped_total{reason="queue_full"} 0"#,
        r#"portcullis_usage_records_dropped_total{reason="store_error"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    // Stopped: later records are counted as dropped, never written.
    w.record(record(10));
    assert_eq!(w.dropped(), 1);
    w.flush_and_stop().await;
    assert_eq!(store.ids().len(), 10);
}

#[tokio::test]
async fn a_partial_batch_is_written_at_the_flush_interval() {
    let (store, _gate) = FakeStore::new();
    let w = start(&store, options(1000, Duration::from_millis(50)));
    let started = Instant::now();
    for i in 0..3 {
        w.record(record(i));
    }
    wait_until("the interval's write", Duration::from_secs(5), || {
        store.sizes() == [3]
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    // Later records go in a later batch.
    w.record(record(3));
    wait_until("the next interval's write", Duration::from_secs(5), || {
        store.sizes() == [3, 1]
    })
    .await;
    w.flush_and_stop().await;
    assert_eq!(store.ids(), ids(0..4));
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let (store, gate) = FakeStore::new();
    gate.send(false).unwrap();
    let metrics = Metrics::new();
    let w = start_counted(
        &store,
        UsageWriterOptions {
            capacity: 3,
            ..options(1, HOUR)
        },
        Some(UsageCounters::from_metrics(&metrics)),
    );
    w.record(record(0));
    // The writer holds record 0 in an insert that cannot finish: the queue is empty.
    wait_until("the held insert", Duration::from_secs(5), || {
        store.calls() == 1
    })
    .await;
    for i in 1..=3 {
        w.record(record(i));
    }
    assert_eq!(w.dropped(), 0, "three fit in the queue");
    for i in 4..9 {
        w.record(record(i));
    }
    assert_eq!(w.dropped(), 5);
    assert!(metrics
        .render()
        .lines()
        .any(|l| l == r#"portcullis_usage_records_dropped_total{reason="queue_full"} 5"#));
    gate.send(true).unwrap();
    w.flush_and_stop().await;
    assert_eq!(store.ids(), ids(0..4), "what was queued is written");
    assert_eq!((w.written(), w.dropped()), (4, 5));
}

#[tokio::test(start_paused = true)]
async fn failed_inserts_are_retried_then_dropped_and_the_writer_goes_on() {
    let (store, _gate) = FakeStore::new();
    let metrics = Metrics::new();
    let w = start_counted(
        &store,
        options(2, HOUR),
        Some(UsageCounters::from_metrics(&metrics)),
    );
    // Two failures, then success: nothing lost.
    store.fail.store(2, Ordering::SeqCst);
    w.record(record(0));
    w.record(record(1));
    wait_until("the retried batch", Duration::from_secs(60), || {
        w.written() == 2
    })
    .await;
    assert_eq!(store.calls(), 3);

    // Failing for good: the batch is dropped after 1 + max_retries attempts.
    store.fail.store(u32::MAX, Ordering::SeqCst);
    w.record(record(2));
    w.record(record(3));
    wait_until("the dropped batch", Duration::from_secs(120), || {
        w.failed() == 2
    })
    .await;
    assert_eq!(store.calls(), 3 + 5);

    // The store is back: the next batch is written.
    store.fail.store(0, Ordering::SeqCst);
    w.record(record(4));
    w.flush_and_stop().await;
    assert_eq!(store.ids(), ["req-0", "req-1", "req-4"]);
    assert_eq!((w.written(), w.failed(), w.dropped()), (3, 2, 0));
    assert!(metrics
        .render()
        .lines()
        .any(|l| l == r#"portcullis_usage_records_dropped_total{reason="store_error"} 2"#));
}

#[tokio::test(start_paused = true)]
async fn a_store_failing_at_shutdown_costs_one_batch_of_retries() {
    let (store, _gate) = FakeStore::new();
    store.fail.store(u32::MAX, Ordering::SeqCst);
    let w = start(&store, options(2, HOUR));
    for i in 0..5 {
        w.record(record(i));
    }
    w.flush_and_stop().await;
    // The first full batch may be written (and fail) before the stop; either way only one
    // batch is ever retried, the rest is dropped untried.
    assert_eq!(store.calls(), 5, "one batch: 1 + 4 retries");
    assert_eq!((w.written(), w.failed()), (0, 5));
}

#[tokio::test]
async fn records_from_other_threads_and_runtimes_arrive() {
    let (store, _gate) = FakeStore::new();
    let w = Arc::new(start(&store, options(100, HOUR)));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                // Like a worker: a current-thread runtime of its own.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for i in 0..250 {
                        w.record(record(t * 1000 + i));
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    w.flush_and_stop().await;
    assert_eq!((w.written(), w.dropped()), (1000, 0));
    let mut got = store.ids();
    got.sort();
    let mut want: Vec<String> = (0..4)
        .flat_map(|t| (0..250).map(move |i| format!("req-{}", t * 1000 + i)))
        .collect();
    want.sort();
    assert_eq!(got, want);
}
