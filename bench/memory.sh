#!/usr/bin/env bash
# Peak resident memory of `arcguard serve` against concurrency, with near-limit pod reviews;
# see BENCHMARKS.md ("Memory under concurrent large reviews").
#
# For each concurrency, a fresh server (sample policies, fresh certificates) takes that many
# concurrent POST /validate requests of a ~2.9 MiB pod review (the bulk in an annotation, as
# anyone who may create pods can send: the apiserver's request limit is 3 MiB), released at
# once by bench/flood.py; the server's VmHWM (peak RSS) is read afterwards. Each concurrency
# runs twice: with the memory limit the shipped Deployment sets (budget = half of it) and with
# a limit so large the budget never binds, to show what the budget saves.
#
# Environment (all optional):
#   CONCURRENCY="1 8 32 64 128 256"
#   MEMORY_LIMIT=134217728     the Deployment's limit (128 MiB)
#   SKIP_BUILD=1               use the existing target/release/arcguard
#   RESULTS=FILE               also write the report to FILE
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
concurrency=${CONCURRENCY:-"1 8 32 64 128 256"}
limit=${MEMORY_LIMIT:-134217728}
unbounded=$((64 * 1024 * 1024 * 1024))

for tool in python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/memory.sh: needs $tool" >&2; exit 1; }
done
if [ -z "${SKIP_BUILD:-}" ]; then
  echo "bench/memory.sh: cargo build --release" >&2
  (cd "$root" && cargo build --release --quiet)
fi
bin="${CARGO_TARGET_DIR:-$root/target}/release/arcguard"
[ -x "$bin" ] || { echo "bench/memory.sh: no binary at $bin" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/arcguard-memory.XXXXXX")
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin" certs --out "$tmp/certs" >/dev/null 2>&1
ca="$tmp/certs/ca.crt"
body="$tmp/review.json"
python3 - "$body" <<'PY'
import json, sys
filler = "a" * (3 * 1024 * 1024 - 200 * 1024)
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "big", "namespace": "shop", "annotations": {"x": filler}},
       "spec": {"containers": [{"name": "app", "image": "contoso.azurecr.io/shop/web:1.0"}]}}
review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
          "request": {"uid": "6c1e8b3e-0000-4000-8000-000000000001",
                      "kind": {"group": "", "version": "v1", "kind": "Pod"},
                      "resource": {"group": "", "version": "v1", "resource": "pods"},
                      "namespace": "shop", "operation": "CREATE",
                      "userInfo": {"username": "bench"}, "object": pod}}
with open(sys.argv[1], "w") as f:
    json.dump(review, f, separators=(",", ":"))
PY
body_bytes=$(stat -c %s "$body")

mib() { echo $(($1 / 1024 / 1024)); }

free_ports() {
  python3 - <<'PY'
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
PY
}

# One fresh server with memory limit $1, flooded with $2 requests; prints a table row.
run() {
  local memory_limit=$1 n=$2 port metrics_port
  read -r port metrics_port < <(free_ports)
  "$bin" --log warn serve --policies "$root/policies" \
    --addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:$metrics_port" \
    --tls-cert "$tmp/certs/tls.crt" --tls-key "$tmp/certs/tls.key" --ca-cert "$ca" \
    --no-dev-certs --memory-limit "$memory_limit" >"$tmp/server.log" 2>&1 &
  pid=$!
  until curl -sf --cacert "$ca" "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
    sleep 0.05
  done
  local idle result peak
  idle=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status")
  result=$(python3 "$root/bench/flood.py" "$port" "$ca" "$body" "$n")
  kill -0 "$pid" 2>/dev/null || { echo "bench/memory.sh: the server died" >&2; cat "$tmp/server.log" >&2; exit 1; }
  peak=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  read -r _ statuses p50 worst <<<"$result"
  awk -v n="$n" -v l="$(mib "$memory_limit")" -v i="$idle" -v p="$peak" -v s="$statuses" \
    -v m="$p50" -v w="$worst" \
    'BEGIN { printf "| %s | %s | %.1f | %.1f | %s | %s | %s |\n", n, l, i / 1024, p / 1024, s, m, w }'
}

report() {
  echo "Body: $body_bytes bytes. Memory limit $(mib "$limit") MiB (budget $(mib $((limit / 2))) MiB) against $(mib "$unbounded") MiB (budget never binds)."
  echo "Load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "| concurrent reviews | memory limit (MiB) | idle RSS (MiB) | peak RSS (MiB) | HTTP statuses | p50 (ms) | slowest (ms) |"
  echo "|---|---|---|---|---|---|---|"
  for n in $concurrency; do
    run "$limit" "$n"
    run "$unbounded" "$n"
  done
  echo
  echo "Load average after: $(cut -d' ' -f1-3 /proc/loadavg)."
}
if [ -n "${RESULTS:-}" ]; then report | tee "$RESULTS"; else report; fi
