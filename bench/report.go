package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// memReport is the service's resident set at three moments of the run.
type memReport struct {
	idleKiB, peakKiB, afterKiB int64
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

func printReport(w io.Writer, o options, pgVersion string, servers []*runningService, results []*scenarioResult, mem memReport) {
	fmt.Fprintf(w, "\nthreeds-records bench, %s: %d CPU (%s), %s, PostgreSQL %s\n", time.Now().UTC().Format(time.DateOnly), runtime.NumCPU(), cpuModel(), runtime.Version(), pgVersion)
	fmt.Fprintf(w, "%d requests in flight; %d rounds per scenario, each round every server %s warm-up + %s measured, the order rotating from round to round; %s tokens, %d users x %d records + 1 x %d\n",
		o.concurrency, o.rounds, o.warmup, o.duration, o.alg, o.users, o.perUser, o.heavy)
	fmt.Fprintln(w, "The load generator, the servers and PostgreSQL share these cores: compare figures within this run, never across runs.")
	if len(servers) < 2 {
		fmt.Fprintln(w, "No floor in this run (../shared/floor or FLOOR_DIR not found): the service alone, the ratio target unchecked.")
	}
	if o.dbParams != "" || len(o.serviceEnv) > 0 || o.serviceArgs != "" {
		fmt.Fprintf(w, "service settings: db-params=%q env=%q args=%q\n", o.dbParams, o.serviceEnv.String(), o.serviceArgs)
	}
	for _, c := range o.compare {
		fmt.Fprintf(w, "compared: %s\n", c)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.AlignRight|tabwriter.Debug)
	fmt.Fprintln(tw, "scenario\t server\t req/s (median)\t req/s min-max\t CPU µs/req\t PG CPU µs/req\t gen CPU µs/req\t p50 ms\t p99 ms\t p99/p50\t non-2xx+errors\t peak RSS MiB\t other load (max)\t")
	for _, r := range results {
		for _, s := range r.sides {
			slices.Sort(s.lat)
			n := len(s.lat)
			p50, p99 := pct(s.lat, 0.5), pct(s.lat, 0.99)
			tail := 0.0
			if p50 > 0 {
				tail = float64(p99) / float64(p50)
			}
			fmt.Fprintf(tw, "%s\t %s\t %.0f\t %s\t %s\t %s\t %s\t %s\t %s\t %.1f\t %d\t %s\t %s (%s)\t\n",
				r.sc.name, s.name, median(s.rates), fmt.Sprintf("%.0f-%.0f", slices.Min(s.rates), slices.Max(s.rates)),
				usPer(s.cpu.server, n), usPer(s.cpu.pg, n), usPer(s.cpu.self, n),
				msStr(p50), msStr(p99), tail, s.non2xx+s.errs, mib(s.peakKiB),
				pctStr(median(s.other)), pctStr(slices.Max(s.other)))
		}
	}
	tw.Flush()

	if len(results) > 0 && len(results[0].ratios) > 0 {
		fmt.Fprintln(w, "\nratios: the median of the rounds' ratios (the phases of a round are a second or two apart); quartiles in brackets")
		for _, r := range results {
			for _, q := range r.ratios {
				a, b := r.sides[q.a], r.sides[q.b]
				fmt.Fprintf(w, "  %-30s %-22s req/s %.3f [%.3f %.3f]   CPU µs/req %.3f [%.3f %.3f] (%s vs %s)\n",
					r.sc.name+":", a.name+" ÷ "+b.name,
					median(q.perRound), quantile(q.perRound, 0.25), quantile(q.perRound, 0.75),
					median(q.cpu), quantile(q.cpu, 0.25), quantile(q.cpu, 0.75),
					usPer(a.cpu.server, len(a.lat)), usPer(b.cpu.server, len(b.lat)))
			}
		}
	}
	if o.direct {
		fmt.Fprintln(w, "\nthe service's page SQL straight to PostgreSQL over pgx (one phase per scenario, after the rounds):")
		tw = tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.AlignRight|tabwriter.Debug)
		fmt.Fprintln(tw, "scenario\t direct q/s\t p50 ms\t p99 ms\t PG CPU µs/q\t client CPU µs/q\t service ÷ direct\t")
		for _, r := range results {
			if r.direct == nil {
				continue
			}
			slices.Sort(r.direct.lat)
			n := len(r.direct.lat)
			fmt.Fprintf(tw, "%s\t %.0f\t %s\t %s\t %s\t %s\t %.0f%%\t\n", r.sc.name, r.direct.rate(),
				msStr(pct(r.direct.lat, 0.5)), msStr(pct(r.direct.lat, 0.99)),
				usPer(r.directCPU.pg, n), usPer(r.directCPU.self, n), 100*median(r.sides[0].rates)/r.direct.rate())
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "\nservice RSS: idle after start %s MiB, peak under load %s MiB (VmHWM), 2 s after the load %s MiB\n", mib(mem.idleKiB), mib(mem.peakKiB), mib(mem.afterKiB))

	fmt.Fprintln(w, "\ntargets:")
	check := func(ok bool, what string) { printTarget(w, ok, what) }
	for _, r := range results {
		for _, s := range r.sides {
			check(s.non2xx == 0 && s.errs == 0, fmt.Sprintf("%s, %s: zero non-2xx and errors (%d non-2xx, %d transport; first: %q)", r.sc.name, s.name, s.non2xx, s.errs, s.firstErr))
		}
		if r.direct != nil {
			check(r.direct.errs == 0, fmt.Sprintf("%s, direct SQL: zero errors (%d; first: %q)", r.sc.name, r.direct.errs, r.direct.firstErr))
		}
		check(r.sqlPerReq >= 0 && r.sqlPerReq < 1.01, fmt.Sprintf("%s: one SQL round trip per service request (%.3f, from its pool's acquisitions)", r.sc.name, r.sqlPerReq))
		if r.sc.heavy {
			continue
		}
		svc := r.sides[0]
		for _, q := range r.ratios {
			if q.a == 0 && !servers[q.b].countsLog {
				ratio := median(q.perRound)
				check(ratio >= 0.95, fmt.Sprintf("%s: service ÷ floor >= 0.95 req/s (%.3f)", r.sc.name, ratio))
			}
		}
		p50, p99 := pct(svc.lat, 0.5), pct(svc.lat, 0.99)
		floorTail := ""
		for i, s := range r.sides {
			if !servers[i].countsLog && pct(s.lat, 0.5) > 0 {
				floorTail = fmt.Sprintf("; the floor's p99/p50 in the same rounds: %.1f", float64(pct(s.lat, 0.99))/float64(pct(s.lat, 0.5)))
			}
		}
		check(p99 <= 3*p50, fmt.Sprintf("%s: service p99 <= 3 x p50 (%s ms vs %s ms%s)", r.sc.name, msStr(p99), msStr(p50), floorTail))
	}
	for _, s := range servers {
		if s.countsLog {
			check(s.logLines.Load() == s.responses.Load(), fmt.Sprintf("%s: one access-log line per response, all there after SIGTERM (%d lines, %d responses; exit: %v)", s.name, s.logLines.Load(), s.responses.Load(), s.exitErr))
		}
	}
	check(mem.peakKiB <= 40<<10, fmt.Sprintf("service peak RSS <= 40 MiB (%s MiB)", mib(mem.peakKiB)))
	check(mem.idleKiB <= 20<<10, fmt.Sprintf("service idle RSS <= 20 MiB (%s MiB)", mib(mem.idleKiB)))
}

// printTarget is one line of a targets list: [ok  ] or [MISS], then what.
func printTarget(w io.Writer, ok bool, what string) {
	mark := "ok  "
	if !ok {
		mark = "MISS"
	}
	fmt.Fprintf(w, "  [%s] %s\n", mark, what)
}
