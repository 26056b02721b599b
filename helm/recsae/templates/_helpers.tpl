{{- define "recsae.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "recsae.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "recsae.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recsae.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "recsae.labels" -}}
{{ include "recsae.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "recsae.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "recsae.bundlePath" -}}
{{ .Values.bundle.mountPath }}/{{ .Values.bundle.subPath }}
{{- end -}}

{{- define "recsae.adminSecretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "recsae.fullname" .)) -}}
{{- end -}}

{{- define "recsae.adminEnabled" -}}
{{- if or .Values.adminToken.existingSecret .Values.adminToken.value -}}true{{- end -}}
{{- end -}}

{{/* The Ray Serve config (ServeDeploySchema) that becomes spec.serveConfigV2. */}}
{{- define "recsae.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $bundle := include "recsae.bundlePath" . -}}
{{- $threads := max 1 (int (floor $s.numCpus)) -}}
{{- $userConfig := merge (dict "bundle" $bundle "threads" $threads) (deepCopy $s.userConfig) -}}
{{- $deployment := dict "name" "recsae" "user_config" $userConfig "health_check_period_s" 10 "health_check_timeout_s" 30 "graceful_shutdown_timeout_s" 20 -}}
{{- $replicas := ternary $s.autoscaling.maxReplicas $s.numReplicas $s.autoscaling.enabled -}}
{{- $ingress := dict "name" "ingress" "num_replicas" (int $s.ingressReplicas) "max_ongoing_requests" (mul (int $replicas) (int $s.maxOngoingRequests)) "max_queued_requests" (int $s.maxQueuedRequests) "backpressure_config" (dict "retry_after_s" $s.retryAfterS) -}}
{{- if $s.autoscaling.enabled -}}
{{- $_ := set $deployment "num_replicas" "auto" -}}
{{- $_ := set $deployment "autoscaling_config" (dict "min_replicas" $s.autoscaling.minReplicas "max_replicas" $s.autoscaling.maxReplicas "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) -}}
{{- else -}}
{{- $_ := set $deployment "num_replicas" $s.numReplicas -}}
{{- end -}}
{{- $app := dict "name" "recsae" "route_prefix" $s.routePrefix "import_path" "service.app:app" "args" (dict "bundle" $bundle "num_cpus" $s.numCpus "max_ongoing_requests" $s.maxOngoingRequests) "deployments" (list $ingress $deployment) -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int .Values.service.port)) "logging_config" (dict "log_level" "INFO" "enable_access_log" false) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pod pieces shared by head and workers. */}}
{{- define "recsae.podMetadata" -}}
labels:
  {{- include "recsae.selectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or .root.Values.metrics.annotations .root.Values.podAnnotations }}
annotations:
  {{- if and .root.Values.metrics.annotations (not .root.Values.metrics.podMonitor.enabled) }}
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .root.Values.metrics.port | quote }}
  prometheus.io/path: /metrics
  {{- end }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "recsae.env" -}}
- name: RECSAE_BUNDLE
  value: {{ include "recsae.bundlePath" . | quote }}
{{- if include "recsae.adminEnabled" . }}
- name: RECSAE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "recsae.adminSecretName" . }}
      key: {{ .Values.adminToken.key }}
{{- end }}
{{- end -}}

{{- define "recsae.volumeMounts" -}}
- name: bundle
  mountPath: {{ .Values.bundle.mountPath }}
  readOnly: true
{{- end -}}

{{- define "recsae.volumes" -}}
- name: bundle
{{- if eq .Values.bundle.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.bundle.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "recsae.initContainers" -}}
{{- if eq .Values.bundle.source "initContainer" }}
initContainers:
  - name: fetch-bundle
    image: {{ .Values.bundle.initContainer.image }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      {{- toYaml .Values.bundle.initContainer.command | nindent 6 }}
    env:
      - name: BUNDLE_DIR
        value: {{ include "recsae.bundlePath" . | quote }}
    volumeMounts:
      - name: bundle
        mountPath: {{ .Values.bundle.mountPath }}
    resources:
      {{- toYaml .Values.bundle.initContainer.resources | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The RayJob's pods: labelled apart from the serving pods (app.kubernetes.io/name differs), so that neither the
Service nor the PodMonitor selects them. */}}
{{- define "recsae.jobPodMetadata" -}}
labels:
  app.kubernetes.io/name: {{ include "recsae.name" .root }}-pipeline
  app.kubernetes.io/instance: {{ .root.Release.Name }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The RayJob's volume: the bundle PVC, writable (the RayService mounts the same claim read-only). */}}
{{- define "recsae.jobVolume" -}}
- name: bundle
  persistentVolumeClaim:
    claimName: {{ .Values.bundle.pvc.claimName }}
{{- end -}}
