package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// childAttr makes the kernel kill the service if the bench dies first (even
// by SIGKILL), so no stray server keeps the port or the cluster busy.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// lowerOwnPriority sets every thread of the bench to nice 19 (Linux's nice
// is per thread; threads created later inherit it). Lowering one's own
// priority needs no privilege; raising it back would, so it is for the
// end of a run.
func lowerOwnPriority() error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, 19); err != nil {
			return fmt.Errorf("thread %d: %w", tid, err)
		}
	}
	return nil
}
