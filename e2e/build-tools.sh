#!/usr/bin/env bash
# Builds the command-line tools the install tests use, from source through the Go module proxy,
# into a version-keyed cache folder outside the repository, and reuses them when present:
#
#   kubectl   k8s.io/kubernetes/cmd/kubectl, from the control-plane module (e2e/controlplane/),
#             so it is the apiserver's own release and shares its module and build caches
#   helm      helm.sh/helm/v3/cmd/helm (e2e/tools/helm/)
#   promtool  github.com/prometheus/prometheus/cmd/promtool (e2e/tools/promtool/), without the
#             service-discovery plugins (`-tags remove_all_sd`: rule checks and tests need none)
#   registry  github.com/distribution/distribution/v3/cmd/registry (e2e/tools/registry/): the
#             OCI registry the image-provenance scenarios push to and arcguard reads from
#   cosign    github.com/sigstore/cosign/v2/cmd/cosign (e2e/tools/cosign/): signs images with a
#             key pair, as users do
#   notation-sign  e2e/tools/notation-sign/main.go over github.com/notaryproject/notation-go:
#             signs images as `notation sign` does (the Notation CLI module is not served);
#             keyed by notation-go's version and a hash of the program's sources
#
# Usage: build-tools.sh [--path] [TOOL...]    (default: all six, in the order above)
# Prints the path of each tool's binary on stdout, one a line, in the order asked; progress goes
# to stderr. With --path it builds nothing and prints where each binary is (or would be).
#
# Environment:
#   ARCGUARD_TOOLS_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/tools)
#   ARCGUARD_GO_PARALLEL  go build -p (default: number of CPUs); use 1 when memory is tight
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="${ARCGUARD_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arcguard/tools}"
parallel="${ARCGUARD_GO_PARALLEL:-$(nproc 2>/dev/null || echo 2)}"

log() { printf '[build-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The version of `module` that the go.mod in `dir` requires.
required() {
  local v
  v="$(awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1/go.mod")"
  [ -n "$v" ] || { log "cannot read the version of $2 from $1/go.mod"; exit 1; }
  echo "$v"
}

# Sets mod, pkg, version, tags and ldflags for one tool.
describe() {
  tags=""
  case "$1" in
    kubectl)
      mod="$here/controlplane"
      pkg=k8s.io/kubernetes/cmd/kubectl
      version="$(required "$mod" k8s.io/kubernetes)"
      local minor="${version#v1.}"; minor="${minor%%.*}" flags=""
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
      done
      ldflags="-s -w$flags"
      ;;
    helm)
      mod="$here/tools/helm"
      pkg=helm.sh/helm/v3/cmd/helm
      version="$(required "$mod" helm.sh/helm/v3)"
      # As helm's Makefile does: the Kubernetes version `helm template` and `helm lint` assume
      # is the one after the client-go it was built with.
      local kv; kv="$(required "$mod" k8s.io/client-go)"; kv="${kv#v0.}"
      local major=1 minor="${kv%%.*}"
      ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
      for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $p.k8sVersionMajor=$major -X $p.k8sVersionMinor=$minor"
      done
      ;;
    promtool)
      mod="$here/tools/promtool"
      pkg=github.com/prometheus/prometheus/cmd/promtool
      version="$(required "$mod" github.com/prometheus/prometheus)"
      tags=remove_all_sd
      ldflags="-s -w -X github.com/prometheus/common/version.Version=$version"
      ;;
    registry)
      mod="$here/tools/registry"
      pkg=github.com/distribution/distribution/v3/cmd/registry
      version="$(required "$mod" github.com/distribution/distribution/v3)"
      ldflags="-s -w -X github.com/distribution/distribution/v3/version.version=$version"
      ;;
    cosign)
      mod="$here/tools/cosign"
      pkg=github.com/sigstore/cosign/v2/cmd/cosign
      version="$(required "$mod" github.com/sigstore/cosign/v2)"
      ldflags="-s -w -X sigs.k8s.io/release-utils/version.gitVersion=$version"
      ;;
    notation-sign)
      mod="$here/tools/notation-sign"
      pkg=.
      local sources; sources="$(cat "$mod/main.go" "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-12)"
      version="$(required "$mod" github.com/notaryproject/notation-go)-$sources"
      ldflags="-s -w"
      ;;
    *)
      log "unknown tool $1 (kubectl, helm, promtool, registry, cosign, notation-sign)"
      exit 2
      ;;
  esac
  out="$root/$1-$version/$1"
}

# `go build -v` names each package as it is compiled: a line every 100 packages shows progress.
# The full output goes to a log whose end is shown when the build fails.
build() {
  local name="$1" start=$SECONDS staging
  command -v go >/dev/null || { log "go is required to build $name"; exit 1; }
  mkdir -p "$(dirname "$out")"
  staging="$(mktemp -d "$(dirname "$out")/.build.XXXXXX")"
  # shellcheck disable=SC2064 # expand now: each build has its own staging folder
  trap "rm -rf '$staging'" EXIT
  log "building $name $version from $pkg (go build -p $parallel; minutes on a cold cache)"
  if ! ( cd "$mod" && CGO_ENABLED=0 nice -n 10 go build -p "$parallel" -trimpath -v \
      -tags "$tags" -ldflags "$ldflags" -o "$staging/$name" "$pkg" ) 2>&1 |
    tee "$staging/build.log" |
    awk -v name="$name" -v t0="$(date +%s)" '
      { n++; if (n % 100 == 0) { printf "[build-tools] %s: %d packages compiled (%ds)\n", name, n, systime() - t0 > "/dev/stderr"; fflush("/dev/stderr") } }'
  then
    log "building $name failed after $((SECONDS - start))s; the end of its output:"
    tail -n 40 "$staging/build.log" >&2
    exit 1
  fi
  mv "$staging/$name" "$out"
  rm -rf "$staging"
  trap - EXIT
  log "built $name $version in $((SECONDS - start))s: $out"
}

only_path=false
if [ "${1:-}" = "--path" ]; then
  only_path=true
  shift
fi
[ "$#" -gt 0 ] || set -- kubectl helm promtool registry cosign notation-sign

for tool in "$@"; do
  describe "$tool"
  if ! $only_path; then
    if [ -x "$out" ]; then
      log "reusing $out"
    else
      build "$tool"
    fi
  fi
  echo "$out"
done
