//go:build tools

// Package tools pins promtool, built from source by e2e/build-tools.sh for
// `promtool check rules` and `promtool test rules`.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
