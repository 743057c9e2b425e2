package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// slowIdentityProvider serves keys at once on the first fetch and takes
// delay over every later one: the provider of issue 15.
func slowIdentityProvider(t testing.TB, delay time.Duration, body []byte) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var fetches atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fetches.Add(1) > 1 {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv, &fetches
}

// randomKidToken names a kid no identity provider ever published; its
// signature is junk, since the kid lookup comes before any signature check.
func randomKidToken() string {
	kid := make([]byte, 8)
	_, _ = rand.Read(kid)
	sig := make([]byte, 64)
	_, _ = rand.Read(sig)
	now := time.Now().Unix()
	return unsignedToken(
		fmt.Appendf(nil, `{"alg":"ES256","typ":"JWT","kid":%q}`, hex.EncodeToString(kid)),
		fmt.Appendf(nil, `{"iss":%q,"aud":%q,"sub":"666","exp":%d}`, testIssuer, testAudience, now+600),
		sig)
}

// timedGet sends one GET and returns its status and how long it took.
func timedGet(client *http.Client, url, token string) (int, time.Duration, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, time.Since(start), err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, time.Since(start), nil
}

// percentile is the q-quantile of durations (nearest rank).
func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.999999) - 1
	return s[max(i, 0)]
}

// Issue 15. An identity provider that takes 4.5 s per JWKS fetch and 80
// clients sending tokens that name random kids to the list route (16 more to
// the event route), beside a real user asking for a page every 20 ms. Before the fix each random-kid
// request waited for the forced refresh (up to 5 s fetch + 5 s queued)
// holding a MAX_IN_FLIGHT place, and the user got 503s for seconds at a
// time. Contract §4: the wait is at most 1 s and the flood costs valid
// tokens nothing.
func TestARandomKidFloodUnderASlowIdentityProviderCostsAValidUserNothing(t *testing.T) {
	const (
		flooders  = 80              // on the list route, more than MAX_IN_FLIGHT
		onEvents  = 16              // and some on the event route, which has no such limit
		flood     = 7 * time.Second // a whole slow fetch and the gap after it
		userEvery = 20 * time.Millisecond
	)
	// Issue 15's figures. The race detector (make test) makes every request
	// several times dearer on the 2 shared cores that serve, flood and
	// measure at once: there the bounds only separate "bounded" from the
	// seconds of the old behaviour, and the figures come from a run without
	// it (docs/reliability.md).
	userP99Max, kidMax := 300*time.Millisecond, 1200*time.Millisecond
	if raceDetector() {
		userP99Max, kidMax = time.Second, 2*time.Second
	}
	key := newTestKey(t, jwa.ES256, "real", 0)
	idp, fetches := slowIdentityProvider(t, 4500*time.Millisecond, jwksJSON(t, key.publicJWK(t, false)))
	v := newTestVerifier(t, testAuthConfig(idp.URL))
	store, pool := newTestStore(t)
	insertRows(t, pool, liveRow(1, 1001))
	ts := httptest.NewServer(newServer(store, v, nil, discardLogger())) // MAX_IN_FLIGHT at its default
	t.Cleanup(ts.Close)
	valid := key.token(t, validClaims(1001))
	// Each client keeps its connections: the test measures the service,
	// not the kernel's supply of ephemeral ports.
	newClient := func(conns int) *http.Client {
		return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conns}}
	}

	ctx, cancel := context.WithTimeout(context.Background(), flood)
	defer cancel()
	var (
		mu         sync.Mutex
		kidLatency []time.Duration
		kidWrong   []string
		wg         sync.WaitGroup
	)
	floodClient := newClient(flooders + onEvents)
	for i := range flooders + onEvents {
		route := "/3ds/my-records"
		if i >= flooders {
			route = "/3ds/my-records/events"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				code, took, err := timedGet(floodClient, ts.URL+route, randomKidToken())
				mu.Lock()
				kidLatency = append(kidLatency, took)
				if err != nil || code != http.StatusUnauthorized {
					kidWrong = append(kidWrong, fmt.Sprintf("%s: %d %v after %s", route, code, err, took))
				}
				mu.Unlock()
			}
		}()
	}

	userClient := newClient(1)
	var userLatency []time.Duration
	var userWrong []string
	tick := time.NewTicker(userEvery)
	defer tick.Stop()
	for ctx.Err() == nil {
		code, took, err := timedGet(userClient, ts.URL+"/3ds/my-records", valid)
		userLatency = append(userLatency, took)
		if err != nil || code != http.StatusOK {
			userWrong = append(userWrong, fmt.Sprintf("%d %v after %s", code, err, took))
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	wg.Wait()

	t.Logf("%d JWKS fetches; valid user: %d requests, p50 %s, p99 %s, max %s; random kids: %d requests, p50 %s, p99 %s, max %s",
		fetches.Load(), len(userLatency), percentile(userLatency, 0.5), percentile(userLatency, 0.99), slices.Max(userLatency),
		len(kidLatency), percentile(kidLatency, 0.5), percentile(kidLatency, 0.99), slices.Max(kidLatency))
	if fetches.Load() < 2 {
		t.Fatal("the flood forced no fetch from the slow identity provider: the test tested nothing")
	}
	if len(userWrong) > 0 {
		t.Errorf("the valid user got %d of %d answers other than 200, first: %s", len(userWrong), len(userLatency), userWrong[0])
	}
	if p99 := percentile(userLatency, 0.99); p99 > userP99Max {
		t.Errorf("the valid user's p99 is %s, want at most %s", p99, userP99Max)
	}
	if len(kidWrong) > 0 {
		t.Errorf("%d of %d random-kid requests were not a 401, first: %s", len(kidWrong), len(kidLatency), kidWrong[0])
	}
	if worst := slices.Max(kidLatency); worst > kidMax {
		t.Errorf("the slowest random-kid request took %s, want at most %s", worst, kidMax)
	}
}

// Issue 14 ("smaller"), contract §6: a stream ends key_removed when the key
// that verified its token leaves the set or its key material changes under
// the same kid. Before, only the kid was compared, and a key replaced under
// its kid left the stream of the old key's token open.
func TestAStreamEndsWithKeyRemovedWhenItsKeyIsReplacedUnderTheSameKid(t *testing.T) {
	key := newTestKey(t, jwa.ES256, "key-a", 0)
	svc := newStreamService(t, streamOptions{
		keys: []testKey{key},
		auth: func(c *authConfig) { c.refreshEvery = 200 * time.Millisecond },
	})
	stream, _ := mustOpenStream(t, svc.URL, key.token(t, validClaims(1001)))

	// The same key published differently (without "alg") is a new set with
	// the same key material: the stream lives on.
	changed := svc.srv.verifier.keysChanged()
	svc.jwks.setKeys(t, key.publicJWK(t, true))
	waitFor(t, 5*time.Second, "the republished set", func() bool {
		select {
		case <-changed:
			return true
		default:
			return false
		}
	})
	stream.quiet(t, 500*time.Millisecond)

	replacement := newTestKey(t, jwa.ES256, "key-a", 0) // a fresh P-256 key under the same kid
	svc.jwks.setKeys(t, replacement.publicJWK(t, false))
	if reason, _ := stream.end(t, 10*time.Second); reason != "key_removed" {
		t.Fatalf("the stream of the replaced key ended with %q, want key_removed", reason)
	}
	// A token from the replacement opens a stream as usual.
	mustOpenStream(t, svc.URL, replacement.token(t, validClaims(1001)))
}

// An unknown kid waits for the forced refresh at most unknownKidWait, and at
// most maxUnknownKidWaiters wait at once (the rest are refused at once);
// the fetch they started goes on without them and installs the rotated key.
// Before, every one of them waited for the fetch itself, up to its timeout.
func TestUnknownKidsWaitAtMostASecondAndNoMoreThanTheCapAtOnce(t *testing.T) {
	f := newRotationFixture(t, time.Second)
	release := f.idp.hold() // the identity provider does not answer for now
	t.Cleanup(release)
	before := f.idp.hits.Load()
	token := f.rotated.token(t, validClaims("42")) // its kid is not published yet

	type answer struct {
		code int
		took time.Duration
	}
	const n = maxUnknownKidWaiters + 100
	answers := make(chan answer, n)
	for range n {
		go func() {
			start := time.Now()
			code := callWith(f.v, "/", "Bearer "+token).Code
			answers <- answer{code, time.Since(start)}
		}()
	}
	var atOnce int
	var slowest time.Duration
	for range n {
		select {
		case a := <-answers:
			if a.code != http.StatusUnauthorized {
				t.Fatalf("a request naming an unknown kid got %d, want 401", a.code)
			}
			if a.took < unknownKidWait/2 {
				atOnce++
			}
			slowest = max(slowest, a.took)
		case <-time.After(10 * time.Second):
			t.Fatal("a request naming an unknown kid never returned")
		}
	}
	t.Logf("%d requests: %d refused at once, the slowest after %s", n, atOnce, slowest.Round(time.Millisecond))
	// The wait itself is unknownKidWait; the margin is for a thousand
	// waiters answered at the same instant on a loaded machine.
	if slowest > 2*unknownKidWait {
		t.Errorf("a request waited %s for the forced refresh, want about %s", slowest, unknownKidWait)
	}
	if atOnce < n-maxUnknownKidWaiters {
		t.Errorf("%d requests were refused at once, want at least the %d over the cap of %d waiters", atOnce, n-maxUnknownKidWaiters, maxUnknownKidWaiters)
	}

	// The fetch they started is still held by the identity provider; when
	// it answers, its set is installed without another fetch.
	f.publishRotation(t)
	release()
	waitFor(t, 5*time.Second, "the rotated key from the fetch the waiters started", func() bool {
		return f.v.KeyCount() == 2
	})
	if code := callWith(f.v, "/", "Bearer "+token).Code; code != http.StatusOK {
		t.Errorf("the rotated key's token got %d after the fetch ended, want 200", code)
	}
	if hits := f.idp.hits.Load() - before; hits != 1 {
		t.Errorf("%d JWKS fetches, want 1: the one the first unknown kid started", hits)
	}
}
