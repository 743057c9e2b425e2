package main

// Where the event streams' new records come from (contract section 6,
// STREAM_SOURCE). A source keeps one session per process to the primary
// (DATABASE_LISTEN_URL) and feeds the hub (streams.go): after every
// (re)connect it first subscribes to new records, then asks the hub for a
// resync (every open stream's live records are read again), then serves the
// hub's snapshot requests and hands it each new record. The hub runs the
// session in a loop with backoff and turns the source's state into the
// stream's 503s and one log line per change.
//
// Sources: notify (listen.go: an AFTER INSERT trigger's NOTIFY and one LISTEN
// session) and wal (logical decoding of the table's inserts).

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
)

// recordSource is one way of hearing about new records.
type recordSource interface {
	// session runs one session until it fails or ctx ends. up reports
	// whether it got as far as being subscribed (the hub then counts the
	// next session as a reconnect, and resets its backoff if the session
	// stayed up for stableSession). An *unavailableError means it cannot
	// work where it points.
	session(ctx context.Context, everUp bool) (up bool, err error)
}

// newSource builds the source STREAM_SOURCE names.
func newSource(h *hub) recordSource {
	switch h.cfg.source {
	case sourceWAL:
		return newWalSource(h)
	default:
		return newNotifySource(h)
	}
}

// unavailableError is a source that cannot work where it points: retrying
// soon will not help, the configuration has to change.
type unavailableError struct {
	details string // for the 503 body
	fix     string // for the log: what to set
	err     error
}

func (e *unavailableError) Error() string { return e.details + ": " + e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

const directSession = "DATABASE_LISTEN_URL must be a direct session to the primary"

// stableSession is how long a session must have lasted for the backoff to
// start again from retryMin. Coming up is not enough: a session that comes
// up and fails at once (a read it cannot survive, a backend killed as soon
// as it appears) would otherwise reconnect every retryMin for ever.
const stableSession = 30 * time.Second

// run keeps the source's session up until ctx ends.
func (h *hub) run(ctx context.Context) {
	defer close(h.done)
	backoff := h.cfg.retryMin
	everUp := false
	for {
		began := time.Now()
		up, err := h.src.session(ctx, everUp)
		if ctx.Err() != nil {
			h.setState(sourceDown, "live updates are stopping", nil)
			return
		}
		everUp = everUp || up
		var wait time.Duration
		backoff, wait = nextWait(backoff, up && time.Since(began) >= stableSession, err, h.cfg)
		var un *unavailableError
		if errors.As(err, &un) {
			h.setState(sourceUnavailable, "live updates are unavailable: "+un.details, un)
		} else {
			h.setState(sourceDown, "live updates are reconnecting to the database; retry shortly", err)
		}
		select {
		case <-ctx.Done():
			h.setState(sourceDown, "live updates are stopping", nil)
			return
		case <-time.After(wait):
		}
	}
}

// nextWait is the pause before the next session and the backoff after it:
// retryMin doubling to retryMax while sessions keep failing, from retryMin
// again after a session that stayed up, unavailableRetry when the source
// cannot work where it points; plus up to a quarter of jitter, so the
// replicas of a fleet do not reconnect in step after a failover.
func nextWait(backoff time.Duration, stayedUp bool, err error, cfg hubConfig) (next, wait time.Duration) {
	if stayedUp {
		backoff = cfg.retryMin
	}
	var un *unavailableError
	if errors.As(err, &un) {
		wait = cfg.unavailableRetry
	} else {
		wait = backoff
		backoff = min(backoff*2, cfg.retryMax)
	}
	var b [1]byte
	_, _ = rand.Read(b[:])
	return backoff, wait + wait*time.Duration(b[0])/1024
}

// sourceUpAgain is what a source calls once it is subscribed: everything
// committed from now on reaches it, so re-reading every open stream's live
// records covers whatever was committed while nothing was subscribed.
// heardBefore is h.heard when the session began, the last id the lost
// session heard of: the session may hear of newer ones before it is up (a
// LISTEN session hears what commits while it proves that notifications
// arrive), and a catch-up from those would skip the gap.
func (h *hub) sourceUpAgain(everUp bool, heardBefore int64) {
	if everUp && heardBefore > 0 {
		h.requestCatchUp(heardBefore)
	}
	h.requestResync()
	if everUp {
		h.reconnects.Add(1)
	}
	h.setState(sourceUp, "", nil)
}

// setState records a state change and logs it once. Entering "unavailable"
// ends the open streams: they would never receive anything, and their
// clients should fall back to polling the list.
func (h *hub) setState(st sourceState, why string, err error) {
	h.mu.Lock()
	old, oldWhy := h.state, h.why
	h.state, h.why = st, why
	if st == sourceUnavailable {
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
	target := redactedConnURL(h.cfg.conn)
	switch st {
	case sourceUp:
		if old == sourceConnecting {
			h.logger.Info("live updates: receiving new records", "source", h.cfg.source, "listen_database", target)
		} else {
			h.logger.Info("live updates: receiving again; re-reading what open streams missed", "source", h.cfg.source, "listen_database", target)
		}
	case sourceDown:
		if err == nil {
			return
		}
		h.logger.Warn("live updates: the source session is down; reconnecting with backoff",
			"source", h.cfg.source, "listen_database", target, "error", err.Error())
	case sourceUnavailable:
		var un *unavailableError
		errors.As(err, &un)
		h.logger.Error("live updates are unavailable; the list endpoint keeps working",
			"source", h.cfg.source, "listen_database", target, "reason", un.details, "set", un.fix, "error", un.err.Error())
	}
}

// redactedConnURL is a connection's target fit for a log line.
func redactedConnURL(cc *pgx.ConnConfig) string {
	return fmt.Sprintf("postgres://%s:xxxxx@%s/%s", cc.User, net.JoinHostPort(cc.Host, strconv.Itoa(int(cc.Port))), cc.Database)
}

// keepaliveDialer: a session that waits for the server for long stretches
// must notice a peer that vanished (failover without a reset) in seconds.
func keepaliveDialer() *net.Dialer {
	return &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}}
}
