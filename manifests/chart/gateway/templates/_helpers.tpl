{{/* The gateway's name: `name`, else the release's. */}}
{{- define "gateway.name" -}}
{{- .Values.name | default .Release.Name -}}
{{- end }}

{{- define "gateway.serviceAccount" -}}
{{- .Values.serviceAccount.name | default (include "gateway.name" .) -}}
{{- end }}

{{/* What the Deployment and the Service select: Istio's two labels, app and istio. */}}
{{- define "gateway.selectorLabels" -}}
app: {{ .Values.labels.app | default (include "gateway.name" .) | quote }}
istio: {{ .Values.labels.istio | default (include "gateway.name" . | trimPrefix "istio-") | quote }}
{{- end }}

{{/* Every label of the gateway's pods: what Gateways may select, and GATEWAY_LABELS. Never
captured by ztunnel (it sends HBONE itself) nor given a sidecar. */}}
{{- define "gateway.podLabels" -}}
{{ include "gateway.selectorLabels" . }}
{{- range $key, $value := .Values.labels }}
{{- if not (has $key (list "app" "istio")) }}
{{ $key | quote }}: {{ $value | quote }}
{{- end }}
{{- end }}
app.kubernetes.io/name: {{ include "gateway.name" . | quote }}
app.kubernetes.io/part-of: ambient-mesh
istio.io/dataplane-mode: none
sidecar.istio.io/inject: "false"
{{- end }}

{{/* The pod labels as GATEWAY_LABELS reads them: k=v,k=v. */}}
{{- define "gateway.labelList" -}}
{{- $pairs := list }}
{{- range $key, $value := include "gateway.podLabels" . | fromYaml }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Labels of the other objects. */}}
{{- define "gateway.labels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . | quote }}
app.kubernetes.io/part-of: ambient-mesh
{{- end }}
