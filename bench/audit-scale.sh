#!/usr/bin/env bash
# Scale benchmark of the background audit (issue 10) against a real kube-apiserver and etcd;
# see BENCHMARKS.md ("Background audit at scale").
#
# Builds the arcguard release binary and the benchmark (e2e/src/bin/audit_scale.rs), then runs
# the benchmark with ARCGUARD_BIN set to that binary. The benchmark starts the e2e harness's
# control plane (kube-apiserver and etcd, built from source on the first run: e2e/README.md),
# writes N namespaces × M pods (default 100 × 100) before any policy, applies a Deny and a
# Warn trustedRegistries policy, starts arcguard as its ServiceAccount with
# `--audit-interval 1h` and measures the audit it runs on taking the Lease, then edits the
# Warn policy and measures the audit the change triggers: wall time, the leader's RSS (VmHWM,
# and VmRSS every 100 ms), arcguard's API requests (the apiserver's audit log), report writes
# and bytes. It prints Markdown and exits 1 when an audit does not complete or a namespace's
# report is written more than once for one change. At 100 × 100 on 2 shared cores the run takes
# about 1.5 min after the builds; every process and folder it starts is removed at the end.
#
# Usage: bench/audit-scale.sh [--namespaces N] [--pods-per-namespace M] [--concurrency C]
#                             [--bad-every K] [--timeout SECONDS] [--quiet SECONDS]
#   (bench/audit-scale.sh --help lists what each does)
#
# Environment (all optional):
#   CARGO_TARGET_DIR           where cargo builds (default target/)
#   SKIP_BUILD=1               use the binaries already in $CARGO_TARGET_DIR/release
#   RESULTS=FILE               also write the report to FILE
#   ARCGUARD_E2E_KEEP=1        keep the cluster's folder (arcguard.log, audit.log, etcd data)
#   ARCGUARD_CONTROLPLANE_DIR  kube-apiserver and etcd from this folder instead of building them
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac

# The executable cargo reports for the one binary built by "$@".
build() {
  cargo build --locked --release --message-format=json-render-diagnostics "$@" \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "bench/audit-scale.sh: cargo build --release --bin arcguard" >&2
  arcguard=$(build --bin arcguard)
  echo "bench/audit-scale.sh: cargo build --release -p arcguard-e2e --bin audit_scale" >&2
  bench=$(build -p arcguard-e2e --bin audit_scale)
else
  arcguard="$target/release/arcguard"
  bench="$target/release/audit_scale"
fi
for bin in "$arcguard" "$bench"; do
  [ -x "$bin" ] || { echo "bench/audit-scale.sh: no binary at '$bin'" >&2; exit 1; }
done
export ARCGUARD_BIN="$arcguard"

started=$(date +%s)
status=0
if [ -n "${RESULTS:-}" ]; then
  "$bench" "$@" | tee "$RESULTS" || status=$?
else
  "$bench" "$@" || status=$?
fi
echo "bench/audit-scale.sh: finished in $(($(date +%s) - started)) s (exit $status)" >&2
exit "$status"
