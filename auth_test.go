package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

// whoami answers with the user id the middleware admitted.
var whoami = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	id, _ := userFromContext(r.Context())
	writeJSON(w, r, http.StatusOK, map[string]int64{"user_id": id})
})

// callWith sends one request through the middleware with the given
// Authorization header values (none when empty).
func callWith(v *Verifier, target string, auth ...string) *httptest.ResponseRecorder {
	return callWithContext(context.Background(), v, target, auth...)
}

// callWithContext is callWith from a client whose request ends with ctx
// (cancel it to hang up).
func callWithContext(ctx context.Context, v *Verifier, target string, auth ...string) *httptest.ResponseRecorder {
	req := httptest.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	for _, a := range auth {
		req.Header.Add("Authorization", a)
	}
	rec := httptest.NewRecorder()
	v.Middleware(whoami).ServeHTTP(rec, req)
	return rec
}

func admittedUser(t *testing.T, rec *httptest.ResponseRecorder) int64 {
	t.Helper()
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", rec.Code, rec.Body)
	}
	var got struct {
		UserID int64 `json:"user_id"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	return got.UserID
}

// assertRefused checks the full 401 answer: JSON {error, details}, the
// RFC 6750 challenge, no caching, and no echo of the token.
func assertRefused(t *testing.T, rec *httptest.ResponseRecorder, token string, withErrorCode bool) {
	t.Helper()
	if rec.Code != http.StatusUnauthorized {
		t.Fatalf("status %d, want 401; body %s", rec.Code, rec.Body)
	}
	challenge := rec.Header().Get("WWW-Authenticate")
	if !strings.HasPrefix(challenge, `Bearer realm="threeds-records"`) {
		t.Errorf("WWW-Authenticate = %q", challenge)
	}
	if got := strings.Contains(challenge, `error="invalid_token"`); got != withErrorCode {
		t.Errorf("WWW-Authenticate = %q, want invalid_token: %v", challenge, withErrorCode)
	}
	assertErrorBody(t, rec.Result().Header, rec.Body.Bytes())
	if token != "" && len(token) > 10 && strings.Contains(rec.Body.String()+challenge, token[len(token)-10:]) {
		t.Errorf("the answer echoes the token: %s", rec.Body)
	}
}

// assertErrorBody checks the one error shape every non-200 answer has.
func assertErrorBody(t testing.TB, h http.Header, body []byte) {
	t.Helper()
	if ct := h.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q", ct)
	}
	if cc := h.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control = %q", cc)
	}
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("error body is not JSON: %q", body)
	}
	if len(m) != 2 {
		t.Errorf("error body has keys %v, want exactly error and details", m)
	}
	for _, k := range []string{"error", "details"} {
		if s, ok := m[k].(string); !ok || s == "" {
			t.Errorf("error body %q: %s is not a non-empty string", body, k)
		}
	}
}

func TestVerifierRefusesEveryUnacceptableCredential(t *testing.T) {
	good := newTestKey(t, jwa.RS256, "rsa-1", 0)
	outsider := newTestKey(t, jwa.RS256, "rsa-1", 1) // same kid, key not in the set
	ec := newTestKey(t, jwa.ES256, "ec-1", 0)
	idp := newJWKSServer(t, good.publicJWK(t, false), ec.publicJWK(t, false))
	v := newTestVerifier(t, testAuthConfig(idp.URL))

	attacker := newJWKSServer(t, outsider.publicJWK(t, false))
	rawPub, _ := jwk.PublicRawKeyOf(good.priv)
	der, _ := x509.MarshalPKIXPublicKey(rawPub)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})

	now := time.Now().Unix()
	with := func(changes map[string]any) map[string]any {
		c := validClaims("1001")
		for k, val := range changes {
			if val == nil {
				delete(c, k)
			} else {
				c[k] = val
			}
		}
		return c
	}
	payload, _ := json.Marshal(validClaims("1001"))
	hs256 := func(secret []byte) string {
		hdr := []byte(`{"alg":"HS256","typ":"JWT","kid":"rsa-1"}`)
		enc := unsignedToken(hdr, payload, nil)
		mac := hmac.New(sha256.New, secret)
		mac.Write([]byte(enc[:len(enc)-1]))
		return unsignedToken(hdr, payload, mac.Sum(nil))
	}

	cases := []struct {
		name          string
		header        []string
		withErrorCode bool
		reason        rejectReason
	}{
		{"no Authorization header is refused without an error code", nil, false, reasonMissing},
		{"a Basic scheme is refused", []string{"Basic dXNlcjpwYXNz"}, true, reasonMalformed},
		{"a bearer with no token is refused", []string{"Bearer "}, true, reasonMalformed},
		{"garbage is refused", []string{"Bearer not-a-token"}, true, reasonMalformed},
		{"two Authorization headers are refused", []string{"Bearer " + good.token(t, with(nil)), "Bearer " + good.token(t, with(nil))}, true, reasonMalformed},
		{"an expired token is refused", []string{"Bearer " + good.token(t, with(map[string]any{"exp": now - 120}))}, true, reasonExpired},
		{"a token without exp is refused", []string{"Bearer " + good.token(t, with(map[string]any{"exp": nil}))}, true, reasonClaims},
		{"a token with exp as a string is refused", []string{"Bearer " + good.token(t, with(map[string]any{"exp": strconv.FormatInt(now+600, 10)}))}, true, reasonClaims},
		{"a token not valid before the future is refused", []string{"Bearer " + good.token(t, with(map[string]any{"nbf": now + 120}))}, true, reasonClaims},
		{"a token issued in the future is refused", []string{"Bearer " + good.token(t, with(map[string]any{"iat": now + 120}))}, true, reasonClaims},
		{"a token from another issuer is refused", []string{"Bearer " + good.token(t, with(map[string]any{"iss": "https://evil.test"}))}, true, reasonClaims},
		{"a token without issuer is refused", []string{"Bearer " + good.token(t, with(map[string]any{"iss": nil}))}, true, reasonClaims},
		{"a token for another audience is refused", []string{"Bearer " + good.token(t, with(map[string]any{"aud": "other-service"}))}, true, reasonClaims},
		{"a token without audience is refused", []string{"Bearer " + good.token(t, with(map[string]any{"aud": nil}))}, true, reasonClaims},
		{"a token naming an unknown kid is refused", []string{"Bearer " + newTestKey(t, jwa.ES256, "nobody", 0).token(t, with(nil))}, true, reasonUnknownKey},
		{"a token signed by a key outside the set is refused", []string{"Bearer " + outsider.token(t, with(nil))}, true, reasonBadSignature},
		{"a token signed with another algorithm than its key's is refused", []string{"Bearer " + newTestKeyFrom(t, good, jwa.PS256).token(t, with(nil))}, true, reasonBadSignature},
		{"alg none is refused", []string{"Bearer " + unsignedToken([]byte(`{"alg":"none","kid":"rsa-1"}`), payload, nil)}, true, reasonBadSignature},
		{"HS256 keyed with the public key PEM is refused", []string{"Bearer " + hs256(pubPEM)}, true, reasonBadSignature},
		{"HS256 keyed with the public key DER is refused", []string{"Bearer " + hs256(der)}, true, reasonBadSignature},
		{"a jku header pointing at an attacker's keys is refused", []string{"Bearer " + outsider.sign(t, payload, map[string]any{"jku": attacker.URL})}, true, reasonBadSignature},
		{"an unknown critical header is refused", []string{"Bearer " + good.sign(t, payload, map[string]any{"crit": []string{"exp-ext"}, "exp-ext": 1})}, true, reasonMalformed},
		{"a non-numeric user id is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": "alice"}))}, true, reasonClaims},
		{"user id zero is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": 0}))}, true, reasonClaims},
		{"a negative user id is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": "-5"}))}, true, reasonClaims},
		{"a fractional user id is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": 1.5}))}, true, reasonClaims},
		{"a user id above int64 is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": "9223372036854775808"}))}, true, reasonClaims},
		{"a user id with spaces is refused", []string{"Bearer " + good.token(t, with(map[string]any{"sub": " 1001"}))}, true, reasonClaims},
		{"duplicate claims are refused", []string{"Bearer " + good.sign(t, []byte(fmt.Sprintf(`{"iss":%q,"aud":%q,"exp":%d,"sub":"1001","sub":"1002"}`, testIssuer, testAudience, now+600)), nil)}, true, reasonClaims},
		{"an Authorization header over 8 KiB is refused", []string{"Bearer " + strings.Repeat("a", 9000)}, true, reasonMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var before [numReasons]int64
			for i := range before {
				before[i] = v.rejections[i].Load()
			}
			rec := callWith(v, "/3ds/my-records", tc.header...)
			token := ""
			if len(tc.header) > 0 {
				token = strings.TrimPrefix(tc.header[0], "Bearer ")
			}
			assertRefused(t, rec, token, tc.withErrorCode)
			if n := v.rejections[tc.reason].Load() - before[tc.reason]; n != 1 {
				t.Errorf("rejections{reason=%s} grew by %d, want 1", tc.reason, n)
			}
		})
	}
	if n := attacker.hits.Load(); n != 0 {
		t.Errorf("the jku server was fetched %d times; it must never be", n)
	}
}

// newTestKeyFrom reuses k's private key under another algorithm label.
func newTestKeyFrom(t testing.TB, k testKey, alg jwa.SignatureAlgorithm) testKey {
	t.Helper()
	return testKey{kid: k.kid, alg: alg, priv: k.priv}
}

func TestVerifierAcceptsValidTokens(t *testing.T) {
	rs := newTestKey(t, jwa.RS256, "rs", 0)
	ps := newTestKey(t, jwa.PS256, "ps-no-alg", 1)
	es := newTestKey(t, jwa.ES256, "es", 0)
	ed := newTestKey(t, jwa.EdDSA, "ed", 0)
	idp := newJWKSServer(t, rs.publicJWK(t, false), ps.publicJWK(t, true), es.publicJWK(t, false), ed.publicJWK(t, false))
	v := newTestVerifier(t, testAuthConfig(idp.URL))

	aud := validClaims("42")
	aud["aud"] = []string{"other", testAudience}
	late := validClaims("42")
	late["exp"] = time.Now().Unix() - 10 // expired, but within the 30 s leeway

	cases := []struct {
		name   string
		header string
		want   int64
	}{
		{"an RS256 token is accepted", "Bearer " + rs.token(t, validClaims("42")), 42},
		{"a PS256 token from a key published without alg is accepted", "Bearer " + ps.token(t, validClaims("42")), 42},
		{"an ES256 token is accepted", "Bearer " + es.token(t, validClaims("42")), 42},
		{"an EdDSA token is accepted", "Bearer " + ed.token(t, validClaims("42")), 42},
		{"a numeric sub is accepted", "Bearer " + es.token(t, validClaims(7)), 7},
		{"a numeric sub above 2^53 keeps every digit", "Bearer " + es.sign(t, []byte(fmt.Sprintf(`{"iss":%q,"aud":%q,"exp":%d,"sub":9007199254740993}`, testIssuer, testAudience, time.Now().Unix()+600)), nil), 9007199254740993},
		{"the largest int64 user id is accepted", "Bearer " + es.token(t, validClaims("9223372036854775807")), 9223372036854775807},
		{"a lowercase bearer scheme is accepted", "bearer " + es.token(t, validClaims("42")), 42},
		{"an audience list containing ours is accepted", "Bearer " + es.token(t, aud), 42},
		{"a token expired within the leeway is accepted", "Bearer " + es.token(t, late), 42},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := admittedUser(t, callWith(v, "/", tc.header)); got != tc.want {
				t.Errorf("user = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestVerifierReadsTheUserFromTheConfiguredClaim(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	idp := newJWKSServer(t, k.publicJWK(t, false))
	cfg := testAuthConfig(idp.URL)
	cfg.userClaim = "uid"
	v := newTestVerifier(t, cfg)

	c := validClaims("not-a-number")
	c["uid"] = "555"
	if got := admittedUser(t, callWith(v, "/", "Bearer "+k.token(t, c))); got != 555 {
		t.Errorf("user = %d, want 555", got)
	}
	assertRefused(t, callWith(v, "/", "Bearer "+k.token(t, validClaims("555"))), "", true)
}

func TestVerifierWithoutAudienceConfiguredIgnoresAud(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	idp := newJWKSServer(t, k.publicJWK(t, false))
	cfg := testAuthConfig(idp.URL)
	cfg.audience = ""
	v := newTestVerifier(t, cfg)
	c := validClaims("9")
	delete(c, "aud")
	if got := admittedUser(t, callWith(v, "/", "Bearer "+k.token(t, c))); got != 9 {
		t.Errorf("user = %d, want 9", got)
	}
}

func TestVerifierIgnoresTokensOutsideTheAuthorizationHeader(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, k.publicJWK(t, false)).URL))
	tok := k.token(t, validClaims("42"))

	req := httptest.NewRequest(http.MethodGet, "/3ds/my-records?access_token="+tok, nil)
	req.AddCookie(&http.Cookie{Name: "access_token", Value: tok})
	rec := httptest.NewRecorder()
	v.Middleware(whoami).ServeHTTP(rec, req)
	assertRefused(t, rec, tok, false)
}

func TestVerifierAcceptsANewKeyWithin15Seconds(t *testing.T) {
	old := newTestKey(t, jwa.ES256, "2026-01", 0)
	rotated := newTestKey(t, jwa.ES256, "2026-02", 0)
	idp := newJWKSServer(t, old.publicJWK(t, false))
	v := newTestVerifier(t, testAuthConfig(idp.URL))
	tok := rotated.token(t, validClaims("42"))

	// The first sight of the new kid forces a refresh that finds nothing.
	assertRefused(t, callWith(v, "/", "Bearer "+tok), tok, true)
	idp.setKeys(t, old.publicJWK(t, false), rotated.publicJWK(t, false))
	published := time.Now()
	waitFor(t, 15*time.Second, "the rotated key to be accepted", func() bool {
		return callWith(v, "/", "Bearer "+tok).Code == http.StatusOK
	})
	t.Logf("rotated key accepted %s after publication", time.Since(published).Round(time.Millisecond))
	if got := admittedUser(t, callWith(v, "/", "Bearer "+old.token(t, validClaims("43")))); got != 43 {
		t.Errorf("the old key stopped working: user %d", got)
	}
}

func TestVerifierKeepsKnownKeysWhileTheJWKSEndpointIsDown(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	idp := newJWKSServer(t, k.publicJWK(t, false))
	cfg := testAuthConfig(idp.URL)
	cfg.refreshEvery, cfg.minRefreshGap = 50*time.Millisecond, 10*time.Millisecond
	v := newTestVerifier(t, cfg)

	idp.down.Store(true)
	failedBefore := v.refreshFailed.Load()
	waitFor(t, 5*time.Second, "a failed refresh", func() bool { return v.refreshFailed.Load() > failedBefore+2 })
	idp.Close() // now not even a connection
	time.Sleep(100 * time.Millisecond)
	if got := admittedUser(t, callWith(v, "/", "Bearer "+k.token(t, validClaims("42")))); got != 42 {
		t.Errorf("user = %d", got)
	}
	if !v.Ready() || v.KeyCount() != 1 {
		t.Errorf("ready=%v keys=%d after the outage, want the last good key kept", v.Ready(), v.KeyCount())
	}
}

func TestVerifierWithoutKeysAnswers503(t *testing.T) {
	idp := newJWKSServer(t)
	idp.down.Store(true)
	v := NewVerifier(testAuthConfig(idp.URL), discardLogger())
	t.Cleanup(v.Close)
	k := newTestKey(t, jwa.ES256, "es", 0)
	rec := callWith(v, "/", "Bearer "+k.token(t, validClaims("42")))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", rec.Code)
	}
	assertErrorBody(t, rec.Result().Header, rec.Body.Bytes())
}

func TestVerifierRereadsAChangedJWKSFile(t *testing.T) {
	first := newTestKey(t, jwa.EdDSA, "file-1", 0)
	second := newTestKey(t, jwa.RS256, "file-2", 0)
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(path, jwksJSON(t, first.publicJWK(t, false)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testAuthConfig("")
	cfg.jwksFile = path
	cfg.refreshEvery, cfg.minRefreshGap = 2*time.Second, time.Second
	v := newTestVerifier(t, cfg)
	if got := admittedUser(t, callWith(v, "/", "Bearer "+first.token(t, validClaims("1")))); got != 1 {
		t.Fatalf("user = %d", got)
	}

	// Written the way Kubernetes updates a mounted ConfigMap: a new file
	// renamed into place.
	tmp := path + ".new"
	if err := os.WriteFile(tmp, jwksJSON(t, second.publicJWK(t, false)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	tok := second.token(t, validClaims("2"))
	waitFor(t, 15*time.Second, "the new file's key to be accepted", func() bool {
		return callWith(v, "/", "Bearer "+tok).Code == http.StatusOK
	})
	waitFor(t, 15*time.Second, "the removed key to be refused", func() bool {
		return callWith(v, "/", "Bearer "+first.token(t, validClaims("1"))).Code == http.StatusUnauthorized
	})

	// A broken file keeps the last good keys.
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	failed := v.refreshFailed.Load()
	waitFor(t, 10*time.Second, "the broken file to be noticed", func() bool { return v.refreshFailed.Load() > failed })
	if got := admittedUser(t, callWith(v, "/", "Bearer "+tok)); got != 2 {
		t.Errorf("user = %d", got)
	}
}

func TestParseUserID(t *testing.T) {
	cases := map[string]int64{
		`1`: 1, `"1"`: 1, `9223372036854775807`: 9223372036854775807, `"9223372036854775807"`: 9223372036854775807,
		`0`: 0, `"0"`: 0, `-1`: 0, `"-1"`: 0, `1.0`: 0, `1e3`: 0, `"1e3"`: 0, `" 1"`: 0, `"1 "`: 0, `"+1"`: 0,
		`"01"`: 0, `9223372036854775808`: 0, `""`: 0, `null`: 0, `true`: 0, `[1]`: 0, `{"id":1}`: 0, ``: 0, `"0x10"`: 0,
	}
	for in, want := range cases {
		got, ok := parseUserID(json.RawMessage(in))
		if ok != (want != 0) || got != want {
			t.Errorf("parseUserID(%s) = %d, %v; want %d", in, got, ok, want)
		}
	}
}

func TestVerifierStopsItsBackgroundRefreshOnClose(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	idp := newJWKSServer(t, k.publicJWK(t, false))
	cfg := testAuthConfig(idp.URL)
	cfg.refreshEvery = 20 * time.Millisecond
	v := NewVerifier(cfg, discardLogger())
	waitFor(t, 5*time.Second, "keys", v.Ready)
	v.Close()
	time.Sleep(50 * time.Millisecond) // let a cancelled fetch's server side finish counting
	hits := idp.hits.Load()
	time.Sleep(150 * time.Millisecond)
	if n := idp.hits.Load(); n != hits {
		t.Errorf("JWKS fetched %d more times after Close", n-hits)
	}
}

// The event stream bounds its life by what the middleware admitted: the
// token's exp and the key that verified it. Both must reach the handler, from
// a fresh verification and from the token cache alike.
func TestThePrincipalCarriesTheKeyAndExpiryAndSeesTheKeyLeave(t *testing.T) {
	k1 := newTestKey(t, jwa.RS256, "k1", 0)
	k2 := newTestKey(t, jwa.ES256, "k2", 0)
	srv := newJWKSServer(t, k1.publicJWK(t, false), k2.publicJWK(t, false))
	cfg := testAuthConfig(srv.URL)
	cfg.refreshEvery = 100 * time.Millisecond
	v := newTestVerifier(t, cfg)

	claims := validClaims("42")
	exp := time.Now().Add(10 * time.Minute).Truncate(time.Second)
	claims["exp"] = exp.Unix()
	token := k1.token(t, claims)
	for _, pass := range []string{"fresh verification", "token cache hit"} {
		p, err := v.verify(t.Context(), token)
		if err != nil || p.userID != 42 || p.kid != "k1" || !p.exp.Equal(exp) {
			t.Fatalf("%s: verify = %+v, %v; want user 42, kid k1, exp %s", pass, p, err, exp)
		}
	}

	p, _ := v.verify(t.Context(), token)
	stranger := p
	stranger.kid = "nope"
	changed := v.keysChanged()
	if !v.stillTrusts(p) || v.stillTrusts(stranger) {
		t.Fatal("stillTrusts does not reflect the loaded set")
	}
	select {
	case <-changed:
		t.Fatal("keysChanged closed without a change of the set")
	case <-time.After(300 * time.Millisecond): // three refreshes of an unchanged set
	}
	srv.setKeys(t, k2.publicJWK(t, false))
	select {
	case <-changed:
	case <-time.After(5 * time.Second):
		t.Fatal("keysChanged was not closed when the set changed")
	}
	if v.stillTrusts(p) {
		t.Fatal("after the swap stillTrusts still trusts the removed key")
	}
}

// rotationFixture is a running verifier whose identity provider is about to
// rotate: current is published, rotated is not yet.
type rotationFixture struct {
	idp              *jwksServer
	v                *Verifier
	current, rotated testKey
	cfg              authConfig
}

// newRotationFixture starts a verifier with the given forced-refresh gap and
// a periodic refresh far away (30 s), so any key it picks up within a test
// came from a forced refresh. It returns once the verifier has been up for
// one gap: the attacks below are on a service that has been running a
// while, with the start-up load outside any rate-limit window.
func newRotationFixture(t *testing.T, gap time.Duration) *rotationFixture {
	t.Helper()
	f := &rotationFixture{
		current: newTestKey(t, jwa.ES256, "2026-01", 0),
		rotated: newTestKey(t, jwa.ES256, "2026-02", 0),
	}
	f.idp = newJWKSServer(t, f.current.publicJWK(t, false))
	f.cfg = testAuthConfig(f.idp.URL)
	f.cfg.refreshEvery, f.cfg.minRefreshGap = 30*time.Second, gap
	f.v = newTestVerifier(t, f.cfg)
	time.Sleep(gap)
	return f
}

// publishRotation is the identity provider adding the rotated key.
func (f *rotationFixture) publishRotation(t *testing.T) {
	f.idp.setKeys(t, f.current.publicJWK(t, false), f.rotated.publicJWK(t, false))
}

// Issue 8 item 3. The forced refresh used to run on the requesting client's
// context and to count against the rate limit from its start: a client that
// sent a made-up kid and hung up cancelled the fetch, and for the rest of
// the gap a real token signed with a freshly rotated key was refused.
func TestAClientThatHangsUpCannotHoldOffKeyRotation(t *testing.T) {
	f := newRotationFixture(t, 2*time.Second)
	madeUp := newTestKey(t, jwa.ES256, "made-up", 0).token(t, validClaims("666"))

	release := f.idp.hold() // the identity provider is slow to answer
	t.Cleanup(release)
	before := f.idp.hits.Load()
	ctx, hangUp := context.WithCancel(context.Background())
	defer hangUp()
	attacker := make(chan int, 1)
	go func() { attacker <- callWithContext(ctx, f.v, "/", "Bearer "+madeUp).Code }()
	waitFor(t, 5*time.Second, "the forced fetch to reach the identity provider", func() bool { return f.idp.hits.Load() > before })
	hangUp()
	select {
	case <-attacker:
	case <-time.After(5 * time.Second):
		t.Fatal("the attacker's request did not return after it hung up")
	}

	f.publishRotation(t)
	published := time.Now()
	release()
	rec := callWith(f.v, "/", "Bearer "+f.rotated.token(t, validClaims("42")))
	if rec.Code != http.StatusOK {
		t.Fatalf("a real token signed with the rotated key got %d right after publication, want 200: %s", rec.Code, rec.Body)
	}
	t.Logf("rotated key accepted %s after publication, on the first try", time.Since(published).Round(time.Millisecond))
	if n := f.idp.hits.Load() - before; n != 1 {
		t.Errorf("%d JWKS fetches, want 1: the attacker's fetch, finished and shared", n)
	}
}

// A forced refresh that fails (here the identity provider answers 503) must
// not keep the next one out for the whole gap: the next may start after a
// short back-off, so a rotated key is accepted soon after the provider is
// back, not a gap later.
func TestAFailedForcedRefreshDoesNotHoldOffTheNextForTheWholeGap(t *testing.T) {
	const gap = 3 * time.Second
	f := newRotationFixture(t, gap)
	token := f.rotated.token(t, validClaims("42"))

	f.idp.down.Store(true)
	failed := f.v.refreshFailed.Load()
	assertRefused(t, callWith(f.v, "/", "Bearer "+token), token, true)
	failedAt := time.Now()
	if f.v.refreshFailed.Load() != failed+1 {
		t.Fatalf("the unknown kid did not force a refresh that failed (failures %d → %d)", failed, f.v.refreshFailed.Load())
	}

	f.idp.down.Store(false)
	f.publishRotation(t)
	before := f.idp.hits.Load()
	// Bounded by half the gap: generous for a back-off of a tenth of it, and
	// well short of the whole gap the old behaviour made every client wait.
	waitFor(t, gap/2-time.Since(failedAt), "the rotated key to be accepted well within the gap", func() bool {
		return callWith(f.v, "/", "Bearer "+token).Code == http.StatusOK
	})
	t.Logf("rotated key accepted %s after the failed refresh (gap %s, first back-off %s)",
		time.Since(failedAt).Round(time.Millisecond), gap, failureBackoff(gap, 1))
	if n := f.idp.hits.Load() - before; n != 1 {
		t.Errorf("%d JWKS fetches while the client retried, want 1", n)
	}
}

// Many requests naming an unknown kid at once share one fetch; a request
// whose client hangs up stops waiting at once, and the fetch carries on for
// the others.
func TestConcurrentUnknownKidsShareOneFetchThatOutlivesTheClientsWhoLeave(t *testing.T) {
	f := newRotationFixture(t, time.Second)
	token := f.rotated.token(t, validClaims("42"))
	const patient, leaving = 10, 10

	release := f.idp.hold()
	t.Cleanup(release)
	before := f.idp.hits.Load()
	codes := make(chan int, patient)
	for range patient {
		go func() { codes <- callWith(f.v, "/", "Bearer "+token).Code }()
	}
	waitFor(t, 5*time.Second, "the forced fetch to reach the identity provider", func() bool { return f.idp.hits.Load() > before })

	ctx, hangUp := context.WithCancel(context.Background())
	left := make(chan int, leaving)
	for range leaving {
		go func() { left <- callWithContext(ctx, f.v, "/", "Bearer "+token).Code }()
	}
	hangUp()
	// The fetch is still held by the server: every client that left must
	// be answered without waiting for it (well inside the 5 s fetch timeout).
	deadline := time.After(3 * time.Second)
	for range leaving {
		select {
		case <-left:
		case <-deadline:
			t.Fatal("a request whose client hung up kept waiting for the fetch")
		}
	}

	f.publishRotation(t)
	release()
	for range patient {
		select {
		case code := <-codes:
			if code != http.StatusOK {
				t.Errorf("a waiting request got %d, want 200 from the shared fetch", code)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiting request never returned")
		}
	}
	if n := f.idp.hits.Load() - before; n != 1 {
		t.Errorf("%d concurrent requests with an unknown kid caused %d JWKS fetches, want 1", patient+leaving, n)
	}
}

// Random kids are a known way to turn a verifier into a load generator
// against the identity provider: 200 requests, each with a made-up kid,
// spread over two gaps, start fetches at least a gap apart while the
// provider answers, and at least the back-off schedule apart while it fails.
func TestRandomKidsForceAtMostOneFetchPerGap(t *testing.T) {
	const gap = time.Second
	cases := []struct {
		name    string
		down    bool
		spacing func(i int) time.Duration // least time between fetch i and i+1
	}{
		{"while the identity provider answers", false, func(int) time.Duration { return gap }},
		{"while the identity provider fails", true, func(i int) time.Duration { return failureBackoff(gap, i+1) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k := newTestKey(t, jwa.ES256, "es", 0)
			idp := newJWKSServer(t, k.publicJWK(t, false))
			cfg := testAuthConfig(idp.URL)
			cfg.refreshEvery, cfg.minRefreshGap = 30*time.Second, gap
			v := newTestVerifier(t, cfg)
			idp.down.Store(tc.down)
			first := len(idp.arrivals())

			stranger := newTestKey(t, jwa.ES256, "x", 0)
			tokens := make([]string, 200)
			for i := range tokens {
				stranger.kid = fmt.Sprintf("random-%d-%d", i, time.Now().UnixNano())
				tokens[i] = stranger.token(t, validClaims("42"))
			}
			start := time.Now()
			var wg sync.WaitGroup
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < len(tokens); i += 4 {
						callWith(v, "/", "Bearer "+tokens[i])
						time.Sleep(40 * time.Millisecond) // 200 requests over about 2 s
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)

			fetches := idp.arrivals()[first:]
			t.Logf("200 random kids over %s: %d JWKS fetches", elapsed.Round(time.Millisecond), len(fetches))
			if len(fetches) == 0 {
				t.Fatal("no forced fetch at all: an unknown kid must force one")
			}
			for i := 1; i < len(fetches); i++ {
				if d := fetches[i].Sub(fetches[i-1]); d < tc.spacing(i-1) {
					t.Errorf("fetch %d started %s after the previous one, want at least %s", i+1, d, tc.spacing(i-1))
				}
			}
		})
	}
}

// Secrets an operator may put in JWKS_URL: user-info and an API key in the
// query string (some identity providers want one).
const (
	jwksPassword = "hunter2pw"
	jwksAPIKey   = "SECRETKEY123"
)

// withSecrets is base (scheme://host:port) with user-info, a path and an
// API key in the query string.
func withSecrets(base string) string {
	return strings.Replace(base, "://", "://jwksuser:"+jwksPassword+"@", 1) + "/jwks?api_key=" + jwksAPIKey
}

// firstLine is the first line of out that contains substr.
func firstLine(out, substr string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, substr) {
			return l
		}
	}
	return ""
}

// closedPort is an address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// Issue 8 item 4. A failed fetch used to log net/http's *url.Error, whose
// URL keeps JWKS_URL's query string; and a line about a failed status did
// not say which URL failed. Every line must show the redacted URL, and
// nothing secret.
func TestJWKSFailuresLogTheRedactedURLAndNoSecret(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "es", 0)
	serve := func(t *testing.T, h http.HandlerFunc) string {
		s := httptest.NewServer(h)
		t.Cleanup(s.Close)
		return s.URL
	}
	cases := []struct {
		name string
		// setup returns the identity provider's scheme://host:port and, for
		// a failure of a refresh forced by an unknown kid on a verifier that
		// had keys, the outage to start once it has them.
		setup func(t *testing.T) (base string, outage func())
	}{
		{"a closed port", func(t *testing.T) (string, func()) { return closedPort(t), nil }},
		{"a server answering 500", func(t *testing.T) (string, func()) {
			return serve(t, func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "boom", http.StatusInternalServerError)
			}), nil
		}},
		{"a redirect to another origin with the key in the location", func(t *testing.T) (string, func()) {
			other := newJWKSServer(t, key.publicJWK(t, false))
			return serve(t, func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, other.URL+"/jwks?"+r.URL.RawQuery, http.StatusFound)
			}), nil
		}},
		{"a redirect to an unparsable location with the key in it", func(t *testing.T) (string, func()) {
			return serve(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Location", "http://bad host/jwks?"+r.URL.RawQuery)
				w.WriteHeader(http.StatusFound)
			}), nil
		}},
		{"a same-origin redirect, with the key, to an answer of 500", func(t *testing.T) (string, func()) {
			return serve(t, func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/jwks" {
					http.Redirect(w, r, "/moved?"+r.URL.RawQuery, http.StatusFound)
					return
				}
				http.Error(w, "boom", http.StatusInternalServerError)
			}), nil
		}},
		{"a refresh forced by an unknown kid during an outage", func(t *testing.T) (string, func()) {
			idp := newJWKSServer(t, key.publicJWK(t, false))
			return idp.URL, func() { idp.down.Store(true) }
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			base, outage := tc.setup(t)
			jwksURL := withSecrets(base)
			redacted := redactedJWKSURL(jwksURL)
			logs := &syncBuffer{}
			v := NewVerifier(testAuthConfig(jwksURL), slog.New(slog.NewJSONHandler(logs, nil)))
			t.Cleanup(v.Close)
			if outage != nil {
				waitFor(t, 5*time.Second, "keys", v.Ready)
				outage()
				stranger := newTestKey(t, jwa.ES256, "unknown", 0)
				callWith(v, "/", "Bearer "+stranger.token(t, validClaims("42")))
			}
			waitFor(t, 5*time.Second, "a failed load", func() bool { return v.refreshFailed.Load() >= 1 })
			v.Close()

			out := logs.String()
			for _, secret := range []string{jwksPassword, jwksAPIKey} {
				if strings.Contains(out, secret) {
					t.Errorf("the log shows %q:\n%s", secret, out)
				}
			}
			failures, forced := 0, 0
			for _, line := range logs.logLines(t) {
				if line["msg"] == "jwks refresh failed; keeping the last good keys" {
					failures++
					if line["cause"] == "unknown_kid" {
						forced++
					}
				}
				if !strings.Contains(fmt.Sprint(line), redacted) {
					t.Errorf("a log line does not show the redacted URL %s: %v", redacted, line)
				}
			}
			if failures == 0 || (outage != nil && forced == 0) {
				t.Errorf("no failed refresh (forced: %v) was logged:\n%s", outage != nil, out)
			}
			t.Logf("a failure as logged: %s", firstLine(out, "jwks refresh failed"))
		})
	}
}

// A JWKS redirect is followed only within JWKS_URL's origin (scheme, host,
// port): elsewhere, whoever controls the first hop (or an open redirect at
// the identity provider) would choose the keys this service trusts, and a
// step down from https to http would let anyone on the path choose them.
func TestJWKSRedirectsAreFollowedOnlyWithinTheOrigin(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "es", 0)
	// redirecting is an identity provider that moves /jwks to target
	// (relative: within itself) and serves the keys at /keys.
	redirecting := func(t *testing.T, tls bool, target func() string) *httptest.Server {
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/keys" {
				_, _ = w.Write(jwksJSON(t, key.publicJWK(t, false)))
				return
			}
			http.Redirect(w, r, target(), http.StatusFound)
		})
		s := httptest.NewUnstartedServer(h)
		if tls {
			s.StartTLS()
		} else {
			s.Start()
		}
		t.Cleanup(s.Close)
		return s
	}
	cases := []struct {
		name      string
		tls       bool
		elsewhere bool   // the redirect leaves for another server, which serves the keys
		refusal   string // in the log when refused; "" when followed
	}{
		{"a redirect within an http origin is followed", false, false, ""},
		{"a redirect within an https origin is followed", true, false, ""},
		{"a redirect to another origin is refused", false, true, "is another origin than"},
		{"a redirect from https to http is refused", true, true, "from https to http"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			other := newJWKSServer(t, key.publicJWK(t, false))
			target := func() string { return "/keys" }
			if tc.elsewhere {
				target = func() string { return other.URL + "/jwks" }
			}
			idp := redirecting(t, tc.tls, target)
			logs := &syncBuffer{}
			cfg := testAuthConfig(idp.URL + "/jwks")
			if tc.tls {
				cfg.transport = idp.Client().Transport // trusts the test server's certificate
			}
			v := NewVerifier(cfg, slog.New(slog.NewJSONHandler(logs, nil)))
			t.Cleanup(v.Close)

			if tc.refusal == "" {
				waitFor(t, 5*time.Second, "keys through the redirect", v.Ready)
				return
			}
			waitFor(t, 5*time.Second, "a load, failed or not", func() bool { return v.Ready() || v.refreshFailed.Load() >= 1 })
			if v.Ready() || other.hits.Load() != 0 {
				t.Errorf("ready=%v, other origin fetched %d times: the redirect was followed", v.Ready(), other.hits.Load())
			}
			if out := logs.String(); !strings.Contains(out, tc.refusal) {
				t.Errorf("the log does not say the redirect was refused (%q):\n%s", tc.refusal, out)
			}
		})
	}
}

// Over plain http anyone on the network path can substitute the keys: said
// once, at start, not on every refresh.
func TestAPlainHTTPJWKSURLIsWarnedAboutOnceAtStart(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "es", 0)
	for _, tls := range []bool{false, true} {
		name, want := "plain http is warned about once", 1
		if tls {
			name, want = "https is not warned about", 0
		}
		t.Run(name, func(t *testing.T) {
			s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = w.Write(jwksJSON(t, key.publicJWK(t, false)))
			}))
			if tls {
				s.StartTLS()
			} else {
				s.Start()
			}
			t.Cleanup(s.Close)
			logs := &syncBuffer{}
			cfg := testAuthConfig(s.URL + "/jwks?api_key=" + jwksAPIKey)
			cfg.refreshEvery = 20 * time.Millisecond
			if tls {
				cfg.transport = s.Client().Transport
			}
			v := NewVerifier(cfg, slog.New(slog.NewJSONHandler(logs, nil)))
			t.Cleanup(v.Close)
			waitFor(t, 5*time.Second, "five loads", func() bool { return v.refreshOK.Load() >= 5 })
			v.Close()

			warnings := 0
			for _, line := range logs.logLines(t) {
				if msg, _ := line["msg"].(string); strings.HasPrefix(msg, "JWKS_URL is plain http") {
					warnings++
					if line["level"] != "WARN" || line["source"] != "JWKS_URL="+redactedJWKSURL(cfg.jwksURL) {
						t.Errorf("warning line %v: want level WARN and the redacted URL", line)
					}
				}
			}
			if warnings != want {
				t.Errorf("%d plain-http warnings over five loads, want %d:\n%s", warnings, want, logs.String())
			}
		})
	}
}

func TestSignatureChecksTakeAtMostHalfTheCores(t *testing.T) {
	for _, tc := range []struct{ procs, want int }{{1, 1}, {2, 1}, {3, 1}, {4, 2}, {16, 8}} {
		if got := signatureSlotsFor(tc.procs); got != tc.want {
			t.Errorf("%d cores: %d slots, want %d", tc.procs, got, tc.want)
		}
	}

	key := newTestKey(t, jwa.RS256, "slots", 0)
	jwks := newJWKSServer(t, publicKeys(t, key)...)
	v := newTestVerifier(t, testAuthConfig(jwks.URL))
	cached := key.token(t, validClaims(7))
	if _, err := v.Verify(context.Background(), cached); err != nil {
		t.Fatal(err)
	}
	// Every slot taken, as by a burst of new tokens being checked.
	for range cap(v.signatureSlots) {
		v.signatureSlots <- struct{}{}
	}
	t.Cleanup(func() {
		for range cap(v.signatureSlots) {
			<-v.signatureSlots
		}
	})

	t.Run("a new token waits for a slot and gives up with its request", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		_, err := v.Verify(ctx, key.token(t, validClaims(8)))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want the request's deadline: the check did not wait for a slot", err)
		}
		var ae *authError
		if errors.As(err, &ae) {
			t.Errorf("a client that left is counted as a refused token: %v", err)
		}
	})
	t.Run("a token already verified needs no slot", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if uid, err := v.Verify(ctx, cached); err != nil || uid != 7 {
			t.Fatalf("got %d, %v", uid, err)
		}
	})
	t.Run("a token refused before its signature is checked needs no slot", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := v.Verify(ctx, "not.a.token")
		var ae *authError
		if !errors.As(err, &ae) {
			t.Fatalf("got %v, want a refusal", err)
		}
	})
}
