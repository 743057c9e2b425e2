// keys.go owns the verification key set: loading it (JWKS_URL over HTTP with
// a same-origin redirect policy and redacted errors, or JWKS_FILE), keeping
// it fresh (the background loop, and the forced refresh an unknown kid
// triggers: single flight, rate-limited, waited on for at most 1 s), and
// what a usable key is (parseKeyring, usableKey, its thumbprint).
// auth.go verifies tokens against it and answers HTTP.
package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

// fetchTimeout bounds one JWKS load, background or forced: an identity
// provider that accepts the connection and never answers must not hold the
// refresh for long.
const fetchTimeout = 5 * time.Second

// unknownKidWait is the longest a request naming an unknown kid waits for
// the forced refresh (contract §4). The refresh itself may take longer and
// goes on in the background; the waiter gets its 401 and its client retries.
const unknownKidWait = time.Second

// maxUnknownKidWaiters bounds the requests waiting on a forced refresh at
// once. Each waiter is a parked goroutine with its connection and a timer
// (a few KiB); a flood of made-up kids beyond this many is refused at once
// instead of piling up for the whole second. A real token with a freshly
// rotated key that meets the cap during such a flood gets a 401, and its
// client's retry finds the key installed by the refresh it started.
const maxUnknownKidWaiters = 1024

// maxJWKSRedirects is how many same-origin redirects a fetch follows.
const maxJWKSRedirects = 5

const maxJWKSBytes = 1 << 20

// keySet is the JWK Set in use, swapped atomically, so verification never
// waits on a fetch except when a token names a kid the set does not have.
type keySet struct {
	cfg    authConfig
	logger *slog.Logger
	load   func(ctx context.Context) ([]byte, error)
	now    func() time.Time
	// source names where the keys come from in log lines: JWKS_URL with its
	// user-info and query string redacted, or the JWKS_FILE path.
	source string

	keys atomic.Pointer[keyring]

	// refreshMu serialises loads and installs, so a slow older response can
	// never replace a newer set.
	refreshMu sync.Mutex
	lastRaw   []byte

	// bg lives until Close: the background loop and every forced refresh run
	// on it, never on a client's request context, so a client that goes away
	// (or stops waiting after unknownKidWait) cannot cancel a fetch that the
	// next real token signed with a rotated key depends on.
	bg             context.Context
	stopBackground context.CancelFunc
	done           chan struct{}

	// The forced refresh for unknown kids: at most one in flight, shared by
	// every request waiting on it.
	forcedMu       sync.Mutex
	forced         chan struct{} // closed when the refresh in flight ends; nil when none
	nextForced     time.Time     // earliest start of the next forced refresh
	forcedFailures int           // consecutive failed forced refreshes
	forcedWG       sync.WaitGroup
	waiters        atomic.Int64 // requests waiting on it now

	refreshOK     atomic.Int64
	refreshFailed atomic.Int64
}

// newKeySet starts the background key refresh; Close stops it.
func newKeySet(cfg authConfig, logger *slog.Logger) *keySet {
	if cfg.refreshEvery <= 0 {
		cfg.refreshEvery = 60 * time.Second
	}
	if cfg.minRefreshGap <= 0 {
		cfg.minRefreshGap = 5 * time.Second
	}
	ks := &keySet{cfg: cfg, logger: logger, now: time.Now, done: make(chan struct{})}
	if cfg.jwksFile != "" {
		ks.source = "JWKS_FILE=" + cfg.jwksFile
		ks.load = func(context.Context) ([]byte, error) { return readLimited(cfg.jwksFile) }
	} else {
		ks.source = "JWKS_URL=" + redactedJWKSURL(cfg.jwksURL)
		if u, err := url.Parse(cfg.jwksURL); err == nil && strings.EqualFold(u.Scheme, "http") {
			// Said once, here: the keys decide who is who, and over plain
			// http anyone on the path can substitute their own.
			logger.Warn("JWKS_URL is plain http: anyone on the network path can substitute the keys and forge tokens; use https",
				"source", ks.source)
		}
		client := &http.Client{Timeout: fetchTimeout, Transport: cfg.transport, CheckRedirect: sameOriginRedirect}
		ks.load = func(ctx context.Context) ([]byte, error) { return fetchJWKS(ctx, client, cfg.jwksURL) }
	}
	ks.bg, ks.stopBackground = context.WithCancel(context.Background())
	go ks.refreshLoop(ks.bg)
	return ks
}

// Close stops the background refresh and any forced refresh in flight, and
// waits for them to finish.
func (ks *keySet) Close() {
	// Under forcedMu, so no forced refresh can start once Close has begun.
	ks.forcedMu.Lock()
	ks.stopBackground()
	ks.forcedMu.Unlock()
	<-ks.done
	ks.forcedWG.Wait()
}

// Ready reports whether a key set has been loaded.
func (ks *keySet) Ready() bool { return ks.keys.Load() != nil }

// KeyCount is the number of usable verification keys.
func (ks *keySet) KeyCount() int {
	if kr := ks.keys.Load(); kr != nil {
		return len(kr.byKid)
	}
	return 0
}

// stillTrusts reports whether the key that verified p is still in the set
// with the same key material: a key removed, or replaced under the same
// kid, no longer vouches for the token.
func (ks *keySet) stillTrusts(p principal) bool {
	kr := ks.keys.Load()
	if kr == nil {
		return false
	}
	k, ok := kr.byKid[p.kid]
	return ok && k.thumb == p.keyThumb
}

// keysChanged returns a channel closed at the next key-set swap. Take it
// before calling stillTrusts, so a swap between the two calls is never
// missed. Before the first set is loaded it returns nil (never closed).
func (ks *keySet) keysChanged() <-chan struct{} {
	if kr := ks.keys.Load(); kr != nil {
		return kr.replaced
	}
	return nil
}

// keyFor returns the key named kid and the set it came from. A kid that kr
// (the set in use when verification began) lacks forces a refresh, waited
// on for at most unknownKidWait.
func (ks *keySet) keyFor(ctx context.Context, kr *keyring, kid string) (verifyKey, *keyring, bool) {
	if k, ok := kr.byKid[kid]; ok {
		return k, kr, true
	}
	ks.refreshForUnknownKid(ctx)
	kr = ks.keys.Load()
	k, ok := kr.byKid[kid]
	return k, kr, ok
}

// refreshLoop polls fast until the first set arrives (readiness waits on it),
// then settles to refreshEvery. A failed refresh keeps the last good keys: an
// identity-provider outage must not log every cardholder out.
func (ks *keySet) refreshLoop(ctx context.Context) {
	defer close(ks.done)
	retry := 250 * time.Millisecond
	for {
		ks.refresh(ctx, "schedule")
		wait := ks.cfg.refreshEvery
		if !ks.Ready() {
			wait = retry
			retry = min(retry*2, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// refresh loads the set once and installs it if it parses; it reports
// whether the load worked (an unchanged set counts as working). cause is a
// log field: "schedule" or "unknown_kid".
func (ks *keySet) refresh(ctx context.Context, cause string) bool {
	ks.refreshMu.Lock()
	defer ks.refreshMu.Unlock()
	// The timeout starts once the lock is held: time spent queued behind
	// another load must not eat this one's budget.
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	raw, err := ks.load(ctx)
	if err == nil && ks.Ready() && bytes.Equal(raw, ks.lastRaw) {
		ks.refreshOK.Add(1)
		return true
	}
	var kr *keyring
	if err == nil {
		kr, err = parseKeyring(raw)
	}
	if err != nil {
		// Quiet only at shutdown; a timed-out forced refresh is worth a line.
		// Logged before it is counted, so whoever sees the count (a scrape,
		// a test) finds the line already written.
		if ks.bg.Err() == nil {
			ks.logger.Warn("jwks refresh failed; keeping the last good keys",
				"source", ks.source, "cause", cause, "error", err.Error(), "keys", ks.KeyCount())
		}
		ks.refreshFailed.Add(1)
		return false
	}
	ks.refreshOK.Add(1)
	ks.lastRaw = raw
	if old := ks.keys.Swap(kr); old != nil {
		close(old.replaced)
	}
	ks.logger.Info("jwks loaded", "source", ks.source, "cause", cause, "keys", len(kr.byKid), "skipped", kr.skipped)
	return true
}

// refreshForUnknownKid forces a refresh when a token names a kid the set
// does not have, and waits for it until it ends, ctx ends or unknownKidWait
// passes, whichever comes first.
//
// An attacker can send made-up kids at will, so:
//   - the refresh runs on the key set's context, not the client's: a client
//     that stops waiting does not stop the fetch, and the next real token
//     signed with a rotated key finds it installed;
//   - one refresh at a time, shared by every request that arrives while it
//     runs (single flight), and at most maxUnknownKidWaiters wait on it;
//   - after a refresh that worked, the next may start only minRefreshGap
//     later: random kids must not turn this service into a load generator
//     against the identity provider. The gap counts from completion, and
//     only forced refreshes count (the periodic loop has its own cadence);
//     within the gap an unknown kid is refused at once, without waiting;
//   - after one that failed, the next may start sooner (failureBackoff), so
//     a blip does not keep a rotated key out for the full gap.
func (ks *keySet) refreshForUnknownKid(ctx context.Context) {
	done := ks.startForcedRefresh()
	if done == nil {
		return
	}
	if ks.waiters.Add(1) > maxUnknownKidWaiters {
		ks.waiters.Add(-1)
		return
	}
	defer ks.waiters.Add(-1)
	timer := time.NewTimer(unknownKidWait)
	defer timer.Stop()
	select {
	case <-done:
	case <-ctx.Done():
	case <-timer.C:
	}
}

// startForcedRefresh starts a forced refresh, or joins the one in flight,
// and returns the channel closed when it ends; nil when none may start now.
func (ks *keySet) startForcedRefresh() chan struct{} {
	ks.forcedMu.Lock()
	defer ks.forcedMu.Unlock()
	if ks.forced != nil {
		return ks.forced
	}
	if ks.bg.Err() != nil || ks.now().Before(ks.nextForced) {
		return nil
	}
	done := make(chan struct{})
	ks.forced = done
	ks.forcedWG.Add(1)
	go ks.runForcedRefresh(done)
	return done
}

func (ks *keySet) runForcedRefresh(done chan struct{}) {
	defer ks.forcedWG.Done()
	ok := ks.refresh(ks.bg, "unknown_kid")
	ks.forcedMu.Lock()
	if ok {
		ks.forcedFailures = 0
		ks.nextForced = ks.now().Add(ks.cfg.minRefreshGap)
	} else {
		ks.forcedFailures++
		ks.nextForced = ks.now().Add(failureBackoff(ks.cfg.minRefreshGap, ks.forcedFailures))
	}
	ks.forced = nil
	ks.forcedMu.Unlock()
	close(done)
}

// failureBackoff is how long after the n-th consecutive failed forced
// refresh the next may start: a tenth of the gap, doubling, capped at the
// gap (0.5 s, 1 s, 2 s, 4 s, then 5 s with the default 5 s). The first retry
// comes soon, because a single failure is usually a blip (a reset
// connection, an identity-provider pod restarting) and a user with a token
// from a rotated key is waiting on it; an identity provider that stays down
// is back at the normal rate of one forced fetch per gap after four
// failures, so random kids can add at most a handful of extra fetches to
// an outage.
func failureBackoff(gap time.Duration, n int) time.Duration {
	d := gap / 10
	for i := 1; i < n && d < gap; i++ {
		d *= 2
	}
	return min(d, gap)
}

func fetchJWKS(ctx context.Context, client *http.Client, rawURL string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch jwks: %w", redactURLError(err))
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch jwks: %w", redactURLError(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch jwks: status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("fetch jwks: %w", redactURLError(err))
	}
	if len(body) > maxJWKSBytes {
		return nil, errors.New("fetch jwks: body over 1 MiB")
	}
	return body, nil
}

// redactURLError rebuilds the *url.Error that net/http returns with the URL
// redacted. Its URL is the request's (net/http hides only the password, not
// the user name or the query string, where some identity providers put an
// API key) or, for a refused redirect, the raw Location header. Done here,
// where the error is made, so no caller can log the raw form.
func redactURLError(err error) error {
	ue, ok := err.(*url.Error)
	if !ok {
		return err
	}
	inner := ue.Err
	if strings.HasPrefix(inner.Error(), "failed to parse Location header") {
		// net/http quotes the raw Location (twice, with the parse error)
		// in the message of this one error: say what failed, not the value.
		inner = errors.New("failed to parse the redirect's Location header")
	}
	return &url.Error{Op: ue.Op, URL: redactedJWKSURL(ue.URL), Err: inner}
}

// sameOriginRedirect follows a JWKS redirect only within the origin (scheme,
// host, port) of JWKS_URL. A redirect elsewhere would let whoever controls
// the first hop, or an open redirect at the identity provider, choose the
// keys this service trusts; one from https to http would hand that choice to
// anyone on the network path.
func sameOriginRedirect(req *http.Request, via []*http.Request) error {
	if len(via) > maxJWKSRedirects {
		return fmt.Errorf("jwks redirect refused: more than %d redirects", maxJWKSRedirects)
	}
	from, to := via[0].URL, req.URL
	if strings.EqualFold(from.Scheme, "https") && !strings.EqualFold(to.Scheme, "https") {
		return fmt.Errorf("jwks redirect refused: from https to %s", to.Scheme)
	}
	if origin(to) != origin(from) {
		return fmt.Errorf("jwks redirect refused: %s is another origin than %s", origin(to), origin(from))
	}
	return nil
}

// origin is scheme://host:port with the default port spelled out, so
// https://idp and https://idp:443 are the same origin. It holds no
// user-info, path or query: it is safe in a log line.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[scheme]
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read jwks file: %w", err)
	}
	defer f.Close()
	body, err := io.ReadAll(io.LimitReader(f, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read jwks file: %w", err)
	}
	if len(body) > maxJWKSBytes {
		return nil, errors.New("read jwks file: over 1 MiB")
	}
	return body, nil
}

// verifyKey is a public key with the algorithms it may verify. Raw crypto
// keys are extracted once per refresh, not once per request.
type verifyKey struct {
	raw  any
	algs []jwa.SignatureAlgorithm
	// thumb is the RFC 7638 thumbprint of the key material: a key replaced
	// under the same kid has another one, so a stream verified by the old
	// key can tell (stillTrusts).
	thumb keyThumb
}

type keyThumb [32]byte

type keyring struct {
	byKid   map[string]verifyKey
	skipped int
	// replaced is closed when a newer set takes this one's place, so an open
	// event stream learns at once that the key behind its token may be gone.
	replaced chan struct{}
}

// parseKeyring turns a JWK Set into the keys this service will use. A key
// without kid, meant for encryption, symmetric, or of an unsupported type
// or size is skipped, never an error: one odd key must not hide the rest.
func parseKeyring(raw []byte) (*keyring, error) {
	set, err := jwk.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parse jwks: %w", err)
	}
	kr := &keyring{byKid: make(map[string]verifyKey, set.Len()), replaced: make(chan struct{})}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		vk, ok := usableKey(k)
		if _, dup := kr.byKid[k.KeyID()]; !ok || dup {
			kr.skipped++
			continue
		}
		kr.byKid[k.KeyID()] = vk
	}
	if len(kr.byKid) == 0 {
		return nil, fmt.Errorf("parse jwks: no usable signing keys among %d", set.Len())
	}
	return kr, nil
}

var rsaAlgs = []jwa.SignatureAlgorithm{jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512}

func usableKey(k jwk.Key) (verifyKey, bool) {
	if k.KeyID() == "" {
		return verifyKey{}, false
	}
	if use := k.KeyUsage(); use != "" && use != string(jwk.ForSignature) {
		return verifyKey{}, false
	}
	pub, err := jwk.PublicRawKeyOf(k)
	if err != nil {
		return verifyKey{}, false
	}
	algs := keyTypeAlgs(pub)
	if len(algs) == 0 {
		return verifyKey{}, false
	}
	// A key's own "alg" narrows its type's algorithms to that one.
	if a := k.Algorithm().String(); a != "" {
		if !algIn(jwa.SignatureAlgorithm(a), algs) {
			return verifyKey{}, false
		}
		algs = []jwa.SignatureAlgorithm{jwa.SignatureAlgorithm(a)}
	}
	sum, err := k.Thumbprint(crypto.SHA256)
	if err != nil || len(sum) != len(keyThumb{}) {
		return verifyKey{}, false
	}
	return verifyKey{raw: pub, algs: algs, thumb: keyThumb(sum)}, true
}

// keyTypeAlgs is the algorithms a public key of this type and size can
// verify; none for anything else. Nothing here can ever yield HS* or none.
func keyTypeAlgs(pub any) []jwa.SignatureAlgorithm {
	switch pk := pub.(type) {
	case *rsa.PublicKey:
		if pk.N.BitLen() >= 2048 {
			return rsaAlgs
		}
	case *ecdsa.PublicKey:
		switch pk.Curve {
		case elliptic.P256():
			return []jwa.SignatureAlgorithm{jwa.ES256}
		case elliptic.P384():
			return []jwa.SignatureAlgorithm{jwa.ES384}
		case elliptic.P521():
			return []jwa.SignatureAlgorithm{jwa.ES512}
		}
	case ed25519.PublicKey:
		return []jwa.SignatureAlgorithm{jwa.EdDSA}
	}
	return nil
}

func algIn(alg jwa.SignatureAlgorithm, algs []jwa.SignatureAlgorithm) bool {
	for _, a := range algs {
		if a == alg {
			return true
		}
	}
	return false
}
