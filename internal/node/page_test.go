package node

import (
	"bytes"
	"context"
	"encoding/json"
	"image/png"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// chromium returns the headless browser, or fails the test with how to
// install it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium not found: install it with: apt-get install -y chromium")
	return ""
}

// pageFixture runs a node with three live shippers towards three regions:
// eu acknowledges (ok), as does not answer (retrying) and ap halts on a
// permanent apply error; a fourth, sa, refuses the shipper's token. It
// returns the node's monitor and HTTP server, which also serves /overlap
// (overlapPage).
func pageFixture(t *testing.T) (*monitor, *httptest.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	db := pgtest.Start(t, pgtest.Options{Name: "node-page"})
	pool, err := pgxpool.New(ctx, db.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	apps := map[string]*apply.Applier{}
	serve := func(region, node, source, token string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		app := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion(region))
		apps[region] = app
		sc := peers.NewServerConfig(config.DefaultAckTimeout)
		sc.Region, sc.Node, sc.Token, sc.Insecure, sc.AcceptRegions = region, node, token, true, []string{source}
		srv := peers.NewServer(sc, app, zerolog.Nop())
		wg.Add(1)
		go func() {
			defer wg.Done()
			srv.Serve(ctx, ln)
		}()
		return ln.Addr().String()
	}
	euAddr := serve("eu", "eu1", "na", "tok")
	// ap's server applies into the same cluster, so its shipper uses its
	// own source name and origin.
	apAddr := serve("ap", "ap1", "na-ap", "tok")
	saAddr := serve("sa", "sa1", "na-sa", "another-tok")
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	asAddr := closed.Addr().String()
	closed.Close()

	cfg := &config.Config{Node: "na1", Region: "na", Peers: []config.Peer{
		{Region: "eu", Nodes: []config.PeerNode{{Name: "eu1", Addr: euAddr}, {Name: "eu2", Addr: "127.0.0.1:1"}}},
		{Region: "as", Nodes: []config.PeerNode{{Name: "as1", Addr: asAddr}}},
		{Region: "ap", Nodes: []config.PeerNode{{Name: "ap1", Addr: apAddr}}},
		{Region: "sa", Nodes: []config.PeerNode{{Name: "sa1", Addr: saAddr}}},
	}, Database: db.DSN("postgres")}
	n := New(cfg, zerolog.Nop())
	n.startedAt = time.Now()
	// The apply counters shown are eu's applier's (the node's own
	// region's, in a real node).
	n.applied.Store(apps["eu"])
	// One transaction of eu applied here 3 ms after its commit.
	n.delays.peerReceived("eu", &decode.Txn{Origin: "eu", CommitTime: time.Now().Add(-time.Millisecond)})
	n.delays.applying("eu", []*decode.Txn{{Origin: "eu", CommitTime: time.Now().Add(-1500 * time.Microsecond)}})
	n.delays.appliedTxns("eu", []*decode.Txn{{Origin: "eu", CommitTime: time.Now().Add(-3 * time.Millisecond)}})
	ship := func(source, target, addr string) *peers.Shipper {
		d := config.DefaultDelivery()
		sc := peers.NewShipperConfig(500 * time.Millisecond)
		sc.SourceRegion, sc.SourceNode, sc.TargetRegion = source, "na1", target
		sc.Nodes, sc.Token, sc.Insecure = []peers.NodeAddr{{Name: target + "1", Addr: addr}}, "tok", true
		sc.Retries, sc.Backoff, sc.MaxBackoff = d.Retries, 50*time.Millisecond, 200*time.Millisecond
		sc.MaxInFlight, sc.Seed = int64(d.MaxInFlight), 7
		return peers.NewShipper(sc, nil, zerolog.Nop())
	}
	tm := &term{shippers: []*peers.Shipper{ship("na", "eu", euAddr), ship("na", "as", asAddr), ship("na-ap", "ap", apAddr), ship("na-sa", "sa", saAddr)}}
	tctx, tcancel := context.WithCancel(ctx)
	tm.cancel = tcancel
	for _, s := range tm.shippers {
		tm.wg.Add(1)
		go func(s *peers.Shipper) {
			defer tm.wg.Done()
			s.Run(tctx)
		}(s)
	}
	n.mu.Lock()
	n.term, n.role = tm, RoleReader
	n.mu.Unlock()

	now := time.Now()
	rel := &decode.Relation{Schema: "public", Table: "missing_table", ReplicaIdentity: decode.IdentityDefault,
		Columns: []decode.Column{{Name: "id", TypeOID: 23, Key: true}}}
	if err := tm.shippers[0].Send(ctx, &decode.Txn{Origin: "na", CommitLSN: 0x100, EndLSN: 0x100, CommitTime: now}); err != nil {
		t.Fatal(err)
	}
	if err := tm.shippers[1].Send(ctx, &decode.Txn{Origin: "na", CommitLSN: 0x100, EndLSN: 0x100, CommitTime: now.Add(-3 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	bad := &decode.Txn{Origin: "na-ap", CommitLSN: 0x100, EndLSN: 0x100, CommitTime: now,
		Changes: []decode.Change{{Op: decode.OpInsert, Rel: rel, New: []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}}}}}
	if err := tm.shippers[2].Send(ctx, bad); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	n.lastSent = 0x100
	n.mu.Unlock()

	m := newMonitor(n)
	mux := http.NewServeMux()
	mux.Handle("/", m.handler())
	mux.HandleFunc("GET /overlap", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, overlapPage)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		tm.stop()
		cancel()
		wg.Wait()
		pool.Close()
	})
	return m, srv
}

// overlapPage loads the status page in a frame of the same origin and,
// once it has drawn, writes into its own DOM every link label whose box
// meets a link (the line's box widened by half its 6 px stroke).
const overlapPage = `<!doctype html><html><body>
<iframe id="f" src="/" width="1000" height="1400"></iframe>
<pre id="out">pending</pre>
<script>
setTimeout(function () {
  var d = document.getElementById("f").contentDocument;
  var labels = d.querySelectorAll("#map text.lag"), links = d.querySelectorAll("#map .link");
  function box(e, pad) { var b = e.getBBox(); return [b.x - pad, b.y - pad, b.x + b.width + pad, b.y + b.height + pad]; }
  var out = ["labels " + labels.length + " links " + links.length];
  for (var i = 0; i < labels.length; i++) for (var j = 0; j < links.length; j++) {
    var a = box(labels[i], 0), b = box(links[j], 3);
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
      out.push("overlap: label of " + labels[i].getAttribute("data-region") + " on link to " + links[j].getAttribute("data-region"));
  }
  document.getElementById("out").textContent = out.join("\n");
}, 3000);
</script></body></html>`

// fillHistory gives every target region HistoryLen samples ending now:
// eu's lag in bytes rises and falls, as's lag in seconds grows, and every
// region acknowledges 2 KiB per sample (a steady apply rate).
func fillHistory(m *monitor, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, region := range []string{"eu", "as", "ap"} {
		r := &ring{}
		for i := 0; i < HistoryLen; i++ {
			at := now.Add(-time.Duration(HistoryLen-1-i) * HistoryEvery)
			s := Sample{At: at.UTC()}
			switch region {
			case "eu":
				s.LagBytes = uint64(1<<20) * uint64(min(i%60, 60-i%60))
			case "as":
				s.LagSeconds = float64(i) * 5
			}
			r.add(s, pglogrepl.LSN(2048*(i+1)))
		}
		m.history[region] = r
		m.order = append(m.order, region)
	}
}

func getStatus(t *testing.T, url string) Status {
	t.Helper()
	resp, err := http.Get(url + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func target(st Status, region string) TargetStatus {
	for _, t := range st.Targets {
		if t.Region == region {
			return t
		}
	}
	return TargetStatus{}
}

func TestStatusMetricsAndPage(t *testing.T) {
	browser := chromium(t)
	m, srv := pageFixture(t)
	fillHistory(m, time.Now())

	// Wait for the three states: eu acknowledged, as retrying, ap halted.
	deadline := time.Now().Add(30 * time.Second)
	var st Status
	for {
		st = getStatus(t, srv.URL)
		eu, as, ap, sa := target(st, "eu"), target(st, "as"), target(st, "ap"), target(st, "sa")
		if eu.Path == "eu1" && eu.LagBytes == 0 && as.LastHour.Retries > 0 && strings.HasPrefix(ap.Path, "halted") && len(sa.AuthRefused) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("states not reached: %+v", st.Targets)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if as := target(st, "as"); as.LagSeconds < 3 || as.LagBytes != 0x100 {
		t.Errorf("as lag = %.1fs %d bytes, want >= 3s (oldest unacknowledged commit) and 256 bytes", as.LagSeconds, as.LagBytes)
	}
	if sa := target(st, "sa"); sa.State != StateAuthRefused || len(sa.AuthRefused) != 1 || sa.AuthRefused[0] != "sa1" ||
		!strings.Contains(sa.LastError, "wrong token") || sa.LastErrorAt == nil {
		t.Errorf("sa = %+v, want state %q, refused by sa1, with the error and its time", sa, StateAuthRefused)
	}
	for region, want := range map[string]string{"eu": StateOK, "as": StateRetrying, "ap": StateHalted} {
		if got := target(st, region).State; got != want {
			t.Errorf("%s state = %q, want %q", region, got, want)
		}
	}
	if eu := target(st, "eu"); eu.LagSeconds != 0 {
		t.Errorf("eu lag = %.1fs, want 0 (caught up)", eu.LagSeconds)
	}
	// eu's transaction applied here 3 ms after its commit (pageFixture),
	// in the last minute.
	var sawDelay bool
	for _, d := range st.Delays {
		if d.Stage == StageApplied && d.Source == "eu" && d.Count == 1 && d.P50 > .002 && d.P50 <= .005 {
			sawDelay = true
		}
	}
	if !sawDelay {
		t.Errorf("delays %+v lack eu's transaction applied after 3 ms", st.Delays)
	}
	var sawEU bool
	for _, s := range st.Switches {
		if s.Region == "eu" && s.From == peers.PathConnecting && s.To == "eu1" {
			sawEU = true
		}
	}
	if !sawEU {
		t.Errorf("switches %+v lack eu: connecting -> eu1", st.Switches)
	}

	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`prism_halted{node="na1",region="na",target="ap"} 1`,
		`prism_lag_bytes{node="na1",region="na",target="as"} 256`,
		`prism_acked_lsn{node="na1",region="na",target="eu"} 256`,
		`prism_reader{node="na1",region="na"} 1`,
		`prism_halts_total{node="na1",region="na",target="ap"} 1`,
		`prism_database_up{node="na1",region="na"} 1`,
		`prism_peer_auth_refused{node="na1",peer="sa1",region="na",target="sa"} 1`,
		`prism_peer_auth_refused{node="na1",peer="eu1",region="na",target="eu"} 0`,
		`prism_applied_lsn{node="na1",region="na",source="na"} 256`,
		`prism_apply_txns_total{node="na1",path="row",region="na",source="na"} 1`,
		`prism_apply_txns_total{node="na1",path="batch",region="na",source="na"} 0`,
		`prism_apply_batches_total{node="na1",region="na",result="rolled_back",source="na"} 0`,
		`prism_apply_retries_total{node="na1",region="na",source="na"} 0`,
		"# TYPE prism_retries_total counter",
		`prism_apply_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.005"} 1`,
		`prism_apply_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.002"} 0`,
		`prism_peer_receive_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.002"} 1`,
		`prism_peer_receive_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.0005"} 0`,
		`prism_apply_begin_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.002"} 1`,
		`prism_apply_begin_delay_seconds_bucket{node="na1",region="na",source="eu",le="0.001"} 0`,
		`prism_source_send_delay_seconds_count{node="na1",region="na"} 0`,
		"go_goroutines",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// Every metric the Grafana dashboard queries exists.
	dash, err := os.ReadFile("../../configs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range regexp.MustCompile(`prism_[a-z_]+`).FindAllString(string(dash), -1) {
		if !strings.Contains(string(body), "\n"+name+"{") && !strings.Contains(string(body), "\n"+name+"_bucket{") {
			t.Errorf("configs/grafana-dashboard.json queries %s, which /metrics does not export", name)
		}
	}

	dir := t.TempDir()
	args := func(extra ...string) []string {
		return append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
			"--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
			"--user-data-dir=" + filepath.Join(dir, "profile"), "--virtual-time-budget=5000"}, extra...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, browser, args("--dump-dom", srv.URL+"/")...)
	cmd.Stderr = &stderr
	dom, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom: %v\n%s", err, &stderr)
	}
	for _, want := range []string{
		"node na1 · region na",
		`data-region="eu" data-state="ok"`,
		`data-region="as" data-state="retrying"`,
		`data-region="ap" data-state="halted"`,
		`data-region="sa" data-state="auth-refused"`,
		"refused by sa1: give both nodes the same auth.token",
		">region eu<", ">region as<", ">region ap<", ">eu2<",
		"connecting", // the switch table
		// the delays table: eu's transaction applied here after 3 ms,
		// received after 1 ms, begun after 1.5 ms (pageFixture)
		`<tr data-stage="applied-eu"><td>from eu, applied here</td><td>applied</td>`,
		`<tr data-stage="received-eu">`, `<tr data-stage="began-eu">`,
		// one chart per series and target region, every sample drawn
		`data-region="eu" data-chart="lag_bytes"`, `data-region="as" data-chart="lag_seconds"`, `data-region="ap" data-chart="apply_rate"`,
		`class="series c-rate" data-points="180"`,
		">410 B/s<", // the current apply rate: 2 KiB per 5 s sample, rounded
	} {
		if !strings.Contains(string(dom), want) {
			t.Errorf("page DOM lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}

	// No link label lies on a link.
	cmd = exec.CommandContext(ctx, browser, args("--dump-dom", srv.URL+"/overlap")...)
	cmd.Stderr = &stderr
	dom, err = cmd.Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom /overlap: %v\n%s", err, &stderr)
	}
	if !strings.Contains(string(dom), "labels 4 links 4\n</pre>") && !strings.Contains(string(dom), "labels 4 links 4</pre>") {
		t.Errorf("link labels overlap the links or were not drawn:\n%s", dom)
	}

	shot := filepath.Join(dir, "status.png")
	cmd = exec.CommandContext(ctx, browser, args("--window-size=1000,1400", "--screenshot="+shot, srv.URL+"/")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("chromium --screenshot: %v\n%s", err, out)
	}
	f, err := os.Open(shot)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("screenshot is not a PNG: %v", err)
	}
	colors := map[[3]uint32]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y += 3 {
		for x := b.Min.X; x < b.Max.X; x += 3 {
			r, g, bl, _ := img.At(x, y).RGBA()
			colors[[3]uint32{r >> 8, g >> 8, bl >> 8}] = true
		}
	}
	// Green, amber and red links drawn: look for each colour.
	has := func(r, g, bl uint32) bool { return colors[[3]uint32{r, g, bl}] }
	if b.Dx() < 800 || len(colors) < 20 || !has(0x2e, 0x9e, 0x44) || !has(0xe0, 0xa1, 0x00) || !has(0xd2, 0x32, 0x2d) {
		t.Errorf("screenshot %dx%d has %d colours (green %v amber %v red %v), want a drawn page", b.Dx(), b.Dy(), len(colors),
			has(0x2e, 0x9e, 0x44), has(0xe0, 0xa1, 0x00), has(0xd2, 0x32, 0x2d))
	}
	// The three series of the charts are drawn: count each colour's pixels.
	series := map[[3]uint32]int{{0x3b, 0x6f, 0xd1}: 0, {0x8e, 0x44, 0xad}: 0, {0x1a, 0x8f, 0x7a}: 0}
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			if n, ok := series[[3]uint32{r >> 8, g >> 8, bl >> 8}]; ok {
				series[[3]uint32{r >> 8, g >> 8, bl >> 8}] = n + 1
			}
		}
	}
	for c, px := range series {
		// Three charts of one series are 3 x 232 px wide at least.
		if px < 300 {
			t.Errorf("screenshot has %d pixels of chart colour #%02x%02x%02x, want a drawn series in every region", px, c[0], c[1], c[2])
		}
	}
}
