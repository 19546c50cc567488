//go:build tools

// Package tools pins the control-plane binaries the e2e suite builds from source, and kubectl
// of the same Kubernetes release (built by e2e/build-tools.sh).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
