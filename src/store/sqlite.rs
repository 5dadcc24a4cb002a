//! The SQLite backend: a file next to the configuration (WAL, created on first start) or
//! a database in memory held by one connection.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::ConnectOptions as _;
use sqlx::SqlitePool;

use super::error::Scrubber;
use super::sql::impl_key_store;
use super::usage::impl_usage_store;
use super::StoreError;

static MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

/// An SQLite-backed [`KeyStore`](super::KeyStore) and [`UsageStore`](super::UsageStore).
pub(super) struct SqliteStore {
    pool: SqlitePool,
    scrub: Scrubber,
}

impl_usage_store!(SqliteStore, super::usage::SQLITE_INSERT);
impl_key_store!(SqliteStore, sqlx::Sqlite, "sqlite");

/// Where an `sqlite:` URL points.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Memory,
    File(PathBuf),
}

fn target(url: &str, base_dir: &Path) -> Result<Target, StoreError> {
    let bad = |reason: &str| StoreError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| bad("not an sqlite: URL"))?;
    if rest == ":memory:" {
        return Ok(Target::Memory);
    }
    if rest.contains(['?', '#']) {
        return Err(bad("query parameters are not supported; give a file path"));
    }
    if rest.is_empty() {
        return Err(bad("no file name (e.g. sqlite://portcullis.db)"));
    }
    let path = Path::new(rest);
    Ok(Target::File(if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }))
}

/// The file an `sqlite:` URL names, `None` for an in-memory database.
pub(super) fn file(url: &str, base_dir: &Path) -> Result<Option<PathBuf>, StoreError> {
    Ok(match target(url, base_dir)? {
        Target::Memory => None,
        Target::File(path) => Some(path),
    })
}

pub(super) async fn open(url: &str, base_dir: &Path) -> Result<SqliteStore, StoreError> {
    let shown = url.to_owned();
    let open_err = |e: sqlx::Error| StoreError::Open {
        url: shown.clone(),
        detail: e.to_string(),
    };
    let pool = match target(url, base_dir)? {
        Target::Memory => {
            let options = SqliteConnectOptions::from_str("sqlite::memory:")
                .map_err(open_err)?
                .disable_statement_logging();
            // One connection that never closes: the database lives exactly as long as it.
            SqlitePoolOptions::new()
                .min_connections(1)
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .map_err(open_err)?
        }
        Target::File(path) => {
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .disable_statement_logging();
            SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| StoreError::Open {
                    url: format!("{shown} ({})", path.display()),
                    detail: e.to_string(),
                })?
        }
    };
    MIGRATIONS
        .run(&pool)
        .await
        .map_err(|e| StoreError::Migrate {
            url: shown.clone(),
            detail: e.to_string(),
        })?;
    Ok(SqliteStore {
        pool,
        scrub: Scrubber::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_against_the_config_directory() {
        let base = Path::new("/etc/portcullis");
        assert_eq!(
            target("sqlite://keys.db", base).unwrap(),
            Target::File("/etc/portcullis/keys.db".into())
        );
        assert_eq!(
            target("sqlite:data/keys.db", base).unwrap(),
            Target::File("/etc/portcullis/data/keys.db".into())
        );
        assert_eq!(
            target("sqlite:///var/lib/keys.db", base).unwrap(),
            Target::File("/var/lib/keys.db".into())
        );
        assert_eq!(target("sqlite::memory:", base).unwrap(), Target::Memory);
        assert_eq!(target("sqlite://:memory:", base).unwrap(), Target::Memory);
        assert!(target("sqlite://", base).is_err());
        assert!(target("sqlite://keys.db?mode=ro", base).is_err());
    }
}
