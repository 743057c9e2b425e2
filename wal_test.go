package main

import (
	"context"
	"encoding/binary"
	"log/slog"
	"net/url"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// The stream tests of events_test.go run once per source: as written with
// notify (the default), and again under TestEveryStreamTestWithTheWalSource
// with wal. STREAM_TEST_SOURCE=wal runs every one of them with wal.
const walSubtestsOf = "TestEveryStreamTestWithTheWalSource/"

// streamTestsForEachSource are the tests that open streams fed by a
// source, whatever file they are in. Left out: the config errors (no source
// runs); the PgBouncer verdict (each source says it its own way: see
// TestWalAnswers503SayingWhyWhereTheDatabaseCannotFeedIt); and listener_test.go's
// counts of reads per record and of the LISTEN session's statements, which
// the wal source does not make (TestWalIdleStreamsCostTheDatabaseNothing).
var streamTestsForEachSource = []func(*testing.T){
	TestStreamStartsWithRetryThenTheLiveSnapshotOldestFirstThenReady,
	TestStreamDeliversTheUsersNewLiveRecordsAndNothingElse,
	TestStreamSnapshotBoundaryDeliversEveryRecordExactlyOnce,
	TestStreamLosesNothingAndDuplicatesNothingWhenTheListenBackendIsKilled,
	TestStreamSendsAPingWhenSilentForTheHeartbeat,
	TestStreamEndsWithTokenExpiredWhenTheTokenExpires,
	TestStreamEndsWithKeyRemovedWhenItsKeyLeavesTheKeySet,
	TestStreamLimitsReplaceTheUsersOldestAndAnswer503OverTheProcessLimit,
	TestStreamRefusesBeforeStartingWithTheJSONErrorOfTheListEndpoint,
	TestStreamsAreAdmittedDuringTheShutdownDelayAndEndWhenDrainingStarts,
	TestStreamOutlivesTheServersReadAndWriteTimeouts,
	TestStreamMemoryPerOpenStreamStaysUnder32KiB,
	TestStreamARowItCannotRenderStopsNobodysPush,
	TestStreamStaysUpOnALongHistoryWithALowQueryTimeout,
	TestAStreamEndsWithKeyRemovedWhenItsKeyIsReplacedUnderTheSameKid,
	TestTheEventStreamMatchesTheOpenAPIDocument,
	TestFiveStreamsThatStopReadingNeverKeepTheSixthOut,
	TestAReconnectWithLastEventIDGetsTheLiveSnapshotAgain,
}

func TestEveryStreamTestWithTheWalSource(t *testing.T) {
	if os.Getenv("STREAM_TEST_SOURCE") == sourceWAL {
		t.Skip("STREAM_TEST_SOURCE=wal: the stream tests themselves run with wal")
	}
	for _, test := range streamTestsForEachSource {
		name := runtime.FuncForPC(reflect.ValueOf(test).Pointer()).Name()
		t.Run(name[strings.LastIndexByte(name, '.')+1:], test)
	}
}

// testStreamSource is the source a stream test runs with: wal for the
// tests of this file (TestWal...) and the wal runs of events_test.go's.
func testStreamSource(t testing.TB) string {
	if strings.HasPrefix(t.Name(), "TestWal") || strings.HasPrefix(t.Name(), walSubtestsOf) || os.Getenv("STREAM_TEST_SOURCE") == sourceWAL {
		return sourceWAL
	}
	return sourceNotify
}

// prepareTestSource gives dsn's database what source needs beyond what
// newTestDB's migrate installs: the wal source's publication. (Once migrate
// installs it for STREAM_SOURCE=wal, this can call that instead.)
func prepareTestSource(t testing.TB, dsn, source string) {
	t.Helper()
	if source != sourceWAL {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, `
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'threeds_records_events') THEN
    CREATE PUBLICATION threeds_records_events FOR TABLE threeds_records WITH (publish = 'insert');
  END IF;
END $$`)
	if err != nil {
		t.Fatalf("create the publication: %v", err)
	}
	// Registered before the hub's shutdown, so run after it: the WAL sender
	// ends a moment after the service closes its connection, and the test
	// database cannot be dropped while its slot is active.
	t.Cleanup(func() {
		conn, err := pgx.Connect(context.Background(), dsn)
		if err != nil {
			return
		}
		defer conn.Close(context.Background())
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			var active bool
			err := conn.QueryRow(context.Background(), `
SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE database = current_database() AND active)`).Scan(&active)
			if err != nil || !active {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// walSlots lists the service's slots on dsn's database.
func walSlots(t testing.TB, db rowsQuerier) (names []string, temporary []bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := db.Query(ctx, `
SELECT slot_name, temporary FROM pg_replication_slots
 WHERE database = current_database() AND slot_name LIKE 'threeds\_records\_%'`)
	if err != nil {
		t.Fatalf("list slots: %v", err)
	}
	var (
		name string
		tmp  bool
	)
	_, err = pgx.ForEachRow(rows, []any{&name, &tmp}, func() error {
		names, temporary = append(names, name), append(temporary, tmp)
		return nil
	})
	if err != nil {
		t.Fatalf("list slots: %v", err)
	}
	return names, temporary
}

type rowsQuerier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func TestWalRendersEveryRecordExactlyAsTheListEndpointDoes(t *testing.T) {
	// As if DATABASE_LISTEN_URL carried settings of its own: the decoded
	// text must not depend on them.
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) {
		c.conn.RuntimeParams["timezone"] = "America/St_Johns"
		c.conn.RuntimeParams["datestyle"] = "SQL, DMY"
	}})
	token := svc.tokenFor(t, 4001)
	s, _ := mustOpenStream(t, svc.URL, token)

	// The writer's session is not in UTC: the decoded received_at must not
	// care, nor the list.
	writer, err := pgx.Connect(context.Background(), svc.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close(context.Background())
	if _, err := writer.Exec(context.Background(), "SET TimeZone = 'Asia/Kolkata'"); err != nil {
		t.Fatal(err)
	}
	rows := []struct{ passcode, amount, currency, merchant, receivedAt string }{
		{"000123", "1500", "JPY", "", "now() - interval '1.25 seconds'"}, // leading zeros; no minor unit; NULL merchant
		{"0", "1.5", "kwd", "Café ☕ 東京", "now()"},                        // three minor digits; lower-case code; unicode
		{"987654", "12.30", "USD", `Bob's "Bar" \ <b>` + "\u2028", "'" + time.Now().Add(-2*time.Second).In(time.FixedZone("", 5*3600+1800)).Format("2006-01-02 15:04:05.999999-07:00") + "'"}, // escaping; an offset of +05:30
		{"42", "100.000001", "EUR", "x", "now() - interval '0.5 seconds'"}, // a digit past the minor unit is never dropped
		{"12345678", "-0.10", "EUR", "refund", "now()"},                    // negative
	}
	var ids []int64
	for _, r := range rows {
		var merchant *string
		if r.merchant != "" {
			merchant = &r.merchant
		}
		var id int64
		err := writer.QueryRow(context.Background(), `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES (4001, $1, $2::numeric, $3, $4, 600, `+r.receivedAt+`) RETURNING id`, r.passcode, r.amount, r.currency, merchant).Scan(&id)
		if err != nil {
			t.Fatalf("insert %+v: %v", r, err)
		}
		ids = append(ids, id)
	}
	listed := listRecordJSON(t, svc.testService, token)
	for _, id := range ids {
		ev, ok := s.nextEvent(t, 10*time.Second)
		if !ok {
			t.Fatalf("the stream ended: %v", s.readErr())
		}
		if want := "event: record\nid: " + strconv.FormatInt(id, 10) + "\ndata: " + listed[id] + "\n"; ev.raw != want {
			t.Errorf("record %d decoded from the WAL\n got %q\nwant %q (the list endpoint's object)", id, ev.raw, want)
		}
	}
}

// insertStreamed runs one transaction that inserts n rows for an unstreamed
// user (so that it exceeds logical_decoding_work_mem and is streamed).
func insertFiller(t testing.TB, tx pgx.Tx, n int) {
	t.Helper()
	_, err := tx.Exec(context.Background(), `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 9999, '111111', 1, 'USD', repeat('m', 200), 600, now() FROM generate_series(1, $1)`, n)
	if err != nil {
		t.Fatalf("filler: %v", err)
	}
}

func insertIn(t testing.TB, tx pgx.Tx, user int64) int64 {
	t.Helper()
	var id int64
	err := tx.QueryRow(context.Background(), `
INSERT INTO threeds_records (user_id, passcode, amount, currency, expires_after, received_at)
VALUES ($1, '123456', 1, 'USD', 600, now()) RETURNING id`, user).Scan(&id)
	if err != nil {
		t.Fatalf("insert: %v", err)
	}
	return id
}

func TestWalHoldsAStreamedTransactionUntilItCommitsAndDropsWhatItRolledBack(t *testing.T) {
	// 64kB: the filler below is streamed to the source while the
	// transaction is still open, which is what protocol 2 is used for.
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.conn.RuntimeParams["logical_decoding_work_mem"] = "64kB" }})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 5001))
	ctx := context.Background()

	tx, err := svc.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kept := insertIn(t, tx, 5001)
	insertFiller(t, tx, 2000)
	if _, err := tx.Exec(ctx, "SAVEPOINT s"); err != nil {
		t.Fatal(err)
	}
	rolledBack := insertIn(t, tx, 5001)
	insertFiller(t, tx, 2000)
	if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
		t.Fatal(err)
	}
	insertFiller(t, tx, 2000)
	waitFor(t, 15*time.Second, "the open transaction to be streamed to the source", func() bool {
		var n int64
		err := svc.pool.QueryRow(ctx, `
SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name LIKE 'threeds\_records\_%'`).Scan(&n)
		return err == nil && n > 0
	})
	s.quiet(t, 500*time.Millisecond) // nothing before the commit
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	aborted, err := svc.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	never := insertIn(t, aborted, 5001)
	insertFiller(t, aborted, 4000)
	if err := aborted.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	barrier := insertNow(t, svc.pool, 5001)

	got := s.recordIDs(t, 15*time.Second, func(ids []int64) bool { return slices.Contains(ids, barrier) })
	if want := []int64{kept, barrier}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v (%d was rolled back to a savepoint, %d with its transaction)", got, want, rolledBack, never)
	}
}

func TestWalBackfillOfExpiredRowsSendsNothingAndLiveRecordsStillArrive(t *testing.T) {
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("WAL_BACKFILL_ROWS")); err == nil && v > 0 {
		n = v
	}
	svc := newStreamService(t, streamOptions{})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 6001))
	ctx := context.Background()

	var sender int
	if err := svc.pool.QueryRow(ctx, `
SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' AND datname = current_database()`).Scan(&sender); err != nil {
		t.Fatal(err)
	}
	senderCPU, ownCPU := procCPU(sender), selfCPU()
	backfillDone := make(chan error, 1)
	started := time.Now()
	go func() {
		// The user's own old records: were a single one sent, the check
		// below would see it.
		_, err := svc.pool.Exec(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, expires_after, received_at)
SELECT 6001, '222222', 1, 'USD', 300, now() - interval '2 days' - g * interval '1 second' FROM generate_series(1, $1) g`, n)
		backfillDone <- err
	}()
	var (
		live      []int64
		committed = map[int64]time.Time{}
	)
	for done := false; !done; {
		select {
		case err := <-backfillDone:
			if err != nil {
				t.Fatalf("backfill: %v", err)
			}
			done = true
		case <-time.After(100 * time.Millisecond):
		}
		id := insertNow(t, svc.pool, 6001)
		committed[id] = time.Now()
		live = append(live, id)
	}
	backfill := time.Since(started)
	var worst time.Duration
	var got []int64
	deadline := time.Now().Add(60 * time.Second)
	for len(got) < len(live) {
		ev, ok := s.nextEvent(t, time.Until(deadline))
		if !ok || ev.event != "record" {
			t.Fatalf("stream: %v (%v)", ev, s.readErr())
		}
		id := eventID(t, ev)
		got = append(got, id)
		worst = max(worst, ev.at.Sub(committed[id]))
	}
	if !slices.Equal(got, live) {
		t.Fatalf("got %d records, want exactly the %d live ones: %v", len(got), len(live), got[:min(len(got), 20)])
	}
	senderCPU, ownCPU = procCPU(sender)-senderCPU, selfCPU()-ownCPU
	s.quiet(t, 300*time.Millisecond)
	t.Logf("%s: backfill of %d expired rows in one transaction: %s; %d live records committed meanwhile, the latest arrived %s after its commit; CPU: WAL sender %s, this process (service and test) %s",
		time.Now().UTC().Format(time.DateTime), n, backfill.Round(time.Millisecond), len(live), worst.Round(time.Millisecond), senderCPU.Round(10*time.Millisecond), ownCPU.Round(10*time.Millisecond))
}

// procCPU is a process's CPU time so far (Linux /proc; zero elsewhere).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// After the command's closing parenthesis: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+st) * 10 * time.Millisecond // USER_HZ = 100
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestWalSlotIsTemporaryAndGoesWithTheSession(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	names, temporary := walSlots(t, svc.pool)
	if len(names) != 1 || !temporary[0] {
		t.Fatalf("slots %v temporary %v, want one temporary slot", names, temporary)
	}
	svc.hub.stop()
	waitFor(t, 10*time.Second, "the slot to go with its session", func() bool {
		names, _ := walSlots(t, svc.pool)
		return len(names) == 0
	})
}

func TestWalSlotIsGoneWhenTheProcessIsKilled(t *testing.T) {
	dsn := newTestDB(t)
	prepareTestSource(t, dsn, sourceWAL)
	idp := newJWKSServer(t, newTestKey(t, jwa.ES256, "run", 0).publicJWK(t, false))
	env := serviceEnv(dsn, idp.URL)
	env["STREAM_SOURCE"] = sourceWAL
	b := startBinary(t, env)
	pool := newTestPool(t, dsn, nil)
	waitFor(t, 15*time.Second, "the service's slot", func() bool {
		names, temporary := walSlots(t, pool)
		return len(names) == 1 && temporary[0]
	})
	if err := b.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-b.exited
	killed := time.Now()
	waitFor(t, 15*time.Second, "the slot to go with the killed process", func() bool {
		names, _ := walSlots(t, pool)
		return len(names) == 0
	})
	t.Logf("the slot was gone %s after SIGKILL", time.Since(killed).Round(time.Millisecond))
}

func TestWalSessionOutlivesAShortWalSenderTimeoutAndAcknowledgesOtherTablesWAL(t *testing.T) {
	// The server cuts a consumer that does not answer its keepalives within
	// wal_sender_timeout; the source's periodic status alone (every 3 s)
	// would not be enough at 2 s.
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.conn.RuntimeParams["wal_sender_timeout"] = "2s" }})
	ctx := context.Background()
	if _, err := svc.pool.Exec(ctx, "CREATE TABLE unrelated (x int)"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.pool.Exec(ctx, "INSERT INTO unrelated SELECT generate_series(1, 1000)"); err != nil {
		t.Fatal(err)
	}
	var lsn string
	if err := svc.pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	// Nothing of threeds_records was written: only keepalives can move the
	// acknowledged position, or the slot would hold every other table's WAL.
	waitFor(t, 15*time.Second, "the slot to acknowledge "+lsn, func() bool {
		var done bool
		err := svc.pool.QueryRow(ctx, `
SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots
 WHERE database = current_database() AND slot_name LIKE 'threeds\_records\_%'`, lsn).Scan(&done)
		return err == nil && done
	})
	time.Sleep(5 * time.Second)
	if n := svc.hub.reconnects.Load(); n != 0 || !svc.hub.listening() {
		t.Fatalf("reconnects = %d, up %v: the session was cut", n, svc.hub.listening())
	}
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 7001))
	id := insertNow(t, svc.pool, 7001)
	if got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != id {
		t.Errorf("got %v, want [%d]", got, id)
	}
}

// startWalHub runs the wal source alone on dsn, logging into a buffer.
func startWalHub(t *testing.T, dsn string) (*hub, *syncBuffer) {
	t.Helper()
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.RuntimeParams["application_name"] = "threeds-records-listen"
	logs := &syncBuffer{}
	h := newHub(hubConfig{
		source: sourceWAL, conn: cc, queryTimeout: 5 * time.Second,
		probeTimeout: 2 * time.Second, unavailableRetry: time.Second,
	}, slog.New(slog.NewJSONHandler(logs, nil)))
	h.start()
	t.Cleanup(h.shutdown)
	return h, logs
}

const unavailableLine = "live updates are unavailable; the list endpoint keeps working"

// waitUnavailable waits for the stream's 503 of a source that cannot work
// there, and returns its details and the one ERROR line that says what to set.
func waitUnavailable(t *testing.T, h *hub, logs *syncBuffer) (details string, line map[string]any) {
	t.Helper()
	waitFor(t, 30*time.Second, "the stream's 503", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.state != sourceUnavailable {
			return false
		}
		r := h.notUpLocked()
		details = r.details
		return r.retryAfter == 30
	})
	time.Sleep(1500 * time.Millisecond) // a retry or two: still one line
	var lines []map[string]any
	for _, l := range logs.logLines(t) {
		if l["msg"] == unavailableLine {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || lines[0]["level"] != "ERROR" {
		t.Fatalf("%d unavailable lines, want one ERROR: %v", len(lines), lines)
	}
	return details, lines[0]
}

func checkUnavailable(t *testing.T, h *hub, logs *syncBuffer, wantDetails, wantSet string) {
	t.Helper()
	details, line := waitUnavailable(t, h, logs)
	if !strings.Contains(details, wantDetails) {
		t.Errorf("503 details %q do not say %q", details, wantDetails)
	}
	if set, _ := line["set"].(string); !strings.Contains(set, wantSet) {
		t.Errorf("the log line's set %q does not say %q", set, wantSet)
	}
}

func TestWalAnswers503SayingWhyWhereTheDatabaseCannotFeedIt(t *testing.T) {
	admin := newTestPool(t, os.Getenv("DATABASE_URL"), nil)
	cases := []struct {
		name                 string
		target               func(t *testing.T) string
		wantDetails, wantSet string
	}{
		{"a role without REPLICATION", func(t *testing.T) string {
			dsn := newTestDB(t)
			prepareTestSource(t, dsn, sourceWAL)
			role := "threeds_norepl_" + strconv.FormatInt(time.Now().UnixNano(), 36)
			if _, err := admin.Exec(context.Background(), "CREATE ROLE "+role+" LOGIN"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "DROP ROLE "+role) })
			u, err := url.Parse(dsn)
			if err != nil {
				t.Fatal(err)
			}
			u.User = url.User(role)
			return u.String()
		}, "lacks the REPLICATION attribute", "WITH REPLICATION"},
		{"no publication (migrate not run for wal)", func(t *testing.T) string {
			return newTestDB(t)
		}, "no publication threeds_records_events", "STREAM_SOURCE=wal"},
		{"PgBouncer in between", func(t *testing.T) string {
			dsn := newTestDB(t)
			prepareTestSource(t, dsn, sourceWAL)
			return startPgBouncer(t, databaseName(t, dsn))
		}, "PgBouncer", "bypassing PgBouncer"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h, logs := startWalHub(t, tc.target(t))
			checkUnavailable(t, h, logs, tc.wantDetails, tc.wantSet)
		})
	}
}

func TestWalAnswers503NamingTheLongTransactionThatHoldsUpTheSlotAndRecovers(t *testing.T) {
	dsn := newTestDB(t)
	prepareTestSource(t, dsn, sourceWAL)
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.RuntimeParams["application_name"] = "forgetful-writer"
	writer, err := pgx.ConnectConfig(context.Background(), cc)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close(context.Background())
	tx, err := writer.Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	insertIn(t, tx, 8001) // an id: slot creation waits for it

	h, logs := startWalHub(t, dsn)
	checkUnavailable(t, h, logs, "a long transaction on the primary holds up", "pid "+strconv.Itoa(int(writer.PgConn().PID())))
	for _, l := range logs.logLines(t) {
		if l["msg"] == unavailableLine {
			t.Logf("set: %v", l["set"])
			if !strings.Contains(l["set"].(string), "forgetful-writer") {
				t.Errorf("the log line does not name the holder's application: %v", l["set"])
			}
		}
	}
	if err := tx.Rollback(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "the source once the transaction ended", h.listening)
}

func TestWalAnswers503SayingWhatToSetOnAStandbyAndWhereTheServerLacksSomething(t *testing.T) {
	c := startCluster(t)
	migrateTestDB(t, c.url)
	prepareTestSource(t, c.url, sourceWAL)
	alter := func(t *testing.T, settings ...string) {
		t.Helper()
		conn, err := pgx.Connect(context.Background(), c.url)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range settings {
			if _, err := conn.Exec(context.Background(), "ALTER SYSTEM SET "+s); err != nil {
				t.Fatal(err)
			}
		}
		conn.Close(context.Background())
		c.stop()
		c.start()
	}
	t.Run("a hot standby", func(t *testing.T) {
		standby := startStandby(t, c)
		waitForReplay(t, c.url, standby.url)
		h, logs := startWalHub(t, standby.url)
		checkUnavailable(t, h, logs, "hot standby", "the primary")
		h.shutdown()
		standby.stop()
	})
	t.Run("wal_level below logical", func(t *testing.T) {
		alter(t, "wal_level = replica")
		h, logs := startWalHub(t, c.url)
		checkUnavailable(t, h, logs, "wal_level is replica", "wal_level = logical")
	})
	t.Run("no free replication slot", func(t *testing.T) {
		alter(t, "wal_level = logical", "max_replication_slots = 1")
		admin := newTestPool(t, c.url, nil)
		if _, err := admin.Exec(context.Background(), "SELECT pg_create_logical_replication_slot('occupier', 'pgoutput')"); err != nil {
			t.Fatal(err)
		}
		h, logs := startWalHub(t, c.url)
		checkUnavailable(t, h, logs, "no free replication slot", "max_replication_slots")
		h.shutdown()
		if _, err := admin.Exec(context.Background(), "SELECT pg_drop_replication_slot('occupier')"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("no free WAL sender", func(t *testing.T) {
		alter(t, "max_wal_senders = 0")
		h, logs := startWalHub(t, c.url)
		checkUnavailable(t, h, logs, "no free WAL sender", "max_wal_senders")
	})
}

// TestWalDelayBehindABigUnrelatedTransaction measures (WAL_DELAY_ROWS=n
// enables it; docs/decisions.md has the figures) how late a record arrives
// when it is committed while, and just after, one transaction inserts n
// rows into another table, with protocol 1 and with protocol 2 streaming.
func TestWalDelayBehindABigUnrelatedTransaction(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("WAL_DELAY_ROWS"))
	if n <= 0 {
		t.Skip("a measurement: set WAL_DELAY_ROWS (e.g. 2000000)")
	}
	for _, streaming := range []bool{false, true} {
		t.Run("streaming "+strconv.FormatBool(streaming), func(t *testing.T) {
			dsn := newTestDB(t)
			prepareTestSource(t, dsn, sourceWAL)
			pool := newTestPool(t, dsn, nil)
			ctx := context.Background()
			if _, err := pool.Exec(ctx, "CREATE TABLE unrelated (id bigint, note text)"); err != nil {
				t.Fatal(err)
			}
			h := newHub(testHubConfig(t, dsn), discardLogger())
			h.src.(*walSource).streaming = streaming
			h.start()
			t.Cleanup(h.shutdown)
			waitFor(t, 15*time.Second, "the source", h.listening)
			st, refused := h.subscribe(9001)
			if refused != nil {
				t.Fatal(refused.details)
			}
			arrived := map[int64]time.Time{}
			var amu sync.Mutex
			go func() {
				for d := range st.ch {
					now := time.Now()
					amu.Lock()
					for _, f := range d.frames {
						arrived[f.id] = now
					}
					amu.Unlock()
				}
			}()
			big := make(chan time.Duration, 1)
			start := time.Now()
			go func() {
				_, err := pool.Exec(ctx, "INSERT INTO unrelated SELECT g, repeat('x', 60) FROM generate_series(1, $1) g", n)
				if err != nil {
					t.Error(err)
				}
				big <- time.Since(start)
			}()
			committed := map[int64]time.Time{}
			var took time.Duration
			var end time.Time
			for end.IsZero() || time.Now().Before(end) {
				select {
				case took = <-big:
					end = time.Now().Add(time.Second)
				case <-time.After(100 * time.Millisecond):
				}
				committed[insertNow(t, pool, 9001)] = time.Now()
			}
			waitFor(t, 120*time.Second, "every record", func() bool {
				amu.Lock()
				defer amu.Unlock()
				return len(arrived) >= len(committed)
			})
			var delays []time.Duration
			amu.Lock()
			for id, at := range committed {
				delays = append(delays, arrived[id].Sub(at))
			}
			amu.Unlock()
			slices.Sort(delays)
			var spilled int64
			_ = pool.QueryRow(ctx, `SELECT coalesce(sum(spill_bytes), 0) FROM pg_stat_replication_slots WHERE slot_name LIKE 'threeds\_records\_%'`).Scan(&spilled)
			t.Logf("%s: %d rows into another table in %s; %d records committed meanwhile: delay p50 %s, max %s; spilled %d MB",
				time.Now().UTC().Format(time.DateTime), n, took.Round(time.Millisecond), len(delays),
				delays[len(delays)/2].Round(time.Millisecond), delays[len(delays)-1].Round(time.Millisecond), spilled>>20)
		})
	}
}

// FuzzWalDecoderNeverPanics feeds the decoder what a broken or hostile
// server could send: errors, never a panic.
func FuzzWalDecoderNeverPanics(f *testing.F) {
	be32 := func(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
	be16 := func(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
	rel := append([]byte{'R'}, be32(nil, 16384)...)
	rel = append(rel, "public\x00threeds_records\x00d"...)
	cols := []string{"id", "user_id", "passcode", "amount", "currency", "merchant_name", "expires_after", "received_at"}
	rel = be16(rel, uint16(len(cols)))
	for _, c := range cols {
		rel = append(append(append(rel, 0), c...), 0)
		rel = be32(be32(rel, 25), 0xffffffff)
	}
	ins := append([]byte{'I'}, be32(nil, 16384)...)
	ins = be16(append(ins, 'N'), uint16(len(cols)))
	for _, v := range []string{"1", "2", "000123", "1.5", "KWD", "", "600", "2026-12-07 20:50:34.123456+00"} {
		if v == "" {
			ins = append(ins, 'n')
			continue
		}
		ins = append(be32(append(ins, 't'), uint32(len(v))), v...)
	}
	begin := append([]byte{'B'}, make([]byte, 20)...)
	commit := append([]byte{'C'}, make([]byte, 25)...)
	f.Add(rel, begin, ins, commit)
	f.Add(rel, []byte{'S', 0, 0, 0, 9, 1}, append([]byte{'I', 0, 0, 0, 9}, ins[1:]...), []byte{'A', 0, 0, 0, 9, 0, 0, 0, 10})
	f.Add([]byte{'R'}, []byte{'I', 0, 0, 0x40, 0}, []byte{'c'}, []byte{})
	f.Fuzz(func(t *testing.T, a, b, c, d []byte) {
		dec := newWalDecoder(func(int64) bool { return true }, func(error) {})
		for _, m := range [][]byte{a, b, c, d} {
			_, _ = dec.handle(m, time.Unix(0, 0))
		}
		_, _ = parseXLogData(a)
		_, _ = parseKeepalive(b)
	})
}

func TestWalIdleStreamsCostTheDatabaseNothing(t *testing.T) {
	const heartbeat = 100 * time.Millisecond
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.heartbeat = heartbeat }})
	for u := int64(1); u <= 5; u++ {
		mustOpenStream(t, svc.URL, svc.tokenFor(t, u))
	}
	// The read session's state_change moves whenever it runs a statement;
	// the WAL sender runs none (it streams).
	state := func() (read string, changed time.Time) {
		t.Helper()
		err := svc.pool.QueryRow(context.Background(), `
SELECT state, state_change FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records-listen-read'`).Scan(&read, &changed)
		if err != nil {
			t.Fatalf("the read session: %v", err)
		}
		return read, changed
	}
	reads := svc.hub.reads.Load()
	_, before := state()
	time.Sleep(10 * heartbeat)
	st, after := state()
	if n := svc.hub.reads.Load() - reads; n != 0 {
		t.Errorf("idle streams caused %d reads", n)
	}
	if st != "idle" || !after.Equal(before) {
		t.Errorf("the read session ran statements while every stream was idle: state %s, state_change %s -> %s", st, before, after)
	}
	if pings := svc.hub.events[eventPing].Load(); pings < 5 {
		t.Errorf("only %d pings: the streams were not exercised", pings)
	}
}

// waitForSourceToCatchUp waits, with the wal source, until it has decoded
// everything written so far: a test that has just written hundreds of
// thousands of rows of history measures the delay behind them otherwise
// (TestWalBackfillOfExpiredRowsSendsNothingAndLiveRecordsStillArrive
// measures that one). The notify source has nothing to catch up on.
func waitForSourceToCatchUp(t testing.TB, svc *streamService) {
	t.Helper()
	if svc.hub.cfg.source != sourceWAL {
		return
	}
	ctx := context.Background()
	var lsn string
	if err := svc.pool.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	waitFor(t, 120*time.Second, "the wal source to decode up to "+lsn, func() bool {
		var done bool
		err := svc.pool.QueryRow(ctx, `
SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots
 WHERE database = current_database() AND slot_name LIKE 'threeds\_records\_%'`, lsn).Scan(&done)
		return err == nil && done
	})
	t.Logf("the wal source caught up with what was written in %s", time.Since(began).Round(time.Millisecond))
}
