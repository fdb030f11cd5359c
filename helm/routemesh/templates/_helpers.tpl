{{/* Names, labels and the pieces every routemesh pod shares. */}}

{{- define "routemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routemesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A service's resource name: {{ include "routemesh.component" (list $ "gateway") }} */}}
{{- define "routemesh.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "routemesh.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routemesh.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "routemesh.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "routemesh.labels" -}}
{{- $root := index . 0 -}}
{{ include "routemesh.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: routemesh
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The image: registry (global.imageRegistry first), repository, and the digest when
one is given, else the tag (the chart's appVersion by default). */}}
{{- define "routemesh.image" -}}
{{- $image := .Values.image -}}
{{- $registry := default $image.registry ((.Values.global | default dict).imageRegistry) -}}
{{- $repository := ternary (printf "%s/%s" $registry $image.repository) $image.repository (ne $registry "") -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- if hasPrefix "sha256:" (toString $image.tag) -}}
{{- fail "image.tag is a digest: give it as image.digest (the reference would be repository:sha256:...)" -}}
{{- end -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Pull secrets: global.imagePullSecrets and imagePullSecrets, by name. */}}
{{- define "routemesh.imagePullSecrets" -}}
{{- $names := concat ((.Values.global | default dict).imagePullSecrets | default list) .Values.imagePullSecrets | uniq -}}
{{- with $names }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "routemesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "routemesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Where the route config is read: the chart's or an existing ConfigMap, else the
example shipped in the image. */}}
{{- define "routemesh.routeConfigMap" -}}
{{- if .Values.routeConfig.existingConfigMap -}}
{{- .Values.routeConfig.existingConfigMap -}}
{{- else if .Values.routeConfig.files -}}
{{- printf "%s-routes" (include "routemesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "routemesh.routeConfigPath" -}}
{{- if include "routemesh.routeConfigMap" . -}}
{{- printf "/etc/routemesh-config/%s" .Values.routeConfig.fileName -}}
{{- else -}}
/etc/routemesh/lite-deep.yaml
{{- end -}}
{{- end -}}

{{/* How to reach Kafka: what the topics hook needs and every service gets. */}}
{{- define "routemesh.kafkaEnv" -}}
{{- $v := .Values -}}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not $v.kafka.sasl.existingSecret) -}}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.existingSecret: the Secret with the SASL username and password" $v.kafka.securityProtocol) -}}
{{- end -}}
- name: ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS
  value: {{ required "kafka.bootstrapServers is required: the brokers every service connects to" $v.kafka.bootstrapServers | quote }}
- name: ROUTEMESH_KAFKA_SECURITY_PROTOCOL
  value: {{ $v.kafka.securityProtocol | quote }}
- name: ROUTEMESH_KAFKA_SASL_MECHANISM
  value: {{ $v.kafka.saslMechanism | quote }}
{{- with $v.kafka.sasl.existingSecret }}
- name: ROUTEMESH_KAFKA_SASL_USERNAME
  valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: {{ $v.kafka.sasl.usernameKey | quote }}}}
- name: ROUTEMESH_KAFKA_SASL_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: {{ $v.kafka.sasl.passwordKey | quote }}}}
{{- end }}
{{- if $v.kafka.tls.existingSecret }}
- name: ROUTEMESH_KAFKA_SSL_CAFILE
  value: {{ printf "/etc/routemesh-kafka-tls/%s" $v.kafka.tls.caKey | quote }}
{{- if $v.kafka.tls.certKey }}
- name: ROUTEMESH_KAFKA_SSL_CERTFILE
  value: {{ printf "/etc/routemesh-kafka-tls/%s" $v.kafka.tls.certKey | quote }}
- name: ROUTEMESH_KAFKA_SSL_KEYFILE
  value: {{ printf "/etc/routemesh-kafka-tls/%s" $v.kafka.tls.keyKey | quote }}
{{- end }}
{{- end }}
- name: ROUTEMESH_TOPIC_PREFIX
  value: {{ $v.kafka.topicPrefix | quote }}
{{- end -}}

{{/* The settings a service gets: Kafka, Qdrant, telemetry, the route config (for the
services that read one), its grace period; then the chart's extraEnv. */}}
{{- define "routemesh.commonEnv" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- $v := $root.Values -}}
{{ include "routemesh.kafkaEnv" $root }}
{{- with $v.qdrant.url }}
- name: ROUTEMESH_QDRANT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $v.qdrant.existingSecret }}
- name: ROUTEMESH_QDRANT_API_KEY
  valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: {{ $v.qdrant.apiKeyKey | quote }}}}
{{- end }}
{{- if ne $svc.readsRouteConfig false }}
- name: ROUTEMESH_ROUTER_CONFIG
  value: {{ include "routemesh.routeConfigPath" $root | quote }}
{{- end }}
- name: ROUTEMESH_METRICS_PORT
  value: "9100"
- name: ROUTEMESH_SHUTDOWN_TIMEOUT_S
  value: {{ include "routemesh.shutdownTimeout" $root | quote }}
- name: ROUTEMESH_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: ROUTEMESH_INSTANCE_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- with $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
{{- with $v.otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* What a service has to drain on SIGTERM: the grace period less the preStop sleep and
a few seconds for the process to exit. */}}
{{- define "routemesh.shutdownTimeout" -}}
{{- max 1 (sub (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 5)) -}}
{{- end -}}

{{/* Volumes for the config and the Kafka TLS files, and their mounts. */}}
{{- define "routemesh.configVolumes" -}}
{{- with include "routemesh.routeConfigMap" . }}
- name: route-config
  configMap: {name: {{ . | quote }}}
{{- end }}
{{- with .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.emptyDirSizeLimit | quote }}}
{{- end -}}

{{/* Kafka's TLS files and /tmp only: for pods that read no route config. */}}
{{- define "routemesh.kafkaVolumes" -}}
{{- with .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.emptyDirSizeLimit | quote }}}
{{- end -}}

{{- define "routemesh.kafkaMounts" -}}
{{- if .Values.kafka.tls.existingSecret }}
- {name: kafka-tls, mountPath: /etc/routemesh-kafka-tls, readOnly: true}
{{- end }}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "routemesh.configMounts" -}}
{{- if include "routemesh.routeConfigMap" . }}
- {name: route-config, mountPath: /etc/routemesh-config, readOnly: true}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
- {name: kafka-tls, mountPath: /etc/routemesh-kafka-tls, readOnly: true}
{{- end }}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* A change to the route config or to any setting rolls the pods. */}}
{{- define "routemesh.configChecksum" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- list $root.Values.routeConfig $root.Values.kafka $root.Values.qdrant $root.Values.upstream $root.Values.auth $root.Values.otel $svc.env | toJson | sha256sum -}}
{{- end -}}

{{/* A probe from the probes block: the path on the metrics port and its timings. */}}
{{- define "routemesh.probe" -}}
{{- $path := index . 0 -}}
{{- $timing := index . 1 -}}
httpGet: {path: {{ $path }}, port: metrics}
{{ toYaml $timing }}
{{- end -}}

{{/* StatefulSet when the service keeps data on a volume of its own, else Deployment. */}}
{{- define "routemesh.kind" -}}
{{- $p := . | default dict -}}
{{- if and $p.enabled (not $p.shared) -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}

{{/* The claim every replica of a service mounts when its persistence is shared. */}}
{{- define "routemesh.sharedClaim" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}{{- $p := index . 2 -}}
{{- $p.existingClaim | default (printf "%s-data" (include "routemesh.component" (list $root $name))) -}}
{{- end -}}

{{/* The `helm test` pod of this release, as a NetworkPolicy peer: it calls the gateway
and its readiness, whatever gatewayFrom and metricsFrom allow. */}}
{{- define "routemesh.testPeer" -}}
- podSelector:
    matchLabels:
      {{- include "routemesh.selectorLabels" (list . "test") | nindent 6 }}
{{- end -}}
