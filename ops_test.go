package main

// Contract §5 with real processes: the service as run() or as the real
// binary, a real PostgreSQL that the tests stop, start and lock, and real
// keys. Every wait is bounded.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// answer is one HTTP exchange as the tests judge it.
type answer struct {
	code   int
	header http.Header
	body   []byte
	took   time.Duration
	err    error
}

// opsClient bounds every request a test makes, so a hang is a failure,
// not a stuck test binary.
var opsClient = &http.Client{Timeout: 20 * time.Second}

// freshConnClient opens a new TCP connection per request, as a load
// balancer's probe or a new client would.
var freshConnClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// fetch is safe to call from any goroutine: it reports errors in the answer.
func fetch(client *http.Client, method, target, token, requestID string) answer {
	req, err := http.NewRequest(method, target, nil)
	if err != nil {
		return answer{err: err}
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if requestID != "" {
		req.Header.Set("X-Request-ID", requestID)
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return answer{err: err, took: time.Since(start)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return answer{code: resp.StatusCode, header: resp.Header, body: body, took: time.Since(start), err: err}
}

func mustFetch(t testing.TB, client *http.Client, target, token string) answer {
	t.Helper()
	a := fetch(client, http.MethodGet, target, token, "")
	if a.err != nil {
		t.Fatalf("GET %s: %v", target, a.err)
	}
	return a
}

// assertClean500 checks a database failure as the caller sees it: the
// contract's error shape and nothing about the database behind it.
func assertClean500(t testing.TB, a answer, leaks ...string) {
	t.Helper()
	if a.err != nil || a.code != http.StatusInternalServerError {
		t.Fatalf("got %d %v %s, want a 500", a.code, a.err, a.body)
	}
	assertErrorBody(t, a.header, a.body)
	lower := strings.ToLower(string(a.body))
	for _, leak := range append(leaks, "127.0.0.1", "dial", "select", "threeds_records", "postgres", "pgx", "pgconn",
		"sqlstate", "connect", "terminating", "timeout", "deadline", "statement") {
		if strings.Contains(lower, strings.ToLower(leak)) {
			t.Errorf("500 body reveals %q: %s", leak, a.body)
		}
	}
}

const opsPasscode = "918273"

// seedDatabase applies the schema to dsn's database and stores one record
// of user 1001.
func seedDatabase(t testing.TB, dsn string) {
	t.Helper()
	migrateTestDB(t, dsn)
	pool := newTestPool(t, dsn, nil)
	defer pool.Close()
	insertRows(t, pool, seedRow{id: 1, userID: 1001, passcode: opsPasscode, amount: "12.5", currency: "EUR",
		expiresAfter: 300, receivedAt: "2026-01-20T10:30:00Z"})
}

// lockRecords holds ACCESS EXCLUSIVE on the table in an open transaction,
// so every page query blocks until release is called (or the test ends).
func lockRecords(t testing.TB, dsn string) (release func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("lock: connect: %v", err)
	}
	tx, err := conn.Begin(ctx)
	if err == nil {
		_, err = tx.Exec(ctx, "LOCK TABLE threeds_records IN ACCESS EXCLUSIVE MODE")
	}
	if err != nil {
		_ = conn.Close(context.Background())
		t.Fatalf("lock the table: %v", err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = tx.Rollback(ctx)
			_ = conn.Close(ctx)
		})
	}
	t.Cleanup(release)
	return release
}

// serviceBackends counts the service's sessions on dsn's database, by the
// application_name main.go sets; onlyLockWaits counts those blocked on a lock.
func serviceBackends(t testing.TB, admin *pgxpool.Pool, onlyLockWaits bool) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int
	err := admin.QueryRow(ctx, `
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records'
   AND (NOT $1 OR wait_event_type = 'Lock')`, onlyLockWaits).Scan(&n)
	if err != nil {
		t.Fatalf("pg_stat_activity: %v", err)
	}
	return n
}

// withPoolSize adds pool_max_conns to a URL-form DATABASE_URL.
func withPoolSize(t testing.TB, dsn string, n int) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("pool_max_conns", strconv.Itoa(n))
	u.RawQuery = q.Encode()
	return u.String()
}

func TestOperatingVariablesAreCheckedAtStart(t *testing.T) {
	valid := serviceEnv("postgres://u:secretpw@127.0.0.1:5432/db", "https://idp.test/jwks")
	cases := []struct {
		name, variable string
		change         map[string]string
	}{
		{"a malformed SHUTDOWN_DELAY", "SHUTDOWN_DELAY", map[string]string{"SHUTDOWN_DELAY": "soon"}},
		{"a negative SHUTDOWN_DELAY", "SHUTDOWN_DELAY", map[string]string{"SHUTDOWN_DELAY": "-1s"}},
		{"a SHUTDOWN_DELAY that leaves no time to drain", "SHUTDOWN_DELAY", map[string]string{"SHUTDOWN_DELAY": "5s", "SHUTDOWN_TIMEOUT": "5s"}},
		{"a DB_QUERY_TIMEOUT without a unit", "DB_QUERY_TIMEOUT", map[string]string{"DB_QUERY_TIMEOUT": "500"}},
		{"a negative DB_QUERY_TIMEOUT", "DB_QUERY_TIMEOUT", map[string]string{"DB_QUERY_TIMEOUT": "-1s"}},
		{"a zero SHUTDOWN_TIMEOUT", "SHUTDOWN_TIMEOUT", map[string]string{"SHUTDOWN_TIMEOUT": "0s"}},
		{"a JWT_LEEWAY over five minutes", "JWT_LEEWAY", map[string]string{"JWT_LEEWAY": "6m"}},
	}
	for _, tc := range cases {
		t.Run(tc.name+" is a config error naming "+tc.variable, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range valid {
				env[k] = v
			}
			for k, v := range tc.change {
				env[k] = v
			}
			err := run(context.Background(), nil, envFunc(env), &syncBuffer{}, &syncBuffer{})
			var ce *configError
			if !errors.As(err, &ce) || !strings.HasPrefix(err.Error(), tc.variable+":") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("run = %v, want a one-line configError naming %s", err, tc.variable)
			}
		})
	}

	t.Run("the binary exits 2 naming the variable for migrate without DATABASE_URL and for an unknown argument", func(t *testing.T) {
		for _, tc := range []struct {
			args     []string
			variable string
		}{{[]string{"migrate"}, "DATABASE_URL"}, {[]string{"serve-forever"}, "arguments"}} {
			cmd := exec.Command(testBinary(t), tc.args...)
			cmd.Env = []string{"PATH=/usr/bin:/bin"}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 {
				t.Errorf("%v: exit = %v, want code 2", tc.args, err)
			}
			if lines := strings.Split(strings.TrimSpace(stderr.String()), "\n"); len(lines) != 1 || !strings.Contains(lines[0], tc.variable) {
				t.Errorf("%v: stderr = %q, want one line naming %s", tc.args, stderr.String(), tc.variable)
			}
		}
	})

	t.Run("the pool gets the timeouts the service relies on", func(t *testing.T) {
		env := map[string]string{}
		for k, v := range valid {
			env[k] = v
		}
		env["DB_QUERY_TIMEOUT"] = "750ms"
		cfg, err := loadConfig(envFunc(env), false)
		if err != nil {
			t.Fatal(err)
		}
		cc := cfg.poolConfig.ConnConfig
		if got := cc.RuntimeParams["statement_timeout"]; got != "750" {
			t.Errorf("statement_timeout = %q, want 750 (ms)", got)
		}
		if cc.ConnectTimeout != defaultConnectTimeout {
			t.Errorf("connect timeout = %s, want %s when DATABASE_URL sets none", cc.ConnectTimeout, defaultConnectTimeout)
		}
		env["DATABASE_URL"] = "postgres://u@127.0.0.1:5432/db?connect_timeout=2&statement_timeout=100"
		if cfg, err = loadConfig(envFunc(env), false); err != nil {
			t.Fatal(err)
		}
		cc = cfg.poolConfig.ConnConfig
		if cc.ConnectTimeout != 2*time.Second || cc.RuntimeParams["statement_timeout"] != "100" {
			t.Errorf("an operator's connect_timeout/statement_timeout were overridden: %s, %q", cc.ConnectTimeout, cc.RuntimeParams["statement_timeout"])
		}
	})
}

func TestServiceStartsWithTheDatabaseDownAndBecomesReadyWhenItComesUp(t *testing.T) {
	cluster := startCluster(t)
	seedDatabase(t, cluster.url)
	cluster.stop()

	key := newTestKey(t, jwa.ES256, "ops", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	env := serviceEnv(cluster.url, idp.URL)
	env["DB_QUERY_TIMEOUT"] = "1s"
	rs := startRun(t, env)
	token := key.token(t, validClaims("1001"))

	if a := mustFetch(t, opsClient, rs.base+"/healthz", ""); a.code != http.StatusOK {
		t.Fatalf("healthz with the database down: %d %s", a.code, a.body)
	}
	// Once the keys are in, the database is the only thing missing.
	waitFor(t, 10*time.Second, "readyz to blame the database", func() bool {
		a := mustFetch(t, opsClient, rs.base+"/readyz", "")
		if a.code != http.StatusServiceUnavailable {
			t.Fatalf("readyz with the database down: %d %s", a.code, a.body)
		}
		return bytes.Contains(a.body, []byte("database"))
	})
	assertClean500(t, mustFetch(t, opsClient, rs.base+"/3ds/my-records", token), cluster.url)

	cluster.start()
	waitFor(t, 15*time.Second, "readyz 200 after the database came up", func() bool {
		return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK
	})
	a := mustFetch(t, opsClient, rs.base+"/3ds/my-records", token)
	if a.code != http.StatusOK || !bytes.Contains(a.body, []byte(opsPasscode)) {
		t.Fatalf("GET after the database came up: %d %s", a.code, a.body)
	}
	select {
	case err := <-rs.done:
		t.Fatalf("run returned on its own: %v", err)
	default:
	}
}

func TestADatabaseRestartFailsRequestsCleanlyAndHealsWithoutARestart(t *testing.T) {
	cluster := startCluster(t)
	seedDatabase(t, cluster.url)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	const queryTimeout = 2 * time.Second
	env := serviceEnv(cluster.url, idp.URL)
	env["DB_QUERY_TIMEOUT"] = queryTimeout.String()
	rs := startRun(t, env)
	token := key.token(t, validClaims("1001"))
	api := rs.base + "/3ds/my-records"

	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })
	// Several connections in the pool, so the restart breaks more than one.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if a := fetch(opsClient, http.MethodGet, api, token, ""); a.code != http.StatusOK {
				t.Errorf("before the restart: %d %v %s", a.code, a.err, a.body)
			}
		})
	}
	wg.Wait()

	cluster.stop()
	for i := range 6 {
		a := mustFetch(t, opsClient, api, token)
		assertClean500(t, a, cluster.url)
		if a.took > queryTimeout+time.Second {
			t.Errorf("request %d with the database down took %s, over DB_QUERY_TIMEOUT %s", i, a.took, queryTimeout)
		}
	}
	if a := mustFetch(t, opsClient, rs.base+"/readyz", ""); a.code != http.StatusServiceUnavailable {
		t.Errorf("readyz with the database down: %d %s", a.code, a.body)
	}
	if a := mustFetch(t, opsClient, rs.base+"/healthz", ""); a.code != http.StatusOK {
		t.Errorf("healthz with the database down: %d %s", a.code, a.body)
	}

	cluster.start()
	up := time.Now()
	waitFor(t, 10*time.Second, "a 200 after the database came back", func() bool {
		a := mustFetch(t, opsClient, api, token)
		if a.code != http.StatusOK {
			assertClean500(t, a, cluster.url)
		}
		return a.code == http.StatusOK
	})
	t.Logf("first 200 %s after the database was back", time.Since(up).Round(time.Millisecond))
	for range 5 {
		if a := mustFetch(t, opsClient, api, token); a.code != http.StatusOK || !bytes.Contains(a.body, []byte(opsPasscode)) {
			t.Fatalf("after recovery: %d %s", a.code, a.body)
		}
	}
	if a := mustFetch(t, opsClient, rs.base+"/readyz", ""); a.code != http.StatusOK {
		t.Errorf("readyz after recovery: %d %s", a.code, a.body)
	}
	select {
	case err := <-rs.done:
		t.Fatalf("run returned during the restart: %v", err)
	default:
	}
}

// binaryService is the real binary, running.
type binaryService struct {
	cmd     *exec.Cmd
	base    string
	stdout  *syncBuffer
	exited  chan struct{} // closed when the process has ended
	exitErr error         // cmd.Wait's result, once exited is closed
}

// startBinary runs the real binary with env and waits for its listening
// line; the process is killed on cleanup if the test has not ended it.
func startBinary(t testing.TB, env map[string]string) *binaryService {
	t.Helper()
	b := &binaryService{cmd: exec.Command(testBinary(t)), stdout: &syncBuffer{}, exited: make(chan struct{})}
	for k, v := range env {
		b.cmd.Env = append(b.cmd.Env, k+"="+v)
	}
	var stderr syncBuffer
	b.cmd.Stdout, b.cmd.Stderr = b.stdout, &stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		b.exitErr = b.cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(func() {
		_ = b.cmd.Process.Kill()
		select {
		case <-b.exited:
		case <-time.After(10 * time.Second):
			t.Error("the binary did not end after SIGKILL")
		}
	})
	waitFor(t, 15*time.Second, "the binary's listening line", func() bool {
		var ok bool
		if b.base, ok = b.stdout.listeningBase(t); ok {
			return true
		}
		select {
		case <-b.exited:
			t.Fatalf("the binary exited early: %v; stderr %s", b.exitErr, stderr.String())
		default:
		}
		return false
	})
	return b
}

func TestSIGTERMDrainsInFlightRequestsClosesThePoolAndExits0(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	admin := newTestPool(t, dsn, nil)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))

	const (
		poolSize        = 3
		requests        = 6 // half of them wait for a connection
		shutdownTimeout = 10 * time.Second
	)
	env := serviceEnv(withPoolSize(t, dsn, poolSize), idp.URL)
	env["DB_QUERY_TIMEOUT"] = "15s" // the lock must outlast SIGTERM, not the query limit
	env["SHUTDOWN_TIMEOUT"] = shutdownTimeout.String()
	env["SHUTDOWN_DELAY"] = "1s"
	bin := startBinary(t, env)
	base, stdout := bin.base, bin.stdout
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, base+"/readyz", "").code == http.StatusOK })

	release := lockRecords(t, dsn)
	token := key.token(t, validClaims("1001"))
	answers := make(chan answer, requests)
	for i := range requests {
		go func() {
			answers <- fetch(opsClient, http.MethodGet, base+"/3ds/my-records", token, fmt.Sprintf("inflight-%d", i))
		}()
	}
	waitFor(t, 10*time.Second, "every request to be inside the service", func() bool {
		if serviceBackends(t, admin, true) < poolSize {
			return false
		}
		m := scrapeMetrics(t, base)
		return m.value(t, "threeds_db_pool_waiting") == requests-poolSize
	})

	if err := bin.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	signalled := time.Now()
	// SHUTDOWN_DELAY keeps the listener open while readiness says 503, so
	// a load balancer probing on a new connection learns to stop sending.
	// The pool is all taken by the blocked requests, so a readiness probe
	// that arrives before the signal waits on its ping; probes are short,
	// and only the body tells a drain from a busy database.
	probe := &http.Client{Timeout: 200 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	waitFor(t, time.Second, "readyz 503 during SHUTDOWN_DELAY", func() bool {
		a := fetch(probe, http.MethodGet, base+"/readyz", "", "")
		return a.err == nil && a.code == http.StatusServiceUnavailable && bytes.Contains(a.body, []byte("shutting down"))
	})
	// Then the listener closes while the requests are still blocked: they
	// must be drained, not cut off.
	waitFor(t, 5*time.Second, "the listener to close", func() bool {
		return fetch(freshConnClient, http.MethodGet, base+"/healthz", "", "").err != nil
	})
	if len(answers) != 0 {
		t.Fatal("a request finished before the lock was released")
	}
	release()

	for range requests {
		select {
		case a := <-answers:
			if a.err != nil || a.code != http.StatusOK || !bytes.Contains(a.body, []byte(opsPasscode)) {
				t.Errorf("an in-flight request: %d %v %s", a.code, a.err, a.body)
			}
		case <-time.After(shutdownTimeout):
			t.Fatal("an in-flight request did not complete")
		}
	}
	select {
	case <-bin.exited:
		if bin.exitErr != nil {
			t.Fatalf("exit: %v, want code 0; log:\n%s", bin.exitErr, stdout.String())
		}
	case <-time.After(shutdownTimeout + time.Second - time.Since(signalled)):
		t.Fatalf("the process did not exit within SHUTDOWN_TIMEOUT; log:\n%s", stdout.String())
	}
	t.Logf("SIGTERM to exit: %s", time.Since(signalled).Round(time.Millisecond))

	var msgs []string
	for _, l := range stdout.logLines(t) {
		msgs = append(msgs, fmt.Sprint(l["msg"]))
	}
	i, j := slices.Index(msgs, "shutting down"), slices.Index(msgs, "stopped")
	if i < 0 || j < i {
		t.Errorf("log lacks the shutdown lines in order: %q", msgs)
	}
	waitFor(t, 5*time.Second, "the service's sessions to end", func() bool { return serviceBackends(t, admin, false) == 0 })
}

func TestRunClosesItsPoolBeforeReturning(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	admin := newTestPool(t, dsn, nil)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	rs := startRun(t, serviceEnv(dsn, newJWKSServer(t, key.publicJWK(t, false)).URL))
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })
	if n := serviceBackends(t, admin, false); n == 0 {
		t.Fatal("the service holds no session while ready")
	}
	if err := rs.stop(t); err != nil {
		t.Fatalf("run = %v after cancel, want nil", err)
	}
	// This process lives on, so only a closed pool explains the sessions
	// going away (pgx would otherwise keep idle ones for 30 minutes).
	waitFor(t, 3*time.Second, "the service's sessions to end after run returned", func() bool {
		return serviceBackends(t, admin, false) == 0
	})
}

func TestDBQueryTimeoutBoundsEveryRequestWhenTheDatabaseIsStuck(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	admin := newTestPool(t, dsn, nil)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	const (
		queryTimeout = 500 * time.Millisecond
		slack        = 1500 * time.Millisecond // -race on two shared cores
		requests     = 10
	)
	env := serviceEnv(withPoolSize(t, dsn, 2), newJWKSServer(t, key.publicJWK(t, false)).URL)
	env["DB_QUERY_TIMEOUT"] = queryTimeout.String()

	// The session settings the service's pool config gives the server.
	cfg, err := loadConfig(envFunc(env), false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg.poolConfig.ConnConfig)
	if err != nil {
		t.Fatal(err)
	}
	var statementTimeout, appName string
	err = conn.QueryRow(ctx, "SELECT current_setting('statement_timeout'), current_setting('application_name')").Scan(&statementTimeout, &appName)
	_ = conn.Close(ctx)
	if err != nil || statementTimeout != "500ms" || appName != "threeds-records" {
		t.Fatalf("session settings: statement_timeout %q, application_name %q, err %v", statementTimeout, appName, err)
	}

	rs := startRun(t, env)
	token := key.token(t, validClaims("1001"))
	api := rs.base + "/3ds/my-records"
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })

	release := lockRecords(t, dsn)
	start := time.Now()
	answers := make(chan answer, requests)
	for range requests {
		go func() { answers <- fetch(opsClient, http.MethodGet, api, token, "") }()
	}
	for range requests {
		select {
		case a := <-answers:
			assertClean500(t, a)
			if a.took > queryTimeout+slack {
				t.Errorf("a request took %s with DB_QUERY_TIMEOUT %s", a.took, queryTimeout)
			}
			if a.took < queryTimeout*8/10 {
				t.Errorf("a request failed after %s, before DB_QUERY_TIMEOUT %s: it did not wait for the database", a.took, queryTimeout)
			}
		case <-time.After(queryTimeout + 2*slack):
			t.Fatal("a request hung past DB_QUERY_TIMEOUT")
		}
	}
	t.Logf("%d requests against a locked table with a pool of 2: all 500 within %s", requests, time.Since(start).Round(time.Millisecond))

	// A context deadline only abandons the query on the Go side; PostgreSQL
	// would keep the abandoned statements waiting on the lock unless its own
	// statement_timeout stops them.
	waitFor(t, time.Second, "the abandoned statements to end on the server", func() bool {
		return serviceBackends(t, admin, true) == 0
	})

	release()
	for range 3 {
		if a := mustFetch(t, opsClient, api, token); a.code != http.StatusOK {
			t.Fatalf("after the lock was released: %d %s", a.code, a.body)
		}
	}
	m := scrapeMetrics(t, rs.base)
	if n := m.value(t, "threeds_http_requests_total", "route", "GET /3ds/my-records", "code", "500"); n != requests {
		t.Errorf("threeds_http_requests_total 500 = %v, want %d", n, requests)
	}
	if m.value(t, "threeds_db_pool_canceled_acquire_total") == 0 {
		t.Error("no canceled acquire counted although 8 requests waited for a connection past their deadline")
	}
}

// metricSample is one line of the text exposition format.
type metricSample struct {
	name   string
	labels map[string]string
	value  float64
}

type scrape struct {
	samples []metricSample
	types   map[string]string
}

func scrapeMetrics(t testing.TB, base string) scrape {
	t.Helper()
	a := mustFetch(t, opsClient, base+"/metrics", "")
	if a.code != http.StatusOK || !strings.HasPrefix(a.header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %d %q", a.code, a.header.Get("Content-Type"))
	}
	return parseExposition(t, string(a.body))
}

// parseExposition reads the subset of the text format a scraper must
// accept: HELP/TYPE comments and name{label="value",...} value lines. It
// also checks that every sample belongs to a family whose TYPE came first.
func parseExposition(t testing.TB, text string) scrape {
	t.Helper()
	s := scrape{types: map[string]string{}}
	if !strings.HasSuffix(text, "\n") {
		t.Error("the exposition does not end in a newline")
	}
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			if _, dup := s.types[name]; dup {
				t.Errorf("TYPE of %s given twice", name)
			}
			s.types[name] = typ
			continue
		}
		if strings.HasPrefix(line, "# HELP ") {
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			t.Errorf("unexpected line %q", line)
			continue
		}
		m, err := parseSample(line)
		if err != nil {
			t.Errorf("line %q: %v", line, err)
			continue
		}
		family := m.name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(m.name, suffix); ok && s.types[base] == "histogram" {
				family = base
			}
		}
		if s.types[family] == "" {
			t.Errorf("sample %s comes without a TYPE line before it", m.name)
		}
		s.samples = append(s.samples, m)
	}
	return s
}

func parseSample(line string) (metricSample, error) {
	m := metricSample{labels: map[string]string{}}
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return m, errors.New("no metric name")
	}
	m.name, line = line[:i], line[i:]
	if line[0] == '{' {
		line = line[1:]
		for !strings.HasPrefix(line, "}") {
			key, rest, ok := strings.Cut(line, `="`)
			if !ok || key == "" {
				return m, errors.New("bad label")
			}
			var val strings.Builder
			for {
				if rest == "" {
					return m, errors.New("unterminated label value")
				}
				c := rest[0]
				rest = rest[1:]
				if c == '"' {
					break
				}
				if c == '\n' {
					return m, errors.New("raw newline in a label value")
				}
				if c == '\\' {
					if rest == "" {
						return m, errors.New("dangling escape")
					}
					switch rest[0] {
					case '\\':
						val.WriteByte('\\')
					case '"':
						val.WriteByte('"')
					case 'n':
						val.WriteByte('\n')
					default:
						return m, fmt.Errorf("invalid escape \\%c", rest[0])
					}
					rest = rest[1:]
					continue
				}
				val.WriteByte(c)
			}
			if _, dup := m.labels[key]; dup {
				return m, errors.New("repeated label " + key)
			}
			m.labels[key] = val.String()
			line = strings.TrimPrefix(rest, ",")
		}
		line = line[1:]
	}
	v, ok := strings.CutPrefix(line, " ")
	if !ok {
		return m, errors.New("no space before the value")
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return m, fmt.Errorf("value %q: %w", v, err)
	}
	m.value = f
	return m, nil
}

// find returns the sample named name whose labels include the given
// key/value pairs.
func (s scrape) find(name string, kv ...string) (metricSample, bool) {
	for _, m := range s.samples {
		if m.name != name {
			continue
		}
		match := true
		for i := 0; i+1 < len(kv); i += 2 {
			if m.labels[kv[i]] != kv[i+1] {
				match = false
			}
		}
		if match {
			return m, true
		}
	}
	return metricSample{}, false
}

func (s scrape) value(t testing.TB, name string, kv ...string) float64 {
	t.Helper()
	m, ok := s.find(name, kv...)
	if !ok {
		t.Fatalf("no sample %s%v", name, kv)
	}
	return m.value
}

func TestMetricsExposeTrafficRejectionsKeysAndThePool(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	key := newTestKey(t, jwa.RS256, "ops-rsa", 0)
	stranger := newTestKey(t, jwa.ES256, "not-published", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	idp.down.Store(true) // the first loads fail, then the provider recovers
	rs := startRun(t, serviceEnv(dsn, idp.URL))
	waitFor(t, 10*time.Second, "a failed JWKS load to be counted", func() bool {
		return scrapeMetrics(t, rs.base).value(t, "threeds_jwks_refreshes_total", "result", "failed") >= 1
	})
	m := scrapeMetrics(t, rs.base)
	if ok := m.value(t, "threeds_jwks_refreshes_total", "result", "ok"); ok != 0 {
		t.Errorf("jwks ok refreshes = %v while the provider is down", ok)
	}
	if n := m.value(t, "threeds_jwks_keys"); n != 0 {
		t.Errorf("jwks keys = %v before any load", n)
	}
	idp.down.Store(false)
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })

	before := scrapeMetrics(t, rs.base)
	api := rs.base + "/3ds/my-records"
	valid := key.token(t, validClaims("1001"))
	expiredClaims := validClaims("1001")
	expiredClaims["exp"] = time.Now().Add(-time.Hour).Unix()
	expiredClaims["iat"] = time.Now().Add(-2 * time.Hour).Unix()
	expiredClaims["nbf"] = expiredClaims["iat"]
	traffic := []struct {
		target, token string
		want          int
	}{
		{api, valid, 200}, {api, valid, 200}, {api + "?page=2", valid, 200},
		{api + "?page=0", valid, 400},
		{rs.base + "/nope", "", 404},
		{api, key.token(t, expiredClaims), 401},
		{api, stranger.token(t, validClaims("1001")), 401},
		{api, "", 401},
	}
	for _, tr := range traffic {
		if a := mustFetch(t, opsClient, tr.target, tr.token); a.code != tr.want {
			t.Fatalf("GET %s: %d, want %d", tr.target, a.code, tr.want)
		}
	}
	after := scrapeMetrics(t, rs.base)

	route := "GET /3ds/my-records"
	for _, c := range []struct {
		route, code string
		want        float64
	}{{route, "200", 3}, {route, "400", 1}, {route, "401", 3}, {"unmatched", "404", 1}} {
		if got := after.value(t, "threeds_http_requests_total", "route", c.route, "code", c.code); got != c.want {
			t.Errorf("threeds_http_requests_total{route=%q,code=%q} = %v, want %v", c.route, c.code, got, c.want)
		}
	}
	// The valid token is verified once, then found in the cache three times.
	if got := after.value(t, "threeds_token_cache_lookups_total", "result", "hit") - before.value(t, "threeds_token_cache_lookups_total", "result", "hit"); got != 3 {
		t.Errorf("token cache hits grew by %v, want 3", got)
	}
	if got := after.value(t, "threeds_http_requests_total", "route", "GET /readyz", "code", "200"); got < 1 {
		t.Errorf("readyz 200s = %v", got)
	}

	if after.types["threeds_http_request_duration_seconds"] != "histogram" {
		t.Fatalf("the latency metric is not a histogram: %q", after.types["threeds_http_request_duration_seconds"])
	}
	var les []float64
	var counts []float64
	for _, s := range after.samples {
		if s.name == "threeds_http_request_duration_seconds_bucket" && s.labels["route"] == route {
			le, err := strconv.ParseFloat(s.labels["le"], 64)
			if err != nil {
				t.Fatalf("le %q: %v", s.labels["le"], err)
			}
			les, counts = append(les, le), append(counts, s.value)
		}
	}
	if len(les) < 2 || !slices.IsSorted(les) || !math.IsInf(les[len(les)-1], 1) {
		t.Fatalf("buckets not in increasing le order ending in +Inf: %v", les)
	}
	if !slices.IsSorted(counts) {
		t.Errorf("bucket counts are not cumulative: %v", counts)
	}
	total := after.value(t, "threeds_http_request_duration_seconds_count", "route", route)
	if counts[len(counts)-1] != total || total != 7 {
		t.Errorf("+Inf bucket %v, _count %v, want both 7 (the API requests)", counts[len(counts)-1], total)
	}
	if sum := after.value(t, "threeds_http_request_duration_seconds_sum", "route", route); sum <= 0 || sum > 7*10 {
		t.Errorf("_sum = %v", sum)
	}

	for reason, want := range map[string]float64{"expired": 1, "unknown_key": 1, "missing": 1, "bad_signature": 0, "claims": 0, "malformed": 0} {
		d := after.value(t, "threeds_token_rejections_total", "reason", reason) - before.value(t, "threeds_token_rejections_total", "reason", reason)
		if d != want {
			t.Errorf("rejections{reason=%q} moved by %v, want %v", reason, d, want)
		}
	}
	if after.value(t, "threeds_jwks_refreshes_total", "result", "ok") < 1 || after.value(t, "threeds_jwks_keys") != 1 {
		t.Errorf("jwks after recovery: ok %v, keys %v; want ok >= 1, keys 1",
			after.value(t, "threeds_jwks_refreshes_total", "result", "ok"), after.value(t, "threeds_jwks_keys"))
	}

	for _, g := range []string{"threeds_db_pool_total_conns", "threeds_db_pool_idle_conns", "threeds_db_pool_acquired_conns",
		"threeds_db_pool_constructing_conns", "threeds_db_pool_waiting", "threeds_db_pool_max_conns", "go_goroutines"} {
		if after.types[g] != "gauge" {
			t.Errorf("%s: TYPE %q, want gauge", g, after.types[g])
		}
	}
	totalConns := after.value(t, "threeds_db_pool_total_conns")
	if totalConns < 1 || totalConns != after.value(t, "threeds_db_pool_idle_conns")+after.value(t, "threeds_db_pool_acquired_conns")+after.value(t, "threeds_db_pool_constructing_conns") {
		t.Errorf("pool gauges do not add up: total %v", totalConns)
	}
	if after.value(t, "threeds_db_pool_max_conns") < 1 || after.value(t, "threeds_db_pool_acquire_total") < 3 {
		t.Error("pool max/acquire counters are not plausible")
	}
	for name, typ := range after.types {
		if strings.HasSuffix(name, "_total") != (typ == "counter") {
			t.Errorf("%s is a %s: counters, and only counters, end in _total", name, typ)
		}
	}
}

func TestMetricsLabelValuesAreEscapedForTheTextFormat(t *testing.T) {
	svc := newTestService(t)
	// Go's %q would turn the tab into \t, an escape the format does not have.
	odd := "GET /a\"b\\c\nd/ünï\tx"
	svc.srv.metrics.observe(odd, 200, 3*time.Millisecond)
	svc.srv.metrics.observe(odd, 200, 5*time.Second) // exactly on a bucket bound
	resp, body := svc.do(t, http.MethodGet, "/metrics", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %d", resp.StatusCode)
	}
	s := parseExposition(t, string(body))
	if got := s.value(t, "threeds_http_requests_total", "route", odd, "code", "200"); got != 2 {
		t.Errorf("count for the odd route = %v, want 2", got)
	}
	if got := s.value(t, "threeds_http_request_duration_seconds_bucket", "route", odd, "le", "5"); got != 2 {
		t.Errorf("le=5 bucket = %v, want 2 (a value on the bound belongs in it)", got)
	}
	if got := s.value(t, "threeds_http_request_duration_seconds_bucket", "route", odd, "le", "2.5"); got != 1 {
		t.Errorf("le=2.5 bucket = %v, want 1", got)
	}
	if got := s.value(t, "threeds_http_request_duration_seconds_sum", "route", odd); got != 5.003 {
		t.Errorf("_sum = %v, want 5.003", got)
	}
}

func TestLogsAreJSONWithOneAccessLineEachAndNoSecrets(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	const dbPassword = "pw-Zq8rT4vLm2"
	u.User = url.UserPassword(u.User.Username(), dbPassword) // trust auth ignores it
	key := newTestKey(t, jwa.RS256, "ops-rsa", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	env := serviceEnv(u.String(), idp.URL)
	env["DB_QUERY_TIMEOUT"] = "500ms"
	rs := startRun(t, env)
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })

	valid := key.token(t, validClaims("1001"))
	badSig := valid[:len(valid)-4] + "AAAA"
	expiredClaims := validClaims("1001")
	expiredClaims["exp"] = time.Now().Add(-time.Hour).Unix()
	expired := key.token(t, expiredClaims)
	api := rs.base + "/3ds/my-records"
	type call struct {
		id, method, target, token string
		status                    int
		withUser                  bool
	}
	calls := []call{
		{"log-ok", "GET", api, valid, 200, true},
		{"log-bad-signature", "GET", api, badSig, 401, false},
		{"log-expired", "GET", api, expired, 401, false},
		{"log-garbage", "GET", api, "abc.def", 401, false},
		{"log-no-token", "GET", api, "", 401, false},
		{"log-bad-page", "GET", api + "?page=abc", valid, 400, true},
		{"log-not-found", "GET", rs.base + "/nope?x=1", "", 404, false},
		{"log-method", "POST", api, valid, 405, false},
	}
	bodies := map[string]answer{}
	for _, c := range calls {
		a := fetch(opsClient, c.method, c.target, c.token, c.id)
		if a.err != nil || a.code != c.status {
			t.Fatalf("%s: %d %v, want %d", c.id, a.code, a.err, c.status)
		}
		bodies[c.id] = a
	}
	release := lockRecords(t, dsn)
	a := fetch(opsClient, "GET", api, valid, "log-db-failure")
	release()
	if a.code != 500 {
		t.Fatalf("with the table locked: %d %s", a.code, a.body)
	}
	bodies["log-db-failure"] = a
	calls = append(calls, call{"log-db-failure", "GET", api, valid, 500, true})
	if err := rs.stop(t); err != nil {
		t.Fatalf("run = %v after cancel, want nil", err)
	}

	lines := rs.stdout.logLines(t) // fails on any line that is not JSON
	for _, l := range lines {
		for _, k := range []string{"time", "level", "msg"} {
			if _, ok := l[k]; !ok {
				t.Errorf("log line lacks %s: %v", k, l)
			}
		}
	}
	for _, c := range calls {
		var access []map[string]any
		for _, l := range lines {
			if l["msg"] == "request" && l["request_id"] == c.id {
				access = append(access, l)
			}
		}
		if len(access) != 1 {
			t.Errorf("%s: %d access lines, want 1", c.id, len(access))
			continue
		}
		l := access[0]
		if l["method"] != c.method || l["status"] != float64(c.status) || l["bytes"] != float64(len(bodies[c.id].body)) {
			t.Errorf("%s: access line %v does not match the answer (%s, %d, %d bytes)", c.id, l, c.method, c.status, len(bodies[c.id].body))
		}
		if route, _ := l["route"].(string); route == "" {
			t.Errorf("%s: no route in %v", c.id, l)
		}
		if d, ok := l["duration_ms"].(float64); !ok || d < 0 {
			t.Errorf("%s: duration_ms %v", c.id, l["duration_ms"])
		}
		if _, ok := l["user_id"]; ok != c.withUser || (ok && l["user_id"] != float64(1001)) {
			t.Errorf("%s: user_id %v, want present: %v", c.id, l["user_id"], c.withUser)
		}
	}

	var startup map[string]any
	for _, l := range lines {
		if l["msg"] == "listening" {
			startup = l
		}
	}
	wantDB := fmt.Sprintf("postgres://%s:xxxxx@%s%s", u.User.Username(), u.Host, u.Path)
	if startup == nil || startup["database"] != wantDB {
		t.Errorf("startup line database = %v, want %s", startup["database"], wantDB)
	}
	for _, k := range []string{"addr", "keys", "issuer", "audience", "user_claim", "leeway", "db_query_timeout", "shutdown_timeout", "shutdown_delay", "log_level"} {
		if _, ok := startup[k]; !ok {
			t.Errorf("startup line lacks the setting %s: %v", k, startup)
		}
	}
	var msgs []string
	for _, l := range lines {
		msgs = append(msgs, fmt.Sprint(l["msg"]))
	}
	if !slices.Contains(msgs, "shutting down") || !slices.Contains(msgs, "stopped") {
		t.Errorf("no shutdown lines among %q", msgs)
	}

	log := rs.stdout.String()
	secrets := map[string]string{"database password": dbPassword, "passcode": opsPasscode}
	for name, tok := range map[string]string{"valid": valid, "bad signature": badSig, "expired": expired} {
		secrets[name+" token"] = tok
		secrets[name+" token signature"] = tok[strings.LastIndexByte(tok, '.')+1:]
	}
	var jwkFields map[string]any
	raw, _ := json.Marshal(key.priv)
	_ = json.Unmarshal(raw, &jwkFields)
	for _, f := range []string{"d", "n", "p", "q", "dp", "dq", "qi"} {
		s, _ := jwkFields[f].(string)
		if len(s) < 16 {
			t.Fatalf("test key has no JWK member %q", f)
		}
		secrets["JWK "+f] = s[:16]
	}
	for name, s := range secrets {
		if strings.Contains(log, s) {
			t.Errorf("the log contains the %s", name)
		}
	}
}
