-- Running balance per ledger account, updated in the same transaction as
-- every entry, so reading a balance costs one row instead of a sum over the
-- account's whole history. The entries stay the source of truth: the
-- ledger check compares both.
CREATE TABLE account_balances (
    account TEXT PRIMARY KEY,
    balance BIGINT NOT NULL
);

INSERT INTO account_balances (account, balance)
SELECT account, SUM(amount) FROM ledger_entries GROUP BY account;
