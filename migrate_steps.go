package main

import (
	"bufio"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// schemaFile is schema.sql: the schema, and the steps migrate applies (see
// its header for how).
//
//go:embed schema.sql
var schemaFile string

// schemaSteps is schemaFile cut into its steps, in order.
var schemaSteps = mustParseSchema(schemaFile)

// streamSources are the values of STREAM_SOURCE a step may belong to.
var streamSources = []string{sourceNotify, sourceWAL}

// The actions a step's log line reports.
const (
	actionInPlace  = "already in place"
	actionAbsent   = "already absent"
	actionCreated  = "created"
	actionReplaced = "replaced"
	actionRebuilt  = "rebuilt invalid index"
	actionEnabled  = "enabled"
	actionDropped  = "dropped"
)

// schemaStep is one object of schema.sql and the statement that creates it.
type schemaStep struct {
	kind  string // table, index, function, trigger or publication
	name  string
	table string // a trigger's or a publication's table
	// source is the STREAM_SOURCE the object belongs to ("" for every
	// source): installed for it, dropped for the other.
	source string
	sql    string
	body   string // a function's body, as pg_proc.prosrc holds it
}

func (s schemaStep) object() string { return s.kind + " " + s.name }

// parseSchema cuts schema.sql at its "-- migrate: KIND NAME [on TABLE]
// [when SOURCE]" lines. A step's statement runs from its marker to the last
// line that is not a comment before the next marker: the comments in
// between document the next step. Lines starting with a backslash are psql's
// (\if, \endif) and are left out.
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
		if strings.HasPrefix(strings.TrimSpace(line), `\`) {
			continue
		}
		rest, ok := strings.CutPrefix(line, "-- migrate:")
		if !ok {
			lines = append(lines, line)
			continue
		}
		if err := flush(); err != nil {
			return nil, err
		}
		lines = nil
		st, err := parseMarker(strings.Fields(rest))
		if err != nil {
			return nil, fmt.Errorf("schema.sql: %q: %w", line, err)
		}
		steps = append(steps, st)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	for i := range steps {
		if err := steps[i].check(); err != nil {
			return nil, fmt.Errorf("schema.sql: %s %w", steps[i].object(), err)
		}
	}
	return steps, nil
}

// parseMarker reads the fields after "-- migrate:".
func parseMarker(f []string) (schemaStep, error) {
	st := schemaStep{}
	if n := len(f); n >= 2 && f[n-2] == "when" {
		st.source, f = f[n-1], f[:n-2]
		if !slices.Contains(streamSources, st.source) {
			return st, fmt.Errorf("when %q: the source is one of %q", st.source, streamSources)
		}
	}
	switch {
	case len(f) == 2 && (f[0] == "table" || f[0] == "index" || f[0] == "function"):
		st.kind, st.name = f[0], f[1]
	case len(f) == 4 && (f[0] == "trigger" || f[0] == "publication") && f[2] == "on":
		st.kind, st.name, st.table = f[0], f[1], f[3]
	default:
		return st, errors.New("is not -- migrate: table|index|function NAME or -- migrate: trigger|publication NAME on TABLE [when SOURCE]")
	}
	if st.source != "" && st.kind != "trigger" && st.kind != "publication" {
		// migrate drops an object of the other source: never the writer's
		// table, nor an index its queries may use.
		return st, fmt.Errorf("a %s belongs to every source: only a trigger or a publication may have a when", st.kind)
	}
	return st, nil
}

// check refuses a statement that would stall the writer or that migrate
// could not compare with the catalog.
func (st *schemaStep) check() error {
	switch st.kind {
	case "index":
		// A plain CREATE INDEX would hold every INSERT for the whole build.
		if !strings.Contains(st.sql, "CREATE INDEX CONCURRENTLY") && !strings.Contains(st.sql, "CREATE UNIQUE INDEX CONCURRENTLY") {
			return errors.New("is not built CONCURRENTLY")
		}
	case "function":
		_, after, ok1 := strings.Cut(st.sql, "$$")
		body, _, ok2 := strings.Cut(after, "$$")
		if !ok1 || !ok2 {
			return errors.New("has no $$-quoted body")
		}
		st.body = body
	}
	return nil
}

func mustParseSchema(src string) []schemaStep {
	steps, err := parseSchema(src)
	if err != nil {
		panic(err)
	}
	return steps
}

// inCurrentSchema restricts a catalog lookup to the schema an unqualified
// CREATE puts objects in.
const inCurrentSchema = "to_regnamespace(current_schema())"

// apply brings one object to what source needs and says what it did. Every
// branch looks in the catalog first, which locks nothing an INSERT waits
// for, and runs a statement only when the object is not as it should be.
func (st schemaStep) apply(ctx context.Context, conn *pgx.Conn, source string, droppedInvalid *bool) (action string, err error) {
	if st.source != "" && st.source != source {
		return st.remove(ctx, conn)
	}
	switch st.kind {
	case "table":
		var exists bool
		if err := conn.QueryRow(ctx, `
SELECT EXISTS (SELECT FROM pg_class WHERE relname = $1 AND relnamespace = `+inCurrentSchema+`)`,
			st.name).Scan(&exists); err != nil {
			return "", fmt.Errorf("look up: %w", err)
		}
		if exists {
			return actionInPlace, nil
		}
		return execStep(ctx, conn, st.sql, actionCreated)
	case "index":
		return st.applyIndex(ctx, conn, droppedInvalid)
	case "function":
		var src string
		err := conn.QueryRow(ctx, `
SELECT prosrc FROM pg_proc WHERE proname = $1 AND pronargs = 0 AND pronamespace = `+inCurrentSchema,
			st.name).Scan(&src)
		switch {
		case err == nil && src == st.body:
			return actionInPlace, nil
		case err == nil:
			return execStep(ctx, conn, st.sql, actionReplaced)
		case errors.Is(err, pgx.ErrNoRows):
			return execStep(ctx, conn, st.sql, actionCreated)
		default:
			return "", fmt.Errorf("look up: %w", err)
		}
	case "trigger":
		return st.applyTrigger(ctx, conn)
	case "publication":
		return st.applyPublication(ctx, conn)
	}
	return "", fmt.Errorf("unknown kind %q", st.kind)
}

// execStep runs one statement and reports action. Without arguments pgx
// sends it alone over the simple protocol, so it runs in no transaction
// block (CREATE INDEX CONCURRENTLY needs that), and several statements in
// one string run as one transaction.
func execStep(ctx context.Context, conn *pgx.Conn, sql, action string) (string, error) {
	if _, err := conn.Exec(ctx, sql); err != nil {
		return "", err
	}
	return action, nil
}

func (st schemaStep) applyIndex(ctx context.Context, conn *pgx.Conn, droppedInvalid *bool) (string, error) {
	var valid bool
	err := conn.QueryRow(ctx, `
SELECT i.indisvalid
  FROM pg_class c
  JOIN pg_index i ON i.indexrelid = c.oid
 WHERE c.relname = $1 AND c.relnamespace = `+inCurrentSchema,
		st.name).Scan(&valid)
	switch {
	case err == nil && valid:
		return actionInPlace, nil
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
	if *droppedInvalid {
		return execStep(ctx, conn, st.sql, actionRebuilt)
	}
	return execStep(ctx, conn, st.sql, actionCreated)
}

// triggerState is what the catalog says of a trigger on the step's table.
func (st schemaStep) triggerState(ctx context.Context, conn *pgx.Conn) (exists, hasWhen bool, enabled string, err error) {
	err = conn.QueryRow(ctx, `
SELECT t.tgqual IS NOT NULL, t.tgenabled::text
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE t.tgname = $1 AND NOT t.tgisinternal
   AND c.relname = $2 AND c.relnamespace = `+inCurrentSchema,
		st.name, st.table).Scan(&hasWhen, &enabled)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, false, "", nil
	}
	if err != nil {
		return false, false, "", fmt.Errorf("look up: %w", err)
	}
	return true, hasWhen, enabled, nil
}

// applyTrigger creates the trigger, or brings an existing one up to the
// file: the trigger of earlier versions had no WHEN (CREATE OR REPLACE adds
// it in one statement, and enables the trigger too); a trigger disabled
// (tgenabled D) or firing only for replication sessions (R) notifies
// nothing the writer inserts, so it is enabled.
func (st schemaStep) applyTrigger(ctx context.Context, conn *pgx.Conn) (string, error) {
	exists, hasWhen, enabled, err := st.triggerState(ctx, conn)
	switch {
	case err != nil:
		return "", err
	case !exists:
		return execStep(ctx, conn, st.sql, actionCreated)
	case !hasWhen:
		// A trigger with another WHEN is left alone, like an index of another
		// definition: comparing deparsed expressions across server versions
		// would replace it on every run.
		return execStep(ctx, conn, st.sql, actionReplaced)
	case enabled == "D" || enabled == "R":
		return execStep(ctx, conn, "ALTER TABLE "+pgx.Identifier{st.table}.Sanitize()+
			" ENABLE TRIGGER "+pgx.Identifier{st.name}.Sanitize(), actionEnabled)
	}
	return actionInPlace, nil
}

// applyPublication creates the publication, or recreates one of the same
// name that publishes anything but the table's inserts: the wal source
// expects exactly those. Recreated in one transaction, so no WAL sender
// decoding meanwhile finds it missing.
func (st schemaStep) applyPublication(ctx context.Context, conn *pgx.Conn) (string, error) {
	var right bool
	err := conn.QueryRow(ctx, `
SELECT p.pubinsert AND NOT (p.pubupdate OR p.pubdelete OR p.pubtruncate OR p.puballtables)
       AND ARRAY(SELECT r.prrelid FROM pg_publication_rel r WHERE r.prpubid = p.oid) =
           ARRAY(SELECT c.oid FROM pg_class c WHERE c.relname = $2 AND c.relnamespace = `+inCurrentSchema+`)
  FROM pg_publication p
 WHERE p.pubname = $1`,
		st.name, st.table).Scan(&right)
	switch {
	case err == nil && right:
		return actionInPlace, nil
	case err == nil:
		return execStep(ctx, conn, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{st.name}.Sanitize()+";\n"+st.sql, actionReplaced)
	case errors.Is(err, pgx.ErrNoRows):
		return execStep(ctx, conn, st.sql, actionCreated)
	default:
		return "", fmt.Errorf("look up: %w", err)
	}
}

// remove drops an object of the other source, if present: the writer never
// pays for a source nobody uses.
func (st schemaStep) remove(ctx context.Context, conn *pgx.Conn) (string, error) {
	switch st.kind {
	case "trigger":
		exists, _, _, err := st.triggerState(ctx, conn)
		if err != nil || !exists {
			return actionAbsent, err
		}
		// ACCESS EXCLUSIVE on the table, under lock_timeout: the writer's
		// inserts (and the page reads) queue behind it for at most that long
		// per attempt.
		return execStep(ctx, conn, "DROP TRIGGER IF EXISTS "+pgx.Identifier{st.name}.Sanitize()+
			" ON "+pgx.Identifier{st.table}.Sanitize(), actionDropped)
	case "publication":
		var exists bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)", st.name).Scan(&exists); err != nil {
			return "", fmt.Errorf("look up: %w", err)
		}
		if !exists {
			return actionAbsent, nil
		}
		// Locks the publication alone, not the table.
		return execStep(ctx, conn, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{st.name}.Sanitize(), actionDropped)
	}
	return "", fmt.Errorf("a %s cannot be removed", st.kind)
}
