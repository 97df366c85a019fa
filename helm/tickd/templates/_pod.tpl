{{/*
The pod template of tickd, shared by the StatefulSet (embedded store, one pod with a volume)
and the Deployment (PostgreSQL, any number of pods, no volume). Rendered at indentation 0; the
callers indent it.
*/}}
{{- define "tickd.podTemplate" -}}
{{- if and .Values.tls.enabled (has (int .Values.health.port) (list (int .Values.service.grpcPort) (int .Values.service.metricsPort))) }}
{{- fail (printf "health.port (%d) must differ from service.grpcPort and service.metricsPort: it is a third listener, serving only grpc.health.v1 in plaintext for the probes." (int .Values.health.port)) }}
{{- end }}
template:
  metadata:
    {{- with .Values.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    labels:
      {{- include "tickd.labels" . | nindent 6 }}
      {{- with .Values.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    serviceAccountName: {{ include "tickd.serviceAccountName" . }}
    automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
    terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    containers:
      - name: tickd
        image: {{ include "tickd.image" . | quote }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        ports:
          - name: grpc
            containerPort: {{ .Values.service.grpcPort }}
            protocol: TCP
          - name: metrics
            containerPort: {{ .Values.service.metricsPort }}
            protocol: TCP
          {{- if .Values.tls.enabled }}
          - name: health
            containerPort: {{ .Values.health.port }}
            protocol: TCP
          {{- end }}
        env:
          - name: TICKD_LISTEN
            value: "0.0.0.0:{{ .Values.service.grpcPort }}"
          - name: TICKD_METRICS_LISTEN
            value: "0.0.0.0:{{ .Values.service.metricsPort }}"
          {{- if or .Values.tls.enabled .Values.auth.existingSecret }}
          # TLS and auth files come from Secrets mounted as directories (see volumeMounts), so
          # that renewed certificates and edited principals reach tickd without a restart.
          {{- end }}
          {{- if .Values.tls.enabled }}
          - name: TICKD_TLS_CERT
            value: /etc/tickd/tls/tls.crt
          - name: TICKD_TLS_KEY
            value: /etc/tickd/tls/tls.key
          {{- end }}
          {{- if .Values.tls.clientCA.secretName }}
          - name: TICKD_TLS_CLIENT_CA
            value: {{ printf "/etc/tickd/client-ca/%s" .Values.tls.clientCA.key | quote }}
          {{- end }}
          {{- if .Values.auth.existingSecret }}
          - name: TICKD_AUTH_FILE
            value: {{ printf "/etc/tickd/auth/%s" .Values.auth.key | quote }}
          {{- end }}
          {{- if .Values.tls.enabled }}
          - name: TICKD_HEALTH_LISTEN
            value: "0.0.0.0:{{ .Values.health.port }}"
          {{- end }}
          - name: TICKD_RELOAD_INTERVAL
            value: {{ .Values.tickd.reloadInterval | quote }}
          {{- if .Values.database.existingSecret }}
          - name: TICKD_DATABASE_URL
            valueFrom:
              secretKeyRef:
                name: {{ .Values.database.existingSecret | quote }}
                key: {{ .Values.database.secretKey | quote }}
          - name: TICKD_DATABASE_POLL_INTERVAL
            value: {{ .Values.database.pollInterval | quote }}
          - name: TICKD_DATABASE_NOTIFY
            value: {{ .Values.database.notify | quote }}
          - name: TICKD_DATABASE_MAX_CONNECTIONS
            value: {{ .Values.database.maxConnections | int64 | quote }}
          {{- else }}
          - name: TICKD_DATA_DIR
            value: /var/lib/tickd
          {{- end }}
          - name: TICKD_LOG
            value: {{ .Values.tickd.log | quote }}
          - name: TICKD_LOG_FORMAT
            value: {{ .Values.tickd.logFormat | quote }}
          - name: TICKD_MAX_PAYLOAD_BYTES
            value: {{ .Values.tickd.maxPayloadBytes | int64 | quote }}
          - name: TICKD_MAX_CATCH_UP_FIRES
            value: {{ .Values.tickd.maxCatchUpFires | int64 | quote }}
          - name: TICKD_MAX_REDELIVERY_BACKOFF
            value: {{ .Values.tickd.maxRedeliveryBackoff | quote }}
          - name: TICKD_MAX_QUEUE_BACKLOG
            value: {{ .Values.tickd.maxQueueBacklog | int64 | quote }}
          - name: TICKD_MAX_SUBSCRIBERS
            value: {{ .Values.tickd.maxSubscribers | int64 | quote }}
          - name: TICKD_SUBSCRIBE_OPEN_TIMEOUT
            value: {{ .Values.tickd.subscribeOpenTimeout | quote }}
          - name: TICKD_RETENTION
            value: {{ .Values.tickd.retention | quote }}
          - name: TICKD_LEDGER_RETENTION
            value: {{ .Values.tickd.ledgerRetention | quote }}
          - name: TICKD_LEDGER_MAX_PER_JOB
            value: {{ .Values.tickd.ledgerMaxPerJob | int64 | quote }}
          - name: TICKD_SHUTDOWN_GRACE
            value: {{ .Values.tickd.shutdownGrace | quote }}
          - name: TICKD_REQUEST_TIMEOUT
            value: {{ .Values.tickd.requestTimeout | quote }}
          - name: TICKD_MAX_CONCURRENT_REQUESTS
            value: {{ .Values.tickd.maxConcurrentRequests | int64 | quote }}
          - name: TICKD_HTTP2_KEEPALIVE_INTERVAL
            value: {{ .Values.tickd.http2KeepaliveInterval | quote }}
          - name: TICKD_HTTP2_KEEPALIVE_TIMEOUT
            value: {{ .Values.tickd.http2KeepaliveTimeout | quote }}
          {{- with .Values.otel.endpoint }}
          - name: OTEL_EXPORTER_OTLP_ENDPOINT
            value: {{ . | quote }}
          {{- end }}
          {{- with .Values.otel.serviceName }}
          - name: OTEL_SERVICE_NAME
            value: {{ . | quote }}
          {{- end }}
          {{- with .Values.otel.resourceAttributes }}
          - name: OTEL_RESOURCE_ATTRIBUTES
            value: {{ . | quote }}
          {{- end }}
          {{- with .Values.otel.tracesSampler }}
          - name: OTEL_TRACES_SAMPLER
            value: {{ . | quote }}
          {{- end }}
          {{- with .Values.otel.tracesSamplerArg }}
          - name: OTEL_TRACES_SAMPLER_ARG
            value: {{ . | quote }}
          {{- end }}
          {{- with .Values.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        # Native gRPC probes against grpc.health.v1. Readiness (the empty service name) is
        # SERVING only while tickd can commit (with PostgreSQL: reach the database) and its
        # timer runs, and turns NOT_SERVING as soon
        # as shutdown starts, so traffic moves away before streams are ended; a full disk
        # makes the pod unready until space is freed. Liveness asks the "liveness" service,
        # which fails only when the core has died (tickd then also exits non-zero).
        # A kubelet probe cannot speak TLS: with tls.enabled the probes call the plaintext
        # health port, which reports the same statuses and serves nothing else. (Health needs
        # no token: the auth file governs the Scheduler service only.)
        startupProbe:
          grpc:
            port: {{ include "tickd.probePort" . }}
          periodSeconds: 2
          failureThreshold: 60
        livenessProbe:
          grpc:
            port: {{ include "tickd.probePort" . }}
            service: liveness
          periodSeconds: 10
          failureThreshold: 3
        readinessProbe:
          grpc:
            port: {{ include "tickd.probePort" . }}
          periodSeconds: 5
          failureThreshold: 2
        resources:
          {{- toYaml .Values.resources | nindent 10 }}
        {{- if or (not .Values.database.existingSecret) .Values.tls.enabled .Values.auth.existingSecret }}
        # Secrets are mounted as directories, never with subPath: a subPath mount keeps
        # the file it started with, so a renewed certificate would never reach tickd.
        volumeMounts:
          {{- if not .Values.database.existingSecret }}
          - name: data
            mountPath: /var/lib/tickd
          {{- end }}
          {{- if .Values.tls.enabled }}
          - name: tls
            mountPath: /etc/tickd/tls
            readOnly: true
          {{- end }}
          {{- if .Values.tls.clientCA.secretName }}
          - name: client-ca
            mountPath: /etc/tickd/client-ca
            readOnly: true
          {{- end }}
          {{- if .Values.auth.existingSecret }}
          - name: auth
            mountPath: /etc/tickd/auth
            readOnly: true
          {{- end }}
        {{- end }}
    {{- if or .Values.tls.enabled .Values.auth.existingSecret }}
    # Only the keys tickd reads are projected (0440: the pod's fsGroup may read them, nobody
    # may write). A missing key keeps the pod from starting, with the reason in its events.
    volumes:
      {{- if .Values.tls.enabled }}
      - name: tls
        secret:
          secretName: {{ .Values.tls.secretName | quote }}
          defaultMode: 0440
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
      {{- with .Values.tls.clientCA.secretName }}
      - name: client-ca
        secret:
          secretName: {{ . | quote }}
          defaultMode: 0440
          items:
            - key: {{ $.Values.tls.clientCA.key | quote }}
              path: {{ $.Values.tls.clientCA.key | quote }}
      {{- end }}
      {{- with .Values.auth.existingSecret }}
      - name: auth
        secret:
          secretName: {{ . | quote }}
          defaultMode: 0440
          items:
            - key: {{ $.Values.auth.key | quote }}
              path: {{ $.Values.auth.key | quote }}
      {{- end }}
    {{- end }}
    {{- with .Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if .Values.affinity }}
    affinity:
      {{- toYaml .Values.affinity | nindent 6 }}
    {{- else if and .Values.database.existingSecret .Values.podAntiAffinity }}
    # Replicas on different nodes, so that losing a node loses one replica.
    affinity:
      podAntiAffinity:
        {{- if eq .Values.podAntiAffinity "hard" }}
        requiredDuringSchedulingIgnoredDuringExecution:
          - topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "tickd.selectorLabels" . | nindent 16 }}
        {{- else }}
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  {{- include "tickd.selectorLabels" . | nindent 18 }}
        {{- end }}
    {{- end }}
    {{- with .Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
