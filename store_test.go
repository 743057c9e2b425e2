package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/big"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	_ "time/tzdata" // the process-TZ test must not depend on the host's zoneinfo

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// seedRow is one threeds_records row as a test writes it; amount and
// receivedAt are SQL literals so the database, not Go, decides their value.
type seedRow struct {
	id           int64
	userID       int64
	passcode     string
	amount       string
	currency     string
	merchant     *string
	expiresAfter int32
	receivedAt   string
}

func insertRows(t testing.TB, pool *pgxpool.Pool, rows ...seedRow) {
	t.Helper()
	const insert = `
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7, $8::text::timestamptz)`
	batch := &pgx.Batch{}
	for _, r := range rows {
		batch.Queue(insert, r.id, r.userID, r.passcode, r.amount, r.currency, r.merchant, r.expiresAfter, r.receivedAt)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := pool.SendBatch(ctx, batch).Close(); err != nil {
		t.Fatalf("insert seed rows: %v", err)
	}
}

// row is a seed row with only what ordering and ownership tests care about.
func row(id, userID int64, receivedAt string) seedRow {
	merchant := "Amazon"
	return seedRow{id: id, userID: userID, passcode: "123456", amount: "100", currency: "USD",
		merchant: &merchant, expiresAfter: 300, receivedAt: receivedAt}
}

func ids(records []Record) []int64 {
	out := make([]int64, 0, len(records))
	for _, r := range records {
		out = append(out, r.ID)
	}
	return out
}

func TestStoreListRecordsPages(t *testing.T) {
	t.Parallel()
	store, pool := newTestStore(t)
	// User 1001's ids deliberately disagree with time order (5 is the newest,
	// 30 the oldest), three rows share one instant, and user 1002's rows sit
	// between them, one at that same instant.
	insertRows(t, pool,
		row(10, 1001, "2026-01-20 10:00:00Z"),
		row(11, 1001, "2026-01-20 09:00:00Z"),
		row(12, 1001, "2026-01-20 11:00:00Z"),
		row(21, 1001, "2026-01-20 12:00:00Z"),
		row(20, 1001, "2026-01-20 12:00:00Z"),
		row(22, 1001, "2026-01-20 12:00:00Z"),
		row(5, 1001, "2026-01-20 13:00:00Z"),
		row(30, 1001, "2026-01-20 08:00:00Z"),
		row(13, 1002, "2026-01-20 12:00:00Z"),
		row(23, 1002, "2026-01-20 13:30:00Z"),
		row(1, 1002, "2026-01-20 07:00:00Z"),
	)

	tests := []struct {
		name      string
		userID    int64
		page      int
		pageSize  int
		wantIDs   []int64
		wantTotal int64
	}{
		{"the first page lists the user's newest records first", 1001, 1, 3, []int64{5, 22, 21}, 8},
		{"records received at the same instant are ordered by id, highest first", 1001, 1, 100, []int64{5, 22, 21, 20, 12, 10, 11, 30}, 8},
		{"the second page continues exactly where the first stopped", 1001, 2, 3, []int64{20, 12, 10}, 8},
		{"the last page may be short", 1001, 3, 3, []int64{11, 30}, 8},
		{"a page past the end is empty and keeps the true total", 1001, 4, 3, []int64{}, 8},
		{"the largest allowed page is empty and keeps the true total", 1001, 2147483647, 100, []int64{}, 8},
		{"a page whose offset overflows int64 is empty and keeps the true total", 1001, math.MaxInt, 100, []int64{}, 8},
		{"another user sees only their own records", 1002, 1, 100, []int64{23, 13, 1}, 3},
		{"a user with no records has total 0", 1003, 1, 20, []int64{}, 0},
		{"a user with no records has total 0 past the end too", 1003, 5, 20, []int64{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			records, total, err := store.ListRecords(context.Background(), tt.userID, tt.page, tt.pageSize)
			if err != nil {
				t.Fatalf("ListRecords: %v", err)
			}
			if records == nil {
				t.Fatal("records is nil; the API must render [] rather than null")
			}
			if got := ids(records); !slices.Equal(got, tt.wantIDs) {
				t.Errorf("ids = %v, want %v", got, tt.wantIDs)
			}
			if total != tt.wantTotal {
				t.Errorf("total = %d, want %d", total, tt.wantTotal)
			}
		})
	}
}

func TestStoreListRecordsRejectsNonPositivePageArguments(t *testing.T) {
	t.Parallel()
	store, _ := newTestStore(t)
	for _, tt := range []struct{ page, pageSize int }{{0, 20}, {-1, 20}, {1, 0}, {1, -5}} {
		t.Run(fmt.Sprintf("page %d with page size %d is an error", tt.page, tt.pageSize), func(t *testing.T) {
			if _, _, err := store.ListRecords(context.Background(), 1, tt.page, tt.pageSize); err == nil {
				t.Fatal("ListRecords returned no error")
			}
		})
	}
}

func TestStoreWalkingEveryPageReturnsEveryRecordExactlyOnce(t *testing.T) {
	t.Parallel()
	store, pool := newTestStore(t)
	// 100 rows alternate between users 7 and 8; ids are a permutation of
	// 1..101 unrelated to time, and every three rows share a received_at.
	base := time.Date(2026, 1, 20, 0, 0, 0, 0, time.UTC)
	var seed []seedRow
	receivedAt := map[int64]time.Time{}
	for i := range 100 {
		id := int64(i*37%101 + 1)
		at := base.Add(time.Duration(i/3) * time.Minute)
		seed = append(seed, row(id, int64(7+i%2), at.Format(time.RFC3339)))
		if i%2 == 0 {
			receivedAt[id] = at
		}
	}
	insertRows(t, pool, seed...)

	for _, pageSize := range []int{1, 7, 49, 50, 100} {
		t.Run(fmt.Sprintf("page size %d", pageSize), func(t *testing.T) {
			var seen []int64
			wantPages := (50 + pageSize - 1) / pageSize
			for page := 1; page <= wantPages+1; page++ {
				records, total, err := store.ListRecords(context.Background(), 7, page, pageSize)
				if err != nil {
					t.Fatalf("page %d: %v", page, err)
				}
				if total != 50 {
					t.Errorf("page %d: total = %d, want 50", page, total)
				}
				wantLen := min(pageSize, 50-(page-1)*pageSize)
				if page > wantPages {
					wantLen = 0
				}
				if len(records) != wantLen {
					t.Errorf("page %d: %d records, want %d", page, len(records), wantLen)
				}
				seen = append(seen, ids(records)...)
			}
			if len(seen) != 50 {
				t.Fatalf("saw %d records over all pages, want 50", len(seen))
			}
			unique := map[int64]bool{}
			for i, id := range seen {
				at, ours := receivedAt[id]
				if !ours {
					t.Fatalf("id %d does not belong to user 7", id)
				}
				if unique[id] {
					t.Fatalf("id %d appears on more than one page", id)
				}
				unique[id] = true
				if i > 0 {
					prev := seen[i-1]
					if at.After(receivedAt[prev]) || (at.Equal(receivedAt[prev]) && id > prev) {
						t.Fatalf("id %d follows id %d but is newer", id, prev)
					}
				}
			}
		})
	}
}

// queryCounter counts statements sent through pgx; it observes a real
// connection rather than replacing one.
type queryCounter struct{ n atomic.Int64 }

func (c *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (c *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func TestStoreListRecordsRoundTrips(t *testing.T) {
	t.Parallel()
	counter := &queryCounter{}
	pool := newTestPool(t, newTestDB(t), func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = counter })
	store := NewStore(pool, 3*time.Second)
	insertRows(t, pool, row(1, 42, "2026-01-20 10:00:00Z"), row(2, 42, "2026-01-20 11:00:00Z"))

	tests := []struct {
		name      string
		userID    int64
		page      int
		wantQuery int64
		wantTotal int64
	}{
		{"a page with rows takes one query", 42, 1, 1, 2},
		{"page 1 of a user with no records takes one query", 43, 1, 1, 0},
		{"a page past the end takes a second query for the total", 42, 2, 2, 2},
		{"a page past the end of a user with no records takes a second query", 43, 2, 2, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := counter.n.Load()
			_, total, err := store.ListRecords(context.Background(), tt.userID, tt.page, 2)
			if err != nil {
				t.Fatalf("ListRecords: %v", err)
			}
			if got := counter.n.Load() - before; got != tt.wantQuery {
				t.Errorf("queries = %d, want %d", got, tt.wantQuery)
			}
			if total != tt.wantTotal {
				t.Errorf("total = %d, want %d", total, tt.wantTotal)
			}
		})
	}
}

func TestStoreFormatsEachColumnForTheAPI(t *testing.T) {
	t.Parallel()
	store, pool := newTestStore(t)
	amazon := "Amazon"
	tests := []struct {
		name string
		seed seedRow
		want Record
	}{
		{"USD 100 gets two decimals",
			seedRow{1, 9, "123456", "100", "USD", &amazon, 300, "2026-01-20 10:30:00Z"},
			Record{1, "123456", "100.00", "USD", "Amazon", 300, "2026-01-20T10:30:00Z"}},
		{"JPY 1500 has no decimals",
			seedRow{2, 9, "123456", "1500", "JPY", &amazon, 300, "2026-01-20 10:30:01Z"},
			Record{2, "123456", "1500", "JPY", "Amazon", 300, "2026-01-20T10:30:01Z"}},
		{"JPY stored with a zero scale of 2 loses only the zeros",
			seedRow{3, 9, "123456", "1500.00", "JPY", &amazon, 300, "2026-01-20 10:30:02Z"},
			Record{3, "123456", "1500", "JPY", "Amazon", 300, "2026-01-20T10:30:02Z"}},
		{"KWD 1.5 gets three decimals",
			seedRow{4, 9, "123456", "1.5", "KWD", &amazon, 300, "2026-01-20 10:30:03Z"},
			Record{4, "123456", "1.500", "KWD", "Amazon", 300, "2026-01-20T10:30:03Z"}},
		{"an unknown currency code gets two decimals",
			seedRow{5, 9, "123456", "7", "XYZ", &amazon, 300, "2026-01-20 10:30:04Z"},
			Record{5, "123456", "7.00", "XYZ", "Amazon", 300, "2026-01-20T10:30:04Z"}},
		{"a digit beyond the currency's minor unit is never rounded away",
			seedRow{6, 9, "123456", "1.005", "USD", &amazon, 300, "2026-01-20 10:30:05Z"},
			Record{6, "123456", "1.005", "USD", "Amazon", 300, "2026-01-20T10:30:05Z"}},
		{"trailing zeros beyond the minor unit are trimmed",
			seedRow{7, 9, "123456", "100.1000", "USD", &amazon, 300, "2026-01-20 10:30:06Z"},
			Record{7, "123456", "100.10", "USD", "Amazon", 300, "2026-01-20T10:30:06Z"}},
		{"a negative amount keeps its sign",
			seedRow{8, 9, "123456", "-12.3", "USD", &amazon, 300, "2026-01-20 10:30:07Z"},
			Record{8, "123456", "-12.30", "USD", "Amazon", 300, "2026-01-20T10:30:07Z"}},
		{"a lower-case currency is shown upper-case and still finds its minor unit",
			seedRow{9, 9, "123456", "2.5", "kwd", &amazon, 300, "2026-01-20 10:30:08Z"},
			Record{9, "123456", "2.500", "KWD", "Amazon", 300, "2026-01-20T10:30:08Z"}},
		{"a NULL merchant is an empty string",
			seedRow{10, 9, "123456", "1", "USD", nil, 300, "2026-01-20 10:30:09Z"},
			Record{10, "123456", "1.00", "USD", "", 300, "2026-01-20T10:30:09Z"}},
		{"a passcode keeps its leading zero",
			seedRow{11, 9, "012345", "1", "USD", &amazon, 300, "2026-01-20 10:30:10Z"},
			Record{11, "012345", "1.00", "USD", "Amazon", 300, "2026-01-20T10:30:10Z"}},
		{"expires_after is passed through in seconds",
			seedRow{12, 9, "123456", "1", "USD", &amazon, 86400, "2026-01-20 10:30:11Z"},
			Record{12, "123456", "1.00", "USD", "Amazon", 86400, "2026-01-20T10:30:11Z"}},
	}
	for _, tt := range tests {
		insertRows(t, pool, tt.seed)
	}
	records, total, err := store.ListRecords(context.Background(), 9, 1, 100)
	if err != nil {
		t.Fatalf("ListRecords: %v", err)
	}
	if total != int64(len(tests)) {
		t.Fatalf("total = %d, want %d", total, len(tests))
	}
	byID := map[int64]Record{}
	for _, r := range records {
		byID[r.ID] = r
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := byID[tt.want.ID]; got != tt.want {
				t.Errorf("record = %+v\nwant       %+v", got, tt.want)
			}
		})
	}
}

// processTZEnv marks the child process started by
// TestStoreReceivedAtIgnoresProcessTimeZone.
const processTZEnv = "THREEDS_TEST_PROCESS_TZ_CHILD"

func TestStoreReceivedAtIsUTCWholeSeconds(t *testing.T) {
	t.Parallel()
	if os.Getenv(processTZEnv) != "" {
		if _, offset := time.Now().Zone(); offset == 0 {
			t.Fatal("the child process was meant to run with a non-UTC TZ, but time.Local is UTC")
		}
	}
	// A non-UTC session time zone: with it, PostgreSQL's own text output of
	// these rows would read 05:30:00-05, not 10:30:00Z.
	pool := newTestPool(t, newTestDB(t), func(cfg *pgxpool.Config) {
		cfg.ConnConfig.RuntimeParams["timezone"] = "America/New_York"
	})
	store := NewStore(pool, 3*time.Second)
	var sessionTZ string
	if err := pool.QueryRow(context.Background(), "SHOW timezone").Scan(&sessionTZ); err != nil || sessionTZ != "America/New_York" {
		t.Fatalf("session timezone = %q (%v), want America/New_York", sessionTZ, err)
	}

	tests := []struct {
		name       string
		receivedAt string
		want       string
	}{
		{"an instant written with a +08:00 offset is shown in UTC", "2026-01-20 18:30:00+08:00", "2026-01-20T10:30:00Z"},
		{"fractional seconds are truncated, never rounded up", "2026-01-20 18:31:59.999999+08:00", "2026-01-20T10:31:59Z"},
		{"an instant across midnight UTC moves to the previous day", "2026-01-21 02:00:00.5+08:00", "2026-01-20T18:00:00Z"},
	}
	for i, tt := range tests {
		seed := row(int64(i+1), 5, tt.receivedAt)
		insertRows(t, pool, seed)
	}
	records, _, err := store.ListRecords(context.Background(), 5, 1, 100)
	if err != nil {
		t.Fatalf("ListRecords: %v", err)
	}
	byID := map[int64]string{}
	for _, r := range records {
		byID[r.ID] = r.ReceivedAt
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := byID[int64(i+1)]; got != tt.want {
				t.Errorf("received_at = %q, want %q", got, tt.want)
			}
		})
	}
}

// pgx hands timestamptz back in time.Local, and time.Local is fixed at
// process start, so the only honest way to test a non-UTC process TZ is a
// second process.
func TestStoreReceivedAtIgnoresProcessTimeZone(t *testing.T) {
	t.Parallel()
	if os.Getenv(processTZEnv) != "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0],
		"-test.run=^TestStoreReceivedAtIsUTCWholeSeconds$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), processTZEnv+"=1", "TZ=Asia/Kolkata")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("TestStoreReceivedAtIsUTCWholeSeconds under TZ=Asia/Kolkata failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestStoreReceivedAtIsUTCWholeSeconds") {
		t.Fatalf("the child process did not run the test:\n%s", out)
	}
}

func TestStoreSchemaHasTheContractColumnsAndIndex(t *testing.T) {
	t.Parallel()
	_, pool := newTestStore(t)
	ctx := context.Background()

	rows, err := pool.Query(ctx, `
SELECT column_name, data_type, is_nullable, coalesce(identity_generation, '')
  FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = 'threeds_records'
 ORDER BY ordinal_position`)
	if err != nil {
		t.Fatalf("query columns: %v", err)
	}
	var got []string
	for rows.Next() {
		var name, typ, nullable, identity string
		if err := rows.Scan(&name, &typ, &nullable, &identity); err != nil {
			t.Fatalf("scan column: %v", err)
		}
		got = append(got, strings.TrimSpace(fmt.Sprintf("%s %s %s %s", name, typ, nullable, identity)))
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("columns: %v", err)
	}
	want := []string{
		"id bigint NO BY DEFAULT",
		"user_id bigint NO",
		"passcode text NO",
		"amount numeric NO",
		"currency text NO",
		"merchant_name text YES",
		"expires_after integer NO",
		"received_at timestamp with time zone NO",
	}
	if !slices.Equal(got, want) {
		t.Errorf("columns:\n got %q\nwant %q", got, want)
	}

	var indexDef string
	err = pool.QueryRow(ctx, `SELECT indexdef FROM pg_indexes WHERE indexname = 'threeds_records_user_page_idx'`).Scan(&indexDef)
	if err != nil {
		t.Fatalf("page index: %v", err)
	}
	const wantIndex = "(user_id, received_at DESC, id DESC) INCLUDE (passcode, amount, currency, merchant_name, expires_after)"
	if !strings.HasSuffix(indexDef, wantIndex) {
		t.Errorf("index = %s\nwant it to end with %s", indexDef, wantIndex)
	}
}

func TestStorePageQueryCanBeAnIndexOnlyScanWithoutSort(t *testing.T) {
	t.Parallel()
	_, pool := newTestStore(t)
	var seed []seedRow
	for i := range 400 {
		seed = append(seed, row(int64(i+1), int64(1+i%2), fmt.Sprintf("2026-01-20 10:%02d:%02dZ", i/60, i%60)))
	}
	insertRows(t, pool, seed...)
	ctx := context.Background()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatalf("acquire: %v", err)
	}
	defer conn.Release()
	// The planner may rightly prefer a seq scan on a table this small; this
	// test is about whether the index covers the query, not the planner's choice.
	if _, err := conn.Exec(ctx, "SET enable_seqscan = off; SET enable_bitmapscan = off"); err != nil {
		t.Fatalf("set planner flags: %v", err)
	}
	defer conn.Exec(ctx, "RESET ALL")

	// VACUUM can only mark pages all-visible once no other transaction on
	// the cluster (parallel tests) might still see the old state, so it is
	// retried for a bounded time before heap fetches count as a failure.
	var plan string
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := conn.Exec(ctx, "VACUUM (ANALYZE) threeds_records"); err != nil {
			t.Fatalf("vacuum: %v", err)
		}
		rows, err := conn.Query(ctx, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "+listRecordsSQL, int64(1), int64(20), int64(40))
		if err != nil {
			t.Fatalf("explain: %v", err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatalf("explain: %v", err)
		}
		plan = strings.Join(lines, "\n")
		if strings.Contains(plan, "Heap Fetches: 0") || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(plan, "Index Only Scan using threeds_records_user_page_idx") {
		t.Errorf("the page query is not an index-only scan on threeds_records_user_page_idx:\n%s", plan)
	}
	if strings.Contains(plan, "Sort") {
		t.Errorf("the page query sorts instead of reading the index in order:\n%s", plan)
	}
	if !strings.Contains(plan, "Heap Fetches: 0") {
		t.Errorf("the index-only scan still fetched heap pages after VACUUM:\n%s", plan)
	}
}

func TestStorePing(t *testing.T) {
	t.Parallel()
	t.Run("Ping succeeds against a running database", func(t *testing.T) {
		t.Parallel()
		store, _ := newTestStore(t)
		if err := store.Ping(context.Background()); err != nil {
			t.Fatalf("Ping: %v", err)
		}
	})
	t.Run("Ping reports a database that is not listening", func(t *testing.T) {
		t.Parallel()
		pool := newTestPool(t, "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=2", nil)
		store := NewStore(pool, 3*time.Second)
		if err := store.Ping(context.Background()); err == nil {
			t.Fatal("Ping returned no error")
		}
	})
}

func TestStoreCallsStopAtTheirDeadline(t *testing.T) {
	t.Parallel()
	store, pool := newTestStore(t)

	t.Run("an already cancelled context fails every method", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, _, listErr := store.ListRecords(ctx, 1, 1, 20)
		for name, err := range map[string]error{
			"ListRecords": listErr,
			"Ping":        store.Ping(ctx),
			"Migrate":     store.Migrate(ctx),
		} {
			if !errors.Is(err, context.Canceled) {
				t.Errorf("%s: err = %v, want context.Canceled", name, err)
			}
		}
	})

	t.Run("a query blocked by a lock fails at the store's timeout though the caller set none", func(t *testing.T) {
		ctx := context.Background()
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatalf("begin: %v", err)
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, "LOCK TABLE threeds_records IN ACCESS EXCLUSIVE MODE"); err != nil {
			t.Fatalf("lock: %v", err)
		}

		// The caller's own deadline only keeps a broken store from hanging the test.
		callerCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		short := NewStore(pool, 200*time.Millisecond)
		start := time.Now()
		_, _, err = short.ListRecords(callerCtx, 1, 1, 20)
		elapsed := time.Since(start)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err = %v, want context.DeadlineExceeded", err)
		}
		if elapsed > 5*time.Second {
			t.Errorf("ListRecords returned after %v; the 200ms timeout did not stop it", elapsed)
		}
	})
}

func TestFormatAmount(t *testing.T) {
	tests := []struct {
		name, numeric, currency, want string
	}{
		{"zero in a two-digit currency", "0", "USD", "0.00"},
		{"zero in a zero-digit currency", "0", "JPY", "0"},
		{"zero stored with scale in a zero-digit currency", "0.00", "JPY", "0"},
		{"a half is padded", "0.5", "USD", "0.50"},
		{"a negative value already at scale is unchanged", "-0.50", "USD", "-0.50"},
		{"a negative value is padded after its sign", "-12.3", "USD", "-12.30"},
		{"a negative whole value in JPY", "-1500.000", "JPY", "-1500"},
		{"negative zero loses its sign", "-0.000", "USD", "0.00"},
		{"negative zero without fraction loses its sign", "-0", "JPY", "0"},
		{"a huge value keeps every digit", "12345678901234567890.123456789", "USD", "12345678901234567890.123456789"},
		{"a huge value trims only zeros", "12345678901234567890.120000000", "USD", "12345678901234567890.12"},
		{"USD 100", "100", "USD", "100.00"},
		{"USD already at scale", "100.00", "USD", "100.00"},
		{"a third USD digit is kept", "100.125", "USD", "100.125"},
		{"a sub-cent USD digit is kept", "1.005", "USD", "1.005"},
		{"zeros after the cents are trimmed", "100.1000", "USD", "100.10"},
		{"zeros are trimmed down to the last non-zero digit", "100.1230", "USD", "100.123"},
		{"JPY 1500", "1500", "JPY", "1500"},
		{"JPY stored with scale 2", "1500.00", "JPY", "1500"},
		{"a JPY fraction is never dropped", "0.001", "JPY", "0.001"},
		{"KRW is a zero-digit currency", "50000.0", "KRW", "50000"},
		{"KWD 1.5", "1.5", "KWD", "1.500"},
		{"lower-case KWD", "1.5000", "kwd", "1.500"},
		{"mixed-case BHD", "10", "bHd", "10.000"},
		{"TND has three digits", "3.14", "TND", "3.140"},
		{"CLF has four digits", "0.5", "CLF", "0.5000"},
		{"UYW keeps a fifth digit", "1.23456", "UYW", "1.23456"},
		{"an unknown code gets two digits", "7", "XYZ", "7.00"},
		{"an empty code gets two digits", "7", "", "7.00"},
		{"a code of the wrong length gets two digits", "7", "JPYX", "7.00"},
		{"EUR is a two-digit currency", "9.9", "EUR", "9.90"},
		{"NaN is shown as stored", "NaN", "USD", "NaN"},
		{"Infinity is shown as stored", "Infinity", "USD", "Infinity"},
		{"-Infinity is shown as stored", "-Infinity", "JPY", "-Infinity"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := formatAmount(tt.numeric, tt.currency)
			if got != tt.want {
				t.Fatalf("formatAmount(%q, %q) = %q, want %q", tt.numeric, tt.currency, got, tt.want)
			}
			// Formatting may change how a value is written, never its value.
			in, inOK := new(big.Rat).SetString(tt.numeric)
			out, outOK := new(big.Rat).SetString(got)
			if inOK && (!outOK || in.Cmp(out) != 0) {
				t.Fatalf("formatAmount(%q, %q) = %q changes the value", tt.numeric, tt.currency, got)
			}
		})
	}
}

func BenchmarkFormatAmount(b *testing.B) {
	inputs := []struct{ numeric, currency string }{
		{"100.00", "USD"}, // already at scale: the common case
		{"100", "USD"},
		{"1500.00", "JPY"},
		{"1.5", "kwd"},
		{"12345678901234567890.123456789", "USD"},
	}
	b.ReportAllocs()
	for b.Loop() {
		for _, in := range inputs {
			formatAmount(in.numeric, in.currency)
		}
	}
}
