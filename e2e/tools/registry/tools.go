//go:build tools

// Package tools pins the CNCF Distribution registry, built from source by e2e/build-tools.sh:
// the OCI registry the image-provenance scenarios push to and arcguard reads from.
package tools

import (
	_ "github.com/distribution/distribution/v3/cmd/registry"
)
