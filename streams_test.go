package main

import (
	"slices"
	"strconv"
	"testing"
	"time"
)

// The registry on its own: no source runs, the test plays the source
// (takeSnapshots, deliver) the way listen.go and the wal source do.

// upHub is a registry whose source is up, with perUser places per user.
func upHub(t *testing.T, perUser int) *hub {
	t.Helper()
	h := newHub(hubConfig{perUser: perUser, maxStreams: 100}, discardLogger())
	h.state = sourceUp
	return h
}

func mustSubscribe(t *testing.T, h *hub, user int64) *stream {
	t.Helper()
	st, ref := h.subscribe(user)
	if ref != nil {
		t.Fatalf("subscribe(%d) refused: %d %s", user, ref.status, ref.details)
	}
	return st
}

// testFrame is a record frame that expires at expires (unix seconds).
func testFrame(id, expires int64) *frame {
	return &frame{id: id, expires: expires, data: []byte("event: record\nid: " + strconv.FormatInt(id, 10) + "\n\n")}
}

// wire is what a stream's handler would write from what is queued for it:
// record ids, "ready" where the snapshot ends, "end:<reason>" if closed.
func wire(st *stream) []string {
	var out []string
	ids := func(fs []*frame) {
		for _, f := range fs {
			out = append(out, strconv.FormatInt(f.id, 10))
		}
	}
	for {
		select {
		case d, ok := <-st.ch:
			if !ok {
				return append(out, "end:"+st.reason.String())
			}
			ids(d.frames)
			if d.ready {
				out = append(out, "ready")
			}
			ids(d.after)
		default:
			return out
		}
	}
}

func TestStreamRecordsDeliveredWhileItsSnapshotIsReadAreHandedOverAfterReadyExactlyOnce(t *testing.T) {
	live := time.Now().Add(time.Hour).Unix()
	f1, f2, f3 := testFrame(1, live), testFrame(2, live), testFrame(3, live)
	for _, tc := range []struct {
		name     string
		heard    []*frame // delivered live while the snapshot is read
		snapshot []*frame // what the snapshot read returns
		want     []string
	}{
		{"a record committed after the snapshot began comes right after ready",
			[]*frame{f3}, []*frame{f1, f2}, []string{"1", "2", "ready", "3"}},
		{"a record the snapshot also saw comes once, in the snapshot",
			[]*frame{f2}, []*frame{f1, f2}, []string{"1", "2", "ready"}},
		{"records heard twice come once",
			[]*frame{f3, f3, f2}, []*frame{f1}, []string{"1", "ready", "3", "2"}},
		{"nothing heard: the snapshot and ready",
			nil, []*frame{f1}, []string{"1", "ready"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := upHub(t, 5)
			st := mustSubscribe(t, h, 7)
			users, snap := h.takeSnapshots()
			if !slices.Equal(users, []int64{7}) || len(snap) != 1 {
				t.Fatalf("takeSnapshots = %v, %d streams", users, len(snap))
			}
			// The source decodes (or hears) live records while the
			// snapshot read runs on another connection.
			for _, f := range tc.heard {
				h.deliver(nil, map[int64][]*frame{7: {f}})
			}
			if got := wire(st); len(got) != 0 {
				t.Fatalf("a stream got %v before its snapshot", got)
			}
			h.deliver(snap, map[int64][]*frame{7: tc.snapshot})
			if got := wire(st); !slices.Equal(got, tc.want) {
				t.Fatalf("wire %v, want %v", got, tc.want)
			}
			// Heard again later (a resync): nothing new.
			h.deliver(nil, map[int64][]*frame{7: append(tc.heard, tc.snapshot...)})
			if got := wire(st); len(got) != 0 {
				t.Fatalf("sent again: %v", got)
			}
		})
	}
}

func TestAStreamWhoseSnapshotTakesTooLongIsEndedRatherThanHoldingMemory(t *testing.T) {
	h := upHub(t, 5)
	st := mustSubscribe(t, h, 7)
	h.takeSnapshots()
	live := time.Now().Add(time.Hour).Unix()
	for id := range int64(maxHeld + 1) {
		h.deliver(nil, map[int64][]*frame{7: {testFrame(id+1, live)}})
	}
	if got := wire(st); !slices.Equal(got, []string{"end:unavailable"}) {
		t.Fatalf("wire %v, want the stream ended as unavailable", got)
	}
	if h.openStreams() != 0 {
		t.Error("the ended stream still holds its place")
	}
}

// The database's now() decides what a resync returns; the service's clock
// may be minutes off. Here the database is two minutes behind: a record
// that expired 90 s ago by the service's clock is live to the database,
// and the resync after a reconnect returns it again.
func TestStreamNeverGetsASentRecordAgainWhenTheServiceClockIsAheadOfTheDatabases(t *testing.T) {
	h := upHub(t, 5)
	st := mustSubscribe(t, h, 7)
	_, snap := h.takeSnapshots()
	h.deliver(snap, nil)
	liveToTheDatabase := testFrame(1, time.Now().Add(-90*time.Second).Unix())
	h.deliver(nil, map[int64][]*frame{7: {liveToTheDatabase}})
	h.deliver(nil, map[int64][]*frame{7: {testFrame(2, time.Now().Add(time.Hour).Unix())}})
	h.requestResync()
	users, snap := h.takeSnapshots()
	if !slices.Equal(users, []int64{7}) {
		t.Fatalf("resync covers %v", users)
	}
	h.deliver(snap, map[int64][]*frame{7: {liveToTheDatabase}})
	if got := wire(st); !slices.Equal(got, []string{"ready", "1", "2"}) {
		t.Fatalf("wire %v, want record 1 once", got)
	}
}

func TestStreamSentIdsAreForgottenOnlyPastTheCapEarliestExpiryFirst(t *testing.T) {
	var s sentSet
	base := time.Now().Unix()
	for id := range int64(sentCap + 1) {
		s.unsent([]*frame{testFrame(id, base+id)})
	}
	if len(s) > sentCap {
		t.Fatalf("%d ids kept, cap %d", len(s), sentCap)
	}
	if _, kept := s[sentCap]; !kept {
		t.Error("the id that expires last was forgotten")
	}
	if _, kept := s[0]; kept {
		t.Error("the id that expires first was kept")
	}
	for id := range s {
		if id < int64(sentCap+1)/2 {
			t.Fatalf("id %d forgotten out of order", id)
		}
	}
}

func TestANewStreamOverThePerUserLimitReplacesTheOldest(t *testing.T) {
	h := upHub(t, 2)
	first := mustSubscribe(t, h, 7)
	second := mustSubscribe(t, h, 7)
	other := mustSubscribe(t, h, 8)
	third := mustSubscribe(t, h, 7)
	if got := wire(first); !slices.Equal(got, []string{"end:replaced"}) {
		t.Fatalf("the oldest stream: %v, want end:replaced", got)
	}
	for name, st := range map[string]*stream{"second": second, "third": third, "another user's": other} {
		if st.gone {
			t.Errorf("the %s stream was ended", name)
		}
	}
	fourth := mustSubscribe(t, h, 7)
	if got := wire(second); !slices.Equal(got, []string{"end:replaced"}) {
		t.Fatalf("the next oldest: %v, want end:replaced", got)
	}
	if n := len(h.users[7]); n != 2 || h.users[7][0] != third || h.users[7][1] != fourth {
		t.Errorf("user 7 has %d streams, want third then fourth", n)
	}
	if h.openStreams() != 3 {
		t.Errorf("%d open, want 3", h.openStreams())
	}
}

func TestStreamReplacementFreesAPlaceUnderStreamsMaxToo(t *testing.T) {
	h := newHub(hubConfig{perUser: 1, maxStreams: 2}, discardLogger())
	h.state = sourceUp
	mustSubscribe(t, h, 7)
	mustSubscribe(t, h, 8)
	if _, ref := h.subscribe(9); ref == nil || ref.status != 503 {
		t.Fatalf("a third user over STREAMS_MAX: %v, want 503", ref)
	}
	mustSubscribe(t, h, 7) // replaces user 7's stream: one out, one in
}
