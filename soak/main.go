// Command soak runs the real threeds-records binary under steady load while
// its dependencies fail and hostile clients arrive, then prints what held:
// the last phase stalls the database under a flood of requests and idle
// connections and holds the process's RSS to the Kubernetes memory limit.
// scripts/soak.sh (make soak) builds everything and starts the database; run
// it from there. Every loop here is bounded in time and talks to 127.0.0.1
// only.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

const (
	issuer       = "https://issuer.soak.local"
	audience     = "threeds-records"
	users        = 200
	rowsPerUser  = 30
	goodKid      = "soak-1"
	recoveryWait = 60 * time.Second
	// dbQueryTimeout is the service's DB_QUERY_TIMEOUT here.
	dbQueryTimeout = 3 * time.Second
)

type options struct {
	bin, databaseURL, pgScript, pgDir, logPath, pidPath, reportPath string
	workers, rate                                                   int
	scale                                                           float64
	// The stall phase: the Kubernetes manifest whose memory limit the
	// service must stay under (or memoryLimitMiB to override it), the
	// connections the gateway may hold open, and the flood's clients.
	manifest                 string
	memoryLimitMiB           float64
	gatewayConns, floodConns int
	floodPause               time.Duration
	phases                   string // which phases to run, by number
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "", "the threeds-records binary to run")
	flag.StringVar(&o.databaseURL, "database-url", "", "migrated database to seed and serve")
	flag.StringVar(&o.pgScript, "pg-script", "scripts/pg.sh", "scripts/pg.sh, used to restart the database")
	flag.StringVar(&o.pgDir, "pg-dir", "", "the cluster directory given to pg.sh")
	flag.StringVar(&o.logPath, "log", "service.log", "where the service's stdout and stderr go")
	flag.StringVar(&o.pidPath, "pidfile", "", "write the service's pid here (for the script's cleanup)")
	flag.StringVar(&o.reportPath, "report", "", "also write the Markdown report here")
	flag.IntVar(&o.workers, "workers", 8, "concurrent clients of the steady load")
	flag.IntVar(&o.rate, "rate", 200, "steady load in requests per second, all clients together")
	flag.Float64Var(&o.scale, "scale", 1, "multiply every phase duration (0.2 for a quick trial)")
	flag.StringVar(&o.manifest, "manifest", "deploy/kubernetes/deployment.yaml", "Kubernetes manifest whose threeds-records memory limit the stall phase enforces")
	flag.Float64Var(&o.memoryLimitMiB, "memory-limit-mib", 0, "memory limit for the stall phase in MiB (0: read it from -manifest)")
	flag.IntVar(&o.gatewayConns, "gateway-conns", 1024, "stall phase: idle keep-alive connections held open, as a gateway's pool would")
	flag.IntVar(&o.floodConns, "flood-conns", 256, "stall phase: clients sending requests back to back, each on its own connection")
	flag.DurationVar(&o.floodPause, "flood-pause", 100*time.Millisecond, "stall phase: a flood client's pause after a 503")
	flag.StringVar(&o.phases, "phases", "", "comma-separated phase numbers to run, e.g. 0,5 (default: all)")
	flag.Parse()
	if o.bin == "" || o.databaseURL == "" || o.pgDir == "" {
		fmt.Fprintln(os.Stderr, "soak: -bin, -database-url and -pg-dir are required; run it through scripts/soak.sh")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ok, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
	if !ok {
		fmt.Fprintln(os.Stderr, "soak: FAILED: a value that must be 0 is not (see the table)")
		os.Exit(1)
	}
}

func (o options) d(seconds float64) time.Duration {
	return time.Duration(seconds * o.scale * float64(time.Second))
}

func run(ctx context.Context, o options) (bool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return false, err
	}
	idp, err := startIDP(key)
	if err != nil {
		return false, err
	}
	defer idp.Close()

	limitMiB := o.memoryLimitMiB
	if limitMiB <= 0 {
		if limitMiB, err = manifestMemoryLimitMiB(o.manifest, "threeds-records"); err != nil {
			return false, err
		}
	}

	say("seeding %d users x %d rows", users, rowsPerUser)
	if err := seed(ctx, o.databaseURL); err != nil {
		return false, err
	}
	tokens := make([]string, users+1)
	for u := 1; u <= users; u++ {
		if tokens[u], err = mint(key, goodKid, u, time.Hour); err != nil {
			return false, err
		}
	}
	stranger, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	svc, err := startService(ctx, o, idp.URL())
	if err != nil {
		return false, err
	}
	defer svc.stop()
	say("service pid %d on %s", svc.cmd.Process.Pid, svc.base)

	ld := newLoad(svc.base, tokens, o.workers, o.rate)
	loadCtx, stopLoad := context.WithCancel(ctx)
	var loadDone sync.WaitGroup
	ld.start(loadCtx, &loadDone)
	defer func() { stopLoad(); loadDone.Wait() }()

	// Warm up so the first snapshot already counts the load's keep-alive
	// connections, as every later one does.
	ld.switchTo(newCounts())
	if err := sleep(ctx, 2*time.Second); err != nil {
		return false, err
	}
	ld.switchTo(nil)

	var results []*phaseResult
	phases := []struct {
		name, fault string
		// dbFault: the database fails, so the steady load may see 500s
		// (and 503s once MAX_IN_FLIGHT requests are parked) while it lasts.
		dbFault bool
		inject  func(ctx context.Context, p *phaseResult) error
	}{
		{"0 baseline", "none (steady load only)", false, func(ctx context.Context, p *phaseResult) error {
			return sleep(ctx, o.d(10))
		}},
		{"1 PostgreSQL restart", "`scripts/pg.sh restart` (fast stop, start on the same port)", true, func(ctx context.Context, p *phaseResult) error {
			if err := sleep(ctx, o.d(3)); err != nil {
				return err
			}
			start := time.Now()
			cmd := exec.CommandContext(ctx, "bash", o.pgScript, "restart", o.pgDir)
			cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("pg.sh restart: %w", err)
			}
			p.note("database down for %s", time.Since(start).Round(100*time.Millisecond))
			return nil
		}},
		{"2 JWKS outage", fmt.Sprintf("JWKS endpoint down for %s: answers 503, then resets connections, then accepts and never answers (%s each)", o.d(30), o.d(10)), false, func(ctx context.Context, p *phaseResult) error {
			return jwksOutage(ctx, o, idp, svc.base, stranger, p)
		}},
		{"3 slowloris", fmt.Sprintf("500 connections dribbling one header line a second for %s", o.d(30)), false, func(ctx context.Context, p *phaseResult) error {
			return slowloris(ctx, svc.addr, 500, o.d(30), p)
		}},
		{"4 1 MiB headers", fmt.Sprintf("requests with 1 MiB of headers in 3 shapes from 2 senders for %s", o.d(20)), false, func(ctx context.Context, p *phaseResult) error {
			return bigHeaders(ctx, svc.addr, tokens[1], o.d(20), p)
		}},
		{"5 PostgreSQL stall + flood", fmt.Sprintf("the table locked for %s (ACCESS EXCLUSIVE, as a stuck migration would) while %d idle gateway connections stay open and %d clients send requests back to back; RSS must stay under the %.0f MiB memory limit",
			o.d(20), o.gatewayConns, o.floodConns, limitMiB), true, func(ctx context.Context, p *phaseResult) error {
			return stallFlood(ctx, o, svc, tokens, limitMiB, p)
		}},
	}
	first := svc.snapshot()
	for _, ph := range phases {
		if number, _, _ := strings.Cut(ph.name, " "); o.phases != "" && !slices.Contains(strings.Split(o.phases, ","), number) {
			continue
		}
		p := &phaseResult{name: ph.name, fault: ph.fault, dbFault: ph.dbFault, during: newCounts(), after: newCounts()}
		results = append(results, p)
		say("phase %s: %s", ph.name, ph.fault)
		p.before = svc.snapshot()
		ld.switchTo(p.during)
		sampleCtx, stopSampling := context.WithCancel(ctx)
		sampled := make(chan snapshot, 1)
		go func() { sampled <- peak(sampleCtx, svc) }()
		err := ph.inject(ctx, p)
		stopSampling()
		p.peak = <-sampled
		if err != nil {
			return false, fmt.Errorf("phase %s: %w", ph.name, err)
		}
		faultEnd := time.Now()
		if err := waitReady(ctx, svc.base, recoveryWait); err != nil {
			p.recovery = -1
			p.note("not ready %s after the fault: %v", recoveryWait, err)
		} else {
			p.recovery = time.Since(faultEnd)
		}
		ld.switchTo(p.after)
		if err := sleep(ctx, o.d(15)); err != nil {
			return false, err
		}
		ld.switchTo(nil)
		if err := svc.alive(); err != nil {
			return false, err
		}
		settle(ctx, svc, p.before)
		p.afterSnap = svc.snapshot()
	}
	stopLoad()
	loadDone.Wait()
	last := svc.snapshot()
	shutdown := svc.terminate(20 * time.Second)

	report := render(o, results, first, last, shutdown)
	fmt.Print(report)
	if o.reportPath != "" {
		_ = os.WriteFile(o.reportPath, []byte(report), 0o644)
	}
	return verdict(results, first, last, shutdown), nil
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "soak %s: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// ---- the identity provider ----

type idpMode int32

const (
	idpUp idpMode = iota
	idp503
	idpReset
	idpHang
)

type idpServer struct {
	srv        *http.Server
	ln         net.Listener
	body       []byte
	mode       atomic.Int32
	served     atomic.Int64 // good answers
	refused    atomic.Int64 // 503s and resets
	lastServed atomic.Int64 // unix nanos of the last good answer
}

func startIDP(key *ecdsa.PrivateKey) (*idpServer, error) {
	pub, err := jwk.FromRaw(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	_ = pub.Set(jwk.KeyIDKey, goodKid)
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256)
	_ = pub.Set(jwk.KeyUsageKey, jwk.ForSignature)
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	body, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &idpServer{ln: ln, body: body}
	s.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(s.serve)}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *idpServer) URL() string { return "http://" + s.ln.Addr().String() + "/jwks.json" }
func (s *idpServer) Close()      { _ = s.srv.Close() }

func (s *idpServer) serve(w http.ResponseWriter, r *http.Request) {
	switch idpMode(s.mode.Load()) {
	case idp503:
		s.refused.Add(1)
		http.Error(w, "identity provider down", http.StatusServiceUnavailable)
	case idpReset:
		s.refused.Add(1)
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				if tc, ok := conn.(*net.TCPConn); ok {
					_ = tc.SetLinger(0) // RST, not FIN: the harshest way to be down
				}
				_ = conn.Close()
				return
			}
		}
		http.Error(w, "down", http.StatusBadGateway)
	case idpHang:
		// Accepts and never answers: only the service's own client timeout
		// gets it out. Bounded so a stuck soak cannot hold it forever.
		s.refused.Add(1)
		select {
		case <-r.Context().Done():
		case <-time.After(time.Minute):
		}
	default:
		s.served.Add(1)
		s.lastServed.Store(time.Now().UnixNano())
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(s.body)
	}
}

func mint(key *ecdsa.PrivateKey, kid string, user int, ttl time.Duration) (string, error) {
	now := time.Now().Unix()
	payload, _ := json.Marshal(map[string]any{
		"iss": issuer, "aud": audience, "sub": strconv.Itoa(user),
		"iat": now, "nbf": now, "exp": now + int64(ttl.Seconds()),
	})
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, kid)
	_ = hdr.Set(jws.TypeKey, "JWT")
	tok, err := jws.Sign(payload, jws.WithKey(jwa.ES256, key, jws.WithProtectedHeaders(hdr)))
	return string(tok), err
}

// ---- database ----

// seed gives user u the ids u*1000+1 .. u*1000+rowsPerUser, so any answer
// can be checked for rows of another user from the ids alone.
func seed(ctx context.Context, databaseURL string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "TRUNCATE threeds_records"); err != nil {
		return fmt.Errorf("seed: %w (was the schema migrated?)", err)
	}
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var rows [][]any
	for u := 1; u <= users; u++ {
		for i := 1; i <= rowsPerUser; i++ {
			rows = append(rows, []any{int64(u*1000 + i), int64(u), fmt.Sprintf("%06d", (u*7919+i)%1000000),
				fmt.Sprintf("%d.%02d", i, u%100), "USD", "Soak Store", int32(300), base.Add(time.Duration(u*rowsPerUser+i) * time.Minute)})
		}
	}
	_, err = conn.CopyFrom(ctx, pgx.Identifier{"threeds_records"},
		[]string{"id", "user_id", "passcode", "amount", "currency", "merchant_name", "expires_after", "received_at"},
		pgx.CopyFromRows(rows))
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	_, err = conn.Exec(ctx, "VACUUM ANALYZE threeds_records")
	return err
}

// ---- the service under test ----

type service struct {
	cmd     *exec.Cmd
	base    string
	addr    string
	exited  chan struct{}
	exitErr error
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func startService(ctx context.Context, o options, jwksURL string) (*service, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(o.logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(o.bin)
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+o.databaseURL,
		"JWKS_URL="+jwksURL,
		"JWT_ISSUER="+issuer,
		"JWT_AUDIENCE="+audience,
		"LISTEN_ADDR="+addr,
		"SHUTDOWN_TIMEOUT=10s",
		// As deploy/kubernetes/deployment.yaml sets it; the stall phase's
		// parked requests end at this deadline.
		"DB_QUERY_TIMEOUT="+dbQueryTimeout.String(),
	)
	cmd.Env = slices.DeleteFunc(cmd.Env, func(kv string) bool { return strings.HasPrefix(kv, "JWKS_FILE=") })
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &service{cmd: cmd, base: "http://" + addr, addr: addr, exited: make(chan struct{})}
	go func() { s.exitErr = cmd.Wait(); logf.Close(); close(s.exited) }()
	if o.pidPath != "" {
		_ = os.WriteFile(o.pidPath, []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	}
	if err := waitReady(ctx, s.base, 30*time.Second); err != nil {
		s.stop()
		return nil, fmt.Errorf("the service never became ready (log: %s): %w", o.logPath, err)
	}
	return s, nil
}

func (s *service) alive() error {
	select {
	case <-s.exited:
		return fmt.Errorf("the service exited during the soak: %v", s.exitErr)
	default:
		return nil
	}
}

func (s *service) stop() {
	if s.alive() == nil {
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// terminate sends SIGTERM as Kubernetes would and reports how it ended.
func (s *service) terminate(within time.Duration) string {
	if err := s.alive(); err != nil {
		return err.Error()
	}
	start := time.Now()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.exitErr != nil {
			return fmt.Sprintf("SIGTERM: exited with %v after %s", s.exitErr, time.Since(start).Round(time.Millisecond))
		}
		return fmt.Sprintf("SIGTERM: exit 0 after %s", time.Since(start).Round(time.Millisecond))
	case <-time.After(within):
		s.stop()
		return fmt.Sprintf("SIGTERM: still running after %s, killed", within)
	}
}

func waitReady(ctx context.Context, base string, within time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		resp, err := client.Get(base + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readyz %d", resp.StatusCode)
		}
		last = err
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	return last
}

// snapshot is the process's size: goroutines from /metrics (go_goroutines),
// threads and RSS from /proc/<pid>/status (Linux only; "n/a" elsewhere).
type snapshot struct {
	goroutines int
	threads    int
	rssKiB     int
}

func (s *service) snapshot() snapshot {
	snap := snapshot{goroutines: -1, threads: -1, rssKiB: -1}
	client := &http.Client{Timeout: 2 * time.Second}
	if resp, err := client.Get(s.base + "/metrics"); err == nil {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
				snap.goroutines, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
		resp.Body.Close()
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			name, val, _ := strings.Cut(line, ":")
			fields := strings.Fields(val)
			if len(fields) == 0 {
				continue
			}
			switch name {
			case "VmRSS":
				snap.rssKiB, _ = strconv.Atoi(fields[0])
			case "Threads":
				snap.threads, _ = strconv.Atoi(fields[0])
			}
		}
	}
	return snap
}

// peak samples the process once a second while a fault lasts and keeps the
// largest figures seen.
func peak(ctx context.Context, s *service) snapshot {
	top := snapshot{goroutines: -1, threads: -1, rssKiB: -1}
	for {
		now := s.snapshot()
		top.goroutines = max(top.goroutines, now.goroutines)
		top.threads = max(top.threads, now.threads)
		top.rssKiB = max(top.rssKiB, now.rssKiB)
		if sleep(ctx, time.Second) != nil {
			return top
		}
	}
}

// settle gives connections the server is still timing out (slowloris) a
// bounded moment to go, so "after" measures what stays, not what is leaving.
func settle(ctx context.Context, s *service, before snapshot) {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		now := s.snapshot()
		if now.goroutines < 0 || now.goroutines <= before.goroutines+10 {
			return
		}
		if sleep(ctx, 250*time.Millisecond) != nil {
			return
		}
	}
}

// ---- steady load ----

type counts struct {
	mu        sync.Mutex
	latencies []time.Duration
	requests  int
	byStatus  map[string]int
	refused   int // 401/403 on a token that is valid
	wrongUser int // rows of another user in an answer
}

func newCounts() *counts { return &counts{byStatus: map[string]int{}} }

func (c *counts) add(status string, took time.Duration, refused, wrongUser bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.requests++
	c.latencies = append(c.latencies, took)
	if status != "200" {
		c.byStatus[status]++
	}
	if refused {
		c.refused++
	}
	if wrongUser {
		c.wrongUser++
	}
}

// p99 is the 99th percentile latency of the steady load, faults included.
func (c *counts) p99() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.latencies) == 0 {
		return "n/a"
	}
	l := slices.Clone(c.latencies)
	slices.Sort(l)
	return l[len(l)*99/100].Round(100 * time.Microsecond).String()
}

func (c *counts) non2xx() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.byStatus {
		n += v
	}
	return n
}

func (c *counts) statusText() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.byStatus) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(c.byStatus))
	for k := range c.byStatus {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s×%d", k, c.byStatus[k]))
	}
	return strings.Join(parts, ", ")
}

type load struct {
	base    string
	tokens  []string
	workers int
	rate    int
	client  *http.Client
	bucket  atomic.Pointer[counts]
}

func newLoad(base string, tokens []string, workers, rate int) *load {
	return &load{base: base, tokens: tokens, workers: workers, rate: rate, client: &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: workers, MaxConnsPerHost: workers},
	}}
}

func (l *load) switchTo(c *counts) { l.bucket.Store(c) }

func (l *load) start(ctx context.Context, wg *sync.WaitGroup) {
	every := time.Duration(float64(time.Second) * float64(l.workers) / float64(l.rate))
	for range l.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(every)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				// The bucket is read when the request starts: a request sent
				// during the fault counts there even if it ends after it.
				if b := l.bucket.Load(); b != nil {
					l.one(ctx, b)
				}
			}
		}()
	}
}

type pageBody struct {
	Data struct {
		Total   int64 `json:"total"`
		Records []struct {
			ID int64 `json:"id"`
		} `json:"records"`
	} `json:"data"`
}

func (l *load) one(ctx context.Context, b *counts) {
	user := 1 + mrand.IntN(users)
	page, size := 1+mrand.IntN(2), []int{10, 20, 30}[mrand.IntN(3)]
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet,
		fmt.Sprintf("%s/3ds/my-records?page=%d&page_size=%d", l.base, page, size), nil)
	req.Header.Set("Authorization", "Bearer "+l.tokens[user])
	start := time.Now()
	resp, err := l.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		b.add("conn-error", time.Since(start), false, false)
		return
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	status := strconv.Itoa(resp.StatusCode)
	if err != nil {
		b.add("read-error", took, false, false)
		return
	}
	wrong := false
	if resp.StatusCode == http.StatusOK {
		var p pageBody
		if json.Unmarshal(body, &p) != nil || p.Data.Total != rowsPerUser {
			wrong = true
		}
		for _, r := range p.Data.Records {
			if r.ID/1000 != int64(user) {
				wrong = true
			}
		}
	}
	b.add(status, took, resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden, wrong)
}

// ---- faults ----

type phaseResult struct {
	name, fault       string
	dbFault           bool
	during, after     *counts
	before, afterSnap snapshot
	peak              snapshot
	recovery          time.Duration
	mu                sync.Mutex
	notes             []string
	failures          []string // checks of the phase's own that did not hold
}

func (p *phaseResult) note(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.notes = append(p.notes, fmt.Sprintf(format, args...))
}

// fail records a check of the phase's own that did not hold: the run fails.
func (p *phaseResult) fail(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failures = append(p.failures, fmt.Sprintf(format, args...))
}

// jwksOutage takes the identity provider down while valid tokens keep
// arriving, plus a trickle of tokens with a kid nobody knows: those force
// refresh attempts, which must stay rate-limited and must not disturb the
// valid ones.
func jwksOutage(ctx context.Context, o options, idp *idpServer, base string, stranger *ecdsa.PrivateKey, p *phaseResult) error {
	fetchesBefore := idp.served.Load() + idp.refused.Load()
	probeCtx, stopProbes := context.WithCancel(ctx)
	var probes, probe401 atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		client := &http.Client{Timeout: 10 * time.Second}
		for i := 0; probeCtx.Err() == nil; i++ {
			tok, _ := mint(stranger, fmt.Sprintf("rotated-%d", i), 1, time.Hour)
			req, _ := http.NewRequestWithContext(probeCtx, http.MethodGet, base+"/3ds/my-records", nil)
			req.Header.Set("Authorization", "Bearer "+tok)
			if resp, err := client.Do(req); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				probes.Add(1)
				if resp.StatusCode == http.StatusUnauthorized {
					probe401.Add(1)
				}
			}
			_ = sleep(probeCtx, 500*time.Millisecond)
		}
	}()

	var err error
	for _, m := range []idpMode{idp503, idpReset, idpHang} {
		idp.mode.Store(int32(m))
		if err = sleep(ctx, o.d(10)); err != nil {
			break
		}
	}
	idp.mode.Store(int32(idpUp))
	stopProbes()
	wg.Wait()
	p.note("the service tried the JWKS endpoint %d times in the outage (background refresh + unknown-kid refreshes, rate-limited)",
		idp.served.Load()+idp.refused.Load()-fetchesBefore)
	p.note("%d unknown-kid probe tokens: %d answered 401 (expected)", probes.Load(), probe401.Load())
	return err
}

// slowloris keeps n connections open, each sending a request line and then
// one header line a second, never finishing; a connection the server closes
// is replaced while the phase lasts.
func slowloris(ctx context.Context, addr string, n int, d time.Duration, p *phaseResult) error {
	phaseCtx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var (
		mu        sync.Mutex
		lifetimes []time.Duration
		opened    atomic.Int64
		dialFails atomic.Int64
		cutOff    atomic.Int64 // still open when the phase ended
	)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Spread the dials over the first second.
			if sleep(phaseCtx, time.Duration(i)*time.Second/time.Duration(n)) != nil {
				return
			}
			for phaseCtx.Err() == nil {
				conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
				if err != nil {
					dialFails.Add(1)
					_ = sleep(phaseCtx, 200*time.Millisecond)
					continue
				}
				opened.Add(1)
				start := time.Now()
				closed := make(chan struct{})
				go func() { _, _ = io.Copy(io.Discard, conn); close(closed) }()
				_, _ = io.WriteString(conn, "GET /3ds/my-records HTTP/1.1\r\nHost: soak\r\n")
				tick := time.NewTicker(time.Second)
			dribble:
				for {
					select {
					case <-closed:
						mu.Lock()
						lifetimes = append(lifetimes, time.Since(start))
						mu.Unlock()
						break dribble
					case <-phaseCtx.Done():
						cutOff.Add(1)
						break dribble
					case <-tick.C:
						_, _ = io.WriteString(conn, "X-Slow: a\r\n")
					}
				}
				tick.Stop()
				_ = conn.Close()
				<-closed
			}
		}()
	}
	wg.Wait()
	slices.Sort(lifetimes)
	if len(lifetimes) > 0 {
		p.note("%d slow connections opened (%d dials failed); the server closed %d of them after a median %s (max %s); %d were still open at the end",
			opened.Load(), dialFails.Load(), len(lifetimes), lifetimes[len(lifetimes)/2].Round(100*time.Millisecond),
			lifetimes[len(lifetimes)-1].Round(100*time.Millisecond), cutOff.Load())
	} else {
		p.note("%d slow connections opened, none closed by the server", opened.Load())
	}
	return ctx.Err()
}

// bigHeaders sends requests carrying 1 MiB of headers in three shapes and
// records how each ended: a status code, or the connection cut first.
func bigHeaders(ctx context.Context, addr, token string, d time.Duration, p *phaseResult) error {
	phaseCtx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	const mib = 1 << 20
	var many strings.Builder
	for many.Len() < mib {
		fmt.Fprintf(&many, "X-Pad-%d: %s\r\n", many.Len(), strings.Repeat("p", 100))
	}
	shapes := []struct{ name, headers string }{
		{"one 1 MiB header", "Authorization: Bearer " + token + "\r\nX-Big: " + strings.Repeat("b", mib) + "\r\n"},
		{"a 1 MiB Authorization header", "Authorization: Bearer " + token + strings.Repeat("A", mib) + "\r\n"},
		{"~9000 headers totalling 1 MiB", "Authorization: Bearer " + token + "\r\n" + many.String()},
	}
	var mu sync.Mutex
	outcomes := map[string]map[string]int{}
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; phaseCtx.Err() == nil; i++ {
				s := shapes[i%len(shapes)]
				outcome := sendRaw(addr, "GET /3ds/my-records HTTP/1.1\r\nHost: soak\r\n"+s.headers+"\r\n")
				mu.Lock()
				if outcomes[s.name] == nil {
					outcomes[s.name] = map[string]int{}
				}
				outcomes[s.name][outcome]++
				mu.Unlock()
				_ = sleep(phaseCtx, 100*time.Millisecond)
			}
		}()
	}
	wg.Wait()
	for _, s := range shapes {
		var parts []string
		for k, v := range outcomes[s.name] {
			parts = append(parts, fmt.Sprintf("%s×%d", k, v))
		}
		slices.Sort(parts)
		p.note("%s: %s", s.name, strings.Join(parts, ", "))
	}
	return ctx.Err()
}

func sendRaw(addr, request string) string {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "dial-error"
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// Write and read at once: the server may answer (and close) before it
	// has read everything, and the answer is what matters.
	go func() { _, _ = io.WriteString(conn, request) }()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "no answer in 10s"
		}
		return "closed without answer"
	}
	resp.Body.Close()
	return strconv.Itoa(resp.StatusCode)
}

// ---- report ----

func fmtSnap(s snapshot) (g, rss string) {
	g, rss = "n/a", "n/a"
	if s.goroutines >= 0 {
		g = strconv.Itoa(s.goroutines)
	} else if s.threads >= 0 {
		g = strconv.Itoa(s.threads) + " threads"
	}
	if s.rssKiB >= 0 {
		rss = fmt.Sprintf("%.1f MiB", float64(s.rssKiB)/1024)
	}
	return g, rss
}

func render(o options, results []*phaseResult, first, last snapshot, shutdown string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Soak results (%s, %d clients at %d req/s, %d users x %d rows, duration scale %.2g)\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), o.workers, o.rate, users, rowsPerUser, o.scale)
	b.WriteString("| phase | requests during / after | non-2xx during the fault (must be 0 but in phase 1) | p99 during | recovered in | errors after recovery (must be 0) | valid tokens refused (must be 0) | rows of another user (must be 0) | goroutines before → peak → after | RSS before → peak → after |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range results {
		gb, rb := fmtSnap(p.before)
		gp, rp := fmtSnap(p.peak)
		ga, ra := fmtSnap(p.afterSnap)
		rec := p.recovery.Round(10 * time.Millisecond).String()
		if p.recovery < 0 {
			rec = "never"
		}
		fmt.Fprintf(&b, "| %s | %d / %d | %s | %s | %s | %d | %d | %d | %s → %s → %s | %s → %s → %s |\n",
			p.name, p.during.requests, p.after.requests, p.during.statusText(), p.during.p99(), rec,
			p.after.non2xx(), p.during.refused+p.after.refused, p.during.wrongUser+p.after.wrongUser, gb, gp, ga, rb, rp, ra)
	}
	b.WriteString("\nWhat each phase did and saw:\n\n")
	for _, p := range results {
		fmt.Fprintf(&b, "- **%s** — %s.", p.name, p.fault)
		for _, n := range p.notes {
			fmt.Fprintf(&b, " %s.", n)
		}
		for _, f := range p.failures {
			fmt.Fprintf(&b, " **FAILED: %s.**", f)
		}
		b.WriteString("\n")
	}
	gf, rf := fmtSnap(first)
	gl, rl := fmtSnap(last)
	fmt.Fprintf(&b, "\nWhole run: goroutines %s → %s, RSS %s → %s; %s.\n", gf, gl, rf, rl, shutdown)
	return b.String()
}

// verdict fails the run on anything that must be zero, on a service that
// never recovered or did not stop cleanly, and on goroutine growth beyond
// noise (in-flight requests and pooled connections come and go).
func verdict(results []*phaseResult, first, last snapshot, shutdown string) bool {
	ok := true
	for _, p := range results {
		if p.after.non2xx() != 0 || p.during.refused+p.after.refused != 0 || p.during.wrongUser+p.after.wrongUser != 0 || p.recovery < 0 || len(p.failures) > 0 {
			ok = false
		}
		// Only a database outage may cost requests while it lasts; key
		// server outages and hostile clients must not touch legitimate traffic.
		if !p.dbFault && p.during.non2xx() != 0 {
			ok = false
		}
	}
	if first.goroutines >= 0 && last.goroutines > first.goroutines+25 {
		fmt.Fprintf(os.Stderr, "soak: goroutines grew from %d to %d over the run\n", first.goroutines, last.goroutines)
		ok = false
	}
	if !strings.Contains(shutdown, "exit 0") {
		ok = false
	}
	return ok
}

// ---- database stall + flood ----

// floodStats counts how the flood's requests ended.
type floodStats struct {
	mu       sync.Mutex
	byStatus map[string]int
	shedTook []time.Duration // latency of each 503
}

func (f *floodStats) add(status string, took time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.byStatus[status]++
	if status == "503" {
		f.shedTook = append(f.shedTook, took)
	}
}

// stallFlood locks the table (as a stuck migration or a long writer
// transaction would) while a gateway's idle connections stay open and a
// flood of requests arrives. MAX_IN_FLIGHT requests may park; every other
// API request must be shed at once, the probes must keep answering, and the
// process's RSS must stay under the Kubernetes memory limit all along.
func stallFlood(ctx context.Context, o options, svc *service, tokens []string, limitMiB float64, p *phaseResult) error {
	pid := svc.cmd.Process.Pid
	g0 := scrapeGauges(svc.base)
	maxInFlight := int(g0["threeds_http_max_in_flight"])
	if maxInFlight <= 0 {
		return errors.New("the service has no threeds_http_max_in_flight gauge (MAX_IN_FLIGHT)")
	}
	rssStart := procStatusKiB(pid)["VmRSS"]

	// The gateway's pool: each connection serves one request, then idles
	// (the server keeps it for IdleTimeout, 120 s).
	idle := make([]net.Conn, 0, o.gatewayConns)
	defer func() {
		for _, c := range idle {
			_ = c.Close()
		}
	}()
	for range o.gatewayConns {
		c, err := openIdleConn(svc.addr)
		if err != nil {
			p.fail("opening idle connection %d of %d: %v", len(idle)+1, o.gatewayConns, err)
			break
		}
		idle = append(idle, c)
	}
	if err := sleep(ctx, time.Second); err != nil { // let the last connections settle before RSS is read
		return err
	}
	rssIdle := procStatusKiB(pid)["VmRSS"]
	if len(idle) > 0 {
		p.note("%d idle keep-alive connections: RSS %s → %s, %.1f KiB each", len(idle), mib(rssStart), mib(rssIdle),
			float64(rssIdle-rssStart)/float64(len(idle)))
	}

	lockCtx, cancelLock := context.WithTimeout(ctx, 10*time.Second)
	defer cancelLock()
	lockConn, err := pgx.Connect(lockCtx, o.databaseURL)
	if err != nil {
		return fmt.Errorf("stall: connect: %w", err)
	}
	defer lockConn.Close(context.Background())
	tx, err := lockConn.Begin(lockCtx)
	if err == nil {
		_, err = tx.Exec(lockCtx, "LOCK TABLE threeds_records IN ACCESS EXCLUSIVE MODE")
	}
	if err != nil {
		return fmt.Errorf("stall: lock the table: %w", err)
	}
	locked := time.Now()
	released := false
	release := func() {
		if !released {
			released = true
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = tx.Rollback(rctx)
		}
	}
	defer release()

	phaseCtx, stopPhase := context.WithTimeout(ctx, o.d(20))
	defer stopPhase()
	var wg sync.WaitGroup

	// The flood: each client on its own keep-alive connection, back to back
	// (a parked request takes DB_QUERY_TIMEOUT), pausing only after a 503.
	flood := &floodStats{byStatus: map[string]int{}}
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		MaxConnsPerHost: o.floodConns, MaxIdleConnsPerHost: o.floodConns,
	}}
	defer client.CloseIdleConnections()
	for range o.floodConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for phaseCtx.Err() == nil {
				user := 1 + mrand.IntN(users)
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, svc.base+"/3ds/my-records?page=1&page_size=20", nil)
				req.Header.Set("Authorization", "Bearer "+tokens[user])
				start := time.Now()
				resp, err := client.Do(req)
				status := "conn-error"
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					status = strconv.Itoa(resp.StatusCode)
				} else if ctx.Err() != nil {
					return
				}
				flood.add(status, time.Since(start))
				if status != "200" && status != "500" {
					_ = sleep(phaseCtx, o.floodPause)
				}
			}
		}()
	}

	// RSS every 100 ms: the kernel kills on the moment, not on the average.
	var peakRSS atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for phaseCtx.Err() == nil {
			peakRSS.Store(max(peakRSS.Load(), int64(procStatusKiB(pid)["VmRSS"])))
			_ = sleep(phaseCtx, 100*time.Millisecond)
		}
	}()

	// Probes on fresh connections with the manifest's timeouts, as the
	// kubelet sends them, and the in-flight gauge.
	probeTimeouts := map[string]time.Duration{"/healthz": 2 * time.Second, "/readyz": 3 * time.Second}
	var (
		probeMu      sync.Mutex
		probeOutcome = map[string]map[string]int{"/healthz": {}, "/readyz": {}}
		slowestProbe = map[string]time.Duration{}
		notReadyWhy  = map[string]int{}
		peakInFlight int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for phaseCtx.Err() == nil {
			for _, path := range []string{"/healthz", "/readyz"} {
				probeClient := &http.Client{Timeout: probeTimeouts[path], Transport: &http.Transport{DisableKeepAlives: true}}
				start := time.Now()
				resp, err := probeClient.Get(svc.base + path)
				took := time.Since(start)
				outcome, why := "no answer", ""
				if err == nil {
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					outcome = strconv.Itoa(resp.StatusCode)
					var e struct{ Details string }
					if resp.StatusCode != http.StatusOK && json.Unmarshal(body, &e) == nil {
						why = e.Details
					}
				}
				probeMu.Lock()
				probeOutcome[path][outcome]++
				slowestProbe[path] = max(slowestProbe[path], took)
				if why != "" {
					notReadyWhy[why]++
				}
				probeMu.Unlock()
			}
			n := int(scrapeGauges(svc.base)["threeds_http_in_flight"])
			probeMu.Lock()
			peakInFlight = max(peakInFlight, n)
			probeMu.Unlock()
			_ = sleep(phaseCtx, 250*time.Millisecond)
		}
	}()

	<-phaseCtx.Done()
	release()
	stallFor := time.Since(locked)
	wg.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	g1 := scrapeGauges(svc.base)
	status := procStatusKiB(pid)

	// The figures.
	slices.Sort(flood.shedTook)
	shedP50, shedP99 := time.Duration(0), time.Duration(0)
	if n := len(flood.shedTook); n > 0 {
		shedP50, shedP99 = flood.shedTook[n/2], flood.shedTook[n*99/100]
	}
	p.note("table locked for %s; MAX_IN_FLIGHT %d, at most %d in flight seen; flood answers %s; the 503s took p50 %s, p99 %s; threeds_http_shed_total +%.0f",
		stallFor.Round(100*time.Millisecond), maxInFlight, peakInFlight, statusCounts(flood.byStatus),
		shedP50.Round(10*time.Microsecond), shedP99.Round(10*time.Microsecond), g1["threeds_http_shed_total"]-g0["threeds_http_shed_total"])
	for _, path := range []string{"/healthz", "/readyz"} {
		p.note("%s (timeout %s) during the stall: %s, the slowest in %s", path, probeTimeouts[path],
			statusCounts(probeOutcome[path]), slowestProbe[path].Round(100*time.Microsecond))
	}
	if len(notReadyWhy) > 0 {
		p.note("/readyz said not ready because: %s", statusCounts(notReadyWhy))
	}
	p.note("RSS (sampled every 100 ms) peaked at %s; VmHWM over the whole run %s; limit %.0f MiB (%s)",
		mib(int(peakRSS.Load())), mib(status["VmHWM"]), limitMiB, o.manifestSource())

	// The checks.
	limitKiB := int64(limitMiB * 1024)
	if peakRSS.Load() > limitKiB || int64(status["VmHWM"]) > limitKiB {
		p.fail("RSS went over the %.0f MiB memory limit (peak %s, VmHWM %s)", limitMiB, mib(int(peakRSS.Load())), mib(status["VmHWM"]))
	}
	// Liveness must hold (a failure restarts the container); readiness must
	// answer within its timeout. Its answer is readiness's own business: it
	// checks the database, which is what is stalled here.
	if h := probeOutcome["/healthz"]; len(h) != 1 || h["200"] == 0 {
		p.fail("/healthz did not always answer 200: %s", statusCounts(h))
	}
	if n := probeOutcome["/readyz"]["no answer"]; n > 0 {
		p.fail("/readyz did not answer within %s %d times", probeTimeouts["/readyz"], n)
	}
	if flood.byStatus["503"] == 0 {
		p.fail("the flood was never shed: no 503 with %d clients against MAX_IN_FLIGHT %d", o.floodConns, maxInFlight)
	}
	// A parked request answers at DB_QUERY_TIMEOUT; a shed one must not
	// wait for anything. Half the deadline leaves room for a busy machine
	// (the flood, its driver and the service share the cores).
	if shedP99 > dbQueryTimeout/2 {
		p.fail("shedding is not at once: the 503s took p99 %s, against DB_QUERY_TIMEOUT %s", shedP99, dbQueryTimeout)
	}
	if peakInFlight > maxInFlight {
		p.fail("%d requests in flight, over MAX_IN_FLIGHT %d", peakInFlight, maxInFlight)
	}
	for k, v := range flood.byStatus {
		if k != "200" && k != "500" && k != "503" {
			p.fail("%d flood requests ended with %s (only 200, 500 at DB_QUERY_TIMEOUT and 503 are expected)", v, k)
		}
	}
	return nil
}

func (o options) manifestSource() string {
	if o.memoryLimitMiB > 0 {
		return "-memory-limit-mib"
	}
	return "resources.limits.memory in " + o.manifest
}

// openIdleConn opens a connection, has it serve one /healthz, and leaves it
// idle: what a gateway's keep-alive pool holds.
func openIdleConn(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: soak\r\n\r\n"); err != nil {
		c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// procStatusKiB reads the kB fields of /proc/<pid>/status (VmRSS, VmHWM, ...).
func procStatusKiB(pid int) map[string]int {
	out := map[string]int{}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, val, _ := strings.Cut(line, ":")
		if f := strings.Fields(val); len(f) == 2 && f[1] == "kB" {
			out[name], _ = strconv.Atoi(f[0])
		}
	}
	return out
}

func mib(kib int) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// scrapeGauges reads the unlabelled samples of /metrics.
func scrapeGauges(base string) map[string]float64 {
	out := map[string]float64{}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(base + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(name, "#") || strings.Contains(name, "{") {
			continue
		}
		if f, err := strconv.ParseFloat(val, 64); err == nil {
			out[name] = f
		}
	}
	return out
}

// manifestMemoryLimitMiB finds resources.limits.memory of the named
// container in a Kubernetes manifest: the limit the soak holds the service
// to is the one the example deployment sets, not a copy of it. It reads
// only the indentation-shaped subset of YAML the manifest uses.
func manifestMemoryLimitMiB(path, container string) (float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("memory limit: %w (or give -memory-limit-mib)", err)
	}
	in, limits := -1, -1 // indentation of the container's "- name:" and of its "limits:"
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimLeft(line, " ")
		indent := len(line) - len(trimmed)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if in < 0 {
			if strings.TrimSpace(trimmed) == "- name: "+container {
				in = indent
			}
			continue
		}
		if indent <= in {
			break // the next container, or the end of the list
		}
		if strings.TrimSpace(trimmed) == "limits:" {
			limits = indent
			continue
		}
		if limits >= 0 && indent <= limits {
			limits = -1
		}
		if v, ok := strings.CutPrefix(trimmed, "memory:"); ok && limits >= 0 {
			return parseQuantityMiB(v)
		}
	}
	return 0, fmt.Errorf("memory limit: no resources.limits.memory for container %s in %s", container, path)
}

// parseQuantityMiB reads a Kubernetes memory quantity (64Mi, 1Gi, 100M, bytes).
func parseQuantityMiB(q string) (float64, error) {
	q = strings.Trim(strings.TrimSpace(strings.SplitN(q, "#", 2)[0]), `"'`)
	units := []struct {
		suffix string
		bytes  float64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}}
	mult := 1.0
	for _, u := range units {
		if v, ok := strings.CutSuffix(q, u.suffix); ok {
			q, mult = v, u.bytes
			break
		}
	}
	n, err := strconv.ParseFloat(q, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("memory limit: %q is not a memory quantity", q)
	}
	return n * mult / (1 << 20), nil
}

// statusCounts renders {"200": 5, "503": 1} as "200×5, 503×1".
func statusCounts(m map[string]int) string {
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s×%d", k, v))
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
