// Command bench measures threeds-records end to end: the real service binary
// under HTTP load on loopback, next to the same SQL issued straight to
// PostgreSQL at the same concurrency. bench/run.sh (`make bench`) starts the
// throwaway cluster, migrates it with the real binary and then runs this.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
)

type options struct {
	dsn         string
	service     string
	dir         string
	pgPIDFile   string
	concurrency int
	duration    time.Duration
	warmup      time.Duration
	users       int
	perUser     int
	heavy       int
	alg         string
	dbParams    string
	serviceEnv  multiFlag
	scenarios   string
	serviceLog  string
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var o options
	flag.StringVar(&o.dsn, "db", os.Getenv("DATABASE_URL"), "PostgreSQL URL of a migrated database the bench may fill (default $DATABASE_URL)")
	flag.StringVar(&o.service, "service", "bin/threeds-records", "the service binary (make build)")
	flag.StringVar(&o.dir, "dir", "", "scratch directory for the JWKS file (default: a temp dir)")
	flag.StringVar(&o.pgPIDFile, "pg-pid-file", "", "postmaster.pid of the cluster, to report PostgreSQL CPU (optional)")
	flag.IntVar(&o.concurrency, "c", 12, "requests in flight, the same for the service and for direct SQL")
	flag.DurationVar(&o.duration, "d", 10*time.Second, "measured duration of each phase")
	flag.DurationVar(&o.warmup, "warmup", 2*time.Second, "unmeasured load before each service phase")
	flag.IntVar(&o.users, "users", 10000, "ordinary users (ids 1..users)")
	flag.IntVar(&o.perUser, "per-user", 50, "records per ordinary user")
	flag.IntVar(&o.heavy, "heavy", 20000, "records of the heavy user (id users+1)")
	flag.StringVar(&o.alg, "alg", "RS256", "token algorithm: RS256 (what most identity providers use) or ES256")
	flag.StringVar(&o.dbParams, "db-params", "", "extra query parameters for the service's DATABASE_URL, e.g. pool_max_conns=8&default_query_exec_mode=exec")
	flag.Var(&o.serviceEnv, "env", "extra NAME=VALUE for the service's environment (repeatable), e.g. GOGC=50")
	flag.StringVar(&o.scenarios, "scenarios", "page1,page3,heavy", "comma-separated subset of page1, page3, heavy")
	flag.StringVar(&o.serviceLog, "service-log", os.DevNull, "where the service's stdout (one JSON access-log line per request) goes")
	flag.Parse()
	if *onlyFlag != "" && *onlyFlag != "pages" && *onlyFlag != "stream" {
		fmt.Fprintf(os.Stderr, "bench: -only %q: want pages or stream\n", *onlyFlag)
		os.Exit(2)
	}
	if o.dsn == "" {
		fmt.Fprintln(os.Stderr, "bench: -db or DATABASE_URL is required")
		os.Exit(2)
	}
	// A hard bound on the whole run, whatever happens below.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	ok, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	if !ok {
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

type row struct {
	sc        scenario
	svc       *phaseResult
	svcCPU    cpuSample // over the service phase
	sqlPerReq float64
	peakKiB   int64
	direct    *phaseResult
	directCPU cpuSample // over the direct-SQL phase
}

// cpuSample is CPU used so far, in µs, by each party; -1 when unknown.
type cpuSample struct {
	svc, pg, self, machine int64
}

func (a cpuSample) sub(b cpuSample) cpuSample {
	d := func(x, y int64) int64 {
		if x < 0 || y < 0 {
			return -1
		}
		return x - y
	}
	return cpuSample{d(a.svc, b.svc), d(a.pg, b.pg), d(a.self, b.self), d(a.machine, b.machine)}
}

// otherLoad is the share of the machine's CPU, over elapsed, that none of
// the measured parties used: other people's work on a shared box.
func (a cpuSample) otherLoad(elapsed time.Duration) float64 {
	if a.machine < 0 || a.pg < 0 {
		return -1
	}
	// Sampling skew can make an idle machine's remainder slightly negative.
	other := max(a.machine-a.pg-a.self-max(a.svc, 0), 0)
	return float64(other) / (elapsed.Seconds() * 1e6 * float64(runtime.NumCPU()))
}

func run(ctx context.Context, o options) (bool, error) {
	if o.dir == "" {
		d, err := os.MkdirTemp("", "threeds-bench")
		if err != nil {
			return false, err
		}
		defer os.RemoveAll(d)
		o.dir = d
	}
	heavyID := int64(o.users) + 1
	all := map[string]scenario{
		"page1": {name: "page 1, random user", page: 1, pageSize: 20, user: func(r *rand.Rand) int64 { return 1 + r.Int64N(int64(o.users)) }},
		"page3": {name: "page 3, random user", page: 3, pageSize: 20, user: func(r *rand.Rand) int64 { return 1 + r.Int64N(int64(o.users)) }},
		"heavy": {name: fmt.Sprintf("page 1, heavy user (%d rows)", o.heavy), page: 1, pageSize: 20, user: func(*rand.Rand) int64 { return heavyID }},
	}
	var scenarios []scenario
	for name := range strings.SplitSeq(o.scenarios, ",") {
		sc, ok := all[strings.TrimSpace(name)]
		if !ok {
			return false, fmt.Errorf("unknown scenario %q", name)
		}
		scenarios = append(scenarios, sc)
	}

	admin, err := pgx.Connect(ctx, o.dsn)
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer admin.Close(context.Background())
	var pgVersion string
	_ = admin.QueryRow(ctx, "SHOW server_version").Scan(&pgVersion)

	// Keys and tokens are made while PostgreSQL loads the rows: both take
	// seconds, and they use different cores.
	type minted struct {
		s      *signer
		tokens map[int64]string
		err    error
	}
	mintDone := make(chan minted, 1)
	go func() {
		start := time.Now()
		s, err := newSigner(o.alg)
		if err != nil {
			mintDone <- minted{err: err}
			return
		}
		tokens, err := s.mintAll(1, int64(o.users), []int64{heavyID}, 2*time.Hour, runtime.NumCPU())
		logf("minted %d %s tokens in %s", len(tokens), o.alg, time.Since(start).Round(time.Millisecond))
		mintDone <- minted{s: s, tokens: tokens, err: err}
	}()
	if err := seed(ctx, admin, seedPlan{users: o.users, perUser: o.perUser, heavyID: heavyID, heavyN: o.heavy}, logf); err != nil {
		return false, err
	}
	m := <-mintDone
	if m.err != nil {
		return false, m.err
	}
	jwksPath := filepath.Join(o.dir, "jwks.json")
	if err := m.s.writeJWKS(jwksPath); err != nil {
		return false, err
	}
	if *onlyFlag == "stream" {
		return runStreamScenario(ctx, o, admin, m.tokens, jwksPath)
	}

	svc, err := startService(ctx, o, jwksPath)
	if err != nil {
		return false, err
	}
	defer svc.stop()
	logf("service pid %d on %s", svc.cmd.Process.Pid, svc.addr)

	postmaster := -1
	if o.pgPIDFile != "" {
		if b, err := os.ReadFile(o.pgPIDFile); err == nil {
			first, _, _ := strings.Cut(string(b), "\n")
			if pid, err := strconv.Atoi(strings.TrimSpace(first)); err == nil {
				postmaster = pid
			}
		}
	}
	micros := func(ticks int64, err error) int64 {
		if err != nil {
			return -1
		}
		return ticks * (1e6 / clockTicks)
	}
	sample := func() cpuSample {
		s := cpuSample{svc: micros(cpuTicks(svc.pid())), pg: -1, self: selfMicros(), machine: micros(machineBusyTicks())}
		if postmaster > 0 {
			s.pg = micros(treeTicks(postmaster))
		}
		return s
	}
	xacts := func() int64 {
		var n int64
		_ = admin.QueryRow(ctx, "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()").Scan(&n)
		return n
	}

	time.Sleep(time.Second)
	idleKiB, _ := memKiB(svc.pid(), "VmRSS")

	var rows []row
	for i, sc := range scenarios {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		seed := uint64(i + 1)
		logf("%s: service warm-up %s, then %s measured", sc.name, o.warmup, o.duration)
		if o.warmup > 0 {
			httpLoad(ctx, svc.addr, sc, m.tokens, o.concurrency, o.warmup, seed+100)
		}
		r := row{sc: sc}
		x0 := xacts()
		c0 := sample()
		r.svc = httpLoad(ctx, svc.addr, sc, m.tokens, o.concurrency, o.duration, seed)
		r.svcCPU = sample().sub(c0)
		r.peakKiB, _ = memKiB(svc.pid(), "VmHWM")
		// Backends publish their statistics at most once a second.
		time.Sleep(1500 * time.Millisecond)
		if n := len(r.svc.lat); n > 0 {
			r.sqlPerReq = float64(xacts()-x0-1) / float64(n)
		}

		logf("%s: direct SQL %s", sc.name, o.duration)
		direct, cpu, err := sqlLoad(ctx, o.dsn, sc, o.concurrency, o.duration, seed, sample)
		if err != nil {
			return false, fmt.Errorf("direct SQL: %w", err)
		}
		r.direct, r.directCPU = direct, cpu
		r.directCPU.svc = -1
		rows = append(rows, r)
	}
	time.Sleep(2 * time.Second)
	afterKiB, _ := memKiB(svc.pid(), "VmRSS")
	peakKiB, _ := memKiB(svc.pid(), "VmHWM")

	printReport(os.Stdout, o, pgVersion, rows, idleKiB, afterKiB, peakKiB)
	ok := true
	for _, r := range rows {
		if r.svc.non2xx > 0 || r.svc.errs > 0 || r.direct.errs > 0 {
			ok = false
		}
	}
	if !ok {
		fmt.Println("\nFAILED: non-2xx answers or transport/SQL errors (see the table); the service log is in -service-log")
	}
	if *onlyFlag == "" {
		// A fresh process, so the stream scenario's idle memory is not the
		// page scenarios' leftovers.
		svc.stop()
		streamOK, err := runStreamScenario(ctx, o, admin, m.tokens, jwksPath)
		if err != nil {
			return false, fmt.Errorf("stream scenario: %w", err)
		}
		ok = ok && streamOK
	}
	return ok, nil
}

type runningService struct {
	cmd  *exec.Cmd
	addr string
	done chan error
}

func (s *runningService) pid() int { return s.cmd.Process.Pid }

func startService(ctx context.Context, o options, jwksPath string) (*runningService, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	dsn := o.dsn
	if o.dbParams != "" {
		sep := "?"
		if strings.Contains(dsn, "?") {
			sep = "&"
		}
		dsn += sep + o.dbParams
	}
	out, err := os.OpenFile(o.serviceLog, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(o.service)
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"DATABASE_URL=" + dsn,
		"JWKS_FILE=" + jwksPath,
		"JWT_ISSUER=" + benchIssuer,
		"JWT_AUDIENCE=" + benchAudience,
		"LISTEN_ADDR=" + addr,
		"SHUTDOWN_TIMEOUT=5s",
	}, o.serviceEnv...)
	cmd.Stdout = out
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("start %s: %w", o.service, err)
	}
	out.Close()
	s := &runningService{cmd: cmd, addr: addr, done: make(chan error, 1)}
	go func() { s.done <- cmd.Wait() }()
	if o.dir != "" {
		_ = os.WriteFile(filepath.Join(o.dir, "service.pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	}

	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-s.done:
			return nil, fmt.Errorf("the service exited before it was ready: %v", err)
		case <-ctx.Done():
			s.stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				client.CloseIdleConnections()
				return s, nil
			}
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, errors.New("the service was not ready within 30s")
		}
	}
}

// stop sends SIGTERM, as Kubernetes would, and kills after a grace period.
func (s *runningService) stop() {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// freeAddr picks a loopback port the kernel says is free; the service binds
// it a moment later (a race is possible but would fail loudly at start).
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func pct(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	i := int(float64(len(lat)-1) * p)
	return lat[i]
}

func msStr(d time.Duration) string {
	return strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 2, 64)
}

func usPer(micros int64, n int) string {
	if micros < 0 || n == 0 {
		return "n/a"
	}
	return strconv.FormatFloat(float64(micros)/float64(n), 'f', 0, 64)
}

func pctStr(f float64) string {
	if f < 0 {
		return "n/a"
	}
	return strconv.FormatFloat(f*100, 'f', 0, 64) + "%"
}

func mib(kib int64) string { return strconv.FormatFloat(float64(kib)/1024, 'f', 1, 64) }

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

func printReport(w io.Writer, o options, pgVersion string, rows []row, idleKiB, afterKiB, peakKiB int64) {
	fmt.Fprintf(w, "\nthreeds-records bench: %d CPU (%s), %s, PostgreSQL %s\n", runtime.NumCPU(), cpuModel(), runtime.Version(), pgVersion)
	fmt.Fprintf(w, "%d requests in flight on both sides, %s per phase (+%s service warm-up), %s tokens, %d users x %d records + 1 x %d\n",
		o.concurrency, o.duration, o.warmup, o.alg, o.users, o.perUser, o.heavy)
	fmt.Fprintln(w, "The load generator, the service and PostgreSQL share these cores: figures are ratios on one machine, not capacity.")
	if o.dbParams != "" || len(o.serviceEnv) > 0 {
		fmt.Fprintf(w, "service settings: db-params=%q env=%q\n", o.dbParams, o.serviceEnv.String())
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.AlignRight|tabwriter.Debug)
	fmt.Fprintln(tw, "scenario\t svc req/s\t p50 ms\t p99 ms\t p99/p50\t non-2xx\t svc CPU µs/req\t PG CPU µs/req\t gen CPU µs/req\t SQL/req\t direct q/s\t direct p50 ms\t direct p99 ms\t PG CPU µs/q\t client CPU µs/q\t svc/direct\t peak RSS MiB\t other load\t")
	for _, r := range rows {
		slices.Sort(r.svc.lat)
		slices.Sort(r.direct.lat)
		n, dn := len(r.svc.lat), len(r.direct.lat)
		p50, p99 := pct(r.svc.lat, 0.5), pct(r.svc.lat, 0.99)
		ratio := 0.0
		if r.direct.rate() > 0 {
			ratio = r.svc.rate() / r.direct.rate()
		}
		tail := 0.0
		if p50 > 0 {
			tail = float64(p99) / float64(p50)
		}
		other := max(r.svcCPU.otherLoad(r.svc.elapsed), r.directCPU.otherLoad(r.direct.elapsed))
		fmt.Fprintf(tw, "%s\t %.0f\t %s\t %s\t %.1f\t %d\t %s\t %s\t %s\t %.2f\t %.0f\t %s\t %s\t %s\t %s\t %.0f%%\t %s\t %s\t\n",
			r.sc.name, r.svc.rate(), msStr(p50), msStr(p99), tail, r.svc.non2xx+r.svc.errs,
			usPer(r.svcCPU.svc, n), usPer(r.svcCPU.pg, n), usPer(r.svcCPU.self, n), r.sqlPerReq,
			r.direct.rate(), msStr(pct(r.direct.lat, 0.5)), msStr(pct(r.direct.lat, 0.99)),
			usPer(r.directCPU.pg, dn), usPer(r.directCPU.self, dn),
			ratio*100, mib(r.peakKiB), pctStr(other))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nservice RSS: idle after start %s MiB, peak under load %s MiB (VmHWM), 2 s after the load %s MiB\n", mib(idleKiB), mib(peakKiB), mib(afterKiB))

	fmt.Fprintln(w, "\ntargets:")
	check := func(ok bool, what string) {
		mark := "ok  "
		if !ok {
			mark = "MISS"
		}
		fmt.Fprintf(w, "  [%s] %s\n", mark, what)
	}
	for _, r := range rows {
		p50, p99 := pct(r.svc.lat, 0.5), pct(r.svc.lat, 0.99)
		check(r.svc.non2xx == 0 && r.svc.errs == 0 && r.direct.errs == 0, fmt.Sprintf("%s: zero non-2xx and errors (%d non-2xx, %d transport, %d SQL; first: %q)", r.sc.name, r.svc.non2xx, r.svc.errs, r.direct.errs, r.svc.firstErr+r.direct.firstErr))
		if r.sc.page == 1 && strings.Contains(r.sc.name, "heavy") {
			check(r.sqlPerReq < 1.05, fmt.Sprintf("%s: one SQL round trip per request (%.2f)", r.sc.name, r.sqlPerReq))
			continue
		}
		ratio := r.svc.rate() / r.direct.rate()
		check(ratio >= 0.70, fmt.Sprintf("%s: service >= 70%% of direct SQL (%.0f%%)", r.sc.name, ratio*100))
		check(p99 <= 4*p50, fmt.Sprintf("%s: p99 <= 4 x p50 (%s ms vs %s ms)", r.sc.name, msStr(p99), msStr(p50)))
	}
	check(peakKiB <= 40<<10, fmt.Sprintf("peak RSS <= 40 MiB (%s MiB)", mib(peakKiB)))
	check(idleKiB <= 20<<10, fmt.Sprintf("idle RSS <= 20 MiB (%s MiB)", mib(idleKiB)))
}
