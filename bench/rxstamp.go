package main

import (
	"net"
	"time"
)

// stampedConn is a connection that says when the newest bytes it returned
// arrived.
type stampedConn interface {
	net.Conn
	stamp() time.Time
}

// nowStampConn stamps with the time of the read.
type nowStampConn struct {
	net.Conn
	last time.Time
}

func (c *nowStampConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.last = time.Now()
	}
	return n, err
}

func (c *nowStampConn) stamp() time.Time { return c.last }
