//! Configuration: every setting is a command-line flag and a `TICKD_*` environment variable,
//! parsed and checked once at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::telemetry::LogFormat;

/// tickd: a durable job scheduler served over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "tickd", version, about, long_about = None)]
pub struct Config {
    /// Address to serve gRPC on. Port 0 picks a free port (the log says which).
    #[arg(long, env = "TICKD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus scrape endpoint (`GET /metrics`).
    #[arg(long, env = "TICKD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// Directory of the embedded store (created if missing). Not used with --database-url.
    #[arg(long, env = "TICKD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// PostgreSQL to keep jobs and fires in (`postgres://user:password@host:5432/db`), shared
    /// by any number of tickd replicas. Unset: the embedded store in --data-dir. The schema is
    /// created or migrated at start.
    #[arg(long, env = "TICKD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// With --database-url: longest a replica goes without looking for due jobs and ready
    /// fires when nothing woke it (with NOTIFY, how late a job scheduled on a replica that
    /// died meanwhile can be; without, the fire latency).
    #[arg(long, env = "TICKD_DATABASE_POLL_INTERVAL", default_value = "500ms", value_parser = parse_poll_interval)]
    pub database_poll_interval: Duration,

    /// With --database-url: wake replicas through LISTEN/NOTIFY. `false` for PostgreSQL-wire
    /// databases without it (then set --database-poll-interval to 100ms or so).
    #[arg(long, env = "TICKD_DATABASE_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub database_notify: bool,

    /// With --database-url: most connections this replica opens.
    #[arg(long, env = "TICKD_DATABASE_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(2..=1_000))]
    pub database_max_connections: u32,

    /// For tests of clock skew: this process's clock runs this many milliseconds ahead
    /// (negative: behind) of the system's.
    #[arg(
        long,
        env = "TICKD_TEST_CLOCK_SKEW_MS",
        default_value_t = 0,
        hide = true,
        allow_negative_numbers = true
    )]
    pub test_clock_skew_ms: i64,

    /// Largest job payload accepted, in bytes.
    #[arg(long, env = "TICKD_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(0..=(16 * 1024 * 1024)))]
    pub max_payload_bytes: u32,

    /// Most catch-up fires one MISFIRE_POLICY_FIRE_ALL job sends after missing occurrences.
    #[arg(long, env = "TICKD_MAX_CATCH_UP_FIRES", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_catch_up_fires: u32,

    /// Longest wait before redelivering a fire whose ack deadline expired (the backoff starts
    /// at 1s and doubles per attempt).
    #[arg(long, env = "TICKD_MAX_REDELIVERY_BACKOFF", default_value = "60s", value_parser = parse_backoff)]
    pub max_redelivery_backoff: Duration,

    /// Most fires one queue holds un-acked (waiting or in flight). While a queue is full, its
    /// jobs' further occurrences are skipped (logged and counted) and the jobs keep their
    /// schedule.
    #[arg(long, env = "TICKD_MAX_QUEUE_BACKLOG", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_queue_backlog: u32,

    /// Most Subscribe streams open at once, over all queues; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "TICKD_MAX_SUBSCRIBERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_subscribers: u32,

    /// How long a Subscribe call may take to send its `open`; then it ends with
    /// INVALID_ARGUMENT and frees its place.
    #[arg(long, env = "TICKD_SUBSCRIBE_OPEN_TIMEOUT", default_value = "10s", value_parser = parse_open_timeout)]
    pub subscribe_open_timeout: Duration,

    /// How long a COMPLETED or CANCELLED job (with no fire outstanding) is kept after it
    /// finished; then it is deleted and its id can be used again. `0s` deletes it at once.
    #[arg(long, env = "TICKD_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub retention: Duration,

    /// How long a job's ledger (ListOccurrences) keeps the record of an occurrence after its
    /// fate was sealed (delivered, dead-lettered, dropped, skipped).
    #[arg(long, env = "TICKD_LEDGER_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub ledger_retention: Duration,

    /// Most ledger records kept per job; the oldest occurrences go first. `0` keeps no ledger.
    #[arg(long, env = "TICKD_LEDGER_MAX_PER_JOB", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub ledger_max_per_job: u32,

    /// How long shutdown (SIGTERM, SIGINT) may take before tickd exits anyway. Keep it below
    /// the pod's termination grace period.
    #[arg(long, env = "TICKD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_grace)]
    pub shutdown_grace: Duration,

    /// Longest a unary call may take before it fails with DEADLINE_EXCEEDED.
    #[arg(long, env = "TICKD_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_request_timeout)]
    pub request_timeout: Duration,

    /// Calls handled at once across all connections; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TICKD_MAX_CONCURRENT_REQUESTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Interval of HTTP/2 pings on idle connections, so half-open sockets (behind proxies)
    /// are found and closed.
    #[arg(long, env = "TICKD_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_keepalive)]
    pub http2_keepalive_interval: Duration,

    /// How long to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "TICKD_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_keepalive)]
    pub http2_keepalive_timeout: Duration,

    /// PEM certificate chain to serve gRPC over TLS with (with --tls-key). Re-read when it
    /// changes (checked every --reload-interval), so a rotated certificate needs no restart.
    #[arg(long, env = "TICKD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Re-read with it.
    #[arg(long, env = "TICKD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for mutual TLS: clients must present a certificate signed by one
    /// of them, or the connection is refused. Needs --tls-cert. Re-read when it changes.
    #[arg(long, env = "TICKD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// YAML file of principals and what each may do (see the README's Security section).
    /// Unset: every caller may do everything. Re-read when it changes.
    #[arg(long, env = "TICKD_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Address of a plaintext gRPC port serving only grpc.health.v1, for probes that cannot
    /// speak TLS (Kubernetes' native gRPC probes). Unset: none.
    #[arg(long, env = "TICKD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// How often the TLS files and the auth file are checked for changes.
    #[arg(long, env = "TICKD_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_reload_interval)]
    pub reload_interval: Duration,

    /// Log filter, in tracing's EnvFilter syntax (for example `info` or `tickd=debug`).
    #[arg(long, env = "TICKD_LOG", default_value = "info")]
    pub log: String,

    /// Log line format: `text`, or `json` (one object per line, with trace_id and span_id).
    #[arg(long, env = "TICKD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use a duration such as 500ms, 30s, 5m)"))
}

/// A duration within `[min, max]`; out of range, an error that states the range.
fn duration_between(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);

fn parse_poll_interval(s: &str) -> Result<Duration, String> {
    duration_between(s, MS * 10, Duration::from_secs(60))
}

fn parse_open_timeout(s: &str) -> Result<Duration, String> {
    duration_between(s, MS * 10, HOUR)
}

fn parse_backoff(s: &str) -> Result<Duration, String> {
    duration_between(s, SECOND, DAY)
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    duration_between(s, MS * 100, HOUR)
}

fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    duration_between(s, MS * 100, HOUR)
}

fn parse_reload_interval(s: &str) -> Result<Duration, String> {
    duration_between(s, MS * 50, HOUR)
}

fn parse_keepalive(s: &str) -> Result<Duration, String> {
    duration_between(s, SECOND, HOUR)
}

/// Retention: up to ten years (3,660 days).
fn parse_retention(s: &str) -> Result<Duration, String> {
    duration_between(s, Duration::ZERO, DAY * 3_660)
}

impl Config {
    /// The defaults, as if started with no flags and no environment (for tests).
    pub fn defaults() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            database_poll_interval: Duration::from_millis(500),
            database_notify: true,
            database_max_connections: 16,
            test_clock_skew_ms: 0,
            max_payload_bytes: 256 * 1024,
            max_catch_up_fires: 100,
            max_redelivery_backoff: Duration::from_secs(60),
            retention: Duration::from_secs(7 * 24 * 3_600),
            ledger_retention: Duration::from_secs(7 * 24 * 3_600),
            ledger_max_per_job: 1_000,
            max_queue_backlog: 100_000,
            max_subscribers: 10_000,
            subscribe_open_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 10_000,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_file: None,
            health_listen: None,
            reload_interval: Duration::from_secs(10),
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented defaults are what clap produces with no flags.
    #[test]
    fn defaults_match_clap() {
        let parsed = Config::try_parse_from(["tickd"]).expect("defaults parse");
        let d = Config::defaults();
        assert_eq!(parsed.listen, d.listen);
        assert_eq!(parsed.metrics_listen, d.metrics_listen);
        assert_eq!(parsed.data_dir, d.data_dir);
        assert_eq!(parsed.database_url, d.database_url);
        assert_eq!(parsed.database_poll_interval, d.database_poll_interval);
        assert_eq!(parsed.database_notify, d.database_notify);
        assert_eq!(parsed.database_max_connections, d.database_max_connections);
        assert_eq!(parsed.test_clock_skew_ms, d.test_clock_skew_ms);
        assert_eq!(parsed.max_payload_bytes, d.max_payload_bytes);
        assert_eq!(parsed.max_catch_up_fires, d.max_catch_up_fires);
        assert_eq!(parsed.max_redelivery_backoff, d.max_redelivery_backoff);
        assert_eq!(parsed.shutdown_grace, d.shutdown_grace);
        assert_eq!(parsed.retention, d.retention);
        assert_eq!(parsed.ledger_retention, d.ledger_retention);
        assert_eq!(parsed.ledger_max_per_job, d.ledger_max_per_job);
        assert_eq!(parsed.max_queue_backlog, d.max_queue_backlog);
        assert_eq!(parsed.max_subscribers, d.max_subscribers);
        assert_eq!(parsed.subscribe_open_timeout, d.subscribe_open_timeout);
        assert_eq!(parsed.request_timeout, d.request_timeout);
        assert_eq!(parsed.max_concurrent_requests, d.max_concurrent_requests);
        assert_eq!(parsed.tls_cert, d.tls_cert);
        assert_eq!(parsed.auth_file, d.auth_file);
        assert_eq!(parsed.health_listen, d.health_listen);
        assert_eq!(parsed.reload_interval, d.reload_interval);
    }

    /// Every duration flag refuses values out of its range at start, naming the flag and the
    /// range; the edges are accepted.
    #[test]
    fn durations_out_of_range_are_refused_naming_the_flag() {
        for (flag, too_small, too_big, edges) in [
            ("--retention", None, "3661d", ["0s", "3660d"]),
            ("--ledger-retention", None, "3661d", ["0s", "3660d"]),
            (
                "--database-poll-interval",
                Some("9ms"),
                "61s",
                ["10ms", "1m"],
            ),
            (
                "--max-redelivery-backoff",
                Some("999ms"),
                "25h",
                ["1s", "1day"],
            ),
            ("--shutdown-grace", Some("99ms"), "61m", ["100ms", "1h"]),
            ("--reload-interval", Some("49ms"), "61m", ["50ms", "1h"]),
            ("--request-timeout", Some("0s"), "2h", ["100ms", "1h"]),
            ("--http2-keepalive-interval", Some("0s"), "2h", ["1s", "1h"]),
            (
                "--http2-keepalive-timeout",
                Some("500ms"),
                "2h",
                ["1s", "1h"],
            ),
            (
                "--subscribe-open-timeout",
                Some("1ms"),
                "2h",
                ["10ms", "1h"],
            ),
        ] {
            for bad in too_small.into_iter().chain([too_big]) {
                let err = Config::try_parse_from(["tickd", flag, bad]).expect_err(bad);
                let text = err.to_string();
                assert!(
                    text.contains(flag) && text.contains("between"),
                    "{flag} {bad}: {text}"
                );
            }
            for ok in edges {
                Config::try_parse_from(["tickd", flag, ok])
                    .unwrap_or_else(|e| panic!("{flag} {ok}: {e}"));
            }
        }
    }

    /// A bad duration is refused with a hint.
    #[test]
    fn bad_duration_is_refused() {
        let err = Config::try_parse_from(["tickd", "--shutdown-grace", "soon"]).expect_err("bad");
        assert!(err.to_string().contains("30s"), "{err}");
    }
}
