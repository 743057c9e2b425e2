package main

import "syscall"

// childAttr makes the kernel kill the service if the bench dies first (even
// by SIGKILL), so no stray server keeps the port or the cluster busy.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
