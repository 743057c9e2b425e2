package main

import (
	"crypto/sha256"
	"sync"
	"sync/atomic"
	"time"
)

// maxCachedTokens bounds the cache of verified tokens: about 150 bytes an
// entry (the principal, with its key's 32-byte thumbprint, and the token's
// hash), so at most about 2.5 MiB, and room for every cardholder active
// within a token lifetime on one instance.
const maxCachedTokens = 16384

// tokenCache remembers tokens that passed full verification, so a client
// that sends the same token on every request pays for one signature check
// (an RS256 verification is most of what the service itself spends on a
// request) instead of one per request.
//
// An entry never outlives what a fresh verification would accept:
//   - it expires at the token's exp (before the leeway, so it is stricter
//     than a fresh check, never looser);
//   - it is bound to the key set that verified it: any change of the set
//     (a key removed, rotated or added) makes every entry a miss, and the
//     token is verified from scratch against the new set;
//   - the key is the SHA-256 of the whole token, so a token that differs in
//     any byte (header, claims, signature) is never a hit.
//
// Everything else a verification checks (issuer, audience, user claim,
// accepted algorithms) is fixed for the life of the process, and nbf/iat
// only become easier to satisfy as time passes.
type tokenCache struct {
	mu      sync.RWMutex
	max     int
	entries map[[sha256.Size]byte]cachedToken

	hits, misses atomic.Int64 // for /metrics
}

type cachedToken struct {
	principal
	keys *keyring
}

func newTokenCache(max int) *tokenCache {
	return &tokenCache{max: max, entries: make(map[[sha256.Size]byte]cachedToken)}
}

func tokenSum(token string) [sha256.Size]byte { return sha256.Sum256([]byte(token)) }

// get returns the principal of a token verified against keys (the set in
// use now) that has not expired. A nil cache never hits.
func (c *tokenCache) get(sum [sha256.Size]byte, keys *keyring, now time.Time) (principal, bool) {
	if c == nil {
		return principal{}, false
	}
	c.mu.RLock()
	e, ok := c.entries[sum]
	c.mu.RUnlock()
	if !ok || e.keys != keys || !now.Before(e.exp) {
		c.misses.Add(1)
		return principal{}, false
	}
	c.hits.Add(1)
	return e.principal, true
}

// put remembers a token that keys has just verified, until its exp (already
// checked).
func (c *tokenCache) put(sum [sha256.Size]byte, keys *keyring, p principal, now time.Time) {
	if c == nil || !now.Before(p.exp) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= c.max {
		c.evictLocked(keys, now)
	}
	c.entries[sum] = cachedToken{principal: p, keys: keys}
}

// evictLocked makes room in one sweep, so its cost is shared by the next
// max/4 insertions: first every entry that can no longer hit (expired, or
// verified by a key set that has since been replaced), then arbitrary ones
// (Go randomises map order) down to three quarters full.
func (c *tokenCache) evictLocked(current *keyring, now time.Time) {
	for k, e := range c.entries {
		if e.keys != current || !now.Before(e.exp) {
			delete(c.entries, k)
		}
	}
	target := c.max * 3 / 4
	for k := range c.entries {
		if len(c.entries) <= target {
			break
		}
		delete(c.entries, k)
	}
}

// counts returns the lookups so far; a nil cache has none.
func (c *tokenCache) counts() (hits, misses int64) {
	if c == nil {
		return 0, 0
	}
	return c.hits.Load(), c.misses.Load()
}

func (c *tokenCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}
