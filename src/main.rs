//! The tickd server binary: parse configuration, set up logs and traces, bind, run until
//! SIGTERM or SIGINT, flush spans.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tracing::error;

use tickd::api::Listeners;
use tickd::config::Config;
use tickd::telemetry::{self, TelemetryOptions};

/// jemalloc: its per-thread caches take back what another thread freed, where the system's
/// malloc falls to its slow paths (a request decoded on a runtime thread is freed by the writer).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let telemetry = match telemetry::init(&TelemetryOptions {
        log_filter: config.log.clone(),
        log_format: config.log_format,
        otlp_traces_endpoint: TelemetryOptions::otlp_endpoint_from_env(),
        export_delay: None,
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tickd: {e}");
            return ExitCode::from(2);
        }
    };

    let bind = |addr| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            error!(%addr, error = %e, "cannot listen");
        })
    };
    let bound = async {
        Ok::<_, ()>(Listeners {
            grpc: bind(config.listen).await?,
            metrics: bind(config.metrics_listen).await?,
            health: match config.health_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    };
    let Ok(listeners) = bound.await else {
        telemetry.shutdown();
        return ExitCode::FAILURE;
    };
    let code = match tickd::api::run(listeners, &config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "tickd failed");
            ExitCode::FAILURE
        }
    };
    // Spans and metrics still waiting are exported before exit.
    telemetry.shutdown();
    tickd::telemetry::metrics::shutdown();
    code
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
