package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

// testHubConfig is the hub run() would build for dsn.
func testHubConfig(t testing.TB, dsn string) hubConfig {
	t.Helper()
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.RuntimeParams["application_name"] = "threeds-records-listen"
	source := testStreamSource(t)
	prepareTestSource(t, dsn, source)
	return hubConfig{source: source, conn: cc, queryTimeout: 5 * time.Second}
}

func publicKeys(t testing.TB, keys ...testKey) []jwk.Key {
	var out []jwk.Key
	for _, k := range keys {
		out = append(out, k.publicJWK(t, false))
	}
	return out
}

// streamService is the real handler stack with a running hub, on a fresh
// database (newTestDB runs the real migrate, trigger included), behind a
// real JWKS endpoint.
type streamService struct {
	*testService
	dsn  string
	hub  *hub
	jwks *jwksServer
}

type streamOptions struct {
	hub  func(*hubConfig)
	auth func(*authConfig)
	keys []testKey // published in the JWKS; the first signs tokenFor
}

func newStreamService(t testing.TB, opts streamOptions) *streamService {
	t.Helper()
	dsn := newTestDB(t)
	pool := newTestPool(t, dsn, nil)
	if len(opts.keys) == 0 {
		opts.keys = []testKey{newTestKey(t, jwa.ES256, "svc", 0)}
	}
	jwks := newJWKSServer(t, publicKeys(t, opts.keys...)...)
	ac := testAuthConfig(jwks.URL)
	if opts.auth != nil {
		opts.auth(&ac)
	}
	v := newTestVerifier(t, ac)
	hc := testHubConfig(t, dsn)
	if opts.hub != nil {
		opts.hub(&hc)
	}
	h := newHub(hc, discardLogger())
	h.start()
	t.Cleanup(h.shutdown)
	srv := newServer(NewStore(pool, 3*time.Second), v, h, discardLogger())
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	waitFor(t, 15*time.Second, "the LISTEN session", h.listening)
	return &streamService{testService: &testService{Server: ts, pool: pool, key: opts.keys[0], srv: srv}, dsn: dsn, hub: h, jwks: jwks}
}

// sseEvent is one block of the stream as the wire carries it: the lines up
// to a blank line. A comment block has only comment set.
type sseEvent struct {
	event, id, data, retry, comment string
	raw                             string // the block's lines, each ending in \n
	at                              time.Time
}

func (e sseEvent) String() string { return strconv.Quote(e.raw) }

// sseStream reads an event stream on a goroutine of its own, so tests can
// wait for events with a bound.
type sseStream struct {
	resp   *http.Response
	cancel context.CancelFunc
	events chan sseEvent
	mu     sync.Mutex
	wire   strings.Builder // every byte read, for wire-format checks
	err    error           // why reading stopped (io.EOF: the server closed)
}

// openStream sends GET target with token and header pairs; it does not
// check the status (see mustOpenStream).
func openStream(t testing.TB, base, target, token string, header ...string) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req := newTestRequest(t, ctx, http.MethodGet, base+target, token, header...)
	// A client of its own: a stream must not sit in a shared pool.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", target, err)
	}
	s := &sseStream{resp: resp, cancel: cancel, events: make(chan sseEvent, 10000)}
	t.Cleanup(s.close)
	if resp.StatusCode == http.StatusOK {
		go s.read()
	}
	return s
}

// mustOpenStream opens a stream for token and waits for its ready event,
// returning the snapshot's record events.
func mustOpenStream(t testing.TB, base, token string) (*sseStream, []sseEvent) {
	t.Helper()
	s := openStream(t, base, "/3ds/my-records/events", token)
	if s.resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(s.resp.Body)
		t.Fatalf("stream: status %d: %s", s.resp.StatusCode, body)
	}
	return s, s.untilReady(t)
}

func (s *sseStream) close() {
	s.cancel()
	_ = s.resp.Body.Close()
}

func (s *sseStream) read() {
	defer close(s.events)
	br := bufio.NewReader(s.resp.Body)
	var ev sseEvent
	for {
		line, err := br.ReadString('\n')
		s.mu.Lock()
		s.wire.WriteString(line)
		s.mu.Unlock()
		if err != nil {
			s.mu.Lock()
			s.err = err
			s.mu.Unlock()
			return
		}
		if line == "\n" {
			ev.at = time.Now()
			s.events <- ev
			ev = sseEvent{}
			continue
		}
		ev.raw += line
		field, value, _ := strings.Cut(strings.TrimSuffix(line, "\n"), ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "":
			ev.comment = value
		case "event":
			ev.event = value
		case "id":
			ev.id = value
		case "data":
			ev.data = value
		case "retry":
			ev.retry = value
		}
	}
}

// next returns the next block, or fails after within; ok is false when the
// stream ended.
func (s *sseStream) next(t testing.TB, within time.Duration) (sseEvent, bool) {
	t.Helper()
	select {
	case ev, ok := <-s.events:
		return ev, ok
	case <-time.After(within):
		t.Fatalf("no event within %s", within)
		return sseEvent{}, false
	}
}

// nextEvent skips heartbeats.
func (s *sseStream) nextEvent(t testing.TB, within time.Duration) (sseEvent, bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ev, ok := s.next(t, time.Until(deadline))
		if !ok || ev.comment == "" {
			return ev, ok
		}
	}
}

// untilReady reads the retry line, the snapshot and ready.
func (s *sseStream) untilReady(t testing.TB) []sseEvent {
	t.Helper()
	first, ok := s.next(t, 10*time.Second)
	if !ok || first.retry == "" || first.raw != "retry: "+first.retry+"\n" {
		t.Fatalf("the stream does not start with a retry line: %v", first)
	}
	var snapshot []sseEvent
	for {
		ev, ok := s.nextEvent(t, 10*time.Second)
		if !ok {
			t.Fatalf("the stream ended before ready: %v", s.readErr())
		}
		switch ev.event {
		case "record":
			snapshot = append(snapshot, ev)
		case "ready":
			if ev.raw != "event: ready\ndata: {}\n" {
				t.Fatalf("ready event on the wire: %v", ev)
			}
			return snapshot
		default:
			t.Fatalf("unexpected event before ready: %v", ev)
		}
	}
}

// recordIDs reads records until stop returns true for the ids so far or the
// bound passes; any non-record event other than a ping fails.
func (s *sseStream) recordIDs(t testing.TB, within time.Duration, stop func([]int64) bool) []int64 {
	t.Helper()
	var ids []int64
	deadline := time.Now().Add(within)
	for !stop(ids) {
		ev, ok := s.nextEvent(t, time.Until(deadline))
		if !ok {
			t.Fatalf("the stream ended: %v (ids so far %v)", s.readErr(), ids)
		}
		if ev.event != "record" {
			t.Fatalf("unexpected event: %v", ev)
		}
		ids = append(ids, eventID(t, ev))
	}
	return ids
}

// quiet asserts that no record arrives for d (heartbeats are fine).
func (s *sseStream) quiet(t testing.TB, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev, ok := <-s.events:
			if !ok {
				t.Fatalf("the stream ended: %v", s.readErr())
			}
			if ev.comment == "" {
				t.Fatalf("unexpected event: %v", ev)
			}
		case <-deadline:
			return
		}
	}
}

// end waits for the end event and the connection to close after it.
func (s *sseStream) end(t testing.TB, within time.Duration) (reason string, at time.Time) {
	t.Helper()
	ev, ok := s.nextEvent(t, within)
	if !ok || ev.event != "end" {
		t.Fatalf("want an end event, got %v (ok %v, read error %v)", ev, ok, s.readErr())
	}
	var body map[string]any
	if err := json.Unmarshal([]byte(ev.data), &body); err != nil || len(body) != 1 {
		t.Fatalf("end data %q is not {\"reason\": ...}", ev.data)
	}
	if _, ok := s.next(t, 5*time.Second); ok {
		t.Fatal("an event came after end")
	}
	if err := s.readErr(); err != io.EOF {
		t.Errorf("after end the connection must close; reading stopped with %v", err)
	}
	return body["reason"].(string), ev.at
}

func (s *sseStream) readErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func eventID(t testing.TB, ev sseEvent) int64 {
	t.Helper()
	id, err := strconv.ParseInt(ev.id, 10, 64)
	if err != nil {
		t.Fatalf("record event without a numeric id: %v", ev)
	}
	var rec struct {
		ID int64 `json:"id"`
	}
	if err := json.Unmarshal([]byte(ev.data), &rec); err != nil || rec.ID != id {
		t.Fatalf("record event id %s and data %q disagree", ev.id, ev.data)
	}
	return id
}

// ago is a received_at literal d before now, in whole seconds.
func ago(d time.Duration) string {
	return time.Now().Add(-d).UTC().Truncate(time.Second).Format(time.RFC3339)
}

// liveRow is a record of user received now and valid for an hour.
func liveRow(id, user int64) seedRow {
	r := row(id, user, ago(0))
	r.expiresAfter = 3600
	return r
}

// rowQuerier is a pool or a single session (the writer's, on a primary).
type rowQuerier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// insertNow stores one live record of user in a transaction of its own, as
// the card-issuer integration does, and returns its id once the commit has
// returned (the identity column picks it, as the writer's would).
func insertNow(t testing.TB, db rowQuerier, user int64) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var id int64
	err := db.QueryRow(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES ($1, '123456', 100, 'USD', 'Amazon', 3600, now()) RETURNING id`, user).Scan(&id)
	if err != nil {
		t.Fatalf("insert: %v", err)
	}
	return id
}

// listRecordJSON is each record exactly as the list endpoint shows it, by id.
func listRecordJSON(t testing.TB, svc *testService, token string) map[int64]string {
	t.Helper()
	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records?page_size=100", token)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("list: %d %s", resp.StatusCode, body)
	}
	var page struct {
		Data struct {
			Records []json.RawMessage `json:"records"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &page); err != nil {
		t.Fatal(err)
	}
	out := map[int64]string{}
	for _, raw := range page.Data.Records {
		var r struct {
			ID int64 `json:"id"`
		}
		_ = json.Unmarshal(raw, &r)
		out[r.ID] = string(raw)
	}
	return out
}

func TestStreamStartsWithRetryThenTheLiveSnapshotOldestFirstThenReady(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	odd := `Bob's <Café> & "Bar"`
	now := ago(0)
	insertRows(t, svc.pool,
		seedRow{id: 1, userID: 1001, passcode: "012345", amount: "100", currency: "USD", merchant: &odd, expiresAfter: 300, receivedAt: ago(10 * time.Second)},
		seedRow{id: 2, userID: 1001, passcode: "222222", amount: "1500", currency: "jpy", expiresAfter: 300, receivedAt: ago(20 * time.Second)},
		seedRow{id: 3, userID: 1001, passcode: "333333", amount: "1", currency: "USD", expiresAfter: 300, receivedAt: ago(time.Hour)},
		seedRow{id: 4, userID: 1002, passcode: "444444", amount: "1", currency: "USD", expiresAfter: 300, receivedAt: now},
		seedRow{id: 5, userID: 1001, passcode: "555555", amount: "1", currency: "USD", expiresAfter: 0, receivedAt: ago(5 * time.Second)},
		seedRow{id: 6, userID: 1001, passcode: "666666", amount: "1.5", currency: "KWD", expiresAfter: 300, receivedAt: ago(10 * time.Second)},
	)
	token := svc.tokenFor(t, 1001)
	listed := listRecordJSON(t, svc.testService, token)

	s := openStream(t, svc.URL, "/3ds/my-records/events", token, "X-Request-ID", "stream-1")
	if s.resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", s.resp.StatusCode)
	}
	for name, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-store",
		"X-Accel-Buffering": "no",
		"X-Request-ID":      "stream-1",
	} {
		if got := s.resp.Header.Get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	snapshot := s.untilReady(t)
	var got []int64
	for _, ev := range snapshot {
		id := eventID(t, ev)
		got = append(got, id)
		if want := "event: record\nid: " + ev.id + "\ndata: " + listed[id] + "\n"; ev.raw != want {
			t.Errorf("record %d on the wire\n got %q\nwant %q (the list endpoint's object)", id, ev.raw, want)
		}
	}
	// 2 is the oldest live one; 1 and 6 share received_at, so the id orders
	// them; 3 and 5 have expired; 4 is another user's.
	if want := []int64{2, 1, 6}; !slices.Equal(got, want) {
		t.Errorf("snapshot ids %v, want %v", got, want)
	}
	s.mu.Lock()
	wire := s.wire.String()
	s.mu.Unlock()
	if !strings.HasPrefix(wire, "retry: ") {
		t.Errorf("the stream starts with %q", wire[:min(len(wire), 20)])
	}
}

func TestStreamDeliversTheUsersNewLiveRecordsAndNothingElse(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	tokA, tokB := svc.tokenFor(t, 1001), svc.tokenFor(t, 1002)
	a, _ := mustOpenStream(t, svc.URL, tokA)
	b, _ := mustOpenStream(t, svc.URL, tokB)

	expired := row(10, 1001, ago(time.Hour))
	insertRows(t, svc.pool, expired)
	insertRows(t, svc.pool, liveRow(11, 1002))
	insertRows(t, svc.pool, liveRow(12, 1001))
	insertRows(t, svc.pool, liveRow(13, 1001))

	// Commit order is delivery order on one stream: had 10 or 11 been sent
	// to a, they would come before 12.
	got := a.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 2 })
	if want := []int64{12, 13}; !slices.Equal(got, want) {
		t.Errorf("user 1001 got %v, want %v (10 has expired, 11 is user 1002's)", got, want)
	}
	if got := b.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); !slices.Equal(got, []int64{11}) {
		t.Errorf("user 1002 got %v, want [11]", got)
	}
	b.quiet(t, 300*time.Millisecond)

	odd := "M&S <Café>\u2028"
	insertRows(t, svc.pool, seedRow{id: 14, userID: 1001, passcode: "000123", amount: "1.5", currency: "kwd", merchant: &odd, expiresAfter: 120, receivedAt: ago(0)})
	ev, _ := a.nextEvent(t, 10*time.Second)
	listed := listRecordJSON(t, svc.testService, tokA)
	if want := "event: record\nid: 14\ndata: " + listed[14] + "\n"; ev.raw != want {
		t.Errorf("a live record on the wire\n got %q\nwant %q (the list endpoint's object)", ev.raw, want)
	}
}

func TestStreamSnapshotBoundaryDeliversEveryRecordExactlyOnce(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	users := []int64{2001, 2002, 2003}
	const streamsPerUser = 3
	writer := newTestPool(t, svc.dsn, nil)

	// The writer commits records for every user, some one per transaction
	// and some five at a time, while the streams connect at random moments.
	var (
		mu       sync.Mutex
		inserted = map[int64][]int64{}
	)
	stop := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			u := users[i%len(users)]
			n := 1
			if i%4 == 3 {
				n = 5
			}
			rows, err := writer.Query(context.Background(), `
INSERT INTO threeds_records (user_id, passcode, amount, currency, expires_after, received_at)
SELECT $1, '123456', 1, 'USD', 3600, now() FROM generate_series(1, $2) RETURNING id`, u, n)
			if err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
			if err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			mu.Lock()
			inserted[u] = append(inserted[u], ids...)
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()

	type opened struct {
		user   int64
		s      *sseStream
		snapID []int64
	}
	var (
		wg     sync.WaitGroup
		omu    sync.Mutex
		opens  []opened
		tokens = map[int64]string{}
	)
	for _, u := range users {
		tokens[u] = svc.tokenFor(t, u)
	}
	for i := range len(users) * streamsPerUser {
		u := users[i%len(users)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i*97%800) * time.Millisecond)
			s, snap := mustOpenStream(t, svc.URL, tokens[u])
			var ids []int64
			for _, ev := range snap {
				ids = append(ids, eventID(t, ev))
			}
			omu.Lock()
			opens = append(opens, opened{u, s, ids})
			omu.Unlock()
		}()
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-writerDone
	// The last record of each user marks the end of what it must receive.
	barrier := map[int64]int64{}
	for _, u := range users {
		barrier[u] = insertNow(t, writer, u)
		inserted[u] = append(inserted[u], barrier[u])
	}

	total := 0
	for _, o := range opens {
		ids := append(o.snapID, o.s.recordIDs(t, 15*time.Second, func(ids []int64) bool {
			return len(ids) > 0 && ids[len(ids)-1] == barrier[o.user]
		})...)
		o.s.quiet(t, 200*time.Millisecond) // nothing late, no duplicate after the barrier
		got := slices.Clone(ids)
		slices.Sort(got)
		want := slices.Clone(inserted[o.user])
		slices.Sort(want)
		var dups []int64
		for i := 1; i < len(got); i++ {
			if got[i] == got[i-1] {
				dups = append(dups, got[i])
			}
		}
		if len(dups) > 0 {
			t.Errorf("user %d: %d records were sent twice on one stream, e.g. %v", o.user, len(dups), dups[:min(len(dups), 10)])
			continue
		}
		if !slices.Equal(got, want) {
			t.Errorf("user %d: stream got %d records, want %d\n got %v\nwant %v", o.user, len(got), len(want), got, want)
		}
		total += len(ids)
	}
	t.Logf("%d streams, %d records committed while they connected, %d deliveries checked", len(opens), len(inserted[users[0]])+len(inserted[users[1]])+len(inserted[users[2]]), total)
}

func TestStreamLosesNothingAndDuplicatesNothingWhenTheListenBackendIsKilled(t *testing.T) {
	// The first reconnect waits at least retryMin (jitter only adds), so
	// records committed once the hub has seen its session go fall in the
	// gap when nothing listens.
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.retryMin = 2 * time.Second }})
	admin := newTestPool(t, svc.dsn, nil)
	insertNow(t, admin, 3001)
	insertNow(t, admin, 3002)
	a1, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 3001))
	a2, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 3001))
	b, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 3002))

	var killed int
	err := admin.QueryRow(context.Background(), `
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records-listen'`).Scan(&killed)
	if err != nil || killed != 1 {
		t.Fatalf("terminate the LISTEN backend: killed %d, %v", killed, err)
	}
	// The hub learns of the kill when it next reads its socket; records
	// committed before that would still reach it.
	waitFor(t, 15*time.Second, "the hub to see its LISTEN session go", func() bool { return !svc.hub.listening() })
	inGap := []int64{insertNow(t, admin, 3001), insertNow(t, admin, 3002), insertNow(t, admin, 3001)}
	if svc.hub.listening() {
		t.Fatal("the hub still claims to listen: the records above may not have fallen in the gap")
	}
	waitFor(t, 15*time.Second, "the LISTEN session to come back", svc.hub.listening)
	after := []int64{insertNow(t, admin, 3001), insertNow(t, admin, 3002)}

	want := map[int64][]int64{3001: {inGap[0], inGap[2], after[0]}, 3002: {inGap[1], after[1]}}
	for _, c := range []struct {
		name string
		user int64
		s    *sseStream
	}{{"first stream of 3001", 3001, a1}, {"second stream of 3001", 3001, a2}, {"stream of 3002", 3002, b}} {
		t.Run(c.name, func(t *testing.T) {
			last := want[c.user][len(want[c.user])-1]
			got := c.s.recordIDs(t, 15*time.Second, func(ids []int64) bool { return slices.Contains(ids, last) })
			c.s.quiet(t, 200*time.Millisecond)
			slices.Sort(got)
			if !slices.Equal(got, want[c.user]) {
				t.Errorf("got %v, want each of %v exactly once (the snapshot's record is not resent)", got, want[c.user])
			}
		})
	}
	if n := svc.hub.reconnects.Load(); n != 1 {
		t.Errorf("reconnects = %d, want 1", n)
	}
	m := parseExposition(t, scrapeText(t, svc.URL))
	if v := m.value(t, "threeds_stream_source_reconnects_total"); v != 1 {
		t.Errorf("threeds_stream_source_reconnects_total = %v, want 1", v)
	}
	if v := m.value(t, "threeds_stream_source_up"); v != 1 {
		t.Errorf("threeds_stream_source_up = %v, want 1", v)
	}
}

func scrapeText(t testing.TB, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestStreamSendsAPingWhenSilentForTheHeartbeat(t *testing.T) {
	const heartbeat = 300 * time.Millisecond
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.heartbeat = heartbeat }})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	start := time.Now()
	var pings []time.Time
	for len(pings) < 3 {
		ev, ok := s.next(t, 5*heartbeat)
		if !ok {
			t.Fatalf("the stream ended: %v", s.readErr())
		}
		if ev.raw != ": ping\n" {
			t.Fatalf("want a ping comment, got %v", ev)
		}
		pings = append(pings, ev.at)
	}
	if first := pings[0].Sub(start); first < heartbeat/2 {
		t.Errorf("the first ping came %s after ready, before the heartbeat of %s", first, heartbeat)
	}
	// A record resets the silence: the next ping is a heartbeat after it.
	insertRows(t, svc.pool, liveRow(7, 1001))
	ev, _ := s.nextEvent(t, 10*time.Second)
	if ev.id != "7" {
		t.Fatalf("want record 7, got %v", ev)
	}
	ping, _ := s.next(t, 5*heartbeat)
	if gap := ping.at.Sub(ev.at); ping.comment != "ping" || gap < heartbeat/2 {
		t.Errorf("after a record, %v came %s later; want a ping a heartbeat later", ping, gap)
	}
}

func TestStreamEndsWithTokenExpiredWhenTheTokenExpires(t *testing.T) {
	const leeway = time.Second
	svc := newStreamService(t, streamOptions{auth: func(c *authConfig) { c.leeway = leeway }})
	claims := validClaims(1001)
	exp := time.Now().Add(2 * time.Second).Truncate(time.Second)
	claims["exp"] = exp.Unix()
	s, _ := mustOpenStream(t, svc.URL, svc.key.token(t, claims))
	reason, at := s.end(t, 10*time.Second)
	if reason != "token_expired" {
		t.Fatalf("reason %q, want token_expired", reason)
	}
	if at.Before(exp) || at.After(exp.Add(leeway+3*time.Second)) {
		t.Errorf("the stream ended at %s; the token expired at %s with a leeway of %s", at.Format(time.StampMilli), exp.Format(time.StampMilli), leeway)
	}
	if n := svc.hub.ends[endTokenExpired].Load(); n != 1 {
		t.Errorf("ends{token_expired} = %d, want 1", n)
	}
}

func TestStreamEndsWithKeyRemovedWhenItsKeyLeavesTheKeySet(t *testing.T) {
	keyA, keyB := newTestKey(t, jwa.ES256, "key-a", 0), newTestKey(t, jwa.ES256, "key-b", 0)
	svc := newStreamService(t, streamOptions{
		keys: []testKey{keyA, keyB},
		auth: func(c *authConfig) { c.refreshEvery = 200 * time.Millisecond },
	})
	byA, _ := mustOpenStream(t, svc.URL, keyA.token(t, validClaims(1001)))
	byB, _ := mustOpenStream(t, svc.URL, keyB.token(t, validClaims(1001)))

	svc.jwks.setKeys(t, publicKeys(t, keyB)...)
	if reason, _ := byA.end(t, 10*time.Second); reason != "key_removed" {
		t.Fatalf("the stream of the removed key ended with %q, want key_removed", reason)
	}
	// The other key's stream lives on and still gets records.
	insertRows(t, svc.pool, liveRow(5, 1001))
	if got := byB.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != 5 {
		t.Errorf("the remaining stream got %v", got)
	}
	// A key swap that keeps the key ends nothing.
	svc.jwks.setKeys(t, publicKeys(t, keyB, newTestKey(t, jwa.ES256, "key-c", 0))...)
	waitFor(t, 5*time.Second, "the new key set", func() bool { return svc.srv.verifier.KeyCount() == 2 })
	byB.quiet(t, 500*time.Millisecond)
}

func TestStreamLimitsReplaceTheUsersOldestAndAnswer503OverTheProcessLimit(t *testing.T) {
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.perUser, c.maxStreams = 2, 3 }})
	a1, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))

	refused := func(t *testing.T, user int64, status int, code string) {
		t.Helper()
		resp, body := svc.do(t, http.MethodGet, "/3ds/my-records/events", svc.tokenFor(t, user))
		if resp.StatusCode != status {
			t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, body)
		}
		assertErrorBody(t, resp.Header, body)
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
		if n, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || n < 1 {
			t.Errorf("Retry-After = %q, want whole seconds", resp.Header.Get("Retry-After"))
		}
		var e errorBody
		_ = json.Unmarshal(body, &e)
		if e.Error != code {
			t.Errorf("error %q, want %q", e.Error, code)
		}
	}
	// A third stream of one user is admitted and the oldest ends replaced.
	mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	if reason, _ := a1.end(t, 10*time.Second); reason != "replaced" {
		t.Fatalf("the oldest stream ended with %q, want replaced", reason)
	}
	waitFor(t, 5*time.Second, "the replaced stream to free its place", func() bool { return svc.hub.openStreams() == 2 })
	mustOpenStream(t, svc.URL, svc.tokenFor(t, 1002))
	t.Run("a stream over STREAMS_MAX is a 503", func(t *testing.T) { refused(t, 1003, 503, "unavailable") })
}

func TestStreamRefusesBeforeStartingWithTheJSONErrorOfTheListEndpoint(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	expired := validClaims(1001)
	expired["exp"] = time.Now().Add(-time.Hour).Unix()
	for _, tc := range []struct {
		name, target, token string
		status              int
	}{
		{"no token is a 401", "/3ds/my-records/events", "", 401},
		{"a garbage token is a 401", "/3ds/my-records/events", "not.a.jwt", 401},
		{"an expired token is a 401", "/3ds/my-records/events", svc.key.token(t, expired), 401},
		{"a token in the query string is not read", "/3ds/my-records/events?access_token=" + svc.tokenFor(t, 1001), "", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := svc.do(t, http.MethodGet, tc.target, tc.token)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			assertAPIHeaders(t, resp.Header)
			assertErrorBody(t, resp.Header, body)
			if !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer ") {
				t.Errorf("WWW-Authenticate = %q", resp.Header.Get("WWW-Authenticate"))
			}
		})
	}

	t.Run("no keys yet is a 503", func(t *testing.T) {
		idp := newJWKSServer(t)
		idp.down.Store(true)
		noKeys := NewVerifier(testAuthConfig(idp.URL), discardLogger())
		t.Cleanup(noKeys.Close)
		ts := httptest.NewServer(newServer(NewStore(svc.pool, time.Second), noKeys, svc.hub, discardLogger()))
		t.Cleanup(ts.Close)
		resp, body := (&testService{Server: ts}).do(t, http.MethodGet, "/3ds/my-records/events", svc.tokenFor(t, 1001))
		if resp.StatusCode != 503 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		assertErrorBody(t, resp.Header, body)
	})
	t.Run("a listener that is not up yet is a 503 with Retry-After", func(t *testing.T) {
		idle := newHub(testHubConfig(t, svc.dsn), discardLogger()) // never started
		ts := httptest.NewServer(newServer(NewStore(svc.pool, time.Second), svc.srv.verifier, idle, discardLogger()))
		t.Cleanup(ts.Close)
		resp, body := (&testService{Server: ts}).do(t, http.MethodGet, "/3ds/my-records/events", svc.tokenFor(t, 1001))
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("status %d, Retry-After %q: %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
		assertErrorBody(t, resp.Header, body)
	})
	t.Run("HEAD is a 405 that allows GET", func(t *testing.T) {
		resp, body := svc.do(t, http.MethodHead, "/3ds/my-records/events", svc.tokenFor(t, 1001))
		if resp.StatusCode != 405 || len(body) != 0 || resp.Header.Get("Allow") != "GET" || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("HEAD: %d Allow %q %q %q", resp.StatusCode, resp.Header.Get("Allow"), resp.Header.Get("Content-Type"), body)
		}
		if svc.hub.openStreams() != 0 {
			t.Error("HEAD left a stream open")
		}
	})
}

func TestStreamConfigErrorsNameTheVariable(t *testing.T) {
	valid := serviceEnv("postgres://u:secretpw@127.0.0.1:5432/db", "https://idp.test/jwks")
	for _, tc := range []struct {
		name, variable, value string
	}{
		{"a zero STREAMS_MAX", "STREAMS_MAX", "0"},
		{"a negative STREAMS_MAX", "STREAMS_MAX", "-1"},
		{"a STREAMS_MAX that is not a number", "STREAMS_MAX", "many"},
		{"a huge STREAMS_MAX", "STREAMS_MAX", "1000001"},
		{"a zero STREAMS_PER_USER", "STREAMS_PER_USER", "0"},
		{"a fractional STREAMS_PER_USER", "STREAMS_PER_USER", "1.5"},
		{"a zero STREAM_HEARTBEAT", "STREAM_HEARTBEAT", "0s"},
		{"a STREAM_HEARTBEAT without a unit", "STREAM_HEARTBEAT", "15"},
		{"a STREAM_HEARTBEAT longer than gateways wait", "STREAM_HEARTBEAT", "10m"},
		{"a malformed DATABASE_LISTEN_URL", "DATABASE_LISTEN_URL", "postgres://u:secretpw@h:notaport/db"},
	} {
		t.Run(tc.name+" is a config error naming "+tc.variable, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range valid {
				env[k] = v
			}
			env[tc.variable] = tc.value
			err := run(context.Background(), nil, envFunc(env), &syncBuffer{}, &syncBuffer{})
			var ce *configError
			if !errors.As(err, &ce) || !strings.HasPrefix(err.Error(), tc.variable+":") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("run = %v, want a one-line config error naming %s", err, tc.variable)
			}
			if strings.Contains(err.Error(), "secretpw") {
				t.Errorf("error %q reveals the password", err)
			}
		})
	}

	t.Run("the defaults are the contract's", func(t *testing.T) {
		cfg, err := loadConfig(envFunc(valid), false)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.streamsMax != 10000 || cfg.streamsPerUser != 5 || cfg.streamHeartbeat != 15*time.Second {
			t.Errorf("defaults %d %d %s", cfg.streamsMax, cfg.streamsPerUser, cfg.streamHeartbeat)
		}
		if cfg.listenConfig.Host != "127.0.0.1" || cfg.listenConfig.Database != "db" || cfg.listenConfig.RuntimeParams["application_name"] != "threeds-records-listen" {
			t.Errorf("DATABASE_LISTEN_URL does not default to DATABASE_URL: %s %v", redactedConnURL(cfg.listenConfig), cfg.listenConfig.RuntimeParams)
		}
		if cfg.poolConfig.ConnConfig.RuntimeParams["application_name"] != "threeds-records" {
			t.Error("the listen default changed the query pool's application_name")
		}
	})
	t.Run("DATABASE_LISTEN_URL is used when set", func(t *testing.T) {
		env := map[string]string{}
		for k, v := range valid {
			env[k] = v
		}
		env["DATABASE_LISTEN_URL"] = "postgres://l:pw@primary.internal:6543/db"
		cfg, err := loadConfig(envFunc(env), false)
		if err != nil {
			t.Fatal(err)
		}
		if got := redactedConnURL(cfg.listenConfig); got != "postgres://l:xxxxx@primary.internal:6543/db" {
			t.Errorf("listen target %s", got)
		}
		if cfg.listenConfig.RuntimeParams["statement_timeout"] != "3000" {
			t.Errorf("the LISTEN session's reads are not bounded by DB_QUERY_TIMEOUT: %v", cfg.listenConfig.RuntimeParams)
		}
	})
}

// startStreamRun starts run() on a fresh database with the trigger and a
// real JWKS endpoint; change adjusts the environment first.
func startStreamRun(t *testing.T, change func(env map[string]string)) (*runningService, testKey, string) {
	t.Helper()
	dsn := newTestDB(t)
	key := newTestKey(t, jwa.ES256, "run", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	env := serviceEnv(dsn, idp.URL)
	env["STREAM_SOURCE"] = testStreamSource(t)
	prepareTestSource(t, dsn, env["STREAM_SOURCE"])
	if change != nil {
		change(env)
	}
	rs := startRun(t, env)
	waitFor(t, 15*time.Second, "readiness", func() bool { code, _ := rs.get(t, "/readyz", ""); return code == 200 })
	return rs, key, dsn
}

// During SHUTDOWN_DELAY the instance still serves streams (a browser's
// EventSource that meets a 503 there gives up for good); they all end with
// shutting_down when draining starts, so the drain does not wait on them.
func TestStreamsAreAdmittedDuringTheShutdownDelayAndEndWhenDrainingStarts(t *testing.T) {
	const delay = 3 * time.Second
	rs, key, dsn := startStreamRun(t, func(env map[string]string) {
		env["SHUTDOWN_DELAY"] = delay.String()
		env["SHUTDOWN_TIMEOUT"] = "15s"
	})
	token := key.token(t, validClaims(1001))
	waitFor(t, 15*time.Second, "the LISTEN session", func() bool {
		s := openStream(t, rs.base, "/3ds/my-records/events", token)
		defer s.close()
		return s.resp.StatusCode == http.StatusOK
	})
	before, _ := mustOpenStream(t, rs.base, token)

	sigterm := time.Now()
	rs.cancel()
	waitFor(t, delay/2, "readiness to turn 503", func() bool { code, _ := rs.get(t, "/readyz", ""); return code == 503 })
	during, _ := mustOpenStream(t, rs.base, token)
	if time.Since(sigterm) >= delay {
		t.Fatalf("the stream opened %s after SIGTERM, after the delay; the machine is too slow for this test", time.Since(sigterm))
	}
	insertRows(t, newTestPool(t, dsn, nil), liveRow(9, 1001))
	for name, s := range map[string]*sseStream{"opened before SIGTERM": before, "opened during the delay": during} {
		if got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != 9 {
			t.Errorf("the stream %s got %v during the delay", name, got)
		}
		reason, at := s.end(t, delay+5*time.Second)
		if reason != "shutting_down" {
			t.Errorf("the stream %s ended with %q, want shutting_down", name, reason)
		}
		if took := at.Sub(sigterm); took < delay-200*time.Millisecond {
			t.Errorf("the stream %s ended %s after SIGTERM, before draining started (delay %s)", name, took, delay)
		}
	}
	if err := rs.stop(t); err != nil {
		t.Fatalf("run returned %v", err)
	}
}

// The server's WriteTimeout (DB_QUERY_TIMEOUT + 10s here: 11s) would cut a
// long stream, and its ReadTimeout (10s) must not cancel it either: this
// stream outlives both and still gets a record.
func TestStreamOutlivesTheServersReadAndWriteTimeouts(t *testing.T) {
	rs, key, dsn := startStreamRun(t, func(env map[string]string) {
		env["STREAM_HEARTBEAT"] = "1s"
		env["DB_QUERY_TIMEOUT"] = "1s" // WriteTimeout 11s
	})
	token := key.token(t, validClaims(1001))
	var s *sseStream
	waitFor(t, 15*time.Second, "a stream", func() bool {
		s = openStream(t, rs.base, "/3ds/my-records/events", token)
		if s.resp.StatusCode != http.StatusOK {
			s.close()
			return false
		}
		return true
	})
	s.untilReady(t)
	start := time.Now()
	pings := 0
	for time.Since(start) < 13*time.Second {
		ev, ok := s.next(t, 5*time.Second)
		if !ok {
			t.Fatalf("the stream ended after %s: %v", time.Since(start).Round(time.Millisecond), s.readErr())
		}
		if ev.comment != "ping" {
			t.Fatalf("unexpected %v", ev)
		}
		pings++
	}
	insertRows(t, newTestPool(t, dsn, nil), liveRow(9, 1001))
	if got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != 9 {
		t.Errorf("after 13s the stream got %v", got)
	}
	if pings < 10 {
		t.Errorf("%d pings in 13s with a 1s heartbeat", pings)
	}
}

// LISTEN through PgBouncer in transaction mode is accepted and never
// delivers: the self-probe finds out, the stream answers 503 saying why,
// the log says once what to set, and the list endpoint and readiness are
// untouched. The PgBouncer is stock, so it first refuses the
// statement_timeout startup parameter; the LISTEN session connects without
// it, as the query pool does, and gets as far as the probe.
func TestStreamAnswers503AndTheLogSaysWhatToSetWhenListenGoesThroughPgBouncer(t *testing.T) {
	rs, key, dsn := startStreamRun(t, func(env map[string]string) {
		bouncer := startPgBouncer(t, databaseName(t, env["DATABASE_URL"]))
		env["DATABASE_LISTEN_URL"] = withParams(bouncer, "default_query_exec_mode=exec")
	})
	insertRows(t, newTestPool(t, dsn, nil), liveRow(1, 1001))
	token := key.token(t, validClaims(1001))
	waitFor(t, 30*time.Second, "the unavailable log line", func() bool {
		for _, l := range rs.stdout.logLines(t) {
			if l["msg"] == "live updates are unavailable; the list endpoint keeps working" {
				return true
			}
		}
		return false
	})
	code, body := rs.get(t, "/3ds/my-records/events", token)
	if code != http.StatusServiceUnavailable {
		t.Fatalf("stream: %d %s", code, body)
	}
	var e errorBody
	if err := json.Unmarshal(body, &e); err != nil || !strings.Contains(e.Details, "DATABASE_LISTEN_URL must be a direct session to the primary") {
		t.Errorf("503 details %q do not say why", e.Details)
	}
	if code, body := rs.get(t, "/3ds/my-records", token); code != http.StatusOK || !strings.Contains(string(body), `"id":1`) {
		t.Errorf("the list endpoint: %d %s", code, body)
	}
	if code, _ := rs.get(t, "/readyz", ""); code != http.StatusOK {
		t.Errorf("readyz = %d: LISTEN must not take readiness down", code)
	}

	var lines []map[string]any
	for _, l := range rs.stdout.logLines(t) {
		if l["msg"] == "live updates are unavailable; the list endpoint keeps working" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("%d unavailable log lines, want exactly one per state change", len(lines))
	}
	if set, _ := lines[0]["set"].(string); !strings.Contains(set, "DATABASE_LISTEN_URL") || lines[0]["level"] != "ERROR" {
		t.Errorf("the log line does not say what to set: %v", lines[0])
	}
	for _, l := range rs.stdout.logLines(t) {
		if l["msg"] == "listening" {
			if l["listen_database"] == l["database"] || !strings.HasSuffix(l["listen_database"].(string), "/"+databaseName(t, dsn)) {
				t.Errorf("the start line does not tell the query and LISTEN targets apart: %v / %v", l["database"], l["listen_database"])
			}
		}
	}
	// The probe's verdict (not a connection error) shows the session got
	// past the refusal.
	if reason, _ := lines[0]["reason"].(string); !strings.Contains(reason, "no notification arrived") {
		t.Errorf("the unavailable line's reason %q is not the probe's", reason)
	}
	if m := parseExposition(t, scrapeText(t, rs.base)); m.value(t, "threeds_stream_source_up") != 0 {
		t.Error("threeds_stream_source_up is not 0")
	}
}

// raceDetector reports whether the test binary was built with -race, which
// enlarges every stack frame and allocation.
func raceDetector() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// TestStreamMemoryPerOpenStreamStaysUnder32KiB measures, in this process,
// what an open stream holds after garbage collection: heap (net/http's
// buffers, the request, the stream) and goroutine stacks. The stack part is
// sensitive to every frame between net/http's conn.serve and the stream's
// select: if their sum grows past about 3.2 KiB the runtime can no longer
// halve the handler's 16 KiB stack to 8 KiB, and each stream costs 8 KiB more.
// (make bench measures the same thing as RSS on the real binary.)
func TestStreamMemoryPerOpenStreamStaysUnder32KiB(t *testing.T) {
	const streams = 1000
	svc := newStreamService(t, streamOptions{})
	addr := strings.TrimPrefix(svc.URL, "http://")
	tokens := make([]string, streams)
	for i := range tokens {
		tokens[i] = svc.tokenFor(t, int64(100+i))
	}
	// Raw sockets with tiny buffers, so the client side adds little.
	open := func(token string) net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_, _ = c.Write([]byte("GET /3ds/my-records/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + token + "\r\n\r\n"))
		br := bufio.NewReaderSize(c, 16)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("stream: %v", err)
			}
			if line == "event: ready\n" {
				return c
			}
		}
	}
	open(tokens[0]).Close() // warm up pools and caches
	waitFor(t, 5*time.Second, "the warm-up stream to end", func() bool { return svc.hub.openStreams() == 0 })
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	for _, tok := range tokens {
		open(tok)
	}
	for range 4 { // each cycle halves a stack at most once
		runtime.GC()
	}
	runtime.ReadMemStats(&after)
	perKiB := func(b, a uint64) float64 { return float64(int64(a)-int64(b)) / streams / 1024 }
	heap, stack := perKiB(before.HeapInuse, after.HeapInuse), perKiB(before.StackInuse, after.StackInuse)
	t.Logf("per open stream: %.1f KiB heap + %.1f KiB stacks = %.1f KiB (race detector: %v)", heap, stack, heap+stack, raceDetector())
	if raceDetector() {
		return
	}
	if stack > 14 {
		t.Errorf("%.1f KiB of stacks per stream: the handler's stack no longer shrinks to 8 KiB (a frame on the path from conn.serve to the stream's select grew)", stack)
	}
	if heap+stack > 32 {
		t.Errorf("%.1f KiB per stream, over the 32 KiB budget", heap+stack)
	}
}
