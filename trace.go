package main

import (
	"context"
	"log/slog"
)

// traceID is the trace id of a W3C Trace Context traceparent header
// (https://www.w3.org/TR/trace-context/#traceparent-header), or "" when
// there is none or it is not valid: a malformed header is ignored, as the
// standard asks, and never logged. values is every traceparent field of the
// request; more than one is not a valid traceparent.
//
// The id is a substring of the header: no allocation on the request path.
func traceID(values []string) string {
	if len(values) != 1 {
		return ""
	}
	v := values[0]
	// version "-" trace-id "-" parent-id "-" trace-flags: 2+1+32+1+16+1+2.
	const size = 55
	if len(v) < size || v[2] != '-' || v[35] != '-' || v[52] != '-' {
		return ""
	}
	version := v[0:2]
	if !lowerHex(version) || version == "ff" {
		return ""
	}
	// Version 00 is exactly its four fields. A later version may append
	// fields after a dash; its first four are read as version 00's.
	if version == "00" && len(v) != size || len(v) > size && v[size] != '-' {
		return ""
	}
	trace, parent, flags := v[3:35], v[36:52], v[53:55]
	if !lowerHex(trace) || !lowerHex(parent) || !lowerHex(flags) || allZero(trace) || allZero(parent) {
		return ""
	}
	return trace
}

// lowerHex reports whether s is only 0-9 and a-f: the standard's HEXDIGLC
// (an upper-case digit makes the header invalid).
func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func allZero(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '0' {
			return false
		}
	}
	return true
}

// traceLogHandler adds the request's trace_id to every record logged with a
// request's context (logger.LogAttrs(r.Context(), ...)), so an error line
// and its access line carry the same trace id.
type traceLogHandler struct{ slog.Handler }

func (h traceLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if info, ok := ctx.Value(infoKey{}).(*requestInfo); ok && info.traceID != "" {
		r = r.Clone()
		r.AddAttrs(slog.String("trace_id", info.traceID))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceLogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return traceLogHandler{h.Handler.WithAttrs(attrs)}
}

func (h traceLogHandler) WithGroup(name string) slog.Handler {
	return traceLogHandler{h.Handler.WithGroup(name)}
}

// withTraceIDs is logger with traceLogHandler around its handler.
func withTraceIDs(logger *slog.Logger) *slog.Logger {
	if _, ok := logger.Handler().(traceLogHandler); ok {
		return logger
	}
	return slog.New(traceLogHandler{logger.Handler()})
}
