package peers

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"
)

// NonceSize is the length of the random nonce a server's Challenge carries.
const NonceSize = 32

// macLabel opens every Hello MAC's message, so that the MAC is never valid
// for another purpose.
const macLabel = "prism-cdc hello"

// challenge is the first frame on every connection: the server's protocol
// version and a fresh random nonce that the client's Hello must sign.
type challenge struct {
	Version uint16
	Nonce   [NonceSize]byte
}

// newChallenge returns a challenge with a nonce from crypto/rand.
func newChallenge() (*challenge, error) {
	c := &challenge{Version: ProtocolVersion}
	if _, err := rand.Read(c.Nonce[:]); err != nil {
		return nil, fmt.Errorf("read nonce: %w", err)
	}
	return c, nil
}

// HelloMAC returns the MAC a Hello carries instead of the shared token:
// HMAC-SHA256 keyed with the token over "prism-cdc hello", the server's
// nonce, the source region and node (each preceded by its 4-byte
// big-endian length, so that no two field splits sign the same bytes) and
// the Hello's flags. An empty token gives an empty MAC (insecure mode).
func HelloMAC(token string, nonce []byte, region, node string, flags uint8) []byte {
	if token == "" {
		return nil
	}
	m := hmac.New(sha256.New, []byte(token))
	m.Write([]byte(macLabel))
	m.Write(nonce)
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(region)))
	m.Write(n[:])
	m.Write([]byte(region))
	binary.BigEndian.PutUint32(n[:], uint32(len(node)))
	m.Write(n[:])
	m.Write([]byte(node))
	m.Write([]byte{flags})
	return m.Sum(nil)
}

// RejectedError is a node's refusal of this node's Hello, with the
// node's reason. It matches ErrRejected under errors.Is.
type RejectedError struct {
	Reason string
	code   rejectCode
}

func (e *RejectedError) Error() string { return ErrRejected.Error() + ": " + e.Reason }

// Is makes errors.Is(err, ErrRejected) hold.
func (e *RejectedError) Is(target error) bool { return target == ErrRejected }

// AuthRefused reports whether the node refused this node's credentials
// (no or wrong auth.token): a configuration error that retrying does not
// mend, not an outage. A node of protocol version 3 sends no refusal
// code, so its refusals report false.
func (e *RejectedError) AuthRefused() bool { return e.code == rejectAuth }

// tlsRefusedError is a TLS handshake that failed on the certificates: the
// node's certificate is not signed by this node's CA, or the node refused
// this node's certificate (a TLS alert from the node).
type tlsRefusedError struct{ err error }

func (e *tlsRefusedError) Error() string { return "tls: certificates refused: " + e.err.Error() }
func (e *tlsRefusedError) Unwrap() error { return e.err }

// AuthRefused reports true: the two nodes' auth.tls settings (CA,
// certificates) do not match.
func (e *tlsRefusedError) AuthRefused() bool { return true }

// tlsRefused wraps err in a *tlsRefusedError when it is a certificate
// failure of a TLS handshake: this side's verification of the node's
// certificate, or an alert the node sent (Go reports a received alert as
// a *net.OpError whose Op is "remote error"). Other errors are returned
// as they are.
func tlsRefused(err error) error {
	var cv *tls.CertificateVerificationError
	var oe *net.OpError
	if errors.As(err, &cv) || errors.As(err, &oe) && oe.Op == "remote error" {
		return &tlsRefusedError{err: err}
	}
	return err
}

// authRefused reports whether err says that a node refused this node's
// credentials (see RejectedError.AuthRefused and tlsRefusedError).
func authRefused(err error) bool {
	var ar interface{ AuthRefused() bool }
	return errors.As(err, &ar) && ar.AuthRefused()
}

// versionMismatch is the reason given to a peer of another protocol
// version.
func versionMismatch(v uint16) string {
	return fmt.Sprintf("peer speaks protocol %d, this node %d; upgrade both sides", v, ProtocolVersion)
}

// errNoChallenge is wrapped when a node answers the connection with
// something other than a Challenge: a node older than protocol version 3
// waits for the Hello instead (and refuses the silent client).
var errNoChallenge = errors.New("no challenge from the node; it speaks protocol 2 or older: upgrade both sides")

// clientHello waits for the server's Challenge on fc, sends a Hello signed
// with token and returns the server's answer (Welcome or Reject, or
// another frame for the caller to refuse). The token itself is never
// written.
func clientHello(fc *frameConn, timeout time.Duration, flags uint8, region, node, token string) (any, error) {
	f, err := fc.read(timeout)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("read challenge: the node did not answer within %s: %w", timeout, err)
		}
		// Under TLS 1.3 a node that refuses this node's certificate says
		// so at the first read.
		return nil, fmt.Errorf("read challenge: %w", tlsRefused(err))
	}
	c, ok := f.(*challenge)
	if !ok {
		if r, ok := f.(*reject); ok {
			return nil, fmt.Errorf("%w (it refused: %s)", errNoChallenge, r.Reason)
		}
		return nil, fmt.Errorf("%w (it sent %T)", errNoChallenge, f)
	}
	h := &hello{
		// Speak the lower of the two versions.
		Version: max(min(c.Version, ProtocolVersion), minProtocolVersion),
		Flags:   flags,
		Region:  region,
		Node:    node,
		MAC:     HelloMAC(token, c.Nonce[:], region, node, flags),
	}
	if err := fc.write(timeout, h); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	f, err = fc.read(timeout)
	if err != nil {
		return nil, fmt.Errorf("read welcome: %w", err)
	}
	return f, nil
}

// checkMAC says why a Hello's MAC does not prove the token for nonce, or
// "". A server without a token accepts any Hello (insecure mode).
func checkMAC(token string, nonce []byte, h *hello) string {
	if token == "" {
		return ""
	}
	if len(h.MAC) == 0 {
		return "no token"
	}
	if !hmac.Equal(h.MAC, HelloMAC(token, nonce, h.Region, h.Node, h.Flags)) {
		return "wrong token"
	}
	return ""
}
