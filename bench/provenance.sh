#!/usr/bin/env bash
# What imageProvenance costs: first-seen and cached /validate latency with cosign signature
# checks against a real registry, then bench/load.sh's throughput for today's /validate and for
# the same review under imageProvenance with signatures, cached (e2e/src/bin/provenance_cost.rs;
# see BENCHMARKS.md). Needs the registry and cosign of e2e/build-tools.sh (built on first use).
#
# Arguments go to the harness (--images N, default 30); bench/load.sh's environment (DURATION,
# RUNS, CONNECTIONS, PROTOCOLS, ENDPOINTS) passes through.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
cargo build --release --quiet --bin arcguard
cargo build --release --quiet -p arcguard-e2e --bin provenance_cost
ARCGUARD_BIN="$target/release/arcguard" "$target/release/provenance_cost" "$@"
