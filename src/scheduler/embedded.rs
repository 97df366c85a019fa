//! The core on the embedded store: one process owns its store, holds every job and
//! outstanding fire in memory ([`state`](super::state)), commits through one writer thread
//! (group commit) and wakes one timer task when something is due. Memory is changed only after
//! the store has the change, and can always be rebuilt from it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::Stream;
use tracing::{info, warn};

use super::clock::Clock;
use super::state::{self, Delivery, State, SubId};
use super::writer::{self, Op, Redelivery, Reply, Transition};
use super::{
    Backfilled, Health, JobFilter, QueueStats, SchedulerConfig, SchedulerError, StartError, Stats,
    Triggered, list_scan_budget, mark_failed, mark_store, panic_message, shutting_down, timer,
};
use crate::domain::ledger::OccurrenceKey;
use crate::domain::{Job, JobKey, JobSpec, Micros, Occurrence, Timestamp};
use crate::store::Store;

/// Shared by the handle, the timer task, the writer thread and subscriptions.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(super) state: Mutex<State>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) store: Arc<dyn Store>,
    pub(super) config: SchedulerConfig,
    pub(super) ops: mpsc::UnboundedSender<Op>,
    pub(super) timer_wake: Notify,
    pub(super) stop: watch::Sender<bool>,
    /// Fires dropped after their last attempt with no dead-letter queue.
    pub(super) dropped_fires: AtomicU64,
    pub(super) health: watch::Sender<Health>,
}

impl Inner {
    /// Locks the state. A lock poisoned by a panic may hold a half-made change: the core is
    /// marked failed (the process exits and rebuilds memory from the store), and the state is
    /// used only for the way out.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| {
            self.fail("a panic interrupted a change to the scheduler's state");
            p.into_inner()
        })
    }

    /// Marks the core failed for good (see [`Health::Failed`]).
    pub(crate) fn fail(&self, reason: &str) {
        mark_failed(&self.health, reason);
    }

    /// Records whether the last commit succeeded; a failed core stays failed.
    pub(crate) fn set_store_health(&self, failure: Option<&crate::store::StoreError>) {
        mark_store(
            &self.health,
            failure.map(|e| e.to_string()),
            "store commits succeed again",
        );
    }

    /// Runs `f` on the locked state, then, with the lock released, wakes the timer loop if `f`
    /// armed something earlier than what it is sleeping for, and the subscription streams that
    /// may now have a fire. Every change to the state goes through here.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, wake, wakers) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (
                result,
                std::mem::take(&mut state.timer_dirty),
                std::mem::take(&mut state.wakers),
            )
        };
        if wake {
            self.timer_wake.notify_one();
        }
        for waker in wakers {
            waker.wake();
        }
        result
    }

    pub(super) fn send(&self, op: Op) -> Result<(), SchedulerError> {
        self.ops.send(op).map_err(|_| shutting_down())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, SchedulerError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| shutting_down())?
    }

    pub(super) fn redeliver(&self, ids: Vec<crate::domain::FireId>, why: Redelivery) {
        for fire_id in ids {
            // After shutdown the writer is gone; the fire stays in the store and comes back
            // on restart.
            let _ = self.send(Op::Redeliver { fire_id, why });
        }
    }
}

#[derive(Debug)]
struct Tasks {
    writer: std::thread::JoinHandle<()>,
    timer: tokio::task::JoinHandle<()>,
}

/// A handle to the running core. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Embedded {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Option<Tasks>>>,
}

impl Embedded {
    /// Loads everything from `store`, rebuilds memory from it, and starts the writer thread
    /// and the timer task.
    pub async fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Result<Embedded, StartError> {
        let loader = store.clone();
        let snapshot = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| StartError::Load(format!("loader task failed: {e}")))??;
        let (jobs, fires) = (snapshot.jobs.len(), snapshot.fires.len());
        let state = State::restore(snapshot, clock.clone(), config.retention, config.ledger);
        info!(jobs, fires, "state restored from the store");

        let (ops, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            clock,
            store,
            config,
            ops,
            timer_wake: Notify::new(),
            stop: watch::Sender::new(false),
            dropped_fires: AtomicU64::new(0),
            health: watch::Sender::new(Health::Serving),
        });
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("tickd-writer".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    writer::run(writer_inner.clone(), rx)
                }));
                if let Err(panic) = ran {
                    writer_inner.fail(&format!(
                        "the writer thread panicked: {}",
                        panic_message(&*panic)
                    ));
                }
            })
            .map_err(|e| StartError::Load(format!("cannot start the writer thread: {e}")))?;
        // The timer runs in a task of its own; this one notices when it ends other than by
        // shutdown.
        let supervised = inner.clone();
        let timer = tokio::spawn(async move {
            let ran =
                tokio::spawn(timer::run(supervised.clone(), supervised.stop.subscribe())).await;
            if !*supervised.stop.borrow() {
                let why = match ran {
                    Err(e) if e.is_panic() => {
                        format!(
                            "the timer task panicked: {}",
                            panic_message(&*e.into_panic())
                        )
                    }
                    Err(e) => format!("the timer task ended: {e}"),
                    Ok(()) => "the timer task ended: the writer is gone".to_string(),
                };
                supervised.fail(&why);
            }
        });
        Ok(Embedded {
            inner,
            tasks: Arc::new(Mutex::new(Some(Tasks { writer, timer }))),
        })
    }

    /// The core's health, as it changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// Stores a new job (or returns the existing one with the same id and spec). Answers
    /// once the job is on disk.
    pub async fn schedule(&self, job: Job) -> Result<Job, SchedulerError> {
        self.inner.call(|reply| Op::Schedule { job, reply }).await
    }

    /// Stores `jobs` in one commit, all or none.
    pub async fn schedule_batch(&self, jobs: Vec<Job>) -> Result<Vec<Job>, SchedulerError> {
        self.inner
            .call(|reply| Op::ScheduleBatch { jobs, reply })
            .await
    }

    pub async fn transition(
        &self,
        id: &str,
        transition: Transition,
    ) -> Result<Job, SchedulerError> {
        let id = id.to_string();
        self.inner
            .call(|reply| Op::Transition {
                id,
                transition,
                reply,
            })
            .await
    }

    /// Releases one extra fire of a job now, as its overlap policy says; answers it once it
    /// is stored.
    pub async fn trigger(&self, id: &str) -> Result<Triggered, SchedulerError> {
        let at = self.now();
        self.inner
            .call(|reply| Op::Trigger {
                id: id.to_string(),
                at,
                reply,
            })
            .await
    }

    /// Releases again the occurrences of a past range that were not delivered; answers once
    /// they are stored.
    pub async fn backfill(
        &self,
        id: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Backfilled, SchedulerError> {
        self.inner
            .call(|reply| Op::Backfill {
                id: id.to_string(),
                start,
                end,
                reply,
            })
            .await
    }

    /// Puts `spec` in place of its job's spec if that still has `etag` (see [`Job::updated`]).
    pub async fn update(&self, spec: JobSpec, etag: String) -> Result<Job, SchedulerError> {
        self.inner
            .call(|reply| Op::Update {
                spec: Box::new(spec),
                etag,
                reply,
            })
            .await
    }

    /// Deletes a job at once, in any state; its outstanding fires are dropped (counted, and a
    /// later ack of one is ignored). Answers how many were dropped, once the deletion is stored.
    pub async fn delete(&self, id: &str) -> Result<u32, SchedulerError> {
        let id = id.to_string();
        self.inner.call(|reply| Op::Delete { id, reply }).await
    }

    /// How long finished jobs are kept.
    pub fn retention(&self) -> Micros {
        self.inner.config.retention
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<Job, SchedulerError> {
        self.inner
            .lock()
            .job(id)
            .ok_or_else(|| SchedulerError::NotFound(id.to_string()))
    }

    /// Up to `n` ledger records of a job, newest first, after `after`; and whether more follow.
    pub fn occurrences(
        &self,
        id: &str,
        after: Option<OccurrenceKey>,
        n: usize,
    ) -> Result<(Vec<Occurrence>, bool), SchedulerError> {
        let state = self.inner.lock();
        if !state.jobs.contains(id.as_bytes()) {
            return Err(SchedulerError::NotFound(id.to_string()));
        }
        let now = state.clock.now();
        Ok(match state.ledgers.get(id.as_bytes()) {
            Some(l) => l.page(after, n, state.ledger_bounds, now),
            None => (Vec::new(), false),
        })
    }

    /// Up to `page_size` matching jobs in id order after `after`, and the id to continue after
    /// when there may be more. Looks at no more than [`list_scan_budget`] jobs (only the
    /// queue's, when the filter names one), so a page may hold fewer jobs than asked for, even
    /// none, and still have a continuation.
    pub fn list(
        &self,
        filter: &JobFilter,
        page_size: usize,
        after: Option<&str>,
    ) -> (Vec<Job>, Option<String>) {
        let state = self.inner.lock();
        let start = match after {
            Some(a) => Bound::Excluded(a.as_bytes()),
            None => Bound::Unbounded,
        };
        let ids: Box<dyn Iterator<Item = &JobKey>> = match &filter.queue {
            Some(q) => match state.by_queue.get(q) {
                Some(ids) => Box::new(ids.range::<[u8], _>((start, Bound::Unbounded))),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(state.jobs.range::<[u8], _>((start, Bound::Unbounded))),
        };
        let mut page = Vec::new();
        let mut last_seen: Option<&JobKey> = None;
        let mut budget = list_scan_budget(page_size);
        for id in ids {
            if page.len() == page_size || budget == 0 {
                // More may match after what was looked at.
                let next = last_seen.map(|id| id.id().to_string());
                return (page, next);
            }
            budget -= 1;
            last_seen = Some(id);
            if let Some(job) = state.job(id.id())
                && filter.matches(&job)
            {
                page.push(job);
            }
        }
        (page, None)
    }

    /// Opens a subscription on `queue` that holds at most `max_in_flight` un-acked fires.
    pub fn subscribe(
        &self,
        queue: &str,
        max_in_flight: usize,
    ) -> Result<EmbeddedSubscription, SchedulerError> {
        let id = self.inner.mutate(|state| {
            if state.shutting_down {
                return Err(shutting_down());
            }
            let max = self.inner.config.max_subscribers;
            if state.subscribers.len() >= max {
                return Err(SchedulerError::ResourceExhausted(format!(
                    "tickd already serves {max} Subscribe streams (--max-subscribers); retry \
                     later or share streams between workers"
                )));
            }
            Ok(state.add_subscriber(queue, max_in_flight.max(1)))
        })?;
        Ok(EmbeddedSubscription {
            handle: EmbeddedHandle {
                id,
                queue: queue.to_string(),
                inner: self.inner.clone(),
            },
        })
    }

    /// Acks fires of `queue` from outside a stream; returns how many were pending. The acks are
    /// on disk when this returns.
    pub async fn ack(&self, queue: &str, fire_ids: &[String]) -> Result<u32, SchedulerError> {
        let (newly, mut ids) = self.inner.mutate(|state| state.mark_acked(fire_ids, queue));
        let n = u32::try_from(newly.len()).unwrap_or(u32::MAX);
        // Ids already acked but whose deletion is still being written are sent again, so this
        // call too answers only once that deletion is on disk.
        ids.extend(newly);
        if ids.is_empty() {
            return Ok(0);
        }
        self.inner
            .call(|reply| Op::Ack {
                fire_ids: ids,
                reply: Some(reply),
            })
            .await?;
        Ok(n)
    }

    /// Counts for gauges: jobs by state (kept up to date as jobs change), and per queue the
    /// fires waiting, in flight, and the subscribers (counted by a scan of the outstanding
    /// fires under the state lock). Meant for a scrape every few seconds, not a hot path.
    pub fn stats(&self) -> Stats {
        let state = self.inner.lock();
        let jobs = state
            .job_counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (*s, *n))
            .collect();
        let mut queues: BTreeMap<&str, QueueStats> = BTreeMap::new();
        for entry in state.fires.values() {
            let q = queues.entry(entry.rec.queue.as_str()).or_default();
            match entry.status {
                state::FireStatus::InFlight { .. } => q.in_flight += 1,
                // Acked, or not deliverable until its job's running fire ends.
                state::FireStatus::Acked | state::FireStatus::Held => {}
                _ => q.backlog += 1,
            }
        }
        for sub in state.subscribers.values() {
            queues.entry(sub.queue.as_str()).or_default().subscribers += 1;
        }
        let queues = queues
            .into_iter()
            .map(|(name, q)| (name.to_string(), q))
            .collect();
        Stats { jobs, queues }
    }

    /// Fires dropped after their last attempt because their job has no dead-letter queue.
    pub fn dropped_fires(&self) -> u64 {
        self.inner.dropped_fires.load(Ordering::Relaxed)
    }

    /// First step of shutdown: refuse new subscriptions and end the open ones. Fires they held
    /// are deliverable again (after a restart, or to a subscriber elsewhere).
    pub fn close_subscriptions(&self) {
        self.inner.mutate(|state| {
            state.shutting_down = true;
            state.close_all_subscribers();
        });
    }

    /// Stops the core: ends subscriptions, stops the timer, commits every change already
    /// accepted, and stops the writer. Idempotent.
    pub async fn shutdown(&self) {
        self.close_subscriptions();
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(tasks) = tasks else {
            return;
        };
        self.inner.stop.send_replace(true);
        if let Err(e) = tasks.timer.await {
            warn!(error = %e, "timer task ended abnormally");
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.send(Op::Shutdown { reply: tx }).is_ok() {
            let _ = rx.await;
        }
        let joined = tokio::task::spawn_blocking(move || tasks.writer.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            warn!("writer thread ended abnormally");
        }
        info!("scheduler stopped");
    }
}

/// Acks, nacks and deadline extensions for one subscription; usable from any task.
#[derive(Debug, Clone)]
pub struct EmbeddedHandle {
    id: SubId,
    queue: String,
    inner: Arc<Inner>,
}

impl EmbeddedHandle {
    /// Acks fires of this subscription's queue (also ones whose deadline has passed). Written
    /// with the next group commit; not waited for.
    pub fn ack(&self, fire_ids: &[String]) {
        let (newly, _) = self
            .inner
            .mutate(|state| state.mark_acked(fire_ids, &self.queue));
        if !newly.is_empty() {
            let _ = self.inner.send(Op::Ack {
                fire_ids: newly,
                reply: None,
            });
        }
    }

    /// Gives fires in flight on this subscription back for redelivery after `delay`
    /// (attempt + 1).
    pub fn nack(&self, fire_ids: &[String], delay: Micros) {
        let taken = self
            .inner
            .mutate(|state| state.take_back(fire_ids, self.id));
        self.inner.redeliver(taken, Redelivery::Nack(delay));
    }

    /// Moves the ack deadline of fires in flight on this subscription to `now + extension`.
    pub fn extend(&self, fire_ids: &[String], extension: Micros) {
        self.inner.mutate(|state| {
            let deadline = state.clock.steady_now().plus(extension);
            state.extend(fire_ids, self.id, deadline);
        });
    }

    /// Ends the subscription. Fires it held stay leased until their ack deadlines (the worker
    /// may still be working on them, and may ack them on another stream or with Ack); then they
    /// are redelivered as any expired fire is.
    pub fn close(&self) {
        self.inner.mutate(|state| state.detach_subscriber(self.id));
    }
}

/// The fires of one subscription, as a stream: a fire is taken off its queue only when the
/// stream is polled and the subscription has room. Dropping it ends the subscription.
#[derive(Debug)]
pub struct EmbeddedSubscription {
    handle: EmbeddedHandle,
}

impl EmbeddedSubscription {
    /// A handle for acking from another task.
    pub fn handle(&self) -> EmbeddedHandle {
        self.handle.clone()
    }

    /// The next fire; `None` once the subscription is closed (shutdown).
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for EmbeddedSubscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let id = self.handle.id;
        let inner = &self.handle.inner;
        let polled = inner.mutate(|state| state.poll_delivery(id, cx.waker()));
        if let Poll::Ready(Some(delivery)) = &polled {
            inner
                .config
                .observer
                .fire_delivered(&delivery.fire, inner.clock.now());
        }
        polled
    }
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        self.handle.close();
    }
}

impl Embedded {
    /// Now, as the core's clock says (for the gRPC layer's validation of relative times).
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Waits until the core has done everything due at the clock's current time: the timer has
    /// taken every due occurrence, ack deadline and redelivery delay, and the writer has
    /// committed and applied what they caused, together with every change asked for before
    /// this call. For tests and tools that drive a [`ManualClock`]: advance it, settle, then
    /// look. Under the system clock and steady load it may take long to find a quiet moment.
    pub async fn settle(&self) {
        loop {
            let now = self.inner.clock.now();
            let steady = self.inner.clock.steady_now();
            let idle_before = self.inner.lock().idle_at(now, steady);
            let (tx, rx) = oneshot::channel();
            if self.inner.send(Op::Flush { reply: tx }).is_err() || rx.await.is_err() {
                return; // The writer has stopped: nothing more will change.
            }
            if idle_before
                && self.inner.clock.now() == now
                && self.inner.clock.steady_now() == steady
                && self.inner.lock().idle_at(now, steady)
            {
                return;
            }
            // Let the timer task run (it may share this thread).
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// How many jobs the core holds, in every state.
    pub fn job_count(&self) -> usize {
        self.inner.lock().jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::ManualClock;
    use crate::store::MemoryStore;

    /// A panic while the state lock is held is not shrugged off: the core reports itself
    /// failed (so the process exits and rebuilds memory from the store).
    #[tokio::test]
    async fn a_poisoned_state_lock_fails_the_core() {
        let core = Embedded::start(
            Arc::new(MemoryStore::new()),
            Arc::new(ManualClock::new(Timestamp(0))),
            SchedulerConfig::default(),
        )
        .await
        .expect("start");
        let health = core.health();
        assert_eq!(*health.borrow(), Health::Serving);
        let inner = core.inner.clone();
        let poisoner = std::thread::spawn(move || {
            let _held = inner.state.lock();
            panic!("injected panic while holding the state lock");
        });
        assert!(poisoner.join().is_err());
        assert!(core.get("x").is_err());
        assert!(
            matches!(&*health.borrow(), Health::Failed(r) if r.contains("panic")),
            "{:?}",
            *health.borrow()
        );
        core.shutdown().await;
    }
}
