{{/* Chart name. */}}
{{- define "recording-canary.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name, plus the chart name unless the release name already contains it. */}}
{{- define "recording-canary.fullname" -}}
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

{{- define "recording-canary.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "recording-canary.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recording-canary.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "recording-canary.labels" -}}
helm.sh/chart: {{ include "recording-canary.chart" . }}
{{ include "recording-canary.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: recording-canary
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "recording-canary.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recording-canary.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "recording-canary.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Sorted, de-duplicated watched namespaces. */}}
{{- define "recording-canary.watchNamespaces" -}}
{{- .Values.watchNamespaces | uniq | sortAlpha | join "," }}
{{- end }}

{{/*
The controller's rules. Keep this list exactly as narrow as the controller needs:
no secrets, no configmaps, no wildcards.
*/}}
{{- define "recording-canary.rules" -}}
- apiGroups: ["recordingcanary.dev"]
  resources: ["recordingcanaries"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["recordingcanary.dev"]
  resources: ["recordingcanaries/status"]
  verbs: ["get", "patch"]
- apiGroups: ["recordingcanary.dev"]
  resources: ["recordingcanaries/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
# Services: the user's are read; its own two per canary (<base>-stable, <base>-recording, the
# backends of the Gateway API router) are written, fenced to exactly those (fence-services).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["networking.istio.io"]
  resources: ["virtualservices", "destinationrules"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The Gateway API router: its own HTTPRoute, and splits of yours (fence-httproutes). GRPCRoutes
# are only read (a Service that has one is refused).
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["grpcroutes"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The API version of MutatingAdmissionPolicy that the cluster serves (GA v1 from Kubernetes 1.36,
beta v1beta1 in 1.34-1.35 when enabled), or nothing.
*/}}
{{- define "recording-canary.admissionPolicyApi" -}}
{{- if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy" }}
{{- "admissionregistration.k8s.io/v1" }}
{{- else if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1beta1/MutatingAdmissionPolicy" }}
{{- "admissionregistration.k8s.io/v1beta1" }}
{{- end }}
{{- end }}

{{/* Name of the stable-label MutatingAdmissionPolicy and its binding, when the chart installs them. */}}
{{- define "recording-canary.stableLabelPolicy" -}}
{{- if and .Values.stableLabelPolicy.enabled (include "recording-canary.admissionPolicyApi" .) }}
{{- printf "%s-stable-label" (include "recording-canary.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The label matchers that select this release's series in the alert rules: alerts.selector, or the
job of the metrics Service (what a ServiceMonitor of this chart scrapes it as).
*/}}
{{- define "recording-canary.alertSelector" -}}
{{- default (printf "job=%q" (printf "%s-metrics" (include "recording-canary.fullname" .))) .Values.alerts.selector }}
{{- end }}
