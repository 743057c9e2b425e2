package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

func wantRefusal(t *testing.T, err error, reason rejectReason) {
	t.Helper()
	var ae *authError
	if !errors.As(err, &ae) || ae.reason != reason {
		t.Fatalf("Verify error = %v, want a %s refusal", err, reason)
	}
}

// cached reports whether token is a cache hit against the current key set.
func cached(v *Verifier, token string) bool {
	_, ok := v.tokens.get(tokenSum(token), v.keys.Load(), time.Now())
	return ok
}

// The service in production and in `make bench` reads JWKS_FILE: when the
// signing key leaves the file, a token that was verified (and cached) with it
// must be refused on the next request after the reload, exactly as a fresh
// verification would refuse it.
func TestTokenCacheRefusesACachedTokenOnceItsKeyIsRemoved(t *testing.T) {
	old := newTestKey(t, jwa.RS256, "old", 0)
	next := newTestKey(t, jwa.ES256, "next", 0)
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeSet := func(keys ...testKey) {
		t.Helper()
		pub := make([]jwk.Key, 0, len(keys))
		for _, k := range keys {
			pub = append(pub, k.publicJWK(t, false))
		}
		set := jwksJSON(t, pub...)
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, set, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	writeSet(old, next)
	cfg := authConfig{jwksFile: path, issuer: testIssuer, audience: testAudience, leeway: 30 * time.Second,
		refreshEvery: 50 * time.Millisecond, minRefreshGap: 50 * time.Millisecond}
	v := newTestVerifier(t, cfg)
	ctx := context.Background()

	token := old.token(t, validClaims("1001"))
	for range 2 {
		if uid, err := v.Verify(ctx, token); err != nil || uid != 1001 {
			t.Fatalf("Verify = %d, %v before the key was removed", uid, err)
		}
	}
	if !cached(v, token) {
		t.Fatal("a verified token was not cached: this test would prove nothing")
	}

	writeSet(next)
	waitFor(t, 5*time.Second, "the verifier to load the set without the old key", func() bool { return v.KeyCount() == 1 })
	_, err := v.Verify(ctx, token)
	wantRefusal(t, err, reasonUnknownKey)
	if rec := callWith(v, "/", "Bearer "+token); rec.Code != 401 {
		t.Fatalf("middleware answered %d for a token whose key was removed", rec.Code)
	}
	// The remaining key still works, and is cached against the new set.
	other := next.token(t, validClaims("1002"))
	if uid, err := v.Verify(ctx, other); err != nil || uid != 1002 || !cached(v, other) {
		t.Fatalf("Verify(token of the remaining key) = %d, %v, cached %v", uid, err, cached(v, other))
	}
}

func TestTokenCacheRefusesACachedTokenOnceItExpires(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "k", 0)
	cfg := testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL)
	cfg.leeway = 0
	v := newTestVerifier(t, cfg)
	ctx := context.Background()

	claims := validClaims("1001")
	exp := time.Now().Unix() + 2
	claims["exp"] = exp
	token := key.token(t, claims)
	if uid, err := v.Verify(ctx, token); err != nil || uid != 1001 || !cached(v, token) {
		t.Fatalf("Verify = %d, %v, cached %v; want an accepted, cached token", uid, err, cached(v, token))
	}
	time.Sleep(time.Until(time.Unix(exp, 0)) + 50*time.Millisecond)
	_, err := v.Verify(ctx, token)
	wantRefusal(t, err, reasonExpired)
}

func TestTokenCacheNeverAcceptsAnAlteredToken(t *testing.T) {
	key := newTestKey(t, jwa.RS256, "k", 0)
	v := newTestVerifier(t, testAuthConfig(newJWKSServer(t, key.publicJWK(t, false)).URL))
	ctx := context.Background()
	token := key.token(t, validClaims("1001"))
	if _, err := v.Verify(ctx, token); err != nil || !cached(v, token) {
		t.Fatalf("Verify: %v, cached %v", err, cached(v, token))
	}
	// A character in the middle of the signature: every bit of it counts.
	b := []byte(token)
	i := len(b) - 100
	if b[i] == 'A' {
		b[i] = 'B'
	} else {
		b[i] = 'A'
	}
	_, err := v.Verify(ctx, string(b))
	wantRefusal(t, err, reasonBadSignature)
}

func TestTokenCacheEntryEndsAtExp(t *testing.T) {
	c := newTokenCache(4)
	kr := &keyring{}
	now := time.Unix(1_800_000_000, 0)
	sum := tokenSum("t")
	c.put(sum, kr, principal{userID: 7, kid: "k", exp: time.Unix(1800000010, 0)}, now)
	if p, ok := c.get(sum, kr, now.Add(9*time.Second)); !ok || p.userID != 7 || p.kid != "k" {
		t.Fatalf("get before exp = %+v, %v", p, ok)
	}
	if _, ok := c.get(sum, kr, now.Add(10*time.Second)); ok {
		t.Fatal("an entry was still served at its exp")
	}
	if _, ok := c.get(sum, &keyring{}, now); ok {
		t.Fatal("an entry was served against another key set")
	}
	c.put(tokenSum("gone"), kr, principal{userID: 8, exp: time.Unix(1799999999, 0)}, now)
	if c.len() != 1 {
		t.Fatalf("an expired token was cached: %d entries", c.len())
	}
	var nilCache *tokenCache
	nilCache.put(sum, kr, principal{userID: 7, exp: time.Unix(1800000010, 0)}, now)
	if _, ok := nilCache.get(sum, kr, now); ok {
		t.Fatal("a nil cache hit")
	}
}

func TestTokenCacheIsBounded(t *testing.T) {
	const max = 64
	c := newTokenCache(max)
	old, cur := &keyring{}, &keyring{}
	now := time.Unix(1_800_000_000, 0)
	exp := time.Unix(1800003600, 0)
	for i := range max {
		c.put(tokenSum("old"+strconv.Itoa(i)), old, principal{userID: int64(i + 1), exp: exp}, now)
	}
	// The key set changed: the next insertion sweeps every dead entry.
	c.put(tokenSum("cur"), cur, principal{userID: 1, exp: exp}, now)
	if c.len() != 1 {
		t.Fatalf("%d entries after the key set changed, want only the new one", c.len())
	}
	for i := range 10 * max {
		c.put(tokenSum("cur"+strconv.Itoa(i)), cur, principal{userID: int64(i + 1), exp: exp}, now)
		if c.len() > max {
			t.Fatalf("%d entries, bound %d", c.len(), max)
		}
	}
}
