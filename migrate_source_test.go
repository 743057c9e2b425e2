package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// switchStallBound is the contract's bound for switching a live table between
// sources: no insert delayed by more than a second.
const switchStallBound = time.Second

// previousTriggerSQL is the notify trigger as earlier versions installed it:
// no WHEN, so a backfill of expired rows notified every row.
const previousTriggerSQL = `
DROP TRIGGER IF EXISTS threeds_records_notify_insert ON threeds_records;
CREATE TRIGGER threeds_records_notify_insert
    AFTER INSERT ON threeds_records
    FOR EACH ROW EXECUTE FUNCTION threeds_records_notify()`

// migrateSourceLog runs `threeds-records migrate` in-process with
// STREAM_SOURCE=source and returns its log lines.
func migrateSourceLog(t testing.TB, ctx context.Context, dsn, source string) ([]map[string]any, error) {
	t.Helper()
	var stdout syncBuffer
	err := run(ctx, []string{"migrate"}, envFunc(map[string]string{"DATABASE_URL": dsn, "STREAM_SOURCE": source}), &stdout, &syncBuffer{})
	return stdout.logLines(t), err
}

// sourceObjects is what the catalog holds of the two sources' objects.
type sourceObjects struct {
	trigger     string // the notify trigger's tgenabled, "" when there is none
	triggerWhen bool   // it has a WHEN
	publication string // "" when there is none, "inserts" when it publishes exactly the table's inserts, else "other"
}

func sourceObjectsOf(t testing.TB, dsn string) sourceObjects {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var s sourceObjects
	err := connectTest(t, dsn).QueryRow(ctx, `
SELECT coalesce((SELECT tgenabled::text FROM pg_trigger
                  WHERE tgrelid = 'threeds_records'::regclass AND tgname = 'threeds_records_notify_insert'), ''),
       coalesce((SELECT tgqual IS NOT NULL FROM pg_trigger
                  WHERE tgrelid = 'threeds_records'::regclass AND tgname = 'threeds_records_notify_insert'), false),
       coalesce((SELECT CASE WHEN p.pubinsert AND NOT (p.pubupdate OR p.pubdelete OR p.pubtruncate OR p.puballtables)
                              AND ARRAY(SELECT prrelid FROM pg_publication_rel WHERE prpubid = p.oid) = ARRAY['threeds_records'::regclass::oid]
                             THEN 'inserts' ELSE 'other' END
                   FROM pg_publication p WHERE p.pubname = 'threeds_records_events'), '')`).
		Scan(&s.trigger, &s.triggerWhen, &s.publication)
	if err != nil {
		t.Fatalf("read the sources' objects from the catalog: %v", err)
	}
	return s
}

var (
	notifyInPlace = sourceObjects{trigger: "O", triggerWhen: true}
	walInPlace    = sourceObjects{publication: "inserts"}
)

// wantActions checks the actions migrate logged for the sources' objects.
func wantActions(t testing.TB, logs []map[string]any, trigger, publication string) {
	t.Helper()
	actions := actionsOf(logs)
	if got := actions["trigger threeds_records_notify_insert"]; got != trigger {
		t.Errorf("log for the trigger: %q, want %q (all logged: %v)", got, trigger, actions)
	}
	if got := actions["publication threeds_records_events"]; got != publication {
		t.Errorf("log for the publication: %q, want %q (all logged: %v)", got, publication, actions)
	}
}

func TestMigrateSwitchesALiveTableBetweenSourcesWithoutDelayingAnInsertOverASecond(t *testing.T) {
	// Not parallel: it times inserts.
	dsn := newTestDB(t) // migrated for notify, the default
	writer := startInserter(t, dsn)
	watch := watchInsertLockWaits(t, dsn)
	time.Sleep(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	from := time.Now()
	for _, sw := range []struct {
		source, trigger, publication string
		want                         sourceObjects
	}{
		{"wal", actionDropped, actionCreated, walInPlace},
		{"notify", actionCreated, actionDropped, notifyInPlace},
		{"wal", actionDropped, actionCreated, walInPlace},
		{"notify", actionCreated, actionDropped, notifyInPlace},
	} {
		// A switch takes tens of milliseconds: the pause lets the writer's
		// inserts fall before, during and after each one.
		time.Sleep(150 * time.Millisecond)
		logs, err := migrateSourceLog(t, ctx, dsn, sw.source)
		if err != nil {
			t.Fatalf("migrate to %s: %v", sw.source, err)
		}
		wantActions(t, logs, sw.trigger, sw.publication)
		if got := sourceObjectsOf(t, dsn); got != sw.want {
			t.Errorf("after migrating to %s the catalog holds %+v, want %+v", sw.source, got, sw.want)
		}
	}
	to := time.Now()
	time.Sleep(200 * time.Millisecond)
	samples := writer.finish(t)
	lockWait, blockers := watch.finish(t)

	slowest, overlapped := slowestInsert(samples, from, to)
	t.Logf("four switches took %v; %d inserts ran during them, the slowest took %v, the longest lock wait seen %v",
		to.Sub(from).Round(time.Millisecond), overlapped, slowest.Round(time.Millisecond), lockWait.Round(time.Millisecond))
	if slowest > switchStallBound || lockWait > switchStallBound {
		t.Errorf("an insert took %v (lock wait %v, behind %q), want at most %v", slowest, lockWait, blockers, switchStallBound)
	}
	if overlapped < 10 {
		t.Errorf("only %d inserts ran during the switches: the writer was held up, or the test measured nothing", overlapped)
	}
}

func TestMigrateTwicePerSourceTakesNoLockAnInsertWaitsOn(t *testing.T) {
	// Not parallel: it times inserts.
	for _, tc := range []struct {
		source, trigger, publication string
		want                         sourceObjects
	}{
		{"notify", actionInPlace, actionAbsent, notifyInPlace},
		{"wal", actionAbsent, actionInPlace, walInPlace},
	} {
		t.Run("a second migrate for "+tc.source+" changes nothing behind an open writer transaction", func(t *testing.T) {
			dsn := newEmptyTestDB(t)
			ctx := context.Background()
			if err := NewStore(newTestPool(t, dsn, nil), 0).MigrateFor(ctx, tc.source); err != nil {
				t.Fatalf("first migrate: %v", err)
			}
			// Holds ROW EXCLUSIVE until the end: any DDL on the table would
			// queue behind it, and every insert after that behind the DDL.
			openTx := openWriterTransaction(t, ctx, dsn)
			defer openTx.Rollback(ctx)
			writer := startInserter(t, dsn)
			watch := watchInsertLockWaits(t, dsn)
			time.Sleep(100 * time.Millisecond)
			runCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			from := time.Now()
			logs, err := migrateSourceLog(t, runCtx, dsn, tc.source)
			to := time.Now()
			time.Sleep(200 * time.Millisecond)
			samples := writer.finish(t)
			lockWait, blockers := watch.finish(t)
			if err != nil {
				t.Fatalf("second migrate: %v", err)
			}
			wantActions(t, logs, tc.trigger, tc.publication)
			for object, action := range actionsOf(logs) {
				if action != actionInPlace && action != actionAbsent {
					t.Errorf("the second migrate logged %q for %s", action, object)
				}
			}
			if got := sourceObjectsOf(t, dsn); got != tc.want {
				t.Errorf("the catalog holds %+v, want %+v", got, tc.want)
			}
			slowest, overlapped := slowestInsert(samples, from, to)
			t.Logf("migrate took %v; %d inserts ran during it, the slowest took %v, the longest lock wait seen %v",
				to.Sub(from).Round(time.Millisecond), overlapped, slowest.Round(time.Microsecond), lockWait.Round(time.Millisecond))
			if took := to.Sub(from); took > 5*time.Second {
				t.Errorf("migrate took %v with everything in place, want it prompt", took)
			}
			if lockWait > insertStallBound || slowest > insertStallBound {
				t.Errorf("an insert took %v (lock wait %v, behind %q), want at most %v", slowest, lockWait, blockers, insertStallBound)
			}
		})
	}
}

// notifyTriggerCases are the states of the notify trigger migrate must bring
// up to schema.sql, and how it logs doing so.
var notifyTriggerCases = []struct {
	name, setup, action string
}{
	{"the trigger of earlier versions, without the WHEN, gets it", previousTriggerSQL, actionReplaced},
	{"a disabled trigger is enabled", "ALTER TABLE threeds_records DISABLE TRIGGER threeds_records_notify_insert", actionEnabled},
	{"a trigger that fires only for replication sessions is enabled", "ALTER TABLE threeds_records ENABLE REPLICA TRIGGER threeds_records_notify_insert", actionEnabled},
	{"a disabled trigger without the WHEN is replaced, which enables it too",
		previousTriggerSQL + ";\nALTER TABLE threeds_records DISABLE TRIGGER threeds_records_notify_insert", actionReplaced},
}

func TestMigrateBringsTheNotifyTriggerUpToTheFile(t *testing.T) {
	t.Parallel()
	for _, tc := range notifyTriggerCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dsn := newTestDB(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := connectTest(t, dsn).Exec(ctx, tc.setup); err != nil {
				t.Fatalf("set the trigger up: %v", err)
			}
			logs, err := migrateSourceLog(t, ctx, dsn, "notify")
			if err != nil {
				t.Fatalf("migrate: %v", err)
			}
			wantActions(t, logs, tc.action, actionAbsent)
			if got := sourceObjectsOf(t, dsn); got != notifyInPlace {
				t.Errorf("the catalog holds %+v, want %+v", got, notifyInPlace)
			}

			// An expired row, then a live one, each committed on its own: the
			// first notification must be the live row's.
			listener := connectTest(t, dsn)
			if _, err := listener.Exec(ctx, "LISTEN threeds_records_inserted"); err != nil {
				t.Fatalf("listen: %v", err)
			}
			writer := connectTest(t, dsn)
			for _, q := range []string{
				`INSERT INTO threeds_records (id, user_id, passcode, amount, currency, expires_after, received_at)
VALUES (101, 7, '000000', 1, 'USD', 300, now() - interval '1 hour')`,
				`INSERT INTO threeds_records (id, user_id, passcode, amount, currency, expires_after, received_at)
VALUES (102, 7, '000000', 1, 'USD', 300, now())`,
			} {
				if _, err := writer.Exec(ctx, q); err != nil {
					t.Fatalf("insert: %v", err)
				}
			}
			waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			n, err := listener.WaitForNotification(waitCtx)
			if err != nil {
				t.Fatalf("no notification of the live row: %v", err)
			}
			if n.Payload != "7:102" {
				t.Errorf("first notification %q, want the live row's 7:102", n.Payload)
			}
		})
	}
}

func TestMigrateRecreatesAPublicationThatPublishesAnythingButTheTablesInserts(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, setup string }{
		{"one that publishes updates and deletes too", "CREATE PUBLICATION threeds_records_events FOR TABLE threeds_records"},
		{"one that publishes another table too", `CREATE TABLE other (a int PRIMARY KEY);
CREATE PUBLICATION threeds_records_events FOR TABLE threeds_records, other WITH (publish = 'insert')`},
		{"one that publishes another table only", `CREATE TABLE other (a int PRIMARY KEY);
CREATE PUBLICATION threeds_records_events FOR TABLE other WITH (publish = 'insert')`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dsn := newTestDB(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := connectTest(t, dsn).Exec(ctx, tc.setup); err != nil {
				t.Fatalf("set the publication up: %v", err)
			}
			logs, err := migrateSourceLog(t, ctx, dsn, "wal")
			if err != nil {
				t.Fatalf("migrate: %v", err)
			}
			wantActions(t, logs, actionDropped, actionReplaced)
			if got := sourceObjectsOf(t, dsn); got != walInPlace {
				t.Errorf("the catalog holds %+v, want %+v", got, walInPlace)
			}
		})
	}
}

func TestMigrateInstallsATriggerThatNeverFailsTheWritersInsert(t *testing.T) {
	t.Parallel()
	dsn := newTestDB(t)
	writer := connectTest(t, dsn)
	// Rows the contract does not forbid; the trigger's WHEN is evaluated for
	// each, and an error there would fail the writer's INSERT.
	for _, tc := range []struct{ name, receivedAt, expiresAfter string }{
		{"a received_at near the end of the timestamp range with the longest expiry", "294276-12-31 23:59:59Z", "2147483647"},
		{"the most negative expiry", "2026-01-01Z", "-2147483648"},
		{"a received_at of infinity", "infinity", "300"},
		{"a received_at of -infinity", "-infinity", "300"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := writer.Exec(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, expires_after, received_at)
VALUES (9, '000000', 1, 'USD', $1::int, $2::timestamptz)`, tc.expiresAfter, tc.receivedAt); err != nil {
				t.Errorf("insert with the trigger in place: %v", err)
			}
		})
	}
}

func TestMigrateChangesTheTriggerBehindAnOpenWriterTransactionHoldingInsertsUpOnlyForLockTimeout(t *testing.T) {
	// Not parallel: it times inserts.
	cases := []struct{ name, source, setup, action string }{
		{"dropping it for wal (ACCESS EXCLUSIVE)", "wal", "", actionDropped},
		{"adding its WHEN (SHARE ROW EXCLUSIVE)", "notify", previousTriggerSQL, actionReplaced},
		{"enabling it (SHARE ROW EXCLUSIVE)", "notify", "ALTER TABLE threeds_records DISABLE TRIGGER threeds_records_notify_insert", actionEnabled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dsn := newTestDB(t)
			ctx := context.Background()
			if tc.setup != "" {
				if _, err := connectTest(t, dsn).Exec(ctx, tc.setup); err != nil {
					t.Fatalf("set the trigger up: %v", err)
				}
			}
			migrateBesideAnOpenWriterTransaction(t, dsn, func(t testing.TB, ctx context.Context, dsn string) ([]map[string]any, error) {
				return migrateSourceLog(t, ctx, dsn, tc.source)
			}, tc.action)
		})
	}
}

func TestMigrateInstallsATriggerThatQueuesNothingForABackfillOfExpiredRecords(t *testing.T) {
	// Not parallel: it measures delivery delays while a million rows go in.
	dsn := newTestDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	listener := connectTest(t, dsn)
	if _, err := listener.Exec(ctx, "LISTEN threeds_records_inserted"); err != nil {
		t.Fatalf("listen: %v", err)
	}
	writer := connectTest(t, dsn)
	insertLive := func(id int) time.Time {
		t.Helper()
		if _, err := writer.Exec(ctx, `
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, expires_after, received_at)
VALUES ($1, 42, '000000', 1, 'USD', 300, now())`, id); err != nil {
			t.Fatalf("insert a live record: %v", err)
		}
		return time.Now()
	}
	// next returns the next notification's payload and how long after since
	// it arrived, or "" when none came within wait.
	next := func(since time.Time, wait time.Duration) (string, time.Duration) {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		n, err := listener.WaitForNotification(wctx)
		if errors.Is(err, context.DeadlineExceeded) {
			return "", 0
		}
		if err != nil {
			t.Fatalf("wait for a notification: %v", err)
		}
		return n.Payload, time.Since(since)
	}

	// The importer's one transaction: a million records that expired
	// long ago, ids far from the live ones.
	backfill, err := connectTest(t, dsn).Begin(ctx)
	if err != nil {
		t.Fatalf("begin the backfill: %v", err)
	}
	defer backfill.Rollback(ctx)
	start := time.Now()
	if _, err := backfill.Exec(ctx, `
INSERT INTO threeds_records (id, user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 10000000 + g, g % 50000, '000000', 1, 'USD', 'backfill', 300,
       now() - interval '1 day' - g * interval '1 second'
  FROM generate_series(1, 1000000) AS g`); err != nil {
		t.Fatalf("backfill: %v", err)
	}
	t.Logf("the backfill's INSERT took %v", time.Since(start).Round(time.Millisecond))

	// A live record committed while the backfill is open.
	during, delayDuring := next(insertLive(1), 5*time.Second)
	start = time.Now()
	if err := backfill.Commit(ctx); err != nil {
		t.Fatalf("commit the backfill: %v", err)
	}
	commitTook := time.Since(start)
	var usage float64
	if err := writer.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage); err != nil {
		t.Fatalf("queue usage: %v", err)
	}
	// A live record committed right after the backfill: with a notification
	// per backfilled row, it would queue behind a million of them.
	after, delayAfter := next(insertLive(2), 5*time.Second)
	stray, _ := next(time.Now(), time.Second)

	t.Logf("backfill commit took %v; queue usage after it %g; live record during the backfill notified after %v, right after it %v",
		commitTook.Round(time.Millisecond), usage, delayDuring.Round(time.Microsecond), delayAfter.Round(time.Microsecond))
	if usage != 0 {
		t.Errorf("pg_notification_queue_usage() = %g after the backfill, want 0: it queued notifications", usage)
	}
	if during != "42:1" || after != "42:2" || stray != "" {
		t.Errorf("notifications %q, %q, then %q; want 42:1, 42:2 and nothing else", during, after, stray)
	}
	// The contract's bound is 100 ms; a loaded CI machine gets some slack.
	if delayAfter > 500*time.Millisecond {
		t.Errorf("the live record after the backfill was notified after %v", delayAfter)
	}
}

// findPsql finds psql the way scripts/pg.sh finds the server: PG_BINDIR,
// the newest /usr/lib/postgresql/*/bin, then PATH.
func findPsql(t testing.TB) string {
	t.Helper()
	var dirs []string
	if d := os.Getenv("PG_BINDIR"); d != "" {
		dirs = append(dirs, d)
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	major := func(dir string) int { n, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir))); return n }
	slices.SortFunc(found, func(a, b string) int { return major(b) - major(a) })
	dirs = append(dirs, found...)
	for _, d := range dirs {
		if p := filepath.Join(d, "psql"); isExecutable(p) {
			return p
		}
	}
	p, err := exec.LookPath("psql")
	if err != nil {
		t.Fatal("psql not found (PG_BINDIR, /usr/lib/postgresql/*/bin, PATH): scripts/pg.sh installs it with the server")
	}
	return p
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// psqlFile applies schema.sql with the real psql, stopping at the first
// error, as a DBA would run it.
func psqlFile(t testing.TB, psql, dsn string, vars ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := []string{"-X", "-q", "-v", "ON_ERROR_STOP=1"}
	for _, v := range vars {
		args = append(args, "-v", v)
	}
	args = append(args, "-f", "schema.sql", dsn)
	out, err := exec.CommandContext(ctx, psql, args...).CombinedOutput()
	return string(out), err
}

func TestSchemaFileAppliedTwiceWithPsqlSucceedsAndAgreesWithMigrate(t *testing.T) {
	t.Parallel()
	psql := findPsql(t)
	cases := []struct {
		name  string
		setup func(t *testing.T, dsn string)
		vars  []string
		want  sourceObjects
		// the actions a migrate for notify then logs for the trigger and
		// the publication
		trigger, publication string
	}{
		{"an empty database gets the notify source", nil, nil, notifyInPlace, actionInPlace, actionAbsent},
		{"the previous version's schema gets the trigger's WHEN", func(t *testing.T, dsn string) {
			migrateTestDB(t, dsn)
			if _, err := connectTest(t, dsn).Exec(context.Background(), previousTriggerSQL); err != nil {
				t.Fatalf("install the previous trigger: %v", err)
			}
		}, nil, notifyInPlace, actionInPlace, actionAbsent},
		{"-v wal=1 adds the publication and keeps the trigger", nil, []string{"wal=1"},
			sourceObjects{trigger: "O", triggerWhen: true, publication: "inserts"}, actionInPlace, actionDropped},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dsn := newEmptyTestDB(t)
			if tc.setup != nil {
				tc.setup(t, dsn)
			}
			for i := 1; i <= 2; i++ {
				if out, err := psqlFile(t, psql, dsn, tc.vars...); err != nil {
					t.Fatalf("psql -f schema.sql, run %d: %v\n%s", i, err, out)
				}
			}
			if got := sourceObjectsOf(t, dsn); got != tc.want {
				t.Errorf("after psql twice the catalog holds %+v, want %+v", got, tc.want)
			}
			if valid, def := pageIndexState(t, dsn); !valid || !strings.HasSuffix(def, pageIndexColumns) {
				t.Errorf("page index after psql: valid=%v %q", valid, def)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			logs, err := migrateSourceLog(t, ctx, dsn, "notify")
			if err != nil {
				t.Fatalf("migrate after psql: %v", err)
			}
			wantActions(t, logs, tc.trigger, tc.publication)
			for _, object := range []string{"table threeds_records", "index threeds_records_user_page_idx", "index threeds_records_long_lived_idx", "function threeds_records_notify"} {
				if got := actionsOf(logs)[object]; got != actionInPlace {
					t.Errorf("migrate after psql logged %q for %s, want %q", got, object, actionInPlace)
				}
			}
		})
	}
}
