package main

// GET /3ds/my-records/events: Server-Sent Events of the signed-in user's new
// records (contract section 6). The hub (streams.go) and its source do the reading; this
// handler owns the connection: it writes, keeps the heartbeat, and ends the
// stream when the token expires, its key leaves the set, the service shuts
// down, or the client stops reading. Everything runs on the handler's own
// goroutine with one timer: no goroutine or database work per stream.

import (
	"errors"
	"net/http"
	"os"
	"strconv"
	"time"
)

const (
	// streamRetry is the reconnect delay the client is told to use.
	streamRetry = "retry: 2000\n\n"
	// streamWriteTimeout bounds each write and flush: a client that stops
	// reading is dropped instead of holding the stream open.
	streamWriteTimeout = 10 * time.Second
)

var (
	readyEvent = []byte("event: ready\ndata: {}\n\n")
	pingEvent  = []byte(": ping\n\n")
)

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

func endEvent(r endReason) []byte {
	return []byte(`event: end` + "\n" + `data: {"reason":"` + r.String() + `"}` + "\n\n")
}

// eventsHandler is the route: GET only, answered before the token is
// checked. HEAD is a 405 like any other method: answering it 200 would say
// a stream is available when the GET may get a 503.
func (s *server) eventsHandler() http.Handler {
	authed := s.verifier.Middleware(http.HandlerFunc(s.handleEvents))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			refuseMethod(w, r)
			return
		}
		authed.ServeHTTP(w, r)
	})
}

// refuseMethod is the stream's 405 for any method but GET (the server's
// route sends them here too).
func refuseMethod(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Allow", http.MethodGet)
	writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", r.Method+" is not allowed here; allowed: GET")
}

// handleEvents is wrapped by the verifier's middleware: a missing or bad
// token has already been answered with the JSON 401 or 503. It stays on the
// stack for the stream's whole life, so everything else is in functions that
// return before the stream waits (see streamState).
func (s *server) handleEvents(w http.ResponseWriter, r *http.Request) {
	ss := s.admit(w, r)
	if ss == nil {
		return
	}
	defer s.hub.unsubscribe(ss.st)
	why, ok := ss.start()
	if ok {
		why = ss.loop(r.Context().Done())
		ss.timer.Stop()
	}
	s.hub.ends[why].Add(1)
}

// admit subscribes the stream, or answers why not (JSON, Retry-After).
func (s *server) admit(w http.ResponseWriter, r *http.Request) *streamState {
	p, ok := principalFromContext(r.Context())
	if !ok {
		// Wiring bug: fail closed, as the list endpoint does.
		writeError(w, r, http.StatusUnauthorized, "missing_token", "send an Authorization: Bearer <token> header")
		return nil
	}
	// No check of s.draining: during SHUTDOWN_DELAY streams are still
	// admitted (a browser's EventSource gives up for good on a non-200);
	// the hub ends them, and refuses new ones, when draining starts.
	if s.hub == nil {
		refuseStream(w, r, &streamRefusal{http.StatusServiceUnavailable, "unavailable", "live updates are not enabled on this instance", 30})
		return nil
	}
	st, ref := s.hub.subscribe(p.userID)
	if ref != nil {
		refuseStream(w, r, ref)
		return nil
	}
	rc := http.NewResponseController(w)
	return &streamState{s: s, sw: sseWriter{w: w, rc: rc}, p: p, st: st}
}

func refuseStream(w http.ResponseWriter, r *http.Request, ref *streamRefusal) {
	w.Header().Set("Retry-After", strconv.Itoa(ref.retryAfter))
	writeError(w, r, ref.status, ref.code, ref.details)
}

func setStreamHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	// nginx (and gateways that honour it) pass each event through at once
	// instead of buffering the response.
	h.Set("X-Accel-Buffering", "no")
	// When the stream ends, the connection ends: a client (or gateway)
	// never waits on a kept-alive connection for a stream that is over.
	h.Set("Connection", "close")
}

// sseWriter writes and flushes through every wrapper (statusRecorder and
// any other that implements Unwrap).
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (sw *sseWriter) begin() error {
	return sw.rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
}

func (sw *sseWriter) write(b []byte) error {
	_, err := sw.w.Write(b)
	return err
}

func (sw *sseWriter) flush() error { return sw.rc.Flush() }

// writeFailed names a failed write: a deadline means the client stopped
// reading, anything else that it went away.
func writeFailed(err error) endReason {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return endSlowConsumer
	}
	return endClientGone
}

// streamState is one open stream as its handler goroutine sees it. It lives
// on the heap and the work is in its methods, so the frames that stay on the
// stack while the stream waits are small: the goroutine's stack is a large
// part of a stream's memory, and the runtime halves a parked 16 KiB stack to
// 8 KiB only when less than about 3.2 KiB of it is in use (everything from
// net/http's conn.serve down to select counts).
type streamState struct {
	s         *server
	sw        sseWriter
	p         principal
	st        *stream
	tokenEnd  time.Time
	lastWrite time.Time
	keys      <-chan struct{}
	timer     *time.Timer
	ready     bool
}

// start writes the headers and the retry line and arms the timer; ok is
// false when the stream is already over.
func (ss *streamState) start() (why endReason, ok bool) {
	s, w, rc := ss.s, ss.sw.w, ss.sw.rc
	// The server's WriteTimeout would cut a long stream: every write below
	// sets a deadline of its own instead. Its ReadTimeout would cancel the
	// request context if the read deadline were still armed; net/http (Go
	// 1.26) already clears it when it starts its background read of a
	// request without a body, and clearing it here too keeps that true
	// whatever the request or the server version.
	_ = rc.SetReadDeadline(time.Time{})
	setStreamHeaders(w.Header())
	if err := ss.sw.begin(); err != nil {
		return endClientGone, false
	}
	w.WriteHeader(http.StatusOK)
	if err := ss.sw.write([]byte(streamRetry)); err != nil {
		return writeFailed(err), false
	}
	if err := ss.sw.flush(); err != nil {
		return writeFailed(err), false
	}
	// A stream never outlives its token: it ends when the verifier would
	// stop accepting the token, exp + JWT_LEEWAY.
	ss.tokenEnd = ss.p.exp.Add(s.verifier.cfg.leeway)
	// Take the channel before asking: a key-set swap in between is then
	// seen on the channel.
	ss.keys = s.verifier.keysChanged()
	if !s.verifier.stillTrusts(ss.p) {
		return ss.end(endKeyRemoved), false
	}
	ss.lastWrite = time.Now()
	ss.timer = time.NewTimer(ss.nextWake())
	return 0, true
}

// loop waits for the next thing to do; all the work is in methods, so its
// own frame is the select and little else.
func (ss *streamState) loop(gone <-chan struct{}) endReason {
	h := ss.s.hub
	for {
		select {
		case d, ok := <-ss.st.ch:
			if !ok {
				// Closed by the hub. Batches queued before the close
				// have been written: a stream ended as unavailable loses
				// nothing the hub had for it.
				return ss.end(ss.st.reason)
			}
			if err := ss.deliver(d); err != nil {
				return writeFailed(err)
			}
		case now := <-ss.timer.C:
			if why, done := ss.tick(now); done {
				return why
			}
		case <-ss.keys:
			if why, done := ss.keysSwapped(); done {
				return why
			}
			continue
		case <-h.closing:
			return ss.end(endShuttingDown)
		case <-gone:
			return endClientGone
		}
		ss.timer.Reset(ss.nextWake())
	}
}

// deliver writes one batch (and ready after a snapshot) and flushes it.
func (ss *streamState) deliver(d delivery) error {
	h := ss.s.hub
	if err := ss.sw.begin(); err != nil {
		return err
	}
	for _, f := range d.frames {
		if err := ss.sw.write(f.data); err != nil {
			return err
		}
	}
	if d.ready {
		if err := ss.sw.write(readyEvent); err != nil {
			return err
		}
	}
	for _, f := range d.after {
		if err := ss.sw.write(f.data); err != nil {
			return err
		}
	}
	if err := ss.sw.flush(); err != nil {
		return err
	}
	h.events[eventRecord].Add(int64(len(d.frames) + len(d.after)))
	if d.ready {
		h.events[eventReady].Add(1)
	}
	if ss.ready {
		ss.observeLag(d.frames)
	}
	ss.observeLag(d.after)
	ss.ready = ss.ready || d.ready
	ss.lastWrite = time.Now()
	return nil
}

// observeLag counts how long after the source heard of them live records
// went out (re-read ones carry no time).
func (ss *streamState) observeLag(frames []*frame) {
	for _, f := range frames {
		if !f.notified.IsZero() {
			ss.s.hub.lag.observe(time.Since(f.notified))
		}
	}
}

// tick ends the stream at the token's end, else pings after a silence.
func (ss *streamState) tick(now time.Time) (endReason, bool) {
	if !now.Before(ss.tokenEnd) {
		return ss.end(endTokenExpired), true
	}
	if now.Sub(ss.lastWrite) < ss.s.hub.cfg.heartbeat {
		return 0, false
	}
	if err := ss.sw.begin(); err != nil {
		return writeFailed(err), true
	}
	if err := ss.sw.write(pingEvent); err != nil {
		return writeFailed(err), true
	}
	if err := ss.sw.flush(); err != nil {
		return writeFailed(err), true
	}
	ss.s.hub.events[eventPing].Add(1)
	ss.lastWrite = time.Now()
	return 0, false
}

// keysSwapped re-checks the token's key after a key-set swap.
func (ss *streamState) keysSwapped() (endReason, bool) {
	v := ss.s.verifier
	ss.keys = v.keysChanged()
	if !v.stillTrusts(ss.p) {
		return ss.end(endKeyRemoved), true
	}
	return 0, false
}

// nextWake is how long until the next heartbeat or the token's end.
func (ss *streamState) nextWake() time.Duration {
	at := ss.lastWrite.Add(ss.s.hub.cfg.heartbeat)
	if ss.tokenEnd.Before(at) {
		at = ss.tokenEnd
	}
	return max(time.Until(at), 0)
}

// end writes `event: end` and returns why; the connection closes after it.
func (ss *streamState) end(why endReason) endReason {
	sw := &ss.sw
	if err := sw.begin(); err != nil {
		return writeFailed(err)
	}
	if err := sw.write(endEvent(why)); err != nil {
		return writeFailed(err)
	}
	if err := sw.flush(); err != nil {
		return writeFailed(err)
	}
	ss.s.hub.events[eventEnd].Add(1)
	return why
}
