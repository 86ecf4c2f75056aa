{{/* Names and labels, per Helm's conventions. */}}
{{- define "specserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specserve.fullname" -}}
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

{{- define "specserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "specserve.labels" -}}
helm.sh/chart: {{ include "specserve.chart" . }}
{{ include "specserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: specserve
{{- end }}

{{/* Ray pod templates carry no chart or app version: a change of the pod templates makes KubeRay build a
whole new RayCluster, which a chart upgrade alone must not do. */}}
{{- define "specserve.podLabels" -}}
{{ include "specserve.selectorLabels" . }}
app.kubernetes.io/part-of: specserve
{{ include "specserve.rayNodeLabel" . }}
{{- end }}

{{/* Marks this release's Ray pods (head and every worker group): the NetworkPolicy admits Ray's own traffic,
and Redis clients, from these pods only. */}}
{{- define "specserve.rayNodeLabel" -}}
specserve.io/ray-node: "true"
{{- end }}

{{- define "specserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "specserve.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "specserve.fullname" .) }}
{{- else }}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{/* Redis AUTH: the Secret holding the password (the chart's, or redis.auth.existingSecret) and where the
specserve pods mount it (server.redis_password_file: only the path goes into the Serve config). */}}
{{- define "specserve.redisAuth" -}}
{{- if .Values.redis.auth.enabled }}
{{- if or .Values.redis.enabled .Values.redis.auth.existingSecret }}true
{{- else if .Values.redis.externalUrl }}
{{- fail "redis.auth.existingSecret is required with redis.externalUrl (a Secret with the external Redis's password), or set redis.auth.enabled=false" }}
{{- end }}
{{- end }}
{{- end }}
{{- define "specserve.redisSecret" -}}
{{- default (printf "%s-redis" (include "specserve.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}
{{- define "specserve.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}
{{- define "specserve.redisPasswordFile" -}}/etc/specserve/redis/password{{- end }}

{{/* Ray token authentication: KubeRay puts the token of this Secret (key auth_token) into every Ray container. */}}
{{- define "specserve.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "specserve.fullname" .)) .Values.rayAuth.existingSecret }}
{{- end }}

{{/* A random secret value generated once and then kept: on upgrades the live Secret's value (lookup), else a
fresh one. (`helm template` and dry runs see no live objects and show a fresh value.)
Args: ctx (the root context), name (the Secret), key, length, prefix. */}}
{{- define "specserve.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- $data := (get ($live | default dict) "data") | default dict }}
{{- if hasKey $data .key }}
{{- index $data .key | b64dec }}
{{- else }}
{{- printf "%s%s" (.prefix | default "") (randAlphaNum (.length | int)) }}
{{- end }}
{{- end }}

{{- define "specserve.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "specserve.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "specserve.apiKeysFile" -}}/etc/specserve/api-keys/api-keys.yaml{{- end }}

{{/* The ports the ingress serves, from the specserve config (its defaults when unset). */}}
{{- define "specserve.httpPort" -}}
{{- (.Values.specserve.server | default dict).http_port | default 8000 }}
{{- end }}
{{/* Each ingress pod's own metrics port (its share of the app's series); the chart turns it on by default. */}}
{{- define "specserve.metricsPort" -}}
{{- $server := .Values.specserve.server | default dict }}
{{- if hasKey $server "metrics_port" }}{{ $server.metrics_port | int }}{{ else }}9100{{ end }}
{{- end }}
{{- define "specserve.grpcPort" -}}
{{- $server := .Values.specserve.server | default dict }}
{{- if hasKey $server "grpc_port" }}{{ $server.grpc_port | int }}{{ else }}9000{{ end }}
{{- end }}

{{/*
The Serve application's args: the user's specserve config with what the chart decides on top. Serve builds the
app from these alone (specserve.deploy.serve_config:app validates them with the same pydantic schema).
*/}}
{{- define "specserve.args" -}}
{{- $server := dict "host" "0.0.0.0" "redis_url" (include "specserve.redisUrl" .) "metrics_port" (include "specserve.metricsPort" . | int) }}
{{- if include "specserve.redisAuth" . }}
{{- $_ := set $server "redis_password_file" (include "specserve.redisPasswordFile" .) }}
{{- end }}
{{- $chart := dict "server" $server "model" (dict "cache_dir" .Values.modelCache.mountPath) }}
{{- if .Values.apiKeys.enabled }}
{{- $_ := set $chart "auth" (dict "api_keys_file" (include "specserve.apiKeysFile" .)) }}
{{- end }}
{{- mustMergeOverwrite (deepCopy .Values.specserve) $chart | toJson }}
{{- end }}

{{/* serveConfigV2: the shape `specserve deploy render` writes; deployment options come from the args in code. */}}
{{- define "specserve.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ include "specserve.httpPort" . }}
applications:
  - name: {{ (.Values.specserve.server | default dict).app_name | default "specserve" }}
    route_prefix: {{ (.Values.specserve.server | default dict).route_prefix | default "/" }}
    import_path: specserve.deploy.serve_config:app
    args: {{ include "specserve.args" . }}
{{- end }}

{{/* Volumes every Ray pod gets: the model cache, a writable /tmp (Ray's session directory /tmp/ray; the root
filesystem is read-only) and the Redis password. */}}
{{- define "specserve.rayVolumes" -}}
- name: model-cache
{{- if .Values.modelCache.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model-cache" (include "specserve.fullname" .)) .Values.modelCache.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if include "specserve.redisAuth" . }}
- name: redis-password
  secret:
    secretName: {{ include "specserve.redisSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ include "specserve.redisSecretKey" . }}
        path: {{ base (include "specserve.redisPasswordFile" .) }}
{{- end }}
{{- end }}

{{- define "specserve.rayVolumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
- name: tmp
  mountPath: /tmp
{{- if include "specserve.redisAuth" . }}
- name: redis-password
  mountPath: {{ dir (include "specserve.redisPasswordFile" .) }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "specserve.rayEnv" -}}
- name: SPECSERVE_CACHE
  value: {{ .Values.modelCache.mountPath | quote }}
- name: TOKENIZERS_PARALLELISM
  value: "false"
# Caches (Hugging Face, torch) under the writable /tmp: the root filesystem is read-only.
- name: XDG_CACHE_HOME
  value: /tmp/.cache
{{- end }}

{{/* Security settings of every pod and container the chart makes (values podSecurityContext and
containerSecurityContext; Redis overrides the user). */}}
{{- define "specserve.podSecurityContext" -}}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.podSecurityContext) (.override | default dict)) }}
{{- end }}
{{- define "specserve.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* An init container that fetches the model (and the draft model) into the cache before Ray starts on the pod:
a registry name is pulled, a hub id downloaded, a local directory checked. */}}
{{- define "specserve.pullModel" -}}
{{- if .Values.modelCache.pullOnStart }}
{{- $sources := list (.Values.specserve.model.source | default "smollm2-135m") }}
{{- with (.Values.specserve.speculative | default dict).draft_model }}{{ $sources = append $sources . }}{{ end }}
initContainers:
  - name: pull-model
    image: {{ include "specserve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["specserve", "models", "pull"{{ range $sources }}, {{ . | quote }}{{ end }}]
    env:
      {{- include "specserve.rayEnv" . | nindent 6 }}
    securityContext:
      {{- include "specserve.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - name: model-cache
        mountPath: {{ .Values.modelCache.mountPath }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end }}

{{/* rayStartParams values must be strings; custom resources go in as one JSON string. */}}
{{- define "specserve.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := .params }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- if .rayResources }}
{{- $_ := set $params "resources" (.rayResources | toJson | quote) }}
{{- end }}
{{- if .gpus }}
{{- $_ := set $params "num-gpus" (toString .gpus) }}
{{- end }}
{{- toYaml $params }}
{{- end }}
