package peers

import (
	"errors"
	"testing"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestFrameOrder: which frame may follow which on a stream, without a
// socket. Each case feeds its frames in order; the last one's verdict is
// checked, every earlier one must pass.
func TestFrameOrder(t *testing.T) {
	txn := func(origin string) *txnFrame { return &txnFrame{Txn: &decode.Txn{Origin: origin, EndLSN: lsnOf(1)}} }
	begin := func(origin string, count uint64) *txnBegin {
		return &txnBegin{Txn: &decode.Txn{Origin: origin, EndLSN: lsnOf(2)}, Count: count}
	}
	chunk := func(n int) *txnChunk { return &txnChunk{Changes: make([]decode.Change, n)} }
	end := &txnEnd{LSN: lsnOf(2)}
	for _, tc := range []struct {
		name   string
		frames []any
		ok     bool
		open   bool // a streamed transaction is open after the frames
	}{
		{"heartbeat", []any{&heartbeat{}}, true, false},
		{"undone", []any{&undoneFrame{}}, true, false},
		{"txn of the region", []any{txn("eu")}, true, false},
		{"txn of another region", []any{txn("us")}, false, false},
		{"streamed txn", []any{begin("eu", 3), chunk(2), &heartbeat{}, chunk(1), end, txn("eu")}, true, false},
		{"streamed txn open", []any{begin("eu", 3), chunk(2)}, true, true},
		{"empty streamed txn", []any{begin("eu", 0), end}, true, false},
		{"streamed txn of another region", []any{begin("us", 1)}, false, false},
		{"txn inside a streamed one", []any{begin("eu", 1), txn("eu")}, false, true},
		{"begin inside a streamed one", []any{begin("eu", 1), begin("eu", 1)}, false, true},
		{"chunk outside", []any{chunk(1)}, false, false},
		{"chunk beyond the count", []any{begin("eu", 2), chunk(1), chunk(2)}, false, true},
		{"end outside", []any{end}, false, false},
		{"end too early", []any{begin("eu", 2), chunk(1), end}, false, true},
		{"end of another transaction", []any{begin("eu", 0), &txnEnd{LSN: lsnOf(3)}}, false, true},
		{"unexpected frame", []any{&ack{LSN: lsnOf(1)}}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := frameOrder{region: "eu"}
			var err error
			for i, f := range tc.frames {
				if o, err = o.next(f); err != nil && i < len(tc.frames)-1 {
					t.Fatalf("next(%T) at %d = %v, want nil", f, i, err)
				}
			}
			if (err == nil) != tc.ok || (err != nil && !errors.Is(err, errFrame)) {
				t.Errorf("next(%T) = %v, want ok %v (errors wrap errFrame)", tc.frames[len(tc.frames)-1], err, tc.ok)
			}
			if o.open != tc.open {
				t.Errorf("open after %d frames = %v, want %v", len(tc.frames), o.open, tc.open)
			}
		})
	}
}
