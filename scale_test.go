package main

// Scaling out on PostgreSQL's own machinery (issue 10), with real parts: a
// primary and a hot standby made by scripts/pg.sh (pg_basebackup -R), the
// service reading from the standby, the real binary rolled replica by
// replica behind a retrying client, and a real PgBouncer in front of the
// standby. The figures these tests log (replication delay, rolling-restart
// counts) are what docs/scaling.md quotes; they are measured, not asserted
// tightly: timing targets live in benchmarks.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// replicaPair is a primary with a streaming hot standby, the schema and
// several users' records on both, and keys to sign tokens with.
type replicaPair struct {
	primary, standby *testCluster
	key              testKey
	jwks             string
	users            []int64 // the last one has no records
	perUser          int
	tokens           map[int64]string
}

func newReplicaPair(t *testing.T) *replicaPair {
	t.Helper()
	p := &replicaPair{users: []int64{201, 202, 203, 204, 205, 206}, perUser: 23, tokens: map[int64]string{}}
	p.primary = startCluster(t)
	p.standby = startStandby(t, p.primary)
	migrateTestDB(t, p.primary.url)
	pool := newTestPool(t, p.primary.url, nil)
	// Varied columns, so that comparing bodies compares formatting too:
	// minor units per currency, a NULL merchant, ties on received_at.
	currencies := []string{"USD", "JPY", "KWD", "EUR"}
	var rows []seedRow
	for _, u := range p.users[:len(p.users)-1] {
		for i := 1; i <= p.perUser; i++ {
			r := row(u*1000+int64(i), u, time.Date(2020, 1, 1, 0, 0, i/2, 0, time.UTC).Format(time.RFC3339))
			r.currency = currencies[i%len(currencies)]
			r.amount = fmt.Sprintf("%d.5", i)
			r.passcode = fmt.Sprintf("%06d", i)
			if i%5 == 0 {
				r.merchant = nil
			}
			rows = append(rows, r)
		}
	}
	insertRows(t, pool, rows...)
	pool.Close()
	waitForReplay(t, p.primary.url, p.standby.url)
	p.key = newTestKey(t, jwa.ES256, "scale", 0)
	p.jwks = newJWKSServer(t, p.key.publicJWK(t, false)).URL
	for _, u := range p.users {
		p.tokens[u] = p.key.token(t, validClaims(u))
	}
	return p
}

// pagePaths are the requests whose answers must not depend on which
// server the service reads from: every page of every user in two sizes,
// the default page, a page past the end and a user with nothing.
func (p *replicaPair) pagePaths() (paths []string, users []int64) {
	for _, u := range p.users {
		for page := 1; page <= 6; page++ {
			paths = append(paths, fmt.Sprintf("/3ds/my-records?page=%d&page_size=5", page))
			users = append(users, u)
		}
		paths = append(paths, "/3ds/my-records?page_size=100", "/3ds/my-records")
		users = append(users, u, u)
	}
	return paths, users
}

// assertSamePages fetches every page from both services and wants the
// same status and the same bytes.
func (p *replicaPair) assertSamePages(t *testing.T, want, got string) {
	t.Helper()
	paths, users := p.pagePaths()
	for i, path := range paths {
		a := mustFetch(t, opsClient, want+path, p.tokens[users[i]])
		b := mustFetch(t, opsClient, got+path, p.tokens[users[i]])
		if a.code != http.StatusOK || b.code != a.code || !bytes.Equal(a.body, b.body) {
			t.Errorf("user %d %s:\n primary: %d %s\n standby: %d %s", users[i], path, a.code, a.body, b.code, b.body)
		}
	}
	// Not a vacuous comparison: the pages hold the seeded records.
	a := mustFetch(t, opsClient, got+"/3ds/my-records?page_size=100", p.tokens[p.users[0]])
	var page pageBody
	if err := json.Unmarshal(a.body, &page); err != nil || page.Data.Total != int64(p.perUser) {
		t.Fatalf("user %d through the standby: %s, want %d records", p.users[0], a.body, p.perUser)
	}
}

// newestID is the id of the user's newest record as the service at base
// returns it, 0 when there is none or the request failed.
func newestID(base, token string) int64 {
	a := fetch(opsClient, http.MethodGet, base+"/3ds/my-records?page_size=1", token, "")
	if a.err != nil || a.code != http.StatusOK {
		return 0
	}
	var page pageBody
	if json.Unmarshal(a.body, &page) != nil || len(page.Data.Records) == 0 {
		return 0
	}
	return page.Data.Records[0].ID
}

// durations summarises measured waits for the log.
type durations []time.Duration

func (d durations) String() string {
	if len(d) == 0 {
		return "no samples"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[int(q*float64(len(s)-1))].Round(10 * time.Microsecond) }
	return fmt.Sprintf("n=%d p50=%s p90=%s p99=%s max=%s", len(s), at(0.5), at(0.9), at(0.99), s[len(s)-1].Round(10*time.Microsecond))
}

func TestStandbyServesTheSamePagesAsThePrimaryAndNewRecordsWithinTheReplicationDelay(t *testing.T) {
	p := newReplicaPair(t)
	onPrimary := startRunReady(t, serviceEnv(p.primary.url, p.jwks))
	standbyEnv := serviceEnv(p.standby.url, p.jwks)
	standbyEnv["DATABASE_LISTEN_URL"] = p.primary.url
	onStandby := startRunReady(t, standbyEnv)

	t.Run("every page is byte for byte the primary's", func(t *testing.T) {
		p.assertSamePages(t, onPrimary.base, onStandby.base)
	})

	t.Run("a record committed on the primary is pushed to a stream of the service on the standby exactly as the list then shows it", func(t *testing.T) {
		ctx := context.Background()
		writer, err := pgx.Connect(ctx, p.primary.url)
		if err != nil {
			t.Fatal(err)
		}
		defer writer.Close(ctx)
		if _, err := writer.Exec(ctx, "SET synchronous_commit = on"); err != nil {
			t.Fatal(err)
		}
		user, token := p.users[0], p.tokens[p.users[0]]
		stream, _ := mustOpenStream(t, onStandby.base, token)
		var lags durations
		for range 20 {
			sent := time.Now()
			id := insertNow(t, writer, user)
			ev, ok := stream.nextEvent(t, 10*time.Second)
			if !ok || ev.event != "record" || eventID(t, ev) != id {
				t.Fatalf("after inserting %d the stream sent %v (ok %v)", id, ev, ok)
			}
			lags = append(lags, ev.at.Sub(sent))
			// The event was read on the LISTEN session (the primary), where
			// the row is visible at once; the list shows the same bytes once
			// the standby has it.
			var listed string
			waitFor(t, 10*time.Second, "the record in the list on the standby", func() bool {
				a := mustFetch(t, opsClient, onStandby.base+"/3ds/my-records?page_size=1", token)
				var page struct {
					Data struct{ Records []json.RawMessage }
				}
				if json.Unmarshal(a.body, &page) != nil || len(page.Data.Records) == 0 {
					return false
				}
				listed = string(page.Data.Records[0])
				return strings.Contains(listed, fmt.Sprintf(`"id":%d,`, id))
			})
			if listed != ev.data {
				t.Errorf("record %d: pushed %s, listed %s", id, ev.data, listed)
			}
		}
		t.Logf("insert sent on the primary -> event received from the service on the standby (LISTEN on the primary): %s", lags)
	})

	// Commit on the primary → the record is the newest one the service on
	// the standby returns. The wait is polled every millisecond through the
	// service, so each figure includes one page request (about a
	// millisecond here). synchronous_commit decides when the commit's WAL
	// is flushed, and a walsender only sends flushed WAL: off (what
	// scripts/pg.sh sets for speed) leaves it to the WAL writer, every
	// wal_writer_delay (200 ms).
	for _, tc := range []struct {
		name, synchronousCommit string
		inserts                 int
	}{
		{"a record committed with synchronous_commit on (PostgreSQL's default) is served from the standby after the replication delay", "on", 50},
		{"a record committed with synchronous_commit off is served from the standby after at most wal_writer_delay more", "off", 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			writer, err := pgx.Connect(ctx, p.primary.url)
			if err != nil {
				t.Fatal(err)
			}
			defer writer.Close(ctx)
			if _, err := writer.Exec(ctx, "SET synchronous_commit = "+tc.synchronousCommit); err != nil {
				t.Fatal(err)
			}
			var delays durations
			for i := range tc.inserts {
				user := p.users[i%(len(p.users)-1)]
				id := insertNow(t, writer, user)
				committed := time.Now()
				deadline := committed.Add(10 * time.Second)
				for newestID(onStandby.base, p.tokens[user]) != id {
					if time.Now().After(deadline) {
						t.Fatalf("record %d of user %d not served from the standby 10s after its commit", id, user)
					}
					time.Sleep(time.Millisecond)
				}
				delays = append(delays, time.Since(committed))
			}
			t.Logf("commit on the primary -> served from the standby, synchronous_commit=%s: %s", tc.synchronousCommit, delays)
		})
	}
}

// A hot standby cannot LISTEN ("cannot execute LISTEN during recovery"): a
// service whose DATABASE_LISTEN_URL is left at its default, a DATABASE_URL on
// the standby, keeps serving pages, and its stream says why it cannot push
// and the log says what to set (contract section 6).
func TestStandbyOnDatabaseListenURLAnswers503AndTheLogSaysToUseThePrimary(t *testing.T) {
	p := newReplicaPair(t)
	rs := startRunReady(t, serviceEnv(p.standby.url, p.jwks))
	const unavailable = "live updates are unavailable; the list endpoint keeps working"
	waitFor(t, 30*time.Second, "the unavailable log line", func() bool {
		for _, l := range rs.stdout.logLines(t) {
			if l["msg"] == unavailable {
				return true
			}
		}
		return false
	})
	token := p.tokens[p.users[0]]
	code, body := rs.get(t, "/3ds/my-records/events", token)
	var e errorBody
	if code != http.StatusServiceUnavailable || json.Unmarshal(body, &e) != nil ||
		!strings.Contains(e.Details, "DATABASE_LISTEN_URL must be a direct session to the primary") ||
		!strings.Contains(e.Details, "hot standby") {
		t.Errorf("stream on a standby: %d %s; want 503 naming the hot standby and the primary", code, body)
	}
	if code, body := rs.get(t, "/3ds/my-records", token); code != http.StatusOK {
		t.Errorf("the list endpoint on the standby: %d %s", code, body)
	}
	if code, _ := rs.get(t, "/readyz", ""); code != http.StatusOK {
		t.Errorf("readyz = %d: LISTEN must not take readiness down", code)
	}
	var lines []map[string]any
	for _, l := range rs.stdout.logLines(t) {
		if l["msg"] == unavailable {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || lines[0]["level"] != "ERROR" {
		t.Fatalf("want exactly one ERROR line %q, got %v", unavailable, lines)
	}
	if set, _ := lines[0]["set"].(string); !strings.Contains(set, "DATABASE_LISTEN_URL") || !strings.Contains(set, "primary") {
		t.Errorf("the log line does not say what to set: %v", lines[0])
	}
}

func TestStandbyRefusesMigrateAtOnceAndSaysToUseThePrimary(t *testing.T) {
	p := newReplicaPair(t)
	// Bounded well above "at once" so a retrying migrate fails the test
	// instead of hanging it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testBinary(t), "migrate")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "DATABASE_URL=" + p.standby.url}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	t.Logf("migrate against the standby: %v after %s; stderr %q", err, took.Round(time.Millisecond), stderr.String())
	if ctx.Err() != nil {
		lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
		t.Fatalf("migrate was still running after %s: it must fail at once against a standby; its last log line: %s", took.Round(time.Second), lines[len(lines)-1])
	}
	exit, ok := err.(*exec.ExitError)
	if !ok || exit.ExitCode() <= 0 {
		t.Fatalf("migrate exit = %v, want a non-zero exit code", err)
	}
	if took > 15*time.Second {
		t.Errorf("migrate took %s to give up, want at once (no retries)", took.Round(time.Millisecond))
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("stderr has %d lines, want one: %q", len(lines), stderr.String())
	}
	msg := strings.ToLower(lines[0])
	if !strings.Contains(msg, "read-only") && !strings.Contains(msg, "standby") {
		t.Errorf("%q does not say the server is a read-only standby", lines[0])
	}
	if !strings.Contains(msg, "primary") {
		t.Errorf("%q does not say to point migrate at the primary", lines[0])
	}
}

// gateway stands in for the load balancer in front of the replicas: each
// request goes to the next replica in rotation and, on a connection error
// or a 503, once more to another one (nginx's proxy_next_upstream, an
// Envoy retry policy). With probing, a replica is in rotation while its
// /readyz answers 200 on a fresh connection, checked every 50 ms as an
// endpoints controller would; without, it stays in rotation until it is
// removed, and only the retry saves the requests sent to it once it has
// closed its listener.
type gateway struct {
	client *http.Client
	probe  *http.Client
	probes bool

	mu       sync.Mutex
	replicas []string // registered, in start order
	ready    map[string]bool
	next     int
}

func newGateway(t *testing.T, probes bool) *gateway {
	g := &gateway{
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}},
		probe:  &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}},
		probes: probes,
		ready:  map[string]bool{},
	}
	if !probes {
		return g
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			g.mu.Lock()
			replicas := slices.Clone(g.replicas)
			g.mu.Unlock()
			for _, r := range replicas {
				a := fetch(g.probe, http.MethodGet, r+"/readyz", "", "")
				g.mu.Lock()
				if _, still := g.ready[r]; still {
					g.ready[r] = a.err == nil && a.code == http.StatusOK
				}
				g.mu.Unlock()
			}
		}
	}()
	return g
}

// add registers a replica whose /readyz has answered 200.
func (g *gateway) add(base string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.replicas = append(g.replicas, base)
	g.ready[base] = !g.probes
}

func (g *gateway) remove(base string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.replicas = slices.DeleteFunc(g.replicas, func(r string) bool { return r == base })
	delete(g.ready, base)
}

func (g *gateway) isReady(base string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ready[base]
}

// pick is the next replica in rotation other than avoid; "" when there is
// none.
func (g *gateway) pick(avoid string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	for range len(g.replicas) {
		r := g.replicas[g.next%len(g.replicas)]
		g.next++
		if r != avoid && g.ready[r] {
			return r
		}
	}
	return ""
}

// get is one request as the client behind the gateway sees it; firstTry
// is the first replica's failure when it was retried ("" when not).
func (g *gateway) get(path, token string) (a answer, firstTry string) {
	first := g.pick("")
	if first == "" {
		return answer{code: http.StatusBadGateway, err: fmt.Errorf("no replica in rotation")}, ""
	}
	a = fetch(g.client, http.MethodGet, first+path, token, "")
	switch {
	case a.err != nil:
		firstTry = "connection error"
	case a.code == http.StatusServiceUnavailable:
		firstTry = "503"
	default:
		return a, ""
	}
	second := g.pick(first)
	if second == "" {
		return a, firstTry
	}
	return fetch(g.client, http.MethodGet, second+path, token, ""), firstTry
}

// loadTally is what the clients behind the gateway saw.
type loadTally struct {
	requests, failed, non2xx, wrong atomic.Int64

	mu            sync.Mutex
	retried       map[string]int // by the first replica's failure
	latencies     durations
	firstProblems []string
}

func (l *loadTally) problem(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.firstProblems) < 10 {
		l.firstProblems = append(l.firstProblems, s)
	}
}

// pageLoad sends random pages through g from workers goroutines until
// stop is closed, checking each answer against the body the page had
// before the load began (the data does not change meanwhile).
func (p *replicaPair) pageLoad(t *testing.T, g *gateway, base string, workers int, stop <-chan struct{}) (*loadTally, *sync.WaitGroup) {
	t.Helper()
	paths, users := p.pagePaths()
	want := make([][]byte, len(paths))
	for i, path := range paths {
		want[i] = mustFetch(t, opsClient, base+path, p.tokens[users[i]]).body
	}
	l := &loadTally{retried: map[string]int{}}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 10))
			var mine durations
			defer func() { l.mu.Lock(); l.latencies = append(l.latencies, mine...); l.mu.Unlock() }()
			for {
				select {
				case <-stop:
					return
				default:
				}
				i := rng.IntN(len(paths))
				start := time.Now()
				a, firstTry := g.get(paths[i], p.tokens[users[i]])
				mine = append(mine, time.Since(start))
				l.requests.Add(1)
				if firstTry != "" {
					l.mu.Lock()
					l.retried[firstTry]++
					l.mu.Unlock()
				}
				switch {
				case a.err != nil:
					l.failed.Add(1)
					l.problem(fmt.Sprintf("%s: %v", paths[i], a.err))
				case a.code < 200 || a.code > 299:
					l.non2xx.Add(1)
					l.problem(fmt.Sprintf("%s: %d %s", paths[i], a.code, a.body))
				case !bytes.Equal(a.body, want[i]):
					l.wrong.Add(1)
					l.problem(fmt.Sprintf("%s: another body: %s", paths[i], a.body))
				}
			}
		}()
	}
	return l, &wg
}

// streamClient is an app holding GET /3ds/my-records/events open through
// the gateway, as a browser's EventSource does: on `event: end` or a closed
// connection it waits the stream's `retry:` interval and connects again
// (the gateway picks the replica, and retries a refused connection or a
// 503 once on another), and it shows each record id once, deduplicating
// across connections as the contract tells clients to. It runs on a
// goroutine of its own, so it records problems instead of failing the test.
type streamClient struct {
	user  int64
	token string
	g     *gateway

	mu         sync.Mutex
	seen       map[int64]bool
	connects   int            // streams that reached ready
	refused    map[string]int // opens that got no stream on either try, by what the two tries got
	ends       map[string]int // by reason; "eof" when the connection closed without one
	dupOnConn  int            // an id sent twice on one connection: the contract forbids it
	problems   []string
	firstReady chan struct{}
}

func newStreamClient(g *gateway, user int64, token string) *streamClient {
	return &streamClient{user: user, token: token, g: g, seen: map[int64]bool{}, ends: map[string]int{}, refused: map[string]int{}, firstReady: make(chan struct{})}
}

func (c *streamClient) problem(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.problems) < 5 {
		c.problems = append(c.problems, fmt.Sprintf(format, args...))
	}
}

// run connects again and again until ctx ends.
func (c *streamClient) run(ctx context.Context) {
	retry := 2 * time.Second // the contract's retry line replaces it
	for ctx.Err() == nil {
		if r := c.session(ctx); r > 0 {
			retry = r
		}
		select {
		case <-ctx.Done():
		case <-time.After(retry):
		}
	}
}

// open asks the gateway for a stream: the next replica, then once another
// on a connection error or a 503 (429 is this client's own fault).
func (c *streamClient) open(ctx context.Context, client *http.Client) (*http.Response, error) {
	try := func(base string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/3ds/my-records/events", nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+c.token)
		resp, err := client.Do(req)
		if err != nil {
			return nil, errors.New("connection error")
		}
		if resp.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var e struct{ Details string }
			_ = json.Unmarshal(body, &e)
			return nil, fmt.Errorf("status %d (%s)", resp.StatusCode, e.Details)
		}
		return resp, nil
	}
	first := c.g.pick("")
	if first == "" {
		return nil, errors.New("no replica in rotation")
	}
	resp, err := try(first)
	if err == nil || strings.Contains(err.Error(), "status 429") {
		return resp, err
	}
	if second := c.g.pick(first); second != "" {
		resp, err2 := try(second)
		if err2 != nil {
			return nil, fmt.Errorf("%v, then %v", err, err2)
		}
		return resp, nil
	}
	return nil, err
}

// session is one connection: it returns the retry interval the stream set.
func (c *streamClient) session(ctx context.Context) time.Duration {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.open(ctx, client)
	if err != nil {
		if ctx.Err() == nil {
			c.mu.Lock()
			c.refused[err.Error()]++
			c.mu.Unlock()
		}
		return 250 * time.Millisecond
	}
	defer resp.Body.Close()
	var (
		retry     time.Duration
		event, id string
		onConn    = map[int64]bool{}
		br        = bufio.NewReader(resp.Body)
	)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if ctx.Err() == nil {
				c.mu.Lock()
				c.ends["eof"]++
				c.mu.Unlock()
			}
			return retry
		}
		line = strings.TrimSuffix(line, "\n")
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch {
		case line == "":
			event, id = "", ""
		case field == "retry":
			if ms, err := strconv.Atoi(value); err == nil {
				retry = time.Duration(ms) * time.Millisecond
			}
		case field == "event":
			event = value
		case field == "id":
			id = value
		case field == "data" && event == "ready":
			c.mu.Lock()
			c.connects++
			if c.connects == 1 {
				close(c.firstReady)
			}
			c.mu.Unlock()
		case field == "data" && event == "end":
			var end struct{ Reason string }
			_ = json.Unmarshal([]byte(value), &end)
			c.mu.Lock()
			c.ends[end.Reason]++
			c.mu.Unlock()
			_, _ = io.Copy(io.Discard, br) // the server closes after end
			return retry
		case field == "data" && event == "record":
			n, err := strconv.ParseInt(id, 10, 64)
			var rec struct {
				ID       int64  `json:"id"`
				Passcode string `json:"passcode"`
			}
			if err != nil || json.Unmarshal([]byte(value), &rec) != nil || rec.ID != n || rec.Passcode == "" {
				c.problem("record event id %q data %q", id, value)
				continue
			}
			c.mu.Lock()
			if onConn[n] {
				c.dupOnConn++
			}
			onConn[n] = true
			c.seen[n] = true
			c.mu.Unlock()
		}
	}
}

// missing is what of want the client has not shown, and foreign what it
// showed that is not in own (every record of its user still live).
func (c *streamClient) missing(want, own map[int64]bool) (missing, foreign []int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id := range want {
		if !c.seen[id] {
			missing = append(missing, id)
		}
	}
	for id := range c.seen {
		if !own[id] {
			foreign = append(foreign, id)
		}
	}
	slices.Sort(missing)
	slices.Sort(foreign)
	return missing, foreign
}

// writeLive inserts a live record for users in turn on the primary, one
// transaction each, until stop is closed, and returns the ids by user.
func writeLive(primaryURL string, users []int64, every time.Duration, stop <-chan struct{}) (written map[int64]map[int64]bool, err error) {
	ctx := context.Background()
	writer, err := pgx.Connect(ctx, primaryURL)
	if err != nil {
		return nil, err
	}
	defer writer.Close(ctx)
	written = map[int64]map[int64]bool{}
	for i := 0; ; i++ {
		select {
		case <-stop:
			return written, nil
		default:
		}
		user := users[i%len(users)]
		var id int64
		err := writer.QueryRow(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES ($1, '135790', 7, 'EUR', 'Rolling', 300, clock_timestamp()) RETURNING id`, user).Scan(&id)
		if err != nil {
			return written, fmt.Errorf("insert on the primary: %w", err)
		}
		if written[user] == nil {
			written[user] = map[int64]bool{}
		}
		written[user][id] = true
		time.Sleep(every)
	}
}

func TestRollingRestartOfTwoReplicasOnAStandbyLosesNoRequestAndNoPushedRecord(t *testing.T) {
	p := newReplicaPair(t)
	// Records of an earlier case are still live, so a later case's
	// snapshots carry them: they are the user's own, not another's.
	everWritten := map[int64]map[int64]bool{}
	for _, tc := range []struct {
		name          string
		probes        bool
		shutdownDelay string
	}{
		{"when the gateway stops routing to a draining replica from its readiness", true, "500ms"},
		{"when the gateway only learns from refused connections and retries them on the other replica", false, "100ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := serviceEnv(p.standby.url, p.jwks)
			env["DATABASE_LISTEN_URL"] = p.primary.url
			env["SHUTDOWN_DELAY"] = tc.shutdownDelay
			env["SHUTDOWN_TIMEOUT"] = "5s"
			g := newGateway(t, tc.probes)
			start := func() *binaryService {
				// Each replica its own port (LISTEN_ADDR refuses port 0).
				env["LISTEN_ADDR"] = freeListenAddr()
				b := startBinary(t, env)
				waitFor(t, 15*time.Second, "a new replica's readiness", func() bool {
					return fetch(freshConnClient, http.MethodGet, b.base+"/readyz", "", "").code == http.StatusOK
				})
				g.add(b.base)
				waitFor(t, 5*time.Second, "a new replica in rotation", func() bool { return g.isReady(b.base) })
				return b
			}
			replicas := []*binaryService{start(), start()}

			// Streams of users the page load does not read, so the records
			// written for them leave the checked pages as they were.
			streamUsers := []int64{301, 302, 303, 304, 305}
			ctx, cancelClients := context.WithCancel(context.Background())
			var clientsDone sync.WaitGroup
			defer func() { cancelClients(); clientsDone.Wait() }()
			var clients []*streamClient
			for _, u := range streamUsers {
				token := p.key.token(t, validClaims(u))
				for range 2 {
					c := newStreamClient(g, u, token)
					clients = append(clients, c)
					clientsDone.Add(1)
					go func() { defer clientsDone.Done(); c.run(ctx) }()
				}
			}
			for _, c := range clients {
				select {
				case <-c.firstReady:
				case <-time.After(15 * time.Second):
					t.Fatalf("user %d's stream was not ready within 15s: %q", c.user, c.problems)
				}
			}

			const workers = 8
			stop := make(chan struct{})
			load, wg := p.pageLoad(t, g, replicas[0].base, workers, stop)
			var written map[int64]map[int64]bool
			var writeErr error
			writerDone := make(chan struct{})
			go func() {
				defer close(writerDone)
				written, writeErr = writeLive(p.primary.url, streamUsers, 25*time.Millisecond, stop)
			}()

			// A rolling update with one surge replica: the new process is
			// in rotation before the old one gets SIGTERM, one at a time.
			loadStart := time.Now()
			time.Sleep(1200 * time.Millisecond)
			var exits []string
			for i, old := range replicas {
				fresh := start()
				signalled := time.Now()
				if err := old.cmd.Process.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				select {
				case <-old.exited:
				case <-time.After(15 * time.Second):
					t.Fatalf("old replica %d did not exit within 15s of SIGTERM", i)
				}
				exits = append(exits, time.Since(signalled).Round(time.Millisecond).String())
				if old.exitErr != nil {
					t.Errorf("old replica %d: exit %v, want 0; log:\n%s", i, old.exitErr, old.stdout.String())
				}
				g.remove(old.base)
				replicas[i] = fresh
				time.Sleep(time.Second)
			}
			close(stop)
			wg.Wait()
			elapsed := time.Since(loadStart)
			<-writerDone
			if writeErr != nil {
				t.Fatal(writeErr)
			}
			for u, ids := range written {
				if everWritten[u] == nil {
					everWritten[u] = map[int64]bool{}
				}
				for id := range ids {
					everWritten[u][id] = true
				}
			}

			// Every record committed, during the switches too, reaches every
			// stream client of its user: live, or in the snapshot of the
			// reconnect.
			caughtUp := time.Now()
			var records int
			for _, ids := range written {
				records += len(ids)
			}
			for _, c := range clients {
				var missing, foreign []int64
				deadline := time.Now().Add(20 * time.Second)
				for {
					if missing, foreign = c.missing(written[c.user], everWritten[c.user]); len(missing) == 0 || time.Now().After(deadline) {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				if len(missing) != 0 || len(foreign) != 0 {
					t.Errorf("user %d's stream client: %d of %d records missing %v, %d of another user %v", c.user, len(missing), len(written[c.user]), missing, len(foreign), foreign)
				}
			}
			caughtUpIn := time.Since(caughtUp)
			cancelClients()
			clientsDone.Wait()
			ends, refused, connects, dups := map[string]int{}, map[string]int{}, 0, 0
			for _, c := range clients {
				for r, n := range c.ends {
					ends[r] += n
				}
				connects += c.connects
				for r, n := range c.refused {
					refused[r] += n
				}
				dups += c.dupOnConn
				if len(c.problems) != 0 {
					t.Errorf("user %d's stream client: %q", c.user, c.problems)
				}
			}
			t.Logf("%d streams: %d records written, all shown by every client of their user; %d connections reached ready (%d reconnects), opens refused on both tries %v, ends %v; the last records arrived %s after the writer stopped",
				len(clients), records, connects, connects-len(clients), refused, ends, caughtUpIn.Round(time.Millisecond))
			if dups != 0 {
				t.Errorf("%d records were sent twice on one connection", dups)
			}
			if ends["shutting_down"] == 0 {
				t.Error("no stream ended with shutting_down: the restart did not exercise the streams")
			}

			n := load.requests.Load()
			t.Logf("rolling restart of 2 replicas (SHUTDOWN_DELAY %s, gateway probes readiness: %t), %d workers for %s: %d requests (%.0f/s), retried once on the other replica after %v, %d failed, %d non-2xx, %d wrong bodies; latency %s; SIGTERM -> exit 0: %s",
				tc.shutdownDelay, tc.probes, workers, elapsed.Round(time.Millisecond), n, float64(n)/elapsed.Seconds(),
				load.retried, load.failed.Load(), load.non2xx.Load(), load.wrong.Load(), load.latencies, strings.Join(exits, ", "))
			if load.failed.Load() != 0 || load.non2xx.Load() != 0 || load.wrong.Load() != 0 {
				t.Errorf("a rolling restart lost requests: %d failed, %d non-2xx, %d wrong; first: %q",
					load.failed.Load(), load.non2xx.Load(), load.wrong.Load(), load.firstProblems)
			}
			if n < 100 {
				t.Errorf("only %d requests were sent: the load did not run", n)
			}
		})
	}
}

// hostPort is the host:port of a postgres:// URL.
func hostPort(t testing.TB, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

// bouncerServers lists PgBouncer's server connections (SHOW SERVERS on
// its admin console) as "database@host:port": where the pooled queries go.
func bouncerServers(t testing.TB, bouncerURL string) []string {
	t.Helper()
	admin, err := withDatabase(bouncerURL, "pgbouncer")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The admin console speaks the simple query protocol only.
	conn, err := pgx.Connect(ctx, withParams(admin, "default_query_exec_mode=simple_protocol"))
	if err != nil {
		t.Fatalf("pgbouncer admin console: %v", err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SHOW SERVERS")
	if err != nil {
		t.Fatalf("SHOW SERVERS: %v", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			t.Fatal(err)
		}
		col := map[string]string{}
		for i, f := range rows.FieldDescriptions() {
			col[f.Name] = fmt.Sprint(vals[i])
		}
		out = append(out, col["database"]+"@"+col["addr"]+":"+col["port"])
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("SHOW SERVERS: %v", err)
	}
	return out
}

func TestStandbyBehindPgBouncerServesTheSamePagesAndTheStartLogNamesIt(t *testing.T) {
	p := newReplicaPair(t)
	onPrimary := startRunReady(t, serviceEnv(p.primary.url, p.jwks))
	bouncer, bouncerDir := startPgBouncerOn(t, p.standby.url)

	// Transaction mode: pgx must not rely on statements prepared on a
	// server connection (docs/deploying.md).
	env := serviceEnv(withParams(bouncer, "default_query_exec_mode=exec"), p.jwks)
	env["DATABASE_LISTEN_URL"] = p.primary.url
	svc := startRunReady(t, env)
	p.assertSamePages(t, onPrimary.base, svc.base)
	if servers := bouncerServers(t, bouncer); !slices.Contains(servers, "postgres@"+hostPort(t, p.standby.url)) {
		t.Errorf("PgBouncer's server connections %q do not include the standby at %s", servers, hostPort(t, p.standby.url))
	}

	var listening map[string]any
	for _, l := range svc.stdout.logLines(t) {
		if l["msg"] == "listening" {
			listening = l
		}
	}
	if got, want := fmt.Sprint(listening["database"]), hostPort(t, bouncer); !strings.Contains(got, want) {
		t.Errorf("the start log's database = %q, want the pooler at %s", got, want)
	}
	if got, want := fmt.Sprint(listening["listen_database"]), hostPort(t, p.primary.url); !strings.Contains(got, want) {
		t.Errorf("the start log's listen_database = %q, want the primary at %s", got, want)
	}

	t.Run("a stream of this service gets a new record: its LISTEN session is direct on the primary", func(t *testing.T) {
		user := p.users[1]
		stream, _ := mustOpenStream(t, svc.base, p.tokens[user])
		writer, err := pgx.Connect(context.Background(), p.primary.url)
		if err != nil {
			t.Fatal(err)
		}
		defer writer.Close(context.Background())
		id := insertNow(t, writer, user)
		if ev, ok := stream.nextEvent(t, 10*time.Second); !ok || ev.event != "record" || eventID(t, ev) != id {
			t.Fatalf("after inserting %d the stream sent %v (ok %v)", id, ev, ok)
		}
	})

	t.Run("what a page costs PgBouncer and the server behind it, against a direct pool (measured, not asserted)", func(t *testing.T) {
		bouncerPID, err1 := pidFromFile(filepath.Join(bouncerDir, "pgbouncer.pid"))
		standbyPID, err2 := pidFromFile(filepath.Join(p.standby.dir, "data", "postmaster.pid"))
		primaryPID, err3 := pidFromFile(filepath.Join(p.primary.dir, "data", "postmaster.pid"))
		if err := errors.Join(err1, err2, err3); err != nil {
			t.Skipf("no pids to measure: %v", err)
		}
		n, cpu := p.measurePages(t, onPrimary.base, cpuOf{primaryPID, true})
		t.Logf("direct pool (pgx statement cache) on the primary: %d pages; PostgreSQL %s per page", n, cpu[0])
		n, cpu = p.measurePages(t, svc.base, cpuOf{standbyPID, true}, cpuOf{bouncerPID, false})
		t.Logf("PgBouncer (transaction mode, default_query_exec_mode=exec) to the standby: %d pages; PostgreSQL %s per page, PgBouncer %s per page", n, cpu[0], cpu[1])
	})
}

// cpuOf names a process whose CPU a measurement reads: with children, a
// postmaster and its backends.
type cpuOf struct {
	pid      int
	children bool
}

// measurePages sends page 1 (20 records) of random users to the service at
// base from 8 workers for 3 s and returns how many were served and the CPU
// each process used per page. /proc counts CPU in 10 ms ticks, so a figure
// is good to about 10 ms / pages.
func (p *replicaPair) measurePages(t *testing.T, base string, procs ...cpuOf) (int64, []time.Duration) {
	t.Helper()
	const workers = 8
	users := p.users[:len(p.users)-1]
	var requests, failures atomic.Int64
	before := make([]time.Duration, len(procs))
	for i, pr := range procs {
		before[i] = cpuTime(pr.pid, pr.children)
	}
	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; time.Now().Before(stop); i += workers {
				u := users[i%len(users)]
				if a := fetch(opsClient, http.MethodGet, base+"/3ds/my-records", p.tokens[u], ""); a.err != nil || a.code != http.StatusOK {
					failures.Add(1)
				}
				requests.Add(1)
			}
		}()
	}
	wg.Wait()
	n := requests.Load()
	if failures.Load() != 0 {
		t.Errorf("%d of %d pages failed", failures.Load(), n)
	}
	per := make([]time.Duration, len(procs))
	for i, pr := range procs {
		per[i] = ((cpuTime(pr.pid, pr.children) - before[i]) / time.Duration(max(n, 1))).Round(time.Microsecond)
	}
	return n, per
}

// pidFromFile reads the pid on the first line of a pid file (PgBouncer's,
// or PostgreSQL's postmaster.pid).
func pidFromFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

// cpuTime is the user+system CPU pid has used (with children: plus that of
// its live child processes, a postmaster's backends), from /proc; 0 where
// there is no /proc. Backends that exit take their time with them, so it is
// read while the pooler holds its server connections open.
func cpuTime(pid int, children bool) time.Duration {
	ticks := func(pid int) (ticks int64, parent int) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		i := bytes.LastIndexByte(b, ')')
		if err != nil || i < 0 {
			return 0, 0
		}
		// Fields after the command: state, ppid, ..., utime (14th of the
		// line) and stime (15th).
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			return 0, 0
		}
		parent, _ = strconv.Atoi(f[1])
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		return u + s, parent
	}
	total, _ := ticks(pid)
	if children {
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			if child, err := strconv.Atoi(e.Name()); err == nil && child != pid {
				if t, parent := ticks(child); parent == pid {
					total += t
				}
			}
		}
	}
	// USER_HZ is 100 on every architecture Go supports.
	return time.Duration(total) * 10 * time.Millisecond
}
