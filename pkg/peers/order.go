package peers

import (
	"fmt"

	"github.com/jackc/pglogrepl"
)

// frameOrder is what a stream has received so far, as far as the order of
// frames goes: the region it carries and the streamed transaction open on
// it, if any.
type frameOrder struct {
	region string
	open   bool          // a TxnBegin came, its TxnEnd not yet
	end    pglogrepl.LSN // the open transaction's end LSN
	count  uint64        // changes the open transaction announced
	seen   uint64        // changes of it received so far
}

// next returns the order after frame f, or an error wrapping errFrame when
// f may not come now: transactions of the stream's region only, none
// inside a streamed one, chunks only inside one and no more changes than
// it announced, and its end only after all of them.
func (o frameOrder) next(f any) (frameOrder, error) {
	switch f := f.(type) {
	case *heartbeat, *undoneFrame:
	case *txnFrame:
		if f.Txn.Origin != o.region || o.open {
			return o, fmt.Errorf("%w: txn of origin %q on a stream of %q, or inside a streamed transaction", errFrame, f.Txn.Origin, o.region)
		}
	case *txnBegin:
		if f.Txn.Origin != o.region || o.open {
			return o, fmt.Errorf("%w: streamed txn of origin %q on a stream of %q, or inside another", errFrame, f.Txn.Origin, o.region)
		}
		o.open, o.end, o.count, o.seen = true, f.Txn.EndLSN, f.Count, 0
	case *txnChunk:
		if !o.open || o.seen+uint64(len(f.Changes)) > o.count {
			return o, fmt.Errorf("%w: chunk outside a streamed transaction or beyond its count", errFrame)
		}
		o.seen += uint64(len(f.Changes))
	case *txnEnd:
		if !o.open || f.LSN != o.end || o.seen != o.count {
			return o, fmt.Errorf("%w: end of a streamed transaction that is not open or incomplete", errFrame)
		}
		o.open = false
	default:
		return o, fmt.Errorf("%w: unexpected %T", errFrame, f)
	}
	return o, nil
}
