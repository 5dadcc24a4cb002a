//! Store unit tests on in-memory SQLite (the PostgreSQL backend runs the same SQL and is
//! exercised in `tests/keys.rs` and `tests/usage.rs`). Usage series run on both here: on
//! PostgreSQL in a fresh database when a server answers at `PORTCULLIS_TEST_POSTGRES_URL`
//! (default: the local trust-auth server).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;

use super::usage::{SeriesPoint, SeriesQuery, Split};
use super::*;

fn record(id: &str, client: &str, created_at: i64, expires_at: Option<i64>) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        client: client.into(),
        name: None,
        hmac: [7; 32],
        created_at,
        expires_at,
        revoked_at: None,
        last_used_at: None,
    }
}

async fn memory() -> Arc<dyn KeyStore> {
    open("sqlite::memory:", Path::new(".")).await.unwrap()
}

#[tokio::test]
async fn every_mutation_bumps_the_revision_and_last_used_does_not() {
    let s = memory().await;
    assert_eq!(s.backend(), "sqlite");
    let r0 = s.revision().await.unwrap();
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let r1 = s.revision().await.unwrap();
    assert!(r1 > r0);
    s.rotate(&record("bbbbbbbb", "a", 200, None), 200, 300)
        .await
        .unwrap();
    let r2 = s.revision().await.unwrap();
    assert!(r2 > r1);
    assert!(s.revoke("aaaaaaaa", 250).await.unwrap().is_some());
    let r3 = s.revision().await.unwrap();
    assert!(r3 > r2);
    s.record_last_used(&[(Arc::from("bbbbbbbb"), 260)])
        .await
        .unwrap();
    assert_eq!(s.revision().await.unwrap(), r3);
    // Revoking nothing changes nothing.
    assert!(s.revoke("zzzzzzzz", 270).await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), r3);
    let set = s.load().await.unwrap();
    assert_eq!(set.revision, r3);
    assert_eq!(set.keys.len(), 2);
}

#[tokio::test]
async fn duplicate_ids_are_refused_and_change_nothing() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let r = s.revision().await.unwrap();
    let e = s
        .insert(&record("aaaaaaaa", "b", 101, None))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::DuplicateId), "{e:?}");
    assert_eq!(s.revision().await.unwrap(), r);
    assert_eq!(s.list(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoke_keeps_the_first_time() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let first = s.revoke("aaaaaaaa", 150).await.unwrap().unwrap();
    assert_eq!(first.revoked_at, Some(150));
    let again = s.revoke("aaaaaaaa", 160).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(150));
    assert_eq!(again.status(170), KeyStatus::Revoked);
}

#[tokio::test]
async fn rotate_shortens_only_the_clients_other_active_keys() {
    let s = memory().await;
    s.insert(&record("old00000", "a", 100, None)).await.unwrap();
    s.insert(&record("soon0000", "a", 101, Some(1_100)))
        .await
        .unwrap();
    s.insert(&record("late0000", "a", 102, Some(9_000)))
        .await
        .unwrap();
    s.insert(&record("gone0000", "a", 103, Some(900)))
        .await
        .unwrap();
    s.insert(&record("revk0000", "a", 104, None)).await.unwrap();
    s.revoke("revk0000", 105).await.unwrap();
    s.insert(&record("other000", "b", 106, None)).await.unwrap();

    let rolled = s
        .rotate(&record("new00000", "a", 1_000, None), 1_000, 1_200)
        .await
        .unwrap();
    let ids: Vec<&str> = rolled.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["old00000", "soon0000", "late0000"]);

    let all = s.list(None).await.unwrap();
    let exp = |id: &str| all.iter().find(|k| k.id == id).unwrap().expires_at;
    assert_eq!(exp("old00000"), Some(1_200));
    assert_eq!(exp("soon0000"), Some(1_100), "an earlier expiry is kept");
    assert_eq!(exp("late0000"), Some(1_200));
    assert_eq!(exp("gone0000"), Some(900), "already expired: untouched");
    assert_eq!(exp("revk0000"), None, "revoked: untouched");
    assert_eq!(exp("other000"), None, "another client: untouched");
    assert_eq!(exp("new00000"), None, "the new key: untouched");
    assert_eq!(s.list(Some("b")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn last_used_only_moves_forward() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let id: Arc<str> = Arc::from("aaaaaaaa");
    s.record_last_used(&[(id.clone(), 500)]).await.unwrap();
    s.record_last_used(&[(id.clone(), 400)]).await.unwrap();
    assert_eq!(s.list(None).await.unwrap()[0].last_used_at, Some(500));
    // Unknown ids are ignored.
    s.record_last_used(&[(Arc::from("zzzzzzzz"), 600)])
        .await
        .unwrap();
}

#[tokio::test]
async fn memory_databases_are_separate() {
    let a = memory().await;
    let b = memory().await;
    a.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    assert_eq!(a.list(None).await.unwrap().len(), 1);
    assert!(b.list(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_closed_store_is_unavailable() {
    let s = memory().await;
    s.close().await;
    let e = s.revision().await.unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}

#[tokio::test]
async fn postgres_errors_never_show_the_password() {
    // Nothing listens on port 1; the error must still not echo the password.
    let e = match open(
        "postgres://app:hunter2-very-secret@127.0.0.1:1/keys?connect_timeout=2",
        Path::new("."),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("opened a database on port 1"),
    };
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
        assert!(text.contains("refused"), "the cause is shown: {text}");
    }
    let e = match open(
        "postgres://app:hunter2@127.0.0.1:1/keys?bogus=1",
        Path::new("."),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("opened a database with a bogus option"),
    };
    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
}

#[tokio::test]
async fn unknown_schemes_are_refused() {
    let e = match open("mysql://root:pw@localhost/x", Path::new(".")).await {
        Err(e) => e,
        Ok(_) => panic!("opened mysql"),
    };
    assert!(matches!(e, StoreError::Url { .. }));
    assert!(!e.to_string().contains(":pw@"), "{e}");
}

/// A fresh PostgreSQL database, dropped (with `FORCE`) when this is dropped.
struct PgDb {
    admin: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A store on a fresh PostgreSQL database, or `None` when no server answers.
async fn postgres() -> Option<(PgDb, Arc<dyn Store>)> {
    let admin = std::env::var("PORTCULLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let shown = error::redact_url(&admin);
    let connect = sqlx::PgConnection::connect(&admin);
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let e = error::Scrubber::for_url(&admin).scrub(e);
            eprintln!("PostgreSQL at {shown} unavailable ({e}): SQLite only");
            return None;
        }
        Err(_) => {
            eprintln!("PostgreSQL at {shown} did not answer: SQLite only");
            return None;
        }
    };
    let name = format!("portcullis_unit_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (scheme, rest) = admin.split_once("://").unwrap();
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(path_start);
    let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
    let url = format!("{scheme}://{authority}/{name}{query}");
    let db = PgDb { admin, name };
    let store = open_store(&url, Path::new(".")).await.unwrap();
    Some((db, store))
}

const HOUR: i64 = 3_600_000;
/// 2026-12-01T00:30:00Z: the series' window starts half past, so its buckets are aligned
/// on it and not on the clock's hours.
const T0: i64 = 1_796_083_200_000 + 30 * 60_000;

fn usage(
    time_ms: i64,
    client: &str,
    deployment: Option<&str>,
    tokens: (i64, i64),
    cost_usd: f64,
    status: i32,
) -> UsageRecord {
    UsageRecord {
        time_ms,
        request_id: format!("req-{time_ms}"),
        client: client.into(),
        subject: None,
        key_id: None,
        operation: "chat".into(),
        deployment: deployment.map(Into::into),
        backend: Some("ptu".into()),
        prompt_tokens: tokens.0,
        cached_tokens: 0,
        completion_tokens: tokens.1,
        reasoning_tokens: 0,
        estimated_tokens: None,
        usage_source: "reported".into(),
        cost_usd,
        status,
        stream: false,
    }
}

/// Three hours from `T0`, and records just outside them. `Team-Z` sorts before `team-a`
/// in byte order (not in PostgreSQL's usual collations); costs are exact in binary.
fn series_records() -> Vec<UsageRecord> {
    vec![
        usage(T0 - 1, "team-a", Some("gpt-4o"), (1, 1), 8.0, 200),
        usage(T0, "team-a", Some("gpt-4o"), (100, 10), 0.5, 200),
        usage(
            T0 + HOUR - 1,
            "Team-Z",
            Some("gpt-4o"),
            (200, 20),
            0.25,
            429,
        ),
        usage(T0 + HOUR, "team-a", None, (300, 30), 1.0, 200),
        usage(T0 + HOUR + 5, "team-a", Some("o3"), (400, 40), 0.125, 500),
        usage(
            T0 + 2 * HOUR + 7,
            "Team-Z",
            Some("o3"),
            (50, 5),
            0.0625,
            399,
        ),
        usage(T0 + 3 * HOUR, "team-a", Some("gpt-4o"), (1, 1), 8.0, 200),
        usage(T0 + 30 * HOUR, "Team-Z", Some("o3"), (1, 1), 8.0, 503),
    ]
}

fn series_query(split: Option<Split>) -> SeriesQuery {
    SeriesQuery {
        client: None,
        deployment: None,
        since_ms: T0,
        until_ms: T0 + 3 * HOUR,
        bucket_ms: HOUR,
        split,
    }
}

/// The point of bucket `bucket` (0 = `T0`).
fn point(
    bucket: i64,
    key: Option<&str>,
    requests: i64,
    tokens: (i64, i64),
    cost_usd: f64,
    errors: i64,
) -> SeriesPoint {
    SeriesPoint {
        bucket_start_ms: T0 + bucket * HOUR,
        key: key.map(Into::into),
        requests,
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        total_tokens: tokens.0 + tokens.1,
        cost_usd,
        errors,
    }
}

/// The same checks on every backend; every expected value is written out.
async fn series_checks(s: Arc<dyn Store>) {
    assert!(s
        .usage_series(&series_query(None))
        .await
        .unwrap()
        .is_empty());
    s.insert_usage(&series_records()).await.unwrap();

    assert_eq!(
        s.usage_series(&series_query(None)).await.unwrap(),
        [
            point(0, None, 2, (300, 30), 0.75, 1),
            point(1, None, 2, (700, 70), 1.125, 1),
            point(2, None, 1, (50, 5), 0.0625, 0),
        ]
    );
    assert_eq!(
        s.usage_series(&series_query(Some(Split::Client)))
            .await
            .unwrap(),
        [
            point(0, Some("Team-Z"), 1, (200, 20), 0.25, 1),
            point(0, Some("team-a"), 1, (100, 10), 0.5, 0),
            point(1, Some("team-a"), 2, (700, 70), 1.125, 1),
            point(2, Some("Team-Z"), 1, (50, 5), 0.0625, 0),
        ]
    );
    assert_eq!(
        s.usage_series(&series_query(Some(Split::Deployment)))
            .await
            .unwrap(),
        [
            point(0, Some("gpt-4o"), 2, (300, 30), 0.75, 1),
            point(1, Some("o3"), 1, (400, 40), 0.125, 1),
            point(1, None, 1, (300, 30), 1.0, 0),
            point(2, Some("o3"), 1, (50, 5), 0.0625, 0),
        ]
    );

    // Filters, alone and together.
    let mut q = series_query(Some(Split::Deployment));
    q.client = Some("team-a".into());
    assert_eq!(
        s.usage_series(&q).await.unwrap(),
        [
            point(0, Some("gpt-4o"), 1, (100, 10), 0.5, 0),
            point(1, Some("o3"), 1, (400, 40), 0.125, 1),
            point(1, None, 1, (300, 30), 1.0, 0),
        ]
    );
    let mut q = series_query(None);
    q.deployment = Some("o3".into());
    assert_eq!(
        s.usage_series(&q).await.unwrap(),
        [
            point(1, None, 1, (400, 40), 0.125, 1),
            point(2, None, 1, (50, 5), 0.0625, 0),
        ]
    );
    q.client = Some("Team-Z".into());
    q.split = Some(Split::Client);
    assert_eq!(
        s.usage_series(&q).await.unwrap(),
        [point(2, Some("Team-Z"), 1, (50, 5), 0.0625, 0)]
    );
    q.client = Some("nobody".into());
    assert!(s.usage_series(&q).await.unwrap().is_empty());

    // One bucket of the whole window, and a partial last bucket.
    let mut q = series_query(None);
    q.bucket_ms = 3 * HOUR;
    assert_eq!(
        s.usage_series(&q).await.unwrap(),
        [point(0, None, 5, (1_050, 105), 1.9375, 2)]
    );
    q.bucket_ms = 2 * HOUR;
    assert_eq!(
        s.usage_series(&q).await.unwrap(),
        [
            point(0, None, 4, (1_000, 100), 1.875, 2),
            point(2, None, 1, (50, 5), 0.0625, 0),
        ]
    );

    // Windows the store refuses before asking the database.
    for (since_ms, until_ms, bucket_ms) in [
        (T0, T0 + HOUR, 0),
        (T0, T0 + HOUR, -HOUR),
        (T0, T0, HOUR),
        (T0 + HOUR, T0, HOUR),
        (T0, T0 + 1_001 * HOUR, HOUR),
    ] {
        let q = SeriesQuery {
            since_ms,
            until_ms,
            bucket_ms,
            ..series_query(None)
        };
        let e = s.usage_series(&q).await.unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{q:?}: {e:?}");
    }
    // The most buckets a series may have is fine, and reaches the later records.
    let q = SeriesQuery {
        until_ms: T0 + 1_000 * HOUR,
        ..series_query(None)
    };
    let points = s.usage_series(&q).await.unwrap();
    assert_eq!(
        points[3..],
        [
            point(3, None, 1, (1, 1), 8.0, 0),
            point(30, None, 1, (1, 1), 8.0, 1),
        ]
    );
}

#[tokio::test]
async fn usage_series_on_sqlite() {
    series_checks(open_store("sqlite::memory:", Path::new(".")).await.unwrap()).await;
}

#[tokio::test]
async fn usage_series_on_postgres() {
    let Some((_db, s)) = postgres().await else {
        return;
    };
    assert_eq!(s.backend(), "postgres");
    series_checks(s.clone()).await;
    s.close().await;
}
