package main

import "testing"

// TestFreeAddrsDistinct: with each listener closed before the next was
// opened, about one call in 200 got a port twice (a node's http address
// equal to another's listen address, and the node refused its config).
func TestFreeAddrsDistinct(t *testing.T) {
	for i := 0; i < 1000; i++ {
		addrs, err := freeAddrs(6)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, a := range addrs {
			if seen[a] {
				t.Fatalf("freeAddrs(6) = %v, %s twice", addrs, a)
			}
			seen[a] = true
		}
	}
}
