package main

// Micro benchmarks of the hot path: go test -bench . -benchmem -run '^$'
// (they need DATABASE_URL only for BenchmarkHandlerStack; see `make test`).
// formatAmount's benchmark lives beside its tests in store_test.go.

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
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
