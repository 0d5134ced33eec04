package peers

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestGoldenFrames reads the frames in testdata/golden, written before the
// change encoding was shared with the spill files and the spool, checks
// what they decode to and encodes that back to the same bytes: the wire
// format must not drift.
func TestGoldenFrames(t *testing.T) {
	for _, tc := range []struct {
		file string
		want any
	}{
		{"txn.frame", &txnFrame{Txn: sampleTxn()}},
		{"txn_begin.frame", &txnBegin{Txn: &decode.Txn{Origin: "eu", Xid: 9, CommitLSN: 0x2000, EndLSN: 0x2030}, Count: 4}},
		{"txn_chunk.frame", &txnChunk{Changes: sampleTxn().Changes}},
		{"undo.frame", &undoFrame{Txn: sampleTxn(), SQLState: "23505", Message: "duplicate key"}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", "golden", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			f, err := decodeFrame(b[4:])
			if err != nil {
				t.Fatalf("decodeFrame(%s) = %v", tc.file, err)
			}
			if !reflect.DeepEqual(f, tc.want) {
				t.Fatalf("decodeFrame(%s) = %+v, want %+v", tc.file, f, tc.want)
			}
			if got := encode(t, f); !bytes.Equal(got, b) {
				t.Fatalf("re-encoding %s differs:\n got %x\nwant %x", tc.file, got, b)
			}
		})
	}
}
