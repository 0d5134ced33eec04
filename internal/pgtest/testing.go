package pgtest

import (
	"flag"
)

// TB is the part of testing.TB that Start needs.
type TB interface {
	Helper()
	Name() string
	Skip(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
}

func shortMode() bool {
	f := flag.Lookup("test.short")
	return f != nil && f.Value.String() == "true"
}
