//! Usage records in the store: one row per answered request, written in batches
//! ([`UsageStore::insert_usage`], fed by [`crate::usage_log::UsageWriter`]) and summed by
//! [`UsageStore::usage_report`] (`portcullis usage`) or bucketed in time by
//! [`UsageStore::usage_series`] (the dashboard's charts).
//!
//! Like the key store, both backends run the same SQL text ([`impl_usage_store!`] is
//! instantiated in `sqlite.rs` and `postgres.rs`). Grouping by UTC day or hour, or by a
//! series' time bucket, is integer arithmetic on `time_ms`, never the database's date
//! functions or time zone, so SQLite and PostgreSQL give the same answer; keys are sorted in
//! Rust (byte order), not by the database's collation, for the same reason.
//!
//! A record holds counts, names and ids only: never prompt or answer text.

use std::fmt::Write as _;

use super::{BoxFuture, StoreError};

/// One request's usage, as the pipeline hands it to the writer.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// Unix milliseconds when the request arrived.
    pub time_ms: i64,
    pub request_id: String,
    /// The `[[clients]]` id.
    pub client: String,
    /// JWT `oid`/`sub`, or `None`.
    pub subject: Option<String>,
    /// The API key's id when an API key was used.
    pub key_id: Option<String>,
    /// `chat`, `embeddings`, `responses`...
    pub operation: String,
    pub deployment: Option<String>,
    pub backend: Option<String>,
    pub prompt_tokens: i64,
    /// Part of `prompt_tokens` served from the prompt cache.
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    /// Part of `completion_tokens` spent on reasoning.
    pub reasoning_tokens: i64,
    /// The gateway's estimate of the request (prompt and output reservation); none when
    /// nothing needed one (`[limits] estimate`).
    pub estimated_tokens: Option<i64>,
    /// `reported` (the backend's usage), `counted` (tokenizer, e.g. a cut stream) or `none`.
    pub usage_source: String,
    pub cost_usd: f64,
    pub status: i32,
    pub stream: bool,
}

/// What a report's rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// UTC day.
    Day,
    /// UTC hour.
    Hour,
    Client,
    Deployment,
    Subject,
}

impl GroupBy {
    /// `day`, `hour`, `client`, `deployment` or `subject`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Hour => "hour",
            GroupBy::Client => "client",
            GroupBy::Deployment => "deployment",
            GroupBy::Subject => "subject",
        }
    }

    /// The bucket length in milliseconds of a time grouping.
    fn bucket_ms(self) -> Option<i64> {
        match self {
            GroupBy::Day => Some(86_400_000),
            GroupBy::Hour => Some(3_600_000),
            GroupBy::Client | GroupBy::Deployment | GroupBy::Subject => None,
        }
    }

    /// The grouped column (a constant: never text from the caller).
    fn column(self) -> &'static str {
        match self {
            GroupBy::Client => "client",
            GroupBy::Deployment => "deployment",
            GroupBy::Subject => "subject",
            GroupBy::Day | GroupBy::Hour => "time_ms",
        }
    }
}

/// Which records a report sums, and how it groups them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this client's records.
    pub client: Option<String>,
    /// Only records for this deployment.
    pub deployment: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: i64,
    /// Unix milliseconds, exclusive.
    pub until_ms: i64,
    pub by: GroupBy,
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// The UTC day (`2026-12-01`) or hour (`2026-12-01T13:00:00Z`), or the client,
    /// deployment or subject; `None` for records without a deployment or subject.
    pub key: Option<String>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    /// `prompt_tokens + completion_tokens` (cached and reasoning tokens are parts of them).
    pub total_tokens: i64,
    pub cost_usd: f64,
}

/// What a series' points are split by, besides their time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Client,
    Deployment,
}

impl Split {
    /// The split column (a constant: never text from the caller).
    fn column(self) -> &'static str {
        match self {
            Split::Client => "client",
            Split::Deployment => "deployment",
        }
    }
}

/// The most buckets one series may have (a chart draws no more; a bigger query is a
/// mistake, or an attempt to make the store do a lot of work).
pub const MAX_SERIES_BUCKETS: i64 = 1_000;

/// Which records a series sums, into which time buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesQuery {
    /// Only this client's records.
    pub client: Option<String>,
    /// Only records for this deployment.
    pub deployment: Option<String>,
    /// Unix milliseconds, inclusive; the first bucket starts here.
    pub since_ms: i64,
    /// Unix milliseconds, exclusive.
    pub until_ms: i64,
    /// Bucket length in milliseconds. Buckets are aligned on `since_ms`, not on the clock:
    /// the last 24 hours in 1-hour buckets are 24 full buckets.
    pub bucket_ms: i64,
    /// One point per bucket and client or deployment, instead of one per bucket.
    pub split: Option<Split>,
}

impl SeriesQuery {
    /// The number of buckets, counting a partial last one; [`StoreError::Invalid`] when
    /// `bucket_ms` is not positive, the window is empty, or there would be more than
    /// [`MAX_SERIES_BUCKETS`].
    pub fn buckets(&self) -> Result<i64, StoreError> {
        if self.bucket_ms <= 0 {
            return Err(StoreError::Invalid(format!(
                "bucket length must be positive, not {} ms",
                self.bucket_ms
            )));
        }
        if self.since_ms >= self.until_ms {
            return Err(StoreError::Invalid(format!(
                "since ({} ms) must be before until ({} ms)",
                self.since_ms, self.until_ms
            )));
        }
        // i128: `until - since` may not fit in an i64; when it does not, neither would the
        // statement's `time_ms - since`.
        let span = i128::from(self.until_ms) - i128::from(self.since_ms);
        if i64::try_from(span).is_err() {
            return Err(StoreError::Invalid(format!(
                "the window from {} ms to {} ms is too long",
                self.since_ms, self.until_ms
            )));
        }
        let bucket = i128::from(self.bucket_ms);
        let buckets = (span + bucket - 1) / bucket;
        i64::try_from(buckets)
            .ok()
            .filter(|&n| n <= MAX_SERIES_BUCKETS)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "{buckets} buckets of {} ms between since and until; at most \
                     {MAX_SERIES_BUCKETS}",
                    self.bucket_ms
                ))
            })
    }

    /// The start of bucket `index` (0 is `since_ms`); [`StoreError::Corrupt`] outside the
    /// window.
    pub(super) fn bucket_start(&self, index: i64) -> Result<i64, StoreError> {
        index
            .checked_mul(self.bucket_ms)
            .and_then(|offset| self.since_ms.checked_add(offset))
            .filter(|start| (self.since_ms..self.until_ms).contains(start))
            .ok_or_else(|| StoreError::Corrupt(format!("series bucket {index} is out of range")))
    }
}

/// One time bucket of a series (of one client or deployment when the series is split).
/// Buckets without records have no point.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoint {
    /// Unix milliseconds: `since_ms + k * bucket_ms`.
    pub bucket_start_ms: i64,
    /// The client or deployment of a split series; `None` when the series is not split, or
    /// for records without a deployment.
    pub key: Option<String>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: i64,
    pub cost_usd: f64,
    /// Requests answered with a status of 400 or more.
    pub errors: i64,
}

/// Usage records: written in batches, read as summed reports.
pub trait UsageStore: Send + Sync {
    /// Insert every record in one transaction: all of them or none.
    fn insert_usage<'a>(
        &'a self,
        records: &'a [UsageRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Sum the records `query` selects, one row per group: time groups in time order,
    /// others by key (byte order), records without the key last.
    fn usage_report<'a>(
        &'a self,
        query: &'a UsageQuery,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, StoreError>>;

    /// Sum the records `query` selects per time bucket (and client or deployment when
    /// split): points in bucket order, then by key (byte order), records without a
    /// deployment last. [`StoreError::Invalid`] for a query [`SeriesQuery::buckets`]
    /// refuses.
    fn usage_series<'a>(
        &'a self,
        query: &'a SeriesQuery,
    ) -> BoxFuture<'a, Result<Vec<SeriesPoint>, StoreError>>;
}

/// Columns of `usage_records` in the order [`impl_usage_store!`] binds them.
const COLUMNS: [&str; 17] = [
    "time_ms",
    "request_id",
    "client",
    "subject",
    "key_id",
    "operation",
    "deployment",
    "backend",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "estimated_tokens",
    "usage_source",
    "cost_usd",
    "status",
    "stream",
];

/// How one backend writes a batch: statements of how many rows, numbered how.
#[derive(Debug, Clone, Copy)]
pub(super) struct InsertPlan {
    /// Rows per multi-row `INSERT`.
    pub rows: usize,
    pub placeholders: Placeholders,
    /// Write the rows after the last full statement as statements of 2^k rows (one of a
    /// few fixed texts, all kept prepared), instead of one statement of their number.
    pub power_of_two_tail: bool,
}

/// Parameter placeholders in SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placeholders {
    /// `$1, $2, ...` (PostgreSQL).
    Numbered,
    /// `?, ?, ...` (SQLite). SQLite keeps named and numbered parameters (`$1`, `?1`) in a
    /// list it searches linearly each time sqlx asks a parameter's name, which sqlx does
    /// for every parameter it binds: quadratic in the parameters of a statement, half of
    /// the writer's instructions at 25 rows per statement. Anonymous `?` have no name
    /// and bind in order.
    Anonymous,
}

/// SQLite: 64 rows per statement, and the rest in statements of 32, 16, ... 1 rows, so that
/// every statement text is one of seven, each prepared once per connection (sqlx caches
/// them). With anonymous parameters, binding is linear, and preparing is paid once, so
/// longer statements no longer cost more than they save (at 25 rows with numbered
/// parameters they did: binding was quadratic and the last statement of each batch was
/// prepared anew). Measured with `bench/callgrind.sh` (release build, a batch per second,
/// ~100-200 rows each): see `bench/RESULTS.md`, 2026-12-07.
pub(super) const SQLITE_INSERT: InsertPlan = InsertPlan {
    rows: 64,
    placeholders: Placeholders::Anonymous,
    power_of_two_tail: true,
};

/// Rows per multi-row `INSERT` on PostgreSQL: 17 × 1,000 = 17,000 parameters, within its
/// 65,535, so a default batch is one statement. Fewer statements matter more than their
/// size there: sqlx 0.9.0 leaves Nagle's algorithm on (transact-rs/sqlx#4335), and some
/// statement sizes wait for a delayed ACK, about 40 ms each. Measured (debug build, 1,000
/// rows): one row per statement 500 ms, 100 rows 450 ms, 1,000 rows 40 ms. Release build:
/// 55-65 ms per 1,000 rows on loopback, most of it that one stall.
pub(super) const POSTGRES_INSERT: InsertPlan = InsertPlan {
    rows: 1_000,
    placeholders: Placeholders::Numbered,
    power_of_two_tail: false,
};

/// How a batch of `n` records is cut into statements: their row counts, in order.
pub(super) fn chunk_rows(plan: InsertPlan, n: usize) -> impl Iterator<Item = usize> {
    let full = n / plan.rows;
    let tail = n % plan.rows;
    let tail: Vec<usize> = if plan.power_of_two_tail {
        (0..usize::BITS)
            .rev()
            .map(|k| 1usize << k)
            .filter(|bit| tail & bit != 0)
            .collect()
    } else if tail > 0 {
        vec![tail]
    } else {
        Vec::new()
    };
    std::iter::repeat_n(plan.rows, full).chain(tail)
}

/// `INSERT INTO usage_records (...) VALUES ($1, ...), ...` for `rows` records.
pub(super) fn insert_sql(rows: usize, placeholders: Placeholders) -> String {
    let mut sql = String::with_capacity(64 + rows * COLUMNS.len() * 6);
    sql.push_str("INSERT INTO usage_records (");
    sql.push_str(&COLUMNS.join(", "));
    sql.push_str(") VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..COLUMNS.len() {
            n += 1;
            if col > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => {
                    let _ = write!(sql, "${n}");
                }
                Placeholders::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// The report statement for `q`; the caller binds `since_ms`, `until_ms`, then the client
/// and the deployment when `q` has them, in that order. Only the filters given appear in
/// the `WHERE` clause, so the `(client, time_ms)` and `(deployment, time_ms)` indexes serve.
pub(super) fn report_sql(q: &UsageQuery) -> String {
    let key = match q.by.bucket_ms() {
        // Floor to the bucket, also before 1970: both databases truncate `/` and `%`
        // toward zero.
        Some(b) => format!("time_ms - (((time_ms % {b}) + {b}) % {b})"),
        None => q.by.column().to_owned(),
    };
    let mut sql = format!(
        "SELECT {key} AS k, COUNT(*) AS requests, \
         CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
         CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens, \
         CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
         CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens, \
         CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd \
         FROM usage_records WHERE time_ms >= $1 AND time_ms < $2"
    );
    let mut n = 2;
    if q.client.is_some() {
        n += 1;
        let _ = write!(sql, " AND client = ${n}");
    }
    if q.deployment.is_some() {
        n += 1;
        let _ = write!(sql, " AND deployment = ${n}");
    }
    sql.push_str(" GROUP BY 1");
    sql
}

/// A time bucket's start as its report key: `2026-12-01` or `2026-12-01T13:00:00Z`.
pub(super) fn bucket_key(by: GroupBy, start_ms: i64) -> Result<String, StoreError> {
    let dt = time::OffsetDateTime::from_unix_timestamp(start_ms.div_euclid(1000))
        .map_err(|_| StoreError::Corrupt(format!("usage time {start_ms} ms is out of range")))?;
    let date = format!(
        "{:04}-{:02}-{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day()
    );
    Ok(match by {
        GroupBy::Hour => format!("{date}T{:02}:00:00Z", dt.hour()),
        _ => date,
    })
}

/// Rows in report order: time buckets ascending; other keys in byte order, `None` last.
pub(super) fn sort_rows(by: GroupBy, rows: &mut [(i64, UsageRow)]) {
    if by.bucket_ms().is_some() {
        rows.sort_by_key(|(bucket, _)| *bucket);
    } else {
        rows.sort_by(|(_, a), (_, b)| cmp_keys(&a.key, &b.key));
    }
}

/// Keys in byte order (not the database's collation), `None` last.
fn cmp_keys(a: &Option<String>, b: &Option<String>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// The series statement for `q`; the caller binds `since_ms`, `until_ms`, `bucket_ms`,
/// then the client and the deployment when `q` has them, in that order. Column `b` is the
/// bucket's index from `since_ms` (records before `since_ms` are not selected, so integer
/// division is the floor); `k` is the split column, absent when not split.
pub(super) fn series_sql(q: &SeriesQuery) -> String {
    let key = match q.split {
        Some(split) => format!(", {} AS k", split.column()),
        None => String::new(),
    };
    let mut sql = format!(
        "SELECT (time_ms - $1) / $3 AS b{key}, COUNT(*) AS requests, \
         CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
         CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
         CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd, \
         CAST(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT) AS errors \
         FROM usage_records WHERE time_ms >= $1 AND time_ms < $2"
    );
    let mut n = 3;
    if q.client.is_some() {
        n += 1;
        let _ = write!(sql, " AND client = ${n}");
    }
    if q.deployment.is_some() {
        n += 1;
        let _ = write!(sql, " AND deployment = ${n}");
    }
    sql.push_str(if q.split.is_some() {
        " GROUP BY 1, 2"
    } else {
        " GROUP BY 1"
    });
    sql
}

/// Points in series order: bucket, then key (byte order, `None` last).
pub(super) fn sort_points(points: &mut [SeriesPoint]) {
    points.sort_by(|a, b| {
        a.bucket_start_ms
            .cmp(&b.bucket_start_ms)
            .then_with(|| cmp_keys(&a.key, &b.key))
    });
}

/// Implements [`UsageStore`] for `$store` (fields `pool: sqlx::Pool<_>`, `scrub:
/// Scrubber`) with the statements above, cut into `INSERT`s as `$plan` says.
macro_rules! impl_usage_store {
    ($store:ident, $plan:expr) => {
        impl $crate::store::usage::UsageStore for $store {
            fn insert_usage<'a>(
                &'a self,
                records: &'a [$crate::store::usage::UsageRecord],
            ) -> $crate::store::BoxFuture<'a, Result<(), $crate::store::StoreError>> {
                Box::pin(async move {
                    use $crate::store::usage::{chunk_rows, insert_sql};
                    const PLAN: $crate::store::usage::InsertPlan = $plan;
                    if records.is_empty() {
                        return Ok(());
                    }
                    let err = |e| self.scrub.error(e);
                    let full = (records.len() >= PLAN.rows)
                        .then(|| insert_sql(PLAN.rows, PLAN.placeholders));
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    let mut rest = records;
                    for rows in chunk_rows(PLAN, records.len()) {
                        let (chunk, after) = rest.split_at(rows);
                        rest = after;
                        // Full chunks reuse one prepared statement, and so do the tail's
                        // with a power-of-two tail; a tail of any length is not cached (its
                        // length varies from batch to batch).
                        let (sql, persistent) = match &full {
                            Some(full) if rows == PLAN.rows => (full.clone(), true),
                            _ => (insert_sql(rows, PLAN.placeholders), PLAN.power_of_two_tail),
                        };
                        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent);
                        for r in chunk {
                            q = q
                                .bind(r.time_ms)
                                .bind(r.request_id.as_str())
                                .bind(r.client.as_str())
                                .bind(r.subject.as_deref())
                                .bind(r.key_id.as_deref())
                                .bind(r.operation.as_str())
                                .bind(r.deployment.as_deref())
                                .bind(r.backend.as_deref())
                                .bind(r.prompt_tokens)
                                .bind(r.cached_tokens)
                                .bind(r.completion_tokens)
                                .bind(r.reasoning_tokens)
                                .bind(r.estimated_tokens)
                                .bind(r.usage_source.as_str())
                                .bind(r.cost_usd)
                                .bind(r.status)
                                .bind(r.stream);
                        }
                        q.execute(&mut *tx).await.map_err(err)?;
                    }
                    tx.commit().await.map_err(err)
                })
            }

            fn usage_report<'a>(
                &'a self,
                query: &'a $crate::store::usage::UsageQuery,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<Vec<$crate::store::usage::UsageRow>, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    use sqlx::Row as _;
                    use $crate::store::usage::{bucket_key, report_sql, sort_rows, GroupBy};
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(report_sql(query)))
                        .bind(query.since_ms)
                        .bind(query.until_ms);
                    if let Some(c) = &query.client {
                        q = q.bind(c.as_str());
                    }
                    if let Some(d) = &query.deployment {
                        q = q.bind(d.as_str());
                    }
                    let rows = q
                        .fetch_all(&self.pool)
                        .await
                        .map_err(|e| self.scrub.error(e))?;
                    let get =
                        |e: sqlx::Error| $crate::store::StoreError::Corrupt(self.scrub.scrub(e));
                    let time = matches!(query.by, GroupBy::Day | GroupBy::Hour);
                    let mut out = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let (bucket, key) = if time {
                            let start: i64 = row.try_get("k").map_err(get)?;
                            (start, Some(bucket_key(query.by, start)?))
                        } else {
                            (0, row.try_get::<Option<String>, _>("k").map_err(get)?)
                        };
                        let prompt_tokens: i64 = row.try_get("prompt_tokens").map_err(get)?;
                        let completion_tokens: i64 =
                            row.try_get("completion_tokens").map_err(get)?;
                        out.push((
                            bucket,
                            $crate::store::usage::UsageRow {
                                key,
                                requests: row.try_get("requests").map_err(get)?,
                                prompt_tokens,
                                cached_tokens: row.try_get("cached_tokens").map_err(get)?,
                                completion_tokens,
                                reasoning_tokens: row.try_get("reasoning_tokens").map_err(get)?,
                                total_tokens: prompt_tokens.saturating_add(completion_tokens),
                                cost_usd: row.try_get("cost_usd").map_err(get)?,
                            },
                        ));
                    }
                    sort_rows(query.by, &mut out);
                    Ok(out.into_iter().map(|(_, r)| r).collect())
                })
            }

            fn usage_series<'a>(
                &'a self,
                query: &'a $crate::store::usage::SeriesQuery,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<Vec<$crate::store::usage::SeriesPoint>, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    use sqlx::Row as _;
                    use $crate::store::usage::{series_sql, sort_points, SeriesPoint};
                    query.buckets()?;
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(series_sql(query)))
                        .bind(query.since_ms)
                        .bind(query.until_ms)
                        .bind(query.bucket_ms);
                    if let Some(c) = &query.client {
                        q = q.bind(c.as_str());
                    }
                    if let Some(d) = &query.deployment {
                        q = q.bind(d.as_str());
                    }
                    let rows = q
                        .fetch_all(&self.pool)
                        .await
                        .map_err(|e| self.scrub.error(e))?;
                    let get =
                        |e: sqlx::Error| $crate::store::StoreError::Corrupt(self.scrub.scrub(e));
                    let mut out = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let key = match query.split {
                            Some(_) => row.try_get::<Option<String>, _>("k").map_err(get)?,
                            None => None,
                        };
                        let prompt_tokens: i64 = row.try_get("prompt_tokens").map_err(get)?;
                        let completion_tokens: i64 =
                            row.try_get("completion_tokens").map_err(get)?;
                        out.push(SeriesPoint {
                            bucket_start_ms: query.bucket_start(row.try_get("b").map_err(get)?)?,
                            key,
                            requests: row.try_get("requests").map_err(get)?,
                            prompt_tokens,
                            completion_tokens,
                            total_tokens: prompt_tokens.saturating_add(completion_tokens),
                            cost_usd: row.try_get("cost_usd").map_err(get)?,
                            errors: row.try_get("errors").map_err(get)?,
                        });
                    }
                    sort_points(&mut out);
                    Ok(out)
                })
            }
        }
    };
}

pub(super) use impl_usage_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_number_every_parameter() {
        let sql = insert_sql(2, Placeholders::Numbered);
        assert!(sql.starts_with("INSERT INTO usage_records (time_ms, request_id, client,"));
        assert!(sql.contains("stream) VALUES ($1, $2,"), "{sql}");
        assert!(sql.ends_with("$33, $34)"), "{sql}");
        let sql = insert_sql(2, Placeholders::Anonymous);
        assert!(sql.contains("stream) VALUES (?, ?,"), "{sql}");
        assert!(
            sql.ends_with("?, ?), (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            "{sql}"
        );
        assert_eq!(sql.matches('?').count(), 2 * COLUMNS.len());
    }

    #[test]
    fn batches_are_cut_into_few_statement_sizes() {
        let rows = |plan, n| chunk_rows(plan, n).collect::<Vec<_>>();
        assert_eq!(rows(SQLITE_INSERT, 0), Vec::<usize>::new());
        assert_eq!(rows(SQLITE_INSERT, 1), [1]);
        assert_eq!(rows(SQLITE_INSERT, 64), [64]);
        assert_eq!(rows(SQLITE_INSERT, 64 * 2 + 37), [64, 64, 32, 4, 1]);
        assert_eq!(rows(POSTGRES_INSERT, 2_500), [1_000, 1_000, 500]);
        assert_eq!(rows(POSTGRES_INSERT, 7), [7]);
        for n in 0..300 {
            assert_eq!(rows(SQLITE_INSERT, n).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn reports_filter_only_on_what_is_given() {
        let mut q = UsageQuery {
            client: None,
            deployment: Some("gpt-4o".into()),
            since_ms: 0,
            until_ms: 1,
            by: GroupBy::Client,
        };
        let sql = report_sql(&q);
        assert!(sql.starts_with("SELECT client AS k,"), "{sql}");
        assert!(
            sql.ends_with("time_ms < $2 AND deployment = $3 GROUP BY 1"),
            "{sql}"
        );
        q.client = Some("a".into());
        q.by = GroupBy::Hour;
        let sql = report_sql(&q);
        assert!(sql.contains("% 3600000"), "{sql}");
        assert!(
            sql.ends_with("client = $3 AND deployment = $4 GROUP BY 1"),
            "{sql}"
        );
    }

    #[test]
    fn series_bind_the_bucket_third_and_group_by_the_split() {
        let mut q = SeriesQuery {
            client: Some("a".into()),
            deployment: None,
            since_ms: 0,
            until_ms: 10,
            bucket_ms: 5,
            split: None,
        };
        let sql = series_sql(&q);
        assert!(
            sql.starts_with("SELECT (time_ms - $1) / $3 AS b, COUNT(*)"),
            "{sql}"
        );
        assert!(
            sql.ends_with("time_ms < $2 AND client = $4 GROUP BY 1"),
            "{sql}"
        );
        q.deployment = Some("gpt-4o".into());
        q.split = Some(Split::Deployment);
        let sql = series_sql(&q);
        assert!(sql.starts_with("SELECT (time_ms - $1) / $3 AS b, deployment AS k,"));
        assert!(
            sql.ends_with("client = $4 AND deployment = $5 GROUP BY 1, 2"),
            "{sql}"
        );
    }

    #[test]
    fn series_windows_are_checked() {
        let q = |since_ms, until_ms, bucket_ms| SeriesQuery {
            client: None,
            deployment: None,
            since_ms,
            until_ms,
            bucket_ms,
            split: None,
        };
        let hour = 3_600_000;
        assert_eq!(q(7, 7 + 24 * hour, hour).buckets().unwrap(), 24);
        // A partial last bucket counts.
        assert_eq!(q(0, 90 * 60_000, hour).buckets().unwrap(), 2);
        assert_eq!(q(0, 1_000, 1).buckets().unwrap(), 1_000);
        assert_eq!(q(-5, 5, 10).buckets().unwrap(), 1);
        for bad in [
            q(0, 1_001, 1),
            q(0, 10, 0),
            q(0, 10, -1),
            q(10, 10, 1),
            q(11, 10, 1),
            q(i64::MIN, i64::MAX, i64::MAX),
        ] {
            let e = bad.buckets().unwrap_err();
            assert!(matches!(e, StoreError::Invalid(_)), "{bad:?}: {e:?}");
        }
        let w = q(1_000, 2_000, 300);
        assert_eq!(w.bucket_start(0).unwrap(), 1_000);
        assert_eq!(w.bucket_start(3).unwrap(), 1_900);
        assert!(w.bucket_start(4).is_err());
        assert!(w.bucket_start(-1).is_err());
        assert!(w.bucket_start(i64::MAX).is_err());
    }

    #[test]
    fn bucket_keys_are_utc_dates_and_hours() {
        // 2026-12-01T00:00:00Z
        let midnight = 1_796_083_200_000;
        assert_eq!(bucket_key(GroupBy::Day, midnight).unwrap(), "2026-12-01");
        assert_eq!(
            bucket_key(GroupBy::Hour, midnight + 13 * 3_600_000).unwrap(),
            "2026-12-01T13:00:00Z"
        );
        assert_eq!(bucket_key(GroupBy::Day, -86_400_000).unwrap(), "1969-12-31");
    }
}
