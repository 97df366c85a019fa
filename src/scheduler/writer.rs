//! The writer: the one place where durable state changes.
//!
//! Every change (Schedule, Cancel, Pause, Resume, a job advancing past its occurrences, an ack, a
//! redelivery) is an [`Op`] sent to one thread, which decides each against memory plus the
//! changes already decided and not yet applied, into the next batch. A second thread commits
//! each batch in one store transaction (one fsync: group commit), then applies it to memory and
//! answers each caller. Because applying happens there and not in the caller, a caller that
//! goes away mid-call (a cancelled RPC) cannot leave a change half-applied: it is either
//! committed and applied, or not committed at all.
//!
//! The two threads form a pipeline: batch n+1 is decided while batch n is being committed.
//! What a batch decided is visible to later decisions through its [`Pending`] record (kept in
//! the state until the batch is applied), never through memory, which shows only committed
//! changes. A batch that read what a pending batch decided (a job, a deleted job, released
//! fires) is not committed if that one's commit fails: its callers are told the change was not
//! stored, as for a failed commit. (A third thread, applying while the next batch commits, was
//! tried: on two cores it bought nothing measurable — the burst took 1.46–1.51 s with it,
//! 1.15–1.64 s without — for one more thread to reason about.)
//!
//! A fire is born here: [`decide_advance`] writes the job's new status and the fire's record in
//! the same transaction, so a crash can never lose an occurrence.

use super::{FastMap, FastSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::SchedulerError;
use super::embedded::Inner;
use super::observe::{DropReason, RedeliveryReason, SkipReason};
use super::state::{FireStatus, State};
use crate::domain::fire::{AfterAttempt, after_attempt, expiry_backoff};
use crate::domain::{
    FireRecord, Job, JobId, JobState, Micros, Timestamp, advance_with_room, fire_id,
};
use crate::store::Write;

/// How long a finished job past its retention waits before it is looked at again, while a fire
/// of it is outstanding.
const RETIRE_RECHECK_MICROS: Micros = 60_000_000;
/// Most ops decided and committed in one transaction.
const MAX_OPS_PER_BATCH: usize = 4_096;
/// Pause of the writer after a failed commit, before it takes the next batch; doubled after
/// each further failure, up to [`MAX_RETRY_AFTER_FAILED_COMMIT`].
const RETRY_AFTER_FAILED_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_RETRY_AFTER_FAILED_COMMIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SchedulerError>>;

pub(crate) use crate::domain::Transition;

/// Why a fire goes back for redelivery, and so when it is delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redelivery {
    /// The worker nacked it; deliver again after this delay.
    Nack(Micros),
    /// Its ack deadline passed (also after the stream that held it went away); back off
    /// exponentially.
    Expired,
}

impl Redelivery {
    fn reason(self) -> RedeliveryReason {
        match self {
            Redelivery::Nack(_) => RedeliveryReason::Nack,
            Redelivery::Expired => RedeliveryReason::Expired,
        }
    }
}

/// What the observer is told once a batch is applied.
#[derive(Debug)]
enum Event {
    Stored(FireRecord),
    Acked(FireRecord),
    Redelivered(FireRecord, RedeliveryReason),
    DeadLettered(FireRecord, String),
    Dropped(FireRecord, DropReason),
    Skipped(String, u64, SkipReason),
}

/// A change for the writer.
#[derive(Debug)]
pub(crate) enum Op {
    Schedule {
        job: Job,
        reply: Reply<Job>,
    },
    /// Jobs stored all together or not at all (BatchSchedule).
    ScheduleBatch {
        jobs: Vec<Job>,
        reply: Reply<Vec<Job>>,
    },
    Transition {
        id: String,
        transition: Transition,
        reply: Reply<Job>,
    },
    /// Jobs the timer found due, each with the occurrence it saw.
    Advance {
        due: Vec<(JobId, Timestamp)>,
        reply: Reply<()>,
    },
    /// Fires already marked acked in memory; their records are deleted.
    Ack {
        fire_ids: Vec<String>,
        reply: Option<Reply<()>>,
    },
    Redeliver {
        fire_id: String,
        why: Redelivery,
    },
    /// Deletes a job at once, dropping its outstanding fires; answers how many.
    Delete {
        id: String,
        reply: Reply<u32>,
    },
    /// Finished jobs whose retention ended; each is deleted unless a fire of it is still
    /// outstanding (then it is looked at again later).
    Retire {
        ids: Vec<JobId>,
    },
    /// Commit even if nothing else is to be written: while commits fail, shows whether the
    /// store works again.
    Probe,
    /// Answered once every op sent before it is committed and applied.
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Commit what came before, then stop.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// From the commit thread: it is done with the batch it had and takes the next.
    CommitterFree,
}

/// What a batch decided that later batches must see while it is being committed: the jobs as
/// it leaves them, the jobs it deletes, the fires it releases (by job), the fires whose acks it
/// writes, and how it changes the fires outstanding per queue.
/// Kept in [`State::pending`] from the moment the batch is handed to the committer until it is
/// applied or rolled back, under the same lock as memory, so that a decision sees each change
/// exactly once: in here or in memory.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    seq: u64,
    jobs: FastMap<JobId, Job>,
    deleted: FastSet<JobId>,
    new_fires: FastMap<JobId, Vec<String>>,
    acked: FastSet<String>,
    queue_delta: FastMap<String, i64>,
}

/// What to do to memory once a batch is committed.
#[derive(Debug)]
enum Effect {
    /// Replace the job in memory with the batch's version and re-arm its timer.
    Job(JobId),
    /// Re-arm a job's timer from memory (an advance that found nothing to do).
    Rearm(JobId),
    NewFire(FireRecord),
    /// Back on its queue with the next attempt (now or after `not_before`).
    FireRedelivered(FireRecord, RedeliveryReason),
    FireDeleted(String),
    /// Moved to its job's dead-letter queue after its last attempt on `from_queue`.
    FireDeadLettered {
        rec: FireRecord,
        from_queue: String,
        attempts: u32,
    },
    /// Deleted after its last attempt: its job has no dead-letter queue.
    FireDropped(FireRecord),
    /// The job is deleted; so are these fires of it, still outstanding.
    JobDeleted {
        id: JobId,
        fires: Vec<String>,
    },
    /// A finished job kept past its retention because a fire of it is outstanding.
    RetireLater(JobId),
    /// Occurrences of a job on `queue` passed over without a fire.
    Skipped {
        queue: String,
        count: u64,
        reason: SkipReason,
    },
}

/// What a ScheduleBatch decided: the ids to answer with, or why none is stored.
type BatchOutcome = Result<Vec<JobId>, SchedulerError>;

/// A batch being decided: the writes, the jobs as they will be after it, and what to apply.
#[derive(Debug, Default)]
struct Batch {
    writes: Vec<Write>,
    jobs: FastMap<JobId, Job>,
    /// The oldest pending batch a decision of this batch read (a job, a deleted job, released
    /// fires): if that one or a later one is not stored, neither is this one.
    depends_on: std::cell::Cell<Option<u64>>,
    /// Fires this batch releases, by job (a delete later in the batch, or in a batch decided
    /// while this one is pending, deletes them too).
    new_fires: FastMap<JobId, Vec<String>>,
    /// How this batch changes the fires outstanding per queue (released: +1; acked, dropped
    /// or deleted: -1; dead-lettered: -1 on its queue, +1 on the dead-letter queue).
    queue_delta: FastMap<String, i64>,
    effects: Vec<Effect>,
    job_replies: Vec<(Reply<Job>, Result<JobId, SchedulerError>)>,
    batch_replies: Vec<(Reply<Vec<Job>>, BatchOutcome)>,
    count_replies: Vec<(Reply<u32>, Result<u32, SchedulerError>)>,
    /// Jobs deleted in this batch (a later op in it sees them gone).
    deleted: FastSet<JobId>,
    /// When the batch is decided; finish times are stamped with it.
    now: Timestamp,
    unit_replies: Vec<Reply<()>>,
    /// Fires whose redelivery is in this batch, with the delay decided for them; put back in
    /// line with that delay if the commit fails.
    redelivered: Vec<(String, Option<Timestamp>)>,
    /// Acked fires deleted in this batch; their deletion is retried if the commit fails.
    acked: FastSet<String>,
}

impl Batch {
    /// The job as this batch leaves it: from the batch, else from the batches still being
    /// committed (newest first), else from memory (locked only for the clone; memory's durable
    /// parts change only through this pipeline, so the copy stays valid).
    fn job(&self, inner: &Inner, id: &str) -> Option<Job> {
        if let Some(job) = self.jobs.get(id) {
            return Some(job.clone());
        }
        if self.deleted.contains(id) {
            return None;
        }
        let state = inner.lock();
        for pending in state.pending.iter().rev() {
            if let Some(job) = pending.jobs.get(id) {
                self.read_pending(pending.seq);
                return Some(job.clone());
            }
            if pending.deleted.contains(id) {
                self.read_pending(pending.seq);
                return None;
            }
        }
        state.jobs.get(id).map(|e| e.job.clone())
    }

    /// Notes that a decision read what pending batch `seq` decided.
    fn read_pending(&self, seq: u64) {
        let first = self.depends_on.get().map_or(seq, |d| d.min(seq));
        self.depends_on.set(Some(first));
    }

    /// Hands what this batch decided over to its [`Pending`] record.
    fn pending(&mut self, seq: u64) -> Pending {
        Pending {
            seq,
            jobs: std::mem::take(&mut self.jobs),
            deleted: std::mem::take(&mut self.deleted),
            new_fires: std::mem::take(&mut self.new_fires),
            acked: std::mem::take(&mut self.acked),
            queue_delta: std::mem::take(&mut self.queue_delta),
        }
    }

    fn count(&mut self, queue: &str, delta: i64) {
        match self.queue_delta.get_mut(queue) {
            Some(n) => *n += delta,
            None => {
                self.queue_delta.insert(queue.to_string(), delta);
            }
        }
    }

    /// Fires outstanding on `queue` as this batch leaves it: memory's count, changed by the
    /// batches still being committed and by this one.
    fn outstanding(&self, inner: &Inner, queue: &str) -> usize {
        let state = inner.lock();
        let changed: i64 = state
            .pending
            .iter()
            .filter_map(|p| p.queue_delta.get(queue))
            .chain(self.queue_delta.get(queue))
            .sum();
        usize::try_from((i64::from(state.queue_fires(queue)) + changed).max(0)).unwrap_or(0)
    }

    fn put_job(&mut self, mut job: Job, spec_too: bool) {
        if job.status.state.is_final() && job.status.finish_time.is_none() {
            job.status.finish_time = Some(self.now);
        }
        let id = job.spec.id.clone();
        self.deleted.remove(&id);
        if spec_too {
            self.writes.push(Write::PutSpec(job.spec.clone()));
        }
        self.writes
            .push(Write::PutStatus(id.clone(), job.status.clone()));
        self.effects.push(Effect::Job(id.clone()));
        self.jobs.insert(id, job);
    }
}

/// A decided batch on its way to the committer.
struct Decided {
    batch: Batch,
    pending: Arc<Pending>,
    /// The oldest pending batch whose decisions this one read: if that one, or any after it,
    /// fails to commit, this one is not committed either.
    builds_on: Option<u64>,
    probe: bool,
    flushes: Vec<oneshot::Sender<()>>,
    stops: Vec<oneshot::Sender<()>>,
}

/// The batch being decided: ops go into it until the commit thread is free to take it.
struct Open {
    batch: Batch,
    ops: usize,
    probe: bool,
    flushes: Vec<oneshot::Sender<()>>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Open {
    fn new(inner: &Inner) -> Open {
        Open {
            batch: Batch {
                now: inner.clock.now(),
                ..Batch::default()
            },
            ops: 0,
            probe: false,
            flushes: Vec::new(),
            stops: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.ops == 0 && !self.probe && self.flushes.is_empty() && self.stops.is_empty()
    }
}

/// Runs the writer until a `Shutdown` op: decides ops here, and commits them on a thread of
/// its own. Ops that arrive while a batch is being committed are decided into the next batch
/// at once, and that batch is handed over the moment the commit thread is free (it says so
/// with [`Op::CommitterFree`]): group commit, with deciding overlapped with committing.
pub(crate) fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Op>) {
    // Holds a batch handed over while another commits (only a full batch or a shutdown is
    // handed over to a busy commit thread).
    let (to_commit, decided) = std::sync::mpsc::sync_channel::<Decided>(1);
    let committer_inner = inner.clone();
    let committer = match std::thread::Builder::new()
        .name("tickd-commit".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_loop(&committer_inner, decided)
            }));
            if let Err(panic) = ran {
                committer_inner.fail(&format!(
                    "the writer thread panicked: {}",
                    super::panic_message(&*panic)
                ));
            }
        }) {
        Ok(handle) => handle,
        Err(e) => {
            inner.fail(&format!("cannot start the commit thread: {e}"));
            return;
        }
    };
    let mut seq: u64 = 0;
    let mut committer_free = true;
    let mut open: Option<Open> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(op) = next.take() {
            taken += 1;
            match op {
                Op::CommitterFree => committer_free = true,
                op => {
                    let open = open.get_or_insert_with(|| Open::new(&inner));
                    match op {
                        Op::Probe => open.probe = true,
                        Op::Shutdown { reply } => open.stops.push(reply),
                        Op::Flush { reply } => open.flushes.push(reply),
                        op => {
                            open.ops += 1;
                            let now = inner.clock.now();
                            open.batch.now = now;
                            decide(&inner, &mut open.batch, op, now);
                            inner
                                .ops_decided
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
            if taken < MAX_OPS_PER_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let Some(ready) = open.take_if(|o| {
            !o.is_empty() && (committer_free || o.ops >= MAX_OPS_PER_BATCH || !o.stops.is_empty())
        }) else {
            continue;
        };
        seq += 1;
        let mut batch = ready.batch;
        let pending = Arc::new(batch.pending(seq));
        inner.lock().pending.push_back(pending.clone());
        let stopping = !ready.stops.is_empty();
        committer_free = false;
        let builds_on = batch.depends_on.get();
        let handed = to_commit.send(Decided {
            batch,
            pending,
            builds_on,
            probe: ready.probe,
            flushes: ready.flushes,
            stops: ready.stops,
        });
        if handed.is_err() || stopping {
            break;
        }
    }
    drop(to_commit);
    // A panic in the commit thread already failed the core.
    let _ = committer.join();
    debug!("writer stopped");
}

/// Commits and applies decided batches in order, answering their callers, flushes and
/// shutdowns, until the writer stops or a batch carries a shutdown.
fn commit_loop(inner: &Inner, decided: std::sync::mpsc::Receiver<Decided>) {
    let mut failures: u32 = 0;
    // The last batch whose commit failed (or was refused because one before it failed).
    let mut last_failed: u64 = 0;
    for d in decided {
        let seq = d.pending.seq;
        let doomed = d.builds_on.is_some_and(|first| last_failed >= first);
        let has_writes = !d.batch.writes.is_empty() || d.probe;
        let result = commit(inner, &d.batch, d.probe, doomed);
        let stored = result.is_ok();
        apply_batch(inner, d.batch, &d.pending, result);
        if stored {
            if has_writes {
                failures = 0;
            }
        } else {
            last_failed = seq;
            if !doomed {
                // Back off so that a broken disk is not hammered; calls that arrive meanwhile
                // wait and are tried with a later batch.
                let pause = RETRY_AFTER_FAILED_COMMIT
                    .saturating_mul(1 << failures.min(8))
                    .min(MAX_RETRY_AFTER_FAILED_COMMIT);
                failures = failures.saturating_add(1);
                std::thread::sleep(pause);
            }
        }
        for reply in d.flushes {
            let _ = reply.send(());
        }
        if !d.stops.is_empty() {
            for reply in d.stops {
                let _ = reply.send(());
            }
            break;
        }
        // The writer hands over what it decided meanwhile.
        let _ = inner.send(Op::CommitterFree);
    }
}

/// Commits one decided batch (or, when `doomed`, refuses it: a batch it builds on was not
/// stored).
fn commit(
    inner: &Inner,
    batch: &Batch,
    probe: bool,
    doomed: bool,
) -> Result<(), crate::store::StoreError> {
    if doomed {
        Err(crate::store::StoreError::Io(
            "a change decided before it was not stored".into(),
        ))
    } else if batch.writes.is_empty() && !probe {
        Ok(())
    } else {
        let started = std::time::Instant::now();
        let result = inner.store.commit(&batch.writes);
        inner.config.observer.store_committed(
            batch.writes.len(),
            started.elapsed(),
            result.is_ok(),
        );
        inner.set_store_health(result.as_ref().err());
        result
    }
}

/// Applies one committed batch to memory, or rolls back what deciding it took (when `result`
/// says it was not stored), and answers its callers.
fn apply_batch(
    inner: &Inner,
    batch: Batch,
    pending: &Pending,
    result: Result<(), crate::store::StoreError>,
) {
    let (replies, batch_answers, events) = inner.mutate(|state| {
        let mut events = Vec::new();
        // This batch's changes are in memory from here on (or were never made).
        if state.pending.front().is_some_and(|p| p.seq == pending.seq) {
            state.pending.pop_front();
        } else {
            error!(
                batch = pending.seq,
                "writer pipeline out of order: a batch is applied that is not the oldest pending"
            );
            state.pending.retain(|p| p.seq != pending.seq);
        }
        match &result {
            Ok(()) => events = apply(inner, state, &pending.jobs, batch.effects),
            Err(e) => {
                error!(error = %e, writes = batch.writes.len(), "store commit failed; the batch's changes were not made");
                for effect in batch.effects {
                    if let Effect::Job(id) | Effect::Rearm(id) = effect {
                        state.sync_timer(&id);
                    }
                }
                for (id, not_before) in &batch.redelivered {
                    state.requeue_unwritten(id, *not_before);
                }
            }
        }
        // Job replies read the job from memory after apply, so they show the committed state.
        let mut replies = Vec::with_capacity(batch.job_replies.len());
        for (reply, outcome) in batch.job_replies {
            let answer = match (&result, outcome) {
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(not_stored(e)),
                (Ok(()), Ok(id)) => state
                    .jobs
                    .get(&id)
                    .map(|e| e.job.clone())
                    .ok_or_else(|| SchedulerError::Internal(format!("job {id} vanished"))),
            };
            replies.push((reply, answer));
        }
        let mut batch_answers = Vec::with_capacity(batch.batch_replies.len());
        for (reply, outcome) in batch.batch_replies {
            let answer = match (&result, outcome) {
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(not_stored(e)),
                (Ok(()), Ok(ids)) => ids
                    .iter()
                    .map(|id| {
                        state.jobs.get(id).map(|e| e.job.clone()).ok_or_else(|| {
                            SchedulerError::Internal(format!("job {id} vanished"))
                        })
                    })
                    .collect(),
            };
            batch_answers.push((reply, answer));
        }
        (replies, batch_answers, events)
    });
    let observer = &inner.config.observer;
    for event in events {
        match event {
            Event::Stored(rec) => observer.fire_stored(&rec),
            Event::Acked(rec) => observer.fire_acked(&rec),
            Event::Redelivered(rec, reason) => observer.fire_redelivered(&rec, reason),
            Event::DeadLettered(rec, from) => observer.fire_dead_lettered(&rec, &from),
            Event::Dropped(rec, reason) => observer.fire_dropped(&rec, reason),
            Event::Skipped(queue, count, reason) => {
                observer.occurrences_skipped(&queue, count, reason)
            }
        }
    }
    for (reply, answer) in batch_answers {
        let _ = reply.send(answer);
    }
    for (reply, answer) in replies {
        let _ = reply.send(answer);
    }
    for (reply, outcome) in batch.count_replies {
        let answer = match (&result, outcome) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(not_stored(e)),
            (Ok(()), Ok(n)) => Ok(n),
        };
        let _ = reply.send(answer);
    }
    for reply in batch.unit_replies {
        let _ = reply.send(result.as_ref().map(|_| ()).map_err(not_stored));
    }
    if result.is_err() {
        // Acked fires stay acked in memory; their deletion is retried until the store takes
        // it, so memory and store agree again.
        if !pending.acked.is_empty() {
            let _ = inner.ops.send(Op::Ack {
                fire_ids: pending.acked.iter().cloned().collect(),
                reply: None,
            });
        }
    }
}

fn not_stored(e: &crate::store::StoreError) -> SchedulerError {
    match e {
        crate::store::StoreError::Full(_) => SchedulerError::ResourceExhausted(format!(
            "the change could not be stored: {e}; free space on tickd's data volume (tickd \
             retries by itself)"
        )),
        _ => SchedulerError::Unavailable(format!(
            "the change could not be stored: {e}; retry shortly"
        )),
    }
}

/// Applies a committed batch to memory.
fn apply(
    inner: &Inner,
    state: &mut State,
    jobs: &FastMap<JobId, Job>,
    effects: Vec<Effect>,
) -> Vec<Event> {
    let mut events = Vec::new();
    for effect in effects {
        match effect {
            Effect::Job(id) => {
                if let Some(job) = jobs.get(&id) {
                    state.put_job(job.clone());
                }
            }
            Effect::Rearm(id) => state.sync_timer(&id),
            Effect::NewFire(rec) => {
                if let Some(spec) = state.jobs.get(&rec.job_id).map(|e| e.job.spec.clone()) {
                    events.push(Event::Stored(rec.clone()));
                    state.insert_fire(rec, spec);
                }
            }
            Effect::FireRedelivered(rec, reason) => {
                events.push(Event::Redelivered(rec.clone(), reason));
                state.apply_fire_update(rec);
            }
            Effect::FireDeleted(id) => {
                if let Some(entry) = state.remove_fire(&id) {
                    events.push(Event::Acked(entry.rec));
                }
            }
            Effect::JobDeleted { id, fires } => {
                for fire_id in fires {
                    if let Some(entry) = state.remove_fire(&fire_id) {
                        inner
                            .dropped_fires
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        events.push(Event::Dropped(entry.rec, DropReason::JobDeleted));
                    }
                }
                state.remove_job(&id);
            }
            Effect::Skipped {
                queue,
                count,
                reason,
            } => events.push(Event::Skipped(queue, count, reason)),
            Effect::RetireLater(id) => {
                let later = state.clock.now().plus(RETIRE_RECHECK_MICROS);
                state.set_expiry(&id, Some(later));
            }
            Effect::FireDeadLettered {
                rec,
                from_queue,
                attempts,
            } => {
                warn!(fire_id = %rec.fire_id, job_id = %rec.job_id, queue = %from_queue, dead_letter_queue = %rec.queue, attempts, "fire dead-lettered after its last attempt");
                events.push(Event::DeadLettered(rec.clone(), from_queue));
                state.apply_fire_update(rec);
            }
            Effect::FireDropped(rec) => {
                warn!(fire_id = %rec.fire_id, job_id = %rec.job_id, queue = %rec.queue, attempts = rec.attempt, "fire dropped after its last attempt: its job has no dead-letter queue");
                inner
                    .dropped_fires
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                state.remove_fire(&rec.fire_id);
                events.push(Event::Dropped(rec, DropReason::AttemptsExhausted));
            }
        }
    }
    events
}

fn decide(inner: &Inner, batch: &mut Batch, op: Op, now: Timestamp) {
    match op {
        Op::Delete { id, reply } => {
            let outcome = decide_delete(inner, batch, &id);
            batch.count_replies.push((reply, outcome));
        }
        Op::Retire { ids } => {
            for id in ids {
                decide_retire(inner, batch, id);
            }
        }
        Op::Schedule { job, reply } => {
            let id = job.spec.id.clone();
            let outcome = match batch.job(inner, &id) {
                Some(existing) if existing.spec == job.spec => Ok(id),
                Some(_) => Err(SchedulerError::AlreadyExists(id.to_string())),
                None => {
                    batch.put_job(job, true);
                    Ok(id)
                }
            };
            batch.job_replies.push((reply, outcome));
        }
        Op::ScheduleBatch { jobs, reply } => {
            // All or nothing: every job is checked before any is put.
            let taken = jobs.iter().enumerate().find_map(|(index, job)| {
                match batch.job(inner, &job.spec.id) {
                    Some(existing) if existing.spec != job.spec => Some(SchedulerError::InBatch {
                        index,
                        error: Box::new(SchedulerError::AlreadyExists(job.spec.id.to_string())),
                    }),
                    _ => None,
                }
            });
            let outcome = match taken {
                Some(e) => Err(e),
                None => {
                    let mut ids = Vec::with_capacity(jobs.len());
                    for job in jobs {
                        let id = job.spec.id.clone();
                        if batch.job(inner, &id).is_none() {
                            batch.put_job(job, true);
                        }
                        ids.push(id);
                    }
                    Ok(ids)
                }
            };
            batch.batch_replies.push((reply, outcome));
        }
        Op::Transition {
            id,
            transition,
            reply,
        } => {
            let outcome = decide_transition(inner, batch, &id, transition);
            batch.job_replies.push((reply, outcome));
        }
        Op::Advance { due, reply } => {
            for (id, expected) in due {
                decide_advance(inner, batch, id, expected, now);
            }
            batch.unit_replies.push(reply);
        }
        Op::Ack { fire_ids, reply } => {
            let acked: Vec<(String, Option<String>)> = {
                let state = inner.lock();
                fire_ids
                    .into_iter()
                    .filter_map(|id| {
                        let fire = state
                            .fires
                            .get(&id)
                            .filter(|f| f.status == FireStatus::Acked)?;
                        // A batch still being committed may delete it too (a retried ack):
                        // this batch writes its own delete, so as not to depend on that one,
                        // but counts it off its queue only once.
                        let counted = state.pending.iter().any(|p| p.acked.contains(&id));
                        let queue = (!counted).then(|| fire.rec.queue.clone());
                        Some((id, queue))
                    })
                    .collect()
            };
            for (id, queue) in acked {
                // The same id may come from a stream ack, a unary ack and a retry at once.
                if batch.acked.insert(id.clone()) {
                    if let Some(queue) = queue {
                        batch.count(&queue, -1);
                    }
                    batch.writes.push(Write::DeleteFire(id.clone()));
                    batch.effects.push(Effect::FireDeleted(id));
                }
            }
            if let Some(reply) = reply {
                batch.unit_replies.push(reply);
            }
        }
        Op::Redeliver { fire_id, why } => decide_redelivery(inner, batch, fire_id, why, now),
        // Taken by `run` before deciding.
        Op::Probe | Op::Flush { .. } | Op::Shutdown { .. } | Op::CommitterFree => {}
    }
}

fn decide_transition(
    inner: &Inner,
    batch: &mut Batch,
    id: &str,
    transition: Transition,
) -> Result<JobId, SchedulerError> {
    let Some(mut job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    if job
        .apply(transition)
        .map_err(|e| SchedulerError::FailedPrecondition(e.to_string()))?
    {
        batch.put_job(job.clone(), false);
    }
    Ok(job.spec.id.clone())
}

/// Deletes a job and its outstanding fires; answers how many fires were dropped.
fn decide_delete(inner: &Inner, batch: &mut Batch, id: &str) -> Result<u32, SchedulerError> {
    let Some(job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    let id = job.spec.id.clone();
    let fires: Vec<(String, String)> = {
        let state = inner.lock();
        let mut fires: Vec<(String, String)> = state
            .fires_of(&id)
            .into_iter()
            .filter_map(|f| {
                let queue = state.fires.get(&f)?.rec.queue.clone();
                Some((f, queue))
            })
            .collect();
        // Fires released by batches still being committed are not in memory yet.
        for pending in &state.pending {
            if let Some(released) = pending.new_fires.get(&id) {
                batch.read_pending(pending.seq);
                fires.extend(released.iter().map(|f| (f.clone(), job.spec.queue.clone())));
            }
        }
        fires
    };
    let count = fires.len();
    delete_job(batch, id, fires);
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Deletes a finished job whose retention ended, unless a fire of it is still outstanding.
fn decide_retire(inner: &Inner, batch: &mut Batch, id: JobId) {
    let Some(job) = batch.job(inner, &id) else {
        return;
    };
    if !job.status.state.is_final() {
        return;
    }
    let outstanding = {
        let state = inner.lock();
        let pending = state.pending.iter().find(|p| p.new_fires.contains_key(&id));
        if let Some(p) = pending {
            batch.read_pending(p.seq);
        }
        state.fires_per_job.get(&id).is_some_and(|n| *n > 0) || pending.is_some()
    };
    if outstanding {
        batch.effects.push(Effect::RetireLater(id));
        return;
    }
    debug!(job_id = %id, "finished job deleted: its retention ended");
    delete_job(batch, id, Vec::new());
}

/// Deletes a job and its outstanding `fires` (id and queue of each).
fn delete_job(batch: &mut Batch, id: JobId, fires: Vec<(String, String)>) {
    let mut ids = Vec::with_capacity(fires.len());
    for (fire_id, queue) in fires {
        batch.count(&queue, -1);
        batch.writes.push(Write::DeleteFire(fire_id.clone()));
        ids.push(fire_id);
    }
    let fires = ids;
    // Fires this same batch released for the job (it fell due beside the delete) go too.
    let mut released = Vec::new();
    batch.effects.retain(|effect| match effect {
        Effect::NewFire(rec) if rec.job_id == id => {
            released.push((rec.fire_id.clone(), rec.queue.clone()));
            false
        }
        _ => true,
    });
    for (fire_id, queue) in released {
        batch.count(&queue, -1);
        batch.writes.push(Write::DeleteFire(fire_id));
    }
    batch.new_fires.remove(&id);
    batch.writes.push(Write::DeleteJob(id.clone()));
    batch.jobs.remove(&id);
    batch.deleted.insert(id.clone());
    batch.effects.push(Effect::JobDeleted { id, fires });
}

/// Advances one due job: the job's new status and a record per fire go into the same batch.
fn decide_advance(
    inner: &Inner,
    batch: &mut Batch,
    id: JobId,
    expected: Timestamp,
    now: Timestamp,
) {
    let Some(job) = batch.job(inner, &id) else {
        return;
    };
    if job.status.state != JobState::Scheduled || job.status.next_occurrence != Some(expected) {
        // Changed since the timer looked (paused, cancelled, already advanced).
        batch.effects.push(Effect::Rearm(id));
        return;
    }
    let queue = job.spec.queue.clone();
    let outstanding = batch.outstanding(inner, &queue);
    let room = inner.config.max_queue_backlog.saturating_sub(outstanding);
    let plan = advance_with_room(&job, now, inner.config.max_catch_up_fires, room);
    if plan.status == job.status {
        batch.effects.push(Effect::Rearm(id));
        return;
    }
    if plan.skipped > 0 {
        let at_least = if plan.skipped_at_least {
            "at least "
        } else {
            ""
        };
        warn!(
            job_id = %id,
            queue = %job.spec.queue,
            skipped = plan.skipped,
            policy = ?job.spec.misfire_policy,
            "{at_least}{} missed occurrence(s) skipped by the misfire policy",
            plan.skipped
        );
        batch.effects.push(Effect::Skipped {
            queue: queue.clone(),
            count: plan.skipped,
            reason: SkipReason::Misfire,
        });
    }
    if plan.skipped_no_room > 0 {
        warn!(
            job_id = %id,
            queue = %queue,
            skipped = plan.skipped_no_room,
            max_queue_backlog = inner.config.max_queue_backlog,
            "occurrence(s) skipped: the queue holds --max-queue-backlog fires not yet acked; is anyone consuming it?"
        );
        batch.effects.push(Effect::Skipped {
            queue: queue.clone(),
            count: plan.skipped_no_room,
            reason: SkipReason::BacklogFull,
        });
    }
    if !plan.fires.is_empty() {
        batch.count(&queue, i64::try_from(plan.fires.len()).unwrap_or(i64::MAX));
    }
    for occurrence in &plan.fires {
        let mut rec = FireRecord {
            fire_id: fire_id(&id, *occurrence),
            job_id: id.clone(),
            queue: job.spec.queue.clone(),
            scheduled_time: *occurrence,
            fire_time: now,
            attempt: 1,
            not_before: None,
            dead_lettered: false,
            trace: None,
        };
        rec.trace = inner.config.observer.fire_released(&rec, &job);
        batch
            .new_fires
            .entry(id.clone())
            .or_default()
            .push(rec.fire_id.clone());
        batch.writes.push(Write::PutFire(rec.clone()));
        batch.effects.push(Effect::NewFire(rec));
    }
    let mut next = job;
    next.status = plan.status;
    batch.put_job(next, false);
}

/// Counts an attempt for a fire that came back, and decides where it goes: its queue again
/// (at once or after a delay), the dead-letter queue, or nowhere.
fn decide_redelivery(
    inner: &Inner,
    batch: &mut Batch,
    fire_id: String,
    why: Redelivery,
    now: Timestamp,
) {
    let (spec, mut rec) = {
        let state = inner.lock();
        match state.fires.get(&fire_id) {
            // Anything but Pending: acked while on its way here.
            Some(entry) if entry.status == FireStatus::Pending => {
                (entry.spec.clone(), entry.rec.clone())
            }
            _ => return,
        }
    };
    let delivered_attempt = rec.attempt;
    let delay = match why {
        Redelivery::Nack(d) => d,
        Redelivery::Expired => {
            expiry_backoff(delivered_attempt, inner.config.max_redelivery_backoff)
        }
    };
    match after_attempt(
        rec.attempt,
        rec.dead_lettered,
        spec.max_attempts,
        spec.dead_letter_queue.as_deref(),
        delay,
    ) {
        AfterAttempt::DeadLetter { queue } => {
            batch.redelivered.push((fire_id.clone(), None));
            let from_queue = std::mem::replace(&mut rec.queue, queue);
            batch.count(&from_queue, -1);
            batch.count(&rec.queue, 1);
            rec.attempt = 1;
            rec.not_before = None;
            rec.dead_lettered = true;
            batch.writes.push(Write::PutFire(rec.clone()));
            batch.effects.push(Effect::FireDeadLettered {
                rec,
                from_queue,
                attempts: delivered_attempt,
            });
            return;
        }
        AfterAttempt::Drop => {
            batch.count(&rec.queue, -1);
            batch.redelivered.push((fire_id.clone(), None));
            batch.writes.push(Write::DeleteFire(fire_id));
            batch.effects.push(Effect::FireDropped(rec));
            return;
        }
        AfterAttempt::Again { attempt, delay } => {
            rec.attempt = attempt;
            rec.not_before = (delay > 0).then(|| now.plus(delay));
        }
    }
    batch.redelivered.push((fire_id, rec.not_before));
    batch.writes.push(Write::PutFire(rec.clone()));
    batch
        .effects
        .push(Effect::FireRedelivered(rec, why.reason()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(job: &str, at: i64) -> FireRecord {
        FireRecord {
            fire_id: fire_id(job, Timestamp(at)),
            job_id: job.into(),
            queue: "q".into(),
            scheduled_time: Timestamp(at),
            fire_time: Timestamp(at),
            attempt: 1,
            not_before: None,
            dead_lettered: false,
            trace: None,
        }
    }

    /// A job deleted in the batch that released a fire for it takes that fire along: the
    /// store is left with no fire whose job is gone, and memory never gets it.
    #[test]
    fn a_delete_takes_the_fires_its_batch_released() {
        let mut batch = Batch::default();
        for rec in [released("a", 1), released("b", 1)] {
            batch.writes.push(Write::PutFire(rec.clone()));
            batch.effects.push(Effect::NewFire(rec));
        }
        delete_job(&mut batch, "a".into(), Vec::new());
        let deleted: Vec<&str> = batch
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::DeleteFire(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec![fire_id("a", Timestamp(1)).as_str()]);
        let new_fires: Vec<&str> = batch
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::NewFire(rec) => Some(&*rec.job_id),
                _ => None,
            })
            .collect();
        assert_eq!(new_fires, vec!["b"]);
        assert!(matches!(batch.writes.last(), Some(Write::DeleteJob(id)) if &**id == "a"));
    }
}
