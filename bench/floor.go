package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// startFloor runs ../shared/floor (see its README) beside the service: the
// same database, keys, issuer and load, and the same pool size, which it
// reads from the service's /metrics so that a change of the service's
// default (or -db-params) cannot make the two differ in connections.
func startFloor(ctx context.Context, o options, svc *runningService, jwksPath string) (*runningService, error) {
	dsn := withParams(o.dsn, o.dbParams)
	if !strings.Contains(o.dbParams, "pool_max_conns") {
		n, err := svc.metric("threeds_db_pool_max_conns")
		if err != nil {
			return nil, fmt.Errorf("reading the service's pool size for the floor: %w", err)
		}
		dsn = withParams(dsn, "pool_max_conns="+strconv.FormatInt(n, 10))
		logf("floor gets the service's pool size: pool_max_conns=%d", n)
	}
	fl, err := startServer(ctx, serverSpec{name: "floor", bin: o.floor, dsn: dsn, env: o.floorEnv, log: o.floorLog, dir: o.dir}, jwksPath)
	if err != nil {
		return fl, err
	}
	logf("floor pid %d on %s", fl.pid(), fl.addr)
	return fl, nil
}

// metric reads one unlabelled sample from the service's /metrics.
func (s *runningService) metric(name string) (int64, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + s.addr + "/metrics")
	if err != nil {
		return 0, err
	}
	s.responses.Add(1)
	defer resp.Body.Close()
	defer client.CloseIdleConnections()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s in /metrics", name)
}
