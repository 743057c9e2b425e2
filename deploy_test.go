package main

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The Kubernetes manifests in deploy/kubernetes are checked here for
// mistakes the API server accepts but the cluster cannot carry out, such as
// a Service whose named targetPort exists only on a native sidecar (an init
// container with restartPolicy: Always): such names were not resolved into
// EndpointSlices before Kubernetes 1.32/1.33 (kubernetes issue #127958), so
// the Service had no endpoints although every pod was ready.
//
// No YAML module may be added to the project, so the manifests are read by a
// small parser of the YAML subset they use: block mappings and sequences,
// plain and quoted scalars, flow sequences of scalars, literal block scalars
// (|), comments and --- between documents. Anything else is an error, not a
// guess: a test that skipped what it cannot read would pass for the wrong
// reason.

// yamlNode is a parsed node. Scalars keep their text and whether they were
// quoted (Kubernetes reads targetPort: "8080" as a port name, 8080 as a
// number).
type yamlNode struct {
	kind   yamlKind
	line   int
	keys   []string // mapping keys in order
	m      map[string]*yamlNode
	seq    []*yamlNode
	s      string
	quoted bool
}

type yamlKind int

const (
	yamlNull yamlKind = iota
	yamlScalar
	yamlMapping
	yamlSequence
)

// get follows mapping keys; nil when a key is missing or a node on the way
// is not a mapping.
func (n *yamlNode) get(path ...string) *yamlNode {
	for _, k := range path {
		if n == nil || n.kind != yamlMapping {
			return nil
		}
		n = n.m[k]
	}
	return n
}

// str is the scalar's text, "" for anything else.
func (n *yamlNode) str() string {
	if n == nil || n.kind != yamlScalar {
		return ""
	}
	return n.s
}

// items is a sequence's items, nil for anything else.
func (n *yamlNode) items() []*yamlNode {
	if n == nil || n.kind != yamlSequence {
		return nil
	}
	return n.seq
}

// toGo renders a node as map[string]any, []any, string and nil.
func (n *yamlNode) toGo() any {
	switch n.kind {
	case yamlScalar:
		return n.s
	case yamlMapping:
		out := make(map[string]any, len(n.m))
		for k, v := range n.m {
			out[k] = v.toGo()
		}
		return out
	case yamlSequence:
		out := make([]any, 0, len(n.seq))
		for _, v := range n.seq {
			out = append(out, v.toGo())
		}
		return out
	}
	return nil
}

// yamlLine is a line that carries content: its indentation and its text
// without the indentation, a trailing comment and trailing blanks.
type yamlLine struct {
	num    int // 1-based, in the file
	raw    int // index into the document's raw lines
	indent int
	text   string
}

type yamlParser struct {
	file  string
	raw   []string // the document's lines as written
	first int      // line number of raw[0]
	lines []yamlLine
	pos   int
}

type yamlError struct {
	file string
	line int
	msg  string
}

func (e *yamlError) Error() string { return fmt.Sprintf("%s:%d: %s", e.file, e.line, e.msg) }

// parseYAMLDocuments parses every document of a file (empty ones, such as a
// file's leading comment block before ---, are dropped).
func parseYAMLDocuments(file, src string) (docs []*yamlNode, err error) {
	defer func() {
		if r := recover(); r != nil {
			ye, ok := r.(*yamlError)
			if !ok {
				panic(r)
			}
			docs, err = nil, ye
		}
	}()
	if strings.HasPrefix(src, "\ufeff") {
		return nil, &yamlError{file, 1, "byte order mark: not supported"}
	}
	all := strings.Split(strings.ReplaceAll(src, "\r\n", "\n"), "\n")
	start := 0
	flush := func(end int) {
		p := &yamlParser{file: file, raw: all[start:end], first: start + 1}
		if doc := p.document(); doc != nil {
			docs = append(docs, doc)
		}
	}
	for i, l := range all {
		trimmed := strings.TrimRight(l, " \t")
		switch {
		case trimmed == "---" || strings.HasPrefix(trimmed, "--- #"):
			flush(i)
			start = i + 1
		case strings.HasPrefix(l, "---") || strings.HasPrefix(l, "..."):
			return nil, &yamlError{file, i + 1, "document markers other than a bare --- are not supported"}
		case strings.HasPrefix(l, "%"):
			return nil, &yamlError{file, i + 1, "directives are not supported"}
		}
	}
	flush(len(all))
	return docs, nil
}

func (p *yamlParser) fail(line int, format string, args ...any) {
	panic(&yamlError{p.file, line, fmt.Sprintf(format, args...)})
}

func (p *yamlParser) document() *yamlNode {
	for i, l := range p.raw {
		text := strings.TrimRight(stripComment(l), " \t")
		content := strings.TrimLeft(text, " ")
		if content == "" {
			continue
		}
		indent := len(text) - len(content)
		if content[0] == '\t' {
			// A tab in the indentation: refused when the parser reaches the
			// line, so that a literal block may still hold one.
			indent = -1
		}
		p.lines = append(p.lines, yamlLine{num: p.first + i, raw: i, indent: indent, text: content})
	}
	if len(p.lines) == 0 {
		return nil
	}
	if p.cur().indent != 0 {
		p.fail(p.lines[0].num, "a document must start at column 1")
	}
	n := p.block(0)
	if p.pos < len(p.lines) {
		p.cur()
		p.fail(p.lines[p.pos].num, "unexpected content (indentation?)")
	}
	return n
}

// stripComment removes a # comment: one at the start or after a blank,
// outside quotes.
func stripComment(s string) string {
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote == '"' && c == '\\':
			i++
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			if i == 0 || s[i-1] == ' ' || s[i-1] == '[' || s[i-1] == ',' || s[i-1] == '-' {
				quote = c
			}
		case c == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t'):
			return s[:i]
		}
	}
	return s
}

func (p *yamlParser) cur() yamlLine {
	l := p.lines[p.pos]
	if l.indent < 0 {
		p.fail(l.num, "tab in indentation: not supported")
	}
	return l
}

func isSeqItem(text string) bool { return text == "-" || strings.HasPrefix(text, "- ") }

// block parses the mapping or sequence whose lines start at indent.
func (p *yamlParser) block(indent int) *yamlNode {
	if isSeqItem(p.cur().text) {
		return p.sequence(indent)
	}
	return p.mapping(indent)
}

// splitKey splits "key: value" and "key:"; ok is false for anything else.
func splitKey(text string) (key, rest string, ok bool) {
	if i := strings.Index(text, ": "); i > 0 {
		return text[:i], strings.TrimLeft(text[i+2:], " "), true
	}
	if k, found := strings.CutSuffix(text, ":"); found && k != "" {
		return k, "", true
	}
	return "", "", false
}

func (p *yamlParser) mapping(indent int) *yamlNode {
	n := &yamlNode{kind: yamlMapping, line: p.cur().num, m: map[string]*yamlNode{}}
	for p.pos < len(p.lines) && p.cur().indent == indent && !isSeqItem(p.cur().text) {
		l := p.cur()
		key, rest, ok := splitKey(l.text)
		if !ok {
			p.fail(l.num, "expected key: value, got %q (multi-line plain scalars are not supported)", l.text)
		}
		if strings.ContainsAny(key[:1], "\"'?&*!|>%@`{[") || strings.ContainsAny(key, "#") {
			p.fail(l.num, "key %q: quoted, complex or tagged keys are not supported", key)
		}
		if _, dup := n.m[key]; dup {
			p.fail(l.num, "duplicate key %q", key)
		}
		p.pos++
		n.keys = append(n.keys, key)
		n.m[key] = p.value(rest, indent, l, true)
	}
	if p.pos < len(p.lines) && p.cur().indent > indent {
		p.fail(p.cur().num, "unexpected indentation")
	}
	return n
}

func (p *yamlParser) sequence(indent int) *yamlNode {
	n := &yamlNode{kind: yamlSequence, line: p.cur().num}
	for p.pos < len(p.lines) && p.cur().indent == indent && isSeqItem(p.cur().text) {
		l := p.cur()
		rest := strings.TrimLeft(strings.TrimPrefix(l.text, "-"), " ")
		itemIndent := indent + len(l.text) - len(rest)
		if _, _, isEntry := splitKey(rest); rest != "" && (isSeqItem(rest) || (isEntry && !strings.ContainsAny(rest[:1], "\"'[{"))) {
			// "- key: value" or "- - item": the item is a block that starts
			// on this line, at the column after the dash.
			p.lines[p.pos] = yamlLine{num: l.num, raw: l.raw, indent: itemIndent, text: rest}
			n.seq = append(n.seq, p.block(itemIndent))
			continue
		}
		p.pos++
		n.seq = append(n.seq, p.value(rest, indent, l, false))
	}
	if p.pos < len(p.lines) && p.cur().indent > indent {
		p.fail(p.cur().num, "unexpected indentation")
	}
	return n
}

// value parses what follows "key:" or "- " on line l, whose block is at
// indent; inMapping allows a sequence at the key's own indent.
func (p *yamlParser) value(rest string, indent int, l yamlLine, inMapping bool) *yamlNode {
	switch {
	case rest == "":
		if p.pos < len(p.lines) {
			next := p.cur()
			if next.indent > indent {
				return p.block(next.indent)
			}
			if inMapping && next.indent == indent && isSeqItem(next.text) {
				return p.sequence(indent)
			}
		}
		return &yamlNode{kind: yamlNull, line: l.num}
	case rest == "|" || rest == "|-":
		return p.literal(indent, rest == "|-", l)
	case rest == "{}":
		return &yamlNode{kind: yamlMapping, line: l.num, m: map[string]*yamlNode{}}
	case rest[0] == '[':
		return p.flowSequence(rest, l)
	case strings.ContainsAny(rest[:1], "{&*!|>%@`?,]}") || isSeqItem(rest):
		p.fail(l.num, "%q: flow mappings, anchors, aliases, tags, folded or indented block scalars are not supported", rest)
	}
	return p.scalar(rest, l)
}

func (p *yamlParser) scalar(text string, l yamlLine) *yamlNode {
	n := &yamlNode{kind: yamlScalar, line: l.num, s: text}
	switch text[0] {
	case '"':
		if len(text) < 2 || text[len(text)-1] != '"' {
			p.fail(l.num, "%s: unterminated or trailing text after a double-quoted scalar", text)
		}
		s, err := strconv.Unquote(text)
		if err != nil {
			p.fail(l.num, "%s: unsupported double-quoted scalar: %v", text, err)
		}
		n.s, n.quoted = s, true
	case '\'':
		inner, ok := strings.CutPrefix(text, "'")
		if inner, ok = strings.CutSuffix(inner, "'"); !ok || len(text) < 2 || strings.Contains(strings.ReplaceAll(inner, "''", ""), "'") {
			p.fail(l.num, "%s: unterminated or trailing text after a single-quoted scalar", text)
		}
		n.s, n.quoted = strings.ReplaceAll(inner, "''", "'"), true
	default:
		if strings.Contains(text, ": ") || strings.HasSuffix(text, ":") {
			p.fail(l.num, "%q: a plain scalar with ': ' (a mapping on one line?) is not supported", text)
		}
	}
	return n
}

// flowSequence parses [a, "b", 'c'] on one line: scalars only.
func (p *yamlParser) flowSequence(text string, l yamlLine) *yamlNode {
	n := &yamlNode{kind: yamlSequence, line: l.num}
	inner, ok := strings.CutSuffix(text, "]")
	if !ok {
		p.fail(l.num, "%s: flow sequences must end on their line", text)
	}
	inner = strings.TrimSpace(inner[1:])
	if inner == "" {
		return n
	}
	var quote byte
	start := 0
	for i := 0; i <= len(inner); i++ {
		if i < len(inner) {
			c := inner[i]
			switch {
			case quote == '"' && c == '\\':
				i++
				continue
			case quote != 0:
				if c == quote {
					quote = 0
				}
				continue
			case c == '"' || c == '\'':
				quote = c
				continue
			case strings.IndexByte("[]{}", c) >= 0:
				p.fail(l.num, "%s: nested flow collections are not supported", text)
			case c != ',':
				continue
			}
		}
		item := strings.TrimSpace(inner[start:i])
		if item == "" {
			p.fail(l.num, "%s: empty item in a flow sequence", text)
		}
		if strings.ContainsAny(item[:1], "&*!|>%@`?") {
			p.fail(l.num, "%s: unsupported item %q", text, item)
		}
		n.seq = append(n.seq, p.scalar(item, l))
		start = i + 1
	}
	if quote != 0 {
		p.fail(l.num, "%s: unterminated quote", text)
	}
	return n
}

// literal reads a | block scalar from the raw lines after l: every line
// indented more than the key (blank lines included), less the indentation
// of the first one. It keeps one final newline (|) or none (|-).
func (p *yamlParser) literal(indent int, strip bool, l yamlLine) *yamlNode {
	var body []string
	blockIndent := -1
	r := l.raw + 1
	for ; r < len(p.raw); r++ {
		line := p.raw[r]
		if strings.TrimSpace(line) == "" {
			body = append(body, "")
			continue
		}
		ind := len(line) - len(strings.TrimLeft(line, " "))
		if ind <= indent {
			if line[ind] == '\t' {
				p.fail(p.first+r, "tab in indentation: not supported")
			}
			break
		}
		if blockIndent < 0 {
			blockIndent = ind
		}
		if ind < blockIndent {
			p.fail(p.first+r, "a literal block line indented less than its first line")
		}
		body = append(body, line[blockIndent:])
	}
	if blockIndent < 0 {
		p.fail(l.num, "empty literal block")
	}
	for len(body) > 0 && body[len(body)-1] == "" {
		body = body[:len(body)-1]
	}
	for p.pos < len(p.lines) && p.lines[p.pos].raw < r {
		p.pos++
	}
	s := strings.Join(body, "\n")
	if !strip {
		s += "\n"
	}
	return &yamlNode{kind: yamlScalar, line: l.num, s: s}
}

func TestTheManifestParserReadsTheYAMLTheManifestsUse(t *testing.T) {
	cases := []struct {
		name string
		src  string
		want []any
	}{
		{"a block mapping with nested mappings", "a: 1\nb:\n  c: x\n  d:\n    e: y\n",
			[]any{map[string]any{"a": "1", "b": map[string]any{"c": "x", "d": map[string]any{"e": "y"}}}}},
		{"a sequence of mappings, indented or at the key's column", "l:\n  - name: a\n    port: 1\n  - name: b\nm:\n- x\n- y\n",
			[]any{map[string]any{"l": []any{map[string]any{"name": "a", "port": "1"}, map[string]any{"name": "b"}}, "m": []any{"x", "y"}}}},
		{"quoted scalars, a URL and a trailing comment", "a: \"8080\" # c\nb: 'it''s'\nc: https://x.test/a#frag # c\nd: \"a: b # c\"\n",
			[]any{map[string]any{"a": "8080", "b": "it's", "c": "https://x.test/a#frag", "d": "a: b # c"}}},
		{"flow sequences of scalars", "a: [\"ALL\"]\nb: [migrate, 'x, y']\nc: []\n",
			[]any{map[string]any{"a": []any{"ALL"}, "b": []any{"migrate", "x, y"}, "c": []any{}}}},
		{"a literal block keeps its lines, blank ones and # included", "a: |\n  {\n    \"k\": 1\n\n  # not a comment\n  }\nb: 2\n",
			[]any{map[string]any{"a": "{\n  \"k\": 1\n\n# not a comment\n}\n", "b": "2"}}},
		{"documents split at ---, comment-only ones dropped", "# head\n---\na: 1\n---\n# only a comment\n---\nb: 2\n",
			[]any{map[string]any{"a": "1"}, map[string]any{"b": "2"}}},
		{"an empty value and an empty mapping", "a:\nb: {}\n", []any{map[string]any{"a": nil, "b": map[string]any{}}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			docs, err := parseYAMLDocuments("test.yaml", tc.src)
			if err != nil {
				t.Fatal(err)
			}
			var got []any
			for _, d := range docs {
				got = append(got, d.toGo())
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %#v\nwant %#v", got, tc.want)
			}
		})
	}
}

func TestTheManifestParserRefusesYAMLItDoesNotSupport(t *testing.T) {
	cases := []struct {
		name, src string
		line      int
	}{
		{"an anchor", "a: &x 1\n", 1},
		{"an alias", "a: 1\nb: *x\n", 2},
		{"a tag", "a: !!str 1\n", 1},
		{"a flow mapping", "a: {b: 1}\n", 1},
		{"a folded block scalar", "a: >\n  text\n", 1},
		{"a tab in the indentation", "a:\n\tb: 1\n", 2},
		{"a plain scalar over two lines", "a: one\n  two\n", 2},
		{"a duplicate key", "a: 1\nb: 2\na: 3\n", 3},
		{"a line between two indentation levels", "a:\n    b: 1\n  c: 2\n", 3},
		{"a quoted key", "\"a\": 1\n", 1},
		{"a directive", "%YAML 1.2\n---\na: 1\n", 1},
		{"an end-of-document marker", "a: 1\n...\n", 2},
		{"an unterminated quote", "a: \"x\n", 1},
		{"text after a quoted scalar", "a: \"x\" y\n", 1},
		{"a mapping on one line", "a: b: c\n", 1},
		{"a nested flow sequence", "a: [[1]]\n", 1},
		{"a line that is not key: value", "a: 1\njust text\n", 2},
		{"a document not starting at column 1", "  a: 1\n", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			docs, err := parseYAMLDocuments("test.yaml", tc.src)
			if err == nil {
				t.Fatalf("parsed %q without error: %v", tc.src, docs[0].toGo())
			}
			if want := fmt.Sprintf("test.yaml:%d:", tc.line); !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q, want it at %s", err, want)
			}
		})
	}
}

// podTemplate is a pod spec as some workload declares it.
type podTemplate struct {
	where  string // kind/name in file
	labels map[string]string
	spec   *yamlNode
}

type k8sDoc struct {
	file string
	root *yamlNode
}

func (d k8sDoc) where() string {
	return fmt.Sprintf("%s/%s in %s", d.root.get("kind").str(), d.root.get("metadata", "name").str(), d.file)
}

func podTemplates(docs []k8sDoc) []podTemplate {
	var out []podTemplate
	for _, d := range docs {
		var tmpl *yamlNode
		switch d.root.get("kind").str() {
		case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job":
			tmpl = d.root.get("spec", "template")
		case "CronJob":
			tmpl = d.root.get("spec", "jobTemplate", "spec", "template")
		case "Pod":
			tmpl = d.root
		default:
			continue
		}
		labels := map[string]string{}
		if l := tmpl.get("metadata", "labels"); l != nil {
			for _, k := range l.keys {
				labels[k] = l.m[k].str()
			}
		}
		out = append(out, podTemplate{where: d.where(), labels: labels, spec: tmpl.get("spec")})
	}
	return out
}

// containerPorts is what a container declares: names to numbers, and the
// numbers.
func containerPorts(c *yamlNode) (byName map[string]string, numbers []string) {
	byName = map[string]string{}
	for _, p := range c.get("ports").items() {
		n := p.get("containerPort").str()
		numbers = append(numbers, n)
		if name := p.get("name").str(); name != "" {
			byName[name] = n
		}
	}
	return byName, numbers
}

// portRef is a targetPort or probe port: a number, or a name to look up.
func portRef(n *yamlNode) (number string, name string) {
	if n.kind == yamlScalar && !n.quoted {
		if _, err := strconv.ParseUint(n.s, 10, 16); err == nil {
			return n.s, ""
		}
	}
	return "", n.str()
}

// manifestPortProblems lists every port reference the cluster cannot
// resolve the same way on every supported version.
func manifestPortProblems(docs []k8sDoc) []string {
	var problems []string
	pods := podTemplates(docs)
	for _, pod := range pods {
		var containers []*yamlNode
		containers = append(containers, pod.spec.get("initContainers").items()...)
		containers = append(containers, pod.spec.get("containers").items()...)
		for _, c := range containers {
			byName, numbers := containerPorts(c)
			who := fmt.Sprintf("container %q of %s", c.get("name").str(), pod.where)
			for _, probe := range []string{"startupProbe", "livenessProbe", "readinessProbe"} {
				for _, handler := range []string{"httpGet", "tcpSocket", "grpc"} {
					h := c.get(probe, handler)
					if h == nil {
						continue
					}
					port := h.get("port")
					if port == nil {
						problems = append(problems, fmt.Sprintf("%s: %s.%s has no port", who, probe, handler))
						continue
					}
					switch num, name := portRef(port); {
					case name != "" && byName[name] == "":
						problems = append(problems, fmt.Sprintf("%s: %s port %q is not a port name of this container", who, probe, name))
					case num != "" && !slices.Contains(numbers, num):
						problems = append(problems, fmt.Sprintf("%s: %s port %s is not a containerPort of this container", who, probe, num))
					}
				}
			}
			for _, e := range c.get("env").items() {
				if e.get("name").str() != "LISTEN_ADDR" {
					continue
				}
				addr := e.get("value").str()
				if i := strings.LastIndex(addr, ":"); i < 0 || !slices.Contains(numbers, addr[i+1:]) {
					problems = append(problems, fmt.Sprintf("%s: LISTEN_ADDR %q is not on a declared containerPort %v", who, addr, numbers))
				}
			}
		}
	}

	for _, d := range docs {
		if d.root.get("kind").str() != "Service" {
			continue
		}
		sel := d.root.get("spec", "selector")
		if sel == nil || len(sel.keys) == 0 {
			problems = append(problems, d.where()+": no selector")
			continue
		}
		var selected []podTemplate
		for _, pod := range pods {
			if !slices.ContainsFunc(sel.keys, func(k string) bool { return pod.labels[k] != sel.m[k].str() }) {
				selected = append(selected, pod)
			}
		}
		if len(selected) == 0 {
			problems = append(problems, d.where()+": its selector matches no pod template here")
		}
		for _, sp := range d.root.get("spec", "ports").items() {
			target := sp.get("targetPort")
			if target == nil {
				target = sp.get("port")
			}
			num, name := portRef(target)
			for _, pod := range selected {
				// A port counts when a container that runs for the pod's life
				// declares it: a regular container, or for a number also a
				// native sidecar (the EndpointSlice then needs no lookup).
				var regularNames, sidecarNames, numbers []string
				for _, c := range pod.spec.get("containers").items() {
					byName, nums := containerPorts(c)
					for n := range byName {
						regularNames = append(regularNames, n)
					}
					numbers = append(numbers, nums...)
				}
				for _, c := range pod.spec.get("initContainers").items() {
					if c.get("restartPolicy").str() != "Always" {
						continue
					}
					byName, nums := containerPorts(c)
					for n := range byName {
						sidecarNames = append(sidecarNames, n)
					}
					numbers = append(numbers, nums...)
				}
				switch {
				case name != "" && slices.Contains(sidecarNames, name) && !slices.Contains(regularNames, name):
					problems = append(problems, fmt.Sprintf("%s: targetPort %q is named only on a native sidecar (init container) of %s; "+
						"Kubernetes before 1.32/1.33 does not publish such names to EndpointSlices (kubernetes#127958): use the number", d.where(), name, pod.where))
				case name != "" && !slices.Contains(regularNames, name):
					problems = append(problems, fmt.Sprintf("%s: targetPort %q is not a port name of any container of %s", d.where(), name, pod.where))
				case num != "" && !slices.Contains(numbers, num):
					problems = append(problems, fmt.Sprintf("%s: targetPort %s is not a containerPort of any container of %s", d.where(), num, pod.where))
				}
			}
		}
	}
	return problems
}

func parseK8sDocs(t *testing.T, file, src string) []k8sDoc {
	t.Helper()
	roots, err := parseYAMLDocuments(file, src)
	if err != nil {
		t.Fatal(err)
	}
	var docs []k8sDoc
	for _, r := range roots {
		if r.kind != yamlMapping || r.get("kind").str() == "" {
			t.Fatalf("%s: a document without a kind at line %d", file, r.line)
		}
		docs = append(docs, k8sDoc{file: file, root: r})
	}
	return docs
}

func TestThePortCheckFindsPortsTheClusterCannotResolve(t *testing.T) {
	const deployment = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: d
spec:
  template:
    metadata:
      labels:
        app: a
    spec:
      initContainers:
        - name: sidecar
          restartPolicy: Always
          ports:
            - name: http
              containerPort: 8080
          env:
            - name: LISTEN_ADDR
              value: ":8080"
          readinessProbe:
            httpGet:
              path: /readyz
              port: %s
        - name: setup
          ports:
            - name: setup-port
              containerPort: 9000
      containers:
        - name: app
          ports:
            - name: app-http
              containerPort: 3000
---
apiVersion: v1
kind: Service
metadata:
  name: s
spec:
  selector:
    app: %s
  ports:
    - port: 80
      targetPort: %s
`
	cases := []struct {
		name                        string
		probePort, selector, target string
		wantProblem                 string // "" for none
	}{
		{"a numeric targetPort on a native sidecar is fine", "http", "a", "8080", ""},
		{"a named targetPort on a regular container is fine", "http", "a", "app-http", ""},
		{"a named targetPort declared only on a native sidecar is the kubernetes#127958 mistake", "http", "a", "http", "named only on a native sidecar"},
		{"a named targetPort nobody declares", "http", "a", "metrics", `targetPort "metrics" is not a port name`},
		{"a named targetPort of an init container that is not a sidecar", "http", "a", "setup-port", `targetPort "setup-port" is not a port name`},
		{"a numeric targetPort nobody declares", "http", "a", "8081", "targetPort 8081 is not a containerPort"},
		{"a quoted number is a port name to Kubernetes", "http", "a", `"8080"`, `targetPort "8080" is not a port name`},
		{"a selector that matches no pod", "http", "b", "8080", "matches no pod template"},
		{"a probe port name of another container", "app-http", "a", "8080", `readinessProbe port "app-http" is not a port name of this container`},
		{"a probe port number the container does not declare", "3000", "a", "8080", "readinessProbe port 3000 is not a containerPort"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			docs := parseK8sDocs(t, "case.yaml", fmt.Sprintf(deployment, tc.probePort, tc.selector, tc.target))
			problems := manifestPortProblems(docs)
			switch {
			case tc.wantProblem == "" && len(problems) > 0:
				t.Errorf("unexpected problems: %q", problems)
			case tc.wantProblem != "" && (len(problems) != 1 || !strings.Contains(problems[0], tc.wantProblem)):
				t.Errorf("problems %q, want exactly one with %q", problems, tc.wantProblem)
			}
		})
	}
}

func TestTheKubernetesManifestsReachTheirContainersOnEverySupportedVersion(t *testing.T) {
	files, err := filepath.Glob("deploy/kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests found: %v", err)
	}
	var docs []k8sDoc
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		fileDocs := parseK8sDocs(t, f, string(src))
		if len(fileDocs) == 0 {
			t.Fatalf("%s: no document", f)
		}
		docs = append(docs, fileDocs...)
	}
	// The check must have something to check: a Service and the pods it
	// selects, with probes.
	var services, probes int
	for _, d := range docs {
		if d.root.get("kind").str() == "Service" {
			services++
		}
	}
	for _, pod := range podTemplates(docs) {
		for _, c := range append(pod.spec.get("initContainers").items(), pod.spec.get("containers").items()...) {
			for _, p := range []string{"startupProbe", "livenessProbe", "readinessProbe"} {
				if c.get(p) != nil {
					probes++
				}
			}
		}
	}
	if services == 0 || probes == 0 {
		t.Fatalf("found %d Services and %d probes in %d documents: the check would prove nothing", services, probes, len(docs))
	}
	for _, p := range manifestPortProblems(docs) {
		t.Error(p)
	}
	t.Logf("%d documents in %d files, %d Services, %d probes checked", len(docs), len(files), services, probes)
}
