package main

// The stream scenario (issue 9): one service process holding one event
// stream per user for 10,000 users while a writer stores live records for
// random users among them. It measures what the contract's section 6
// promises at that scale: commit → event latency, memory per open stream
// and its stability, what idle streams cost the database, and what the
// NOTIFY trigger costs the card issuer's writer.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// The flags live here, registered before main parses them, so main.go only
// dispatches on -only.
var (
	onlyFlag       = flag.String("only", "", `run one part: "pages" (the page scenarios) or "stream" (the event-stream scenario); default both`)
	streamsFlag    = flag.Int("streams", 10000, "stream scenario: open streams, one per user (users 1..streams; at most -users)")
	streamRate     = flag.Int("stream-rate", 100, "stream scenario: records the writer stores per second, for random streamed users")
	streamDuration = flag.Duration("stream-d", 30*time.Second, "stream scenario: how long the writer runs")
	streamIdle     = flag.Duration("stream-idle", 20*time.Second, "stream scenario: each idle window in which database transactions are counted")
	streamOpenC    = flag.Int("stream-open-c", 64, "stream scenario: streams being opened at once")
	pgbenchBin     = flag.String("pgbench", "", "pgbench binary for the trigger-cost phase (default: PATH, then the newest /usr/lib/postgresql/*/bin)")
	pgbenchT       = flag.Duration("pgbench-t", 10*time.Second, "stream scenario: each pgbench run (with and without the trigger, alternating)")
	pgbenchRounds  = flag.Int("pgbench-rounds", 2, "stream scenario: pgbench runs per variant")
	pgbenchC       = flag.Int("pgbench-c", 4, "stream scenario: pgbench clients (the card issuer's concurrent writers)")
)

const (
	notifyTrigger = "threeds_records_notify_insert"
	// statsFlushWait outlasts PostgreSQL's PGSTAT_IDLE_INTERVAL (10 s): an idle
	// backend publishes its transaction counts at most that late, so counts read
	// after it are complete.
	statsFlushWait = 11 * time.Second
	// pgbench writes to users nobody streams: the cost measured is the trigger
	// and NOTIFY on the writer's commits, with the service listening as in
	// production, not the service's reads of records it fans out.
	pgbenchFirstUser = 1_000_001
	pgbenchLastUser  = 1_100_000
	liveMerchant     = "Bench Live Shop"
)

// streamTargets are issue 9's "What it must reach".
const (
	targetP50          = 20 * time.Millisecond
	targetP99          = 100 * time.Millisecond
	targetKiBPerStream = 32
	targetThroughput   = 0.90
	// RSS over the writer phase: garbage between two GC cycles moves it a
	// little; a leak per event or per record would show as more than this.
	targetGrowth = 0.10
)

// slowRecord places a slow delivery in time: after the writer's start, and
// in the heartbeat cycle that began when the streams were opened (every
// stream pings STREAM_HEARTBEAT after its last write, so streams opened
// together ping together).
type slowRecord struct {
	afterStart, inCycle, lat time.Duration
}

type streamResult struct {
	streams, opened, refused int
	firstRefusal             string
	openTime                 time.Duration

	idleKiB, streamsKiB          int64
	writerStartKiB, writerEndKiB int64
	writerMaxKiB                 int64

	xactsNone, xactsStreams     int64
	queriesNone, queriesStreams int     // other sessions that ran a statement in the window
	idleCPUShare                float64 // service CPU while idle with streams, share of one core

	committed    int
	writerRate   float64
	lat          []time.Duration
	slowest      []slowRecord
	heartbeat    time.Duration // the service's STREAM_HEARTBEAT
	early        int           // arrived before the writer saw its COMMIT return
	missing      int
	duplicates   int
	wrongUser    int
	pings, ends  int64
	dropped      int64
	firstProblem string

	tpsWith, tpsWithout, tpsNoListener []float64
	// The service's CPU while pgbench ran, in µs, and the inserts it heard
	// of: what receiving one notification costs the listener's side.
	svcMicrosWith, svcMicrosWithout   int64
	svcSecondsWith, svcSecondsWithout float64
	pgbenchNote                       string
}

// runStreamScenario migrates the database for -source, seeds the history
// when the production cases run (everything after runs on it), then runs the
// parts -stream-parts names.
func runStreamScenario(ctx context.Context, o options, admin *pgx.Conn, tokens map[int64]string, jwksPath string) (bool, error) {
	n := *streamsFlag
	if n < 1 || n > o.users {
		return false, fmt.Errorf("-streams %d: must be 1..-users (%d): each stream needs a seeded user with a token", n, o.users)
	}
	if *sourceFlag != "notify" && *sourceFlag != "wal" {
		return false, fmt.Errorf("-source %q: want notify or wal", *sourceFlag)
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < uint64(n)+256 {
		return false, fmt.Errorf("open-files limit %d is below %d streams + 256: raise it (ulimit -n) for this process and the service", lim.Cur, n)
	}
	if err := migrateFor(ctx, o.dsn, *sourceFlag); err != nil {
		return false, err
	}
	if wantPart("production") {
		if err := seedHistory(ctx, admin, prodPlan()); err != nil {
			return false, err
		}
	}
	ok := true
	if wantPart("steady") {
		steadyOK, err := runSteady(ctx, o, admin, tokens, jwksPath)
		if err != nil {
			return false, err
		}
		ok = ok && steadyOK
	}
	if wantPart("production") {
		prodOK, err := runProduction(ctx, o, admin, tokens, jwksPath)
		if err != nil {
			return false, fmt.Errorf("production cases: %w", err)
		}
		ok = ok && prodOK
	}
	return ok, nil
}

// migrateFor runs the release binary's `migrate` with STREAM_SOURCE=source,
// which installs what that source needs (the trigger, or the publication).
func migrateFor(ctx context.Context, dsn, source string) error {
	cmd := exec.CommandContext(ctx, *migrateBin, "migrate")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "DATABASE_URL=" + dsn, "STREAM_SOURCE=" + source}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s migrate with STREAM_SOURCE=%s: %v: %s", *migrateBin, source, err, lastLines(out, 5))
	}
	return nil
}

// runSteady is issue 9's scenario: latency, memory per stream, what idle
// streams cost the database and (notify) what the trigger costs the writer.
func runSteady(ctx context.Context, o options, admin *pgx.Conn, tokens map[int64]string, jwksPath string) (bool, error) {
	n := *streamsFlag
	// The trigger's cost is the notify source's; the writer's cost of both
	// sources side by side is bench/writer-cost.sh (make bench-writer).
	var triggerDef string
	if *sourceFlag == "notify" {
		err := admin.QueryRow(ctx, `SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = $1 AND tgrelid = 'threeds_records'::regclass`, notifyTrigger).Scan(&triggerDef)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, fmt.Errorf("the trigger %s is not on threeds_records: `threeds-records migrate` did not install it", notifyTrigger)
		} else if err != nil {
			return false, fmt.Errorf("read the trigger: %w", err)
		}
	}
	var maxID int64
	if err := admin.QueryRow(ctx, "SELECT coalesce(max(id), 0) FROM threeds_records").Scan(&maxID); err != nil {
		return false, fmt.Errorf("max id: %w", err)
	}
	// The rows this scenario adds go again, so a kept cluster (BENCH_KEEP) is
	// not reseeded next time and the page scenarios see the same table.
	defer func() {
		if _, err := admin.Exec(context.Background(), "DELETE FROM threeds_records WHERE id > $1", maxID); err != nil {
			logf("stream: could not delete the scenario's rows: %v", err)
		}
	}()

	so := o
	so.serviceEnv = append([]string{"STREAMS_MAX=" + strconv.Itoa(n), "STREAM_SOURCE=" + *sourceFlag}, o.serviceEnv...)
	svc, err := startService(ctx, so, jwksPath)
	if err != nil {
		return false, err
	}
	defer svc.stop()
	pid := svc.pid()
	logf("stream: service pid %d on %s", pid, svc.addr)

	xacts := func() int64 {
		var x int64
		_ = admin.QueryRow(ctx, "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()").Scan(&x)
		return x
	}
	// activity is when each other session in the database last started a
	// statement. pg_stat_activity is live, unlike the counters, and says
	// whose: it cross-checks that a count is the service's and not, say,
	// an autovacuum worker's.
	activity := func() map[int32]time.Time {
		m := map[int32]time.Time{}
		rows, err := admin.Query(ctx, `SELECT pid, coalesce(query_start, backend_start) FROM pg_stat_activity
 WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()`)
		if err != nil {
			return m
		}
		defer rows.Close()
		for rows.Next() {
			var pid int32
			var at time.Time
			if rows.Scan(&pid, &at) == nil {
				m[pid] = at
			}
		}
		return m
	}
	idleWindow := func() (int64, int) {
		sleepCtx(ctx, statsFlushWait)
		x0, a0 := xacts(), activity()
		sleepCtx(ctx, *streamIdle)
		a1 := activity()
		busy := 0
		for pid, at := range a1 {
			if before, ok := a0[pid]; !ok || !at.Equal(before) {
				busy++
			}
		}
		sleepCtx(ctx, statsFlushWait)
		return xacts() - x0, busy
	}

	r := &streamResult{streams: n}
	sleepCtx(ctx, 2*time.Second)
	r.idleKiB, _ = memKiB(pid, "VmRSS")
	logf("stream: idle window without streams (%s + stats flush)", *streamIdle)
	r.xactsNone, r.queriesNone = idleWindow()

	b := newStreamBench(svc.addr, tokens)
	defer b.closeAll()
	logf("stream: opening %d streams, %d at a time", n, *streamOpenC)
	start := time.Now()
	r.opened, r.refused, r.firstRefusal = b.open(ctx, n, *streamOpenC)
	r.openTime = time.Since(start)
	b.openedAt = start
	r.heartbeat = 15 * time.Second // the contract's default
	for _, kv := range so.serviceEnv {
		if v, ok := strings.CutPrefix(kv, "STREAM_HEARTBEAT="); ok {
			if d, err := time.ParseDuration(v); err == nil {
				r.heartbeat = d
			}
		}
	}
	logf("stream: %d open in %s (%d refused)", r.opened, r.openTime.Round(time.Millisecond), r.refused)
	if ctx.Err() != nil {
		return false, ctx.Err()
	}

	logf("stream: idle window with %d streams (%s + stats flush)", r.opened, *streamIdle)
	c0, _ := cpuTicks(pid)
	t0 := time.Now()
	r.xactsStreams, r.queriesStreams = idleWindow()
	if c1, err := cpuTicks(pid); err == nil {
		r.idleCPUShare = float64((c1-c0)*(1e6/clockTicks)) / float64(time.Since(t0).Microseconds())
	}
	// The idle window ended with statsFlushWait of quiet: RSS has settled.
	r.streamsKiB, _ = memKiB(pid, "VmRSS")

	logf("stream: writer %d records/s for %s", *streamRate, *streamDuration)
	if err := b.write(ctx, o.dsn, n, r, pid); err != nil {
		return false, err
	}

	logf("stream: writer throughput with and without the trigger (pgbench, %d x %s each)", *pgbenchRounds, *pgbenchT)
	pb, err := newPgbench(o)
	if err == nil && triggerDef == "" {
		err = fmt.Errorf("STREAM_SOURCE=%s has no trigger to measure; bench/writer-cost.sh (make bench-writer) compares the writer's cost of both sources", *sourceFlag)
		pb = nil
	}
	if err == nil {
		err = pb.withAndWithout(ctx, admin, triggerDef, r, pid)
	}
	r.pings, r.ends, r.dropped = b.pings.Load(), b.ends.Load(), b.dropped.Load()
	b.errMu.Lock()
	if r.firstProblem == "" {
		r.firstProblem = b.firstDrop + b.firstEnd
	}
	b.errMu.Unlock()
	b.closeAll()
	svc.stop()
	if err == nil {
		// What the trigger costs when nobody LISTENs: tells the NOTIFY at
		// commit apart from the work of waking the listener for each one.
		logf("stream: the trigger with no listener (service stopped), %d x %s", *pgbenchRounds, *pgbenchT)
		for range *pgbenchRounds {
			tps, rerr := pb.run(ctx)
			if rerr != nil {
				err = rerr
				break
			}
			r.tpsNoListener = append(r.tpsNoListener, tps)
		}
	}
	if err != nil {
		r.pgbenchNote = err.Error()
		logf("stream: %v", err)
	}

	printStreamReport(os.Stdout, r)
	ok := r.refused == 0 && r.missing == 0 && r.duplicates == 0 && r.wrongUser == 0 && r.dropped == 0 && r.ends == 0
	if !ok {
		fmt.Println("\nFAILED: streams refused or dropped, or records missing, duplicated or delivered to the wrong user (see above)")
	}
	return ok, nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// *streamDuration, on one connection, noting when each INSERT's commit
// returned, then waits for the events and fills r.
func (b *streamBench) write(ctx context.Context, dsn string, n int, r *streamResult, pid int) error {
	conn, err := connectWriter(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	const insert = liveInsertSQL + " RETURNING id"
	if _, err := conn.Prepare(ctx, "live", insert); err != nil {
		return fmt.Errorf("writer prepare: %w", err)
	}
	commits := map[int64]time.Time{}
	var writerStart time.Time
	rng := rand.New(rand.NewPCG(9, 9))
	interval := time.Second / time.Duration(*streamRate)

	stopRSS := make(chan struct{})
	rssDone := make(chan struct{})
	r.writerStartKiB, _ = memKiB(pid, "VmRSS")
	r.writerMaxKiB = r.writerStartKiB
	go func() {
		defer close(rssDone)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopRSS:
				return
			case <-t.C:
				if k, err := memKiB(pid, "VmRSS"); err == nil && k > r.writerMaxKiB {
					r.writerMaxKiB = k
				}
			}
		}
	}()

	start := time.Now()
	writerStart = start
	end := start.Add(*streamDuration)
	next := start
	for time.Now().Before(end) && ctx.Err() == nil {
		if d := time.Until(next); d > 0 {
			time.Sleep(d)
		}
		next = next.Add(interval)
		user := 1 + rng.Int64N(int64(n))
		var id int64
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := conn.QueryRow(qctx, "live", user, fmt.Sprintf("%06d", rng.IntN(1000000))).Scan(&id)
		cancel()
		if err != nil {
			return fmt.Errorf("writer insert: %w", err)
		}
		committed := time.Now()
		commits[id] = committed
		b.mu.Lock()
		b.owner[id] = user
		if a := b.arrivals[id]; a != nil && a.user != user {
			a.wrong = true
		}
		b.mu.Unlock()
	}
	r.committed = len(commits)
	r.writerRate = float64(r.committed) / time.Since(start).Seconds()

	// Wait for the last events (bounded), then judge every record.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		b.mu.Lock()
		got := 0
		for id := range commits {
			if b.arrivals[id] != nil {
				got++
			}
		}
		b.mu.Unlock()
		if got == len(commits) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	sleepCtx(ctx, 2*time.Second)
	close(stopRSS)
	<-rssDone
	r.writerEndKiB, _ = memKiB(pid, "VmRSS")

	b.mu.Lock()
	defer b.mu.Unlock()
	for id, c := range commits {
		a := b.arrivals[id]
		if a == nil {
			r.missing++
			if r.firstProblem == "" {
				r.firstProblem = fmt.Sprintf("record %d of user %d never arrived", id, b.owner[id])
			}
			continue
		}
		if a.count > 1 {
			r.duplicates += a.count - 1
		}
		if a.wrong {
			r.wrongUser++
		}
		d := a.at.Sub(c)
		if d < 0 {
			// NOTIFY leaves at commit; the writer's client hears of the commit
			// a moment later.
			r.early++
			d = 0
		}
		r.lat = append(r.lat, d)
		r.slowest = append(r.slowest, slowRecord{afterStart: c.Sub(writerStart), inCycle: c.Sub(b.openedAt) % r.heartbeat, lat: d})
	}
	slices.Sort(r.lat)
	slices.SortFunc(r.slowest, func(a, b slowRecord) int { return int(b.lat - a.lat) })
	r.slowest = r.slowest[:min(len(r.slowest), 8)]
	return nil
}

var tpsRE = regexp.MustCompile(`(?m)^tps = ([0-9.]+)`)

// pgbench runs the card issuer's writer: single-row INSERTs for users
// nobody streams, from pgbenchC clients for pgbenchT.
type pgbench struct {
	bin, script, dsn string
}

func newPgbench(o options) (*pgbench, error) {
	bin, err := findPgbench()
	if err != nil {
		return nil, err
	}
	script := filepath.Join(o.dir, "insert.pgbench")
	body := fmt.Sprintf(`\set uid random(%d, %d)
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at) VALUES (:uid, '123456', 12.34, 'USD', 'pgbench writer', 300, now());
`, pgbenchFirstUser, pgbenchLastUser)
	if err := os.WriteFile(script, []byte(body), 0o644); err != nil {
		return nil, err
	}
	return &pgbench{bin: bin, script: script, dsn: o.dsn}, nil
}

// run is one pgbench run; it returns the transactions per second.
func (p *pgbench) run(ctx context.Context) (float64, error) {
	secs := strconv.Itoa(max(1, int(pgbenchT.Seconds())))
	jobs := strconv.Itoa(min(*pgbenchC, 2))
	cmd := exec.CommandContext(ctx, p.bin, "-n", "-M", "prepared", "-f", p.script, "-T", secs, "-c", strconv.Itoa(*pgbenchC), "-j", jobs, p.dsn)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("pgbench: %v: %s", err, lastLines(out, 5))
	}
	m := tpsRE.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("pgbench printed no tps: %s", lastLines(out, 5))
	}
	return strconv.ParseFloat(string(m[1]), 64)
}

// withAndWithout runs pgbench alternately with and without the NOTIFY
// trigger (dropped, then recreated from its own definition), the service
// listening throughout, and leaves the trigger in place.
func (p *pgbench) withAndWithout(ctx context.Context, admin *pgx.Conn, triggerDef string, r *streamResult, svcPid int) (err error) {
	present := true
	setTrigger := func(on bool) error {
		if on == present {
			return nil
		}
		sql := "DROP TRIGGER " + notifyTrigger + " ON threeds_records"
		if on {
			sql = triggerDef
		}
		// The writer is idle between runs, so the lock is had at once; the
		// timeout only keeps a surprise from hanging the bench.
		tx, err := admin.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(context.Background())
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '10s'"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s: %w", sql, err)
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
		present = on
		return nil
	}
	defer func() {
		if rerr := setTrigger(true); rerr != nil {
			err = errors.Join(err, fmt.Errorf("recreate the trigger: %w (`threeds-records migrate` recreates it)", rerr))
		}
	}()
	for round := range *pgbenchRounds {
		for _, with := range []bool{true, false} {
			if err := setTrigger(with); err != nil {
				return err
			}
			c0, _ := cpuTicks(svcPid)
			t0 := time.Now()
			tps, err := p.run(ctx)
			if err != nil {
				return err
			}
			c1, _ := cpuTicks(svcPid)
			micros := (c1 - c0) * (1e6 / clockTicks)
			logf("stream: pgbench round %d, trigger %v: %.0f tps", round+1, with, tps)
			if with {
				r.tpsWith = append(r.tpsWith, tps)
				r.svcMicrosWith += micros
				r.svcSecondsWith += time.Since(t0).Seconds()
			} else {
				r.tpsWithout = append(r.tpsWithout, tps)
				r.svcMicrosWithout += micros
				r.svcSecondsWithout += time.Since(t0).Seconds()
			}
		}
	}
	return nil
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}

// findPgbench prefers the server's bindir (pgbench ships with the server
// package on Debian, postgresql-NN) over Debian's /usr/bin wrapper.
func findPgbench() (string, error) {
	if *pgbenchBin != "" {
		return *pgbenchBin, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(dirs[i]))))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(dirs[j]))))
		return vi > vj
	})
	if len(dirs) > 0 {
		return dirs[0], nil
	}
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p, nil
	}
	return "", errors.New("pgbench not found (it ships with the PostgreSQL server package); pass -pgbench")
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

func printStreamReport(w io.Writer, r *streamResult) {
	fmt.Fprintf(w, "\nstream scenario: %d event streams (one per user) on one service process; writer %d records/s for %s to random streamed users\n",
		r.streams, *streamRate, *streamDuration)
	fmt.Fprintf(w, "  opened:           %d of %d in %s (%d refused%s)\n", r.opened, r.streams, r.openTime.Round(time.Millisecond), r.refused, quoted(r.firstRefusal))
	fmt.Fprintf(w, "  commit → event:   %d records (%.1f/s): p50 %s ms, p99 %s ms, max %s ms; %d arrived before the writer's COMMIT returned\n",
		r.committed, r.writerRate, msStr(pct(r.lat, 0.50)), msStr(pct(r.lat, 0.99)), msStr(pct(r.lat, 1)), r.early)
	if len(r.slowest) > 0 {
		fmt.Fprintf(w, "  slowest:          ")
		for i, s := range r.slowest {
			if i > 0 {
				fmt.Fprint(w, ", ")
			}
			fmt.Fprintf(w, "%s ms at +%.1fs (%.1fs into a %s heartbeat cycle)", msStr(s.lat), s.afterStart.Seconds(), s.inCycle.Seconds(), r.heartbeat)
		}
		fmt.Fprintf(w, "; the streams were opened over %.1fs, so their heartbeats fall in the first %.1fs of each cycle\n", r.openTime.Seconds(), r.openTime.Seconds())
	}
	fmt.Fprintf(w, "  delivery:         %d missing, %d duplicates, %d to the wrong user; %d streams dropped, %d ended by the service%s\n",
		r.missing, r.duplicates, r.wrongUser, r.dropped, r.ends, quoted(r.firstProblem))
	perStream := 0.0
	if r.opened > 0 {
		perStream = float64(r.streamsKiB-r.idleKiB) / float64(r.opened)
	}
	fmt.Fprintf(w, "  service RSS:      idle %s MiB, with streams %s MiB → %.1f KiB per stream\n", mib(r.idleKiB), mib(r.streamsKiB), perStream)
	growth := 0.0
	if r.writerStartKiB > 0 {
		growth = float64(r.writerEndKiB-r.writerStartKiB) / float64(r.writerStartKiB)
	}
	fmt.Fprintf(w, "  over the writer:  RSS %s MiB at start, %s MiB at end (%+.1f%%), %s MiB max\n", mib(r.writerStartKiB), mib(r.writerEndKiB), growth*100, mib(r.writerMaxKiB))
	fmt.Fprintf(w, "  idle database:    pg_stat_database transactions over %s (+%s stats flush): %d without streams, %d with %d streams open (the bench's own reads in both); sessions that ran a statement in the window: %d without, %d with\n",
		*streamIdle, statsFlushWait, r.xactsNone, r.xactsStreams, r.opened, r.queriesNone, r.queriesStreams)
	fmt.Fprintf(w, "  idle service CPU: %.1f%% of one core with the streams open (heartbeats)\n", r.idleCPUShare*100)
	ratio := -1.0
	if len(r.tpsWith) > 0 && len(r.tpsWithout) > 0 && mean(r.tpsWithout) > 0 {
		ratio = mean(r.tpsWith) / mean(r.tpsWithout)
		fmt.Fprintf(w, "  writer (pgbench): %d clients, %d x %s per variant, users nobody streams: with trigger %.0f tps %v, without %.0f tps %v → %.0f%%\n",
			*pgbenchC, len(r.tpsWith), *pgbenchT, mean(r.tpsWith), roundAll(r.tpsWith), mean(r.tpsWithout), roundAll(r.tpsWithout), ratio*100)
		if heard := mean(r.tpsWith) * r.svcSecondsWith; heard > 0 {
			fmt.Fprintf(w, "                    the service's CPU meanwhile: %.0f%% of a core with the trigger (%.1f µs per notification), %.0f%% without\n",
				100*float64(r.svcMicrosWith)/(r.svcSecondsWith*1e6), float64(r.svcMicrosWith)/heard,
				100*float64(r.svcMicrosWithout)/(max(r.svcSecondsWithout, 1)*1e6))
		}
		if len(r.tpsNoListener) > 0 {
			fmt.Fprintf(w, "                    trigger with nobody listening (service stopped): %.0f tps %v → %.0f%% of without\n",
				mean(r.tpsNoListener), roundAll(r.tpsNoListener), 100*mean(r.tpsNoListener)/mean(r.tpsWithout))
		}
	} else {
		fmt.Fprintf(w, "  writer (pgbench): not measured: %s\n", r.pgbenchNote)
	}

	fmt.Fprintln(w, "\nstream targets (issue 9):")
	check := func(ok bool, what string) { printTarget(w, ok, what) }
	p50, p99 := pct(r.lat, 0.5), pct(r.lat, 0.99)
	check(len(r.lat) > 0 && p50 <= targetP50, fmt.Sprintf("commit → event p50 ≤ %s (%s ms)", targetP50, msStr(p50)))
	check(len(r.lat) > 0 && p99 <= targetP99, fmt.Sprintf("commit → event p99 ≤ %s (%s ms)", targetP99, msStr(p99)))
	check(r.opened > 0 && perStream <= targetKiBPerStream, fmt.Sprintf("memory per open stream ≤ %d KiB (%.1f KiB)", targetKiBPerStream, perStream))
	check(growth <= targetGrowth, fmt.Sprintf("no RSS growth over the writer phase, ≤ %.0f%% (%+.1f%%)", targetGrowth*100, growth*100))
	// The counters are database-wide: an autovacuum worker's visit lands in
	// them too. Only the sessions of the service can run statements for its
	// streams, so a surplus with none of them active is not the streams'.
	idleNote := fmt.Sprintf("%d with − %d without; client sessions that ran a statement: %d", r.xactsStreams, r.xactsNone, r.queriesStreams)
	if r.xactsStreams > r.xactsNone && r.queriesStreams == 0 {
		idleNote += "; the surplus is not the service's: none of its sessions ran a statement"
	}
	check(r.queriesStreams == 0, "0 database transactions caused by idle streams ("+idleNote+")")
	check(ratio >= targetThroughput, fmt.Sprintf("writer throughput with the trigger ≥ %.0f%% of without (%s)", targetThroughput*100, pctStr(ratio)))
	check(r.missing == 0 && r.duplicates == 0 && r.wrongUser == 0 && r.dropped == 0 && r.ends == 0 && r.refused == 0,
		"every stream opened and stayed open; every record arrived once, on its user's stream only")
}

func quoted(s string) string {
	if s == "" {
		return ""
	}
	return fmt.Sprintf("; first: %q", s)
}

func roundAll(xs []float64) []int {
	out := make([]int, len(xs))
	for i, x := range xs {
		out[i] = int(x + 0.5)
	}
	return out
}
