{{- define "bonebridge.fullname" -}}
{{- printf "%s-bonebridge" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bonebridge.labels" -}}
app.kubernetes.io/name: bonebridge
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bonebridge.selector" -}}
app.kubernetes.io/name: bonebridge
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bonebridge.broker" -}}
{{- if .Values.broker -}}
{{- .Values.broker -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "bonebridge.fullname" .) -}}
{{- else -}}
{{- fail "set broker (a redis:// URL) or redis.enabled=true: listener and workers need a shared queue" -}}
{{- end -}}
{{- end -}}

{{- define "bonebridge.spoolClaim" -}}
{{- default (printf "%s-spool" (include "bonebridge.fullname" .)) .Values.spool.existingClaim -}}
{{- end -}}

{{/* The pod spec parts listener and worker share: user, config and spool mounts. */}}
{{- define "bonebridge.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.securityContext.runAsUser }}
  runAsGroup: {{ .Values.securityContext.runAsGroup }}
  fsGroup: {{ .Values.securityContext.fsGroup }}
{{- end -}}

{{- define "bonebridge.volumes" -}}
volumes:
  - name: config
    configMap:
      name: {{ include "bonebridge.fullname" . }}-config
  - name: spool
    persistentVolumeClaim:
      claimName: {{ include "bonebridge.spoolClaim" . }}
{{- end -}}

{{- define "bonebridge.volumeMounts" -}}
volumeMounts:
  - name: config
    mountPath: /etc/bonebridge
    readOnly: true
  - name: spool
    mountPath: /var/lib/bonebridge
{{- end -}}
