package main

// The reads both sources use for snapshots and resyncs (and the notify
// source for the records its notifications name): live records, oldest
// first, rendered once into the frames the streams share.
//
// What they must cost and must not break (contract section 6, "Staying up
// where it really runs"):
//   - a read costs in proportion to the live records it returns, not to the
//     users' history: per user, two index ranges (liveRecordsSQL);
//   - users go in bounded batches, each its own statement under the
//     session's statement_timeout (DB_QUERY_TIMEOUT), so 10,000 open streams
//     are 20 short statements, not one that the timeout kills every time;
//   - a failed statement is not a failed session: the server-side timeout
//     and row errors leave the connection usable, so the batch is split
//     until the failure is one user's, and only that user's streams end
//     (`unavailable`; the client reconnects). Only a lost connection, or a
//     database that fails every statement, ends the session.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// longLivedSeconds splits the live records in two index ranges. A record
	// with expires_after <= longLivedSeconds is live only if it was received
	// within the last longLivedSeconds: a range of the page index. The
	// others (a passcode lives minutes; these are rare) are found through
	// the partial index threeds_records_long_lived_idx, whose predicate
	// (schema.sql) must stay this number, literally.
	longLivedSeconds = 86400

	// liveUsersBatch is how many users one statement reads.
	liveUsersBatch = 500
	// liveIDsBatch is how many notified ids one statement reads.
	liveIDsBatch = 1000
	// A read whose isolation finds maxFailedKeys keys failing one after the
	// other, or needs maxFailedStatements failed statements in all, is not
	// one user's bad row but a database in trouble: the session is given up
	// (the resync after the reconnect retries everyone) rather than
	// splitting further. One bad user in a batch of 500 costs 9 failed
	// statements (the halvings down to it).
	maxFailedKeys       = 4
	maxFailedStatements = 24

	// catchUpRows bounds the catch-up read after a reconnect: the newest
	// rows since the last id heard of, at most this many (10 s of a
	// 1,000-insert/s writer). A longer gap leaves the older ones to the
	// resync that follows, which covers everything anyway.
	catchUpRows = 10000
)

// liveUsersSQL reads every live record of the users in $1, oldest first.
// Per user (LATERAL, a nested loop over the array) two index ranges:
// received within the last longLivedSeconds, and the long-lived ones. Both
// are index-only scans once the table is vacuumed (every column is in both
// indexes). Liveness is written as received_at > now() - expires_after so
// that no row can overflow the arithmetic (received_at + a large
// expires_after can exceed the timestamp range and fail the statement).
// Non-finite received_at ('infinity') cannot be rendered: such rows are
// skipped, like every other user's push goes on.
const liveUsersSQL = `
SELECT r.user_id, r.id, r.passcode, r.amount::text, r.currency, COALESCE(r.merchant_name, ''), r.expires_after, r.received_at
  FROM unnest($1::bigint[]) AS u(user_id)
 CROSS JOIN LATERAL (
        SELECT t.user_id, t.id, t.passcode, t.amount, t.currency, t.merchant_name, t.expires_after, t.received_at
          FROM threeds_records t
         WHERE t.user_id = u.user_id
           AND t.received_at > now() - interval '86400 seconds'
           AND t.expires_after <= 86400
           AND t.received_at > now() - t.expires_after * interval '1 second'
           AND isfinite(t.received_at)
        UNION ALL
        SELECT t.user_id, t.id, t.passcode, t.amount, t.currency, t.merchant_name, t.expires_after, t.received_at
          FROM threeds_records t
         WHERE t.user_id = u.user_id
           AND t.expires_after > 86400
           AND t.received_at > now() - t.expires_after * interval '1 second'
           AND isfinite(t.received_at)
       ) r
 ORDER BY r.received_at, r.id`

// liveIDsSQL reads the live ones among the ids in $1 (primary key). The
// row's own user_id routes it, never a notification's payload.
const liveIDsSQL = `
SELECT user_id, id, passcode, amount::text, currency, COALESCE(merchant_name, ''), expires_after, received_at
  FROM threeds_records
 WHERE id = ANY($1)
   AND received_at > now() - expires_after * interval '1 second'
   AND isfinite(received_at)
 ORDER BY received_at, id`

// liveSinceSQL is the catch-up read: the live records among the newest $2
// (catchUpRows) rows with an id above $1 (a backward range of the primary
// key, whatever the history), oldest first. A record whose transaction took its
// id before the gap and committed after it has a smaller id: the resync
// finds it.
const liveSinceSQL = `
SELECT user_id, id, passcode, amount::text, currency, COALESCE(merchant_name, ''), expires_after, received_at
  FROM (SELECT user_id, id, passcode, amount, currency, merchant_name, expires_after, received_at
          FROM threeds_records
         WHERE id > $1
         ORDER BY id DESC
         LIMIT $2) t
 WHERE received_at > now() - expires_after * interval '1 second'
   AND isfinite(received_at)
 ORDER BY received_at, id`

// errSessionLost is a read that failed because the session itself did.
var errSessionLost = errors.New("the source session was lost during a read")

// liveReader runs the reads of one snapshot, resync or notification batch
// on one connection.
type liveReader struct {
	h                *hub
	conn             *pgx.Conn
	notified         map[int64]time.Time // when the source heard of an id (lag histogram)
	failedStatements int                 // in this read
	failedKeys       int                 // isolated failures since the last success
}

// readLive reads the live records of users, in batches of liveUsersBatch,
// isolating failures: failed are the users whose own read kept failing.
// err is returned only when the session is lost (the connection closed, ctx
// ended, or every statement fails): then nothing of this read is delivered
// and the source reconnects and resyncs.
func (h *hub) readLive(ctx context.Context, conn *pgx.Conn, users []int64) (byUser map[int64][]*frame, failed []int64, err error) {
	r := &liveReader{h: h, conn: conn}
	byUser = make(map[int64][]*frame)
	for batch := range chunks(users, liveUsersBatch) {
		f, err := r.isolate(ctx, liveUsersSQL, batch, byUser)
		if err != nil {
			return nil, nil, err
		}
		failed = append(failed, f...)
	}
	return byUser, failed, nil
}

// readNotified reads the live ones among ids; failed are ids whose own read
// kept failing (the caller re-reads their users instead of losing them).
func (h *hub) readNotified(ctx context.Context, conn *pgx.Conn, ids []int64, notified map[int64]time.Time) (byUser map[int64][]*frame, failed []int64, err error) {
	r := &liveReader{h: h, conn: conn, notified: notified}
	byUser = make(map[int64][]*frame)
	for batch := range chunks(ids, liveIDsBatch) {
		f, err := r.isolate(ctx, liveIDsSQL, batch, byUser)
		if err != nil {
			return nil, nil, err
		}
		failed = append(failed, f...)
	}
	return byUser, failed, nil
}

// serveSnapshots reads what the registry asks for (new streams' snapshots,
// or every open stream after a resync request) batch by batch, delivering
// each batch as it is read so the first streams are ready without waiting
// for the last. Users whose read keeps failing have their streams ended
// with `unavailable`. did reports whether there was anything to read.
func (h *hub) serveSnapshots(ctx context.Context, conn *pgx.Conn) (did bool, err error) {
	if from := h.takeCatchUp(); from > 0 {
		if err := h.catchUp(ctx, conn, from); err != nil {
			h.requestResync()
			return true, err
		}
	}
	users, snap := h.takeSnapshots()
	if len(users) == 0 && len(snap) == 0 {
		return false, nil
	}
	byStream := make(map[int64][]*stream)
	for _, st := range snap {
		byStream[st.userID] = append(byStream[st.userID], st)
	}
	for batch := range chunks(users, liveUsersBatch) {
		byUser, failed, err := h.readLive(ctx, conn, batch)
		if err != nil {
			// The streams of this read that are not ready yet stay so; the
			// resync after the reconnect covers them.
			h.requestResync()
			return true, err
		}
		// Ended first, so a stream whose read failed is not told ready.
		h.endUsers(failed)
		var ready []*stream
		for _, uid := range batch {
			ready = append(ready, byStream[uid]...)
		}
		h.deliver(ready, byUser)
	}
	// Snapshot streams with no user in the read (none today) must not hang.
	if len(users) == 0 {
		h.deliver(snap, nil)
	}
	return true, nil
}

// withReads runs a source's feed (the LISTEN loop, the WAL decoder) while a
// goroutine serves the reads on read; whichever ends first ends the other,
// and the error is the one that ended the session.
func (h *hub) withReads(ctx context.Context, read *pgx.Conn, kick <-chan struct{}, feed func(context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	readErr := make(chan error, 1)
	go func() {
		readErr <- h.serveReads(ctx, read, kick)
		cancel()
	}()
	err := feed(ctx)
	cancel()
	rerr := <-readErr
	if err == nil || (errors.Is(err, context.Canceled) && rerr != nil && !errors.Is(rerr, context.Canceled)) {
		err = rerr
	}
	return err
}

// serveReads reads the snapshots, catch-ups and resyncs the hub asks for on
// a connection of their own, until ctx ends or the connection fails: bounded
// batches, a user whose read keeps failing has its streams ended. A
// subscribing stream wakes it through the registry (waitForWork), kick
// through a source: no deadline on a connection is touched to wake it.
func (h *hub) serveReads(ctx context.Context, read *pgx.Conn, kick <-chan struct{}) error {
	for {
		did, err := h.serveSnapshots(ctx, read)
		if err != nil {
			return err
		}
		if did {
			continue
		}
		wctx, cancel, busy := h.waitForWork(ctx)
		if busy {
			continue
		}
		select {
		case <-wctx.Done():
		case <-kick:
		}
		h.doneWaiting()
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// catchUp delivers what was committed after id before the resync reads every
// open stream: after a failover the passcodes stored during the gap reach
// their streams in one read of the newest rows, not at a random place in a
// resync of 10,000 users (20 reads). A failed read is left to the resync;
// err means the session is lost.
func (h *hub) catchUp(ctx context.Context, conn *pgx.Conn, id int64) error {
	r := &liveReader{h: h, conn: conn}
	byUser, err := r.query(ctx, liveSinceSQL, id, catchUpRows)
	if err != nil {
		if conn.IsClosed() || ctx.Err() != nil {
			return fmt.Errorf("%w: %w", errSessionLost, err)
		}
		h.logger.Warn("live updates: the catch-up read after the reconnect failed; the resync covers it", "error", err.Error())
		return nil
	}
	for _, frames := range byUser {
		h.caughtUp.Add(int64(len(frames)))
	}
	h.deliver(nil, byUser)
	return nil
}

// endUsers ends every stream of users with `unavailable`: the service cannot
// read their records, and their clients reconnect (and read again) later.
func (h *hub) endUsers(users []int64) {
	if len(users) == 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, uid := range users {
		for _, st := range append([]*stream(nil), h.users[uid]...) {
			h.kickLocked(st, endUnavailable)
		}
	}
	h.logger.Warn("live updates: ended the streams of users whose records could not be read; their clients reconnect and read again",
		"users", len(users))
}

// isolate reads keys (users or ids) with query into byUser. A failed
// statement is split in halves until the failure is one key's: failed are
// those keys. err means the session is lost.
func (r *liveReader) isolate(ctx context.Context, query string, keys []int64, byUser map[int64][]*frame) (failed []int64, err error) {
	got, err := r.query(ctx, query, keys)
	if err == nil {
		r.failedKeys = 0
		for uid, frames := range got {
			byUser[uid] = append(byUser[uid], frames...)
		}
		return nil, nil
	}
	if r.conn.IsClosed() || ctx.Err() != nil {
		return nil, fmt.Errorf("%w: %w", errSessionLost, err)
	}
	r.failedStatements++
	if r.failedStatements >= maxFailedStatements {
		return nil, fmt.Errorf("read records: %d statements of one read failed: %w", r.failedStatements, err)
	}
	if len(keys) == 1 {
		if r.failedKeys++; r.failedKeys >= maxFailedKeys {
			return nil, fmt.Errorf("read records: %d keys failed one after the other: %w", r.failedKeys, err)
		}
		r.h.logger.Warn("live updates: the read of one user's or record's rows failed; it is isolated", "key", keys[0], "error", err.Error())
		return keys, nil
	}
	half := len(keys) / 2
	a, err := r.isolate(ctx, query, keys[:half], byUser)
	if err != nil {
		return nil, err
	}
	b, err := r.isolate(ctx, query, keys[half:], byUser)
	if err != nil {
		return nil, err
	}
	return append(a, b...), nil
}

// query runs one statement. statement_timeout (DB_QUERY_TIMEOUT, a runtime
// parameter of the session) bounds it on the server and leaves the session
// usable; the client-side deadline is only a backstop, because pgx closes
// the connection when a context deadline interrupts a query.
func (r *liveReader) query(ctx context.Context, query string, args ...any) (map[int64][]*frame, error) {
	ctx, cancel := context.WithTimeout(ctx, readBackstop(r.h.cfg.queryTimeout))
	defer cancel()
	r.h.reads.Add(1)
	rows, err := r.conn.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	defer rows.Close()
	byUser := make(map[int64][]*frame)
	var (
		userID, id, expiresAfter             int64
		passcode, amount, currency, merchant string
		receivedAt                           time.Time
	)
	for rows.Next() {
		if err := rows.Scan(&userID, &id, &passcode, &amount, &currency, &merchant, &expiresAfter, &receivedAt); err != nil {
			return nil, fmt.Errorf("read records: %w", err)
		}
		rec := newRecord(id, passcode, amount, currency, merchant, expiresAfter, receivedAt)
		byUser[userID] = append(byUser[userID], &frame{
			id: id, expires: receivedAt.Unix() + expiresAfter, notified: r.notified[id], data: recordFrame(&rec),
		})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	return byUser, nil
}

// readBackstop is the client-side bound of one read: past the server's
// statement_timeout, so that the server's (which keeps the session) fires
// first.
func readBackstop(queryTimeout time.Duration) time.Duration {
	return 2*queryTimeout + time.Second
}

// chunks yields s in pieces of at most n.
func chunks(s []int64, n int) func(func([]int64) bool) {
	return func(yield func([]int64) bool) {
		for len(s) > 0 {
			k := min(n, len(s))
			if !yield(s[:k:k]) {
				return
			}
			s = s[k:]
		}
	}
}
