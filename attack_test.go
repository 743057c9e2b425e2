package main

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"hash"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwe"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// The RFC 8725 checklist, through the real middleware and a real JWKS.
// auth_test.go already covers lower-case alg none, HS256 keyed with the PEM
// and DER public key, a jku naming an attacker's key set, a crit extension,
// a duplicated sub, exp as a string, and sub as "alice", 0, "-5", 1.5,
// "9223372036854775808" and " 1001"; this file adds the rest.

// esSign signs exactly the protected header bytes given, which no JOSE
// library will do for headers it considers odd: that is the attacker's view.
func esSign(t testing.TB, k testKey, header, payload []byte) string {
	t.Helper()
	var priv ecdsa.PrivateKey
	if err := k.priv.Raw(&priv); err != nil {
		t.Fatal(err)
	}
	enc := base64.RawURLEncoding
	input := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	digest := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, &priv, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + enc.EncodeToString(sig)
}

// hmacToken signs with HMAC, the classic key-confusion attack: the secret
// is the service's own public key in some encoding.
func hmacToken(alg string, newHash func() hash.Hash, kid string, secret, payload []byte) string {
	hdr := []byte(fmt.Sprintf(`{"alg":%q,"typ":"JWT","kid":%q}`, alg, kid))
	enc := unsignedToken(hdr, payload, nil)
	mac := hmac.New(newHash, secret)
	mac.Write([]byte(strings.TrimSuffix(enc, ".")))
	return unsignedToken(hdr, payload, mac.Sum(nil))
}

// selfSignedCert is an attacker's certificate for an x5c header.
func selfSignedCert(t testing.TB, k testKey) []byte {
	t.Helper()
	var priv ecdsa.PrivateKey
	if err := k.priv.Raw(&priv); err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "issuer.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, crypto.Signer(&priv))
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestVerifierRefusesTheRFC8725AttackTable(t *testing.T) {
	rsa := newTestKey(t, jwa.RS256, "rsa-1", 0)
	ec := newTestKey(t, jwa.ES256, "ec-1", 0)
	idp := newJWKSServer(t, rsa.publicJWK(t, false), ec.publicJWK(t, false))
	v := newTestVerifier(t, testAuthConfig(idp.URL))

	attacker := newTestKey(t, jwa.ES256, "attacker", 0)
	attackerAsEC := attacker
	attackerAsEC.kid = "ec-1" // the attacker claims the trusted kid
	// The attacker's key endpoint; the service must never ask it anything.
	var attackerHits atomic.Int64
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attackerHits.Add(1)
		_, _ = w.Write(jwksJSON(t, attacker.publicJWK(t, false)))
	}))
	t.Cleanup(evil.Close)

	rawPub, _ := jwk.PublicRawKeyOf(rsa.priv)
	der, _ := x509.MarshalPKIXPublicKey(rawPub)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	pubJWK, _ := json.Marshal(rsa.publicJWK(t, false))
	ecJWK, _ := json.Marshal(ec.publicJWK(t, false))
	attackerJWK, _ := json.Marshal(attacker.publicJWK(t, false))
	attackerCert := base64.StdEncoding.EncodeToString(selfSignedCert(t, attacker))

	now := time.Now().Unix()
	base := fmt.Sprintf(`"iss":%q,"aud":%q,"iat":%d`, testIssuer, testAudience, now)
	good := fmt.Sprintf(`{%s,"exp":%d,"sub":"1001"}`, base, now+600)
	claims := func(rest string) []byte { return []byte("{" + base + "," + rest + "}") }
	exp := fmt.Sprintf(`"exp":%d`, now+600)
	signed := func(payload []byte) string { return ec.sign(t, payload, nil) }
	header := func(h string) []byte { return []byte(h) }

	valid := signed([]byte(good))
	validParts := strings.Split(valid, ".")
	other := signed(claims(exp + `,"sub":"1002"`))

	twoSigs, err := jws.Sign([]byte(good), jws.WithJSON(),
		jws.WithKey(jwa.ES256, attackerAsEC.priv), jws.WithKey(jwa.ES256, ec.priv))
	if err != nil {
		t.Fatal(err)
	}
	flattened, err := jws.Sign([]byte(good), jws.WithJSON(), jws.WithKey(jwa.ES256, ec.priv))
	if err != nil {
		t.Fatal(err)
	}
	rsaPub, _ := jwk.PublicKeyOf(rsa.priv)
	encrypted, err := jwe.Encrypt([]byte(good), jwe.WithKey(jwa.RSA_OAEP_256, rsaPub), jwe.WithCompact())
	if err != nil {
		t.Fatal(err)
	}
	nested, err := jwe.Encrypt([]byte(valid), jwe.WithKey(jwa.RSA_OAEP_256, rsaPub), jwe.WithCompact(),
		jwe.WithProtectedHeaders(func() jwe.Headers { h := jwe.NewHeaders(); _ = h.Set("cty", "JWT"); return h }()))
	if err != nil {
		t.Fatal(err)
	}
	goodPayload := []byte(good)

	type attack struct {
		name   string
		header string // the Authorization value
	}
	cases := []attack{
		{"alg None is refused", "Bearer " + unsignedToken(header(`{"alg":"None","kid":"ec-1"}`), goodPayload, nil)},
		{"alg NONE is refused", "Bearer " + unsignedToken(header(`{"alg":"NONE","kid":"ec-1"}`), goodPayload, nil)},
		{"alg nOnE is refused", "Bearer " + unsignedToken(header(`{"alg":"nOnE","kid":"ec-1"}`), goodPayload, nil)},
		{"alg none without a kid is refused", "Bearer " + unsignedToken(header(`{"alg":"none"}`), goodPayload, nil)},
		{"alg none carrying a real signature is refused", "Bearer " + unsignedToken(header(`{"alg":"none","kid":"ec-1"}`), goodPayload, []byte(validParts[2]))},
		{"an empty alg is refused", "Bearer " + unsignedToken(header(`{"alg":"","kid":"ec-1"}`), goodPayload, nil)},
		{"a missing alg is refused", "Bearer " + esSign(t, ec, header(`{"kid":"ec-1"}`), goodPayload)},

		{"HS256 keyed with the public key as JWK JSON is refused", "Bearer " + hmacToken("HS256", sha256.New, "rsa-1", pubJWK, goodPayload)},
		{"HS256 keyed with the PEM without its final newline is refused", "Bearer " + hmacToken("HS256", sha256.New, "rsa-1", []byte(strings.TrimSpace(string(pubPEM))), goodPayload)},
		{"HS256 keyed with the EC public key as JWK JSON is refused", "Bearer " + hmacToken("HS256", sha256.New, "ec-1", ecJWK, goodPayload)},
		{"HS384 keyed with the public key PEM is refused", "Bearer " + hmacToken("HS384", sha512.New384, "rsa-1", pubPEM, goodPayload)},
		{"HS384 keyed with the public key DER is refused", "Bearer " + hmacToken("HS384", sha512.New384, "rsa-1", der, goodPayload)},
		{"HS384 keyed with the public key as JWK JSON is refused", "Bearer " + hmacToken("HS384", sha512.New384, "rsa-1", pubJWK, goodPayload)},
		{"HS512 keyed with the public key PEM is refused", "Bearer " + hmacToken("HS512", sha512.New, "rsa-1", pubPEM, goodPayload)},
		{"HS512 keyed with the public key DER is refused", "Bearer " + hmacToken("HS512", sha512.New, "rsa-1", der, goodPayload)},
		{"HS512 keyed with the public key as JWK JSON is refused", "Bearer " + hmacToken("HS512", sha512.New, "rsa-1", pubJWK, goodPayload)},

		{"a jku header with the attacker's own kid is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"attacker","jku":"`+evil.URL+`"}`), goodPayload)},
		{"an x5u header naming the attacker's certificate is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"attacker","x5u":"`+evil.URL+`/cert.pem"}`), goodPayload)},
		{"an x5u header under the trusted kid is refused", "Bearer " + esSign(t, attackerAsEC, header(`{"alg":"ES256","kid":"ec-1","x5u":"`+evil.URL+`/cert.pem"}`), goodPayload)},
		{"an embedded jwk with the attacker's kid is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"attacker","jwk":`+string(attackerJWK)+`}`), goodPayload)},
		{"an embedded jwk under the trusted kid is refused", "Bearer " + esSign(t, attackerAsEC, header(`{"alg":"ES256","kid":"ec-1","jwk":`+string(attackerJWK)+`}`), goodPayload)},
		{"an embedded jwk without any kid is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","jwk":`+string(attackerJWK)+`}`), goodPayload)},
		{"an x5c chain with the attacker's certificate is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","x5c":["`+attackerCert+`"]}`), goodPayload)},
		{"an x5c chain under the trusted kid is refused", "Bearer " + esSign(t, attackerAsEC, header(`{"alg":"ES256","kid":"ec-1","x5c":["`+attackerCert+`"]}`), goodPayload)},

		{"a kid of ../../etc/passwd is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"../../etc/passwd"}`), goodPayload)},
		{"a kid of /dev/zero is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"/dev/zero"}`), goodPayload)},
		{"a kid of ' OR 1=1 -- is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"' OR 1=1 --"}`), goodPayload)},
		{"a kid with a NUL byte after the trusted kid is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"ec-1\u0000x"}`), goodPayload)},
		{"a 10 KB kid is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"`+strings.Repeat("k", 10<<10)+`"}`), goodPayload)},
		{"a 5 KB kid that fits the header limit is refused", "Bearer " + esSign(t, attacker, header(`{"alg":"ES256","kid":"`+strings.Repeat("k", 5<<10)+`"}`), goodPayload)},
		{"a numeric kid is refused", "Bearer " + esSign(t, ec, header(`{"alg":"ES256","kid":1}`), goodPayload)},

		{"a crit naming b64 with an unencoded payload is refused", "Bearer " + esSign(t, ec, header(`{"alg":"ES256","kid":"ec-1","b64":false,"crit":["b64"]}`), goodPayload)},
		{"an empty crit list is refused", "Bearer " + esSign(t, ec, header(`{"alg":"ES256","kid":"ec-1","crit":[]}`), goodPayload)},

		{"a JWE in place of a JWS is refused", "Bearer " + string(encrypted)},
		{"a JWE wrapping a valid JWS is refused", "Bearer " + string(nested)},
		{"a JSON-serialized JWS with two signatures, one valid, is refused", "Bearer " + string(twoSigs)},
		{"a flattened JSON JWS with one valid signature is refused", "Bearer " + string(flattened)},

		{"an ES256 signature of zeros (CVE-2022-21449) is refused", "Bearer " + validParts[0] + "." + validParts[1] + "." + base64.RawURLEncoding.EncodeToString(make([]byte, 64))},
		{"a signature spliced from another user's valid token is refused", "Bearer " + validParts[0] + "." + validParts[1] + "." + strings.Split(other, ".")[2]},
		{"a valid token with a padded signature is refused", "Bearer " + valid + "=="},

		{"a duplicated exp is refused", "Bearer " + signed(claims(fmt.Sprintf(`"exp":%d,"exp":%d,"sub":"1001"`, now-3600, now+600)))},
		{"a duplicated iss is refused", "Bearer " + signed([]byte(fmt.Sprintf(`{"iss":"https://evil.test","iss":%q,"aud":%q,"exp":%d,"sub":"1001"}`, testIssuer, testAudience, now+600)))},
		{"a duplicated aud is refused", "Bearer " + signed([]byte(fmt.Sprintf(`{"iss":%q,"aud":"other","aud":%q,"exp":%d,"sub":"1001"}`, testIssuer, testAudience, now+600)))},
		{"a sub repeated under an escaped name is refused", "Bearer " + signed(claims(exp+`,"sub":"1001","\u0073ub":"1002"`))},

		{"an exp of 1e20 is refused", "Bearer " + signed(claims(`"exp":1e20,"sub":"1001"`))},
		{"an exp of 2^63 is refused", "Bearer " + signed(claims(`"exp":9223372036854775808,"sub":"1001"`))},
		{"an exp of 2^63-1 is refused", "Bearer " + signed(claims(`"exp":9223372036854775807,"sub":"1001"`))},
		{"an exp beyond float64 is refused", "Bearer " + signed(claims(`"exp":1e400,"sub":"1001"`))},
		{"a negative exp is refused", "Bearer " + signed(claims(`"exp":-1,"sub":"1001"`))},
		{"a null exp is refused", "Bearer " + signed(claims(`"exp":null,"sub":"1001"`))},
		{"an exp as an array is refused", "Bearer " + signed(claims(fmt.Sprintf(`"exp":[%d],"sub":"1001"`, now+600)))},

		{"a sub of 1.0 is refused", "Bearer " + signed(claims(exp+`,"sub":1.0`))},
		{"a sub of 1e3 is refused", "Bearer " + signed(claims(exp+`,"sub":1e3`))},
		{"a sub of \"1e3\" is refused", "Bearer " + signed(claims(exp+`,"sub":"1e3"`))},
		{"a negative numeric sub is refused", "Bearer " + signed(claims(exp+`,"sub":-1001`))},
		{"a numeric sub of 2^63 is refused", "Bearer " + signed(claims(exp+`,"sub":9223372036854775808`))},
		{"a numeric sub of 2^64+1001 is refused", "Bearer " + signed(claims(exp+`,"sub":18446744073709552617`))},
		{"a sub with a space inside is refused", "Bearer " + signed(claims(exp+`,"sub":"10 01"`))},
		{"a sub with a trailing space is refused", "Bearer " + signed(claims(exp+`,"sub":"1001 "`))},
		{"a sub with a trailing newline is refused", "Bearer " + signed(claims(exp+`,"sub":"1001\n"`))},
		{"a sub with a plus sign is refused", "Bearer " + signed(claims(exp+`,"sub":"+1001"`))},
		{"a sub with a leading zero is refused", "Bearer " + signed(claims(exp+`,"sub":"01001"`))},
		{"a sub in Arabic-Indic digits is refused", "Bearer " + signed(claims(exp+`,"sub":"١٠٠١"`))},
		{"a sub as an array is refused", "Bearer " + signed(claims(exp+`,"sub":["1001"]`))},
		{"a sub as an object is refused", "Bearer " + signed(claims(exp+`,"sub":{"id":1001}`))},
		{"a sub of true is refused", "Bearer " + signed(claims(exp+`,"sub":true`))},
		{"a null sub is refused", "Bearer " + signed(claims(exp+`,"sub":null`))},
		{"a token without sub is refused", "Bearer " + signed(claims(exp))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := callWith(v, "/3ds/my-records", tc.header)
			assertRefused(t, rec, strings.TrimPrefix(tc.header, "Bearer "), true)
			t.Logf("401: %s", strings.TrimSpace(rec.Body.String()))
		})
	}

	// The control: the same helpers produce tokens that are admitted, so the
	// refusals above are about the attack, not a broken fixture.
	for name, h := range map[string]string{
		"the valid token":          "Bearer " + valid,
		"an esSign token":          "Bearer " + esSign(t, ec, header(`{"alg":"ES256","kid":"ec-1"}`), goodPayload),
		"a numeric sub":            "Bearer " + signed(claims(exp+`,"sub":1001`)),
		"an exp of year 9999":      "Bearer " + signed(claims(`"exp":253402300799,"sub":"1001"`)),
		"a fractional exp":         "Bearer " + signed(claims(fmt.Sprintf(`"exp":%d.5,"sub":"1001"`, now+600))),
		"an unrelated extra claim": "Bearer " + signed(claims(exp+`,"sub":"1001","user_id":1002`)),
	} {
		if got := admittedUser(t, callWith(v, "/", h)); got != 1001 {
			t.Errorf("control %s: user %d, want 1001", name, got)
		}
	}
	if n := attackerHits.Load(); n != 0 {
		t.Errorf("the attacker's jku/x5u server got %d requests; it must get none", n)
	}
}

func TestVerifierAcceptsTokensOnlyFromTheAuthorizationHeader(t *testing.T) {
	k := newTestKey(t, jwa.ES256, "es", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, k.publicJWK(t, false)).URL))
	tok := k.token(t, validClaims("42"))

	cases := []struct {
		name          string
		prepare       func(r *http.Request)
		withErrorCode bool
	}{
		{"a token only in the access_token query parameter is refused", func(r *http.Request) {
			r.URL.RawQuery = "access_token=" + tok
		}, false},
		{"a token only in an access_token cookie is refused", func(r *http.Request) {
			r.AddCookie(&http.Cookie{Name: "access_token", Value: tok})
		}, false},
		{"a token only in a cookie named Authorization is refused", func(r *http.Request) {
			r.AddCookie(&http.Cookie{Name: "Authorization", Value: "Bearer " + tok})
		}, false},
		{"a token only in an X-Access-Token header is refused", func(r *http.Request) {
			r.Header.Set("X-Access-Token", tok)
		}, false},
		{"a token only in Proxy-Authorization is refused", func(r *http.Request) {
			r.Header.Set("Proxy-Authorization", "Bearer "+tok)
		}, false},
		{"a valid query token does not rescue a bad header", func(r *http.Request) {
			r.URL.RawQuery = "access_token=" + tok
			r.Header.Set("Authorization", "Bearer not-a-token")
		}, true},
		{"a valid cookie token does not rescue an expired header", func(r *http.Request) {
			c := validClaims("42")
			c["exp"] = time.Now().Unix() - 3600
			r.Header.Set("Authorization", "Bearer "+k.token(t, c))
			r.AddCookie(&http.Cookie{Name: "access_token", Value: tok})
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "/3ds/my-records", nil)
			tc.prepare(req)
			rec := httptest.NewRecorder()
			v.Middleware(whoami).ServeHTTP(rec, req)
			assertRefused(t, rec, tok, tc.withErrorCode)
		})
	}
}

// rawHTTP sends a request exactly as written, so paths like //x, /./x and
// %2F reach the server without a client cleaning them first.
func rawHTTP(t testing.TB, addr, request string) (int, []byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(request, " ")
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("read response to %q: %v", request, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, body
}

// TestNoRequestShapeShowsAnotherUsersRecords is broken object level
// authorization from the outside: user 1001's token, user 1002's rows in the
// same table, and every way a client might try to name someone else.
func TestNoRequestShapeShowsAnotherUsersRecords(t *testing.T) {
	svc := newTestService(t)
	mine, theirs := "111111", "222222"
	insertRows(t, svc.pool,
		seedRow{id: 1, userID: 1001, passcode: mine, amount: "1", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-01T00:00:00Z"},
		seedRow{id: 2, userID: 1001, passcode: mine, amount: "2", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-02T00:00:00Z"},
		seedRow{id: 3, userID: 1002, passcode: theirs, amount: "3", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-03T00:00:00Z"},
		seedRow{id: 4, userID: 1002, passcode: theirs, amount: "4", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-04T00:00:00Z"},
		seedRow{id: 5, userID: 1002, passcode: theirs, amount: "5", currency: "USD", expiresAfter: 300, receivedAt: "2026-01-05T00:00:00Z"},
	)
	tok := svc.tokenFor(t, 1001)
	c := validClaims("1001")
	c["user_id"], c["uid"], c["userId"] = 1002, "1002", 1002
	tokWithOtherIDs := svc.key.token(t, c)
	addr := strings.TrimPrefix(svc.URL, "http://")

	request := func(method, target, token string, extra ...string) string {
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n", method, target, addr, token)
		for _, h := range extra {
			b.WriteString(h + "\r\n")
		}
		b.WriteString("\r\n")
		return b.String()
	}

	type attempt struct{ name, request string }
	var attempts []attempt
	for _, h := range []string{
		"X-User-ID: 1002", "X-Forwarded-User: 1002", "X-Auth-User-Id: 1002", "X-Original-User: 1002",
		"X-Remote-User: 1002", "Remote-User: 1002", "X-User: 1002", "X-Authenticated-Userid: 1002",
		"X-Consumer-ID: 1002", "X-Forwarded-Sub: 1002", "X-Jwt-Sub: 1002", "X-Amzn-Oidc-Identity: 1002",
		"X-Original-URL: /3ds/my-records?user_id=1002", "X-Rewrite-URL: /3ds/my-records?user_id=1002",
		"X-HTTP-Method-Override: DELETE", "Forwarded: for=127.0.0.1;by=1002",
	} {
		attempts = append(attempts, attempt{"a " + strings.SplitN(h, ":", 2)[0] + " header is ignored", request("GET", "/3ds/my-records", tok, h)})
	}
	for _, q := range []string{
		"user_id=1002", "uid=1002", "sub=1002", "userId=1002", "user=1002", "id=1002", "user_id[]=1002",
		"user_id=1002&user_id=1001", "filter[user_id]=1002", "user_id=1002%00", "page=1&user_id=1002&page_size=100",
	} {
		attempts = append(attempts, attempt{"a query of " + q + " is ignored", request("GET", "/3ds/my-records?"+q, tok)})
	}
	for _, p := range []string{
		"/3ds/my-records/1002", "/3ds/my-records/1001/../1002", "//3ds/my-records", "/3ds//my-records",
		"/3ds/./my-records", "/3ds/../3ds/my-records", "/3ds%2Fmy-records", "/3ds%2fmy-records?user_id=1002",
		"/3ds/my-records%2F1002", "/3ds/my-records/", "/3ds/my-records/?user_id=1002", "/3DS/MY-RECORDS",
		"/3ds/my-records;user_id=1002", "/3ds/my-records.json", "/3ds/my%2Drecords", "/%33ds/my-records",
		"http://other.example/3ds/my-records?user_id=1002", "/users/1002/3ds/my-records", "*",
	} {
		attempts = append(attempts, attempt{"the path " + p + " shows only the caller's rows", request("GET", p, tok)})
	}
	for _, m := range []string{"POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "get", "HEAD"} {
		attempts = append(attempts, attempt{"the method " + m + " shows only the caller's rows", request(m, "/3ds/my-records?user_id=1002", tok,
			"Content-Type: application/x-www-form-urlencoded", "Content-Length: 12") + "user_id=1002"})
	}
	attempts = append(attempts,
		attempt{"user_id, uid and userId claims for another user are ignored", request("GET", "/3ds/my-records", tokWithOtherIDs)},
		attempt{"HTTP/1.0 without Host shows only the caller's rows", "GET /3ds/my-records?user_id=1002 HTTP/1.0\r\nAuthorization: Bearer " + tok + "\r\n\r\n"},
	)

	for _, a := range attempts {
		t.Run(a.name, func(t *testing.T) {
			status, body := rawHTTP(t, addr, a.request)
			t.Logf("status %d", status)
			if strings.Contains(string(body), theirs) {
				t.Fatalf("status %d leaks user 1002's passcode: %s", status, body)
			}
			switch {
			case status == http.StatusOK && len(body) > 0:
				var p pageBody
				if err := json.Unmarshal(body, &p); err != nil {
					t.Fatalf("200 body is not a page: %s", body)
				}
				if p.Data.Total != 2 || len(p.Data.Records) != 2 {
					t.Fatalf("total %d, %d records, want user 1001's 2: %s", p.Data.Total, len(p.Data.Records), body)
				}
				for _, r := range p.Data.Records {
					if r.ID != 1 && r.ID != 2 {
						t.Fatalf("record %d is not user 1001's: %s", r.ID, body)
					}
				}
			case status >= 500:
				t.Fatalf("status %d: %s", status, body)
			}
		})
	}
}
