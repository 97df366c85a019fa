{{/*
Chart name, truncated to the 63 characters Kubernetes allows in names.
*/}}
{{- define "tickd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: release and chart name, unless fullnameOverride is set.
*/}}
{{- define "tickd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "tickd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "tickd.labels" -}}
helm.sh/chart: {{ include "tickd.chart" . }}
{{ include "tickd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "tickd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tickd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount.
*/}}
{{- define "tickd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tickd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "tickd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Labels of the `helm test` pod: the release's, without the selector pair.
*/}}
{{- define "tickd.testLabels" -}}
helm.sh/chart: {{ include "tickd.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the StatefulSet: at most 52 characters, so that the controller-revision-hash label of its
pods (name plus a hash) stays within 63.
*/}}
{{- define "tickd.statefulsetName" -}}
{{- include "tickd.fullname" . | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the headless Service that governs the StatefulSet.
*/}}
{{- define "tickd.headlessName" -}}
{{- printf "%s-headless" (include "tickd.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
Port the pod's gRPC probes call: with tls.enabled the plaintext health port, since a kubelet
gRPC probe cannot speak TLS.
*/}}
{{- define "tickd.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.health.port }}{{ else }}{{ .Values.service.grpcPort }}{{ end }}
{{- end }}

{{/*
appProtocol of the gRPC port: cleartext HTTP/2, or, with tls.enabled, "https" so that a mesh or
gateway passes tickd's own TLS through instead of reading it as cleartext.
*/}}
{{- define "tickd.grpcAppProtocol" -}}
{{- if .Values.tls.enabled }}https{{ else }}kubernetes.io/h2c{{ end }}
{{- end }}
