package main

// STREAM_SOURCE=notify: the AFTER INSERT trigger that migrate installs
// NOTIFYs "<user_id>:<id>" on commit, and one LISTEN session per process
// hears it.
//
// A session is two dedicated connections on DATABASE_LISTEN_URL. One goroutine
// owns the LISTEN connection: it LISTENs, proves that notifications are
// really delivered, and then alternates between waiting for notifications
// and reading the records a batch of them names, on that same connection.
// Another owns the read connection (application_name "...-read"), opened
// once LISTEN is in place: the snapshots new streams ask for, and after every
// reconnect the catch-up and the live records of every user with an open
// stream, as the wal source's read connection does. Both read the primary
// itself, which makes the visibility argument hold: PostgreSQL delivers a
// notification only once the notifying transaction is committed and visible
// to new snapshots on that server, so a query that starts after the
// notification (or after the stream subscribed) sees the row. A replica
// behind DATABASE_URL might not have it yet, so the query pool is never used
// here. Two connections per process, however many streams are open, and a
// stream that waits costs the database nothing.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// notifyChannel and the payload "<user_id>:<id>" are the shared decision
	// with the trigger `migrate` installs (threeds_records_notify_insert).
	notifyChannel = "threeds_records_inserted"
	notifyTrigger = "threeds_records_notify_insert"

	// drainWindow is how long the listener keeps reading after a
	// notification so that notifications that arrived together (one
	// transaction inserting many rows, or a burst) become one read. It
	// runs from the first notification, not the latest: renewed by each
	// one, a writer that never pauses for a millisecond would hold the
	// first back until maxDrain had arrived (a second at 1,000 commits/s).
	drainWindow = time.Millisecond
	maxDrain    = 1000
)

// notification is one parsed payload.
type notification struct {
	userID, id int64
	at         time.Time
}

// notifySource is the LISTEN session.
type notifySource struct {
	h     *hub
	probe string // this process's probe channel

	// noStatementTimeout: the target refused the statement_timeout startup
	// parameter (a pooler, see statementTimeoutFallback); connect without
	// it from then on. Reads stay bounded by their client-side deadline.
	noStatementTimeout atomic.Bool
}

func newNotifySource(h *hub) *notifySource {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &notifySource{h: h, probe: "threeds_records_probe_" + hex.EncodeToString(b[:])}
}

// session runs one LISTEN session: connect, LISTEN, probe, then serve reads
// until the connection fails. up reports whether it got as far as listening.
func (n *notifySource) session(ctx context.Context, everUp bool) (up bool, err error) {
	h := n.h
	heardBefore := h.heard.Load()
	// incoming and probed are written by OnNotification, which pgx calls
	// on this goroutine from inside whatever call is reading the socket.
	var incoming []notification
	probed := false
	cfg := n.connConfig()
	cfg.OnNotification = func(_ *pgconn.PgConn, note *pgconn.Notification) {
		switch note.Channel {
		case notifyChannel:
			h.notifications.Add(1)
			if uid, id, ok := parsePayload(note.Payload); ok {
				h.heardOf(id)
				incoming = append(incoming, notification{userID: uid, id: id, at: time.Now()})
			} else {
				h.badPayloads.Add(1)
			}
		case n.probe:
			probed = true
		}
	}
	conn, err := n.connect(ctx, cfg)
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer closeConn(conn)
	pg := conn.PgConn()

	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel+"; LISTEN "+n.probe); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "25006" { // read_only_sql_transaction
			return false, &unavailableError{
				details: directSession + " (it points at a hot standby, which cannot LISTEN)",
				fix:     "DATABASE_LISTEN_URL to a direct session to the primary (not a standby, not a transaction-mode pooler)",
				err:     err,
			}
		}
		return false, fmt.Errorf("listen: %w", err)
	}

	// Prove that notifications reach this session: a pooler in transaction
	// mode accepts LISTEN but hands the server connection to other clients
	// afterwards, so nothing is ever delivered. The probe must come from
	// another session: a session's own NOTIFY reaches it even there.
	if err := n.sendProbe(ctx); err != nil {
		return false, fmt.Errorf("probe: %w", err)
	}
	deadline := time.Now().Add(h.cfg.probeTimeout)
	for !probed {
		wctx, cancel := context.WithDeadline(ctx, deadline)
		err := pg.WaitForNotification(wctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			if time.Now().Before(deadline) || pg.IsClosed() {
				return false, fmt.Errorf("wait for the probe: %w", err)
			}
			return false, &unavailableError{
				details: directSession + " (LISTEN was accepted but no notification arrived within " + h.cfg.probeTimeout.String() + ": a pooler in transaction mode?)",
				fix:     "DATABASE_LISTEN_URL to a direct session to the primary, bypassing PgBouncer or any transaction-mode pooler",
				err:     errors.New("the self-probe notification never arrived"),
			}
		}
	}

	// Only a trigger that fires for the writer's sessions counts: O
	// (origin and local) or A (always). D never fires and R fires only for
	// replication sessions; migrate treats both as not in place, too.
	qctx, cancel := context.WithTimeout(ctx, h.cfg.queryTimeout)
	var hasTrigger bool
	err = conn.QueryRow(qctx, `
SELECT EXISTS (SELECT 1 FROM pg_trigger
                WHERE tgrelid = to_regclass('threeds_records') AND tgname = $1 AND tgenabled IN ('O', 'A'))`,
		notifyTrigger).Scan(&hasTrigger)
	cancel()
	if err != nil {
		return false, fmt.Errorf("look for the notify trigger: %w", err)
	}
	if !hasTrigger {
		return false, &unavailableError{
			details: "the database has no notify trigger on threeds_records; run `threeds-records migrate`",
			fix:     "run `threeds-records migrate` against the primary (it installs trigger " + notifyTrigger + ")",
			err:     errors.New("trigger " + notifyTrigger + " is missing, disabled or enabled for replicas only"),
		}
	}

	// Snapshots, catch-ups and resyncs go on a connection of their own, as
	// the wal source's do: on the LISTEN session they took turns with the
	// notified records, so a burst of connects (thousands of snapshot
	// statements) held a ready stream's new passcode behind them, and each
	// new stream had to interrupt the wait for notifications.
	read, err := n.connect(ctx, n.readConfig())
	if err != nil {
		return false, fmt.Errorf("connect for reads: %w", err)
	}
	defer closeConn(read)

	// LISTEN came first, so everything committed from here on is notified;
	// re-reading the live records of every open stream now covers whatever
	// was committed while no session was listening.
	h.sourceUpAgain(everUp, heardBefore)

	return true, h.withReads(ctx, read, nil, func(ctx context.Context) error {
		return n.listen(ctx, conn, &incoming)
	})
}

// listen serves notifications until ctx ends or the session fails: the
// records of those for open streams are read on the session itself.
// incoming is what OnNotification appended.
func (n *notifySource) listen(ctx context.Context, conn *pgx.Conn, incoming *[]notification) error {
	pg := conn.PgConn()
	for {
		// The records of the notifications heard so far (those heard during
		// a read wait for the next round).
		for pending := len(*incoming); pending > 0; {
			batch, consumed := n.streamedIDs((*incoming)[:pending])
			*incoming = (*incoming)[:copy(*incoming, (*incoming)[consumed:])]
			pending -= consumed
			if err := n.readBatch(ctx, conn, batch); err != nil {
				return err
			}
		}
		if len(*incoming) > 0 {
			continue
		}
		if err := pg.WaitForNotification(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("wait for notification: %w", err)
		}
		// Batching only pays when there is something to read: the writer's
		// notifications for users nobody streams are most of them, and a
		// timed drain after each would cost a timer, a deadline and a
		// wake-up apiece (about 70 µs of CPU per notification measured by
		// make bench's pgbench phase).
		if n.streamedAmong(*incoming) {
			if err := n.drain(ctx, pg); err != nil {
				return err
			}
		}
	}
}

// connect opens one connection with cfg, without statement_timeout at
// start-up if a pooler refused it, and then with it SET: the reads need the
// server-side bound to fail without closing the session (liveread.go).
func (n *notifySource) connect(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil && n.refusedStatementTimeout(err) {
		delete(cfg.RuntimeParams, "statement_timeout")
		conn, err = pgx.ConnectConfig(ctx, cfg)
	}
	if err != nil {
		return nil, err
	}
	if n.noStatementTimeout.Load() {
		if _, err := conn.Exec(ctx, "SET statement_timeout = "+strconv.FormatInt(n.h.cfg.queryTimeout.Milliseconds(), 10)); err != nil {
			closeConn(conn)
			return nil, fmt.Errorf("set statement_timeout: %w", err)
		}
	}
	return conn, nil
}

// readConfig is the read connection's: DATABASE_LISTEN_URL's settings under
// an application_name of its own, so that the LISTEN session alone answers
// to DATABASE_LISTEN_URL's name in pg_stat_activity.
func (n *notifySource) readConfig() *pgx.ConnConfig {
	cfg := n.connConfig()
	cfg.RuntimeParams["application_name"] += "-read"
	return cfg
}

func closeConn(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// drain reads whatever notifications arrive within drainWindow of the first.
func (n *notifySource) drain(ctx context.Context, pg *pgconn.PgConn) error {
	dctx, cancel := context.WithTimeout(ctx, drainWindow)
	defer cancel()
	for range maxDrain {
		err := pg.WaitForNotification(dctx)
		timedOut := dctx.Err() != nil
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if timedOut && !pg.IsClosed() {
				return nil
			}
			return fmt.Errorf("wait for notification: %w", err)
		}
	}
	return nil
}

// connConfig is a copy of DATABASE_LISTEN_URL's settings for one connection.
// Its sessions wait on the server for long stretches; without keepalives a
// peer that vanished (failover without a reset) would leave them waiting
// for minutes. Keepalives cost the database no transaction.
func (n *notifySource) connConfig() *pgx.ConnConfig {
	cfg := n.h.cfg.conn.Copy()
	cfg.DialFunc = keepaliveDialer().DialContext
	if n.noStatementTimeout.Load() {
		delete(cfg.RuntimeParams, "statement_timeout")
	} else if _, set := cfg.RuntimeParams["statement_timeout"]; !set {
		// Reads on the session rely on it (liveread.go): main sets it from
		// DB_QUERY_TIMEOUT; a hub built another way gets the same.
		cfg.RuntimeParams["statement_timeout"] = strconv.FormatInt(n.h.cfg.queryTimeout.Milliseconds(), 10)
	}
	return cfg
}

// refusedStatementTimeout reports a pooler's refusal of the statement_timeout
// startup parameter; the next attempt goes without it, and the self-probe
// then tells whether LISTEN works there. No log line of its own: when the
// pooler is DATABASE_URL's too, the pool's warning has said it once, and
// otherwise the probe's verdict says what to set.
func (n *notifySource) refusedStatementTimeout(err error) bool {
	if !refusesStatementTimeout(err) {
		return false
	}
	n.noStatementTimeout.Store(true)
	return true
}

// sendProbe notifies the probe channel from a session of its own.
func (n *notifySource) sendProbe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, n.h.cfg.probeTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, n.connConfig())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	// No parameters: the simple protocol, which works through any pooler.
	_, err = conn.Exec(ctx, "NOTIFY "+n.probe)
	return err
}

// parsePayload reads "<user_id>:<id>", both positive decimal int64.
func parsePayload(s string) (userID, id int64, ok bool) {
	u, i, found := strings.Cut(s, ":")
	if !found {
		return 0, 0, false
	}
	var err error
	if userID, err = strconv.ParseInt(u, 10, 64); err != nil || userID <= 0 {
		return 0, 0, false
	}
	if id, err = strconv.ParseInt(i, 10, 64); err != nil || id <= 0 {
		return 0, 0, false
	}
	return userID, id, true
}

// streamedAmong reports whether a notification in incoming is for a user
// with an open stream.
func (n *notifySource) streamedAmong(incoming []notification) bool {
	for _, note := range incoming {
		if n.h.streamed(note.userID) {
			return true
		}
	}
	return false
}

// notifiedBatch is what one read of notified records covers.
type notifiedBatch struct {
	ids      []int64
	notified map[int64]time.Time // id -> when the source heard of it
	owners   map[int64]int64     // id -> the payload's user (only to re-read that user if the id's read fails)
}

// streamedIDs collects the record ids the next read covers and reports how
// many of incoming it consumed. Notifications of users without an open
// stream are dropped here: no read for them (a stream that subscribes later
// reads its snapshot after the record was committed, so it sees it).
func (n *notifySource) streamedIDs(incoming []notification) (b notifiedBatch, consumed int) {
	for _, note := range incoming {
		if consumed == maxDrain {
			break
		}
		consumed++
		if !n.h.streamed(note.userID) {
			continue
		}
		if b.notified == nil {
			b.notified = make(map[int64]time.Time)
			b.owners = make(map[int64]int64)
		}
		if _, dup := b.notified[note.id]; !dup {
			b.notified[note.id] = note.at
			b.owners[note.id] = note.userID
			b.ids = append(b.ids, note.id)
		}
	}
	return b, consumed
}

// readBatch reads and delivers the notified records. A record whose own read
// fails is not lost: its user's live records are read again instead (the
// streams' sent sets drop what they already have), and a user whose read
// fails too has its streams ended with `unavailable`. err means the session
// is lost.
func (n *notifySource) readBatch(ctx context.Context, conn *pgx.Conn, b notifiedBatch) error {
	if len(b.ids) == 0 {
		return nil
	}
	h := n.h
	byUser, failedIDs, err := h.readNotified(ctx, conn, b.ids, b.notified)
	if err != nil {
		return err
	}
	h.deliver(nil, byUser)
	if len(failedIDs) == 0 {
		return nil
	}
	seen := make(map[int64]bool)
	var users []int64
	for _, id := range failedIDs {
		if uid := b.owners[id]; !seen[uid] {
			seen[uid] = true
			users = append(users, uid)
		}
	}
	byUser, failed, err := h.readLive(ctx, conn, users)
	if err != nil {
		return err
	}
	h.deliver(nil, byUser)
	h.endUsers(failed)
	return nil
}
