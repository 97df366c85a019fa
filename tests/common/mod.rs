//! Shared test harness: a real tickd server on an ephemeral port with a temporary data
//! directory, driven by the generated tonic client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tickd::config::Config;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

pub type Client = SchedulerClient<Channel>;

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The Prometheus endpoint (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tickd::api::ServerError>>>,
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 keeping its data in `dir`.
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(dir, |_| {}).await
    }

    /// Starts a server with adjusted configuration.
    pub async fn start_with(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::defaults();
        config.data_dir = dir.to_path_buf();
        config.shutdown_grace = Duration::from_secs(5);
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics_addr = metrics.local_addr().expect("local addr");
        let listeners = tickd::api::Listeners {
            grpc: listener,
            metrics,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tickd::api::run(listeners, &config, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = connect(addr).await;
        TestServer {
            addr,
            metrics_addr,
            client,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .expect("server task");
            result.expect("server ran without error");
        }
    }
}

/// A plaintext HTTP/2 channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// Connects a client to `addr`.
pub async fn connect(addr: SocketAddr) -> Client {
    SchedulerClient::new(channel(addr).await)
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A Timestamp `offset_ms` from now (negative for the past).
pub fn ts_in(offset_ms: i64) -> PbTimestamp {
    ts_micros(now_micros() + offset_ms * 1_000)
}

pub fn ts_micros(micros: i64) -> PbTimestamp {
    PbTimestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

pub fn micros_of(t: &Option<PbTimestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

pub fn ms(ms: i64) -> PbDuration {
    PbDuration {
        seconds: ms / 1_000,
        nanos: ((ms % 1_000) * 1_000_000) as i32,
    }
}

pub fn at_trigger(t: PbTimestamp) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::At(t)),
    }
}

pub fn after_trigger(delay_ms: i64) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::After(ms(delay_ms))),
    }
}

pub fn every_trigger(period_ms: i64, start: Option<PbTimestamp>) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Every(pb::Interval {
            period: Some(ms(period_ms)),
            start_time: start,
            jitter: None,
        })),
    }
}

pub fn cron_trigger(expression: &str, time_zone: &str) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Cron(pb::Cron {
            expression: expression.into(),
            time_zone: time_zone.into(),
        })),
    }
}

/// A job on `queue` with `trigger` and defaults for everything else.
pub fn job(queue: &str, trigger: pb::Trigger) -> pb::Job {
    pb::Job {
        queue: queue.into(),
        trigger: Some(trigger),
        ..Default::default()
    }
}

pub async fn schedule(client: &mut Client, job: pb::Job) -> pb::Job {
    client
        .schedule(pb::ScheduleRequest { job: Some(job) })
        .await
        .expect("schedule")
        .into_inner()
}

/// An open Subscribe stream: send acks through `tx`, read fires from `fires`.
pub struct Sub {
    pub tx: mpsc::Sender<pb::SubscribeRequest>,
    pub fires: Streaming<pb::Fire>,
}

impl Sub {
    pub async fn open(client: &mut Client, queue: &str, max_in_flight: u32) -> Sub {
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                queue: queue.into(),
                max_in_flight,
            })),
        })
        .await
        .expect("send open");
        let fires = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .expect("subscribe")
            .into_inner();
        Sub { tx, fires }
    }

    /// The next fire, failing the test if none arrives within `within_ms`.
    pub async fn next(&mut self, within_ms: u64) -> pb::Fire {
        match tokio::time::timeout(Duration::from_millis(within_ms), self.fires.message()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream failed: {s:?}"),
            Err(_) => panic!("no fire within {within_ms} ms"),
        }
    }

    /// Asserts that no fire arrives within `ms`.
    pub async fn expect_none(&mut self, ms: u64) {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(ms), self.fires.message()).await {
            panic!("expected no fire, got {r:?}");
        }
    }

    /// What the stream ends with: `Ok(None)` for a clean end, `Err` for a status.
    pub async fn end(&mut self, within_ms: u64) -> Result<Option<pb::Fire>, Status> {
        tokio::time::timeout(Duration::from_millis(within_ms), self.fires.message())
            .await
            .expect("stream ends in time")
    }

    pub async fn ack(&self, fire_ids: &[&str]) {
        self.send(pb::subscribe_request::Request::Ack(pb::AckFires {
            fire_ids: fire_ids.iter().map(|s| s.to_string()).collect(),
        }))
        .await;
    }

    pub async fn nack(&self, fire_ids: &[&str], delay_ms: Option<i64>) {
        self.send(pb::subscribe_request::Request::Nack(pb::NackFires {
            fire_ids: fire_ids.iter().map(|s| s.to_string()).collect(),
            retry_delay: delay_ms.map(ms),
        }))
        .await;
    }

    pub async fn send(&self, request: pb::subscribe_request::Request) {
        self.tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .expect("send");
    }
}

/// The fields named by a status's BadRequest violations.
pub fn bad_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts `status` is INVALID_ARGUMENT with a BadRequest violation on `field`.
pub fn assert_bad_field(status: &Status, field: &str) {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details in {status:?}"));
    assert!(
        bad.field_violations.iter().any(|v| v.field == field),
        "no violation on {field}: {:?}",
        bad.field_violations
    );
}

/// Starts the real `tickd` binary on a free port with `dir` as its data directory and extra
/// environment; returns the child and its address. Its stdout lines are forwarded to `lines`.
pub fn spawn_binary_with(
    dir: &Path,
    env: &[(&str, &str)],
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> (Child, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tickd"));
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .env("TICKD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn tickd");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line
                .split("addr=")
                .nth(1)
                .or_else(|| line.split("\"addr\":\"").nth(1))
            {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"')
                    .collect();
                let _ = tx.send(addr);
            }
            if let Some(lines) = &lines {
                let _ = lines.send(line);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("tickd logged its address");
    (child, addr.parse().expect("address"))
}

/// [`spawn_binary_with`] with default settings.
pub fn spawn_binary(dir: &Path) -> (Child, SocketAddr) {
    spawn_binary_with(dir, &[], None)
}
