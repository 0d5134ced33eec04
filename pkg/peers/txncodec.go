package peers

import "github.com/prism-cdc/prism-cdc/pkg/decode"

// MarshalTxn appends the binary encoding of txn (the payload of the peer
// protocol's Txn frame) to b. The spool stores transactions in this form.
func MarshalTxn(b []byte, txn *decode.Txn) ([]byte, error) {
	e := &encoder{b: b}
	if err := encodeTxn(e, txn); err != nil {
		return b, err
	}
	return e.b, nil
}

// UnmarshalTxn decodes what MarshalTxn wrote. It checks every length and
// rejects trailing bytes; it never panics. The Txn does not share memory
// with p.
func UnmarshalTxn(p []byte) (*decode.Txn, error) {
	d := &decoder{b: p}
	t := decodeTxn(d)
	if err := d.end(); err != nil {
		return nil, err
	}
	return t, nil
}
