package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

const (
	benchIssuer   = "https://issuer.bench.local"
	benchAudience = "threeds-records"
	benchKid      = "bench-1"
)

// signer is the identity provider of the bench: a real key pair whose public
// half the service reads from JWKS_FILE.
type signer struct {
	alg  jwa.SignatureAlgorithm
	priv jwk.Key
}

func newSigner(alg string) (*signer, error) {
	var raw any
	var err error
	var sigAlg jwa.SignatureAlgorithm
	switch alg {
	case "RS256":
		raw, err = rsa.GenerateKey(rand.Reader, 2048)
		sigAlg = jwa.RS256
	case "ES256":
		raw, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		sigAlg = jwa.ES256
	default:
		return nil, fmt.Errorf("unsupported -alg %q (RS256 or ES256)", alg)
	}
	if err != nil {
		return nil, err
	}
	priv, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, err
	}
	for name, v := range map[string]any{jwk.KeyIDKey: benchKid, jwk.AlgorithmKey: sigAlg, jwk.KeyUsageKey: jwk.ForSignature} {
		if err := priv.Set(name, v); err != nil {
			return nil, err
		}
	}
	return &signer{alg: sigAlg, priv: priv}, nil
}

// writeJWKS writes the public set the service will load.
func (s *signer) writeJWKS(path string) error {
	pub, err := jwk.PublicKeyOf(s.priv)
	if err != nil {
		return err
	}
	set := jwk.NewSet()
	if err := set.AddKey(pub); err != nil {
		return err
	}
	b, err := json.Marshal(set)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// mintAll signs one token per user id in [first, last] plus extra, on workers
// goroutines (RSA signing is about a millisecond each). tokens[id] is the token
// of user id.
func (s *signer) mintAll(first, last int64, extra []int64, ttl time.Duration, workers int) (map[int64]string, error) {
	ids := make([]int64, 0, last-first+1+int64(len(extra)))
	for id := first; id <= last; id++ {
		ids = append(ids, id)
	}
	ids = append(ids, extra...)
	out := make([]string, len(ids))
	now := time.Now().Unix()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hdr := jws.NewHeaders()
			_ = hdr.Set(jws.KeyIDKey, benchKid)
			_ = hdr.Set(jws.TypeKey, "JWT")
			for i := w; i < len(ids); i += workers {
				payload := `{"iss":"` + benchIssuer + `","aud":"` + benchAudience + `","sub":"` +
					strconv.FormatInt(ids[i], 10) + `","iat":` + strconv.FormatInt(now, 10) +
					`,"nbf":` + strconv.FormatInt(now, 10) + `,"exp":` + strconv.FormatInt(now+int64(ttl/time.Second), 10) + `}`
				tok, err := jws.Sign([]byte(payload), jws.WithKey(s.alg, s.priv, jws.WithProtectedHeaders(hdr)))
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				out[i] = string(tok)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, fmt.Errorf("mint: %w", firstErr)
	}
	m := make(map[int64]string, len(ids))
	for i, id := range ids {
		m[id] = out[i]
	}
	return m, nil
}
