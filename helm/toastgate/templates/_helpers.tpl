{{/* Names ---------------------------------------------------------------- */}}

{{- define "toastgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "toastgate.fullname" -}}
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

{{- define "toastgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "toastgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "toastgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels without app.kubernetes.io/component, for objects that are not
the gateway itself (the admin Service: component "admin"). */}}
{{- define "toastgate.commonLabels" -}}
helm.sh/chart: {{ include "toastgate.chart" . }}
{{ include "toastgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "toastgate.labels" -}}
{{ include "toastgate.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The admin Service's labels: the ServiceMonitor selects on component
"admin", which the public Service does not carry. */}}
{{- define "toastgate.adminServiceLabels" -}}
{{ include "toastgate.commonLabels" . }}
app.kubernetes.io/component: admin
{{- end }}

{{- define "toastgate.adminServiceName" -}}
{{- printf "%s-admin" (include "toastgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The `helm test` pod's labels. Its app.kubernetes.io/name differs from
the gateway's, so no Service, PDB or NetworkPolicy of the release selects
it; the NetworkPolicy lets it reach the admin port by these labels. */}}
{{- define "toastgate.testSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-test" (include "toastgate.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "toastgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "toastgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "toastgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Secrets ------------------------------------------------------------- */}}

{{/* The Secret mounted at secrets.mountPath: existing, chart-created, or none (""). */}}
{{- define "toastgate.secretName" -}}
{{- if and .Values.secrets.existingSecret .Values.secrets.stringData }}
{{- fail "secrets: set either secrets.existingSecret or secrets.stringData, not both" }}
{{- end }}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.secrets.stringData }}
{{- include "toastgate.fullname" . }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis URL, as "name/key", or "". */}}
{{- define "toastgate.redisSecretRef" -}}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "redis: set either redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- printf "%s/%s" .Values.redis.existingSecret (required "redis.existingSecretKey is required with redis.existingSecret" .Values.redis.existingSecretKey) }}
{{- else if .Values.redis.url }}
{{- printf "%s-redis/url" (include "toastgate.fullname" .) }}
{{- end }}
{{- end }}

{{/* Config -------------------------------------------------------------- */}}

{{/* The config as YAML text: .Values.config given as a string (verbatim) or
a map, or, while it is empty, the chart's files/example-config.yaml. */}}
{{- define "toastgate.configText" -}}
{{- $cfg := .Values.config }}
{{- if and (kindIs "string" $cfg) (ne (trim $cfg) "") }}
{{- $cfg }}
{{- else if and (kindIs "map" $cfg) (gt (len $cfg) 0) }}
{{- toYaml $cfg }}
{{- else if or (empty $cfg) (and (kindIs "string" $cfg) (eq (trim $cfg) "")) }}
{{- .Files.Get "files/example-config.yaml" }}
{{- else }}
{{- fail "config must be the toastgate config, as a YAML string or a map" }}
{{- end }}
{{- end }}

{{/* The config parsed into a map (for the chart's own checks). */}}
{{- define "toastgate.configMap" -}}
{{- $parsed := include "toastgate.configText" . | fromYaml }}
{{- if hasKey $parsed "Error" }}
{{- fail (printf "config is not valid YAML (or not a mapping): %s" (get $parsed "Error")) }}
{{- end }}
{{- toYaml $parsed }}
{{- end }}

{{/* The `listen` block the chart owns, from listenAddress and ports. */}}
{{- define "toastgate.listen" -}}
{{- $host := .Values.listenAddress | toString }}
{{- if contains ":" $host }}
{{- $host = printf "[%s]" (trimAll "[]" $host) }}
{{- end -}}
listen:
  public: "{{ $host }}:{{ .Values.ports.public }}"
  admin: "{{ $host }}:{{ .Values.ports.admin }}"
{{- if .Values.tls.enabled }}
  # From the Secret `tls.secretName` mounted as a folder (no subPath), so a
  # renewed certificate reaches the pod and toastgate re-reads the files.
  tls:
    cert_file: "{{ include "toastgate.tlsMountPath" . }}/tls.crt"
    key_file: "{{ include "toastgate.tlsMountPath" . }}/tls.key"
{{- end }}
{{- end }}

{{/* TLS on the public listener ---------------------------------------- */}}

{{/* The kubernetes.io/tls Secret for the public listener, or "" when TLS is
off. */}}
{{- define "toastgate.tlsSecretName" -}}
{{- if .Values.tls.enabled }}
{{- required "tls.enabled needs tls.secretName: a Secret of type kubernetes.io/tls (keys tls.crt and tls.key), e.g. the one a cert-manager Certificate writes" .Values.tls.secretName }}
{{- end }}
{{- end }}

{{- define "toastgate.tlsMountPath" -}}
{{- .Values.tls.mountPath | trimSuffix "/" }}
{{- end }}

{{/* The config file as mounted: the user's config followed by the chart's
listen block (with listen.tls when tls.enabled). A string config is kept
verbatim (with its comments). */}}
{{- define "toastgate.configFile" -}}
{{- $parsed := include "toastgate.configMap" . | fromYaml }}
{{- if not (kindIs "map" $parsed) }}
{{- fail "config must be a YAML mapping (the toastgate config)" }}
{{- end }}
{{- if hasKey $parsed "listen" }}
{{- fail "config.listen is set by the chart from listenAddress and ports.public / ports.admin: remove `listen` from config" }}
{{- end }}
{{- if eq (int .Values.ports.public) (int .Values.ports.admin) }}
{{- fail "ports.public and ports.admin must differ" }}
{{- end }}
{{- include "toastgate.configText" . | trimSuffix "\n" }}

# Written by the Helm chart from listenAddress, ports.public / ports.admin and tls:
{{ include "toastgate.listen" . }}
{{ end }}

{{/* Seconds in a humantime duration ("30s", "1m30s", "500ms", "2min"), or
"" when it uses a form this parser does not know. */}}
{{- define "toastgate.durationSeconds" -}}
{{- $text := . | toString | lower | nospace }}
{{- $units := dict "ms" 0.001 "msec" 0.001 "s" 1 "sec" 1 "secs" 1 "second" 1 "seconds" 1 "m" 60 "min" 60 "mins" 60 "minute" 60 "minutes" 60 "h" 3600 "hr" 3600 "hrs" 3600 "hour" 3600 "hours" 3600 }}
{{- $parts := regexFindAll "[0-9]+[a-z]+" $text -1 }}
{{- if and $parts (eq (join "" $parts) $text) }}
{{- $total := 0.0 }}
{{- $ok := true }}
{{- range $parts }}
{{- $n := regexFind "^[0-9]+" . }}
{{- $u := trimPrefix $n . }}
{{- if hasKey $units $u }}
{{- $total = addf $total (mulf (float64 $n) (get $units $u)) }}
{{- else }}
{{- $ok = false }}
{{- end }}
{{- end }}
{{- if $ok }}{{ ceil $total | int }}{{ end }}
{{- end }}
{{- end }}

{{/* Fails when terminationGracePeriodSeconds would kill a drain early: the
preStop sleep, then server.drain_delay (the listener still serving), then up
to server.shutdown_grace for requests in flight. */}}
{{- define "toastgate.checkGrace" -}}
{{- $cfg := include "toastgate.configMap" . | fromYaml }}
{{- $server := get $cfg "server" | default dict }}
{{- $graceText := get $server "shutdown_grace" | default "30s" }}
{{- $grace := include "toastgate.durationSeconds" $graceText }}
{{- $drainText := get $server "drain_delay" | default "0s" }}
{{- $drain := include "toastgate.durationSeconds" $drainText }}
{{- if and $grace $drain }}
{{- $sleep := int (.Values.lifecycle.preStopSleepSeconds | default 0) }}
{{- $need := add (int $grace) (int $drain) $sleep }}
{{- if le (int .Values.terminationGracePeriodSeconds) $need }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config server.shutdown_grace (%s: %ss) + server.drain_delay (%s: %ss) + lifecycle.preStopSleepSeconds (%d), or SIGKILL cuts the drain short" (int .Values.terminationGracePeriodSeconds) $graceText $grace $drainText $drain $sleep) }}
{{- end }}
{{- end }}
{{- end }}
