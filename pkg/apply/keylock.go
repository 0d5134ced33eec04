package apply

import (
	"context"
	"encoding/binary"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Key locks serialise the transactions of different source regions that
// write the same key in this region.
//
// Every source region is applied on its own session, and each
// transaction runs on a REPEATABLE READ snapshot. Two transactions that
// both find a row write it, so one of them fails with a serialization
// failure and is applied again on a snapshot that shows the other. Two
// that find no row do not meet: say region eu deleted key k (the row is
// already gone here, so the delete leaves a tombstone stamped with eu's
// commit time) while region na's older insert of k is applied on
// another session whose snapshot predates eu's tombstone (so it finds
// neither row nor tombstone and inserts). Both commit, and this region
// keeps na's row while every other region, which saw the two in some
// order, ends with the newer delete. The active-active benchmark showed
// it about once in 18,000 transactions on 100 hot rows.
//
// So before a run of transactions begins, its session takes a
// session-level advisory lock on the bucket of every key the run writes
// (hash of table and key values, keyLockBuckets buckets, in ascending
// order, so two sessions never wait for each other in a cycle), and
// releases them after the run's last COMMIT. A transaction whose keys
// another source is writing waits before its snapshot is taken, so it
// sees that source's commit. The locks are taken before BEGIN, when the
// session holds no row lock, so a local transaction that waits for an
// applied one cannot close a cycle with them. A table with REPLICA
// IDENTITY FULL locks one bucket for all its rows, and a streamed
// transaction, whose keys are not known when it begins, locks every
// bucket: other sources wait while it is applied. Buckets are shared by
// unrelated keys; that costs a wait, never a wrong result.
const (
	keyLockClass   = 1886546285 // the first key of the two-key advisory lock: "prism apply key"
	keyLockBuckets = 1024
)

// keyLockSQL takes the session-level locks of the buckets in $1, in the
// order given (unnest keeps the array's order).
var keyLockSQL = "SELECT count(pg_catalog.pg_advisory_lock(" + strconv.Itoa(keyLockClass) + ", b)) FROM unnest($1::int4[]) AS b"

// keyUnlockSQL releases every session-level advisory lock of the
// session: the applier takes no other.
const keyUnlockSQL = "SELECT pg_catalog.pg_advisory_unlock_all()"

// keyBuckets returns, in ascending order, the buckets of the keys that
// the transactions not skipped write.
func keyBuckets(txns []*decode.Txn, skip []bool) []int32 {
	seen := map[int32]bool{}
	for i, t := range txns {
		if skip != nil && skip[i] {
			continue
		}
		for j := range t.Changes {
			c := &t.Changes[j]
			if c.Rel == nil || (c.Op != decode.OpInsert && c.Op != decode.OpUpdate && c.Op != decode.OpDelete) {
				continue
			}
			for _, vs := range [][]decode.Value{c.New, c.Old} {
				if vs != nil {
					seen[keyBucket(c.Rel, vs)] = true
				}
			}
		}
	}
	out := make([]int32, 0, len(seen))
	for b := range seen {
		out = append(out, b)
	}
	slices.Sort(out)
	return out
}

// keyBucket is the bucket of the key that values vs of rel hold: its
// key columns, or the table alone under REPLICA IDENTITY FULL (every
// column is flagged as key there, so versions of one row differ).
func keyBucket(rel *decode.Relation, vs []decode.Value) int32 {
	h := fnv.New32a()
	var n [4]byte
	put := func(b []byte) {
		binary.BigEndian.PutUint32(n[:], uint32(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	put([]byte(rel.Schema))
	put([]byte(rel.Table))
	if rel.ReplicaIdentity != decode.IdentityFull {
		for i, col := range rel.Columns {
			if col.Key && i < len(vs) {
				h.Write([]byte{byte(vs[i].Kind)})
				put(vs[i].Data)
			}
		}
	}
	return int32(h.Sum32() % keyLockBuckets)
}

// allBuckets is every bucket, for a transaction whose keys are unknown.
func allBuckets() []int32 {
	out := make([]int32, keyLockBuckets)
	for i := range out {
		out[i] = int32(i)
	}
	return out
}

// int4Array is the text form of an int4[] parameter.
func int4Array(bs []int32) []byte {
	var sb strings.Builder
	sb.WriteByte('{')
	for i, b := range bs {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(strconv.Itoa(int(b)))
	}
	sb.WriteByte('}')
	return []byte(sb.String())
}

// lockKeys takes the key locks of buckets on s (see keyLockClass). The
// session counts as locked from the start: a statement that fails midway
// keeps the locks it took, which unlockKeys (or letting go of the
// session) releases.
func (s *session) lockKeys(ctx context.Context, buckets []int32) error {
	if len(buckets) == 0 {
		return nil
	}
	s.locked = true
	_, err := s.conn.Conn().PgConn().ExecParams(ctx, keyLockSQL, [][]byte{int4Array(buckets)}, nil, nil, nil).Close()
	if err != nil && s.conn.Conn().PgConn().IsClosed() {
		s.broken = true
	}
	return err
}

// unlockKeys releases the key locks s holds.
func (s *session) unlockKeys(ctx context.Context) {
	if !s.locked || s.broken {
		return
	}
	if _, err := s.conn.Conn().PgConn().Exec(ctx, keyUnlockSQL).ReadAll(); err != nil {
		s.broken = true
		return
	}
	s.locked = false
}
