//! Persistence for the validator: one set of portable SQL migrations and
//! queries over sqlx's `Any` driver, so the same code runs on the embedded
//! SQLite file and on a PostgreSQL shared by validator replicas.

pub mod ledger;
mod migrate;
mod sql;
mod writer;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sluice_proto::keys;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new unique id, 24 hex digits, that sorts by creation time: the
/// milliseconds since the epoch (48 bits), then 48 random bits. Keys that
/// grow with time land on the last pages of their indexes, so a batch of
/// requests writes a few pages instead of one per row and index.
pub fn time_ordered_id() -> String {
    let mut b = [0u8; 12];
    b[..6].copy_from_slice(&(now_ms() as u64).to_be_bytes()[2..]);
    rand::thread_rng().fill_bytes(&mut b[6..]);
    sluice_proto::hex_lower(&b)
}

/// Which SQL server is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub user_id: String,
    pub name: String,
    pub tier: String,
    pub secret_hash: String,
    pub revoked: bool,
}

impl KeyRecord {
    /// Constant-time check of a presented secret against the stored hash.
    pub fn matches(&self, secret: &str) -> bool {
        let presented = keys::hash_secret(secret);
        presented
            .as_bytes()
            .ct_eq(self.secret_hash.as_bytes())
            .into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chute {
    pub model_id: String,
    pub engine: String,
    pub source: String,
    pub concurrency: i64,
    pub price_in_micros: i64,
    pub price_out_micros: i64,
    pub created_ms: i64,
}

/// Metadata of one finished (or failed) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub id: String,
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    pub kind: String,
    pub stream: bool,
    pub miner_key: Option<String>,
    pub status: String,
    pub http_status: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub attempts: i64,
    pub queue_ms: i64,
    pub ttft_ms: Option<i64>,
    pub latency_ms: i64,
    pub created_ms: i64,
    /// What the request cost, in pico-dollars.
    pub cost: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite files: the thread that commits per-request writes in batches.
    writer: Option<std::sync::Arc<writer::Writer>>,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Store {
    /// Whether the SQLite ledger writer is too far behind to take more
    /// requests (see `Writer::backlogged`). Always false on PostgreSQL,
    /// whose writes wait for a pooled connection instead.
    pub fn ledger_backlogged(&self) -> bool {
        self.writer.as_ref().is_some_and(|w| w.backlogged())
    }

    /// Times the SQLite ledger writer's quiet thread handed the connection
    /// to its catch-up thread or back (see `Writer::handovers`): it rises
    /// while other work keeps the cores busy. Always 0 on PostgreSQL.
    pub fn ledger_handovers(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.handovers())
    }

    /// Opens (creating if needed) the SQLite database of a data dir.
    pub async fn open_data_dir(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Invalid(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join("sluice.db");
        Store::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Opens a `sqlite://` or `postgres://` URL and applies migrations.
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with(url, writer::Relay::DEFAULT).await
    }

    /// [`Store::open`] with the SQLite writer threads handing over at
    /// `relay`'s thresholds.
    pub(crate) async fn open_with(url: &str, relay: writer::Relay) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Invalid(format!(
                "unsupported database URL (use sqlite:// or postgres://): {}",
                redact(url)
            )));
        };
        let mut options =
            AnyPoolOptions::new().max_connections(if backend == Backend::Sqlite { 4 } else { 16 });
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    // With WAL, NORMAL is safe against process crashes (a
                    // power loss may drop the last commits); FULL would
                    // fsync on every request's writes.
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await?;
        if backend == Backend::Sqlite {
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        migrate::run(&pool, backend).await?;
        let writer = match backend {
            Backend::Sqlite => {
                writer::Writer::start_with(url, writer::WAL_LIMIT, relay)?.map(std::sync::Arc::new)
            }
            Backend::Postgres => None,
        };
        Ok(Store {
            pool,
            backend,
            writer,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Commits what the ledger writer holds and, on SQLite, copies the
    /// write-ahead log into the database file and empties it (the file alone
    /// then holds everything, to copy or back up), then closes the pool.
    /// From then on the writer writes no reservation rows of its own:
    /// reservations not yet written are dropped, as a crash drops them
    /// (nothing is charged for them, and there is nothing to release), so a
    /// store opened again on the same database and recovering this one's
    /// reservations finds them all.
    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            if let Err(e) = w.call(writer::Op::Close).await {
                tracing::error!(error = %e, "could not close the ledger writer (what it held may not be committed)");
            }
        }
        self.pool.close().await;
    }

    /// Resolves once the ledger writer's connection is closed (at once
    /// without one, on PostgreSQL), which happens after [`Store::close`]
    /// when every clone of this store is dropped. Holds no clone: take it
    /// before dropping them. A process that waits for it before exiting
    /// leaves no `-wal` file next to the database.
    pub fn ledger_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let closed = self.writer.as_ref().map(|w| w.closed());
        async move {
            if let Some(closed) = closed {
                closed.await;
            }
        }
    }

    // ---- users and keys ----

    pub async fn create_user(&self, name: &str, tier: &str) -> Result<String> {
        if !matches!(tier, "free" | "paid") {
            return Err(StoreError::Invalid(format!(
                "tier must be `free` or `paid`, not `{tier}`"
            )));
        }
        let id = format!("u_{}", random_hex(8));
        sqlx::query("INSERT INTO users (id, name, tier, created_ms) VALUES ($1, $2, $3, $4)")
            .bind(&id)
            .bind(name)
            .bind(tier)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    /// Creates a key for a user; returns (key id, full key). The full key
    /// is never stored and cannot be recovered.
    pub async fn create_key(&self, user_id: &str, name: &str) -> Result<(String, String)> {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut id);
        rand::thread_rng().fill_bytes(&mut secret);
        let (id, secret) = keys::key_from_bytes(id, secret);
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, secret_hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(keys::hash_secret(&secret))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let full = keys::format_key(&id, &secret);
        Ok((id, full))
    }

    pub async fn find_key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        let sql = format!("{KEY_SELECT} WHERE k.id = $1");
        let row = sqlx::query(&sql)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_record).transpose()
    }

    /// Checks a full presented key; `None` if unknown, revoked or wrong.
    pub async fn verify_key(&self, presented: &str) -> Result<Option<KeyRecord>> {
        let Ok(parsed) = keys::parse_key(presented) else {
            return Ok(None);
        };
        Ok(self
            .find_key(parsed.id)
            .await?
            .filter(|k| !k.revoked && k.matches(parsed.secret)))
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        let sql = format!("{KEY_SELECT} ORDER BY k.created_ms");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(key_record).collect()
    }

    pub async fn revoke_key(&self, key_id: &str) -> Result<()> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now_ms())
                .bind(key_id)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("active key {key_id}")));
        }
        Ok(())
    }

    // ---- chutes ----

    /// Inserts a chute, leaving an existing one with the same id untouched.
    pub async fn ensure_chute(&self, chute: &Chute) -> Result<()> {
        sqlx::query(
            "INSERT INTO chutes (model_id, engine, source, concurrency, price_in_micros, price_out_micros, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (model_id) DO NOTHING",
        )
        .bind(&chute.model_id)
        .bind(&chute.engine)
        .bind(&chute.source)
        .bind(chute.concurrency)
        .bind(chute.price_in_micros)
        .bind(chute.price_out_micros)
        .bind(chute.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_chutes(&self) -> Result<Vec<Chute>> {
        let rows = sqlx::query(
            "SELECT model_id, engine, source, concurrency, price_in_micros, price_out_micros, created_ms \
             FROM chutes ORDER BY model_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Chute {
                    model_id: r.try_get("model_id")?,
                    engine: r.try_get("engine")?,
                    source: r.try_get("source")?,
                    concurrency: r.try_get("concurrency")?,
                    price_in_micros: r.try_get("price_in_micros")?,
                    price_out_micros: r.try_get("price_out_micros")?,
                    created_ms: r.try_get("created_ms")?,
                })
            })
            .collect()
    }

    // ---- miners ----

    pub async fn upsert_miner(
        &self,
        miner_key: &str,
        endpoint: &str,
        hardware: &str,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO miners (miner_key, endpoint, hardware, registered_ms, last_seen_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (miner_key) DO UPDATE SET endpoint = excluded.endpoint, hardware = excluded.hardware, last_seen_ms = excluded.last_seen_ms",
        )
        .bind(miner_key)
        .bind(endpoint)
        .bind(hardware)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- requests ----

    pub async fn record_request(&self, r: &RequestRecord) -> Result<()> {
        self.settle_and_record(None, Some(r)).await.map(|_| ())
    }

    /// Outcomes of the most recent requests since `since_ms` (newest first,
    /// at most `limit`), for the status page: (model, status, latency ms,
    /// time to first token ms, completion tokens).
    pub async fn recent_outcomes(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, String, i64, Option<i64>, i64)>> {
        let rows = sqlx::query(
            "SELECT model, status, latency_ms, ttft_ms, completion_tokens FROM requests \
             WHERE created_ms >= $1 ORDER BY created_ms DESC LIMIT $2",
        )
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("model")?,
                    r.try_get("status")?,
                    r.try_get("latency_ms")?,
                    r.try_get("ttft_ms")?,
                    r.try_get("completion_tokens")?,
                ))
            })
            .collect()
    }
}

/// Inserts a request's metadata row (on a connection or in a transaction).
const KEY_SELECT: &str = "SELECT k.id, k.user_id, k.name, k.secret_hash, k.revoked_ms, u.tier \
     FROM api_keys k JOIN users u ON u.id = k.user_id";

fn key_record(r: &sqlx::any::AnyRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        key_id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        secret_hash: r.try_get("secret_hash")?,
        revoked: r.try_get::<Option<i64>, _>("revoked_ms")?.is_some(),
        tier: r.try_get("tier")?,
    })
}

/// Hides the password of a database URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = time_ordered_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = time_ordered_id();
        assert_eq!(a.len(), 24);
        assert!(a < b);
        assert_ne!(time_ordered_id(), time_ordered_id());
    }

    #[tokio::test]
    async fn keys_round_trip_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_data_dir(dir.path()).await.unwrap();
        let user = store.create_user("alice", "free").await.unwrap();
        let (id, key) = store.create_key(&user, "k").await.unwrap();
        let rec = store.verify_key(&key).await.unwrap().unwrap();
        assert_eq!(rec.key_id, id);
        assert_eq!(rec.tier, "free");
        let mut wrong = key.clone();
        wrong.pop();
        wrong.push(if key.ends_with('0') { '1' } else { '0' });
        assert!(store.verify_key(&wrong).await.unwrap().is_none());
        store.revoke_key(&id).await.unwrap();
        assert!(store.verify_key(&key).await.unwrap().is_none());
        assert!(store.revoke_key(&id).await.is_err());
        // Reopening applies no migration twice.
        drop(store);
        let again = Store::open_data_dir(dir.path()).await.unwrap();
        assert_eq!(again.list_keys().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn bad_tier_and_url_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_data_dir(dir.path()).await.unwrap();
        assert!(store.create_user("x", "gold").await.is_err());
        assert!(Store::open("mysql://u:p@h/db").await.is_err());
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://***@h/db");
    }

    #[tokio::test]
    async fn postgres_when_configured() {
        let Ok(url) = std::env::var("SLUICE_TEST_DATABASE_URL") else {
            eprintln!("skipped: SLUICE_TEST_DATABASE_URL is not set");
            return;
        };
        let store = Store::open(&url).await.unwrap();
        assert_eq!(store.backend(), Backend::Postgres);
        let user = store.create_user("pg", "paid").await.unwrap();
        let (_, key) = store.create_key(&user, "k").await.unwrap();
        assert!(store.verify_key(&key).await.unwrap().is_some());
    }
}
