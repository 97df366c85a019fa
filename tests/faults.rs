//! Faults tickd must survive without a restart, and failures it must not hide: a full disk
//! (health turns NOT_SERVING, calls get RESOURCE_EXHAUSTED, everything recovers once there is
//! space), and a writer or timer that dies (the server ends with an error, so the process exits
//! non-zero and is restarted).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use tickd::api::pb;
use tickd::domain::Timestamp;
use tickd::scheduler::{Clock, ManualClock};
use tickd::store::{MemoryStore, Snapshot, Store, StoreError, Write};
use tonic::Code;
use tonic_health::ServingStatus;

/// A tmpfs of a given size mounted on a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: Arc<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = Arc::new(tempdir());
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir.path(),
        );
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        run(
            "mount",
            &["-o", &format!("remount,size={size}")],
            self.dir.path(),
        );
    }

    /// Writes a file of zeros until the file system is full.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.dir.path().join("filler")).expect("filler");
        let block = vec![0_u8; 64 * 1024];
        loop {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn run(cmd: &str, args: &[&str], path: &std::path::Path) {
    let status = std::process::Command::new(cmd)
        .args(args)
        .arg(path)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "{cmd} {args:?} failed (the tests run as root)"
    );
}

fn payload_job(id: &str, bytes: usize) -> pb::Job {
    let mut j = job("disk", after_trigger(3_600_000));
    j.id = id.into();
    j.payload = vec![7_u8; bytes].into();
    j
}

/// A full disk: the calls whose commit fails get RESOURCE_EXHAUSTED naming the cause, health
/// turns NOT_SERVING (liveness stays SERVING), and once the file system is grown tickd serves
/// again by itself, with nothing acknowledged lost and nothing refused stored.
#[tokio::test]
async fn a_full_disk_is_reported_and_recovered_from_without_a_restart() {
    let tmpfs = Tmpfs::mount("8m");
    let mut server = TestServer::manual_in(tmpfs.dir.clone()).await;
    server.schedule(payload_job("before", 1_000)).await;
    tmpfs.fill();

    let mut refused = None;
    for i in 0..200 {
        match server
            .client
            .schedule(pb::ScheduleRequest {
                job: Some(payload_job(&format!("big-{i}"), 200_000)),
                ..Default::default()
            })
            .await
        {
            Ok(_) => continue,
            Err(status) => {
                refused = Some((i, status));
                break;
            }
        }
    }
    let (refused_at, status) = refused.expect("a full disk refuses a write");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("full"), "{status:?}");
    wait_health(server.addr, "", ServingStatus::NotServing).await;
    assert_eq!(
        health_of(server.addr, "tickd.v1.Scheduler").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_of(server.addr, tickd::api::LIVENESS_SERVICE_NAME).await,
        ServingStatus::Serving,
        "a full disk is not a reason to restart"
    );
    expect_code(
        server.get(&format!("big-{refused_at}")).await,
        Code::NotFound,
    );

    tmpfs.resize("64m");
    wait_health(server.addr, "", ServingStatus::Serving).await;
    server.schedule(payload_job("after", 1_000)).await;

    let mut server = server.restart().await;
    server.job("before").await;
    server.job("after").await;
    for i in 0..refused_at {
        server.job(&format!("big-{i}")).await;
    }
    expect_code(
        server.get(&format!("big-{refused_at}")).await,
        Code::NotFound,
    );
    server.stop().await;
    drop(tmpfs);
}

/// A store whose commits panic once told to.
#[derive(Debug, Default)]
struct PanickingStore {
    inner: MemoryStore,
    panic: AtomicBool,
}

impl Store for PanickingStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        assert!(!self.panic.load(Ordering::SeqCst), "injected writer panic");
        self.inner.commit(writes)
    }
}

/// A writer thread that dies turns health and liveness NOT_SERVING and ends the server with an
/// error naming the cause (the process exits non-zero).
#[tokio::test]
async fn a_dead_writer_ends_the_server_with_an_error() {
    let store = Arc::new(PanickingStore::default());
    let clock = Arc::new(ManualClock::new(Timestamp(MANUAL_START_MICROS)));
    let mut server = TestServer::on(store.clone(), clock).await;
    server.schedule(job("w", after_trigger(3_600_000))).await;
    store.panic.store(true, Ordering::SeqCst);
    let status = server
        .client
        .schedule(pb::ScheduleRequest {
            job: Some(job("w", after_trigger(3_600_000))),
            ..Default::default()
        })
        .await
        .expect_err("the writer died");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let ended = server.stopped().await.expect_err("ends with an error");
    assert!(
        ended.to_string().contains("writer thread panicked"),
        "{ended}"
    );
}

/// A clock whose sleeps panic once told to: only the timer task sleeps on the clock.
#[derive(Debug)]
struct PanickingClock {
    inner: ManualClock,
    panic: AtomicBool,
}

impl Clock for PanickingClock {
    fn now(&self) -> Timestamp {
        self.inner.now()
    }

    fn steady_now(&self) -> Timestamp {
        self.inner.steady_now()
    }

    fn sleep_until(&self, deadline: Timestamp) -> tickd::scheduler::clock::Sleep<'_> {
        let sleep = self.inner.sleep_until(deadline);
        Box::pin(async move {
            sleep.await;
            assert!(!self.panic.load(Ordering::SeqCst), "injected timer panic");
        })
    }
}

/// A timer task that dies is noticed the same way: health NOT_SERVING, liveness NOT_SERVING,
/// and the server ends with an error.
#[tokio::test]
async fn a_dead_timer_ends_the_server_with_an_error() {
    let clock = Arc::new(PanickingClock {
        inner: ManualClock::new(Timestamp(MANUAL_START_MICROS)),
        panic: AtomicBool::new(false),
    });
    let server = TestServer::on(Arc::new(MemoryStore::new()), clock.clone()).await;
    let addr = server.addr;
    let mut watcher = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    let mut watch = watcher
        .watch(tonic_health::pb::HealthCheckRequest {
            service: tickd::api::LIVENESS_SERVICE_NAME.into(),
        })
        .await
        .expect("watch liveness")
        .into_inner();
    let first = watch.message().await.expect("status").expect("one");
    assert_eq!(
        first.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    clock.panic.store(true, Ordering::SeqCst);
    clock.inner.advance(60_000_000);
    let second = watch.message().await.expect("status").expect("one");
    assert_eq!(
        second.status(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let ended = server.stopped().await.expect_err("ends with an error");
    assert!(ended.to_string().contains("timer task panicked"), "{ended}");
}

/// A call that holds the drain (a Subscribe that never sends its open) gets only three quarters
/// of the shutdown grace: the rest is kept for the final commit, so shutdown still commits and
/// ends before the grace runs out.
#[tokio::test]
async fn a_stuck_call_leaves_the_final_commit_its_share_of_the_grace() {
    let mut server = TestServer::start_with(|c| {
        c.shutdown_grace = std::time::Duration::from_secs(2);
        c.subscribe_open_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let (_hold, rx) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(1);
    let mut holder = server.client.clone();
    let held = tokio::spawn(async move {
        holder
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    server.schedule(job("q", after_trigger(3_600_000))).await;
    let started = std::time::Instant::now();
    server.stop().await;
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1_450),
        "the drain was cut early: {took:?}"
    );
    assert!(
        took < std::time::Duration::from_millis(1_950),
        "the drain took the whole grace: {took:?}"
    );
    held.abort();
}
