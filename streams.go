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
	"slices"
	"sync"
	"time"
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

// registry is who is subscribed: a user's streams in subscription order,
// the streams waiting for a snapshot, and the source's state for the 503s.
type registry struct {
	maxStreams int // STREAMS_MAX
	perUser    int // STREAMS_PER_USER

	mu      sync.Mutex
	users   map[int64][]*stream
	open    int
	pending []*stream // subscribed, waiting for their snapshot
	resync  bool      // next snapshot read covers every user with an open stream
	catchUp int64     // > 0: first read the newest records with a larger id (after a gap)
	wake    context.CancelFunc
	state   sourceState
	why     string // details for a 503 while not up

	closing   chan struct{} // closed when draining starts: every stream ends at once
	closeOnce sync.Once
}

// closeAll ends every stream with shutting_down and refuses new ones.
func (r *registry) closeAll() {
	r.closeOnce.Do(func() { close(r.closing) })
}

// subscribe registers a stream for userID and asks the source for its
// snapshot. Subscribing first and reading second is what keeps a record
// committed around the moment of connecting from falling between the two.
// A user at STREAMS_PER_USER gets the stream anyway: the oldest one ends
// with replaced, so a phone whose old connections vanished or were
// suspended is never locked out by them.
func (r *registry) subscribe(userID int64) (*stream, *streamRefusal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-r.closing:
		return nil, refuseShuttingDown
	default:
	}
	if r.state != sourceUp {
		return nil, r.notUpLocked()
	}
	for len(r.users[userID]) >= r.perUser {
		r.kickLocked(r.users[userID][0], endReplaced)
	}
	if r.open >= r.maxStreams {
		return nil, &streamRefusal{503, "unavailable",
			"this instance has reached its limit of open event streams (STREAMS_MAX); retry shortly", 5}
	}
	st := &stream{userID: userID, ch: make(chan delivery, streamBuffer)}
	r.users[userID] = append(r.users[userID], st)
	r.open++
	r.pending = append(r.pending, st)
	r.wakeLocked()
	return st, nil
}

var refuseShuttingDown = &streamRefusal{503, "unavailable",
	"the service is shutting down; reconnect to receive live updates from another instance", 1}

// notUpLocked is the 503 while the source is not up: retry soon while it
// (re)connects, later when the configuration has to change.
func (r *registry) notUpLocked() *streamRefusal {
	retry := 2
	if r.state == sourceUnavailable {
		retry = 30
	}
	return &streamRefusal{503, "unavailable", r.why, retry}
}

// unsubscribe forgets a stream; safe to call after the hub kicked it.
func (r *registry) unsubscribe(st *stream) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.removeLocked(st)
}

// removeLocked takes st out of the registry. A user's list stays in
// subscription order: its first stream is the oldest, the one a new stream
// over the limit replaces.
func (r *registry) removeLocked(st *stream) {
	if st.gone {
		return
	}
	st.gone = true
	st.held = nil
	r.open--
	list := slices.DeleteFunc(r.users[st.userID], func(s *stream) bool { return s == st })
	if len(list) == 0 {
		delete(r.users, st.userID)
	} else {
		r.users[st.userID] = list
	}
}

// kickLocked ends a stream from the hub's side.
func (r *registry) kickLocked(st *stream, why endReason) {
	if st.gone {
		return
	}
	st.reason = why
	r.removeLocked(st)
	close(st.ch)
}

func (r *registry) wakeLocked() {
	if r.wake != nil {
		r.wake()
		r.wake = nil
	}
}

// openStreams is the gauge.
func (r *registry) openStreams() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.open
}

// listening reports whether the source is up (the name predates STREAM_SOURCE).
func (r *registry) listening() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state == sourceUp
}

// --- what a source calls ---

// waitForWork returns a context that is cancelled when a stream subscribes,
// so a source blocked on its session wakes to read the snapshot; busy is
// true when there is already something to read (then no context is armed).
func (r *registry) waitForWork(ctx context.Context) (wctx context.Context, cancel context.CancelFunc, busy bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.resync || len(r.pending) > 0 {
		return nil, nil, true
	}
	wctx, cancel = context.WithCancel(ctx)
	r.wake = cancel
	return wctx, cancel, false
}

// doneWaiting disarms waitForWork's context.
func (r *registry) doneWaiting() {
	r.mu.Lock()
	r.wake = nil
	r.mu.Unlock()
}

// requestResync makes the next snapshot read cover every open stream: what
// a source calls once it is subscribed again after a gap.
func (r *registry) requestResync() {
	r.mu.Lock()
	r.resync = true
	r.mu.Unlock()
}

// requestCatchUp asks for the records committed after id to be read before
// the resync: the ones a gap hid, found in one read of the newest rows.
func (r *registry) requestCatchUp(id int64) {
	r.mu.Lock()
	r.catchUp = id
	r.mu.Unlock()
}

// takeCatchUp returns (and clears) the pending catch-up's starting id.
func (r *registry) takeCatchUp() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := r.catchUp
	r.catchUp = 0
	return id
}

// takeSnapshots says which users' live records the next read must cover and
// which streams that read completes (their snapshot). After a resync
// request that is every user with an open stream.
func (r *registry) takeSnapshots() (users []int64, snap []*stream) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.resync && len(r.pending) == 0 {
		return nil, nil
	}
	userSet := make(map[int64]struct{})
	if r.resync {
		r.resync = false
		for uid, list := range r.users {
			userSet[uid] = struct{}{}
			for _, st := range list {
				if !st.ready {
					snap = append(snap, st)
				}
			}
		}
	} else {
		for _, st := range r.pending {
			if !st.gone {
				snap = append(snap, st)
				userSet[st.userID] = struct{}{}
			}
		}
	}
	clear(r.pending)
	r.pending = r.pending[:0]
	for uid := range userSet {
		users = append(users, uid)
	}
	return users, snap
}

// streamed reports whether userID has an open stream.
func (r *registry) streamed(userID int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.users[userID]) > 0
}

// deliver hands records to the streams. A ready stream of a record's user
// gets what it has not been sent. A stream still waiting for its snapshot
// holds them: the snapshot read may have started before they were committed
// (the wal source reads snapshots on another connection while it decodes),
// so they are handed over right after its snapshot and ready, less what the
// snapshot already had. Each stream in snap gets its user's records, ready,
// and what it held.
func (r *registry) deliver(snap []*stream, byUser map[int64][]*frame) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for uid, frames := range byUser {
		// A copy: sending may kick a stream out of the list.
		for _, st := range slices.Clone(r.users[uid]) {
			if st.ready {
				r.sendLocked(st, delivery{frames: st.sent.unsent(frames)})
			} else {
				r.holdLocked(st, frames)
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
			r.sendLocked(st, delivery{frames: st.sent.unsent(byUser[st.userID])})
			continue
		}
		st.ready = true
		d := delivery{frames: st.sent.unsent(byUser[st.userID]), ready: true}
		d.after = st.sent.unsent(st.held)
		st.held = nil
		r.sendLocked(st, d)
	}
}

// holdLocked keeps live records for a stream whose snapshot is being read.
func (r *registry) holdLocked(st *stream, frames []*frame) {
	if len(st.held)+len(frames) > maxHeld {
		r.kickLocked(st, endUnavailable)
		return
	}
	st.held = append(st.held, frames...)
}

// sendLocked queues a batch. A stream whose queue is full has stopped
// reading: it is ended rather than allowed to hold memory.
func (r *registry) sendLocked(st *stream, d delivery) {
	if len(d.frames) == 0 && len(d.after) == 0 && !d.ready {
		return
	}
	select {
	case st.ch <- d:
	default:
		r.kickLocked(st, endSlowConsumer)
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
