package main

// Contract §6 behind a real gateway: the service (run() in process) behind a
// real nginx started by scripts/nginx.sh, whose config is the plain one a
// gateway team writes for any backend, proxy_buffering left at its default
// (on). What makes the stream work there is the service's own
// `X-Accel-Buffering: no` and its heartbeats, not gateway tuning.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/lestrrat-go/jwx/v2/jwa"
)

// gatewayPrompt is how long a test lets an event take through nginx. The
// contract's bound is 100 ms and is measured by `make bench`; this one is
// generous for a shared machine, yet far below what a buffering nginx does
// with a stream: hold it until it ends.
const gatewayPrompt = 2 * time.Second

// nginxVariant is one way a gateway team may have written its proxy config,
// as scripts/nginx.sh's environment. buffersStreams says whether nginx holds
// a streamed answer that lacks `X-Accel-Buffering: no`.
type nginxVariant struct {
	name           string
	env            []string
	buffersStreams bool
}

var nginxVariants = []nginxVariant{
	// nginx 1.22 passes each chunk of an HTTP/1.1 chunked answer on as it
	// comes, even with buffering on; the header is belt and braces here.
	{name: "plain HTTP/1.1 proxy", env: nil, buffersStreams: false},
	// proxy_pass alone: nginx speaks HTTP/1.0 to the upstream and, with
	// buffering on, hands the client nothing until the answer ends.
	{name: "nginx's default HTTP/1.0 to the upstream", env: []string{"NGINX_PROXY_HTTP_VERSION=1.0"}, buffersStreams: true},
	// A site that gzips everything: gzip waits for enough input unless the
	// upstream turned buffering off.
	{name: "gzip on for event streams and JSON", env: []string{"NGINX_GZIP=on"}, buffersStreams: true},
}

// startNginx starts scripts/nginx.sh in front of upstream (host:port) and
// returns nginx's base URL. On a clean CI machine (root, apt-get) the script
// installs the Debian package. A machine where nginx cannot be installed
// skips, with the reason, unless CI=true: there a skip would hide the one
// test that proves the gateway setup, so it fails instead.
func startNginx(t *testing.T, upstream string, env ...string) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("bash", "scripts/nginx.sh", "start", dir, upstream)
	cmd.Env = append(os.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := stderr.String()
		unavailable := strings.Contains(msg, "nginx was not found") || strings.Contains(msg, "apt-get install nginx failed")
		if unavailable && os.Getenv("CI") != "true" {
			t.Skipf("nginx is not installed and this machine cannot install it (needs root and apt-get, or NGINX_BIN): %s", strings.TrimSpace(msg))
		}
		t.Fatalf("scripts/nginx.sh start: %v\n%s", err, msg)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("bash", "scripts/nginx.sh", "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("scripts/nginx.sh stop: %v\n%s", err, out)
		}
	})
	return strings.TrimSpace(string(out))
}

// gwEvent is one thing read from an event stream: a dispatched event (the
// fields of the HTML standard's parser) or a comment line such as ": ping".
type gwEvent struct {
	event, id, data, retry string
	comment                string // the text after ':' on a comment line
	isComment              bool
	at                     time.Time // when the test read it
}

// gwStream is an open event stream, read in the background.
type gwStream struct {
	resp   *http.Response
	events chan gwEvent
	ended  chan error // receives the read error (io.EOF included) once
}

// openGatewayStream opens GET /3ds/my-records/events at base with token and
// reads it in the background until the test ends.
func openGatewayStream(t *testing.T, base, token string) *gwStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/3ds/my-records/events", nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "text/event-stream")
	// A transport of its own: nothing else shares or reuses this connection.
	tr := &http.Transport{ResponseHeaderTimeout: 10 * time.Second}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		cancel()
		t.Fatalf("open the event stream: %v", err)
	}
	s := &gwStream{resp: resp, events: make(chan gwEvent, 1024), ended: make(chan error, 1)}
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
		tr.CloseIdleConnections()
	})
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		t.Fatalf("event stream: status %d, body %s", resp.StatusCode, body)
	}
	go s.read()
	return s
}

func (s *gwStream) read() {
	br := bufio.NewReader(s.resp.Body)
	var cur gwEvent
	var any bool
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			s.ended <- err
			return
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			if any {
				cur.at = time.Now()
				s.events <- cur
			}
			cur, any = gwEvent{}, false
			continue
		}
		if rest, ok := strings.CutPrefix(line, ":"); ok {
			s.events <- gwEvent{isComment: true, comment: strings.TrimPrefix(rest, " "), at: time.Now()}
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		any = true
		switch field {
		case "event":
			cur.event = value
		case "id":
			cur.id = value
		case "data":
			if cur.data != "" {
				cur.data += "\n"
			}
			cur.data += value
		case "retry":
			cur.retry = value
		}
	}
}

// next returns the first event for which match holds, skipping the others,
// and fails the test if none comes within d or the stream ends first.
func (s *gwStream) next(t *testing.T, d time.Duration, what string, match func(gwEvent) bool) gwEvent {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case ev := <-s.events:
			if match(ev) {
				return ev
			}
		case err := <-s.ended:
			s.ended <- err
			t.Fatalf("the stream ended (%v) before %s", err, what)
		case <-timer.C:
			t.Fatalf("no %s within %s", what, d)
		}
	}
}

// collect gathers what arrives for d; err is the read error if the stream
// ended within d, nil if it was still open.
func (s *gwStream) collect(d time.Duration) (got []gwEvent, err error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case ev := <-s.events:
			got = append(got, ev)
		case err := <-s.ended:
			s.ended <- err
			return got, err
		case <-timer.C:
			return got, nil
		}
	}
}

// firstBytesWithin sends one GET for the event stream over a raw connection,
// as a browser would (gzip accepted), and returns what arrived within d, once
// the headers and the first bytes of the body are in: a buffering nginx
// holds even the status line and headers, which leave with the first body
// buffer.
func firstBytesWithin(base string, d time.Duration) (string, error) {
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 5*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(d))
	if _, err := io.WriteString(conn, "GET /3ds/my-records/events HTTP/1.1\r\nHost: gateway.test\r\nAccept: text/event-stream\r\nAccept-Encoding: gzip\r\n\r\n"); err != nil {
		return "", err
	}
	var got []byte
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			return string(got), err
		}
		if head, body, ok := strings.Cut(string(got), "\r\n\r\n"); ok && body != "" {
			return head, nil
		}
	}
}

func isEvent(name string) func(gwEvent) bool {
	return func(ev gwEvent) bool { return !ev.isComment && ev.event == name }
}

// gatewayService is the service with a signing key and a migrated database
// (so the NOTIFY trigger is in place), and a pool to store records as the
// card issuer's integration does.
type gatewayService struct {
	svc  *runningService
	key  testKey
	pool *pgxpool.Pool
	dsn  string
	jwks string // the identity provider's JWKS URL
}

func startGatewayService(t *testing.T, heartbeat time.Duration) *gatewayService {
	t.Helper()
	return startGatewayServiceWith(t, map[string]string{"STREAM_HEARTBEAT": heartbeat.String()})
}

// startGatewayServiceWith starts the service on a database of its own, with
// extra settings in env.
func startGatewayServiceWith(t *testing.T, env map[string]string) *gatewayService {
	t.Helper()
	dsn := newEmptyTestDB(t)
	if err := run(context.Background(), []string{"migrate"}, envFunc(map[string]string{"DATABASE_URL": dsn}), &syncBuffer{}, &syncBuffer{}); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	key := newTestKey(t, jwa.ES256, "gateway", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	return startGatewayServiceOn(t, &gatewayService{key: key, dsn: dsn, jwks: idp.URL}, env)
}

// startGatewayServiceOn starts another instance of the service on like's
// database and identity provider, as a second replica or a restart is.
func startGatewayServiceOn(t *testing.T, like *gatewayService, extra map[string]string) *gatewayService {
	t.Helper()
	env := serviceEnv(like.dsn, like.jwks)
	for k, v := range extra {
		env[k] = v
	}
	svc := startRun(t, env)
	waitFor(t, 15*time.Second, "readiness", func() bool { code, _ := svc.get(t, "/readyz", ""); return code == http.StatusOK })
	// Readiness does not wait for the LISTEN session (the list endpoint
	// works without it); a stream opened before it is up is a 503.
	waitFor(t, 15*time.Second, "the LISTEN session", func() bool {
		_, body := svc.get(t, "/metrics", "")
		return strings.Contains(string(body), "\nthreeds_stream_source_up{source=\"notify\"} 1\n")
	})
	return &gatewayService{svc: svc, key: like.key, pool: newTestPool(t, like.dsn, nil), dsn: like.dsn, jwks: like.jwks}
}

// upstream is the host:port nginx proxies to.
func (g *gatewayService) upstream() string { return strings.TrimPrefix(g.svc.base, "http://") }

func (g *gatewayService) token(t *testing.T, user int64) string {
	return g.key.token(t, validClaims(fmt.Sprint(user)))
}

// store inserts a live record for user, as the card issuer does, and returns
// its id once the INSERT has committed.
func (g *gatewayService) store(t *testing.T, user int64, passcode string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var id int64
	err := g.pool.QueryRow(ctx, `
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at)
VALUES ($1, $2, 12.5, 'EUR', 'Gateway Test Shop', 300, now()) RETURNING id`, user, passcode).Scan(&id)
	if err != nil {
		t.Fatalf("store a record: %v", err)
	}
	return id
}

// listed is record id as the list endpoint renders it (straight from the
// service, not through the gateway), the shape a record event must carry.
func (g *gatewayService) listed(t *testing.T, token string, id int64) map[string]any {
	t.Helper()
	code, body := g.svc.get(t, "/3ds/my-records?page_size=100", token)
	if code != http.StatusOK {
		t.Fatalf("list: %d %s", code, body)
	}
	var page struct {
		Data struct {
			Records []map[string]any `json:"records"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &page); err != nil {
		t.Fatalf("list body: %v", err)
	}
	for _, r := range page.Data.Records {
		if r["id"] == float64(id) {
			return r
		}
	}
	t.Fatalf("record %d is not in the list", id)
	return nil
}

// TestNginxHoldsAStreamWithoutXAccelBufferingInTheVariantsThatBuffer is the
// control for the tests below: an upstream that streams an event without
// the header gets it held by the nginx variants that buffer, so a prompt
// event through them is the service's header at work, not luck.
func TestNginxHoldsAStreamWithoutXAccelBufferingInTheVariantsThatBuffer(t *testing.T) {
	cases := []struct {
		name   string
		header bool
	}{
		{name: "with X-Accel-Buffering: no", header: true},
		{name: "without the header", header: false},
	}
	for _, uc := range cases {
		release := make(chan struct{})
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-store")
			if uc.header {
				w.Header().Set("X-Accel-Buffering", "no")
			}
			fmt.Fprint(w, "retry: 1000\n\nevent: ready\ndata: {}\n\n")
			http.NewResponseController(w).Flush()
			// The answer stays open until the test releases it, as a stream does.
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })

		for _, v := range nginxVariants {
			t.Run(uc.name+" through "+v.name, func(t *testing.T) {
				base := startNginx(t, ln.Addr().String(), v.env...)
				got, err := firstBytesWithin(base, gatewayPrompt)
				if uc.header || !v.buffersStreams {
					if err != nil || !strings.HasPrefix(got, "HTTP/1.1 200") {
						t.Fatalf("nothing of the stream within %s (read %q, %v)", gatewayPrompt, got, err)
					}
					return
				}
				var ne net.Error
				if got != "" || !errors.As(err, &ne) || !ne.Timeout() {
					t.Fatalf("nginx passed %q (read error %v) while the upstream answer was open: the fixture does not buffer, so it cannot tell whether the service's header matters", got, err)
				}
			})
		}
		close(release)
	}
}

// TestTheEventStreamGetsThroughNginxAtOnceWithDefaultBuffering: through
// every variant a record committed after `ready` reaches the client within
// gatewayPrompt, exactly as the list endpoint renders it, with the stream's
// headers intact; another user's record never arrives.
func TestTheEventStreamGetsThroughNginxAtOnceWithDefaultBuffering(t *testing.T) {
	g := startGatewayService(t, 15*time.Second)
	const user, other = 4242, 4343
	token := g.token(t, user)
	for i, v := range nginxVariants {
		t.Run(v.name, func(t *testing.T) {
			base := startNginx(t, g.upstream(), v.env...)
			s := openGatewayStream(t, base, token)
			h := s.resp.Header
			if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
				t.Errorf("Content-Type through nginx = %q", ct)
			}
			if cc := h.Get("Cache-Control"); cc != "no-store" {
				t.Errorf("Cache-Control through nginx = %q, want no-store", cc)
			}
			if h.Get("X-Request-ID") == "" {
				t.Error("no X-Request-ID through nginx")
			}
			s.next(t, gatewayPrompt, "the retry line", func(ev gwEvent) bool { return ev.retry != "" })
			s.next(t, gatewayPrompt, "event: ready", isEvent("ready"))

			foreign := g.store(t, other, fmt.Sprintf("9%05d", i))
			id := g.store(t, user, fmt.Sprintf("0%05d", i))
			committed := time.Now()
			ev := s.next(t, gatewayPrompt, fmt.Sprintf("the record event for id %d", id), func(ev gwEvent) bool {
				if !ev.isComment && ev.event == "record" && ev.id == fmt.Sprint(foreign) {
					t.Errorf("user %d got user %d's record %d", user, other, foreign)
				}
				return isEvent("record")(ev) && ev.id == fmt.Sprint(id)
			})
			t.Logf("commit to event through nginx (%s): %s", v.name, ev.at.Sub(committed).Round(time.Millisecond))
			var data map[string]any
			if err := json.Unmarshal([]byte(ev.data), &data); err != nil {
				t.Fatalf("record data is not JSON: %v: %q", err, ev.data)
			}
			if want := g.listed(t, token, id); !reflect.DeepEqual(data, want) {
				t.Errorf("record event data = %v, want the list's record %v", data, want)
			}
		})
	}
}

// TestTheEventStreamOutlivesNginxProxyReadTimeoutThanksToHeartbeats: nginx
// closes an upstream connection that stays silent for proxy_read_timeout
// (3 s here); a heartbeat shorter than that keeps the stream open through
// three such periods and it still delivers records. The second row is the
// control: a heartbeat longer than the timeout, and nginx cuts the stream.
func TestTheEventStreamOutlivesNginxProxyReadTimeoutThanksToHeartbeats(t *testing.T) {
	const readTimeout = 3 * time.Second
	cases := []struct {
		name      string
		heartbeat time.Duration
		survives  bool
	}{
		{name: "heartbeat 1s under a 3s proxy_read_timeout", heartbeat: time.Second, survives: true},
		{name: "heartbeat 20s over a 3s proxy_read_timeout", heartbeat: 20 * time.Second, survives: false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := startGatewayService(t, c.heartbeat)
			const user = 5151
			token := g.token(t, user)
			base := startNginx(t, g.upstream(), "NGINX_PROXY_READ_TIMEOUT="+readTimeout.String())
			s := openGatewayStream(t, base, token)
			ready := s.next(t, gatewayPrompt, "event: ready", isEvent("ready"))

			got, err := s.collect(3 * readTimeout)
			if !c.survives {
				if err == nil {
					t.Fatalf("the stream outlived nginx's %s proxy_read_timeout without heartbeats: the fixture's timeout is not in force", readTimeout)
				}
				t.Logf("without heartbeats nginx ended the stream after %s (%v)", time.Since(ready.at).Round(100*time.Millisecond), err)
				return
			}
			if err != nil {
				t.Fatalf("the stream ended after %s (%v) under a %s proxy_read_timeout despite %s heartbeats", time.Since(ready.at).Round(100*time.Millisecond), err, readTimeout, c.heartbeat)
			}
			var pings int
			for _, ev := range got {
				if ev.isComment {
					pings++
				}
			}
			// One per second of silence; a loaded machine may lose a few.
			if min := int(3*readTimeout/c.heartbeat) / 2; pings < min {
				t.Errorf("%d heartbeats in %s, want at least %d", pings, 3*readTimeout, min)
			}
			id := g.store(t, user, "777001")
			s.next(t, gatewayPrompt, "a record after the long silence", func(ev gwEvent) bool {
				return isEvent("record")(ev) && ev.id == fmt.Sprint(id)
			})
		})
	}
}

// TestTheListEndpointWorksThroughNginx: the page and an error come through
// every variant unchanged: status, JSON body, no-store, the request id.
func TestTheListEndpointWorksThroughNginx(t *testing.T) {
	g := startGatewayService(t, 15*time.Second)
	const user = 6161
	token := g.token(t, user)
	id := g.store(t, user, "012345")
	want := g.listed(t, token, id)
	for _, v := range nginxVariants {
		t.Run(v.name, func(t *testing.T) {
			base := startNginx(t, g.upstream(), v.env...)
			ok := fetch(opsClient, http.MethodGet, base+"/3ds/my-records?page=1&page_size=5", token, "gw-req-1")
			if ok.err != nil || ok.code != http.StatusOK {
				t.Fatalf("page through nginx: %d %v %s", ok.code, ok.err, ok.body)
			}
			var page struct {
				Status string `json:"status"`
				Data   struct {
					Total   int              `json:"total"`
					Records []map[string]any `json:"records"`
				} `json:"data"`
			}
			if err := json.Unmarshal(ok.body, &page); err != nil {
				t.Fatalf("page body through nginx: %v: %s", err, ok.body)
			}
			if page.Status != "success" || page.Data.Total != 1 || len(page.Data.Records) != 1 || !reflect.DeepEqual(page.Data.Records[0], want) {
				t.Errorf("page through nginx = %s, want the one record %v", ok.body, want)
			}
			for k, w := range map[string]string{"Cache-Control": "no-store", "X-Request-Id": "gw-req-1"} {
				if got := ok.header.Get(k); got != w {
					t.Errorf("%s through nginx = %q, want %q", k, got, w)
				}
			}
			if ct := ok.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type through nginx = %q", ct)
			}

			denied := fetch(opsClient, http.MethodGet, base+"/3ds/my-records", "", "")
			var e struct{ Error, Details string }
			if denied.code != http.StatusUnauthorized || json.Unmarshal(denied.body, &e) != nil || e.Error == "" ||
				!strings.HasPrefix(denied.header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("no token through nginx: %d %q %s", denied.code, denied.header.Get("WWW-Authenticate"), denied.body)
			}
		})
	}
}

// startHAProxy starts scripts/haproxy.sh in front of upstream (host:port)
// and returns HAProxy's base URL; like startNginx, it installs the Debian
// package as root, and skips where it cannot unless CI=true.
func startHAProxy(t *testing.T, upstream string, env ...string) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("bash", "scripts/haproxy.sh", "start", dir, upstream)
	cmd.Env = append(os.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := stderr.String()
		unavailable := strings.Contains(msg, "haproxy was not found") || strings.Contains(msg, "apt-get install haproxy failed")
		if unavailable && os.Getenv("CI") != "true" {
			t.Skipf("HAProxy is not installed and this machine cannot install it (needs root and apt-get, or HAPROXY_BIN): %s", strings.TrimSpace(msg))
		}
		t.Fatalf("scripts/haproxy.sh start: %v\n%s", err, msg)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("bash", "scripts/haproxy.sh", "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("scripts/haproxy.sh stop: %v\n%s", err, out)
		}
	})
	return strings.TrimSpace(string(out))
}

// haproxyNoDelayBound is how much later than on a direct stream an event
// may arrive through HAProxy with `option http-no-delay`, at the median of
// several records: tight, yet far below the ~200 ms of HAProxy's batching.
const haproxyNoDelayBound = 50 * time.Millisecond

// TestTheEventStreamGetsThroughHAProxyAtOnceWithHTTPNoDelay: the same
// user's stream is open directly, through HAProxy with `option
// http-no-delay`, and through a stock HAProxy; records are stored one at a
// time. Through http-no-delay each arrives within haproxyNoDelayBound of the
// direct stream's (median); the stock config is the control: it holds each
// event back (its send batching), so the bound is not met by luck.
func TestTheEventStreamGetsThroughHAProxyAtOnceWithHTTPNoDelay(t *testing.T) {
	g := startGatewayService(t, 15*time.Second)
	const user = 8181
	token := g.token(t, user)
	direct := openGatewayStream(t, g.svc.base, token)
	noDelay := openGatewayStream(t, startHAProxy(t, g.upstream(), "HAPROXY_HTTP_NO_DELAY=on"), token)
	stock := openGatewayStream(t, startHAProxy(t, g.upstream()), token)
	for _, s := range []*gwStream{direct, noDelay, stock} {
		s.next(t, gatewayPrompt, "event: ready", isEvent("ready"))
	}
	if h := noDelay.resp.Header; !strings.HasPrefix(h.Get("Content-Type"), "text/event-stream") || h.Get("Cache-Control") != "no-store" || h.Get("X-Request-ID") == "" {
		t.Errorf("headers through HAProxy = %v", h)
	}

	const records = 9
	var lateNoDelay, lateStock []time.Duration
	for i := range records {
		id := g.store(t, user, fmt.Sprintf("8%05d", i))
		what := fmt.Sprintf("the record event for id %d", id)
		match := func(ev gwEvent) bool { return isEvent("record")(ev) && ev.id == fmt.Sprint(id) }
		at := direct.next(t, gatewayPrompt, what, match).at
		lateNoDelay = append(lateNoDelay, noDelay.next(t, gatewayPrompt, what+" through http-no-delay", match).at.Sub(at))
		lateStock = append(lateStock, stock.next(t, gatewayPrompt, what+" through a stock HAProxy", match).at.Sub(at))
		time.Sleep(300 * time.Millisecond) // one event at a time, as passcodes come
	}
	nd, st := medianDuration(lateNoDelay), medianDuration(lateStock)
	t.Logf("later than direct, median of %d records: http-no-delay %s, stock HAProxy %s (all: %v / %v)",
		records, nd.Round(100*time.Microsecond), st.Round(100*time.Microsecond), roundAll(lateNoDelay), roundAll(lateStock))
	if nd > haproxyNoDelayBound {
		t.Errorf("through HAProxy with http-no-delay, events arrive %s later than direct (median), want at most %s", nd, haproxyNoDelayBound)
	}
	if st < 2*haproxyNoDelayBound {
		t.Errorf("through a stock HAProxy, events arrive only %s later than direct (median): the control shows no batching, so the bound above proves nothing", st)
	}
}

func medianDuration(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	slices.Sort(s)
	return s[len(s)/2]
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// TestTheEventStreamOutlivesHAProxyTimeoutsThanksToHeartbeats: HAProxy
// closes a stream whose server side stays silent for `timeout server` (3 s
// here); a heartbeat shorter than that keeps the stream open through three
// such periods and it still delivers records; a longer one is the control.
// `timeout client` and `timeout tunnel` do not cut an idle event stream
// (the client has sent its whole request; a plain HTTP answer is no
// tunnel): the last row shows it, so nobody tunes them for this.
func TestTheEventStreamOutlivesHAProxyTimeoutsThanksToHeartbeats(t *testing.T) {
	const idle = 3 * time.Second
	cases := []struct {
		name      string
		timeouts  []string
		heartbeat time.Duration
		survives  bool
	}{
		{name: "heartbeat 1s under a 3s timeout server", timeouts: []string{"HAPROXY_TIMEOUT_SERVER=3s"}, heartbeat: time.Second, survives: true},
		{name: "heartbeat 20s over a 3s timeout server", timeouts: []string{"HAPROXY_TIMEOUT_SERVER=3s"}, heartbeat: 20 * time.Second, survives: false},
		{name: "heartbeat 20s over a 3s timeout client and timeout tunnel, timeout server 60s", timeouts: []string{"HAPROXY_TIMEOUT_CLIENT=3s", "HAPROXY_TIMEOUT_TUNNEL=3s"}, heartbeat: 20 * time.Second, survives: true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			g := startGatewayService(t, c.heartbeat)
			user := int64(8282 + i)
			token := g.token(t, user)
			base := startHAProxy(t, g.upstream(), append([]string{"HAPROXY_HTTP_NO_DELAY=on"}, c.timeouts...)...)
			s := openGatewayStream(t, base, token)
			ready := s.next(t, gatewayPrompt, "event: ready", isEvent("ready"))

			got, err := s.collect(3 * idle)
			if !c.survives {
				if err == nil {
					t.Fatalf("the stream outlived HAProxy's %v without heartbeats: the fixture's timeouts are not in force", c.timeouts)
				}
				t.Logf("without heartbeats HAProxy ended the stream after %s (%v)", time.Since(ready.at).Round(100*time.Millisecond), err)
				return
			}
			if err != nil {
				t.Fatalf("the stream ended after %s (%v) under %v with %s heartbeats", time.Since(ready.at).Round(100*time.Millisecond), err, c.timeouts, c.heartbeat)
			}
			var pings int
			for _, ev := range got {
				if ev.isComment {
					pings++
				}
			}
			if min := int(3*idle/c.heartbeat) / 2; c.heartbeat < idle && pings < min {
				t.Errorf("%d heartbeats in %s, want at least %d", pings, 3*idle, min)
			}
			id := g.store(t, user, "888001")
			s.next(t, gatewayPrompt, "a record after the long silence", func(ev gwEvent) bool {
				return isEvent("record")(ev) && ev.id == fmt.Sprint(id)
			})
		})
	}
}
