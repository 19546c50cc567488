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
{{- $text := $root.Files.Get (index . 1) | replace "arcguard-system" $root.Release.Namespace -}}
{{- $objects := list -}}
{{- range $document := regexSplit "(?m)^---[ \t]*$" $text -1 -}}
{{- $object := fromYaml $document -}}
{{- if $object.kind -}}
{{- $metadata := $object.metadata -}}
{{- $labels := mergeOverwrite (default dict $metadata.labels) (include "arcguard.labels" $root | fromYaml) -}}
{{- $_ := set $metadata "labels" $labels -}}
{{- $objects = append $objects $object -}}
{{- end -}}
{{- end -}}
{{- toJson $objects -}}
{{- end }}
