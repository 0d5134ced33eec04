//go:build !race

package rawconn

// Without the race detector there is nothing to tell it (see race.go).

func raceReleaseMerge() {}

func raceAcquire() {}
