//go:build !linux

package main

import "syscall"

// childAttr: outside Linux there is no parent-death signal; bench/run.sh's
// trap still stops the service.
func childAttr() *syscall.SysProcAttr { return nil }
