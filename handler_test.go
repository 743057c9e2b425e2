package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// testService is the real handler stack (server, verifier, store) over
// HTTP, on a fresh database and a real JWKS endpoint.
type testService struct {
	*httptest.Server
	pool *pgxpool.Pool
	key  testKey
	srv  *server
}

func newTestService(t testing.TB) *testService {
	t.Helper()
	store, pool := newTestStore(t)
	key := newTestKey(t, jwa.ES256, "svc", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	srv := newServer(store, v, nil, discardLogger())
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	return &testService{Server: ts, pool: pool, key: key, srv: srv}
}

func (s *testService) tokenFor(t testing.TB, user int64) string {
	return s.key.token(t, validClaims(user))
}

// newTestRequest builds a request with a bearer token (none when token is
// "") and header as name, value pairs.
func newTestRequest(t testing.TB, ctx context.Context, method, url, token string, header ...string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

// do sends one request; token "" sends no Authorization header.
func (s *testService) do(t testing.TB, method, target, token string, header ...string) (*http.Response, []byte) {
	t.Helper()
	req := newTestRequest(t, context.Background(), method, s.URL+target, token, header...)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

type pageBody struct {
	Status string `json:"status"`
	Data   struct {
		Page       int      `json:"page"`
		PageSize   int      `json:"page_size"`
		Total      int64    `json:"total"`
		TotalPages int64    `json:"total_pages"`
		Records    []Record `json:"records"`
	} `json:"data"`
}

func decodePage(t testing.TB, resp *http.Response, body []byte) pageBody {
	t.Helper()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", resp.StatusCode, body)
	}
	var p pageBody
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	return p
}

func assertAPIHeaders(t testing.TB, h http.Header) {
	t.Helper()
	if got := h.Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type = %q", got)
	}
	if got := h.Get("Cache-Control"); got != "no-store" {
		t.Errorf("Cache-Control = %q", got)
	}
	if h.Get("X-Request-ID") == "" {
		t.Error("no X-Request-ID")
	}
	if st := h.Get("Server-Timing"); !strings.Contains(st, "auth;dur=") || !strings.Contains(st, "db;dur=") || !strings.Contains(st, "total;dur=") {
		t.Errorf("Server-Timing = %q", st)
	}
}

func TestMyRecordsAnswersWithExactlyTheContractShape(t *testing.T) {
	svc := newTestService(t)
	mall := "Amazon"
	insertRows(t, svc.pool,
		seedRow{id: 1, userID: 1001, passcode: "012345", amount: "100", currency: "USD", merchant: &mall, expiresAfter: 300, receivedAt: "2026-01-20 18:30:00.75+08"},
		seedRow{id: 2, userID: 1001, passcode: "222222", amount: "1500", currency: "JPY", expiresAfter: 120, receivedAt: "2026-01-19 10:00:00Z"},
		seedRow{id: 3, userID: 1002, passcode: "999999", amount: "1", currency: "USD", merchant: &mall, expiresAfter: 300, receivedAt: "2026-01-21 10:00:00Z"},
	)
	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", svc.tokenFor(t, 1001))
	assertAPIHeaders(t, resp.Header)

	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		t.Fatal(err)
	}
	if keys := sortedKeys(top); !slices.Equal(keys, []string{"data", "status"}) {
		t.Errorf("top-level keys %v", keys)
	}
	var data map[string]json.RawMessage
	_ = json.Unmarshal(top["data"], &data)
	if keys := sortedKeys(data); !slices.Equal(keys, []string{"page", "page_size", "records", "total", "total_pages"}) {
		t.Errorf("data keys %v", keys)
	}
	var records []map[string]json.RawMessage
	_ = json.Unmarshal(data["records"], &records)
	if len(records) != 2 {
		t.Fatalf("got %d records, want user 1001's 2: %s", len(records), body)
	}
	if keys := sortedKeys(records[0]); !slices.Equal(keys, []string{"amount", "currency", "expires_after", "id", "merchant_name", "passcode", "received_at"}) {
		t.Errorf("record keys %v", keys)
	}
	want := `{"id":1,"passcode":"012345","amount":"100.00","currency":"USD","merchant_name":"Amazon","expires_after":300,"received_at":"2026-01-20T10:30:00Z"}`
	var gotRec, wantRec any
	_ = json.Unmarshal(mustMarshal(t, records[0]), &gotRec)
	_ = json.Unmarshal([]byte(want), &wantRec)
	if string(mustMarshal(t, gotRec)) != string(mustMarshal(t, wantRec)) {
		t.Errorf("first record\n got %s\nwant %s", mustMarshal(t, gotRec), want)
	}
	if !bytes.Contains(body, []byte(`"merchant_name":""`)) {
		t.Errorf("a NULL merchant must render as \"\": %s", body)
	}
	p := decodePage(t, resp, body)
	if p.Status != "success" || p.Data.Page != 1 || p.Data.PageSize != 20 || p.Data.Total != 2 || p.Data.TotalPages != 1 {
		t.Errorf("page meta %+v", p.Data)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func mustMarshal(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMyRecordsPaginates(t *testing.T) {
	svc := newTestService(t)
	var rows []seedRow
	for i := int64(1); i <= 41; i++ {
		rows = append(rows, row(i, 1001, time.Date(2026, 1, 1, 0, 0, int(i), 0, time.UTC).Format(time.RFC3339)))
	}
	insertRows(t, svc.pool, rows...)
	tok := svc.tokenFor(t, 1001)

	cases := []struct {
		name                  string
		query                 string
		page, size            int
		total, pages, firstID int64
		count                 int
	}{
		{"no parameters give page 1 of 20", "", 1, 20, 41, 3, 41, 20},
		{"empty values count as absent", "?page=&page_size=", 1, 20, 41, 3, 41, 20},
		{"the last page is partial", "?page=3", 3, 20, 41, 3, 1, 1},
		{"page size 100 is allowed", "?page_size=100", 1, 100, 41, 1, 41, 41},
		{"an odd page size counts pages up", "?page=2&page_size=7", 2, 7, 41, 6, 34, 7},
		{"a page past the end is empty with the true total", "?page=4", 4, 20, 41, 3, 0, 0},
		{"the largest page is a 200", "?page=2147483647&page_size=100", 2147483647, 100, 41, 1, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := svc.do(t, http.MethodGet, "/3ds/my-records"+tc.query, tok)
			p := decodePage(t, resp, body)
			d := p.Data
			if d.Page != tc.page || d.PageSize != tc.size || d.Total != tc.total || d.TotalPages != tc.pages || len(d.Records) != tc.count {
				t.Fatalf("got page=%d size=%d total=%d pages=%d records=%d", d.Page, d.PageSize, d.Total, d.TotalPages, len(d.Records))
			}
			if tc.count > 0 && d.Records[0].ID != tc.firstID {
				t.Errorf("first id %d, want %d", d.Records[0].ID, tc.firstID)
			}
			if tc.count == 0 && !bytes.Contains(body, []byte(`"records":[]`)) {
				t.Errorf("an empty page must have \"records\":[], got %s", body)
			}
		})
	}
}

func TestMyRecordsForAUserWithNoRecordsIsEmpty(t *testing.T) {
	svc := newTestService(t)
	insertRows(t, svc.pool, row(1, 1001, "2026-01-01T00:00:00Z"))
	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", svc.tokenFor(t, 5))
	p := decodePage(t, resp, body)
	if p.Data.Total != 0 || p.Data.TotalPages != 0 || !bytes.Contains(body, []byte(`"records":[]`)) {
		t.Errorf("got %s", body)
	}
}

func TestMyRecordsRejectsMalformedPaging(t *testing.T) {
	svc := newTestService(t)
	tok := svc.tokenFor(t, 1001)
	for _, q := range []string{
		"page=0", "page=-1", "page=abc", "page=1.5", "page=1e2", "page=%201", "page=1%20", "page=+1", "page=0x10",
		"page=2147483648", "page=99999999999999999999", "page=1&page=2",
		"page_size=0", "page_size=-1", "page_size=101", "page_size=abc", "page_size=1.5", "page_size=1e2", "page_size=%201",
		"page_size=99999999999999999999", "page_size=20&page_size=20", "page=%zz",
	} {
		t.Run(q+" is a 400", func(t *testing.T) {
			resp, body := svc.do(t, http.MethodGet, "/3ds/my-records?"+q, tok)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400; body %s", resp.StatusCode, body)
			}
			assertAPIHeaders(t, resp.Header)
			assertErrorBody(t, resp.Header, body)
		})
	}
}

func TestMyRecordsNeverShowsAnotherUsersRecords(t *testing.T) {
	svc := newTestService(t)
	insertRows(t, svc.pool, row(1, 1001, "2026-01-01T00:00:00Z"), row(2, 1002, "2026-01-02T00:00:00Z"))
	tok := svc.tokenFor(t, 1001)
	for _, tc := range []struct {
		name, target string
		header       []string
	}{
		{"a user_id query parameter is ignored", "/3ds/my-records?user_id=1002", nil},
		{"an X-User-ID header is ignored", "/3ds/my-records", []string{"X-User-ID", "1002"}},
		{"an X-Forwarded-User header is ignored", "/3ds/my-records", []string{"X-Forwarded-User", "1002"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := svc.do(t, http.MethodGet, tc.target, tok, tc.header...)
			p := decodePage(t, resp, body)
			if p.Data.Total != 1 || len(p.Data.Records) != 1 || p.Data.Records[0].ID != 1 {
				t.Errorf("got %s", body)
			}
		})
	}
}

func TestHeadBehavesLikeGetWithoutABody(t *testing.T) {
	svc := newTestService(t)
	insertRows(t, svc.pool, row(1, 1001, "2026-01-01T00:00:00Z"))
	resp, body := svc.do(t, http.MethodHead, "/3ds/my-records", svc.tokenFor(t, 1001))
	if resp.StatusCode != http.StatusOK || len(body) != 0 {
		t.Fatalf("HEAD: status %d, body %q", resp.StatusCode, body)
	}
	assertAPIHeaders(t, resp.Header)
	resp, _ = svc.do(t, http.MethodHead, "/3ds/my-records", "")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("HEAD without a token: %d", resp.StatusCode)
	}
}

func TestUnknownPathsAndMethodsAnswerInJSON(t *testing.T) {
	svc := newTestService(t)
	tok := svc.tokenFor(t, 1001)
	for _, tc := range []struct {
		name, method, target string
		status               int
		allow                string
	}{
		{"an unknown path is a 404", http.MethodGet, "/nope", http.StatusNotFound, ""},
		{"the root is a 404", http.MethodGet, "/", http.StatusNotFound, ""},
		{"a sub-path of the endpoint is a 404", http.MethodGet, "/3ds/my-records/1002", http.StatusNotFound, ""},
		{"a doubled slash is a 404, not a redirect", http.MethodGet, "//3ds/my-records", http.StatusNotFound, ""},
		{"a dot segment is a 404, not a redirect", http.MethodGet, "/3ds/./my-records", http.StatusNotFound, ""},
		{"POST is a 405", http.MethodPost, "/3ds/my-records", http.StatusMethodNotAllowed, "GET, HEAD"},
		{"DELETE is a 405", http.MethodDelete, "/3ds/my-records", http.StatusMethodNotAllowed, "GET, HEAD"},
		{"PUT on healthz is a 405", http.MethodPut, "/healthz", http.StatusMethodNotAllowed, "GET, HEAD"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := svc.do(t, tc.method, tc.target, tok)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %s", resp.StatusCode, tc.status, body)
			}
			assertErrorBody(t, resp.Header, body)
			if got := resp.Header.Get("Allow"); got != tc.allow {
				t.Errorf("Allow = %q, want %q", got, tc.allow)
			}
			if resp.Header.Get("X-Request-ID") == "" {
				t.Error("no X-Request-ID")
			}
		})
	}
}

func TestUnauthenticatedAnswersCarryTheAPIHeaders(t *testing.T) {
	svc := newTestService(t)
	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", "")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status %d", resp.StatusCode)
	}
	assertAPIHeaders(t, resp.Header)
	assertErrorBody(t, resp.Header, body)
	if got := resp.Header.Get("WWW-Authenticate"); got != `Bearer realm="threeds-records"` {
		t.Errorf("WWW-Authenticate = %q", got)
	}
}

func TestRequestIDIsEchoedOnlyWhenSafe(t *testing.T) {
	svc := newTestService(t)
	resp, _ := svc.do(t, http.MethodGet, "/healthz", "", "X-Request-ID", "gw-1234_abc.9")
	if got := resp.Header.Get("X-Request-ID"); got != "gw-1234_abc.9" {
		t.Errorf("X-Request-ID = %q, want the caller's", got)
	}
	resp, _ = svc.do(t, http.MethodGet, "/healthz", "", "X-Request-ID", "<script>")
	if got := resp.Header.Get("X-Request-ID"); got == "<script>" || len(got) != 32 {
		t.Errorf("X-Request-ID = %q, want a generated id", got)
	}
}

func TestADatabaseFailureIsAnOpaque500(t *testing.T) {
	// A pool aimed at a port where nothing listens: every query fails.
	pool := newTestPool(t, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=1", nil)
	key := newTestKey(t, jwa.ES256, "svc", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	ts := httptest.NewServer(newServer(NewStore(pool, time.Second), v, nil, discardLogger()))
	t.Cleanup(ts.Close)
	svc := &testService{Server: ts, key: key}

	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", svc.tokenFor(t, 1001))
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("status %d, want 500; body %s", resp.StatusCode, body)
	}
	assertAPIHeaders(t, resp.Header)
	assertErrorBody(t, resp.Header, body)
	for _, leak := range []string{"127.0.0.1", "dial", "SELECT", "threeds_records", "postgres", "connect"} {
		if bytes.Contains(bytes.ToLower(body), bytes.ToLower([]byte(leak))) {
			t.Errorf("500 body reveals %q: %s", leak, body)
		}
	}
	resp, body = svc.do(t, http.MethodGet, "/readyz", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("readyz with the database down: %d %s", resp.StatusCode, body)
	}
	assertErrorBody(t, resp.Header, body)
}

func TestProbesNeedNoToken(t *testing.T) {
	svc := newTestService(t)
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, body := svc.do(t, http.MethodGet, path, "")
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %d %s", path, resp.StatusCode, body)
		}
	}
	svc.srv.draining.Store(true)
	resp, body := svc.do(t, http.MethodGet, "/readyz", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("readyz while draining: %d %s", resp.StatusCode, body)
	}
	resp, _ = svc.do(t, http.MethodGet, "/healthz", "")
	if resp.StatusCode != http.StatusOK {
		t.Errorf("healthz while draining: %d", resp.StatusCode)
	}
}

func TestParsePaging(t *testing.T) {
	for _, tc := range []struct {
		query      string
		page, size int
		ok         bool
	}{
		{"", 1, 20, true},
		{"page=2&page_size=50", 2, 50, true},
		{"page=02", 2, 20, true},
		{"page=2147483647", 2147483647, 20, true},
		{"other=x", 1, 20, true},
		{"page=2147483648", 0, 0, false},
		{"page_size=100", 1, 100, true},
		{"page_size=101", 0, 0, false},
		{"page=１", 0, 0, false}, // a full-width digit
		{"page=00", 0, 0, false},
		{"page=" + strings.Repeat("0", 40) + "2", 2, 20, true},
		// Ten significant digits, past int32: a 32-bit int accumulator
		// wrapped these round to page 1 and page size 20.
		{"page=4294967297", 0, 0, false},
		{"page=0004294967297", 0, 0, false},
		{"page_size=4294967316", 0, 0, false},
		{"page=9223372036854775807", 0, 0, false},  // the largest int64
		{"page=9223372036854775808", 0, 0, false},  // one past it
		{"page=18446744073709551617", 0, 0, false}, // 2^64+1 wraps to 1 in 64 bits
	} {
		page, size, err := parsePaging(tc.query)
		if (err == nil) != tc.ok || page != tc.page || size != tc.size {
			t.Errorf("parsePaging(%q) = %d, %d, %v", tc.query, page, size, err)
		}
	}
}

func TestReadinessStaysUpWhileEveryConnectionIsBusy(t *testing.T) {
	dsn := newTestDB(t)
	pool := newTestPool(t, dsn, func(c *pgxpool.Config) { c.MaxConns = 1 })
	key := newTestKey(t, jwa.ES256, "svc", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	ts := httptest.NewServer(newServer(NewStore(pool, 10*time.Second), v, nil, discardLogger()))
	t.Cleanup(ts.Close)
	svc := &testService{Server: ts, key: key, pool: pool}

	release := lockRecords(t, dsn)
	done := make(chan int, 1)
	go func() {
		resp, _ := svc.do(t, http.MethodGet, "/3ds/my-records", svc.tokenFor(t, 1001))
		done <- resp.StatusCode
	}()
	waitFor(t, 5*time.Second, "the only connection to be busy", func() bool { return pool.Stat().AcquiredConns() == 1 })

	start := time.Now()
	resp, body := svc.do(t, http.MethodGet, "/readyz", "")
	if resp.StatusCode != http.StatusOK || time.Since(start) > time.Second {
		t.Errorf("readyz with a busy pool: %d after %s: %s", resp.StatusCode, time.Since(start), body)
	}
	release()
	if code := <-done; code != http.StatusOK {
		t.Errorf("the blocked request ended with %d", code)
	}
}

// build386 compiles the service for GOARCH=386, where int is 32 bits (the
// build cache makes every build after the first one a link).
func build386(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "threeds-records-386")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=386")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("GOARCH=386 go build: %v\n%s", err, out)
	}
	return bin
}

// TestPagingIsParsedTheSameWhereIntIs32Bits runs the real binary built for
// 386: a 64-bit test binary cannot show an overflow of a 32-bit int.
func TestPagingIsParsedTheSameWhereIntIs32Bits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the service for GOARCH=386")
	}
	if runtime.GOOS != "linux" || (runtime.GOARCH != "amd64" && runtime.GOARCH != "386") {
		t.Skipf("%s/%s cannot run a linux/386 binary", runtime.GOOS, runtime.GOARCH)
	}
	bin := build386(t)
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	key := newTestKey(t, jwa.ES256, "svc386", 0)
	env := serviceEnv(dsn, newJWKSServer(t, key.publicJWK(t, false)).URL)

	cmd := exec.Command(bin)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		// A 64-bit kernel without IA-32 emulation refuses the binary.
		t.Skipf("this machine does not run linux/386 binaries: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	var base string
	waitFor(t, 15*time.Second, "the 386 binary's listening line", func() bool {
		var ok bool
		if base, ok = stdout.listeningBase(t); ok {
			return true
		}
		select {
		case err := <-exited:
			t.Fatalf("the 386 binary exited early: %v; stderr %s", err, stderr.String())
		default:
		}
		return false
	})
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, base+"/readyz", "").code == http.StatusOK })

	token := key.token(t, validClaims("1001"))
	for _, tc := range []struct {
		name, query string
		status      int
		page, size  int
	}{
		{"the largest page is still a page", "page=2147483647", http.StatusOK, 2147483647, 20},
		{"page 2^32+1 is out of range, not page 1", "page=4294967297", http.StatusBadRequest, 0, 0},
		{"page size 2^32+20 is out of range, not 20", "page_size=4294967316", http.StatusBadRequest, 0, 0},
		{"2^64+1 is out of range, not page 1", "page=18446744073709551617", http.StatusBadRequest, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := mustFetch(t, opsClient, base+"/3ds/my-records?"+tc.query, token)
			if a.code != tc.status {
				t.Fatalf("status %d, want %d: %s", a.code, tc.status, a.body)
			}
			if tc.status != http.StatusOK {
				assertErrorBody(t, a.header, a.body)
				return
			}
			p := decodePage(t, &http.Response{StatusCode: a.code}, a.body)
			if p.Data.Page != tc.page || p.Data.PageSize != tc.size {
				t.Errorf("page %d size %d, want %d and %d", p.Data.Page, p.Data.PageSize, tc.page, tc.size)
			}
		})
	}
}

// accessLine is the access log line of the request with this X-Request-ID.
func accessLine(t testing.TB, out *syncBuffer, requestID string) (map[string]any, bool) {
	t.Helper()
	for _, l := range out.logLines(t) {
		if l["msg"] == "request" && l["request_id"] == requestID {
			return l, true
		}
	}
	return nil, false
}

func TestAClientThatGivesUpIsA499AtInfoAndADatabaseTimeoutA500AtError(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	admin := newTestPool(t, dsn, nil)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	jwksURL := newJWKSServer(t, key.publicJWK(t, false)).URL
	token := key.token(t, validClaims("1001"))

	for _, tc := range []struct {
		name          string
		queryTimeout  string
		clientGivesUp bool
		status        int
		errorLine     bool // the cause at ERROR, beside the access line (always INFO)
	}{
		// The client leaves long before DB_QUERY_TIMEOUT: nothing failed on
		// this side, and the alert on 500s must not page anyone for it.
		{"a client that gives up while the table is locked", "30s", true, 499, false},
		{"a database that does not answer within DB_QUERY_TIMEOUT", "500ms", false, http.StatusInternalServerError, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := serviceEnv(dsn, jwksURL)
			env["DB_QUERY_TIMEOUT"] = tc.queryTimeout
			rs := startRun(t, env)
			waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })

			release := lockRecords(t, dsn)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			const requestID = "gives-up-1"
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, rs.base+"/3ds/my-records", nil)
			req.Header.Set("Authorization", "Bearer "+token)
			req.Header.Set("X-Request-ID", requestID)
			answered := make(chan answer, 1)
			go func() {
				resp, err := opsClient.Do(req)
				if err != nil {
					answered <- answer{err: err}
					return
				}
				defer resp.Body.Close()
				body, _ := io.ReadAll(resp.Body)
				answered <- answer{code: resp.StatusCode, header: resp.Header, body: body}
			}()
			if tc.clientGivesUp {
				waitFor(t, 10*time.Second, "the page query to wait on the lock", func() bool { return serviceBackends(t, admin, true) == 1 })
				cancel()
			}
			a := <-answered
			if tc.clientGivesUp && !errors.Is(a.err, context.Canceled) {
				t.Fatalf("the client's request ended with %d %v, want its own cancellation", a.code, a.err)
			}
			if !tc.clientGivesUp && a.code != tc.status {
				t.Fatalf("status %d %v, want %d", a.code, a.err, tc.status)
			}

			var line map[string]any
			waitFor(t, 10*time.Second, "the access log line", func() bool {
				var ok bool
				line, ok = accessLine(t, rs.stdout, requestID)
				return ok
			})
			if line["status"] != float64(tc.status) || line["level"] != "INFO" {
				t.Errorf("access line has status %v at %v, want %d at INFO: %v", line["status"], line["level"], tc.status, line)
			}
			var errorLines []map[string]any
			for _, l := range rs.stdout.logLines(t) {
				if l["level"] == "ERROR" {
					errorLines = append(errorLines, l)
				}
			}
			if tc.errorLine && (len(errorLines) != 1 || errorLines[0]["msg"] != "list records failed" || errorLines[0]["request_id"] != requestID) {
				t.Errorf("want one ERROR line \"list records failed\" for %s, got %v", requestID, errorLines)
			}
			if !tc.errorLine && len(errorLines) != 0 {
				t.Errorf("want no ERROR line, got %v", errorLines)
			}

			m := scrapeMetrics(t, rs.base)
			for _, code := range []int{499, http.StatusInternalServerError} {
				want := 0.0
				if code == tc.status {
					want = 1
				}
				got := 0.0
				if s, ok := m.find("threeds_http_requests_total", "route", "GET /3ds/my-records", "code", strconv.Itoa(code)); ok {
					got = s.value
				}
				if got != want {
					t.Errorf("threeds_http_requests_total{code=%q} = %v, want %v", strconv.Itoa(code), got, want)
				}
			}
			release()
			if err := rs.stop(t); err != nil {
				t.Errorf("run: %v", err)
			}
		})
	}
}

func TestMaxInFlightIsAPositiveIntegerOrTheStartFails(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  int // 0: a config error naming MAX_IN_FLIGHT
	}{
		{"", defaultMaxInFlight},
		{"1", 1},
		{"064", 64},
		{"1000000", 1000000},
		{"0", 0},
		{"-1", 0},
		{"+8", 0},
		{"8 ", 0},
		{"1.5", 0},
		{"1e3", 0},
		{"lots", 0},
		{"1000001", 0},
		{"99999999999999999999", 0},
	} {
		name := fmt.Sprintf("%q gives %d", tc.value, tc.want)
		if tc.want == 0 {
			name = fmt.Sprintf("%q is refused", tc.value)
		}
		t.Run(name, func(t *testing.T) {
			env := serviceEnv("postgres://u@127.0.0.1:5432/db", "https://idp.test/jwks")
			env["MAX_IN_FLIGHT"] = tc.value
			cfg, err := loadConfig(envFunc(env), false)
			if tc.want == 0 {
				var ce *configError
				if !errors.As(err, &ce) || ce.name != "MAX_IN_FLIGHT" {
					t.Fatalf("loadConfig = %v, want a configError naming MAX_IN_FLIGHT", err)
				}
				return
			}
			if err != nil || cfg.maxInFlight != tc.want {
				t.Fatalf("loadConfig: max in flight %v, err %v; want %d", cfg, err, tc.want)
			}
		})
	}
}

// TestBeyondMaxInFlightAnAPIRequestIsShedAtOnceAndProbesStillAnswer stalls
// the database with a table lock: the first MAX_IN_FLIGHT requests park
// (two on the pool's connections, one waiting for a connection), the next
// one is a 503 with Retry-After without waiting, and the probes and
// /metrics keep answering; once the lock goes, every parked request
// completes.
func TestBeyondMaxInFlightAnAPIRequestIsShedAtOnceAndProbesStillAnswer(t *testing.T) {
	const maxInFlight = 3
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	key := newTestKey(t, jwa.ES256, "ops", 0)
	env := serviceEnv(withPoolSize(t, dsn, 2), newJWKSServer(t, key.publicJWK(t, false)).URL)
	env["MAX_IN_FLIGHT"] = strconv.Itoa(maxInFlight)
	env["DB_QUERY_TIMEOUT"] = "60s" // the lock, not the deadline, decides
	admin := newTestPool(t, dsn, nil)
	rs := startRun(t, env)
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, rs.base+"/readyz", "").code == http.StatusOK })
	token := key.token(t, validClaims("1001"))
	api := rs.base + "/3ds/my-records"

	release := lockRecords(t, dsn)
	parked := make(chan answer, maxInFlight)
	for range maxInFlight {
		go func() { parked <- fetch(opsClient, http.MethodGet, api, token, "") }()
	}
	waitFor(t, 10*time.Second, "MAX_IN_FLIGHT requests to park", func() bool {
		return scrapeMetrics(t, rs.base).value(t, "threeds_http_in_flight") == maxInFlight &&
			serviceBackends(t, admin, true) == 2
	})

	// A fresh connection, as a new client's would be; the bound is
	// generous (a parked request waits for the lock, i.e. forever).
	shed := fetch(freshConnClient, http.MethodGet, api, token, "over-the-limit")
	if shed.err != nil || shed.code != http.StatusServiceUnavailable {
		t.Fatalf("request %d: %d %v %s, want a 503 at once", maxInFlight+1, shed.code, shed.err, shed.body)
	}
	assertErrorBody(t, shed.header, shed.body)
	if s, err := strconv.Atoi(shed.header.Get("Retry-After")); err != nil || s < 1 {
		t.Errorf("Retry-After = %q, want a number of seconds", shed.header.Get("Retry-After"))
	}
	t.Logf("shed after %s", shed.took)

	for _, path := range []string{"/healthz", "/readyz", "/metrics", "/openapi.json"} {
		for range maxInFlight + 2 {
			if a := fetch(freshConnClient, http.MethodGet, rs.base+path, "", ""); a.err != nil || a.code != http.StatusOK {
				t.Errorf("%s while the API is full: %d %v %s", path, a.code, a.err, a.body)
			}
		}
	}
	select {
	case a := <-parked:
		t.Fatalf("a parked request ended while the table was locked: %d %v %s", a.code, a.err, a.body)
	default:
	}

	release()
	for range maxInFlight {
		if a := <-parked; a.err != nil || a.code != http.StatusOK || !bytes.Contains(a.body, []byte(opsPasscode)) {
			t.Errorf("a parked request after the lock was released: %d %v %s", a.code, a.err, a.body)
		}
	}
	if a := mustFetch(t, opsClient, api, token); a.code != http.StatusOK {
		t.Errorf("after the stall: %d %s", a.code, a.body)
	}

	m := scrapeMetrics(t, rs.base)
	for _, c := range []struct {
		name  string
		kv    []string
		value float64
	}{
		{"threeds_http_requests_total", []string{"route", "GET /3ds/my-records", "code", "503"}, 1},
		{"threeds_http_requests_total", []string{"route", "GET /3ds/my-records", "code", "200"}, maxInFlight + 1},
		{"threeds_http_shed_total", nil, 1},
		{"threeds_http_in_flight", nil, 0},
		{"threeds_http_max_in_flight", nil, maxInFlight},
	} {
		if got := m.value(t, c.name, c.kv...); got != c.value {
			t.Errorf("%s%v = %v, want %v", c.name, c.kv, got, c.value)
		}
	}
	// Access lines are written in batches (accesslog.go), within a second.
	var line map[string]any
	waitFor(t, 10*time.Second, "the shed request's access line", func() bool {
		var ok bool
		line, ok = accessLine(t, rs.stdout, "over-the-limit")
		return ok
	})
	if line["status"] != float64(http.StatusServiceUnavailable) || line["level"] != "INFO" {
		t.Errorf("access line of the shed request: %v", line)
	}
}
