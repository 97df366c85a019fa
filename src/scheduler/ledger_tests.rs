//! The embedded engine's ledger, read from memory and from the store it restarts from: what
//! each occurrence became (delivered, dropped, skipped by misfire, pause, cancel, DST), kept
//! within its bounds, and gone from the store with its job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::clock::{Clock, ManualClock};
use super::{Engine, Scheduler, SchedulerConfig, Subscription};
use crate::domain::ledger::Bounds;
use crate::domain::{
    JobSpec, MisfirePolicy, Occurrence, Outcome, SkipReason, Timestamp, TriggerSpec,
};
use crate::store::{MemoryStore, Store};

const S: i64 = 1_000_000;

fn every_ten(id: &str) -> JobSpec {
    JobSpec {
        id: id.into(),
        queue: "q".into(),
        trigger: TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 0,
        },
        payload: Bytes::new(),
        labels: BTreeMap::new(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: 2 * S,
        ack_deadline: 30 * S,
        max_attempts: 2,
        dead_letter_queue: None,
        overlap_policy: Default::default(),
    }
}

async fn start(store: Arc<MemoryStore>, clock: Arc<ManualClock>, per_job: usize) -> Scheduler {
    let config = SchedulerConfig {
        ledger: Bounds {
            per_job,
            retention: 1_000 * S,
        },
        ..SchedulerConfig::default()
    };
    Scheduler::start(store, clock, config).await.expect("start")
}

async fn settle(core: &Scheduler) {
    tokio::time::timeout(Duration::from_secs(20), core.settle())
        .await
        .expect("the core settles");
}

/// The job's ledger, newest first, as (first occurrence in s, count, outcome, attempts).
fn ledger(core: &Scheduler, id: &str) -> Vec<(i64, u64, Outcome, u32)> {
    let Engine::Embedded(e) = &core.engine else {
        panic!("embedded engine");
    };
    let (records, more) = e.occurrences(id, None, 100).expect("job");
    assert!(!more);
    records
        .iter()
        .map(|r: &Occurrence| (r.scheduled.0 / S, r.count, r.outcome, r.attempts))
        .collect()
}

/// The store's ledger records, by key.
fn stored(store: &MemoryStore) -> Vec<String> {
    store
        .load()
        .expect("load")
        .occurrences
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

async fn deliver(core: &Scheduler, sub: &mut Subscription) -> crate::domain::FireRecord {
    settle(core).await;
    tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
        .fire
}

/// Delivered, dropped after its last attempt, missed while paused (the misfire policy fires
/// the latest), missed while down, and owed to a paused job when it was cancelled: each occurrence is in the ledger
/// once with what became of it, and the ledger survives a restart.
#[tokio::test]
async fn each_occurrence_is_recorded_with_its_fate() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(store.clone(), clock.clone(), 100).await;
    core.schedule(every_ten("j")).await.expect("schedule");
    let mut sub = core.subscribe("q", 10).expect("subscribe");

    // 10 s: acked on its first attempt.
    clock.advance(10 * S);
    let fire = deliver(&core, &mut sub).await;
    sub.handle().ack(&[fire.fire_id.to_string()]);
    settle(&core).await;
    // 20 s: nacked twice, dropped (no dead-letter queue).
    clock.advance(10 * S);
    for _ in 0..2 {
        let fire = deliver(&core, &mut sub).await;
        assert_eq!(fire.scheduled_time, Timestamp(20 * S));
        sub.handle().nack(&[fire.fire_id.to_string()], 0);
        settle(&core).await;
    }
    // Paused from 25 s to 75 s: 30..70 fell due while paused; FIRE_ONCE releases 70 on
    // resume, 30..60 are skipped as PAUSED.
    clock.advance(5 * S);
    core.pause("j").await.expect("pause");
    clock.advance(50 * S);
    settle(&core).await;
    core.resume("j").await.expect("resume");
    let fire = deliver(&core, &mut sub).await;
    assert_eq!(fire.scheduled_time, Timestamp(70 * S));
    sub.handle().ack(&[fire.fire_id.to_string()]);
    settle(&core).await;
    assert_eq!(
        ledger(&core, "j"),
        [
            (70, 1, Outcome::Delivered, 1),
            (30, 4, Outcome::Skipped(SkipReason::Paused), 0),
            (20, 1, Outcome::Dropped, 2),
            (10, 1, Outcome::Delivered, 1),
        ]
    );

    // Down from 75 s to 125 s: 80..120 missed, FIRE_ONCE releases 120 on start, the rest are
    // MISFIRE; the ledger comes back from the store.
    core.shutdown().await;
    clock.advance(50 * S);
    let core = start(store.clone(), clock.clone(), 100).await;
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    let fire = deliver(&core, &mut sub).await;
    assert_eq!(fire.scheduled_time, Timestamp(120 * S));
    sub.handle().ack(&[fire.fire_id.to_string()]);
    settle(&core).await;
    // Paused at 125 s and cancelled at 145 s: 130 and 140 were owed, never to be released.
    core.pause("j").await.expect("pause");
    clock.advance(20 * S);
    settle(&core).await;
    core.cancel("j").await.expect("cancel");
    settle(&core).await;
    assert_eq!(
        ledger(&core, "j"),
        [
            (130, 2, Outcome::Skipped(SkipReason::Paused), 0),
            (120, 1, Outcome::Delivered, 1),
            (80, 4, Outcome::Skipped(SkipReason::Misfire), 0),
            (70, 1, Outcome::Delivered, 1),
            (30, 4, Outcome::Skipped(SkipReason::Paused), 0),
            (20, 1, Outcome::Dropped, 2),
            (10, 1, Outcome::Delivered, 1),
        ]
    );
    assert_eq!(stored(&store).len(), 7);
    core.shutdown().await;
}

/// The cap keeps the newest occurrences, in memory and in the store; a deleted job's records
/// leave the store with the next commit; records of a job the store no longer has are
/// deleted at start.
#[tokio::test]
async fn the_ledger_stays_bounded_and_goes_with_its_job() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let core = start(store.clone(), clock.clone(), 3).await;
    core.schedule(every_ten("j")).await.expect("schedule");
    let mut sub = core.subscribe("q", 10).expect("subscribe");
    for _ in 0..5 {
        clock.advance(10 * S);
        let fire = deliver(&core, &mut sub).await;
        sub.handle().ack(&[fire.fire_id.to_string()]);
        settle(&core).await;
    }
    let at: Vec<i64> = ledger(&core, "j").iter().map(|r| r.0).collect();
    assert_eq!(at, [50, 40, 30]);
    // The trimmed records leave the store with the next commit.
    core.schedule(every_ten("other")).await.expect("schedule");
    assert_eq!(
        stored(&store),
        ["j 30000000 s", "j 40000000 s", "j 50000000 s"]
    );
    core.delete("j").await.expect("delete");
    core.schedule(every_ten("third")).await.expect("schedule");
    assert!(stored(&store).is_empty());
    core.shutdown().await;

    // A record whose job is gone (a crash between the two commits) is deleted at start.
    store
        .commit(&[crate::store::Write::PutOccurrence(
            "gone".into(),
            Occurrence::released(Timestamp(S), false, Outcome::Delivered, 1, clock.now()),
        )])
        .expect("commit");
    let core = start(store.clone(), clock.clone(), 3).await;
    core.schedule(every_ten("fourth")).await.expect("schedule");
    assert!(stored(&store).is_empty());
    core.shutdown().await;
}
