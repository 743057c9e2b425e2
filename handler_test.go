package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
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

// do sends one request; token "" sends no Authorization header.
func (s *testService) do(t testing.TB, method, target, token string, header ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, s.URL+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
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
