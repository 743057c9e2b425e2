package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// The fuzz targets run their seeds (f.Add and testdata/fuzz/<Name>/) on
// every `go test`; `go test -run '^$' -fuzz '^FuzzX$' -fuzztime 3m` explores.
// Each target checks its answer against an oracle written independently of
// the code under test, so a shared misreading of the contract cannot hide.

// refPaging is CONTRACT §1's paging rule written out from the text, not
// from parsePaging: '&'-separated pairs decoded as forms are (a ';' or a bad
// escape makes the query malformed, as net/url does, and so does going over
// net/url's 10000-pair limit), each parameter at most once, empty counts as
// absent, and a value is a decimal integer in range. Leading zeros do not
// change the integer ("02" is 2, TestParsePaging agrees), however many there
// are.
func refPaging(raw string) (page, size int64, ok bool) {
	if strings.Count(raw, "&")+1 > 10000 {
		return 0, 0, false
	}
	vals := map[string][]string{}
	for _, pair := range strings.Split(raw, "&") {
		if pair == "" {
			continue
		}
		if strings.Contains(pair, ";") {
			return 0, 0, false
		}
		k, v, _ := strings.Cut(pair, "=")
		k, err := url.QueryUnescape(k)
		if err != nil {
			return 0, 0, false
		}
		if v, err = url.QueryUnescape(v); err != nil {
			return 0, 0, false
		}
		vals[k] = append(vals[k], v)
	}
	one := func(name string, def, hi int64) (int64, bool) {
		vs := vals[name]
		if len(vs) > 1 {
			return 0, false
		}
		if len(vs) == 0 || vs[0] == "" {
			return def, true
		}
		for _, c := range []byte(vs[0]) {
			if c < '0' || c > '9' {
				return 0, false
			}
		}
		n, _ := new(big.Int).SetString(vs[0], 10)
		if n.Sign() <= 0 || n.Cmp(big.NewInt(hi)) > 0 {
			return 0, false
		}
		return n.Int64(), true
	}
	page, okPage := one("page", 1, 2147483647)
	size, okSize := one("page_size", 20, 100)
	return page, size, okPage && okSize
}

// FuzzQueryString sends any raw query through the whole handler stack
// (server, real verifier, real store on a real database). The request is
// handed to the server in-process, so bytes that no HTTP client would put
// on the wire still reach parsePaging.
func FuzzQueryString(f *testing.F) {
	for _, q := range []string{
		"", "page=1", "page=2&page_size=50", "page=&page_size=", "page_size=100", "page=2147483647&page_size=100",
		"page=0", "page=-1", "page=abc", "page=1.5", "page=1e2", "page=%201", "page=+1", "page=101&page_size=101",
		"page=99999999999999999999", "page=1&page=2", "page=02", "page=0000000002", "page=00000000002",
		"page=%32", "pa%67e=3", "page_size=1;page=2", "page=%zz", "page=１", "page=2147483648",
		"page_size=0x10", "page=1&&&page_size=5", "page&page_size", "=&=", "page=%00", "page=1\x00",
		"page=3&user_id=1002", "page%5Fsize=7",
	} {
		f.Add(q)
	}
	svc := newTestService(f)
	var rows []seedRow
	for i := int64(1); i <= 45; i++ {
		rows = append(rows, row(i, 1001, time.Date(2026, 1, 1, 0, 0, int(i), 0, time.UTC).Format(time.RFC3339)))
	}
	insertRows(f, svc.pool, append(rows, row(46, 1002, "2026-02-01T00:00:00Z"))...)
	auth := "Bearer " + svc.tokenFor(f, 1001)

	f.Fuzz(func(t *testing.T, rawQuery string) {
		req := httptest.NewRequest(http.MethodGet, "/3ds/my-records", nil)
		req.URL.RawQuery = rawQuery
		req.Header.Set("Authorization", auth)
		rec := httptest.NewRecorder()
		svc.srv.ServeHTTP(rec, req)

		page, size, ok := refPaging(rawQuery)
		switch {
		case rec.Code == http.StatusOK && ok:
			var p pageBody
			if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
				t.Fatalf("query %q: 200 body is not a page: %v", rawQuery, err)
			}
			d := p.Data
			if int64(d.Page) != page || int64(d.PageSize) != size || d.Total != 45 || d.TotalPages != (45+size-1)/size {
				t.Fatalf("query %q: page %d size %d total %d pages %d, want page %d size %d of 45",
					rawQuery, d.Page, d.PageSize, d.Total, d.TotalPages, page, size)
			}
			for _, r := range d.Records {
				if r.ID == 46 {
					t.Fatalf("query %q: another user's record in the page", rawQuery)
				}
			}
		case rec.Code == http.StatusBadRequest && !ok:
			assertErrorBody(t, rec.Result().Header, rec.Body.Bytes())
		default:
			t.Fatalf("query %q: status %d, want %s; body %s", rawQuery, rec.Code,
				map[bool]string{true: "200", false: "400"}[ok], rec.Body)
		}
	})
}

// FuzzAuthorizationHeader hands any Authorization value to the real
// middleware over a real JWKS. The only answers are 401 or a verified user,
// and a verified user is checked by an independent verification with jwx.
func FuzzAuthorizationHeader(f *testing.F) {
	rs := newTestKey(f, jwa.RS256, "fz-rs", 0)
	es := newTestKey(f, jwa.ES256, "fz-es", 0)
	ed := newTestKey(f, jwa.EdDSA, "fz-ed", 0)
	keys := []testKey{rs, es, ed}
	idp := newJWKSServer(f, rs.publicJWK(f, false), es.publicJWK(f, true), ed.publicJWK(f, false))
	v := newTestVerifier(f, testAuthConfig(idp.URL))

	valid := []string{
		rs.token(f, validClaims("1001")),
		es.token(f, validClaims(1002)),
		ed.token(f, validClaims("9223372036854775807")),
	}
	for i, tok := range valid {
		// The fuzz property is vacuous if nothing can ever be admitted.
		if rec := callWith(v, "/", "Bearer "+tok); rec.Code != http.StatusOK {
			f.Fatalf("valid seed %d refused: %d %s", i, rec.Code, rec.Body)
		}
		parts := strings.Split(tok, ".")
		hdr, payload, sig := parts[0], parts[1], parts[2]
		f.Add("Bearer " + tok)
		f.Add("bEaReR   " + tok)
		f.Add("Bearer " + tok + ".")
		f.Add("Bearer " + tok + " ")
		f.Add("Bearer " + hdr + "." + payload + ".")
		f.Add("Bearer " + hdr + "." + payload + "." + sig[:len(sig)/2])
		f.Add("Bearer " + hdr + "." + payload + "." + sig + "." + sig + "." + sig)
		f.Add("Bearer " + payload + "." + hdr + "." + sig)
		f.Add("Basic " + tok)
		f.Add("Bearer\t" + tok)
	}
	payload, _ := json.Marshal(validClaims("1001"))
	f.Add("Bearer " + unsignedToken([]byte(`{"alg":"none","kid":"fz-rs"}`), payload, nil))
	f.Add("Bearer " + unsignedToken([]byte(`{"alg":"HS256","kid":"fz-rs"}`), payload, []byte("x")))
	f.Add("Bearer " + unsignedToken([]byte(`{"alg":"ES256","kid":"fz-es"}`), payload, make([]byte, 64)))
	f.Add("Bearer " + unsignedToken([]byte(`{"alg":"RS256","kid":"fz-rs","crit":["b64"],"b64":false}`), payload, nil))
	f.Add("Bearer " + unsignedToken([]byte(`{"alg":"RS256","kid":"fz-rs","kid":"fz-es"}`), payload, nil))
	f.Add("Bearer " + unsignedToken([]byte(`[]`), payload, nil))
	f.Add("")
	f.Add("Bearer")
	f.Add("Bearer ")
	f.Add(strings.Repeat("Bearer ", 2000))

	f.Fuzz(func(t *testing.T, header string) {
		rec := callWith(v, "/3ds/my-records", header)
		switch rec.Code {
		case http.StatusUnauthorized:
			assertErrorBody(t, rec.Result().Header, rec.Body.Bytes())
		case http.StatusOK:
			got := admittedUser(t, rec)
			if err := independentlyVerify(header, keys, got); err != nil {
				t.Fatalf("header %q admitted user %d, but: %v", header, got, err)
			}
		default:
			t.Fatalf("header %q: status %d, want 401 or 200; body %s", header, rec.Code, rec.Body)
		}
	})
}

// independentlyVerify re-checks an admitted header with jwx's own JWS
// verification and plain encoding/json, sharing no code with auth.go.
func independentlyVerify(header string, keys []testKey, uid int64) error {
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return fmt.Errorf("scheme %q is not Bearer", scheme)
	}
	token = strings.TrimLeft(token, " ")
	msg, err := jws.Parse([]byte(token), jws.WithCompact())
	if err != nil || len(msg.Signatures()) != 1 {
		return fmt.Errorf("not a compact JWS with one signature: %v", err)
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	var key *testKey
	for i := range keys {
		if keys[i].kid == h.KeyID() {
			key = &keys[i]
		}
	}
	if key == nil {
		return fmt.Errorf("kid %q is not in the set", h.KeyID())
	}
	if h.Algorithm() != key.alg {
		return fmt.Errorf("alg %s, the key is %s", h.Algorithm(), key.alg)
	}
	pub, err := jwk.PublicKeyOf(key.priv)
	if err != nil {
		return err
	}
	payload, err := jws.Verify([]byte(token), jws.WithKey(key.alg, pub))
	if err != nil {
		return fmt.Errorf("signature: %v", err)
	}
	return claimsAdmit(payload, uid)
}

// claimsAdmit is the contract's claim rules, from the text: exp a number in
// the future (with the 30 s leeway), nbf/iat not in the future, iss and aud
// ours, and the user claim exactly the admitted id as a JSON integer or a
// decimal string.
func claimsAdmit(payload []byte, uid int64) error {
	if dup := duplicateMember(payload); dup != "" {
		return fmt.Errorf("claim %q appears twice", dup)
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	var c map[string]any
	if err := dec.Decode(&c); err != nil {
		return fmt.Errorf("claims: %v", err)
	}
	now := float64(time.Now().Unix())
	date := func(name string) (float64, bool, error) {
		raw, present := c[name]
		if !present {
			return 0, false, nil
		}
		n, ok := raw.(json.Number)
		if !ok {
			return 0, true, fmt.Errorf("%s is %T, not a number", name, raw)
		}
		f, err := n.Float64()
		return f, true, err
	}
	exp, present, err := date("exp")
	if err != nil || !present || exp < now-31 {
		return fmt.Errorf("exp %v present %v: %v", c["exp"], present, err)
	}
	for _, name := range []string{"nbf", "iat"} {
		if t, present, err := date(name); err != nil || (present && t > now+31) {
			return fmt.Errorf("%s %v: %v", name, c[name], err)
		}
	}
	if c["iss"] != testIssuer {
		return fmt.Errorf("iss %v", c["iss"])
	}
	switch aud := c["aud"].(type) {
	case string:
		if aud != testAudience {
			return fmt.Errorf("aud %q", aud)
		}
	case []any:
		found := false
		for _, a := range aud {
			found = found || a == testAudience
		}
		if !found {
			return fmt.Errorf("aud %v", aud)
		}
	default:
		return fmt.Errorf("aud %v", aud)
	}
	want := strconv.FormatInt(uid, 10)
	switch sub := c["sub"].(type) {
	case string:
		if sub != want {
			return fmt.Errorf("sub %q, admitted %s", sub, want)
		}
	case json.Number:
		if string(sub) != want {
			return fmt.Errorf("sub %s, admitted %s", sub, want)
		}
	default:
		return fmt.Errorf("sub %v (%T)", sub, sub)
	}
	if uid <= 0 {
		return fmt.Errorf("admitted user %d is not positive", uid)
	}
	return nil
}

// duplicateMember returns a top-level member name that appears twice.
func duplicateMember(obj []byte) string {
	var members map[string]json.RawMessage
	if json.Unmarshal(obj, &members) != nil {
		return ""
	}
	dec := json.NewDecoder(bytes.NewReader(obj))
	seen := map[string]bool{}
	if _, err := dec.Token(); err != nil {
		return ""
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		name, _ := tok.(string)
		if seen[name] {
			return name
		}
		seen[name] = true
		var skip json.RawMessage
		if dec.Decode(&skip) != nil {
			return ""
		}
	}
	return ""
}

// FuzzSignedClaims signs any payload with a key the service trusts, so the
// fuzzer reaches the claim checks that FuzzAuthorizationHeader's mutations
// almost never get past the signature to. Admission must imply that the
// claims satisfy the contract.
func FuzzSignedClaims(f *testing.F) {
	k := newTestKey(f, jwa.ES256, "fz-claims", 0)
	v := newTestVerifier(f, testAuthConfig(newJWKSServer(f, k.publicJWK(f, false)).URL))
	// Dates far from now so committed corpus entries keep their meaning.
	const future, past = 4102444800, 1000000000 // 2100-01-01, 2001-09-09
	base := fmt.Sprintf(`"iss":%q,"aud":%q,"exp":%d`, testIssuer, testAudience, future)
	for _, p := range []string{
		`{` + base + `,"sub":"1001"}`,
		`{` + base + `,"sub":1001}`,
		`{` + base + `,"sub":"1001","sub":"1002"}`,
		`{` + base + `,"sub":1001,"exp":1}`,
		`{` + base + `,"sub":1.0}`,
		`{` + base + `,"sub":1e3}`,
		`{` + base + `,"sub":-1}`,
		`{` + base + `,"sub":9223372036854775808}`,
		`{` + base + `,"sub":"10 01"}`,
		`{` + base + `,"sub":"٣"}`,
		`{` + base + `,"sub":"1001","nbf":` + strconv.Itoa(future) + `}`,
		`{` + base + `,"sub":"1001","iat":` + strconv.Itoa(past) + `}`,
		`{"iss":"` + testIssuer + `","aud":["x","` + testAudience + `"],"exp":1e20,"sub":"5"}`,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":"4102444800","sub":"5"}`,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":` + strconv.Itoa(past) + `,"sub":"5"}`,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":4102444800.5,"sub":"5"} `,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":4102444800,"sub":"5"}{}`,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":4102444800,"sub":"5","ſub":"6"}`,
		`{"iss":"` + testIssuer + `","aud":"` + testAudience + `","exp":4102444800,"\u0073ub":"5"}`,
		`[]`, `null`, `"x"`, ``,
	} {
		f.Add([]byte(p))
	}
	if rec := callWith(v, "/", "Bearer "+k.sign(f, []byte(`{`+base+`,"sub":"7"}`), nil)); rec.Code != http.StatusOK {
		f.Fatalf("a valid signed payload was refused: %d %s", rec.Code, rec.Body)
	}

	f.Fuzz(func(t *testing.T, payload []byte) {
		rec := callWith(v, "/3ds/my-records", "Bearer "+k.sign(t, payload, nil))
		switch rec.Code {
		case http.StatusUnauthorized:
			assertErrorBody(t, rec.Result().Header, rec.Body.Bytes())
		case http.StatusOK:
			got := admittedUser(t, rec)
			if err := claimsAdmit(payload, got); err != nil {
				t.Fatalf("payload %q admitted user %d, but: %v", payload, got, err)
			}
		default:
			t.Fatalf("payload %q: status %d; body %s", payload, rec.Code, rec.Body)
		}
	})
}

// refMinorUnits is the ISO 4217 exponent table typed in again from the
// standard, so a slip in minorUnits is not copied into the oracle.
func refMinorUnits(code string) int {
	switch strings.ToUpper(code) {
	case "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF":
		return 0
	case "BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND":
		return 3
	case "CLF", "UYW":
		return 4
	}
	return 2
}

// plainDecimal is how PostgreSQL prints a finite NUMERIC.
var plainDecimal = regexp.MustCompile(`^-?[0-9]+(\.[0-9]+)?$`)

// FuzzFormatAmount: the formatted amount is the stored decimal exactly
// (compared as big.Rat), with at least the currency's minor digits and no
// zero beyond them; anything PostgreSQL would not print as a plain decimal
// comes back untouched.
func FuzzFormatAmount(f *testing.F) {
	for _, s := range []struct{ n, c string }{
		{"0", "USD"}, {"100", "USD"}, {"100.125", "USD"}, {"1500", "JPY"}, {"0.001", "JPY"}, {"1.5", "KWD"},
		{"-0.000", "USD"}, {"-0", "JPY"}, {"-12.3", "usd"}, {"12345678901234567890.120000000", "USD"},
		{"0.5", "CLF"}, {"7", "XYZ"}, {"7", ""}, {"NaN", "USD"}, {"Infinity", "JPY"}, {"-Infinity", "KWD"},
		{"1.", "USD"}, {".5", "USD"}, {"+1", "USD"}, {"1e3", "USD"}, {"--1", "USD"}, {"00.10", "USD"},
		{"0.0000000000000000000000000000001", "BHD"}, {"-0.10", "jpy"}, {"1.000", "kwd"},
	} {
		f.Add(s.n, s.c)
	}
	f.Fuzz(func(t *testing.T, numeric, currency string) {
		got := formatAmount(numeric, currency)
		if !plainDecimal.MatchString(numeric) {
			if got != numeric {
				t.Fatalf("formatAmount(%q, %q) = %q; a value that is not a plain decimal must come back as stored", numeric, currency, got)
			}
			return
		}
		if !plainDecimal.MatchString(got) {
			t.Fatalf("formatAmount(%q, %q) = %q is not a plain decimal", numeric, currency, got)
		}
		in, _ := new(big.Rat).SetString(numeric)
		out, _ := new(big.Rat).SetString(got)
		if in.Cmp(out) != 0 {
			t.Fatalf("formatAmount(%q, %q) = %q changes the value", numeric, currency, got)
		}
		digits := refMinorUnits(currency)
		_, frac, _ := strings.Cut(got, ".")
		if len(frac) < digits {
			t.Fatalf("formatAmount(%q, %q) = %q has %d fraction digits, the currency needs %d", numeric, currency, got, len(frac), digits)
		}
		if len(frac) > digits && frac[len(frac)-1] == '0' {
			t.Fatalf("formatAmount(%q, %q) = %q keeps a zero beyond the %d minor digits", numeric, currency, got, digits)
		}
		if out.Sign() == 0 && strings.HasPrefix(got, "-") {
			t.Fatalf("formatAmount(%q, %q) = %q: zero with a sign", numeric, currency, got)
		}
	})
}
