//! The scheduler core driven directly, with a manual clock and an in-memory store: virtual
//! time, group commit, failing disks, cancelled callers and rebuilding memory from the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::TimeZone;
use tickd::domain::{JobSpec, JobState, MisfirePolicy, Timestamp, TriggerSpec};
use tickd::scheduler::{
    Clock, Delivery, ManualClock, Scheduler, SchedulerConfig, SchedulerError, Subscription,
};
use tickd::store::{MemoryStore, Snapshot, Store, StoreError, Write};

const S: i64 = 1_000_000;

fn spec(id: &str, trigger: TriggerSpec) -> JobSpec {
    JobSpec {
        id: id.into(),
        queue: "q".into(),
        trigger,
        payload: Bytes::new(),
        labels: BTreeMap::new(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: 5 * S,
        ack_deadline: 30 * S,
        max_attempts: 10,
        dead_letter_queue: None,
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Timestamp {
    Timestamp::from_chrono(
        &chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("time"),
    )
}

async fn start(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Scheduler {
    Scheduler::start(store, clock, SchedulerConfig::default())
        .await
        .expect("start")
}

/// The next delivery, or a failed test after a short real-time wait.
async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(2), sub.recv())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

async fn none(sub: &mut Subscription) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
        panic!("expected nothing, got {d:?}");
    }
}

/// Lets the timer loop and the writer run after a clock move.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A daily 02:30 Berlin job over a week that contains the spring-forward night fires once a
/// day, at 03:00 on the night 02:30 does not exist — in milliseconds of real time.
#[tokio::test]
async fn a_week_of_berlin_cron_in_virtual_time() {
    let clock = Arc::new(ManualClock::new(utc(2026, 3, 26, 12, 0)));
    let core = start(Arc::new(MemoryStore::new()), clock.clone()).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    core.schedule(spec(
        "daily",
        TriggerSpec::Cron {
            expression: "30 2 * * *".into(),
            time_zone: "Europe/Berlin".into(),
        },
    ))
    .await
    .expect("schedule");

    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().expect("zone");
    let mut local_times = Vec::new();
    for _ in 0..7 {
        let job = core.get("daily").expect("job");
        let occurrence = job.status.next_occurrence.expect("next");
        clock.advance(occurrence.since(clock.now()));
        let d = next(&mut sub).await;
        assert_eq!(d.fire.scheduled_time, occurrence);
        let local = d
            .fire
            .scheduled_time
            .to_chrono()
            .expect("range")
            .with_timezone(&berlin);
        local_times.push(local.format("%m-%d %H:%M").to_string());
        sub.handle().ack(&[d.fire.fire_id]);
    }
    assert_eq!(
        local_times,
        vec![
            "03-27 02:30",
            "03-28 02:30",
            "03-29 03:00",
            "03-30 02:30",
            "03-31 02:30",
            "04-01 02:30",
            "04-02 02:30"
        ]
    );
    core.shutdown().await;
}

/// An extended deadline holds off redelivery; when it expires the fire comes back after a one
/// second backoff, then a two second one.
#[tokio::test]
async fn extended_deadline_and_expiry_backoff() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(Arc::new(MemoryStore::new()), clock.clone()).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let mut s = spec("j", TriggerSpec::After { after: 0 });
    s.ack_deadline = 10 * S;
    core.schedule(s).await.expect("schedule");
    let d = next(&mut sub).await;
    assert_eq!(d.fire.attempt, 1);
    sub.handle()
        .extend(std::slice::from_ref(&d.fire.fire_id), 60 * S);
    clock.advance(30 * S);
    settle().await;
    none(&mut sub).await;
    clock.advance(31 * S); // 61 s: the extension expired
    settle().await;
    none(&mut sub).await; // waiting out the 1 s backoff
    clock.advance(S);
    let d2 = next(&mut sub).await;
    assert_eq!(
        (d2.fire.fire_id.as_str(), d2.fire.attempt),
        (d.fire.fire_id.as_str(), 2)
    );
    clock.advance(10 * S);
    settle().await;
    clock.advance(S);
    settle().await;
    none(&mut sub).await; // second backoff is 2 s
    clock.advance(S);
    let d3 = next(&mut sub).await;
    assert_eq!(d3.fire.attempt, 3);
    core.shutdown().await;
}

/// A store that counts commits and takes a few milliseconds per commit, like an fsync.
#[derive(Debug, Default)]
struct SlowStore {
    inner: MemoryStore,
    commits: AtomicUsize,
    delay_ms: u64,
}

impl Store for SlowStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        std::thread::sleep(Duration::from_millis(self.delay_ms));
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(writes)
    }
}

/// Concurrent Schedule calls share commits (group commit) and each answers only after its
/// commit.
#[tokio::test]
async fn concurrent_schedules_share_commits() {
    let store = Arc::new(SlowStore {
        delay_ms: 5,
        ..Default::default()
    });
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(store.clone(), clock).await;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let core = core.clone();
            tokio::spawn(async move {
                core.schedule(spec(
                    &format!("j{i}"),
                    TriggerSpec::After { after: 3_600 * S },
                ))
                .await
            })
        })
        .collect();
    for c in calls {
        c.await.expect("task").expect("scheduled");
    }
    let commits = store.commits.load(Ordering::SeqCst);
    assert!(commits <= 20, "200 schedules took {commits} commits");
    assert_eq!(store.inner.load().expect("load").jobs.len(), 200);
    core.shutdown().await;
}

/// A caller that gives up mid-call (a cancelled RPC) leaves the change whole: stored, visible
/// and armed.
#[tokio::test]
async fn a_cancelled_caller_leaves_the_change_whole() {
    let store = Arc::new(SlowStore {
        delay_ms: 100,
        ..Default::default()
    });
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(store.clone(), clock.clone()).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let call = core.schedule(spec("j", TriggerSpec::After { after: 10 * S }));
    assert!(
        tokio::time::timeout(Duration::from_millis(10), call)
            .await
            .is_err(),
        "the call was dropped before its commit finished"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = core.get("j").expect("the change was applied");
    assert_eq!(job.status.state, JobState::Scheduled);
    assert_eq!(store.inner.load().expect("load").jobs.len(), 1);
    clock.advance(10 * S);
    let d = next(&mut sub).await;
    assert_eq!(&*d.fire.job_id, "j");
    core.shutdown().await;
}

/// A failed commit is reported and changes nothing; the next one works.
#[tokio::test]
async fn failed_commit_changes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(store.clone(), clock.clone()).await;
    store.set_fail_commits(true);
    let err = core
        .schedule(spec("j", TriggerSpec::After { after: S }))
        .await
        .expect_err("disk failed");
    assert!(matches!(err, SchedulerError::Unavailable(_)), "{err:?}");
    assert!(matches!(core.get("j"), Err(SchedulerError::NotFound(_))));
    store.set_fail_commits(false);
    core.schedule(spec("j", TriggerSpec::After { after: S }))
        .await
        .expect("works again");
    core.shutdown().await;
}

/// A restart rebuilds memory from the store alone: jobs with their next occurrence, and fires
/// still waiting, which are delivered with their original fire ids.
#[tokio::test]
async fn restart_rebuilds_memory_from_the_store() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(100 * S)));
    let core = start(store.clone(), clock.clone()).await;
    core.schedule(spec(
        "every",
        TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(110 * S)),
            jitter: 0,
        },
    ))
    .await
    .expect("schedule");
    clock.advance(10 * S);
    settle().await; // fires for 110 s with nobody subscribed: it waits, stored
    let before = core.get("every").expect("job");
    assert_eq!(before.status.next_occurrence, Some(Timestamp(120 * S)));
    core.shutdown().await;

    let core = start(store.clone(), clock.clone()).await;
    let after = core.get("every").expect("job");
    assert_eq!(after.status, before.status);
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let d = next(&mut sub).await;
    assert_eq!(d.fire.scheduled_time, Timestamp(110 * S));
    clock.advance(10 * S);
    let d = next(&mut sub).await;
    assert_eq!(d.fire.scheduled_time, Timestamp(120 * S));
    core.shutdown().await;
}

/// Jitter delays each fire by less than the jitter, and the delay survives restarts.
#[tokio::test]
async fn jitter_delays_within_bounds() {
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(Arc::new(MemoryStore::new()), clock.clone()).await;
    let mut sub = core.subscribe("q", 100).expect("subscribe");
    core.schedule(spec(
        "j",
        TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 5 * S,
        },
    ))
    .await
    .expect("schedule");
    for k in 1..=5 {
        let due = core.get("j").expect("job").next_due().expect("due");
        let occurrence = Timestamp(k * 10 * S);
        assert!(due >= occurrence && due < occurrence.plus(5 * S), "{due:?}");
        clock.advance(due.since(clock.now()));
        let d = next(&mut sub).await;
        assert_eq!(d.fire.scheduled_time, occurrence);
        assert_eq!(d.fire.fire_time, due);
        sub.handle().ack(&[d.fire.fire_id]);
    }
    core.shutdown().await;
}
