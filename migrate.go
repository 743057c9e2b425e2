package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

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

// Migrate applies schema.sql for the default source (notify), bounded by the
// store's timeout, logging nowhere.
func (s *Store) Migrate(ctx context.Context) error { return s.MigrateFor(ctx, sourceNotify) }

// MigrateFor applies schema.sql for STREAM_SOURCE source (notify or wal),
// like Migrate.
func (s *Store) MigrateFor(ctx context.Context, source string) error {
	if err := s.migrate(ctx, slog.New(slog.DiscardHandler), source); err != nil {
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
//     an INSERT waits for) and run only when missing or not as written; a
//     step of the other source is dropped when present.
func (s *Store) migrate(ctx context.Context, logger *slog.Logger, source string) error {
	if !slices.Contains(streamSources, source) {
		return fmt.Errorf("stream source %q is not one of %q", source, streamSources)
	}
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

	inRecovery, readOnly, err := sessionSettings(ctx, conn)
	if err != nil {
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
		if err := applyStep(ctx, conn, st, source, logger); err != nil {
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

// sessionSettings lifts statement_timeout, sets lock_timeout and reads
// whether the server takes writes. The statement itself still runs under
// whatever statement_timeout the role or database sets: a very short one
// (tens of milliseconds) can cancel it on a busy server, and as it is
// idempotent it is simply tried again.
func sessionSettings(ctx context.Context, conn *pgx.Conn) (inRecovery bool, readOnly string, err error) {
	for attempt := 1; ; attempt++ {
		err = conn.QueryRow(ctx, `
SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),
       set_config('statement_timeout', '0', false),
       set_config('lock_timeout', $1, false)`,
			fmt.Sprintf("%dms", migrateLockTimeout.Milliseconds()),
		).Scan(&inRecovery, &readOnly, nil, nil)
		if err == nil || pgErrorCode(err) != "57014" || attempt == 5 { // query_canceled
			return inRecovery, readOnly, err
		}
	}
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
func applyStep(ctx context.Context, conn *pgx.Conn, st schemaStep, source string, logger *slog.Logger) error {
	backoff := migrateFirstBackoff
	var droppedInvalid bool // by an earlier attempt, which then found the lock busy
	for attempt := 1; ; attempt++ {
		start := time.Now()
		action, err := st.apply(ctx, conn, source, &droppedInvalid)
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
		err := store.migrate(ctx, logger, cfg.streamSource)
		if err == nil {
			logger.Info("schema applied", "database", redactedURL(cfg.poolConfig), "stream_source", cfg.streamSource)
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
