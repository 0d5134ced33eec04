package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Size is a number of bytes. In YAML it is written as a whole number with an
// optional unit: "1000", "512KiB", "64MiB", "10GiB" (powers of 1024) or
// "2MB", "1GB" (powers of 1000).
type Size int64

// Binary size units.
const (
	KiB Size = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
)

// sizeUnit returns the multiplier of a unit suffix.
func sizeUnit(u string) (Size, bool) {
	switch u {
	case "", "B":
		return 1, true
	case "KB":
		return 1000, true
	case "MB":
		return 1000 * 1000, true
	case "GB":
		return 1000 * 1000 * 1000, true
	case "TB":
		return 1000 * 1000 * 1000 * 1000, true
	case "KiB":
		return KiB, true
	case "MiB":
		return MiB, true
	case "GiB":
		return GiB, true
	case "TiB":
		return TiB, true
	}
	return 0, false
}

// ParseSize parses a size such as "64MiB", "10GiB", "512KiB", "1000" or
// "2MB". A space between number and unit is allowed. Negative sizes and
// fractions are errors.
func ParseSize(s string) (Size, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: write a whole number of bytes with an optional unit, e.g. 64MiB, 10GiB, 512KiB or 1000", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	mult, ok := sizeUnit(strings.TrimSpace(t[i:]))
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit %q; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB", s, strings.TrimSpace(t[i:]))
	}
	if n > math.MaxInt64/int64(mult) {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return Size(n) * mult, nil
}

// String returns the size in the largest binary unit that divides it
// exactly, e.g. "64MiB", or in bytes.
func (s Size) String() string {
	if s != 0 {
		for _, u := range []struct {
			name string
			size Size
		}{{"TiB", TiB}, {"GiB", GiB}, {"MiB", MiB}, {"KiB", KiB}} {
			if s%u.size == 0 {
				return strconv.FormatInt(int64(s/u.size), 10) + u.name
			}
		}
	}
	return strconv.FormatInt(int64(s), 10)
}
