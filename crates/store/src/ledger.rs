//! Money: an append-only double-entry ledger in integer pico-dollars,
//! reservations for requests in flight, exactly-once settlement, durable
//! daily counters, usage reports.
//!
//! Invariants (checked by [`Store::ledger_check`] and the property tests):
//! every transaction's entries sum to zero; a request settles at most once
//! (the `settlements` primary key); an open reservation is either settled
//! or released, never both.

use std::collections::BTreeMap;

use sqlx::Row;

use crate::sql;
use crate::writer::{Op, Reply};
use crate::{now_ms, Backend, Result, Store, StoreError};

/// Pico-dollars per US dollar.
pub const PICO_PER_USD: i64 = 1_000_000_000_000;

/// Parses a dollar amount like `10`, `0.25` or `1.000000000001` exactly.
pub fn parse_usd(s: &str) -> std::result::Result<i64, String> {
    let s = s.trim().trim_start_matches('$');
    let bad = || format!("`{s}` is not a dollar amount (like 10 or 2.50)");
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 12
    {
        return Err(bad());
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_pico: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<12}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(PICO_PER_USD)
        .and_then(|w| w.checked_add(frac_pico))
        .ok_or_else(bad)
}

/// Formats pico-dollars as dollars without losing digits (`$0.000021`).
pub fn format_usd(pico: i64) -> String {
    let sign = if pico < 0 { "-" } else { "" };
    let p = pico.unsigned_abs();
    let whole = p / PICO_PER_USD as u64;
    let frac = p % PICO_PER_USD as u64;
    let frac = format!("{frac:012}");
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 {
        format!("{frac:0<2}")
    } else {
        frac.to_string()
    };
    format!("{sign}${whole}.{frac}")
}

/// The UTC calendar day of a unix-ms time, `YYYY-MM-DD`.
pub fn utc_day(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

/// Milliseconds until the next UTC midnight.
pub fn ms_until_utc_midnight(ms: i64) -> i64 {
    86_400_000 - ms.rem_euclid(86_400_000)
}

pub fn user_account(user_id: &str) -> String {
    format!("user:{user_id}")
}

pub fn miner_account(miner_key: &str) -> String {
    format!("miner:{miner_key}")
}

pub const FEES_ACCOUNT: &str = "fees";
pub const FUNDING_ACCOUNT: &str = "funding";
pub const FREE_TIER_ACCOUNT: &str = "free_tier";

/// A user's money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// Sum of the user's ledger entries.
    pub ledger: i64,
    /// Held by open reservations.
    pub reserved: i64,
}

impl Balance {
    pub fn available(&self) -> i64 {
        self.ledger - self.reserved
    }
}

/// What one finished request moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: String,
    pub user_id: String,
    /// Paid-tier users pay; free-tier usage is paid by the `free_tier` account.
    pub user_pays: bool,
    pub cost: i64,
    /// Credit per miner, in the order they served.
    pub credits: Vec<(String, i64)>,
    pub fee: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerCheck {
    pub entries: i64,
    /// Sum of every entry: zero in a balanced ledger.
    pub total: i64,
    /// Transactions whose entries do not sum to zero.
    pub unbalanced_txns: i64,
    pub user_debits: i64,
    pub miner_credits: i64,
    pub fees: i64,
    pub settlements: i64,
    pub open_reservations: i64,
    /// Accounts whose running balance differs from the sum of their entries.
    pub mismatched_balances: i64,
}

impl LedgerCheck {
    /// Every entry sums to zero overall and per transaction, running
    /// balances match their entries, and usage debits equal miner credits
    /// plus fees.
    pub fn is_balanced(&self) -> bool {
        self.total == 0
            && self.unbalanced_txns == 0
            && self.mismatched_balances == 0
            && self.user_debits == self.miner_credits + self.fees
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: i64,
}

fn count(reply: Reply) -> Result<u64> {
    match reply {
        Reply::Count(n) => Ok(n),
        other => Err(StoreError::Invalid(format!("unexpected reply {other:?}"))),
    }
}

pub(crate) fn new_id() -> String {
    crate::time_ordered_id()
}

/// Logs what became of a finished request's settlement and row
/// (`settled`: whether the settlement was newly written). Returns whether
/// the row must now be written alone: the settlement failed, so the
/// request is not charged (its reservation stays open until recovery
/// releases it) and is never charged twice.
pub(crate) fn report_finish(
    request_id: &str,
    had_settlement: bool,
    settled: &Result<bool>,
) -> bool {
    match settled {
        Ok(false) if had_settlement => {
            tracing::warn!(
                request_id,
                "request was already settled; not charging again"
            );
            false
        }
        Ok(_) => false,
        Err(e) if had_settlement => {
            tracing::error!(request_id, error = %e, "could not settle and record the request");
            true
        }
        Err(e) => {
            tracing::error!(request_id, error = %e, "could not record request metadata");
            false
        }
    }
}

impl Store {
    async fn sum_account(&self, account: &str) -> Result<i64> {
        let row = sqlx::query("SELECT balance FROM account_balances WHERE account = $1")
            .bind(account)
            .fetch_optional(self.pool())
            .await?;
        Ok(match row {
            Some(r) => r.try_get("balance")?,
            None => 0,
        })
    }

    /// A user's balance; `reserved` includes reservations granted in this
    /// process and not yet written.
    pub async fn balance(&self, user_id: &str) -> Result<Balance> {
        if let Some(w) = &self.writer {
            let op = Op::Balance {
                user_id: user_id.to_string(),
            };
            return match w.call(op).await? {
                Reply::Balance { ledger, reserved } => Ok(Balance { ledger, reserved }),
                other => Err(StoreError::Invalid(format!("unexpected reply {other:?}"))),
            };
        }
        let row = sql::balance_and_reserved(user_id)
            .sqlx()
            .fetch_one(self.pool())
            .await?;
        Ok(Balance {
            ledger: row.try_get(0)?,
            reserved: row.try_get(1)?,
        })
    }

    pub async fn account_total(&self, account: &str) -> Result<i64> {
        self.sum_account(account).await
    }

    /// Credits a user's balance (admin top-up): `user +amount`, `funding -amount`.
    pub async fn add_funds(&self, user_id: &str, amount: i64) -> Result<()> {
        if amount <= 0 {
            return Err(StoreError::Invalid("the amount must be positive".into()));
        }
        let exists = sqlx::query("SELECT id FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.pool())
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        let txn = format!("topup-{}", new_id());
        let entries = vec![
            (user_account(user_id), amount, "topup"),
            (FUNDING_ACCOUNT.to_string(), -amount, "topup"),
        ];
        let mut tx = self.pool().begin().await?;
        for stmt in sql::entries_stmts(&txn, entries, now_ms()) {
            stmt.sqlx().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Holds `amount` of the user's available balance for a request.
    /// Returns false (and holds nothing) when the balance can't cover it.
    pub async fn reserve(
        &self,
        request_id: &str,
        user_id: &str,
        amount: i64,
        owner: &str,
    ) -> Result<bool> {
        if let Some(w) = &self.writer {
            return w.reserve(request_id, user_id, amount, owner).await;
        }
        let stmt = sql::reserve(request_id, user_id, amount, owner, now_ms());
        let done = if self.backend() == Backend::Postgres {
            // Serialise reservations of one user across replicas.
            let mut tx = self.pool().begin().await?;
            sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
            let done = stmt.sqlx().execute(&mut *tx).await?;
            tx.commit().await?;
            done
        } else {
            // One statement is atomic in SQLite (writers are serialised).
            stmt.sqlx().execute(self.pool()).await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// Settles a request exactly once: the ledger entries, the settlement
    /// row and the reservation close in one transaction. Returns false if
    /// the request was already settled (nothing is written again).
    pub async fn settle(&self, s: &Settlement) -> Result<bool> {
        self.settle_and_record(Some(s), None).await
    }

    /// Settles (when `settlement` is given) and writes the request's
    /// metadata row in one transaction: one commit per request. Returns
    /// whether a settlement was newly written.
    pub async fn settle_and_record(
        &self,
        settlement: Option<&Settlement>,
        record: Option<&crate::RequestRecord>,
    ) -> Result<bool> {
        if let Some(s) = settlement {
            sql::check_settlement(s).map_err(StoreError::Invalid)?;
        }
        if let Some(w) = &self.writer {
            let op = Op::Settle {
                settlement: settlement.cloned().map(Box::new),
                record: record.cloned().map(Box::new),
            };
            return Ok(matches!(w.call(op).await?, Reply::Flag(true)));
        }
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        let mut settled = false;
        if let Some(s) = settlement {
            let first = sql::settlement_row(s, now).sqlx().execute(&mut *tx).await?;
            if first.rows_affected() == 1 {
                settled = true;
                for stmt in sql::settlement_entries(s, now) {
                    stmt.sqlx().execute(&mut *tx).await?;
                }
                sql::close_reservation(&s.request_id)
                    .sqlx()
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if let Some(r) = record {
            sql::request_row(r).sqlx().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(settled)
    }

    /// Settles (when `settlement` is given) and records a finished request
    /// without waiting for the commit where the store allows it: the
    /// SQLite ledger writer takes both and the caller goes on (nothing has
    /// to wake it when the batch commits), and the writer logs what
    /// became of them. Elsewhere it runs [`Store::settle_and_record`] and
    /// logs the same way. A settlement that fails is not charged (its
    /// reservation stays open for recovery), and the request's row is then
    /// written alone. [`Store::close`] commits everything queued here.
    pub async fn finish_request(
        &self,
        settlement: Option<Settlement>,
        record: crate::RequestRecord,
    ) {
        let settlement = match settlement.map(|s| sql::check_settlement(&s).map(|()| s)) {
            Some(Err(e)) => {
                tracing::error!(request_id = %record.id, error = %e, "could not settle and record the request");
                None
            }
            Some(Ok(s)) => Some(s),
            None => None,
        };
        if let Some(w) = &self.writer {
            if let Err(e) = w.detach(settlement, record).await {
                tracing::error!(error = %e, "could not settle and record a request");
            }
            return;
        }
        let settled = self
            .settle_and_record(settlement.as_ref(), Some(&record))
            .await;
        if report_finish(&record.id, settlement.is_some(), &settled) {
            if let Err(e) = self.record_request(&record).await {
                tracing::error!(request_id = %record.id, error = %e, "could not record request metadata");
            }
        }
    }

    /// Releases a reservation without charging (the request failed).
    pub async fn release(&self, request_id: &str) -> Result<()> {
        if let Some(w) = &self.writer {
            let op = Op::Release {
                request_id: request_id.to_string(),
            };
            return w.call(op).await.map(|_| ());
        }
        sql::release(request_id).sqlx().execute(self.pool()).await?;
        Ok(())
    }

    /// After a crash: releases the open reservations `owner` left behind
    /// (their requests never finished, so nothing is charged). Returns how
    /// many were released.
    pub async fn recover(&self, owner: &str) -> Result<u64> {
        if let Some(w) = &self.writer {
            let op = Op::Recover {
                owner: owner.to_string(),
            };
            return count(w.call(op).await?);
        }
        let done = sql::recover(owner).sqlx().execute(self.pool()).await?;
        Ok(done.rows_affected())
    }

    /// Releases open reservations older than `max_age_ms` from any owner
    /// (a replica that died and never came back).
    pub async fn release_stale(&self, max_age_ms: i64) -> Result<u64> {
        if let Some(w) = &self.writer {
            return count(w.call(Op::ReleaseStale { max_age_ms }).await?);
        }
        let done = sql::release_stale(now_ms() - max_age_ms)
            .sqlx()
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn is_settled(&self, request_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT request_id FROM settlements WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(self.pool())
                .await?
                .is_some(),
        )
    }

    /// Whole-ledger consistency figures.
    pub async fn ledger_check(&self) -> Result<LedgerCheck> {
        let one = |sql: &'static str| async move {
            let row = sqlx::query(sql).fetch_one(self.pool()).await?;
            Ok::<i64, StoreError>(row.try_get::<i64, _>("s")?)
        };
        Ok(LedgerCheck {
            entries: one("SELECT CAST(COUNT(*) AS BIGINT) AS s FROM ledger_entries").await?,
            total: one("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS s FROM ledger_entries").await?,
            unbalanced_txns: one(
                "SELECT CAST(COUNT(*) AS BIGINT) AS s FROM (SELECT txn FROM ledger_entries GROUP BY txn HAVING SUM(amount) <> 0) t",
            )
            .await?,
            user_debits: one(
                "SELECT CAST(COALESCE(-SUM(amount), 0) AS BIGINT) AS s FROM ledger_entries WHERE kind = 'usage'",
            )
            .await?,
            miner_credits: one(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS s FROM ledger_entries WHERE kind = 'serving'",
            )
            .await?,
            fees: one("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS s FROM ledger_entries WHERE kind = 'fee'").await?,
            settlements: one("SELECT CAST(COUNT(*) AS BIGINT) AS s FROM settlements").await?,
            open_reservations: one("SELECT CAST(COUNT(*) AS BIGINT) AS s FROM reservations WHERE state = 'open'").await?,
            mismatched_balances: one(
                "SELECT CAST(COUNT(*) AS BIGINT) AS s FROM account_balances b \
                 LEFT JOIN (SELECT account, SUM(amount) AS total FROM ledger_entries GROUP BY account) e \
                 ON e.account = b.account WHERE b.balance <> COALESCE(e.total, 0)",
            )
            .await?,
        })
    }

    /// Takes one request from a key's daily allowance; `None` when the
    /// day's `limit` is used up. Exact across replicas sharing the database.
    pub async fn take_daily(&self, key_id: &str, day: &str, limit: i64) -> Result<Option<i64>> {
        if let Some(w) = &self.writer {
            let op = Op::TakeDaily {
                key_id: key_id.to_string(),
                day: day.to_string(),
                limit,
            };
            return match w.call(op).await? {
                Reply::Daily(used) => Ok(used),
                other => Err(StoreError::Invalid(format!("unexpected reply {other:?}"))),
            };
        }
        sql::daily_row(key_id, day)
            .sqlx()
            .execute(self.pool())
            .await?;
        let done = sql::daily_take(key_id, day, limit)
            .sqlx()
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(self.daily_used(key_id, day).await?))
    }

    /// Gives back a request the service failed to serve.
    pub async fn refund_daily(&self, key_id: &str, day: &str) -> Result<()> {
        if let Some(w) = &self.writer {
            let op = Op::RefundDaily {
                key_id: key_id.to_string(),
                day: day.to_string(),
            };
            return w.call(op).await.map(|_| ());
        }
        sql::daily_refund(key_id, day)
            .sqlx()
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn daily_used(&self, key_id: &str, day: &str) -> Result<i64> {
        let row = sql::daily_used(key_id, day)
            .sqlx()
            .fetch_optional(self.pool())
            .await?;
        Ok(match row {
            Some(r) => r.try_get("used")?,
            None => 0,
        })
    }

    /// A user's usage since `since_ms`, per UTC day and model.
    pub async fn usage(&self, user_id: &str, since_ms: i64) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT created_ms, model, prompt_tokens, completion_tokens, cost FROM requests WHERE user_id = $1 AND created_ms >= $2",
        )
        .bind(user_id)
        .bind(since_ms)
        .fetch_all(self.pool())
        .await?;
        let mut agg: BTreeMap<(String, String), UsageRow> = BTreeMap::new();
        for r in rows {
            let day = utc_day(r.try_get("created_ms")?);
            let model: String = r.try_get("model")?;
            let e = agg.entry((day.clone(), model.clone())).or_insert(UsageRow {
                day,
                model,
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost: 0,
            });
            e.requests += 1;
            e.prompt_tokens += r.try_get::<i64, _>("prompt_tokens")?;
            e.completion_tokens += r.try_get::<i64, _>("completion_tokens")?;
            e.cost += r.try_get::<i64, _>("cost")?;
        }
        Ok(agg.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_and_format_exactly() {
        assert_eq!(parse_usd("10").unwrap(), 10 * PICO_PER_USD);
        assert_eq!(parse_usd("$0.25").unwrap(), PICO_PER_USD / 4);
        assert_eq!(parse_usd("0.000000000001").unwrap(), 1);
        assert!(parse_usd("1.0000000000001").is_err());
        assert!(parse_usd("-1").is_err());
        assert!(parse_usd("abc").is_err());
        assert!(parse_usd(".").is_err());
        assert_eq!(format_usd(21_000_000), "$0.000021");
        assert_eq!(format_usd(10 * PICO_PER_USD), "$10.00");
        assert_eq!(format_usd(-PICO_PER_USD / 2), "-$0.50");
    }

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_795_750_992_000), "2026-11-27");
        assert_eq!(ms_until_utc_midnight(86_400_000 - 1), 1);
    }
}
