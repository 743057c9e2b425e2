package main

// The example clients under examples/ (docs/clients.md) run against the real
// service: the Node client on the npm `eventsource` package, and the web
// page's fetch-based module run under Node. Each prints one JSON line per
// thing that happened; these tests read those lines. Node.js and the npm
// packages come from scripts/examples.sh (Debian's nodejs and npm as root,
// then `npm ci`).

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// exampleClients are the two clients docs/clients.md shows, by the script
// under examples/ that runs each.
var exampleClients = []struct{ name, script string }{
	{name: "the Node client on npm eventsource", script: "node/client.js"},
	{name: "the web page's fetch client", script: "web/node-run.js"},
}

// clientPrompt is how long a client may take to show something the service
// sent: generous for a loaded machine, far below a reconnect's pace.
const clientPrompt = 5 * time.Second

var nodeSetup struct {
	once sync.Once
	bin  string
	err  error
	msg  string
}

// needNode returns the node binary once examples/ has its packages. A
// machine that cannot install Node.js skips, with the reason, unless
// CI=true: there a skip would hide the test of the examples.
func needNode(t *testing.T) string {
	t.Helper()
	nodeSetup.once.Do(func() {
		cmd := exec.Command("bash", "scripts/examples.sh", "setup")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		nodeSetup.bin, nodeSetup.err, nodeSetup.msg = strings.TrimSpace(string(out)), err, stderr.String()
	})
	if nodeSetup.err != nil {
		unavailable := strings.Contains(nodeSetup.msg, "was not found") || strings.Contains(nodeSetup.msg, "apt-get install")
		if unavailable && os.Getenv("CI") != "true" {
			t.Skipf("Node.js is not installed and this machine cannot install it (needs root and apt-get, or NODE_BIN and NPM_BIN): %s", strings.TrimSpace(nodeSetup.msg))
		}
		t.Fatalf("scripts/examples.sh setup: %v\n%s", nodeSetup.err, nodeSetup.msg)
	}
	return nodeSetup.bin
}

// clientLine is one line an example client printed.
type clientLine struct {
	What   string         `json:"what"`
	ID     int64          `json:"id"`
	Record map[string]any `json:"record"`
	Reason string         `json:"reason"`
	Status int            `json:"status"`
	at     time.Time
}

// exampleClient is a running example client.
type exampleClient struct {
	name   string
	lines  chan clientLine
	exited chan error // receives the process's exit once
	stderr *syncBuffer
	mu     sync.Mutex
	all    []clientLine // every line so far, for the final checks
}

// tokenFile holds a token the example clients read before every connect.
type tokenFile string

func newTokenFile(t *testing.T, token string) tokenFile {
	f := tokenFile(filepath.Join(t.TempDir(), "token"))
	f.set(t, token)
	return f
}

// set replaces the token as an app's refresh would: a new file renamed
// over the old one, so a reader never sees half of it.
func (f tokenFile) set(t *testing.T, token string) {
	t.Helper()
	tmp := string(f) + ".new"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, string(f)); err != nil {
		t.Fatal(err)
	}
}

func startExampleClient(t *testing.T, node, script, eventsURL string, token tokenFile) *exampleClient {
	t.Helper()
	cmd := exec.Command(node, script)
	cmd.Dir = "examples"
	cmd.Env = append(os.Environ(),
		"EVENTS_URL="+eventsURL,
		"TOKEN_FILE="+string(token),
		"BACKOFF_MIN_MS=200",
		"BACKOFF_MAX_MS=2000",
	)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &exampleClient{name: script, lines: make(chan clientLine, 1024), exited: make(chan error, 1), stderr: &syncBuffer{}}
	cmd.Stderr = c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", script, err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var l clientLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				l = clientLine{What: "unparsable: " + sc.Text()}
			}
			l.at = time.Now()
			c.mu.Lock()
			c.all = append(c.all, l)
			c.mu.Unlock()
			c.lines <- l
		}
	}()
	go func() {
		<-read
		c.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-read
		if t.Failed() {
			t.Logf("%s printed:\n%s\nstderr:\n%s", script, c.printed(), c.stderr.String())
		}
	})
	return c
}

func (c *exampleClient) printed() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, l := range c.all {
		fmt.Fprintf(&b, "  %s %s id=%d reason=%q status=%d\n", l.at.Format("15:04:05.000"), l.What, l.ID, l.Reason, l.Status)
	}
	return b.String()
}

// next returns the first line for which match holds, skipping others, and
// fails the test if none comes within d or the client exits first.
func (c *exampleClient) next(t *testing.T, d time.Duration, what string, match func(clientLine) bool) clientLine {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case l := <-c.lines:
			if match(l) {
				return l
			}
		case err := <-c.exited:
			c.exited <- err
			t.Fatalf("%s exited (%v) before %s", c.name, err, what)
		case <-timer.C:
			t.Fatalf("%s: no %s within %s", c.name, what, d)
		}
	}
}

// records is how often the client showed each record id.
func (c *exampleClient) records() map[int64]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := map[int64]int{}
	for _, l := range c.all {
		if l.What == "record" {
			n[l.ID]++
		}
	}
	return n
}

func (c *exampleClient) count(what string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int
	for _, l := range c.all {
		if l.What == what {
			n++
		}
	}
	return n
}

func isLine(what string) func(clientLine) bool {
	return func(l clientLine) bool { return l.What == what }
}

func isRecordLine(id int64) func(clientLine) bool {
	return func(l clientLine) bool { return l.What == "record" && l.ID == id }
}

func isEndLine(reason string) func(clientLine) bool {
	return func(l clientLine) bool { return l.What == "end" && l.Reason == reason }
}

// shortToken is a token for user that expires in d (whole seconds).
func (g *gatewayService) shortToken(t *testing.T, user int64, d time.Duration) string {
	claims := validClaims(fmt.Sprint(user))
	claims["exp"] = time.Now().Add(d).Unix()
	return g.key.token(t, claims)
}

// TestExampleClientsShowEachRecordOnceAndReconnectWithAFreshToken: each
// client shows the snapshot, then a record stored after `ready`; when the
// token expires the stream ends with token_expired, the client reads the
// refreshed token and reconnects, the snapshot comes again, and still every
// record is shown exactly once, with the list endpoint's rendering, and
// another user's never.
func TestExampleClientsShowEachRecordOnceAndReconnectWithAFreshToken(t *testing.T) {
	node := needNode(t)
	for i, ec := range exampleClients {
		t.Run(ec.name, func(t *testing.T) {
			t.Parallel()
			g := startGatewayServiceWith(t, map[string]string{"JWT_LEEWAY": "0s", "STREAM_HEARTBEAT": "1s"})
			user, other := int64(7100+i), int64(7200+i)
			before := g.store(t, user, "100001")
			tokens := newTokenFile(t, g.shortToken(t, user, 8*time.Second))
			c := startExampleClient(t, node, ec.script, g.svc.base+"/3ds/my-records/events", tokens)

			c.next(t, 3*clientPrompt, "the snapshot's record", isRecordLine(before))
			c.next(t, clientPrompt, "ready", isLine("ready"))
			foreign := g.store(t, other, "900001")
			after := g.store(t, user, "100002")
			c.next(t, clientPrompt, "the record stored after ready", isRecordLine(after))

			// The app refreshes its token; the stream's token expires.
			tokens.set(t, g.token(t, user))
			c.next(t, 15*time.Second, "end token_expired", isEndLine("token_expired"))
			c.next(t, clientPrompt, "ready again, with the refreshed token", isLine("ready"))
			last := g.store(t, user, "100003")
			c.next(t, clientPrompt, "a record after the reconnect", isRecordLine(last))
			time.Sleep(500 * time.Millisecond) // a duplicate would come now

			want := map[int64]int{before: 1, after: 1, last: 1}
			if got := c.records(); !reflect.DeepEqual(got, want) {
				t.Errorf("records shown (id: times) = %v, want each of %v once (foreign record %d)", got, want, foreign)
			}
			if n := c.count("failure"); n != 0 {
				t.Errorf("%d failed connects: the refreshed token was not used", n)
			}
			token := g.token(t, user)
			for _, l := range c.all {
				if l.What == "record" {
					if want := g.listed(t, token, l.ID); !reflect.DeepEqual(l.Record, want) {
						t.Errorf("record %d shown as %v, want the list's %v", l.ID, l.Record, want)
					}
				}
			}
		})
	}
}

// switchProxy is a gateway in front of one service instance at a time, as a
// load balancer is: while no instance is set (or the instance is gone) it
// answers 502, which a standard EventSource takes as the end for good.
type switchProxy struct {
	upstream atomic.Pointer[url.URL]
	requests atomic.Int64
	*http.Server
	base string
}

func startSwitchProxy(t *testing.T) *switchProxy {
	t.Helper()
	p := &switchProxy{}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			if u := p.upstream.Load(); u != nil {
				r.SetURL(u)
			}
		},
		FlushInterval: -1,
		ErrorLog:      log.New(io.Discard, "", 0),
	}
	addr := freeListenAddr()
	p.Server = &http.Server{Addr: addr, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if p.upstream.Load() == nil {
			http.Error(w, "no healthy upstream", http.StatusBadGateway)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.Serve(ln) }()
	t.Cleanup(func() { _ = p.Close() })
	p.base = "http://" + addr
	return p
}

func (p *switchProxy) to(t *testing.T, base string) {
	t.Helper()
	if base == "" {
		p.upstream.Store(nil)
		return
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	p.upstream.Store(u)
}

// TestExampleClientsComeBackAfterShuttingDownAndGatewayErrors: the instance
// a client streams from shuts down (event: end shutting_down); the gateway
// answers 502 while no instance is up, then a new instance takes over. A
// standard EventSource closes for good on the first 502; the example
// clients back off (not hammering the gateway), come back, and get the
// records stored meanwhile and after, each once.
func TestExampleClientsComeBackAfterShuttingDownAndGatewayErrors(t *testing.T) {
	node := needNode(t)
	for i, ec := range exampleClients {
		t.Run(ec.name, func(t *testing.T) {
			t.Parallel()
			first := startGatewayServiceWith(t, map[string]string{"STREAM_HEARTBEAT": "1s"})
			proxy := startSwitchProxy(t)
			proxy.to(t, first.svc.base)
			user := int64(7300 + i)
			c := startExampleClient(t, node, ec.script, proxy.base+"/3ds/my-records/events", newTokenFile(t, first.token(t, user)))
			c.next(t, 3*clientPrompt, "ready", isLine("ready"))

			proxy.to(t, "")
			if err := first.svc.stop(t); err != nil {
				t.Fatalf("the first instance's shutdown: %v", err)
			}
			c.next(t, clientPrompt, "end shutting_down", isEndLine("shutting_down"))
			c.next(t, clientPrompt, "a failed connect through the gateway", func(l clientLine) bool {
				return l.What == "failure" && l.Status == http.StatusBadGateway
			})
			during := first.store(t, user, "200001")
			requestsBefore := proxy.requests.Load()
			const gap = 4 * time.Second
			time.Sleep(gap)
			// With backoff from 0.2 s doubling to 2 s, a 4 s gap holds about
			// four attempts; EventSource's own pace (retry: 2000) or none at
			// all would show here as 2 or as dozens.
			if n := proxy.requests.Load() - requestsBefore; n < 1 || n > 8 {
				t.Errorf("%d connects through the gateway in %s without an instance, want 1..8 (backoff)", n, gap)
			}

			second := startGatewayServiceOn(t, first, map[string]string{"STREAM_HEARTBEAT": "1s"})
			proxy.to(t, second.svc.base)
			c.next(t, 3*clientPrompt, "the record stored while no instance was up", isRecordLine(during))
			c.next(t, clientPrompt, "ready from the new instance", isLine("ready"))
			after := second.store(t, user, "200002")
			c.next(t, clientPrompt, "a record from the new instance", isRecordLine(after))
			time.Sleep(500 * time.Millisecond)
			if got, want := c.records(), map[int64]int{during: 1, after: 1}; !reflect.DeepEqual(got, want) {
				t.Errorf("records shown (id: times) = %v, want %v", got, want)
			}
		})
	}
}

// TestExampleClientsStopOnReplacedAndReconnectOnOtherEnds: a stream that
// ends with `replaced` is not reopened (it would replace the newer stream
// in turn, forever); any other end is. The server here writes the
// contract's wire format by hand, so that every end reason, `unavailable`
// included, comes on demand and the connects can be counted; the real
// service's `replaced` is TestExampleClientsStopWhenANewerStreamReplacesThem.
func TestExampleClientsStopOnReplacedAndReconnectOnOtherEnds(t *testing.T) {
	node := needNode(t)
	cases := []struct {
		reason    string
		reconnect bool
	}{
		{reason: "replaced", reconnect: false},
		{reason: "unavailable", reconnect: true},
		{reason: "shutting_down", reconnect: true},
	}
	for _, ec := range exampleClients {
		for _, tc := range cases {
			name := ec.name + " after end " + tc.reason
			if tc.reconnect {
				name += " connects again"
			} else {
				name += " stops"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				var connects atomic.Int64
				srv := httptestSSE(t, func(w http.ResponseWriter, r *http.Request) {
					connects.Add(1)
					if r.Header.Get("Authorization") != "Bearer wire-token" {
						http.Error(w, `{"error":"unauthorized"}`, http.StatusUnauthorized)
						return
					}
					w.Header().Set("Content-Type", "text/event-stream")
					w.Header().Set("Cache-Control", "no-store")
					fmt.Fprint(w, "retry: 2000\n\n")
					fmt.Fprint(w, "event: ready\ndata: {}\n\n")
					http.NewResponseController(w).Flush()
					time.Sleep(100 * time.Millisecond)
					fmt.Fprintf(w, "event: end\ndata: {\"reason\":%q}\n\n", tc.reason)
				})
				c := startExampleClient(t, node, ec.script, srv+"/3ds/my-records/events", newTokenFile(t, "wire-token"))
				c.next(t, 3*clientPrompt, "end "+tc.reason, isEndLine(tc.reason))
				if !tc.reconnect {
					select {
					case err := <-c.exited:
						if err != nil {
							t.Errorf("the client exited with %v after replaced, want 0", err)
						}
					case <-time.After(clientPrompt):
						t.Fatal("the client is still running after replaced")
					}
					time.Sleep(2 * time.Second) // a reconnect at EventSource's pace (retry: 2000) would show now
					if n := connects.Load(); n != 1 {
						t.Errorf("%d connects, want 1: replaced must not be reopened", n)
					}
					return
				}
				c.next(t, clientPrompt, "ready again", isLine("ready"))
				if n := connects.Load(); n < 2 {
					t.Errorf("%d connects, want a second one after %s", n, tc.reason)
				}
			})
		}
	}
}

// httptestSSE serves h on 127.0.0.1 and returns its base URL.
func httptestSSE(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "http://" + ln.Addr().String()
}

// TestExampleClientsWaitForRetryAfterWhenTheInstanceIsFull: with
// STREAMS_MAX reached the service answers 503 with Retry-After; each client
// waits at least that long before its next connect (its own backoff is
// 0.2 s here, so a client that ignored the header would be back at once),
// then gets its stream once a place is free.
func TestExampleClientsWaitForRetryAfterWhenTheInstanceIsFull(t *testing.T) {
	node := needNode(t)
	for i, ec := range exampleClients {
		t.Run(ec.name, func(t *testing.T) {
			t.Parallel()
			g := startGatewayServiceWith(t, map[string]string{"STREAMS_MAX": "1", "STREAM_HEARTBEAT": "1s"})
			user := int64(7400 + i)
			holder := openGatewayStream(t, g.svc.base, g.token(t, 7500+int64(i)))
			holder.next(t, gatewayPrompt, "the place-holder's ready", isEvent("ready"))

			probe := fetch(opsClient, http.MethodGet, g.svc.base+"/3ds/my-records/events", g.token(t, user), "")
			retryAfter, err := time.ParseDuration(probe.header.Get("Retry-After") + "s")
			if probe.code != http.StatusServiceUnavailable || err != nil || retryAfter < time.Second {
				t.Fatalf("a stream over STREAMS_MAX: %d, Retry-After %q, want 503 and at least 1 s", probe.code, probe.header.Get("Retry-After"))
			}

			c := startExampleClient(t, node, ec.script, g.svc.base+"/3ds/my-records/events", newTokenFile(t, g.token(t, user)))
			first := c.next(t, 3*clientPrompt, "the first connect", isLine("connect"))
			c.next(t, clientPrompt, "the 503", func(l clientLine) bool { return l.What == "failure" && l.Status == http.StatusServiceUnavailable })
			holder.resp.Body.Close() // the place is free again
			second := c.next(t, retryAfter+clientPrompt, "the second connect", isLine("connect"))
			if gap := second.at.Sub(first.at); gap < retryAfter-100*time.Millisecond {
				t.Errorf("the client came back %s after a 503 with Retry-After %s", gap.Round(time.Millisecond), retryAfter)
			}
			c.next(t, clientPrompt, "ready once a place is free", isLine("ready"))
		})
	}
}

// TestExampleClientsStopWhenANewerStreamReplacesThem: with
// STREAMS_PER_USER=1 a second stream of the same user (the phone that came
// back on another network) is admitted and the client's stream ends with
// `replaced`; the client stops and never takes the place back, so the
// newer stream stays open and keeps getting the user's records.
func TestExampleClientsStopWhenANewerStreamReplacesThem(t *testing.T) {
	node := needNode(t)
	for i, ec := range exampleClients {
		t.Run(ec.name, func(t *testing.T) {
			t.Parallel()
			g := startGatewayServiceWith(t, map[string]string{"STREAMS_PER_USER": "1", "STREAM_HEARTBEAT": "1s"})
			user := int64(7600 + i)
			token := g.token(t, user)
			c := startExampleClient(t, node, ec.script, g.svc.base+"/3ds/my-records/events", newTokenFile(t, token))
			c.next(t, 3*clientPrompt, "ready", isLine("ready"))

			newer := openGatewayStream(t, g.svc.base, token)
			newer.next(t, gatewayPrompt, "the newer stream's ready", isEvent("ready"))
			c.next(t, clientPrompt, "end replaced", isEndLine("replaced"))
			select {
			case err := <-c.exited:
				if err != nil {
					t.Errorf("the client exited with %v after replaced, want 0", err)
				}
			case <-time.After(clientPrompt):
				t.Fatal("the client is still running after replaced")
			}
			// Had the client come back, the newer stream would now be the
			// one replaced.
			time.Sleep(2 * time.Second)
			id := g.store(t, user, "300001")
			newer.next(t, gatewayPrompt, "the record on the newer stream", func(ev gwEvent) bool {
				if isEvent("end")(ev) {
					t.Errorf("the newer stream ended: %s", ev.data)
				}
				return isEvent("record")(ev) && ev.id == fmt.Sprint(id)
			})
		})
	}
}
