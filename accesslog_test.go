package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

func TestTheLogBufferWritesLinesOnlyWhenItMust(t *testing.T) {
	type step struct {
		write string // a line to write, or
		flush bool   // Flush, or
		close bool   // Close
	}
	tests := []struct {
		name  string
		size  int
		steps []step
		want  string
	}{
		{"a line waits in the buffer", 64, []step{{write: "a\n"}, {write: "b\n"}}, ""},
		{"a flush writes what is buffered", 64, []step{{write: "a\n"}, {write: "b\n"}, {flush: true}}, "a\nb\n"},
		{"a line that would not fit writes out the earlier ones first", 4, []step{{write: "a\n"}, {write: "b\n"}, {write: "c\n"}}, "a\nb\n"},
		{"a line longer than the buffer goes out whole, after the earlier ones", 4, []step{{write: "a\n"}, {write: "longer\n"}}, "a\nlonger\n"},
		{"close writes what is buffered", 64, []step{{write: "a\n"}, {close: true}}, "a\n"},
		{"after close a line goes straight out", 64, []step{{close: true}, {write: "late\n"}}, "late\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out syncBuffer
			b := newLogBuffer(&out, tt.size, time.Hour)
			defer b.Close()
			for _, s := range tt.steps {
				switch {
				case s.flush:
					b.Flush()
				case s.close:
					b.Close()
				default:
					if n, err := b.Write([]byte(s.write)); n != len(s.write) || err != nil {
						t.Fatalf("Write(%q) = %d, %v", s.write, n, err)
					}
				}
			}
			if got := out.String(); got != tt.want {
				t.Errorf("output %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTheLogBufferWritesALineOutByItselfAfterTheDelay(t *testing.T) {
	var out syncBuffer
	b := newLogBuffer(&out, 1<<10, 20*time.Millisecond)
	defer b.Close()
	for _, line := range []string{"first\n", "second\n"} {
		_, _ = b.Write([]byte(line))
		// The delay is 20ms; the bound only keeps a broken timer from hanging.
		waitFor(t, 5*time.Second, "the line "+strings.TrimSpace(line), func() bool { return strings.Contains(out.String(), line) })
	}
	if got := out.String(); got != "first\nsecond\n" {
		t.Errorf("output %q", got)
	}
}

func TestConcurrentLogLinesAreNeverCutOrLost(t *testing.T) {
	var out syncBuffer
	b := newLogBuffer(&out, 256, time.Millisecond)
	const writers, lines = 8, 500
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range lines {
				_, _ = fmt.Fprintf(b, "writer %d line %03d %s\n", w, i, strings.Repeat("x", i%40))
			}
		}()
	}
	wg.Wait()
	b.Close()
	want := map[string]bool{}
	for w := range writers {
		for i := range lines {
			want[fmt.Sprintf("writer %d line %03d %s", w, i, strings.Repeat("x", i%40))] = true
		}
	}
	got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(got) != len(want) {
		t.Fatalf("%d lines, want %d", len(got), len(want))
	}
	for _, l := range got {
		if !want[l] {
			t.Fatalf("a cut, mixed or repeated line: %q", l)
		}
		delete(want, l)
	}
}

func TestEveryLogLineButTheAccessLogIsWrittenAtOnceAndInOrder(t *testing.T) {
	var out syncBuffer
	logger, buf := newBufferedLogger(&out, slog.LevelInfo)
	defer buf.Close()
	access := slog.New(accessHandler(logger))

	logger.Info("listening")
	if !strings.Contains(out.String(), `"msg":"listening"`) {
		t.Fatalf("the start-up line is held back: %q", out.String())
	}
	access.Info("request", "n", 1)
	if strings.Contains(out.String(), `"msg":"request"`) {
		t.Fatalf("the access line was not buffered: %q", out.String())
	}
	logger.With("component", "store").Error("list records failed")
	var msgs []string
	for _, l := range out.logLines(t) {
		msgs = append(msgs, fmt.Sprint(l["msg"]))
	}
	if want := []string{"listening", "request", "list records failed"}; fmt.Sprint(msgs) != fmt.Sprint(want) {
		t.Errorf("lines %q, want %q: an error line writes out the access lines before it", msgs, want)
	}
}

// The access log is buffered; SIGTERM must still leave one line per request
// on stdout, the last ones included.
func TestSIGTERMLeavesEveryAccessLogLineOnStdout(t *testing.T) {
	dsn := newTestDB(t)
	seedDatabase(t, dsn)
	key := newTestKey(t, jwa.RS256, "log-buffer", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	bin := startBinary(t, serviceEnv(dsn, idp.URL))
	waitFor(t, 10*time.Second, "readiness", func() bool { return mustFetch(t, opsClient, bin.base+"/readyz", "").code == http.StatusOK })

	token := key.token(t, validClaims("1001"))
	const requests = 300
	for i := range requests {
		path, tok := "/3ds/my-records", token
		if i%3 == 0 {
			path, tok = "/healthz", ""
		}
		if a := fetch(opsClient, http.MethodGet, bin.base+path, tok, fmt.Sprintf("sigterm-%d", i)); a.err != nil || a.code != http.StatusOK {
			t.Fatalf("request %d: %d %v", i, a.code, a.err)
		}
	}
	// At once: the last lines are still in the buffer (the flush delay is
	// far from over).
	if err := bin.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-bin.exited:
		if bin.exitErr != nil {
			t.Fatalf("exit: %v", bin.exitErr)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the binary did not exit after SIGTERM")
	}
	got := map[string]int{}
	for _, l := range bin.stdout.logLines(t) {
		if l["msg"] == "request" {
			got[fmt.Sprint(l["request_id"])]++
		}
	}
	for i := range requests {
		if id := fmt.Sprintf("sigterm-%d", i); got[id] != 1 {
			t.Errorf("%d access lines for %s, want 1", got[id], id)
		}
	}
}

// Without a signal, a request's line reaches stdout by itself.
func TestAnAccessLogLineReachesStdoutWithoutShutdown(t *testing.T) {
	dsn := newTestDB(t)
	key := newTestKey(t, jwa.RS256, "log-buffer", 0)
	idp := newJWKSServer(t, key.publicJWK(t, false))
	bin := startBinary(t, serviceEnv(dsn, idp.URL))
	if a := fetch(opsClient, http.MethodGet, bin.base+"/healthz", "", "unprompted-1"); a.err != nil || a.code != http.StatusOK {
		t.Fatalf("healthz: %d %v", a.code, a.err)
	}
	// The line is due within logFlushDelay (500ms); the bound is generous
	// for a loaded machine, and the benchmark is where timing is measured.
	waitFor(t, 5*time.Second, "the access line", func() bool {
		return bytes.Contains([]byte(bin.stdout.String()), []byte(`"request_id":"unprompted-1"`))
	})
}

// logAccess must write what Logger.LogAttrs writes, time aside.
func TestTheAccessLineIsTheSameAsLogAttrsWouldWrite(t *testing.T) {
	attrs := accessAttrsForTest()
	var viaLogger, direct syncBuffer
	noTime := &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}}
	slog.New(slog.NewJSONHandler(&viaLogger, noTime)).LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
	s := &server{access: slog.New(slog.NewJSONHandler(&direct, noTime))}
	s.logAccess(context.Background(), attrs)
	if viaLogger.String() != direct.String() || direct.String() == "" {
		t.Errorf("logAccess wrote %q, LogAttrs %q", direct.String(), viaLogger.String())
	}
	// Below the level, nothing.
	var quiet syncBuffer
	s = &server{access: slog.New(slog.NewJSONHandler(&quiet, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	s.logAccess(context.Background(), attrs)
	if quiet.String() != "" {
		t.Errorf("LOG_LEVEL=warn still wrote %q", quiet.String())
	}
}

func accessAttrsForTest() []slog.Attr {
	return []slog.Attr{
		slog.String("method", "GET"),
		slog.String("route", "GET /3ds/my-records"),
		slog.String("path", "/3ds/my-records"),
		slog.Int("status", 200),
		slog.Int64("bytes", 3552),
		slog.Float64("duration_ms", 1.234),
		slog.String("request_id", "0123456789abcdef0123456789abcdef"),
		slog.Int64("user_id", 1001),
	}
}

// BenchmarkAccessLogLine is the access-log call of every request, to a
// discarded output: through Logger.LogAttrs (before) and logAccess (after).
func BenchmarkAccessLogLine(b *testing.B) {
	attrs := accessAttrsForTest()
	ctx := context.Background()
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	b.Run("Logger.LogAttrs", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			logger.LogAttrs(ctx, slog.LevelInfo, "request", attrs...)
		}
	})
	b.Run("logAccess", func(b *testing.B) {
		s := &server{access: logger}
		b.ReportAllocs()
		for b.Loop() {
			s.logAccess(ctx, attrs)
		}
	})
	b.Run("logAccess/accessJSONHandler", func(b *testing.B) {
		s := &server{access: slog.New(accessJSONHandler{logger.Handler(), io.Discard})}
		b.ReportAllocs()
		for b.Loop() {
			s.logAccess(ctx, attrs)
		}
	})
}

// writeBoth hands r to a JSONHandler and to accessJSONHandler and returns
// both outputs, and whether the fast path took r.
func writeBoth(t testing.TB, r slog.Record) (want, got string, fast bool) {
	t.Helper()
	var viaJSON, viaFast bytes.Buffer
	if err := slog.NewJSONHandler(&viaJSON, nil).Handle(context.Background(), r.Clone()); err != nil {
		t.Fatal(err)
	}
	h := accessJSONHandler{slog.NewJSONHandler(&viaFast, nil), &viaFast}
	if err := h.Handle(context.Background(), r.Clone()); err != nil {
		t.Fatal(err)
	}
	_, fast = appendPlainRecord(nil, r.Clone())
	return viaJSON.String(), viaFast.String(), fast
}

func TestTheFastPathWritesWhatJSONHandlerWrites(t *testing.T) {
	at := time.Date(2026, 12, 1, 1, 12, 20, 123456789, time.UTC)
	tests := []struct {
		name     string
		time     time.Time
		level    slog.Level
		msg      string
		attrs    []slog.Attr
		wantFast bool
	}{
		{"the access line of a page", at, slog.LevelInfo, "request", accessAttrsForTest(), true},
		{"a refused token", at, slog.LevelInfo, "request", []slog.Attr{slog.Int("status", 401), slog.String("auth_reject", "expired"), slog.Float64("duration_ms", 0)}, true},
		{"a local time zone and no fraction", time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("X", -(5*3600+30*60))), slog.LevelInfo, "request", nil, true},
		{"other levels", at, slog.LevelWarn + 2, "request", []slog.Attr{slog.Bool("b", true), slog.Uint64("u", 1<<63)}, true},
		{"small, large, negative and zero floats", at, slog.LevelInfo, "m", []slog.Attr{slog.Float64("a", 0.000001), slog.Float64("b", 9.99e20), slog.Float64("c", -12.5), slog.Float64("d", math.Copysign(0, -1)), slog.Float64("e", 1234.567)}, true},
		{"a float JSON writes with an exponent", at, slog.LevelInfo, "m", []slog.Attr{slog.Float64("d", 1e-7)}, false},
		{"a huge float", at, slog.LevelInfo, "m", []slog.Attr{slog.Float64("d", 1e21)}, false},
		{"NaN", at, slog.LevelInfo, "m", []slog.Attr{slog.Float64("d", math.NaN())}, false},
		{"infinity", at, slog.LevelInfo, "m", []slog.Attr{slog.Float64("d", math.Inf(-1))}, false},
		{"a path with a quote", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", `/a"b`)}, false},
		{"a path with a backslash", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", `/a\b`)}, false},
		{"a path with a control byte", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", "/a\x01b")}, false},
		{"a path with invalid UTF-8", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", "/a\xffb")}, false},
		{"a path with U+2028", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", "/a\u2028b")}, false},
		{"HTML characters", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", "/<a>&b")}, true},
		{"DEL", at, slog.LevelInfo, "request", []slog.Attr{slog.String("path", "/a\x7fb")}, false},
		{"a key that needs escaping", at, slog.LevelInfo, "m", []slog.Attr{slog.Int("a\"b", 1)}, false},
		{"an empty key", at, slog.LevelInfo, "m", []slog.Attr{slog.Int("", 1)}, false},
		{"an empty attribute", at, slog.LevelInfo, "m", []slog.Attr{{}}, false},
		{"a message that needs escaping", at, slog.LevelInfo, "line\nbreak", nil, false},
		{"a duration", at, slog.LevelInfo, "m", []slog.Attr{slog.Duration("d", time.Second)}, false},
		{"a time", at, slog.LevelInfo, "m", []slog.Attr{slog.Time("t", at)}, false},
		{"a group", at, slog.LevelInfo, "m", []slog.Attr{slog.Group("g", slog.Int("a", 1))}, false},
		{"an error", at, slog.LevelInfo, "m", []slog.Attr{slog.Any("error", fmt.Errorf("x"))}, false},
		{"no time", time.Time{}, slog.LevelInfo, "m", nil, false},
		{"a year past 9999", time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), slog.LevelInfo, "m", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := slog.NewRecord(tt.time, tt.level, tt.msg, 0)
			r.AddAttrs(tt.attrs...)
			want, got, fast := writeBoth(t, r)
			if got != want {
				t.Errorf("fast path wrote\n%s\nJSONHandler\n%s", got, want)
			}
			if fast != tt.wantFast {
				t.Errorf("fast path taken: %v, want %v", fast, tt.wantFast)
			}
		})
	}
}

func TestTheFastPathMatchesJSONHandlerOnRandomRecords(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []string{"a", "Z", "0", "/", " ", "<", "&", "\"", "\\", "\n", "\x00", "\x7f", "\xff", "é", "\u2028", "%", "~"}
	randString := func() string {
		var b strings.Builder
		for range rng.IntN(12) {
			b.WriteString(alphabet[rng.IntN(len(alphabet))])
		}
		return b.String()
	}
	for i := range 3000 {
		r := slog.NewRecord(time.Unix(rng.Int64N(1<<34), rng.Int64N(1e9)), slog.Level(rng.IntN(16)-4), randString(), 0)
		for range rng.IntN(10) {
			key := randString()
			switch rng.IntN(5) {
			case 0:
				r.AddAttrs(slog.String(key, randString()))
			case 1:
				r.AddAttrs(slog.Int64(key, rng.Int64()-rng.Int64()))
			case 2:
				r.AddAttrs(slog.Float64(key, math.Float64frombits(rng.Uint64())))
			case 3:
				r.AddAttrs(slog.Float64(key, float64(rng.IntN(1e7))/1000))
			default:
				r.AddAttrs(slog.Bool(key, rng.IntN(2) == 0))
			}
		}
		if want, got, _ := writeBoth(t, r); got != want {
			t.Fatalf("record %d: fast path wrote\n%s\nJSONHandler\n%s", i, got, want)
		}
	}
}

func FuzzTheFastPathMatchesJSONHandler(f *testing.F) {
	f.Add("path", "/3ds/my-records", 1.234, int64(200))
	f.Add("p\"", "\xff", 1e-7, int64(-1))
	f.Fuzz(func(t *testing.T, key, value string, fl float64, n int64) {
		r := slog.NewRecord(time.Unix(n%(1<<34), 0), slog.LevelInfo, value, 0)
		r.AddAttrs(slog.String(key, value), slog.Float64(key, fl), slog.Int64(key, n))
		if want, got, _ := writeBoth(t, r); got != want {
			t.Fatalf("fast path wrote\n%s\nJSONHandler\n%s", got, want)
		}
	})
}
