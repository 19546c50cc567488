#!/usr/bin/env bash
# Pod CREATE latency through a real kube-apiserver without arcguard's webhooks, with a no-op
# webhook in their place (answering no patch, then arcguard's patch), with them, and with them
# under a denial storm (e2e/src/bin/create_latency.rs; see BENCHMARKS.md). About 8 minutes.
#
# Builds the release arcguard and the harness, starts one cluster of the e2e harness (its
# control plane is built from source on first use, as in e2e/README.md), and prints Markdown.
# Arguments go to the harness: --rate N (pods per second, default 50), --seconds N (per phase,
# default 20), --storm-connections N (default 16), --rounds N (the phases run in turn this many
# times, default 3; figures are medians over the rounds), --paired (arcguard and the no-op webhook
# returning its patch only, registered at once for alternate CREATEs: arcguard's own share with
# a paired interval; --rate is then both sides together).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
cargo build --release --quiet --bin arcguard
cargo build --release --quiet -p arcguard-e2e --bin create_latency --bin noop_webhook
ARCGUARD_BIN="$target/release/arcguard" "$target/release/create_latency" "$@"
