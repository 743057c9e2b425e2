package main

// GET /3ds/my-records/events: Server-Sent Events of the signed-in user's new
// records (contract section 6). The hub (listener.go) does the reading; this
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

func endEvent(r endReason) []byte {
	return []byte(`event: end` + "\n" + `data: {"reason":"` + r.String() + `"}` + "\n\n")
}

// handleEvents is wrapped by the verifier's middleware: a missing or bad
// token has already been answered with the JSON 401 or 503.
func (s *server) handleEvents(w http.ResponseWriter, r *http.Request) {
	p, ok := principalFromContext(r.Context())
	if !ok {
		// Wiring bug: fail closed, as the list endpoint does.
		writeError(w, r, http.StatusUnauthorized, "missing_token", "send an Authorization: Bearer <token> header")
		return
	}
	if s.draining.Load() {
		refuseStream(w, r, refuseShuttingDown)
		return
	}
	if s.hub == nil {
		refuseStream(w, r, &streamRefusal{http.StatusServiceUnavailable, "unavailable", "live updates are not enabled on this instance", 30})
		return
	}
	if r.Method == http.MethodHead {
		if ref := s.hub.available(); ref != nil {
			refuseStream(w, r, ref)
			return
		}
		setStreamHeaders(w.Header())
		w.WriteHeader(http.StatusOK)
		return
	}
	st, ref := s.hub.subscribe(p.userID)
	if ref != nil {
		refuseStream(w, r, ref)
		return
	}
	defer s.hub.unsubscribe(st)
	why := s.stream(w, r, p, st)
	s.hub.ends[why].Add(1)
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

// stream serves an accepted subscription until it ends and says why.
func (s *server) stream(w http.ResponseWriter, r *http.Request, p principal, st *stream) endReason {
	rc := http.NewResponseController(w)
	// The server's WriteTimeout would cut a long stream: every write below
	// sets a deadline of its own instead. Its ReadTimeout would cancel the
	// request context if the read deadline were still armed; net/http (Go
	// 1.26) already clears it when it starts its background read of a
	// request without a body, and clearing it here too keeps that true
	// whatever the request or the server version.
	_ = rc.SetReadDeadline(time.Time{})
	sw := &sseWriter{w: w, rc: rc}
	setStreamHeaders(w.Header())
	if err := sw.begin(); err != nil {
		return endClientGone
	}
	w.WriteHeader(http.StatusOK)
	if err := sw.write([]byte(streamRetry)); err != nil {
		return writeFailed(err)
	}
	if err := sw.flush(); err != nil {
		return writeFailed(err)
	}

	h := s.hub
	heartbeat := h.cfg.heartbeat
	// A stream never outlives its token: it ends when the verifier would
	// stop accepting the token, exp + JWT_LEEWAY.
	tokenEnd := p.exp.Add(s.verifier.cfg.leeway)
	// Take the channel before asking: a key-set swap in between is then
	// seen on the channel.
	keys := s.verifier.keysChanged()
	if !s.verifier.hasKey(p.kid) {
		return s.end(sw, endKeyRemoved)
	}

	lastWrite := time.Now()
	timer := time.NewTimer(nextWake(lastWrite, heartbeat, tokenEnd))
	defer timer.Stop()
	ready := false
	for {
		select {
		case d := <-st.ch:
			if err := sw.begin(); err != nil {
				return writeFailed(err)
			}
			for _, f := range d.frames {
				if err := sw.write(f.data); err != nil {
					return writeFailed(err)
				}
			}
			if d.ready {
				if err := sw.write(readyEvent); err != nil {
					return writeFailed(err)
				}
			}
			if err := sw.flush(); err != nil {
				return writeFailed(err)
			}
			h.events[eventRecord].Add(int64(len(d.frames)))
			if d.ready {
				h.events[eventReady].Add(1)
			}
			if ready {
				for _, f := range d.frames {
					if !f.notified.IsZero() {
						h.lag.observe(time.Since(f.notified))
					}
				}
			}
			ready = ready || d.ready
			lastWrite = time.Now()
		case now := <-timer.C:
			if !now.Before(tokenEnd) {
				return s.end(sw, endTokenExpired)
			}
			if now.Sub(lastWrite) >= heartbeat {
				if err := sw.begin(); err != nil {
					return writeFailed(err)
				}
				if err := sw.write(pingEvent); err != nil {
					return writeFailed(err)
				}
				if err := sw.flush(); err != nil {
					return writeFailed(err)
				}
				h.events[eventPing].Add(1)
				lastWrite = time.Now()
			}
		case <-keys:
			keys = s.verifier.keysChanged()
			if !s.verifier.hasKey(p.kid) {
				return s.end(sw, endKeyRemoved)
			}
			continue
		case <-st.kicked:
			return s.end(sw, st.reason)
		case <-h.closing:
			return s.end(sw, endShuttingDown)
		case <-r.Context().Done():
			return endClientGone
		}
		timer.Reset(nextWake(lastWrite, heartbeat, tokenEnd))
	}
}

// nextWake is how long until the next heartbeat or the token's end.
func nextWake(lastWrite time.Time, heartbeat time.Duration, tokenEnd time.Time) time.Duration {
	at := lastWrite.Add(heartbeat)
	if tokenEnd.Before(at) {
		at = tokenEnd
	}
	return max(time.Until(at), 0)
}

// end writes `event: end` and returns why; the connection closes after it.
func (s *server) end(sw *sseWriter, why endReason) endReason {
	if err := sw.begin(); err != nil {
		return writeFailed(err)
	}
	if err := sw.write(endEvent(why)); err != nil {
		return writeFailed(err)
	}
	if err := sw.flush(); err != nil {
		return writeFailed(err)
	}
	s.hub.events[eventEnd].Add(1)
	return why
}
