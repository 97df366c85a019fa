//! A tower layer that gives every gRPC call a server span and a duration measurement: the
//! caller's W3C trace context (`traceparent`, `tracestate`, `baggage` metadata) becomes the
//! span's parent, and both carry the OpenTelemetry RPC attributes (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::Extractor;
use opentelemetry::{KeyValue, global};
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::metrics;

/// Adds [`RpcSpan`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan { inner }
    }
}

/// Runs each call inside its server span.
#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// gRPC codes that mark a server span as failed (OpenTelemetry RPC conventions).
fn is_server_error(code: i64) -> bool {
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// Records a call's status code and duration once: when it completes, or, if its future is
/// dropped first (the request timeout fired, or the client went away), as CANCELLED.
struct Outcome {
    span: tracing::Span,
    started: std::time::Instant,
    attrs: Vec<KeyValue>,
    recorded: bool,
}

impl Outcome {
    fn new(span: tracing::Span, service: &str, method: &str) -> Outcome {
        Outcome {
            span,
            started: std::time::Instant::now(),
            attrs: vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_string()),
                KeyValue::new("rpc.method", method.to_string()),
            ],
            recorded: false,
        }
    }

    fn record(&mut self, code: i64) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let mut attrs = std::mem::take(&mut self.attrs);
        attrs.push(KeyValue::new("rpc.grpc.status_code", code));
        metrics::instruments()
            .rpc_duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // CANCELLED
        self.record(1);
    }
}

impl<S, B, R> Service<http::Request<B>> for RpcSpan<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: std::borrow::Borrow<dyn std::error::Error + Send + Sync> + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/').to_string();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        // Without a trace exporter the span would reach no one (log lines leave it out), so
        // none is built: that saves the propagator, the registry's span and its fields on
        // every call.
        if !crate::telemetry::traces_enabled() {
            let call = self.inner.call(request);
            let mut outcome = Outcome::new(tracing::Span::none(), service, method);
            return Box::pin(async move {
                let result = call.await;
                outcome.record(status_code(&result));
                result
            });
        }
        let parent =
            global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
        let span = tracing::info_span!(
            crate::telemetry::RPC_SPAN_NAME,
            otel.name = %path,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            tickd.job.id = tracing::field::Empty,
            tickd.queue = tracing::field::Empty,
            tickd.principal = tracing::field::Empty,
        );
        // A span the filter turned off has no OpenTelemetry data to parent.
        let _ = span.set_parent(parent);
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let mut outcome = Outcome::new(span.clone(), service, method);
        Box::pin(
            async move {
                let result = call.await;
                outcome.record(status_code(&result));
                result
            }
            .instrument(span),
        )
    }
}

/// The gRPC status code of a call's result: a failure answered at once carries grpc-status in
/// the headers; otherwise the call succeeded as far as the headers tell.
fn status_code<R, E>(result: &Result<http::Response<R>, E>) -> i64
where
    E: std::borrow::Borrow<dyn std::error::Error + Send + Sync>,
{
    match result {
        Ok(response) => response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0),
        // What tonic answers for a call refused by load shedding.
        Err(e) if e.borrow().is::<tower::load_shed::error::Overloaded>() => 8,
        Err(_) => 2,
    }
}
