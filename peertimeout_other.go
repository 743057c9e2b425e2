//go:build !linux

package main

import (
	"errors"
	"net"
	"time"
)

// setPeerTimeout: TCP_USER_TIMEOUT is Linux's; elsewhere the listener's
// keepalive alone cuts a vanished peer.
func setPeerTimeout(*net.TCPConn, time.Duration) error {
	return errors.New("TCP_USER_TIMEOUT is not supported on this system")
}
