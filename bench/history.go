package main

// Years of history for the stream scenario's production cases (issue 14): a
// table as a card issuer's is after a few years, where almost every row
// expired long ago. The snapshot and resync reads must cost in proportion to
// the live rows they return, so this is what tells a read through the page
// index from one that walks a user's whole history.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// historySQL adds $2 expired rows to each user $1..$3, the user loop inner
// (rows arriving over time interleave users across the heap, as the base
// seed's do). They were received in 2020 and valid for 300 s: expired for
// years. user_id and n are bigint so the arithmetic cannot overflow.
const historySQL = `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT u,
       lpad(((u * 7919 + n * 104729) % 1000000)::text, 6, '0'),
       round(((u * 31 + n * 17) % 500000) / 100.0, 2),
       (ARRAY['USD', 'EUR', 'JPY', 'KWD', 'GBP'])[1 + (u + n) % 5],
       'History ' || (u % 997),
       300,
       timestamptz '2020-01-01 00:00:00Z' + n * interval '1 minute' + (u % 86400) * interval '1 second'
  FROM generate_series(1, $2::bigint) AS n, generate_series($1::bigint, $3::bigint) AS u`

// historyPlan is the production cases' users: streamed users first..first+
// users-1 with perUser expired rows each, and one big user with bigRows.
type historyPlan struct {
	first   int64
	users   int
	perUser int
	bigID   int64
	bigRows int
}

func (p historyPlan) last() int64 { return p.first + int64(p.users) - 1 }
func (p historyPlan) rows() int64 { return int64(p.users)*int64(p.perUser) + int64(p.bigRows) }

// seedHistory loads the plan unless its users already hold exactly it (a kept
// cluster, BENCH_KEEP, is not reseeded), then VACUUM ANALYZE so the page index
// is all-visible and the planner knows the table's size.
//
// Speed: the page index is dropped for the load and built again from its own
// definition (a sorted build of 5 M rows takes seconds; 5 M scattered index
// inserts take minutes), and session_replication_role = replica keeps the
// NOTIFY trigger from queueing one notification per row of the load. Both
// need the bench's superuser and a database nobody else writes to; if the
// run dies in between, `threeds-records migrate` (bench/run.sh runs it
// first) builds the index again.
func seedHistory(ctx context.Context, conn *pgx.Conn, p historyPlan) error {
	var have int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM threeds_records WHERE user_id BETWEEN $1 AND $2 OR user_id = $3",
		p.first, p.last(), p.bigID).Scan(&have); err != nil {
		return fmt.Errorf("count history rows: %w", err)
	}
	if have == p.rows() {
		logf("stream: the table already holds the %d rows of history; not reseeding", have)
	} else if err := loadHistory(ctx, conn, p); err != nil {
		return err
	}
	start := time.Now()
	if _, err := conn.Exec(ctx, "VACUUM (ANALYZE) threeds_records"); err != nil {
		return fmt.Errorf("vacuum: %w", err)
	}
	logf("stream: VACUUM ANALYZE in %s", time.Since(start).Round(time.Millisecond))
	return nil
}

func loadHistory(ctx context.Context, conn *pgx.Conn, p historyPlan) error {
	start := time.Now()
	var indexDef string
	err := conn.QueryRow(ctx, `SELECT pg_get_indexdef(indexrelid) FROM pg_index
 WHERE indrelid = 'threeds_records'::regclass AND indexrelid = 'threeds_records_user_page_idx'::regclass`).Scan(&indexDef)
	if err != nil {
		return fmt.Errorf("read the page index's definition: %w", err)
	}
	if _, err := conn.Exec(ctx, "DELETE FROM threeds_records WHERE user_id BETWEEN $1 AND $2 OR user_id = $3", p.first, p.last(), p.bigID); err != nil {
		return fmt.Errorf("delete partial history: %w", err)
	}
	if _, err := conn.Exec(ctx, "SET session_replication_role = replica"); err != nil {
		logf("stream: cannot skip the trigger while seeding (%v); the load will be slower", err)
	}
	defer func() {
		_, _ = conn.Exec(context.Background(), "RESET session_replication_role")
	}()
	_, _ = conn.Exec(ctx, "SET maintenance_work_mem = '256MB'")
	if _, err := conn.Exec(ctx, "DROP INDEX threeds_records_user_page_idx"); err != nil {
		return fmt.Errorf("drop the page index for the load: %w", err)
	}
	loadErr := func() error {
		if _, err := conn.Exec(ctx, historySQL, p.first, p.perUser, p.last()); err != nil {
			return fmt.Errorf("seed history: %w", err)
		}
		if _, err := conn.Exec(ctx, historySQL, p.bigID, p.bigRows, p.bigID); err != nil {
			return fmt.Errorf("seed the big user: %w", err)
		}
		return nil
	}()
	// The index comes back whatever happened to the load.
	if _, err := conn.Exec(context.Background(), indexDef); err != nil {
		return errors.Join(loadErr, fmt.Errorf("rebuild the page index (`threeds-records migrate` rebuilds it): %w", err))
	}
	if loadErr != nil {
		return loadErr
	}
	logf("stream: seeded %d rows of history (%d users × %d, one user × %d) and rebuilt the page index in %s",
		p.rows(), p.users, p.perUser, p.bigRows, time.Since(start).Round(time.Millisecond))
	return nil
}
