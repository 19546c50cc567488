#!/usr/bin/env bash
# Load test of `arcguard serve` over keep-alive HTTPS on loopback; see BENCHMARKS.md.
#
# Builds the release binary, starts it on the sample policies with fresh certificates in a
# temporary directory, measures the time from process start to /readyz answering and the
# resident memory, then drives POST /validate, POST /mutate (a realistic ~6 KB pod review) and
# GET /healthz (the TLS transport's ceiling) with wrk at each concurrency, and prints Markdown.
# All traffic goes to 127.0.0.1; every run is bounded by DURATION; the server is killed on exit.
#
# Environment (all optional):
#   DURATION=10s               length of each wrk run
#   CONNECTIONS="1 16 64"      concurrencies (wrk threads: 1 for one connection, else 2)
#   ENDPOINTS="validate mutate healthz"
#   LOG=info                   the server's log filter (info is the shipped default)
#   SKIP_BUILD=1               use the existing target/release/arcguard
#   RESULTS=FILE               also write the report to FILE
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
duration=${DURATION:-10s}
connections=${CONNECTIONS:-"1 16 64"}
endpoints=${ENDPOINTS:-"validate mutate healthz"}
log_filter=${LOG:-info}
fixture="$root/tests/fixtures/pod-create-trusted.json"

# --- tools: installed from Debian's packages when missing --------------------------------
apt_updated=""
need() {
  local command=$1 package=$2
  command -v "$command" >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "bench/load.sh: installing $package" >&2
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq >&2
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >&2
}
need wrk wrk
need curl curl
need python3 python3

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "bench/load.sh: cargo build --release" >&2
  (cd "$root" && cargo build --release --quiet)
fi
bin="${CARGO_TARGET_DIR:-$root/target}/release/arcguard"
[ -x "$bin" ] || { echo "bench/load.sh: no binary at $bin" >&2; exit 1; }

# --- scratch directory and the server's lifetime --------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/arcguard-load.XXXXXX")
pid=""
poller=""
cleanup() {
  if [ -n "$poller" ] && kill -0 "$poller" 2>/dev/null; then
    kill "$poller" 2>/dev/null || true
  fi
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
body="$tmp/pod-review.json"
python3 - "$fixture" "$body" <<'EOF'
import json, sys
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    json.dump(json.load(src), dst, separators=(",", ":"))
EOF
read -r port metrics_port < <(python3 - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
EOF
)
base="https://127.0.0.1:$port"

now_ns() { date +%s%N; }
status_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# --- start and readiness ----------------------------------------------------------------------
# ready.py polls /readyz in-process (about 1 ms per attempt); it starts before the server so
# that its interpreter start-up is not counted.
load_at_start=$(loadavg)
python3 "$root/bench/ready.py" "$port" "$ca" "$tmp/polling" 10 >"$tmp/ready.txt" &
poller=$!
until [ -e "$tmp/polling" ]; do sleep 0.01; done
t0=$(now_ns)
"$bin" --log "$log_filter" serve \
  --policies "$root/policies" \
  --addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:$metrics_port" \
  --tls-cert "$tmp/certs/tls.crt" --tls-key "$tmp/certs/tls.key" --ca-cert "$ca" \
  --no-dev-certs >"$tmp/server.log" 2>&1 &
pid=$!
if ! wait "$poller"; then
  echo "bench/load.sh: the server was not ready within 10 s:" >&2
  cat "$tmp/server.log" >&2
  exit 1
fi
read -r _ t1 attempts <"$tmp/ready.txt"
ready_ms=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1e6 }')
kill -0 "$pid" 2>/dev/null || { echo "bench/load.sh: the server exited" >&2; exit 1; }

sleep 1
idle_rss_kib=$(status_kib VmRSS)

# --- the responses are the ones being measured --------------------------------------------------
validate_response=$(curl -sf --cacert "$ca" -H 'content-type: application/json' \
  --data-binary "@$body" "$base/validate")
mutate_response=$(curl -sf --cacert "$ca" -H 'content-type: application/json' \
  --data-binary "@$body" "$base/mutate")
case "$validate_response" in *'"allowed":true'*) ;; *)
  echo "bench/load.sh: unexpected /validate response: $validate_response" >&2
  exit 1 ;;
esac
case "$mutate_response" in *'"patch":'*) ;; *)
  echo "bench/load.sh: unexpected /mutate response: $mutate_response" >&2
  exit 1 ;;
esac

# --- load -----------------------------------------------------------------------------------------
declare -A rps
rows=""
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
clk_tck=$(getconf CLK_TCK)
for endpoint in $endpoints; do
  for c in $connections; do
    threads=2
    [ "$c" -gt 1 ] || threads=1
    body_env=""
    [ "$endpoint" = healthz ] || body_env=$body
    before_load=$(cut -d' ' -f1 /proc/loadavg)
    before_cpu=$(cpu_ticks)
    ARCGUARD_BENCH_BODY="$body_env" wrk -t"$threads" -c"$c" -d"$duration" --latency \
      -s "$root/bench/wrk.lua" "$base/$endpoint" >"$tmp/wrk.txt" 2>&1 || {
      cat "$tmp/wrk.txt" >&2
      exit 1
    }
    after_cpu=$(cpu_ticks)
    after_load=$(cut -d' ' -f1 /proc/loadavg)
    result=$(grep '^RESULT ' "$tmp/wrk.txt") || { cat "$tmp/wrk.txt" >&2; exit 1; }
    requests=$(field requests "$result")
    errors=$(($(field connect_errors "$result") + $(field read_errors "$result") \
      + $(field write_errors "$result") + $(field status_errors "$result") \
      + $(field timeouts "$result")))
    cpu_us=$(awk -v t=$((after_cpu - before_cpu)) -v hz="$clk_tck" -v n="$requests" \
      'BEGIN { printf "%.1f", (n > 0) ? (t / hz * 1e6 / n) : 0 }')
    rate=$(field rps "$result")
    rps[$endpoint.$c]=$rate
    rows+="| /$endpoint | $c | $threads | $(printf '%.0f' "$rate") | $(ms "$(field p50 "$result")") | $(ms "$(field p90 "$result")") | $(ms "$(field p99 "$result")") | $(ms "$(field p999 "$result")") | $errors | $cpu_us | $before_load → $after_load |"$'\n'
    echo "bench/load.sh: /$endpoint c=$c: $(printf '%.0f' "$rate") req/s" >&2
    sleep 1
  done
done
peak_rss_kib=$(status_kib VmHWM)
final_rss_kib=$(status_kib VmRSS)
load_at_end=$(loadavg)
log_lines=$(wc -l <"$tmp/server.log")

# --- report -------------------------------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() {
  local a=${rps[$1]:-} b=${rps[$2]:-}
  [ -n "$a" ] && [ -n "$b" ] || { echo "n/a"; return; }
  awk -v a="$a" -v b="$b" 'BEGIN { printf "%.0f%%", 100 * a / b }'
}
top=$(tr ' ' '\n' <<<"$connections" | sort -n | tail -1)
report() {
  echo "## Load test ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  echo "Machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)," \
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo);" \
    "load average at start $load_at_start, at end $load_at_end."
  echo "wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }'), keep-alive TLS, $duration per run," \
    "body $(wc -c <"$body") bytes (tests/fixtures/pod-create-trusted.json, compacted); server log filter \`$log_filter\` ($log_lines log lines)."
  echo
  echo "| endpoint | connections | wrk threads | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | server CPU µs/request | load avg before → after |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s' "$rows"
  echo
  echo "- /validate ÷ /healthz at $top connections: $(ratio "validate.$top" "healthz.$top")"
  echo "- /mutate ÷ /validate at $top connections: $(ratio "mutate.$top" "validate.$top")"
  echo "- ready: ${ready_ms} ms from process start to /readyz answering 200 over TLS (polled in-process about every millisecond; $attempts failed attempts before)"
  echo "- resident memory: idle $(mib "$idle_rss_kib") MiB (VmRSS 1 s after ready), peak $(mib "$peak_rss_kib") MiB (VmHWM), $(mib "$final_rss_kib") MiB after the runs"
}
if [ -n "${RESULTS:-}" ]; then
  report | tee "$RESULTS"
else
  report
fi
