//! Logs and traces: the global tracing subscriber, the OpenTelemetry pipeline behind it, and
//! the spans of a job's fires.
//!
//! Logs go to stdout as text or JSON; inside a span, a JSON line carries that span's
//! `trace_id` and `span_id`. Traces are exported over OTLP/gRPC (batched) only when an OTLP
//! endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`); the standard `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` are
//! honoured by the SDK. [`FireTracer`] turns the core's fire events into spans.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    Link, SpanContext, SpanKind, TraceContextExt, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::domain::{FireRecord, Job, Timestamp, TraceContext};
use crate::scheduler::{Observer, RedeliveryReason};

/// The instrumentation scope of tickd's spans.
pub const TRACER_NAME: &str = "tickd";
/// Service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "tickd";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with trace_id and span_id inside a span.
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// tracing EnvFilter directives, e.g. `info,tickd=debug`.
    pub log_filter: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for traces; `None` exports nothing.
    pub otlp_traces_endpoint: Option<String>,
    /// How long spans wait in the batch before export (the SDK default is 5 s).
    pub export_delay: Option<Duration>,
}

impl TelemetryOptions {
    /// The OTLP traces endpoint from the standard environment variables, if any is set and
    /// `OTEL_TRACES_EXPORTER` is not `none`.
    pub fn otlp_endpoint_from_env() -> Option<String> {
        if std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none") {
            return None;
        }
        [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    #[error("cannot build the OTLP exporter for {0}: {1}")]
    Exporter(String, String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every span still waiting in the batch.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }

    /// Flushes and stops the trace pipeline.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("tickd: flushing spans at shutdown failed: {e}");
        }
    }
}

/// Installs the global subscriber (logs, and traces when an endpoint is set) and the W3C trace
/// context and baggage propagators. Call once, inside the Tokio runtime.
pub fn init(options: &TelemetryOptions) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&options.log_filter)
        .map_err(|e| TelemetryError::Filter(options.log_filter.clone(), e.to_string()))?;
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));

    let provider = match &options.otlp_traces_endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint, options.export_delay)?),
        None => None,
    };
    // Spans go to OpenTelemetry at INFO and above whatever the log filter says, so quieter
    // logs do not cost traces.
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(TRACER_NAME))
            .with_filter(LevelFilter::INFO)
    });
    if let Some(p) = &provider {
        global::set_tracer_provider(p.clone());
    }

    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry().with(otel_layer);
    let installed = match options.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_filter(filter),
            )
            .try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

fn tracer_provider(
    endpoint: &str,
    export_delay: Option<Duration>,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(endpoint.to_string(), e.to_string()))?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(delay) = export_delay {
        batch = batch.with_scheduled_delay(delay);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// The W3C trace context of `cx`'s span; `None` when it has no valid (sampled or not) span.
pub fn trace_context_of(cx: &Context) -> Option<TraceContext> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    Some(TraceContext {
        traceparent: carrier.remove("traceparent").unwrap_or_default(),
        tracestate: carrier.remove("tracestate").unwrap_or_default(),
    })
}

/// The span context a stored trace context names (invalid if it names none).
pub fn span_context_of(trace: &TraceContext) -> SpanContext {
    let carrier = HashMap::from([
        ("traceparent".to_string(), trace.traceparent.clone()),
        ("tracestate".to_string(), trace.tracestate.clone()),
    ]);
    TraceContextPropagator::new()
        .extract(&carrier)
        .span()
        .span_context()
        .clone()
}

/// Turns the core's fire events into spans.
///
/// Each fire starts a trace of its own: a `fire <queue>` span (kind PRODUCER) with a link to
/// the span of the Schedule call that created the job. A job can fire for months, so a child
/// of that call would make one trace without end; the link keeps each fire's trace small and
/// still leads back to who scheduled it. The fire span's context is stored with the fire and
/// sent as the Fire's `traceparent`, so the worker's span is its child, and every later step
/// of the fire (each delivery, a redelivery, the ack, dead-lettering) is a short child span of
/// it too, also after a restart.
#[derive(Debug, Default)]
pub struct FireTracer;

fn fire_attributes(fire: &FireRecord) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", "tickd"),
        KeyValue::new("messaging.destination.name", fire.queue.clone()),
        KeyValue::new("messaging.message.id", fire.fire_id.clone()),
        KeyValue::new("tickd.job.id", fire.job_id.to_string()),
        KeyValue::new("tickd.queue", fire.queue.clone()),
        KeyValue::new("tickd.fire.id", fire.fire_id.clone()),
        KeyValue::new("tickd.fire.attempt", i64::from(fire.attempt)),
    ]
}

impl FireTracer {
    /// A finished child span of the fire's span.
    fn step(&self, fire: &FireRecord, name: String, kind: SpanKind, extra: Vec<KeyValue>) {
        let Some(trace) = &fire.trace else {
            return;
        };
        let parent = Context::new().with_remote_span_context(span_context_of(trace));
        let tracer = global::tracer(TRACER_NAME);
        let mut attributes = fire_attributes(fire);
        attributes.extend(extra);
        let _span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
    }
}

impl Observer for FireTracer {
    fn fire_released(&self, fire: &FireRecord, job: &Job) -> Option<TraceContext> {
        let tracer = global::tracer(TRACER_NAME);
        let links = job
            .status
            .trace
            .as_ref()
            .map(span_context_of)
            .filter(SpanContext::is_valid)
            .map(|sc| vec![Link::with_context(sc)])
            .unwrap_or_default();
        let mut attributes = fire_attributes(fire);
        attributes.push(KeyValue::new("messaging.operation.type", "create"));
        attributes.push(KeyValue::new(
            "tickd.fire.scheduled_time",
            fire.scheduled_time.to_string(),
        ));
        let span = tracer
            .span_builder(format!("fire {}", fire.queue))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&tracer, &Context::new());
        trace_context_of(&Context::new().with_span(span))
    }

    fn fire_delivered(&self, fire: &FireRecord, now: Timestamp) {
        let lateness = now.since(fire.scheduled_time) as f64 / 1e6;
        self.step(
            fire,
            format!("send {}", fire.queue),
            SpanKind::Producer,
            vec![
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("tickd.fire.lateness_seconds", lateness),
            ],
        );
    }

    fn fire_acked(&self, fire: &FireRecord) {
        self.step(
            fire,
            format!("ack {}", fire.queue),
            SpanKind::Internal,
            vec![KeyValue::new("messaging.operation.type", "settle")],
        );
    }

    fn fire_redelivered(&self, fire: &FireRecord, reason: RedeliveryReason) {
        self.step(
            fire,
            format!("redeliver {}", fire.queue),
            SpanKind::Internal,
            vec![KeyValue::new("tickd.redelivery.reason", reason.as_str())],
        );
    }

    fn fire_dead_lettered(&self, fire: &FireRecord, from_queue: &str) {
        self.step(
            fire,
            format!("dead_letter {from_queue}"),
            SpanKind::Internal,
            vec![KeyValue::new(
                "tickd.dead_letter.from_queue",
                from_queue.to_string(),
            )],
        );
    }

    fn fire_dropped(&self, fire: &FireRecord) {
        self.step(
            fire,
            format!("drop {}", fire.queue),
            SpanKind::Internal,
            Vec::new(),
        );
    }
}

/// JSON log lines: timestamp, level, target, message and fields, the current span's name,
/// and its trace_id and span_id when it belongs to a trace.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), Timestamp::now_utc().to_string().into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        line.extend(fields.0);
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let cx = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            });
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    line.insert("trace_id".into(), sc.trace_id().to_string().into());
                    line.insert("span_id".into(), sc.span_id().to_string().into());
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
