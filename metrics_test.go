package main

// The files an SRE plugs in (deploy/prometheus, deploy/grafana) are checked
// against the real promtool and a running service, so a rename can never
// silently break an alert or a panel.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	rulesFile          = "deploy/prometheus/rules.yml"
	rulesTestFile      = "deploy/prometheus/rules_test.yml"
	prometheusRuleFile = "deploy/prometheus/prometheusrule.yaml"
	dashboardFile      = "deploy/grafana/threeds-records.json"
)

// promtool runs scripts/promtool.sh with args and stdin. On a clean CI
// machine (root, apt-get) the script installs Debian's prometheus package. A
// machine where promtool cannot be installed skips, with the reason, unless
// CI=true: there a skip would hide the checks, so it fails instead.
func promtool(t *testing.T, stdin []byte, args ...string) string {
	t.Helper()
	cmd := exec.Command("bash", append([]string{"scripts/promtool.sh"}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := stderr.String()
		unavailable := strings.Contains(msg, "prometheus was not found") || strings.Contains(msg, "apt-get install prometheus failed")
		if unavailable && os.Getenv("CI") != "true" {
			t.Skipf("promtool is not installed and this machine cannot install it (needs root and apt-get, or PROMTOOL_BIN): %s", strings.TrimSpace(msg))
		}
		t.Fatalf("promtool %s: %v\n%s%s", strings.Join(args, " "), err, out, msg)
	}
	return string(out) + stderr.String()
}

func readFile(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestPromtoolChecksTheRulesAndEveryAlertFiresAndStaysQuietInItsUnitTest(t *testing.T) {
	if out := promtool(t, nil, "check", "rules", rulesFile); !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool check rules: %s", out)
	}
	if out := promtool(t, nil, "test", "rules", rulesTestFile); !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool test rules: %s", out)
	}

	// Which alerts the unit tests expect to fire, and which to stay quiet,
	// at some evaluation time.
	fires, quiet := map[string]bool{}, map[string]bool{}
	var current string
	lines := strings.Split(readFile(t, rulesTestFile), "\n")
	for i, line := range lines {
		l := strings.TrimSpace(line)
		if name, ok := strings.CutPrefix(l, "alertname: "); ok {
			current = name
		}
		switch {
		case l == "exp_alerts: []":
			quiet[current] = true
		case l == "exp_alerts:" && i+1 < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[i+1]), "- exp_labels:"):
			fires[current] = true
		}
	}
	alerts := regexp.MustCompile(`(?m)^\s*- alert: (\w+)$`).FindAllStringSubmatch(readFile(t, rulesFile), -1)
	if len(alerts) < 8 {
		t.Fatalf("found %d alerts in %s", len(alerts), rulesFile)
	}
	for _, a := range alerts {
		if !fires[a[1]] || !quiet[a[1]] {
			t.Errorf("%s: a unit test where it fires %v, where it stays quiet %v; want both", a[1], fires[a[1]], quiet[a[1]])
		}
	}
}

func TestEveryAlertLinksToARunbookSectionThatExists(t *testing.T) {
	anchors := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#+ (.+)$`).FindAllStringSubmatch(readFile(t, "docs/operating.md"), -1) {
		anchors[githubAnchor(m[1])] = true
	}
	rules := readFile(t, rulesFile)
	alerts := regexp.MustCompile(`(?m)^\s*- alert: (\w+)$`).FindAllStringSubmatch(rules, -1)
	runbooks := regexp.MustCompile(`(?m)^\s*runbook_url: (\S+)$`).FindAllStringSubmatch(rules, -1)
	if len(runbooks) != len(alerts) {
		t.Fatalf("%d alerts, %d runbook_url annotations", len(alerts), len(runbooks))
	}
	const base = "https://github.com/comecomepay/threeds-records/blob/main/docs/operating.md#"
	for i, r := range runbooks {
		anchor, ok := strings.CutPrefix(r[1], base)
		if !ok || !anchors[anchor] || anchor != strings.ToLower(alerts[i][1]) {
			t.Errorf("%s: runbook_url %s is not its own section of docs/operating.md", alerts[i][1], r[1])
		}
	}
}

// githubAnchor is the fragment GitHub gives a Markdown heading.
func githubAnchor(heading string) string {
	var b strings.Builder
	for _, c := range strings.ToLower(heading) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			b.WriteRune(c)
		case c == ' ':
			b.WriteByte('-')
		}
	}
	return b.String()
}

// prometheusRuleFromRules is the manifest for the rules file: its groups,
// indented under spec.
func prometheusRuleFromRules(rules string) string {
	_, groups, _ := strings.Cut(rules, "\ngroups:\n")
	var b strings.Builder
	b.WriteString(`# Generated from rules.yml (the same groups, indented under spec) for the Prometheus
# Operator; do not edit by hand. After changing rules.yml:
#   UPDATE_PROMETHEUSRULE=1 go test -run TestThePrometheusRuleManifestIsTheRulesFile .
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: threeds-records
  labels:
    app.kubernetes.io/name: threeds-records
spec:
  groups:
`)
	for _, line := range strings.SplitAfter(groups, "\n") {
		if strings.TrimSpace(line) != "" {
			b.WriteString("  ")
		}
		b.WriteString(line)
	}
	return b.String()
}

func TestThePrometheusRuleManifestIsTheRulesFile(t *testing.T) {
	want := prometheusRuleFromRules(readFile(t, rulesFile))
	if os.Getenv("UPDATE_PROMETHEUSRULE") == "1" {
		if err := os.WriteFile(prometheusRuleFile, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := readFile(t, prometheusRuleFile); got != want {
		t.Errorf("%s is not %s under spec; regenerate it: UPDATE_PROMETHEUSRULE=1 go test -run %s .", prometheusRuleFile, rulesFile, t.Name())
	}
}

// usedMetricNames are the service's metric names an expression file uses:
// every identifier with one of the service's prefixes (recording rules'
// names contain colons and are not among them).
func usedMetricNames(text string) []string {
	var names []string
	for _, m := range regexp.MustCompile(`\b(?:threeds|go|process)_[a-z0-9_]+\b`).FindAllString(text, -1) {
		if !slices.Contains(names, m) {
			names = append(names, m)
		}
	}
	slices.Sort(names)
	return names
}

// dashboardExpressions are the dashboard's queries: panel targets and
// template variables.
func dashboardExpressions(t *testing.T) string {
	t.Helper()
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal([]byte(readFile(t, dashboardFile)), &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var b strings.Builder
	var queries int
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			b.WriteString(tg.Expr + "\n")
			queries++
		}
	}
	for _, v := range d.Templating.List {
		b.WriteString(v.Definition + "\n")
	}
	if queries < 10 {
		t.Fatalf("%s: %d queries", dashboardFile, queries)
	}
	return b.String()
}

func TestTheLiveMetricsPassPromtoolAndHoldEveryNameTheRulesAndTheDashboardUse(t *testing.T) {
	rs, key, _ := startStreamRun(t, nil)
	token := key.token(t, validClaims("1001"))
	// Traffic that makes every labelled family appear: a page, a refusal,
	// a 405, a stream that starts and ends.
	for _, tc := range []struct {
		method, path, token string
		want                int
	}{
		{http.MethodGet, "/3ds/my-records", token, 200},
		{http.MethodGet, "/3ds/my-records", "", 401},
		{http.MethodPost, "/3ds/my-records", token, 405},
	} {
		req := newTestRequest(t, t.Context(), tc.method, rs.base+tc.path, tc.token)
		resp, err := opsClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("%s %s: %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
	waitFor(t, 15*time.Second, "the stream source", func() bool {
		return strings.Contains(scrapeText(t, rs.base), "\nthreeds_stream_source_up{source=\"notify\"} 1\n")
	})
	stream, _ := mustOpenStream(t, rs.base, token)
	stream.close()
	var text string
	waitFor(t, 10*time.Second, "the stream's end to be timed", func() bool {
		text = scrapeText(t, rs.base)
		return strings.Contains(text, "\nthreeds_stream_duration_seconds_count 1\n")
	})

	if out := promtool(t, []byte(text), "check", "metrics"); strings.TrimSpace(out) != "" {
		t.Errorf("promtool check metrics on a live /metrics:\n%s", out)
	}

	exposed := map[string]bool{}
	for _, s := range parseExposition(t, text).samples {
		exposed[s.name] = true
	}
	for _, src := range []struct{ file, text string }{
		{rulesFile, readFile(t, rulesFile)},
		{dashboardFile, dashboardExpressions(t)},
	} {
		names := usedMetricNames(src.text)
		if len(names) < 10 {
			t.Fatalf("%s: found only %v", src.file, names)
		}
		for _, n := range names {
			if !exposed[n] {
				t.Errorf("%s uses %s, which a running service does not expose", src.file, n)
			}
		}
	}
}
