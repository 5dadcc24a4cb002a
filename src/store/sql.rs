//! The SQL both backends run, and the one [`KeyStore`](super::KeyStore) implementation
//! written over it.
//!
//! The statements are the same text on SQLite and PostgreSQL (`$N` placeholders work in
//! both; `RETURNING` and `CASE` too), so the implementation is written once, as
//! [`impl_key_store!`], and instantiated for each driver's pool type in `sqlite.rs` and
//! `postgres.rs`. A macro rather than generics: sqlx's executor bounds over a generic
//! database make `Send` futures hard to prove, and each instance here is plain code.
//!
//! Every mutation starts its transaction by bumping the revision. On PostgreSQL that row
//! lock serialises mutations; on SQLite it takes the write lock up front, so the
//! transaction never has to upgrade a read lock (which SQLite cannot wait for).

pub(super) const REVISION: &str = "SELECT revision FROM api_keys_revision WHERE id = 1";

pub(super) const BUMP_REVISION: &str =
    "UPDATE api_keys_revision SET revision = revision + 1 WHERE id = 1";

pub(super) const SELECT_ALL: &str = "SELECT id, client, name, hmac, created_at, expires_at, \
     revoked_at, last_used_at FROM api_keys ORDER BY created_at, id";

pub(super) const SELECT_CLIENT: &str = "SELECT id, client, name, hmac, created_at, \
     expires_at, revoked_at, last_used_at FROM api_keys WHERE client = $1 \
     ORDER BY created_at, id";

pub(super) const INSERT: &str = "INSERT INTO api_keys (id, client, name, hmac, created_at, \
     expires_at, revoked_at, last_used_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// `$1` id, `$2` now. A key already revoked keeps its first revocation time.
pub(super) const REVOKE: &str = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) \
     WHERE id = $1 RETURNING id, client, name, hmac, created_at, expires_at, revoked_at, \
     last_used_at";

/// `$1` client, `$2` the new key's id, `$3` grace_until, `$4` now: the client's other keys
/// active at `now` expire at `grace_until` at the latest.
pub(super) const ROLL: &str = "UPDATE api_keys SET expires_at = CASE \
     WHEN expires_at IS NULL OR expires_at > $3 THEN $3 ELSE expires_at END \
     WHERE client = $1 AND id <> $2 AND revoked_at IS NULL \
     AND (expires_at IS NULL OR expires_at > $4) \
     RETURNING id, client, name, hmac, created_at, expires_at, revoked_at, last_used_at";

/// `$1` id, `$2` time: only ever moves `last_used_at` forward (several gateways write it).
pub(super) const LAST_USED: &str = "UPDATE api_keys SET last_used_at = $2 \
     WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)";

/// Implements [`KeyStore`](super::KeyStore) for `$store`, a struct with fields
/// `pool: sqlx::Pool<$db>` and `scrub: Scrubber`, using the statements above.
macro_rules! impl_key_store {
    ($store:ident, $db:ty, $backend:literal) => {
        impl $store {
            fn record(
                &self,
                row: &<$db as sqlx::Database>::Row,
            ) -> Result<$crate::store::KeyRecord, $crate::store::StoreError> {
                use sqlx::Row as _;
                let get = |e: sqlx::Error| $crate::store::StoreError::Corrupt(self.scrub.scrub(e));
                let id: String = row.try_get("id").map_err(get)?;
                let hmac: Vec<u8> = row.try_get("hmac").map_err(get)?;
                let hmac: [u8; 32] = hmac.try_into().map_err(|_| {
                    $crate::store::StoreError::Corrupt(format!(
                        "key '{}' has an HMAC that is not 32 bytes",
                        id.escape_default()
                    ))
                })?;
                Ok($crate::store::KeyRecord {
                    client: row.try_get("client").map_err(get)?,
                    name: row.try_get("name").map_err(get)?,
                    hmac,
                    created_at: row.try_get("created_at").map_err(get)?,
                    expires_at: row.try_get("expires_at").map_err(get)?,
                    revoked_at: row.try_get("revoked_at").map_err(get)?,
                    last_used_at: row.try_get("last_used_at").map_err(get)?,
                    id,
                })
            }

            fn records(
                &self,
                rows: &[<$db as sqlx::Database>::Row],
            ) -> Result<Vec<$crate::store::KeyRecord>, $crate::store::StoreError> {
                rows.iter().map(|r| self.record(r)).collect()
            }
        }

        impl $crate::store::KeyStore for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn revision(
                &self,
            ) -> $crate::store::BoxFuture<'_, Result<i64, $crate::store::StoreError>> {
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>($crate::store::sql::REVISION)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| self.scrub.error(e))
                })
            }

            fn load(
                &self,
            ) -> $crate::store::BoxFuture<
                '_,
                Result<$crate::store::KeySet, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    let revision = self.revision().await?;
                    let rows = sqlx::query($crate::store::sql::SELECT_ALL)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(|e| self.scrub.error(e))?;
                    Ok($crate::store::KeySet {
                        revision,
                        keys: self.records(&rows)?,
                    })
                })
            }

            fn list<'a>(
                &'a self,
                client: Option<&'a str>,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<Vec<$crate::store::KeyRecord>, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    let rows = match client {
                        Some(c) => {
                            sqlx::query($crate::store::sql::SELECT_CLIENT)
                                .bind(c)
                                .fetch_all(&self.pool)
                                .await
                        }
                        None => {
                            sqlx::query($crate::store::sql::SELECT_ALL)
                                .fetch_all(&self.pool)
                                .await
                        }
                    }
                    .map_err(|e| self.scrub.error(e))?;
                    self.records(&rows)
                })
            }

            fn insert<'a>(
                &'a self,
                key: &'a $crate::store::KeyRecord,
            ) -> $crate::store::BoxFuture<'a, Result<(), $crate::store::StoreError>> {
                Box::pin(async move {
                    let err = |e| self.scrub.error(e);
                    let mut tx = self.begin_change().await.map_err(err)?;
                    Self::insert_in(&mut tx, key).await.map_err(err)?;
                    tx.commit().await.map_err(err)
                })
            }

            fn revoke<'a>(
                &'a self,
                id: &'a str,
                now: i64,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<Option<$crate::store::KeyRecord>, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    let err = |e| self.scrub.error(e);
                    let mut tx = self.begin_change().await.map_err(err)?;
                    let row = sqlx::query($crate::store::sql::REVOKE)
                        .bind(id)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(err)?;
                    match row {
                        Some(row) => {
                            let record = self.record(&row)?;
                            tx.commit().await.map_err(err)?;
                            Ok(Some(record))
                        }
                        // Nothing changed: roll the revision bump back.
                        None => Ok(None),
                    }
                })
            }

            fn rotate<'a>(
                &'a self,
                new: &'a $crate::store::KeyRecord,
                now: i64,
                grace_until: i64,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<Vec<$crate::store::KeyRecord>, $crate::store::StoreError>,
            > {
                Box::pin(async move {
                    let err = |e| self.scrub.error(e);
                    let mut tx = self.begin_change().await.map_err(err)?;
                    Self::insert_in(&mut tx, new).await.map_err(err)?;
                    let rows = sqlx::query($crate::store::sql::ROLL)
                        .bind(new.client.as_str())
                        .bind(new.id.as_str())
                        .bind(grace_until)
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(err)?;
                    let mut rolled = self.records(&rows)?;
                    tx.commit().await.map_err(err)?;
                    rolled.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
                    Ok(rolled)
                })
            }

            fn record_last_used<'a>(
                &'a self,
                used: &'a [(std::sync::Arc<str>, i64)],
            ) -> $crate::store::BoxFuture<'a, Result<(), $crate::store::StoreError>> {
                Box::pin(async move {
                    if used.is_empty() {
                        return Ok(());
                    }
                    let err = |e| self.scrub.error(e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    for (id, at) in used {
                        sqlx::query($crate::store::sql::LAST_USED)
                            .bind(&**id)
                            .bind(*at)
                            .execute(&mut *tx)
                            .await
                            .map_err(err)?;
                    }
                    tx.commit().await.map_err(err)
                })
            }

            fn close(&self) -> $crate::store::BoxFuture<'_, ()> {
                Box::pin(self.pool.close())
            }
        }

        impl $store {
            /// A transaction for a change running gateways must notice: the revision they
            /// poll is bumped inside it (rolled back with it when nothing changes).
            async fn begin_change(&self) -> Result<sqlx::Transaction<'static, $db>, sqlx::Error> {
                let mut tx = self.pool.begin().await?;
                sqlx::query($crate::store::sql::BUMP_REVISION)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }

            async fn insert_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                key: &$crate::store::KeyRecord,
            ) -> Result<(), sqlx::Error> {
                sqlx::query($crate::store::sql::INSERT)
                    .bind(key.id.as_str())
                    .bind(key.client.as_str())
                    .bind(key.name.as_deref())
                    .bind(&key.hmac[..])
                    .bind(key.created_at)
                    .bind(key.expires_at)
                    .bind(key.revoked_at)
                    .bind(key.last_used_at)
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
            }
        }
    };
}

pub(super) use impl_key_store;
