package main

import (
	"net"
	"syscall"
	"time"
)

// tcpUserTimeout is Linux's TCP_USER_TIMEOUT (linux/tcp.h), missing from
// package syscall: how long written data (or a keepalive probe) may stay
// unacknowledged before the kernel closes the connection.
const tcpUserTimeout = 18

// setPeerTimeout sets TCP_USER_TIMEOUT on c.
func setPeerTimeout(c *net.TCPConn, d time.Duration) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, int(d.Milliseconds()))
	})
	if err != nil {
		return err
	}
	return serr
}
