//go:build !linux

package main

import "net"

// withRxStamps: kernel receive stamps are Linux's here; elsewhere an
// event's arrival is when the client read it.
func withRxStamps(conn net.Conn) stampedConn { return &nowStampConn{Conn: conn} }
