package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Why a reason: each one is a metrics label and a log field, so the set is
// closed and small.
type rejectReason int

const (
	reasonMissing rejectReason = iota
	reasonMalformed
	reasonUnknownKey
	reasonBadSignature
	reasonExpired
	reasonClaims
	numReasons
)

var reasonNames = [numReasons]string{"missing", "malformed", "unknown_key", "bad_signature", "expired", "claims"}

func (r rejectReason) String() string { return reasonNames[r] }

// authError is a refused credential. detail is safe to show the caller: it
// never contains the token or key material.
type authError struct {
	reason rejectReason
	detail string
}

func (e *authError) Error() string { return e.reason.String() + ": " + e.detail }

func reject(reason rejectReason, detail string) *authError {
	return &authError{reason: reason, detail: detail}
}

// errNoKeys means verification cannot even start: the service answers 503,
// not 401, because the caller's token may well be fine.
var errNoKeys = errors.New("no verification keys loaded yet")

const maxAuthHeader = 8 << 10

// authConfig is the part of the configuration the verifier needs.
type authConfig struct {
	jwksURL   string
	jwksFile  string
	issuer    string
	audience  string
	userClaim string
	leeway    time.Duration

	// refreshEvery is the background refresh cadence; minRefreshGap limits the
	// refreshes that unknown kids may force (random kids must not turn this
	// service into a load generator against the identity provider).
	refreshEvery  time.Duration
	minRefreshGap time.Duration

	// transport carries the JWKS fetches; nil means http.DefaultTransport.
	// Only tests set it, to trust an httptest TLS server's certificate.
	transport http.RoundTripper
}

// fetchTimeout bounds one JWKS load, background or forced: an identity
// provider that accepts the connection and never answers must not hold the
// refresh (and the requests waiting on a forced one) for long.
const fetchTimeout = 5 * time.Second

// maxJWKSRedirects is how many same-origin redirects a fetch follows.
const maxJWKSRedirects = 5

// Verifier checks bearer tokens against a JWK Set it keeps fresh in the
// background. The set is swapped atomically, so verification never waits on a
// fetch except when a token names a kid the service has not seen.
type Verifier struct {
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
	// cannot cancel a fetch other requests depend on.
	bg             context.Context
	stopBackground context.CancelFunc
	done           chan struct{}

	// The forced refresh for unknown kids (refreshForUnknownKid): at most one
	// in flight, shared by every request waiting on it.
	forcedMu       sync.Mutex
	forced         chan struct{} // closed when the refresh in flight ends; nil when none
	nextForced     time.Time     // earliest start of the next forced refresh
	forcedFailures int           // consecutive failed forced refreshes
	forcedWG       sync.WaitGroup

	rejections    [numReasons]atomic.Int64
	refreshOK     atomic.Int64
	refreshFailed atomic.Int64

	// tokens skips the signature check for a token already verified by the
	// current key set (tokencache.go); nil disables it.
	tokens *tokenCache
}

// NewVerifier starts the background key refresh; Close stops it.
func NewVerifier(cfg authConfig, logger *slog.Logger) *Verifier {
	if cfg.refreshEvery <= 0 {
		cfg.refreshEvery = 60 * time.Second
	}
	if cfg.minRefreshGap <= 0 {
		cfg.minRefreshGap = 5 * time.Second
	}
	if cfg.userClaim == "" {
		cfg.userClaim = "sub"
	}
	v := &Verifier{cfg: cfg, logger: logger, now: time.Now, done: make(chan struct{}), tokens: newTokenCache(maxCachedTokens)}
	if cfg.jwksFile != "" {
		v.source = "JWKS_FILE=" + cfg.jwksFile
		v.load = func(context.Context) ([]byte, error) { return readLimited(cfg.jwksFile) }
	} else {
		v.source = "JWKS_URL=" + redactedJWKSURL(cfg.jwksURL)
		if u, err := url.Parse(cfg.jwksURL); err == nil && strings.EqualFold(u.Scheme, "http") {
			// Said once, here: the keys decide who is who, and over plain
			// http anyone on the path can substitute their own.
			logger.Warn("JWKS_URL is plain http: anyone on the network path can substitute the keys and forge tokens; use https",
				"source", v.source)
		}
		client := &http.Client{Timeout: fetchTimeout, Transport: cfg.transport, CheckRedirect: sameOriginRedirect}
		v.load = func(ctx context.Context) ([]byte, error) { return fetchJWKS(ctx, client, cfg.jwksURL) }
	}
	v.bg, v.stopBackground = context.WithCancel(context.Background())
	go v.refreshLoop(v.bg)
	return v
}

// Close stops the background refresh and any forced refresh in flight, and
// waits for them to finish.
func (v *Verifier) Close() {
	// Under forcedMu, so no forced refresh can start once Close has begun.
	v.forcedMu.Lock()
	v.stopBackground()
	v.forcedMu.Unlock()
	<-v.done
	v.forcedWG.Wait()
}

// Ready reports whether a key set has been loaded.
func (v *Verifier) Ready() bool { return v.keys.Load() != nil }

// KeyCount is the number of usable verification keys.
func (v *Verifier) KeyCount() int {
	if kr := v.keys.Load(); kr != nil {
		return len(kr.byKid)
	}
	return 0
}

// refreshLoop polls fast until the first set arrives (readiness waits on it),
// then settles to refreshEvery. A failed refresh keeps the last good keys: an
// identity-provider outage must not log every cardholder out.
func (v *Verifier) refreshLoop(ctx context.Context) {
	defer close(v.done)
	retry := 250 * time.Millisecond
	for {
		v.refresh(ctx, "schedule")
		wait := v.cfg.refreshEvery
		if !v.Ready() {
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
func (v *Verifier) refresh(ctx context.Context, cause string) bool {
	v.refreshMu.Lock()
	defer v.refreshMu.Unlock()
	// The timeout starts once the lock is held: time spent queued behind
	// another load must not eat this one's budget.
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	raw, err := v.load(ctx)
	if err == nil && v.Ready() && bytes.Equal(raw, v.lastRaw) {
		v.refreshOK.Add(1)
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
		if v.bg.Err() == nil {
			v.logger.Warn("jwks refresh failed; keeping the last good keys",
				"source", v.source, "cause", cause, "error", err.Error(), "keys", v.KeyCount())
		}
		v.refreshFailed.Add(1)
		return false
	}
	v.refreshOK.Add(1)
	v.lastRaw = raw
	if old := v.keys.Swap(kr); old != nil {
		close(old.replaced)
	}
	v.logger.Info("jwks loaded", "source", v.source, "cause", cause, "keys", len(kr.byKid), "skipped", kr.skipped)
	return true
}

// refreshForUnknownKid forces a refresh when a token names a kid the set
// does not have, and waits for it until ctx ends.
//
// An attacker can send made-up kids at will, so:
//   - the refresh runs on the verifier's context, not the client's: a client
//     that disconnects stops waiting, the fetch goes on, and the next real
//     token signed with a rotated key finds it installed;
//   - one refresh at a time, shared by every request that arrives while it
//     runs (single flight);
//   - after a refresh that worked, the next may start only minRefreshGap
//     later: random kids must not turn this service into a load generator
//     against the identity provider. The gap counts from completion, and
//     only forced refreshes count (the periodic loop has its own cadence);
//   - after one that failed, the next may start sooner (failureBackoff), so
//     a blip does not keep a rotated key out for the full gap.
func (v *Verifier) refreshForUnknownKid(ctx context.Context) {
	v.forcedMu.Lock()
	done := v.forced
	if done == nil {
		if v.bg.Err() != nil || v.now().Before(v.nextForced) {
			v.forcedMu.Unlock()
			return
		}
		done = make(chan struct{})
		v.forced = done
		v.forcedWG.Add(1)
		go v.runForcedRefresh(done)
	}
	v.forcedMu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

func (v *Verifier) runForcedRefresh(done chan struct{}) {
	defer v.forcedWG.Done()
	ok := v.refresh(v.bg, "unknown_kid")
	v.forcedMu.Lock()
	if ok {
		v.forcedFailures = 0
		v.nextForced = v.now().Add(v.cfg.minRefreshGap)
	} else {
		v.forcedFailures++
		v.nextForced = v.now().Add(failureBackoff(v.cfg.minRefreshGap, v.forcedFailures))
	}
	v.forced = nil
	v.forcedMu.Unlock()
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

const maxJWKSBytes = 1 << 20

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
}

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
	// The algorithms each key type can verify; a key's own "alg" narrows
	// this to one, and a key without "alg" gets the ones its type implies.
	// Nothing here can ever yield HS* or none.
	var algs []jwa.SignatureAlgorithm
	switch pk := pub.(type) {
	case *rsa.PublicKey:
		if pk.N.BitLen() < 2048 {
			return verifyKey{}, false
		}
		algs = rsaAlgs
	case *ecdsa.PublicKey:
		switch pk.Curve {
		case elliptic.P256():
			algs = []jwa.SignatureAlgorithm{jwa.ES256}
		case elliptic.P384():
			algs = []jwa.SignatureAlgorithm{jwa.ES384}
		case elliptic.P521():
			algs = []jwa.SignatureAlgorithm{jwa.ES512}
		}
	case ed25519.PublicKey:
		algs = []jwa.SignatureAlgorithm{jwa.EdDSA}
	}
	if len(algs) == 0 {
		return verifyKey{}, false
	}
	if a := k.Algorithm().String(); a != "" {
		for _, ok := range algs {
			if ok.String() == a {
				return verifyKey{raw: pub, algs: []jwa.SignatureAlgorithm{ok}}, true
			}
		}
		return verifyKey{}, false
	}
	return verifyKey{raw: pub, algs: algs}, true
}

// joseHeader holds the header fields this service acts on. Keys named by the
// token itself (jku, x5u, jwk, x5c) are deliberately absent: they are never
// fetched or trusted, only the configured set is.
type joseHeader struct {
	Alg  string          `json:"alg"`
	Kid  string          `json:"kid"`
	Crit json.RawMessage `json:"crit"`
	B64  json.RawMessage `json:"b64"`
}

// principal is who a verified token speaks for, and what bounds its life: a
// long-lived event stream must end when exp passes or when the key that
// verified the token leaves the set.
type principal struct {
	userID int64
	kid    string
	exp    time.Time // the token's exp claim, leeway not included
}

// Verify returns the user id of a valid token. Errors are *authError (401)
// or errNoKeys (503).
func (v *Verifier) Verify(ctx context.Context, token string) (int64, error) {
	p, err := v.verify(ctx, token)
	return p.userID, err
}

// verify checks a token and returns its principal.
func (v *Verifier) verify(ctx context.Context, token string) (principal, error) {
	kr := v.keys.Load()
	if kr == nil {
		return principal{}, errNoKeys
	}
	sum := tokenSum(token)
	if p, ok := v.tokens.get(sum, kr, v.now()); ok {
		return p, nil
	}
	p, err := v.verifyUncached(ctx, kr, token)
	if err != nil {
		return principal{}, err
	}
	v.tokens.put(sum, kr, p, v.now())
	return p, nil
}

func (v *Verifier) verifyUncached(ctx context.Context, kr *keyring, token string) (principal, error) {
	headerPart, ok := compactHeader(token)
	if !ok {
		return principal{}, reject(reasonMalformed, "the token is not a compact JWS")
	}
	var hdr joseHeader
	if err := decodeSegment(headerPart, &hdr); err != nil {
		return principal{}, reject(reasonMalformed, "the token header is not valid")
	}
	// RFC 7515 §4.1.11: an unknown critical extension must be refused, and
	// this service understands none (b64=false would change what is signed).
	if len(hdr.Crit) > 0 || len(hdr.B64) > 0 {
		return principal{}, reject(reasonMalformed, "the token uses an unsupported header extension")
	}
	if !allowedAlg(hdr.Alg) {
		return principal{}, reject(reasonBadSignature, "the token algorithm is not accepted")
	}
	if hdr.Kid == "" {
		return principal{}, reject(reasonUnknownKey, "the token names no key id")
	}
	key, found := kr.byKid[hdr.Kid]
	if !found {
		v.refreshForUnknownKid(ctx)
		kr = v.keys.Load()
		if key, found = kr.byKid[hdr.Kid]; !found {
			return principal{}, reject(reasonUnknownKey, "the token was signed by an unknown key")
		}
	}
	alg := jwa.SignatureAlgorithm(hdr.Alg)
	if !algIn(alg, key.algs) {
		return principal{}, reject(reasonBadSignature, "the token algorithm does not match its key")
	}
	payload, err := jws.Verify([]byte(token), jws.WithKey(alg, key.raw), jws.WithCompact())
	if err != nil {
		return principal{}, reject(reasonBadSignature, "the token signature is not valid")
	}
	uid, exp, err := v.checkClaims(payload)
	if err != nil {
		return principal{}, err
	}
	return principal{userID: uid, kid: hdr.Kid, exp: numericDateTime(exp)}, nil
}

// numericDateTime turns checkClaims' NumericDate seconds into a time.
func numericDateTime(secs float64) time.Time {
	whole := math.Floor(secs)
	return time.Unix(int64(whole), int64((secs-whole)*1e9))
}

// hasKey reports whether kid is in the key set in use now.
func (v *Verifier) hasKey(kid string) bool {
	kr := v.keys.Load()
	if kr == nil {
		return false
	}
	_, ok := kr.byKid[kid]
	return ok
}

// keysChanged returns a channel closed at the next key-set swap. Take it
// before calling hasKey, so a swap between the two calls is never missed.
// Before the first set is loaded it returns nil (never closed).
func (v *Verifier) keysChanged() <-chan struct{} {
	if kr := v.keys.Load(); kr != nil {
		return kr.replaced
	}
	return nil
}

// compactHeader accepts only the compact serialization: three base64url
// segments. The JSON serialization (several signatures, unprotected headers)
// and JWE (five segments) never reach the verifier.
func compactHeader(token string) (string, bool) {
	dots := 0
	for i := 0; i < len(token); i++ {
		c := token[i]
		switch {
		case c == '.':
			dots++
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return "", false
		}
	}
	if dots != 2 {
		return "", false
	}
	header, _, _ := strings.Cut(token, ".")
	return header, header != ""
}

func allowedAlg(alg string) bool {
	switch jwa.SignatureAlgorithm(alg) {
	case jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512,
		jwa.ES256, jwa.ES384, jwa.ES512, jwa.EdDSA:
		return true
	}
	return false
}

func algIn(alg jwa.SignatureAlgorithm, algs []jwa.SignatureAlgorithm) bool {
	for _, a := range algs {
		if a == alg {
			return true
		}
	}
	return false
}

func decodeSegment(seg string, dst any) error {
	raw, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, dst)
}

// maxNumericDate is 9999-12-31T23:59:59Z: a larger exp is not a date but an
// attempt at a token that never expires.
const maxNumericDate = 253402300799

// checkClaims validates the registered claims and extracts the user id (and
// exp, for the token cache) from the raw payload. Numbers are read as text, so a user id above 2^53 can
// never turn into a neighbouring user's id the way float64 decoding would.
func (v *Verifier) checkClaims(payload []byte) (userID int64, exp float64, err error) {
	claims, err := decodeClaims(payload)
	if err != nil {
		return 0, 0, reject(reasonClaims, err.Error())
	}
	now := float64(v.now().UnixNano()) / 1e9
	leeway := v.cfg.leeway.Seconds()

	exp, present, err := numericDate(claims["exp"])
	switch {
	case err != nil:
		return 0, 0, reject(reasonClaims, "exp is not a valid date")
	case !present:
		return 0, 0, reject(reasonClaims, "exp is required")
	case now > exp+leeway:
		return 0, 0, reject(reasonExpired, "the token has expired")
	}
	for _, name := range [...]string{"nbf", "iat"} {
		t, present, err := numericDate(claims[name])
		if err != nil {
			return 0, 0, reject(reasonClaims, name+" is not a valid date")
		}
		if present && t > now+leeway {
			return 0, 0, reject(reasonClaims, name+" is in the future")
		}
	}
	var iss string
	if raw, ok := claims["iss"]; !ok || json.Unmarshal(raw, &iss) != nil || iss != v.cfg.issuer {
		return 0, 0, reject(reasonClaims, "the token issuer is not accepted")
	}
	if v.cfg.audience != "" && !audienceContains(claims["aud"], v.cfg.audience) {
		return 0, 0, reject(reasonClaims, "the token audience is not accepted")
	}
	uid, ok := parseUserID(claims[v.cfg.userClaim])
	if !ok {
		return 0, 0, reject(reasonClaims, "the token's user claim is not a positive integer id")
	}
	return uid, exp, nil
}

// decodeClaims splits the payload into its top-level members and refuses a
// repeated member name: parsers disagree on which duplicate wins, and that
// disagreement is an attack surface (RFC 8725 §3.9 spirit, RFC 7519 §4).
func decodeClaims(payload []byte) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("the token claims are not a JSON object")
	}
	claims := make(map[string]json.RawMessage, 8)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, errors.New("the token claims are not valid JSON")
		}
		name, _ := tok.(string)
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return nil, errors.New("the token claims are not valid JSON")
		}
		if _, dup := claims[name]; dup {
			return nil, errors.New("the token repeats a claim")
		}
		claims[name] = val
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, errors.New("the token claims are not valid JSON")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("the token claims have trailing data")
	}
	return claims, nil
}

// numericDate reads an RFC 7519 NumericDate: a JSON number of seconds. A
// string, a negative or an absurdly large value is an error, not a date.
func numericDate(raw json.RawMessage) (float64, bool, error) {
	if raw == nil {
		return 0, false, nil
	}
	s := string(raw)
	if s == "" || !(s[0] >= '0' && s[0] <= '9') {
		return 0, true, errors.New("not a non-negative number")
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || f > maxNumericDate {
		return 0, true, errors.New("not a date")
	}
	return f, true, nil
}

func audienceContains(raw json.RawMessage, want string) bool {
	if raw == nil {
		return false
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return one == want
	}
	var many []string
	if json.Unmarshal(raw, &many) != nil {
		return false
	}
	for _, a := range many {
		if a == want {
			return true
		}
	}
	return false
}

// parseUserID accepts a positive int64 as a JSON integer literal (42) or a
// decimal string ("42"): digits only, no sign, exponent, fraction, spaces or
// leading zeros, so exactly one spelling maps to each user.
func parseUserID(raw json.RawMessage) (int64, bool) {
	s := string(raw)
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		s = s[1 : len(s)-1]
	}
	if s == "" || len(s) > 19 || s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, false
	}
	return id, true
}

type ctxKey int

const principalKey ctxKey = 0

// userFromContext returns the verified user id the middleware stored.
func userFromContext(ctx context.Context) (int64, bool) {
	p, ok := principalFromContext(ctx)
	return p.userID, ok
}

// principalFromContext returns the verified principal the middleware stored.
func principalFromContext(ctx context.Context) (principal, bool) {
	p, ok := ctx.Value(principalKey).(principal)
	return p, ok
}

const bearerRealm = `Bearer realm="threeds-records"`

// Middleware admits only requests with a valid bearer token in the
// Authorization header and hands the user id to next through the context.
// Tokens in the query string or cookies are never looked at (RFC 6750 §5.3).
func (v *Verifier) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		info := requestInfoFrom(r.Context())
		start := time.Now()
		p, err := v.authenticate(r)
		info.authDur = time.Since(start)
		if err != nil {
			v.refuse(w, r, err)
			return
		}
		info.userID = p.userID
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey, p)))
	})
}

func (v *Verifier) authenticate(r *http.Request) (principal, error) {
	values := r.Header.Values("Authorization")
	if len(values) == 0 {
		return principal{}, reject(reasonMissing, "send an Authorization: Bearer <token> header")
	}
	if len(values) > 1 {
		return principal{}, reject(reasonMalformed, "send exactly one Authorization header")
	}
	h := values[0]
	if len(h) > maxAuthHeader {
		return principal{}, reject(reasonMalformed, "the Authorization header is over 8 KiB")
	}
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return principal{}, reject(reasonMalformed, "the Authorization scheme must be Bearer")
	}
	token = strings.TrimLeft(token, " ")
	if token == "" {
		return principal{}, reject(reasonMalformed, "the bearer token is empty")
	}
	return v.verify(r.Context(), token)
}

func (v *Verifier) refuse(w http.ResponseWriter, r *http.Request, err error) {
	var ae *authError
	if !errors.As(err, &ae) {
		writeError(w, r, http.StatusServiceUnavailable, "unavailable",
			"the service is starting and cannot verify tokens yet; retry shortly")
		return
	}
	v.rejections[ae.reason].Add(1)
	requestInfoFrom(r.Context()).authReject = ae.reason.String()
	if ae.reason == reasonMissing {
		w.Header().Set("WWW-Authenticate", bearerRealm)
		writeError(w, r, http.StatusUnauthorized, "missing_token", ae.detail)
		return
	}
	w.Header().Set("WWW-Authenticate", bearerRealm+`, error="invalid_token", error_description="`+ae.detail+`"`)
	writeError(w, r, http.StatusUnauthorized, "invalid_token", ae.detail)
}
