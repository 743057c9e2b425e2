package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
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
	dir := t.TempDir()
	cmd := exec.Command("bash", "scripts/pgbouncer.sh", "start", dir, admin)
	cmd.Env = append(append(os.Environ(), "PGBOUNCER_POOL_SIZE="+pgBouncerPoolSize), extraEnv...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("scripts/pgbouncer.sh start: %v\n%s", err, stderr.String())
	}
	t.Cleanup(func() {
		if out, err := exec.Command("bash", "scripts/pgbouncer.sh", "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("scripts/pgbouncer.sh stop: %v\n%s", err, out)
		}
	})
	u, err := withDatabase(strings.TrimSpace(string(out)), db)
	if err != nil {
		t.Fatal(err)
	}
	return u
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

// TestServiceWorksThroughPgBouncerInTransactionMode is the documented setup:
// default_query_exec_mode=exec in DATABASE_URL, statement_timeout in
// pgbouncer's ignore_startup_parameters and set on the database instead.
func TestServiceWorksThroughPgBouncerInTransactionMode(t *testing.T) {
	f := newBouncerFixture(t)
	// pgbouncer drops the statement_timeout the service sends at startup,
	// so the server-side limit comes from the database (or role) setting.
	admin := newTestPool(t, f.direct, nil)
	if _, err := admin.Exec(context.Background(),
		"ALTER DATABASE "+pgx.Identifier{databaseName(t, f.direct)}.Sanitize()+" SET statement_timeout = '2500ms'"); err != nil {
		t.Fatal(err)
	}

	env := serviceEnv(withParams(f.bouncer, "default_query_exec_mode=exec", "pool_max_conns=8"), f.jwks)
	// The same pool configuration run() builds, to look at the session the
	// service gets behind the pooler.
	cfg, err := loadConfig(envFunc(env), false)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.poolConfig.ConnConfig.RuntimeParams["statement_timeout"]; got != "3000" {
		t.Fatalf("the service sends statement_timeout=%q, want 3000 (DB_QUERY_TIMEOUT)", got)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg.poolConfig)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var timeout, appName string
	if err := pool.QueryRow(context.Background(), "SELECT current_setting('statement_timeout'), current_setting('application_name')").Scan(&timeout, &appName); err != nil {
		t.Fatalf("query through pgbouncer: %v", err)
	}
	if timeout != "2500ms" {
		t.Errorf("statement_timeout through pgbouncer = %q, want the database's 2500ms (the startup parameter is dropped)", timeout)
	}
	if appName != "threeds-records" {
		t.Errorf("application_name through pgbouncer = %q, want threeds-records (pgbouncer tracks it)", appName)
	}
	pool.Close()

	rs := startRunReady(t, env)
	// Three rounds of 48 concurrent requests: 6x the service's pool and 24x
	// pgbouncer's, so statements of different client connections interleave
	// on the same server connections.
	for round := range 3 {
		results, want := f.hammer(t, rs.base, 48)
		for i, r := range results {
			if err := f.checkPage(r, want[i]); err != nil {
				t.Errorf("round %d request %d: %v", round, i, err)
			}
		}
	}
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

// TestPgBouncerRefusesTheStatementTimeoutStartupParameter shows why
// ignore_startup_parameters is needed: the service sends statement_timeout
// at connection start, and pgbouncer refuses any parameter it does not track.
func TestPgBouncerRefusesTheStatementTimeoutStartupParameter(t *testing.T) {
	f := newBouncerFixture(t, "PGBOUNCER_IGNORE_STARTUP_PARAMETERS=")
	env := serviceEnv(withParams(f.bouncer, "default_query_exec_mode=exec"), f.jwks)
	cfg, err := loadConfig(envFunc(env), false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg.poolConfig.ConnConfig)
	if err == nil {
		conn.Close(ctx)
		t.Fatal("pgbouncer accepted the statement_timeout startup parameter; the README's ignore_startup_parameters advice needs re-checking")
	}
	if !strings.Contains(err.Error(), "unsupported startup parameter: statement_timeout") {
		t.Errorf("connect error %q does not name the statement_timeout startup parameter", err)
	}

	rs := startRun(t, env)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if code, body := rs.get(t, "/readyz", ""); code != http.StatusServiceUnavailable {
			t.Fatalf("readyz = %d %s, want 503 while no connection can be made", code, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	code, body := rs.get(t, "/3ds/my-records", f.key.token(t, validClaims(f.users[0])))
	if code != http.StatusInternalServerError {
		t.Errorf("API request = %d %s, want a clean 500", code, body)
	}
	if strings.Contains(string(body), "startup parameter") {
		t.Errorf("the 500 body reveals the cause: %s", body)
	}
	var pgErr interface{ SQLState() string }
	if errors.As(err, &pgErr) {
		t.Logf("pgbouncer refused with SQLSTATE %s: %v", pgErr.SQLState(), err)
	}
}
