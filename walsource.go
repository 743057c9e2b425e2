package main

// STREAM_SOURCE=wal: logical decoding of threeds_records' inserts with the
// built-in pgoutput plugin (contract section 6). The writer's commits pay
// nothing; the primary's WAL sender decodes and the record is rendered from
// the decoded row itself (pgoutput.go), without a read per record.
//
// One session is two connections to DATABASE_LISTEN_URL: a replication
// connection (replication=database) that creates a TEMPORARY slot (gone with
// the session, SIGKILL included: no WAL is ever retained for a dead process)
// and streams from it, and a plain one for the checks and for the snapshot
// and resync reads, which run on a goroutine of their own while decoding
// goes on. Subscribing is the slot's creation: every transaction that
// commits after it is decoded, so reads that start after it miss nothing.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

const (
	// walPublication is the shared decision with `migrate`, which creates it
	// (FOR TABLE threeds_records WITH (publish = 'insert')).
	walPublication = "threeds_records_events"

	// walStatusInterval is how often the source tells the server how far it
	// has read, well inside wal_sender_timeout (60 s by default).
	walStatusInterval = 3 * time.Second

	// walMaxBatchAge bounds how long decoded records wait for the end of a
	// burst (drainWindow, listen.go) before they are handed over.
	walMaxBatchAge = 10 * time.Millisecond
)

// walSource is the logical decoding session.
type walSource struct {
	h *hub
	// slotPrefix makes this process's slot names unique on the server.
	slotPrefix string
	seq        int
	// streaming asks for protocol 2 with large transactions streamed before
	// they commit (see docs/decisions.md for why it is kept).
	streaming bool
}

func newWalSource(h *hub) *walSource {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return &walSource{h: h, slotPrefix: "threeds_records_" + hex.EncodeToString(b[:]), streaming: true}
}

func (w *walSource) session(ctx context.Context, everUp bool) (up bool, err error) {
	h := w.h
	heardBefore := h.heard.Load()
	repl, err := pgconn.ConnectConfig(ctx, w.replicationConfig())
	if err != nil {
		return false, replicationConnectError(err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = repl.Close(cctx)
	}()
	read, err := pgx.ConnectConfig(ctx, w.readConfig())
	if err != nil {
		return false, fmt.Errorf("connect for reads: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = read.Close(cctx)
	}()
	if err := w.checkPrimary(ctx, read); err != nil {
		return false, err
	}
	w.seq++
	slot := w.slotPrefix + "_" + strconv.Itoa(w.seq)
	if err := w.createSlot(ctx, repl, read, slot); err != nil {
		return false, err
	}
	if err := w.startReplication(ctx, repl, slot); err != nil {
		return false, err
	}
	// The slot came first, so everything committed from here on is decoded;
	// re-reading every open stream now covers whatever was committed while
	// no session was subscribed.
	h.sourceUpAgain(everUp, heardBefore)
	return true, w.run(ctx, repl, read)
}

// replicationConfig is DATABASE_LISTEN_URL's settings for the replication
// connection. TimeZone and DateStyle fix the text form of received_at in
// decoded tuples; statement_timeout means nothing to a WAL sender.
func (w *walSource) replicationConfig() *pgconn.Config {
	cc := w.h.cfg.conn.Copy()
	pc := &cc.Config
	rp := pc.RuntimeParams
	for k := range rp {
		// Setting names are case-insensitive: one spelling each, ours.
		switch strings.ToLower(k) {
		case "statement_timeout", "timezone", "datestyle", "client_encoding", "replication":
			delete(rp, k)
		}
	}
	rp["replication"] = "database"
	rp["TimeZone"] = "UTC"
	rp["DateStyle"] = "ISO"
	rp["client_encoding"] = "UTF8"
	pc.DialFunc = keepaliveDialer().DialContext
	return pc
}

// readConfig is the plain connection's: DATABASE_LISTEN_URL's settings with
// an application_name of its own, so that the replication connection alone
// answers to DATABASE_LISTEN_URL's name in pg_stat_activity.
func (w *walSource) readConfig() *pgx.ConnConfig {
	cc := w.h.cfg.conn.Copy()
	cc.RuntimeParams["application_name"] += "-read"
	cc.DialFunc = keepaliveDialer().DialContext
	return cc
}

const walFix = "; or STREAM_SOURCE=notify"

// replicationConnectError says what to set when the server (or a pooler)
// refuses a replication connection; anything else is retried.
func replicationConnectError(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return fmt.Errorf("connect for replication: %w", err)
	}
	switch {
	case strings.Contains(pgErr.Message, "unsupported startup parameter"):
		// PgBouncer's words: PostgreSQL accepts any startup parameter.
		return &unavailableError{
			details: directSession + " (it points at PgBouncer, which refuses replication connections)",
			fix:     "DATABASE_LISTEN_URL to a direct session to the primary, bypassing PgBouncer" + walFix,
			err:     err,
		}
	case pgErr.Code == "42501":
		return &unavailableError{
			details: "the role of DATABASE_LISTEN_URL lacks the REPLICATION attribute that STREAM_SOURCE=wal needs",
			fix:     "a role WITH REPLICATION (or the cloud's equivalent) of its own in DATABASE_LISTEN_URL" + walFix,
			err:     err,
		}
	case pgErr.Code == "53300" && strings.Contains(pgErr.Message, "max_wal_senders"):
		return &unavailableError{
			details: "the primary has no free WAL sender for STREAM_SOURCE=wal (max_wal_senders)",
			fix:     "max_wal_senders on the primary to at least one per replica of this service plus what standbys use" + walFix,
			err:     err,
		}
	}
	return fmt.Errorf("connect for replication: %w", err)
}

// checkPrimary refuses, with what to set, a target where decoding cannot
// work: a standby, wal_level below logical, no publication.
func (w *walSource) checkPrimary(ctx context.Context, read *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, w.h.cfg.queryTimeout)
	defer cancel()
	var (
		standby, published bool
		walLevel           string
	)
	err := read.QueryRow(ctx, `
SELECT pg_is_in_recovery(), current_setting('wal_level'),
       EXISTS (SELECT 1 FROM pg_publication p JOIN pg_publication_tables t USING (pubname)
                WHERE p.pubname = $1 AND p.pubinsert
                  AND format('%I.%I', t.schemaname, t.tablename)::regclass = to_regclass('threeds_records'))`,
		walPublication).Scan(&standby, &walLevel, &published)
	if err != nil {
		return fmt.Errorf("check the primary: %w", err)
	}
	switch {
	case standby:
		return &unavailableError{
			details: directSession + " (it points at a hot standby, where STREAM_SOURCE=wal cannot decode)",
			fix:     "DATABASE_LISTEN_URL to a direct session to the primary (not a standby)",
			err:     errors.New("pg_is_in_recovery() is true"),
		}
	case walLevel != "logical":
		return &unavailableError{
			details: "the primary's wal_level is " + walLevel + "; STREAM_SOURCE=wal needs wal_level = logical",
			fix:     "wal_level = logical on the primary (a restart)" + walFix,
			err:     errors.New("wal_level is " + walLevel),
		}
	case !published:
		return &unavailableError{
			details: "the database has no publication " + walPublication + " of threeds_records' inserts; run `threeds-records migrate` with STREAM_SOURCE=wal",
			fix:     "run `threeds-records migrate` with STREAM_SOURCE=wal against the primary (it creates publication " + walPublication + ")",
			err:     errors.New("publication " + walPublication + " is missing or does not publish inserts of threeds_records"),
		}
	}
	return nil
}

// createSlot creates this session's temporary slot. Creation waits for
// every transaction that already has an id to end, so one writer left idle
// in transaction would hold it forever: the wait is bounded, and the log
// names who holds it.
func (w *walSource) createSlot(ctx context.Context, repl *pgconn.PgConn, read *pgx.Conn, slot string) error {
	bound := w.h.cfg.probeTimeout
	var holders string
	fired := make(chan struct{})
	timer := time.AfterFunc(bound, func() {
		defer close(fired)
		// The read connection is idle: this goroutine's caller is blocked
		// on the replication connection until the cancel below.
		qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		holders = slotHolders(qctx, read, repl.PID())
		_ = repl.CancelRequest(qctx)
	})
	_, err := repl.Exec(ctx, "CREATE_REPLICATION_SLOT "+slot+" TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT").ReadAll()
	if !timer.Stop() {
		<-fired
		return &unavailableError{
			details: "a long transaction on the primary holds up the creation of STREAM_SOURCE=wal's replication slot (it waits for transactions open before it)",
			fix:     "end or time out the transaction (idle_in_transaction_session_timeout) on the primary: " + holders + walFix,
			err:     fmt.Errorf("CREATE_REPLICATION_SLOT waited over %s: %v", bound, err),
		}
	}
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "53400": // configuration_limit_exceeded: all slots in use
			return &unavailableError{
				details: "the primary has no free replication slot for STREAM_SOURCE=wal (max_replication_slots)",
				fix:     "max_replication_slots on the primary to at least one per replica of this service plus the slots in use" + walFix,
				err:     err,
			}
		case "55000": // object_not_in_prerequisite_state: wal_level, max_replication_slots = 0
			return &unavailableError{
				details: "the primary cannot create a logical replication slot: " + pgErr.Message,
				fix:     "wal_level = logical and max_replication_slots > 0 on the primary" + walFix,
				err:     err,
			}
		}
	}
	return fmt.Errorf("create the replication slot: %w", err)
}

// slotHolders describes the sessions the slot's creation waits for.
func slotHolders(ctx context.Context, read *pgx.Conn, walSender uint32) string {
	rows, err := read.Query(ctx, `
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''),
       coalesce(extract(epoch FROM now() - xact_start)::bigint, 0)
  FROM pg_stat_activity
 WHERE pid = ANY (pg_blocking_pids($1))
    OR (backend_xid IS NOT NULL AND pid <> $1 AND NOT EXISTS (SELECT 1 FROM unnest(pg_blocking_pids($1))))
 ORDER BY xact_start
 LIMIT 5`, int64(walSender))
	if err != nil {
		return "(could not read pg_stat_activity: " + err.Error() + ")"
	}
	var (
		out           []string
		pid, age      int64
		user, app, st string
	)
	_, err = pgx.ForEachRow(rows, []any{&pid, &user, &app, &st, &age}, func() error {
		out = append(out, fmt.Sprintf("pid %d (user %q, application_name %q, %s, transaction open %d s)", pid, user, app, st, age))
		return nil
	})
	if err != nil || len(out) == 0 {
		return "see pg_stat_activity for transactions with a backend_xid"
	}
	return strings.Join(out, ", ")
}

// startReplication starts streaming from the slot. It cannot go through
// Exec: the answer is CopyBothResponse, not a result.
func (w *walSource) startReplication(ctx context.Context, repl *pgconn.PgConn, slot string) error {
	opts := "proto_version '1'"
	if w.streaming {
		opts = "proto_version '2', streaming 'on'"
	}
	q := "START_REPLICATION SLOT " + slot + " LOGICAL 0/0 (" + opts + ", publication_names '" + walPublication + "')"
	repl.Frontend().Send(&pgproto3.Query{String: q})
	if err := repl.Frontend().Flush(); err != nil {
		return fmt.Errorf("start replication: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, w.h.cfg.queryTimeout)
	defer cancel()
	for {
		msg, err := repl.ReceiveMessage(ctx)
		if err != nil {
			return fmt.Errorf("start replication: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CopyBothResponse:
			return nil
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("start replication: %w", pgconn.ErrorResponseToPgError(m))
		}
	}
}

// run decodes until the session fails, while a goroutine serves the
// snapshot and resync reads on the plain connection.
func (w *walSource) run(ctx context.Context, repl *pgconn.PgConn, read *pgx.Conn) error {
	f := &walFeed{h: w.h, kick: make(chan struct{}, 1)}
	return w.h.withReads(ctx, read, f.kick, func(ctx context.Context) error {
		return w.decode(ctx, repl, f)
	})
}

// decode reads the replication stream, acknowledges what it has handled,
// and hands each commit's records to the feed.
func (w *walSource) decode(ctx context.Context, repl *pgconn.PgConn, f *walFeed) error {
	h := w.h
	var badRows int
	d := newWalDecoder(h.streamed, func(err error) {
		// One line per session: a writer that stores such rows stores many.
		if badRows++; badRows == 1 {
			h.logger.Warn("live updates: a decoded record cannot be rendered; such records are skipped", "source", sourceWAL, "error", err.Error())
		}
	})
	var pos uint64 // handled: acknowledged at the next status update
	for {
		// One deadline per status interval, not per message.
		dctx, dcancel := context.WithTimeout(ctx, walStatusInterval)
		err := w.receive(dctx, repl, d, f, &pos)
		dcancel()
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := sendStatus(repl, pos); err != nil {
			return err
		}
	}
}

func sendStatus(repl *pgconn.PgConn, pos uint64) error {
	repl.Frontend().Send(&pgproto3.CopyData{Data: standbyStatus(pos, time.Now())})
	if err := repl.Frontend().Flush(); err != nil {
		return fmt.Errorf("standby status: %w", err)
	}
	return nil
}

// receive handles messages until dctx's deadline (then nil: time to report
// the position) or a failure.
//
// Commits that arrive together become one hand-over: the WAL sender sends
// what was flushed in bursts (with synchronous_commit = off, every
// wal_writer_delay), and one batch per commit would fill a stream's queue
// with dozens of tiny batches at once. A burst ends when nothing arrives
// for drainWindow; the timer is armed only while something is pending.
func (w *walSource) receive(dctx context.Context, repl *pgconn.PgConn, d *walDecoder, f *walFeed, pos *uint64) error {
	h := w.h
	var (
		pending  *walCommit
		commits  int
		received = time.Now()
	)
	flush := func() {
		if pending != nil {
			f.commit(pending)
			pending, commits = nil, 0
		}
	}
	for {
		rctx, rcancel := dctx, context.CancelFunc(nil)
		if pending != nil {
			rctx, rcancel = context.WithTimeout(dctx, drainWindow)
		}
		msg, err := repl.ReceiveMessage(rctx)
		if rcancel != nil {
			rcancel()
		}
		if err != nil {
			if rctx.Err() != nil && !repl.IsClosed() {
				flush()
				if dctx.Err() == nil {
					continue
				}
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		var cd *pgproto3.CopyData
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			cd = m
		case *pgproto3.ErrorResponse:
			return decodeError(pgconn.ErrorResponseToPgError(m))
		case *pgproto3.CopyDone:
			return errors.New("the server ended replication")
		default:
			continue
		}
		if len(cd.Data) == 0 {
			continue
		}
		switch cd.Data[0] {
		case 'w':
			x, err := parseXLogData(cd.Data[1:])
			if err != nil {
				return fmt.Errorf("XLogData: %w", err)
			}
			before := d.decoded
			c, err := d.handle(x.data, x.serverTime)
			if err != nil {
				return err
			}
			h.notifications.Add(d.decoded - before)
			*pos = max(*pos, d.lastEnd)
			switch {
			case c == nil:
			case c.resync:
				flush()
				f.commit(c)
			case pending == nil:
				pending, commits, received = c, 1, time.Now()
			default:
				for uid, frames := range c.byUser {
					pending.byUser[uid] = append(pending.byUser[uid], frames...)
				}
				commits++
			}
			// A steady flow has no gaps: bound the wait anyway.
			if pending != nil && (commits >= maxDrain || time.Since(received) >= walMaxBatchAge) {
				flush()
			}
		case 'k':
			k, err := parseKeepalive(cd.Data[1:])
			if err != nil {
				return fmt.Errorf("keepalive: %w", err)
			}
			// PostgreSQL skips empty transactions: without this the position
			// would only move with the table's own commits, and the slot
			// would pin the WAL of every other table's.
			if d.idle() {
				*pos = max(*pos, k.walEnd)
			}
			if k.reply {
				if err := sendStatus(repl, *pos); err != nil {
					return err
				}
			}
		}
	}
}

// decodeError: a publication that does not exist is only refused at the
// first decoded change.
func decodeError(err *pgconn.PgError) error {
	if err.Code == "42704" {
		return &unavailableError{
			details: "the database has no publication " + walPublication + "; run `threeds-records migrate` with STREAM_SOURCE=wal",
			fix:     "run `threeds-records migrate` with STREAM_SOURCE=wal against the primary",
			err:     err,
		}
	}
	return fmt.Errorf("replication: %w", err)
}
