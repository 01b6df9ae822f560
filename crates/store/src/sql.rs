//! The SQL text and bound values of the per-request writes, shared by the
//! two ways they reach a database: sqlx (PostgreSQL, and SQLite outside
//! the hot path) and the SQLite ledger writer thread. Both backends read
//! `$n` placeholders in order, so one statement serves both.

use crate::ledger::{miner_account, user_account, Settlement, FEES_ACCOUNT, FREE_TIER_ACCOUNT};
use crate::RequestRecord;
use std::borrow::Cow;
use std::sync::OnceLock;

/// A value bound to a statement. Text borrows from what the statement
/// is built from where it can: the ledger writer builds several
/// statements per settled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Val<'a> {
    Int(i64),
    Text(Cow<'a, str>),
    OptInt(Option<i64>),
    OptText(Option<Cow<'a, str>>),
}

impl Val<'_> {
    fn into_owned(self) -> Val<'static> {
        match self {
            Val::Int(i) => Val::Int(i),
            Val::Text(t) => Val::Text(Cow::Owned(t.into_owned())),
            Val::OptInt(o) => Val::OptInt(o),
            Val::OptText(o) => Val::OptText(o.map(|t| Cow::Owned(t.into_owned()))),
        }
    }
}

impl From<i64> for Val<'_> {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(v: &'a str) -> Self {
        Val::Text(Cow::Borrowed(v))
    }
}

impl From<String> for Val<'_> {
    fn from(v: String) -> Self {
        Val::Text(Cow::Owned(v))
    }
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Int(i) | Val::OptInt(Some(i)) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::OptText(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::OptInt(None) | Val::OptText(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

/// A statement with its values, runnable on either backend.
#[derive(Debug, Clone)]
pub(crate) struct Stmt<'a> {
    pub sql: Cow<'static, str>,
    pub vals: Vec<Val<'a>>,
}

impl<'a> Stmt<'a> {
    pub fn new(sql: impl Into<Cow<'static, str>>, vals: Vec<Val<'a>>) -> Stmt<'a> {
        Stmt {
            sql: sql.into(),
            vals,
        }
    }

    pub fn sqlx(&self) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
        let mut q = sqlx::query(&self.sql);
        for v in &self.vals {
            q = match v {
                Val::Int(i) => q.bind(*i),
                Val::Text(s) => q.bind(&**s),
                Val::OptInt(o) => q.bind(*o),
                Val::OptText(o) => q.bind(o.as_deref()),
            };
        }
        q
    }
}

/// Holds part of a user's balance for one request, only when the balance
/// minus what is already held covers it. One statement.
pub(crate) fn reserve<'a>(
    request_id: &'a str,
    user_id: &'a str,
    amount: i64,
    owner: &'a str,
    now: i64,
) -> Stmt<'a> {
    Stmt::new(
        "INSERT INTO reservations (request_id, user_id, amount, owner, state, created_ms) \
         SELECT $1, $2, $3, $4, 'open', $5 WHERE \
         COALESCE((SELECT balance FROM account_balances WHERE account = $6), 0) \
         - (SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user_id = $7 AND state = 'open') >= $8",
        vec![
            request_id.into(),
            user_id.into(),
            amount.into(),
            owner.into(),
            now.into(),
            user_account(user_id).into(),
            user_id.into(),
            amount.into(),
        ],
    )
}

/// A reservation granted by the ledger writer (which checked the balance).
pub(crate) fn hold<'a>(
    request_id: &'a str,
    user_id: &'a str,
    amount: i64,
    owner: &'a str,
    created_ms: i64,
) -> Stmt<'a> {
    Stmt::new(
        "INSERT INTO reservations (request_id, user_id, amount, owner, state, created_ms) \
         VALUES ($1, $2, $3, $4, 'open', $5)",
        vec![
            request_id.into(),
            user_id.into(),
            amount.into(),
            owner.into(),
            created_ms.into(),
        ],
    )
}

/// A user's ledger balance (no row: zero) and what the user's open
/// reservations hold, in one row.
pub(crate) fn balance_and_reserved(user_id: &str) -> Stmt<'_> {
    Stmt::new(
        "SELECT CAST(COALESCE((SELECT balance FROM account_balances WHERE account = $1), 0) AS BIGINT), \
         (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM reservations WHERE user_id = $2 AND state = 'open')",
        vec![user_account(user_id).into(), user_id.into()],
    )
}

pub(crate) fn recover(owner: &str) -> Stmt<'_> {
    Stmt::new(
        "UPDATE reservations SET state = 'released' WHERE owner = $1 AND state = 'open'",
        vec![owner.into()],
    )
}

pub(crate) fn release_stale(before_ms: i64) -> Stmt<'static> {
    Stmt::new(
        "UPDATE reservations SET state = 'released' WHERE state = 'open' AND created_ms < $1",
        vec![before_ms.into()],
    )
}

pub(crate) fn release(request_id: &str) -> Stmt<'_> {
    Stmt::new(
        "UPDATE reservations SET state = 'released' WHERE request_id = $1 AND state = 'open'",
        vec![request_id.into()],
    )
}

/// The settlement row: its primary key makes settling exactly-once.
pub(crate) fn settlement_row(s: &Settlement, now: i64) -> Stmt<'_> {
    Stmt::new(
        "INSERT INTO settlements (request_id, user_id, cost, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING",
        vec![
            s.request_id.as_str().into(),
            s.user_id.as_str().into(),
            s.cost.into(),
            now.into(),
        ],
    )
}

pub(crate) fn close_reservation(request_id: &str) -> Stmt<'_> {
    Stmt::new(
        "UPDATE reservations SET state = 'settled' WHERE request_id = $1 AND state = 'open'",
        vec![request_id.into()],
    )
}

/// Checks a settlement's arithmetic before anything is written.
pub(crate) fn check_settlement(s: &Settlement) -> Result<(), String> {
    let credited: i64 = s.credits.iter().map(|(_, c)| *c).sum();
    if credited + s.fee != s.cost || s.cost < 0 || s.fee < 0 {
        return Err(format!(
            "unbalanced settlement for {}: cost {} != credits {credited} + fee {}",
            s.request_id, s.cost, s.fee
        ));
    }
    Ok(())
}

/// A ledger account name: most are built per request, a few are fixed.
pub(crate) type Account = Cow<'static, str>;

/// The ledger entries of a settlement (empty when it costs nothing).
pub(crate) fn settlement_entries(s: &Settlement, now: i64) -> Vec<Stmt<'static>> {
    with_balances(settlement_parts(s, now, OnError::Abort))
}

/// What a multi-row insert does when one of its rows fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnError {
    /// Undo the whole statement: portable, but SQLite keeps a statement
    /// journal of every page the statement touches to be able to.
    Abort,
    /// SQLite's `OR FAIL`: stop, keeping the rows already written, and
    /// keep no statement journal. Only for callers that undo the whole
    /// item themselves (the ledger writer rolls back its batch, or the
    /// item's savepoint).
    Fail,
}

/// A settlement's entries statement and the balance change of every
/// account it moves (`None` when it costs nothing).
pub(crate) fn settlement_parts(
    s: &Settlement,
    now: i64,
    on_error: OnError,
) -> Option<(Stmt<'static>, Vec<(Account, i64)>)> {
    if s.cost <= 0 {
        return None;
    }
    let payer: Account = if s.user_pays {
        user_account(&s.user_id).into()
    } else {
        FREE_TIER_ACCOUNT.into()
    };
    let mut entries = Vec::with_capacity(s.credits.len() + 2);
    entries.push((payer, -s.cost, "usage"));
    for (miner, credit) in &s.credits {
        entries.push((miner_account(miner).into(), *credit, "serving"));
    }
    entries.push((FEES_ACCOUNT.into(), s.fee, "fee"));
    entries_parts(format!("req-{}", s.request_id), entries, now, on_error)
}

/// One transaction's entries and the running balances they move, in two
/// statements whatever the number of entries. Entries with the same
/// account and kind are merged; zero amounts are skipped.
pub(crate) fn entries_stmts(
    txn: &str,
    entries: Vec<(String, i64, &'static str)>,
    now: i64,
) -> Vec<Stmt<'static>> {
    let entries = entries
        .into_iter()
        .map(|(account, amount, kind)| (Account::Owned(account), amount, kind))
        .collect();
    with_balances(entries_parts(txn.to_string(), entries, now, OnError::Abort))
}

/// The entries statement of one transaction and its balance change per
/// account (one per account, non-zero); `None` when nothing moves.
fn entries_parts(
    txn: String,
    entries: Vec<(Account, i64, &'static str)>,
    now: i64,
    on_error: OnError,
) -> Option<(Stmt<'static>, Vec<(Account, i64)>)> {
    let mut merged: Vec<(Account, i64, &'static str)> = Vec::with_capacity(entries.len());
    for (account, amount, kind) in entries {
        match merged
            .iter_mut()
            .find(|(a, _, k)| *a == account && *k == kind)
        {
            Some(e) => e.1 += amount,
            None => merged.push((account, amount, kind)),
        }
    }
    merged.retain(|(_, amount, _)| *amount != 0);
    if merged.is_empty() {
        return None;
    }
    let mut deltas: Vec<(Account, i64)> = Vec::with_capacity(merged.len());
    for (account, amount, _) in &merged {
        match deltas.iter_mut().find(|(a, _)| a == account) {
            Some(e) => e.1 += amount,
            None => deltas.push((account.clone(), *amount)),
        }
    }
    deltas.retain(|(_, amount)| *amount != 0);
    // In the order of `entries_sql`: the first row binds the transaction
    // and the time, which the other rows name again.
    let rows = merged.len();
    let mut txn = Some(txn);
    let mut vals = Vec::with_capacity(2 + rows * 4);
    for (i, (account, amount, kind)) in merged.into_iter().enumerate() {
        vals.push(Val::Text(crate::ledger::new_id().into()));
        if let Some(txn) = txn.take() {
            vals.push(txn.into());
        }
        vals.push(Val::Text(account));
        vals.push(amount.into());
        vals.push(kind.into());
        if i == 0 {
            vals.push(now.into());
        }
    }
    Some((Stmt::new(entries_sql(rows, on_error), vals), deltas))
}

/// The insert of `rows` ledger entries of one transaction: `$2` (the
/// transaction) and `$6` (the time) are bound once. Parameters are
/// numbered in the order they first appear, which is how SQLite numbers
/// `$name` parameters when values are bound by position. Built once per
/// shape.
fn entries_sql(rows: usize, on_error: OnError) -> Cow<'static, str> {
    const CACHED: usize = 8;
    static ABORT: [OnceLock<String>; CACHED] = [const { OnceLock::new() }; CACHED];
    static FAIL: [OnceLock<String>; CACHED] = [const { OnceLock::new() }; CACHED];
    let build = || {
        let mut values = String::from("($1, $2, $3, $4, $5, $6)");
        for r in 1..rows {
            let b = 6 + (r - 1) * 4;
            values.push_str(&format!(
                ", (${}, $2, ${}, ${}, ${}, $6)",
                b + 1,
                b + 2,
                b + 3,
                b + 4
            ));
        }
        format!(
            "INSERT {}INTO ledger_entries (id, txn, account, amount, kind, created_ms) VALUES {values}",
            match on_error {
                OnError::Abort => "",
                OnError::Fail => "OR FAIL ",
            }
        )
    };
    let cache = match on_error {
        OnError::Abort => &ABORT,
        OnError::Fail => &FAIL,
    };
    match cache.get(rows) {
        Some(cell) => Cow::Borrowed(cell.get_or_init(build).as_str()),
        None => Cow::Owned(build()),
    }
}

/// The entries statement followed by the balance statement it needs.
fn with_balances(parts: Option<(Stmt<'static>, Vec<(Account, i64)>)>) -> Vec<Stmt<'static>> {
    match parts {
        Some((entries, deltas)) => {
            let balances = balances_upsert(&deltas).map(|b| Stmt {
                sql: b.sql,
                vals: b.vals.into_iter().map(Val::into_owned).collect(),
            });
            std::iter::once(entries).chain(balances).collect()
        }
        None => Vec::new(),
    }
}

/// Moves running balances by the given amounts: one row per account
/// (PostgreSQL refuses to update a row twice in one statement); `None`
/// when there is nothing to move.
pub(crate) fn balances_upsert<A: AsRef<str>>(deltas: &[(A, i64)]) -> Option<Stmt<'_>> {
    if deltas.is_empty() {
        return None;
    }
    let rows: Vec<String> = (0..deltas.len())
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    let vals = deltas
        .iter()
        .flat_map(|(account, amount)| [account.as_ref().into(), Val::Int(*amount)])
        .collect();
    Some(Stmt::new(
        format!(
            "INSERT INTO account_balances (account, balance) VALUES {} \
             ON CONFLICT (account) DO UPDATE SET balance = account_balances.balance + excluded.balance",
            rows.join(", ")
        ),
        vals,
    ))
}

pub(crate) fn request_row(r: &RequestRecord) -> Stmt<'_> {
    Stmt::new(
        "INSERT INTO requests (id, user_id, key_id, model, kind, stream, miner_key, status, http_status, \
         prompt_tokens, completion_tokens, attempts, queue_ms, ttft_ms, latency_ms, created_ms, cost) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        vec![
            r.id.as_str().into(),
            r.user_id.as_str().into(),
            r.key_id.as_str().into(),
            r.model.as_str().into(),
            r.kind.as_str().into(),
            i64::from(r.stream).into(),
            Val::OptText(r.miner_key.as_deref().map(Cow::Borrowed)),
            r.status.as_str().into(),
            r.http_status.into(),
            r.prompt_tokens.into(),
            r.completion_tokens.into(),
            r.attempts.into(),
            r.queue_ms.into(),
            Val::OptInt(r.ttft_ms),
            r.latency_ms.into(),
            r.created_ms.into(),
            r.cost.into(),
        ],
    )
}

/// Creates the day's counter row of a key if missing.
pub(crate) fn daily_row<'a>(key_id: &'a str, day: &'a str) -> Stmt<'a> {
    Stmt::new(
        "INSERT INTO daily_counters (key_id, day, used) VALUES ($1, $2, 0) ON CONFLICT (key_id, day) DO NOTHING",
        vec![key_id.into(), day.into()],
    )
}

/// Takes one unit when fewer than `limit` are used.
pub(crate) fn daily_take<'a>(key_id: &'a str, day: &'a str, limit: i64) -> Stmt<'a> {
    Stmt::new(
        "UPDATE daily_counters SET used = used + 1 WHERE key_id = $1 AND day = $2 AND used < $3",
        vec![key_id.into(), day.into(), limit.into()],
    )
}

pub(crate) fn daily_used<'a>(key_id: &'a str, day: &'a str) -> Stmt<'a> {
    Stmt::new(
        "SELECT used FROM daily_counters WHERE key_id = $1 AND day = $2",
        vec![key_id.into(), day.into()],
    )
}

pub(crate) fn daily_refund<'a>(key_id: &'a str, day: &'a str) -> Stmt<'a> {
    Stmt::new(
        "UPDATE daily_counters SET used = used - 1 WHERE key_id = $1 AND day = $2 AND used > 0",
        vec![key_id.into(), day.into()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `$n` of a statement in the order they first appear.
    fn first_appearances(sql: &str) -> Vec<usize> {
        let mut seen = Vec::new();
        for part in sql.split('$').skip(1) {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: usize = digits.parse().unwrap();
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
        seen
    }

    /// SQLite numbers `$n` parameters by first appearance when values are
    /// bound by position: the entries insert must number them that way,
    /// with one value per parameter, cached shape or not.
    #[test]
    fn entries_parameters_are_numbered_in_order_of_appearance() {
        for rows in 1..=10usize {
            let entries: Vec<(Account, i64, &str)> = (0..rows)
                .map(|i| (Account::Owned(format!("a{i}")), 1 + i as i64, "k"))
                .collect();
            for on_error in [OnError::Abort, OnError::Fail] {
                let (stmt, deltas) =
                    entries_parts("t".into(), entries.clone(), 7, on_error).unwrap();
                let order = first_appearances(&stmt.sql);
                assert_eq!(order, (1..=order.len()).collect::<Vec<_>>(), "{}", stmt.sql);
                assert_eq!(order.len(), stmt.vals.len(), "{}", stmt.sql);
                assert_eq!(stmt.vals[1], Val::from("t"));
                assert_eq!(stmt.vals[5], Val::Int(7));
                assert_eq!(deltas.len(), rows);
            }
        }
    }
}
