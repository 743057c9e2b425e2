package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// seedSQL fills the table in one statement. The user loop is the inner one, so
// a user's records are spread over the whole heap the way rows arriving over
// time are, not packed into a few pages: that is what makes the covering index
// matter. Every tenth merchant is NULL and every seventh carries <, > and & so
// the JSON escaping path runs too.
const seedSQL = `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT u,
       lpad(((u * 7919 + n * 104729) % 1000000)::text, 6, '0'),
       round(((u * 31 + n * 17) % 500000) / 100.0, 2),
       (ARRAY['USD', 'EUR', 'JPY', 'KWD', 'GBP'])[1 + (u + n) % 5],
       CASE WHEN (u + n) % 10 = 0 THEN NULL
            WHEN (u + n) % 7 = 0 THEN 'M&S <Food> ' || (u % 97)
            ELSE 'Merchant ' || (u % 997) END,
       300,
       timestamptz '2026-01-01 00:00:00Z' + n * interval '37 minutes' + u * interval '1 second'
  FROM generate_series(1, $2::int) AS n, generate_series($1::bigint, $3::bigint) AS u`

type seedPlan struct {
	users   int   // ordinary users 1..users
	perUser int   // records per ordinary user
	heavyID int64 // one more user ...
	heavyN  int   // ... with this many records
}

func (p seedPlan) rows() int64 { return int64(p.users)*int64(p.perUser) + int64(p.heavyN) }

// seed loads the plan unless the table already holds exactly it (a re-run on
// the same cluster skips the minute of loading), then VACUUM ANALYZE so the
// visibility map is set (index-only scans) and the planner has statistics.
func seed(ctx context.Context, conn *pgx.Conn, p seedPlan, logf func(string, ...any)) error {
	// Only the plan's users count: the stream scenario's history (other
	// users, history.go) stays in a kept cluster and is no reason to reseed.
	var have int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM threeds_records WHERE user_id BETWEEN 1 AND $1", p.heavyID).Scan(&have); err != nil {
		return fmt.Errorf("count rows: %w", err)
	}
	if have == p.rows() {
		logf("table already holds %d rows; not reseeding", have)
	} else {
		start := time.Now()
		if _, err := conn.Exec(ctx, "TRUNCATE threeds_records"); err != nil {
			return fmt.Errorf("truncate: %w", err)
		}
		if _, err := conn.Exec(ctx, seedSQL, 1, p.perUser, int64(p.users)); err != nil {
			return fmt.Errorf("seed users: %w", err)
		}
		if _, err := conn.Exec(ctx, seedSQL, p.heavyID, p.heavyN, p.heavyID); err != nil {
			return fmt.Errorf("seed heavy user: %w", err)
		}
		logf("seeded %d rows in %s", p.rows(), time.Since(start).Round(time.Millisecond))
	}
	start := time.Now()
	if _, err := conn.Exec(ctx, "VACUUM (ANALYZE) threeds_records"); err != nil {
		return fmt.Errorf("vacuum: %w", err)
	}
	logf("VACUUM ANALYZE in %s", time.Since(start).Round(time.Millisecond))
	return nil
}
