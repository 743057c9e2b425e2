package main

// Micro benchmarks of the hot path: go test -bench . -benchmem -run '^$'
// (they need DATABASE_URL only for BenchmarkHandlerStack; see `make test`).
// formatAmount's benchmark lives beside its tests in store_test.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// benchPage is a realistic full page: 20 records, a few merchants that need
// escaping, one NULL merchant.
func benchPage() recordsPage {
	recs := make([]Record, 20)
	for i := range recs {
		recs[i] = Record{
			ID:           int64(9_000_000 + i),
			Passcode:     "0" + strconv.Itoa(12345+i),
			Amount:       strconv.Itoa(10+i) + ".50",
			Currency:     "USD",
			MerchantName: "Merchant " + strconv.Itoa(i),
			ExpiresAfter: 300,
			ReceivedAt:   "2026-01-20T10:30:" + strconv.Itoa(10+i) + "Z",
		}
	}
	recs[3].MerchantName = "M&S <Food>"
	recs[7].MerchantName = ""
	return recordsPage{Page: 1, PageSize: 20, Total: 50, TotalPages: 3, Records: recs}
}

// discardWriter is a ResponseWriter that keeps nothing, so the benchmark
// measures the encoder and headers, not a recorder's buffer growth.
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) WriteHeader(int)             {}
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }

func BenchmarkEncodePage(b *testing.B) {
	page := benchPage()
	b.Run("json.Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := json.Marshal(successBody{Status: "success", Data: page}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("marshalBody", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := marshalBody(successBody{Status: "success", Data: page}); err != nil {
				b.Fatal(err)
			}
		}
	})
	// writeJSON is exactly what the handler calls for the 200 page.
	b.Run("writeJSON", func(b *testing.B) {
		r := httptest.NewRequest(http.MethodGet, "/3ds/my-records", nil)
		r = r.WithContext(context.WithValue(r.Context(), infoKey{}, &requestInfo{start: time.Now()}))
		w := &discardWriter{h: make(http.Header)}
		b.ReportAllocs()
		for b.Loop() {
			writeJSON(w, r, http.StatusOK, successBody{Status: "success", Data: page})
		}
	})
}

func BenchmarkParsePaging(b *testing.B) {
	for _, q := range []string{"", "page=3&page_size=20"} {
		b.Run(strconv.Quote(q), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := parsePaging(q); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(strconv.Quote(q)+"/url.ParseQuery", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := parseAnyPaging(q); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkFormatReceivedAt(b *testing.B) {
	// pgx hands timestamptz back in time.Local with sub-second digits.
	t := time.Date(2026, 1, 20, 18, 30, 0, 750_000_000, time.FixedZone("CST", 8*3600))
	b.ReportAllocs()
	for b.Loop() {
		formatReceivedAt(t)
	}
}

// BenchmarkVerify is one token check through the real Verifier against a
// JWKS served over HTTP, for the algorithms most identity providers use:
// "full" is a first sight of the token (signature, claims), "cached" a token
// seen before (tokencache.go).
func BenchmarkVerify(b *testing.B) {
	for i, alg := range []jwa.SignatureAlgorithm{jwa.RS256, jwa.ES256} {
		for _, mode := range []string{"full", "cached"} {
			b.Run(alg.String()+"/"+mode, func(b *testing.B) {
				key := newTestKey(b, alg, "bench-"+alg.String(), i)
				v := newTestVerifier(b, testAuthConfig(newJWKSServer(b, key.publicJWK(b, false)).URL))
				if mode == "full" {
					v.tokens = nil
				}
				token := key.token(b, validClaims("1001"))
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					if uid, err := v.Verify(ctx, token); err != nil || uid != 1001 {
						b.Fatalf("Verify = %d, %v", uid, err)
					}
				}
			})
		}
	}
}

// BenchmarkHandlerStack is one GET /3ds/my-records through the whole server
// (request id, access log, metrics, token check, PostgreSQL, JSON), in
// process: what a request costs the service apart from net/http's own
// connection handling. The database round trip is in it; its CPU is
// PostgreSQL's, on the other core.
func BenchmarkHandlerStack(b *testing.B) {
	if os.Getenv("DATABASE_URL") == "" {
		b.Skip("DATABASE_URL is not set")
	}
	store, pool := newTestStore(b)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
SELECT 1001, lpad(n::text, 6, '0'), n * 1.25, 'USD', 'Merchant ' || n, 300, timestamptz '2026-01-01Z' + n * interval '1 hour'
  FROM generate_series(1, 50) AS n`); err != nil {
		b.Fatal(err)
	}
	if _, err := pool.Exec(ctx, "VACUUM (ANALYZE) threeds_records"); err != nil {
		b.Fatal(err)
	}
	key := newTestKey(b, jwa.RS256, "stack", 0)
	v := newTestVerifier(b, testAuthConfig(newJWKSServer(b, key.publicJWK(b, false)).URL))
	srv := newServer(store, v, nil, discardLogger())
	auth := "Bearer " + key.token(b, validClaims("1001"))
	for _, page := range []string{"1", "3"} {
		b.Run("page"+page, func(b *testing.B) {
			target := "/3ds/my-records?page=" + page + "&page_size=20"
			b.ReportAllocs()
			for b.Loop() {
				r := httptest.NewRequest(http.MethodGet, target, nil)
				r.Header.Set("Authorization", auth)
				w := httptest.NewRecorder()
				srv.ServeHTTP(w, r)
				if w.Code != http.StatusOK {
					b.Fatalf("status %d: %s", w.Code, w.Body)
				}
			}
		})
	}
}

// TestBenchUsesTheServiceSQL keeps `make bench` honest: its direct-SQL side
// must send exactly the query the store sends, or the ratio compares the
// service with something else.
func TestBenchUsesTheServiceSQL(t *testing.T) {
	src, err := os.ReadFile("bench/sql.go")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(src), "const pageSQL = `"+listRecordsSQL+"`") {
		t.Fatal("bench/sql.go's pageSQL differs from store.go's listRecordsSQL; copy it over")
	}
}

// TestServeForProfile is the service itself, run from its test binary so that
// `go test -c` plus -test.cpuprofile profiles it under `make bench`'s load
// without a profiling endpoint in the release binary
// (BENCH_CPUPROFILE=FILE make bench; bench/run.sh sets it up). It serves, from
// the environment, exactly as main does, until SIGTERM; the profile is
// written when the test returns. Skipped unless THREEDS_SERVE_FOR_PROFILE=1.
func TestServeForProfile(t *testing.T) {
	if os.Getenv("THREEDS_SERVE_FOR_PROFILE") != "1" {
		t.Skip("THREEDS_SERVE_FOR_PROFILE is not 1; bench/run.sh sets it for BENCH_CPUPROFILE")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, nil, os.Getenv, os.Stdout, os.Stderr); err != nil {
		t.Fatal(err)
	}
}

// appendMillisFloat is what serverTiming used before appendMillis.
func appendMillisFloat(b []byte, d time.Duration) []byte {
	return strconv.AppendFloat(b, float64(d.Nanoseconds())/1e6, 'f', 3, 64)
}

func TestServerTimingDurationsHaveTheDigitsAppendFloatGave(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{0, "0.000"},
		{499, "0.000"},
		{501, "0.001"},
		{1500, "0.002"}, // a tie rounds up
		{12_345_678, "12.346"},
		{3 * time.Second, "3000.000"},
		{-2 * time.Millisecond, "-2.000"},
	}
	for _, tt := range tests {
		if got := string(appendMillis(nil, tt.d)); got != tt.want {
			t.Errorf("appendMillis(%d) = %s, want %s", tt.d, got, tt.want)
		}
	}
	// Away from exact ties (x.5 µs), the digits are AppendFloat's.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 100_000 {
		d := time.Duration(rng.Int64N(int64(10 * time.Minute)))
		if d%1000 == 500 {
			continue
		}
		if got, want := string(appendMillis(nil, d)), string(appendMillisFloat(nil, d)); got != want {
			t.Fatalf("appendMillis(%d) = %s, AppendFloat %s", d, got, want)
		}
	}
}

func BenchmarkServerTimingDuration(b *testing.B) {
	d := 1234567 * time.Nanosecond
	buf := make([]byte, 0, 32)
	b.Run("AppendFloat", func(b *testing.B) {
		for b.Loop() {
			buf = appendMillisFloat(buf[:0], d)
		}
	})
	b.Run("appendMillis", func(b *testing.B) {
		for b.Loop() {
			buf = appendMillis(buf[:0], d)
		}
	})
}

// pagingQueries are raw queries built from the pieces that matter to
// parsePaging's two paths.
func pagingQueries(rng *rand.Rand, n int) []string {
	pieces := []string{"page", "page_size", "=", "&", "1", "3", "0", "20", "100", "101", "2147483647", "99999999999999999999",
		"", ";", "%32", "+", "x", "-1", "page=2", "page_size=50", "&&", "pa%67e"}
	out := []string{"", "page=3&page_size=20", "page_size=20&page=3", "page=3&page=3", "page=&page_size=", "page=1&"}
	for range n {
		var b strings.Builder
		for range rng.IntN(8) {
			b.WriteString(pieces[rng.IntN(len(pieces))])
		}
		out = append(out, b.String())
	}
	return out
}

func TestThePlainPagingPathAgreesWithTheGeneralOne(t *testing.T) {
	plain := 0
	for _, q := range pagingQueries(rand.New(rand.NewPCG(5, 6)), 200_000) {
		p1, s1, isPlain, err1 := parsePlainPaging(q)
		if !isPlain {
			continue
		}
		plain++
		p2, s2, err2 := parseAnyPaging(q)
		if p1 != p2 || s1 != s2 || fmt.Sprint(err1) != fmt.Sprint(err2) {
			t.Fatalf("%q: plain path %d, %d, %v; general path %d, %d, %v", q, p1, s1, err1, p2, s2, err2)
		}
	}
	if plain < 1000 {
		t.Fatalf("only %d queries took the plain path", plain)
	}
	for _, q := range []string{"page=3&page_size=20", "page_size=20", "", "page=0", "page=99999999999999999999"} {
		if _, _, isPlain, _ := parsePlainPaging(q); !isPlain {
			t.Errorf("%q should take the plain path", q)
		}
	}
	for _, q := range []string{"page=1&page=1", "page=%32", "page=+1", "&page=1", "page", "page=1;x", "x=1"} {
		if _, _, isPlain, _ := parsePlainPaging(q); isPlain {
			t.Errorf("%q should take the general path", q)
		}
	}
}

func FuzzThePlainPagingPathAgreesWithTheGeneralOne(f *testing.F) {
	for _, q := range pagingQueries(rand.New(rand.NewPCG(7, 8)), 20) {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, q string) {
		p1, s1, isPlain, err1 := parsePlainPaging(q)
		if !isPlain {
			return
		}
		if p2, s2, err2 := parseAnyPaging(q); p1 != p2 || s1 != s2 || fmt.Sprint(err1) != fmt.Sprint(err2) {
			t.Fatalf("%q: plain path %d, %d, %v; general path %d, %d, %v", q, p1, s1, err1, p2, s2, err2)
		}
	})
}
