package chaos

import (
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/internal/faultproxy"
)

// network puts one fault proxy on every path between regions: one per
// (source region, target node) for the peer protocol and one per (source
// region, target region) for the direct-SQL fallback. Writers and the
// invariant sampler talk to the databases directly.
type network struct {
	peer map[[2]string]*faultproxy.Proxy // {from region, to node}
	sql  map[[2]string]*faultproxy.Proxy // {from region, to region}
}

func newNetwork(t *testing.T, d *e2e.Deployment, seed int64) *network {
	t.Helper()
	nw := &network{peer: map[[2]string]*faultproxy.Proxy{}, sql: map[[2]string]*faultproxy.Proxy{}}
	start := func(target string) *faultproxy.Proxy {
		p, err := faultproxy.New(target)
		if err != nil {
			t.Fatalf("fault proxy to %s: %v", target, err)
		}
		seed++
		p.Seed(seed)
		t.Cleanup(func() { p.Close() })
		return p
	}
	for _, from := range d.Regions {
		for _, to := range d.Regions {
			if from == to {
				continue
			}
			for _, n := range d.Nodes(to) {
				nw.peer[[2]string{from, n}] = start(d.Listen(n))
			}
			c := d.Clusters[to]
			nw.sql[[2]string{from, to}] = start(net.JoinHostPort(c.Host, strconv.Itoa(c.Port)))
		}
	}
	d.PeerAddr = func(from, to string) string { return nw.peer[[2]string{from, to}].Addr() }
	d.PeerDatabase = func(from, to string) string {
		host, port, _ := net.SplitHostPort(nw.sql[[2]string{from, to}].Addr())
		return fmt.Sprintf("host=%s port=%s user=postgres dbname=app sslmode=disable connect_timeout=5", host, port)
	}
	return nw
}

// touching returns the proxies on paths into or out of region: peer paths
// only, or peer and SQL paths.
func (nw *network) touching(d *e2e.Deployment, region string, withSQL bool) []*faultproxy.Proxy {
	var out []*faultproxy.Proxy
	in := map[string]bool{}
	for _, n := range d.Nodes(region) {
		in[n] = true
	}
	for k, p := range nw.peer {
		if k[0] == region || in[k[1]] {
			out = append(out, p)
		}
	}
	if withSQL {
		for k, p := range nw.sql {
			if k[0] == region || k[1] == region {
				out = append(out, p)
			}
		}
	}
	return out
}

// heal switches every fault off. With reset, current connections are
// reset too: connections that lived through a blackhole lost bytes, as a
// real partition would have killed them.
func (nw *network) heal(reset bool) {
	for _, m := range []map[[2]string]*faultproxy.Proxy{nw.peer, nw.sql} {
		for _, p := range m {
			p.Delay(0, 0)
			p.Bandwidth(0)
			p.Refuse(false)
			p.Blackhole(false)
			if reset {
				p.Reset()
			}
		}
	}
}

func each(ps []*faultproxy.Proxy, f func(*faultproxy.Proxy)) {
	for _, p := range ps {
		f(p)
	}
}

func ms(lo, hi int, rngInt func(int) int) time.Duration {
	return time.Duration(lo+rngInt(hi-lo+1)) * time.Millisecond
}
