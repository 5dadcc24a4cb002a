//! A fresh PostgreSQL database per test, so tests run in parallel against the real server.
//!
//! The server comes from `PORTCULLIS_TEST_POSTGRES_URL` (default: the local trust-auth
//! server). Each [`TestDb`] creates a database with a random name and drops it (with
//! `FORCE`, closing connections left open) when dropped, even if the test panicked.

use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The server the tests use.
pub fn server_url() -> String {
    std::env::var("PORTCULLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(path_start);
    let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
    format!("{scheme}://{authority}/{db}{query}")
}

pub struct TestDb {
    /// URL of the new database.
    pub url: String,
    pub name: String,
    admin: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = server_url();
        let name = format!("portcullis_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} (PORTCULLIS_TEST_POSTGRES_URL): {e}")
        });
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        }
    }

    /// A connection to the server's admin database.
    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin).await.unwrap()
    }

    /// Run one statement on the server's admin database (e.g. to cut this database off).
    pub async fn admin_sql(&self, sql: &str) {
        let mut conn = self.admin().await;
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
}

impl Drop for TestDb {
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
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = done.join();
    }
}
