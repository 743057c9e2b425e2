package main

// Decoding what the wal source receives: the replication protocol's CopyData
// messages (XLogData, keepalive) and, inside XLogData, the messages of the
// built-in pgoutput plugin (protocol versions 1 and 2; PostgreSQL's
// "Logical Replication Message Formats"). Only what the source needs is
// decoded: transactions, relations and inserts; the publication publishes
// nothing else.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
)

// pgEpochMicros is 2000-01-01 UTC in Unix microseconds: the replication
// protocol's times count microseconds from there.
const pgEpochMicros = 946_684_800_000_000

func pgTime(us int64) time.Time { return time.UnixMicro(us + pgEpochMicros) }

func pgMicros(t time.Time) int64 { return t.UnixMicro() - pgEpochMicros }

var errShortMessage = errors.New("message shorter than its fields")

// wireReader reads the big-endian fields of one message. The first field
// that does not fit sets err; later reads return zero values.
type wireReader struct {
	b   []byte
	err error
}

func (r *wireReader) take(n int) []byte {
	if r.err != nil || n < 0 || len(r.b) < n {
		r.err = errShortMessage
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *wireReader) u8() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *wireReader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *wireReader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (r *wireReader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// cstring reads a NUL-terminated string (copied: the buffer is reused).
func (r *wireReader) cstring() string {
	if r.err != nil {
		return ""
	}
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.b = r.b[i+1:]
			return s
		}
	}
	r.err = errShortMessage
	return ""
}

// xlogData is the header of a 'w' CopyData message; data is pgoutput's
// message and points into pgconn's read buffer.
type xlogData struct {
	walStart, walEnd uint64
	serverTime       time.Time
	data             []byte
}

func parseXLogData(b []byte) (xlogData, error) {
	r := wireReader{b: b}
	x := xlogData{walStart: r.u64(), walEnd: r.u64(), serverTime: pgTime(int64(r.u64()))}
	x.data = r.b
	return x, r.err
}

// keepalive is a 'k' CopyData message.
type keepalive struct {
	walEnd     uint64
	serverTime time.Time
	reply      bool
}

func parseKeepalive(b []byte) (keepalive, error) {
	r := wireReader{b: b}
	k := keepalive{walEnd: r.u64(), serverTime: pgTime(int64(r.u64())), reply: r.u8() != 0}
	return k, r.err
}

// standbyStatus is the 'r' message: everything up to lsn has been received,
// flushed and applied, which lets the server recycle the WAL before it.
func standbyStatus(lsn uint64, now time.Time) []byte {
	b := make([]byte, 0, 34)
	b = append(b, 'r')
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, uint64(pgMicros(now)))
	return append(b, 0)
}

// relation is what a Relation message says of a table: its name and where
// each column the source renders sits in an insert's tuple (-1: absent).
type relation struct {
	namespace, name string
	cols            relationColumns
}

type relationColumns struct {
	id, userID, passcode, amount, currency, merchant, expiresAfter, receivedAt int
	n                                                                          int // columns in a tuple
}

// parseRelation reads a Relation message after its type byte (and, inside a
// streamed transaction, its xid).
func parseRelation(r *wireReader) (relid uint32, rel *relation, err error) {
	relid = r.u32()
	rel = &relation{namespace: r.cstring(), name: r.cstring()}
	r.u8() // replica identity
	n := int(r.u16())
	c := relationColumns{-1, -1, -1, -1, -1, -1, -1, -1, n}
	for i := range n {
		r.u8() // flags
		name := r.cstring()
		r.u32() // type oid
		r.u32() // type modifier
		switch name {
		case "id":
			c.id = i
		case "user_id":
			c.userID = i
		case "passcode":
			c.passcode = i
		case "amount":
			c.amount = i
		case "currency":
			c.currency = i
		case "merchant_name":
			c.merchant = i
		case "expires_after":
			c.expiresAfter = i
		case "received_at":
			c.receivedAt = i
		}
	}
	rel.cols = c
	return relid, rel, r.err
}

// tupleColumn is one column of a tuple in text form; null for SQL NULL.
type tupleColumn struct {
	null bool
	text []byte // points into the read buffer
}

// parseTuple reads TupleData into cols (reused between calls).
func parseTuple(r *wireReader, cols []tupleColumn) ([]tupleColumn, error) {
	n := int(r.u16())
	cols = cols[:0]
	for range n {
		switch kind := r.u8(); kind {
		case 'n':
			cols = append(cols, tupleColumn{null: true})
		case 't':
			l := r.u32()
			cols = append(cols, tupleColumn{text: r.take(int(l))})
		case 'u':
			// An unchanged TOASTed value: only updates carry these.
			cols = append(cols, tupleColumn{null: true})
		default:
			if r.err == nil {
				return nil, fmt.Errorf("tuple column of kind %q (binary mode is never asked for)", kind)
			}
		}
	}
	return cols, r.err
}

// walRow is an inserted row of threeds_records, as the decoder holds it
// until its transaction commits.
type walRow struct {
	xid                        uint32 // the (sub)transaction that inserted it, in a streamed transaction
	userID, id, expiresAfter   int64
	passcode, amount, currency string
	merchant                   string
	receivedAt, expiresAt      time.Time
}

// receivedAtLayout is timestamptz's text form under DateStyle=ISO and
// TimeZone=UTC, which the replication session sets at connect.
const receivedAtLayout = "2006-01-02 15:04:05.999999999-07"

// row reads an insert's tuple by the columns the relation named. The
// columns that decide whether the row is wanted come first, and keep is
// asked before anything else is copied out of the buffer: most rows are
// another user's, and a backfill's are expired.
func (c *relationColumns) row(cols []tupleColumn, keep func(userID int64, expiresAt time.Time) bool) (w walRow, kept bool, err error) {
	if len(cols) != c.n {
		return w, false, fmt.Errorf("tuple of %d columns, relation of %d", len(cols), c.n)
	}
	text := func(i int, name string, nullable bool) ([]byte, error) {
		if i < 0 {
			return nil, fmt.Errorf("threeds_records has no column %s", name)
		}
		if cols[i].null && !nullable {
			return nil, fmt.Errorf("column %s is NULL", name)
		}
		return cols[i].text, nil
	}
	var b [8][]byte
	for k, f := range []struct {
		i        int
		name     string
		nullable bool
	}{
		{c.userID, "user_id", false}, {c.expiresAfter, "expires_after", false}, {c.receivedAt, "received_at", false},
		{c.id, "id", false}, {c.passcode, "passcode", false}, {c.amount, "amount", false},
		{c.currency, "currency", false}, {c.merchant, "merchant_name", true},
	} {
		if b[k], err = text(f.i, f.name, f.nullable); err != nil {
			return w, false, err
		}
	}
	if w.userID, err = strconv.ParseInt(string(b[0]), 10, 64); err != nil {
		return w, false, fmt.Errorf("user_id: %w", err)
	}
	if w.expiresAfter, err = strconv.ParseInt(string(b[1]), 10, 64); err != nil {
		return w, false, fmt.Errorf("expires_after: %w", err)
	}
	if w.receivedAt, err = time.Parse(receivedAtLayout, string(b[2])); err != nil {
		// infinity, BC dates: the list endpoint could not show them either.
		return w, false, fmt.Errorf("received_at: %w", err)
	}
	w.expiresAt = w.receivedAt.Add(time.Duration(w.expiresAfter) * time.Second)
	if !keep(w.userID, w.expiresAt) {
		return w, false, nil
	}
	if w.id, err = strconv.ParseInt(string(b[3]), 10, 64); err != nil {
		return w, false, fmt.Errorf("id: %w", err)
	}
	w.passcode, w.amount, w.currency, w.merchant = string(b[4]), string(b[5]), string(b[6]), string(b[7])
	return w, true, nil
}

// frame renders the row as the list endpoint does.
func (w *walRow) frame(notified time.Time) *frame {
	rec := newRecord(w.id, w.passcode, w.amount, w.currency, w.merchant, w.expiresAfter, w.receivedAt)
	return &frame{id: w.id, expires: w.expiresAt.Unix(), notified: notified, data: recordFrame(&rec)}
}

// walMaxHeld bounds the rows of one open transaction the decoder holds for
// streamed users. A transaction inserting more live rows than that is not
// held row by row: its commit asks for a resync instead, whose read starts
// after the commit and so covers them, in bounded batches.
const walMaxHeld = 100_000

// heldTxn is what an open transaction inserted that may have to be sent.
type heldTxn struct {
	rows     []walRow
	overflow bool
}

func (t *heldTxn) hold(w walRow) {
	if t.overflow {
		return
	}
	if len(t.rows) == walMaxHeld {
		t.rows, t.overflow = nil, true
		return
	}
	t.rows = append(t.rows, w)
}

// walCommit is what one committed transaction gives the streams.
type walCommit struct {
	byUser map[int64][]*frame // live rows of streamed users, in commit order
	resync bool               // too many rows to hold: re-read every open stream
}

// walDecoder follows pgoutput's messages: it learns the relations, holds
// the inserted rows of each transaction until it commits (dropping expired
// ones as they come, and a streamed transaction's rows when it aborts), and
// renders the live rows of streamed users at commit.
type walDecoder struct {
	streamed func(userID int64) bool
	// badRow is told of a row that cannot be rendered; the row is skipped.
	badRow func(err error)

	rels map[uint32]*relation
	cols []tupleColumn

	inTxn      bool // between Begin and Commit
	commitTime time.Time
	txn        heldTxn

	// Protocol 2 streams a large transaction in blocks before it commits.
	inStream  bool
	streamXid uint32
	streams   map[uint32]*heldTxn

	lastEnd uint64 // end of the last commit handled

	decoded, expired int64
}

func newWalDecoder(streamed func(int64) bool, badRow func(error)) *walDecoder {
	return &walDecoder{streamed: streamed, badRow: badRow, rels: make(map[uint32]*relation), streams: make(map[uint32]*heldTxn)}
}

// idle reports that no Begin..Commit is open: a keepalive's WAL end can then
// be acknowledged (PostgreSQL skips empty transactions, so without that the
// acknowledged position would only move with the table's own commits).
func (d *walDecoder) idle() bool { return !d.inTxn }

// handle processes one pgoutput message. serverTime is the WAL sender's
// clock when it sent the message: a row already expired by it is expired at
// any later commit too. commit is non-nil when a transaction committed.
func (d *walDecoder) handle(msg []byte, serverTime time.Time) (commit *walCommit, err error) {
	if len(msg) == 0 {
		return nil, errShortMessage
	}
	r := wireReader{b: msg[1:]}
	switch msg[0] {
	case 'B': // Begin
		r.u64() // final LSN
		d.commitTime = pgTime(int64(r.u64()))
		d.inTxn = true
		d.txn = heldTxn{rows: d.txn.rows[:0]}
	case 'C': // Commit
		r.u8()  // flags
		r.u64() // commit LSN
		end := r.u64()
		at := pgTime(int64(r.u64()))
		if r.err != nil {
			break
		}
		commit = d.finish(&d.txn, at)
		clear(d.txn.rows)
		d.inTxn, d.lastEnd = false, end
	case 'S': // Stream Start
		d.streamXid = r.u32()
		d.inStream = true
		if d.streams[d.streamXid] == nil {
			d.streams[d.streamXid] = &heldTxn{}
		}
	case 'E': // Stream Stop
		d.inStream = false
	case 'c': // Stream Commit
		xid := r.u32()
		r.u8()  // flags
		r.u64() // commit LSN
		end := r.u64()
		at := pgTime(int64(r.u64()))
		if r.err != nil {
			break
		}
		if t := d.streams[xid]; t != nil {
			delete(d.streams, xid)
			commit = d.finish(t, at)
		}
		d.lastEnd = max(d.lastEnd, end)
	case 'A': // Stream Abort: of the transaction, or of one subtransaction
		xid, sub := r.u32(), r.u32()
		if t := d.streams[xid]; t != nil && r.err == nil {
			if sub == xid {
				delete(d.streams, xid)
			} else {
				t.rows = slices.DeleteFunc(t.rows, func(w walRow) bool { return w.xid == sub })
			}
		}
	case 'R': // Relation
		if d.inStream {
			r.u32()
		}
		relid, rel, perr := parseRelation(&r)
		if perr == nil {
			d.rels[relid] = rel
		}
	case 'I': // Insert
		err := d.insert(&r, serverTime)
		if err != nil {
			return nil, err
		}
	default:
		// Type, Origin, Truncate, Update, Delete, Message: nothing to send.
	}
	if r.err != nil {
		return nil, fmt.Errorf("pgoutput message %q: %w", msg[0], r.err)
	}
	return commit, nil
}

// insert holds a new row if it may have to be sent.
func (d *walDecoder) insert(r *wireReader, serverTime time.Time) error {
	var xid uint32
	if d.inStream {
		xid = r.u32()
	}
	relid := r.u32()
	if kind := r.u8(); kind != 'N' && r.err == nil {
		return fmt.Errorf("insert with tuple kind %q", kind)
	}
	cols, err := parseTuple(r, d.cols)
	if err != nil {
		return fmt.Errorf("insert: %w", err)
	}
	d.cols = cols
	rel := d.rels[relid]
	if rel == nil {
		return fmt.Errorf("insert into relation %d, which no Relation message described", relid)
	}
	if rel.name != "threeds_records" {
		return nil
	}
	d.decoded++
	// A whole transaction arrives after its commit: a user who subscribes
	// from now on reads its rows in the snapshot, so only users streamed now
	// matter, and the commit time says what has expired. A streamed
	// transaction has not committed yet: who is streamed is decided at its
	// commit, and a row expired by the server's clock now is expired then.
	clock := d.commitTime
	if d.inStream {
		clock = serverTime
	}
	w, kept, err := rel.cols.row(cols, func(userID int64, expiresAt time.Time) bool {
		if !expiresAt.After(clock) {
			d.expired++
			return false
		}
		return d.inStream || d.streamed(userID)
	})
	switch {
	case err != nil:
		d.badRow(err)
	case !kept:
	case d.inStream:
		w.xid = xid
		d.streams[d.streamXid].hold(w)
	default:
		d.txn.hold(w)
	}
	return nil
}

// finish renders a committed transaction's rows for the users streamed now.
func (d *walDecoder) finish(t *heldTxn, at time.Time) *walCommit {
	if t.overflow {
		return &walCommit{resync: true}
	}
	if len(t.rows) == 0 {
		return nil
	}
	now := time.Now()
	c := &walCommit{byUser: make(map[int64][]*frame)}
	for i := range t.rows {
		w := &t.rows[i]
		if w.expiresAt.After(at) && d.streamed(w.userID) {
			c.byUser[w.userID] = append(c.byUser[w.userID], w.frame(now))
		}
	}
	if len(c.byUser) == 0 {
		return nil
	}
	return c
}
