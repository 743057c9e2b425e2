package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"math/big"
	"mime"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// apiDoc is openapi.json decoded for checking, numbers kept as json.Number so
// integer bounds compare exactly.
type apiDoc struct {
	root map[string]any
}

func parseAPIDoc(t testing.TB, raw []byte) *apiDoc {
	t.Helper()
	v, err := decodeJSONExact(raw)
	if err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	root, ok := v.(map[string]any)
	if !ok {
		t.Fatal("openapi.json is not an object")
	}
	return &apiDoc{root: root}
}

func loadAPIDoc(t testing.TB) *apiDoc {
	t.Helper()
	raw, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	return parseAPIDoc(t, raw)
}

// decodeJSONExact decodes one JSON value and refuses trailing data.
func decodeJSONExact(raw []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("trailing data after the JSON value")
	}
	return v, nil
}

// lookup follows a local JSON pointer such as #/components/schemas/Record.
func (d *apiDoc) lookup(ref string) (map[string]any, error) {
	rest, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		return nil, fmt.Errorf("only local $refs are supported: %q", ref)
	}
	var cur any = d.root
	for _, part := range strings.Split(rest, "/") {
		part = strings.ReplaceAll(strings.ReplaceAll(part, "~1", "/"), "~0", "~")
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("$ref %q: %q is not inside an object", ref, part)
		}
		if cur, ok = m[part]; !ok {
			return nil, fmt.Errorf("$ref %q: no %q", ref, part)
		}
	}
	m, ok := cur.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("$ref %q does not name an object", ref)
	}
	return m, nil
}

// resolve follows $ref chains on a response, header or parameter object.
func (d *apiDoc) resolve(node map[string]any) (map[string]any, error) {
	for range 10 {
		ref, ok := node["$ref"].(string)
		if !ok {
			return node, nil
		}
		var err error
		if node, err = d.lookup(ref); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("$ref chain too long")
}

// The validator understands exactly these keywords; a schema using any other
// is an error, so the document cannot gain a constraint the test ignores.
var (
	schemaKeywords     = []string{"$ref", "type", "required", "properties", "additionalProperties", "items", "minimum", "maximum", "minLength", "pattern", "enum", "format", "oneOf"}
	annotationKeywords = []string{"description", "title", "default", "examples"}
)

// validate checks v against schema (the subset of JSON Schema the document
// uses) and returns one message per violation, each starting with its path.
func (d *apiDoc) validate(schema map[string]any, v any, at string) []string {
	var errs []string
	fail := func(format string, args ...any) { errs = append(errs, at+": "+fmt.Sprintf(format, args...)) }

	for k := range schema {
		if !slices.Contains(schemaKeywords, k) && !slices.Contains(annotationKeywords, k) {
			fail("the schema uses %q, which this validator does not implement", k)
		}
	}
	if ref, ok := schema["$ref"].(string); ok {
		target, err := d.lookup(ref)
		if err != nil {
			fail("%v", err)
			return errs
		}
		errs = append(errs, d.validate(target, v, at)...)
	}
	if typ, ok := schema["type"]; ok {
		types, err := stringList(typ)
		if err != nil {
			fail("type: %v", err)
		} else if !slices.ContainsFunc(types, func(ty string) bool { return hasJSONType(v, ty) }) {
			fail("is %s, want type %s", describeJSON(v), strings.Join(types, " or "))
			return errs // the other keywords would only repeat this
		}
	}
	if one, ok := schema["oneOf"].([]any); ok {
		var matched int
		var why []string
		for i, sub := range one {
			sm, _ := sub.(map[string]any)
			if e := d.validate(sm, v, fmt.Sprintf("%s(oneOf %d)", at, i)); len(e) == 0 {
				matched++
			} else {
				why = append(why, e...)
			}
		}
		if matched != 1 {
			fail("%s matches %d of the oneOf schemas, want exactly 1 (%s)", describeJSON(v), matched, strings.Join(why, "; "))
		}
	}
	if enum, ok := schema["enum"].([]any); ok {
		if !slices.ContainsFunc(enum, func(e any) bool { return jsonEqual(e, v) }) {
			fail("%s is not one of %s", describeJSON(v), compactJSON(enum))
		}
	}

	switch x := v.(type) {
	case map[string]any:
		props, _ := schema["properties"].(map[string]any)
		if req, ok := schema["required"]; ok {
			names, err := stringList(req)
			if err != nil {
				fail("required: %v", err)
			}
			for _, name := range names {
				if _, ok := x[name]; !ok {
					fail("required property %q is missing", name)
				}
			}
		}
		for _, name := range sortedKeys(x) {
			if sub, ok := props[name].(map[string]any); ok {
				errs = append(errs, d.validate(sub, x[name], at+"."+name)...)
				continue
			}
			switch ap := schema["additionalProperties"].(type) {
			case bool:
				if !ap {
					fail("property %q is not in the document (additionalProperties is false)", name)
				}
			case map[string]any:
				errs = append(errs, d.validate(ap, x[name], at+"."+name)...)
			}
		}
	case []any:
		if items, ok := schema["items"].(map[string]any); ok {
			for i, item := range x {
				errs = append(errs, d.validate(items, item, fmt.Sprintf("%s[%d]", at, i))...)
			}
		}
	case string:
		if n, ok := schema["minLength"].(json.Number); ok {
			if min, err := n.Int64(); err != nil || int64(len([]rune(x))) < min {
				fail("%q is shorter than minLength %s", x, n)
			}
		}
		if p, ok := schema["pattern"].(string); ok {
			re, err := regexp.Compile(p)
			if err != nil {
				fail("pattern %q does not compile: %v", p, err)
			} else if !re.MatchString(x) {
				fail("%q does not match the pattern %s", x, p)
			}
		}
		if f, ok := schema["format"].(string); ok {
			switch f {
			case "date-time":
				if _, err := time.Parse(time.RFC3339, x); err != nil {
					fail("%q is not an RFC 3339 date-time", x)
				}
			default:
				fail("format %q is not implemented for strings", f)
			}
		}
	case json.Number:
		val, ok := new(big.Rat).SetString(x.String())
		if !ok {
			fail("%s is not a number", x)
			break
		}
		for _, bound := range []struct {
			key  string
			sign int
		}{{"minimum", -1}, {"maximum", 1}} {
			b, ok := schema[bound.key].(json.Number)
			if !ok {
				continue
			}
			lim, ok := new(big.Rat).SetString(b.String())
			if !ok {
				fail("%s %s is not a number", bound.key, b)
			} else if val.Cmp(lim) == bound.sign {
				fail("%s is beyond the %s %s", x, bound.key, b)
			}
		}
		if f, ok := schema["format"].(string); ok {
			bits := map[string]int{"int32": 32, "int64": 64}[f]
			if bits == 0 {
				fail("format %q is not implemented for numbers", f)
			} else if _, err := strconv.ParseInt(x.String(), 10, bits); err != nil {
				fail("%s does not fit %s", x, f)
			}
		}
	}
	return errs
}

func stringList(v any) ([]string, error) {
	switch x := v.(type) {
	case string:
		return []string{x}, nil
	case []any:
		out := make([]string, 0, len(x))
		for _, e := range x {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("%v is not a string", e)
			}
			out = append(out, s)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%v is neither a string nor a list of strings", v)
}

func hasJSONType(v any, typ string) bool {
	switch typ {
	case "object":
		_, ok := v.(map[string]any)
		return ok
	case "array":
		_, ok := v.([]any)
		return ok
	case "string":
		_, ok := v.(string)
		return ok
	case "boolean":
		_, ok := v.(bool)
		return ok
	case "null":
		return v == nil
	case "number":
		_, ok := v.(json.Number)
		return ok
	case "integer":
		n, ok := v.(json.Number)
		if !ok {
			return false
		}
		r, ok := new(big.Rat).SetString(n.String())
		return ok && r.IsInt()
	}
	return false
}

func describeJSON(v any) string {
	switch v.(type) {
	case map[string]any:
		return "an object"
	case []any:
		return "an array"
	case nil:
		return "null"
	}
	return compactJSON(v)
}

func compactJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func jsonEqual(a, b any) bool { return compactJSON(a) == compactJSON(b) }

// checkResponse checks a real response against a documented response object:
// the media type, every documented header, and the body against its schema.
func (d *apiDoc) checkResponse(spec map[string]any, resp *http.Response, body []byte) []string {
	spec, err := d.resolve(spec)
	if err != nil {
		return []string{err.Error()}
	}
	var errs []string
	headers, _ := spec["headers"].(map[string]any)
	for _, name := range sortedKeys(headers) {
		h, err := d.resolve(headers[name].(map[string]any))
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		got := resp.Header.Values(name)
		if len(got) == 0 {
			if h["required"] == true {
				errs = append(errs, "header "+name+" is missing")
			}
			continue
		}
		if len(got) > 1 {
			errs = append(errs, fmt.Sprintf("header %s is sent %d times", name, len(got)))
		}
		if s, ok := h["schema"].(map[string]any); ok {
			errs = append(errs, d.validate(s, got[0], "header "+name)...)
		}
	}

	content, _ := spec["content"].(map[string]any)
	mediaType, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil {
		return append(errs, fmt.Sprintf("Content-Type %q: %v", resp.Header.Get("Content-Type"), err))
	}
	media, ok := content[mediaType].(map[string]any)
	if !ok {
		return append(errs, fmt.Sprintf("Content-Type %s is not documented (document has %v)", mediaType, sortedKeys(content)))
	}
	schema, _ := media["schema"].(map[string]any)
	if resp.Request != nil && resp.Request.Method == http.MethodHead {
		return errs
	}
	switch mediaType {
	case "application/json":
		v, err := decodeJSONExact(body)
		if err != nil {
			return append(errs, fmt.Sprintf("body is not one JSON value: %v", err))
		}
		return append(errs, d.validate(schema, v, "body")...)
	case "text/event-stream":
		// The schema is one event's (OpenAPI 3.2's itemSchema): each block
		// of the wire is checked against it.
		events, err := sseEvents(string(body))
		if err != nil {
			return append(errs, err.Error())
		}
		if len(events) == 0 {
			return append(errs, "the stream has no event")
		}
		for i, ev := range events {
			errs = append(errs, d.validate(schema, ev, fmt.Sprintf("event %d", i))...)
		}
		return errs
	}
	return append(errs, d.validate(schema, string(body), "body")...)
}

// sseEvents reads a stream up to its last complete block as the HTML
// standard's parser would dispatch it, but strictly: every line is a comment
// (only ": ping" is sent) or "field: value" of event, id, data or retry, each
// at most once per block; data is one JSON value. Comments are not events.
func sseEvents(wire string) ([]any, error) {
	end := strings.LastIndex(wire, "\n\n")
	if end < 0 || end+2 != len(wire) {
		return nil, fmt.Errorf("the stream does not end at an event boundary: %q", wire[max(0, len(wire)-40):])
	}
	var events []any
	for _, block := range strings.Split(wire[:end], "\n\n") {
		if block == ": ping" {
			continue
		}
		ev := map[string]any{}
		for _, line := range strings.Split(block, "\n") {
			field, value, ok := strings.Cut(line, ": ")
			if !ok || !slices.Contains([]string{"event", "id", "data", "retry"}, field) {
				return nil, fmt.Errorf("block %q: line %q is not a field the stream sends", block, line)
			}
			if _, dup := ev[field]; dup {
				return nil, fmt.Errorf("block %q: %s given twice", block, field)
			}
			ev[field] = value
			if field == "data" {
				v, err := decodeJSONExact([]byte(value))
				if err != nil {
					return nil, fmt.Errorf("block %q: data is not one JSON value: %v", block, err)
				}
				ev[field] = v
			}
		}
		events = append(events, ev)
	}
	return events, nil
}

// operationResponse is the documented answer for method on path with status.
// HEAD is documented as GET; any other method is answered by the path's 405.
func (d *apiDoc) operationResponse(path, method string, status int) (map[string]any, error) {
	paths, _ := d.root["paths"].(map[string]any)
	item, ok := paths[path].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("path %s is not documented", path)
	}
	op, ok := item["get"].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("path %s has no get operation", path)
	}
	if method != http.MethodGet && method != http.MethodHead && status != http.StatusMethodNotAllowed {
		return nil, fmt.Errorf("%s %s answered %d, but only GET/HEAD are documented there", method, path, status)
	}
	responses, _ := op["responses"].(map[string]any)
	r, ok := responses[strconv.Itoa(status)].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("GET %s: status %d is not documented (documented: %v)", path, status, sortedKeys(responses))
	}
	return r, nil
}

type apiCall struct {
	name, method, target, token string
	header                      []string
	status                      int
	// documentedAs names the response object when the path is not in the
	// document (an unknown path's 404); else path and method select it.
	documentedAs string
}

func checkCalls(t *testing.T, doc *apiDoc, svc *testService, calls []apiCall) {
	t.Helper()
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			resp, body := svc.do(t, c.method, c.target, c.token, c.header...)
			if resp.StatusCode != c.status {
				t.Fatalf("%s %s: status %d, want %d; body %s", c.method, c.target, resp.StatusCode, c.status, body)
			}
			var spec map[string]any
			var err error
			if c.documentedAs != "" {
				spec, err = doc.lookup(c.documentedAs)
			} else {
				path, _, _ := strings.Cut(c.target, "?")
				spec, err = doc.operationResponse(path, c.method, resp.StatusCode)
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range doc.checkResponse(spec, resp, body) {
				t.Errorf("%s %s (%d): %s", c.method, c.target, resp.StatusCode, e)
			}
		})
	}
}

func TestRealResponsesMatchTheOpenAPIDocument(t *testing.T) {
	doc := loadAPIDoc(t)
	svc := newTestService(t)
	amazon, odd := "Amazon", `Bob's <Café> & "Bar"`
	insertRows(t, svc.pool,
		seedRow{id: 1, userID: 1001, passcode: "012345", amount: "100", currency: "USD", merchant: &amazon, expiresAfter: 300, receivedAt: "2026-01-20 18:30:00.75+08"},
		seedRow{id: 2, userID: 1001, passcode: "222222", amount: "1500", currency: "jpy", expiresAfter: 120, receivedAt: "2026-01-19 10:00:00Z"},
		seedRow{id: 3, userID: 1001, passcode: "333333", amount: "1.5", currency: "KWD", merchant: &odd, expiresAfter: 0, receivedAt: "2026-01-18 10:00:00Z"},
		seedRow{id: 4, userID: 1001, passcode: "444444", amount: "-12.345", currency: "EUR", merchant: &amazon, expiresAfter: 600, receivedAt: "2026-01-18 10:00:00Z"},
		seedRow{id: 5, userID: 1002, passcode: "999999", amount: "1", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-21 10:00:00Z"},
	)
	tok := svc.tokenFor(t, 1001)
	checkCalls(t, doc, svc, []apiCall{
		{name: "a page of records is a documented 200", method: "GET", target: "/3ds/my-records", token: tok, status: 200},
		{name: "a small page is a documented 200", method: "GET", target: "/3ds/my-records?page=2&page_size=1", token: tok, status: 200, header: []string{"X-Request-ID", "gw-42"}},
		{name: "a page past the end is a documented 200", method: "GET", target: "/3ds/my-records?page=9", token: tok, status: 200},
		{name: "a user without records gets a documented 200", method: "GET", target: "/3ds/my-records", token: svc.tokenFor(t, 77), status: 200},
		{name: "HEAD carries the documented headers", method: "HEAD", target: "/3ds/my-records", token: tok, status: 200},
		{name: "a bad page is a documented 400", method: "GET", target: "/3ds/my-records?page=0", token: tok, status: 400},
		{name: "a bad page size is a documented 400", method: "GET", target: "/3ds/my-records?page_size=abc", token: tok, status: 400},
		{name: "no token is a documented 401", method: "GET", target: "/3ds/my-records", status: 401},
		{name: "a garbage token is a documented 401", method: "GET", target: "/3ds/my-records", token: "not.a.jwt", status: 401},
		{name: "an unknown sub-path is a documented 404", method: "GET", target: "/3ds/my-records/1002", token: tok, status: 404, documentedAs: "#/components/responses/NotFound"},
		{name: "an unknown path is a documented 404", method: "GET", target: "/nope", status: 404, documentedAs: "#/components/responses/NotFound"},
		{name: "POST on the records is a documented 405", method: "POST", target: "/3ds/my-records", token: tok, status: 405},
		{name: "DELETE on healthz is a documented 405", method: "DELETE", target: "/healthz", status: 405},
		{name: "PUT on the document is a documented 405", method: "PUT", target: "/openapi.json", status: 405},
		{name: "healthz is a documented 200", method: "GET", target: "/healthz", status: 200},
		{name: "readyz is a documented 200", method: "GET", target: "/readyz", status: 200},
		{name: "metrics is a documented 200", method: "GET", target: "/metrics", status: 200},
		{name: "the document itself is a documented 200", method: "GET", target: "/openapi.json", status: 200},
	})

	svc.srv.draining.Store(true)
	checkCalls(t, doc, svc, []apiCall{
		{name: "readyz while draining is a documented 503", method: "GET", target: "/readyz", status: 503},
	})
}

func TestDatabaseAndKeyFailuresMatchTheOpenAPIDocument(t *testing.T) {
	doc := loadAPIDoc(t)
	// Nothing listens on port 1: every query fails, as in a database outage.
	deadStore := NewStore(newTestPool(t, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=1", nil), time.Second)
	key := newTestKey(t, jwa.ES256, "svc", 0)
	withKeys := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	idp := newJWKSServer(t)
	idp.down.Store(true)
	noKeys := NewVerifier(testAuthConfig(idp.URL), discardLogger())
	t.Cleanup(noKeys.Close)

	for _, tc := range []struct {
		name     string
		verifier *Verifier
		call     apiCall
	}{
		{"a database failure is a documented 500", withKeys, apiCall{method: "GET", target: "/3ds/my-records", token: key.token(t, validClaims("1001")), status: 500}},
		{"no keys yet is a documented 503", noKeys, apiCall{method: "GET", target: "/3ds/my-records", token: key.token(t, validClaims("1001")), status: 503}},
		{"readyz with the database down is a documented 503", withKeys, apiCall{method: "GET", target: "/readyz", status: 503}},
	} {
		ts := httptest.NewServer(newServer(deadStore, tc.verifier, nil, discardLogger()))
		t.Cleanup(ts.Close)
		tc.call.name = tc.name
		checkCalls(t, doc, &testService{Server: ts}, []apiCall{tc.call})
	}
}

// TestTheEventStreamMatchesTheOpenAPIDocument reads a real stream from its
// retry line to the connection's close and checks it, its headers and every
// record and end payload against the document; then the stream's refusals.
func TestTheEventStreamMatchesTheOpenAPIDocument(t *testing.T) {
	doc := loadAPIDoc(t)
	svc := newStreamService(t, streamOptions{hub: func(c *hubConfig) { c.perUser, c.heartbeat = 1, 200*time.Millisecond }})
	odd := `Bob's <Café> & "Bar"`
	insertRows(t, svc.pool,
		seedRow{id: 1, userID: 1001, passcode: "012345", amount: "1.5", currency: "kwd", merchant: &odd, expiresAfter: 300, receivedAt: ago(time.Minute)},
		liveRow(2, 1001))
	s, _ := mustOpenStream(t, svc.URL, svc.tokenFor(t, 1001))
	insertRows(t, svc.pool, liveRow(3, 1001))
	s.recordIDs(t, 10*time.Second, func(ids []int64) bool { return len(ids) == 1 })
	if ev, _ := s.next(t, 2*time.Second); ev.comment != "ping" {
		t.Fatalf("want a ping, got %v", ev)
	}

	refusals := []apiCall{
		{name: "no token is a documented 401", method: "GET", target: "/3ds/my-records/events", status: 401},
		{name: "POST is a documented 405", method: "POST", target: "/3ds/my-records/events", token: svc.tokenFor(t, 1001), status: 405},
		{name: "HEAD is a documented 405", method: "HEAD", target: "/3ds/my-records/events", token: svc.tokenFor(t, 1002), status: 405},
	}
	checkCalls(t, doc, svc.testService, refusals)

	svc.hub.shutdown()
	reason, _ := s.end(t, 5*time.Second)
	if reason != "shutting_down" {
		t.Fatalf("end reason %q", reason)
	}
	s.mu.Lock()
	wire := s.wire.String()
	s.mu.Unlock()
	spec, err := doc.operationResponse("/3ds/my-records/events", "GET", 200)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range doc.checkResponse(spec, s.resp, []byte(wire)) {
		t.Errorf("the stream: %s", e)
	}
	record, _ := doc.lookup("#/components/schemas/Record")
	end, _ := doc.lookup("#/components/schemas/StreamEnd")
	for _, block := range strings.Split(strings.TrimSuffix(wire, "\n\n"), "\n\n") {
		schema := record
		if strings.HasPrefix(block, "event: end\n") {
			schema = end
		} else if !strings.HasPrefix(block, "event: record\n") {
			continue
		}
		_, data, _ := strings.Cut(block, "\ndata: ")
		v, err := decodeJSONExact([]byte(data))
		if err != nil {
			t.Errorf("%q: %v", block, err)
			continue
		}
		for _, e := range doc.validate(schema, v, "data") {
			t.Errorf("%q: %s", block, e)
		}
	}
	checkCalls(t, doc, svc.testService, []apiCall{
		{name: "a stream during shutdown is a documented 503", method: "GET", target: "/3ds/my-records/events", token: svc.tokenFor(t, 1002), status: 503},
	})
}

// TestTheValidatorCatchesDrift proves the check above can fail: a real 200
// body, changed the way a careless edit to Record or recordsPage would
// change it, must be refused; so must the real body against a document that
// lost or gained a field.
func TestTheValidatorCatchesDrift(t *testing.T) {
	doc := loadAPIDoc(t)
	svc := newTestService(t)
	amazon := "Amazon"
	insertRows(t, svc.pool, seedRow{id: 1, userID: 1001, passcode: "012345", amount: "100", currency: "USD", merchant: &amazon, expiresAfter: 300, receivedAt: "2026-01-20T10:30:00Z"})
	resp, body := svc.do(t, http.MethodGet, "/3ds/my-records", svc.tokenFor(t, 1001))
	spec, err := doc.operationResponse("/3ds/my-records", "GET", resp.StatusCode)
	if err != nil {
		t.Fatal(err)
	}
	if errs := doc.checkResponse(spec, resp, body); len(errs) != 0 {
		t.Fatalf("the unchanged response must pass: %v", errs)
	}

	record := func(m map[string]any) map[string]any {
		return m["data"].(map[string]any)["records"].([]any)[0].(map[string]any)
	}
	for _, tc := range []struct {
		name   string
		mutate func(m map[string]any)
		want   string
	}{
		{"a field added to a record", func(m map[string]any) { record(m)["user_id"] = json.Number("1001") }, `"user_id" is not in the document`},
		{"a field removed from a record", func(m map[string]any) { delete(record(m), "merchant_name") }, `"merchant_name" is missing`},
		{"a field added to the page", func(m map[string]any) { m["data"].(map[string]any)["has_more"] = false }, `"has_more" is not in the document`},
		{"a field removed from the page", func(m map[string]any) { delete(m["data"].(map[string]any), "total_pages") }, `"total_pages" is missing`},
		{"a field added at the top", func(m map[string]any) { m["message"] = "ok" }, `"message" is not in the document`},
		{"records as null", func(m map[string]any) { m["data"].(map[string]any)["records"] = nil }, "want type array"},
		{"the id as a string", func(m map[string]any) { record(m)["id"] = "1" }, "want type integer"},
		{"the amount as a number", func(m map[string]any) { record(m)["amount"] = json.Number("100.00") }, "want type string"},
		{"the amount in exponent form", func(m map[string]any) { record(m)["amount"] = "1e2" }, "does not match"},
		{"received_at with an offset", func(m map[string]any) { record(m)["received_at"] = "2026-01-20T18:30:00+08:00" }, "does not match"},
		{"received_at with fractions", func(m map[string]any) { record(m)["received_at"] = "2026-01-20T10:30:00.750Z" }, "does not match"},
		{"a lower-case currency", func(m map[string]any) { record(m)["currency"] = "usd" }, "does not match"},
		{"expires_after as a fraction", func(m map[string]any) { record(m)["expires_after"] = json.Number("300.5") }, "want type integer"},
		{"a page size over the bound", func(m map[string]any) { m["data"].(map[string]any)["page_size"] = json.Number("101") }, "beyond the maximum 100"},
		{"a zero page", func(m map[string]any) { m["data"].(map[string]any)["page"] = json.Number("0") }, "beyond the minimum 1"},
		{"another status", func(m map[string]any) { m["status"] = "ok" }, "is not one of"},
	} {
		t.Run(tc.name+" is caught", func(t *testing.T) {
			v, err := decodeJSONExact(body)
			if err != nil {
				t.Fatal(err)
			}
			m := v.(map[string]any)
			tc.mutate(m)
			errs := doc.checkResponse(spec, resp, []byte(compactJSON(m)))
			if !slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, tc.want) }) {
				t.Errorf("errors %q do not report %q", errs, tc.want)
			}
		})
	}

	docMutations := []struct {
		name   string
		mutate func(schemas map[string]any)
		want   string
	}{
		{"a document that lost merchant_name", func(s map[string]any) {
			rec := s["Record"].(map[string]any)
			delete(rec["properties"].(map[string]any), "merchant_name")
			rec["required"] = slices.DeleteFunc(rec["required"].([]any), func(v any) bool { return v == "merchant_name" })
		}, `"merchant_name" is not in the document`},
		{"a document that gained a required field", func(s map[string]any) {
			rec := s["Record"].(map[string]any)
			rec["properties"].(map[string]any)["card_last4"] = map[string]any{"type": "string"}
			rec["required"] = append(rec["required"].([]any), "card_last4")
		}, `"card_last4" is missing`},
	}
	raw, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range docMutations {
		t.Run(tc.name+" refuses the real response", func(t *testing.T) {
			changed := parseAPIDoc(t, raw)
			tc.mutate(changed.root["components"].(map[string]any)["schemas"].(map[string]any))
			errs := changed.checkResponse(spec, resp, body)
			if !slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, tc.want) }) {
				t.Errorf("errors %q do not report %q", errs, tc.want)
			}
		})
	}
}

// registeredRoutes reads the patterns newServer registers from handler.go's
// source, so a route added there without a document entry fails the test.
func registeredRoutes(t *testing.T) []string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "handler.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var routes []string
	for _, decl := range f.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Name.Name != "newServer" {
			continue
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) == 0 {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || (sel.Sel.Name != "Handle" && sel.Sel.Name != "HandleFunc") {
				return true
			}
			lit, ok := call.Args[0].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				t.Errorf("newServer registers a route whose pattern is not a string literal: the document check cannot see it")
				return true
			}
			pattern, err := strconv.Unquote(lit.Value)
			if err != nil {
				t.Fatal(err)
			}
			routes = append(routes, pattern)
			return true
		})
	}
	if len(routes) == 0 {
		t.Fatal("found no route registrations in newServer")
	}
	slices.Sort(routes)
	return routes
}

func TestEveryRouteIsDocumentedAndEveryDocumentedRouteExists(t *testing.T) {
	doc := loadAPIDoc(t)
	var documented []string
	paths, _ := doc.root["paths"].(map[string]any)
	for path, item := range paths {
		for key := range item.(map[string]any) {
			switch key {
			case "get", "put", "post", "delete", "options", "head", "patch", "trace":
				documented = append(documented, strings.ToUpper(key)+" "+path)
			}
		}
	}
	slices.Sort(documented)
	registered := registeredRoutes(t)
	if !slices.Equal(registered, documented) {
		t.Errorf("newServer registers %q\nopenapi.json documents %q", registered, documented)
	}

	// The source scan cannot see a route added some other way, so also ask
	// the real mux which pattern answers each documented route.
	srv := newTestService(t).srv
	for _, route := range documented {
		method, path, _ := strings.Cut(route, " ")
		_, pattern := srv.mux.Handler(httptest.NewRequest(method, path, nil))
		if pattern != route {
			t.Errorf("%s is served by pattern %q", route, pattern)
		}
	}
}

// TestTheDocumentIsAsStrictAsTheContract walks every schema: each uses only
// keywords the validator implements, and each object lists all its
// properties as required and forbids others (the contract's "exactly these
// keys"). It also pins the paging bounds to the code's constants.
func TestTheDocumentIsAsStrictAsTheContract(t *testing.T) {
	doc := loadAPIDoc(t)
	if doc.root["openapi"] != "3.1.0" {
		t.Errorf("openapi = %v, want 3.1.0", doc.root["openapi"])
	}
	var walk func(at string, s map[string]any)
	walk = func(at string, s map[string]any) {
		for k := range s {
			if !slices.Contains(schemaKeywords, k) && !slices.Contains(annotationKeywords, k) {
				t.Errorf("%s uses %q, which the validator does not implement", at, k)
			}
		}
		if props, ok := s["properties"].(map[string]any); ok {
			if s["additionalProperties"] != false {
				t.Errorf("%s: additionalProperties must be false", at)
			}
			req, _ := stringList(s["required"])
			slices.Sort(req)
			if names := sortedKeys(props); !slices.Equal(req, names) {
				t.Errorf("%s: required %v, properties %v: every key is always present", at, req, names)
			}
			for name, p := range props {
				walk(at+"."+name, p.(map[string]any))
			}
		}
		if items, ok := s["items"].(map[string]any); ok {
			walk(at+"[]", items)
		}
	}
	schemas := doc.root["components"].(map[string]any)["schemas"].(map[string]any)
	for name, s := range schemas {
		walk(name, s.(map[string]any))
	}

	params := map[string]map[string]any{}
	op, _ := doc.lookup("#/paths/~13ds~1my-records/get")
	for _, p := range op["parameters"].([]any) {
		p, err := doc.resolve(p.(map[string]any))
		if err != nil {
			t.Fatal(err)
		}
		params[p["name"].(string)] = p["schema"].(map[string]any)
	}
	for _, tc := range []struct {
		name          string
		lo, hi, deflt int
	}{
		{"page", 1, maxPage, 1},
		{"page_size", 1, maxPageSize, defaultPageSize},
	} {
		s := params[tc.name]
		for key, want := range map[string]int{"minimum": tc.lo, "maximum": tc.hi, "default": tc.deflt} {
			if got, _ := s[key].(json.Number); got.String() != strconv.Itoa(want) {
				t.Errorf("%s.%s = %v in the document, %d in the code", tc.name, key, s[key], want)
			}
		}
	}
}

// TestTheDocumentedPagingBoundsAreTheServedOnes sends each bound from the
// document and one past it: inside is 200, outside is 400.
func TestTheDocumentedPagingBoundsAreTheServedOnes(t *testing.T) {
	doc := loadAPIDoc(t)
	svc := newTestService(t)
	tok := svc.tokenFor(t, 1001)
	op, err := doc.lookup("#/paths/~13ds~1my-records/get")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range op["parameters"].([]any) {
		p, _ := doc.resolve(p.(map[string]any))
		if p["in"] != "query" {
			continue
		}
		name := p["name"].(string)
		s := p["schema"].(map[string]any)
		lo, _ := strconv.ParseInt(s["minimum"].(json.Number).String(), 10, 64)
		hi, _ := strconv.ParseInt(s["maximum"].(json.Number).String(), 10, 64)
		for _, tc := range []struct {
			value  int64
			status int
		}{{lo, 200}, {hi, 200}, {lo - 1, 400}, {hi + 1, 400}} {
			target := fmt.Sprintf("/3ds/my-records?%s=%d", name, tc.value)
			resp, body := svc.do(t, http.MethodGet, target, tok)
			if resp.StatusCode != tc.status {
				t.Errorf("%s: %d, want %d; %s", target, resp.StatusCode, tc.status, body)
			}
		}
	}
}

func TestOpenAPIIsServedVerbatim(t *testing.T) {
	svc := newTestService(t)
	resp, body := svc.do(t, http.MethodGet, "/openapi.json", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	assertAPIHeaders(t, resp.Header)
	onDisk, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(body, onDisk) {
		t.Error("GET /openapi.json differs from openapi.json")
	}
	if got := resp.Header.Get("Content-Length"); got != strconv.Itoa(len(onDisk)) {
		t.Errorf("Content-Length = %q, want %d", got, len(onDisk))
	}
	if !json.Valid(body) {
		t.Error("the served document is not JSON")
	}
}

// TestTheEventStreamCheckRefusesDrift proves the stream's check can fail:
// each wire below differs from what the document allows in one way.
func TestTheEventStreamCheckRefusesDrift(t *testing.T) {
	doc := loadAPIDoc(t)
	spec, err := doc.operationResponse("/3ds/my-records/events", "GET", 200)
	if err != nil {
		t.Fatal(err)
	}
	const record = `{"id":7,"passcode":"123456","amount":"1.00","currency":"USD","merchant_name":"","expires_after":300,"received_at":"2026-01-20T10:30:00Z"}`
	check := func(wire string) []string {
		resp := &http.Response{Header: http.Header{"Content-Type": {"text/event-stream"}, "Cache-Control": {"no-store"},
			"X-Request-Id": {"r1"}, "X-Accel-Buffering": {"no"}}}
		return doc.checkResponse(spec, resp, []byte(wire))
	}
	valid := "retry: 2000\n\nevent: record\nid: 7\ndata: " + record + "\n\nevent: ready\ndata: {}\n\n: ping\n\nevent: end\ndata: {\"reason\":\"token_expired\"}\n\n"
	if errs := check(valid); len(errs) != 0 {
		t.Fatalf("a valid stream is refused: %v", errs)
	}
	for _, tc := range []struct{ name, wire string }{
		{"an event type the document does not have", "event: other\ndata: {}\n\n"},
		{"a record event without its id", "event: record\ndata: " + record + "\n\n"},
		{"a record whose data lost a field", "event: record\nid: 7\ndata: {\"id\":7}\n\n"},
		{"an end reason the document does not list", "event: end\ndata: {\"reason\":\"bored\"}\n\n"},
		{"ready with data", "event: ready\ndata: {\"x\":1}\n\n"},
		{"a field the stream never sends", "retry: 2000\nfoo: bar\n\n"},
		{"a comment other than ping", ": hello\n\n"},
		{"a stream cut inside an event", "retry: 2000\n\nevent: ready\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if errs := check(tc.wire); len(errs) == 0 {
				t.Errorf("%q passed the check", tc.wire)
			}
		})
	}
}

// TestTheDocumentGivesLintersNothingToWarnAbout holds the document to the
// rules Spectral (spectral:oas) and Redocly (recommended) warned about:
// every operation has a description and declared tags, info has contact and
// license, and every component is reachable from a path. (Checked with
// spectral-cli 6.16.3 and @redocly/cli 2.77.0 by hand; this keeps it so
// without npm in make test.)
func TestTheDocumentGivesLintersNothingToWarnAbout(t *testing.T) {
	doc := loadAPIDoc(t)
	info, _ := doc.root["info"].(map[string]any)
	for _, k := range []string{"contact", "license", "description"} {
		if info[k] == nil {
			t.Errorf("info has no %s", k)
		}
	}
	declared := map[string]bool{}
	tags, _ := doc.root["tags"].([]any)
	for _, tg := range tags {
		m := tg.(map[string]any)
		if m["description"] == nil {
			t.Errorf("tag %v has no description", m["name"])
		}
		declared[m["name"].(string)] = true
	}
	paths, _ := doc.root["paths"].(map[string]any)
	reached := map[string]bool{}
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if ref, ok := x["$ref"].(string); ok && !reached[ref] {
				reached[ref] = true
				target, err := doc.lookup(ref)
				if err != nil {
					t.Error(err)
					return
				}
				walk(target)
			}
			for _, k := range sortedKeys(x) {
				walk(x[k])
			}
		case []any:
			for _, e := range x {
				walk(e)
			}
		}
	}
	for _, path := range sortedKeys(paths) {
		for method, op := range paths[path].(map[string]any) {
			o := op.(map[string]any)
			if d, _ := o["description"].(string); d == "" {
				t.Errorf("%s %s has no description", method, path)
			}
			opTags, _ := o["tags"].([]any)
			if len(opTags) == 0 {
				t.Errorf("%s %s has no tags", method, path)
			}
			for _, tg := range opTags {
				if !declared[tg.(string)] {
					t.Errorf("%s %s: tag %v is not declared", method, path, tg)
				}
			}
		}
		walk(paths[path])
	}
	walk(doc.root["security"])
	components, _ := doc.root["components"].(map[string]any)
	for _, kind := range sortedKeys(components) {
		if kind == "securitySchemes" {
			continue // used by name in security requirements, not by $ref
		}
		for _, name := range sortedKeys(components[kind].(map[string]any)) {
			if ref := "#/components/" + kind + "/" + name; !reached[ref] {
				t.Errorf("%s is never used", ref)
			}
		}
	}
}
