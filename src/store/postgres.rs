//! The PostgreSQL backend: a small pool, TLS through rustls when the URL asks for it.
//!
//! Several gateways may share one database: migrations take PostgreSQL's advisory lock, and
//! every mutation serialises on the revision row.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use sqlx::{ConnectOptions as _, Connection as _};

use super::error::{redact_url, Scrubber};
use super::sql::impl_key_store;
use super::usage::impl_usage_store;
use super::StoreError;

/// How long opening (and later, taking a connection from the pool) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// A PostgreSQL-backed [`KeyStore`](super::KeyStore) and [`UsageStore`](super::UsageStore).
pub(super) struct PostgresStore {
    pool: PgPool,
    scrub: Scrubber,
}

impl_usage_store!(PostgresStore, super::usage::POSTGRES_INSERT);
impl_key_store!(PostgresStore, sqlx::Postgres, "postgres");

pub(super) async fn open(url: &str) -> Result<PostgresStore, StoreError> {
    let scrub = Scrubber::for_url(url);
    let shown = redact_url(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Url {
            url: shown.clone(),
            reason: scrub.scrub(e),
        })?
        .application_name("portcullis")
        .disable_statement_logging();
    let open_err = |detail: String| StoreError::Open {
        url: shown.clone(),
        detail,
    };
    // One direct connection first: a pool would only say it timed out, this says why
    // (refused, unknown host, authentication failed).
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
        .await
        .map_err(|_| open_err(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| open_err(scrub.scrub(e)))?;
    let _ = probe.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| open_err(scrub.scrub(e)))?;
    MIGRATIONS
        .run(&pool)
        .await
        .map_err(|e| StoreError::Migrate {
            url: shown.clone(),
            detail: scrub.scrub(e),
        })?;
    Ok(PostgresStore { pool, scrub })
}
