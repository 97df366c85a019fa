//! Every `TICKD_*` environment variable reaches its flag. A test binary of its own, with one
//! test, because it sets the process environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use tickd::config::Config;
use tickd::telemetry::LogFormat;

/// Each variable set to a value unlike its default shows up in the parsed configuration, and
/// the list covers every variable the command line declares (a new flag needs a line here).
#[test]
fn every_tickd_variable_reaches_its_flag() {
    let env = [
        ("TICKD_LISTEN", "127.0.0.2:6000"),
        ("TICKD_METRICS_LISTEN", "127.0.0.3:6001"),
        ("TICKD_DATA_DIR", "/tmp/tickd-env-test"),
        ("TICKD_DATABASE_URL", "postgres://u@db:5432/t"),
        ("TICKD_DATABASE_POLL_INTERVAL", "250ms"),
        ("TICKD_DATABASE_NOTIFY", "false"),
        ("TICKD_DATABASE_MAX_CONNECTIONS", "4"),
        ("TICKD_TEST_CLOCK_SKEW_MS", "-1500"),
        ("TICKD_MAX_PAYLOAD_BYTES", "1000"),
        ("TICKD_MAX_CATCH_UP_FIRES", "7"),
        ("TICKD_MAX_REDELIVERY_BACKOFF", "3s"),
        ("TICKD_SHUTDOWN_GRACE", "4s"),
        ("TICKD_RETENTION", "12h"),
        ("TICKD_LEDGER_RETENTION", "2d"),
        ("TICKD_LEDGER_MAX_PER_JOB", "50"),
        ("TICKD_MAX_QUEUE_BACKLOG", "77"),
        ("TICKD_MAX_SUBSCRIBERS", "55"),
        ("TICKD_SUBSCRIBE_OPEN_TIMEOUT", "3s"),
        ("TICKD_REQUEST_TIMEOUT", "5s"),
        ("TICKD_MAX_CONCURRENT_REQUESTS", "9"),
        ("TICKD_HTTP2_KEEPALIVE_INTERVAL", "6s"),
        ("TICKD_HTTP2_KEEPALIVE_TIMEOUT", "2s"),
        ("TICKD_LOG", "debug"),
        ("TICKD_LOG_FORMAT", "json"),
        ("TICKD_TLS_CERT", "/etc/tickd/tls/tls.crt"),
        ("TICKD_TLS_KEY", "/etc/tickd/tls/tls.key"),
        ("TICKD_TLS_CLIENT_CA", "/etc/tickd/client-ca/ca.crt"),
        ("TICKD_AUTH_FILE", "/etc/tickd/auth/auth.yaml"),
        ("TICKD_HEALTH_LISTEN", "0.0.0.0:8081"),
        ("TICKD_RELOAD_INTERVAL", "30s"),
    ];
    let declared: Vec<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut tested: Vec<String> = env.iter().map(|(k, _)| k.to_string()).collect();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort();
    tested.sort();
    assert_eq!(tested, declared_sorted, "every TICKD_* variable is tested");

    for (k, v) in env {
        // SAFETY: the only test in this binary, so no other thread reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let c = Config::try_parse_from(["tickd"]).expect("parse");
    assert_eq!(
        c.listen,
        "127.0.0.2:6000".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        c.metrics_listen,
        "127.0.0.3:6001".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(c.data_dir, PathBuf::from("/tmp/tickd-env-test"));
    assert_eq!(c.database_url.as_deref(), Some("postgres://u@db:5432/t"));
    assert_eq!(c.database_poll_interval, Duration::from_millis(250));
    assert!(!c.database_notify);
    assert_eq!(c.database_max_connections, 4);
    assert_eq!(c.test_clock_skew_ms, -1_500);
    assert_eq!(c.max_payload_bytes, 1_000);
    assert_eq!(c.max_catch_up_fires, 7);
    assert_eq!(c.max_redelivery_backoff, Duration::from_secs(3));
    assert_eq!(c.shutdown_grace, Duration::from_secs(4));
    assert_eq!(c.retention, Duration::from_secs(12 * 3_600));
    assert_eq!(c.ledger_retention, Duration::from_secs(2 * 24 * 3_600));
    assert_eq!(c.ledger_max_per_job, 50);
    assert_eq!(c.max_queue_backlog, 77);
    assert_eq!(c.max_subscribers, 55);
    assert_eq!(c.subscribe_open_timeout, Duration::from_secs(3));
    assert_eq!(c.request_timeout, Duration::from_secs(5));
    assert_eq!(c.max_concurrent_requests, 9);
    assert_eq!(c.http2_keepalive_interval, Duration::from_secs(6));
    assert_eq!(c.http2_keepalive_timeout, Duration::from_secs(2));
    assert_eq!(c.log, "debug");
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/tickd/tls/tls.crt")));
    assert_eq!(c.tls_key, Some(PathBuf::from("/etc/tickd/tls/tls.key")));
    assert_eq!(
        c.tls_client_ca,
        Some(PathBuf::from("/etc/tickd/client-ca/ca.crt"))
    );
    assert_eq!(
        c.auth_file,
        Some(PathBuf::from("/etc/tickd/auth/auth.yaml"))
    );
    assert_eq!(c.health_listen, "0.0.0.0:8081".parse::<SocketAddr>().ok());
    assert_eq!(c.reload_interval, Duration::from_secs(30));

    // A flag beats its variable.
    let c = Config::try_parse_from(["tickd", "--max-catch-up-fires", "8"]).expect("parse");
    assert_eq!(c.max_catch_up_fires, 8);
}
