//! Usage records in real stores: an SQLite file and a fresh PostgreSQL database run the same
//! checks and must give the same answers (UTC days and hours, filters, totals), and the
//! batching writer loses nothing on a graceful stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use portcullis::store::{self, GroupBy, Store, UsageQuery, UsageRecord, UsageRow};
use portcullis::usage_log::{UsageWriter, UsageWriterOptions};

/// 2026-12-01T00:00:00Z in unix milliseconds.
const DEC_1: i64 = 1_796_083_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

#[allow(clippy::too_many_arguments)]
fn rec(
    time_ms: i64,
    client: &str,
    subject: Option<&str>,
    deployment: Option<&str>,
    prompt: i64,
    cached: i64,
    completion: i64,
    reasoning: i64,
    cost: f64,
) -> UsageRecord {
    UsageRecord {
        time_ms,
        request_id: format!("req-{time_ms}-{client}"),
        client: client.into(),
        subject: subject.map(Into::into),
        key_id: None,
        operation: "chat".into(),
        deployment: deployment.map(Into::into),
        backend: Some("ptu".into()),
        prompt_tokens: prompt,
        cached_tokens: cached,
        completion_tokens: completion,
        reasoning_tokens: reasoning,
        estimated_tokens: Some(prompt + 100),
        usage_source: "reported".into(),
        cost_usd: cost,
        status: 200,
        stream: true,
    }
}

/// Records on both sides of the midnight between 2026-12-01 and 2026-12-02 (UTC).
fn around_midnight() -> Vec<UsageRecord> {
    let mut records = vec![
        // Dec 1, 23:59:59.999 — the last millisecond of the day.
        rec(
            DEC_1 + DAY - 1,
            "team-a",
            Some("alice"),
            Some("gpt-4o"),
            100,
            20,
            10,
            0,
            0.25,
        ),
        rec(
            DEC_1 + 23 * HOUR,
            "team-b",
            None,
            Some("gpt-4o"),
            200,
            0,
            20,
            5,
            0.5,
        ),
        // Dec 2, 00:00:00.000 — the first.
        rec(
            DEC_1 + DAY,
            "team-a",
            Some("bob"),
            None,
            300,
            0,
            30,
            0,
            0.125,
        ),
        rec(
            DEC_1 + DAY + 90 * 60_000,
            "team-a",
            Some("alice"),
            Some("o3"),
            400,
            100,
            40,
            30,
            1.0,
        ),
    ];
    // A request nothing estimated before it was forwarded (`[limits] estimate`): NULL.
    records[1].estimated_tokens = None;
    records
}

fn query(by: GroupBy) -> UsageQuery {
    UsageQuery {
        client: None,
        deployment: None,
        since_ms: DEC_1,
        until_ms: DEC_1 + 2 * DAY,
        by,
    }
}

fn row(key: Option<&str>, requests: i64, sums: [i64; 4], cost: f64) -> UsageRow {
    UsageRow {
        key: key.map(Into::into),
        requests,
        prompt_tokens: sums[0],
        cached_tokens: sums[1],
        completion_tokens: sums[2],
        reasoning_tokens: sums[3],
        total_tokens: sums[0] + sums[2],
        cost_usd: cost,
    }
}

async fn report(s: &Arc<dyn Store>, q: &UsageQuery) -> Vec<UsageRow> {
    s.usage_report(q).await.unwrap()
}

/// The same checks on every backend; every expected value is written out.
async fn insert_and_report(s: Arc<dyn Store>) {
    s.insert_usage(&around_midnight()).await.unwrap();
    // An empty batch is no statement at all.
    s.insert_usage(&[]).await.unwrap();

    assert_eq!(
        report(&s, &query(GroupBy::Day)).await,
        [
            row(Some("2026-12-01"), 2, [300, 20, 30, 5], 0.75),
            row(Some("2026-12-02"), 2, [700, 100, 70, 30], 1.125),
        ],
        "the midnight boundary splits the days"
    );
    assert_eq!(
        report(&s, &query(GroupBy::Hour)).await,
        [
            row(Some("2026-12-01T23:00:00Z"), 2, [300, 20, 30, 5], 0.75),
            row(Some("2026-12-02T00:00:00Z"), 1, [300, 0, 30, 0], 0.125),
            row(Some("2026-12-02T01:00:00Z"), 1, [400, 100, 40, 30], 1.0),
        ]
    );
    assert_eq!(
        report(&s, &query(GroupBy::Client)).await,
        [
            row(Some("team-a"), 3, [800, 120, 80, 30], 1.375),
            row(Some("team-b"), 1, [200, 0, 20, 5], 0.5),
        ]
    );
    assert_eq!(
        report(&s, &query(GroupBy::Deployment)).await,
        [
            row(Some("gpt-4o"), 2, [300, 20, 30, 5], 0.75),
            row(Some("o3"), 1, [400, 100, 40, 30], 1.0),
            row(None, 1, [300, 0, 30, 0], 0.125),
        ],
        "records without a deployment come last"
    );
    assert_eq!(
        report(&s, &query(GroupBy::Subject)).await,
        [
            row(Some("alice"), 2, [500, 120, 50, 30], 1.25),
            row(Some("bob"), 1, [300, 0, 30, 0], 0.125),
            row(None, 1, [200, 0, 20, 5], 0.5),
        ]
    );

    // Filters: client, deployment, both.
    let mut q = query(GroupBy::Day);
    q.client = Some("team-a".into());
    assert_eq!(
        report(&s, &q).await,
        [
            row(Some("2026-12-01"), 1, [100, 20, 10, 0], 0.25),
            row(Some("2026-12-02"), 2, [700, 100, 70, 30], 1.125),
        ]
    );
    q.deployment = Some("gpt-4o".into());
    assert_eq!(
        report(&s, &q).await,
        [row(Some("2026-12-01"), 1, [100, 20, 10, 0], 0.25)]
    );
    q.client = None;
    q.by = GroupBy::Client;
    assert_eq!(
        report(&s, &q).await,
        [
            row(Some("team-a"), 1, [100, 20, 10, 0], 0.25),
            row(Some("team-b"), 1, [200, 0, 20, 5], 0.5),
        ]
    );
    q.client = Some("nobody".into());
    assert_eq!(report(&s, &q).await, []);

    // The time window: since inclusive, until exclusive.
    let mut q = query(GroupBy::Day);
    q.since_ms = DEC_1 + DAY;
    q.until_ms = DEC_1 + DAY + 1;
    assert_eq!(
        report(&s, &q).await,
        [row(Some("2026-12-02"), 1, [300, 0, 30, 0], 0.125)]
    );
    q.since_ms = DEC_1;
    q.until_ms = DEC_1 + DAY - 1;
    assert_eq!(
        report(&s, &q).await,
        [row(Some("2026-12-01"), 1, [200, 0, 20, 5], 0.5)],
        "23:59:59.999 is outside a window ending at it"
    );
}

/// More rows than one statement holds, in one call, all committed; prints how long 1,000
/// rows take.
async fn large_batches(s: Arc<dyn Store>, backend: &str) {
    let batch: Vec<UsageRecord> = (0..1000)
        .map(|i| {
            rec(
                DEC_1 + i,
                "bulk",
                Some("s"),
                Some("gpt-4o"),
                10,
                1,
                5,
                0,
                0.0001,
            )
        })
        .collect();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        s.insert_usage(&batch).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "{backend}: 1,000 usage rows in one insert_usage: median {:?} (min {:?}, max {:?})",
        times[2], times[0], times[4]
    );
    let odd: Vec<UsageRecord> = batch.iter().cycle().take(4321).cloned().collect();
    s.insert_usage(&odd).await.unwrap();
    let mut q = query(GroupBy::Client);
    q.client = Some("bulk".into());
    let rows = report(&s, &q).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 5000 + 4321);
    assert_eq!(rows[0].prompt_tokens, 10 * (5000 + 4321));
    assert!(
        (rows[0].cost_usd - 0.0001 * 9321.0).abs() < 1e-9,
        "{}",
        rows[0].cost_usd
    );
}

/// The writer over a real store: everything recorded is in the store after the stop.
async fn writer_loses_nothing_on_stop(s: Arc<dyn Store>) {
    let w = UsageWriter::start(
        s.clone(),
        UsageWriterOptions {
            batch_size: 1000,
            flush_interval: Duration::from_secs(3600),
            ..UsageWriterOptions::default()
        },
        None,
        &tokio::runtime::Handle::current(),
    );
    for i in 0..2500 {
        w.record(rec(DEC_1 + i, "writer", None, None, 1, 0, 1, 0, 0.5));
    }
    w.flush_and_stop().await;
    assert_eq!((w.written(), w.dropped(), w.failed()), (2500, 0, 0));
    let mut q = query(GroupBy::Day);
    q.client = Some("writer".into());
    assert_eq!(
        report(&s, &q).await,
        [row(Some("2026-12-01"), 2500, [2500, 0, 2500, 0], 1250.0)]
    );
}

async fn sqlite_file() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = store::open_store("sqlite://usage.db", dir.path())
        .await
        .unwrap();
    (dir, s)
}

async fn postgres() -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::create().await;
    let s = store::open_store(&db.url, std::path::Path::new("."))
        .await
        .unwrap();
    (db, s)
}

#[tokio::test]
async fn insert_and_report_on_sqlite() {
    let (dir, s) = sqlite_file().await;
    insert_and_report(s.clone()).await;
    s.close().await;
    // Reopened (migrations already applied), the records are still there.
    let s = store::open_store("sqlite://usage.db", dir.path())
        .await
        .unwrap();
    assert_eq!(report(&s, &query(GroupBy::Day)).await.len(), 2);
}

#[tokio::test]
async fn insert_and_report_on_postgres() {
    let (_db, s) = postgres().await;
    insert_and_report(s).await;
}

#[tokio::test]
async fn large_batches_on_sqlite() {
    let (_dir, s) = sqlite_file().await;
    large_batches(s, "sqlite").await;
}

#[tokio::test]
async fn large_batches_on_postgres() {
    let (_db, s) = postgres().await;
    large_batches(s, "postgres").await;
}

#[tokio::test]
async fn writer_loses_nothing_on_stop_on_sqlite() {
    let (_dir, s) = sqlite_file().await;
    writer_loses_nothing_on_stop(s).await;
}

#[tokio::test]
async fn writer_loses_nothing_on_stop_on_postgres() {
    let (_db, s) = postgres().await;
    writer_loses_nothing_on_stop(s).await;
}

#[tokio::test]
async fn the_key_store_and_the_usage_store_share_one_database() {
    let (_dir, s) = sqlite_file().await;
    let keys: Arc<dyn store::KeyStore> = s.clone();
    assert_eq!(keys.backend(), "sqlite");
    assert!(keys.list(None).await.unwrap().is_empty());
    s.insert_usage(&around_midnight()).await.unwrap();
    assert_eq!(
        keys.revision().await.unwrap(),
        0,
        "usage does not bump the key revision"
    );
}
