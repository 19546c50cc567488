//go:build tools

// Package tools pins helm, built from source by e2e/build-tools.sh for `helm lint`,
// `helm template` and the e2e `helm install`.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
