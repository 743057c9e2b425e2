package main

import (
	"net/http"
	"strconv"
	"sync/atomic"
)

// defaultMaxInFlight is MAX_IN_FLIGHT when unset: how many API requests one
// process serves at once before it answers 503 instead of queueing.
//
// From `make bench` (2026-11-27, 2 cores shared by service, PostgreSQL and
// load generator, pool of 4): 12 requests in flight saturate the machine at
// 6,074-7,156 req/s with p50 1.6-1.8 ms and p99 4.0-4.9 ms. Little's law
// agrees: 12 / 6,074 req/s = 2.0 ms, the p50. More in flight adds no
// throughput, only queueing: each extra waiting request costs the others
// 1 / 6,074 req/s ≈ 0.16 ms.
//
//   - 64 leaves room for the concurrency a real deployment needs for the
//     same rate: PostgreSQL on another host adds a network round trip, say
//     1 ms, so 6,074 req/s × 3 ms ≈ 18 in flight, a third of the limit.
//   - At the limit the queue is 64 / 6,074 req/s ≈ 11 ms of work, about
//     twice the p99: a burst is absorbed, and a request that waits longer
//     than that is better told to retry (on another replica) at once.
//   - During a database stall every admitted request parks until
//     DB_QUERY_TIMEOUT (3 s): without a limit that is rate × 3 s requests
//     (18,000 at the bench rate), each holding a goroutine, its buffers and
//     its connection. With it, 64 park, about 35 KiB each with their
//     connection, 2 MiB in all (make soak's stall phase, 2026-12-01), and
//     the rest are answered at once.
//
// Raise it with the measured rate × the latency you accept; the events
// route has its own limits (STREAMS_MAX), and probes and /metrics are never
// limited.
const defaultMaxInFlight = 64

// maxInFlightLimit is MAX_IN_FLIGHT's largest accepted value: a guard
// against a typo, far above anything one process can serve at once.
const maxInFlightLimit = 1_000_000

// retryAfterSeconds is what a shed request is told: long enough for a burst
// to pass, short enough that a cardholder waiting for a passcode retries
// soon; a gateway with other replicas retries there at once.
const retryAfterSeconds = "1"

// inFlightLimit admits at most cap(slots) requests at once and answers the
// rest at once with 503 + Retry-After: a queue in front of a stalled
// database only grows until the deadline, and each queued request holds
// memory and makes every later one wait longer.
type inFlightLimit struct {
	slots chan struct{}
	shed  atomic.Int64
}

func newInFlightLimit(n int) *inFlightLimit {
	return &inFlightLimit{slots: make(chan struct{}, n)}
}

// wrap applies the limit to one handler. newServer wraps the API routes
// only, explicitly: probes must answer whatever the load, and a long-lived
// event stream would hold a slot for its whole life.
func (l *inFlightLimit) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case l.slots <- struct{}{}:
		default:
			l.shed.Add(1)
			w.Header().Set("Retry-After", retryAfterSeconds)
			writeError(w, r, http.StatusServiceUnavailable, "unavailable",
				"the service is answering as many requests as it can; retry after "+retryAfterSeconds+" s")
			return
		}
		defer func() { <-l.slots }()
		next.ServeHTTP(w, r)
	})
}

func (l *inFlightLimit) inFlight() int { return len(l.slots) }
func (l *inFlightLimit) max() int      { return cap(l.slots) }

// maxInFlightVar reads MAX_IN_FLIGHT: a plain decimal integer in
// 1..maxInFlightLimit.
func maxInFlightVar(getenv func(string) string) (int, error) {
	s := getenv("MAX_IN_FLIGHT")
	if s == "" {
		return defaultMaxInFlight, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n < 1 || n > maxInFlightLimit {
		return 0, &configError{"MAX_IN_FLIGHT", strconv.Quote(s) + " is not an integer from 1 to " + strconv.Itoa(maxInFlightLimit)}
	}
	return int(n), nil
}

// serverOption sets what newServer's callers may leave at its default.
type serverOption func(*server)

// withMaxInFlight sets MAX_IN_FLIGHT.
func withMaxInFlight(n int) serverOption {
	return func(s *server) { s.limit = newInFlightLimit(n) }
}
