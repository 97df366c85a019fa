//! Logs, traces and metrics: the global tracing subscriber, the OpenTelemetry pipelines behind
//! it, and [`FireTelemetry`], which turns the core's fire events into spans and counts.
//!
//! Logs go to stdout as text or JSON; inside a span, a JSON line carries that span's
//! `trace_id` and `span_id`. Traces are exported over OTLP/gRPC (batched) only when an OTLP
//! endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`); the standard `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` are
//! honoured by the SDK. Metrics are in [`metrics`]; fire spans in [`traces`].

pub mod metrics;
pub mod traces;

use std::fmt;
use std::time::Duration;

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

pub use traces::{span_context_of, trace_context_of};

use crate::domain::{FireRecord, Job, Outcome, Timestamp, TraceContext};
use crate::scheduler::{DropReason, Observer, RedeliveryReason, SkipReason};

/// Set once a trace exporter is installed; until then no fire span is built at all.
static TRACES_ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn traces_enabled() -> bool {
    TRACES_ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Most time an exporter may take to send one batch (also at shutdown).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

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
        otlp_endpoint_from_env("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    }
}

/// The OTLP endpoint of one signal: its own variable (`signal_endpoint`), else
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; none when unset, empty, or when `exporter` says `none`.
pub(crate) fn otlp_endpoint_from_env(exporter: &str, signal_endpoint: &str) -> Option<String> {
    if std::env::var(exporter).is_ok_and(|v| v.trim() == "none") {
        return None;
    }
    [signal_endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

/// The resource of tickd's telemetry: what the SDK reads from `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`, with the service name defaulting to `tickd`.
pub(crate) fn resource() -> Resource {
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    resource.build()
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

/// The name of the span each gRPC call runs in.
pub(crate) const RPC_SPAN_NAME: &str = "rpc";

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
        TRACES_ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    // Log lines do not carry the per-call `rpc` span: formatting its ten fields for every call
    // took a tenth of tickd's instructions under Schedule load, for a prefix no log line
    // needs (the few lines logged inside a call name what they are about, and JSON lines take
    // trace_id and span_id from the registry, not from this layer). The hint keeps the
    // combined filter's level hint that of the log filter (without it every disabled
    // `trace!` in the gRPC stack would be checked at run time).
    let filter = filter.and(
        filter_fn(|meta| !(meta.is_span() && meta.name() == RPC_SPAN_NAME))
            .with_max_level_hint(LevelFilter::TRACE),
    );
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
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter(endpoint.to_string(), e.to_string()))?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(delay) = export_delay {
        batch = batch.with_scheduled_delay(delay);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource())
        .build())
}

/// The core's observer: a span and a count for each step of a fire, and commit timings.
#[derive(Debug)]
pub struct FireTelemetry {
    metrics: &'static metrics::Instruments,
}

impl Default for FireTelemetry {
    fn default() -> Self {
        FireTelemetry {
            metrics: metrics::instruments(),
        }
    }
}

fn queue_attr(fire: &FireRecord) -> [KeyValue; 1] {
    [KeyValue::new("tickd.queue", fire.queue.clone())]
}

impl Observer for FireTelemetry {
    fn fire_released(&self, fire: &FireRecord, job: &Job) -> Option<TraceContext> {
        traces::fire_released(fire, job)
    }

    fn fires_stored(&self, queue: &str, count: u64) {
        self.metrics
            .fires
            .add(count, &[KeyValue::new("tickd.queue", queue.to_string())]);
    }

    fn fire_delivered(&self, fire: &FireRecord, now: Timestamp) {
        let lateness = now.since(fire.scheduled_time).max(0) as f64 / 1e6;
        self.metrics
            .fire_lateness
            .record(lateness, &queue_attr(fire));
        traces::fire_step(
            fire,
            format_args!("send {}", fire.queue),
            SpanKind::Producer,
            || {
                vec![
                    KeyValue::new("messaging.operation.type", "send"),
                    KeyValue::new("tickd.fire.lateness_seconds", lateness),
                ]
            },
        );
    }

    fn fire_acked(&self, fire: &FireRecord) {
        traces::fire_step(
            fire,
            format_args!("ack {}", fire.queue),
            SpanKind::Internal,
            || vec![KeyValue::new("messaging.operation.type", "settle")],
        );
    }

    fn fire_redelivered(&self, fire: &FireRecord, reason: RedeliveryReason) {
        self.metrics.redeliveries.add(
            1,
            &[
                KeyValue::new("tickd.queue", fire.queue.clone()),
                KeyValue::new("tickd.redelivery.reason", reason.as_str()),
            ],
        );
        traces::fire_step(
            fire,
            format_args!("redeliver {}", fire.queue),
            SpanKind::Internal,
            || vec![KeyValue::new("tickd.redelivery.reason", reason.as_str())],
        );
    }

    fn fire_dead_lettered(&self, fire: &FireRecord, from_queue: &str) {
        self.metrics
            .dead_letters
            .add(1, &[KeyValue::new("tickd.queue", from_queue.to_string())]);
        traces::fire_step(
            fire,
            format_args!("dead_letter {from_queue}"),
            SpanKind::Internal,
            || {
                vec![KeyValue::new(
                    "tickd.dead_letter.from_queue",
                    from_queue.to_string(),
                )]
            },
        );
    }

    fn fire_dropped(&self, fire: &FireRecord, reason: DropReason) {
        self.metrics.dropped.add(
            1,
            &[
                KeyValue::new("tickd.queue", fire.queue.clone()),
                KeyValue::new("tickd.drop.reason", reason.as_str()),
            ],
        );
        traces::fire_step(
            fire,
            format_args!("drop {}", fire.queue),
            SpanKind::Internal,
            Vec::new,
        );
    }

    fn occurrences_skipped(&self, queue: &str, count: u64, reason: SkipReason) {
        self.metrics.skipped.add(
            count,
            &[
                KeyValue::new("tickd.queue", queue.to_string()),
                KeyValue::new("tickd.skip.reason", reason.as_str()),
            ],
        );
    }

    fn occurrences_recorded(&self, queue: &str, outcome: Outcome, count: u64) {
        let reason = match outcome {
            Outcome::Skipped(r) => r.as_str(),
            _ => "none",
        };
        self.metrics.occurrences.add(
            count,
            &[
                KeyValue::new("tickd.queue", queue.to_string()),
                KeyValue::new("tickd.outcome", outcome.as_str()),
                KeyValue::new("tickd.reason", reason),
            ],
        );
    }

    fn store_committed(&self, writes: usize, elapsed: Duration, ok: bool) {
        let outcome = [KeyValue::new("tickd.commit.ok", ok)];
        self.metrics
            .commit_duration
            .record(elapsed.as_secs_f64(), &outcome);
        self.metrics.commit_writes.record(writes as u64, &outcome);
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
        }
        // The trace ids come from the current span as the registry knows it, not as this
        // layer's filter does: a warning inside an RPC carries the RPC's trace even when the
        // log filter hides INFO spans. (The otel layer has set the span's parent already.)
        let current = tracing::Span::current();
        if let Some(id) = current.id() {
            let cx = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&id, dispatch)
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

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
