package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// syncBuffer is an io.Writer the service logs into while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// logLines decodes every JSON log line written so far.
func (s *syncBuffer) logLines(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(s.String()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", sc.Text())
		}
		out = append(out, m)
	}
	return out
}

// listeningBase is the service's base URL from its "listening" log line.
func (s *syncBuffer) listeningBase(t testing.TB) (string, bool) {
	for _, l := range s.logLines(t) {
		if l["msg"] == "listening" {
			return "http://" + l["addr"].(string), true
		}
	}
	return "", false
}

func envFunc(env map[string]string) func(string) string {
	return func(k string) string { return env[k] }
}

// runningService is run() started in-process, as main would start it.
type runningService struct {
	base   string
	stdout *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

// startRun starts run() with env and waits for its "listening" line.
func startRun(t testing.TB, env map[string]string) *runningService {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rs := &runningService{stdout: &syncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	var stderr syncBuffer
	go func() { rs.done <- run(ctx, nil, envFunc(env), rs.stdout, &stderr) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-rs.done:
		case <-time.After(20 * time.Second):
			t.Error("run did not return after cancel")
		}
	})
	waitFor(t, 10*time.Second, "the listening log line", func() bool {
		var ok bool
		if rs.base, ok = rs.stdout.listeningBase(t); ok {
			return true
		}
		select {
		case err := <-rs.done:
			t.Fatalf("run returned early: %v; stderr %s", err, stderr.String())
		default:
		}
		return false
	})
	return rs
}

// stop cancels run's context (what SIGTERM does in main) and returns its error.
func (rs *runningService) stop(t testing.TB) error {
	t.Helper()
	rs.cancel()
	select {
	case err := <-rs.done:
		rs.done <- err // let the cleanup see it too
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("run did not return within 20s of cancel")
		return nil
	}
}

func (rs *runningService) get(t testing.TB, path, token string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, rs.base+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	return resp.StatusCode, buf.Bytes()
}

// serviceEnv is a complete, valid environment for run().
func serviceEnv(databaseURL, jwksURL string) map[string]string {
	return map[string]string{
		"DATABASE_URL":     databaseURL,
		"JWKS_URL":         jwksURL,
		"JWT_ISSUER":       testIssuer,
		"JWT_AUDIENCE":     testAudience,
		"LISTEN_ADDR":      freeListenAddr(),
		"SHUTDOWN_TIMEOUT": "5s",
	}
}

// freeListenAddr is a 127.0.0.1 address whose port was free a moment ago.
// LISTEN_ADDR refuses port 0, so tests pick the port themselves. The range
// is below Linux's ephemeral ports (32768 and up), which outgoing
// connections take at random and could squat on before the service binds.
func freeListenAddr() string {
	for range 200 {
		port := 20000 + mathrand.IntN(12000)
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		return addr
	}
	panic("no free TCP port in 20000..31999 on 127.0.0.1")
}

func TestConfigErrorsNameTheVariable(t *testing.T) {
	valid := serviceEnv("postgres://u:secretpw@127.0.0.1:5432/db", "https://idp.test/jwks")
	cases := []struct {
		name     string
		change   map[string]string
		variable string
	}{
		{"a missing DATABASE_URL", map[string]string{"DATABASE_URL": ""}, "DATABASE_URL"},
		{"a malformed DATABASE_URL", map[string]string{"DATABASE_URL": "postgres://u:secretpw@h:notaport/db"}, "DATABASE_URL"},
		{"neither JWKS_URL nor JWKS_FILE", map[string]string{"JWKS_URL": ""}, "JWKS_URL"},
		{"both JWKS_URL and JWKS_FILE", map[string]string{"JWKS_FILE": "/keys/jwks.json"}, "JWKS_URL"},
		{"a JWKS_URL that is not http", map[string]string{"JWKS_URL": "file:///etc/passwd"}, "JWKS_URL"},
		{"a missing JWT_ISSUER", map[string]string{"JWT_ISSUER": ""}, "JWT_ISSUER"},
		{"a malformed JWT_LEEWAY", map[string]string{"JWT_LEEWAY": "soon"}, "JWT_LEEWAY"},
		{"a negative JWT_LEEWAY", map[string]string{"JWT_LEEWAY": "-1s"}, "JWT_LEEWAY"},
		{"a malformed LISTEN_ADDR", map[string]string{"LISTEN_ADDR": "8080"}, "LISTEN_ADDR"},
		{"a malformed SHUTDOWN_TIMEOUT", map[string]string{"SHUTDOWN_TIMEOUT": "15"}, "SHUTDOWN_TIMEOUT"},
		{"a malformed LOG_LEVEL", map[string]string{"LOG_LEVEL": "loud"}, "LOG_LEVEL"},
		{"a malformed DB_QUERY_TIMEOUT", map[string]string{"DB_QUERY_TIMEOUT": "0s"}, "DB_QUERY_TIMEOUT"},
		{"a LISTEN_ADDR on port 0", map[string]string{"LISTEN_ADDR": ":0"}, "LISTEN_ADDR"},
		{"a LISTEN_ADDR on port 65536", map[string]string{"LISTEN_ADDR": "127.0.0.1:65536"}, "LISTEN_ADDR"},
		{"a LISTEN_ADDR with a port far out of range", map[string]string{"LISTEN_ADDR": ":99999999999"}, "LISTEN_ADDR"},
		{"a LISTEN_ADDR with a negative port", map[string]string{"LISTEN_ADDR": "127.0.0.1:-1"}, "LISTEN_ADDR"},
		{"a LISTEN_ADDR with a port name", map[string]string{"LISTEN_ADDR": ":http"}, "LISTEN_ADDR"},
		{"a DB_QUERY_TIMEOUT under a millisecond", map[string]string{"DB_QUERY_TIMEOUT": "999us"}, "DB_QUERY_TIMEOUT"},
		{"a DB_QUERY_TIMEOUT over a day", map[string]string{"DB_QUERY_TIMEOUT": "24h0m0.001s"}, "DB_QUERY_TIMEOUT"},
		{"a STREAM_HEARTBEAT under a second", map[string]string{"STREAM_HEARTBEAT": "1ms"}, "STREAM_HEARTBEAT"},
		{"a STREAM_HEARTBEAT over five minutes", map[string]string{"STREAM_HEARTBEAT": "5m1s"}, "STREAM_HEARTBEAT"},
		{"an unknown STREAM_SOURCE", map[string]string{"STREAM_SOURCE": "kafka"}, "STREAM_SOURCE"},
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
			// Bounded: a setting that is wrongly accepted starts the server,
			// and run then returns nil when the context ends.
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			err := run(ctx, nil, envFunc(env), &syncBuffer{}, &syncBuffer{})
			var ce *configError
			if !errors.As(err, &ce) {
				t.Fatalf("run = %v, want a configError", err)
			}
			if !strings.HasPrefix(err.Error(), tc.variable+":") || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q does not start by naming %s on one line", err, tc.variable)
			}
			if strings.Contains(err.Error(), "secretpw") {
				t.Errorf("error %q reveals the database password", err)
			}
		})
	}
}

func TestPoolParametersInTheListenURLAreIgnoredNotSentToTheServer(t *testing.T) {
	for _, tc := range []struct{ name, listenURL string }{
		{"a URL copied from DATABASE_URL", "postgres://u:pw@127.0.0.1:5432/db?pool_max_conns=8&pool_min_conns=2&application_name=x"},
		{"keyword/value form", "host=127.0.0.1 port=5432 user=u dbname=db pool_max_conns=8 pool_health_check_period=10s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := serviceEnv("postgres://u:pw@127.0.0.1:5432/db", "https://idp.test/jwks")
			env["DATABASE_LISTEN_URL"] = tc.listenURL
			cfg, err := loadConfig(envFunc(env), false)
			if err != nil {
				t.Fatal(err)
			}
			for k := range cfg.listenConfig.RuntimeParams {
				if strings.HasPrefix(k, "pool_") {
					t.Errorf("%s would be sent to the server as a setting", k)
				}
			}
		})
	}
}

func TestStreamSourceIsReadForMigrateToo(t *testing.T) {
	for _, tc := range []struct {
		value, want string
		migrate     bool
	}{
		{"", sourceNotify, false}, {"notify", sourceNotify, false}, {"wal", sourceWAL, false},
		{"", sourceNotify, true}, {"wal", sourceWAL, true},
	} {
		env := map[string]string{"DATABASE_URL": "postgres://u:pw@127.0.0.1:5432/db", "STREAM_SOURCE": tc.value}
		if !tc.migrate {
			env = serviceEnv("postgres://u:pw@127.0.0.1:5432/db", "https://idp.test/jwks")
			env["STREAM_SOURCE"] = tc.value
		}
		cfg, err := loadConfig(envFunc(env), tc.migrate)
		if err != nil || cfg.streamSource != tc.want {
			t.Errorf("STREAM_SOURCE=%q (migrate %v): %v, %q; want %q", tc.value, tc.migrate, err, cfg.streamSource, tc.want)
		}
	}
}

// binDir holds the binary buildBinary compiles; TestMain removes it.
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildBinary compiles the service once per test run, with the same flags
// as the Dockerfile.
var buildBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "threeds-bin-")
	if err != nil {
		return "", err
	}
	binDir = dir
	bin := filepath.Join(dir, "threeds-records")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", errors.New(string(out))
	}
	return bin, nil
})

func testBinary(t testing.TB) string {
	t.Helper()
	bin, err := buildBinary()
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	return bin
}

func TestTheBinaryExits2WithOneLineOnABadVariable(t *testing.T) {
	valid := map[string]string{"DATABASE_URL": "postgres://u@127.0.0.1/db", "JWKS_URL": "https://idp.test/jwks", "JWT_ISSUER": "x"}
	cases := []struct {
		name, variable, value string
	}{
		{"a leeway that is not a duration", "JWT_LEEWAY", "forever"},
		{"a listen port of 0", "LISTEN_ADDR", ":0"},
		{"a listen port of 65536", "LISTEN_ADDR", ":65536"},
		{"a listen port that is not a number", "LISTEN_ADDR", "127.0.0.1:eighty"},
		{"a query timeout under a millisecond", "DB_QUERY_TIMEOUT", "500us"},
		{"a query timeout over a day", "DB_QUERY_TIMEOUT", "25h"},
	}
	for _, tc := range cases {
		t.Run(tc.name+" exits 2 naming "+tc.variable, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, testBinary(t))
			for k, v := range valid {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			cmd.Env = append(cmd.Env, tc.variable+"="+tc.value)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 {
				t.Fatalf("exit = %v, want code 2; stderr %q", err, stderr.String())
			}
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.variable) {
				t.Errorf("stderr = %q, want one line naming %s", stderr.String(), tc.variable)
			}
		})
	}
}

func TestMigrateNeedsOnlyTheDatabaseAndIsRepeatable(t *testing.T) {
	dsn := newEmptyTestDB(t)
	env := map[string]string{"DATABASE_URL": dsn}
	for i := range 2 {
		var out syncBuffer
		if err := run(context.Background(), []string{"migrate"}, envFunc(env), &out, &syncBuffer{}); err != nil {
			t.Fatalf("migrate #%d: %v", i+1, err)
		}
	}
	store := NewStore(newTestPool(t, dsn, nil), 3*time.Second)
	if _, total, err := store.ListRecords(context.Background(), 1, 1, 20); err != nil || total != 0 {
		t.Fatalf("after migrate: total %d, err %v", total, err)
	}
}

func TestRunServesTheAPIAndStopsCleanly(t *testing.T) {
	dsn := newTestDB(t)
	insertRows(t, newTestPool(t, dsn, nil), seedRow{id: 7, userID: 1001, passcode: "654321", amount: "12.5", currency: "EUR", expiresAfter: 300, receivedAt: "2026-01-20T10:30:00Z"})
	key := newTestKey(t, jwa.ES256, "run", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	rs := startRun(t, serviceEnv(dsn, idp.URL))

	waitFor(t, 10*time.Second, "readiness", func() bool { code, _ := rs.get(t, "/readyz", ""); return code == 200 })
	token := key.token(t, validClaims("1001"))
	code, body := rs.get(t, "/3ds/my-records", token)
	if code != 200 || !bytes.Contains(body, []byte(`"passcode":"654321"`)) || !bytes.Contains(body, []byte(`"amount":"12.50"`)) {
		t.Fatalf("GET: %d %s", code, body)
	}
	expired := validClaims("1001")
	expired["exp"] = time.Now().Add(-time.Hour).Unix()
	if code, _ := rs.get(t, "/3ds/my-records", key.token(t, expired)); code != http.StatusUnauthorized {
		t.Fatalf("expired token: %d", code)
	}
	if err := rs.stop(t); err != nil {
		t.Fatalf("run returned %v after cancel, want nil", err)
	}

	logs := rs.stdout.String()
	for _, secret := range []string{token, token[strings.LastIndexByte(token, '.')+1:], "654321"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log contains a secret (%.12s...)", secret)
		}
	}
	var sawRequest bool
	for _, l := range rs.stdout.logLines(t) {
		if l["msg"] == "request" && l["route"] == "GET /3ds/my-records" && l["status"] == float64(200) {
			sawRequest = true
			for _, k := range []string{"method", "path", "status", "bytes", "duration_ms", "request_id", "user_id"} {
				if _, ok := l[k]; !ok {
					t.Errorf("access log line lacks %s: %v", k, l)
				}
			}
		}
	}
	var sawReject bool
	for _, l := range rs.stdout.logLines(t) {
		if l["msg"] == "request" && l["status"] == float64(401) {
			sawReject = l["auth_reject"] == "expired"
		}
	}
	if !sawReject {
		t.Errorf("the 401 access line does not say auth_reject=expired:\n%s", logs)
	}
	if !sawRequest {
		t.Errorf("no access log line for the API request in:\n%s", logs)
	}
}

func TestThePoolSizeFollowsGOMAXPROCSUnlessPoolMaxConnsIsSet(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "pool", 0)
	jwks := newJWKSServer(t, key.publicJWK(t, false)).URL
	// Nothing listens on port 1: the pool connects lazily, and the start
	// line is all this test reads.
	const url = "postgres://u@127.0.0.1:1/db"
	cases := []struct {
		name        string
		gomaxprocs  string
		databaseURL string
		want        float64
		wantFrom    string
	}{
		{"one CPU gets the floor of 4", "1", url, 4, "GOMAXPROCS"},
		{"three CPUs get two connections each", "3", url, 6, "GOMAXPROCS"},
		{"64 CPUs get the cap of 8, not 64", "64", url, 8, "GOMAXPROCS"},
		{"pool_max_conns in a URL wins over GOMAXPROCS", "64", url + "?pool_max_conns=3", 3, "pool_max_conns"},
		{"pool_max_conns in keyword/value form wins over GOMAXPROCS", "1", "host=127.0.0.1 port=1 user=u dbname=db pool_max_conns=20", 20, "pool_max_conns"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := serviceEnv(tc.databaseURL, jwks)
			// Go reads GOMAXPROCS at process start, hence a process per case.
			env["GOMAXPROCS"] = tc.gomaxprocs
			b := startBinary(t, env)
			var line map[string]any
			for _, l := range b.stdout.logLines(t) {
				if l["msg"] == "listening" {
					line = l
				}
			}
			if line["db_pool_max_conns"] != tc.want || line["db_pool_max_conns_from"] != tc.wantFrom {
				t.Errorf("start line says db_pool_max_conns=%v from %v, want %v from %s (gomaxprocs %v)",
					line["db_pool_max_conns"], line["db_pool_max_conns_from"], tc.want, tc.wantFrom, line["gomaxprocs"])
			}
			if tc.wantFrom == "GOMAXPROCS" && line["gomaxprocs"] != float64(mustAtoi(t, tc.gomaxprocs)) {
				t.Errorf("start line says gomaxprocs=%v, want %s", line["gomaxprocs"], tc.gomaxprocs)
			}
		})
	}
}

func mustAtoi(t testing.TB, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
