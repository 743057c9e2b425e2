package main

// What the wal source hands the registry (streams.go): each commit's records
// as the decoder renders them, and the snapshot and resync reads it serves
// on its plain connection meanwhile.

import (
	"context"
	"sync"

	"github.com/jackc/pgx/v5"
)

// walFeed hands the hub what the decoder and the reads produce. Decoding
// goes on while a snapshot is read, so live records of a user whose
// snapshot is being read are held and handed over right after that
// snapshot (the registry drops records for a stream not ready yet, and a
// record decoded during the read may have committed after the read began).
type walFeed struct {
	h    *hub
	kick chan struct{} // a commit asked for a resync

	mu       sync.Mutex // serialises hand-overs; guards what follows
	inFlight map[int64]bool
	held     map[int64][]*frame
}

// commit hands one transaction's records over.
func (f *walFeed) commit(c *walCommit) {
	if c.resync {
		f.h.requestResync()
		select {
		case f.kick <- struct{}{}:
		default:
		}
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for uid, frames := range c.byUser {
		if f.inFlight[uid] {
			f.held[uid] = append(f.held[uid], frames...)
			delete(c.byUser, uid)
		}
	}
	if len(c.byUser) > 0 {
		f.h.deliver(nil, c.byUser)
	}
}

// serveReads reads the snapshots and resyncs the hub asks for.
func (f *walFeed) serveReads(ctx context.Context, read *pgx.Conn) error {
	h := f.h
	for {
		f.mu.Lock()
		users, snap := h.takeSnapshots()
		if len(snap) > 0 {
			f.inFlight, f.held = make(map[int64]bool, len(snap)), make(map[int64][]*frame)
			for _, st := range snap {
				f.inFlight[st.userID] = true
			}
		}
		f.mu.Unlock()
		if len(users) == 0 && len(snap) == 0 {
			wctx, cancel, busy := h.waitForWork(ctx)
			if busy {
				continue
			}
			select {
			case <-wctx.Done():
			case <-f.kick:
			}
			h.doneWaiting()
			cancel()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		byUser, err := h.readLive(ctx, read, users, nil, nil)
		if err != nil {
			return err
		}
		f.mu.Lock()
		h.deliver(snap, byUser)
		if len(f.held) > 0 {
			h.deliver(nil, f.held)
		}
		f.inFlight, f.held = nil, nil
		f.mu.Unlock()
	}
}
