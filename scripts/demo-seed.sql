-- Demo data for `make run` (scripts/demo.sh). Re-runnable: the demo users' rows are
-- replaced, so the times stay relative to "now" on every start.
-- User 1001 is the one the printed token signs in as; user 1002 exists only to show
-- that somebody else's passcodes never appear in 1001's pages or stream.
-- Only the first row is still valid (received a minute ago, valid for 300 s), so the
-- event stream replays just that one before `ready`; the passcodes stored with the
-- one-line INSERT that `make run` prints are 1001's too, and go at the next start.
BEGIN;

DELETE FROM threeds_records WHERE user_id IN (1001, 1002);

INSERT INTO threeds_records
    (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES
    -- leading zero that must survive as text
    (1001, '012345', 100,      'USD', 'Amazon',              300, date_trunc('second', now()) - interval '1 minute'),
    -- zero-decimal currency: "1500"
    (1001, '482913', 1500,     'JPY', 'Rakuten',             300, date_trunc('second', now()) - interval '7 minutes'),
    -- three-decimal currency: "1.500"
    (1001, '771204', 1.5,      'KWD', 'Xcite Electronics',   600, date_trunc('second', now()) - interval '25 minutes'),
    -- NULL merchant renders as ""
    (1001, '300118', 42.99,    'USD', NULL,                  300, date_trunc('second', now()) - interval '2 hours'),
    -- these two share received_at: id DESC decides the order
    (1001, '905527', 12000,    'JPY', 'Uniqlo Ginza',        300, date_trunc('second', now()) - interval '1 day'),
    (1001, '118640', 12.345,   'KWD', 'Alshaya',             300, date_trunc('second', now()) - interval '1 day'),
    (1001, '640032', 9.5,      'USD', 'Netflix',             180, date_trunc('second', now()) - interval '3 days'),
    (1001, '257781', 1234.56,  'USD', 'Apple Store',         300, date_trunc('second', now()) - interval '10 days'),
    -- another cardholder: must never show up for user 1001
    (1002, '999001', 5000,     'USD', 'NOT FOR USER 1001',   300, date_trunc('second', now()) - interval '30 seconds'),
    (1002, '999002', 77,       'JPY', 'NOT FOR USER 1001',   300, date_trunc('second', now()) - interval '5 minutes');

COMMIT;
