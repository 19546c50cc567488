#!/usr/bin/env bash
# Load test of `arcguard serve` over keep-alive HTTPS on loopback; see BENCHMARKS.md.
#
# Builds the release binary, starts it on the sample policies with fresh certificates in a
# temporary directory, measures the time from process start to /readyz answering and the
# resident memory, then drives POST /validate, POST /mutate (a realistic ~6 KB pod review),
# POST /validate with the same pod's images moved to an untrusted registry (`denied`: every
# request denied) and GET /healthz (the TLS transport's ceiling) at each concurrency, RUNS
# times each (interleaved, so drift hits every endpoint alike), and prints Markdown: the
# median of the runs and their spread (min–max). HTTP/1.1 keep-alive with wrk (one connection
# per concurrent request, as the kube-apiserver calls a webhook through its Service); with
# PROTOCOLS including h2, HTTP/2 with h2load (streams multiplexed over as few connections as
# arcguard's 32 streams per connection allow, as the kube-apiserver calls a loopback URL).
# All traffic goes to 127.0.0.1; every run is bounded by DURATION; the server is killed on exit.
#
# Environment (all optional):
#   DURATION=10s               length of each run
#   CONNECTIONS="1 16 64"      concurrent requests (wrk threads: 1 for one connection, else 2)
#   ENDPOINTS="validate mutate denied healthz"
#   PROTOCOLS="h1"             h1 (wrk), h2 (h2load), or both: "h1 h2"
#   RUNS=3                     runs per endpoint, concurrency and protocol
#   LOG=info                   the server's log filter (info is the shipped default)
#   SKIP_BUILD=1               use the existing target/release/arcguard
#   RESULTS=FILE               also write the report to FILE
#   POLICIES=DIR               the policy directory (default: the sample policies, policies/)
#   FIXTURE=FILE               the pod review driven (default: tests/fixtures/pod-create-trusted.json)
#   SERVE_ARGS="..."           more arguments for `arcguard serve` (bench/provenance.sh: the registry's CA)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
duration=${DURATION:-10s}
connections=${CONNECTIONS:-"1 16 64"}
endpoints=${ENDPOINTS:-"validate mutate denied healthz"}
protocols=${PROTOCOLS:-h1}
runs=${RUNS:-3}
log_filter=${LOG:-info}
fixture="${FIXTURE:-$root/tests/fixtures/pod-create-trusted.json}"
policies="${POLICIES:-$root/policies}"
read -r -a serve_args <<<"${SERVE_ARGS:-}"

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
need curl curl
need python3 python3
need /usr/bin/time time
case " $protocols " in *" h1 "*) need wrk wrk ;; esac
case " $protocols " in *" h2 "*) need h2load nghttp2-client ;; esac

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
denied_body="$tmp/pod-review-denied.json"
python3 - "$fixture" "$body" "$denied_body" <<'EOF'
import json, sys
with open(sys.argv[1]) as src:
    review = json.load(src)
with open(sys.argv[2], "w") as dst:
    json.dump(review, dst, separators=(",", ":"))
# The same pod, every image from a registry no sample policy trusts: the same bytes to decode,
# and every container a violation to word.
spec = review["request"]["object"]["spec"]
for group in ("initContainers", "containers", "ephemeralContainers"):
    for container in spec.get(group, []):
        container["image"] = "untrusted.example.com/" + container["image"].split("/", 1)[1]
with open(sys.argv[3], "w") as dst:
    json.dump(review, dst, separators=(",", ":"))
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
  --policies "$policies" "${serve_args[@]}" \
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
denied_response=$(curl -sf --cacert "$ca" -H 'content-type: application/json' \
  --data-binary "@$denied_body" "$base/validate")
case "$denied_response" in *'"allowed":false'*) ;; *)
  echo "bench/load.sh: unexpected denied /validate response: $denied_response" >&2
  exit 1 ;;
esac

# --- load -----------------------------------------------------------------------------------------
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
clk_tck=$(getconf CLK_TCK)
seconds=${duration%s}
results="$tmp/results.txt"
: >"$results"
# One run; prints "rps p50_us p99_us p999_us mean_us max_us errors requests" ("-": not known).
run_h1() {
  local c=$1 path=$2 body_file=$3 threads=2
  [ "$c" -gt 1 ] || threads=1
  ARCGUARD_BENCH_BODY="$body_file" /usr/bin/time -f '%U %S' -o "$tmp/client.time" wrk -t"$threads" -c"$c" -d"$duration" --latency \
    -s "$root/bench/wrk.lua" "$base/$path" >"$tmp/wrk.txt" 2>&1 || { cat "$tmp/wrk.txt" >&2; return 1; }
  local result errors
  result=$(grep '^RESULT ' "$tmp/wrk.txt") || { cat "$tmp/wrk.txt" >&2; return 1; }
  errors=$(($(field connect_errors "$result") + $(field read_errors "$result") \
    + $(field write_errors "$result") + $(field status_errors "$result") \
    + $(field timeouts "$result")))
  echo "$(field rps "$result") $(field p50 "$result") $(field p99 "$result") $(field p999 "$result") - $(field max "$result") $errors $(field requests "$result")"
}
run_h2() {
  local c=$1 path=$2 body_file=$3
  # As many connections as 32 streams each need (arcguard's SETTINGS_MAX_CONCURRENT_STREAMS).
  local conns=$(((c + 31) / 32))
  local streams=$((c / conns))
  local data=()
  [ -z "$body_file" ] || data=(-d "$body_file" -H 'content-type: application/json')
  /usr/bin/time -f '%U %S' -o "$tmp/client.time" h2load -c "$conns" -m "$streams" -t 1 -D "$seconds" "${data[@]}" \
    "$base/$path" >"$tmp/h2load.txt" 2>&1 || { cat "$tmp/h2load.txt" >&2; return 1; }
  python3 - "$tmp/h2load.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def us(value):
    number, unit = re.match(r"([0-9.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"finished in [^,]+, ([0-9.]+) req/s", text).group(1))
req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
done, ok, failed, errored, timeout = (int(x) for x in req.groups()[1:])
status = re.search(r"status codes: (\d+) 2xx", text)
non2xx = max(0, done - int(status.group(1))) if status else 0
row = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
low, high, mean = (us(x) for x in row.groups())
print(f"{rps:.1f} - - - {mean:.0f} {high:.0f} {failed + errored + timeout + non2xx} {done}")
EOF
}
for run in $(seq 1 "$runs"); do
  for protocol in $protocols; do
    for endpoint in $endpoints; do
      case $endpoint in
        healthz) path=healthz; body_file="" ;;
        denied) path=validate; body_file=$denied_body ;;
        *) path=$endpoint; body_file=$body ;;
      esac
      for c in $connections; do
        before_load=$(cut -d' ' -f1 /proc/loadavg)
        before_cpu=$(cpu_ticks)
        line=$("run_$protocol" "$c" "$path" "$body_file") || exit 1
        after_cpu=$(cpu_ticks)
        after_load=$(cut -d' ' -f1 /proc/loadavg)
        requests=${line##* }
        cpu_us=$(awk -v t=$((after_cpu - before_cpu)) -v hz="$clk_tck" -v n="$requests" \
          'BEGIN { printf "%.1f", (n > 0) ? (t / hz * 1e6 / n) : 0 }')
        client_us=$(awk -v n="$requests" '{ printf "%.1f", (n > 0) ? (($1 + $2) * 1e6 / n) : 0 }' \
          "$tmp/client.time")
        echo "$protocol $endpoint $c $run ${line% *} $cpu_us $client_us $before_load $after_load" >>"$results"
        echo "bench/load.sh: run $run $protocol /$endpoint c=$c: ${line%% *} req/s" >&2
        sleep 1
      done
    done
  done
done
peak_rss_kib=$(status_kib VmHWM)
final_rss_kib=$(status_kib VmRSS)
load_at_end=$(loadavg)
log_lines=$(wc -l <"$tmp/server.log")
log_bytes=$(wc -c <"$tmp/server.log")

# --- report -------------------------------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
top=$(tr ' ' '\n' <<<"$connections" | sort -n | tail -1)
report() {
  echo "## Load test ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  echo "Machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)," \
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo);" \
    "load average at start $load_at_start, at end $load_at_end."
  local tools=""
  case " $protocols " in *" h1 "*) tools+="wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }') (HTTP/1.1 keep-alive, one connection per concurrent request); " || true ;; esac
  case " $protocols " in *" h2 "*) tools+="h2load $(h2load --version 2>&1 | awk '{ print $2; exit }') (HTTP/2, up to 32 streams per connection); " || true ;; esac
  echo "${tools}TLS, $duration per run, $runs runs each (median, and min–max across runs)," \
    "body $(wc -c <"$body") bytes (tests/fixtures/pod-create-trusted.json, compacted; \`denied\`: the same pod with untrusted images); server log filter \`$log_filter\` ($log_lines log lines, $log_bytes bytes in all)."
  echo
  python3 - "$results" "$top" "$(nproc)" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    protocol, endpoint, c, run, rps, p50, p99, p999, mean, high, errors, cpu, client, before, after = line.split()
    rows.setdefault((protocol, endpoint, int(c)), []).append(
        dict(rps=float(rps), p50=p50, p99=p99, mean=mean, max=high,
             errors=int(errors), cpu=float(cpu), client=float(client), load=f"{before} → {after}"))
def ms(values):
    values = [float(v) / 1000 for v in values if v != "-"]
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
print("| protocol | endpoint | concurrent | requests/s median (min–max) | p50 ms | p99 ms | mean ms | max ms | errors | server CPU µs/request | load generator CPU µs/request | load avg (first run) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
order = {"validate": 0, "mutate": 1, "denied": 2, "healthz": 3}
for (protocol, endpoint, c), runs in sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][2])):
    rps = [r["rps"] for r in runs]
    cpu = [r["cpu"] for r in runs]
    client = [r["client"] for r in runs]
    name = "/validate (denied)" if endpoint == "denied" else f"/{endpoint}"
    print(f"| {'HTTP/1.1' if protocol == 'h1' else 'HTTP/2'} | {name} | {c} "
          f"| {statistics.median(rps):.0f} ({min(rps):.0f}–{max(rps):.0f}) "
          f"| {ms([r['p50'] for r in runs])} | {ms([r['p99'] for r in runs])} "
          f"| {ms([r['mean'] for r in runs])} | {ms([r['max'] for r in runs])} "
          f"| {sum(r['errors'] for r in runs)} | {statistics.median(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f}) "
          f"| {statistics.median(client):.1f} ({min(client):.1f}–{max(client):.1f}) | {runs[0]['load']} |")
print()
top = int(sys.argv[2])
def median(protocol, endpoint, key="rps"):
    runs = rows.get((protocol, endpoint, top))
    return statistics.median(r[key] for r in runs) if runs else None
pairs = [("validate", "healthz", "/validate ÷ /healthz"),
         ("mutate", "validate", "/mutate ÷ /validate"),
         ("denied", "validate", "denied ÷ allowed /validate")]
shown = {"validate": "/validate", "mutate": "/mutate", "denied": "denied /validate", "healthz": "/healthz"}
for protocol in sorted({p for p, _, _ in rows}):
    name = "HTTP/1.1" if protocol == "h1" else "HTTP/2"
    for a, b, label in pairs:
        x, y = median(protocol, a), median(protocol, b)
        if x and y:
            print(f"- {name}, {label} at {top} concurrent (medians): {100 * x / y:.0f}%")
    # The load generator shares the cores, and sending a 6 KB body over TLS costs it about twice
    # what a GET /healthz does: even a server whose /validate cost no more than its /healthz
    # could not exceed cores / (its /healthz CPU + the load generator's per /validate), which
    # bounds the /validate ÷ /healthz ratio this machine can show.
    client, floor = median(protocol, "validate", "client"), median(protocol, "healthz", "cpu")
    ceiling = median(protocol, "healthz")
    if client and floor and ceiling:
        bound = int(sys.argv[3]) * 1e6 / (client + floor)
        print(f"- {name}, /validate if the server's CPU per /validate were no more than per /healthz "
              f"(cores ÷ (server CPU per /healthz + load generator CPU per /validate)): "
              f"at most {bound:.0f} req/s, {100 * bound / ceiling:.0f}% of /healthz")
    # Where the load generator has cores of its own (as the apiserver does), a CPU-bound server
    # answers in inverse proportion to its CPU per request: these are the ratios that travel
    # from this machine to one like that.
    for a, b, label in pairs:
        x, y = median(protocol, a, "cpu"), median(protocol, b, "cpu")
        if x and y:
            print(f"- {name}, {label} predicted from server CPU per request (with the load "
                  f"generator on cores of its own: {shown[b]} {y:.1f} µs ÷ {shown[a]} {x:.1f} µs): "
                  f"{100 * y / x:.0f}%")
EOF
  echo "- ready: ${ready_ms} ms from process start to /readyz answering 200 over TLS (polled in-process about every millisecond; $attempts failed attempts before)"
  echo "- resident memory: idle $(mib "$idle_rss_kib") MiB (VmRSS 1 s after ready), peak $(mib "$peak_rss_kib") MiB (VmHWM), $(mib "$final_rss_kib") MiB after the runs"
}
if [ -n "${RESULTS:-}" ]; then
  report | tee "$RESULTS"
else
  report
fi
