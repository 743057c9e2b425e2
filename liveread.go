package main

// The read both sources use for snapshots and resyncs (and the notify
// source for the records its notifications name): live records, oldest
// first, rendered once into the frames the streams share.

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// liveRecordsSQL reads, in one round trip, every live record of the users in
// $1 and the live ones among the ids in $2, oldest first. The row's own
// user_id routes it, never a notification's payload.
const liveRecordsSQL = `
SELECT user_id, id, passcode, amount::text, currency, COALESCE(merchant_name, ''),
       expires_after, received_at, received_at + expires_after * interval '1 second'
  FROM threeds_records
 WHERE (user_id = ANY($1) OR id = ANY($2))
   AND received_at + expires_after * interval '1 second' > now()
 ORDER BY received_at, id`

// readLive reads the live records of users and of ids on conn; notified
// says when the source heard of an id (for the lag histogram).
func (h *hub) readLive(ctx context.Context, conn *pgx.Conn, users, ids []int64, notified map[int64]time.Time) (map[int64][]*frame, error) {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.queryTimeout)
	defer cancel()
	h.reads.Add(1)
	if users == nil {
		users = []int64{}
	}
	if ids == nil {
		ids = []int64{}
	}
	rows, err := conn.Query(ctx, liveRecordsSQL, users, ids)
	if err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	defer rows.Close()
	byUser := make(map[int64][]*frame)
	var (
		userID, id, expiresAfter             int64
		passcode, amount, currency, merchant string
		receivedAt, expiresAt                time.Time
	)
	for rows.Next() {
		if err := rows.Scan(&userID, &id, &passcode, &amount, &currency, &merchant, &expiresAfter, &receivedAt, &expiresAt); err != nil {
			return nil, fmt.Errorf("read records: %w", err)
		}
		rec := newRecord(id, passcode, amount, currency, merchant, expiresAfter, receivedAt)
		byUser[userID] = append(byUser[userID], &frame{
			id: id, expires: expiresAt.Unix(), notified: notified[id], data: recordFrame(&rec),
		})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	return byUser, nil
}
