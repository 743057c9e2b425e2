package main

// pageSQL must stay byte-identical to listRecordsSQL in store.go: the
// direct-SQL side of the bench is "the same query without the service", and
// TestBenchUsesTheServiceSQL (bench_test.go at the repo root) fails when the two
// drift apart.
const pageSQL = `
SELECT id,
       passcode,
       amount::text,
       currency,
       COALESCE(merchant_name, ''),
       expires_after,
       received_at,
       count(*) OVER () AS total
  FROM threeds_records
 WHERE user_id = $1
 ORDER BY received_at DESC, id DESC
 LIMIT $2 OFFSET $3`
