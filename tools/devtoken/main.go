// Command devtoken creates signing keys and JWTs for demos and manual curl calls.
//
// It lives outside the service on purpose: threeds-records only verifies tokens and
// must never be able to mint one.
//
//	go run ./tools/devtoken keygen -alg ES256 -kid dev-1 -jwks jwks.json -key key.json
//	go run ./tools/devtoken mint -key key.json -iss ISS -aud AUD -sub 1001 -ttl 1h
package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

const usage = `usage:
  devtoken keygen -alg RS256|ES256|EdDSA -kid KID -jwks JWKS_FILE -key KEY_FILE [-append] [-force]
  devtoken mint -key KEY_FILE -iss ISSUER [-aud AUDIENCE] -sub SUBJECT [-ttl 1h]
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "keygen":
		err = keygen(os.Args[2:], os.Stderr)
	case "mint":
		err = mint(os.Args[2:], os.Stdout)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "devtoken:", err)
		os.Exit(1)
	}
}

func keygen(args []string, log io.Writer) error {
	flags := flag.NewFlagSet("keygen", flag.ContinueOnError)
	alg := flags.String("alg", "ES256", "signature algorithm: RS256, ES256 or EdDSA")
	kid := flags.String("kid", "", "key id, sent in every token header (required)")
	jwksPath := flags.String("jwks", "", "public JWK Set file to write (required)")
	keyPath := flags.String("key", "", "private JWK file to write, mode 0600 (required)")
	appendKey := flags.Bool("append", false, "add the public key to an existing JWK Set instead of replacing it (key rotation)")
	force := flags.Bool("force", false, "overwrite an existing private key file")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *kid == "" || *jwksPath == "" || *keyPath == "" {
		return errors.New("keygen needs -kid, -jwks and -key")
	}
	if !*force {
		if _, err := os.Stat(*keyPath); err == nil {
			return fmt.Errorf("%s already exists (use -force to replace it)", *keyPath)
		}
	}

	priv, sigAlg, err := newKey(*alg)
	if err != nil {
		return err
	}
	key, err := jwk.FromRaw(priv)
	if err != nil {
		return fmt.Errorf("convert key: %w", err)
	}
	for name, v := range map[string]any{jwk.KeyIDKey: *kid, jwk.AlgorithmKey: sigAlg, jwk.KeyUsageKey: jwk.ForSignature} {
		if err := key.Set(name, v); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	pub, err := jwk.PublicKeyOf(key)
	if err != nil {
		return fmt.Errorf("public key: %w", err)
	}

	set := jwk.NewSet()
	if *appendKey {
		if old, err := jwk.ReadFile(*jwksPath); err == nil {
			set = old
			if _, dup := set.LookupKeyID(*kid); dup {
				return fmt.Errorf("%s already holds a key with kid %q", *jwksPath, *kid)
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("read %s: %w", *jwksPath, err)
		}
	}
	if err := set.AddKey(pub); err != nil {
		return fmt.Errorf("add key to set: %w", err)
	}

	privJSON, err := json.MarshalIndent(key, "", "  ")
	if err != nil {
		return err
	}
	setJSON, err := json.MarshalIndent(set, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(*keyPath, append(privJSON, '\n'), 0o600); err != nil {
		return err
	}
	// The service re-reads JWKS_FILE when it changes; a rename means it never sees
	// half a file.
	if err := writeFileAtomic(*jwksPath, append(setJSON, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(log, "devtoken: wrote private key %s and JWK Set %s (%d key(s)); kid=%s alg=%s\n",
		*keyPath, *jwksPath, set.Len(), *kid, sigAlg)
	return nil
}

func newKey(alg string) (any, jwa.SignatureAlgorithm, error) {
	switch strings.ToUpper(alg) {
	case "RS256":
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		return k, jwa.RS256, err
	case "ES256":
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		return k, jwa.ES256, err
	case "EDDSA":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, jwa.EdDSA, err
	}
	return nil, "", fmt.Errorf("unsupported -alg %q (want RS256, ES256 or EdDSA)", alg)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func mint(args []string, out io.Writer) error {
	flags := flag.NewFlagSet("mint", flag.ContinueOnError)
	keyPath := flags.String("key", "", "private JWK file written by keygen (required)")
	iss := flags.String("iss", "", "issuer claim, must equal the service's JWT_ISSUER (required)")
	aud := flags.String("aud", "", "audience claim (optional; the service checks it when JWT_AUDIENCE is set)")
	sub := flags.String("sub", "", "subject claim: the cardholder's user id (required)")
	ttl := flags.Duration("ttl", time.Hour, "lifetime of the token")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *keyPath == "" || *iss == "" || *sub == "" {
		return errors.New("mint needs -key, -iss and -sub")
	}
	if *ttl <= 0 {
		return errors.New("-ttl must be positive")
	}
	raw, err := os.ReadFile(*keyPath)
	if err != nil {
		return err
	}
	key, err := jwk.ParseKey(raw)
	if err != nil {
		return fmt.Errorf("parse %s: %w", *keyPath, err)
	}
	if ok, err := jwk.IsPrivateKey(key); err != nil || !ok {
		return fmt.Errorf("%s is not a private key", *keyPath)
	}
	alg, ok := key.Algorithm().(jwa.SignatureAlgorithm)
	if !ok || alg == "" {
		return fmt.Errorf("%s has no signature \"alg\"; regenerate it with keygen", *keyPath)
	}

	now := time.Now().Truncate(time.Second)
	b := jwt.NewBuilder().
		Issuer(*iss).
		Subject(*sub).
		IssuedAt(now).
		NotBefore(now).
		Expiration(now.Add(*ttl))
	if *aud != "" {
		b = b.Audience([]string{*aud})
	}
	tok, err := b.Build()
	if err != nil {
		return err
	}
	// A single audience as a plain string, the way most identity providers send it.
	tok.Options().Enable(jwt.FlattenAudience)
	// jws puts the key's kid into the protected header next to alg.
	signed, err := jwt.Sign(tok, jwt.WithKey(alg, key))
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	_, err = fmt.Fprintln(out, string(signed))
	return err
}
