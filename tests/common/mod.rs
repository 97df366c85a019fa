//! Shared test harness: a real tickd server on an ephemeral port with a temporary data
//! directory it owns, driven by the generated tonic client; optionally on a manual clock that
//! the test moves, so time-dependent behaviour is exact and fast. Also a guard for the real
//! binary run as a child process, and helpers for the repeated calls.

#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tickd::config::Config;
use tickd::domain::Timestamp;
use tickd::scheduler::{Clock, ManualClock, QueueStats, Scheduler, SystemClock};
use tickd::store::{RedbStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

pub type Client = SchedulerClient<Channel>;

/// Where a manual clock starts: 2026-06-01T00:00:00Z.
pub const MANUAL_START_MICROS: i64 = 1_780_272_000_000_000;
/// Longest a test waits for the server to settle or for something it is sure will come.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running server on 127.0.0.1:0 with its own temporary data directory. Started on the system
/// clock ([`TestServer::start`]) or on a manual clock that only the test moves
/// ([`TestServer::manual`]); [`TestServer::restart`] stops it gracefully and starts it again on
/// the same directory, clock and configuration.
pub struct TestServer {
    pub backend: Backend,
    pub addr: SocketAddr,
    /// The Prometheus endpoint (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    /// The plaintext health port, when the configuration asks for one (`health_listen`;
    /// the test binds an ephemeral port whatever address it names).
    pub health_addr: Option<SocketAddr>,
    pub client: Client,
    /// The running core, to settle it and read its counts. Dropped before a restart.
    pub core: Scheduler,
    /// Set for a server on a manual clock.
    pub clock: Option<Arc<ManualClock>>,
    config: Config,
    dir: Arc<tempfile::TempDir>,
    /// The database of a server on PostgreSQL.
    db: Option<Arc<pg::TestDatabase>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tickd::api::ServerError>>>,
}

impl TestServer {
    /// A server on the system clock with default settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server on the system clock with adjusted configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::launch(Arc::new(tempdir()), None, test_config(tweak)).await
    }

    /// A server on a manual clock at [`MANUAL_START_MICROS`].
    pub async fn manual() -> TestServer {
        Self::manual_with(|_| {}).await
    }

    /// A server on a manual clock with adjusted configuration.
    pub async fn manual_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let clock = Arc::new(ManualClock::new(Timestamp(MANUAL_START_MICROS)));
        Self::launch(Arc::new(tempdir()), Some(clock), test_config(tweak)).await
    }

    /// A server on a manual clock at [`MANUAL_START_MICROS`] whose store is `wrap` around the
    /// embedded store (to slow, hold or fail commits). A restart opens the plain store again.
    pub async fn manual_on(wrap: impl FnOnce(RedbStore) -> Arc<dyn Store>) -> TestServer {
        let clock = Arc::new(ManualClock::new(Timestamp(MANUAL_START_MICROS)));
        let dir = Arc::new(tempdir());
        let store = wrap(RedbStore::open(dir.path()).expect("open the store"));
        Self::launch_on(dir, Some(clock), test_config(|_| {}), store).await
    }

    /// A server on a manual clock at [`MANUAL_START_MICROS`] on the embedded store in `dir`
    /// (for a directory the test prepared, such as a size-limited mount).
    pub async fn manual_in(dir: Arc<tempfile::TempDir>) -> TestServer {
        let clock = Arc::new(ManualClock::new(Timestamp(MANUAL_START_MICROS)));
        Self::launch(dir, Some(clock), test_config(|_| {})).await
    }

    /// A server on `clock` whose store is `store`; its data directory is a fresh one.
    pub async fn on(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> TestServer {
        Self::launch_with_clock(Arc::new(tempdir()), None, clock, test_config(|_| {}), store).await
    }

    /// Waits (20 s at most) for the server to stop by itself, and returns how it ended.
    pub async fn stopped(mut self) -> Result<(), tickd::api::ServerError> {
        let task = self.task.take().expect("server running");
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the server stops by itself")
            .expect("server task")
    }

    /// A server on a manual clock at `micros` with adjusted configuration.
    pub async fn manual_at(micros: i64, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let clock = Arc::new(ManualClock::new(Timestamp(micros)));
        Self::launch(Arc::new(tempdir()), Some(clock), test_config(tweak)).await
    }

    async fn launch(
        dir: Arc<tempfile::TempDir>,
        clock: Option<Arc<ManualClock>>,
        config: Config,
    ) -> TestServer {
        let store = RedbStore::open(dir.path()).expect("open the store");
        Self::launch_on(dir, clock, config, Arc::new(store)).await
    }

    /// A server on `backend` (a fresh database of its own for PostgreSQL).
    async fn launch_new(
        backend: Backend,
        clock: Option<Arc<ManualClock>>,
        config: Config,
    ) -> TestServer {
        let dir = Arc::new(tempdir());
        match backend {
            Backend::Embedded => Self::launch(dir, clock, config).await,
            Backend::Postgres => {
                let db = Arc::new(pg::TestDatabase::create().await);
                Self::launch_pg(dir, clock, config, db).await
            }
        }
    }

    /// A replica on `db`; on `clock`'s time when given (else the database's).
    async fn launch_pg(
        dir: Arc<tempfile::TempDir>,
        clock: Option<Arc<ManualClock>>,
        mut config: Config,
        db: Arc<pg::TestDatabase>,
    ) -> TestServer {
        config.data_dir = dir.path().to_path_buf();
        let (core_clock, use_core_clock): (Arc<dyn Clock>, bool) = match &clock {
            Some(c) => (c.clone(), true),
            None => (Arc::new(SystemClock), false),
        };
        let core = tickd::api::start_replica(&db.url, core_clock, use_core_clock, &config)
            .await
            .expect("start the replica");
        let mut server = Self::serve_core(core, dir, clock, config).await;
        server.backend = Backend::Postgres;
        server.db = Some(db);
        server
    }

    /// Starts the server anew after [`TestServer::shut_down`], on what it kept.
    async fn relaunch(saved: Saved) -> TestServer {
        match saved.db {
            Some(db) => Self::launch_pg(saved.dir, saved.clock, saved.config, db).await,
            None => Self::launch(saved.dir, saved.clock, saved.config).await,
        }
    }

    async fn launch_on(
        dir: Arc<tempfile::TempDir>,
        clock: Option<Arc<ManualClock>>,
        config: Config,
        store: Arc<dyn Store>,
    ) -> TestServer {
        let core_clock: Arc<dyn Clock> = match &clock {
            Some(c) => c.clone(),
            None => Arc::new(SystemClock),
        };
        Self::launch_with_clock(dir, clock, core_clock, config, store).await
    }

    async fn launch_with_clock(
        dir: Arc<tempfile::TempDir>,
        clock: Option<Arc<ManualClock>>,
        core_clock: Arc<dyn Clock>,
        config: Config,
        store: Arc<dyn Store>,
    ) -> TestServer {
        let mut config = config;
        config.data_dir = dir.path().to_path_buf();
        let core = tickd::api::start_core(store, core_clock, &config)
            .await
            .expect("start the core");
        Self::serve_core(core, dir, clock, config).await
    }

    /// Serves `core` on ephemeral ports.
    async fn serve_core(
        core: Scheduler,
        dir: Arc<tempfile::TempDir>,
        clock: Option<Arc<ManualClock>>,
        config: Config,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics_addr = metrics.local_addr().expect("local addr");
        let health = match config.health_listen {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            None => None,
        };
        let health_addr = health.as_ref().map(|l| l.local_addr().expect("local addr"));
        let listeners = tickd::api::Listeners {
            grpc: listener,
            metrics,
            health,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let served = core.clone();
        let serve_config = config.clone();
        let task = tokio::spawn(async move {
            tickd::api::serve(listeners, served, &serve_config, async {
                let _ = stopped.await;
            })
            .await
        });
        // A TLS server's clients are the test's own (with its CA and certificates).
        let client = match config.tls_cert {
            Some(_) => SchedulerClient::new(
                Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect_lazy(),
            ),
            None => connect(addr).await,
        };
        TestServer {
            backend: Backend::Embedded,
            addr,
            metrics_addr,
            health_addr,
            client,
            core,
            clock,
            config,
            dir,
            db: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn stop(self) {
        self.shut_down().await;
    }

    async fn shut_down(mut self) -> Saved {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops in time")
                .expect("server task");
            result.expect("server ran without error");
        }
        Saved {
            dir: self.dir.clone(),
            clock: self.clock.clone(),
            config: self.config.clone(),
            db: self.db.clone(),
        }
    }

    /// Stops the server gracefully and starts it again on the same data directory, clock and
    /// configuration (with new ports and a new client).
    pub async fn restart(self) -> TestServer {
        let saved = self.shut_down().await;
        Self::relaunch(saved).await
    }

    /// [`TestServer::restart`] with the configuration changed by `tweak`.
    pub async fn restart_with(self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut saved = self.shut_down().await;
        tweak(&mut saved.config);
        Self::relaunch(saved).await
    }

    /// Stops the server gracefully, moves its manual clock forward by `ms` while it is down,
    /// and starts it again.
    pub async fn restart_after(self, ms: i64) -> TestServer {
        let saved = self.shut_down().await;
        saved
            .clock
            .as_deref()
            .expect("a server on a manual clock")
            .advance(ms * 1_000);
        Self::relaunch(saved).await
    }

    /// Another server on the same database (PostgreSQL only), clock and configuration: a
    /// second replica.
    pub async fn replica(&self) -> TestServer {
        let db = self.db.clone().expect("a server on PostgreSQL");
        Self::launch_pg(
            Arc::new(tempdir()),
            self.clock.clone(),
            self.config.clone(),
            db,
        )
        .await
    }

    /// The manual clock; panics for a server on the system clock.
    pub fn manual_clock(&self) -> &ManualClock {
        self.clock.as_deref().expect("a server on a manual clock")
    }

    /// Now, as the server's clock says, in microseconds.
    pub fn now(&self) -> i64 {
        self.core.now().as_micros()
    }

    /// A Timestamp `offset_ms` from the server's now.
    pub fn ts_in(&self, offset_ms: i64) -> PbTimestamp {
        ts_micros(self.now() + offset_ms * 1_000)
    }

    /// Waits until everything due at the current time is released, committed and applied.
    pub async fn settle(&self) {
        tokio::time::timeout(PATIENCE, self.core.settle())
            .await
            .expect("the server settles in time");
    }

    /// Moves the manual clock forward by `ms` and settles.
    pub async fn advance(&self, ms: i64) {
        self.manual_clock().advance(ms * 1_000);
        self.settle().await;
    }

    /// Moves the manual clock forward to `micros` (no-op if it is already there) and settles.
    pub async fn advance_to(&self, micros: i64) {
        let by = micros - self.now();
        if by > 0 {
            self.manual_clock().advance(by);
        }
        self.settle().await;
    }

    /// The core's counts for `queue` (all zero for a queue it does not know).
    pub fn queue(&self, queue: &str) -> QueueStats {
        self.core
            .stats()
            .queues
            .into_iter()
            .find(|(name, _)| name == queue)
            .map(|(_, q)| q)
            .unwrap_or_default()
    }

    /// (backlog, in flight) of `queue`.
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        let q = self.queue(queue);
        (q.backlog, q.in_flight)
    }

    /// Polls until `check` holds, failing the test if it never does. (On PostgreSQL the
    /// counts are read again, by a settle, before each check: the ones kept may be older than
    /// what the test did since.)
    pub async fn wait_until(&self, what: &str, mut check: impl FnMut(&TestServer) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if self.backend == Backend::Postgres {
                self.settle().await;
            }
            if check(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never happened: {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Polls until `queue` has `in_flight` fires in flight (after stream acks, nacks and
    /// drops, which the server learns of asynchronously), then settles.
    pub async fn wait_in_flight(&self, queue: &str, in_flight: u64) {
        self.wait_until(&format!("{in_flight} fire(s) in flight on {queue}"), |s| {
            s.queue(queue).in_flight == in_flight
        })
        .await;
        self.settle().await;
    }

    pub async fn schedule(&mut self, job: pb::Job) -> pb::Job {
        schedule(&mut self.client, job).await
    }

    pub async fn get(&mut self, id: &str) -> Result<pb::Job, Status> {
        let id = id.to_string();
        self.client
            .get_job(pb::GetJobRequest { id })
            .await
            .map(|r| r.into_inner())
    }

    /// The job, which must exist.
    pub async fn job(&mut self, id: &str) -> pb::Job {
        self.get(id)
            .await
            .unwrap_or_else(|e| panic!("job {id}: {e:?}"))
    }

    pub async fn cancel(&mut self, id: &str) -> Result<pb::Job, Status> {
        let id = id.to_string();
        self.client
            .cancel_job(pb::CancelJobRequest { id })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn pause(&mut self, id: &str) -> Result<pb::Job, Status> {
        let id = id.to_string();
        self.client
            .pause_job(pb::PauseJobRequest { id })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn resume(&mut self, id: &str) -> Result<pb::Job, Status> {
        let id = id.to_string();
        self.client
            .resume_job(pb::ResumeJobRequest { id })
            .await
            .map(|r| r.into_inner())
    }

    /// Acks through the unary Ack; returns how many were pending.
    pub async fn ack(&mut self, queue: &str, fire_ids: &[&str]) -> u32 {
        self.client
            .ack(pb::AckRequest {
                queue: queue.into(),
                fire_ids: fire_ids.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .expect("ack")
            .into_inner()
            .acked_count
    }

    pub async fn subscribe(&mut self, queue: &str, max_in_flight: u32) -> Sub {
        Sub::open(&mut self.client, queue, max_in_flight).await
    }
}

/// What a stopped server keeps for its restart.
struct Saved {
    dir: Arc<tempfile::TempDir>,
    clock: Option<Arc<ManualClock>>,
    config: Config,
    db: Option<Arc<pg::TestDatabase>>,
}

/// The store a test server runs on. A contract test takes one and runs on each (see
/// [`both_backends!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store (redb) in a temporary directory.
    Embedded,
    /// A PostgreSQL database of the test's own.
    Postgres,
}

impl Backend {
    /// "embedded" or "postgres": for names a test keeps apart per backend (metrics are per
    /// process, and both backends' tests run in one).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
        }
    }

    /// A server on the system clock with default settings.
    pub async fn start(self) -> TestServer {
        self.start_with(|_| {}).await
    }

    /// A server on the system clock with adjusted configuration.
    pub async fn start_with(self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::launch_new(self, None, test_config(tweak)).await
    }

    /// A server on a manual clock at [`MANUAL_START_MICROS`].
    pub async fn manual(self) -> TestServer {
        self.manual_with(|_| {}).await
    }

    /// A server on a manual clock with adjusted configuration.
    pub async fn manual_with(self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        self.manual_at(MANUAL_START_MICROS, tweak).await
    }

    /// A server on a manual clock at `micros` with adjusted configuration.
    pub async fn manual_at(self, micros: i64, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let clock = Arc::new(ManualClock::new(Timestamp(micros)));
        TestServer::launch_new(self, Some(clock), test_config(tweak)).await
    }
}

/// Declares a test that runs once per backend from one body: `name::embedded`, and with the
/// `postgres-tests` feature `name::postgres`. The body gets the backend as `$b`.
///
/// ```ignore
/// both_backends! {
///     /// What it checks.
///     #[tokio::test]
///     async fn name(backend) { let server = backend.manual().await; ... }
/// }
/// ```
#[macro_export]
macro_rules! both_backends {
    ($($(#[$m:meta])* async fn $name:ident($b:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$m])*
            async fn embedded() {
                run($crate::common::Backend::Embedded).await
            }
            #[cfg(feature = "postgres-tests")]
            $(#[$m])*
            async fn postgres() {
                run($crate::common::Backend::Postgres).await
            }
            async fn run($b: $crate::common::Backend) $body
        }
    )*};
}

/// Test defaults: a shutdown grace that keeps a broken shutdown from hanging a test long.
fn test_config(tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::defaults();
    config.shutdown_grace = Duration::from_secs(5);
    tweak(&mut config);
    config
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Asserts that `result` failed with `code`, and returns its status.
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            s
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
            ..Default::default()
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
        .schedule(pb::ScheduleRequest {
            job: Some(job),
            ..Default::default()
        })
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

    /// The next fire, for one the test knows is ready or coming; fails the test after a long
    /// wait.
    pub async fn recv(&mut self) -> pb::Fire {
        self.next(PATIENCE.as_millis() as u64).await
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

    pub async fn extend(&self, fire_ids: &[&str], deadline_ms: i64) {
        self.send(pb::subscribe_request::Request::Extend(
            pb::ExtendAckDeadline {
                fire_ids: fire_ids.iter().map(|s| s.to_string()).collect(),
                ack_deadline: Some(ms(deadline_ms)),
            },
        ))
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

/// `GET /metrics`, as text.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tickd\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the first sample whose line starts with `name{` and contains every label.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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

/// The real `tickd` binary as a child process on free ports, with a data directory it may
/// own. Killed (SIGKILL) and reaped when dropped, so a failing assertion leaves no server
/// behind.
pub struct TickdProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The Prometheus endpoint.
    pub metrics_addr: SocketAddr,
    /// Set when this process owns its data directory (see [`TickdProcess::start`]).
    owned_dir: Option<tempfile::TempDir>,
    dir: PathBuf,
    exited: Option<ExitStatus>,
}

impl TickdProcess {
    /// Starts tickd on a new temporary data directory.
    pub fn start() -> TickdProcess {
        let dir = tempdir();
        let mut p = Self::start_in(dir.path(), &[], None);
        p.owned_dir = Some(dir);
        p
    }

    /// Starts tickd as a replica on the PostgreSQL database at `url`, with extra environment
    /// (its data directory, unused, is its own).
    pub fn replica(url: &str, env: &[(&str, &str)]) -> TickdProcess {
        let dir = tempdir();
        let mut all = vec![("TICKD_DATABASE_URL", url)];
        all.extend_from_slice(env);
        let mut p = Self::start_in(dir.path(), &all, None);
        p.owned_dir = Some(dir);
        p
    }

    /// Starts tickd on `dir` with extra environment; its stdout lines go to `lines`.
    pub fn start_in(
        dir: &Path,
        env: &[(&str, &str)],
        lines: Option<std::sync::mpsc::Sender<String>>,
    ) -> TickdProcess {
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
                if let (Some(grpc), Some(metrics)) =
                    (log_field(&line, "addr"), log_field(&line, "metrics_addr"))
                {
                    let _ = tx.send((grpc, metrics));
                }
                if let Some(lines) = &lines {
                    let _ = lines.send(line);
                }
            }
        });
        let (addr, metrics_addr) = match rx.recv_timeout(PATIENCE) {
            Ok(addrs) => addrs,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tickd did not log its address: {e}");
            }
        };
        TickdProcess {
            child,
            addr: addr.parse().expect("address"),
            metrics_addr: metrics_addr.parse().expect("metrics address"),
            owned_dir: None,
            dir: dir.to_path_buf(),
            exited: None,
        }
    }

    /// Starts tickd again on this process's data directory (after it exited); the new process
    /// takes over the directory.
    pub fn start_again(mut self) -> TickdProcess {
        assert!(
            self.exited.is_some(),
            "the previous process is still running"
        );
        let mut next = Self::start_in(&self.dir, &[], None);
        next.owned_dir = self.owned_dir.take();
        next
    }

    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Stops the process (SIGSTOP), as a long pause would.
    pub fn sigstop(&self) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGSTOP) }, 0);
    }

    /// Lets a stopped process go on (SIGCONT).
    pub fn sigcont(&self) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGCONT) }, 0);
    }

    /// Sends SIGTERM (a graceful shutdown).
    pub fn sigterm(&self) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
    }

    /// kill -9, and reaps the process.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.exited = Some(self.child.wait().expect("reap"));
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tickd did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The value of `key` in a text (`key=value`) or JSON (`"key":"value"`) log line.
fn log_field(line: &str, key: &str) -> Option<String> {
    let text = format!(" {key}=");
    let json = format!("\"{key}\":\"");
    let rest = line.split_once(&text).or_else(|| line.split_once(&json))?.1;
    Some(
        rest.chars()
            .take_while(|c| !c.is_whitespace() && *c != '"')
            .collect(),
    )
}

impl Drop for TickdProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `tickd_occurrences_skipped_total` for `queue` and `reason` in a scrape.
pub fn skipped_occurrences(text: &str, queue: &str, reason: &str) -> Option<f64> {
    sample(
        text,
        "tickd_occurrences_skipped_total",
        &[
            &format!("tickd_queue=\"{queue}\""),
            &format!("tickd_skip_reason=\"{reason}\""),
        ],
    )
}

/// The grpc.health.v1 status of `service` ("" for the whole server).
pub async fn health_of(addr: SocketAddr, service: &str) -> tonic_health::ServingStatus {
    use tonic_health::pb::health_check_response::ServingStatus as Pb;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    let status = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answered")
        .into_inner()
        .status();
    match status {
        Pb::Serving => tonic_health::ServingStatus::Serving,
        Pb::NotServing => tonic_health::ServingStatus::NotServing,
        _ => tonic_health::ServingStatus::Unknown,
    }
}

/// Polls health until `service` reports `want` (20 s at most: health follows the core a moment
/// after it changes).
pub async fn wait_health(addr: SocketAddr, service: &str, want: tonic_health::ServingStatus) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let now = health_of(addr, service).await;
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health of {service:?} stayed {now:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
