package main

import (
	"github.com/jackc/pgx/v5/pgconn"
)

// Pool size when DATABASE_URL has no pool_max_conns. pgx's own default,
// max(4, runtime.NumCPU()), counts the node's cores: a container limited to
// one CPU on a 64-core node would open 64 connections, and a rollout of a
// few pods would exhaust max_connections. GOMAXPROCS follows the container's
// CPU limit instead (Go >= 1.25 reads the cgroup), so the pool does too:
//   - floor 4: `make bench` on 2 cores measured pool 2 about 15% below
//     pool 4, and 4, 8 and 12 equal within the noise;
//   - 2 per GOMAXPROCS: while one query waits on the network and the
//     database, the same core can format the page of another; the measured
//     best of 4 on 2 cores is that ratio;
//   - cap 8: nothing measured gains beyond that, and an unlimited pod on a
//     big node (GOMAXPROCS 64) then opens 8, not 64: three pods of a
//     rollout hold 24 of PostgreSQL's default max_connections = 100.
//
// An operator who has measured something else sets pool_max_conns.
const (
	minDefaultPoolSize      = 4
	maxDefaultPoolSize      = 8
	defaultPoolSizePerProcs = 2
)

func defaultPoolSize(gomaxprocs int) int32 {
	return int32(min(max(defaultPoolSizePerProcs*gomaxprocs, minDefaultPoolSize), maxDefaultPoolSize))
}

// poolSizeSource says where the pool size came from, for the start log.
const (
	poolSizeFromURL        = "pool_max_conns"
	poolSizeFromGOMAXPROCS = "GOMAXPROCS"
)

// hasPoolMaxConns reports whether the connection string (URL or
// keyword/value form) sets pool_max_conns. pgxpool.ParseConfig removes it
// once read, so its presence is only visible in a parse of its own, where
// pgconn keeps it among the unknown (run-time) parameters.
func hasPoolMaxConns(connString string) bool {
	cc, err := pgconn.ParseConfig(connString)
	if err != nil {
		return false
	}
	_, ok := cc.RuntimeParams["pool_max_conns"]
	return ok
}
