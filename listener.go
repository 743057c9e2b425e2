package main

// The one LISTEN session of the process and the fan-out of new records to
// the event streams of their user (contract section 6).
//
// One goroutine owns a dedicated *pgx.Conn on DATABASE_LISTEN_URL. It LISTENs,
// proves that notifications are really delivered, and then alternates between
// waiting for notifications and reading records on that same session: the
// snapshots new streams ask for, the records named by a batch of
// notifications, and after every reconnect the live records of every user
// with an open stream. Reading through the listening session itself is what
// makes the visibility argument hold: PostgreSQL delivers a notification only
// once the notifying transaction is committed and visible to new snapshots on
// that server, so a query that starts after the notification (or after the
// stream subscribed) sees the row. A replica behind DATABASE_URL might not have
// it yet, so the query pool is never used here. One session also means one
// connection per process, however many streams are open, and a stream that
// waits costs the database nothing.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// notifyChannel and the payload "<user_id>:<id>" are the shared decision
	// with the trigger `migrate` installs (threeds_records_notify_insert).
	notifyChannel = "threeds_records_inserted"
	notifyTrigger = "threeds_records_notify_insert"

	// streamBuffer is how many undelivered batches a stream may hold. A
	// stream further behind than that is a slow consumer and is ended: its
	// client reconnects and gets the live snapshot again.
	streamBuffer = 8

	// drainWindow is how long the listener keeps reading after a
	// notification so that notifications that arrived together (one
	// transaction inserting many rows, or a burst) become one read.
	drainWindow = time.Millisecond
	maxDrain    = 1000

	// sentGrace keeps a sent id a while past its expiry before forgetting
	// it, so a database clock ahead of ours cannot make an expired record
	// look new again.
	sentGrace = 60
)

// listenState is where the LISTEN session stands.
type listenState int

const (
	listenConnecting  listenState = iota // never up yet
	listenUp                             // listening, notifications proven to arrive
	listenDown                           // was up or never got there; retrying
	listenUnavailable                    // cannot work where DATABASE_LISTEN_URL points; retrying slowly
)

// endReason is why a stream ended: a metrics label and, for the ones the
// client is told about, the reason in `event: end`.
type endReason int

const (
	endTokenExpired endReason = iota
	endKeyRemoved
	endShuttingDown
	endClientGone
	endSlowConsumer
	endUnavailable
	numEndReasons
)

var endReasonNames = [numEndReasons]string{"token_expired", "key_removed", "shutting_down", "client_gone", "slow_consumer", "unavailable"}

func (r endReason) String() string { return endReasonNames[r] }

// eventType labels the events counter.
type eventType int

const (
	eventRecord eventType = iota
	eventReady
	eventEnd
	eventPing
	numEventTypes
)

var eventTypeNames = [numEventTypes]string{"record", "ready", "end", "ping"}

// hubConfig is what the listener and the streams need from the configuration.
type hubConfig struct {
	conn         *pgx.ConnConfig // DATABASE_LISTEN_URL
	maxStreams   int             // STREAMS_MAX
	perUser      int             // STREAMS_PER_USER
	heartbeat    time.Duration   // STREAM_HEARTBEAT
	queryTimeout time.Duration   // bound of one read on the session

	// probeTimeout bounds the wait for the self-probe after LISTEN; retryMin
	// and retryMax bound the backoff between attempts after a transient
	// failure, unavailableRetry the wait when LISTEN cannot work there.
	probeTimeout     time.Duration
	retryMin         time.Duration
	retryMax         time.Duration
	unavailableRetry time.Duration
}

func (c *hubConfig) setDefaults() {
	if c.maxStreams <= 0 {
		c.maxStreams = 10000
	}
	if c.perUser <= 0 {
		c.perUser = 5
	}
	if c.heartbeat <= 0 {
		c.heartbeat = 15 * time.Second
	}
	if c.queryTimeout <= 0 {
		c.queryTimeout = 10 * time.Second
	}
	if c.probeTimeout <= 0 {
		c.probeTimeout = 5 * time.Second
	}
	if c.retryMin <= 0 {
		c.retryMin = 100 * time.Millisecond
	}
	if c.retryMax <= 0 {
		c.retryMax = 5 * time.Second
	}
	if c.unavailableRetry <= 0 {
		c.unavailableRetry = 30 * time.Second
	}
}

// frame is one record event, encoded once per read and shared by every
// stream it goes to.
type frame struct {
	id       int64
	expires  int64     // unix seconds: received_at + expires_after
	notified time.Time // when its notification arrived; zero for a re-read
	data     []byte    // "event: record\nid: ...\ndata: ...\n\n"
}

// delivery is one batch for one stream; ready marks the end of its snapshot.
type delivery struct {
	frames []*frame
	ready  bool
}

// stream is one open event stream as the hub sees it.
type stream struct {
	userID int64
	// ch carries the batches; the hub closes it to end the stream (reason
	// says why), after which nothing is sent on it.
	ch chan delivery

	// Guarded by hub.mu.
	reason endReason
	ready  bool            // its snapshot has been delivered
	gone   bool            // unsubscribed or kicked
	sent   map[int64]int64 // id -> expiry (unix s) of every record handed to it
}

// streamRefusal is a subscription the hub turned down, as the HTTP answer.
type streamRefusal struct {
	status     int
	code       string
	details    string
	retryAfter int // seconds
}

// notification is one parsed payload.
type notification struct {
	userID, id int64
	at         time.Time
}

// hub owns the LISTEN session and the registry of open streams.
type hub struct {
	cfg    hubConfig
	logger *slog.Logger
	probe  string // this process's probe channel

	mu      sync.Mutex
	users   map[int64][]*stream
	open    int
	pending []*stream // subscribed, waiting for their snapshot
	resync  bool      // next read covers every user with an open stream
	wake    context.CancelFunc
	state   listenState
	why     string // details for a 503 while not up

	closing   chan struct{} // closed at shutdown: every stream ends at once
	closeOnce sync.Once
	stopOnce  sync.Once
	cancel    context.CancelFunc
	done      chan struct{}

	// noStatementTimeout: the target refused the statement_timeout startup
	// parameter (a pooler, see statementTimeoutFallback); connect without
	// it from then on. Reads stay bounded by their client-side deadline.
	noStatementTimeout atomic.Bool

	events        [numEventTypes]atomic.Int64
	ends          [numEndReasons]atomic.Int64
	lag           histogram
	reconnects    atomic.Int64
	reads         atomic.Int64
	notifications atomic.Int64
	badPayloads   atomic.Int64
}

func newHub(cfg hubConfig, logger *slog.Logger) *hub {
	cfg.setDefaults()
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &hub{
		cfg:     cfg,
		logger:  logger,
		probe:   "threeds_records_probe_" + hex.EncodeToString(b[:]),
		users:   make(map[int64][]*stream),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
		why:     "live updates are starting; retry shortly",
	}
}

// start runs the listener until stop.
func (h *hub) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go h.run(ctx)
}

// stop ends the listener and waits for it; streams are left alone.
func (h *hub) stop() {
	h.stopOnce.Do(func() {
		if h.cancel != nil {
			h.cancel()
			<-h.done
		}
	})
}

// shutdown ends every stream with shutting_down at once, refuses new ones,
// and stops the listener. The streams do not wait for the drain: their
// clients should reconnect to another replica now.
func (h *hub) shutdown() {
	h.closeOnce.Do(func() { close(h.closing) })
	h.stop()
}

// subscribe registers a stream for userID and asks the listener for its
// snapshot. Subscribing first and reading second is what keeps a record
// committed around the moment of connecting from falling between the two.
func (h *hub) subscribe(userID int64) (*stream, *streamRefusal) {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.closing:
		return nil, refuseShuttingDown
	default:
	}
	if h.state != listenUp {
		return nil, h.notListeningLocked()
	}
	if h.open >= h.cfg.maxStreams {
		return nil, &streamRefusal{503, "unavailable",
			"this instance has reached its limit of open event streams (STREAMS_MAX); retry shortly", 5}
	}
	if len(h.users[userID]) >= h.cfg.perUser {
		return nil, &streamRefusal{429, "too_many_streams",
			"this user already has " + strconv.Itoa(h.cfg.perUser) + " open event streams; close one before opening another", 5}
	}
	st := &stream{userID: userID, ch: make(chan delivery, streamBuffer)}
	h.users[userID] = append(h.users[userID], st)
	h.open++
	h.pending = append(h.pending, st)
	h.wakeLocked()
	return st, nil
}

var refuseShuttingDown = &streamRefusal{503, "unavailable",
	"the service is shutting down; reconnect to receive live updates from another instance", 1}

// available is subscribe's verdict without subscribing (HEAD).
func (h *hub) available() *streamRefusal {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.closing:
		return refuseShuttingDown
	default:
	}
	if h.state != listenUp {
		return h.notListeningLocked()
	}
	return nil
}

// notListeningLocked is the 503 while the session is not up: retry soon
// while it (re)connects, later when the configuration has to change.
func (h *hub) notListeningLocked() *streamRefusal {
	retry := 2
	if h.state == listenUnavailable {
		retry = 30
	}
	return &streamRefusal{503, "unavailable", h.why, retry}
}

// unsubscribe forgets a stream; safe to call after the hub kicked it.
func (h *hub) unsubscribe(st *stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.removeLocked(st)
}

func (h *hub) removeLocked(st *stream) {
	if st.gone {
		return
	}
	st.gone = true
	h.open--
	list := h.users[st.userID]
	for i, s := range list {
		if s == st {
			list[i] = list[len(list)-1]
			list[len(list)-1] = nil
			list = list[:len(list)-1]
			break
		}
	}
	if len(list) == 0 {
		delete(h.users, st.userID)
	} else {
		h.users[st.userID] = list
	}
}

// kickLocked ends a stream from the hub's side.
func (h *hub) kickLocked(st *stream, why endReason) {
	if st.gone {
		return
	}
	st.reason = why
	h.removeLocked(st)
	close(st.ch)
}

func (h *hub) wakeLocked() {
	if h.wake != nil {
		h.wake()
		h.wake = nil
	}
}

// openStreams is the gauge.
func (h *hub) openStreams() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.open
}

func (h *hub) listening() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.state == listenUp
}

// unavailableError is a LISTEN session that cannot work where it points:
// retrying soon will not help, the configuration has to change.
type unavailableError struct {
	details string // for the 503 body
	fix     string // for the log: what to set
	err     error
}

func (e *unavailableError) Error() string { return e.details + ": " + e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

const directSession = "DATABASE_LISTEN_URL must be a direct session to the primary"

// run keeps a LISTEN session up until ctx ends.
func (h *hub) run(ctx context.Context) {
	defer close(h.done)
	backoff := h.cfg.retryMin
	everUp := false
	for {
		up, err := h.session(ctx, everUp)
		if ctx.Err() != nil {
			h.setState(listenDown, "live updates are stopping", nil)
			return
		}
		if up {
			everUp = true
			backoff = h.cfg.retryMin
		}
		wait := backoff
		var un *unavailableError
		if errors.As(err, &un) {
			h.setState(listenUnavailable, "live updates are unavailable: "+un.details, un)
			wait = h.cfg.unavailableRetry
		} else {
			h.setState(listenDown, "live updates are reconnecting to the database; retry shortly", err)
			backoff = min(backoff*2, h.cfg.retryMax)
		}
		// Jitter, so the replicas of a fleet do not reconnect in step after
		// a failover.
		var b [1]byte
		_, _ = rand.Read(b[:])
		wait += wait * time.Duration(b[0]) / 1024
		select {
		case <-ctx.Done():
			h.setState(listenDown, "live updates are stopping", nil)
			return
		case <-time.After(wait):
		}
	}
}

// setState records a state change and logs it once. Entering "unavailable"
// ends the open streams: they would never receive anything, and their
// clients should fall back to polling the list.
func (h *hub) setState(st listenState, why string, err error) {
	h.mu.Lock()
	old, oldWhy := h.state, h.why
	h.state, h.why = st, why
	if st == listenUnavailable {
		for _, list := range h.users {
			for _, s := range append([]*stream(nil), list...) {
				h.kickLocked(s, endUnavailable)
			}
		}
		h.pending = h.pending[:0]
	}
	h.mu.Unlock()
	if old == st && oldWhy == why {
		return
	}
	listen := redactedConnURL(h.cfg.conn)
	switch st {
	case listenUp:
		if old == listenConnecting {
			h.logger.Info("live updates: listening for new records", "listen_database", listen)
		} else {
			h.logger.Info("live updates: listening again; re-reading what open streams missed", "listen_database", listen)
		}
	case listenDown:
		if err == nil {
			return
		}
		h.logger.Warn("live updates: the LISTEN session is down; reconnecting with backoff",
			"listen_database", listen, "error", err.Error())
	case listenUnavailable:
		var un *unavailableError
		errors.As(err, &un)
		h.logger.Error("live updates are unavailable; the list endpoint keeps working",
			"listen_database", listen, "reason", un.details, "set", un.fix, "error", un.err.Error())
	}
}

// session runs one LISTEN session: connect, LISTEN, probe, then serve reads
// until the connection fails. up reports whether it got as far as listening.
func (h *hub) session(ctx context.Context, everUp bool) (up bool, err error) {
	// incoming and probed are written by OnNotification, which pgx calls
	// on this goroutine from inside whatever call is reading the socket.
	var incoming []notification
	probed := false
	cfg := h.connConfig()
	cfg.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) {
		switch n.Channel {
		case notifyChannel:
			h.notifications.Add(1)
			if uid, id, ok := parsePayload(n.Payload); ok {
				incoming = append(incoming, notification{userID: uid, id: id, at: time.Now()})
			} else {
				h.badPayloads.Add(1)
			}
		case h.probe:
			probed = true
		}
	}
	// A LISTEN session is idle for long stretches; without keepalives a
	// peer that vanished (failover without a reset) would leave it waiting
	// for minutes. Keepalives cost the database no transaction.
	dialer := &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}}
	cfg.DialFunc = dialer.DialContext

	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil && h.refusedStatementTimeout(err) {
		delete(cfg.RuntimeParams, "statement_timeout")
		conn, err = pgx.ConnectConfig(ctx, cfg)
	}
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	pg := conn.PgConn()

	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel+"; LISTEN "+h.probe); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "25006" { // read_only_sql_transaction
			return false, &unavailableError{
				details: directSession + " (it points at a hot standby, which cannot LISTEN)",
				fix:     "DATABASE_LISTEN_URL to a direct session to the primary (not a standby, not a transaction-mode pooler)",
				err:     err,
			}
		}
		return false, fmt.Errorf("listen: %w", err)
	}

	// Prove that notifications reach this session: a pooler in transaction
	// mode accepts LISTEN but hands the server connection to other clients
	// afterwards, so nothing is ever delivered. The probe must come from
	// another session: a session's own NOTIFY reaches it even there.
	if err := h.sendProbe(ctx); err != nil {
		return false, fmt.Errorf("probe: %w", err)
	}
	deadline := time.Now().Add(h.cfg.probeTimeout)
	for !probed {
		wctx, cancel := context.WithDeadline(ctx, deadline)
		err := pg.WaitForNotification(wctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			if time.Now().Before(deadline) || pg.IsClosed() {
				return false, fmt.Errorf("wait for the probe: %w", err)
			}
			return false, &unavailableError{
				details: directSession + " (LISTEN was accepted but no notification arrived within " + h.cfg.probeTimeout.String() + ": a pooler in transaction mode?)",
				fix:     "DATABASE_LISTEN_URL to a direct session to the primary, bypassing PgBouncer or any transaction-mode pooler",
				err:     errors.New("the self-probe notification never arrived"),
			}
		}
	}

	qctx, cancel := context.WithTimeout(ctx, h.cfg.queryTimeout)
	var hasTrigger bool
	err = conn.QueryRow(qctx, `
SELECT EXISTS (SELECT 1 FROM pg_trigger
                WHERE tgrelid = to_regclass('threeds_records') AND tgname = $1 AND tgenabled <> 'D')`,
		notifyTrigger).Scan(&hasTrigger)
	cancel()
	if err != nil {
		return false, fmt.Errorf("look for the notify trigger: %w", err)
	}
	if !hasTrigger {
		return false, &unavailableError{
			details: "the database has no notify trigger on threeds_records; run `threeds-records migrate`",
			fix:     "run `threeds-records migrate` against the primary (it installs trigger " + notifyTrigger + ")",
			err:     errors.New("trigger " + notifyTrigger + " is missing or disabled"),
		}
	}

	// LISTEN came first, so everything committed from here on is notified;
	// re-reading the live records of every open stream now covers whatever
	// was committed while no session was listening.
	h.mu.Lock()
	h.resync = true
	h.mu.Unlock()
	if everUp {
		h.reconnects.Add(1)
	}
	h.setState(listenUp, "", nil)

	for {
		w, consumed := h.takeWork(incoming)
		incoming = incoming[:copy(incoming, incoming[consumed:])]
		if !w.empty() {
			if err := h.read(ctx, conn, w); err != nil {
				return true, err
			}
			continue
		}
		if len(incoming) > 0 {
			continue // notifications of users without streams: nothing to read
		}

		h.mu.Lock()
		if h.resync || len(h.pending) > 0 {
			h.mu.Unlock()
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		h.wake = cancel
		h.mu.Unlock()
		err := pg.WaitForNotification(wctx)
		h.mu.Lock()
		h.wake = nil
		h.mu.Unlock()
		woken := wctx.Err() != nil
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return true, ctx.Err()
			}
			// A wake-up interrupts the read with a deadline; pgx leaves the
			// connection usable after a timeout.
			if woken && !pg.IsClosed() {
				continue
			}
			return true, fmt.Errorf("wait for notification: %w", err)
		}
		// Batching only pays when there is something to read: the writer's
		// notifications for users nobody streams are most of them, and a
		// timed drain after each would cost a timer, a deadline and a
		// wake-up apiece (about 70 µs of CPU per notification measured by
		// make bench's pgbench phase).
		if h.streamedAmong(incoming) {
			if err := h.drain(ctx, pg); err != nil {
				return true, err
			}
		}
	}
}

// drain reads whatever notifications arrived together with the first one.
func (h *hub) drain(ctx context.Context, pg *pgconn.PgConn) error {
	for range maxDrain {
		dctx, cancel := context.WithTimeout(ctx, drainWindow)
		err := pg.WaitForNotification(dctx)
		timedOut := dctx.Err() != nil
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if timedOut && !pg.IsClosed() {
				return nil
			}
			return fmt.Errorf("wait for notification: %w", err)
		}
	}
	return nil
}

// connConfig is a copy of DATABASE_LISTEN_URL's settings for one connection.
func (h *hub) connConfig() *pgx.ConnConfig {
	cfg := h.cfg.conn.Copy()
	if h.noStatementTimeout.Load() {
		delete(cfg.RuntimeParams, "statement_timeout")
	}
	return cfg
}

// refusedStatementTimeout reports a pooler's refusal of the statement_timeout
// startup parameter; the next attempt goes without it, and the self-probe
// then tells whether LISTEN works there. No log line of its own: when the
// pooler is DATABASE_URL's too, the pool's warning has said it once, and
// otherwise the probe's verdict says what to set.
func (h *hub) refusedStatementTimeout(err error) bool {
	if !refusesStatementTimeout(err) {
		return false
	}
	h.noStatementTimeout.Store(true)
	return true
}

// sendProbe notifies the probe channel from a session of its own.
func (h *hub) sendProbe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.probeTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, h.connConfig())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	// No parameters: the simple protocol, which works through any pooler.
	_, err = conn.Exec(ctx, "NOTIFY "+h.probe)
	return err
}

// parsePayload reads "<user_id>:<id>", both positive decimal int64.
func parsePayload(s string) (userID, id int64, ok bool) {
	u, i, found := strings.Cut(s, ":")
	if !found {
		return 0, 0, false
	}
	var err error
	if userID, err = strconv.ParseInt(u, 10, 64); err != nil || userID <= 0 {
		return 0, 0, false
	}
	if id, err = strconv.ParseInt(i, 10, 64); err != nil || id <= 0 {
		return 0, 0, false
	}
	return userID, id, true
}

// work is one read: every live record of users (snapshots, resync) and the
// records named by ids (notifications), for the streams in snap and for
// every ready stream of the users the rows belong to.
type work struct {
	users    []int64
	snap     []*stream
	ids      []int64
	notified map[int64]time.Time
}

func (w *work) empty() bool { return len(w.users) == 0 && len(w.ids) == 0 }

// takeWork collects what the next read covers and reports how many of
// incoming it consumed. Notifications of users without an open stream are
// dropped here: no read for them (a stream that subscribes later reads its
// snapshot after the record was committed, so it sees it).
// streamedAmong reports whether a notification in incoming is for a user
// with an open stream.
func (h *hub) streamedAmong(incoming []notification) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, n := range incoming {
		if len(h.users[n.userID]) > 0 {
			return true
		}
	}
	return false
}

func (h *hub) takeWork(incoming []notification) (w work, consumed int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var userSet map[int64]struct{}
	if h.resync || len(h.pending) > 0 {
		userSet = make(map[int64]struct{})
	}
	if h.resync {
		h.resync = false
		for uid, list := range h.users {
			userSet[uid] = struct{}{}
			for _, st := range list {
				if !st.ready {
					w.snap = append(w.snap, st)
				}
			}
		}
		h.pending = h.pending[:0]
	} else if len(h.pending) > 0 {
		for _, st := range h.pending {
			if !st.gone {
				w.snap = append(w.snap, st)
				userSet[st.userID] = struct{}{}
			}
		}
		clear(h.pending)
		h.pending = h.pending[:0]
	}
	for _, n := range incoming {
		if consumed == maxDrain {
			break
		}
		consumed++
		if len(h.users[n.userID]) == 0 {
			continue
		}
		if w.notified == nil {
			w.notified = make(map[int64]time.Time)
		}
		if _, dup := w.notified[n.id]; !dup {
			w.notified[n.id] = n.at
			w.ids = append(w.ids, n.id)
		}
	}
	for uid := range userSet {
		w.users = append(w.users, uid)
	}
	return w, consumed
}

// liveRecordsSQL reads, in one round trip, every live record of the users in
// $1 and the live ones among the ids in $2, oldest first. The row's own
// user_id routes it, never the payload.
const liveRecordsSQL = `
SELECT user_id, id, passcode, amount::text, currency, COALESCE(merchant_name, ''),
       expires_after, received_at, received_at + expires_after * interval '1 second'
  FROM threeds_records
 WHERE (user_id = ANY($1) OR id = ANY($2))
   AND received_at + expires_after * interval '1 second' > now()
 ORDER BY received_at, id`

func (h *hub) read(ctx context.Context, conn *pgx.Conn, w work) error {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.queryTimeout)
	defer cancel()
	h.reads.Add(1)
	users, ids := w.users, w.ids
	if users == nil {
		users = []int64{}
	}
	if ids == nil {
		ids = []int64{}
	}
	rows, err := conn.Query(ctx, liveRecordsSQL, users, ids)
	if err != nil {
		return fmt.Errorf("read records: %w", err)
	}
	byUser := make(map[int64][]*frame)
	var (
		userID, id, expiresAfter             int64
		passcode, amount, currency, merchant string
		receivedAt, expiresAt                time.Time
	)
	for rows.Next() {
		if err := rows.Scan(&userID, &id, &passcode, &amount, &currency, &merchant, &expiresAfter, &receivedAt, &expiresAt); err != nil {
			rows.Close()
			return fmt.Errorf("read records: %w", err)
		}
		rec := newRecord(id, passcode, amount, currency, merchant, expiresAfter, receivedAt)
		byUser[userID] = append(byUser[userID], &frame{
			id: id, expires: expiresAt.Unix(), notified: w.notified[id], data: recordFrame(&rec),
		})
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read records: %w", err)
	}
	h.deliver(w, byUser)
	return nil
}

// recordFrame is the SSE event for one record; data is exactly what the list
// endpoint shows for it (the same encoder), on one line.
func recordFrame(r *Record) []byte {
	b := make([]byte, 0, 64+len(r.Passcode)+len(r.Amount)+len(r.MerchantName)+64)
	b = append(b, "event: record\nid: "...)
	b = strconv.AppendInt(b, r.ID, 10)
	b = append(b, "\ndata: "...)
	b = appendRecord(b, r)
	return append(b, "\n\n"...)
}

// deliver hands the rows to the streams: ready streams of each row's user
// get what they have not been sent; each snapshot stream gets all its user's
// rows and then ready. Streams still waiting for a snapshot that is not part
// of this read get nothing: their snapshot starts later and will see these
// rows, which were committed before their notification arrived.
func (h *hub) deliver(w work, byUser map[int64][]*frame) {
	now := time.Now().Unix()
	h.mu.Lock()
	defer h.mu.Unlock()
	for uid, frames := range byUser {
		for _, st := range append([]*stream(nil), h.users[uid]...) {
			if st.ready {
				h.sendLocked(st, frames, false, now)
			}
		}
	}
	for _, st := range w.snap {
		if st.gone {
			continue
		}
		st.ready = true
		h.sendLocked(st, byUser[st.userID], true, now)
	}
}

// sendLocked queues the frames st has not had yet. A stream whose queue is
// full has stopped reading: it is ended rather than allowed to hold memory.
func (h *hub) sendLocked(st *stream, frames []*frame, ready bool, now int64) {
	for id, exp := range st.sent {
		if exp+sentGrace < now {
			delete(st.sent, id)
		}
	}
	var out []*frame
	for _, f := range frames {
		if _, dup := st.sent[f.id]; dup {
			continue
		}
		if st.sent == nil {
			st.sent = make(map[int64]int64)
		}
		st.sent[f.id] = f.expires
		out = append(out, f)
	}
	if len(out) == 0 && !ready {
		return
	}
	select {
	case st.ch <- delivery{frames: out, ready: ready}:
	default:
		h.kickLocked(st, endSlowConsumer)
	}
}

// redactedConnURL is a connection's target fit for a log line.
func redactedConnURL(cc *pgx.ConnConfig) string {
	return fmt.Sprintf("postgres://%s:xxxxx@%s/%s", cc.User, net.JoinHostPort(cc.Host, strconv.Itoa(int(cc.Port))), cc.Database)
}
