package main

// The registry of open event streams and the fan-out of records to them
// (contract section 6). It knows who is subscribed, admits or refuses new
// streams, and hands each stream every record of its user exactly once. It
// never talks to the database: a source (source.go; listen.go for
// STREAM_SOURCE=notify) keeps the session up, asks the registry what to read
// (takeSnapshots) and hands it what it read or heard (deliver).

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// streamBuffer is how many undelivered batches a stream may hold. A
	// stream further behind than that is a slow consumer and is ended: its
	// client reconnects and gets the live snapshot again.
	streamBuffer = 8

	// sentGrace keeps a sent id a while past its expiry before forgetting
	// it, so a database clock ahead of ours cannot make an expired record
	// look new again.
	sentGrace = 60
)

// sourceState is where the source session stands.
type sourceState int

const (
	sourceConnecting  sourceState = iota // never up yet
	sourceUp                             // subscribed, new records proven to arrive
	sourceDown                           // was up or never got there; retrying
	sourceUnavailable                    // cannot work where DATABASE_LISTEN_URL points; retrying slowly
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

// Where new records come from (STREAM_SOURCE).
const (
	sourceNotify = "notify"
	sourceWAL    = "wal"
)

// hubConfig is what the source and the streams need from the configuration.
type hubConfig struct {
	source       string          // STREAM_SOURCE: sourceNotify (default) or sourceWAL
	conn         *pgx.ConnConfig // DATABASE_LISTEN_URL
	maxStreams   int             // STREAMS_MAX
	perUser      int             // STREAMS_PER_USER
	heartbeat    time.Duration   // STREAM_HEARTBEAT
	queryTimeout time.Duration   // bound of one read on the session

	// probeTimeout bounds the wait for the self-probe after LISTEN; retryMin
	// and retryMax bound the backoff between attempts after a transient
	// failure, unavailableRetry the wait when the source cannot work there.
	probeTimeout     time.Duration
	retryMin         time.Duration
	retryMax         time.Duration
	unavailableRetry time.Duration
}

func (c *hubConfig) setDefaults() {
	if c.source == "" {
		c.source = sourceNotify
	}
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

// frame is one record event, encoded once and shared by every stream it
// goes to.
type frame struct {
	id       int64
	expires  int64     // unix seconds: received_at + expires_after
	notified time.Time // when the source heard of it; zero for a re-read
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

// hub owns the registry of open streams and runs the source that feeds it.
type hub struct {
	cfg    hubConfig
	logger *slog.Logger
	src    recordSource

	mu      sync.Mutex
	users   map[int64][]*stream
	open    int
	pending []*stream // subscribed, waiting for their snapshot
	resync  bool      // next snapshot read covers every user with an open stream
	wake    context.CancelFunc
	state   sourceState
	why     string // details for a 503 while not up

	closing   chan struct{} // closed at shutdown: every stream ends at once
	closeOnce sync.Once
	stopOnce  sync.Once
	cancel    context.CancelFunc
	done      chan struct{}

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
	h := &hub{
		cfg:     cfg,
		logger:  logger,
		users:   make(map[int64][]*stream),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
		why:     "live updates are starting; retry shortly",
	}
	h.src = newSource(h)
	return h
}

// start runs the source until stop.
func (h *hub) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go h.run(ctx)
}

// stop ends the source and waits for it; streams are left alone.
func (h *hub) stop() {
	h.stopOnce.Do(func() {
		if h.cancel != nil {
			h.cancel()
			<-h.done
		}
	})
}

// shutdown ends every stream with shutting_down at once, refuses new ones,
// and stops the source. The streams do not wait for the drain: their
// clients should reconnect to another replica now.
func (h *hub) shutdown() {
	h.closeOnce.Do(func() { close(h.closing) })
	h.stop()
}

// subscribe registers a stream for userID and asks the source for its
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
	if h.state != sourceUp {
		return nil, h.notUpLocked()
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
	if h.state != sourceUp {
		return h.notUpLocked()
	}
	return nil
}

// notUpLocked is the 503 while the source is not up: retry soon while it
// (re)connects, later when the configuration has to change.
func (h *hub) notUpLocked() *streamRefusal {
	retry := 2
	if h.state == sourceUnavailable {
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

// listening reports whether the source is up (the name predates STREAM_SOURCE).
func (h *hub) listening() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.state == sourceUp
}

// --- what a source calls ---

// waitForWork returns a context that is cancelled when a stream subscribes,
// so a source blocked on its session wakes to read the snapshot; busy is
// true when there is already something to read (then no context is armed).
func (h *hub) waitForWork(ctx context.Context) (wctx context.Context, cancel context.CancelFunc, busy bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.resync || len(h.pending) > 0 {
		return nil, nil, true
	}
	wctx, cancel = context.WithCancel(ctx)
	h.wake = cancel
	return wctx, cancel, false
}

// doneWaiting disarms waitForWork's context.
func (h *hub) doneWaiting() {
	h.mu.Lock()
	h.wake = nil
	h.mu.Unlock()
}

// requestResync makes the next snapshot read cover every open stream: what
// a source calls once it is subscribed again after a gap.
func (h *hub) requestResync() {
	h.mu.Lock()
	h.resync = true
	h.mu.Unlock()
}

// takeSnapshots says which users' live records the next read must cover and
// which streams that read completes (their snapshot). After a resync
// request that is every user with an open stream.
func (h *hub) takeSnapshots() (users []int64, snap []*stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.resync && len(h.pending) == 0 {
		return nil, nil
	}
	userSet := make(map[int64]struct{})
	if h.resync {
		h.resync = false
		for uid, list := range h.users {
			userSet[uid] = struct{}{}
			for _, st := range list {
				if !st.ready {
					snap = append(snap, st)
				}
			}
		}
	} else {
		for _, st := range h.pending {
			if !st.gone {
				snap = append(snap, st)
				userSet[st.userID] = struct{}{}
			}
		}
	}
	clear(h.pending)
	h.pending = h.pending[:0]
	for uid := range userSet {
		users = append(users, uid)
	}
	return users, snap
}

// streamed reports whether userID has an open stream.
func (h *hub) streamed(userID int64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.users[userID]) > 0
}

// deliver hands records to the streams: ready streams of each record's user
// get what they have not been sent; each snapshot stream gets all its
// user's records and then ready. Streams still waiting for a snapshot that
// is not part of this read get nothing: their snapshot starts later and
// will see these records, which were committed before the source heard of
// them.
func (h *hub) deliver(snap []*stream, byUser map[int64][]*frame) {
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
	for _, st := range snap {
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
