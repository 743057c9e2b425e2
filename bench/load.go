package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// scenario is one row of the table: whose page, which page.
type scenario struct {
	name     string
	page     int
	pageSize int
	heavy    bool // the heavy user's scenario: PostgreSQL-bound, no ratio target
	user     func(r *rand.Rand) int64
}

// phaseResult is what one side (service or direct SQL) achieved in one
// scenario's measured window.
type phaseResult struct {
	elapsed  time.Duration
	lat      []time.Duration
	non2xx   int64
	errs     int64
	firstErr string
}

func (p *phaseResult) rate() float64 { return float64(len(p.lat)) / p.elapsed.Seconds() }

func (p *phaseResult) merge(o *phaseResult) {
	p.lat = append(p.lat, o.lat...)
	p.non2xx += o.non2xx
	p.errs += o.errs
	if p.firstErr == "" {
		p.firstErr = o.firstErr
	}
}

func (p *phaseResult) fail(err error) {
	p.errs++
	if p.firstErr == "" {
		p.firstErr = err.Error()
	}
}

// runWorkers runs c copies of work until the deadline and merges what they
// measured. Every worker stops at the deadline, so each phase is bounded.
func runWorkers(c int, until time.Time, work func(w int, until time.Time, res *phaseResult)) *phaseResult {
	results := make([]phaseResult, c)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[w].lat = make([]time.Duration, 0, 1<<14)
			work(w, until, &results[w])
		}()
	}
	wg.Wait()
	total := &phaseResult{elapsed: time.Since(start)}
	for i := range results {
		total.merge(&results[i])
	}
	return total
}

// httpLoad drives a server with its keep-alive HTTP/1.1 connections (one
// per worker, kept from phase to phase, as a gateway keeps them), one request
// in flight on each. It is a deliberately minimal client (pre-built request
// bytes, status line and length only): net/http's client costs several
// times more CPU per request, and on two shared cores every microsecond the
// load generator burns is taken from the server.
func httpLoad(ctx context.Context, clients []*pageClient, sc scenario, tokens map[int64]string, d time.Duration, seed uint64) *phaseResult {
	until := time.Now().Add(d)
	return runWorkers(len(clients), until, func(w int, until time.Time, res *phaseResult) {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		cl := clients[w]
		cl.target(sc.page, sc.pageSize)
		for time.Now().Before(until) && ctx.Err() == nil {
			cl.get(tokens[sc.user(rng)], res)
		}
	})
}

// primeTokens sends every token once (page 1) over clients: afterwards the
// server has seen, and cached, every token the measured rounds send.
func primeTokens(ctx context.Context, clients []*pageClient, tokens map[int64]string) *phaseResult {
	ids := slices.Sorted(maps.Keys(tokens))
	c := len(clients)
	return runWorkers(c, time.Now().Add(time.Minute), func(w int, until time.Time, res *phaseResult) {
		cl := clients[w]
		cl.target(1, 20)
		for i := w; i < len(ids) && time.Now().Before(until) && ctx.Err() == nil; i += c {
			cl.get(tokens[ids[i]], res)
		}
	})
}

// pageClient is one keep-alive connection asking for pages, reconnecting
// after an error or a Connection: close.
type pageClient struct {
	addr   string
	prefix string
	conn   net.Conn
	br     *bufio.Reader
	req    []byte
}

func newPageClients(addr string, n int) []*pageClient {
	cls := make([]*pageClient, n)
	for i := range cls {
		cls[i] = &pageClient{addr: addr, req: make([]byte, 0, 2048)}
	}
	return cls
}

// target sets the page that get asks for.
func (cl *pageClient) target(page, pageSize int) {
	cl.prefix = "GET /3ds/my-records?page=" + strconv.Itoa(page) + "&page_size=" + strconv.Itoa(pageSize) +
		" HTTP/1.1\r\nHost: " + cl.addr + "\r\nAuthorization: Bearer "
}

func (cl *pageClient) close() {
	if cl.conn != nil {
		cl.conn.Close()
		cl.conn = nil
	}
}

// get sends one request with token and records its latency and status in res.
func (cl *pageClient) get(token string, res *phaseResult) {
	if cl.conn == nil {
		conn, err := net.DialTimeout("tcp", cl.addr, 5*time.Second)
		if err != nil {
			res.fail(err)
			time.Sleep(10 * time.Millisecond)
			return
		}
		cl.conn, cl.br = conn, bufio.NewReaderSize(conn, 32<<10)
	}
	cl.req = append(append(append(cl.req[:0], cl.prefix...), token...), "\r\n\r\n"...)
	start := time.Now()
	_ = cl.conn.SetDeadline(start.Add(10 * time.Second))
	status, keep, err := roundTrip(cl.conn, cl.br, cl.req)
	if err != nil {
		res.fail(err)
		cl.close()
		return
	}
	res.lat = append(res.lat, time.Since(start))
	if status < 200 || status > 299 {
		res.non2xx++
		if res.firstErr == "" {
			res.firstErr = "HTTP " + strconv.Itoa(status)
		}
	}
	if !keep {
		cl.close()
	}
}

// roundTrip writes one request and reads one response, discarding the body.
func roundTrip(conn net.Conn, br *bufio.Reader, req []byte) (status int, keepAlive bool, err error) {
	if _, err := conn.Write(req); err != nil {
		return 0, false, err
	}
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	status, err = strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	length, keepAlive, chunked := -1, true, false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		if len(line) <= 2 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, false, fmt.Errorf("bad header line %q", line)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil {
				return 0, false, fmt.Errorf("bad Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Connection")) && bytes.EqualFold(value, []byte("close")):
			keepAlive = false
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			// net/http answers chunked when a handler writes more than 2 KiB
			// without a Content-Length, as the floor does.
			if !bytes.EqualFold(value, []byte("chunked")) {
				return 0, false, fmt.Errorf("unsupported Transfer-Encoding %q", value)
			}
			chunked = true
		}
	}
	if chunked {
		return status, keepAlive, discardChunked(br)
	}
	if length < 0 {
		return 0, false, errors.New("response without Content-Length")
	}
	if _, err := br.Discard(length); err != nil {
		return 0, false, err
	}
	return status, keepAlive, nil
}

// sqlLoad issues the service's page query straight to PostgreSQL, c
// connections with one query in flight on each, and reads every column the
// way the store does: the throughput the service could reach if HTTP,
// authentication and JSON cost nothing.
func sqlLoad(ctx context.Context, dsn string, sc scenario, c int, d time.Duration, seed uint64, sample func() cpuSample) (*phaseResult, cpuSample, error) {
	conns := make([]*pgx.Conn, c)
	defer func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close(context.Background())
			}
		}
	}()
	for i := range conns {
		var err error
		if conns[i], err = pgx.Connect(ctx, dsn); err != nil {
			return nil, cpuSample{}, fmt.Errorf("connect: %w", err)
		}
		// Prepare outside the window, as the service's warm pool has.
		if _, err := conns[i].Prepare(ctx, "page", pageSQL); err != nil {
			return nil, cpuSample{}, fmt.Errorf("prepare: %w", err)
		}
	}
	offset := int64(sc.page-1) * int64(sc.pageSize)
	// The backends exist now, so their CPU is counted from here to the end.
	before := sample()
	res := runWorkers(c, time.Now().Add(d), func(w int, until time.Time, res *phaseResult) {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		conn := conns[w]
		var (
			total, id, expires         int64
			passcode, amount, cur, mer string
			receivedAt                 time.Time
		)
		for time.Now().Before(until) && ctx.Err() == nil {
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			start := time.Now()
			rows, err := conn.Query(qctx, "page", sc.user(rng), sc.pageSize, offset)
			if err == nil {
				for rows.Next() {
					err = rows.Scan(&id, &passcode, &amount, &cur, &mer, &expires, &receivedAt, &total)
					if err != nil {
						break
					}
				}
				rows.Close()
				if err == nil {
					err = rows.Err()
				}
			}
			cancel()
			if err != nil {
				res.fail(err)
				continue
			}
			res.lat = append(res.lat, time.Since(start))
		}
	})
	return res, sample().sub(before), nil
}

// discardChunked reads a chunked body (RFC 9112 §7.1) to its end, trailers
// included, so the connection is ready for the next response.
func discardChunked(br *bufio.Reader) error {
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		sizeField, _, _ := bytes.Cut(bytes.TrimSpace(line), []byte(";"))
		size, err := strconv.ParseInt(string(sizeField), 16, 64)
		if err != nil || size < 0 {
			return fmt.Errorf("bad chunk size line %q", line)
		}
		if size == 0 {
			break
		}
		if _, err := br.Discard(int(size)); err != nil {
			return err
		}
		if crlf, err := br.ReadSlice('\n'); err != nil || len(bytes.TrimSpace(crlf)) != 0 {
			return errors.New("chunk not followed by CRLF")
		}
	}
	for { // trailers, up to the empty line
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			return nil
		}
	}
}
