#!/usr/bin/env bash
# Builds kube-apiserver and etcd from source (the Go tools module in e2e/controlplane/) into a
# version-keyed cache folder outside the repository, and reuses them when present.
# Prints progress on stderr and the folder holding both binaries on stdout.
#
# Environment:
#   ARCGUARD_CONTROLPLANE_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/controlplane)
#   ARCGUARD_GO_PARALLEL         go build -p (default: number of CPUs); use 1 when memory is tight
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mod="$here/controlplane"
k8s="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
[ -n "$k8s" ] && [ -n "$etcd" ] || { echo "cannot read versions from $mod/go.mod" >&2; exit 1; }

root="${ARCGUARD_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/controlplane}"
out="$root/kubernetes-$k8s-etcd-$etcd"

log() { printf '[build-controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  log "reusing $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "go is required to build the control plane" >&2; exit 1; }
mkdir -p "$out"
staging="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

minor="${k8s#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
parallel="${ARCGUARD_GO_PARALLEL:-$(nproc 2>/dev/null || echo 2)}"

# `go build -v` names each package as it is compiled: a line every 100 packages shows progress.
# The full output goes to a log whose end is shown when the build fails.
build() {
  local name="$1" path="$2" flags="$3" start=$SECONDS
  local output="$staging/$name.log"
  log "building $name from $path (go build -p $parallel; several minutes on a cold cache)"
  if ! ( cd "$mod" && CGO_ENABLED=0 nice -n 10 go build -p "$parallel" -trimpath -v \
      -ldflags "$flags" -o "$staging/$name" "$path" ) 2>&1 | tee "$output" |
    awk -v name="$name" -v t0="$(date +%s)" '
      { n++; if (n % 100 == 0) { printf "[build-controlplane] %s: %d packages compiled (%ds)\n", name, n, systime() - t0 > "/dev/stderr"; fflush("/dev/stderr") } }'
  then
    log "building $name failed after $((SECONDS - start))s; the end of its output:"
    tail -n 40 "$output" >&2
    exit 1
  fi
  log "built $name in $((SECONDS - start))s"
}

# A cold build needs room: about 1 GB of modules and 2.5 GB of build cache.
cache="$(go env GOCACHE)"
mkdir -p "$cache"
free_kb="$(df -Pk "$cache" | awk 'NR == 2 { print $4 }')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt 4000000 ]; then
  log "warning: only $((free_kb / 1024)) MB free for $cache; a cold build needs about 4 GB"
fi

total=$SECONDS
( cd "$mod" && go mod download ) || { log "go mod download failed"; exit 1; }
log "downloaded modules in $((SECONDS - total))s"
build etcd go.etcd.io/etcd/server/v3 "-s -w"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldflags"
mv "$staging/etcd" "$staging/kube-apiserver" "$out/"
log "control plane ready in $out (kubernetes $k8s, etcd $etcd) after $((SECONDS - total))s"
echo "$out"
