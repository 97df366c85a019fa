//! The gRPC server: wires the core, the Scheduler service, health and reflection, and runs
//! them until shutdown.
//!
//! Shutdown is ordered: health turns NOT_SERVING, open Subscribe streams end with UNAVAILABLE
//! (their in-flight fires become deliverable again), no new calls are taken while running ones
//! finish, every accepted change is committed, and the function returns, all within the
//! configured grace period; the drain gets three quarters of it and the final commit always
//! gets the rest.
//!
//! Health follows the core: SERVING only while commits succeed and the timer runs (the empty
//! service name and `tickd.v1.Scheduler`, for readiness). The `liveness` service stays SERVING
//! while a failing disk is retried, and turns NOT_SERVING only when the core has failed for good,
//! which also ends `serve` with an error so that the process exits non-zero.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use tracing::{info, warn};

use super::admission::AdmissionLayer;
use super::auth::{Auth, AuthFileError};
use super::pb;
use super::pb::scheduler_server::SchedulerServer;
use super::rpc_span::RpcSpanLayer;
use super::service::SchedulerService;
use super::tls::{Tls, TlsError, TlsFiles};
use super::validate::Limits;
use crate::config::Config;
use crate::domain::time::duration_micros;
use crate::scheduler::{
    Clock, Health, ReplicaSettings, Scheduler, SchedulerConfig, SkewedClock, StartError,
    SystemClock,
};
use crate::store::{RedbStore, Store, StoreError};
use crate::telemetry::{FireTelemetry, metrics};

/// Room in a message beyond the payload (ids, labels, times).
const MESSAGE_OVERHEAD_BYTES: usize = 256 * 1024;
/// The Scheduler service's name in grpc.health.v1.
const SCHEDULER_SERVICE_NAME: &str =
    <SchedulerServer<SchedulerService> as tonic::server::NamedService>::NAME;
/// The health service name for liveness probes.
pub const LIVENESS_SERVICE_NAME: &str = "liveness";
/// TCP keepalive on accepted connections.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("the gRPC server failed: {0}")]
    Transport(String),
    #[error("the scheduler core failed: {0}")]
    CoreFailed(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
}

/// The sockets tickd serves on; the caller binds them (tests use port 0).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// Prometheus `/metrics`.
    pub metrics: TcpListener,
    /// Plaintext grpc.health.v1 only (`--health-listen`), for probes that cannot speak TLS.
    pub health: Option<TcpListener>,
}

/// Opens the store the configuration names (PostgreSQL with `database_url`, else the embedded
/// store in `data_dir`) and serves on `listeners` until `shutdown` resolves.
pub async fn run(
    listeners: Listeners,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let clock: Arc<dyn Clock> = match config.test_clock_skew_ms {
        0 => Arc::new(SystemClock),
        ms => Arc::new(SkewedClock {
            skew: ms.saturating_mul(1_000),
        }),
    };
    if let Some(url) = &config.database_url {
        let core = start_replica(url, clock, false, config).await?;
        return serve(listeners, core, config, shutdown).await;
    }
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || RedbStore::open(&dir))
        .await
        .map_err(|e| ServerError::Transport(format!("store open task failed: {e}")))??;
    run_with(listeners, Arc::new(store), clock, config, shutdown).await
}

/// Serves on `listeners` with the given store and clock until `shutdown` resolves.
pub async fn run_with(
    listeners: Listeners,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let core = start_core(store, clock, config).await?;
    serve(listeners, core, config, shutdown).await
}

/// Starts the core on `store` and `clock` with the settings of `config`, its fires traced.
pub async fn start_core(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: &Config,
) -> Result<Scheduler, ServerError> {
    Ok(Scheduler::start(store, clock, core_config(config)).await?)
}

/// Starts a replica on the PostgreSQL database at `url` with the settings of `config`, its
/// fires traced. With `use_core_clock`, due times and leases follow `clock` instead of the
/// database's (tests on a manual clock).
pub async fn start_replica(
    url: &str,
    clock: Arc<dyn Clock>,
    use_core_clock: bool,
    config: &Config,
) -> Result<Scheduler, ServerError> {
    let settings = ReplicaSettings {
        database_url: url.to_string(),
        poll_interval: config.database_poll_interval,
        notify: config.database_notify,
        use_core_clock,
        max_connections: config.database_max_connections,
    };
    Ok(Scheduler::start_replica(settings, clock, core_config(config)).await?)
}

fn core_config(config: &Config) -> SchedulerConfig {
    SchedulerConfig {
        max_catch_up_fires: config.max_catch_up_fires as usize,
        max_redelivery_backoff: duration_micros(config.max_redelivery_backoff),
        retention: duration_micros(config.retention),
        max_queue_backlog: config.max_queue_backlog as usize,
        max_subscribers: config.max_subscribers as usize,
        observer: Arc::new(FireTelemetry::default()),
        ledger: crate::domain::ledger::Bounds {
            per_job: config.ledger_max_per_job as usize,
            retention: duration_micros(config.ledger_retention),
        },
    }
}

/// Serves `core` on `listeners` until `shutdown` resolves, then shuts the core down in order
/// (see the module doc). The caller may keep a clone of `core` (tests do, to drive and
/// inspect it); the core is stopped all the same.
pub async fn serve(
    listeners: Listeners,
    core: Scheduler,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // Security settings are read first: a bad file stops the start before anything is served.
    let security = async {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                Tls::start(
                    TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: config.tls_client_ca.clone(),
                    },
                    config.reload_interval,
                )
                .await?,
            ),
            _ => None,
        };
        let auth = match &config.auth_file {
            Some(path) => Auth::start(path.clone(), config.reload_interval).await?,
            None => Auth::open(),
        };
        Ok::<_, ServerError>((tls, auth))
    };
    let (tls, auth) = match security.await {
        Ok(s) => s,
        Err(e) => {
            core.shutdown().await;
            return Err(e);
        }
    };
    if !auth.enabled() {
        warn!(
            "access control is off (no --auth-file): any client that reaches the gRPC port may \
             schedule, change, read and consume every queue"
        );
    } else if tls.is_none() {
        warn!("--auth-file without --tls-cert: bearer tokens cross the network in plaintext");
    }
    if auth.names_certificates() && !tls.as_ref().is_some_and(|t| t.mutual()) {
        warn!(
            "the auth file names principals by mtls_subject, but without --tls-client-ca no \
             client presents a certificate: those principals can only use their tokens"
        );
    }

    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(LIVENESS_SERVICE_NAME, ServingStatus::Serving)
        .await;
    let mut core_health = core.health();
    let initial = core_health.borrow().clone();
    mirror_health(&health, &initial).await;
    let (mirror_stop, mut mirror_stopped) = oneshot::channel::<()>();
    let mirror = {
        let health = health.clone();
        let mut core_health = core_health.clone();
        tokio::spawn(async move {
            loop {
                let now = core_health.borrow_and_update().clone();
                mirror_health(&health, &now).await;
                tokio::select! {
                    changed = core_health.changed() => if changed.is_err() { return },
                    _ = &mut mirror_stopped => return,
                }
            }
        })
    };
    // Reflection in both versions: grpc.reflection.v1, and v1alpha for older clients (grpcurl
    // before 1.9, Postman, Evans) that know only that one.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So that generic clients can decode google.rpc.BadRequest error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let max_message = config.max_payload_bytes as usize + MESSAGE_OVERHEAD_BYTES;
    let auth_on = auth.enabled();
    let service = SchedulerServer::new(
        SchedulerService::new(
            core.clone(),
            Limits {
                max_payload_bytes: config.max_payload_bytes as usize,
                subscribe_open_timeout: config.subscribe_open_timeout,
                max_list_response_bytes: max_message - MESSAGE_OVERHEAD_BYTES / 2,
            },
        )
        .with_auth(auth),
    )
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);

    let listener = listeners.grpc;
    let addr = listener.local_addr().ok();
    metrics::watch(&core);
    let metrics_addr = listeners.metrics.local_addr().ok();
    let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
    let metrics_server = tokio::spawn(super::metrics_http::serve(listeners.metrics, async {
        let _ = metrics_stopped.await;
    }));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (health_stop, health_stopped) = oneshot::channel::<()>();
    let health_server = listeners.health.map(|listener| {
        info!(addr = ?listener.local_addr().ok(), "plaintext health port listening (grpc.health.v1 only)");
        tokio::spawn(
            Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = health_stopped.await;
                    },
                ),
        )
    });
    let router = Server::builder()
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .timeout(config.request_timeout)
        // Beyond this many calls at once, refuse with RESOURCE_EXHAUSTED rather than queue without
        // bound: a client can retry elsewhere, a queue only adds latency. Health checks are
        // always admitted.
        .layer(
            ServiceBuilder::new()
                .layer(RpcSpanLayer)
                .layer(AdmissionLayer::new(config.max_concurrent_requests as usize))
                .into_inner(),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let stopped = async {
        let _ = stop_rx.await;
    };
    // Accepted sockets get TCP_NODELAY (without it, small fires on a stream wait ~40 ms for
    // the client's delayed ACK) and TCP keepalive; tonic's own settings apply only to
    // listeners it binds itself.
    let mut server = match &tls {
        None => tokio::spawn(
            router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE)),
                stopped,
            ),
        ),
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(tls.incoming(listener, TCP_KEEPALIVE), stopped),
        ),
    };
    if let (Some(addr), Some(metrics_addr)) = (addr, metrics_addr) {
        let store = match &config.database_url {
            Some(_) => "postgresql".to_string(),
            None => config.data_dir.display().to_string(),
        };
        let tls = match &tls {
            None => "off",
            Some(t) if t.mutual() => "mutual",
            Some(_) => "on",
        };
        let auth = if auth_on { "on" } else { "off" };
        info!(%addr, %metrics_addr, %store, tls, auth, "tickd listening");
    }

    let failed = async {
        loop {
            let now = core_health.borrow_and_update().clone();
            if let Health::Failed(reason) = now {
                return reason;
            }
            if core_health.changed().await.is_err() {
                return "the scheduler core is gone".to_string();
            }
        }
    };
    let mut failure = None;
    tokio::select! {
        _ = shutdown => {}
        reason = failed => failure = Some(reason),
        result = &mut server => {
            let _ = mirror_stop.send(());
            core.shutdown().await;
            metrics::unwatch();
            let _ = metrics_stop.send(());
            let _ = health_stop.send(());
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ServerError::Transport(e.to_string())),
                Err(e) => Err(ServerError::Transport(e.to_string())),
            };
        }
    }

    info!(grace = ?config.shutdown_grace, "shutting down");
    let started = tokio::time::Instant::now();
    let deadline = started + config.shutdown_grace;
    let drain_deadline = started + config.shutdown_grace.mul_f64(0.75);
    let _ = mirror_stop.send(());
    let _ = mirror.await;
    health
        .set_not_serving::<SchedulerServer<SchedulerService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    if failure.is_some() {
        health
            .set_service_status(LIVENESS_SERVICE_NAME, ServingStatus::NotServing)
            .await;
    }
    core.close_subscriptions();
    let _ = stop_tx.send(());
    // Health Watch streams would hold the drain open until the grace period ends: once no new
    // call is taken, end them (each has seen NOT_SERVING first).
    health.clear_service_status(SCHEDULER_SERVICE_NAME).await;
    health.clear_service_status("").await;
    health.clear_service_status(LIVENESS_SERVICE_NAME).await;
    match tokio::time::timeout_at(drain_deadline, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
        Err(_) => {
            warn!("calls still running at the end of the shutdown grace period were cut off");
            server.abort();
        }
    }
    if tokio::time::timeout_at(deadline, core.shutdown())
        .await
        .is_err()
    {
        warn!("the store could not be flushed within the shutdown grace period");
    }
    metrics::unwatch();
    let _ = metrics_stop.send(());
    let _ = health_stop.send(());
    let _ = tokio::time::timeout_at(deadline, metrics_server).await;
    if let Some(health_server) = health_server {
        let _ = tokio::time::timeout_at(deadline, health_server).await;
    }
    if let Some(reason) = failure {
        return Err(ServerError::CoreFailed(reason));
    }
    info!("tickd stopped");
    Ok(())
}

/// Sets the readiness statuses (the empty name and the Scheduler service) from the core's
/// health, and liveness to NOT_SERVING once the core has failed.
async fn mirror_health(health: &tonic_health::server::HealthReporter, now: &Health) {
    let ready = match now {
        Health::Serving => ServingStatus::Serving,
        Health::StoreFailing(reason) => {
            warn!(%reason, "store commits fail; not serving until one succeeds (retrying)");
            ServingStatus::NotServing
        }
        Health::Failed(_) => ServingStatus::NotServing,
    };
    health.set_service_status("", ready).await;
    health
        .set_service_status(SCHEDULER_SERVICE_NAME, ready)
        .await;
    if matches!(now, Health::Failed(_)) {
        health
            .set_service_status(LIVENESS_SERVICE_NAME, ServingStatus::NotServing)
            .await;
    }
}
