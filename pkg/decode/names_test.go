package decode

import "testing"

// TestNames: slots, origins and application names are prism_ and the
// region's or node's name, the names DESIGN.md and existing clusters use.
func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want string
	}{
		{"SlotName(eu)", SlotName("eu"), "prism_eu"},
		{"OriginName(na)", OriginName("na"), "prism_na"},
		{"AppName(eu1)", AppName("eu1"), "prism_eu1"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %q, want %q", tc.name, tc.got, tc.want)
		}
	}
}
