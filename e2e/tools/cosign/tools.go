//go:build tools

// Package tools pins cosign, built from source by e2e/build-tools.sh: the image-provenance
// scenarios sign images with it as users do (a key pair, no transparency log).
package tools

import (
	_ "github.com/sigstore/cosign/v2/cmd/cosign"
)
