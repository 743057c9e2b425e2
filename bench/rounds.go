package main

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"time"
)

// bench is one run: the servers under test and what it needs to sample them.
type bench struct {
	o          options
	ctx        context.Context
	tokens     map[int64]string
	postmaster int               // -1 when unknown
	servers    []*runningService // the service, then the floor when there is one
}

// cpuSample is CPU used so far, in µs; -1 when unknown.
type cpuSample struct {
	server  int64 // the server under load in the phase (-1: none, as for direct SQL)
	servers int64 // every server the bench started, loaded or idle
	pg      int64 // the postmaster and its backends
	self    int64 // the bench process: load generator or pgx client
	machine int64 // every process on the machine
}

func (a cpuSample) sub(b cpuSample) cpuSample {
	d := func(x, y int64) int64 {
		if x < 0 || y < 0 {
			return -1
		}
		return x - y
	}
	return cpuSample{d(a.server, b.server), d(a.servers, b.servers), d(a.pg, b.pg), d(a.self, b.self), d(a.machine, b.machine)}
}

func (a cpuSample) add(b cpuSample) cpuSample {
	s := func(x, y int64) int64 {
		if x < 0 || y < 0 {
			return -1
		}
		return x + y
	}
	return cpuSample{s(a.server, b.server), s(a.servers, b.servers), s(a.pg, b.pg), s(a.self, b.self), s(a.machine, b.machine)}
}

// otherLoad is the share of the machine's CPU, over elapsed, that none of
// the measured parties used: other people's work on a shared box.
func (a cpuSample) otherLoad(elapsed time.Duration) float64 {
	if a.machine < 0 || a.pg < 0 || elapsed <= 0 {
		return -1
	}
	// Sampling skew can make an idle machine's remainder slightly negative.
	other := max(a.machine-a.pg-a.self-max(a.servers, 0), 0)
	return float64(other) / (elapsed.Seconds() * 1e6 * float64(runtime.NumCPU()))
}

// sample reads every party's CPU; target is the server under load (nil: none).
func (b *bench) sample(target *runningService) cpuSample {
	micros := func(ticks int64, err error) int64 {
		if err != nil {
			return -1
		}
		return ticks * (1e6 / clockTicks)
	}
	s := cpuSample{server: -1, pg: -1, self: selfMicros(), machine: micros(machineBusyTicks())}
	for _, srv := range b.servers {
		t := micros(cpuTicks(srv.pid()))
		if srv == target {
			s.server = t
		}
		if t >= 0 {
			s.servers += t
		}
	}
	if b.postmaster > 0 {
		s.pg = micros(treeTicks(b.postmaster))
	}
	return s
}

// poolAcquires is the service's count of connections taken from its pool:
// every query takes one, so its growth over the service's requests is the SQL
// round trips per request. (pg_stat_database's transaction count would do
// too, but an idle backend publishes its last second of statistics only ten
// seconds later.)
func (b *bench) poolAcquires() int64 {
	n, err := b.servers[0].metric("threeds_db_pool_acquire_total")
	if err != nil {
		return -1
	}
	return n
}

// sideStats is what one server achieved over a scenario's rounds.
type sideStats struct {
	name     string
	rates    []float64 // req/s, one per round
	cpuPer   []float64 // the server's CPU µs per request, one per round (-1: unknown)
	lat      []time.Duration
	elapsed  time.Duration
	non2xx   int64
	errs     int64
	firstErr string
	cpu      cpuSample // summed over the measured phases
	other    []float64 // other load, one per round
	peakKiB  int64     // VmHWM after the scenario (since the server started)
}

func (s *sideStats) add(res *phaseResult, cpu cpuSample) {
	s.rates = append(s.rates, res.rate())
	per := -1.0
	if cpu.server >= 0 && len(res.lat) > 0 {
		per = float64(cpu.server) / float64(len(res.lat))
	}
	s.cpuPer = append(s.cpuPer, per)
	s.lat = append(s.lat, res.lat...)
	s.elapsed += res.elapsed
	s.countFailures(res)
	if len(s.rates) == 1 {
		s.cpu = cpu
	} else {
		s.cpu = s.cpu.add(cpu)
	}
	s.other = append(s.other, cpu.otherLoad(res.elapsed))
}

// countFailures adds a phase's non-2xx and errors, warm-ups included: a
// failure is one whenever it happens.
func (s *sideStats) countFailures(res *phaseResult) {
	s.non2xx += res.non2xx
	s.errs += res.errs
	if s.firstErr == "" {
		s.firstErr = res.firstErr
	}
}

// scenarioResult is one scenario: each server's figures, service ÷ floor
// per round, and (with -direct) the page SQL straight to PostgreSQL.
type scenarioResult struct {
	sc        scenario
	sides     []*sideStats // in b.servers' order
	ratios    []*ratioSeries
	sqlPerReq float64 // the service's queries per request (-1: unknown)
	direct    *phaseResult
	directCPU cpuSample
}

// ratioSeries is a ÷ b in req/s, one value per round (the two phases of a
// round are seconds apart, so a drift in other load cancels out).
type ratioSeries struct {
	a, b     int // indexes in b.servers
	perRound []float64
	cpu      []float64 // a's CPU µs/req ÷ b's, one per round
}

// comparisons are the ratios a run reports: each build of the service ÷ the
// floor, and the service ÷ the -compare build.
func (b *bench) comparisons() []*ratioSeries {
	floor := -1
	for i, s := range b.servers {
		if !s.countsLog {
			floor = i
		}
	}
	var out []*ratioSeries
	for i, s := range b.servers {
		if s.countsLog && floor >= 0 {
			out = append(out, &ratioSeries{a: i, b: floor})
		}
	}
	for i := 1; i < len(b.servers); i++ {
		if b.servers[i].countsLog {
			out = append(out, &ratioSeries{a: 0, b: i})
		}
	}
	return out
}

// measureScenario runs o.rounds rounds. Each round loads every server in
// turn for o.warmup (unmeasured) and then o.duration, with the same users in
// the same order; the order of the servers alternates from round to round,
// so a drift in the machine's other load favours neither. The ratio of a
// round compares two phases a few seconds apart.
func (b *bench) measureScenario(sc scenario, seed uint64) *scenarioResult {
	r := &scenarioResult{sc: sc, ratios: b.comparisons()}
	for _, s := range b.servers {
		r.sides = append(r.sides, &sideStats{name: s.name})
	}
	a0 := b.poolAcquires()
	var requests int // the service's, warm-ups included
	for round := range b.o.rounds {
		// Rotate who goes first: with two servers, simply alternate.
		order := make([]int, len(b.servers))
		for i := range order {
			order[i] = (i + round) % len(order)
		}
		roundSeed := seed*1000 + uint64(round)
		for _, i := range order {
			if b.ctx.Err() != nil {
				return r
			}
			s := b.servers[i]
			if b.o.warmup > 0 {
				w := httpLoad(b.ctx, s.clients, sc, b.tokens, b.o.warmup, roundSeed+500)
				r.sides[i].countFailures(w)
				s.responses.Add(int64(len(w.lat)))
				if i == 0 {
					requests += len(w.lat)
				}
			}
			c0 := b.sample(s)
			res := httpLoad(b.ctx, s.clients, sc, b.tokens, b.o.duration, roundSeed)
			r.sides[i].add(res, b.sample(s).sub(c0))
			s.responses.Add(int64(len(res.lat)))
			if i == 0 {
				requests += len(res.lat)
			}
		}
		line := fmt.Sprintf("%s, round %d/%d:", sc.name, round+1, b.o.rounds)
		for i, s := range b.servers {
			line += fmt.Sprintf(" %s %.0f req/s,", s.name, r.sides[i].rates[round])
		}
		for _, q := range r.ratios {
			q.perRound = append(q.perRound, r.sides[q.a].rates[round]/r.sides[q.b].rates[round])
			if ca, cb := r.sides[q.a].cpuPer[round], r.sides[q.b].cpuPer[round]; ca > 0 && cb > 0 {
				q.cpu = append(q.cpu, ca/cb)
			}
			line += fmt.Sprintf(" %s÷%s %.3f", b.servers[q.a].name, b.servers[q.b].name, q.perRound[round])
		}
		logf("%s", line)
	}
	for i, s := range b.servers {
		r.sides[i].peakKiB, _ = memKiB(s.pid(), "VmHWM")
	}
	r.sqlPerReq = -1
	if a1 := b.poolAcquires(); a0 >= 0 && a1 >= 0 && requests > 0 {
		r.sqlPerReq = float64(a1-a0) / float64(requests)
	}
	return r
}

func median(xs []float64) float64 { return quantile(xs, 0.5) }

// quantile is the q-quantile of xs by linear interpolation (0 when empty).
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}
