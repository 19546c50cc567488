// Command notation-sign signs an image in a registry as `notation sign` does, through
// notation-go (the Notation CLI module is not served by the module proxy): an X.509 key and
// certificate chain, a JWS or COSE envelope, the signature pushed as a referrer of the image
// (the referrers API, or the referrers tag schema where the registry lacks it).
//
// Usage: notation-sign -key leaf.key -chain chain.pem -ca registry-ca.pem
//
//	[-envelope jws|cose] [-expiry 1h] host:port/repository@sha256:<hex>
//
// It prints the signature manifest's digest.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/notaryproject/notation-core-go/signature/cose"
	"github.com/notaryproject/notation-core-go/signature/jws"
	"github.com/notaryproject/notation-go"
	"github.com/notaryproject/notation-go/registry"
	"github.com/notaryproject/notation-go/signer"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

func main() {
	key := flag.String("key", "", "PEM private key of the leaf certificate")
	chain := flag.String("chain", "", "PEM certificate chain, leaf first, root last")
	ca := flag.String("ca", "", "PEM CA certificate of the registry's TLS certificate")
	envelope := flag.String("envelope", "jws", "signature envelope: jws or cose")
	expiry := flag.Duration("expiry", 0, "signature expiry (0: none)")
	flag.Parse()
	if flag.NArg() != 1 || *key == "" || *chain == "" || *ca == "" {
		fmt.Fprintln(os.Stderr, "usage: notation-sign -key K -chain C -ca CA [-envelope jws|cose] [-expiry D] host/repository@digest")
		os.Exit(2)
	}
	if err := sign(flag.Arg(0), *key, *chain, *ca, *envelope, *expiry); err != nil {
		fmt.Fprintln(os.Stderr, "notation-sign:", err)
		os.Exit(1)
	}
}

func sign(reference, keyPath, chainPath, caPath, envelope string, expiry time.Duration) error {
	mediaType := jws.MediaTypeEnvelope
	if envelope == "cose" {
		mediaType = cose.MediaTypeEnvelope
	} else if envelope != "jws" {
		return fmt.Errorf("unknown envelope %q", envelope)
	}
	s, err := signer.NewGenericSignerFromFiles(keyPath, chainPath)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%s holds no PEM certificate", caPath)
	}
	name, _, found := strings.Cut(reference, "@")
	if !found {
		return fmt.Errorf("%s is not pinned by digest", reference)
	}
	repo, err := remote.NewRepository(name)
	if err != nil {
		return err
	}
	repo.Client = &auth.Client{Client: &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}},
	}}
	desc, err := notation.Sign(context.Background(), s, registry.NewRepository(repo), notation.SignOptions{
		SignerSignOptions: notation.SignerSignOptions{SignatureMediaType: mediaType, ExpiryDuration: expiry},
		ArtifactReference: reference,
	})
	if err != nil {
		return err
	}
	fmt.Println(desc.Digest)
	return nil
}
