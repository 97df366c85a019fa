//! With an OTLP endpoint configured, metrics are also pushed over OTLP/gRPC: an in-process
//! collector receives tickd's instruments.
//!
//! The metrics pipeline is set up once per process from the environment, so this file holds a
//! single test that sets the environment before anything else runs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};

/// Keeps the names of the metrics it receives.
#[derive(Debug, Default, Clone)]
struct Collector {
    names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// tickd's metrics reach an OTLP collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // SAFETY: the only test in this binary, and the first thing it does with the environment;
    // nothing else reads these variables concurrently.
    unsafe {
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            format!("http://{addr}"),
        );
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "100");
    }

    let mut server = TestServer::manual().await;
    let mut sub = server.subscribe("pushed", 10).await;
    let at = server.ts_in(0);
    server.schedule(job("pushed", at_trigger(at))).await;
    server.settle().await;
    let fire = sub.recv().await;
    sub.ack(&[&fire.fire_id]).await;

    let wanted = [
        "tickd.fires",
        "tickd.fire.lateness",
        "rpc.server.call.duration",
        "tickd.store.commit.duration",
        "tickd.jobs",
    ];
    // The exporter pushes every 100 ms of real time; allow a loaded machine 20 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut missing = Vec::new();
    while std::time::Instant::now() < deadline {
        let names = collector
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        missing = wanted
            .iter()
            .filter(|w| !names.iter().any(|n| n == *w))
            .collect::<Vec<_>>();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(missing.is_empty(), "not received over OTLP: {missing:?}");
    server.stop().await;
}
