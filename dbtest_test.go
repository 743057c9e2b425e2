package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// newTestDB creates a fresh, uniquely named database on the cluster at DATABASE_URL,
// migrates it, registers cleanup (DROP DATABASE ... WITH (FORCE)), and returns its connection string.
func newTestDB(t testing.TB) string {
	t.Helper()
	connString := newEmptyTestDB(t)
	migrateTestDB(t, connString)
	return connString
}

// migrateTestDB applies the schema to connString's database with the real
// Migrate, so tests run on exactly what `threeds-records migrate` produces
// (schema.sql cannot be executed as one string: CREATE INDEX CONCURRENTLY
// refuses to run in the implicit transaction of a multi-statement query).
func migrateTestDB(t testing.TB, connString string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		t.Fatalf("parse test database config: %v", err)
	}
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("open test pool: %v", err)
	}
	defer pool.Close()
	if err := NewStore(pool, 0).Migrate(ctx); err != nil {
		t.Fatalf("migrate the test database: %v", err)
	}
}

// newEmptyTestDB is newTestDB without the schema, for tests of Migrate itself.
func newEmptyTestDB(t testing.TB) string {
	t.Helper()
	adminURL := os.Getenv("DATABASE_URL")
	if adminURL == "" {
		t.Fatal("DATABASE_URL is not set: run `make test` (it starts PostgreSQL) or set DATABASE_URL to a PostgreSQL server where the tests may create databases")
	}

	// Random, not derived from the test name: parallel tests and parallel
	// packages share one cluster, and a crashed run must not block the next.
	var suffix [8]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		t.Fatalf("random database name: %v", err)
	}
	name := "threeds_test_" + hex.EncodeToString(suffix[:])

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		t.Fatalf("connect to DATABASE_URL: %v", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() { dropTestDB(t, adminURL, name) })

	connString, err := withDatabase(adminURL, name)
	if err != nil {
		t.Fatalf("test database connection string: %v", err)
	}
	return connString
}

func dropTestDB(t testing.TB, adminURL, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		t.Errorf("drop test database %s: %v", name, err)
		return
	}
	defer admin.Close(ctx)
	// FORCE: a test that failed half-way may still hold connections.
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		t.Errorf("drop test database %s: %v", name, err)
	}
}

// withDatabase points connString at another database on the same server,
// accepting both forms pgx does: URLs and keyword/value strings.
func withDatabase(connString, name string) (string, error) {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err != nil {
			return "", err
		}
		u.Path = "/" + name
		u.RawPath = ""
		return u.String(), nil
	}
	// In keyword/value form the last occurrence of a keyword wins.
	return connString + " dbname=" + name, nil
}

// newTestStore returns a Store on a pool for newTestDB (pool closed on cleanup), timeout 3s.
func newTestStore(t testing.TB) (*Store, *pgxpool.Pool) {
	t.Helper()
	pool := newTestPool(t, newTestDB(t), nil)
	return NewStore(pool, 3*time.Second), pool
}

// newTestPool opens a pool on connString, letting a test adjust the config
// (session settings, tracers) first, and closes it on cleanup.
func newTestPool(t testing.TB, connString string, configure func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		t.Fatalf("parse test database config: %v", err)
	}
	if configure != nil {
		configure(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("open test pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// testCluster is a PostgreSQL cluster of one test's own (scripts/pg.sh), for
// tests that stop and start the database under a running service. Its port
// never changes, so a DATABASE_URL handed out before a stop stays valid.
type testCluster struct {
	t   testing.TB
	dir string
	url string // the cluster's postgres database, trust auth
}

// startCluster starts a fresh cluster and stops and removes it on cleanup.
// It costs an initdb (a second or two), so only tests that stop the
// database use it; the rest share DATABASE_URL through newTestDB.
func startCluster(t testing.TB) *testCluster {
	t.Helper()
	// Not t.TempDir: the Unix socket lives in the directory, and socket paths
	// are limited to about 100 bytes.
	dir, err := os.MkdirTemp("", "threeds-pg-")
	if err != nil {
		t.Fatalf("cluster directory: %v", err)
	}
	c := &testCluster{t: t, dir: dir}
	t.Cleanup(func() {
		if _, err := c.pg("stop"); err != nil {
			t.Errorf("stop test cluster: %v", err)
		}
		_ = os.RemoveAll(dir)
	})
	out, err := c.pg("start")
	if err != nil {
		t.Fatalf("start test cluster: %v", err)
	}
	c.url = strings.TrimSpace(out)
	return c
}

// stop shuts the cluster down (fast mode: sessions are terminated).
func (c *testCluster) stop() {
	c.t.Helper()
	if _, err := c.pg("stop"); err != nil {
		c.t.Fatalf("stop test cluster: %v", err)
	}
}

// start brings a stopped cluster back. It is pg.sh restart, not start:
// start would move to a random port if the old one were taken, restart
// insists on the same one (and fails loudly otherwise).
func (c *testCluster) start() {
	c.t.Helper()
	if _, err := c.pg("restart"); err != nil {
		c.t.Fatalf("start test cluster again: %v", err)
	}
}

// startStandby makes a hot standby of primary (scripts/pg.sh standby:
// pg_basebackup -R, its own port) and stops and removes it on cleanup,
// before the primary's cleanup runs. Its url is read-only; what was
// committed on the primary shows up there after the replication delay
// (waitForReplay waits for it).
func startStandby(t testing.TB, primary *testCluster) *testCluster {
	t.Helper()
	dir, err := os.MkdirTemp("", "threeds-standby-")
	if err != nil {
		t.Fatalf("standby directory: %v", err)
	}
	c := &testCluster{t: t, dir: dir}
	t.Cleanup(func() {
		if _, err := c.pg("stop"); err != nil {
			t.Errorf("stop test standby: %v", err)
		}
		_ = os.RemoveAll(dir)
	})
	out, err := c.pg("standby", primary.dir)
	if err != nil {
		t.Fatalf("start test standby: %v", err)
	}
	c.url = strings.TrimSpace(out)
	return c
}

// waitForReplay waits until the standby has replayed everything the primary
// had written when it was called, so a test can start from the same data
// on both. The insert position, not pg_current_wal_lsn (the write position):
// test clusters commit asynchronously, so a commit record may still sit in
// the WAL buffers (only a notifying commit was flushed at once, which hid
// this until the trigger's WHEN skipped expired seed rows).
func waitForReplay(t testing.TB, primaryURL, standbyURL string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	primary, err := pgx.Connect(ctx, primaryURL)
	if err != nil {
		t.Fatalf("connect to the primary: %v", err)
	}
	defer primary.Close(ctx)
	standby, err := pgx.Connect(ctx, standbyURL)
	if err != nil {
		t.Fatalf("connect to the standby: %v", err)
	}
	defer standby.Close(ctx)
	var lsn string
	if err := primary.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&lsn); err != nil {
		t.Fatalf("primary WAL position: %v", err)
	}
	waitFor(t, 30*time.Second, "the standby to replay up to "+lsn, func() bool {
		var done bool
		err := standby.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn).Scan(&done)
		if err != nil {
			t.Fatalf("standby replay position: %v", err)
		}
		return done
	})
}

// pg runs scripts/pg.sh CMD on the cluster's directory (then args), bounded
// in time.
func (c *testCluster) pg(cmd string, args ...string) (string, error) {
	script := os.Getenv("PG_SCRIPT") // exported by scripts/with-postgres.sh
	if script == "" {
		script = filepath.Join("scripts", "pg.sh") // go test runs in the package directory
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	run := exec.CommandContext(ctx, "bash", append([]string{script, cmd, c.dir}, args...)...)
	run.Stdout, run.Stderr = &stdout, &stderr
	run.WaitDelay = 10 * time.Second
	if err := run.Run(); err != nil {
		return "", fmt.Errorf("pg.sh %s %s: %w: %s", cmd, c.dir, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
