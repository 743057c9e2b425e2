// auth.go owns verifying a bearer token and answering HTTP for it: the
// Authorization header (RFC 6750), the header policy jwx leaves open
// (compact only, alg, kid, crit), the signature (jwx's jws.Verify) and the
// registered claims (jwx's jwt.Validate), the checks jwx does not make
// (repeated claims, NumericDate syntax and range, the user id), and the
// 401/503 answers. The key set it
// verifies against is keys.go's; the cache of verified tokens is
// tokencache.go's.
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
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

// Verifier checks bearer tokens against the key set it keeps fresh.
type Verifier struct {
	*keySet

	// claimRules are what jwt.Validate holds every token's registered
	// claims to (exp, nbf, iat with the leeway, issuer, audience); fixed
	// for the life of the process.
	claimRules []jwt.ValidateOption

	rejections [numReasons]atomic.Int64

	// tokens skips the signature check for a token already verified by the
	// current key set (tokencache.go); nil disables it.
	tokens *tokenCache

	// signatureSlots bounds the signature checks that run at once to half
	// the cores (at least one). A check is pure CPU (RS256 with jwx is
	// ~0.1 ms), and a burst of thousands of new tokens (a replica's event
	// streams all reconnecting) otherwise takes every core: thousands of
	// runnable goroutines, behind which the stream source and the writes
	// of new passcodes to open streams wait their turn. Parked here, they
	// leave the other half to the live path (docs/decisions.md).
	signatureSlots chan struct{}
}

// NewVerifier starts the background key refresh; Close stops it.
func NewVerifier(cfg authConfig, logger *slog.Logger) *Verifier {
	if cfg.userClaim == "" {
		cfg.userClaim = "sub"
	}
	v := &Verifier{keySet: newKeySet(cfg, logger), tokens: newTokenCache(maxCachedTokens),
		signatureSlots: make(chan struct{}, signatureSlotsFor(runtime.GOMAXPROCS(0)))}
	v.claimRules = []jwt.ValidateOption{
		jwt.WithIssuer(cfg.issuer),
		jwt.WithAcceptableSkew(cfg.leeway),
		jwt.WithRequiredClaim("exp"),
		jwt.WithClock(jwt.ClockFunc(func() time.Time { return v.now() })),
	}
	if cfg.audience != "" {
		v.claimRules = append(v.claimRules, jwt.WithAudience(cfg.audience))
	}
	return v
}

// signatureSlotsFor is how many signature checks may run at once on procs
// cores: half of them, at least one.
func signatureSlotsFor(procs int) int { return max(1, procs/2) }

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
// verified the token leaves the set or changes under its kid.
type principal struct {
	userID   int64
	kid      string
	keyThumb keyThumb  // the verifying key's thumbprint (keys.go)
	exp      time.Time // the token's exp claim, leeway not included
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
	p, kr, err := v.verifyUncached(ctx, kr, token)
	if err != nil {
		return principal{}, err
	}
	v.tokens.put(sum, kr, p, v.now())
	return p, nil
}

// verifyUncached checks a token in full against kr, the set in use when the
// request began, or the newer one a forced refresh installs; it returns the
// set that verified it.
func (v *Verifier) verifyUncached(ctx context.Context, kr *keyring, token string) (principal, *keyring, error) {
	hdr, err := checkHeader(token)
	if err != nil {
		return principal{}, nil, err
	}
	key, kr, found := v.keyFor(ctx, kr, hdr.Kid)
	if !found {
		return principal{}, nil, reject(reasonUnknownKey, "the token was signed by an unknown key")
	}
	// jws.Verify verifies with the algorithm it is given, whatever the
	// header says: the header's must be one its key allows.
	alg := jwa.SignatureAlgorithm(hdr.Alg)
	if !algIn(alg, key.algs) {
		return principal{}, nil, reject(reasonBadSignature, "the token algorithm does not match its key")
	}
	select {
	case v.signatureSlots <- struct{}{}:
	case <-ctx.Done():
		// The client left while waiting; nobody reads the answer.
		return principal{}, nil, fmt.Errorf("wait for a signature check: %w", ctx.Err())
	}
	payload, err := jws.Verify([]byte(token), jws.WithKey(alg, key.raw), jws.WithCompact())
	<-v.signatureSlots
	if err != nil {
		return principal{}, nil, reject(reasonBadSignature, "the token signature is not valid")
	}
	uid, exp, err := v.checkClaims(payload)
	if err != nil {
		return principal{}, nil, err
	}
	return principal{userID: uid, kid: hdr.Kid, keyThumb: key.thumb, exp: exp}, kr, nil
}

// checkHeader applies the header rules jwx leaves to its caller and returns
// the header. Only the compact serialization is accepted: three base64url
// segments, no padding (the JSON serialization, with several signatures or
// unprotected headers, and JWE never reach jws.Verify).
func checkHeader(token string) (joseHeader, error) {
	var hdr joseHeader
	headerPart, ok := compactHeader(token)
	if !ok {
		return hdr, reject(reasonMalformed, "the token is not a compact JWS")
	}
	if err := decodeSegment(headerPart, &hdr); err != nil {
		return hdr, reject(reasonMalformed, "the token header is not valid")
	}
	// RFC 7515 §4.1.11: an unknown critical extension must be refused, and
	// this service understands none (b64=false would change what is signed,
	// and jwx honours it).
	if len(hdr.Crit) > 0 || len(hdr.B64) > 0 {
		return hdr, reject(reasonMalformed, "the token uses an unsupported header extension")
	}
	// Checked before the key lookup, so none, HS* and the like never force
	// a refresh; keys.go never gives a key these algorithms anyway.
	if !allowedAlg(hdr.Alg) {
		return hdr, reject(reasonBadSignature, "the token algorithm is not accepted")
	}
	if hdr.Kid == "" {
		return hdr, reject(reasonUnknownKey, "the token names no key id")
	}
	return hdr, nil
}

// validationRefusal turns a jwt.Validate error into the caller's 401
// reason. The detail is ours, never jwx's text.
func validationRefusal(err error) *authError {
	switch {
	case errors.Is(err, jwt.ErrTokenExpired()):
		return reject(reasonExpired, "the token has expired")
	case errors.Is(err, jwt.ErrTokenNotYetValid()):
		return reject(reasonClaims, "nbf is in the future")
	case errors.Is(err, jwt.ErrInvalidIssuedAt()):
		return reject(reasonClaims, "iat is in the future")
	case errors.Is(err, jwt.ErrInvalidIssuer()):
		return reject(reasonClaims, "the token issuer is not accepted")
	case errors.Is(err, jwt.ErrInvalidAudience()):
		return reject(reasonClaims, "the token audience is not accepted")
	}
	return reject(reasonClaims, "exp is required")
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

// numericDate reports whether raw is an RFC 7519 NumericDate this service
// accepts: a JSON number of seconds from 0 to maxNumericDate. jwx would
// also take a string ("exp":"1700000000") and any magnitude.
func numericDate(raw json.RawMessage) bool {
	s := string(raw)
	if s == "" || !(s[0] >= '0' && s[0] <= '9') {
		return false
	}
	f, err := strconv.ParseFloat(s, 64)
	return err == nil && !math.IsNaN(f) && f <= maxNumericDate
}

// checkClaims validates the verified payload and returns the user id and
// exp. jwx's jwt.Validate judges the registered claims (exp, nbf, iat with
// the leeway, iss, aud); the payload is decoded here, not by jwt.Parse,
// because jwx would take what the contract refuses (a repeated claim, a
// date as a string or past year 9999) and refuse what it accepts (a
// numeric sub): docs/decisions.md. The user id is read from the raw text,
// so an id above 2^53 never becomes a neighbouring user's the way float64
// decoding would.
func (v *Verifier) checkClaims(payload []byte) (userID int64, exp time.Time, err error) {
	claims, err := decodeClaims(payload)
	if err != nil {
		return 0, exp, reject(reasonClaims, err.Error())
	}
	tok, err := registeredClaims(claims)
	if err != nil {
		return 0, exp, err
	}
	if err := jwt.Validate(tok, v.claimRules...); err != nil {
		return 0, exp, validationRefusal(err)
	}
	uid, ok := parseUserID(claims[v.cfg.userClaim])
	if !ok {
		return 0, exp, reject(reasonClaims, "the token's user claim is not a positive integer id")
	}
	return uid, tok.Expiration(), nil
}

// registeredClaims builds the jwt.Token that jwt.Validate judges from the
// claims it checks, each held to this service's stricter syntax first.
func registeredClaims(claims map[string]json.RawMessage) (jwt.Token, error) {
	tok := jwt.New()
	for _, name := range [...]string{jwt.ExpirationKey, jwt.NotBeforeKey, jwt.IssuedAtKey} {
		raw, present := claims[name]
		if !present {
			continue
		}
		if !numericDate(raw) || tok.Set(name, json.Number(raw)) != nil {
			return nil, reject(reasonClaims, name+" is not a valid date")
		}
	}
	if raw, present := claims[jwt.IssuerKey]; present {
		var iss string
		if json.Unmarshal(raw, &iss) != nil || tok.Set(jwt.IssuerKey, iss) != nil {
			return nil, reject(reasonClaims, "the token issuer is not accepted")
		}
	}
	if raw, present := claims[jwt.AudienceKey]; present {
		var aud any
		if json.Unmarshal(raw, &aud) != nil || tok.Set(jwt.AudienceKey, aud) != nil {
			return nil, reject(reasonClaims, "the token audience is not accepted")
		}
	}
	return tok, nil
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
		if errors.Is(r.Context().Err(), context.Canceled) {
			// The client left while its token waited for a signature
			// check: nobody reads an answer; ServeHTTP logs a 499.
			return
		}
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
