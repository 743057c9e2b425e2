// Command bench measures threeds-records end to end: the real service binary
// under HTTP load on loopback, next to the floor (../shared/floor: net/http,
// pgxpool and the same page SQL with nothing else) on the same database,
// tokens and load, the two measured in alternating rounds of the same run.
// bench/run.sh (`make bench`) builds both, starts the throwaway cluster,
// migrates it with the real binary and then runs this.
package main

import (
	"bufio"
	"bytes"
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
	"sync/atomic"
	"syscall"
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
	serviceArgs string
	floor       string
	floorLog    string
	floorEnv    multiFlag
	compare     multiFlag
	rounds      int
	direct      bool
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
	flag.IntVar(&o.concurrency, "c", 12, "requests in flight, the same for the service, the floor and direct SQL")
	flag.DurationVar(&o.duration, "d", time.Second, "measured duration of each phase (one server, one round)")
	flag.DurationVar(&o.warmup, "warmup", 200*time.Millisecond, "unmeasured load before each measured phase")
	flag.IntVar(&o.rounds, "rounds", 21, "rounds per scenario; each round measures every server back to back, the order rotating: short phases and many rounds keep a round's phases close in time on a shared machine, where other work comes in bursts")
	flag.StringVar(&o.floor, "floor", "", "the floor binary (../shared/floor, built by bench/run.sh); empty: the service alone")
	flag.StringVar(&o.floorLog, "floor-log", os.DevNull, "where the floor's output goes")
	flag.Var(&o.floorEnv, "floor-env", "extra NAME=VALUE for the floor's environment (repeatable)")
	flag.BoolVar(&o.direct, "direct", false, "also run the service's page SQL straight to PostgreSQL, one phase per scenario after the rounds")
	flag.StringVar(&o.serviceArgs, "service-args", "", "space-separated arguments for the service binary (bench/run.sh uses it for the profiling build)")
	flag.IntVar(&o.users, "users", 10000, "ordinary users (ids 1..users)")
	flag.IntVar(&o.perUser, "per-user", 50, "records per ordinary user")
	flag.IntVar(&o.heavy, "heavy", 20000, "records of the heavy user (id users+1)")
	flag.StringVar(&o.alg, "alg", "RS256", "token algorithm: RS256 (what most identity providers use) or ES256")
	flag.StringVar(&o.dbParams, "db-params", "", "extra query parameters for the service's DATABASE_URL, e.g. pool_max_conns=8&default_query_exec_mode=exec")
	flag.Var(&o.serviceEnv, "env", "extra NAME=VALUE for the service's environment (repeatable), e.g. GOGC=50")
	flag.StringVar(&o.scenarios, "scenarios", "page1,page3,heavy", "comma-separated subset of page1, page3, heavy")
	flag.StringVar(&o.serviceLog, "service-log", os.DevNull, "where a copy of the service's stdout (one JSON access-log line per request) goes; the bench reads it through a pipe, as a container runtime does, and counts the lines")
	flag.Var(&o.compare, "compare", "NAME=PATH[,VAR=VALUE...]: another build of the service (repeatable; bench/run.sh builds BENCH_COMPARE=REV into one), measured in the same rounds, with extra environment after -env's: before/after in one run, or the service binary itself with one setting changed (an A/B), e.g. gogc200=bin/threeds-records,GOGC=200")
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
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

func run(ctx context.Context, o options) (bool, error) {
	if o.dir == "" {
		d, err := os.MkdirTemp("", "threeds-bench")
		if err != nil {
			return false, err
		}
		defer os.RemoveAll(d)
		o.dir = d
	}
	if o.rounds < 1 {
		return false, errors.New("-rounds must be at least 1")
	}
	heavyID := int64(o.users) + 1
	scenarios, err := pickScenarios(o, heavyID)
	if err != nil {
		return false, err
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
		// Only the tokens the chosen parts use: a signature costs about a
		// millisecond of a core the rest of the run shares.
		last, extra := int64(o.users), []int64{heavyID}
		if *onlyFlag == "stream" && !wantPart("steady") {
			last, extra = 0, nil
		}
		if *onlyFlag != "pages" && wantPart("production") {
			extra = append(extra, prodTokenIDs()...)
		}
		tokens, err := s.mintAll(1, last, extra, 2*time.Hour, runtime.NumCPU())
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

	b := &bench{o: o, ctx: ctx, tokens: m.tokens, postmaster: readPostmaster(o.pgPIDFile)}
	svc, err := b.startServers(jwksPath)
	defer func() {
		for _, s := range b.servers {
			s.stop()
		}
	}()
	if err != nil {
		return false, err
	}

	time.Sleep(time.Second)
	idleKiB, _ := memKiB(svc.pid(), "VmRSS")
	// Every token once to every server, so that no measured round pays for
	// a first signature check that an earlier round did not.
	for _, s := range b.servers {
		start := time.Now()
		s.clients = newPageClients(s.addr, o.concurrency)
		res := primeTokens(ctx, s.clients, m.tokens)
		s.responses.Add(int64(len(res.lat)))
		if res.errs+res.non2xx > 0 {
			return false, fmt.Errorf("priming the %s's token cache: %d errors, %d non-2xx, first %q", s.name, res.errs, res.non2xx, res.firstErr)
		}
		logf("%s: every token verified once (%d requests) in %s", s.name, len(m.tokens), time.Since(start).Round(time.Millisecond))
	}

	var results []*scenarioResult
	for i, sc := range scenarios {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		results = append(results, b.measureScenario(sc, uint64(i+1)))
	}
	if o.direct {
		for i, r := range results {
			logf("%s: direct SQL %s", r.sc.name, o.duration)
			res, cpu, err := sqlLoad(ctx, o.dsn, r.sc, o.concurrency, o.duration, uint64(i+1), func() cpuSample { return b.sample(nil) })
			if err != nil {
				return false, fmt.Errorf("direct SQL: %w", err)
			}
			r.direct, r.directCPU = res, cpu
		}
	}
	time.Sleep(2 * time.Second)
	mem := memReport{idleKiB: idleKiB}
	mem.afterKiB, _ = memKiB(svc.pid(), "VmRSS")
	mem.peakKiB, _ = memKiB(svc.pid(), "VmHWM")
	// SIGTERM, then every access-log line the service wrote must be there.
	for _, s := range b.servers {
		s.stop()
	}

	printReport(os.Stdout, o, pgVersion, b.servers, results, mem)
	ok := true
	for _, r := range results {
		for _, s := range r.sides {
			if s.non2xx > 0 || s.errs > 0 {
				ok = false
			}
		}
		if r.direct != nil && r.direct.errs > 0 {
			ok = false
		}
	}
	for _, s := range b.servers {
		if s.countsLog && s.logLines.Load() != s.responses.Load() {
			ok = false
		}
	}
	if !ok {
		fmt.Println("\nFAILED: non-2xx answers, transport/SQL errors or missing access-log lines (see above); the service log is in -service-log")
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

func pickScenarios(o options, heavyID int64) ([]scenario, error) {
	randomUser := func(r *rand.Rand) int64 { return 1 + r.Int64N(int64(o.users)) }
	all := map[string]scenario{
		"page1": {name: "page 1, random user", page: 1, pageSize: 20, user: randomUser},
		"page3": {name: "page 3, random user", page: 3, pageSize: 20, user: randomUser},
		"heavy": {name: fmt.Sprintf("page 1, heavy user (%d rows)", o.heavy), page: 1, pageSize: 20, heavy: true, user: func(*rand.Rand) int64 { return heavyID }},
	}
	var scenarios []scenario
	for name := range strings.SplitSeq(o.scenarios, ",") {
		sc, ok := all[strings.TrimSpace(name)]
		if !ok {
			return nil, fmt.Errorf("unknown scenario %q", name)
		}
		scenarios = append(scenarios, sc)
	}
	return scenarios, nil
}

func readPostmaster(pidFile string) int {
	if pidFile == "" {
		return -1
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return -1
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		return -1
	}
	return pid
}

func withParams(dsn, params string) string {
	if params == "" {
		return dsn
	}
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	return dsn + sep + params
}

type runningService struct {
	name string
	cmd  *exec.Cmd
	addr string
	done chan error

	// countsLog: the bench reads its stdout and counts access-log lines
	// (the service and -compare, not the floor, which logs nothing).
	countsLog bool
	logLines  atomic.Int64  // lines with "msg":"request"
	logDone   chan struct{} // closed at the end of its stdout
	responses atomic.Int64  // HTTP responses the bench received from it

	clients []*pageClient // the load's connections, one per worker

	stopped bool
	exitErr error // how it exited after stop
}

func (s *runningService) pid() int { return s.cmd.Process.Pid }

// startServers starts the service, the floor (-floor) and the second build
// (-compare), in that order in b.servers, and returns the service.
func (b *bench) startServers(jwksPath string) (*runningService, error) {
	o := b.o
	service := func(name, bin string, args, env []string) (*runningService, error) {
		s, err := startServer(b.ctx, serverSpec{
			name: name, bin: bin, args: args, dsn: withParams(o.dsn, o.dbParams),
			env: env, log: o.serviceLog, countLog: true, dir: o.dir,
		}, jwksPath)
		if s != nil {
			b.servers = append(b.servers, s) // stopped by run, however it ends
		}
		if err == nil {
			logf("%s pid %d on %s", name, s.pid(), s.addr)
		}
		return s, err
	}
	svc, err := service("service", o.service, strings.Fields(o.serviceArgs), o.serviceEnv)
	if err != nil {
		return nil, err
	}
	if o.floor != "" {
		fl, err := startFloor(b.ctx, o, svc, jwksPath)
		if fl != nil {
			b.servers = append(b.servers, fl)
		}
		if err != nil {
			return nil, err
		}
	}
	for _, c := range o.compare {
		name, rest, ok := strings.Cut(c, "=")
		fields := strings.Split(rest, ",")
		if !ok || name == "" || fields[0] == "" {
			return nil, fmt.Errorf("-compare %q: want NAME=PATH[,VAR=VALUE...]", c)
		}
		env := append(slices.Clone([]string(o.serviceEnv)), fields[1:]...)
		if _, err := service(name, fields[0], nil, env); err != nil {
			return nil, err
		}
	}
	return svc, nil
}

// startService starts the service binary alone, as the stream scenario
// (stream.go) runs it.
func startService(ctx context.Context, o options, jwksPath string) (*runningService, error) {
	s, err := startServer(ctx, serverSpec{
		name: "service", bin: o.service, args: strings.Fields(o.serviceArgs), dsn: withParams(o.dsn, o.dbParams),
		env: o.serviceEnv, log: o.serviceLog, countLog: true, dir: o.dir,
	}, jwksPath)
	if err != nil && s != nil {
		s.stop()
		return nil, err
	}
	return s, err
}

// serverSpec is one HTTP server the bench runs: the service or the floor.
type serverSpec struct {
	name     string
	bin      string
	args     []string
	dsn      string
	env      []string
	log      string // where (a copy of) its stdout goes
	countLog bool   // read its stdout through a pipe and count access-log lines
	dir      string // the pid file NAME.pid goes here, for bench/run.sh's cleanup
}

// startServer runs spec on a free loopback port with the bench's keys and
// issuer, and waits for its /readyz.
func startServer(ctx context.Context, spec serverSpec, jwksPath string) (*runningService, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	out, err := os.OpenFile(spec.log, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(spec.bin, spec.args...)
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"DATABASE_URL=" + spec.dsn,
		"JWKS_FILE=" + jwksPath,
		"JWT_ISSUER=" + benchIssuer,
		"JWT_AUDIENCE=" + benchAudience,
		"LISTEN_ADDR=" + addr,
		"SHUTDOWN_TIMEOUT=5s",
	}, spec.env...)
	s := &runningService{name: spec.name, cmd: cmd, addr: addr, done: make(chan error, 1), countsLog: spec.countLog, logDone: make(chan struct{})}
	var stdout io.ReadCloser
	if spec.countLog {
		if stdout, err = cmd.StdoutPipe(); err != nil {
			out.Close()
			return nil, err
		}
	} else {
		cmd.Stdout = out
		close(s.logDone)
	}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("start %s: %w", spec.bin, err)
	}
	if stdout != nil {
		go func() {
			defer close(s.logDone)
			defer out.Close()
			countLines(stdout, out, &s.logLines)
		}()
	} else {
		out.Close()
	}
	go func() {
		// Wait closes the pipe, so the reader must have seen its end first.
		<-s.logDone
		s.done <- cmd.Wait()
	}()
	if spec.dir != "" {
		_ = os.WriteFile(filepath.Join(spec.dir, spec.name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	}

	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-s.done:
			s.done <- err
			return s, fmt.Errorf("the %s exited before it was ready: %v", spec.name, err)
		case <-ctx.Done():
			return s, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			s.responses.Add(1)
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				client.CloseIdleConnections()
				return s, nil
			}
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("the %s was not ready within 30s", spec.name)
		}
	}
}

// countLines copies r to w line by line and counts the access-log lines.
func countLines(r io.Reader, w io.Writer, n *atomic.Int64) {
	br := bufio.NewReaderSize(r, 64<<10)
	start := true // at the start of a line
	for {
		chunk, err := br.ReadSlice('\n')
		if len(chunk) > 0 {
			_, _ = w.Write(chunk)
			if start && bytes.Contains(chunk, []byte(`"msg":"request"`)) {
				n.Add(1)
			}
			start = chunk[len(chunk)-1] == '\n'
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
}

// stop sends SIGTERM, as Kubernetes would, and kills after a grace period.
// It returns once the process has exited and its stdout has been read to the
// end; calling it again does nothing.
func (s *runningService) stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	for _, cl := range s.clients {
		cl.close()
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case s.exitErr = <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		s.exitErr = <-s.done
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
