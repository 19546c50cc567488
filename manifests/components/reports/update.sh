#!/usr/bin/env bash
# Moves the OpenReports CRDs of this component to another version of their Go module,
# github.com/openreports/reports-api, in one command:
#
#   bash manifests/components/reports/update.sh v0.2.2     # or `latest`
#
# It downloads the module through the Go module proxy (`go mod download -json`, which checks the
# zip against the Go checksum database), copies config/crd/openreports.io_reports.yaml and
# config/crd/openreports.io_clusterreports.yaml here byte for byte, writes the version and the
# module's h1: hash into the go.sum line of kustomization.yaml and into the pin of
# tests/manifests.rs, and refreshes the chart's copies (charts/sync-files.sh). Then run
# `cargo test --test manifests --test chart`, and read the release notes: arcguard writes
# openreports.io/v1alpha1, which the new CRDs must still serve (the test checks that).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
module=github.com/openreports/reports-api
version="${1:?usage: $0 <version of $module, e.g. v0.2.1>}"

command -v go >/dev/null || { echo "go is required (it downloads $module)" >&2; exit 1; }
# Outside any module or workspace, whatever the caller's environment says (-mod=vendor would
# refuse the download).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# On failure go prints the error on stderr and in the JSON's "Error" field.
if ! json="$(cd "$scratch" && GOFLAGS=-mod=mod GOWORK=off go mod download -json "$module@$version")"; then
  echo "go mod download $module@$version failed (it needs the Go module proxy, GOPROXY):" >&2
  echo "$json" >&2
  exit 1
fi
field() { sed -n "s/^[[:space:]]*\"$1\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" <<<"$json"; }
resolved="$(field Version)"
sum="$(field Sum)"
dir="$(field Dir)"
[ -n "$resolved" ] && [ -n "$sum" ] && [ -d "$dir/config/crd" ] ||
  { echo "go mod download gave no version, sum or CRD folder:" >&2; echo "$json" >&2; exit 1; }

# install, not cp: the module cache is read-only, and a read-only copy would refuse the next run.
for file in openreports.io_reports.yaml openreports.io_clusterreports.yaml; do
  install -m 0644 "$dir/config/crd/$file" "$here/$file"
done
sed -i "s|^# $module v[^ ]* h1:[^ ]*\$|# $module $resolved $sum|" "$here/kustomization.yaml"
sed -i -e "s|^const OPENREPORTS_VERSION: &str = \".*\";\$|const OPENREPORTS_VERSION: \\&str = \"$resolved\";|" \
  -e "s|^const OPENREPORTS_SUM: &str = \".*\";\$|const OPENREPORTS_SUM: \\&str = \"$sum\";|" \
  "$root/tests/manifests.rs"
grep -qF "# $module $resolved $sum" "$here/kustomization.yaml" ||
  { echo "kustomization.yaml has no go.sum line for $module to update" >&2; exit 1; }
for pin in "OPENREPORTS_VERSION: &str = \"$resolved\"" "OPENREPORTS_SUM: &str = \"$sum\""; do
  grep -qF "const $pin;" "$root/tests/manifests.rs" ||
    { echo "tests/manifests.rs has no const ${pin%%:*} to update" >&2; exit 1; }
done
bash "$root/charts/sync-files.sh"
echo "OpenReports CRDs at $module $resolved ($sum)" >&2
