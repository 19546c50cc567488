//go:build tools

// Package tools pins the two control-plane binaries the e2e suite builds from source.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
