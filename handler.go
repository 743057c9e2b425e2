package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const (
	defaultPageSize = 20
	maxPageSize     = 100
	maxPage         = 1<<31 - 1

	// statusClientClosedRequest is logged and counted, never sent: the
	// client is gone.
	statusClientClosedRequest = 499
)

// server is the whole HTTP surface. It is an http.Handler; draining flips
// readiness when shutdown starts.
type server struct {
	mux      *http.ServeMux
	store    *Store
	verifier *Verifier
	hub      *hub // live updates; nil answers the event stream with 503
	logger   *slog.Logger
	access   *slog.Logger // the access log: buffered, see accesslog.go
	metrics  *metrics
	draining atomic.Bool
	// limit is MAX_IN_FLIGHT, shared by the API routes.
	limit *inFlightLimit
}

// newServer registers every route in one place.
func newServer(store *Store, verifier *Verifier, hub *hub, logger *slog.Logger, opts ...serverOption) *server {
	// Error lines logged with a request's context carry its trace_id; the
	// access log adds its own (logRequest) on its fast path.
	s := &server{mux: http.NewServeMux(), store: store, verifier: verifier, hub: hub, logger: withTraceIDs(logger),
		access: slog.New(accessHandler(logger)), limit: newInFlightLimit(defaultMaxInFlight)}
	for _, o := range opts {
		o(s)
	}
	s.metrics = newMetrics(store, verifier)
	s.metrics.limit = s.limit
	s.metrics.hub = hub
	s.metrics.notReady = s.notReady
	// The token is checked before the limit takes a place: a token that
	// waits for a forced key refresh (an unknown kid) then holds no place a
	// valid request needs (docs/decisions.md, "Unknown kids: 1 s, 1024
	// waiters, no MAX_IN_FLIGHT place"). Only the API routes get the limit
	// (see inFlightLimit.wrap).
	s.mux.Handle("GET /3ds/my-records", verifier.Middleware(s.limit.wrap(handleMyRecords(store, s.logger))))
	// Not under MAX_IN_FLIGHT: streams are long-lived and have limits of
	// their own (STREAMS_MAX, STREAMS_PER_USER).
	s.mux.Handle("GET /3ds/my-records/events", s.eventsHandler())
	s.mux.HandleFunc("GET /healthz", handleHealthz)
	s.mux.HandleFunc("GET /readyz", s.handleReadyz)
	s.mux.Handle("GET /metrics", s.metrics)
	s.mux.HandleFunc("GET /openapi.json", handleOpenAPI)
	return s
}

// requestInfo travels in the context so that the access log, the metrics and
// the Server-Timing header all see the same figures.
type requestInfo struct {
	start     time.Time
	requestID string
	// traceID is the trace id of a valid W3C traceparent header ("" when
	// none was sent or it was malformed): logged so a trace finds its line.
	traceID string
	userID  int64
	authDur time.Duration
	dbDur   time.Duration
	// authReject is why a token was refused, so a support engineer can
	// explain a 401 from the access log alone.
	authReject string
}

type infoKey struct{}

func requestInfoFrom(ctx context.Context) *requestInfo {
	if info, ok := ctx.Value(infoKey{}).(*requestInfo); ok {
		return info
	}
	return &requestInfo{start: time.Now()}
}

// eventsRoute is the event stream's pattern: its 200 is a stream, timed
// apart from requests (see metrics.streamStarted).
const eventsRoute = "GET /3ds/my-records/events"

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// "X-Request-Id" is how net/http spells X-Request-ID in its maps (the
	// wire spelling does not matter to HTTP): written so, the key is not
	// rebuilt and allocated twice on every request.
	info := &requestInfo{start: time.Now(), requestID: requestID(r.Header.Get("X-Request-Id")),
		traceID: traceID(r.Header["Traceparent"])}
	w.Header().Set("X-Request-Id", info.requestID)
	r = r.WithContext(context.WithValue(r.Context(), infoKey{}, info))
	rec := &statusRecorder{ResponseWriter: w}

	h, route := s.route(r)
	if route == eventsRoute && r.Method == http.MethodGet {
		rec.streams = s.metrics
	}
	h.ServeHTTP(rec, r)

	if rec.status == 0 {
		rec.status = http.StatusOK
		if errors.Is(r.Context().Err(), context.Canceled) {
			// A handler that answered nothing because its client went
			// away: nginx's 499, so that dashboards and the alert on 500s
			// tell a user closing the app from a failure here.
			rec.status = statusClientClosedRequest
		}
	}
	elapsed := time.Since(info.start)
	if rec.streamed {
		s.metrics.streamEnded(elapsed)
	} else {
		s.metrics.observe(route, rec.status, elapsed)
	}
	s.logRequest(r, route, rec, elapsed, info)
}

// route is the handler for r and the label its metrics and log line carry:
// the matched pattern, the path alone for a method the path does not allow
// (its 405), "unmatched" for anything else.
func (s *server) route(r *http.Request) (http.Handler, string) {
	h, route := s.mux.Handler(r)
	if route != "" && path.Clean(r.URL.Path) == r.URL.Path {
		return h, route
	}
	// The mux's own 404 and 405 answers are plain text, and for an unclean
	// path it answers a redirect under the clean route's name; all of them
	// are rewritten as JSON errors, keeping the Allow header.
	route = "unmatched"
	if path.Clean(r.URL.Path) == r.URL.Path {
		// A 405: every route is a GET, so the path's route is the one a
		// GET would match. Only this rare answer pays for the second lookup.
		get := *r
		get.Method = http.MethodGet
		if _, p := s.mux.Handler(&get); p != "" {
			_, route, _ = strings.Cut(p, " ")
			if p == eventsRoute {
				// The stream's own 405: only GET (the mux allows HEAD).
				return http.HandlerFunc(refuseMethod), route
			}
		}
	}
	return jsonFallback(h), route
}

// logRequest writes the request's access line.
func (s *server) logRequest(r *http.Request, route string, rec *statusRecorder, elapsed time.Duration, info *requestInfo) {
	// Room for the optional attributes below, so appending them does not
	// copy the slice.
	attrs := make([]slog.Attr, 0, 10)
	attrs = append(attrs,
		slog.String("method", r.Method),
		slog.String("route", route),
		slog.String("path", r.URL.Path),
		slog.Int("status", rec.status),
		slog.Int64("bytes", rec.bytes),
		slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
		slog.String("request_id", info.requestID),
	)
	if info.traceID != "" {
		attrs = append(attrs, slog.String("trace_id", info.traceID))
	}
	if info.userID != 0 {
		attrs = append(attrs, slog.Int64("user_id", info.userID))
	}
	if info.authReject != "" {
		attrs = append(attrs, slog.String("auth_reject", info.authReject))
	}
	s.logAccess(r.Context(), attrs)
}

// requestID keeps a caller's id when it is short and printable, so a
// support engineer can follow one request through gateway and service logs;
// anything else is replaced, never echoed (header and log injection).
func requestID(given string) string {
	if given != "" && len(given) <= 128 {
		ok := true
		for i := 0; i < len(given); i++ {
			c := given[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':') {
				ok = false
				break
			}
		}
		if ok {
			return given
		}
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
	// streams is set on the event stream's route: its 200 starts a stream,
	// counted then (streamed) rather than when the stream ends.
	streams  *metrics
	streamed bool
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.setStatus(code)
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.setStatus(http.StatusOK)
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *statusRecorder) setStatus(code int) {
	r.status = code
	if r.streams != nil && code == http.StatusOK {
		r.streamed = true
		r.streams.streamStarted(eventsRoute)
	}
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// jsonFallback runs the mux's fallback handler but replaces its body.
func jsonFallback(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&fallbackWriter{ResponseWriter: w, r: r}, r)
	})
}

type fallbackWriter struct {
	http.ResponseWriter
	r       *http.Request
	written bool
}

func (f *fallbackWriter) WriteHeader(code int) {
	if f.written {
		return
	}
	f.written = true
	h := f.ResponseWriter.Header()
	h.Del("X-Content-Type-Options")
	switch code {
	case http.StatusMethodNotAllowed:
		writeError(f.ResponseWriter, f.r, code, "method_not_allowed",
			f.r.Method+" is not allowed here; allowed: "+h.Get("Allow"))
	default:
		// The mux also redirects unclean paths (//3ds/my-records,
		// /3ds/./my-records) to the clean one. An API has exactly one
		// spelling of each path, so those are unknown paths too.
		h.Del("Location")
		writeError(f.ResponseWriter, f.r, http.StatusNotFound, "not_found", "no such endpoint: "+f.r.URL.Path)
	}
}

func (f *fallbackWriter) Write(b []byte) (int, error) {
	if !f.written {
		f.WriteHeader(http.StatusOK)
	}
	return len(b), nil
}

// writeJSON is the one place a response body is written: every answer gets
// the same headers. Passcodes are live secrets, so nothing may be cached.
func writeJSON(w http.ResponseWriter, r *http.Request, status int, body any) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Server-Timing", serverTiming(requestInfoFrom(r.Context())))
	h.Del("Content-Length")
	// marshalBody: json.Marshal's bytes, without reflection for the page (encode.go).
	buf, err := marshalBody(body)
	if err != nil {
		// Only our own types reach here; a failure is a programming error.
		status = http.StatusInternalServerError
		buf = []byte(`{"error":"internal_error","details":"the response could not be encoded"}`)
	}
	buf = append(buf, '\n')
	h.Set("Content-Length", strconv.Itoa(len(buf)))
	w.WriteHeader(status)
	_, _ = w.Write(buf)
}

type errorBody struct {
	Error   string `json:"error"`
	Details string `json:"details"`
}

// writeError writes {error, details}. details is for a person reading curl
// output; it must never carry SQL, paths, tokens or passcodes.
func writeError(w http.ResponseWriter, r *http.Request, status int, code, details string) {
	writeJSON(w, r, status, errorBody{Error: code, Details: details})
}

func serverTiming(info *requestInfo) string {
	b := make([]byte, 0, 64)
	b = append(b, "auth;dur="...)
	b = appendMillis(b, info.authDur)
	b = append(b, ", db;dur="...)
	b = appendMillis(b, info.dbDur)
	b = append(b, ", total;dur="...)
	b = appendMillis(b, time.Since(info.start))
	return string(b)
}

// appendMillis appends d in milliseconds with three decimals, i.e. in whole
// microseconds rounded half up, with integer arithmetic: what
// strconv.AppendFloat(ms, 'f', 3, 64) printed at a quarter of the cost (it
// is on every answer), the same digits but where d ends in exactly 500 ns.
func appendMillis(b []byte, d time.Duration) []byte {
	if d < 0 {
		b = append(b, '-')
		d = -d
	}
	us := int64((d + 500) / time.Microsecond)
	b = strconv.AppendInt(b, us/1000, 10)
	frac := us % 1000
	return append(b, '.', byte('0'+frac/100), byte('0'+frac/10%10), byte('0'+frac%10))
}

type recordsPage struct {
	Page       int      `json:"page"`
	PageSize   int      `json:"page_size"`
	Total      int64    `json:"total"`
	TotalPages int64    `json:"total_pages"`
	Records    []Record `json:"records"`
}

type successBody struct {
	Status string `json:"status"`
	Data   any    `json:"data"`
}

func handleMyRecords(store *Store, logger *slog.Logger) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		page, pageSize, err := parsePaging(r.URL.RawQuery)
		if err != nil {
			writeError(w, r, http.StatusBadRequest, "invalid_parameter", err.Error())
			return
		}
		userID, ok := userFromContext(r.Context())
		if !ok {
			// The route is always wrapped by the verifier; reaching here
			// without a user is a wiring bug, and must fail closed.
			writeError(w, r, http.StatusUnauthorized, "missing_token", "send an Authorization: Bearer <token> header")
			return
		}
		info := requestInfoFrom(r.Context())
		start := time.Now()
		records, total, err := store.ListRecords(r.Context(), userID, page, pageSize)
		info.dbDur = time.Since(start)
		if err != nil {
			if errors.Is(r.Context().Err(), context.Canceled) {
				// The client (or the gateway) gave up and closed the
				// connection, which cancelled the query: not a server error,
				// and nobody is left to read an answer. ServeHTTP logs and
				// counts it as 499. A DB_QUERY_TIMEOUT is a deadline on the
				// store's own context, so it still gets the 500 below.
				return
			}
			logger.LogAttrs(r.Context(), slog.LevelError, "list records failed",
				slog.String("request_id", info.requestID), slog.String("error", err.Error()))
			writeError(w, r, http.StatusInternalServerError, "internal_error",
				"the records could not be loaded; try again shortly")
			return
		}
		writeJSON(w, r, http.StatusOK, successBody{Status: "success", Data: recordsPage{
			Page:       page,
			PageSize:   pageSize,
			Total:      total,
			TotalPages: (total + int64(pageSize) - 1) / int64(pageSize),
			Records:    records,
		}})
	}
}

// parsePaging reads page and page_size from the raw query. It is strict on
// purpose: a value that is not a plain decimal integer in range is a 400,
// never a clamp or a default, so a client bug shows up at once.
func parsePaging(rawQuery string) (page, pageSize int, err error) {
	if page, pageSize, plain, err := parsePlainPaging(rawQuery); plain {
		return page, pageSize, err
	}
	return parseAnyPaging(rawQuery)
}

// parseAnyPaging is parsePaging for every query, through url.ParseQuery.
func parseAnyPaging(rawQuery string) (page, pageSize int, err error) {
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return 0, 0, errors.New("the query string is malformed")
	}
	page, err = intParam(q, "page", 1, 1, maxPage)
	if err != nil {
		return 0, 0, err
	}
	pageSize, err = intParam(q, "page_size", defaultPageSize, 1, maxPageSize)
	if err != nil {
		return 0, 0, err
	}
	return page, pageSize, nil
}

// parsePlainPaging is parsePaging for the query clients send: nothing but
// page=<digits> and page_size=<digits>, each at most once, no escapes, so
// url.ParseQuery (a map and its slices on every request) would decode
// nothing and find no duplicate. plain is false for any other query, which
// takes the general path; FuzzQueryString holds both to the contract.
func parsePlainPaging(raw string) (page, pageSize int, plain bool, err error) {
	var pageVal, sizeVal string
	var havePage, haveSize bool
	for raw != "" {
		var part string
		part, raw, _ = strings.Cut(raw, "&")
		k, v, found := strings.Cut(part, "=")
		if !found || !isDecimal(v) {
			return 0, 0, false, nil
		}
		switch {
		case k == "page" && !havePage:
			pageVal, havePage = v, true
		case k == "page_size" && !haveSize:
			sizeVal, haveSize = v, true
		default:
			return 0, 0, false, nil
		}
	}
	if page, err = intValue("page", pageVal, 1, 1, maxPage); err != nil {
		return 0, 0, true, err
	}
	if pageSize, err = intValue("page_size", sizeVal, defaultPageSize, 1, maxPageSize); err != nil {
		return 0, 0, true, err
	}
	return page, pageSize, true, nil
}

// isDecimal reports whether s is only ASCII digits (or empty).
func isDecimal(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func intParam(q url.Values, name string, def, lo, hi int) (int, error) {
	vals := q[name]
	if len(vals) > 1 {
		return 0, errors.New(name + " must be given at most once")
	}
	if len(vals) == 0 {
		return def, nil
	}
	return intValue(name, vals[0], def, lo, hi)
}

// intValue is one parameter's value: empty counts as absent (def).
func intValue(name, s string, def, lo, hi int) (int, error) {
	if s == "" {
		return def, nil
	}
	bad := func() error {
		return errors.New(name + " must be an integer from " + strconv.Itoa(lo) + " to " + strconv.Itoa(hi))
	}
	// The value is built in int64 whatever the size of int, and a digit that
	// would take it past int64 stops the loop: where int is 32 bits, an int
	// accumulator wrapped page=4294967297 round to page 1. Leading zeros only
	// keep n at 0, so they are allowed at any length.
	var n int64
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, bad()
		}
		d := int64(s[i] - '0')
		if n > (math.MaxInt64-d)/10 {
			return 0, bad()
		}
		n = n*10 + d
	}
	if n < int64(lo) || n > int64(hi) {
		return 0, bad()
	}
	return int(n), nil
}

func handleHealthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, r, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	if why := s.notReady(r.Context()); why != "" {
		writeError(w, r, http.StatusServiceUnavailable, "not_ready", why)
		return
	}
	writeJSON(w, r, http.StatusOK, map[string]string{"status": "ready"})
}

// notReady says why the instance is not ready, or "" when it is: /readyz's
// answer, and threeds_ready at each scrape.
func (s *server) notReady(ctx context.Context) string {
	switch {
	case s.draining.Load():
		return "the service is shutting down"
	case !s.verifier.Ready():
		return "verification keys are not loaded yet"
	case s.store.saturated():
		// Every connection is busy running queries, so the database is
		// answering; a ping would only queue behind them, time out and take
		// a merely busy pod out of rotation, pushing its load onto the rest.
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		return "the database is not reachable"
	}
	return ""
}
