//! The scheduler core driven directly, with a manual clock and an in-memory store: virtual
//! time, group commit, failing disks, cancelled callers and rebuilding memory from the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::TimeZone;
use tickd::domain::{JobSpec, JobState, MisfirePolicy, PackedSpec, Timestamp, TriggerSpec};
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
        overlap_policy: Default::default(),
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

/// The next delivery, for one the test knows is coming; fails the test after a long wait.
async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

/// Asserts that the subscription has nothing to hand out once the core has settled: exact,
/// since a settled core has put every deliverable fire on its queue.
async fn none(core: &Scheduler, sub: &mut Subscription) {
    settle(core).await;
    let polled = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(tokio_stream::Stream::poll_next(
            std::pin::Pin::new(&mut *sub),
            cx,
        ))
    })
    .await;
    if let std::task::Poll::Ready(d) = polled {
        panic!("expected nothing, got {d:?}");
    }
}

/// A core at 1000 s on `store` with a subscriber on "q" that has received the one fire of job
/// "a" (due at once).
async fn one_fire_delivered(
    store: Arc<dyn Store>,
) -> (Scheduler, Arc<ManualClock>, Subscription, Delivery) {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store, clock.clone()).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    core.schedule(spec("a", TriggerSpec::After { after: 0 }))
        .await
        .expect("schedule");
    let d = next(&mut sub).await;
    (core, clock, sub, d)
}

/// Waits until the core has done everything due at the clock's now.
async fn settle(core: &Scheduler) {
    tokio::time::timeout(Duration::from_secs(20), core.settle())
        .await
        .expect("the core settles");
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
            dst: Default::default(),
        },
    ))
    .await
    .expect("schedule");

    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().expect("zone");
    let mut local_times = Vec::new();
    for _ in 0..7 {
        let job = core.get("daily").await.expect("job");
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
        sub.handle().ack(&[d.fire.fire_id.to_string()]);
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
    sub.handle().extend(&[d.fire.fire_id.to_string()], 60 * S);
    clock.advance(30 * S);
    settle(&core).await;
    none(&core, &mut sub).await;
    clock.advance(31 * S); // 61 s: the extension expired
    settle(&core).await;
    none(&core, &mut sub).await; // waiting out the 1 s backoff
    clock.advance(S);
    let d2 = next(&mut sub).await;
    assert_eq!((&*d2.fire.fire_id, d2.fire.attempt), (&*d.fire.fire_id, 2));
    clock.advance(10 * S);
    settle(&core).await;
    clock.advance(S);
    settle(&core).await;
    none(&core, &mut sub).await; // second backoff is 2 s
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
            let store = store.clone();
            tokio::spawn(async move {
                let id = format!("j{i}");
                core.schedule(spec(&id, TriggerSpec::After { after: 3_600 * S }))
                    .await
                    .expect("scheduled");
                // At the moment the call answers, its job is in the store.
                let stored = store.inner.load().expect("load").jobs;
                assert!(
                    stored.iter().any(|(spec, _)| spec.id() == &*id),
                    "{id} answered before its commit"
                );
            })
        })
        .collect();
    for c in calls {
        c.await.expect("each call answers after its commit");
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
    settle(&core).await;
    let job = core.get("j").await.expect("the change was applied");
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
    assert!(matches!(
        core.get("j").await,
        Err(SchedulerError::NotFound(_))
    ));
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
    settle(&core).await; // fires for 110 s with nobody subscribed: it waits, stored
    let before = core.get("every").await.expect("job");
    assert_eq!(before.status.next_occurrence, Some(Timestamp(120 * S)));
    core.shutdown().await;

    let core = start(store.clone(), clock.clone()).await;
    let after = core.get("every").await.expect("job");
    assert_eq!(after.status, before.status);
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let d = next(&mut sub).await;
    assert_eq!(d.fire.scheduled_time, Timestamp(110 * S));
    clock.advance(10 * S);
    let d = next(&mut sub).await;
    assert_eq!(d.fire.scheduled_time, Timestamp(120 * S));
    core.shutdown().await;
}

/// Jitter delays each fire by less than the jitter, and the delay survives restarts: a core
/// restarted on the same store after each fire arms the next one at the same jittered time.
#[tokio::test]
async fn jitter_delays_within_bounds() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let mut core = start(store.clone(), clock.clone()).await;
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
        let due = core.get("j").await.expect("job").next_due().expect("due");
        let occurrence = Timestamp(k * 10 * S);
        assert!(due >= occurrence && due < occurrence.plus(5 * S), "{due:?}");
        clock.advance(due.since(clock.now()));
        let d = next(&mut sub).await;
        assert_eq!(d.fire.scheduled_time, occurrence);
        assert_eq!(d.fire.fire_time, due);
        sub.handle().ack(&[d.fire.fire_id.to_string()]);
        settle(&core).await;
        let armed = core.get("j").await.expect("job").next_due();
        drop(sub);
        core.shutdown().await;
        core = start(store.clone(), clock.clone()).await;
        sub = core.subscribe("q", 100).expect("subscribe");
        assert_eq!(core.get("j").await.expect("job").next_due(), armed);
    }
    core.shutdown().await;
}

/// A fire whose deadline passes while its subscription stays open comes back to that same
/// subscription (attempt 2), and a late ack of attempt 1 still acks it.
#[tokio::test]
async fn expired_fire_returns_to_an_open_subscription_and_late_acks_count() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store.clone(), clock.clone()).await;
    let mut sub = core.subscribe("q", 1).expect("subscribe");
    let mut s = spec("a", TriggerSpec::After { after: 0 });
    s.ack_deadline = 10 * S;
    core.schedule(s).await.expect("schedule");
    let first = next(&mut sub).await;
    clock.advance(10 * S);
    settle(&core).await;
    clock.advance(S);
    let second = next(&mut sub).await;
    assert_eq!(
        (&*second.fire.fire_id, second.fire.attempt),
        (&*first.fire.fire_id, 2)
    );
    sub.handle().ack(&[first.fire.fire_id.to_string()]);
    settle(&core).await;
    assert!(
        store.load().expect("load").fires.is_empty(),
        "the late ack deleted the fire"
    );
    clock.advance(60 * S);
    none(&core, &mut sub).await;
    core.shutdown().await;
}

/// An ack whose commit failed is retried: a client's retry answers only once the deletion is
/// stored, and the fire is not delivered again.
#[tokio::test]
async fn a_failed_ack_commit_is_retried_until_stored() {
    let store = Arc::new(MemoryStore::new());
    let (core, clock, mut sub, d) = one_fire_delivered(store.clone()).await;
    store.set_fail_commits(true);
    let ids = [d.fire.fire_id.to_string()];
    assert!(core.ack("q", &ids).await.is_err(), "the disk failed");
    store.set_fail_commits(false);
    core.ack("q", &ids)
        .await
        .expect("the retry is answered after the write");
    assert!(store.load().expect("load").fires.is_empty());
    clock.advance(3_600 * S);
    none(&core, &mut sub).await;
    core.shutdown().await;
}

/// A store whose commits can be slowed down or held (to keep a change inside the writer) and
/// whose deletes can be made to fail.
#[derive(Debug, Default)]
struct GatedStore {
    inner: MemoryStore,
    delay_ms: AtomicUsize,
    /// While set, a commit waits inside the store until it is cleared.
    hold: std::sync::atomic::AtomicBool,
    /// Commits that have waited on `hold`.
    held: AtomicUsize,
    fail_deletes: std::sync::atomic::AtomicBool,
}

impl GatedStore {
    /// Waits (10 s at most) until a commit is waiting on `hold`.
    async fn wait_held(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no commit was held");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Store for GatedStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let delay = self.delay_ms.load(Ordering::SeqCst) as u64;
        std::thread::sleep(Duration::from_millis(delay));
        if self.hold.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let deletes = writes.iter().any(|w| matches!(w, Write::DeleteFire(_)));
        if deletes && self.fail_deletes.load(Ordering::SeqCst) {
            return Err(StoreError::Io("injected delete failure".into()));
        }
        self.inner.commit(writes)
    }
}

/// A redelivery applied while the timer loop sleeps with nothing armed still gets its ack
/// deadline enforced.
#[tokio::test]
async fn redelivered_fire_deadline_is_enforced_after_an_idle_timer_pass() {
    let store = Arc::new(GatedStore::default());
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store.clone(), clock.clone()).await;
    let mut a = core.subscribe("q", 10).expect("subscribe");
    core.schedule(spec("j", TriggerSpec::After { after: 0 }))
        .await
        .expect("schedule");
    let f = next(&mut a).await;
    store.delay_ms.store(300, Ordering::SeqCst);
    a.handle().nack(&[f.fire.fire_id.to_string()], 0);
    settle(&core).await;
    clock.advance(S); // a timer pass while the redelivery is being written: nothing armed
    let again = next(&mut a).await;
    assert_eq!(again.fire.attempt, 2);
    store.delay_ms.store(0, Ordering::SeqCst);
    clock.advance(31 * S); // past the 30 s deadline
    settle(&core).await;
    clock.advance(2 * S); // past the backoff
    let third = next(&mut a).await;
    assert_eq!(third.fire.attempt, 3);
    core.shutdown().await;
}

/// A nack that lets a fire with a short deadline be handed out gets that deadline enforced,
/// though the timer was sleeping toward a much later one.
#[tokio::test]
async fn a_shorter_deadline_wakes_the_timer() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(Arc::new(MemoryStore::new()), clock.clone()).await;
    let mut sub = core.subscribe("q", 1).expect("subscribe");
    let mut long = spec("long", TriggerSpec::After { after: 0 });
    long.ack_deadline = 3_600 * S;
    core.schedule(long).await.expect("schedule");
    let a = next(&mut sub).await;
    let mut short = spec("short", TriggerSpec::After { after: 0 });
    short.ack_deadline = 10 * S;
    core.schedule(short).await.expect("schedule");
    settle(&core).await;
    sub.handle().nack(&[a.fire.fire_id.to_string()], 0);
    let b = next(&mut sub).await;
    assert_eq!(&*b.fire.job_id, "short");
    clock.advance(11 * S);
    settle(&core).await;
    clock.advance(2 * S);
    let again = next(&mut sub).await;
    assert_eq!(again.fire.attempt, 2);
    core.shutdown().await;
}

/// A clock that stands still and counts how often it is read.
#[derive(Debug)]
struct FrozenClock {
    now: Timestamp,
    reads: AtomicUsize,
}

impl Clock for FrozenClock {
    fn now(&self) -> Timestamp {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.now
    }

    fn steady_now(&self) -> Timestamp {
        self.now()
    }

    fn sleep_until(&self, _deadline: Timestamp) -> tickd::scheduler::clock::Sleep<'_> {
        Box::pin(tokio::time::sleep(Duration::from_millis(50)))
    }
}

/// A job created "in the future" (the wall clock stepped back since) waits quietly instead of
/// spinning the timer loop.
#[tokio::test]
async fn a_clock_step_back_does_not_spin_the_timer() {
    use tickd::domain::JobStatus;
    let store = Arc::new(MemoryStore::new());
    store
        .commit(&[
            Write::PutSpec(PackedSpec::new(&spec(
                "a",
                TriggerSpec::At {
                    at: Timestamp(1_000 * S),
                },
            ))),
            Write::PutStatus(
                "a".into(),
                JobStatus {
                    state: JobState::Scheduled,
                    next_occurrence: Some(Timestamp(1_000 * S)),
                    fire_count: 0,
                    create_time: Timestamp(10_000 * S),
                    last_fire_time: None,
                    finish_time: None,
                    trace: None,
                },
            ),
        ])
        .expect("commit");
    let clock = Arc::new(FrozenClock {
        now: Timestamp(5_000 * S),
        reads: AtomicUsize::new(0),
    });
    let core = Scheduler::start(store, clock.clone(), SchedulerConfig::default())
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = clock.reads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reads = clock.reads.load(Ordering::Relaxed) - before;
    core.shutdown().await;
    assert!(
        reads < 50,
        "the timer loop read the clock {reads} times in 200 ms"
    );
}

/// Fires a subscription never took (its stream was not polled) lose no attempt when it drops.
#[tokio::test]
async fn fires_never_handed_out_lose_no_attempt_when_a_stream_drops() {
    let store = Arc::new(MemoryStore::new());
    let core = start(
        store.clone(),
        Arc::new(ManualClock::new(Timestamp(1_000 * S))),
    )
    .await;
    let sub = core.subscribe("q", 10).expect("subscribe");
    let mut s = spec("a", TriggerSpec::After { after: 0 });
    s.max_attempts = 1;
    core.schedule(s).await.expect("schedule");
    settle(&core).await;
    drop(sub);
    settle(&core).await;
    let fires = store.load().expect("load").fires;
    assert_eq!(
        fires.len(),
        1,
        "the fire was dropped though never delivered"
    );
    assert_eq!(fires[0].attempt, 1);
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    assert_eq!(next(&mut sub).await.fire.attempt, 1);
    core.shutdown().await;
}

/// After shutdown closes subscriptions, their streams end without handing out anything more.
#[tokio::test]
async fn closed_subscriptions_hand_out_nothing() {
    let core = start(
        Arc::new(MemoryStore::new()),
        Arc::new(ManualClock::new(Timestamp(1_000 * S))),
    )
    .await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    core.schedule(spec("a", TriggerSpec::After { after: 0 }))
        .await
        .expect("schedule");
    settle(&core).await;
    core.close_subscriptions();
    assert!(sub.recv().await.is_none());
    assert!(matches!(
        core.subscribe("q", 10),
        Err(SchedulerError::Unavailable(_))
    ));
    core.shutdown().await;
}

/// A retried Ack answers only once the deletion is stored, even when a dead-lettering moved
/// the fire to another queue while the first attempt was failing.
#[tokio::test]
async fn a_retried_ack_after_dead_lettering_waits_for_the_delete() {
    let store = Arc::new(GatedStore::default());
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store.clone(), clock.clone()).await;
    let mut sub = core.subscribe("q", 1).expect("subscribe");
    let mut s = spec("a", TriggerSpec::After { after: 0 });
    s.max_attempts = 1;
    s.ack_deadline = 10 * S;
    s.dead_letter_queue = Some("dead".into());
    core.schedule(s).await.expect("schedule");
    let d = next(&mut sub).await;
    let ids = [d.fire.fire_id.to_string()];
    store.hold.store(true, Ordering::SeqCst);
    clock.advance(10 * S); // expiry: the dead-lettering's commit is held in the store
    store.wait_held().await;
    store.fail_deletes.store(true, Ordering::SeqCst);
    // The ack reaches the writer on its first poll, behind the held dead-lettering.
    let mut ack = std::pin::pin!(core.ack("q", &ids));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(ack.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "answered before its commit: {first:?}");
    store.hold.store(false, Ordering::SeqCst);
    assert!(ack.await.is_err());
    store.fail_deletes.store(false, Ordering::SeqCst);
    core.ack("q", &ids).await.expect("retry");
    let stored = store.load().expect("load").fires;
    assert!(
        stored.is_empty(),
        "answered OK but still stored: {stored:?}"
    );
    core.shutdown().await;
}

/// A nack whose commit fails still keeps its retry delay.
#[tokio::test]
async fn a_failed_nack_commit_keeps_the_delay() {
    let store = Arc::new(MemoryStore::new());
    let (core, clock, mut sub, d) = one_fire_delivered(store.clone()).await;
    store.set_fail_commits(true);
    sub.handle().nack(&[d.fire.fire_id.to_string()], 3_600 * S);
    settle(&core).await;
    none(&core, &mut sub).await;
    store.set_fail_commits(false);
    clock.advance(3_600 * S);
    let again = next(&mut sub).await;
    assert_eq!(again.fire.fire_id, d.fire.fire_id);
    core.shutdown().await;
}

/// A fire dropped after its last attempt is counted once, when the drop is stored.
#[tokio::test]
async fn a_dropped_fire_is_counted_once() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store.clone(), clock.clone()).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let mut s = spec("a", TriggerSpec::After { after: 0 });
    s.max_attempts = 1;
    s.ack_deadline = 10 * S;
    core.schedule(s).await.expect("schedule");
    next(&mut sub).await;
    store.set_fail_commits(true);
    clock.advance(10 * S); // expires; the drop cannot be stored, so the fire stays
    let again = next(&mut sub).await;
    assert_eq!(again.fire.attempt, 1);
    assert_eq!(core.dropped_fires(), 0);
    store.set_fail_commits(false);
    clock.advance(10 * S);
    settle(&core).await;
    assert!(store.load().expect("load").fires.is_empty());
    assert_eq!(core.dropped_fires(), 1);
    core.shutdown().await;
}

/// A stored job that can no longer be loaded (its time zone is unknown now) is left out with an
/// error log; every other job still runs.
#[tokio::test]
async fn an_unloadable_job_does_not_stop_the_others() {
    use tickd::domain::JobStatus;
    let store = Arc::new(MemoryStore::new());
    let status = JobStatus {
        state: JobState::Scheduled,
        next_occurrence: Some(Timestamp(2_000 * S)),
        fire_count: 0,
        create_time: Timestamp(0),
        last_fire_time: None,
        finish_time: None,
        trace: None,
    };
    let bad = spec(
        "bad",
        TriggerSpec::Cron {
            expression: "0 * * * *".into(),
            time_zone: "Mars/Olympus".into(),
            dst: Default::default(),
        },
    );
    let good = spec(
        "good",
        TriggerSpec::At {
            at: Timestamp(2_000 * S),
        },
    );
    store
        .commit(&[
            Write::PutSpec(PackedSpec::new(&bad)),
            Write::PutStatus("bad".into(), status.clone()),
            Write::PutSpec(PackedSpec::new(&good)),
            Write::PutStatus("good".into(), status),
        ])
        .expect("commit");
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(store, clock.clone()).await;
    assert_eq!(core.job_count().await, 1);
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    clock.advance(1_000 * S);
    assert_eq!(&*next(&mut sub).await.fire.job_id, "good");
    core.shutdown().await;
}

/// Stats count jobs by state as they change, and per queue the waiting and in-flight fires and
/// the subscribers.
#[tokio::test]
async fn stats_follow_jobs_and_fires() {
    use tickd::scheduler::QueueStats;
    let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
    let core = start(Arc::new(MemoryStore::new()), clock.clone()).await;
    for id in ["a", "b", "c"] {
        core.schedule(spec(id, TriggerSpec::After { after: 0 }))
            .await
            .expect("schedule");
    }
    core.schedule(spec("later", TriggerSpec::After { after: 60 * S }))
        .await
        .expect("schedule");
    core.cancel("later").await.expect("cancel");
    settle(&core).await;
    let mut sub = core.subscribe("q", 1).expect("subscribe");
    next(&mut sub).await;
    let stats = core.stats();
    assert_eq!(
        stats.jobs,
        vec![(JobState::Completed, 3), (JobState::Cancelled, 1)]
    );
    assert_eq!(
        stats.queues,
        vec![(
            "q".to_string(),
            QueueStats {
                backlog: 2,
                in_flight: 1,
                subscribers: 1
            }
        )]
    );
    core.shutdown().await;
}

/// A store that checks invariant 2 after every commit (a job's stored fire count never runs
/// ahead of its stored fires, as long as nothing is acked) and that "crashes" after a given
/// number of commits: every later commit fails and reaches nothing, as if the process died.
#[derive(Debug)]
struct CrashingStore {
    inner: MemoryStore,
    commits: AtomicUsize,
    crash_after: usize,
}

impl Store for CrashingStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        if self.commits.fetch_add(1, Ordering::SeqCst) >= self.crash_after {
            return Err(StoreError::Io("crashed".into()));
        }
        self.inner.commit(writes)?;
        let stored = self.inner.load()?;
        for (spec, status) in &stored.jobs {
            let fires = stored
                .fires
                .iter()
                .filter(|f| *f.job_id == *spec.id())
                .count();
            assert_eq!(
                status.fire_count as usize,
                fires,
                "job {} moved past an occurrence whose fire is not stored (commit {writes:?})",
                spec.id()
            );
        }
        Ok(())
    }
}

/// Invariant 2 at every crash point: a job's progress and its fire commit together, so a crash
/// after any commit loses no occurrence; a restart delivers each one (again, with the same
/// fire_id if it had been sent).
#[tokio::test]
async fn a_crash_after_any_commit_loses_no_occurrence() {
    for crash_after in 0..=6 {
        let store = Arc::new(CrashingStore {
            inner: MemoryStore::new(),
            commits: AtomicUsize::new(0),
            crash_after,
        });
        let clock = Arc::new(ManualClock::new(Timestamp(1_000 * S)));
        let core = start(store.clone(), clock.clone()).await;
        let mut sub = core.subscribe("q", 100).expect("subscribe");
        let mut s = spec(
            "every",
            TriggerSpec::Every {
                period: S,
                start_time: None,
                jitter: 0,
            },
        );
        s.misfire_policy = MisfirePolicy::FireAll;
        s.ack_deadline = 3_600 * S;
        let _ = core.schedule(s).await; // fails when the crash comes first
        let mut sent = BTreeMap::new();
        let crashed = || store.commits.load(Ordering::SeqCst) > crash_after;
        for _ in 0..5 {
            if crashed() {
                break; // the process is dead: nothing more happens before the restart
            }
            clock.advance(S);
            tokio::time::timeout(Duration::from_secs(20), async {
                tokio::select! {
                    _ = core.settle() => {}
                    _ = async {
                        while !crashed() {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    } => {}
                }
            })
            .await
            .expect("the core settles or crashes");
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(0), sub.recv()).await
            {
                sent.insert(d.fire.scheduled_time, d.fire.fire_id.clone());
            }
        }
        core.shutdown().await;
        drop(sub);

        // The restart sees only what was committed before the crash.
        let survived = Arc::new(MemoryStore::new());
        let snapshot = store.inner.load().expect("load");
        let mut writes: Vec<Write> = Vec::new();
        for (spec, status) in snapshot.jobs {
            writes.push(Write::PutStatus(spec.id().into(), status));
            writes.push(Write::PutSpec(spec));
        }
        writes.extend(snapshot.fires.into_iter().map(Write::PutFire));
        survived.commit(&writes).expect("copy");
        if crash_after == 0 {
            assert!(survived.load().expect("load").jobs.is_empty());
            continue;
        }
        let core = start(survived, clock.clone()).await;
        let mut sub = core.subscribe("q", 100).expect("subscribe");
        settle(&core).await;
        let mut after = BTreeMap::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(0), sub.recv()).await {
            assert!(
                after
                    .insert(d.fire.scheduled_time, d.fire.fire_id.clone())
                    .is_none(),
                "crash after commit {crash_after}: {:?} delivered twice",
                d.fire.scheduled_time
            );
        }
        let now = clock.now().0;
        let every: Vec<Timestamp> = (1..=5)
            .map(|k| Timestamp((1_000 + k) * S))
            .filter(|t| t.0 <= now)
            .collect();
        assert!(!every.is_empty());
        assert_eq!(
            after.keys().copied().collect::<Vec<_>>(),
            every,
            "crash after commit {crash_after}: an occurrence was lost"
        );
        for (at, fire_id) in &sent {
            assert_eq!(
                after.get(at),
                Some(fire_id),
                "crash after commit {crash_after}: a repeat carries the same fire_id"
            );
        }
        assert_eq!(
            sent.len(),
            crash_after.saturating_sub(1).min(5),
            "sent before the crash"
        );
        core.shutdown().await;
    }
}
