package peers

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
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
			return nil, fmt.Errorf("read challenge (a node older than protocol 3 sends none): %w", err)
		}
		return nil, fmt.Errorf("read challenge: %w", err)
	}
	c, ok := f.(*challenge)
	if !ok {
		if r, ok := f.(*reject); ok {
			return nil, fmt.Errorf("%w (it refused: %s)", errNoChallenge, r.Reason)
		}
		return nil, fmt.Errorf("%w (it sent %T)", errNoChallenge, f)
	}
	h := &hello{
		Version: ProtocolVersion,
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
