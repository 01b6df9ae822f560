-- Balances are read from account_balances, and the ledger check groups the
-- entries by account in one pass: nothing looks entries up by account any
-- more. Three index inserts fewer per settled request (the keys are long:
-- `miner:` and a 64-digit key).
DROP INDEX IF EXISTS ledger_account;
