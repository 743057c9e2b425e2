package main

// The hub: the registry of open event streams (streams.go) together with
// the source that feeds it (source.go; listen.go for STREAM_SOURCE=notify),
// its configuration, its lifecycle and its counters (metrics.go reads them).

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// sourceState is where the source session stands.
type sourceState int

const (
	sourceConnecting  sourceState = iota // never up yet
	sourceUp                             // subscribed, new records proven to arrive
	sourceDown                           // was up or never got there; retrying
	sourceUnavailable                    // cannot work where DATABASE_LISTEN_URL points; retrying slowly
)

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

// hub owns the registry of open streams and runs the source that feeds it.
type hub struct {
	registry
	cfg    hubConfig
	logger *slog.Logger
	src    recordSource

	stopOnce sync.Once
	cancel   context.CancelFunc
	done     chan struct{}

	events     [numEventTypes]atomic.Int64
	ends       [numEndReasons]atomic.Int64
	lag        histogram
	reconnects atomic.Int64
	reads      atomic.Int64
	caughtUp   atomic.Int64 // live records the catch-up reads after reconnects found
	// heard is the largest record id the source has heard of (notified, or
	// decoded for a streamed user): where a catch-up read starts.
	heard         atomic.Int64
	notifications atomic.Int64
	badPayloads   atomic.Int64
}

func newHub(cfg hubConfig, logger *slog.Logger) *hub {
	cfg.setDefaults()
	h := &hub{
		registry: registry{
			maxStreams: cfg.maxStreams,
			perUser:    cfg.perUser,
			users:      make(map[int64][]*stream),
			closing:    make(chan struct{}),
			why:        "live updates are starting; retry shortly",
		},
		cfg:    cfg,
		logger: logger,
		done:   make(chan struct{}),
	}
	h.src = newSource(h)
	return h
}

// heardOf notes a record id the source has heard of.
func (h *hub) heardOf(id int64) {
	for cur := h.heard.Load(); id > cur; cur = h.heard.Load() {
		if h.heard.CompareAndSwap(cur, id) {
			return
		}
	}
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
// and stops the source: what draining does, so that the drain does not
// wait on streams and their clients reconnect to another replica now.
func (h *hub) shutdown() {
	h.closeAll()
	h.stop()
}
