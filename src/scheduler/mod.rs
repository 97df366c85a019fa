//! The scheduler core: timers, delivery, acks and misfires, on top of a store and a
//! [`Clock`]. Knows nothing of gRPC; hands out plain Rust types, streams and errors.
//!
//! Two engines sit behind one [`Scheduler`] handle:
//! - [`embedded`]: one process that owns its store (redb), holds every job in memory and
//!   commits through one writer thread. The default.
//! - [`replicated`]: any number of replicas sharing one PostgreSQL database, which holds
//!   everything; each replica releases due jobs, redelivers expired leases and serves its own
//!   Subscribe streams, and every decision is made on the database's clock.
//!
//! # Where things happen (embedded)
//! - A fire is **born** in [`writer`]: the job's advance and the fire's record commit together.
//! - A fire **waits** in [`state`]: on its queue's ready list, or in the deadline index while
//!   delayed or in flight.
//! - A fire is **handed out** by `State::poll_delivery` when a [`Subscription`] stream is
//!   polled, and **acked** through [`SubscriberHandle::ack`] or [`Scheduler::ack`], which the
//!   writer turns into a delete.
//! - [`timer`] is the one task that wakes when something is due: a job's next occurrence, an
//!   ack deadline, the end of a redelivery delay (both on steady time), or the end of a
//!   finished job's retention.
//! - A job **goes away** in [`writer`] too: by DeleteJob, or by retention once it finished and
//!   none of its fires is outstanding.
//!
//! # Where things happen (replicated)
//! A fire is born in `PgStore::release_due` (the job's advance and the fire's row in one
//! transaction), waits as a `ready` row, is handed out by `PgStore::claim` (a lease with a
//! token) to a subscription's claim loop, and is acked by deleting its row. The engine's loops
//! live in [`replicated`].
//!
//! [`Health`] says whether commits succeed and the loops run; the API layer turns it into gRPC
//! health and exits when the core has failed. There is no task or timer per job.

pub mod clock;
mod embedded;
#[cfg(test)]
mod ledger_tests;
pub mod observe;
pub mod replicated;
mod state;
mod timer;
mod writer;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::Stream;

pub use clock::{Clock, ManualClock, SkewedClock, SystemClock};
pub use observe::{DropReason, NoopObserver, Observer, RedeliveryReason, SkipReason};
pub use replicated::ReplicaSettings;
pub use state::Delivery;

/// What BackfillJob did: the fires released (oldest first), and how many occurrences of the
/// range it left alone as delivered, or as still out.
#[derive(Debug, Clone, Default)]
pub struct Backfilled {
    pub fires: Vec<crate::domain::FireRecord>,
    pub delivered: u32,
    pub outstanding: u32,
}

/// What TriggerJob made: the fire (its id and times; held when its job's overlap policy held
/// it), and whether it was released, held or skipped (then nothing was stored).
#[derive(Debug, Clone)]
pub struct Triggered {
    pub fire: crate::domain::FireRecord,
    pub disposition: crate::domain::Disposition,
}

/// Hash maps of the core's memory: foldhash is several times faster than the standard
/// library's SipHash on short keys, and seeded per process, so ids a client chooses cannot be
/// crafted to collide.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use crate::domain::job::UpdateRefused;
use crate::domain::ledger;
use crate::domain::{Job, JobSpec, JobState, Micros, Timestamp, TraceContext, TriggerError};
use crate::store::{Store, StoreError};
use embedded::{Embedded, EmbeddedHandle, EmbeddedSubscription};
use replicated::{ReplicaHandle, ReplicaSubscription, Replicated};
use writer::Transition;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most catch-up fires one MISFIRE_POLICY_FIRE_ALL job sends after an outage.
    pub max_catch_up_fires: usize,
    /// Longest wait before redelivering a fire whose ack deadline expired.
    pub max_redelivery_backoff: Micros,
    /// Told what happens to fires and commits (tracing, metrics).
    pub observer: Arc<dyn Observer>,
    /// How long a COMPLETED or CANCELLED job with no fire outstanding is kept after it
    /// finished, before it is deleted.
    pub retention: Micros,
    /// Most fires one queue holds un-acked; further occurrences for it are skipped.
    pub max_queue_backlog: usize,
    /// Most subscriptions open at once.
    pub max_subscribers: usize,
    /// How many ledger records are kept per job, and for how long.
    pub ledger: ledger::Bounds,
}

/// Default for [`SchedulerConfig::max_catch_up_fires`].
pub const DEFAULT_MAX_CATCH_UP_FIRES: usize = 100;
/// Default for [`SchedulerConfig::max_subscribers`].
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 10_000;
/// Default for [`SchedulerConfig::max_queue_backlog`].
pub const DEFAULT_MAX_QUEUE_BACKLOG: usize = 100_000;
/// Default for [`SchedulerConfig::retention`]: 7 days.
pub const DEFAULT_RETENTION_MICROS: Micros = 7 * 24 * 3_600 * 1_000_000;
/// Default for [`SchedulerConfig::max_redelivery_backoff`]: 60 s.
pub const DEFAULT_MAX_REDELIVERY_BACKOFF_MICROS: Micros = 60_000_000;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_catch_up_fires: DEFAULT_MAX_CATCH_UP_FIRES,
            max_redelivery_backoff: DEFAULT_MAX_REDELIVERY_BACKOFF_MICROS,
            observer: Arc::new(NoopObserver),
            retention: DEFAULT_RETENTION_MICROS,
            max_queue_backlog: DEFAULT_MAX_QUEUE_BACKLOG,
            max_subscribers: DEFAULT_MAX_SUBSCRIBERS,
            ledger: ledger::Bounds::default(),
        }
    }
}

/// Errors of the core. The gRPC layer maps each to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("job {0} already exists with a different spec")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A conditional change found the job changed since it was read.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    InvalidTrigger(#[from] TriggerError),
    #[error("{0}")]
    Unavailable(String),
    /// The store's disk is full.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A request field that does not fit the job (`field` names it as the API does).
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    /// One job of a batch could not be scheduled, so none was.
    #[error("requests[{index}]: {error}; no job of the batch was scheduled")]
    InBatch {
        index: usize,
        error: Box<SchedulerError>,
    },
}

impl From<crate::domain::backfill::BackfillRefused> for SchedulerError {
    fn from(e: crate::domain::backfill::BackfillRefused) -> Self {
        use crate::domain::backfill::BackfillRefused;
        match e {
            BackfillRefused::TooMany { .. } => SchedulerError::InvalidField {
                field: "end_time",
                message: e.to_string(),
            },
            BackfillRefused::StartInFuture => SchedulerError::InvalidField {
                field: "start_time",
                message: e.to_string(),
            },
            _ => SchedulerError::FailedPrecondition(e.to_string()),
        }
    }
}

impl From<UpdateRefused> for SchedulerError {
    fn from(e: UpdateRefused) -> Self {
        match e {
            UpdateRefused::Finished { .. } => SchedulerError::FailedPrecondition(e.to_string()),
            UpdateRefused::Trigger(t) => SchedulerError::InvalidTrigger(t),
        }
    }
}

fn shutting_down() -> SchedulerError {
    SchedulerError::Unavailable("tickd is shutting down; retry on another instance".into())
}

/// How the core is doing; the API layer turns it into gRPC health (see [`Scheduler::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Commits succeed and the timer runs.
    Serving,
    /// Commits are failing, for the reason given (a full disk, an I/O error). The writer keeps
    /// retrying with backoff, reopening the store, and turns back to `Serving` on the first
    /// commit that succeeds.
    StoreFailing(String),
    /// The writer or the timer stopped, or a panic poisoned the scheduler's state: nothing
    /// will fire any more. Final; the process must exit so that it is restarted.
    Failed(String),
}

/// Moves `health` to failed for good (see [`Health::Failed`]); logs it once.
fn mark_failed(health: &watch::Sender<Health>, reason: &str) {
    health.send_if_modified(|h| {
        if matches!(h, Health::Failed(_)) {
            return false;
        }
        tracing::error!(reason, "the scheduler core failed; tickd must be restarted");
        *h = Health::Failed(reason.to_string());
        true
    });
}

/// Records on `health` whether the store answered: `Some(reason)` when it failed. A failed core
/// stays failed; `recovered` is logged when it answers again.
fn mark_store(health: &watch::Sender<Health>, failure: Option<String>, recovered: &str) {
    health.send_if_modified(|h| match (&*h, failure) {
        (Health::Failed(_), _) => false,
        (Health::Serving, None) => false,
        (Health::StoreFailing(_), None) => {
            tracing::info!("{recovered}; serving");
            *h = Health::Serving;
            true
        }
        (current, Some(reason)) => {
            if matches!(current, Health::StoreFailing(r) if *r == reason) {
                return false;
            }
            *h = Health::StoreFailing(reason);
            true
        }
    });
}

/// Counts for gauges; see [`Scheduler::stats`].
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Jobs per state (states with no job are left out).
    pub jobs: Vec<(JobState, u64)>,
    /// Per queue with fires or subscribers.
    pub queues: Vec<(String, QueueStats)>,
}

/// Counts of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Fires waiting for delivery (ready, delayed, or being redelivered).
    pub backlog: u64,
    /// Fires handed to a subscriber and not yet acked.
    pub in_flight: u64,
    pub subscribers: u64,
}

/// Most jobs one ListJobs call looks at: ten per job asked for, at least 1,000.
pub fn list_scan_budget(page_size: usize) -> usize {
    page_size.saturating_mul(10).max(1_000)
}

/// Which jobs ListJobs returns.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    /// Empty: every state.
    pub states: Vec<JobState>,
    /// Every one must match.
    pub labels: BTreeMap<String, String>,
}

impl JobFilter {
    fn matches(&self, job: &Job) -> bool {
        self.queue.as_ref().is_none_or(|q| *q == job.spec.queue())
            && (self.states.is_empty() || self.states.contains(&job.status.state))
            && self
                .labels
                .iter()
                .all(|(k, v)| job.spec.labels().get(k) == Some(v))
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Why the core could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot rebuild state from the store: {0}")]
    Load(String),
}

/// A handle to the running core, on whichever engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Scheduler {
    engine: Engine,
}

#[derive(Debug, Clone)]
enum Engine {
    Embedded(Embedded),
    Replicated(Replicated),
}

/// Calls the same method on whichever engine runs.
macro_rules! on_engine {
    ($self:expr, $e:ident => $call:expr) => {
        match &$self.engine {
            Engine::Embedded($e) => $call,
            Engine::Replicated($e) => $call,
        }
    };
}

impl Scheduler {
    /// Loads everything from `store`, rebuilds memory from it, and starts the embedded engine
    /// (its writer thread and timer task).
    pub async fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Result<Scheduler, StartError> {
        let engine = Embedded::start(store, clock, config).await?;
        Ok(Scheduler {
            engine: Engine::Embedded(engine),
        })
    }

    /// Starts a replica on the PostgreSQL database of `settings` (migrating it first).
    pub async fn start_replica(
        settings: ReplicaSettings,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Result<Scheduler, StartError> {
        let engine = Replicated::start(settings, clock, config).await?;
        Ok(Scheduler {
            engine: Engine::Replicated(engine),
        })
    }

    /// The core's health, as it changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        on_engine!(self, e => e.health())
    }

    /// Which store the core keeps its jobs in: `embedded` (one process, its own files) or
    /// `postgres` (shared by replicas).
    pub fn store_kind(&self) -> &'static str {
        match &self.engine {
            Engine::Embedded(_) => "embedded",
            Engine::Replicated(_) => "postgres",
        }
    }

    /// Stores a new job (or returns the existing one with the same id and spec). An empty id
    /// gets a UUIDv7. Answers once the job is durable.
    pub async fn schedule(&self, spec: JobSpec) -> Result<Job, SchedulerError> {
        self.schedule_traced(spec, None).await
    }

    /// [`Scheduler::schedule`], remembering the trace context of the call so that the job's
    /// fires can link to it.
    pub async fn schedule_traced(
        &self,
        mut spec: JobSpec,
        trace: Option<TraceContext>,
    ) -> Result<Job, SchedulerError> {
        if spec.id.is_empty() {
            spec.id = uuid::Uuid::now_v7().to_string().into();
        }
        let mut job = Job::create(spec, self.now())?;
        job.status.trace = trace.map(Box::new);
        on_engine!(self, e => e.schedule(job).await)
    }

    /// Stores several new jobs in one commit, all or none (see [`Scheduler::schedule`] for
    /// each); answers them in order. A job that cannot be created, or whose id is taken by a
    /// different job, fails the whole batch with [`SchedulerError::InBatch`] naming it.
    pub async fn schedule_batch(
        &self,
        specs: Vec<JobSpec>,
        trace: Option<TraceContext>,
    ) -> Result<Vec<Job>, SchedulerError> {
        let now = self.now();
        let mut jobs = Vec::with_capacity(specs.len());
        for (index, mut spec) in specs.into_iter().enumerate() {
            if spec.id.is_empty() {
                spec.id = uuid::Uuid::now_v7().to_string().into();
            }
            let mut job = Job::create(spec, now).map_err(|e| SchedulerError::InBatch {
                index,
                error: Box::new(e.into()),
            })?;
            job.status.trace = trace.clone().map(Box::new);
            jobs.push(job);
        }
        on_engine!(self, e => e.schedule_batch(jobs).await)
    }

    /// Cancels a job. Cancelling a cancelled or completed job returns it unchanged.
    pub async fn cancel(&self, id: &str) -> Result<Job, SchedulerError> {
        on_engine!(self, e => e.transition(id, Transition::Cancel).await)
    }

    /// Pauses a scheduled job (a paused one stays paused).
    pub async fn pause(&self, id: &str) -> Result<Job, SchedulerError> {
        on_engine!(self, e => e.transition(id, Transition::Pause).await)
    }

    /// Resumes a paused job; what it missed follows its misfire policy.
    pub async fn resume(&self, id: &str) -> Result<Job, SchedulerError> {
        on_engine!(self, e => e.transition(id, Transition::Resume).await)
    }

    /// Releases again the occurrences of job `id` in `[start, end)` that were not delivered
    /// and are not out (BackfillJob; see [`crate::domain::backfill`]).
    pub async fn backfill(
        &self,
        id: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Backfilled, SchedulerError> {
        on_engine!(self, e => e.backfill(id, start, end).await)
    }

    /// Releases one extra fire of a scheduled or paused job now (TriggerJob): its fire id is
    /// the occurrence's with `#trigger` after it; the job's schedule is untouched, and its
    /// overlap policy may hold or skip it. Answers once the fire (if any) is stored.
    pub async fn trigger(&self, id: &str) -> Result<Triggered, SchedulerError> {
        on_engine!(self, e => e.trigger(id).await)
    }

    /// Puts `spec` in place of the spec of the job with its id, if that spec still has `etag`
    /// (else [`SchedulerError::Aborted`]); see [`Job::updated`] for the job's next occurrence.
    /// Answers once the change is durable.
    pub async fn update(&self, spec: JobSpec, etag: String) -> Result<Job, SchedulerError> {
        on_engine!(self, e => e.update(spec, etag).await)
    }

    /// Deletes a job at once, in any state; its outstanding fires are dropped (counted, and a
    /// later ack of one is ignored). Answers how many were dropped, once the deletion is stored.
    pub async fn delete(&self, id: &str) -> Result<u32, SchedulerError> {
        on_engine!(self, e => e.delete(id).await)
    }

    /// How long finished jobs are kept.
    pub fn retention(&self) -> Micros {
        on_engine!(self, e => e.retention())
    }

    /// One job.
    pub async fn get(&self, id: &str) -> Result<Job, SchedulerError> {
        match &self.engine {
            Engine::Embedded(e) => e.get(id),
            Engine::Replicated(e) => e.get(id).await,
        }
    }

    /// Up to `n` records of a job's ledger, newest occurrence first, after the record `after`
    /// (where a previous page ended); and whether more follow. NOT_FOUND for an unknown job.
    pub async fn occurrences(
        &self,
        id: &str,
        after: Option<ledger::OccurrenceKey>,
        n: usize,
    ) -> Result<(Vec<crate::domain::Occurrence>, bool), SchedulerError> {
        match &self.engine {
            Engine::Embedded(e) => e.occurrences(id, after, n),
            Engine::Replicated(e) => e.occurrences(id, after, n).await,
        }
    }

    /// Up to `page_size` matching jobs in id order after `after`, and the id to continue after
    /// when there may be more. The embedded engine looks at no more than [`list_scan_budget`]
    /// jobs (only the queue's, when the filter names one), so a page may hold fewer jobs than
    /// asked for, even none, and still have a continuation.
    pub async fn list(
        &self,
        filter: &JobFilter,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), SchedulerError> {
        match &self.engine {
            Engine::Embedded(e) => Ok(e.list(filter, page_size, after)),
            Engine::Replicated(e) => e.list(filter, page_size, after).await,
        }
    }

    /// Opens a subscription on `queue` that holds at most `max_in_flight` un-acked fires.
    pub fn subscribe(
        &self,
        queue: &str,
        max_in_flight: usize,
    ) -> Result<Subscription, SchedulerError> {
        Ok(match &self.engine {
            Engine::Embedded(e) => Subscription::Embedded(e.subscribe(queue, max_in_flight)?),
            Engine::Replicated(e) => Subscription::Replicated(e.subscribe(queue, max_in_flight)?),
        })
    }

    /// Acks fires of `queue` from outside a stream; returns how many were pending. The acks are
    /// durable when this returns.
    pub async fn ack(&self, queue: &str, fire_ids: &[String]) -> Result<u32, SchedulerError> {
        on_engine!(self, e => e.ack(queue, fire_ids).await)
    }

    /// Counts for gauges: jobs by state, and per queue the fires waiting, in flight, and the
    /// subscribers. Meant for a scrape every few seconds, not a hot path. On PostgreSQL the
    /// counts are the database's as of the last refresh (every few seconds), and subscribers
    /// are this replica's.
    pub fn stats(&self) -> Stats {
        on_engine!(self, e => e.stats())
    }

    /// Fires dropped (by this process) after their last attempt because their job has no
    /// dead-letter queue.
    pub fn dropped_fires(&self) -> u64 {
        on_engine!(self, e => e.dropped_fires())
    }

    /// First step of shutdown: refuse new subscriptions and end the open ones.
    pub fn close_subscriptions(&self) {
        on_engine!(self, e => e.close_subscriptions())
    }

    /// Stops the core: ends subscriptions, stops the loops, commits every change already
    /// accepted. Idempotent.
    pub async fn shutdown(&self) {
        on_engine!(self, e => e.shutdown().await)
    }

    /// Now, as the core decides it (on PostgreSQL: the database's clock, as estimated from
    /// this replica's); for the gRPC layer's validation of relative times.
    pub fn now(&self) -> Timestamp {
        on_engine!(self, e => e.now())
    }

    /// Waits until the core has done everything due at the clock's current time, together
    /// with every change asked for before this call. For tests and tools that drive a
    /// [`ManualClock`]: advance it, settle, then look.
    pub async fn settle(&self) {
        on_engine!(self, e => e.settle().await)
    }

    /// How many jobs the core holds, in every state.
    pub async fn job_count(&self) -> usize {
        match &self.engine {
            Engine::Embedded(e) => e.job_count(),
            Engine::Replicated(e) => e.job_count().await,
        }
    }
}

/// Acks, nacks and deadline extensions for one subscription; usable from any task.
#[derive(Debug, Clone)]
pub enum SubscriberHandle {
    #[doc(hidden)]
    Embedded(EmbeddedHandle),
    #[doc(hidden)]
    Replicated(ReplicaHandle),
}

macro_rules! on_handle {
    ($self:expr, $h:ident => $call:expr) => {
        match $self {
            SubscriberHandle::Embedded($h) => $call,
            SubscriberHandle::Replicated($h) => $call,
        }
    };
}

impl SubscriberHandle {
    /// Acks fires of this subscription's queue (also ones whose deadline has passed). Written
    /// with the next group commit; not waited for.
    pub fn ack(&self, fire_ids: &[String]) {
        on_handle!(self, h => h.ack(fire_ids))
    }

    /// Gives fires in flight on this subscription back for redelivery after `delay`
    /// (attempt + 1).
    pub fn nack(&self, fire_ids: &[String], delay: Micros) {
        on_handle!(self, h => h.nack(fire_ids, delay))
    }

    /// Moves the ack deadline of fires in flight on this subscription to `now + extension`.
    pub fn extend(&self, fire_ids: &[String], extension: Micros) {
        on_handle!(self, h => h.extend(fire_ids, extension))
    }

    /// Ends the subscription. Fires it held stay leased until their ack deadlines (the worker
    /// may still be working on them, and may ack them on another stream or with Ack); then they
    /// are redelivered as any expired fire is.
    pub fn close(&self) {
        on_handle!(self, h => h.close())
    }
}

/// The fires of one subscription, as a stream. Dropping it ends the subscription.
#[derive(Debug)]
pub enum Subscription {
    #[doc(hidden)]
    Embedded(EmbeddedSubscription),
    #[doc(hidden)]
    Replicated(ReplicaSubscription),
}

impl Subscription {
    /// A handle for acking from another task.
    pub fn handle(&self) -> SubscriberHandle {
        match self {
            Subscription::Embedded(s) => SubscriberHandle::Embedded(s.handle()),
            Subscription::Replicated(s) => SubscriberHandle::Replicated(s.handle()),
        }
    }

    /// The next fire; `None` once the subscription is closed (shutdown).
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        match self.get_mut() {
            Subscription::Embedded(s) => Pin::new(s).poll_next(cx),
            Subscription::Replicated(s) => Pin::new(s).poll_next(cx),
        }
    }
}
