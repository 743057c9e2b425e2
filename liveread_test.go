package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// history is the shape of a table with years of traffic: one heavy user,
// many ordinary ones whose rows arrived interleaved (so one user's rows are
// scattered over the heap, as they are in production), one live record per
// user, and a few long-lived records (live and expired) for every tenth.
type history struct {
	bigUser   int64
	bigRows   int   // one every 30 s from 10 minutes ago back, expired
	firstUser int64 // the ordinary users are firstUser .. firstUser+users-1
	users     int
	perUser   int // one every hour from an hour ago back, expired
}

func (h history) ordinary() []int64 {
	out := make([]int64, h.users)
	for i := range out {
		out[i] = h.firstUser + int64(i)
	}
	return out
}

// populate loads the history with the NOTIFY trigger off for this session
// (session_replication_role needs the superuser the tests run as), then
// vacuums so that index-only scans are possible, as on a table autovacuum
// keeps up with. Ids are explicit and far above the identity's, so
// insertNow's records never collide with them.
func everyFourth(users []int64) []int64 {
	var out []int64
	for i := 0; i < len(users); i += 4 {
		out = append(out, users[i])
	}
	return out
}

func populate(t testing.TB, dsn string, h history) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, q := range []string{
		`SET session_replication_role = replica`,
		// The test clusters commit asynchronously; VACUUM marks a page
		// all-visible only once its rows' commits are flushed (hint bits),
		// so without this no page would be, and no scan index-only.
		`SET synchronous_commit = on`,
		fmt.Sprintf(`
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 100000000 + g, %d, '123456', 100, 'USD', 'Amazon', 300, now() - interval '10 minutes' - g * interval '30 seconds'
  FROM generate_series(1, %d) g`, h.bigUser, h.bigRows),
		fmt.Sprintf(`
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 200000000 + u * 1000 + g, u, '123456', 100, 'USD', 'Amazon', 300, now() - g * interval '1 hour'
  FROM generate_series(1, %d) g CROSS JOIN generate_series(%d, %d) u
 ORDER BY g DESC, u`, h.perUser, h.firstUser, h.firstUser+int64(h.users)-1),
		// One live record each, the heavy user included.
		fmt.Sprintf(`
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 300000000 + u, u, '654321', 5, 'EUR', NULL, 3600, now() - interval '1 minute'
  FROM (SELECT generate_series(%d, %d) UNION ALL SELECT %d) s(u)`, h.firstUser, h.firstUser+int64(h.users)-1, h.bigUser),
		// Every tenth user: one long-lived record still live, one expired.
		fmt.Sprintf(`
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 400000000 + u * 2 + k, u, '111111', 7, 'GBP', 'Shop', 864000 - k * 777600, now() - interval '5 days'
  FROM generate_series(%d, %d, 10) u CROSS JOIN generate_series(0, 1) k`, h.firstUser, h.firstUser+int64(h.users)-1),
		`RESET session_replication_role`,
		`VACUUM ANALYZE threeds_records`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("populate: %v\n%s", err, q)
		}
	}
}

// historyScanningSQL is the live read before issue 14, kept to measure the
// plans side by side: its liveness test cannot use an index range, so it
// visits every row of the users' history.
const historyScanningSQL = `
SELECT user_id, id, passcode, amount::text, currency, COALESCE(merchant_name, ''),
       expires_after, received_at, received_at + expires_after * interval '1 second'
  FROM threeds_records
 WHERE (user_id = ANY($1) OR id = ANY($2))
   AND received_at + expires_after * interval '1 second' > now()
 ORDER BY received_at, id`

// planCost is what EXPLAIN (ANALYZE, BUFFERS) says one read touched.
type planCost struct {
	buffers    int64    // shared blocks hit + read, the whole plan
	heapPages  int64    // heap fetches of index-only scans
	nodes      []string // every node type
	returnRows int64
	ms         float64
}

func explain(t testing.TB, conn *pgx.Conn, query string, args ...any) planCost {
	t.Helper()
	var raw []byte
	if err := conn.QueryRow(context.Background(), "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "+query, args...).Scan(&raw); err != nil {
		t.Fatalf("explain: %v", err)
	}
	var out []struct {
		Plan          map[string]any `json:"Plan"`
		ExecutionTime float64        `json:"Execution Time"`
	}
	if err := json.Unmarshal(raw, &out); err != nil || len(out) != 1 {
		t.Fatalf("explain output: %v %s", err, raw)
	}
	num := func(n map[string]any, k string) int64 { f, _ := n[k].(float64); return int64(f) }
	c := planCost{ms: out[0].ExecutionTime}
	c.buffers = num(out[0].Plan, "Shared Hit Blocks") + num(out[0].Plan, "Shared Read Blocks")
	c.returnRows = num(out[0].Plan, "Actual Rows")
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		c.nodes = append(c.nodes, n["Node Type"].(string))
		c.heapPages += num(n, "Heap Fetches")
		children, _ := n["Plans"].([]any)
		for _, ch := range children {
			walk(ch.(map[string]any))
		}
	}
	walk(out[0].Plan)
	return c
}

func TestLiveReadCostsInProportionToTheLiveRecordsNotTheHistory(t *testing.T) {
	h := history{bigUser: 7, bigRows: 200000, firstUser: 10000, users: 2000, perUser: 150}
	dsn := newTestDB(t)
	populate(t, dsn, h)
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	for _, tc := range []struct {
		name  string
		users []int64
		// maxBuffers bounds the new read: a handful of index pages per user
		// (two descents, the last day's leaf pages), whatever the history.
		maxBuffers int64
	}{
		{"one user with 200,000 rows of history reads a few index pages", []int64{h.bigUser}, 200},
		{"a batch of 500 users with scattered histories reads about ten pages each", everyFourth(h.ordinary()), 10 * liveUsersBatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := explain(t, conn, historyScanningSQL, tc.users, []int64{})
			after := explain(t, conn, liveUsersSQL, tc.users)
			t.Logf("before: %d buffers, %.1f ms, nodes %v", before.buffers, before.ms, before.nodes)
			t.Logf("after:  %d buffers (heap fetches %d), %.1f ms, nodes %v", after.buffers, after.heapPages, after.ms, after.nodes)
			if after.returnRows != before.returnRows {
				t.Errorf("the reads disagree: %d rows now, %d before", after.returnRows, before.returnRows)
			}
			for _, node := range after.nodes {
				if node == "Seq Scan" || node == "Bitmap Heap Scan" {
					t.Errorf("the plan has a %s: %v", node, after.nodes)
				}
			}
			if after.buffers > tc.maxBuffers {
				t.Errorf("the read touched %d buffers, want at most %d", after.buffers, tc.maxBuffers)
			}
		})
	}
}

func TestLiveReadReturnsExactlyTheLiveRecordsOldestFirst(t *testing.T) {
	h := history{bigUser: 7, bigRows: 5000, firstUser: 10000, users: 600, perUser: 30}
	dsn := newTestDB(t)
	populate(t, dsn, h)
	pool := newTestPool(t, dsn, nil)
	// Edge rows: exactly at the one-day split, a negative expires_after
	// received in the future, rows the service cannot render or whose
	// expiry overflows the timestamp range.
	insertRows(t, pool,
		seedRow{id: 1, userID: 10001, passcode: "1", amount: "1", currency: "USD", expiresAfter: 86400, receivedAt: ago(86400*time.Second - 30*time.Second)},
		seedRow{id: 2, userID: 10001, passcode: "2", amount: "1", currency: "USD", expiresAfter: 86401, receivedAt: ago(86400*time.Second + 30*time.Second)},
		seedRow{id: 3, userID: 10002, passcode: "3", amount: "1", currency: "USD", expiresAfter: -60, receivedAt: time.Now().Add(time.Hour).UTC().Format(time.RFC3339)},
		seedRow{id: 4, userID: 10002, passcode: "4", amount: "1", currency: "USD", expiresAfter: 2147483647, receivedAt: "infinity"},
		seedRow{id: 5, userID: 10003, passcode: "5", amount: "1", currency: "USD", expiresAfter: 2147483647, receivedAt: "294275-01-01T00:00:00Z"},
		seedRow{id: 6, userID: 10003, passcode: "6", amount: "1", currency: "USD", expiresAfter: 60, receivedAt: "-infinity"},
	)
	hb := newHub(testHubConfig(t, dsn), discardLogger())
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	users := append(h.ordinary(), h.bigUser)
	byUser, failed, err := hb.readLive(context.Background(), conn, users)
	if err != nil || len(failed) > 0 {
		t.Fatalf("read: %v, failed users %v", err, failed)
	}
	rows, err := conn.Query(context.Background(), `
SELECT user_id, id FROM threeds_records
 WHERE user_id = ANY($1) AND isfinite(received_at) AND id <> 5 -- whose expiry is past the timestamp range
   AND received_at + expires_after * interval '1 second' > now()
 UNION ALL SELECT 10003, 5
 ORDER BY 1, 2`, users)
	if err != nil {
		t.Fatal(err)
	}
	want := make(map[int64][]int64)
	total := 0
	for rows.Next() {
		var uid, id int64
		if err := rows.Scan(&uid, &id); err != nil {
			t.Fatal(err)
		}
		want[uid] = append(want[uid], id)
		total++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if total < h.users+h.users/10+3 {
		t.Fatalf("the brute-force read found only %d live records: the fixture is wrong", total)
	}
	for _, uid := range users {
		var got []int64
		for _, f := range byUser[uid] {
			got = append(got, f.id)
		}
		if !slices.IsSortedFunc(byUser[uid], func(a, b *frame) int { return frameAge(t, a) - frameAge(t, b) }) {
			t.Errorf("user %d: records not oldest first", uid)
		}
		slices.Sort(got)
		if !slices.Equal(got, want[uid]) {
			t.Errorf("user %d: got %v, want %v", uid, got, want[uid])
		}
	}
	if n := hb.reads.Load(); n != int64((len(users)+liveUsersBatch-1)/liveUsersBatch) {
		t.Errorf("%d statements for %d users, want one per %d", n, len(users), liveUsersBatch)
	}
}

func TestLiveReadIsolatesAFailingUserAndKeepsTheSession(t *testing.T) {
	dsn := newTestDB(t)
	cfg := testHubConfig(t, dsn)
	cfg.queryTimeout = 300 * time.Millisecond
	cfg.conn.RuntimeParams["statement_timeout"] = "300"
	hb := newHub(cfg, discardLogger())
	conn, err := pgx.ConnectConfig(context.Background(), cfg.conn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	// Stands in for the live read: one row per user, failing the statement
	// for the users the case names.
	failing := `
SELECT u, u * 10, 'p', '1', 'USD', '', 3600::bigint, now()
  FROM unnest($1::bigint[]) AS u
 WHERE CASE WHEN u = ANY('{%s}'::bigint[]) THEN 1 / (u - u) = 1      -- division_by_zero
            WHEN u = ANY('{%s}'::bigint[]) THEN pg_sleep(1) IS NULL  -- statement_timeout
            ELSE true END`
	users := make([]int64, 40)
	for i := range users {
		users[i] = int64(i + 1)
	}
	for _, tc := range []struct {
		name       string
		bad, slow  string
		wantFailed []int64
		wantLost   bool
	}{
		{"a user whose row fails the statement is the only one left out", "13", "", []int64{13}, false},
		{"a user whose read times out is the only one left out", "", "17", []int64{17}, false},
		{"two bad users are left out and the other 38 read", "5", "31", []int64{5, 31}, false},
		{"a database that fails every read gives the session up", "", "", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := fmt.Sprintf(failing, tc.bad, tc.slow)
			if tc.wantLost {
				q = `SELECT 1 / 0 FROM unnest($1::bigint[]) u`
			}
			r := &liveReader{h: hb, conn: conn}
			byUser := make(map[int64][]*frame)
			failed, err := r.isolate(context.Background(), q, users, byUser)
			if tc.wantLost {
				if err == nil {
					t.Fatal("every statement failed and the read still claims success")
				}
				return
			}
			if err != nil {
				t.Fatalf("the read gave the session up: %v", err)
			}
			slices.Sort(failed)
			if !slices.Equal(failed, tc.wantFailed) {
				t.Errorf("failed %v, want %v", failed, tc.wantFailed)
			}
			if got := len(byUser); got != len(users)-len(tc.wantFailed) {
				t.Errorf("%d users read, want %d", got, len(users)-len(tc.wantFailed))
			}
			if conn.IsClosed() {
				t.Fatal("a failed read closed the session")
			}
		})
	}
	var one int
	if err := conn.QueryRow(context.Background(), "SELECT 1").Scan(&one); err != nil {
		t.Errorf("the session is not usable after the failed reads: %v", err)
	}
}

// collector drains streams subscribed on the hub directly (as the handler
// would), recording the ids each receives and whether it got ready.
type collector struct {
	mu    sync.Mutex
	ids   map[*stream][]int64
	ready map[*stream]bool
	ended map[*stream]bool
}

func subscribeAll(t *testing.T, h *hub, users []int64) (*collector, []*stream) {
	t.Helper()
	c := &collector{ids: map[*stream][]int64{}, ready: map[*stream]bool{}, ended: map[*stream]bool{}}
	var streams []*stream
	for _, u := range users {
		st, ref := h.subscribe(u)
		if ref != nil {
			t.Fatalf("subscribe %d: %+v", u, ref)
		}
		streams = append(streams, st)
		go func() {
			for d := range st.ch {
				c.mu.Lock()
				for _, f := range d.frames {
					c.ids[st] = append(c.ids[st], f.id)
				}
				c.ready[st] = c.ready[st] || d.ready
				c.mu.Unlock()
			}
			c.mu.Lock()
			c.ended[st] = true
			c.mu.Unlock()
		}()
		t.Cleanup(func() { h.unsubscribe(st) })
	}
	return c, streams
}

func (c *collector) count(f func(st *stream) bool, streams []*stream) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, st := range streams {
		if f(st) {
			n++
		}
	}
	return n
}

func killListenBackend(t *testing.T, dsn string) {
	t.Helper()
	admin, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	var killed int
	err = admin.QueryRow(context.Background(), `
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records-listen'`).Scan(&killed)
	if err != nil || killed != 1 {
		t.Fatalf("terminate the LISTEN backend: killed %d, %v", killed, err)
	}
}

func TestStreamStaysUpOnALongHistoryWithALowQueryTimeout(t *testing.T) {
	// The production shape scaled down (it used 1.2 M rows and a
	// 100-150 ms DB_QUERY_TIMEOUT standing in for a production-size table).
	const timeout = 100 * time.Millisecond
	h := history{bigUser: 7, bigRows: 300000, firstUser: 10000, users: 2000, perUser: 50}
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.queryTimeout = timeout }})
	populate(t, svc.dsn, h)
	waitForSourceToCatchUp(t, svc)

	t.Run("a user with 300,000 rows gets ready at once and another user's record still arrives", func(t *testing.T) {
		began := time.Now()
		big, snapshot := mustOpenStream(t, svc.URL, svc.tokenFor(t, h.bigUser))
		took := time.Since(began)
		t.Logf("ready after %v with %d records in the snapshot", took, len(snapshot))
		if len(snapshot) != 1 {
			t.Errorf("snapshot of %d records, want the one live record", len(snapshot))
		}
		other, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, h.firstUser))
		id := insertNow(t, svc.pool, h.firstUser)
		if got := other.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != id {
			t.Errorf("the other user got %v, want %d", got, id)
		}
		mine := insertNow(t, svc.pool, h.bigUser)
		if got := big.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != mine {
			t.Errorf("the heavy user got %v, want %d", got, mine)
		}
		if n := svc.hub.reconnects.Load(); n != 0 {
			t.Errorf("%d reconnects: a read took the session down", n)
		}
	})

	users := append(h.ordinary(), h.bigUser)
	var c *collector
	var streams []*stream
	outer := t // the streams outlive the subtest
	t.Run("2,001 simultaneous connects all reach ready", func(t *testing.T) {
		began := time.Now()
		c, streams = subscribeAll(outer, svc.hub, users)
		waitFor(t, 20*time.Second, "every stream to be ready", func() bool {
			return c.count(func(st *stream) bool { return c.ready[st] }, streams) == len(streams)
		})
		t.Logf("%d streams ready after %v", len(streams), time.Since(began))
		if n := svc.hub.reconnects.Load(); n != 0 {
			t.Errorf("%d reconnects", n)
		}
	})
	if c == nil || t.Failed() {
		return
	}

	t.Run("after the session is killed every stream receives new records again, none twice", func(t *testing.T) {
		killListenBackend(t, svc.dsn)
		waitFor(t, 15*time.Second, "the session to go", func() bool { return svc.hub.reconnects.Load() == 1 || !svc.hub.listening() })
		// Committed during the gap or just after: the resync or the live
		// feed delivers them, each exactly once.
		newIDs := make(map[int64]int64)
		for _, u := range users[:50] {
			newIDs[u] = insertNow(t, svc.pool, u)
		}
		newIDs[h.bigUser] = insertNow(t, svc.pool, h.bigUser)
		byUser := make(map[int64]*stream)
		for _, st := range streams {
			byUser[st.userID] = st
		}
		missing := func() (out []int64) {
			c.mu.Lock()
			defer c.mu.Unlock()
			for u, id := range newIDs {
				if !slices.Contains(c.ids[byUser[u]], id) {
					out = append(out, u)
				}
			}
			return out
		}
		for deadline := time.Now().Add(15 * time.Second); len(missing()) > 0; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("after 15 s users %v still miss their new record; %d reconnects, %d streams ended, listening %v",
					missing(), svc.hub.reconnects.Load(), c.count(func(st *stream) bool { return c.ended[st] }, streams), svc.hub.listening())
			}
		}
		c.mu.Lock()
		for _, st := range streams {
			seen := make(map[int64]bool)
			for _, id := range c.ids[st] {
				if seen[id] {
					t.Errorf("user %d got record %d twice", st.userID, id)
				}
				seen[id] = true
			}
		}
		c.mu.Unlock()
		if n := c.count(func(st *stream) bool { return c.ended[st] }, streams); n != 0 {
			t.Errorf("%d streams ended", n)
		}
		if n := svc.hub.reconnects.Load(); n != 1 {
			t.Errorf("%d reconnects after one kill, want 1", n)
		}
	})
}

func TestStreamARowItCannotRenderStopsNobodysPush(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	a, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	b, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1002))
	bad := row(900001, 1001, "infinity")
	bad.expiresAfter = 300
	insertRows(t, svc.pool, bad)
	idB := insertNow(t, svc.pool, 1002)
	if got := b.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != idB {
		t.Errorf("the other user got %v, want %d", got, idB)
	}
	idA := insertNow(t, svc.pool, 1001)
	if got := a.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != idA {
		t.Errorf("the user with the bad row got %v, want %d (the bad row skipped)", got, idA)
	}
	if n := svc.hub.reconnects.Load(); n != 0 {
		t.Errorf("%d reconnects: the bad row took the session down", n)
	}

	// The resync after a reconnect reads the bad row's user again.
	killListenBackend(t, svc.dsn)
	waitFor(t, 15*time.Second, "the session to come back", func() bool { return svc.hub.reconnects.Load() >= 1 && svc.hub.listening() })
	idB = insertNow(t, svc.pool, 1002)
	if got := b.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != idB {
		t.Errorf("after the reconnect the other user got %v, want %d", got, idB)
	}
	time.Sleep(time.Second) // a reconnect loop would show within this
	if n := svc.hub.reconnects.Load(); n != 1 {
		t.Errorf("%d reconnects after one kill, want 1", n)
	}
}

func TestSourceBackoffGrowsWhileSessionsFailSoonAfterComingUp(t *testing.T) {
	const retryMin = 100 * time.Millisecond
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.retryMin = retryMin; c.retryMax = 5 * time.Second }})
	admin := newTestPool(t, svc.dsn, nil)
	listenBackend := func() (pid int32) {
		_ = admin.QueryRow(context.Background(), `
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records-listen'`).Scan(&pid)
		return pid
	}
	// Kill the session each time it is back up; the pause before the next
	// one must double: 0.1, 0.2, 0.4, 0.8, 1.6 s (plus jitter and connect).
	var gaps []time.Duration
	for i := range 5 {
		waitFor(t, 20*time.Second, "the session", func() bool { return svc.hub.listening() && listenBackend() != 0 })
		pid := listenBackend()
		var ok bool
		if err := admin.QueryRow(context.Background(), `SELECT pg_terminate_backend($1)`, pid).Scan(&ok); err != nil || !ok {
			t.Fatalf("kill %d: %v", i, err)
		}
		killed := time.Now()
		waitFor(t, 20*time.Second, "the next session", func() bool {
			p := listenBackend()
			return p != 0 && p != pid
		})
		gaps = append(gaps, time.Since(killed))
	}
	t.Logf("gaps between a kill and the next session: %v", gaps)
	if last := gaps[len(gaps)-1]; last < 8*retryMin {
		t.Errorf("the fifth reconnect came %v after the kill, want the backoff to have grown to at least %v", last, 8*retryMin)
	}
}

func TestNextWaitDoublesToTheMaximumAndResetsOnlyAfterAStableSession(t *testing.T) {
	cfg := hubConfig{retryMin: 100 * time.Millisecond, retryMax: 5 * time.Second, unavailableRetry: 30 * time.Second}
	transient := fmt.Errorf("wait for notification: %w", errSessionLost)
	unavailable := &unavailableError{details: "d", fix: "f", err: transient}
	for _, tc := range []struct {
		name              string
		backoff           time.Duration
		stayedUp          bool
		err               error
		wantNext, minWait time.Duration
	}{
		{"a failing session waits the backoff and doubles it", 100 * time.Millisecond, false, transient, 200 * time.Millisecond, 100 * time.Millisecond},
		{"the backoff stops growing at the maximum", 4 * time.Second, false, transient, 5 * time.Second, 4 * time.Second},
		{"a session that stayed up starts again from the minimum", 5 * time.Second, true, transient, 200 * time.Millisecond, 100 * time.Millisecond},
		{"a source that cannot work there waits the long retry", 400 * time.Millisecond, false, unavailable, 400 * time.Millisecond, 30 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next, wait := nextWait(tc.backoff, tc.stayedUp, tc.err, cfg)
			if next != tc.wantNext {
				t.Errorf("next backoff %v, want %v", next, tc.wantNext)
			}
			if wait < tc.minWait || wait > tc.minWait+tc.minWait/4 {
				t.Errorf("wait %v, want %v plus at most a quarter of jitter", wait, tc.minWait)
			}
		})
	}
}

// frameAge orders frames by the received_at they render (seconds are
// enough for the fixture, whose rows of one user are apart by minutes).
func frameAge(t testing.TB, f *frame) int {
	t.Helper()
	var rec struct {
		ReceivedAt string `json:"received_at"`
	}
	data := f.data[bytes.Index(f.data, []byte("data: "))+len("data: "):]
	if err := json.Unmarshal(bytes.TrimSpace(data), &rec); err != nil {
		t.Fatalf("frame %q: %v", f.data, err)
	}
	at, err := time.Parse(time.RFC3339, rec.ReceivedAt)
	if err != nil {
		return math.MaxInt // beyond year 9999: the newest
	}
	return int(at.Unix())
}

func TestAfterAReconnectTheGapIsCaughtUpInOneReadBeforeTheResync(t *testing.T) {
	// The first reconnect waits at least retryMin: records committed once
	// the hub has seen its session go fall in the gap.
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.retryMin = time.Second }})
	users := make([]int64, 600) // two resync batches
	for i := range users {
		users[i] = int64(5000 + i)
	}
	c, streams := subscribeAll(t, svc.hub, users)
	waitFor(t, 10*time.Second, "every stream to be ready", func() bool {
		return c.count(func(st *stream) bool { return c.ready[st] }, streams) == len(streams)
	})
	byUser := make(map[int64]*stream)
	for _, st := range streams {
		byUser[st.userID] = st
	}
	received := func(user, id int64) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return slices.Contains(c.ids[byUser[user]], id)
	}
	heard := insertNow(t, svc.pool, users[0])
	waitFor(t, 10*time.Second, "the record before the kill", func() bool { return received(users[0], heard) })

	killListenBackend(t, svc.dsn)
	waitFor(t, 15*time.Second, "the hub to see its session go", func() bool { return !svc.hub.listening() })
	gap := make(map[int64]int64) // user -> record committed in the gap
	for _, u := range []int64{users[1], users[250], users[599]} {
		gap[u] = insertNow(t, svc.pool, u)
	}
	expired := row(900000001, users[2], ago(time.Hour))
	insertRows(t, svc.pool, expired)
	if svc.hub.listening() {
		t.Fatal("the hub listens again already: the records above may not have fallen in the gap")
	}

	waitFor(t, 15*time.Second, "the gap's records", func() bool {
		for u, id := range gap {
			if !received(u, id) {
				return false
			}
		}
		return true
	})
	if n := svc.hub.caughtUp.Load(); n != int64(len(gap)) {
		t.Errorf("the catch-up read found %d live records, want the %d committed in the gap", n, len(gap))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, st := range streams {
		seen := make(map[int64]bool)
		for _, id := range c.ids[st] {
			if seen[id] {
				t.Errorf("user %d got record %d twice", st.userID, id)
			}
			if id == expired.id {
				t.Errorf("user %d got the expired record", st.userID)
			}
			seen[id] = true
		}
	}
}

// A new LISTEN session hears what is committed after its LISTEN before it is
// up (it first proves that notifications arrive); the catch-up must still
// start after the last record the lost session heard of, or the gap's
// records wait for the resync.
func TestTheCatchUpStartsAfterTheLastRecordTheLostSessionHeardOf(t *testing.T) {
	if testStreamSource(t) != sourceNotify {
		t.Skip("the wal source decodes nothing before it is up")
	}
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.retryMin = time.Second }})
	users := []int64{7001, 7002}
	c, streams := subscribeAll(t, svc.hub, users)
	waitFor(t, 10*time.Second, "every stream to be ready", func() bool {
		return c.count(func(st *stream) bool { return c.ready[st] }, streams) == len(streams)
	})
	received := func(st *stream, id int64) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return slices.Contains(c.ids[st], id)
	}
	heard := insertNow(t, svc.pool, users[0])
	waitFor(t, 10*time.Second, "the record before the kill", func() bool { return received(streams[0], heard) })

	killListenBackend(t, svc.dsn)
	waitFor(t, 15*time.Second, "the hub to see its session go", func() bool { return !svc.hub.listening() })
	inGap := insertNow(t, svc.pool, users[1])

	// Until the hub is up again, a record of a user nobody streams is
	// notified every millisecond, its id far past the gap's: the new
	// session hears some between its LISTEN and being up.
	ctx, cancel := context.WithCancel(context.Background())
	noise := make(chan error, 1)
	go func() {
		payload := fmt.Sprintf("%d:%d", int64(1)<<40, inGap+1_000_000)
		for ctx.Err() == nil {
			if _, err := svc.pool.Exec(ctx, "SELECT pg_notify($1, $2)", notifyChannel, payload); err != nil && ctx.Err() == nil {
				noise <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
		noise <- nil
	}()
	waitFor(t, 15*time.Second, "the hub to listen again", svc.hub.listening)
	cancel()
	if err := <-noise; err != nil {
		t.Fatalf("notify: %v", err)
	}
	if svc.hub.heard.Load() <= inGap {
		t.Fatal("the new session heard none of the later notifications before it was up: this run proves nothing")
	}

	waitFor(t, 15*time.Second, "the gap's record", func() bool { return received(streams[1], inGap) })
	if n := svc.hub.caughtUp.Load(); n != 1 {
		t.Errorf("the catch-up read found %d live records, want the 1 committed in the gap", n)
	}
}
