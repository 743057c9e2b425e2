package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
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

// Where the pool size came from, for the start log (db_pool_max_conns_from).
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

// newPool creates the pool for cfg. When the service sends statement_timeout
// at connection start (it does unless migrating), a pooler that refuses the
// parameter is detected and the parameter dropped from then on; see
// statementTimeoutFallback.
func newPool(ctx context.Context, cfg *config, logger *slog.Logger) (*pgxpool.Pool, error) {
	pc := cfg.poolConfig.Copy()
	if _, sent := pc.ConnConfig.RuntimeParams["statement_timeout"]; sent {
		if pc.ConnConfig.Tracer != nil {
			// One tracer per connection config: a second one would have to
			// forward TraceConnectEnd here, or the fallback goes blind.
			return nil, errors.New("the connection config already has a tracer; chain it with the statement_timeout fallback")
		}
		f := &statementTimeoutFallback{logger: logger, role: pc.ConnConfig.User, timeout: cfg.queryTimeout}
		pc.ConnConfig.Tracer = f
		pc.BeforeConnect = f.beforeConnect
	}
	return pgxpool.NewWithConfig(ctx, pc)
}

// statementTimeoutFallback keeps the service working behind a pooler that
// refuses the statement_timeout startup parameter: PgBouncer with a stock
// pgbouncer.ini answers FATAL 08P01 "unsupported startup parameter:
// statement_timeout" and, without this, no connection ever opens and the
// service never becomes ready. The refusal is seen where pgx reports every
// connection attempt (a ConnectTracer); from then on BeforeConnect, which
// pgxpool calls with a copy of the config before each new connection, drops
// the parameter, so the next attempt succeeds. The client-side deadline
// (the store's DB_QUERY_TIMEOUT context) is unaffected; the server-side
// limit is gone until the operator sets it where the pooler cannot drop it,
// which the warning says once.
type statementTimeoutFallback struct {
	logger  *slog.Logger
	role    string
	timeout time.Duration
	refused atomic.Bool
}

func (f *statementTimeoutFallback) beforeConnect(_ context.Context, cc *pgx.ConnConfig) error {
	if f.refused.Load() {
		delete(cc.RuntimeParams, "statement_timeout")
	}
	return nil
}

// pgx takes a tracer as a QueryTracer and looks for ConnectTracer on it;
// the query hooks do nothing.
func (f *statementTimeoutFallback) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (f *statementTimeoutFallback) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (f *statementTimeoutFallback) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	return ctx
}

func (f *statementTimeoutFallback) TraceConnectEnd(_ context.Context, data pgx.TraceConnectEndData) {
	if data.Err == nil || !refusesStatementTimeout(data.Err) {
		return
	}
	// Several connections may be refused at once; one line says it all.
	if f.refused.CompareAndSwap(false, true) {
		f.logger.Warn("the database (a pooler such as PgBouncer) refused the statement_timeout startup parameter; connecting without it",
			"refusal", refusalMessage(data.Err),
			"effect", fmt.Sprintf("DB_QUERY_TIMEOUT (%s) still ends each query on the service's side; the server has no limit of its own, so a statement the service abandons stops only if the pooler cancels it", f.timeout),
			"fix", fmt.Sprintf("ALTER ROLE %s SET statement_timeout = '%dms' (on PostgreSQL) brings the server-side limit back; "+
				"ignore_startup_parameters = statement_timeout in pgbouncer.ini only stops the refusal: PgBouncer then drops the value",
				pgx.Identifier{f.role}.Sanitize(), f.timeout.Milliseconds()),
		)
	}
}

// refusesStatementTimeout recognises the pooler's refusal: SQLSTATE 08P01
// (protocol_violation) naming the parameter. PgBouncer's text is
// "unsupported startup parameter: statement_timeout".
func refusesStatementTimeout(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "08P01" &&
		strings.Contains(pgErr.Message, "unsupported startup parameter") &&
		strings.Contains(pgErr.Message, "statement_timeout")
}

func refusalMessage(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Severity + " " + pgErr.Code + ": " + pgErr.Message
	}
	return ""
}
