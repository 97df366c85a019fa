//! The replicated engine: one of any number of tickd replicas sharing one PostgreSQL database.
//! The database holds every job and fire; a replica holds only its own Subscribe streams and
//! the leases it handed to them, so losing a replica loses nothing but those streams.
//!
//! Each replica runs:
//! - a **release loop** ([`Shared::pass`]): releases due jobs (`PgStore::release_due`: advance
//!   and fire in one transaction, rows taken with `FOR UPDATE SKIP LOCKED`, a compare-and-set
//!   on the job's version), takes back expired leases (`PgStore::reap_expired`) and deletes
//!   finished jobs whose retention ended. It sleeps until the earliest due job, at most the
//!   poll interval, and is woken early by a Schedule or Resume on this replica. Every replica
//!   runs it: there is no leader to lose.
//! - a **claim loop per subscription**: leases ready fires of its queue (`PgStore::claim`, a
//!   new token per lease) while the subscription has room, and hands them to the stream only
//!   after the claim committed. Woken by NOTIFY (a release, nack or redelivery that filled the
//!   queue, on any replica), by an ack that freed room, and at the poll interval; it also
//!   sleeps until the queue's next delayed fire becomes available.
//! - a **listener** for LISTEN/NOTIFY (unless polling is chosen), an **acker** that commits
//!   the acks of every stream in one statement (group commit), and a **clock** task that keeps
//!   an estimate of the database's clock for validating relative times.
//!
//! One clock: due times, leases and backoffs are decided by the database's `now()` in the
//! statement that acts on them (or by the core's clock, injected, when it is a test's manual
//! clock). A lease is also timed locally, on steady time from before the claim was sent: a
//! fire whose local lease ran out (this replica paused, say) is dropped, not sent, since by
//! then another replica may hold it.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tracing::{debug, info, warn};

use super::clock::Clock;
use super::observe::{DropReason, RedeliveryReason, SkipReason, dst_skipped};
use super::state::Delivery;
use super::{
    Backfilled, Health, JobFilter, QueueStats, SchedulerConfig, SchedulerError, StartError, Stats,
    Triggered, mark_failed, mark_store, panic_message, shutting_down,
};
use crate::domain::fire::AfterAttempt;
use crate::domain::ledger::OccurrenceKey;
use crate::domain::time::micros_duration;
use crate::domain::{FireRecord, Job, JobSpec, Micros, Occurrence, Outcome, Timestamp, Transition};
use crate::store::StoreError;
use crate::store::postgres::{
    Attempted, BackfillFailed, Lease, PgStore, ReleaseLimits, Released, TriggerFailed,
    UpdateFailed, Wakeup, Wakeups,
};

/// Default for [`ReplicaSettings::poll_interval`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Most jobs one release transaction takes, and most expired leases one reap takes.
const BATCH: i64 = 500;
/// How often a busy release loop looks for expired leases (an idle one looks on each pass).
const REAP_EVERY: Duration = Duration::from_millis(100);
/// How often finished jobs past their retention are looked for.
const RETIRE_EVERY: Duration = Duration::from_secs(60);
/// How often the estimate of the database's clock is refreshed, and the gauges' counts.
const CLOCK_EVERY: Duration = Duration::from_secs(10);
const STATS_EVERY: Duration = Duration::from_secs(2);
/// Waits after a failed database call in a background loop: doubles up to the last.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How a replica reaches its database and how it is woken.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// `postgres://…`
    pub database_url: String,
    /// Longest a replica goes without looking for due jobs and ready fires when nothing woke
    /// it. With NOTIFY it bounds how late a job scheduled on another replica can be when that
    /// replica dies; without NOTIFY it bounds fire latency.
    pub poll_interval: Duration,
    /// Wake on LISTEN/NOTIFY; false for PostgreSQL-wire databases without it (then every wait
    /// is the poll interval).
    pub notify: bool,
    /// Decide due times and leases on the core's clock rather than the database's. Only for
    /// tests that drive a manual clock; replicas that do this do not share one clock.
    pub use_core_clock: bool,
    /// Pool size of this replica.
    pub max_connections: u32,
}

impl ReplicaSettings {
    /// Settings for `url` with the defaults.
    pub fn new(url: &str) -> ReplicaSettings {
        ReplicaSettings {
            database_url: url.to_string(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            notify: true,
            use_core_clock: false,
            max_connections: 16,
        }
    }
}

/// A handle to a running replica. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Replicated {
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Option<Vec<JoinHandle<()>>>>>,
}

/// What the handle, the loops and the subscriptions share.
#[derive(Debug)]
struct Shared {
    store: PgStore,
    clock: Arc<dyn Clock>,
    settings: ReplicaSettings,
    config: SchedulerConfig,
    /// Names this replica in `leased_by`.
    name: String,
    health: watch::Sender<Health>,
    stop: watch::Sender<bool>,
    /// Wakes the release loop (a job was scheduled or resumed here).
    release_wake: Notify,
    /// When the sleeping release loop will look next on its own ([`Shared::now`]'s time,
    /// micros); `i64::MAX` while it is not sleeping.
    release_at: AtomicI64,
    /// One pass of the release loop at a time (the loop's, or a settle's).
    pass: tokio::sync::Mutex<PassState>,
    /// Per queue with subscriptions here: bumped when the queue may have new ready fires.
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
    subscribers: Mutex<HashMap<u64, Arc<Sub>>>,
    next_sub: AtomicU64,
    shutting_down: AtomicBool,
    /// The database's clock minus the core's, in microseconds (estimated).
    db_offset: AtomicI64,
    stats: Mutex<Stats>,
    dropped: AtomicU64,
    /// Jobs this replica wrote ledger records for since its last retention pass: their
    /// ledgers are trimmed to `--ledger-max-per-job` then.
    ledger_touched: Mutex<std::collections::HashSet<String>>,
    acks: mpsc::UnboundedSender<AckOp>,
    /// New jobs for the inserter, each with where to answer.
    inserts: mpsc::UnboundedSender<(Job, oneshot::Sender<Result<bool, StoreError>>)>,
}

/// Bookkeeping of the release loop.
#[derive(Debug)]
struct PassState {
    /// Steady time of the last look for expired finished jobs.
    last_retire: Option<Timestamp>,
    /// Steady time of the last look for expired leases.
    last_reap: Option<Timestamp>,
}

/// Work for the acker.
#[derive(Debug)]
enum AckOp {
    /// A stream's ack: (queue, fire_id).
    Ack(String, String),
    /// Answered once every ack sent before it is committed.
    Flush(oneshot::Sender<()>),
}

/// One subscription on this replica.
#[derive(Debug)]
struct Sub {
    id: u64,
    queue: String,
    max_in_flight: usize,
    /// Fires leased to this subscription and not yet acked or nacked.
    held: Mutex<HashMap<String, Held>>,
    /// An ack or nack freed room.
    room: Notify,
    closed: watch::Sender<bool>,
    /// Bumped by the claim loop after each round (for settle).
    rounds: watch::Sender<u64>,
}

/// A lease this replica holds for a subscription.
#[derive(Debug, Clone)]
struct Held {
    token: uuid::Uuid,
    /// Steady time after which the lease may be another's: measured from before the claim (or
    /// extension) was sent, so it ends no later than the database's.
    deadline: Timestamp,
    fire: FireRecord,
}

impl Sub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A database failure as the API sees it: try again, here or on another replica.
fn unavailable(e: StoreError) -> SchedulerError {
    SchedulerError::Unavailable(format!(
        "the change could not be made in the database: {e}; retry shortly"
    ))
}

impl Replicated {
    /// Migrates the database, connects, and starts the loops.
    pub async fn start(
        settings: ReplicaSettings,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Result<Replicated, StartError> {
        let store = PgStore::connect(&settings.database_url, settings.max_connections)
            .await?
            .with_ledger(config.ledger.per_job > 0);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (inserts, insert_rx) = mpsc::unbounded_channel();
        let name = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "tickd".into()),
            &uuid::Uuid::now_v7().simple().to_string()[..8]
        );
        let shared = Arc::new(Shared {
            store,
            clock,
            settings,
            config,
            name,
            health: watch::Sender::new(Health::Serving),
            stop: watch::Sender::new(false),
            release_wake: Notify::new(),
            release_at: AtomicI64::new(i64::MAX),
            pass: tokio::sync::Mutex::new(PassState {
                last_retire: None,
                last_reap: None,
            }),
            queues: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            db_offset: AtomicI64::new(0),
            stats: Mutex::new(Stats::default()),
            dropped: AtomicU64::new(0),
            ledger_touched: Mutex::new(std::collections::HashSet::new()),
            acks,
            inserts,
        });
        if !shared.settings.use_core_clock {
            shared.measure_clock().await.map_err(StartError::Store)?;
        }
        shared.refresh_stats().await;
        info!(replica = %shared.name, notify = shared.settings.notify, "replica started on PostgreSQL");
        let mut tasks = vec![
            supervise(&shared, "release loop", release_loop(shared.clone())),
            supervise(&shared, "acker", acker(shared.clone(), ack_rx)),
            supervise(&shared, "inserter", inserter(shared.clone(), insert_rx)),
            supervise(&shared, "clock", clock_loop(shared.clone())),
        ];
        if shared.settings.notify {
            tasks.push(supervise(&shared, "listener", listener(shared.clone())));
        }
        Ok(Replicated {
            shared,
            tasks: Arc::new(Mutex::new(Some(tasks))),
        })
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    pub async fn schedule(&self, job: Job) -> Result<Job, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let (reply, inserted) = oneshot::channel();
        s.inserts
            .send((job.clone(), reply))
            .map_err(|_| shutting_down())?;
        let inserted = inserted.await.map_err(|_| shutting_down())?;
        if inserted.map_err(unavailable)? {
            s.armed(job.next_due());
            return Ok(job);
        }
        match s.store.get_job(job.spec.id()).await.map_err(unavailable)? {
            Some(existing) if existing.spec == job.spec => Ok(existing),
            // Deleted between the insert and the read: the id is free again.
            None => Err(SchedulerError::Unavailable(format!(
                "job {} was deleted while it was being scheduled; retry",
                job.spec.id()
            ))),
            Some(_) => Err(SchedulerError::AlreadyExists(job.spec.id().to_string())),
        }
    }

    pub async fn schedule_batch(&self, jobs: Vec<Job>) -> Result<Vec<Job>, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let refs: Vec<&Job> = jobs.iter().collect();
        match s.store.insert_batch(&refs).await.map_err(unavailable)? {
            Ok(stored) => {
                s.armed(stored.iter().filter_map(Job::next_due).min());
                Ok(stored)
            }
            Err(index) => Err(SchedulerError::InBatch {
                index,
                error: Box::new(SchedulerError::AlreadyExists(
                    jobs.get(index)
                        .map(|j| j.spec.id().to_string())
                        .unwrap_or_default(),
                )),
            }),
        }
    }

    pub async fn transition(
        &self,
        id: &str,
        transition: Transition,
    ) -> Result<Job, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let observer = &s.config.observer;
        match s
            .store
            .transition(id, transition, s.at(), &s.release_limits(), &|fire, job| {
                observer.fire_released(fire, job)
            })
            .await
            .map_err(unavailable)?
        {
            None => Err(SchedulerError::NotFound(id.to_string())),
            Some(Err(refused)) => Err(SchedulerError::FailedPrecondition(refused.to_string())),
            Some(Ok((job, released))) => {
                s.report_released(released);
                if transition == Transition::Resume {
                    s.armed(job.next_due());
                }
                Ok(job)
            }
        }
    }

    pub async fn trigger(&self, id: &str) -> Result<Triggered, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let observer = &s.config.observer;
        match s
            .store
            .trigger(id, s.at(), s.config.max_queue_backlog, &|fire, job| {
                observer.fire_released(fire, job)
            })
            .await
            .map_err(unavailable)?
        {
            None => Err(SchedulerError::NotFound(id.to_string())),
            Some(Err(TriggerFailed::Finished(state))) => {
                Err(SchedulerError::FailedPrecondition(format!(
                    "job {id} is {}; only a scheduled or paused job can be triggered",
                    state.as_str()
                )))
            }
            Some(Err(TriggerFailed::Full(n))) => Err(SchedulerError::ResourceExhausted(format!(
                "queue holds {n} fires not yet acked (--max-queue-backlog); nothing was triggered"
            ))),
            Some(Ok((fire, disposition, released))) => {
                let woken = released.fires.first().map(|f| f.queue.clone());
                s.report_released(released);
                if let Some(queue) = woken {
                    s.wake_queue(&queue);
                }
                Ok(Triggered { fire, disposition })
            }
        }
    }

    pub async fn backfill(
        &self,
        id: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Backfilled, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let observer = &s.config.observer;
        match s
            .store
            .backfill(
                id,
                start,
                end,
                s.at(),
                s.config.ledger,
                s.config.max_queue_backlog,
                &|fire, job| observer.fire_released(fire, job),
            )
            .await
            .map_err(unavailable)?
        {
            None => Err(SchedulerError::NotFound(id.to_string())),
            Some(Err(BackfillFailed::Refused(e))) => Err(e.into()),
            Some(Err(BackfillFailed::Full {
                outstanding,
                wanted,
            })) => Err(SchedulerError::ResourceExhausted(format!(
                "the job's queue holds {outstanding} fires not yet acked and has no room for \
                 {wanted} more (--max-queue-backlog); nothing was backfilled"
            ))),
            Some(Ok((fires, delivered, outstanding))) => {
                if let Some(f) = fires.first() {
                    observer.fires_stored(&f.queue, fires.len() as u64);
                    s.wake_queue(&f.queue);
                }
                Ok(Backfilled {
                    fires,
                    delivered,
                    outstanding,
                })
            }
        }
    }

    pub async fn update(&self, spec: JobSpec, etag: String) -> Result<Job, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let id = spec.id.to_string();
        match s
            .store
            .update(&spec, &etag, s.at())
            .await
            .map_err(unavailable)?
        {
            None => Err(SchedulerError::NotFound(id)),
            Some(Err(UpdateFailed::Changed)) => Err(SchedulerError::Aborted(format!(
                "job {id} changed since it was read; read it again and retry"
            ))),
            Some(Err(UpdateFailed::Refused(e))) => Err(e.into()),
            Some(Ok((job, withdrawn))) => {
                if let Some(record) = &withdrawn {
                    s.config.observer.occurrences_recorded(
                        job.spec.queue(),
                        record.outcome,
                        record.count,
                    );
                    lock(&s.ledger_touched).insert(job.spec.id().to_string());
                }
                s.armed(job.next_due());
                Ok(job)
            }
        }
    }

    pub async fn delete(&self, id: &str) -> Result<u32, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let dropped = s
            .store
            .delete_job(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| SchedulerError::NotFound(id.to_string()))?;
        for fire in &dropped {
            s.config.observer.fire_dropped(fire, DropReason::JobDeleted);
            s.forget(&fire.queue, &[fire.fire_id.to_string()]);
        }
        Ok(u32::try_from(dropped.len()).unwrap_or(u32::MAX))
    }

    pub fn retention(&self) -> Micros {
        self.shared.config.retention
    }

    pub async fn occurrences(
        &self,
        id: &str,
        after: Option<OccurrenceKey>,
        n: usize,
    ) -> Result<(Vec<Occurrence>, bool), SchedulerError> {
        let s = &self.shared;
        s.store
            .occurrences(id, after, n, s.config.ledger.retention, s.at())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| SchedulerError::NotFound(id.to_string()))
    }

    pub async fn get(&self, id: &str) -> Result<Job, SchedulerError> {
        self.shared
            .store
            .get_job(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| SchedulerError::NotFound(id.to_string()))
    }

    pub async fn list(
        &self,
        filter: &JobFilter,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), SchedulerError> {
        let (jobs, more) = self
            .shared
            .store
            .list_jobs(
                filter.queue.as_deref(),
                &filter.states,
                &filter.labels,
                i64::try_from(page_size).unwrap_or(i64::MAX),
                after,
            )
            .await
            .map_err(unavailable)?;
        let next = if more {
            jobs.last().map(|j| j.spec.id().to_string())
        } else {
            None
        };
        Ok((jobs, next))
    }

    pub fn subscribe(
        &self,
        queue: &str,
        max_in_flight: usize,
    ) -> Result<ReplicaSubscription, SchedulerError> {
        let s = &self.shared;
        s.accepting()?;
        let max = s.config.max_subscribers;
        let mut subs = lock(&s.subscribers);
        if subs.len() >= max {
            return Err(SchedulerError::ResourceExhausted(format!(
                "this replica already serves {max} Subscribe streams (--max-subscribers); \
                 retry later, on another replica, or share streams between workers"
            )));
        }
        let sub = Arc::new(Sub {
            id: s.next_sub.fetch_add(1, Ordering::Relaxed),
            queue: queue.to_string(),
            max_in_flight: max_in_flight.max(1),
            held: Mutex::new(HashMap::new()),
            room: Notify::new(),
            closed: watch::Sender::new(false),
            rounds: watch::Sender::new(0),
        });
        subs.insert(sub.id, sub.clone());
        drop(subs);
        let wake = lock(&s.queues)
            .entry(queue.to_string())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(claim_loop(s.clone(), sub.clone(), wake, tx));
        Ok(ReplicaSubscription {
            handle: ReplicaHandle {
                shared: s.clone(),
                sub,
            },
            fires: rx,
        })
    }

    pub async fn ack(&self, queue: &str, fire_ids: &[String]) -> Result<u32, SchedulerError> {
        let s = &self.shared;
        let done = s
            .store
            .ack(queue, fire_ids, s.at())
            .await
            .map_err(unavailable)?;
        s.forget(queue, fire_ids);
        s.report_acked(&done);
        Ok(u32::try_from(done.len()).unwrap_or(u32::MAX))
    }

    pub fn stats(&self) -> Stats {
        let mut stats = lock(&self.shared.stats).clone();
        // Subscribers are this replica's, and counted now.
        let mut local: HashMap<String, u64> = HashMap::new();
        for sub in lock(&self.shared.subscribers).values() {
            *local.entry(sub.queue.clone()).or_default() += 1;
        }
        for (queue, q) in stats.queues.iter_mut() {
            q.subscribers = local.remove(queue).unwrap_or(0);
        }
        for (queue, n) in local {
            stats.queues.push((
                queue,
                QueueStats {
                    subscribers: n,
                    ..QueueStats::default()
                },
            ));
        }
        stats.queues.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }

    pub fn dropped_fires(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    pub fn close_subscriptions(&self) {
        let s = &self.shared;
        s.shutting_down.store(true, Ordering::SeqCst);
        let subs: Vec<Arc<Sub>> = lock(&s.subscribers).drain().map(|(_, sub)| sub).collect();
        for sub in subs {
            sub.closed.send_replace(true);
        }
    }

    pub async fn shutdown(&self) {
        self.close_subscriptions();
        let tasks = lock(&self.tasks).take();
        let Some(tasks) = tasks else {
            return;
        };
        // The acker commits what it holds before it ends.
        self.shared.flush_acks().await;
        self.shared.stop.send_replace(true);
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "a replica task ended abnormally");
            }
        }
        self.shared.store.close().await;
        info!(replica = %self.shared.name, "replica stopped");
    }

    pub fn now(&self) -> Timestamp {
        self.shared.now()
    }

    /// Runs a pass of the release loop at the clock's now, commits the acks sent so far, and
    /// lets every subscription here claim once after it; until the clock stood still.
    pub async fn settle(&self) {
        let s = &self.shared;
        // On the system clock time never stands still: three rounds are enough.
        for _ in 0..3 {
            let now = s.clock.now();
            let steady = s.clock.steady_now();
            if let Err(e) = s.pass(true).await {
                warn!(error = %e, "settle: a pass failed");
            }
            s.flush_acks().await;
            let subs: Vec<Arc<Sub>> = lock(&s.subscribers).values().cloned().collect();
            for sub in subs {
                let mut rounds = sub.rounds.subscribe();
                let seen = *rounds.borrow_and_update();
                s.wake_queue(&sub.queue);
                sub.room.notify_one();
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while *rounds.borrow_and_update() <= seen {
                        if rounds.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
            }
            s.refresh_stats().await;
            if s.clock.now() == now && s.clock.steady_now() == steady {
                return;
            }
        }
    }

    pub async fn job_count(&self) -> usize {
        self.shared.refresh_stats().await;
        lock(&self.shared.stats)
            .jobs
            .iter()
            .map(|(_, n)| usize::try_from(*n).unwrap_or(usize::MAX))
            .sum()
    }
}

impl Shared {
    /// The time to decide by in a statement: `None` is the database's own `now()`.
    fn at(&self) -> Option<Timestamp> {
        self.settings.use_core_clock.then(|| self.clock.now())
    }

    /// Now on the database's clock, as estimated from the core's (or the core's own, when it
    /// decides).
    fn now(&self) -> Timestamp {
        let now = self.clock.now();
        if self.settings.use_core_clock {
            now
        } else {
            now.plus(self.db_offset.load(Ordering::Relaxed))
        }
    }

    fn accepting(&self) -> Result<(), SchedulerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(shutting_down());
        }
        Ok(())
    }

    /// A job here now falls due at `due`: the release loop looks again if it would look
    /// later than that.
    fn armed(&self, due: Option<Timestamp>) {
        if due.is_some_and(|d| d.0 < self.release_at.load(Ordering::Relaxed)) {
            self.release_wake.notify_one();
        }
    }

    fn wake_queue(&self, queue: &str) {
        if let Some(w) = lock(&self.queues).get(queue) {
            w.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    fn wake_all_queues(&self) {
        for w in lock(&self.queues).values() {
            w.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Fires acked (anywhere) no longer count against the subscriptions here that held them.
    fn forget(&self, queue: &str, fire_ids: &[String]) {
        let subs: Vec<Arc<Sub>> = lock(&self.subscribers)
            .values()
            .filter(|s| s.queue == queue)
            .cloned()
            .collect();
        for sub in subs {
            let mut held = sub.lock();
            let before = held.len();
            for id in fire_ids {
                held.remove(id);
            }
            if held.len() != before {
                drop(held);
                sub.room.notify_one();
            }
        }
    }

    /// Records how the last database call of a loop went.
    fn set_health(&self, failure: Option<&StoreError>) {
        let failure = failure.map(|e| format!("the database cannot be used: {e}"));
        if let Some(reason) = &failure
            && !matches!(&*self.health.borrow(), Health::StoreFailing(r) if r == reason)
        {
            warn!(%reason, "not serving until the database answers (retrying)");
        }
        mark_store(&self.health, failure, "the database answers again");
    }

    fn fail(&self, reason: &str) {
        mark_failed(&self.health, reason);
    }

    /// Releases everything due, takes back every expired lease, and (once a minute, or when
    /// `retire` is set) deletes finished jobs whose retention ended.
    async fn pass(&self, retire: bool) -> Result<(), StoreError> {
        let mut state = self.pass.lock().await;
        let at = self.at();
        loop {
            let started = std::time::Instant::now();
            let limits = self.release_limits();
            let observer = &self.config.observer;
            let released = self
                .store
                .release_due(at, limits, &|fire, job| observer.fire_released(fire, job))
                .await;
            observer.store_committed(
                released.as_ref().map_or(0, |r| r.fires.len()),
                started.elapsed(),
                released.is_ok(),
            );
            let released = released?;
            let full = released.jobs as i64 >= BATCH;
            self.report_released(released);
            if !full {
                break;
            }
        }
        let steady = self.clock.steady_now();
        let reap = retire
            || state
                .last_reap
                .is_none_or(|t| steady.since(t) >= REAP_EVERY.as_micros() as Micros);
        if reap {
            state.last_reap = Some(steady);
            loop {
                let reaped = self
                    .store
                    .reap_expired(at, BATCH, self.config.max_redelivery_backoff)
                    .await?;
                let full = reaped.len() as i64 >= BATCH;
                for attempted in &reaped {
                    self.report_attempt(attempted, RedeliveryReason::Expired);
                }
                if !full {
                    break;
                }
            }
        }
        let steady = self.clock.steady_now();
        let due = state
            .last_retire
            .is_none_or(|t| steady.since(t) >= RETIRE_EVERY.as_micros() as Micros);
        if retire || due {
            state.last_retire = Some(steady);
            loop {
                let n = self
                    .store
                    .delete_expired(at, self.config.retention, BATCH)
                    .await?;
                if n > 0 {
                    debug!(jobs = n, "finished jobs past their retention deleted");
                }
                if (n as i64) < BATCH {
                    break;
                }
            }
            // A held fire whose job's running fire ended without letting it go (a crash
            // between the two) goes now.
            match self.store.unhold_idle(at).await {
                Ok(woken) => {
                    for queue in woken {
                        self.wake_queue(&queue);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "held fires could not be looked at; retrying at the next retention pass")
                }
            }
            // A ledger that cannot be pruned now is pruned at the next pass; it does not
            // make the replica unhealthy.
            if let Err(e) = self.prune_ledger(at).await {
                warn!(error = %e, "ledger records past --ledger-retention or --ledger-max-per-job could not be deleted; retrying at the next retention pass");
            }
        }
        Ok(())
    }

    /// Deletes ledger records past the retention, and trims the ledgers this replica wrote to
    /// since the last time to their cap.
    async fn prune_ledger(&self, at: Option<Timestamp>) -> Result<(), StoreError> {
        let ledger = self.config.ledger;
        // No ledger kept: what an earlier run kept goes too.
        let retention = if ledger.per_job == 0 {
            0
        } else {
            ledger.retention
        };
        loop {
            let n = self.store.prune_ledger(at, retention, BATCH * 10).await?;
            if n > 0 {
                debug!(
                    records = n,
                    "ledger records past --ledger-retention deleted"
                );
            }
            if (n as i64) < BATCH * 10 {
                break;
            }
        }
        if ledger.per_job == 0 {
            return Ok(());
        }
        let touched: Vec<String> = lock(&self.ledger_touched).drain().collect();
        // A statement walks about a million index entries at most (its timeout is 5 s).
        let chunk = (1_000_000 / ledger.per_job).clamp(1, 1_000);
        for (i, jobs) in touched.chunks(chunk).enumerate() {
            match self.store.trim_ledgers(jobs, ledger.per_job).await {
                Ok(n) if n > 0 => {
                    debug!(
                        records = n,
                        "ledger records beyond --ledger-max-per-job deleted"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    // Looked at again next time.
                    lock(&self.ledger_touched).extend(touched[i * chunk..].iter().cloned());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn report_released(&self, released: Released) {
        let observer = &self.config.observer;
        for (queue, count) in stored_per_queue(released.fires.iter().map(|f| f.queue.as_str())) {
            observer.fires_stored(queue, count);
        }
        for skip in released.skipped {
            if skip.misfire > 0 {
                let at_least = if skip.misfire_at_least {
                    "at least "
                } else {
                    ""
                };
                warn!(
                    job_id = %skip.job_id,
                    queue = %skip.queue,
                    skipped = skip.misfire,
                    "{at_least}{} missed occurrence(s) skipped by the misfire policy",
                    skip.misfire
                );
                observer.occurrences_skipped(&skip.queue, skip.misfire, skip.missed);
            }
            if skip.backlog_full > 0 {
                warn!(
                    job_id = %skip.job_id,
                    queue = %skip.queue,
                    skipped = skip.backlog_full,
                    max_queue_backlog = self.config.max_queue_backlog,
                    "occurrence(s) skipped: the queue holds --max-queue-backlog fires not yet acked; is anyone consuming it?"
                );
                observer.occurrences_skipped(
                    &skip.queue,
                    skip.backlog_full,
                    SkipReason::BacklogFull,
                );
            }
            for (reason, count) in dst_skipped(&skip.job_id, &skip.queue, skip.dst) {
                observer.occurrences_skipped(&skip.queue, count, reason);
            }
            if skip.overlap > 0 {
                debug!(job_id = %skip.job_id, queue = %skip.queue, skipped = skip.overlap, "occurrence(s) skipped: a fire of the job is still running");
                observer.occurrences_skipped(&skip.queue, skip.overlap, SkipReason::Overlap);
            }
        }
        for fire in &released.replaced {
            observer.fire_dropped(fire, DropReason::Replaced);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            // A slot of a stream here that held it is free again (another replica's frees
            // when it finds the lease gone).
            self.forget(&fire.queue, &[fire.fire_id.to_string()]);
        }
        for queue in &released.woken {
            self.wake_queue(queue);
        }
        let mut touched = lock(&self.ledger_touched);
        for (job, queue, record) in &released.recorded {
            observer.occurrences_recorded(queue, record.outcome, record.count);
            touched.insert(job.clone());
        }
    }

    /// Reports acked fires, and their occurrences as delivered (the ack wrote their ledger
    /// records; a dead-lettered fire's was written when it was dead-lettered).
    fn report_acked(&self, fires: &[FireRecord]) {
        let observer = &self.config.observer;
        for fire in fires {
            observer.fire_acked(fire);
        }
        if self.config.ledger.per_job == 0 {
            return;
        }
        let delivered = fires.iter().filter(|f| !f.dead_lettered);
        for (queue, count) in stored_per_queue(delivered.clone().map(|f| f.queue.as_str())) {
            observer.occurrences_recorded(queue, Outcome::Delivered, count);
        }
        let mut touched = lock(&self.ledger_touched);
        for fire in delivered {
            if !touched.contains(&*fire.job_id) {
                touched.insert(fire.job_id.to_string());
            }
        }
    }

    /// The limits of a release by this replica.
    fn release_limits(&self) -> ReleaseLimits {
        ReleaseLimits {
            batch: BATCH,
            catch_up_cap: self.config.max_catch_up_fires,
            max_backlog: self.config.max_queue_backlog,
        }
    }

    /// Reports what became of a fire whose attempt failed.
    fn report_attempt(&self, attempted: &Attempted, why: RedeliveryReason) {
        let observer = &self.config.observer;
        if let Some(record) = &attempted.record {
            observer.occurrences_recorded(&attempted.fire.queue, record.outcome, record.count);
            lock(&self.ledger_touched).insert(attempted.fire.job_id.to_string());
        }
        let mut fire = attempted.fire.clone();
        match &attempted.after {
            AfterAttempt::Again { attempt, .. } => {
                fire.attempt = *attempt;
                observer.fire_redelivered(&fire, why);
            }
            AfterAttempt::DeadLetter { queue } => {
                let from = std::mem::replace(&mut fire.queue, queue.clone());
                fire.attempt = 1;
                fire.dead_lettered = true;
                observer.fire_dead_lettered(&fire, &from);
            }
            AfterAttempt::Drop => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(
                    fire_id = %fire.fire_id,
                    queue = %fire.queue,
                    attempt = fire.attempt,
                    "fire dropped: its last attempt failed and its job has no dead-letter queue"
                );
                observer.fire_dropped(&fire, DropReason::AttemptsExhausted);
            }
        }
    }

    async fn flush_acks(&self) {
        let (tx, rx) = oneshot::channel();
        if self.acks.send(AckOp::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Estimates the database's clock against the core's: the midpoint of one round trip.
    async fn measure_clock(&self) -> Result<(), StoreError> {
        let before = self.clock.now();
        let db = self.store.clock().await?;
        let after = self.clock.now();
        let mid = before.plus(after.since(before) / 2);
        let offset = db.since(mid);
        let old = self.db_offset.swap(offset, Ordering::Relaxed);
        if (offset - old).abs() > 1_000_000 {
            info!(
                offset_ms = offset / 1_000,
                "this replica's clock differs from the database's; due times and leases follow the database"
            );
        }
        Ok(())
    }

    async fn refresh_stats(&self) {
        match self.store.counts().await {
            Ok(counts) => {
                let stats = Stats {
                    jobs: counts.jobs,
                    queues: counts
                        .queues
                        .into_iter()
                        .map(|(q, ready, leased)| {
                            (
                                q,
                                QueueStats {
                                    backlog: ready,
                                    in_flight: leased,
                                    subscribers: 0,
                                },
                            )
                        })
                        .collect(),
                };
                *lock(&self.stats) = stats;
            }
            Err(e) => debug!(error = %e, "counting for the gauges failed"),
        }
    }

    /// Sleeps on the core's clock until `deadline` (database time, as the store read it
    /// beside `db_now`), at most the poll interval; or until stopped.
    fn sleep_for(&self, next: Option<Timestamp>, db_now: Timestamp) -> Duration {
        let poll = self.settings.poll_interval;
        match next {
            Some(t) => micros_duration(t.since(db_now).max(0)).min(poll),
            None => poll,
        }
    }
}

/// Resolves once the replica is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `task`; if it ends (or panics) before the replica stops, the replica has failed.
fn supervise(
    shared: &Arc<Shared>,
    what: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let shared = shared.clone();
    tokio::spawn(async move {
        let ran = tokio::spawn(task).await;
        if !*shared.stop.borrow() {
            let why = match ran {
                Err(e) if e.is_panic() => {
                    format!("the {what} panicked: {}", panic_message(&*e.into_panic()))
                }
                Err(e) => format!("the {what} ended: {e}"),
                Ok(()) => format!("the {what} ended"),
            };
            shared.fail(&why);
        }
    })
}

/// Waits `wait` on the core's clock, or until `stop` or `woken` fires first.
async fn nap(shared: &Shared, wait: Duration, woken: impl std::future::Future<Output = ()>) {
    let mut stop = shared.stop.subscribe();
    let deadline = shared
        .clock
        .now()
        .plus(i64::try_from(wait.as_micros()).unwrap_or(i64::MAX));
    tokio::select! {
        _ = async {
            // A manual clock's sleep may end early; sleep again until the deadline.
            while shared.clock.now() < deadline {
                shared.clock.sleep_until(deadline).await;
            }
        } => {}
        _ = woken => {}
        _ = stopped(&mut stop) => {}
    }
}

async fn release_loop(shared: Arc<Shared>) {
    let mut retry = RETRY_MIN;
    while !*shared.stop.borrow() {
        let wait = match shared.pass(false).await {
            Ok(()) => match shared.store.next_due(shared.at()).await {
                Ok((next, db_now)) => {
                    shared.set_health(None);
                    retry = RETRY_MIN;
                    shared.sleep_for(next, db_now)
                }
                Err(e) => {
                    shared.set_health(Some(&e));
                    retry
                }
            },
            Err(e) => {
                shared.set_health(Some(&e));
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                wait
            }
        };
        if wait > Duration::ZERO {
            let woken = shared.release_wake.notified();
            tokio::pin!(woken);
            // Registered before `release_at` is published, so a Schedule that reads the new
            // time and notifies is not missed.
            woken.as_mut().enable();
            shared
                .release_at
                .store(shared.now().plus(micros(wait)).0, Ordering::Relaxed);
            nap(&shared, wait, woken).await;
            // While it works it may miss what it already read: any new job wakes it again.
            shared.release_at.store(i64::MAX, Ordering::Relaxed);
        }
    }
}

/// Stores the jobs of concurrent Schedule calls, many per statement (group commit).
async fn inserter(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(Job, oneshot::Sender<Result<bool, StoreError>>)>,
) {
    let mut stop = shared.stop.subscribe();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1_000) => if n == 0 { return },
            _ = stopped(&mut stop) => return,
        }
        let started = std::time::Instant::now();
        let jobs: Vec<&Job> = batch.iter().map(|(job, _)| job).collect();
        let stored = shared.store.insert_jobs(&jobs).await;
        shared
            .config
            .observer
            .store_committed(jobs.len(), started.elapsed(), stored.is_ok());
        match stored {
            Ok(inserted) => {
                for ((_, reply), inserted) in batch.drain(..).zip(inserted) {
                    let _ = reply.send(Ok(inserted));
                }
            }
            Err(e) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Io(e.to_string())));
                }
            }
        }
    }
}

/// Commits the acks of every stream here, many per statement.
async fn acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckOp>) {
    let mut stop = shared.stop.subscribe();
    let mut ops = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut ops, 4096) => if n == 0 { return },
            _ = stopped(&mut stop) => {
                // Commit what is left, then end.
                while let Ok(op) = rx.try_recv() {
                    ops.push(op);
                }
                commit_acks(&shared, std::mem::take(&mut ops)).await;
                return;
            }
        }
        commit_acks(&shared, std::mem::take(&mut ops)).await;
    }
}

async fn commit_acks(shared: &Shared, ops: Vec<AckOp>) {
    let mut acks = Vec::new();
    let mut flushes = Vec::new();
    for op in ops {
        match op {
            AckOp::Ack(queue, id) => acks.push((queue, id)),
            AckOp::Flush(reply) => flushes.push(reply),
        }
    }
    if !acks.is_empty() {
        let started = std::time::Instant::now();
        let done = shared.store.ack_each(&acks, shared.at()).await;
        shared
            .config
            .observer
            .store_committed(acks.len(), started.elapsed(), done.is_ok());
        match done {
            Ok(fires) => shared.report_acked(&fires),
            // The fires stay leased and go out again after their deadlines: at least once.
            Err(e) => {
                warn!(error = %e, acks = acks.len(), "acks could not be stored; those fires will be redelivered")
            }
        }
    }
    for reply in flushes {
        let _ = reply.send(());
    }
}

/// Keeps the estimate of the database's clock and the gauges' counts fresh.
async fn clock_loop(shared: Arc<Shared>) {
    let mut last_clock = shared.clock.steady_now();
    while !*shared.stop.borrow() {
        nap(&shared, STATS_EVERY, std::future::pending()).await;
        shared.refresh_stats().await;
        let steady = shared.clock.steady_now();
        if !shared.settings.use_core_clock
            && steady.since(last_clock) >= CLOCK_EVERY.as_micros() as Micros
        {
            last_clock = steady;
            if let Err(e) = shared.measure_clock().await {
                debug!(error = %e, "reading the database's clock failed");
            }
        }
    }
}

/// Turns NOTIFYs into queue wake-ups; reconnects when the connection is lost.
async fn listener(shared: Arc<Shared>) {
    let mut retry = RETRY_MIN;
    while !*shared.stop.borrow() {
        let mut wakeups = match Wakeups::listen(&shared.settings.database_url).await {
            Ok(w) => w,
            Err(e) => {
                debug!(error = %e, "LISTEN failed; polling until it works");
                nap(&shared, retry, std::future::pending()).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        retry = RETRY_MIN;
        // Anything notified before LISTEN took effect was missed.
        shared.wake_all_queues();
        let mut stop = shared.stop.subscribe();
        loop {
            let next = tokio::select! {
                next = wakeups.next() => next,
                _ = stopped(&mut stop) => return,
            };
            match next {
                Ok(Wakeup::Queue(q)) => shared.wake_queue(&q),
                Ok(Wakeup::Reconnected) => shared.wake_all_queues(),
                Err(e) => {
                    debug!(error = %e, "the LISTEN connection failed; reconnecting");
                    shared.wake_all_queues();
                    break;
                }
            }
        }
    }
}

/// Leases fires of the subscription's queue while it has room, and hands them to its stream.
async fn claim_loop(
    shared: Arc<Shared>,
    sub: Arc<Sub>,
    mut wake: watch::Receiver<u64>,
    fires: mpsc::UnboundedSender<Delivery>,
) {
    let mut closed = sub.closed.subscribe();
    let mut retry = RETRY_MIN;
    let mut last_check = shared.clock.steady_now();
    loop {
        if *closed.borrow() || *shared.stop.borrow() || fires.is_closed() {
            break;
        }
        wake.borrow_and_update();
        let steady = shared.clock.steady_now();
        let room = {
            let mut held = sub.lock();
            // A lease whose local deadline passed is no longer this subscription's.
            held.retain(|_, h| h.deadline > steady);
            sub.max_in_flight.saturating_sub(held.len())
        };
        let mut wait = shared.settings.poll_interval;
        if room > 0 {
            match shared
                .store
                .claim(&sub.queue, room as i64, &shared.name, shared.at())
                .await
            {
                Ok(leases) => {
                    retry = RETRY_MIN;
                    let got = leases.len();
                    hand_out(&sub, steady, leases, &fires);
                    if got == room {
                        wait = Duration::ZERO;
                    } else {
                        // Sleep until the queue's next delayed fire, if it comes sooner.
                        match shared.store.next_available(&sub.queue, shared.at()).await {
                            Ok((next, db_now)) => wait = shared.sleep_for(next, db_now),
                            Err(e) => debug!(error = %e, "looking for delayed fires failed"),
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, queue = %sub.queue, "claiming fires failed; retrying");
                    wait = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        } else if steady.since(last_check) >= micros(shared.settings.poll_interval) {
            // Full: fires acked on another replica or expired free room only if looked for.
            last_check = steady;
            release_lost(&shared, &sub).await;
        }
        sub.rounds.send_modify(|r| *r += 1);
        if wait > Duration::ZERO {
            // Wake also when the earliest local lease runs out.
            let earliest = sub.lock().values().map(|h| h.deadline).min();
            if let Some(d) = earliest {
                let left = micros_duration(d.since(shared.clock.steady_now()).max(0));
                wait = wait.min(left);
            }
            let woken = async {
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = sub.room.notified() => {}
                    _ = closed.changed() => {}
                }
            };
            nap(&shared, wait, woken).await;
        }
    }
    lock(&shared.subscribers).remove(&sub.id);
    sub.rounds.send_modify(|r| *r += 1);
}

fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Records the leases as held and sends them to the stream.
fn hand_out(
    sub: &Sub,
    claimed_at: Timestamp,
    leases: Vec<Lease>,
    fires: &mpsc::UnboundedSender<Delivery>,
) {
    let mut held = sub.lock();
    for lease in leases {
        let deadline = claimed_at.plus(lease.spec.ack_deadline());
        held.insert(
            lease.fire.fire_id.to_string(),
            Held {
                token: lease.token,
                deadline,
                fire: lease.fire.clone(),
            },
        );
        let delivery = Delivery {
            fire: lease.fire,
            spec: lease.spec,
            ack_deadline: lease.expires_at,
        };
        if fires.send(delivery).is_err() {
            // The stream is gone; the lease runs out and the fire goes to someone else.
            break;
        }
    }
}

/// Forgets leases of `sub` that no longer hold in the database (acked on another replica,
/// taken back after expiry), so that they free room.
async fn release_lost(shared: &Shared, sub: &Sub) {
    let tokens: Vec<uuid::Uuid> = sub.lock().values().map(|h| h.token).collect();
    if tokens.is_empty() {
        return;
    }
    if let Ok(still) = shared.store.still_leased(&tokens).await {
        let still: std::collections::HashSet<uuid::Uuid> = still.into_iter().collect();
        sub.lock().retain(|_, h| still.contains(&h.token));
    }
}

/// Acks, nacks and extensions for one subscription on this replica.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    shared: Arc<Shared>,
    sub: Arc<Sub>,
}

impl ReplicaHandle {
    pub fn ack(&self, fire_ids: &[String]) {
        {
            let mut held = self.sub.lock();
            for id in fire_ids {
                held.remove(id);
            }
        }
        self.sub.room.notify_one();
        for id in fire_ids {
            let _ = self
                .shared
                .acks
                .send(AckOp::Ack(self.sub.queue.clone(), id.clone()));
        }
    }

    pub fn nack(&self, fire_ids: &[String], delay: Micros) {
        let taken: Vec<Held> = {
            let mut held = self.sub.lock();
            fire_ids.iter().filter_map(|id| held.remove(id)).collect()
        };
        if taken.is_empty() {
            return;
        }
        self.sub.room.notify_one();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            for h in taken {
                match shared
                    .store
                    .nack(&h.fire.fire_id, h.token, delay, shared.at())
                    .await
                {
                    Ok(Some(attempted)) => {
                        shared.report_attempt(&attempted, RedeliveryReason::Nack)
                    }
                    // The lease had passed on: nothing changes.
                    Ok(None) => {}
                    Err(e) => warn!(
                        error = %e,
                        fire_id = %h.fire.fire_id,
                        "a nack could not be stored; the fire goes out again after its ack deadline"
                    ),
                }
            }
        });
    }

    pub fn extend(&self, fire_ids: &[String], extension: Micros) {
        let leases: Vec<(String, uuid::Uuid)> = {
            let held = self.sub.lock();
            fire_ids
                .iter()
                .filter_map(|id| held.get(id).map(|h| (id.clone(), h.token)))
                .collect()
        };
        if leases.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let sub = self.sub.clone();
        tokio::spawn(async move {
            for (id, token) in leases {
                let asked = shared.clock.steady_now();
                match shared
                    .store
                    .extend(&id, token, extension, shared.at())
                    .await
                {
                    Ok(true) => {
                        if let Some(h) = sub.lock().get_mut(&id)
                            && h.token == token
                        {
                            h.deadline = asked.plus(extension);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, fire_id = %id, "an ack deadline extension could not be stored")
                    }
                }
            }
        });
    }

    pub fn close(&self) {
        self.sub.closed.send_replace(true);
    }
}

/// The fires of one subscription on this replica, as a stream.
#[derive(Debug)]
pub struct ReplicaSubscription {
    handle: ReplicaHandle,
    fires: mpsc::UnboundedReceiver<Delivery>,
}

impl ReplicaSubscription {
    pub fn handle(&self) -> ReplicaHandle {
        self.handle.clone()
    }
}

impl Stream for ReplicaSubscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            let delivery = match self.fires.poll_recv(cx) {
                Poll::Ready(Some(d)) => d,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    if *self.handle.sub.closed.borrow() {
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            };
            let shared = &self.handle.shared;
            let steady = shared.clock.steady_now();
            // Sent only while this subscription still holds the lease.
            let holds = self
                .handle
                .sub
                .lock()
                .get(&*delivery.fire.fire_id)
                .is_some_and(|h| h.deadline > steady);
            if !holds {
                continue;
            }
            shared
                .config
                .observer
                .fire_delivered(&delivery.fire, shared.now());
            return Poll::Ready(Some(delivery));
        }
    }
}

impl Drop for ReplicaSubscription {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// How many of the fires released are on each queue (for `Observer::fires_stored`).
fn stored_per_queue<'a>(queues: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, u64> {
    let mut counts = BTreeMap::new();
    for queue in queues {
        *counts.entry(queue).or_default() += 1;
    }
    counts
}
