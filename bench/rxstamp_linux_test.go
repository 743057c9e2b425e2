package main

import (
	"io"
	"net"
	"testing"
	"time"
)

// TestAnEventReadLateIsStampedWhenItArrived: the production cases judge
// latency to the kernel's receive stamp, so a reader that gets to the bytes
// late must not make them late, and the stamp must never be earlier than the
// bytes were sent.
func TestAnEventReadLateIsStampedWhenItArrived(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	dialed, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn := withRxStamps(dialed)
	defer conn.Close()
	if _, ok := conn.(*rxStampConn); !ok {
		t.Fatalf("withRxStamps fell back to %T on a TCP connection", conn)
	}
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	defer server.Close()

	// Stamping starts a moment after the first socket asks for it
	// (rxStampConn.Read): exchange a byte until one is stamped, bounded.
	buf := make([]byte, 64)
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, err := io.WriteString(server, "."); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(buf[:1]); err != nil {
			t.Fatal(err)
		}
		if !conn.stamp().IsZero() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no read carried a receive stamp within 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}

	const late = 200 * time.Millisecond
	sent := time.Now()
	if _, err := io.WriteString(server, "event: record\n\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(late) // the reader is busy elsewhere
	n, err := conn.Read(buf)
	read := time.Now()
	if err != nil || string(buf[:n]) != "event: record\n\n" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	at := conn.stamp()
	if at.IsZero() {
		t.Fatal("the read carried no receive stamp")
	}
	if at.Before(sent.Add(-time.Millisecond)) {
		t.Errorf("stamped %s before the bytes were sent", sent.Sub(at))
	}
	if read.Sub(at) < late/2 {
		t.Errorf("stamped %s before the read, want about %s: the stamp is the read's time, not the arrival's", read.Sub(at), late)
	}

	// A closed peer reads as EOF, as a net.Conn's does.
	server.Close()
	if _, err := conn.Read(buf); err != io.EOF {
		t.Errorf("after the peer closed: %v, want EOF", err)
	}
}
