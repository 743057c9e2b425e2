//go:build !linux

package main

import (
	"errors"
	"syscall"
)

// childAttr: outside Linux there is no parent-death signal; bench/run.sh's
// trap still stops the service.
func childAttr() *syscall.SysProcAttr { return nil }

// lowerOwnPriority: per-thread nice is Linux's; elsewhere the load
// generator keeps its priority (the figures then include its competition).
func lowerOwnPriority() error { return errors.New("not on this system") }
