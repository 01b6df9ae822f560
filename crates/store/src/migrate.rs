//! Ordered, transactional schema migrations recorded in `sluice_migrations`.
//! Safe to run concurrently from several validator replicas on PostgreSQL
//! (an advisory lock serialises them).

use sqlx::{AnyPool, Executor, Row};

use crate::{now_ms, Backend, Result, StoreError};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_ledger.sql")),
    (3, include_str!("../migrations/0003_balances.sql")),
    (
        4,
        include_str!("../migrations/0004_drop_ledger_txn_index.sql"),
    ),
    (
        5,
        include_str!("../migrations/0005_drop_ledger_account_index.sql"),
    ),
];

pub async fn run(pool: &AnyPool, backend: Backend) -> Result<()> {
    let mut conn = pool.acquire().await?;
    if backend == Backend::Postgres {
        conn.execute("SELECT pg_advisory_lock(7173)").await?;
    }
    let result = apply(&mut conn).await;
    if backend == Backend::Postgres {
        conn.execute("SELECT pg_advisory_unlock(7173)").await?;
    }
    result
}

async fn apply(conn: &mut sqlx::pool::PoolConnection<sqlx::Any>) -> Result<()> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS sluice_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )
    .await?;
    let rows = sqlx::query("SELECT version FROM sluice_migrations")
        .fetch_all(&mut **conn)
        .await?;
    let applied: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get::<i64, _>("version"))
        .collect::<std::result::Result<_, _>>()?;
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let mut tx = sqlx::Connection::begin(&mut **conn).await?;
        for stmt in split_statements(sql) {
            sqlx::query(&stmt)
                .execute(&mut *tx)
                .await
                .map_err(|source| StoreError::Migration {
                    version: *version,
                    source,
                })?;
        }
        sqlx::query("INSERT INTO sluice_migrations (version, applied_ms) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

/// Splits a migration file into statements (no `;` inside our literals).
fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
