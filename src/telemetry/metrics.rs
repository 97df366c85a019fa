//! Metrics: OpenTelemetry instruments, read by a Prometheus registry (served on `/metrics`)
//! and, when an OTLP endpoint is configured, pushed over OTLP/gRPC every 60 s
//! (`OTEL_METRIC_EXPORT_INTERVAL`).
//!
//! Names and units follow the OpenTelemetry conventions (`rpc.server.call.duration` in
//! seconds, `{fire}` counts); the Prometheus exporter turns them into `tickd_fires_total`,
//! `rpc_server_call_duration_seconds` and so on.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use prometheus::{Encoder, TextEncoder};

use super::TRACER_NAME;
use crate::scheduler::{Health, QueueStats, Scheduler};

/// Bucket bounds, in seconds, for latencies from sub-millisecond RPCs to minutes-late fires.
const SECONDS_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0, 300.0, 900.0, 3600.0,
];
/// Bucket bounds for commit batch sizes, in writes.
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// tickd's instruments.
#[derive(Debug)]
pub struct Instruments {
    pub fires: Counter<u64>,
    pub fire_lateness: Histogram<f64>,
    pub redeliveries: Counter<u64>,
    pub dead_letters: Counter<u64>,
    pub dropped: Counter<u64>,
    pub skipped: Counter<u64>,
    pub occurrences: Counter<u64>,
    pub rpc_duration: Histogram<f64>,
    pub commit_duration: Histogram<f64>,
    pub commit_writes: Histogram<u64>,
    pub config_reloads: Counter<u64>,
    pub auth_refusals: Counter<u64>,
}

/// When the served TLS certificate expires, in Unix seconds; 0 without TLS.
static CERTIFICATE_NOT_AFTER: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Records when the TLS certificate now served expires (Unix seconds).
pub fn set_certificate_not_after(unix_seconds: i64) {
    CERTIFICATE_NOT_AFTER.store(unix_seconds, std::sync::atomic::Ordering::Relaxed);
    // The gauge reports from the first scrape on; make sure it is registered.
    let _ = installed();
}

/// A per-queue gauge: name, unit, description, and which count it reports.
type QueueGauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&QueueStats) -> u64,
);

struct Installed {
    registry: prometheus::Registry,
    instruments: Instruments,
    provider: SdkMeterProvider,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();
/// The core whose jobs and queues the gauges report (the last one started).
static WATCHED: Mutex<Option<Scheduler>> = Mutex::new(None);

fn install() -> Installed {
    let registry = prometheus::Registry::new();
    let mut builder = SdkMeterProvider::builder();
    match opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
    {
        Ok(exporter) => builder = builder.with_reader(exporter),
        Err(e) => {
            tracing::error!(error = %e, "Prometheus exporter unavailable; /metrics will be empty")
        }
    }
    if let Some(endpoint) = super::otlp_endpoint_from_env(
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ) {
        use opentelemetry_otlp::WithExportConfig;
        match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .with_timeout(std::time::Duration::from_secs(5))
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_reader(PeriodicReader::builder(exporter).build())
            }
            Err(e) => tracing::error!(%endpoint, error = %e, "OTLP metrics exporter unavailable"),
        }
    }
    let provider = builder.with_resource(super::resource()).build();
    global::set_meter_provider(provider.clone());
    let meter = provider.meter(TRACER_NAME);

    meter
        .u64_observable_gauge("tickd.jobs")
        .with_unit("{job}")
        .with_description("Jobs by state")
        .with_callback(|gauge| {
            if let Some(stats) = watched_stats() {
                for (state, n) in stats.jobs {
                    gauge.observe(n, &[KeyValue::new("tickd.job.state", state.as_str())]);
                }
            }
        })
        .build();
    meter
        .u64_observable_gauge("tickd.health")
        .with_description(
            "Readiness of tickd: 1 for the state it is in (serving, store_failing: commits fail and are retried, failed: it stops firing and exits), 0 for the others",
        )
        .with_callback(|gauge| {
            if let Some(now) = watched_health() {
                for state in HEALTH_STATES {
                    gauge.observe(
                        u64::from(state == now),
                        &[KeyValue::new("tickd.health.state", state)],
                    );
                }
            }
        })
        .build();
    meter
        .u64_observable_gauge("tickd.info")
        .with_description(
            "Always 1: the version of tickd and the store it runs on (embedded, postgres)",
        )
        .with_callback(|gauge| {
            let store = WATCHED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(Scheduler::store_kind);
            if let Some(store) = store {
                gauge.observe(
                    1,
                    &[
                        KeyValue::new("tickd.version", env!("CARGO_PKG_VERSION")),
                        KeyValue::new("tickd.store", store),
                    ],
                );
            }
        })
        .build();
    meter
        .i64_observable_gauge("tickd.tls.certificate.not_after")
        .with_unit("s")
        .with_description("When the TLS certificate tickd serves expires, in Unix seconds")
        .with_callback(|gauge| {
            let t = CERTIFICATE_NOT_AFTER.load(std::sync::atomic::Ordering::Relaxed);
            if t != 0 {
                gauge.observe(t, &[]);
            }
        })
        .build();
    let queue_gauges: [QueueGauge; 3] = [
        (
            "tickd.queue.backlog",
            "{fire}",
            "Fires waiting for delivery, by queue",
            |q| q.backlog,
        ),
        (
            "tickd.deliveries.in_flight",
            "{fire}",
            "Fires handed to a subscriber and not yet acked, by queue",
            |q| q.in_flight,
        ),
        (
            "tickd.queue.subscribers",
            "{subscriber}",
            "Open Subscribe streams, by queue",
            |q| q.subscribers,
        ),
    ];
    for (name, unit, description, pick) in queue_gauges {
        meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |gauge| {
                for (queue, q) in watched_stats().map(|s| s.queues).unwrap_or_default() {
                    gauge.observe(pick(&q), &[KeyValue::new("tickd.queue", queue)]);
                }
            })
            .build();
    }

    let instruments = Instruments {
        fires: meter
            .u64_counter("tickd.fires")
            .with_unit("{fire}")
            .with_description("Fires released (counted once stored), by queue")
            .build(),
        fire_lateness: meter
            .f64_histogram("tickd.fire.lateness")
            .with_unit("s")
            .with_description("Delivery time minus scheduled time, by queue")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build(),
        redeliveries: meter
            .u64_counter("tickd.redeliveries")
            .with_unit("{fire}")
            .with_description("Fires sent back for redelivery, by queue and reason")
            .build(),
        dead_letters: meter
            .u64_counter("tickd.dead_letters")
            .with_unit("{fire}")
            .with_description("Fires moved to a dead-letter queue, by original queue")
            .build(),
        dropped: meter
            .u64_counter("tickd.fires.dropped")
            .with_unit("{fire}")
            .with_description("Fires dropped, by queue and reason (attempts_exhausted, job_deleted)")
            .build(),
        skipped: meter
            .u64_counter("tickd.occurrences.skipped")
            .with_unit("{occurrence}")
            .with_description(
                "Occurrences passed over without a fire, by queue and reason (misfire, paused, backlog_full, dst_gap, dst_repeat, ended)",
            )
            .build(),
        occurrences: meter
            .u64_counter("tickd.occurrences")
            .with_unit("{occurrence}")
            .with_description(
                "Occurrences whose fate the ledger recorded, by queue, outcome (delivered, dead_lettered, dropped, skipped) and reason (the skip reason, else none)",
            )
            .build(),
        rpc_duration: meter
            .f64_histogram("rpc.server.call.duration")
            .with_unit("s")
            .with_description("gRPC call duration, by method and status code")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build(),
        commit_duration: meter
            .f64_histogram("tickd.store.commit.duration")
            .with_unit("s")
            .with_description("Store commit latency (fsync included)")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build(),
        commit_writes: meter
            .u64_histogram("tickd.store.commit.writes")
            .with_unit("{write}")
            .with_description("Writes per store commit (group-commit batch size)")
            .with_boundaries(BATCH_BUCKETS.to_vec())
            .build(),
        config_reloads: meter
            .u64_counter("tickd.config.reloads")
            .with_unit("{reload}")
            .with_description(
                "Times the TLS files or the auth file changed and were read again, by setting (tls, auth_file) and result (ok, failed: the previous setting stays)",
            )
            .build(),
        auth_refusals: meter
            .u64_counter("tickd.auth.refusals")
            .with_unit("{call}")
            .with_description(
                "Calls refused by access control, by reason (unauthenticated, permission_denied) and principal",
            )
            .build(),
    };
    Installed {
        registry,
        instruments,
        provider,
    }
}

fn installed() -> &'static Installed {
    INSTALLED.get_or_init(install)
}

/// The instruments, set up on first use.
pub fn instruments() -> &'static Instruments {
    &installed().instruments
}

/// How long one count of the core serves the gauges: a collection reads several gauges in a
/// row, and counting takes the scheduler's lock.
const STATS_REUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// The last count of the core, and when it was taken.
static LAST_STATS: Mutex<Option<(std::time::Instant, crate::scheduler::Stats)>> = Mutex::new(None);

/// Queues the gauges have reported since tickd started. The core counts only queues with
/// fires outstanding or subscribers; one that empties is reported at 0 from then on rather
/// than vanishing, so that a graph drops to 0 and a rule over a time range
/// (`min_over_time(tickd_queue_backlog[30m])`) sees that it emptied.
static SEEN_QUEUES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn watched_stats() -> Option<crate::scheduler::Stats> {
    let mut last = LAST_STATS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, stats)) = last.as_ref()
        && at.elapsed() < STATS_REUSE
    {
        return Some(stats.clone());
    }
    let core = WATCHED.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
    let mut stats = core.stats();
    {
        let mut seen = SEEN_QUEUES.lock().unwrap_or_else(|p| p.into_inner());
        let counted: BTreeSet<&str> = stats.queues.iter().map(|(q, _)| q.as_str()).collect();
        let emptied: Vec<String> = seen
            .iter()
            .filter(|q| !counted.contains(q.as_str()))
            .cloned()
            .collect();
        seen.extend(counted.into_iter().map(str::to_owned));
        stats
            .queues
            .extend(emptied.into_iter().map(|q| (q, QueueStats::default())));
    }
    *last = Some((std::time::Instant::now(), stats.clone()));
    Some(stats)
}

/// The states `tickd_health` reports, as [`health_state`] names them.
const HEALTH_STATES: [&str; 3] = ["serving", "store_failing", "failed"];

/// The name `tickd_health` gives a health.
fn health_state(health: &Health) -> &'static str {
    match health {
        Health::Serving => HEALTH_STATES[0],
        Health::StoreFailing(_) => HEALTH_STATES[1],
        Health::Failed(_) => HEALTH_STATES[2],
    }
}

/// The watched core's health now, by name.
fn watched_health() -> Option<&'static str> {
    let core = WATCHED.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
    let health = core.health();
    let state = health_state(&health.borrow());
    Some(state)
}

/// Makes the gauges report `core`.
pub fn watch(core: &Scheduler) {
    installed();
    *WATCHED.lock().unwrap_or_else(|p| p.into_inner()) = Some(core.clone());
}

/// Stops the gauges reporting any core.
pub fn unwatch() {
    *WATCHED.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Everything in the Prometheus text format. Each scrape counts the core afresh (its gauges
/// share that one count).
pub fn render() -> String {
    *LAST_STATS.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let families = installed().registry.gather();
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Pushes pending OTLP metrics and stops the exporters.
pub fn shutdown() {
    if let Some(i) = INSTALLED.get()
        && let Err(e) = i.provider.shutdown()
    {
        eprintln!("tickd: flushing metrics at shutdown failed: {e}");
    }
}
