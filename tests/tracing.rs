//! Traces of a real run, received by an in-process OTLP collector: the caller's traceparent
//! parents the server span, each fire's span links to the Schedule span, the Fire a worker
//! receives carries the fire span's traceparent, and every delivery attempt, redelivery and ack
//! shows on the fire's trace.
//!
//! The tracing subscriber is global, so this file installs it once, and every test runs on one
//! shared runtime (the exporter lives on it).

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tickd::api::pb;
use tickd::telemetry::{LogFormat, TelemetryOptions};
use tokio::runtime::Runtime;

/// Keeps every span it receives.
#[derive(Debug, Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct Harness {
    runtime: Runtime,
    collector: Collector,
    /// Where the collector listens, as an OTLP endpoint URL.
    endpoint: String,
}

/// The shared runtime with the collector running and telemetry installed.
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let collector = Collector::default();
        let service = collector.clone();
        let endpoint = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(service))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let telemetry = tickd::telemetry::init(&TelemetryOptions {
                log_filter: "warn".into(),
                log_format: LogFormat::Text,
                otlp_traces_endpoint: Some(format!("http://{addr}")),
                export_delay: Some(Duration::from_millis(50)),
            })
            .expect("telemetry");
            // Lives as long as the test process.
            std::mem::forget(telemetry);
            format!("http://{addr}")
        });
        Harness {
            runtime,
            collector,
            endpoint,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

/// Waits until the collector holds a span matching `pred`. Spans are exported in batches on a
/// real-time schedule, so this polls, with 20 s allowed for a loaded machine.
async fn wait_for(collector: &Collector, what: &str, pred: impl Fn(&Span) -> bool) -> Span {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(s) = collector
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| pred(s))
        {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no span: {what}");
}

/// Splits a traceparent into (trace id, span id).
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent:?}");
    (parts[1].to_string(), parts[2].to_string())
}

/// A Schedule request carrying the caller's traceparent.
fn traced_schedule(job: pb::Job, traceparent: &str) -> tonic::Request<pb::ScheduleRequest> {
    let mut request = tonic::Request::new(pb::ScheduleRequest {
        job: Some(job),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    request
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The caller's traceparent becomes the parent of the Schedule server span, which carries the
/// RPC attributes.
#[test]
fn caller_traceparent_parents_the_server_span() {
    let h = harness();
    h.runtime.block_on(async {
        let mut server = TestServer::manual().await;
        let caller_span = "00f067aa0ba902b7";
        let tp = format!("00-{CALLER_TRACE}-{caller_span}-01");
        let mut j = job("traced", after_trigger(3_600_000));
        j.id = "parented".into();
        server
            .client
            .schedule(traced_schedule(j, &tp))
            .await
            .expect("schedule");
        let span = wait_for(&h.collector, "Schedule server span", |s| {
            s.name == "tickd.v1.Scheduler/Schedule" && hex(&s.parent_span_id) == caller_span
        })
        .await;
        assert_eq!(hex(&span.trace_id), CALLER_TRACE);
        assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(attr(&span, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            attr(&span, "rpc.service").as_deref(),
            Some("tickd.v1.Scheduler")
        );
        assert_eq!(attr(&span, "rpc.method").as_deref(), Some("Schedule"));
        assert_eq!(attr(&span, "rpc.grpc.status_code").as_deref(), Some("0"));
        assert_eq!(attr(&span, "tickd.job.id").as_deref(), Some("parented"));
        assert_eq!(attr(&span, "tickd.queue").as_deref(), Some("traced"));

        // A refused call records its status code.
        let mut missing = tonic::Request::new(pb::GetJobRequest {
            id: "missing".into(),
        });
        missing.metadata_mut().insert(
            "traceparent",
            format!("00-{CALLER_TRACE}-2222222222222222-01")
                .parse()
                .expect("ascii"),
        );
        server.client.get_job(missing).await.expect_err("not found");
        let span = wait_for(&h.collector, "GetJob server span", |s| {
            s.name == "tickd.v1.Scheduler/GetJob" && hex(&s.parent_span_id) == "2222222222222222"
        })
        .await;
        assert_eq!(attr(&span, "rpc.grpc.status_code").as_deref(), Some("5"));
        server.stop().await;
    });
}

/// A fire starts its own trace, linked to the Schedule span; the Fire's traceparent is that
/// span's; each delivery attempt, the nack's redelivery and the ack are its children.
#[test]
fn a_fire_trace_links_to_schedule_and_shows_each_attempt() {
    let h = harness();
    h.runtime.block_on(async {
        let mut server = TestServer::manual().await;
        let caller_span = "1111111111111111";
        let tp = format!("00-{CALLER_TRACE}-{caller_span}-01");
        let mut sub = server.subscribe("traced.fires", 10).await;
        let mut j = job("traced.fires", at_trigger(server.ts_in(0)));
        j.id = "fired".into();
        server
            .client
            .schedule(traced_schedule(j, &tp))
            .await
            .expect("schedule");
        server.settle().await;
        let first = sub.recv().await;
        assert!(
            !first.traceparent.is_empty(),
            "the Fire carries a traceparent"
        );
        let (fire_trace, fire_span_id) = ids(&first.traceparent);
        assert_ne!(fire_trace, CALLER_TRACE, "a fire starts a trace of its own");
        sub.nack(&[&first.fire_id], None).await;
        server.settle().await;
        let second = sub.recv().await;
        assert_eq!(
            second.traceparent, first.traceparent,
            "same span on redelivery"
        );
        sub.ack(&[&second.fire_id]).await;

        let schedule = wait_for(&h.collector, "Schedule span", |s| {
            s.name == "tickd.v1.Scheduler/Schedule" && hex(&s.parent_span_id) == caller_span
        })
        .await;
        let fire = wait_for(&h.collector, "fire span", |s| {
            hex(&s.span_id) == fire_span_id
        })
        .await;
        assert_eq!(fire.name, "fire traced.fires");
        assert_eq!(fire.kind, 4, "SPAN_KIND_PRODUCER");
        assert_eq!(attr(&fire, "tickd.job.id").as_deref(), Some("fired"));
        assert_eq!(
            attr(&fire, "tickd.fire.id").as_deref(),
            Some(&*first.fire_id)
        );
        assert!(
            fire.links
                .iter()
                .any(|l| l.span_id == schedule.span_id && l.trace_id == schedule.trace_id),
            "the fire span links to the Schedule span"
        );
        let child = |name: &'static str, attempt: &'static str| {
            let fire_trace = fire_trace.clone();
            let fire_span_id = fire_span_id.clone();
            move |s: &Span| {
                s.name == name
                    && hex(&s.trace_id) == fire_trace
                    && hex(&s.parent_span_id) == fire_span_id
                    && attr(s, "tickd.fire.attempt").as_deref() == Some(attempt)
            }
        };
        wait_for(&h.collector, "first send", child("send traced.fires", "1")).await;
        let redeliver = wait_for(
            &h.collector,
            "redeliver",
            child("redeliver traced.fires", "2"),
        )
        .await;
        assert_eq!(
            attr(&redeliver, "tickd.redelivery.reason").as_deref(),
            Some("nack")
        );
        wait_for(&h.collector, "second send", child("send traced.fires", "2")).await;
        wait_for(&h.collector, "ack", child("ack traced.fires", "2")).await;
        server.stop().await;
    });
}

/// The link from a fire to its Schedule span survives a restart: the Schedule span's context
/// is stored with the job.
#[test]
fn the_link_to_schedule_survives_a_restart() {
    let h = harness();
    h.runtime.block_on(async {
        let mut server = TestServer::manual().await;
        let caller_span = "3333333333333333";
        let tp = format!("00-{CALLER_TRACE}-{caller_span}-01");
        let mut j = job("traced.restart", after_trigger(300));
        j.id = "restarted".into();
        server
            .client
            .schedule(traced_schedule(j, &tp))
            .await
            .expect("schedule");
        let mut server = server.restart().await;
        let mut sub = Sub::open(&mut server.client, "traced.restart", 10).await;
        server.advance(300).await;
        let fire = sub.recv().await;
        let (_, fire_span_id) = ids(&fire.traceparent);
        let schedule = wait_for(&h.collector, "Schedule span", |s| {
            s.name == "tickd.v1.Scheduler/Schedule" && hex(&s.parent_span_id) == caller_span
        })
        .await;
        let fire_span = wait_for(&h.collector, "fire span", |s| {
            hex(&s.span_id) == fire_span_id
        })
        .await;
        assert!(
            fire_span
                .links
                .iter()
                .any(|l| l.span_id == schedule.span_id),
            "the fire released after the restart links to the Schedule span"
        );
        server.stop().await;
    });
}

/// Spans waiting in the batch are exported when tickd shuts down: the binary's batch waits
/// 5 s, but its Schedule span arrives right after SIGTERM.
#[test]
fn spans_are_flushed_on_shutdown() {
    let h = harness();
    h.runtime.block_on(async {
        let dir = tempdir();
        let mut tickd = TickdProcess::start_in(
            dir.path(),
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", h.endpoint.as_str())],
            None,
        );
        let mut client = tickd.client().await;
        let mut j = job("flushed", after_trigger(3_600_000));
        j.id = "flushed-on-shutdown".into();
        schedule(&mut client, j).await;
        tickd.sigterm();
        let status = tickd.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success());
        let found = h
            .collector
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| attr(s, "tickd.job.id").as_deref() == Some("flushed-on-shutdown"));
        assert!(found, "the Schedule span was not exported at shutdown");
    });
}
