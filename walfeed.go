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

// serveReads reads the snapshots and resyncs the hub asks for, in the
// bounded batches of liveread.go, each delivered as it is read; a user
// whose read keeps failing has its streams ended (`unavailable`).
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
		if err := f.readSnapshots(ctx, read, users, snap); err != nil {
			// The streams not ready yet stay so; the resync after the
			// reconnect covers them.
			h.requestResync()
			return err
		}
	}
}

// readSnapshots reads users batch by batch and hands each batch's streams
// their snapshot, then what was held for them meanwhile.
func (f *walFeed) readSnapshots(ctx context.Context, read *pgx.Conn, users []int64, snap []*stream) error {
	h := f.h
	defer func() {
		f.mu.Lock()
		f.inFlight, f.held = nil, nil
		f.mu.Unlock()
	}()
	byStream := make(map[int64][]*stream)
	for _, st := range snap {
		byStream[st.userID] = append(byStream[st.userID], st)
	}
	for batch := range chunks(users, liveUsersBatch) {
		byUser, failed, err := h.readLive(ctx, read, batch)
		if err != nil {
			return err
		}
		// Ended first, so a stream whose read failed is not told ready.
		h.endUsers(failed)
		var ready []*stream
		held := make(map[int64][]*frame)
		f.mu.Lock()
		for _, uid := range batch {
			ready = append(ready, byStream[uid]...)
			if frames := f.held[uid]; len(frames) > 0 {
				held[uid] = frames
			}
			delete(f.held, uid)
			delete(f.inFlight, uid)
		}
		h.deliver(ready, byUser)
		if len(held) > 0 {
			h.deliver(nil, held)
		}
		f.mu.Unlock()
	}
	if len(users) == 0 {
		h.deliver(snap, nil)
	}
	return nil
}
