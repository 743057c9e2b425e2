package main

// The stream scenario's client: one raw connection per event stream, and
// what the readers saw of every record id.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// arrival is what the readers saw of one record id.
type arrival struct {
	at    time.Time // first arrival: when it reached this host (withRxStamps)
	read  time.Time // when the reader parsed that first arrival
	user  int64     // the stream that got it first
	count int       // times it arrived over all streams
	wrong bool      // arrived on a stream other than its user's
	live  bool      // first arrived after its stream's ready (else: in a snapshot)
}

// streamBench holds the open streams and what they read.
type streamBench struct {
	addr   string
	tokens map[int64]string

	mu       sync.Mutex
	arrivals map[int64]*arrival
	owner    map[int64]int64     // record id → user, filled by the writer
	readyAt  map[int64]time.Time // user → when its stream's ready reached this host

	readyWithin time.Duration // the bound on reaching ready; 0: 60 s

	// trackSnapshot: snapshot records count as arrivals too (the production
	// cases judge every record, whether a snapshot or the live feed sent it).
	trackSnapshot bool

	pings, snapshot, ends atomic.Int64
	dropped               atomic.Int64
	closing               atomic.Bool
	errMu                 sync.Mutex
	firstDrop, firstEnd   string

	connsMu sync.Mutex
	conns   []net.Conn

	openedAt time.Time // when the first stream was being opened
}

// open starts n streams (users 1..n), c being opened at a time, and returns
// once each is past `event: ready` or refused.
func (b *streamBench) open(ctx context.Context, n, c int) (opened, refused int, first string) {
	users := make([]int64, n)
	for i := range users {
		users[i] = int64(i + 1)
	}
	res := b.openUsers(ctx, users, c)
	if res.first == "" {
		res.first = res.firstBusy
	}
	return len(res.opened), res.refused, res.first
}

// openResult is how a set of streams opened.
type openResult struct {
	opened       map[int64]bool // users whose stream reached ready
	refused      int            // every failure, the 503s included
	busy         int            // of which 503 with Retry-After
	first        string         // the first failure that was not such a 503
	firstBusy    string         // the first such 503
	lastAnswered time.Duration  // from the start until the last ready or refusal
}

// openUsers opens one stream per user, c being opened at a time (c =
// len(users): all at once), and returns once each is past ready or refused.
func (b *streamBench) openUsers(ctx context.Context, users []int64, c int) openResult {
	res := openResult{opened: make(map[int64]bool, len(users))}
	sem := make(chan struct{}, max(c, 1))
	type answer struct {
		user int64
		err  error
	}
	results := make(chan answer, len(users))
	start := time.Now()
	for _, u := range users {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			results <- answer{u, ctx.Err()}
			continue
		}
		go func() {
			b.stream(ctx, u, func(err error) {
				<-sem
				results <- answer{u, err}
			})
		}()
	}
	for range users {
		a := <-results
		res.lastAnswered = time.Since(start)
		var busy *busyError
		switch {
		case a.err == nil:
			res.opened[a.user] = true
		case errors.As(a.err, &busy):
			res.refused++
			res.busy++
			if res.firstBusy == "" {
				res.firstBusy = busy.Error()
			}
		default:
			res.refused++
			if res.first == "" {
				res.first = a.err.Error()
			}
		}
	}
	return res
}

// busyError is the contract's answer over STREAMS_MAX: 503 with Retry-After.
type busyError struct{ retryAfter, body string }

func (e *busyError) Error() string {
	return "HTTP 503 with Retry-After " + e.retryAfter + ": " + e.body
}

// stream is one client: a raw connection (net/http's client keeps more per
// connection than 10,000 of them should cost the load generator), the
// response read by http.ReadResponse for its chunked body, and events parsed
// line by line. ready is called once: nil after `event: ready`, else why not.
func (b *streamBench) stream(ctx context.Context, user int64, ready func(error)) {
	signaled := false
	signal := func(err error) {
		if !signaled {
			signaled = true
			ready(err)
		}
	}
	dialed, err := net.DialTimeout("tcp", b.addr, 10*time.Second)
	if err != nil {
		signal(err)
		return
	}
	conn := withRxStamps(dialed)
	b.connsMu.Lock()
	b.conns = append(b.conns, conn)
	b.connsMu.Unlock()
	readyWithin := 60 * time.Second
	if b.readyWithin > 0 {
		readyWithin = b.readyWithin
	}
	_ = conn.SetDeadline(time.Now().Add(readyWithin))
	req := "GET /3ds/my-records/events HTTP/1.1\r\nHost: " + b.addr + "\r\nAccept: text/event-stream\r\nAuthorization: Bearer " + b.tokens[user] + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		signal(err)
		conn.Close()
		return
	}
	br := bufio.NewReaderSize(conn, 1024)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		signal(err)
		conn.Close()
		return
	}
	if ra := resp.Header.Get("Retry-After"); resp.StatusCode == http.StatusServiceUnavailable && ra != "" {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		signal(&busyError{retryAfter: ra, body: string(bytes.TrimSpace(body))})
		conn.Close()
		return
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		signal(fmt.Errorf("HTTP %d %s", resp.StatusCode, bytes.TrimSpace(body)))
		conn.Close()
		return
	}
	lr := bufio.NewReaderSize(resp.Body, 1024)
	var (
		event   string
		id      int64
		isReady bool
	)
	for {
		line, err := lr.ReadSlice('\n')
		if err != nil {
			if signaled && !b.closing.Load() && ctx.Err() == nil {
				b.dropped.Add(1)
				b.errMu.Lock()
				if b.firstDrop == "" {
					b.firstDrop = fmt.Sprintf("stream of user %d ended: %v", user, err)
				}
				b.errMu.Unlock()
			}
			signal(fmt.Errorf("stream ended before ready: %w", err))
			conn.Close()
			return
		}
		now := time.Now()
		at := conn.stamp()
		if at.IsZero() || at.After(now) {
			at = now
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			switch event {
			case "ready":
				if !isReady {
					isReady = true
					// No deadline from here on: a stream is silent for up to
					// STREAM_HEARTBEAT, and closeAll ends the reads.
					_ = conn.SetDeadline(time.Time{})
					b.mu.Lock()
					b.readyAt[user] = at
					b.mu.Unlock()
					signal(nil)
				}
			case "record":
				if isReady || b.trackSnapshot {
					b.arrived(id, user, at, now, isReady)
				}
				if !isReady {
					b.snapshot.Add(1)
				}
			case "end":
				b.ends.Add(1)
			}
			event, id = "", 0
		case line[0] == ':':
			b.pings.Add(1)
		case bytes.HasPrefix(line, []byte("event:")):
			event = string(bytes.TrimSpace(line[len("event:"):]))
		case bytes.HasPrefix(line, []byte("id:")):
			id, _ = strconv.ParseInt(string(bytes.TrimSpace(line[len("id:"):])), 10, 64)
		case bytes.HasPrefix(line, []byte("data:")) && event == "end":
			b.errMu.Lock()
			if b.firstEnd == "" {
				b.firstEnd = fmt.Sprintf("user %d got event: end %s", user, bytes.TrimSpace(line[len("data:"):]))
			}
			b.errMu.Unlock()
		}
	}
}

func (b *streamBench) arrived(id, user int64, at, read time.Time, live bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a := b.arrivals[id]
	if a == nil {
		a = &arrival{at: at, read: read, user: user, live: live}
		b.arrivals[id] = a
	}
	a.count++
	// The owner is known unless the event beat the writer's bookkeeping;
	// write() checks those when it learns the owner.
	if owner, ok := b.owner[id]; (ok && owner != user) || a.user != user {
		a.wrong = true
	}
}

func (b *streamBench) closeAll() {
	b.closing.Store(true)
	b.connsMu.Lock()
	defer b.connsMu.Unlock()
	for _, c := range b.conns {
		c.Close()
	}
	b.conns = nil
}

func newStreamBench(addr string, tokens map[int64]string) *streamBench {
	return &streamBench{addr: addr, tokens: tokens, arrivals: map[int64]*arrival{}, owner: map[int64]int64{}, readyAt: map[int64]time.Time{}}
}
