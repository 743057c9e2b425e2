package main

import (
	"io"
	"net"
	"syscall"
	"time"
	"unsafe"
)

// rxStampConn reads a TCP connection with recvmsg and keeps the kernel's
// receive time of the newest bytes read (SO_TIMESTAMPNS). An event's
// arrival is then when it reached this host, not when the load generator,
// niced and busy with 10,000 streams, got round to parsing it: in
// production the phone is another machine, and its scheduling is not the
// service's latency. The stamp is the last segment of the newest read, so
// it is never earlier than any byte already read.
type rxStampConn struct {
	net.Conn
	raw  syscall.RawConn
	oob  []byte
	last time.Time // the newest read's stamp; zero if it carried none
}

// withRxStamps wraps conn; on any failure to enable the stamps it returns a
// reader whose stamp is the time of the read (the old measure). A zero
// stamp means the newest read carried none.
func withRxStamps(conn net.Conn) stampedConn {
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return &nowStampConn{Conn: conn}
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return &nowStampConn{Conn: conn}
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1)
	}); err != nil || serr != nil {
		return &nowStampConn{Conn: conn}
	}
	return &rxStampConn{Conn: conn, raw: raw, oob: make([]byte, syscall.CmsgSpace(int(unsafe.Sizeof(syscall.Timespec{}))))}
}

func (c *rxStampConn) Read(p []byte) (int, error) {
	var n, oobn int
	var rerr error
	// RawConn.Read waits for readability under the conn's deadline and
	// returns when the conn is closed, as conn.Read does.
	err := c.raw.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), p, c.oob, 0)
		return rerr != syscall.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, rerr
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	// Linux turns receive stamping on for the whole host a moment after
	// the first socket asks (a deferred static key): until then, and for
	// any read without one, there is no stamp and the caller uses the time
	// of the read.
	c.last = time.Time{}
	if msgs, err := syscall.ParseSocketControlMessage(c.oob[:oobn]); err == nil {
		for _, m := range msgs {
			if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == syscall.SCM_TIMESTAMPNS && len(m.Data) >= int(unsafe.Sizeof(syscall.Timespec{})) {
				ts := (*syscall.Timespec)(unsafe.Pointer(&m.Data[0]))
				c.last = time.Unix(ts.Unix())
			}
		}
	}
	return n, nil
}

func (c *rxStampConn) stamp() time.Time { return c.last }
