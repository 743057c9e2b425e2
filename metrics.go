package main

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"runtime"
	rtmetrics "runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// metrics is a hand-written Prometheus text exposition: a handful of
// counters and histograms do not justify a client library.
type metrics struct {
	store    *Store
	verifier *Verifier
	limit    *inFlightLimit // MAX_IN_FLIGHT of the API routes
	hub      *hub           // nil: the stream families are exposed at zero
	// notReady is /readyz's check ("" when ready), run at each scrape for
	// threeds_ready; nil reports ready.
	notReady func(context.Context) string

	mu       sync.Mutex
	requests map[routeCode]*atomic.Int64
	latency  map[string]*histogram

	// An event stream's lifetime is not a request's latency: it has series
	// of its own, so that an all-routes quantile of the request histogram
	// stays a quantile of requests (see streamStarted).
	streamsOpened  atomic.Int64
	streamDuration streamHistogram
}

type routeCode struct {
	route string
	code  int
}

// Buckets in seconds: a page is a millisecond or two, a slow database is
// hundreds, a timeout is DB_QUERY_TIMEOUT.
// An array, so the histogram's counts are sized from it at compile time.
var latencyBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// streamBuckets in seconds: a stream lives from a moment (a client that
// goes away at once, a refused key) to its token's lifetime (minutes to
// hours; a day at most).
var streamBuckets = [...]float64{1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400}

type histogram struct {
	counts [len(latencyBuckets) + 1]atomic.Int64 // per bucket (not cumulative), then +Inf
	sum    floatSum
}

type streamHistogram struct {
	counts [len(streamBuckets) + 1]atomic.Int64
	sum    floatSum
}

// floatSum is a sum of seconds that cannot wrap: an int64 of nanoseconds
// does after 292 years of summed time, i.e. ten days of 10,000 streams that
// each last an hour. A float64 loses only digits far below a millisecond.
type floatSum struct{ bits atomic.Uint64 }

func (f *floatSum) add(v float64) {
	for {
		old := f.bits.Load()
		if f.bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

func (f *floatSum) load() float64 { return math.Float64frombits(f.bits.Load()) }

func newMetrics(store *Store, verifier *Verifier) *metrics {
	return &metrics{
		store:    store,
		verifier: verifier,
		requests: make(map[routeCode]*atomic.Int64),
		latency:  make(map[string]*histogram),
	}
}

// observe counts a request that has been answered and times it.
func (m *metrics) observe(route string, code int, d time.Duration) {
	m.mu.Lock()
	c := m.counterLocked(route, code)
	h, ok := m.latency[route]
	if !ok {
		h = new(histogram)
		m.latency[route] = h
	}
	m.mu.Unlock()
	c.Add(1)
	h.observe(d)
}

func (m *metrics) counterLocked(route string, code int) *atomic.Int64 {
	c, ok := m.requests[routeCode{route, code}]
	if !ok {
		c = new(atomic.Int64)
		m.requests[routeCode{route, code}] = c
	}
	return c
}

// streamStarted counts an event stream's request when its 200 is written,
// not when the stream ends an hour later: the request counter then says
// what is happening now.
func (m *metrics) streamStarted(route string) {
	m.mu.Lock()
	c := m.counterLocked(route, http.StatusOK)
	m.mu.Unlock()
	c.Add(1)
	m.streamsOpened.Add(1)
}

// streamEnded times a stream that streamStarted counted.
func (m *metrics) streamEnded(d time.Duration) {
	i, _ := slices.BinarySearch(streamBuckets[:], d.Seconds())
	m.streamDuration.counts[i].Add(1)
	m.streamDuration.sum.add(d.Seconds())
}

func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var b strings.Builder

	type counted struct {
		routeCode
		n *atomic.Int64
	}
	type timed struct {
		route string
		h     *histogram
	}
	m.mu.Lock()
	counts := make([]counted, 0, len(m.requests))
	for k, n := range m.requests {
		counts = append(counts, counted{k, n})
	}
	hists := make([]timed, 0, len(m.latency))
	for route, h := range m.latency {
		hists = append(hists, timed{route, h})
	}
	m.mu.Unlock()
	slices.SortFunc(counts, func(a, b counted) int {
		if c := strings.Compare(a.route, b.route); c != 0 {
			return c
		}
		return a.code - b.code
	})
	slices.SortFunc(hists, func(a, b timed) int { return strings.Compare(a.route, b.route) })

	b.WriteString("# HELP threeds_http_requests_total HTTP requests by route pattern and status code.\n# TYPE threeds_http_requests_total counter\n")
	for _, c := range counts {
		fmt.Fprintf(&b, "threeds_http_requests_total{route=\"%s\",code=\"%d\"} %d\n", labelValue(c.route), c.code, c.n.Load())
	}
	b.WriteString("# HELP threeds_http_request_duration_seconds HTTP request latency by route pattern.\n# TYPE threeds_http_request_duration_seconds histogram\n")
	for _, t := range hists {
		writeHistogram(&b, "threeds_http_request_duration_seconds", `route="`+labelValue(t.route)+`",`, latencyBuckets[:], t.h.counts[:], &t.h.sum)
	}
	b.WriteString("# HELP threeds_streams_opened_total Event streams started (counted at their 200; also in threeds_http_requests_total).\n# TYPE threeds_streams_opened_total counter\n")
	fmt.Fprintf(&b, "threeds_streams_opened_total %d\n", m.streamsOpened.Load())
	b.WriteString("# HELP threeds_stream_duration_seconds How long event streams lasted, from request start to end (not in the request histogram).\n# TYPE threeds_stream_duration_seconds histogram\n")
	writeHistogram(&b, "threeds_stream_duration_seconds", "", streamBuckets[:], m.streamDuration.counts[:], &m.streamDuration.sum)

	v := m.verifier
	b.WriteString("# HELP threeds_token_rejections_total Refused bearer tokens by reason.\n# TYPE threeds_token_rejections_total counter\n")
	for i := range numReasons {
		fmt.Fprintf(&b, "threeds_token_rejections_total{reason=\"%s\"} %d\n", labelValue(i.String()), v.rejections[i].Load())
	}
	b.WriteString("# HELP threeds_token_cache_lookups_total Lookups of already-verified tokens: a hit skips the signature check.\n# TYPE threeds_token_cache_lookups_total counter\n")
	hits, misses := v.tokens.counts()
	fmt.Fprintf(&b, "threeds_token_cache_lookups_total{result=\"hit\"} %d\n", hits)
	fmt.Fprintf(&b, "threeds_token_cache_lookups_total{result=\"miss\"} %d\n", misses)
	b.WriteString("# HELP threeds_jwks_refreshes_total JWKS loads by result.\n# TYPE threeds_jwks_refreshes_total counter\n")
	fmt.Fprintf(&b, "threeds_jwks_refreshes_total{result=\"ok\"} %d\n", v.refreshOK.Load())
	fmt.Fprintf(&b, "threeds_jwks_refreshes_total{result=\"failed\"} %d\n", v.refreshFailed.Load())
	b.WriteString("# HELP threeds_jwks_keys Usable verification keys loaded.\n# TYPE threeds_jwks_keys gauge\n")
	fmt.Fprintf(&b, "threeds_jwks_keys %d\n", v.KeyCount())

	if l := m.limit; l != nil {
		b.WriteString("# HELP threeds_http_in_flight API requests being served now (MAX_IN_FLIGHT counts these).\n# TYPE threeds_http_in_flight gauge\n")
		fmt.Fprintf(&b, "threeds_http_in_flight %d\n", l.inFlight())
		b.WriteString("# HELP threeds_http_max_in_flight MAX_IN_FLIGHT: API requests served at once before 503.\n# TYPE threeds_http_max_in_flight gauge\n")
		fmt.Fprintf(&b, "threeds_http_max_in_flight %d\n", l.max())
		b.WriteString("# HELP threeds_http_shed_total API requests answered 503 at once because MAX_IN_FLIGHT were being served.\n# TYPE threeds_http_shed_total counter\n")
		fmt.Fprintf(&b, "threeds_http_shed_total %d\n", l.shed.Load())
	}

	st := m.store.pool.Stat()
	for _, g := range []struct {
		name, help string
		val        int64
	}{
		{"threeds_db_pool_total_conns", "Connections in the pool.", int64(st.TotalConns())},
		{"threeds_db_pool_idle_conns", "Idle connections in the pool.", int64(st.IdleConns())},
		{"threeds_db_pool_acquired_conns", "Connections in use.", int64(st.AcquiredConns())},
		{"threeds_db_pool_constructing_conns", "Connections being opened.", int64(st.ConstructingConns())},
		// pgxpool does not count waiters; page queries under way less the
		// connections in use is a close estimate (readiness pings make it low).
		{"threeds_db_pool_waiting", "Page queries waiting for a connection (estimate).", max(0, m.store.inFlight.Load()-int64(st.AcquiredConns()))},
		{"threeds_db_pool_max_conns", "Pool size limit.", int64(st.MaxConns())},
		{"go_goroutines", "Goroutines that currently exist.", int64(runtime.NumGoroutine())},
	} {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n%s %d\n", g.name, g.help, g.name, g.name, g.val)
	}
	fmt.Fprintf(&b, "# HELP threeds_db_pool_acquire_total Connection acquisitions.\n# TYPE threeds_db_pool_acquire_total counter\nthreeds_db_pool_acquire_total %d\n", st.AcquireCount())
	fmt.Fprintf(&b, "# HELP threeds_db_pool_empty_acquire_total Acquisitions that had to wait for a connection.\n# TYPE threeds_db_pool_empty_acquire_total counter\nthreeds_db_pool_empty_acquire_total %d\n", st.EmptyAcquireCount())
	fmt.Fprintf(&b, "# HELP threeds_db_pool_canceled_acquire_total Acquisitions given up at their deadline (pool exhausted or database unreachable).\n# TYPE threeds_db_pool_canceled_acquire_total counter\nthreeds_db_pool_canceled_acquire_total %d\n", st.CanceledAcquireCount())

	ready := 1
	if m.notReady != nil && m.notReady(r.Context()) != "" {
		ready = 0
	}
	fmt.Fprintf(&b, "# HELP threeds_ready 1 when GET /readyz would answer 200 (checked at the scrape).\n# TYPE threeds_ready gauge\nthreeds_ready %d\n", ready)
	writeStreamMetrics(&b, m.hub)
	writeProcessMetrics(&b)

	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write([]byte(b.String()))
}

func (h *histogram) observe(d time.Duration) {
	// The first bound >= the value: buckets are "less than or equal".
	i, _ := slices.BinarySearch(latencyBuckets[:], d.Seconds())
	h.counts[i].Add(1)
	h.sum.add(d.Seconds())
}

// writeHistogram writes one histogram family member; labels is "" or
// `name="value",`. Buckets are stored apart and summed here, so +Inf and
// _count are the same number even while observations land mid-scrape.
func writeHistogram(b *strings.Builder, name, labels string, bounds []float64, counts []atomic.Int64, sum *floatSum) {
	var cum int64
	for i, le := range bounds {
		cum += counts[i].Load()
		fmt.Fprintf(b, "%s_bucket{%sle=\"%s\"} %d\n", name, labels, formatFloat(le), cum)
	}
	cum += counts[len(bounds)].Load()
	fmt.Fprintf(b, "%s_bucket{%sle=\"+Inf\"} %d\n", name, labels, cum)
	braces := ""
	if labels != "" {
		braces = "{" + strings.TrimSuffix(labels, ",") + "}"
	}
	fmt.Fprintf(b, "%s_sum%s %s\n", name, braces, formatFloat(sum.load()))
	fmt.Fprintf(b, "%s_count%s %d\n", name, braces, cum)
}

// idleHub is never started: it stands in for a server without live updates,
// so the families exist (at zero) on every instance.
var idleHub = newHub(hubConfig{}, nil)

// writeStreamMetrics exposes the event streams and their source session.
// The source's series are the same whichever STREAM_SOURCE runs, with the
// source as a constant label, so one alert covers both.
func writeStreamMetrics(b *strings.Builder, h *hub) {
	if h == nil {
		h = idleHub
	}
	up := 0
	if h.listening() {
		up = 1
	}
	src := labelValue(h.cfg.source)
	fmt.Fprintf(b, "# HELP threeds_streams_open Open event streams.\n# TYPE threeds_streams_open gauge\nthreeds_streams_open %d\n", h.openStreams())
	b.WriteString("# HELP threeds_stream_events_total Events written to event streams, by type.\n# TYPE threeds_stream_events_total counter\n")
	for i := range numEventTypes {
		fmt.Fprintf(b, "threeds_stream_events_total{type=\"%s\"} %d\n", eventTypeNames[i], h.events[i].Load())
	}
	b.WriteString("# HELP threeds_stream_ends_total Event streams ended, by reason.\n# TYPE threeds_stream_ends_total counter\n")
	for i := range numEndReasons {
		fmt.Fprintf(b, "threeds_stream_ends_total{reason=\"%s\"} %d\n", i.String(), h.ends[i].Load())
	}
	b.WriteString("# HELP threeds_stream_notify_lag_seconds From the source hearing of a new record to the record being written and flushed on a stream.\n# TYPE threeds_stream_notify_lag_seconds histogram\n")
	writeHistogram(b, "threeds_stream_notify_lag_seconds", "", latencyBuckets[:], h.lag.counts[:], &h.lag.sum)
	fmt.Fprintf(b, "# HELP threeds_stream_source_up 1 while the stream source session is up and proven to receive new records.\n# TYPE threeds_stream_source_up gauge\nthreeds_stream_source_up{source=\"%s\"} %d\n", src, up)
	fmt.Fprintf(b, "# HELP threeds_stream_source_reconnects_total Stream source sessions re-established after one was lost.\n# TYPE threeds_stream_source_reconnects_total counter\nthreeds_stream_source_reconnects_total{source=\"%s\"} %d\n", src, h.reconnects.Load())
	fmt.Fprintf(b, "# HELP threeds_stream_source_reads_total Record reads for the streams (snapshots, new-record batches, resyncs); idle streams add none.\n# TYPE threeds_stream_source_reads_total counter\nthreeds_stream_source_reads_total{source=\"%s\"} %d\n", src, h.reads.Load())
	fmt.Fprintf(b, "# HELP threeds_listen_notifications_total New records the source heard of: notifications on the LISTEN session (STREAM_SOURCE=notify) or inserts into threeds_records decoded from the WAL (wal).\n# TYPE threeds_listen_notifications_total counter\nthreeds_listen_notifications_total %d\n", h.notifications.Load())
	fmt.Fprintf(b, "# HELP threeds_listen_bad_payloads_total Notifications whose payload was not <user_id>:<id> (ignored).\n# TYPE threeds_listen_bad_payloads_total counter\nthreeds_listen_bad_payloads_total %d\n", h.badPayloads.Load())
}

// labelValue escapes a label value as the text format requires: backslash,
// double quote and newline only. Go's %q would also escape non-ASCII bytes
// and control characters in ways a Prometheus parser reads literally.
func labelValue(s string) string {
	if !strings.ContainsAny(s, "\\\"\n") {
		return s
	}
	return labelEscaper.Replace(s)
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// formatFloat is the shortest exact decimal form, which Prometheus parses
// back to the same float64.
func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// processSamples are read from runtime/metrics, which (unlike
// runtime.ReadMemStats) does not stop the world; the names are those of
// Prometheus's Go client, so existing dashboards read them.
var processSamples = []struct {
	runtimeName, name, help string
}{
	{"/memory/classes/heap/objects:bytes", "go_memstats_heap_alloc_bytes", "Bytes of allocated heap objects."},
	{"/memory/classes/total:bytes", "go_memstats_sys_bytes", "Bytes of memory obtained from the OS by the Go runtime."},
	{"/gc/gomemlimit:bytes", "go_gc_gomemlimit_bytes", "GOMEMLIMIT: the Go runtime's soft memory limit."},
}

// writeProcessMetrics writes the process's memory: the Go runtime's view,
// and the resident set the kernel (and an OOM killer) counts, where /proc
// tells it.
func writeProcessMetrics(b *strings.Builder) {
	samples := make([]rtmetrics.Sample, len(processSamples))
	for i, p := range processSamples {
		samples[i].Name = p.runtimeName
	}
	rtmetrics.Read(samples)
	for i, p := range processSamples {
		if samples[i].Value.Kind() != rtmetrics.KindUint64 {
			continue
		}
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s gauge\n%s %d\n", p.name, p.help, p.name, p.name, samples[i].Value.Uint64())
	}
	if rss, ok := residentBytes(); ok {
		fmt.Fprintf(b, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %d\n", rss)
	}
}

// residentBytes is the resident set size from /proc/self/statm (Linux): its
// second field, in pages.
func residentBytes() (int64, bool) {
	buf, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, false
	}
	fields := strings.Fields(string(buf))
	if len(fields) < 2 {
		return 0, false
	}
	pages, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		return 0, false
	}
	return pages * int64(os.Getpagesize()), true
}
