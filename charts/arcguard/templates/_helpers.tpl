{{/*
The chart renders the manifests in files/, exact copies of manifests/ (charts/sync-files.sh copies
them; tests/chart.rs keeps them equal), so `helm install` and `kubectl apply -k` install the
same objects. Values change the parsed objects, never the files.
*/}}

{{/* The labels kustomize puts on every object (manifests/base/kustomization.yaml). */}}
{{- define "arcguard.selectorLabels" -}}
app.kubernetes.io/name: arcguard
app.kubernetes.io/part-of: arcguard
{{- end }}

{{/* Labels on every object: kustomize's and Helm's own. */}}
{{- define "arcguard.labels" -}}
{{ include "arcguard.selectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
The objects of one file under files/ as a JSON list: `arcguard-system` (the namespace the
manifests name in metadata, webhook client configs, namespace selectors, match conditions and
RBAC subjects) becomes the release namespace, and every object gets the labels above.
Usage: include "arcguard.objects" (list $ "files/rbac.yaml") | fromJsonArray
*/}}
{{- define "arcguard.objects" -}}
{{- $root := index . 0 -}}
{{- include "arcguard.checkNamespace" $root -}}
{{- include "arcguard.checkValues" $root -}}
{{- $text := $root.Files.Get (index . 1) | replace "arcguard-system" $root.Release.Namespace -}}
{{- $objects := list -}}
{{- range $document := regexSplit "(?m)^---[ \t]*$" $text -1 -}}
{{- $object := fromYaml $document -}}
{{- if hasKey $object "Error" -}}
{{- fail (printf "files/%s: a document does not parse after the namespace was set: %s" (index $ 1) $object.Error) -}}
{{- end -}}
{{- if $object.kind -}}
{{- $metadata := $object.metadata -}}
{{- $labels := mergeOverwrite (default dict $metadata.labels) (include "arcguard.labels" $root | fromYaml) -}}
{{- $_ := set $metadata "labels" $labels -}}
{{- $objects = append $objects $object -}}
{{- end -}}
{{- end -}}
{{- toJson $objects -}}
{{- end }}

{{/*
The release namespace holds arcguard alone: the webhooks exempt it (arcguard must never wait on
itself), and its ServiceAccount may patch arcguard's webhook configurations. Installed into a
shared namespace (Helm's `default` when -n is left out, or kube-*), everyone who may create pods
there would be exempt from enforcement, and could run a pod as arcguard. The name is also
checked to be one the files can carry unquoted (a DNS label that YAML reads as a string).
*/}}
{{- define "arcguard.checkNamespace" -}}
{{- $ns := .Release.Namespace -}}
{{- if or (eq $ns "default") (hasPrefix "kube-" $ns) -}}
{{- fail (printf "install arcguard into a namespace of its own (helm install -n arcguard-system --create-namespace), not %q: the webhooks exempt the release namespace, so every pod created there would escape enforcement" $ns) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $ns) -}}
{{- fail (printf "namespace %q: use a DNS label that starts with a letter (e.g. arcguard-system)" $ns) -}}
{{- end -}}
{{- if has $ns (list "y" "n" "yes" "no" "on" "off" "true" "false" "null") -}}
{{- fail (printf "namespace %q reads as a YAML boolean or null; choose another name (e.g. arcguard-system)" $ns) -}}
{{- end -}}
{{- end }}

{{/* Value combinations that would render a broken install. */}}
{{- define "arcguard.checkValues" -}}
{{- if and .Values.certManager.enabled .Values.webhooks.url -}}
{{- fail "certManager.enabled with webhooks.url: cert-manager's serving certificate names only the arcguard Service, so a webhook reached by URL would fail every TLS handshake (and, failing closed, every reviewed request); use one or the other" -}}
{{- end -}}
{{- end }}
