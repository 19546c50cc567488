#!/usr/bin/env bash
# Builds the conformance oracles (the Go module in conformance/oracles/) and extracts the upstream
# test vectors into a cache folder outside the repository keyed on the pinned versions and a hash
# of the oracle sources; reuses it when present. Only the packages the oracles import are
# downloaded and compiled (github.com/distribution/reference, Calico's libcalico-go/lib/selector).
# Prints progress on stderr and the cache folder on stdout.
#
# Environment:
#   ARCGUARD_ORACLES_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/oracles)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mod="$here/oracles"
reference="$(awk '$1 == "github.com/distribution/reference" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
calico="$(awk '$1 == "github.com/projectcalico/calico" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
[ -n "$reference" ] && [ -n "$calico" ] || { echo "cannot read versions from $mod/go.mod" >&2; exit 1; }

# The oracles' own code is part of the key: an edit rebuilds them.
sources="$(cd "$mod" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) | LC_ALL=C sort |
  xargs sha256sum | sha256sum | cut -c1-12)"
root="${ARCGUARD_ORACLES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/oracles}"
out="$root/reference-$reference-calico-$calico-$sources"

log() { printf '[build-oracles %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

files=(reference-oracle selector-oracle vectors-reference.json vectors-selector.json)
complete() { for f in "${files[@]}"; do [ -s "$out/$f" ] || return 1; done; }
if complete; then
  log "reusing $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "go is required to build the conformance oracles" >&2; exit 1; }
mkdir -p "$out"
staging="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

start=$SECONDS
log "building the oracles (distribution/reference $reference, calico $calico)"
( cd "$mod" && CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "-s -w" -o "$staging/" \
    ./reference-oracle ./selector-oracle ./extract-vectors ) || { log "go build failed"; exit 1; }
log "built in $((SECONDS - start))s"

# The vectors: every string and label map the upstream tests spell out (extract-vectors).
dir() { (cd "$mod" && go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'); }
reference_dir="$(dir github.com/distribution/reference)"
calico_dir="$(dir github.com/projectcalico/calico)"
[ -d "$reference_dir" ] && [ -d "$calico_dir/libcalico-go/lib/selector" ] ||
  { log "cannot find the module sources ($reference_dir, $calico_dir)"; exit 1; }
"$staging/extract-vectors" "$reference_dir" > "$staging/vectors-reference.json"
"$staging/extract-vectors" "$calico_dir/libcalico-go/lib/selector" > "$staging/vectors-selector.json"
printf '{"reference": "%s", "calico": "%s"}\n' "$reference" "$calico" > "$staging/versions.json"

for f in "${files[@]}" versions.json; do mv "$staging/$f" "$out/"; done
log "oracles ready in $out after $((SECONDS - start))s"
echo "$out"
