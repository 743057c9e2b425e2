package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

const (
	testIssuer   = "https://issuer.test"
	testAudience = "threeds-records"
)

// testKey is a real private key with the JWK metadata an identity provider
// would publish for it.
type testKey struct {
	kid  string
	alg  jwa.SignatureAlgorithm
	priv jwk.Key
}

// rsaKeyCache spares each test the cost of a fresh 2048-bit key.
var rsaKeyCache = struct {
	sync.Mutex
	keys []*rsa.PrivateKey
}{}

func rsaKey(t testing.TB, i int) *rsa.PrivateKey {
	rsaKeyCache.Lock()
	defer rsaKeyCache.Unlock()
	for len(rsaKeyCache.keys) <= i {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		rsaKeyCache.keys = append(rsaKeyCache.keys, k)
	}
	return rsaKeyCache.keys[i]
}

// newTestKey makes a key for alg (RS256, PS256, ES256, ES384, EdDSA). The
// RSA keys are drawn from a small cache indexed by n, so two kids with
// different n are different keys.
func newTestKey(t testing.TB, alg jwa.SignatureAlgorithm, kid string, n int) testKey {
	t.Helper()
	var raw any
	var err error
	switch alg {
	case jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512:
		raw = rsaKey(t, n)
	case jwa.ES256:
		raw, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jwa.ES384:
		raw, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case jwa.ES512:
		raw, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case jwa.EdDSA:
		_, raw, err = ed25519.GenerateKey(rand.Reader)
	default:
		t.Fatalf("newTestKey: unsupported alg %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	priv, err := jwk.FromRaw(raw)
	if err != nil {
		t.Fatal(err)
	}
	_ = priv.Set(jwk.KeyIDKey, kid)
	_ = priv.Set(jwk.AlgorithmKey, alg)
	_ = priv.Set(jwk.KeyUsageKey, jwk.ForSignature)
	return testKey{kid: kid, alg: alg, priv: priv}
}

// publicJWK returns the key as the identity provider publishes it;
// withoutAlg drops "alg", as many real providers do.
func (k testKey) publicJWK(t testing.TB, withoutAlg bool) jwk.Key {
	t.Helper()
	pub, err := jwk.PublicKeyOf(k.priv)
	if err != nil {
		t.Fatal(err)
	}
	if withoutAlg {
		_ = pub.Remove(jwk.AlgorithmKey)
	}
	return pub
}

func jwksJSON(t testing.TB, keys ...jwk.Key) []byte {
	t.Helper()
	set := jwk.NewSet()
	for _, k := range keys {
		if err := set.AddKey(k); err != nil {
			t.Fatal(err)
		}
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sign makes a compact JWS over the exact payload bytes given, so tests can
// craft claims no well-behaved library would emit (duplicates, odd types).
func (k testKey) sign(t testing.TB, payload []byte, extraHeaders map[string]any) string {
	t.Helper()
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, k.kid)
	_ = hdr.Set(jws.TypeKey, "JWT")
	for name, v := range extraHeaders {
		if err := hdr.Set(name, v); err != nil {
			t.Fatal(err)
		}
	}
	tok, err := jws.Sign(payload, jws.WithKey(k.alg, k.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(tok)
}

// claims is a valid claim set for user; tests mutate a copy.
func validClaims(user any) map[string]any {
	now := time.Now().Unix()
	return map[string]any{
		"iss": testIssuer,
		"aud": testAudience,
		"sub": user,
		"iat": now,
		"nbf": now,
		"exp": now + 600,
	}
}

func (k testKey) token(t testing.TB, claims map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	return k.sign(t, payload, nil)
}

// unsignedToken assembles header.payload.signature from raw parts, for
// attacks that no signing library will produce (alg none, HMAC with a
// public key as the secret).
func unsignedToken(header, payload, sig []byte) string {
	enc := base64.RawURLEncoding
	return enc.EncodeToString(header) + "." + enc.EncodeToString(payload) + "." + enc.EncodeToString(sig)
}

// jwksServer is a real identity provider's JWKS endpoint over HTTP. Its
// set can be replaced, and it can be made to fail, to test rotation and
// outages.
type jwksServer struct {
	*httptest.Server
	mu       sync.Mutex
	body     []byte
	hitTimes []time.Time   // when each request arrived
	gate     chan struct{} // while non-nil, requests wait for it to close (hold)
	down     atomic.Bool
	hits     atomic.Int64
}

func newJWKSServer(t testing.TB, keys ...jwk.Key) *jwksServer {
	t.Helper()
	s := &jwksServer{body: jwksJSON(t, keys...)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.hitTimes = append(s.hitTimes, time.Now())
		gate := s.gate
		s.mu.Unlock()
		s.hits.Add(1)
		if gate != nil {
			// A slow identity provider: the answer (the set, or the outage)
			// is decided when the test releases it, not when the request came.
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
		}
		if s.down.Load() {
			http.Error(w, "identity provider unavailable", http.StatusServiceUnavailable)
			return
		}
		s.mu.Lock()
		body := s.body
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

// hold makes the server sit on every request until release is called.
func (s *jwksServer) hold() (release func()) {
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.gate = nil
			s.mu.Unlock()
			close(gate)
		})
	}
}

// arrivals returns when each request reached the server, oldest first.
func (s *jwksServer) arrivals() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.hitTimes...)
}

func (s *jwksServer) setKeys(t testing.TB, keys ...jwk.Key) {
	b := jwksJSON(t, keys...)
	s.mu.Lock()
	s.body = b
	s.mu.Unlock()
}

// testAuthConfig is the configuration the service would get for srv.
func testAuthConfig(jwksURL string) authConfig {
	return authConfig{
		jwksURL:       jwksURL,
		issuer:        testIssuer,
		audience:      testAudience,
		userClaim:     "sub",
		leeway:        30 * time.Second,
		refreshEvery:  30 * time.Second,
		minRefreshGap: 5 * time.Second,
	}
}

// newTestVerifier starts a verifier and waits until it has keys.
func newTestVerifier(t testing.TB, cfg authConfig) *Verifier {
	t.Helper()
	v := NewVerifier(cfg, discardLogger())
	t.Cleanup(v.Close)
	waitFor(t, 5*time.Second, "verifier to load keys", v.Ready)
	return v
}

func discardLogger() *slog.Logger { return slog.New(slog.NewJSONHandler(io.Discard, nil)) }

// waitFor polls cond until it holds or the deadline passes: the only way a
// test here waits on background work.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
