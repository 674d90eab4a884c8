{{/* Names: the release name, unless it already contains the chart name; 40 characters leave room for the
     suffixes KubeRay and this chart add (-head-svc, -redis-headless) within the 63-character DNS limit. */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "splitserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "splitserve.gracePeriod" -}}
{{ add .Values.drain.deadlineSeconds .Values.drain.graceMarginSeconds }}
{{- end -}}

{{- define "splitserve.rayAddress" -}}
{{ include "splitserve.fullname" . }}-head-svc.{{ .Release.Namespace }}.svc.cluster.local:6379
{{- end -}}

{{- define "splitserve.routerUrl" -}}
{{ ternary "https" "http" (ne .Values.secrets.tls.name "") }}://{{ include "splitserve.fullname" . }}-router.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.router.service.httpPort }}
{{- end -}}

{{- define "splitserve.redisHost" -}}
{{- if eq .Values.redis.mode "external" -}}
{{ .Values.redis.external.host }}
{{- else -}}
{{ include "splitserve.fullname" . }}-redis.{{ .Release.Namespace }}.svc.cluster.local
{{- end -}}
{{- end -}}

{{- define "splitserve.redisPort" -}}
{{ ternary .Values.redis.external.port 6379 (eq .Values.redis.mode "external") }}
{{- end -}}

{{/* Env that every Ray process needs: token auth. The token is read from the Secret by the kubelet. */}}
{{- define "splitserve.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.rayToken.name }}
      key: {{ .Values.secrets.rayToken.key }}
{{- end -}}

{{/* The journal URL. The password enters through $(VAR) expansion of another env var, so the manifest holds
     only the Secret's name. */}}
{{- define "splitserve.redisEnv" -}}
{{- $scheme := ternary "rediss" "redis" (and (eq .Values.redis.mode "external") .Values.redis.external.tls) -}}
{{- if .Values.redis.auth.name }}
- name: SPLITSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.name }}
      key: {{ .Values.redis.auth.key }}
- name: SPLITSERVE_REDIS_URL
  value: {{ printf "%s://:$(SPLITSERVE_REDIS_PASSWORD)@%s:%s/%d" $scheme (include "splitserve.redisHost" .) (include "splitserve.redisPort" .) (int .Values.redis.db) | quote }}
{{- else }}
- name: SPLITSERVE_REDIS_URL
  value: {{ printf "%s://%s:%s/%d" $scheme (include "splitserve.redisHost" .) (include "splitserve.redisPort" .) (int .Values.redis.db) | quote }}
{{- end }}
{{- end -}}

{{/* Env shared by the router and the workers. */}}
{{- define "splitserve.commonEnv" -}}
{{ include "splitserve.rayAuthEnv" . }}
- name: SPLITSERVE_CACHE_DIR
  value: /cache
{{- if ne .Values.model.source "packaged" }}
- name: SPLITSERVE_MODEL
  value: {{ include "splitserve.modelPath" . | quote }}
{{- end }}
{{- end -}}

{{- define "splitserve.modelPath" -}}
{{ trimSuffix "/" (printf "%s/%s" .Values.model.mountPath .Values.model.subPath) }}
{{- end -}}

{{- define "splitserve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- end }}
- name: cache
  emptyDir: {}
{{- end -}}

{{- define "splitserve.modelMount" -}}
{{- if ne .Values.model.source "packaged" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
- name: cache
  mountPath: /cache
{{- end -}}

{{/* Pod placement for a group (head, prefill, decode, router): spot pools are chosen here. */}}
{{- define "splitserve.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Container resources; GPUs are added as both request and limit, as the device plugin requires. */}}
{{- define "splitserve.resources" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($r.limits | default dict)) -}}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) ($r.requests | default dict)) -}}
{{- end -}}
{{ toYaml $r }}
{{- end -}}

{{/* Refusals that a JSON schema cannot express (they compare two values). */}}
{{- define "splitserve.validate" -}}
{{- if eq .Values.device "cuda" }}
{{- range $role := list "prefill" "decode" }}
{{- $g := index $.Values $role }}
{{- if lt (int $g.gpus) (int $.Values.tensorParallel) }}
{{- fail (printf "%s.gpus (%d) must be >= tensorParallel (%d) when device is cuda" $role (int $g.gpus) (int $.Values.tensorParallel)) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $role := list "prefill" "decode" }}
{{- $g := index $.Values $role }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" $role (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if eq (int .Values.router.service.httpPort) (int .Values.router.service.grpcPort) }}
{{- fail "router.service.httpPort and router.service.grpcPort must differ" }}
{{- end }}
{{- end -}}
