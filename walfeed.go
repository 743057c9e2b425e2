package main

// What the wal source hands the registry (streams.go): each commit's records
// as the decoder renders them, while the hub serves the snapshot and resync
// reads on the source's plain connection (withReads). Decoding goes on while
// a snapshot is read, so a record may reach the registry before the snapshot
// of a stream that subscribed earlier: the registry holds it for that stream
// and hands it over right after the snapshot.

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
