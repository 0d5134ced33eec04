//go:build race

package rawconn

import "sync/atomic"

// ioSync stands for the data that goes through sockets, as syscall's does
// for syscall.Read and syscall.Write, which tell the race detector that a
// write happens before the read that gets its bytes. Conn makes its system
// calls with syscall.RawSyscall, which tells it nothing, so a goroutine
// that set something up and then wrote to a socket would be reported as
// racing with the one that read the bytes and used it. An atomic
// operation on ioSync is a synchronisation to the race detector: Write
// does one before its system call, Read one after each that returned
// data.
var ioSync atomic.Uint64

func raceReleaseMerge() { ioSync.Add(1) }

func raceAcquire() { ioSync.Load() }
