package peers

import "time"

// OldestUnacked returns the source commit time of the oldest transaction
// sent to the target region and not yet acknowledged, and false when
// everything sent is acknowledged. The time since it is the region's lag
// in seconds.
func (s *Shipper) OldestUnacked() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.window) == 0 {
		return time.Time{}, false
	}
	return s.window[0].txn.CommitTime, true
}
