package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawStream is a stream opened over a bare TCP connection that the test
// reads only when it chooses to: a suspended phone, as the server sees it.
type rawStream struct {
	conn net.Conn
	br   *bufio.Reader
}

// openRawStream sends the GET and reads up to ready, then stops reading.
func openRawStream(t *testing.T, base, token string) *rawStream {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	// A small receive window, so what the server writes next backs up.
	_ = conn.(*net.TCPConn).SetReadBuffer(2048)
	fmt.Fprintf(conn, "GET /3ds/my-records/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", token)
	rs := &rawStream{conn: conn, br: bufio.NewReader(conn)}
	if got := rs.until(t, "event: ready\n"); !strings.HasPrefix(got, "HTTP/1.1 200 ") {
		t.Fatalf("the stream did not start: %q", got)
	}
	return rs
}

// until reads up to and including want, with a bound.
func (rs *rawStream) until(t *testing.T, want string) string {
	t.Helper()
	_ = rs.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	var b strings.Builder
	for !strings.HasSuffix(b.String(), want) {
		line, err := rs.br.ReadString('\n')
		b.WriteString(line)
		if err != nil {
			t.Fatalf("reading up to %q: %v after %q", want, err, b.String())
		}
	}
	return b.String()
}

// With STREAMS_PER_USER=5, five streams whose clients stopped reading (a
// suspended app, a phone that changed networks) hold the user's places; the
// sixth connection, the phone now in use, still gets its stream, and so
// does the next one. The oldest find `replaced` when they read again.
func TestFiveStreamsThatStopReadingNeverKeepTheSixthOut(t *testing.T) {
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.perUser = 5 }})
	token := svc.tokenFor(t, 1001)
	var stopped []*rawStream
	for range 5 {
		stopped = append(stopped, openRawStream(t, svc.URL, token))
	}
	insertRows(t, svc.pool, liveRow(101, 1001), liveRow(102, 1001))
	waitFor(t, 10*time.Second, "the records to be written to the stopped clients", func() bool {
		return svc.hub.events[eventRecord].Load() == 10
	})
	for i := range 2 {
		s, snapshot := mustOpenStream(t, svc.URL, token)
		if len(snapshot) != 2+i {
			t.Errorf("connection %d: snapshot of %d records, want %d", 6+i, len(snapshot), 2+i)
		}
		id := insertNow(t, svc.pool, 1001)
		if got := s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 }); got[0] != id {
			t.Errorf("connection %d got %v, want the new record %d", 6+i, got, id)
		}
		if n := svc.hub.openStreams(); n != 5 {
			t.Errorf("%d streams open for one user, want STREAMS_PER_USER (5)", n)
		}
	}
	for i, s := range stopped[:2] {
		if got := s.until(t, `data: {"reason":"replaced"}`+"\n"); strings.Count(got, "event: end") != 1 || !strings.Contains(got, "id: 102\n") {
			t.Errorf("stopped client %d read %q", i+1, got)
		}
	}
}

func TestHeadOnTheEventsRouteIs405AllowingGetWithOrWithoutAToken(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	for _, tc := range []struct{ name, token string }{
		{"with a valid token", svc.tokenFor(t, 1001)},
		{"without a token", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := svc.do(t, http.MethodHead, "/3ds/my-records/events", tc.token)
			if resp.StatusCode != 405 || resp.Header.Get("Allow") != "GET" || resp.Header.Get("Content-Type") != "application/json" || len(body) != 0 {
				t.Fatalf("HEAD: %d Allow %q Content-Type %q body %q", resp.StatusCode, resp.Header.Get("Allow"), resp.Header.Get("Content-Type"), body)
			}
		})
	}
	// The same answer as a GET's JSON error, as any other 405.
	resp, body := svc.do(t, http.MethodPost, "/3ds/my-records/events", svc.tokenFor(t, 1001))
	if resp.StatusCode != 405 || resp.Header.Get("Allow") != "GET" {
		t.Fatalf("POST: %d Allow %q", resp.StatusCode, resp.Header.Get("Allow"))
	}
	assertErrorBody(t, resp.Header, body)
	if svc.hub.openStreams() != 0 {
		t.Error("a refused method left a stream open")
	}
}

// Clients built to the EventSource standard send Last-Event-ID when they
// reconnect; the service ignores it and sends the live snapshot again, and
// the client shows each id once.
func TestAReconnectWithLastEventIDGetsTheLiveSnapshotAgain(t *testing.T) {
	svc := newStreamService(t, streamOptions{})
	insertRows(t, svc.pool, liveRow(1, 1001), liveRow(2, 1001))
	token := svc.tokenFor(t, 1001)
	first, snapshot := mustOpenStream(t, svc.URL, token)
	if len(snapshot) != 2 {
		t.Fatalf("first snapshot %v", snapshot)
	}
	first.close()
	for _, last := range []string{"2", "1", "not-a-number", ""} {
		s := openStream(t, svc.URL, "/3ds/my-records/events", token, "Last-Event-ID", last)
		if s.resp.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(s.resp.Body)
			t.Fatalf("Last-Event-ID %q: status %d %s", last, s.resp.StatusCode, body)
		}
		again := s.untilReady(t)
		if len(again) != 2 || eventID(t, again[0]) != 1 || eventID(t, again[1]) != 2 {
			t.Errorf("Last-Event-ID %q: snapshot %v, want records 1 and 2 again", last, again)
		}
		s.close()
	}
}

// The listener serve() uses: every accepted connection carries the peer
// timeout (TCP_USER_TIMEOUT) and keepalive, read back from the socket.
func TestAcceptedConnectionsCarryThePeerTimeoutThatEndsVanishedStreams(t *testing.T) {
	ln, err := listenTCP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fd := sockopts(t, c.(*net.TCPConn))
	if got := time.Duration(fd(syscall.IPPROTO_TCP, tcpUserTimeout)) * time.Millisecond; got != peerTimeout {
		t.Errorf("TCP_USER_TIMEOUT %s, want %s", got, peerTimeout)
	}
	if fd(syscall.SOL_SOCKET, syscall.SO_KEEPALIVE) != 1 {
		t.Error("keepalive is off")
	}
	if got := time.Duration(fd(syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)) * time.Second; got != keepAliveIdle {
		t.Errorf("TCP_KEEPIDLE %s, want %s", got, keepAliveIdle)
	}
	// The bound the contract sets: an idle peer is probed after
	// keepAliveIdle and cut peerTimeout after it last answered.
	if keepAliveIdle+peerTimeout > 60*time.Second {
		t.Errorf("a vanished peer may hold its places %s, over the contract's 60s", keepAliveIdle+peerTimeout)
	}
}

// sockopts reads integer socket options of c.
func sockopts(t *testing.T, c *net.TCPConn) func(level, opt int) int {
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return func(level, opt int) int {
		var v int
		var gerr error
		if err := raw.Control(func(fd uintptr) { v, gerr = syscall.GetsockoptInt(int(fd), level, opt) }); err != nil || gerr != nil {
			t.Fatalf("getsockopt(%d, %d): %v %v", level, opt, err, gerr)
		}
		return v
	}
}

// A peer that vanishes: the client's socket gets a filter that drops every
// packet it receives, so the server's pings go unacknowledged, as they do
// to a phone that left the network. The stream's places are freed within
// the contract's 60 s (about peerTimeout), through serve's listener.
func TestAStreamWhosePeerVanishedIsClosedWithin60sAndFreesItsPlaces(t *testing.T) {
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.heartbeat = time.Second }})
	// The same handler behind the listener serve() uses.
	ln, err := listenTCP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(svc.srv)
	ts.Listener.Close()
	ts.Listener = ln
	ts.Start()
	t.Cleanup(ts.Close)

	s := openRawStream(t, ts.URL, svc.tokenFor(t, 1001))
	if svc.hub.openStreams() != 1 {
		t.Fatalf("%d open streams", svc.hub.openStreams())
	}
	raw, err := s.conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ferr error
	dropAll := []syscall.SockFilter{{Code: syscall.BPF_RET | syscall.BPF_K, K: 0}}
	if err := raw.Control(func(fd uintptr) { ferr = syscall.AttachLsf(int(fd), dropAll) }); err != nil || ferr != nil {
		t.Fatalf("attach the filter: %v %v", err, ferr)
	}
	vanished := time.Now()
	waitFor(t, 60*time.Second, "the vanished peer's stream to be closed", func() bool { return svc.hub.openStreams() == 0 })
	took := time.Since(vanished)
	t.Logf("closed %s after the peer vanished", took.Round(100*time.Millisecond))
	if took < peerTimeout/2 {
		t.Errorf("closed after %s: not by the peer timeout (%s)", took, peerTimeout)
	}
}
