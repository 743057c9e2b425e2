package main

import (
	"bufio"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// schemaFile is schema.sql: the schema, and the steps migrate applies (see
// its header for how).
//
//go:embed schema.sql
var schemaFile string

// schemaSteps is schemaFile cut into its steps, in order.
var schemaSteps = mustParseSchema(schemaFile)

// How migrate treats the writer's live table. See runMigrate and migrate.
const (
	// migrateLockTimeout bounds how long one DDL statement waits for a lock.
	// While a statement waits for a lock that INSERTs conflict with (CREATE
	// TRIGGER's SHARE ROW EXCLUSIVE), every INSERT that arrives after it
	// queues behind it, so this is the longest migrate can hold up the
	// writer per attempt. One second: the writer's transactions last
	// milliseconds, so a lock that is not free within a second is held by
	// something long (an idle-in-transaction session, a report) and waiting
	// longer would only stall more inserts; and an OTP stored a second late
	// still reaches the cardholder in time for the challenge.
	migrateLockTimeout = time.Second
	// migrateAttempts is how many times one statement is tried when its
	// lock is busy (lock_timeout, or a deadlock PostgreSQL broke), with
	// backoff in between so the writer's queue drains: 0.25s, 0.5s, 1s, 2s
	// (±50% jitter so that several runners do not retry in step). A step
	// that is still busy after that fails the attempt of the whole
	// migration, which runMigrate retries.
	migrateAttempts     = 5
	migrateFirstBackoff = 250 * time.Millisecond
	// migrateLockPoll is how often a runner asks again for the advisory lock
	// that another runner holds.
	migrateLockPoll = 500 * time.Millisecond
	// migrateRunTimeout bounds the whole of `threeds-records migrate`,
	// retries included.
	migrateRunTimeout = 10 * time.Minute
	// migrateRetryEvery spaces runMigrate's attempts (database not up yet,
	// lock busy for longer than a step's retries).
	migrateRetryEvery = 2 * time.Second
)

// migrateLockKey is an arbitrary pg_advisory lock id reserved for this
// service's schema migration.
const migrateLockKey int64 = 0x3d5_5c4e_3a00

// schemaStep is one object of schema.sql and the statement that creates it.
type schemaStep struct {
	kind  string // table, index, function or trigger
	name  string
	table string // the trigger's table
	sql   string
	body  string // a function's body, as pg_proc.prosrc holds it
}

func (s schemaStep) object() string { return s.kind + " " + s.name }

// parseSchema cuts schema.sql at its "-- migrate: KIND NAME [on TABLE]"
// lines. A step's statement runs from its marker to the last line that is
// not a comment before the next marker: the comments in between document
// the next step.
func parseSchema(src string) ([]schemaStep, error) {
	var steps []schemaStep
	var lines []string
	flush := func() error {
		if len(steps) == 0 {
			for _, l := range lines {
				if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "--") {
					return fmt.Errorf("schema.sql: %q comes before the first -- migrate: line", t)
				}
			}
			return nil
		}
		for len(lines) > 0 {
			if t := strings.TrimSpace(lines[len(lines)-1]); t != "" && !strings.HasPrefix(t, "--") {
				break
			}
			lines = lines[:len(lines)-1]
		}
		st := &steps[len(steps)-1]
		st.sql = strings.Join(lines, "\n")
		if st.sql == "" {
			return fmt.Errorf("schema.sql: %s has no statement", st.object())
		}
		return nil
	}
	sc := bufio.NewScanner(strings.NewReader(src))
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, "-- migrate:")
		if !ok {
			lines = append(lines, line)
			continue
		}
		if err := flush(); err != nil {
			return nil, err
		}
		lines = nil
		f := strings.Fields(rest)
		st := schemaStep{}
		switch {
		case len(f) == 2 && (f[0] == "table" || f[0] == "index" || f[0] == "function"):
			st.kind, st.name = f[0], f[1]
		case len(f) == 4 && f[0] == "trigger" && f[2] == "on":
			st.kind, st.name, st.table = f[0], f[1], f[3]
		default:
			return nil, fmt.Errorf("schema.sql: %q is not -- migrate: table|index|function NAME or -- migrate: trigger NAME on TABLE", line)
		}
		steps = append(steps, st)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	for i := range steps {
		st := &steps[i]
		switch st.kind {
		case "index":
			// A plain CREATE INDEX would hold every INSERT for the whole build.
			if !strings.Contains(st.sql, "CREATE INDEX CONCURRENTLY") && !strings.Contains(st.sql, "CREATE UNIQUE INDEX CONCURRENTLY") {
				return nil, fmt.Errorf("schema.sql: %s is not built CONCURRENTLY", st.object())
			}
		case "function":
			_, after, ok1 := strings.Cut(st.sql, "$$")
			body, _, ok2 := strings.Cut(after, "$$")
			if !ok1 || !ok2 {
				return nil, fmt.Errorf("schema.sql: %s has no $$-quoted body", st.object())
			}
			st.body = body
		}
	}
	return steps, nil
}

func mustParseSchema(src string) []schemaStep {
	steps, err := parseSchema(src)
	if err != nil {
		panic(err)
	}
	return steps
}

// readOnlyServerError is a server that cannot take the schema: a hot
// standby, or one where transactions are read-only. Retrying cannot help,
// so migrate stops at once.
type readOnlyServerError struct {
	server string // redacted
	why    string
}

func (e *readOnlyServerError) Error() string {
	return fmt.Sprintf("%s is read-only (%s): point DATABASE_URL at the primary", e.server, e.why)
}

// notAllowedError is a role that may not create or change a schema object
// (42501 insufficient_privilege, e.g. "must be owner of table"). Retrying
// cannot grant the privilege, so migrate stops at once, as for a read-only
// server.
type notAllowedError struct {
	object string
	err    error
}

func (e *notAllowedError) Error() string {
	return fmt.Sprintf("%s: %v: run migrate as the role that owns threeds_records (or may create it, its index and its trigger)", e.object, e.err)
}

func (e *notAllowedError) Unwrap() error { return e.err }

// Migrate applies schema.sql, bounded by the store's timeout, logging nowhere.
func (s *Store) Migrate(ctx context.Context) error {
	if err := s.migrate(ctx, slog.New(slog.DiscardHandler)); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// migrate applies schema.sql to the live table without stalling the
// writer's inserts:
//
//   - on one session of its own, taken out of the pool, as CREATE INDEX
//     CONCURRENTLY cannot run in a transaction block and so each statement
//     runs on its own;
//   - refusing at once a server that cannot take writes;
//   - under a session-level advisory lock, so that concurrent runners (two
//     Jobs, a retried one) take turns; a waiting runner polls instead of
//     blocking in pg_advisory_lock, because a blocked statement keeps its
//     snapshot open and a concurrent index build waits for every older
//     snapshot: the two would deadlock;
//   - with no statement_timeout, whatever the role or database sets (a build
//     may take minutes), and a lock_timeout of migrateLockTimeout;
//   - step by step, each looked up in the catalog first (which locks nothing
//     an INSERT waits for) and run only when missing or invalid.
func (s *Store) migrate(ctx context.Context, logger *slog.Logger) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()

	pc, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	// Hijacked, the session leaves the pool for good: its settings and its
	// advisory lock end with it when it is closed.
	conn := pc.Hijack()
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
	}()

	var inRecovery bool
	var readOnly string
	if err := conn.QueryRow(ctx, `
SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),
       set_config('statement_timeout', '0', false),
       set_config('lock_timeout', $1, false)`,
		fmt.Sprintf("%dms", migrateLockTimeout.Milliseconds()),
	).Scan(&inRecovery, &readOnly, nil, nil); err != nil {
		return fmt.Errorf("session settings: %w", err)
	}
	server := redactedURL(s.pool.Config())
	switch {
	case inRecovery:
		return &readOnlyServerError{server, "a hot standby: pg_is_in_recovery() is true"}
	case readOnly == "on":
		return &readOnlyServerError{server, "transaction_read_only is on, e.g. default_transaction_read_only set for the database or role"}
	}

	if err := lockMigration(ctx, conn, logger); err != nil {
		return err
	}
	for _, st := range schemaSteps {
		if err := applyStep(ctx, conn, st, logger); err != nil {
			if pgErrorCode(err) == "25006" { // read_only_sql_transaction: demoted, or routed to a standby
				var pgErr *pgconn.PgError
				errors.As(err, &pgErr)
				return &readOnlyServerError{server, pgErr.Message}
			}
			if pgErrorCode(err) == "42501" { // insufficient_privilege
				return &notAllowedError{st.object(), err}
			}
			return fmt.Errorf("%s: %w", st.object(), err)
		}
	}
	return nil
}

// lockMigration takes the migration's advisory lock for the session.
func lockMigration(ctx context.Context, conn *pgx.Conn, logger *slog.Logger) error {
	for waited := false; ; waited = true {
		var locked bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", migrateLockKey).Scan(&locked); err != nil {
			return fmt.Errorf("advisory lock: %w", err)
		}
		if locked {
			return nil
		}
		if !waited {
			logger.Info("another migrate is running; waiting for it to finish")
		}
		if err := sleepCtx(ctx, migrateLockPoll); err != nil {
			return fmt.Errorf("waiting for another migrate: %w", err)
		}
	}
}

// applyStep applies one step, retrying when its lock is busy.
func applyStep(ctx context.Context, conn *pgx.Conn, st schemaStep, logger *slog.Logger) error {
	backoff := migrateFirstBackoff
	var droppedInvalid bool // by an earlier attempt, which then found the lock busy
	for attempt := 1; ; attempt++ {
		start := time.Now()
		action, err := st.apply(ctx, conn, &droppedInvalid)
		if err == nil {
			logger.Info("schema object", "object", st.object(), "action", action,
				"duration_ms", time.Since(start).Milliseconds())
			return nil
		}
		if !lockBusy(err) || attempt == migrateAttempts {
			return err
		}
		wait := backoff/2 + rand.N(backoff) // ±50%
		logger.Warn("schema object lock busy; retrying", "object", st.object(),
			"attempt", attempt, "max_attempts", migrateAttempts, "retry_in", wait.Round(time.Millisecond).String(),
			"error", err.Error())
		if err := sleepCtx(ctx, wait); err != nil {
			return err
		}
		backoff *= 2
	}
}

// inCurrentSchema restricts a catalog lookup to the schema an unqualified
// CREATE puts objects in.
const inCurrentSchema = "to_regnamespace(current_schema())"

// apply brings one object in place and says what it did.
func (st schemaStep) apply(ctx context.Context, conn *pgx.Conn, droppedInvalid *bool) (action string, err error) {
	switch st.kind {
	case "table":
		var exists bool
		if err := conn.QueryRow(ctx, `
SELECT EXISTS (SELECT FROM pg_class WHERE relname = $1 AND relnamespace = `+inCurrentSchema+`)`,
			st.name).Scan(&exists); err != nil {
			return "", fmt.Errorf("look up: %w", err)
		}
		if exists {
			return "already in place", nil
		}

	case "index":
		var valid bool
		err := conn.QueryRow(ctx, `
SELECT i.indisvalid
  FROM pg_class c
  JOIN pg_index i ON i.indexrelid = c.oid
 WHERE c.relname = $1 AND c.relnamespace = `+inCurrentSchema,
			st.name).Scan(&valid)
		switch {
		case err == nil && valid:
			return "already in place", nil
		case err == nil:
			// The leftover of an interrupted concurrent build: present, so
			// IF NOT EXISTS would skip it, but never used by a query.
			if _, err := conn.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+pgx.Identifier{st.name}.Sanitize()); err != nil {
				return "", fmt.Errorf("drop invalid index: %w", err)
			}
			*droppedInvalid = true
		case !errors.Is(err, pgx.ErrNoRows):
			return "", fmt.Errorf("look up: %w", err)
		}
		if _, err := conn.Exec(ctx, st.sql); err != nil {
			return "", err
		}
		if *droppedInvalid {
			return "rebuilt invalid index", nil
		}
		return "created", nil

	case "function":
		var src string
		err := conn.QueryRow(ctx, `
SELECT prosrc FROM pg_proc WHERE proname = $1 AND pronargs = 0 AND pronamespace = `+inCurrentSchema,
			st.name).Scan(&src)
		switch {
		case err == nil && src == st.body:
			return "already in place", nil
		case err == nil:
			action = "replaced"
		case errors.Is(err, pgx.ErrNoRows):
		default:
			return "", fmt.Errorf("look up: %w", err)
		}

	case "trigger":
		var exists bool
		if err := conn.QueryRow(ctx, `
SELECT EXISTS (
  SELECT FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE t.tgname = $1 AND NOT t.tgisinternal
     AND c.relname = $2 AND c.relnamespace = `+inCurrentSchema+`)`,
			st.name, st.table).Scan(&exists); err != nil {
			return "", fmt.Errorf("look up: %w", err)
		}
		if exists {
			return "already in place", nil
		}

	default:
		return "", fmt.Errorf("unknown kind %q", st.kind)
	}
	// No arguments: pgx sends the statement alone over the simple protocol,
	// so it runs in no transaction block.
	if _, err := conn.Exec(ctx, st.sql); err != nil {
		return "", err
	}
	if action == "" {
		action = "created"
	}
	return action, nil
}

// lockBusy reports a statement that gave up on a lock: lock_timeout
// (lock_not_available), or the loser of a deadlock. Both may succeed later.
func lockBusy(err error) bool {
	code := pgErrorCode(err)
	return code == "55P03" || code == "40P01"
}

func pgErrorCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// runMigrate is `threeds-records migrate`. It retries for a while, as a
// Kubernetes Job may start before the database accepts connections and a
// lock may stay busy beyond one step's retries; the whole run is bounded
// by migrateRunTimeout. A read-only server, or a role without the privilege,
// is refused at once.
func runMigrate(ctx context.Context, store *Store, cfg *config, logger *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, migrateRunTimeout)
	defer cancel()
	for {
		err := store.migrate(ctx, logger)
		if err == nil {
			logger.Info("schema applied", "database", redactedURL(cfg.poolConfig))
			return nil
		}
		var readOnly *readOnlyServerError
		var notAllowed *notAllowedError
		if errors.As(err, &readOnly) || errors.As(err, &notAllowed) || ctx.Err() != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		logger.Warn("migrate failed; retrying", "error", err.Error(), "retry_in", migrateRetryEvery.String())
		if sleepCtx(ctx, migrateRetryEvery) != nil {
			return fmt.Errorf("migrate: %w", err)
		}
	}
}
