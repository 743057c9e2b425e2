package main

import (
	"context"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Record is one row as the API shows it (already formatted for JSON).
type Record struct {
	ID           int64  `json:"id"`
	Passcode     string `json:"passcode"`
	Amount       string `json:"amount"`
	Currency     string `json:"currency"`
	MerchantName string `json:"merchant_name"`
	ExpiresAfter int64  `json:"expires_after"`
	ReceivedAt   string `json:"received_at"` // RFC 3339, UTC, whole seconds, "Z"
}

// Store reads threeds_records. It never writes rows: the card-issuer
// integration owns them.
type Store struct {
	pool    *pgxpool.Pool
	timeout time.Duration

	// inFlight counts page queries under way; less the pool's acquired
	// connections, it is how many wait for one (pgxpool does not say).
	inFlight atomic.Int64
}

// NewStore returns a Store whose every call is bounded by queryTimeout
// (DB_QUERY_TIMEOUT); zero or negative leaves only the caller's deadline.
func NewStore(pool *pgxpool.Pool, queryTimeout time.Duration) *Store {
	return &Store{pool: pool, timeout: queryTimeout}
}

// listRecordsSQL fetches one page and the user's total in a single round trip.
// The window count is evaluated before LIMIT/OFFSET, so every returned row
// carries the full total. amount is cast to text so its stored scale reaches
// formatAmount untouched; every column here is in threeds_records_user_page_idx
// so the page can be an index-only scan.
const listRecordsSQL = `
SELECT id,
       passcode,
       amount::text,
       currency,
       COALESCE(merchant_name, ''),
       expires_after,
       received_at,
       count(*) OVER () AS total
  FROM threeds_records
 WHERE user_id = $1
 ORDER BY received_at DESC, id DESC
 LIMIT $2 OFFSET $3`

// countRecordsSQL is only needed past the last page, where no row comes back
// to carry the window count.
const countRecordsSQL = `SELECT count(*) FROM threeds_records WHERE user_id = $1`

// maxPrealloc bounds the up-front allocation so a caller passing an unchecked
// page size cannot make us reserve memory for rows that do not exist.
const maxPrealloc = 100

// ListRecords returns the page (1-based) of userID's records, newest first, and the
// user's exact total. records is never nil (empty slice past the end).
func (s *Store) ListRecords(ctx context.Context, userID int64, page, pageSize int) (records []Record, total int64, err error) {
	if page < 1 || pageSize < 1 {
		return nil, 0, fmt.Errorf("list records: page %d and page size %d must both be at least 1", page, pageSize)
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)

	records = make([]Record, 0, min(pageSize, maxPrealloc))
	// An offset that overflows int64 is past the end of any table, so it
	// takes the past-the-end path below instead of wrapping around.
	if offset, ok := pageOffset(page, pageSize); ok {
		records, total, err = s.queryPage(ctx, records, userID, int64(pageSize), offset)
		if err != nil {
			return nil, 0, fmt.Errorf("list records: %w", err)
		}
	}
	if len(records) > 0 || page == 1 {
		return records, total, nil
	}
	if err := s.pool.QueryRow(ctx, countRecordsSQL, userID).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("list records: count: %w", err)
	}
	return records, total, nil
}

func (s *Store) queryPage(ctx context.Context, dst []Record, userID, limit, offset int64) ([]Record, int64, error) {
	rows, err := s.pool.Query(ctx, listRecordsSQL, userID, limit, offset)
	if err != nil {
		return nil, 0, err
	}
	defer rows.Close()

	// The scan targets and the []any that points at them escape to the heap
	// through the pgx.Rows interface: made once per page, they cost two
	// allocations, where variables and a Scan(&a, &b, ...) call cost eight
	// plus one per row.
	var row struct {
		total, id, expiresAfter              int64
		passcode, amount, currency, merchant string
		receivedAt                           time.Time
	}
	dest := []any{&row.id, &row.passcode, &row.amount, &row.currency, &row.merchant, &row.expiresAfter, &row.receivedAt, &row.total}
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return nil, 0, err
		}
		dst = append(dst, newRecord(row.id, row.passcode, row.amount, row.currency, row.merchant, row.expiresAfter, row.receivedAt))
	}
	if err := rows.Err(); err != nil {
		return nil, 0, err
	}
	return dst, row.total, nil
}

// newRecord formats one row's columns for the API: the list page and the
// event stream show a record the same way.
func newRecord(id int64, passcode, amount, currency, merchant string, expiresAfter int64, receivedAt time.Time) Record {
	return Record{
		ID:           id,
		Passcode:     passcode,
		Amount:       formatAmount(amount, currency),
		Currency:     strings.ToUpper(currency),
		MerchantName: merchant,
		ExpiresAfter: expiresAfter,
		ReceivedAt:   formatReceivedAt(receivedAt),
	}
}

// pageOffset computes (page-1)*pageSize in int64 so that page 2147483647 works
// where int is 32 bits; ok is false when even int64 would overflow.
func pageOffset(page, pageSize int) (offset int64, ok bool) {
	skipped, size := int64(page)-1, int64(pageSize)
	if skipped > math.MaxInt64/size {
		return 0, false
	}
	return skipped * size, true
}

// saturated reports whether every pool connection is in use by a query.
func (s *Store) saturated() bool {
	st := s.pool.Stat()
	return st.AcquiredConns() >= st.MaxConns()
}

// Ping makes one SELECT 1 round trip, so readiness proves that queries run,
// not merely that a TCP connection can be opened.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	var one int
	if err := s.pool.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

func (s *Store) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if s.timeout > 0 {
		return context.WithTimeout(ctx, s.timeout)
	}
	return ctx, func() {}
}

// receivedAtLen is the length of "2006-01-02T15:04:05Z". The layout is
// time.RFC3339, which for a UTC time with no fraction prints exactly that,
// and which the time package formats on a fast path.
const receivedAtLen = len("2006-01-02T15:04:05Z")

// formatReceivedAt renders an instant in UTC whole seconds. pgx returns
// timestamptz in time.Local, so without UTC() the process TZ would leak out
// under a "Z" that lies about it.
func formatReceivedAt(t time.Time) string {
	var buf [receivedAtLen]byte
	return string(t.UTC().Truncate(time.Second).AppendFormat(buf[:0], time.RFC3339))
}

// formatAmount renders PostgreSQL's text form of a NUMERIC with the ISO 4217
// minor-unit digits of currency: short fractions are zero-padded, trailing
// zeros beyond the minor unit are trimmed, and a non-zero stored digit is never
// dropped (an amount must never be shown rounded). It works on the string
// alone because float64 cannot hold every NUMERIC exactly. Anything that is not
// a plain decimal (NaN, Infinity) is returned as stored.
func formatAmount(numeric string, currency string) string {
	digits := minorUnits(currency)

	body, neg := strings.CutPrefix(numeric, "-")
	intPart, frac, hasPoint := strings.Cut(body, ".")
	if !isDigits(intPart) || (hasPoint && !isDigits(frac)) {
		return numeric
	}

	keep := len(frac)
	for keep > digits && frac[keep-1] == '0' {
		keep--
	}
	trimmed := len(frac) - keep
	frac = frac[:keep]
	// "-0.00" would read as a refund of nothing; PostgreSQL never prints it,
	// but callers of this function might.
	dropSign := neg && isZeros(intPart) && isZeros(frac)

	if len(frac) >= digits && !dropSign {
		// Nothing to pad, so the answer is a prefix of the input: the common
		// cases (stored at the currency's scale, or above it) cost nothing.
		end := len(numeric) - trimmed
		if hasPoint && keep == 0 {
			end-- // the point itself
		}
		return numeric[:end]
	}

	out := make([]byte, 0, len(numeric)+1+digits)
	if neg && !dropSign {
		out = append(out, '-')
	}
	out = append(out, intPart...)
	if len(frac) > 0 || digits > 0 {
		out = append(out, '.')
		out = append(out, frac...)
		for i := len(frac); i < digits; i++ {
			out = append(out, '0')
		}
	}
	return string(out)
}

// minorUnits returns the ISO 4217 exponent of code, matched case-insensitively
// without allocating; codes not listed (and unknown codes) use 2.
func minorUnits(code string) int {
	if len(code) != 3 {
		return 2
	}
	var upper [3]byte
	for i := range upper {
		c := code[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		upper[i] = c
	}
	switch string(upper[:]) {
	case "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG",
		"RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF":
		return 0
	case "BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND":
		return 3
	case "CLF", "UYW":
		return 4
	}
	return 2
}

// isDigits reports whether s is a non-empty run of ASCII digits.
func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func isZeros(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '0' {
			return false
		}
	}
	return true
}
