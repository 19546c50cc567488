#!/usr/bin/env bash
# Copies the manifests the chart renders from into charts/arcguard/files/. Helm cannot read files
# outside a chart, so the chart keeps exact copies; tests/chart.rs fails when one drifts (and
# when the rendered chart differs from kustomize's output). Run after changing manifests/.
set -euo pipefail
cd "$(dirname "$0")/.."
files=charts/arcguard/files
rm -rf "$files"
mkdir -p "$files/policies" "$files/monitoring" "$files/cert-manager" "$files/reports"
cp manifests/base/{namespace,crds,rbac,service,deployment,webhooks}.yaml "$files/"
cp manifests/components/policies/*.yaml "$files/policies/"
rm "$files/policies/kustomization.yaml"
cp manifests/components/monitoring/{servicemonitor.yaml,prometheusrule.yaml,dashboard.json} "$files/monitoring/"
cp manifests/components/networkpolicy/networkpolicy.yaml "$files/"
cp manifests/overlays/cert-manager/certificates.yaml "$files/cert-manager/"
cp manifests/components/reports/openreports.io_{reports,clusterreports}.yaml "$files/reports/"
echo "copied manifests into $files" >&2
