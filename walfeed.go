package main

// What the wal source hands the registry (streams.go): each commit's records
// as the decoder renders them, and the snapshot and resync reads it serves
// on its plain connection meanwhile. Decoding goes on while a snapshot is
// read, so a record may reach the registry before the snapshot of a stream
// that subscribed earlier: the registry holds it for that stream and hands
// it over right after the snapshot.

import (
	"context"

	"github.com/jackc/pgx/v5"
)

type walFeed struct {
	h    *hub
	kick chan struct{} // a commit asked for a resync
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
	for _, frames := range c.byUser {
		for _, fr := range frames {
			f.h.heardOf(fr.id)
		}
	}
	f.h.deliver(nil, c.byUser)
}

// serveReads reads the snapshots and resyncs the hub asks for (liveread.go:
// bounded batches, a user whose read keeps failing has its streams ended).
func (f *walFeed) serveReads(ctx context.Context, read *pgx.Conn) error {
	h := f.h
	for {
		did, err := h.serveSnapshots(ctx, read, nil)
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
		case <-f.kick:
		}
		h.doneWaiting()
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}
