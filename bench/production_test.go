package main

import (
	"testing"
	"time"
)

// TestJudge checks how the production cases judge one record: the verdicts
// are the bench's PASS/MISS, so a judge that counts wrongly hides a defect.
func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 21, 0, 0, 0, time.UTC)
	const user, other, refused = 1, 2, 3
	type record struct {
		owner  int64
		commit time.Duration // after t0
		kind   int
		// what the readers saw: nil = never arrived
		arrival *arrival
	}
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	cases := []struct {
		name       string
		rec        record
		missing    int
		duplicates int
		wrong      int
		excluded   int
		phaseLat   []time.Duration // the phase's latencies after judging
	}{
		{name: "a record that arrived once live counts its latency in its phase",
			rec:      record{owner: user, commit: 2 * time.Second, arrival: &arrival{at: at(2*time.Second + 30*time.Millisecond), user: user, count: 1, live: true}},
			phaseLat: []time.Duration{30 * time.Millisecond}},
		{name: "a record that never arrived is lost and reads as never in its phase's p99",
			rec:      record{owner: user, commit: 2 * time.Second},
			missing:  1,
			phaseLat: []time.Duration{neverArrived}},
		{name: "a record that arrived twice is a duplicate",
			rec:        record{owner: user, commit: 2 * time.Second, arrival: &arrival{at: at(2*time.Second + time.Millisecond), user: user, count: 2, live: true}},
			duplicates: 1,
			phaseLat:   []time.Duration{time.Millisecond}},
		{name: "a record seen on another user's stream is delivered to the wrong user",
			rec:      record{owner: user, commit: 2 * time.Second, arrival: &arrival{at: at(2*time.Second + time.Millisecond), user: other, count: 1, live: true, wrong: true}},
			wrong:    1,
			phaseLat: []time.Duration{time.Millisecond}},
		{name: "a record of a user whose stream was refused is not judged",
			rec:      record{owner: refused, commit: 2 * time.Second},
			excluded: 1},
		{name: "a record committed before its stream was ready counts for delivery but not for latency",
			rec: record{owner: user, commit: 500 * time.Millisecond, arrival: &arrival{at: at(900 * time.Millisecond), user: user, count: 1}}},
		{name: "a sweep's record counts for delivery but not for the writer's latency",
			rec: record{owner: user, commit: 2 * time.Second, kind: bySweep1, arrival: &arrival{at: at(3 * time.Second), user: user, count: 1, live: true}}},
		{name: "a record the snapshot carried though its commit was heard of after ready is not a latency",
			rec: record{owner: user, commit: 2 * time.Second, arrival: &arrival{at: at(900 * time.Millisecond), user: user, count: 1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := &prodRun{b: newStreamBench("", nil), commits: map[int64]time.Time{}, kind: map[int64]int{},
				open: map[int64]bool{user: true, other: true}}
			p.b.readyAt[user] = at(time.Second)
			p.b.readyAt[other] = at(time.Second)
			const id = 42
			p.commits[id] = at(tc.rec.commit)
			p.kind[id] = tc.rec.kind
			p.b.owner[id] = tc.rec.owner
			if tc.rec.arrival != nil {
				p.b.arrivals[id] = tc.rec.arrival
			}
			r := &prodResult{phases: []*latPhase{{name: "only", from: t0, to: at(time.Minute)}}}
			p.judge(r)
			if r.committed != 1 || r.missing != tc.missing || r.duplicates != tc.duplicates || r.wrongUser != tc.wrong || r.excluded != tc.excluded {
				t.Errorf("committed %d, missing %d, duplicates %d, wrong %d, excluded %d; want 1, %d, %d, %d, %d",
					r.committed, r.missing, r.duplicates, r.wrongUser, r.excluded, tc.missing, tc.duplicates, tc.wrong, tc.excluded)
			}
			if got := r.phases[0].lat; !equalDurations(got, tc.phaseLat) {
				t.Errorf("phase latencies %v, want %v", got, tc.phaseLat)
			}
		})
	}
}

func equalDurations(a, b []time.Duration) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestEnvInt: the service's STREAMS_MAX is the last one in its environment,
// as exec.Cmd keeps the last of duplicate names.
func TestEnvInt(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want int
	}{
		{"the bench's own value when -env does not set it", []string{"STREAMS_MAX=10021", "GOGC=50"}, 10021},
		{"the -env value when it comes later", []string{"STREAMS_MAX=10021", "STREAMS_MAX=8000"}, 8000},
		{"zero when nobody sets it", []string{"STREAMS_MAXX=1"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := envInt(tc.env, "STREAMS_MAX"); got != tc.want {
				t.Errorf("envInt = %d, want %d", got, tc.want)
			}
		})
	}
}
