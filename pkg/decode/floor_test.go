package decode

import (
	"encoding/binary"
	"strconv"
	"strings"
	"testing"
	"time"
)

// mFloor is a FloorPrefix message; stream adds the xid of a stream block.
func mFloor(transactional bool, content string, stream bool, xid uint32) []byte {
	b := withXid('M', xid, stream)
	if transactional {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = append(b, make([]byte, 8)...)
	b = append(b, FloorPrefix+"\x00"...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(content)))
	return append(b, content...)
}

// TestAssemblerFloor checks that a transaction's clock floors raise the
// commit time it is shipped with to one microsecond past the greatest,
// in Begin ... Commit and in streamed transactions, and that only
// transactional floor messages count.
func TestAssemblerFloor(t *testing.T) {
	commit := pgEpoch.Add(time.Microsecond) // what mCommit and mStreamCommit carry
	us := func(tm time.Time) string { return strconv.FormatInt(tm.UnixMicro(), 10) }
	later := commit.Add(5 * time.Minute)
	for _, tc := range []struct {
		name string
		msgs [][]byte
		want time.Time
		err  string
	}{
		{"no floor", [][]byte{mBegin(100, 7), mCommit(100, 120)}, commit, ""},
		{"floor below the commit", [][]byte{mBegin(100, 7), mFloor(true, us(commit.Add(-time.Second)), false, 0), mCommit(100, 120)}, commit, ""},
		{"greatest floor wins", [][]byte{mBegin(100, 7), mFloor(true, us(later), false, 0), mFloor(true, us(later.Add(-time.Second)), false, 0), mCommit(100, 120)},
			later.Add(time.Microsecond), ""},
		{"floor equal to the commit", [][]byte{mBegin(100, 7), mFloor(true, us(commit), false, 0), mCommit(100, 120)}, commit.Add(time.Microsecond), ""},
		{"non-transactional ignored", [][]byte{mBegin(100, 7), mFloor(false, us(later), false, 0), mCommit(100, 120)}, commit, ""},
		{"streamed", [][]byte{mStreamStart(9), mFloor(true, us(later), true, 9), {'E'}, mStreamCommit(9, 100, 120)}, later.Add(time.Microsecond), ""},
		{"garbage floor", [][]byte{mBegin(100, 7), mFloor(true, "soon", false, 0)}, time.Time{}, `prism.floor message "soon": strconv.ParseInt`},
		{"floor outside a transaction", [][]byte{mFloor(true, us(later), false, 0)}, time.Time{}, "outside a transaction"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := NewAssembler("eu")
			var got *Txn
			for i, m := range tc.msgs {
				txn, err := a.Feed(0, m)
				if err != nil {
					if tc.err == "" || i != len(tc.msgs)-1 || !strings.Contains(err.Error(), tc.err) {
						t.Fatalf("message %d: %v, want error %q on the last message", i, err, tc.err)
					}
					return
				}
				if txn != nil {
					got = txn
				}
			}
			if tc.err != "" {
				t.Fatalf("no error, want %q", tc.err)
			}
			if got == nil || !got.CommitTime.Equal(tc.want) {
				t.Fatalf("commit time %v, want %v", got, tc.want)
			}
		})
	}
}
