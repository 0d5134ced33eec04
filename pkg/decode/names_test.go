package decode

import (
	"context"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

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

// TestNameSQL: the SQL forms of the names agree with the Go ones on a
// real server: OriginNameSQL builds OriginName, OriginRegionSQL inverts it
// and leaves other origins' names as they are.
func TestNameSQL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "names"})
	for _, region := range []string{"eu", "ap_south", "bootstrap_1"} {
		if got := query[string](ctx, t, c, "SELECT "+OriginNameSQL+" FROM (VALUES ($1::text)) v(source_region)", region); got != OriginName(region) {
			t.Errorf("OriginNameSQL(%s) = %q, want %q", region, got, OriginName(region))
		}
		if got := query[string](ctx, t, c, "SELECT "+OriginRegionSQL+" FROM (VALUES ($1::text)) v(roname)", OriginName(region)); got != region {
			t.Errorf("OriginRegionSQL(%s) = %q, want %q", OriginName(region), got, region)
		}
	}
	for _, other := range []string{"pg_16384", "prism", "prismX_eu", "PRISM_eu"} {
		if got := query[string](ctx, t, c, "SELECT "+OriginRegionSQL+" FROM (VALUES ($1::text)) v(roname)", other); got != other {
			t.Errorf("OriginRegionSQL(%s) = %q, want it unchanged", other, got)
		}
	}
}
