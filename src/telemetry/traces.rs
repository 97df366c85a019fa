//! Spans of a job's fires, and the conversions between OpenTelemetry contexts and the W3C
//! strings the core stores.
//!
//! Each fire starts a trace of its own: a `fire <queue>` span (kind PRODUCER) with a link to
//! the span of the Schedule call that created the job. A job can fire for months, so a child
//! of that call would make one trace without end; the link keeps each fire's trace small and
//! still leads back to who scheduled it (the OpenTelemetry messaging conventions use links the
//! same way for messages consumed long after they were produced). The fire span's context is
//! stored with the fire and sent as the Fire's `traceparent`, so the worker's span is its
//! child, and every later step of the fire (each delivery, a redelivery, the ack,
//! dead-lettering) is a short child span of it too, also after a restart.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanContext, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::TRACER_NAME;
use crate::domain::{FireRecord, Job, TraceContext};

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

/// Starts and ends the `fire <queue>` span of a fire being released; returns its context.
/// Builds nothing while no exporter is installed (the span would go nowhere).
pub(crate) fn fire_released(fire: &FireRecord, job: &Job) -> Option<TraceContext> {
    if !super::traces_enabled() {
        return None;
    }
    let tracer = global::tracer(TRACER_NAME);
    let links = job
        .status
        .trace
        .as_deref()
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

/// A finished child span of the fire's span: one step of its delivery. `extra` attributes are
/// built only when the span is (the fire is traced and spans are exported).
pub(crate) fn fire_step(
    fire: &FireRecord,
    name: std::fmt::Arguments<'_>,
    kind: SpanKind,
    extra: impl FnOnce() -> Vec<KeyValue>,
) {
    let Some(trace) = &fire.trace else {
        return;
    };
    if !super::traces_enabled() {
        return;
    }
    let parent = Context::new().with_remote_span_context(span_context_of(trace));
    let tracer = global::tracer(TRACER_NAME);
    let mut attributes = fire_attributes(fire);
    attributes.extend(extra());
    let _span = tracer
        .span_builder(name.to_string())
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
}
