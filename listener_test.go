package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestListenReadsEachNewRecordOnceForAllStreamsOfItsUser(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	var streams []*sseStream
	for range 4 {
		s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
		streams = append(streams, s)
	}
	for _, u := range []int64{1002, 1003} {
		mustOpenStream(t, svc.URL, svc.tokenFor(t, u))
	}
	before := svc.hub.reads.Load()
	insertRows(t, svc.pool, liveRow(1, 1001))
	for i, s := range streams {
		if got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != 1 {
			t.Errorf("stream %d got %v", i, got)
		}
	}
	if n := svc.hub.reads.Load() - before; n != 1 {
		t.Errorf("one record for a user with 4 streams took %d reads, want 1", n)
	}
}

func TestListenIdleStreamsCostTheDatabaseNothing(t *testing.T) {
	const heartbeat = 100 * time.Millisecond
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.heartbeat = heartbeat }})
	admin := newTestPool(t, svc.dsn, nil)
	for u := int64(1); u <= 5; u++ {
		mustOpenStream(t, svc.URL, svc.tokenFor(t, u))
	}
	reads := svc.hub.reads.Load()
	_, before := listenBackendState(t, admin)
	time.Sleep(10 * heartbeat) // ten heartbeats on each of five streams
	state, after := listenBackendState(t, admin)
	if n := svc.hub.reads.Load() - reads; n != 0 {
		t.Errorf("idle streams caused %d reads", n)
	}
	if state != "idle" || !after.Equal(before) {
		t.Errorf("the LISTEN backend ran statements while every stream was idle: state %s, state_change %s -> %s", state, before, after)
	}
	if pings := svc.hub.events[eventPing].Load(); pings < 5 {
		t.Errorf("only %d pings: the streams were not exercised", pings)
	}
}

// New streams' snapshots are read on the source's read connection: on the
// LISTEN session they took turns with the notified records, and a burst of
// connects held a ready stream's new passcode behind thousands of them.
func TestListenSessionRunsNoSnapshotReads(t *testing.T) {
	if testStreamSource(t) != sourceNotify {
		t.Skip("the wal source's replication connection runs no statements at all")
	}
	svc := newStreamService(t, streamOptions{})
	admin := newTestPool(t, svc.dsn, nil)
	_, before := listenBackendState(t, admin)
	reads := svc.hub.reads.Load()
	users := make([]int64, 200)
	for i := range users {
		users[i] = int64(3000 + i)
	}
	c, streams := subscribeAll(t, svc.hub, users)
	waitFor(t, 10*time.Second, "every stream to be ready", func() bool {
		return c.count(func(st *stream) bool { return c.ready[st] }, streams) == len(streams)
	})
	if svc.hub.reads.Load() == reads {
		t.Fatal("no snapshot was read")
	}
	if state, after := listenBackendState(t, admin); state != "idle" || !after.Equal(before) {
		t.Errorf("the LISTEN backend ran statements for %d snapshots: state %s, state_change %s -> %s", len(users), state, before, after)
	}
}

func TestListenReadsNotificationsThatArriveTogetherInOneRead(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	before := svc.hub.reads.Load()
	// One transaction, fifty rows: fifty notifications delivered at commit.
	_, err := svc.pool.Exec(context.Background(), `
INSERT INTO threeds_records (user_id, passcode, amount, currency, expires_after, received_at)
SELECT 1001, '123456', 1, 'USD', 3600, now() FROM generate_series(1, 50)`)
	if err != nil {
		t.Fatal(err)
	}
	got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 50 })
	reads := svc.hub.reads.Load() - before
	t.Logf("50 notifications of one commit: %d read(s)", reads)
	// One is the rule; a loaded machine may split the socket reads.
	if reads > 3 {
		t.Errorf("50 notifications that arrived together took %d reads", reads)
	}
	for i, id := range got {
		if id != int64(i+1) {
			t.Fatalf("ids %v, want 1..50 in order", got)
		}
	}
}

// The drain after a notification batches what arrives with it; a writer that
// never pauses must not hold the first notification back until it does (or
// until maxDrain have arrived).
func TestListenDrainEndsWhileNotificationsKeepComing(t *testing.T) {
	dsn := newTestDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var heard atomic.Int64
	got := make(chan struct{}, 1)
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.OnNotification = func(*pgconn.PgConn, *pgconn.Notification) {
		heard.Add(1)
		select {
		case got <- struct{}{}:
		default:
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		t.Fatal(err)
	}
	writer, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close(context.Background())
	// The writer never pauses: each notification goes as soon as the one
	// before was heard, a round trip apart (well under drainWindow), and
	// none piles up unread.
	wctx, stopWriter := context.WithCancel(ctx)
	written := make(chan error, 1)
	go func() {
		for i := 1; ; i++ {
			if _, err := writer.Exec(wctx, "SELECT pg_notify($1, $2)", notifyChannel, fmt.Sprintf("1:%d", i)); err != nil {
				if wctx.Err() != nil {
					err = nil
				}
				written <- err
				return
			}
			select {
			case <-got:
			case <-wctx.Done():
				written <- nil
				return
			}
		}
	}()
	defer func() {
		stopWriter()
		if err := <-written; err != nil {
			t.Errorf("notify: %v", err)
		}
	}()

	if err := conn.PgConn().WaitForNotification(ctx); err != nil {
		t.Fatal(err)
	}
	before := heard.Load()
	if err := (&notifySource{}).drain(ctx, conn.PgConn()); err != nil {
		t.Fatal(err)
	}
	n := heard.Load() - before
	t.Logf("the drain read %d notifications", n)
	if n >= maxDrain/2 {
		t.Errorf("the drain read %d notifications before it let the first be served: it waits for the writer to pause", n)
	}
}

func TestListenReadsNothingForUsersWithoutStreams(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	reads, notes := svc.hub.reads.Load(), svc.hub.notifications.Load()
	insertRows(t, svc.pool, liveRow(1, 5000), liveRow(2, 5001))
	waitFor(t, 10*time.Second, "the notifications", func() bool { return svc.hub.notifications.Load() == notes+2 })
	insertRows(t, svc.pool, liveRow(3, 1001))
	s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 })
	if n := svc.hub.reads.Load() - reads; n != 1 {
		t.Errorf("%d reads, want 1 (only the record of the user with a stream)", n)
	}
}

func TestListenEndsAStreamThatStopsReading(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	st, ref := svc.hub.subscribe(1001)
	if ref != nil {
		t.Fatalf("subscribe: %+v", ref)
	}
	if d := <-st.ch; !d.ready {
		t.Fatal("the first delivery is not the snapshot")
	}
	// Nobody reads st.ch now. Each commit is a batch of its own; one more
	// than the buffer holds ends the stream.
	for i := range streamBuffer + 1 {
		insertRows(t, svc.pool, liveRow(int64(i+1), 1001))
		waitFor(t, 10*time.Second, "the batch", func() bool { return svc.hub.reads.Load() >= int64(i+2) })
	}
	waitFor(t, 10*time.Second, "the stream to be ended", func() bool {
		svc.hub.mu.Lock()
		defer svc.hub.mu.Unlock()
		return st.gone
	})
	queued := 0
	for range st.ch { // the batches queued before the end, then the close
		queued++
	}
	if queued != streamBuffer {
		t.Errorf("%d batches were queued, want the buffer's %d", queued, streamBuffer)
	}
	svc.hub.mu.Lock()
	reason := st.reason
	svc.hub.mu.Unlock()
	if reason != endSlowConsumer {
		t.Errorf("reason %s, want slow_consumer", reason)
	}
	if n := svc.hub.openStreams(); n != 0 {
		t.Errorf("%d streams still registered", n)
	}
	svc.hub.unsubscribe(st) // what the handler does after; must be harmless
	if n := svc.hub.openStreams(); n != 0 {
		t.Errorf("a second unsubscribe changed the count to %d", n)
	}
}

func TestParsePayloadAcceptsOnlyTwoPositiveDecimalIDs(t *testing.T) {
	for _, tc := range []struct {
		payload  string
		user, id int64
		ok       bool
	}{
		{"1001:42", 1001, 42, true},
		{"9223372036854775807:1", 9223372036854775807, 1, true},
		{"0:1", 0, 0, false},
		{"1:0", 0, 0, false},
		{"-1:2", 0, 0, false},
		{"1:-2", 0, 0, false},
		{"a:1", 0, 0, false},
		{"1:", 0, 0, false},
		{":1", 0, 0, false},
		{"12", 0, 0, false},
		{"1:2:3", 0, 0, false},
		{" 1:2", 0, 0, false},
		{"9223372036854775808:1", 0, 0, false},
		{"", 0, 0, false},
	} {
		user, id, ok := parsePayload(tc.payload)
		if ok != tc.ok || user != tc.user || id != tc.id {
			t.Errorf("parsePayload(%q) = %d, %d, %v", tc.payload, user, id, ok)
		}
	}
}

func TestStreamMetricsCountStreamsEventsEndsAndLag(t *testing.T) {
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.heartbeat = 200 * time.Millisecond }})
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	insertRows(t, svc.pool, liveRow(1, 1001))
	s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 })
	if ev, _ := s.next(t, 2*time.Second); ev.comment != "ping" {
		t.Fatalf("want a ping, got %v", ev)
	}

	// Counters move right after the flush the client already saw.
	waitFor(t, 5*time.Second, "the counters", func() bool {
		return svc.hub.events[eventPing].Load() >= 1 && (svc.hub.lag.counts[len(latencyBuckets)].Load() > 0 || svc.hub.lag.sum.load() > 0)
	})
	m := parseExposition(t, scrapeText(t, svc.URL))
	for _, c := range []struct {
		name string
		kv   []string
		min  float64
	}{
		{"threeds_streams_open", nil, 1},
		{"threeds_stream_events_total", []string{"type", "record"}, 1},
		{"threeds_stream_events_total", []string{"type", "ready"}, 1},
		{"threeds_stream_events_total", []string{"type", "ping"}, 1},
		{"threeds_stream_notify_lag_seconds_count", nil, 1},
		{"threeds_stream_source_up", nil, 1},
		{"threeds_listen_notifications_total", nil, 1},
		{"threeds_stream_source_reads_total", nil, 2},
	} {
		if v := m.value(t, c.name, c.kv...); v < c.min {
			t.Errorf("%s%v = %v, want at least %v", c.name, c.kv, v, c.min)
		}
	}
	for _, typ := range []string{"threeds_streams_open", "threeds_stream_source_up"} {
		if m.types[typ] != "gauge" {
			t.Errorf("%s is a %q", typ, m.types[typ])
		}
	}
	if m.types["threeds_stream_notify_lag_seconds"] != "histogram" {
		t.Error("the lag is not a histogram")
	}

	s.close()
	waitFor(t, 5*time.Second, "the stream to be gone", func() bool { return svc.hub.openStreams() == 0 })
	m = parseExposition(t, scrapeText(t, svc.URL))
	if v := m.value(t, "threeds_stream_ends_total", "reason", "client_gone"); v != 1 {
		t.Errorf("ends{client_gone} = %v, want 1", v)
	}
	if v := m.value(t, "threeds_streams_open"); v != 0 {
		t.Errorf("streams_open = %v after the client left", v)
	}
	for _, reason := range endReasonNames {
		if _, ok := m.find("threeds_stream_ends_total", "reason", reason); !ok {
			t.Errorf("no threeds_stream_ends_total{reason=%q}", reason)
		}
	}

	// A server without live updates still exposes the families, at zero.
	plain := newTestService(t)
	resp, _ := plain.do(t, http.MethodGet, "/metrics", "")
	if resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	if v := parseExposition(t, scrapeText(t, plain.URL)).value(t, "threeds_stream_source_up"); v != 0 {
		t.Errorf("listen_up = %v without a hub", v)
	}
}

func TestTheNotifySourceRefusesATriggerThatWouldNeverFire(t *testing.T) {
	for _, tc := range []struct{ name, sql string }{
		{"a dropped trigger", "DROP TRIGGER threeds_records_notify_insert ON threeds_records"},
		{"a disabled trigger", "ALTER TABLE threeds_records DISABLE TRIGGER threeds_records_notify_insert"},
		// ENABLE REPLICA fires only for replication sessions
		// (session_replication_role = replica): never for the writer.
		{"a trigger enabled for replicas only", "ALTER TABLE threeds_records ENABLE REPLICA TRIGGER threeds_records_notify_insert"},
	} {
		t.Run(tc.name+" is a 503 saying to run migrate", func(t *testing.T) {
			dsn := newTestDB(t)
			pool := newTestPool(t, dsn, nil)
			if _, err := pool.Exec(context.Background(), tc.sql); err != nil {
				t.Fatal(err)
			}
			hc := testHubConfig(t, dsn)
			hc.source = sourceNotify
			h := newHub(hc, discardLogger())
			h.start()
			t.Cleanup(h.shutdown)
			var ref *streamRefusal
			waitFor(t, 15*time.Second, "the source to give its verdict", func() bool {
				st, r := h.subscribe(1001)
				if st != nil {
					h.unsubscribe(st)
					ref = nil
					return true
				}
				ref = r
				h.mu.Lock()
				defer h.mu.Unlock()
				return h.state == sourceUnavailable
			})
			if ref == nil || ref.status != http.StatusServiceUnavailable || !strings.Contains(ref.details, "run `threeds-records migrate`") {
				t.Fatalf("refusal %+v, want a 503 saying to run migrate", ref)
			}
		})
	}
}

func TestANewRecordForAReadyStreamDoesNotWaitForABurstOfSnapshots(t *testing.T) {
	// A restarted replica's clients all reconnect at once: 10,000 snapshots
	// are 20 batches on the source session. A stream that is already ready
	// must get its new record between them, not after the last.
	const burst = 10000
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.maxStreams = burst + 10 }})
	ctx := context.Background()
	mine, ref := svc.hub.subscribe(1)
	if ref != nil {
		t.Fatalf("subscribe: %+v", ref)
	}
	t.Cleanup(func() { svc.hub.unsubscribe(mine) })
	select {
	case d := <-mine.ch:
		if !d.ready {
			t.Fatalf("first delivery %+v, want ready", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no ready within 10 s")
	}

	// The record is committed while the first snapshot batch waits for the
	// table: it is heard of before most of the burst has been read.
	tx, err := svc.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	// A durable commit, as the card issuer's writer makes: the throwaway
	// cluster's asynchronous ones reach a WAL sender only when the walwriter
	// flushes them, up to 200 ms later.
	if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on; LOCK TABLE threeds_records IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	id := insertNow(t, tx, 1)
	var others []*stream
	for u := int64(2); u < 2+burst; u++ {
		st, ref := svc.hub.subscribe(u)
		if ref != nil {
			t.Fatalf("subscribe %d: %+v", u, ref)
		}
		others = append(others, st)
		t.Cleanup(func() { svc.hub.unsubscribe(st) })
	}
	waitFor(t, 10*time.Second, "the first snapshot read to wait for the lock", func() bool {
		var waiting bool
		err := svc.pool.QueryRow(ctx, `
SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'
                  AND application_name LIKE 'threeds-records-listen%')`).Scan(&waiting)
		return err == nil && waiting
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	select {
	case d := <-mine.ch:
		// Counted under the registry's lock: every ready before this
		// delivery was set before it was sent.
		svc.hub.mu.Lock()
		ready := 0
		for _, st := range others {
			if st.ready {
				ready++
			}
		}
		svc.hub.mu.Unlock()
		if len(d.frames) != 1 || d.frames[0].id != id {
			t.Fatalf("got %d frames, want record %d", len(d.frames), id)
		}
		t.Logf("the record arrived when %d of the %d other streams were ready", ready, burst)
		if ready == burst {
			t.Errorf("the record waited until all %d snapshots of the burst had been served", burst)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the record did not arrive within 20 s")
	}
}

// listenBackendState is the LISTEN backend's state and state_change, which
// moves whenever it runs a statement.
func listenBackendState(t *testing.T, admin *pgxpool.Pool) (state string, changed time.Time) {
	t.Helper()
	err := admin.QueryRow(context.Background(), `
SELECT state, state_change FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'threeds-records-listen'`).Scan(&state, &changed)
	if err != nil {
		t.Fatalf("the LISTEN backend: %v", err)
	}
	return state, changed
}
