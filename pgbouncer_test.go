package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// pgBouncerPoolSize is the pooler's server connections per database: well
// below the service's pool_max_conns and the request concurrency, so every
// transaction lands on whichever server connection is free, as in
// production.
const pgBouncerPoolSize = "2"

// startPgBouncer starts scripts/pgbouncer.sh in transaction mode in front of
// the cluster at DATABASE_URL and returns its URL for database db. A missing
// pgbouncer is a failure, not a skip: CI (root) installs it through the script.
func startPgBouncer(t *testing.T, db string, extraEnv ...string) string {
	t.Helper()
	admin := os.Getenv("DATABASE_URL")
	if admin == "" {
		t.Fatal("DATABASE_URL is not set: run `make test`")
	}
	bouncer, _ := startPgBouncerOn(t, admin, append([]string{"PGBOUNCER_POOL_SIZE=" + pgBouncerPoolSize}, extraEnv...)...)
	u, err := withDatabase(bouncer, db)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// startPgBouncerOn starts scripts/pgbouncer.sh in front of upstream (a test's
// own cluster or standby) with extraEnv, and returns its URL and directory.
// Not t.TempDir: the Unix socket lives in the directory, and socket paths
// are limited to about 100 bytes.
func startPgBouncerOn(t *testing.T, upstream string, extraEnv ...string) (url, dir string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "threeds-bouncer-")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "scripts/pgbouncer.sh", "start", dir, upstream)
	cmd.Env = append(os.Environ(), extraEnv...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	t.Cleanup(func() {
		if out, err := exec.Command("bash", "scripts/pgbouncer.sh", "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("scripts/pgbouncer.sh stop: %v\n%s", err, out)
		}
		_ = os.RemoveAll(dir)
	})
	if err != nil {
		t.Fatalf("scripts/pgbouncer.sh start: %v\n%s", err, stderr.String())
	}
	return strings.TrimSpace(string(out)), dir
}

func databaseName(t *testing.T, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimPrefix(u.Path, "/")
}

// withParams appends pgx connection-string parameters to a URL.
func withParams(dsn string, params ...string) string {
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	return dsn + sep + strings.Join(params, "&")
}

// bouncerFixture is a test database with several users' records, reachable
// directly and through a pgbouncer in transaction mode.
type bouncerFixture struct {
	direct  string
	bouncer string
	key     testKey
	jwks    string
	users   []int64
	perUser int
}

func newBouncerFixture(t *testing.T, pgbouncerEnv ...string) *bouncerFixture {
	t.Helper()
	direct := newTestDB(t)
	f := &bouncerFixture{direct: direct, users: []int64{101, 102, 103, 104, 105, 106}, perUser: 23}
	var rows []seedRow
	for _, u := range f.users {
		for i := 1; i <= f.perUser; i++ {
			rows = append(rows, row(u*1000+int64(i), u, time.Date(2026, 1, 1, 0, 0, i, 0, time.UTC).Format(time.RFC3339)))
		}
	}
	insertRows(t, newTestPool(t, direct, nil), rows...)
	f.bouncer = startPgBouncer(t, databaseName(t, direct), pgbouncerEnv...)
	f.key = newTestKey(t, jwa.ES256, "bouncer", 0)
	f.jwks = newJWKSServer(t, f.key.publicJWK(t, false)).URL
	return f
}

type pageResult struct {
	status int
	body   string
	err    error
}

// hammer sends n page requests from n goroutines at once, each for a user
// and page chosen by its index, and returns the results and what each should
// have returned (nil for pages that must fail the same way).
func (f *bouncerFixture) hammer(t *testing.T, base string, n int) (results []pageResult, wantIDs [][]int64) {
	t.Helper()
	const pageSize = 5
	tokens := map[int64]string{}
	for _, u := range f.users {
		tokens[u] = f.key.token(t, validClaims(u))
	}
	results = make([]pageResult, n)
	wantIDs = make([][]int64, n)
	client := &http.Client{Timeout: 15 * time.Second}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		user := f.users[i%len(f.users)]
		page := 1 + (i/len(f.users))%5
		// Records are newest first: user*1000+perUser down to user*1000+1.
		for k := 0; k < pageSize; k++ {
			idx := f.perUser - (page-1)*pageSize - k
			if idx >= 1 {
				wantIDs[i] = append(wantIDs[i], user*1000+int64(idx))
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("%s/3ds/my-records?page=%d&page_size=%d", base, page, pageSize), nil)
			req.Header.Set("Authorization", "Bearer "+tokens[user])
			resp, err := client.Do(req)
			if err != nil {
				results[i] = pageResult{err: err}
				return
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			results[i] = pageResult{status: resp.StatusCode, body: string(body), err: err}
		}()
	}
	close(start)
	wg.Wait()
	return results, wantIDs
}

func (f *bouncerFixture) checkPage(r pageResult, want []int64) error {
	if r.err != nil {
		return r.err
	}
	if r.status != http.StatusOK {
		return fmt.Errorf("status %d: %s", r.status, r.body)
	}
	var p pageBody
	if err := json.Unmarshal([]byte(r.body), &p); err != nil {
		return err
	}
	got := ids(p.Data.Records)
	if p.Data.Total != int64(f.perUser) || fmt.Sprint(got) != fmt.Sprint(want) {
		return fmt.Errorf("total %d ids %v, want total %d ids %v", p.Data.Total, got, f.perUser, want)
	}
	return nil
}

func startRunReady(t *testing.T, env map[string]string) *runningService {
	t.Helper()
	rs := startRun(t, env)
	waitFor(t, 15*time.Second, "readiness through pgbouncer", func() bool {
		code, _ := rs.get(t, "/readyz", "")
		return code == http.StatusOK
	})
	return rs
}

// refusalWarnings are the log lines that say the pooler refused
// statement_timeout and what to set instead.
func refusalWarnings(t testing.TB, logs *syncBuffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range logs.logLines(t) {
		if msg, _ := l["msg"].(string); strings.Contains(msg, "refused the statement_timeout startup parameter") {
			out = append(out, l)
		}
	}
	return out
}

// checkOneRefusalWarning asserts the warning was logged exactly once, at
// warn, with the fix for role.
func checkOneRefusalWarning(t testing.TB, logs *syncBuffer, role string) {
	t.Helper()
	warnings := refusalWarnings(t, logs)
	if len(warnings) != 1 {
		t.Fatalf("%d statement_timeout refusal lines in the log, want exactly 1: %v", len(warnings), warnings)
	}
	w := warnings[0]
	fix, _ := w["fix"].(string)
	if w["level"] != "WARN" || !strings.Contains(fix, "ALTER ROLE "+pgx.Identifier{role}.Sanitize()+" SET statement_timeout") ||
		!strings.Contains(fix, "ignore_startup_parameters") {
		t.Errorf("the warning does not say what to set: %v", w)
	}
	if r, _ := w["refusal"].(string); !strings.Contains(r, "08P01") {
		t.Errorf("the warning does not quote the refusal: %v", w)
	}
}

// TestServiceBehindAStockPgBouncerBecomesReadyAndServesPages is the
// documented setup: default_query_exec_mode=exec in DATABASE_URL and a
// pgbouncer.ini without ignore_startup_parameters, which refuses the
// statement_timeout the service sends at connection start.
func TestServiceBehindAStockPgBouncerBecomesReadyAndServesPages(t *testing.T) {
	f := newBouncerFixture(t)
	env := serviceEnv(withParams(f.bouncer, "default_query_exec_mode=exec", "pool_max_conns=8"), f.jwks)
	rs := startRunReady(t, env)
	// Three rounds of 48 concurrent requests: 6x the service's pool and 24x
	// pgbouncer's, so statements of different client connections interleave
	// on the same server connections, and all 8 of the service's
	// connections are opened (each one after the refusal must go through).
	for round := range 3 {
		results, want := f.hammer(t, rs.base, 48)
		for i, r := range results {
			if err := f.checkPage(r, want[i]); err != nil {
				t.Errorf("round %d request %d: %v", round, i, err)
			}
		}
	}
	checkOneRefusalWarning(t, rs.stdout, databaseUser(t, f.bouncer))
}

func databaseUser(t testing.TB, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return u.User.Username()
}

// TestPgBouncerWithoutExecModeBreaksPreparedStatements shows why the setting
// is needed: with pgx's default statement cache, a statement prepared on one
// server connection is executed on another (or prepared twice on one).
func TestPgBouncerWithoutExecModeBreaksPreparedStatements(t *testing.T) {
	f := newBouncerFixture(t)
	rs := startRunReady(t, serviceEnv(withParams(f.bouncer, "pool_max_conns=8"), f.jwks))
	var failed, ok int
	for range 3 {
		results, want := f.hammer(t, rs.base, 48)
		for i, r := range results {
			if err := f.checkPage(r, want[i]); err != nil {
				failed++
				if r.err != nil || r.status != http.StatusInternalServerError {
					t.Errorf("a failure must still be a clean 500: %v", err)
				}
				continue
			}
			ok++
		}
	}
	t.Logf("without default_query_exec_mode=exec: %d requests failed, %d succeeded", failed, ok)
	if failed == 0 {
		t.Fatal("every request succeeded: the README's claim that pgx's statement cache breaks behind pgbouncer in transaction mode no longer holds here; re-check it")
	}
	causes := map[string]int{}
	for _, l := range rs.stdout.logLines(t) {
		if msg, _ := l["error"].(string); msg != "" {
			causes[msg]++
		}
	}
	var prepared bool
	for msg, n := range causes {
		t.Logf("%dx %s", n, msg)
		prepared = prepared || strings.Contains(msg, "prepared statement")
	}
	if !prepared {
		t.Errorf("the log does not show the prepared-statement error the README names: %v", causes)
	}
}

// TestTheStatementTimeoutRefusalIsDetectedAndTheNextConnectionWorks pins
// down what the fallback keys on: the refusal as pgx reports it from a
// stock PgBouncer, and a pool whose next attempt after it connects.
func TestTheStatementTimeoutRefusalIsDetectedAndTheNextConnectionWorks(t *testing.T) {
	bouncer := startPgBouncer(t, databaseName(t, newTestDB(t)))
	cfg, err := loadConfig(envFunc(serviceEnv(withParams(bouncer, "default_query_exec_mode=exec"), "https://idp.test/jwks")), false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	conn, err := pgx.ConnectConfig(ctx, cfg.poolConfig.ConnConfig)
	if err == nil {
		conn.Close(ctx)
		t.Fatal("a stock pgbouncer accepted the statement_timeout startup parameter: the fallback is no longer needed, or the test's pgbouncer is not stock")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "08P01" || pgErr.Severity != "FATAL" || pgErr.Message != "unsupported startup parameter: statement_timeout" {
		t.Fatalf("connect error = %#v, want FATAL 08P01 unsupported startup parameter: statement_timeout", err)
	}
	if !refusesStatementTimeout(err) {
		t.Fatalf("refusesStatementTimeout does not recognise %v", err)
	}
	t.Logf("pgbouncer refuses with %s %s: %s", pgErr.Severity, pgErr.Code, pgErr.Message)

	logs := &syncBuffer{}
	pool, err := newPool(ctx, cfg, slog.New(slog.NewJSONHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); !refusesStatementTimeout(err) {
		t.Fatalf("first attempt = %v, want the refusal (the pool starts out sending the parameter)", err)
	}
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("the attempt right after the refusal failed: %v", err)
	}
	// Every further connection, opened in parallel, connects without it.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			c, err := pool.Acquire(ctx)
			if err == nil {
				defer c.Release()
				_, err = c.Exec(ctx, "SELECT pg_sleep(0.2)")
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a later connection failed: %v", err)
		}
	}
	checkOneRefusalWarning(t, logs, cfg.poolConfig.ConnConfig.User)
}

// TestWhatBringsTheServerSideStatementTimeoutBackBehindPgBouncer checks the
// advice of the warning: the session's statement_timeout behind pgbouncer
// in each setup. The role setting is scoped to the test database (ALTER
// ROLE ... IN DATABASE) because the cluster is shared with other tests.
func TestWhatBringsTheServerSideStatementTimeoutBackBehindPgBouncer(t *testing.T) {
	cases := []struct {
		name         string
		ignoreParams string
		roleSetting  string
		want         string
		wantWarning  bool
	}{
		{"a stock pgbouncer: the service connects without the parameter and the server has no limit", "", "", "0", true},
		{"ALTER ROLE SET statement_timeout, as the warning says, brings the server-side limit back", "", "3000ms", "3s", true},
		{"ignore_startup_parameters alone stops the refusal but drops the value", "statement_timeout", "", "0", false},
		{"ignore_startup_parameters with ALTER ROLE connects at once with the server-side limit", "statement_timeout", "3000ms", "3s", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			direct := newTestDB(t)
			if tc.roleSetting != "" {
				admin := newTestPool(t, direct, nil)
				stmt := fmt.Sprintf("ALTER ROLE %s IN DATABASE %s SET statement_timeout = '%s'",
					pgx.Identifier{databaseUser(t, direct)}.Sanitize(), pgx.Identifier{databaseName(t, direct)}.Sanitize(), tc.roleSetting)
				if _, err := admin.Exec(context.Background(), stmt); err != nil {
					t.Fatal(err)
				}
			}
			bouncer := startPgBouncer(t, databaseName(t, direct), "PGBOUNCER_IGNORE_STARTUP_PARAMETERS="+tc.ignoreParams)
			cfg, err := loadConfig(envFunc(serviceEnv(withParams(bouncer, "default_query_exec_mode=exec"), "https://idp.test/jwks")), false)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			logs := &syncBuffer{}
			pool, err := newPool(ctx, cfg, slog.New(slog.NewJSONHandler(logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			var got string
			err = pool.QueryRow(ctx, "SHOW statement_timeout").Scan(&got)
			if tc.wantWarning && refusesStatementTimeout(err) {
				err = pool.QueryRow(ctx, "SHOW statement_timeout").Scan(&got)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("statement_timeout on the server = %q, want %q", got, tc.want)
			}
			if n := len(refusalWarnings(t, logs)); (n == 1) != tc.wantWarning || n > 1 {
				t.Errorf("%d refusal warnings, want %v", n, tc.wantWarning)
			}
		})
	}
}

// TestASlowQueryBehindAStockPgBouncerIsStillCutAtDBQueryTimeout: without
// the server-side limit, the store's context deadline still ends each
// request at DB_QUERY_TIMEOUT.
func TestASlowQueryBehindAStockPgBouncerIsStillCutAtDBQueryTimeout(t *testing.T) {
	f := newBouncerFixture(t)
	const (
		queryTimeout = time.Second
		slack        = 2 * time.Second // -race on two shared cores, and a pooler in between
		requests     = 4
	)
	env := serviceEnv(withParams(f.bouncer, "default_query_exec_mode=exec", "pool_max_conns=8"), f.jwks)
	env["DB_QUERY_TIMEOUT"] = queryTimeout.String()
	rs := startRunReady(t, env)
	token := f.key.token(t, validClaims(f.users[0]))
	api := rs.base + "/3ds/my-records"

	release := lockRecords(t, f.direct)
	answers := make(chan answer, requests)
	for range requests {
		go func() { answers <- fetch(opsClient, http.MethodGet, api, token, "") }()
	}
	var took []time.Duration
	for range requests {
		select {
		case a := <-answers:
			assertClean500(t, a)
			took = append(took, a.took.Round(time.Millisecond))
			if a.took > queryTimeout+slack {
				t.Errorf("a request took %s with DB_QUERY_TIMEOUT %s", a.took, queryTimeout)
			}
			if a.took < queryTimeout*8/10 {
				t.Errorf("a request failed after %s, before DB_QUERY_TIMEOUT %s: it did not wait for the database", a.took, queryTimeout)
			}
		case <-time.After(queryTimeout + 2*slack):
			t.Fatal("a request hung past DB_QUERY_TIMEOUT behind pgbouncer")
		}
	}
	// Not asserted, only reported: without the server-side limit nothing in
	// the service stops an abandoned statement on the server, so whether it
	// lingers is up to the pooler.
	admin := newTestPool(t, f.direct, nil)
	answered := time.Now()
	waiting := serviceBackends(t, admin, true)
	left := waiting
	for left > 0 && time.Since(answered) < 3*time.Second {
		time.Sleep(50 * time.Millisecond)
		left = serviceBackends(t, admin, true)
	}
	t.Logf("%d requests against a locked table behind a stock pgbouncer, DB_QUERY_TIMEOUT %s: 500 after %v; "+
		"the service's statements waiting on the lock on the server when the last answer came: %d, %s later: %d",
		requests, queryTimeout, took, waiting, time.Since(answered).Round(10*time.Millisecond), left)

	release()
	waitFor(t, 10*time.Second, "pages again once the lock is released", func() bool {
		return fetch(opsClient, http.MethodGet, api, token, "").code == http.StatusOK
	})
	checkOneRefusalWarning(t, rs.stdout, databaseUser(t, f.bouncer))
}
