package main

// What an SRE reads off the service: metrics that keep streams out of the
// request latency, routes on every answer, and trace ids in the log.

import (
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// timedClient sends requests and adds up how long each took as the client
// saw it: the server's own timing of a request can only be shorter.
type timedClient struct {
	t     testing.TB
	base  string
	total time.Duration
}

func (c *timedClient) do(method, target, token string, header ...string) (*http.Response, []byte) {
	c.t.Helper()
	req := newTestRequest(c.t, c.t.Context(), method, c.base+target, token, header...)
	start := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	c.total += time.Since(start)
	if err != nil {
		c.t.Fatal(err)
	}
	return resp, body
}

func (c *timedClient) scrape() scrape {
	c.t.Helper()
	resp, body := c.do(http.MethodGet, "/metrics", "")
	if resp.StatusCode != http.StatusOK {
		c.t.Fatalf("/metrics: %d", resp.StatusCode)
	}
	return parseExposition(c.t, string(body))
}

// sumAll adds the samples named name over every label set.
func (s scrape) sumAll(name string) float64 {
	var v float64
	for _, m := range s.samples {
		if m.name == name {
			v += m.value
		}
	}
	return v
}

func TestAFiveSecondStreamStaysOutOfTheRequestHistogramAndIsCountedWhenItStarts(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	client := &timedClient{t: t, base: svc.URL}
	token := svc.tokenFor(t, 1001)

	stream, _ := mustOpenStream(t, svc.URL, token)
	opened := client.scrape()
	// Counted at its 200, while it is still open: not an hour later.
	if got := opened.value(t, "threeds_http_requests_total", "route", "GET /3ds/my-records/events", "code", "200"); got != 1 {
		t.Errorf("requests_total for the open stream = %v, want 1 while it is open", got)
	}
	if got, ok := opened.find("threeds_streams_opened_total"); !ok || got.value != 1 {
		t.Errorf("threeds_streams_opened_total = %v (present %v), want 1", got.value, ok)
	}
	for range 3 {
		if resp, body := client.do(http.MethodGet, "/3ds/my-records", token); resp.StatusCode != http.StatusOK {
			t.Fatalf("list: %d %s", resp.StatusCode, body)
		}
	}
	time.Sleep(5 * time.Second)
	stream.close()
	var after scrape
	waitFor(t, 10*time.Second, "the stream's end to be timed", func() bool {
		after = client.scrape()
		m, ok := after.find("threeds_stream_duration_seconds_count")
		return ok && m.value == 1
	})

	// Every request the service timed was one this client sent and timed
	// from outside; the stream's five seconds are not among them.
	sum := after.sumAll("threeds_http_request_duration_seconds_sum")
	if sum <= 0 || sum > client.total.Seconds() {
		t.Errorf("request-duration sum over all routes = %.6fs, want > 0 and <= %.6fs (the API requests alone, as their client timed them)", sum, client.total.Seconds())
	}
	if n, all := after.sumAll("threeds_http_request_duration_seconds_count"), after.sumAll("threeds_http_requests_total"); n != all-1 {
		t.Errorf("request-duration count %v, want requests_total %v less the one stream", n, all)
	}
	if d := after.value(t, "threeds_stream_duration_seconds_sum"); d < 5 || d > 60 {
		t.Errorf("threeds_stream_duration_seconds_sum = %v, want the stream's ~5s", d)
	}
	if got := after.value(t, "threeds_http_requests_total", "route", "GET /3ds/my-records/events", "code", "200"); got != 1 {
		t.Errorf("requests_total for the ended stream = %v, want still 1 (not counted again at its end)", got)
	}
	if after.types["threeds_stream_duration_seconds"] != "histogram" || after.types["threeds_streams_opened_total"] != "counter" {
		t.Errorf("types: stream duration %q, streams opened %q", after.types["threeds_stream_duration_seconds"], after.types["threeds_streams_opened_total"])
	}
	if le := after.value(t, "threeds_stream_duration_seconds_bucket", "le", "3600"); le != 1 {
		t.Errorf("stream duration le=3600 bucket = %v, want 1 (buckets sized for minutes to hours)", le)
	}
}

func TestDurationSumsDoNotWrap(t *testing.T) {
	svc := newTestService(t)
	// Two observations of the longest time.Duration: an int64 sum of
	// nanoseconds wraps to a negative number here, as it would after ten
	// days of 10,000 hour-long streams.
	longest := time.Duration(math.MaxInt64)
	svc.srv.metrics.observe("GET /long", 200, longest)
	svc.srv.metrics.observe("GET /long", 200, longest)
	_, body := svc.do(t, http.MethodGet, "/metrics", "")
	got := parseExposition(t, string(body)).value(t, "threeds_http_request_duration_seconds_sum", "route", "GET /long")
	if want := 2 * longest.Seconds(); math.Abs(got-want) > want*1e-9 {
		t.Errorf("_sum = %v, want %v", got, want)
	}
}

func TestA405IsLabelledWithItsRoute(t *testing.T) {
	var out syncBuffer
	logger, buf := newBufferedLogger(&out, slog.LevelInfo)
	store, _ := newTestStore(t)
	key := newTestKey(t, jwa.ES256, "svc", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	ts := httptest.NewServer(newServer(store, v, nil, logger))
	t.Cleanup(ts.Close)
	svc := &testService{Server: ts, key: key}

	for _, tc := range []struct {
		name, method, path, route string
		status                    int
	}{
		{"a POST on the list is a 405 of its route", http.MethodPost, "/3ds/my-records", "/3ds/my-records", 405},
		{"a DELETE on the stream is a 405 of its route", http.MethodDelete, "/3ds/my-records/events", "/3ds/my-records/events", 405},
		{"a PUT on the probe is a 405 of its route", http.MethodPut, "/readyz", "/readyz", 405},
		{"an unknown path stays unmatched", http.MethodGet, "/nope", "unmatched", 404},
		{"a wrong method on an unknown path stays unmatched", http.MethodPost, "/nope", "unmatched", 404},
		{"an unclean spelling of a route stays unmatched", http.MethodGet, "/3ds//my-records", "unmatched", 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "r405-" + strings.ReplaceAll(tc.name, " ", "-")
			resp, body := svc.do(t, tc.method, tc.path, "", "X-Request-ID", id)
			if resp.StatusCode != tc.status {
				t.Fatalf("%s %s: %d %s", tc.method, tc.path, resp.StatusCode, body)
			}
			buf.Flush()
			line, ok := accessLine(t, &out, id)
			if !ok || line["route"] != tc.route {
				t.Errorf("access line route = %v (found %v), want %q", line["route"], ok, tc.route)
			}
		})
	}
	_, body := svc.do(t, http.MethodGet, "/metrics", "")
	m := parseExposition(t, string(body))
	for route, want := range map[string]float64{"/3ds/my-records": 1, "/3ds/my-records/events": 1, "/readyz": 1} {
		if got, _ := m.find("threeds_http_requests_total", "route", route, "code", "405"); got.value != want {
			t.Errorf("requests_total{route=%q,code=405} = %v, want %v", route, got.value, want)
		}
	}
	if got := m.value(t, "threeds_http_requests_total", "route", "unmatched", "code", "404"); got != 3 {
		t.Errorf("requests_total{route=unmatched,code=404} = %v, want 3", got)
	}
}

const validTraceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

func TestATraceparentsTraceIDIsLoggedAndAMalformedOneIgnored(t *testing.T) {
	var out syncBuffer
	logger, buf := newBufferedLogger(&out, slog.LevelInfo)
	// A pool aimed at a port where nothing listens: the page is a 500 with
	// its error line, which must carry the trace id too.
	pool := newTestPool(t, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=1", nil)
	key := newTestKey(t, jwa.ES256, "svc", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	ts := httptest.NewServer(newServer(NewStore(pool, time.Second), v, nil, logger))
	t.Cleanup(ts.Close)
	svc := &testService{Server: ts, key: key}
	token := svc.tokenFor(t, 1001)

	const trace = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, tc := range []struct {
		name        string
		traceparent []string
		want        string // the trace_id logged; "" for none
	}{
		{"a version 00 header is logged", []string{validTraceparent}, trace},
		{"an unsampled one is logged too", []string{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}, trace},
		{"a later version with more fields is read as 00", []string{"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next"}, trace},
		{"a later version of exactly the size of 00 is read", []string{"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09"}, trace},
		{"upper-case hex is ignored", []string{"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"}, ""},
		{"an all-zero trace id is ignored", []string{"00-00000000000000000000000000000000-00f067aa0ba902b7-01"}, ""},
		{"an all-zero parent id is ignored", []string{"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"}, ""},
		{"version ff is ignored", []string{"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, ""},
		{"version 00 with a trailing field is ignored", []string{validTraceparent + "-00"}, ""},
		{"a later version glued to more text is ignored", []string{"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"}, ""},
		{"a short trace id is ignored", []string{"00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01"}, ""},
		{"non-hex flags are ignored", []string{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g"}, ""},
		{"a non-hex version is ignored", []string{"0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, ""},
		{"two traceparent headers are ignored", []string{validTraceparent, validTraceparent}, ""},
		{"an injection attempt is ignored", []string{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\",\"level\":\"ERROR"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "tp-" + strings.ReplaceAll(tc.name, " ", "-")
			req := newTestRequest(t, t.Context(), http.MethodGet, ts.URL+"/healthz", "", "X-Request-ID", id)
			req.Header["Traceparent"] = tc.traceparent
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			_ = resp.Body.Close()
			buf.Flush()
			line, ok := accessLine(t, &out, id)
			if !ok {
				t.Fatalf("no access line for %s", id)
			}
			got, has := line["trace_id"]
			if tc.want == "" && has || tc.want != "" && got != tc.want {
				t.Errorf("trace_id = %v (present %v), want %q", got, has, tc.want)
			}
			if tc.want == "" && strings.Contains(out.String(), tc.traceparent[0]) {
				t.Errorf("the ignored header %q was logged", tc.traceparent[0])
			}
		})
	}

	t.Run("an error line of the request carries its trace id", func(t *testing.T) {
		resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", token, "X-Request-ID", "tp-500", "Traceparent", validTraceparent)
		if resp.StatusCode != http.StatusInternalServerError {
			t.Fatalf("status %d, want 500: %s", resp.StatusCode, body)
		}
		buf.Flush()
		var found int
		for _, l := range out.logLines(t) {
			if l["request_id"] != "tp-500" {
				continue
			}
			found++
			if l["trace_id"] != trace {
				t.Errorf("%q line has trace_id %v, want %s", l["msg"], l["trace_id"], trace)
			}
		}
		if found != 2 {
			t.Errorf("%d lines for the request, want 2 (the error line and the access line)", found)
		}
	})
	if strings.Contains(out.String(), validTraceparent) {
		t.Error("the traceparent header itself was logged")
	}
}
