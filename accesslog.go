package main

import (
	"context"
	"io"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"
)

// The access log is one line per request, and writing each line to stdout
// on its own is a system call per request: on a pipe to the container
// runtime it also wakes the reader, and it costs more than anything else the
// service adds to a request. Like nginx's `access_log ... buffer= flush=`,
// the lines are collected in a buffer and written in batches:
//   - at most logFlushDelay after the first line of a batch (a line is out
//     within a second of its request, even on an idle service);
//   - when the next line would not fit in logBufferSize;
//   - at once for every other log line (start-up, warnings, errors: see
//     flushingHandler), so nothing an operator waits for is held back and
//     the order of lines is kept;
//   - on shutdown: run closes the buffer after the HTTP server has drained,
//     so no line is lost on SIGTERM.
//
// A process that is killed (SIGKILL, a crash) loses at most the last
// logFlushDelay of access lines.
const (
	logBufferSize = 64 << 10 // a Linux pipe's default capacity: one flush fits an empty pipe
	logFlushDelay = 500 * time.Millisecond
)

// logBuffer is an io.Writer that holds whole lines (slog writes one line per
// call) and writes them out in batches. It is safe for concurrent use.
type logBuffer struct {
	mu     sync.Mutex
	out    io.Writer
	buf    []byte
	size   int
	delay  time.Duration
	timer  *time.Timer
	armed  bool // the timer will flush what is buffered
	closed bool // after Close, every write goes straight out
}

func newLogBuffer(out io.Writer, size int, delay time.Duration) *logBuffer {
	b := &logBuffer{out: out, buf: make([]byte, 0, size), size: size, delay: delay}
	b.timer = time.AfterFunc(time.Hour, b.Flush)
	b.timer.Stop()
	return b
}

// Write buffers p, one log line. An error writing an earlier batch is
// reported here, as it would have been without the buffer.
func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var err error
	if len(b.buf)+len(p) > b.size {
		err = b.flushLocked()
	}
	if b.closed || len(p) > b.size {
		if _, werr := b.out.Write(p); werr != nil {
			err = werr
		}
		return len(p), err
	}
	b.buf = append(b.buf, p...)
	if !b.armed {
		b.armed = true
		b.timer.Reset(b.delay)
	}
	return len(p), err
}

// Flush writes out whatever is buffered.
func (b *logBuffer) Flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	_ = b.flushLocked()
}

func (b *logBuffer) flushLocked() error {
	b.armed = false
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.out.Write(b.buf)
	b.buf = b.buf[:0]
	return err
}

// Close flushes and stops buffering: a line written afterwards (a handler
// still running after a timed-out shutdown) goes straight out.
func (b *logBuffer) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.timer.Stop()
	_ = b.flushLocked()
	b.closed = true
}

// flushingHandler flushes the buffer after every record it handles: the
// service's logger uses it for everything but the access log, which goes to
// the inner handler directly (accessHandler) and so stays in the buffer.
type flushingHandler struct {
	slog.Handler
	buf *logBuffer
}

func (h flushingHandler) Handle(ctx context.Context, r slog.Record) error {
	err := h.Handler.Handle(ctx, r)
	h.buf.Flush()
	return err
}

func (h flushingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return flushingHandler{h.Handler.WithAttrs(attrs), h.buf}
}

func (h flushingHandler) WithGroup(name string) slog.Handler {
	return flushingHandler{h.Handler.WithGroup(name), h.buf}
}

// newBufferedLogger is the service's logger on out: every record is written
// through buf, and all but the access log's are flushed at once.
func newBufferedLogger(out io.Writer, level slog.Level) (*slog.Logger, *logBuffer) {
	buf := newLogBuffer(out, logBufferSize, logFlushDelay)
	h := slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: level})
	return slog.New(flushingHandler{accessJSONHandler{h, buf}, buf}), buf
}

// accessHandler is where access-log lines go: the buffered handler under a
// logger from newBufferedLogger, or the logger's own handler otherwise
// (tests hand newServer a plain logger).
func accessHandler(logger *slog.Logger) slog.Handler {
	if fh, ok := logger.Handler().(flushingHandler); ok {
		return fh.Handler
	}
	return logger.Handler()
}

// accessJSONHandler is slog.JSONHandler with a fast path for records like
// the access log's: it writes them itself, with appends, exactly as the
// JSONHandler would (TestTheFastPathWritesWhatJSONHandlerWrites compares
// them), and hands the JSONHandler anything else: a key, message or string
// value that needs escaping, a float that JSON would print with an exponent
// or not at all, any other kind of value. The JSONHandler spends most of an
// access line on generic dispatch and on encoding/json for its one float
// (duration_ms).
type accessJSONHandler struct {
	json slog.Handler // a *slog.JSONHandler writing to out, without ReplaceAttr or AddSource
	out  io.Writer
}

func (h accessJSONHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.json.Enabled(ctx, l)
}

func (h accessJSONHandler) WithAttrs(attrs []slog.Attr) slog.Handler { return h.json.WithAttrs(attrs) }
func (h accessJSONHandler) WithGroup(name string) slog.Handler       { return h.json.WithGroup(name) }

var accessLinePool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

func (h accessJSONHandler) Handle(ctx context.Context, r slog.Record) error {
	bp := accessLinePool.Get().(*[]byte)
	defer accessLinePool.Put(bp)
	b, ok := appendPlainRecord((*bp)[:0], r)
	if !ok {
		return h.json.Handle(ctx, r)
	}
	*bp = b
	_, err := h.out.Write(b)
	return err
}

// appendPlainRecord appends r as slog.JSONHandler would write it, or returns
// false if r is outside the plain case.
func appendPlainRecord(b []byte, r slog.Record) ([]byte, bool) {
	if y := r.Time.Year(); r.Time.IsZero() || y < 0 || y >= 10000 {
		return b, false
	}
	level, ok := plainJSONString(r.Level.String())
	if !ok {
		return b, false
	}
	msg, ok := plainJSONString(r.Message)
	if !ok {
		return b, false
	}
	b = append(b, `{"time":"`...)
	b = r.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","level":"`...)
	b = append(b, level...)
	b = append(b, `","msg":"`...)
	b = append(b, msg...)
	b = append(b, '"')
	r.Attrs(func(a slog.Attr) bool {
		key, keyOK := plainJSONString(a.Key)
		if !keyOK || key == "" {
			ok = false
			return false
		}
		b = append(b, `,"`...)
		b = append(b, key...)
		b = append(b, `":`...)
		v := a.Value
		switch v.Kind() {
		case slog.KindString:
			var s string
			if s, ok = plainJSONString(v.String()); ok {
				b = append(b, '"')
				b = append(b, s...)
				b = append(b, '"')
			}
		case slog.KindInt64:
			b = strconv.AppendInt(b, v.Int64(), 10)
		case slog.KindUint64:
			b = strconv.AppendUint(b, v.Uint64(), 10)
		case slog.KindBool:
			b = strconv.AppendBool(b, v.Bool())
		case slog.KindFloat64:
			// encoding/json's float format: %f between 1e-6 and 1e21, an
			// exponent outside, an error for NaN and infinities.
			f := v.Float64()
			if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21 || math.IsNaN(f)) {
				ok = false
			} else {
				b = strconv.AppendFloat(b, f, 'f', -1, 64)
			}
		default:
			ok = false
		}
		return ok
	})
	if !ok {
		return b, false
	}
	return append(b, "}\n"...), true
}

// plainJSONString returns s when it is printable ASCII without a quote or a backslash,
// which JSON and slog write as is.
func plainJSONString(s string) (string, bool) {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return "", false
		}
	}
	return s, true
}

// logAccess writes one access-log line. It hands the record to the handler
// itself: Logger.LogAttrs would first capture its caller's program counter
// (runtime.Callers) for a source location this log never prints
// (HandlerOptions.AddSource is off), a cost paid on every request for nothing.
// The line is byte for byte the same.
func (s *server) logAccess(ctx context.Context, attrs []slog.Attr) {
	h := s.access.Handler()
	if !h.Enabled(ctx, slog.LevelInfo) {
		return
	}
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "request", 0)
	r.AddAttrs(attrs...)
	_ = h.Handle(ctx, r)
}
