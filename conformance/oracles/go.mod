// The conformance oracles: arcguard's parsers are compared with these reference implementations
// (conformance/README.md). Versions are pinned here; build-oracles.sh keys its cache on them.
module arcguard.local/conformance/oracles

go 1.23.8

require (
	github.com/distribution/reference v0.6.0
	github.com/projectcalico/calico v1.11.0-cni-plugin.0.20250813170300-a0db560f0520
	github.com/sirupsen/logrus v1.9.3
)

require (
	github.com/opencontainers/go-digest v1.0.0 // indirect
	golang.org/x/sys v0.33.0 // indirect
)
