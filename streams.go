package main

// The registry of open event streams and the fan-out of records to them
// (contract section 6). It knows who is subscribed, admits or refuses new
// streams, and hands each stream every record of its user exactly once. It
// never talks to the database: a source (source.go; listen.go for
// STREAM_SOURCE=notify) keeps the session up, asks the registry what to read
// (takeSnapshots) and hands it what it read or heard (deliver).

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
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

	// maxHeld bounds the live records held for a stream whose snapshot is
	// still being read. A snapshot that takes so long that more arrive than
	// this ends the stream as unavailable (its client reconnects) rather
	// than let it hold memory.
	maxHeld = 1024
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
	endReplaced // a newer stream of the same user took its place (STREAMS_PER_USER)
	numEndReasons
)

var endReasonNames = [numEndReasons]string{"token_expired", "key_removed", "shutting_down", "client_gone", "slow_consumer", "unavailable", "replaced"}

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

// delivery is one batch for one stream, written in this order: frames,
// then ready if it ends the snapshot, then after (the live records that
// arrived while the snapshot was being read).
type delivery struct {
	frames []*frame
	ready  bool
	after  []*frame
}

// stream is one open event stream as the hub sees it.
type stream struct {
	userID int64
	// ch carries the batches; the hub closes it to end the stream (reason
	// says why), after which nothing is sent on it.
	ch chan delivery

	// Guarded by hub.mu.
	reason endReason
	ready  bool     // its snapshot has been delivered
	gone   bool     // unsubscribed or kicked
	held   []*frame // live records that came before its snapshot
	sent   sentSet  // what it has been handed
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
// A user at STREAMS_PER_USER gets the stream anyway: the oldest one ends
// with replaced, so a phone whose old connections vanished or were
// suspended is never locked out by them.
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
	for len(h.users[userID]) >= h.cfg.perUser {
		h.kickLocked(h.users[userID][0], endReplaced)
	}
	if h.open >= h.cfg.maxStreams {
		return nil, &streamRefusal{503, "unavailable",
			"this instance has reached its limit of open event streams (STREAMS_MAX); retry shortly", 5}
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

// removeLocked takes st out of the registry. A user's list stays in
// subscription order: its first stream is the oldest, the one a new stream
// over the limit replaces.
func (h *hub) removeLocked(st *stream) {
	if st.gone {
		return
	}
	st.gone = true
	st.held = nil
	h.open--
	list := slices.DeleteFunc(h.users[st.userID], func(s *stream) bool { return s == st })
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

// deliver hands records to the streams. A ready stream of a record's user
// gets what it has not been sent. A stream still waiting for its snapshot
// holds them: the snapshot read may have started before they were committed
// (the wal source reads snapshots on another connection while it decodes),
// so they are handed over right after its snapshot and ready, less what the
// snapshot already had. Each stream in snap gets its user's records, ready,
// and what it held.
func (h *hub) deliver(snap []*stream, byUser map[int64][]*frame) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for uid, frames := range byUser {
		// A copy: sending may kick a stream out of the list.
		for _, st := range slices.Clone(h.users[uid]) {
			if st.ready {
				h.sendLocked(st, delivery{frames: st.sent.unsent(frames)})
			} else {
				h.holdLocked(st, frames)
			}
		}
	}
	for _, st := range snap {
		if st.gone {
			continue
		}
		if st.ready {
			// A second snapshot of a stream already served (a resync
			// that overlapped its first read): only what is new to it.
			h.sendLocked(st, delivery{frames: st.sent.unsent(byUser[st.userID])})
			continue
		}
		st.ready = true
		d := delivery{frames: st.sent.unsent(byUser[st.userID]), ready: true}
		d.after = st.sent.unsent(st.held)
		st.held = nil
		h.sendLocked(st, d)
	}
}

// holdLocked keeps live records for a stream whose snapshot is being read.
func (h *hub) holdLocked(st *stream, frames []*frame) {
	if len(st.held)+len(frames) > maxHeld {
		h.kickLocked(st, endUnavailable)
		return
	}
	st.held = append(st.held, frames...)
}

// sendLocked queues a batch. A stream whose queue is full has stopped
// reading: it is ended rather than allowed to hold memory.
func (h *hub) sendLocked(st *stream, d delivery) {
	if len(d.frames) == 0 && len(d.after) == 0 && !d.ready {
		return
	}
	select {
	case st.ch <- d:
	default:
		h.kickLocked(st, endSlowConsumer)
	}
}

// sentSet is the ids handed to one stream, with their expiry (unix s), so
// that none is sent twice. Forgetting is not keyed on any clock: the
// database's now() decides what a read returns, and a service clock that
// disagrees with it would forget an id the next resync still returns. It
// forgets only when it grows past sentCap, and then the half that expires
// first: an id forgotten so can come back only if every id kept is live
// too, that is with more than sentCap/2 live records of one user at once.
type sentSet map[int64]int64

const sentCap = 4096

// unsent returns the frames not sent yet and records them as sent.
func (s *sentSet) unsent(frames []*frame) []*frame {
	var out []*frame
	for _, f := range frames {
		if _, dup := (*s)[f.id]; dup {
			continue
		}
		if *s == nil {
			*s = make(sentSet)
		}
		(*s)[f.id] = f.expires
		out = append(out, f)
	}
	if len(*s) > sentCap {
		s.forgetEarliest()
	}
	return out
}

// forgetEarliest drops the half of the set that expires first.
func (s *sentSet) forgetEarliest() {
	type entry struct{ id, expires int64 }
	all := make([]entry, 0, len(*s))
	for id, exp := range *s {
		all = append(all, entry{id, exp})
	}
	slices.SortFunc(all, func(a, b entry) int { return cmp.Compare(a.expires, b.expires) })
	for _, e := range all[:len(all)/2] {
		delete(*s, e.id)
	}
}
